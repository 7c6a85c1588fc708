"""The task both runtimes stand on: data -> features -> client tensors, with no runtime in it.

The in-process runner (``fedclip.inprocess``) and the Flower apps (``fedclip.flower``) are
peers on this layer; neither imports the other. The task is **defined by the run**: class
names in order (``classes``, or the dataset spec's), prompt template, backbone, split
fractions, seed, clients per domain and partition. A Flower node builds its own domain's part
of it (``fedclip.flower.site``) from these same functions.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from fedclip.algorithms import get_algorithm
from fedclip.backbones import LazyBackbone, resolve_device
from fedclip.config import PROMPT_ENSEMBLES, RunConfig
from fedclip.core.client import ClientData, Split
from fedclip.data.folder import Domain, DomainDataset, scan_dataset
from fedclip.data.sources import resolve_data_root
from fedclip.data.specs import SPECS, class_to_text, detect_spec
from fedclip.data.splits import ClientSplit, domain_clients
from fedclip.errors import ConfigError, DataError
from fedclip.features import (
    ImageFeatures,
    TextFeatures,
    default_cache_dir,
    file_identity,
    image_features,
    image_pixels,
    text_features,
)

Progress = Callable[[str, int, int, bool], None]  # (domain, done, total, from the cache)


# --- the task definition ------------------------------------------------------------------
def fractions(cfg: RunConfig) -> tuple[float, float, float]:
    """(train, val, test) fractions of every client's data."""
    return cfg.train_fraction, cfg.val_fraction, cfg.test_fraction


def task_classes(cfg: RunConfig, domain_names: list[str]) -> tuple[str, ...] | None:
    """The run's classes: ``cfg.classes``, else the named (or detected) dataset spec's."""
    if cfg.classes is not None:
        return tuple(cfg.classes)
    if cfg.dataset == "custom":
        return None
    spec = SPECS.get(cfg.dataset) if cfg.dataset != "auto" else detect_spec(domain_names)
    return spec.classes if spec is not None and spec.classes else None


def run_classes(cfg: RunConfig) -> tuple[str, ...]:
    """The classes of a federated run, from its configuration alone (every node and the
    server compute the same): ``classes``, the ``dataset`` spec, or the spec whose domains
    include the held-out domain."""
    classes = task_classes(cfg, [cfg.heldout])
    if not classes:
        raise ConfigError(f"a federated run defines its classes: set dataset (one of "
                          f"{', '.join(s for s, v in SPECS.items() if v.classes)}) or classes "
                          f"(the class names in label order); held-out domain {cfg.heldout!r} "
                          f"names no known dataset")
    return classes


def prompts(cfg: RunConfig, classes: tuple[str, ...]) -> tuple[str, ...]:
    """The class prompts (the run's template with each class name)."""
    return tuple(cfg.prompt_template.format(class_to_text(c)) for c in classes)


# "@openai-imagenet" -> open_clip.zero_shot_metadata.OPENAI_IMAGENET_TEMPLATES
ENSEMBLES = {name: name[1:].replace("-", "_").upper() + "_TEMPLATES"
             for name in PROMPT_ENSEMBLES}


def templates(names: tuple[str, ...]) -> list[str]:
    """Templates with '{}', open_clip's named ensembles expanded."""
    out: list[str] = []
    for name in names:
        if name in ENSEMBLES:
            from fedclip.backbones.openclip import zero_shot_templates

            out += [f("{}") for f in zero_shot_templates(ENSEMBLES[name])]
        elif name.startswith("@"):
            raise ConfigError(f"unknown prompt ensemble {name!r}; use one of "
                              f"{', '.join(ENSEMBLES)} or templates with '{{}}'")
        else:
            out.append(name)
    return out


def class_text_features(lazy: LazyBackbone, classes: tuple[str, ...], template: str,
                        ensemble: tuple[str, ...] | None, cache: Path) -> TextFeatures:
    """The class prompts' text features: one template, or the mean of the normalised
    features over an ensemble of templates (each template's features cached)."""
    if not ensemble:
        return text_features(lazy, [template.format(class_to_text(c)) for c in classes], cache)
    feats, scale = [], 0.0
    for t in templates(ensemble):
        one = text_features(lazy, [t.format(class_to_text(c)) for c in classes], cache)
        feats.append(F.normalize(one.features, dim=-1))
        scale = one.logit_scale
    return TextFeatures(torch.stack(feats).mean(0), scale)


# --- features -----------------------------------------------------------------------------
def domain_inputs(cfg: RunConfig, backbone: LazyBackbone, domain: Domain, cache_dir: Path,
                  progress: Progress | None = None) -> ImageFeatures:
    """Cached features of a domain (or its pixels, for algorithms that train the backbone;
    or its pooled embeddings and patch tokens, for algorithms with ``inputs = "tokens"``)."""
    def report(done: int, total: int, cached: bool = False) -> None:
        if progress is not None:
            progress(domain.name, done, total, cached)

    algorithm = get_algorithm(cfg)
    if algorithm.inputs == "pixels":
        return image_pixels(backbone, domain, cfg.extract_batch_size, cfg.extract_workers, report,
                            preprocess=algorithm.client.preprocess())
    decode = cfg.extract_decode
    if decode == "auto":
        decode = "device" if str(backbone.device).startswith("cuda") else "cpu"
    return image_features(backbone, domain, cache_dir, cfg.extract_batch_size,
                          cfg.extract_workers, report, decode=decode,
                          tokens=algorithm.inputs == "tokens")


def cache_dir(cfg: RunConfig) -> Path:
    """The feature cache of this run."""
    return Path(cfg.cache_dir).expanduser() if cfg.cache_dir else default_cache_dir()


def backbone(cfg: RunConfig) -> LazyBackbone:
    """The run's backbone, loaded on first use."""
    return LazyBackbone(cfg.backbone, resolve_device(cfg.device), cfg.precision)


# --- tensors ------------------------------------------------------------------------------
def _split(feats: ImageFeatures, labels: torch.Tensor, index) -> Split:  # noqa: ANN001
    index = torch.as_tensor(index, dtype=torch.long)
    index = index[feats.valid[index]]  # unreadable images were skipped
    return Split(feats.features[index], labels[index])


def class_mask(n_classes: int, present: tuple[int, ...]) -> torch.Tensor:
    """A [C] bool mask of the classes a domain has."""
    mask = torch.zeros(n_classes, dtype=torch.bool)
    mask[list(present)] = True
    return mask


def client_tensors(domain: Domain, feats: ImageFeatures, split: ClientSplit, n_classes: int
                   ) -> ClientData:
    """One client's splits as tensors (unreadable images left out)."""
    labels = torch.as_tensor(domain.labels)
    train, val, test = (_split(feats, labels, idx) for idx in (split.train, split.val, split.test))
    return ClientData(split.name, train, val, test, class_mask(n_classes, domain.present))


def heldout_tensors(domain: Domain, feats: ImageFeatures, n_classes: int
                    ) -> tuple[Split, torch.Tensor]:
    """The whole held-out domain as a test split, and the classes it has."""
    split = _split(feats, torch.as_tensor(domain.labels), range(len(domain)))
    return split, class_mask(n_classes, domain.present)


def clients_of(cfg: RunConfig, domain: Domain) -> list[ClientSplit]:
    """A domain's clients under this run's partition and split fractions."""
    return domain_clients(domain, seed=cfg.seed, fractions=fractions(cfg),
                          clients_per_domain=cfg.clients_per_domain, mode=cfg.partition,
                          alpha=cfg.dirichlet_alpha)


# --- the whole dataset on one machine (in-process) ----------------------------------------
@dataclass(frozen=True)
class Prepared:
    """Everything the rounds need, computed once per process."""

    dataset: DomainDataset
    features: dict[str, ImageFeatures]
    text: TextFeatures
    prompts: tuple[str, ...]
    extraction_seconds: float
    splits: dict[str, list[ClientSplit]]  # every domain's clients, computed once

    @property
    def class_text(self) -> torch.Tensor:
        return F.normalize(self.text.features, dim=-1)


def dataset_identity(dataset: DomainDataset) -> str:
    """The identity of the data a run trains on, which a resume must find unchanged (the
    run folder's checkpoints hold it): every file's path within its domain, size and
    modification time (not the root's spelling: the same data under another path or with a
    trailing slash is the same data)."""
    import hashlib
    import json

    h = hashlib.sha256(json.dumps(list(dataset.classes)).encode())
    for name, domain in dataset.domains.items():
        for f in domain.files:
            size, mtime = file_identity(f)  # a file deleted since the scan: (-1, -1)
            h.update(f"{name}/{f.relative_to(domain.root)}|{size}|{mtime}\n".encode())
    return h.hexdigest()[:16]


def scan(cfg: RunConfig) -> DomainDataset:
    """The run's dataset, scanned and checked against its spec and held-out domain."""
    root = resolve_data_root(cfg.data_root, cache_dir(cfg))
    dataset = scan_dataset(root, cfg.dataset, cfg.classes)
    if cfg.heldout != "all" and cfg.heldout not in dataset.domains:
        raise DataError(f"unknown held-out domain {cfg.heldout!r}; this dataset has "
                        f"{', '.join(dataset.domains)} (or pass 'all')")
    if len(dataset.domains) < 2:
        raise DataError(f"no training domains left after holding out {cfg.heldout!r}; a "
                        f"dataset needs at least two domains")
    return dataset


def plan_clients(cfg: RunConfig, dataset: DomainDataset) -> dict[str, list[ClientSplit]]:
    """Every domain's clients (partitions and splits), computed once per run; a domain too
    small for its clients fails here, before any feature is extracted."""
    return {name: clients_of(cfg, domain) for name, domain in dataset.domains.items()}


def prepare(cfg: RunConfig, progress: Progress | None = None,
            dataset: DomainDataset | None = None,
            splits: dict[str, list[ClientSplit]] | None = None) -> Prepared:
    """Scan and validate the data and plan its clients (unless given), then features of
    every domain and the class prompts."""
    dataset = dataset if dataset is not None else scan(cfg)
    splits = splits if splits is not None else plan_clients(cfg, dataset)
    lazy, cache = backbone(cfg), cache_dir(cfg)
    start = time.perf_counter()
    feats = {name: domain_inputs(cfg, lazy, domain, cache, progress)
             for name, domain in dataset.domains.items()}
    class_prompts = prompts(cfg, dataset.classes)
    text = class_text_features(lazy, dataset.classes, cfg.prompt_template, cfg.prompt_templates,
                               cache)
    return Prepared(dataset, feats, text, class_prompts, time.perf_counter() - start, splits)


def training_clients(prep: Prepared, heldout: str) -> list[ClientData]:
    """Every domain but ``heldout``, split into its clients, as tensors."""
    n = len(prep.dataset.classes)
    return [client_tensors(domain, prep.features[name], split, n)
            for name, domain in prep.dataset.domains.items() if name != heldout
            for split in prep.splits[name]]
