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

import torch

from fedclip import callbacks as cb
from fedclip.algorithms import get_algorithm
from fedclip.algorithms.base import Runtime
from fedclip.backbones import resolve_device
from fedclip.callbacks import Reporter, SilentReporter
from fedclip.config import RunConfig
from fedclip.core.records import Base2Novel, ClientInfo, RoundRecord, RunResult
from fedclip.core.run_folder import HeldoutRun, RunFolder
from fedclip.core.server import server_rules
from fedclip.core.state import FederationState
from fedclip.data.folder import DomainDataset
from fedclip.data.sources import data_source
from fedclip.data.splits import ClassSplit, ClientSplit, class_split, keep_classes
from fedclip.errors import DataError
from fedclip.features import check_cache_writable
from fedclip.inprocess.federation import Federation, NovelClasses, restrict, restrict_client
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
    the algorithm told what this runtime knows (``Runtime``). Under ``protocol=base2novel``
    the federation holds the base classes alone and scores the novel ones at the end
    (:class:`~fedclip.inprocess.federation.NovelClasses`)."""
    clients = training_clients(prep, heldout)
    held_split, held_mask = heldout_tensors(prep.dataset.domains[heldout],
                                            prep.features[heldout], len(prep.dataset.classes))
    device = resolve_device(cfg.device)
    class_text = prep.class_text.to(device)
    scale = prep.text.logit_scale
    if cfg.protocol != "base2novel":
        algorithm = get_algorithm(cfg, Runtime(prep.prompts, class_text, scale, len(clients)))
        return Federation(algorithm, clients, class_text, scale, held_split, held_mask)
    split = base_novel_split(cfg, prep.dataset)
    base, novel = split.base, split.novel
    n = len(prep.dataset.classes)

    def among(classes: tuple[int, ...]) -> tuple[tuple[str, ...], torch.Tensor]:
        index = torch.as_tensor(classes, dtype=torch.long)
        return tuple(prep.prompts[i] for i in classes), class_text[index.to(device)]

    base_prompts, base_text = among(base)
    novel_prompts, novel_text = among(novel)
    algorithm = get_algorithm(cfg, Runtime(base_prompts, base_text, scale, len(clients)))
    # the same parameters on the novel classes: the algorithm built with their prompts
    scorer = get_algorithm(cfg, Runtime(novel_prompts, novel_text, scale, len(clients))) \
        if algorithm.open_vocabulary else None
    tests = {c.name: (restrict(c.test, novel, n), c.class_mask[list(novel)]) for c in clients}
    trained = [restrict_client(c, base) for c in clients]
    for c in trained:
        if len(c.train) == 0:
            raise no_base_image(c.name)
    return Federation(algorithm, trained, base_text, scale,
                      restrict(held_split, base, n), held_mask[list(base)],
                      NovelClasses(scorer, novel_text, tests, restrict(held_split, novel, n),
                                   held_mask[list(novel)]))


def base_novel_split(cfg: RunConfig, dataset: DomainDataset,
                     splits: dict[str, list[ClientSplit]] | None = None) -> ClassSplit:
    """The run's base/novel class split (``class_split_seed``); with ``splits`` (before any
    feature is extracted) every client is checked to keep a training image of a base class."""
    split = class_split(len(dataset.classes), cfg.class_split_seed)
    for name, clients in (splits or {}).items():
        labels = dataset.domains[name].labels
        for c in clients:
            if len(keep_classes(c, labels, split.base).train) == 0:
                raise no_base_image(c.name)
    return split


def no_base_image(client: str) -> DataError:
    """The error of a client left without a training image under base2novel."""
    return DataError(f"client {client!r} has no training image of a base class under "
                     f"protocol=base2novel; change class_split_seed, or the partition "
                     f"(clients_per_domain, dirichlet_alpha)")


def novel_note(algorithm: str) -> str:
    """Why a method's novel accuracy is not applicable (one line)."""
    return (f"{algorithm}'s parameters are per class (open_vocabulary = False): it cannot "
            f"score classes it never trained on, so its novel accuracy and HM are n/a")


def base_to_novel(cfg: RunConfig, fed: Federation, state: FederationState, zero: RoundRecord,
                  classes: tuple[str, ...]) -> Base2Novel | None:
    """What ``protocol=base2novel`` adds to a result: the class split, and the base and
    novel accuracies of the selected model (its round's base scores, the novel classes
    scored with the same parameters) and of the zero-shot classifier."""
    if fed.novel is None:
        return None
    split = class_split(len(classes), cfg.class_split_seed)
    base_names, novel_names = split.names(classes)
    by_round = {r.round: r for r in state.history}
    best = fed.base_novel(by_round[state.best_round].scores(), state.best_params,
                          state.best_client_states)
    return Base2Novel(split.seed, base_names, novel_names, best,
                      fed.base_novel(zero.scores(), None),
                      None if fed.algorithm.open_vocabulary else novel_note(cfg.algorithm))


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
        if record.round > 0:  # round 0 trains nothing: progress counts trained rounds
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
    zero = fed.zero_shot()
    novel = base_to_novel(cfg, fed, state, zero, prep.dataset.classes)
    return server.finish(
        zero, personalized=personalized,
        clients=[ClientInfo(c.name, len(c.train), len(c.val), len(c.test))
                 for c in fed.clients],
        heldout_images=len(fed.heldout) if fed.heldout is not None else 0,
        runtime="in-process", dataset=prep.dataset.name,
        classes=novel.base_classes if novel is not None else prep.dataset.classes,
        logit_scale=prep.text.logit_scale, dim=fed.dim, seconds=time.perf_counter() - start,
        trainable_params=fed.trainable_parameters(),
        skipped={d: list(f.skipped) for d, f in prep.features.items() if f.skipped},
        data_source=data_source(prep.dataset.root),
        **({"base2novel": novel} if novel is not None else {}))


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
        if cfg.protocol == "base2novel":  # a training client without a base class: now
            base_novel_split(cfg, dataset, {d: s for d, s in splits.items()
                                            if any(d != h for h in heldouts)})
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
