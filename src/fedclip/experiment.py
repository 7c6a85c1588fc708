"""The Python API: leave-one-domain-out experiments, end to end.

>>> from fedclip import RunConfig, run
>>> results = run(RunConfig.build(backbone="standin", rounds=20), out="runs/demo")

``run`` validates the data, extracts (or loads cached) features, then for each held-out
domain trains the federation with the other domains as clients and writes everything into
the run folder. Progress goes to an optional :class:`Reporter`; nothing is printed.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

from fedclip.algorithms import get_algorithm
from fedclip.config import RunConfig
from fedclip.errors import ResumeError
from fedclip.io import atomic_write_json
from fedclip.results import json_safe, safe_name, save_adapter, summarize
from fedclip.runtime.checkpoint import config_fingerprint, load_checkpoint, save_checkpoint
from fedclip.runtime.federation import Federation, FederationState
from fedclip.task import Prepared, heldout_tensors, prepare, training_clients


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


def build_federation(cfg: RunConfig, prep: Prepared, heldout: str) -> Federation:
    """The clients (every domain but ``heldout``) and the held-out test set, as tensors."""
    clients = training_clients(cfg, prep, heldout)
    held_split, held_mask = heldout_tensors(prep.dataset.domains[heldout],
                                            prep.features[heldout], len(prep.dataset.classes))
    algorithm = get_algorithm(cfg)
    algorithm.setup(prep.prompts, prep.class_text)
    return Federation(algorithm, clients, prep.class_text, prep.text.logit_scale,
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
    algo = fed.algorithm
    personalized = (fed.personalize(state.best_params, cfg.personalize_epochs)
                    if state.best_params is not None and cfg.personalize_epochs > 0
                    and algo.communicates and algo.inputs == "features" else None)
    result = summarize(
        cfg, state.history, state.best_round, zero, heldout=heldout,
        dataset=prep.dataset.name, trainable_params=fed.trainable_parameters(),
        seconds=time.perf_counter() - start,
        clients=[{"name": c.name, "train": len(c.train), "val": len(c.val), "test": len(c.test)}
                 for c in fed.clients],
        heldout_images=len(fed.heldout) if fed.heldout is not None else 0,
        skipped={d: list(f.skipped) for d, f in prep.features.items() if f.skipped},
        personalized=personalized, runtime="in-process")
    adapters = [("adapter", state.best_params, state.best_round),
                ("adapter-last", state.global_params, state.round)]
    if algo.keeps_own_models and state.best_params is not None:  # each client's own model
        adapters += [(f"adapter-{safe_name(c.name)}", algo.eval_params(
            state.best_params, state.best_client_states.get(c.name, {})), state.best_round)
            for c in fed.clients]
    if not algo.communicates:  # no global adapter at all
        adapters = adapters[2:]
    for name, params, rnd in adapters:
        if params is not None:
            save_adapter(run_dir / f"{name}.safetensors", params, cfg, prep.dataset.classes,
                         prep.text.logit_scale, rnd, fed.dim)
    atomic_write_json(run_dir / "result.json", json_safe(result))
    return result


def run(cfg: RunConfig, out: str | Path, *, resume: bool = False,
        reporter: Reporter | None = None) -> list[dict]:
    """Run every requested held-out domain; write results.json, tables and plots to ``out``."""
    from fedclip import report

    out = Path(out)
    prep = prepare(cfg, (reporter or SilentReporter()).extraction)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "config.json", cfg.model_dump())
    heldouts = list(prep.dataset.domains) if cfg.heldout == "all" else [cfg.heldout]
    results = []
    for heldout in heldouts:
        run_dir = out / safe_name(heldout)
        results.append(run_heldout(cfg, prep, heldout, run_dir, resume=resume, reporter=reporter))
        report.write_run(out, cfg, results[-1:])  # merges; draws only the new run's plot
    return results
