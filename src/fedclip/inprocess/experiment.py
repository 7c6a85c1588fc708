"""The Python API: leave-one-domain-out experiments, end to end.

>>> from fedclip import RunConfig, run
>>> results = run(RunConfig.build(backbone="standin", rounds=20), out="runs/demo")

``run`` validates the data, extracts (or loads cached) features, then for each held-out
domain trains the federation with the other domains as clients and writes everything into
the run folder. Progress goes to an optional :class:`Reporter`; round callbacks
(:mod:`fedclip.callbacks`: loggers, your own code) see every round; nothing is printed.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from pathlib import Path

from fedclip import callbacks as cb
from fedclip.algorithms import get_algorithm
from fedclip.algorithms.base import Runtime
from fedclip.backbones import resolve_device
from fedclip.callbacks import Reporter, SilentReporter
from fedclip.config import RunConfig
from fedclip.core.records import ClientInfo, RoundRecord, RunResult
from fedclip.core.run_folder import HeldoutRun, RunFolder
from fedclip.core.server import server_rules
from fedclip.core.state import FederationState
from fedclip.data.sources import data_source
from fedclip.features import check_cache_writable
from fedclip.inprocess.federation import Federation
from fedclip.task import (
    Prepared,
    cache_dir,
    dataset_identity,
    heldout_tensors,
    plan_clients,
    prepare,
    scan,
    training_clients,
)


def build_federation(cfg: RunConfig, prep: Prepared, heldout: str) -> Federation:
    """The clients (every domain but ``heldout``) and the held-out test set, as tensors, and
    the algorithm told what this runtime knows (``Runtime``)."""
    clients = training_clients(prep, heldout)
    held_split, held_mask = heldout_tensors(prep.dataset.domains[heldout],
                                            prep.features[heldout], len(prep.dataset.classes))
    device = resolve_device(cfg.device)
    class_text = prep.class_text.to(device)
    algorithm = get_algorithm(cfg, Runtime(prep.prompts, class_text, prep.text.logit_scale,
                                           len(clients)))
    return Federation(algorithm, clients, class_text, prep.text.logit_scale, held_split,
                      held_mask)


def run_heldout(cfg: RunConfig, prep: Prepared, heldout: str, out: str | Path, *,
                resume: bool = False, reporter: Reporter | None = None,
                on_round: Callable[[FederationState, RoundRecord], None] | None = None,
                callbacks: Sequence[cb.Callback] = ()) -> RunResult:
    """One held-out run on features already prepared, into the run folder ``out`` (its
    files in ``out/<heldout>/``); :func:`run` does the same for every held-out domain."""
    folder = RunFolder(out, cfg, dataset_identity(prep.dataset))
    with folder.claimed():
        resumed = folder.prepare([heldout], resume)[heldout]
        folder.write_config()
        return train_heldout(folder.start(heldout, resumed), cfg, prep, reporter=reporter,
                             on_round=on_round, callbacks=callbacks)


def train_heldout(writer: HeldoutRun, cfg: RunConfig, prep: Prepared, *,
                  reporter: Reporter | None = None,
                  on_round: Callable[[FederationState, RoundRecord], None] | None = None,
                  callbacks: Sequence[cb.Callback] = ()) -> RunResult:
    """A held-out run, top to bottom: the clients, the server, round 0, the rounds, the
    personalization of the selected model, the result and its files (``writer``)."""
    reporter = reporter or SilentReporter()
    heldout, start = writer.heldout, time.perf_counter()
    fed = build_federation(cfg, prep, heldout)
    def progress(state: FederationState, record: RoundRecord) -> None:
        reporter.round_end(heldout, record, server.rules.rounds)

    server = fed.server(writer, callbacks=callbacks, resumed=writer.resumed,
                        observers=[progress, *([on_round] if on_round else [])])
    if writer.resumed is not None:
        reporter.info(f"[{heldout}] resuming after round {writer.resumed.round}")
    if (note := server.budget_note()) is not None:
        reporter.info(f"[{heldout}] {note}")
    state = fed.run(server)  # round 0 (a fresh run), then every planned round
    algo = fed.algorithm
    personalized = (fed.personalize(state.best_params, cfg.personalize_epochs)
                    if state.best_params is not None and cfg.personalize_epochs > 0
                    and algo.personalizes else None)
    return server.finish(
        fed.zero_shot(), personalized=personalized,
        clients=[ClientInfo(c.name, len(c.train), len(c.val), len(c.test))
                 for c in fed.clients],
        heldout_images=len(fed.heldout) if fed.heldout is not None else 0,
        runtime="in-process", dataset=prep.dataset.name, classes=prep.dataset.classes,
        logit_scale=prep.text.logit_scale, dim=fed.dim, seconds=time.perf_counter() - start,
        trainable_params=fed.trainable_parameters(),
        skipped={d: list(f.skipped) for d, f in prep.features.items() if f.skipped},
        data_source=data_source(prep.dataset.root))


def run(cfg: RunConfig, out: str | Path, *, resume: bool = False,
        reporter: Reporter | None = None, callbacks: Sequence[cb.Callback] = ()
        ) -> list[RunResult]:
    """Run every requested held-out domain; write results.json, tables and plots to ``out``.

    Everything that can be checked is checked before any feature is extracted (the
    algorithm and its options, the data and its partitions, the run folder, the cache,
    existing runs); a refused run writes nothing. ``callbacks`` see every round and every
    held-out result, and are closed when the run ends."""
    try:
        return _run(cfg, Path(out), resume, reporter, callbacks)
    finally:
        cb.close(callbacks)


def _run(cfg: RunConfig, out: Path, resume: bool, reporter: Reporter | None,
         callbacks: Sequence[cb.Callback]) -> list[RunResult]:
    algorithm = get_algorithm(cfg)  # the algorithm and every option, before anything else
    resolve_device(cfg.device)  # a device this machine lacks: one line, now
    folder = RunFolder(out, cfg)
    with folder.claimed():
        dataset = scan(cfg)
        splits = plan_clients(cfg, dataset)
        folder.check_names(list(dataset.domains))
        heldouts = list(dataset.domains) if cfg.heldout == "all" else [cfg.heldout]
        for h in heldouts:  # the aggregator's client count, the DP budget: before extraction
            server_rules(cfg, algorithm, sum(len(s) for d, s in splits.items() if d != h))
        folder.data = dataset_identity(dataset)
        starts = folder.prepare(heldouts, resume)  # every resume decided before any write
        check_cache_writable(cache_dir(cfg))
        folder.write_config()  # before extraction: an interrupted run resumes with --resume
        prep = prepare(cfg, (reporter or SilentReporter()).extraction, dataset=dataset,
                       splits=splits)
        return [train_heldout(folder.start(h, starts[h]), cfg, prep, reporter=reporter,
                              callbacks=callbacks) for h in heldouts]
