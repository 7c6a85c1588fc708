"""One site's own data (a Flower node): what it holds, built from its own domain's folder as
the run defines the task (:mod:`fedclip.task`), and kept in a site file between processes.

A site reads only its own domain's folder and checks it against the run's definition; its
partitions and splits depend only on (seed, domain name, client index, its own files), so
every site computes the same ones as the in-process runner does on the whole dataset.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import stat
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F

from fedclip.config import RunConfig
from fedclip.core.client import ClientData, Split
from fedclip.data.folder import Domain, scan_domain
from fedclip.data.splits import ClientSplit
from fedclip.errors import ConfigError, DataError, StorageError
from fedclip.features import ImageFeatures
from fedclip.io import atomic_save_tensors
from fedclip.task import (
    backbone,
    cache_dir,
    class_text_features,
    client_tensors,
    clients_of,
    domain_inputs,
    heldout_tensors,
    run_classes,
)

log = logging.getLogger(__name__)
SITE_FORMAT = "fedclip-site/1"


@dataclass(frozen=True)
class Site:
    """What one node holds: its identity, its tensors and the class prompts' features."""

    role: str  # "train" or "heldout"
    name: str  # client name: the domain, or "<domain>#<index>"
    domain: str
    index: int
    classes: tuple[str, ...]
    class_text: torch.Tensor  # normalised
    logit_scale: float
    data: ClientData | None = None  # training sites
    heldout: Split | None = None  # the held-out site
    heldout_mask: torch.Tensor | None = None
    images: int = 0
    skipped: tuple[str, ...] = ()
    folders: tuple[str, ...] = ()  # every folder its images came from (a change: rescan)

    def to(self, device: str | torch.device) -> Site:
        """The same site with its tensors on ``device`` (a node's own GPU)."""
        from dataclasses import replace

        return replace(self, class_text=self.class_text.to(device),
                       data=self.data.to(device) if self.data is not None else None,
                       heldout=self.heldout.to(device) if self.heldout is not None else None,
                       heldout_mask=(self.heldout_mask.to(device)
                                     if self.heldout_mask is not None else None))

    def sizes(self) -> dict[str, int]:
        """Train/val/test sizes (the held-out site: its domain as test)."""
        if self.data is None:
            return {"train": 0, "val": 0, "test": len(self.heldout or ())}
        return {"train": len(self.data.train), "val": len(self.data.val),
                "test": len(self.data.test)}


@dataclass(frozen=True)
class DomainSites:
    """A domain as the run defines it, before it is one node's: its files, features, class
    prompts and client splits (computed once, shared by every client of the domain)."""

    domain: Domain
    feats: ImageFeatures
    class_text: torch.Tensor  # normalised
    logit_scale: float
    splits: tuple[ClientSplit, ...]  # empty for the held-out domain
    folders: tuple[str, ...]  # every folder its images came from (a change: rescan)


def check_index(cfg: RunConfig, domain: str, index: int) -> None:
    """Refuse, in one line, a client index the run does not have for ``domain``."""
    if domain == cfg.heldout and index != 0:
        raise ConfigError(f"the held-out domain {domain!r} is one evaluation-only node; "
                          f"client-index {index} is not valid for it")
    if domain != cfg.heldout and not 0 <= index < cfg.clients_per_domain:
        raise ConfigError(f"client-index {index} is out of range: this run splits each domain "
                          f"into {cfg.clients_per_domain} client(s) (0..."
                          f"{cfg.clients_per_domain - 1})")


def load_domain(cfg: RunConfig, root: Path, domain: str) -> DomainSites:
    """What every site of ``domain`` shares: the scan, its cached features, the class
    prompts' features and the partition into clients."""
    classes = run_classes(cfg)
    found = scan_domain(root, domain, classes)
    lazy, cache = backbone(cfg), cache_dir(cfg)
    feats = domain_inputs(cfg, lazy, found, cache)
    text = class_text_features(lazy, classes, cfg.prompt_template, cfg.prompt_templates, cache)
    folders = tuple(sorted({str(found.root), *(str(f.parent) for f in found.files)}))
    splits = tuple(clients_of(cfg, found)) if domain != cfg.heldout else ()
    return DomainSites(found, feats, F.normalize(text.features, dim=-1), text.logit_scale,
                       splits, folders)


def site_of(cfg: RunConfig, sites: DomainSites, index: int = 0) -> Site:
    """Client ``index`` of a loaded domain (of the held-out domain: its one node)."""
    classes, found, feats = run_classes(cfg), sites.domain, sites.feats
    check_index(cfg, found.name, index)
    site = Site("heldout", found.name, found.name, 0, classes, sites.class_text,
                sites.logit_scale, images=len(found), skipped=feats.skipped,
                folders=sites.folders)
    if found.name == cfg.heldout:
        held, mask = heldout_tensors(found, feats, len(classes))
        return replace(site, heldout=held, heldout_mask=mask)
    split = sites.splits[index]
    return replace(site, role="train", name=split.name, index=index,
                   data=client_tensors(found, feats, split, len(classes)))


def load_site(cfg: RunConfig, root: Path, domain: str, index: int = 0) -> Site:
    """A site's own domain under ``root``, as the run defines the task. Nothing but this
    domain's folder has to exist on the machine."""
    check_index(cfg, domain, index)  # before any scan
    return site_of(cfg, load_domain(cfg, root, domain), index)


# --- the site file: a node's site between processes ---------------------------------------
def folders_fingerprint(folders: tuple[str, ...]) -> str:
    """A fingerprint of a site's folders, which a site file must find unchanged: every entry
    with its size and modification time (what the feature cache checks of each image), so
    an image added, removed, renamed or rewritten changes it. One directory listing per
    folder, no image opened."""
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
    from fedclip.algorithms import get_algorithm

    fields = {k: v for k, v in cfg.model_dump(mode="json").items() if k not in TRAINING_ONLY}
    fields["inputs"] = get_algorithm(cfg).inputs  # the run's (its options may narrow it)
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()


def refuse_special(path: Path) -> None:
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
            "fingerprint": folders_fingerprint(site.folders)})
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
            if folders_fingerprint(folders) != header.get("fingerprint"):
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
