"""Backbone specs: clear errors, real code paths on what ships here."""

import pytest
import torch

from fedclip.backbones import backbone_fingerprint, load_backbone, parse_spec
from fedclip.errors import BackboneError
from tests.conftest import has_standin


def test_unknown_spec_names_the_forms():
    with pytest.raises(BackboneError, match="unknown backbone spec 'clip-b32'.*open_clip:"):
        parse_spec("clip-b32")


def test_open_clip_spec_errors():
    with pytest.raises(BackboneError, match="ARCH@TAG"):
        backbone_fingerprint("open_clip:ViT-B-32")
    with pytest.raises(BackboneError, match="no architecture 'ViT-Z-99'"):
        backbone_fingerprint("open_clip:ViT-Z-99@none")
    with pytest.raises(BackboneError, match="no pretrained tag 'bogus'.*openai"):
        backbone_fingerprint("open_clip:ViT-B-32@bogus")


def test_random_open_clip_is_deterministic_across_builds(tiny_arch):
    a, b = load_backbone(tiny_arch), load_backbone(tiny_arch)
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(a.encode_images(x), b.encode_images(x))
    assert a.embed_dim == 32 and a.encode_texts(["a", "b"]).shape == (2, 32)


@pytest.mark.skipif(not has_standin(), reason="stand-in packages not installed")
def test_standin_embeds_images_and_texts_in_one_space():
    from PIL import Image

    b = load_backbone("standin")
    img = b.preprocess(Image.new("RGB", (64, 48), "red"))
    emb = b.encode_images(img[None])
    assert emb.shape == (1, 384)
    assert emb.norm().item() == pytest.approx(10.0, rel=1e-4)  # CLIP-like raw feature norm
    assert b.encode_texts(["a picture of a dog"]).shape == (1, 384)
    with pytest.raises(BackboneError, match="takes no options"):
        load_backbone("standin:big")


def test_open_clip_local_checkpoint_file(tiny_arch, tmp_path):
    import os

    reference = load_backbone(tiny_arch)
    with torch.no_grad():
        for p in reference.model.parameters():
            p.add_(0.01)  # weights that differ from the seeded random ones
    path = tmp_path / "tiny.pt"
    torch.save(reference.model.state_dict(), path)
    spec = tiny_arch.replace("@none", f"@{path}")
    loaded = load_backbone(spec)
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(loaded.encode_images(x), reference.encode_images(x))
    before = backbone_fingerprint(spec)
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    assert backbone_fingerprint(spec) != before  # a replaced checkpoint invalidates the cache
