"""The feature cache: hit, miss, invalidation, corruption; unreadable images are skipped."""

import logging
import os

import numpy as np
import pytest
import torch
from PIL import Image

from fedclip.backbones import LazyBackbone
from fedclip.config import MAX_ASPECT_RATIO
from fedclip.data.folder import scan_dataset
from fedclip.features import image_features, text_features
from fedclip.inprocess import experiment as _experiment
from tests.conftest import as_written, toy_cfg

run = as_written(_experiment.run)


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


def test_the_same_files_labelled_in_another_class_order_hit_the_cache(tiny_arch, toy_root,
                                                                        tmp_path):
    """A run that lists the classes in another order (a Flower run's `classes`, a custom
    dataset) labels the same files differently: the entry is the same (files are listed in
    folder order, whatever the labels), and the rows follow the files."""
    lazy = LazyBackbone(tiny_arch)
    first = scan_dataset(toy_root).domains["alpha"]
    other = scan_dataset(toy_root, classes=("red_car", "dog", "cat")).domains["alpha"]
    assert list(first.labels) != list(other.labels) and set(first.files) == set(other.files)
    a = image_features(lazy, first, tmp_path / "c")
    b = image_features(LazyBackbone(tiny_arch), other, tmp_path / "c")
    assert not a.from_cache and b.from_cache
    row = {f: i for i, f in enumerate(first.files)}
    for j, f in enumerate(other.files):
        assert torch.equal(b.features[j], a.features[row[f]])
    assert len(list((tmp_path / "c" / "images").iterdir())) == 1


def test_a_flower_node_holding_a_copy_of_its_domain_reuses_the_in_process_cache(
        tiny_arch, tmp_path, monkeypatch):
    import shutil

    from fedclip.config import RunConfig
    from fedclip.flower.client_app import build_client_app
    from fedclip.flower.server_app import main as server_main
    from fedclip.inprocess.experiment import run
    from tests.conftest import make_image_folder
    from tests.flower_grid import LocalGrid

    domains = ("art_painting", "cartoon", "photo", "sketch")
    classes = ("dog", "elephant", "giraffe", "guitar", "horse", "house", "person")
    root = make_image_folder(tmp_path / "pacs", {d: {c: 2 for c in classes} for d in domains},
                             size=32)
    run(RunConfig.build(backbone=tiny_arch, data_root=str(root), heldout="sketch", rounds=1),
        tmp_path / "local")
    nodes = []
    for d in domains:  # each site a copy of its own domain (copies keep sizes and mtimes)
        shutil.copytree(root / d, tmp_path / "sites" / d / d)
        nodes.append({"data-root": str(tmp_path / "sites" / d), "domain": d})
    encoded = []
    monkeypatch.setattr(LazyBackbone, "encode_images",
                        lambda self, px: encoded.append(len(px)) or pytest.fail("re-encoded"))
    rc = {"backbone": tiny_arch, "heldout": "sketch", "rounds": 1, "discover-timeout": 5.0,
          "out": str(tmp_path / "flower")}
    server_main(LocalGrid(build_client_app(), nodes, rc), rc)
    assert encoded == []
    assert (tmp_path / "flower" / "sketch" / "adapter.safetensors").is_file()


def test_an_interrupted_extraction_continues_where_it_stopped(tiny_arch, toy_root, tmp_path,
                                                              monkeypatch):
    """Ctrl-C mid-extraction keeps every finished chunk; the next extraction encodes only
    the rest, and gives the features an uninterrupted one gives."""
    import fedclip.features as features

    (toy_root / "alpha" / "cat" / "broken.jpg").write_bytes(b"no image")  # skipped, kept
    domain = scan_dataset(toy_root).domains["alpha"]
    whole = image_features(LazyBackbone(tiny_arch), domain, tmp_path / "whole", batch_size=4,
                           workers=0)
    monkeypatch.setattr(features, "EXTRACT_CHUNK_IMAGES", 8)
    backbone = LazyBackbone(tiny_arch)
    real = backbone.encode_images
    encoded: list[int] = []

    def encode(pixels):  # noqa: ANN001, ANN202
        if len(encoded) >= 4:  # the fifth batch: the user presses Ctrl-C
            raise KeyboardInterrupt
        encoded.append(len(pixels))
        return real(pixels)

    monkeypatch.setattr(backbone, "encode_images", encode)
    with pytest.raises(KeyboardInterrupt):
        image_features(backbone, domain, tmp_path / "cut", batch_size=4, workers=0)
    chunks = list((tmp_path / "cut" / "images").glob("*.partial/chunk-*.safetensors"))
    assert len(chunks) == 2  # 16 images saved in two chunks of 8
    encoded.clear()
    resumed_backbone = LazyBackbone(tiny_arch)
    monkeypatch.setattr(resumed_backbone, "encode_images",
                        lambda p: (encoded.append(len(p)), real(p))[1])
    resumed = image_features(resumed_backbone, domain, tmp_path / "cut", batch_size=4,
                             workers=0)
    assert sum(encoded) == len(domain) - 16  # only what was left (the broken file is first)
    torch.testing.assert_close(resumed.features, whole.features, atol=1e-5, rtol=1e-5)
    assert torch.equal(resumed.valid, whole.valid) and resumed.skipped == whole.skipped
    assert not list((tmp_path / "cut" / "images").glob("*.partial"))  # tidied once complete
    assert image_features(LazyBackbone(tiny_arch), domain, tmp_path / "cut").from_cache


def test_a_run_on_cached_features_imports_no_backbone_library(tiny_arch, toy_root, tmp_path):
    """The backbone's identity is checked from what the cache recorded: a run whose features
    are all cached imports neither open_clip (with torchvision and transformers) nor the
    stand-in's libraries; they are imported only when something must be encoded. Nor does
    its optimizer import torch._dynamo (with sympy): `fedclip run` never compiles."""
    import subprocess
    import sys

    from fedclip.config import RunConfig
    from fedclip.task import prepare

    cache = tmp_path / "cache"
    prepare(RunConfig.build(data_root=str(toy_root), backbone=tiny_arch, heldout="gamma",
                            cache_dir=str(cache)))  # every domain and the prompts, cached
    heavy = ("open_clip", "transformers", "sentence_transformers", "torchvision", "timm",
             "sympy")
    script = ("import sys\nfrom fedclip.cli import main\ncode = main(sys.argv[1:])\n"
              f"print(sorted(m for m in {heavy!r} if m in sys.modules))\nsys.exit(code)")
    # the subprocess never registers the tiny architecture: open_clip would not know it
    done = subprocess.run([sys.executable, "-c", script, "run", "--data-root", str(toy_root),
                           "--backbone", tiny_arch, "--heldout", "gamma", "--rounds", "1",
                           "--cache-dir", str(cache), "--out", str(tmp_path / "run"),
                           "--set", "personalize_epochs=0"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().splitlines()[-1] == "[]"
    assert (tmp_path / "run" / "results.json").is_file()


def test_odd_images_are_skipped_or_converted_with_one_warning_per_folder(
        tiny_arch, toy_root, tmp_path, caplog, monkeypatch):
    from fedclip.features import read_image

    cat = toy_root / "beta" / "cat"
    Image.new("L", (1, 100_000)).save(cat / "strip.png", optimize=True)  # a few hundred bytes
    assert (cat / "strip.png").stat().st_size < 2000
    grey16 = np.full((32, 32), 40_000, dtype=np.uint16)
    Image.fromarray(grey16).save(cat / "deep.png")
    for k in range(12):
        (cat / f"broken_{k:02d}.jpg").write_bytes(b"not an image")

    preprocess = lambda img: torch.from_numpy(np.asarray(img, dtype=np.float32))  # noqa: E731
    pixels, why = read_image(cat / "deep.png", preprocess)
    assert why is None and pixels is not None
    assert abs(float(pixels.mean()) - 40_000 * 255 / 65535) < 1  # scaled, not clipped white
    assert read_image(cat / "strip.png", preprocess)[1].startswith("1 x 100000")
    assert f"over {MAX_ASPECT_RATIO:g}" in read_image(cat / "strip.png", preprocess)[1]

    with caplog.at_level(logging.WARNING):
        results = run(toy_cfg(toy_root, tiny_arch, rounds=1, heldout="alpha"), tmp_path / "r")
    skipped = results[0]["skipped_images"]["beta"]
    assert "cat/strip.png" in skipped and "cat/deep.png" not in skipped
    assert len([s for s in skipped if "broken" in s]) == 12
    lines = [r.getMessage() for r in caplog.records if "skipped" in r.getMessage()
             and "beta/cat" in r.getMessage()]
    assert len(lines) == 1 and "skipped 13 image(s)" in lines[0] and "and 8 more" in lines[0]
    assert "not an image PIL can read" in lines[0]


def test_an_image_deleted_during_extraction_is_skipped(tiny_arch, toy_root, tmp_path,
                                                       monkeypatch):
    import fedclip.features as features

    victim = toy_root / "beta" / "dog" / "img_003.png"
    real = features.image_cache_key

    def delete_then_key(fingerprint, domain):  # noqa: ANN001
        victim.unlink(missing_ok=True)  # after the scan listed it, before it is read
        return real(fingerprint, domain)

    monkeypatch.setattr(features, "image_cache_key", delete_then_key)
    results = run(toy_cfg(toy_root, tiny_arch, rounds=1), tmp_path / "r")
    assert "dog/img_003.png" in results[0]["skipped_images"]["beta"]
