"""The Python API: leave-one-domain-out experiments, end to end.

>>> from fedclip import RunConfig, run
>>> results = run(RunConfig.build(backbone="standin", rounds=20), out="runs/demo")

``run`` validates the data, extracts (or loads cached) features, then for each held-out
domain trains the federation with the other domains as clients and writes everything into
the run folder. Progress goes to an optional :class:`Reporter`; round callbacks
(:mod:`fedclip.callbacks`: loggers, your own code) see every round; nothing is printed.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Protocol

from fedclip import callbacks as cb
from fedclip.algorithms import get_algorithm
from fedclip.backbones import resolve_device
from fedclip.config import RunConfig
from fedclip.data.sources import data_source
from fedclip.errors import DataError, ResumeError, RunFolderError
from fedclip.io import atomic_write_json, remove_stale_temporaries
from fedclip.results import json_safe, safe_name, save_adapter, summarize
from fedclip.runtime.checkpoint import (
    HISTORY,
    CheckpointPolicy,
    config_fingerprint,
    fingerprint_fields,
    load_checkpoint,
    save_checkpoint,
)
from fedclip.runtime.federation import Federation, FederationState
from fedclip.task import (
    Prepared,
    cache_dir,
    data_fingerprint,
    heldout_tensors,
    prepare,
    scan,
    training_clients,
)


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
    device = resolve_device(cfg.device)
    class_text = prep.class_text.to(device)
    algorithm.setup(prep.prompts, class_text)
    return Federation(algorithm, clients, class_text, prep.text.logit_scale, held_split,
                      held_mask)


def resumable(cfg: RunConfig, data: str, heldout: str, run_dir: Path, resume: bool
              ) -> FederationState | None:
    """The checkpoint a run continues from (None: a fresh run), checked against this
    configuration and ``data`` (:func:`fedclip.task.data_fingerprint`): a mismatch, a shrink
    or a run without --resume is refused."""
    ckpt = run_dir / "checkpoint.safetensors"
    if not ckpt.exists():
        return None
    if not resume:
        raise ResumeError(f"{run_dir} already holds a run; pass --resume to continue it, "
                          f"or choose another --out")
    state = load_checkpoint(ckpt, config_fingerprint(cfg, heldout, data),
                            fingerprint_fields(cfg, heldout, data))
    if state.round > cfg.rounds:
        raise ResumeError(f"{run_dir} is at round {state.round}, past rounds={cfg.rounds}: a "
                          f"resume cannot shrink a run; pass --rounds {state.round} or more "
                          f"(extending is fine)")
    return state


def run_heldout(cfg: RunConfig, prep: Prepared, heldout: str, run_dir: Path, *,
                resume: bool = False, reporter: Reporter | None = None,
                on_round: Callable[[FederationState, dict], None] | None = None,
                callbacks: Sequence[cb.Callback] = ()) -> dict:
    """Train with ``heldout`` left out; write checkpoint, adapters and result; return it."""
    reporter = reporter or SilentReporter()
    run_dir.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(run_dir)
    fed = build_federation(cfg, prep, heldout)
    data = data_fingerprint(prep.dataset)
    fingerprint = config_fingerprint(cfg, heldout, data)
    fields = fingerprint_fields(cfg, heldout, data)
    ckpt = run_dir / "checkpoint.safetensors"
    state = resumable(cfg, data, heldout, run_dir, resume)
    if state is not None:
        reporter.info(f"[{heldout}] resuming after round {state.round}")
    else:
        (run_dir / HISTORY).unlink(missing_ok=True)  # a fresh run: no stale history

    policy = CheckpointPolicy(cfg.checkpoint_every, cfg.checkpoint_seconds, cfg.rounds)

    def checkpoint(st: FederationState, record: dict) -> None:
        reporter.round_end(heldout, record, cfg.rounds)
        cb.round_end(callbacks, heldout, record)
        if policy.due(st.round):
            save_checkpoint(ckpt, st, fingerprint, fields)
        if on_round is not None:
            on_round(st, record)

    start = time.perf_counter()
    if state is None:  # a fresh run: round 0 (the initial model) is a round like any other
        state = fed.initial_state()
        cb.round_end(callbacks, heldout, state.history[0])
    state = fed.run(state, callbacks=[checkpoint])
    if state.round == 0:
        save_checkpoint(ckpt, state, fingerprint, fields)
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
        personalized=personalized, runtime="in-process",
        data_source=data_source(prep.dataset.root))
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
    cb.run_end(callbacks, heldout, result)
    return result


RUN_MARKERS = ("config.json", "results.json", ".fedclip.lock")


@contextlib.contextmanager
def claim(out: Path) -> Iterator[None]:
    """Hold ``out`` for this process: a lock file with the pid, so a second run into the same
    folder is refused while this one lives (a lock left by a dead process is taken over)."""
    if out.exists() and not out.is_dir():
        raise RunFolderError(f"--out {out} is a file; pass a folder for the run")
    if out.is_dir() and any(out.iterdir()) and not any((out / m).exists() for m in RUN_MARKERS):
        raise RunFolderError(f"--out {out} holds other files and is not a fedclip run folder; "
                             f"choose a new or empty folder")
    try:
        out.mkdir(parents=True, exist_ok=True)
        lock = out / ".fedclip.lock"
        for _ in range(2):
            try:
                fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
                break
            except FileExistsError:
                try:
                    pid = int(lock.read_text().strip() or 0)
                except (OSError, ValueError):
                    pid = 0
                if pid and _alive(pid):
                    raise RunFolderError(f"another run (pid {pid}) is writing to {out}; wait "
                                         f"for it, or choose another --out") from None
                lock.unlink(missing_ok=True)  # left by a process that no longer exists
        else:
            raise RunFolderError(f"could not lock {out}; is another run starting there?")
        os.write(fd, str(os.getpid()).encode())
        os.close(fd)
    except PermissionError:
        raise RunFolderError(f"--out {out} is not writable; choose a folder you can write "
                             f"to") from None
    try:
        yield
    finally:
        lock.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def check_cache_writable(folder: Path) -> None:
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder):
            pass
    except OSError as exc:
        raise RunFolderError(f"the feature cache {folder} is not writable ({exc.strerror}); "
                             f"pass --cache-dir with a folder you can write to, or set "
                             f"FEDCLIP_CACHE") from None


def run(cfg: RunConfig, out: str | Path, *, resume: bool = False,
        reporter: Reporter | None = None, callbacks: Sequence[cb.Callback] = ()) -> list[dict]:
    """Run every requested held-out domain; write results.json, tables and plots to ``out``.

    Everything that can be checked is checked before any feature is extracted (the data,
    the run folder, the cache, existing runs); a refused run writes nothing. ``callbacks``
    see every round and every held-out result, and are closed when the run ends."""
    out = Path(out)
    try:
        return _run(cfg, out, resume, reporter, callbacks)
    finally:
        cb.close(callbacks)


def _run(cfg: RunConfig, out: Path, resume: bool, reporter: Reporter | None,
         callbacks: Sequence[cb.Callback]) -> list[dict]:
    from fedclip import report

    with claim(out):
        dataset = scan(cfg)
        heldouts = list(dataset.domains) if cfg.heldout == "all" else [cfg.heldout]
        folders: dict[str, str] = {}
        for h in dataset.domains:
            if safe_name(h) in folders:
                raise DataError(f"domains {folders[safe_name(h)]!r} and {h!r} would share the "
                                f"run folder {safe_name(h)!r}; rename one of them")
            folders[safe_name(h)] = h
        if not resume:
            taken = [h for h in heldouts if (out / safe_name(h) / "checkpoint.safetensors")
                     .exists()]
            if taken:
                raise ResumeError(f"{out} already holds a run for {', '.join(taken)}; pass "
                                  f"--resume to continue it, or choose another --out")
        if resume:  # a resume that cannot continue is refused before any write
            data = data_fingerprint(dataset)
            for h in heldouts:
                resumable(cfg, data, h, out / safe_name(h), resume)
        check_cache_writable(cache_dir(cfg))
        prep = prepare(cfg, (reporter or SilentReporter()).extraction, dataset=dataset)
        atomic_write_json(out / "config.json", cfg.model_dump(mode="json"))
        results = []
        for heldout in heldouts:
            run_dir = out / safe_name(heldout)
            results.append(run_heldout(cfg, prep, heldout, run_dir, resume=resume,
                                       reporter=reporter, callbacks=callbacks))
            report.write_run(out, cfg, results[-1:])  # merges; draws only the new run's plot
        return results
