"""Backbone specs: clear errors, real code paths on what ships here."""

import os

import pytest
import torch

from fedclip.backbones import backbone_fingerprint, load_backbone, parse_spec
from fedclip.errors import BackboneError
from tests.conftest import has_standin, one_line_error


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


def test_a_transformers_clip_saved_locally_is_a_backbone(tmp_path, toy_root):
    """A tiny random CLIPModel built from a small CLIPConfig, saved with save_pretrained,
    goes through the real path: its processor, features, cache and a run (no download)."""
    from transformers import (
        CLIPConfig,
        CLIPImageProcessor,
        CLIPModel,
        CLIPProcessor,
        CLIPTokenizerFast,
    )

    from fedclip.config import RunConfig
    from fedclip.inprocess.experiment import run

    vocab = {t: i for i, t in enumerate(
        ["<|startoftext|>", "<|endoftext|>", "a</w>", "picture</w>", "of</w>", "cat</w>",
         "dog</w>", "red</w>", "car</w>", "!"])}
    (tmp_path / "vocab.json").write_text(__import__("json").dumps(vocab))
    (tmp_path / "merges.txt").write_text("#version: 0.2\n")
    tokenizer = CLIPTokenizerFast(vocab_file=str(tmp_path / "vocab.json"),
                                  merges_file=str(tmp_path / "merges.txt"))
    images = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32,
                                                                        "width": 32})
    config = CLIPConfig(
        text_config={"vocab_size": len(vocab), "hidden_size": 16, "intermediate_size": 32,
                     "num_hidden_layers": 1, "num_attention_heads": 2,
                     "max_position_embeddings": 77},
        vision_config={"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1,
                       "num_attention_heads": 2, "image_size": 32, "patch_size": 16},
        projection_dim=8)
    torch.manual_seed(0)
    folder = tmp_path / "tiny-clip"
    CLIPModel(config).save_pretrained(folder)
    CLIPProcessor(image_processor=images, tokenizer=tokenizer).save_pretrained(folder)
    spec = f"hf:{folder}"
    r = run(RunConfig.build(data_root=str(toy_root), backbone=spec, heldout="gamma", rounds=1,
                            personalize_epochs=0), tmp_path / "run")[0].to_json()
    assert r["trainable_params"] == 2 * (8 * 8 + 8) and 0 <= r["generalization"] <= 1
    from fedclip.backbones import backbone_fingerprint

    before = backbone_fingerprint(spec)
    (folder / "config.json").write_text((folder / "config.json").read_text() + "\n")
    assert backbone_fingerprint(spec) != before  # another model file: another cache key


def test_a_backbone_provider_from_another_package_is_found(monkeypatch):
    """An entry point in the group fedclip.backbones names a provider module."""
    import importlib.metadata as md
    import sys
    import types

    from fedclip import backbones

    provider = types.ModuleType("my_plugin_provider")
    provider.fingerprint = lambda rest: f"plugin-{rest}"
    sys.modules["my_plugin_provider"] = provider
    ep = types.SimpleNamespace(name="myproj", value="my_plugin_provider")
    monkeypatch.setattr(md, "entry_points",
                        lambda group=None: [ep] if group == "fedclip.backbones" else [])
    monkeypatch.setattr(backbones, "_PROVIDERS", dict(backbones._PROVIDERS))
    assert backbone_fingerprint("myproj:weights-v1") == "myproj-plugin-weights-v1"


def test_hub_specs_take_no_none_tag():
    """open_clip loads hf-hub: and local-dir: repositories' own weights whatever the tag:
    '@none' would promise random weights it cannot give."""
    with pytest.raises(BackboneError, match="drop the tag"):
        backbone_fingerprint("open_clip:hf-hub:org/repo@none")
    assert backbone_fingerprint("open_clip:hf-hub:org/repo") == backbone_fingerprint(
        "open_clip:hf-hub:org/repo@hub")


def test_a_pickle_named_as_a_backbone_checkpoint_is_one_line(tiny_arch, toy_root, tmp_path,
                                                             capsys):
    import pickle

    class Payload:
        def __reduce__(self):
            return (os.getcwd, ())

    bad = tmp_path / "weights.pt"
    bad.write_bytes(pickle.dumps(Payload()))
    arch = tiny_arch.split(":", 1)[1].split("@")[0]
    line = one_line_error(capsys, ["run", "--data-root", str(toy_root), "--backbone",
                                   f"open_clip:{arch}@{bad}", "--heldout", "beta", "--rounds",
                                   "1", "--out", str(tmp_path / "r")])
    assert str(bad) in line and "not a plain weights file" in line
    assert "weights_only=False" not in line  # never advise unsafe loading
