"""Which client a SuperNode is, and its features (loaded once per process).

A node finds its data through its node config:

* deployment: ``--node-config "data-root='/data/PACS' domain='photo'"`` (and ``client-index=1``
  when a domain is split into several clients); the node whose domain is the run's held-out
  domain only evaluates;
* simulation: ``partition-id`` indexes the plan: the training clients in order, then the
  held-out domain, so a simulation needs ``len(plan)`` SuperNodes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from fedclip.algorithms import get_algorithm
from fedclip.algorithms.base import Algorithm
from fedclip.config import RunConfig
from fedclip.data.folder import DomainDataset, scan_dataset
from fedclip.data.sources import resolve_data_root
from fedclip.errors import ConfigError
from fedclip.experiment import Prepared, client_data, client_splits, heldout_data, prepare
from fedclip.features import default_cache_dir
from fedclip.runtime.client import ClientData, Split


@dataclass(frozen=True)
class Node:
    role: str  # "train" or "heldout"
    name: str
    domain: str
    algorithm: Algorithm
    class_text: torch.Tensor  # normalised
    logit_scale: float
    classes: tuple[str, ...]
    data: ClientData | None = None  # training nodes
    heldout: Split | None = None  # the held-out node
    heldout_mask: torch.Tensor | None = None


_NODES: dict[str, Node] = {}


def plan(cfg: RunConfig, dataset: DomainDataset) -> list[tuple[str, str, str]]:
    """(role, client name, domain) for every node a run needs, in partition-id order."""
    entries = [("train", s.name, s.domain) for s in client_splits(cfg, dataset, cfg.heldout)]
    return entries + [("heldout", cfg.heldout, cfg.heldout)]


def _root(cfg: RunConfig):  # noqa: ANN202
    cache = default_cache_dir() if cfg.cache_dir is None else cfg.cache_dir
    from pathlib import Path

    return resolve_data_root(cfg.data_root, Path(cache))


def node_for(cfg: RunConfig, node_config: dict[str, Any]) -> Node:
    """The node this process serves, built once and kept for later messages."""
    if cfg.heldout == "all":
        raise ConfigError("on Flower, heldout must name one domain (one run per held-out "
                          "domain); set heldout in the run config")
    if node_config.get("data-root"):
        cfg = cfg.replace(data_root=str(node_config["data-root"]))
    key = f"{cfg.model_dump_json()}|{sorted(node_config.items())}"
    if key not in _NODES:
        _NODES[key] = _build(cfg, node_config)
    return _NODES[key]


def _build(cfg: RunConfig, node_config: dict[str, Any]) -> Node:
    dataset = scan_dataset(_root(cfg), cfg.dataset)
    entries = plan(cfg, dataset)
    if "domain" in node_config:
        domain, index = str(node_config["domain"]), int(node_config.get("client-index", 0))
        matches = [e for e in entries if e[2] == domain]
        if not matches:
            raise ConfigError(f"node-config domain {domain!r} is not in the dataset; use one of "
                              f"{sorted({e[2] for e in entries})}")
        role, name, domain = matches[min(index, len(matches) - 1)]
    else:
        pid, total = int(node_config["partition-id"]), int(node_config["num-partitions"])
        if total != len(entries):
            raise ConfigError(f"this run needs {len(entries)} SuperNodes ({len(entries) - 1} "
                              f"training clients + the held-out domain); got {total}. Set "
                              f"options.num-supernodes = {len(entries)}")
        role, name, domain = entries[pid]
    prep: Prepared = prepare(cfg, domains=[domain], dataset=dataset)
    common = dict(algorithm=get_algorithm(cfg), classes=prep.dataset.classes,
                  class_text=F.normalize(prep.text.features, dim=-1),
                  logit_scale=prep.text.logit_scale)
    if role == "heldout":
        split, mask = heldout_data(prep, domain)
        return Node(role, name, domain, heldout=split, heldout_mask=mask, **common)
    (split,) = [s for s in client_splits(cfg, prep.dataset, cfg.heldout) if s.name == name]
    return Node(role, name, domain, data=client_data(prep, split), **common)
