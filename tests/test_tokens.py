"""The token store: patch tokens in the joint space, opt-in, cached and resumable."""

import pytest
import torch
from safetensors import safe_open

from fedclip.backbones import LazyBackbone, load_backbone
from fedclip.data.folder import scan_dataset
from fedclip.errors import BackboneError
from fedclip.features import image_features, image_tokens
from fedclip.inprocess import experiment as _experiment
from tests.conftest import as_written, toy_cfg

run = as_written(_experiment.run)


def _stored(folder):  # noqa: ANN001, ANN202
    entries = sorted((folder / "tokens").glob("*.safetensors"))
    assert len(entries) == 1
    with safe_open(str(entries[0]), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118


def test_cached_tokens_equal_re_encoding_and_open_clips_own_tokens(tiny_arch, toy_root,
                                                                   tmp_path):
    """Row 0 is the pooled embedding the feature cache holds; rows 1.. are open_clip's
    output tokens after ln_post, through proj; from the cache they are what encoding
    gives again (fp32: to 1e-5)."""
    domain = scan_dataset(toy_root).domains["alpha"]
    first = image_tokens(LazyBackbone(tiny_arch), domain, tmp_path, batch_size=4, workers=0)
    again = image_tokens(LazyBackbone(tiny_arch), domain, tmp_path, workers=0)
    assert again.from_cache and not first.from_cache
    assert first.features.shape == (len(domain), 1 + 4, 32)  # 32 px / 16 px patches: 2 x 2
    pooled = image_features(LazyBackbone(tiny_arch), domain, tmp_path, workers=0)
    torch.testing.assert_close(again.features[:, 0], pooled.features, atol=1e-5, rtol=0)
    model = load_backbone(tiny_arch)
    pixels = torch.stack([model.preprocess(__import__("PIL.Image").Image.open(f).convert("RGB"))
                          for f in domain.files])
    visual = model.model.visual
    visual.output_tokens = True
    try:
        with torch.no_grad():
            own_pooled, own_tokens = visual(pixels)  # open_clip: tokens after ln_post, unprojected
    finally:
        visual.output_tokens = False
    torch.testing.assert_close(again.features[:, 0], own_pooled, atol=1e-5, rtol=0)
    torch.testing.assert_close(again.features[:, 1:], own_tokens @ visual.proj, atol=1e-5,
                               rtol=0)
    assert _stored(tmp_path)["tokens"].dtype == torch.float32  # fp16 would change them


def test_tokens_are_fp16_on_disk_only_where_that_changes_nothing(tiny_arch, toy_root, tmp_path):
    """Extracted in fp16, every token is a float16 value: kept as float16 (half the disk),
    read back bit for bit."""
    domain = scan_dataset(toy_root).domains["alpha"]
    backbone = LazyBackbone(tiny_arch, precision="fp16")
    made = image_tokens(backbone, domain, tmp_path, workers=0)
    stored = _stored(tmp_path)
    assert stored["tokens"].dtype == torch.float16
    read = image_tokens(LazyBackbone(tiny_arch, precision="fp16"), domain, tmp_path, workers=0)
    assert read.from_cache and torch.equal(read.features, made.features)
    assert torch.equal(stored["tokens"].float(), made.features[:, 1:])


def test_an_interrupted_token_extraction_continues_where_it_stopped(tiny_arch, toy_root,
                                                                     tmp_path, monkeypatch):
    import fedclip.features as features

    domain = scan_dataset(toy_root).domains["alpha"]
    whole = image_tokens(LazyBackbone(tiny_arch), domain, tmp_path / "whole", batch_size=4,
                         workers=0)
    monkeypatch.setattr(features, "EXTRACT_CHUNK_IMAGES", 8)
    backbone = LazyBackbone(tiny_arch)
    real = backbone.encode_image_tokens
    encoded: list[int] = []

    def encode(pixels):  # noqa: ANN001, ANN202
        if len(encoded) >= 4:
            raise KeyboardInterrupt
        encoded.append(len(pixels))
        return real(pixels)

    monkeypatch.setattr(backbone, "encode_image_tokens", encode)
    with pytest.raises(KeyboardInterrupt):
        image_tokens(backbone, domain, tmp_path / "cut", batch_size=4, workers=0)
    assert len(list((tmp_path / "cut" / "tokens").glob("*.partial/chunk-*"))) == 2
    encoded.clear()
    resumed_backbone = LazyBackbone(tiny_arch)
    monkeypatch.setattr(resumed_backbone, "encode_image_tokens",
                        lambda p: (encoded.append(len(p)), real(p))[1])
    resumed = image_tokens(resumed_backbone, domain, tmp_path / "cut", batch_size=4, workers=0)
    assert sum(encoded) == len(domain) - 16
    assert torch.equal(resumed.features, whole.features)
    assert not list((tmp_path / "cut" / "tokens").glob("*.partial"))


class _NoTokens:
    """A backbone with pooled features only (no ``encode_image_tokens``)."""

    spec, embed_dim, logit_scale, default_batch_size = "notokens", 8, 100.0, 4

    def __init__(self) -> None:
        from torchvision import transforms

        self.preprocess = transforms.Compose([transforms.Resize(8), transforms.CenterCrop(8),
                                              transforms.ToTensor()])

    def encode_images(self, pixels):  # noqa: ANN001, ANN201
        return pixels.flatten(1)[:, :8]


@pytest.mark.parametrize("declared", [True, False])
def test_a_backbone_without_tokens_is_refused_in_one_line(toy_root, tmp_path, monkeypatch,
                                                          declared):
    """A provider that declares NO_TOKENS is refused before its backbone is built; one that
    does not, but whose backbone has no encode_image_tokens, when it is built. One line."""
    import sys
    import types

    from fedclip import backbones

    provider = types.ModuleType("no_tokens_provider")
    provider.fingerprint = lambda rest: "v1"
    provider.FORMS = [("notokens", "pooled features only")]
    if declared:
        provider.NO_TOKENS = "it pools before it projects"
        provider.load = lambda rest, device: pytest.fail("built before the refusal")
    else:
        provider.load = lambda rest, device: _NoTokens()
    monkeypatch.setitem(sys.modules, "no_tokens_provider", provider)
    monkeypatch.setattr(backbones, "_PROVIDERS", dict(backbones._PROVIDERS))
    backbones.register_backbone("notokens", "no_tokens_provider")
    domain = scan_dataset(toy_root).domains["alpha"]
    with pytest.raises(BackboneError) as err:
        image_tokens(LazyBackbone("notokens"), domain, tmp_path, workers=0)
    assert "\n" not in str(err.value) and "no patch tokens" in str(err.value)
    assert ("pools before it projects" in str(err.value)) == declared
    assert not list((tmp_path / "tokens").glob("*.safetensors"))


def test_a_method_without_token_inputs_never_reads_or_writes_tokens(tiny_arch, toy_root,
                                                                     tmp_path, monkeypatch):
    import fedclip.features as features

    def refuse(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        raise AssertionError("a fedclip run asked for tokens")

    monkeypatch.setattr(features, "image_tokens", refuse)
    monkeypatch.setattr(LazyBackbone, "encode_image_tokens", refuse)
    cfg = toy_cfg(toy_root, tiny_arch, rounds=1, cache_dir=str(tmp_path / "cache"))
    run(cfg, tmp_path / "out")
    assert (tmp_path / "cache" / "images").is_dir()
    assert not (tmp_path / "cache" / "tokens").exists()
    assert not list(tmp_path.rglob("*tokens*"))


def test_a_transformers_clip_gives_its_patches_through_post_layernorm_and_projection(
        tmp_path, toy_root, tiny_hf):
    from transformers import CLIPImageProcessor, CLIPModel

    folder = tiny_hf.removeprefix("hf:")
    model = CLIPModel.from_pretrained(folder).eval()
    images = CLIPImageProcessor.from_pretrained(folder)
    domain = scan_dataset(toy_root).domains["alpha"]
    got = image_tokens(LazyBackbone(f"hf:{folder}"), domain, tmp_path / "cache", workers=0)
    assert got.features.shape == (len(domain), 1 + 4, 8)
    pooled = image_features(LazyBackbone(f"hf:{folder}"), domain, tmp_path / "cache", workers=0)
    torch.testing.assert_close(got.features[:, 0], pooled.features, atol=1e-5, rtol=0)
    pil = __import__("PIL.Image").Image
    pixels = images(images=[pil.open(f).convert("RGB") for f in domain.files[:3]],
                    return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        states = model.vision_model(pixel_values=pixels).last_hidden_state[:, 1:]
        expected = model.visual_projection(model.vision_model.post_layernorm(states))
    torch.testing.assert_close(got.features[:3, 1:], expected, atol=1e-5, rtol=0)
