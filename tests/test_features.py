"""The feature cache: hit, miss, invalidation, corruption; unreadable images are skipped."""

import os

import pytest
import torch

from fedclip.backbones import LazyBackbone
from fedclip.data.folder import scan_dataset
from fedclip.features import image_features, text_features


@pytest.fixture
def tiny_backbone(tiny_arch):
    return LazyBackbone(tiny_arch)


def test_second_extraction_is_a_cache_hit_that_never_loads_the_backbone(tiny_arch, toy_root,
                                                                         tmp_path):
    domain = scan_dataset(toy_root).domains["alpha"]
    first = image_features(LazyBackbone(tiny_arch), domain, tmp_path)
    assert not first.from_cache and first.features.shape == (30, 32) and first.valid.all()
    fresh = LazyBackbone(tiny_arch)
    second = image_features(fresh, domain, tmp_path)
    assert second.from_cache and not fresh.loaded
    torch.testing.assert_close(first.features, second.features)


def test_changed_image_invalidates_the_entry(tiny_backbone, toy_root, tmp_path):
    domain = scan_dataset(toy_root).domains["alpha"]
    image_features(tiny_backbone, domain, tmp_path)
    target = domain.files[0]
    st = target.stat()
    os.utime(target, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    assert not image_features(tiny_backbone, scan_dataset(toy_root).domains["alpha"],
                              tmp_path).from_cache


def test_other_backbone_misses(tiny_backbone, toy_root, tmp_path, tiny_arch):
    domain = scan_dataset(toy_root).domains["alpha"]
    image_features(tiny_backbone, domain, tmp_path)
    other = LazyBackbone(tiny_arch.replace("@none", "@none"))
    other.fingerprint = "different"
    assert not image_features(other, domain, tmp_path).from_cache


def test_corrupted_entry_is_detected_and_rebuilt(tiny_backbone, toy_root, tmp_path, caplog):
    domain = scan_dataset(toy_root).domains["alpha"]
    good = image_features(tiny_backbone, domain, tmp_path)
    (entry,) = (tmp_path / "images").glob("*.safetensors")
    data = bytearray(entry.read_bytes())
    data[-20:] = bytes(20)  # damage the tensor payload, keep the header
    entry.write_bytes(bytes(data))
    rebuilt = image_features(tiny_backbone, domain, tmp_path)
    assert not rebuilt.from_cache and "corrupted" in caplog.text
    torch.testing.assert_close(rebuilt.features, good.features)
    entry.write_bytes(b"not a safetensors file")
    assert not image_features(tiny_backbone, domain, tmp_path).from_cache
    assert "unreadable" in caplog.text
    assert image_features(tiny_backbone, domain, tmp_path).from_cache


def test_unreadable_images_are_skipped_and_counted(tiny_backbone, toy_root, tmp_path):
    (toy_root / "alpha" / "cat" / "img_000.png").write_bytes(b"\x89PNG garbage")
    (toy_root / "alpha" / "dog" / "zzz.jpg").write_bytes(b"")
    domain = scan_dataset(toy_root).domains["alpha"]
    feats = image_features(tiny_backbone, domain, tmp_path)
    assert len(domain) == 31 and int(feats.valid.sum()) == 29
    assert set(feats.skipped) == {"cat/img_000.png", "dog/zzz.jpg"}
    cached = image_features(tiny_backbone, domain, tmp_path)
    assert cached.from_cache and cached.skipped == feats.skipped


def test_text_features_are_cached_with_the_logit_scale(tiny_arch, tmp_path):
    first = text_features(LazyBackbone(tiny_arch), ["a cat", "a dog"], tmp_path)
    fresh = LazyBackbone(tiny_arch)
    second = text_features(fresh, ["a cat", "a dog"], tmp_path)
    assert not fresh.loaded and second.logit_scale == pytest.approx(first.logit_scale)
    torch.testing.assert_close(first.features, second.features)


def test_a_prompt_ensemble_averages_normalised_template_features(tiny_arch, toy_root, tmp_path):
    import torch.nn.functional as F

    from fedclip.config import RunConfig
    from fedclip.task import prepare

    one = RunConfig.build(data_root=str(toy_root), backbone=tiny_arch, heldout="gamma")
    many = one.replace(prompt_templates=("a photo of a {}.", "a sketch of a {}."))
    a = prepare(one.replace(prompt_template="a photo of a {}.")).text.features
    b = prepare(one.replace(prompt_template="a sketch of a {}.")).text.features
    mean = prepare(many).text.features
    torch.testing.assert_close(mean, (F.normalize(a, dim=-1) + F.normalize(b, dim=-1)) / 2)
    named = prepare(one.replace(prompt_templates=("@simple-imagenet",))).text.features
    assert named.shape == a.shape and not torch.allclose(named, mean)
