"""Which client a SuperNode is, and its site (:mod:`fedclip.flower.site`), built once per
process and kept in its site file between processes.

A node holds **only its own data** and finds it through its node config:

* deployment: ``--node-config "data-root='/data/photo' domain='photo'"`` (and
  ``client-index=1`` when the run splits a domain into several clients). ``data-root`` is the
  domain's own folder (``<class>/<image>``) or a folder that holds it; nothing else need exist
  on that machine. The node whose domain is the run's held-out domain only evaluates;
* simulation (one machine, one shared folder): ``partition-id`` indexes the plan, the
  training clients in order, then the held-out domain, so a simulation needs ``len(plan)``
  SuperNodes.

A pixel method's node (``inputs = "pixels"``: it trains through the backbone) decodes its own
images with the algorithm's preprocessing (``ClientSide.preprocess()``) and keeps them in
memory only, on its own device (``device`` in its node config); a deployed SuperNode, which
starts a process per message, decodes them at each message.

The task (classes, prompts, splits) comes from the run config, the same for every node.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from fedclip.algorithms import get_algorithm
from fedclip.algorithms.base import Algorithm, Runtime
from fedclip.backbones import resolve_device
from fedclip.config import RunConfig
from fedclip.data.folder import _subdirs
from fedclip.data.sources import resolve_data_root
from fedclip.errors import ConfigError
from fedclip.flower.settings import require_one_heldout
from fedclip.flower.site import (
    DomainSites,
    Site,
    check_index,
    load_domain,
    read_site,
    refuse_special,
    save_site,
    site_file,
    site_of,
)
from fedclip.task import cache_dir, prompts, run_classes

log = logging.getLogger(__name__)
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
    partition), else built (once per domain and process) and kept in that file. A pixel
    method's site (its images decoded by its own preprocessing) stays in this process's
    memory: never written to a file (nor into any reply)."""
    check_index(cfg, domain, index)
    if get_algorithm(cfg).inputs != "features":  # pixels, or patch tokens (in
        # the token store already: a site file would hold them a second time)
        return site_of(cfg, domain_of(cfg, root, domain), index)
    path = site_file(cfg, root, domain, index)
    refuse_special(path)
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
        # on this node's device: what the algorithm builds there (a backbone it trains)
        algorithm = get_algorithm(cfg.replace(device=device), Runtime(
            prompts(cfg, run_classes(cfg)), site.class_text, float(site.logit_scale)))
        _SITES[key] = (site, algorithm, folder_stamp(site.folders))
    site, algorithm, _ = _SITES[key]
    return site, algorithm
