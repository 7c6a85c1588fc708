"""Which client a SuperNode is, and its data (loaded once per process).

A node holds **only its own data** and finds it through its node config:

* deployment: ``--node-config "data-root='/data/photo' domain='photo'"`` (and
  ``client-index=1`` when the run splits a domain into several clients). ``data-root`` is the
  domain's own folder (``<class>/<image>``) or a folder that holds it; nothing else need exist
  on that machine. The node whose domain is the run's held-out domain only evaluates;
* simulation (one machine, one shared folder): ``partition-id`` indexes the plan, the
  training clients in order, then the held-out domain, so a simulation needs ``len(plan)``
  SuperNodes.

The task (classes, prompts, splits) comes from the run config, the same for every node.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import stat
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from fedclip.algorithms import get_algorithm
from fedclip.algorithms.base import Algorithm
from fedclip.backbones import resolve_device
from fedclip.config import RunConfig
from fedclip.core.client import ClientData, Split
from fedclip.data.folder import _subdirs
from fedclip.data.sources import resolve_data_root
from fedclip.errors import ConfigError, DataError, StorageError
from fedclip.flower.codec import require_one_heldout
from fedclip.io import atomic_save_tensors
from fedclip.task import (
    DomainSites,
    Site,
    cache_dir,
    check_index,
    load_domain,
    prompts,
    run_classes,
    site_of,
)

log = logging.getLogger(__name__)
SITE_FORMAT = "fedclip-site/1"
# what this process has built: sites (with their algorithm) and the domains they come from
_SITES: dict[str, tuple[Site, Algorithm, tuple[int, ...]]] = {}
_DOMAINS: dict[str, tuple[DomainSites, tuple[int, ...]]] = {}


def folder_stamp(folders: tuple[str, ...]) -> tuple[int, ...]:
    """The modification times of a site's folders: adding, removing or renaming an image or
    a class folder changes one of them (-1: the folder is gone). One stat per folder."""
    stamps = []
    for folder in folders:
        try:
            stamps.append(os.stat(folder).st_mtime_ns)
        except OSError:
            stamps.append(-1)
    return tuple(stamps)


def data_fingerprint(folders: tuple[str, ...]) -> str:
    """Every entry of a site's folders with its size and modification time (what the
    feature cache checks of each image): an image added, removed, renamed or rewritten
    changes it. One directory listing per folder, no image opened."""
    digest = hashlib.sha256()
    for folder in folders:
        digest.update(f"{folder}\0".encode())
        try:
            with os.scandir(folder) as entries:
                rows = sorted((e.name, e.stat(follow_symlinks=True)) for e in entries)
        except OSError:
            digest.update(b"-")
            continue
        for name, st in rows:
            digest.update(f"{name}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return digest.hexdigest()


def site_file(cfg: RunConfig, root: Path, domain: str, index: int) -> Path:
    """Where a node keeps its site between processes (in the feature cache's folder)."""
    who = hashlib.sha256(f"{root.resolve()}|{domain}|{index}".encode()).hexdigest()[:24]
    return cache_dir(cfg) / "sites" / f"{who}.safetensors"


# RunConfig fields that never change a site's tensors (how it trains, aggregates, keeps
# privacy, reports and checkpoints): a run that changes only these reuses the site file
TRAINING_ONLY = frozenset({
    "rounds", "local_epochs", "batch_size", "lr", "beta1", "beta2", "eps", "weight_decay",
    "optimizer_state", "loss", "lr_decay", "aggregation", "max_weight_ratio", "trim_fraction",
    "norm_factor", "byzantine", "multikrum_keep", "trust", "selection", "dp",
    "dp_clipping_norm", "dp_noise_multiplier", "dp_epsilon", "dp_delta", "options",
    "personalize_epochs", "eval_every", "checkpoint_every", "checkpoint_seconds",
    "clients_per_round", "train_clients_together", "extract_workers", "cache_dir",
    "algorithm"})


def _task_key(cfg: RunConfig) -> str:
    """What decides a site's content: the run's task (data, classes, prompts, backbone,
    splits, partition, seed, extraction), not how it trains (TRAINING_ONLY); of the
    algorithm, only whether it reads features or pixels."""
    from fedclip.algorithms import algorithm_class

    fields = {k: v for k, v in cfg.model_dump(mode="json").items() if k not in TRAINING_ONLY}
    fields["inputs"] = algorithm_class(cfg.algorithm).inputs
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()


def _refuse_special(path: Path) -> None:
    """A site file that is there but not a regular file (a FIFO would block its reader
    forever, a device or folder is not ours to replace): refused in one line, at once."""
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return  # absent or unreadable: rebuilt
    if not stat.S_ISREG(mode):
        raise DataError(f"{path} (this node's site file, in the feature cache) is not a "
                        f"regular file; remove it, and the node rebuilds it")


def save_site(path: Path, site: Site, cfg: RunConfig) -> None:
    """``site`` as one safetensors file: its tensors, and its identity, the run's task key
    and the data fingerprint as metadata (written atomically)."""
    tensors = {"class_text": site.class_text}
    if site.data is not None:
        for part in ("train", "val", "test"):
            split = getattr(site.data, part)
            tensors |= {f"{part}.x": split.x, f"{part}.y": split.y}
        tensors["class_mask"] = site.data.class_mask
    else:
        assert site.heldout is not None and site.heldout_mask is not None
        tensors |= {"heldout.x": site.heldout.x, "heldout.y": site.heldout.y,
                    "class_mask": site.heldout_mask}
    meta = {"role": site.role, "name": site.name, "domain": site.domain, "index": site.index,
            "classes": list(site.classes), "logit_scale": site.logit_scale,
            "images": site.images, "skipped": list(site.skipped),
            "folders": list(site.folders)}
    try:
        atomic_save_tensors(path, tensors, {
            "format": SITE_FORMAT, "task": _task_key(cfg), "site": json.dumps(meta),
            "fingerprint": data_fingerprint(site.folders)})
    except (OSError, StorageError) as exc:  # a read-only or full cache: the node still
        log.warning("could not keep this node's site in %s (%s); it is rebuilt at each "  # runs
                    "message", path, exc)


def read_site(path: Path, cfg: RunConfig) -> Site | None:
    """The site kept in ``path`` when it was built for this run's task from data that is
    unchanged (the fingerprint); None otherwise (absent, stale, damaged: rebuild)."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            header = f.metadata() or {}
            if header.get("format") != SITE_FORMAT or header.get("task") != _task_key(cfg):
                return None
            meta = json.loads(header["site"])
            folders = tuple(str(x) for x in meta["folders"])
            if data_fingerprint(folders) != header.get("fingerprint"):
                return None
            t = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open's API)
        name = str(meta["name"])
        site = Site("heldout", name, str(meta["domain"]), int(meta["index"]),
                    tuple(str(c) for c in meta["classes"]), t["class_text"],
                    float(meta["logit_scale"]), images=int(meta["images"]), folders=folders,
                    skipped=tuple(str(x) for x in meta["skipped"]))
        if meta["role"] == "train":
            train, val, test = (Split(t[f"{p}.x"], t[f"{p}.y"]) for p in ("train", "val", "test"))
            site = replace(site, role="train",
                           data=ClientData(name, train, val, test, t["class_mask"]))
        else:
            site = replace(site, heldout=Split(t["heldout.x"], t["heldout.y"]),
                           heldout_mask=t["class_mask"])
        _check_site(site, run_classes(cfg))
        return site
    except Exception as exc:  # noqa: BLE001 (a damaged file is rebuilt, never trusted)
        if path.exists():
            log.info("rebuilding this node's site: %s is unreadable (%s)", path, exc)
        return None


def _check_site(site: Site, classes: tuple[str, ...]) -> None:
    """A site file holds the run's classes and tensors that agree with each other: float32
    features of the prompts' size, one int64 label in range per row, a boolean class mask."""
    n_classes = len(classes)
    if site.classes != classes or site.class_text.ndim != 2 or \
            site.class_text.shape[0] != n_classes or site.class_text.dtype != torch.float32:
        raise ValueError("its classes or class prompts are not this run's")
    dim = site.class_text.shape[1]
    mask = site.data.class_mask if site.data is not None else site.heldout_mask
    if mask is None or mask.dtype != torch.bool or mask.shape != (n_classes,):
        raise ValueError("its class mask is not one flag per class")
    splits = ([site.data.train, site.data.val, site.data.test] if site.data is not None
              else [site.heldout] if site.heldout is not None else [])
    if not splits or site.role not in ("train", "heldout"):
        raise ValueError("it holds no split")
    for split in splits:
        assert split is not None
        if split.x.dtype != torch.float32 or split.y.dtype != torch.int64 or \
                split.x.ndim != 2 or split.x.shape[1] != dim or split.y.shape != (len(split.x),):
            raise ValueError("a split's features or labels have the wrong type or shape")
        if len(split.y) and not 0 <= int(split.y.min()) <= int(split.y.max()) < n_classes:
            raise ValueError("labels out of range")


def _drop_if_changed(store: dict[str, Any], key: str) -> None:
    """Forget what this process built under ``key`` once its folders changed (its first
    item has ``folders``, its last the stamp taken when it was built)."""
    if key in store and folder_stamp(store[key][0].folders) != store[key][-1]:
        log.info("the data of this node changed since its last message: rescanning")
        del store[key]


def domain_of(cfg: RunConfig, root: Path, domain: str) -> DomainSites:
    """The domain's shared part, built once per process while its folders are unchanged
    (every client of a domain reuses its scan, features and partition)."""
    key = f"{cfg.model_dump_json()}|{root}|{domain}"
    _drop_if_changed(_DOMAINS, key)
    if key not in _DOMAINS:
        sites = load_domain(cfg, root, domain)
        _DOMAINS[key] = (sites, folder_stamp(sites.folders))
    return _DOMAINS[key][0]


def build_site(cfg: RunConfig, root: Path, domain: str, index: int) -> Site:
    """A node's site: from its site file when the data is unchanged (no scan, no
    partition), else built (once per domain and process) and kept in that file."""
    check_index(cfg, domain, index)
    path = site_file(cfg, root, domain, index)
    _refuse_special(path)
    site = read_site(path, cfg)
    if site is None:
        site = site_of(cfg, domain_of(cfg, root, domain), index)
        save_site(path, site, cfg)
    return site


def plan(cfg: RunConfig, domains: list[str]) -> list[tuple[str, int]]:
    """(domain, client index) for every node of a simulation, in partition-id order."""
    entries = [(d, i) for d in domains if d != cfg.heldout for i in range(cfg.clients_per_domain)]
    return entries + [(cfg.heldout, 0)]


def _root(cfg: RunConfig) -> Path:
    return resolve_data_root(cfg.data_root, cache_dir(cfg))


def identify(cfg: RunConfig, node_config: dict[str, Any]) -> tuple[str, int]:
    """The (domain, client index) a node's config names."""
    if "domain" in node_config:
        try:
            index = int(node_config.get("client-index", 0))
        except (TypeError, ValueError):
            raise ConfigError(f"node-config client-index must be an integer (got "
                              f"{node_config.get('client-index')!r})") from None
        return str(node_config["domain"]), index
    if "partition-id" not in node_config:
        raise ConfigError("this SuperNode has no domain in its node config; start it with "
                          "--node-config \"data-root='/path' domain='NAME'\"")
    root = _root(cfg)
    domains = _subdirs(root) if root.is_dir() else []
    entries = plan(cfg, domains)
    pid, total = int(node_config["partition-id"]), int(node_config["num-partitions"])
    if cfg.heldout not in domains:
        raise ConfigError(f"held-out domain {cfg.heldout!r} is not a folder of {root}")
    if total != len(entries):
        raise ConfigError(f"this run needs {len(entries)} SuperNodes ({len(entries) - 1} "
                          f"training clients + the held-out domain); got {total}. Set "
                          f"options.num-supernodes = {len(entries)}")
    return entries[pid]


def node_for(cfg: RunConfig, node_config: dict[str, Any]) -> tuple[Site, Algorithm]:
    """The site this process serves and its algorithm, built once and kept for later
    messages while its folders are unchanged (a stat per folder per message: a file added
    or removed since makes it rebuild, the feature cache extracting only what is new). A
    deployed node starts a fresh process per message: it reads its site file
    (:func:`build_site`), checked against the data's fingerprint, in milliseconds."""
    require_one_heldout(cfg)
    if node_config.get("data-root"):
        cfg = cfg.replace(data_root=str(node_config["data-root"]))
    key = f"{cfg.model_dump_json()}|{sorted(node_config.items())}"
    _drop_if_changed(_SITES, key)
    if key not in _SITES:
        domain, index = identify(cfg, node_config)
        device = resolve_device(str(node_config.get("device", cfg.device)))
        site = build_site(cfg, _root(cfg), domain, index).to(device)
        algorithm = get_algorithm(cfg)
        algorithm.setup(prompts(cfg, run_classes(cfg)), site.class_text)
        _SITES[key] = (site, algorithm, folder_stamp(site.folders))
    site, algorithm, _ = _SITES[key]
    return site, algorithm
