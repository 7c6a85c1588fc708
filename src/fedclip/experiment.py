"""The Python API: leave-one-domain-out experiments, end to end.

>>> from fedclip import RunConfig, run
>>> results = run(RunConfig.build(backbone="standin", rounds=20), out="runs/demo")

``run`` validates the data, extracts (or loads cached) features, then for each held-out
domain trains the federation with the other domains as clients and writes everything into
the run folder. Progress goes to an optional :class:`Reporter`; nothing is printed.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch

from fedclip.adapters import Params
from fedclip.algorithms import get_algorithm
from fedclip.backbones import LazyBackbone, resolve_device
from fedclip.config import RunConfig
from fedclip.data.folder import DomainDataset, scan_dataset
from fedclip.data.sources import resolve_data_root
from fedclip.data.specs import class_to_text
from fedclip.data.splits import ClientSplit, make_clients
from fedclip.errors import ResumeError
from fedclip.features import (
    ImageFeatures,
    TextFeatures,
    default_cache_dir,
    image_features,
    image_pixels,
    text_features,
)
from fedclip.io import atomic_save_tensors, atomic_write_json
from fedclip.runtime.checkpoint import config_fingerprint, load_checkpoint, save_checkpoint
from fedclip.runtime.client import ClientData, Split
from fedclip.runtime.federation import Federation, FederationState


class Reporter(Protocol):
    def extraction(self, domain: str, done: int, total: int) -> None: ...

    def round_end(self, heldout: str, record: dict, total_rounds: int) -> None: ...

    def info(self, message: str) -> None: ...


class SilentReporter:
    def extraction(self, domain: str, done: int, total: int) -> None:
        pass

    def round_end(self, heldout: str, record: dict, total_rounds: int) -> None:
        pass

    def info(self, message: str) -> None:
        pass


@dataclass(frozen=True)
class Prepared:
    """Everything the rounds need, computed once per process."""

    dataset: DomainDataset
    features: dict[str, ImageFeatures]
    text: TextFeatures
    prompts: tuple[str, ...]
    extraction_seconds: float


def prepare(cfg: RunConfig, reporter: Reporter | None = None,
            domains: list[str] | None = None, dataset: DomainDataset | None = None
            ) -> Prepared:
    """Scan and validate the data (unless ``dataset`` is given), then features of
    ``domains`` (default: all) and the class prompts."""
    reporter = reporter or SilentReporter()
    cache_dir = Path(cfg.cache_dir) if cfg.cache_dir else default_cache_dir()
    if dataset is None:
        dataset = scan_dataset(resolve_data_root(cfg.data_root, cache_dir), cfg.dataset)
    if cfg.heldout != "all":
        make_clients(dataset, cfg.heldout, seed=cfg.seed, fractions=_fractions(cfg))  # validates
    backbone = LazyBackbone(cfg.backbone, resolve_device(cfg.device))
    prompts = tuple(cfg.prompt_template.format(class_to_text(c)) for c in dataset.classes)
    start = time.perf_counter()
    extract = image_pixels if get_algorithm(cfg).inputs == "pixels" else image_features
    feats = {}
    for name, domain in dataset.domains.items():
        if domains is not None and name not in domains:
            continue

        def progress(done: int, total: int, name: str = name) -> None:
            reporter.extraction(name, done, total)
        if extract is image_pixels:
            feats[name] = image_pixels(backbone, domain, cfg.extract_batch_size,
                                       cfg.extract_workers, progress)
        else:
            feats[name] = image_features(backbone, domain, cache_dir, cfg.extract_batch_size,
                                         cfg.extract_workers, progress)
    text = text_features(backbone, list(prompts), cache_dir)
    return Prepared(dataset, feats, text, prompts, time.perf_counter() - start)


def _fractions(cfg: RunConfig) -> tuple[float, float, float]:
    return cfg.train_fraction, cfg.val_fraction, cfg.test_fraction


def _split(feats: ImageFeatures, labels: torch.Tensor, index) -> Split:  # noqa: ANN001
    index = torch.as_tensor(index, dtype=torch.long)
    index = index[feats.valid[index]]  # unreadable images were skipped
    return Split(feats.features[index], labels[index])


def _class_mask(n_classes: int, present: tuple[int, ...]) -> torch.Tensor:
    mask = torch.zeros(n_classes, dtype=torch.bool)
    mask[list(present)] = True
    return mask


def client_splits(cfg: RunConfig, dataset: DomainDataset, heldout: str) -> list[ClientSplit]:
    """The training clients: every domain but ``heldout`` (each split per the config)."""
    return make_clients(dataset, heldout, seed=cfg.seed, fractions=_fractions(cfg),
                        clients_per_domain=cfg.clients_per_domain, mode=cfg.partition,
                        alpha=cfg.dirichlet_alpha)


def client_data(prep: Prepared, split: ClientSplit) -> ClientData:
    domain = prep.dataset.domains[split.domain]
    labels, feats = torch.as_tensor(domain.labels), prep.features[split.domain]
    train, val, test = (_split(feats, labels, idx) for idx in (split.train, split.val, split.test))
    return ClientData(split.name, train, val, test,
                      _class_mask(len(prep.dataset.classes), domain.present))


def heldout_data(prep: Prepared, heldout: str) -> tuple[Split, torch.Tensor]:
    """The whole held-out domain as a test split, and the classes it has."""
    held = prep.dataset.domains[heldout]
    split = _split(prep.features[heldout], torch.as_tensor(held.labels), range(len(held)))
    return split, _class_mask(len(prep.dataset.classes), held.present)


def build_federation(cfg: RunConfig, prep: Prepared, heldout: str) -> Federation:
    """The clients (every domain but ``heldout``) and the held-out test set, as tensors."""
    clients = [client_data(prep, s) for s in client_splits(cfg, prep.dataset, heldout)]
    held_split, held_mask = heldout_data(prep, heldout)
    algorithm = get_algorithm(cfg)
    algorithm.setup(prep.prompts)
    return Federation(algorithm, clients, prep.text.features, prep.text.logit_scale,
                      held_split, held_mask)


def run_heldout(cfg: RunConfig, prep: Prepared, heldout: str, run_dir: Path, *,
                resume: bool = False, reporter: Reporter | None = None,
                on_round: Callable[[FederationState, dict], None] | None = None) -> dict:
    """Train with ``heldout`` left out; write checkpoint, adapters and result; return it."""
    reporter = reporter or SilentReporter()
    run_dir.mkdir(parents=True, exist_ok=True)
    fed = build_federation(cfg, prep, heldout)
    fingerprint = config_fingerprint(cfg, heldout)
    ckpt = run_dir / "checkpoint.safetensors"
    state = None
    if ckpt.exists():
        if not resume:
            raise ResumeError(f"{run_dir} already holds a run; pass --resume to continue it, "
                              f"or choose another --out")
        state = load_checkpoint(ckpt, fingerprint)
        reporter.info(f"[{heldout}] resuming after round {state.round}")

    def checkpoint(st: FederationState, record: dict) -> None:
        reporter.round_end(heldout, record, cfg.rounds)
        if st.round % cfg.checkpoint_every == 0 or st.round == cfg.rounds:
            save_checkpoint(ckpt, st, fingerprint)
        if on_round is not None:
            on_round(st, record)

    start = time.perf_counter()
    state = fed.run(state, callbacks=[checkpoint])
    if state.round == 0:
        save_checkpoint(ckpt, state, fingerprint)
    zero = fed.evaluate(None)
    personalized = (fed.personalize(state.best_params, cfg.personalize_epochs)
                    if state.best_params is not None and cfg.personalize_epochs > 0
                    and fed.algorithm.communicates and fed.algorithm.inputs == "features"
                    else None)
    result = summarize(
        cfg, state.history, state.best_round, state.round, zero, heldout=heldout,
        dataset=prep.dataset.name, trainable_params=fed.trainable_parameters(),
        bytes_per_round=fed.bytes_per_round(), seconds=time.perf_counter() - start,
        clients=[{"name": c.name, "train": len(c.train), "val": len(c.val), "test": len(c.test)}
                 for c in fed.clients],
        heldout_images=len(fed.heldout) if fed.heldout is not None else 0,
        skipped={d: list(f.skipped) for d, f in prep.features.items() if f.skipped},
        personalized=personalized)
    adapters = [("adapter", state.best_params, state.best_round),
                ("adapter-last", state.global_params, state.round)]
    if not fed.algorithm.communicates:  # no global adapter: each client's own
        adapters = [(f"adapter-{_safe(c)}", p, state.best_round)
                    for c, p in state.best_client_params.items()]
    for name, params, rnd in adapters:
        if params is not None:
            save_adapter(run_dir / f"{name}.safetensors", params, cfg, prep.dataset.classes,
                         prep.text.logit_scale, rnd)
    atomic_write_json(run_dir / "result.json", json_safe(result))
    return result


def summarize(cfg: RunConfig, history: list[dict], best_round: int, last_round: int,
              zero: dict, *, heldout: str, dataset: str, trainable_params: int,
              bytes_per_round: int, seconds: float, clients: list[dict], heldout_images: int,
              skipped: dict[str, list[str]], **extra: object) -> dict:
    """One held-out run as a results.json entry (the schema the README documents)."""
    by_round = {r["round"]: r for r in history}
    best, last = by_round[best_round], by_round[last_round]
    trained = [r for r in history if r["round"] > 0]

    def scores(r: dict) -> dict:
        return {"generalization": r["heldout_accuracy"],
                "personalization": {"mean": r["mean_test_accuracy"],
                                    "per_client": r["test_accuracy"]}}

    return {
        "heldout": heldout, "algorithm": cfg.algorithm, "dataset": dataset,
        "backbone": cfg.backbone, "backbone_is_clip": cfg.backbone.startswith("open_clip:"),
        "loss": cfg.loss, "seed": cfg.seed, "rounds": last_round,
        **scores(best), "best_round": best_round, "last": scores(last),
        "zeroshot": scores(zero), "trainable_params": trainable_params,
        "bytes_per_round": bytes_per_round,
        "seconds_per_round": (sum(r["seconds"] for r in trained) / len(trained)
                              if trained else 0.0),
        "train_seconds": seconds, "clients": clients, "heldout_images": heldout_images,
        "skipped_images": skipped, **extra, "history": history,
    }


def save_adapter(path: Path, params: Params, cfg: RunConfig, classes: tuple[str, ...],
                 logit_scale: float, rnd: int) -> None:
    """An adapter file that carries what is needed to use it: backbone, classes, prompts."""
    dim = next(iter(params.values())).shape[-1]
    meta = {"format": "fedclip-adapter/1", "backbone": cfg.backbone,
            "classes": json.dumps(list(classes)), "prompt_template": cfg.prompt_template,
            "dim": str(dim), "logit_scale": repr(logit_scale), "round": str(rnd),
            "algorithm": cfg.algorithm}
    atomic_save_tensors(path, params, meta)


def json_safe(obj):  # noqa: ANN001, ANN201
    """NaN and inf become null, so results.json is strict JSON."""
    if isinstance(obj, float):
        return None if math.isnan(obj) or math.isinf(obj) else obj
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [json_safe(v) for v in obj]
    return obj


def run(cfg: RunConfig, out: str | Path, *, resume: bool = False,
        reporter: Reporter | None = None) -> list[dict]:
    """Run every requested held-out domain; write results.json, tables and plots to ``out``."""
    from fedclip import report

    out = Path(out)
    prep = prepare(cfg, reporter)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "config.json", cfg.model_dump())
    heldouts = list(prep.dataset.domains) if cfg.heldout == "all" else [cfg.heldout]
    results = []
    for heldout in heldouts:
        run_dir = out / _safe(heldout)
        results.append(run_heldout(cfg, prep, heldout, run_dir, resume=resume, reporter=reporter))
        report.write_run(out, cfg, results)
    return results


def _safe(name: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in name)
