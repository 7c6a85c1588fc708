"""Round callbacks: code that runs after every round and after every held-out run, in both
runtimes (the in-process runner and the Flower server call the same hooks with the same
records).

>>> from fedclip import RunConfig, run
>>> from fedclip.callbacks import Callback
>>> class Printer(Callback):
...     def on_round_end(self, heldout: str, record: RoundRecord) -> None:
...         print(heldout, record.round, record.mean_val_accuracy)
>>> run(RunConfig.build(backbone="standin", rounds=3), "runs/x", callbacks=[Printer()])

A record is a :class:`fedclip.core.records.RoundRecord` (a round of ``results.json``'s
``history``; round 0 is the initial model); a result is a
:class:`fedclip.core.records.RunResult` (one ``runs`` entry). Loggers are callbacks named by
a spec (``--log-to tensorboard:DIR`` on the command line, the run-config key ``log-to`` on
Flower): built-in ones are listed in
``LOGGERS``; other packages add theirs with entry points in the group ``fedclip.loggers``
(``name = "package.module:Class"``, the class taking the folder).
"""

from __future__ import annotations

import importlib
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Protocol

from fedclip.core.records import RoundRecord, RunResult
from fedclip.errors import ConfigError


class Callback:
    """Override what you need; every hook defaults to doing nothing. A hook must not change
    the record or result it is given."""

    def on_round_end(self, heldout: str, record: RoundRecord) -> None:
        """After each round (round 0 included: the initial model), once it is evaluated."""

    def on_run_end(self, heldout: str, result: RunResult) -> None:
        """After a held-out run, with its results.json entry."""

    def close(self) -> None:
        """Once, when the run (every held-out domain) is over or has failed."""


LOGGERS: dict[str, str] = {"tensorboard": "fedclip.loggers.tensorboard:TensorBoardLogger"}


def _logger_class(name: str) -> type:
    target = LOGGERS.get(name)
    if target is None:
        from importlib.metadata import entry_points

        target = next((ep.value for ep in entry_points(group="fedclip.loggers")
                       if ep.name == name), None)
    if target is None:
        raise ConfigError(f"unknown logger {name!r} in --log-to; use one of "
                          f"{', '.join(sorted(LOGGERS))} (NAME or NAME:FOLDER)")
    module, _, attr = target.partition(":")
    return getattr(importlib.import_module(module), attr)


def loggers_from_specs(specs: Iterable[str], out: str | Path, run_name: str | None = None
                       ) -> list[Callback]:
    """``NAME`` (writes to ``out/NAME``) or ``NAME:FOLDER`` for each spec; empty specs and
    comma-separated lists are accepted (a run-config value is one string). ``run_name``
    (one of several runs, e.g. in ``compare``) keeps runs apart under a given FOLDER."""
    callbacks: list[Callback] = []
    for item in (s.strip() for spec in specs for s in spec.split(",")):
        if not item:
            continue
        name, _, folder = item.partition(":")
        target = Path(folder) / (run_name or "") if folder else Path(out) / name
        callbacks.append(_logger_class(name)(target))
    return callbacks


def round_end(callbacks: Sequence[Callback], heldout: str, record: RoundRecord) -> None:
    """Every callback's ``on_round_end``."""
    for callback in callbacks:
        callback.on_round_end(heldout, record)


def run_end(callbacks: Sequence[Callback], heldout: str, result: RunResult) -> None:
    """Every callback's ``on_run_end``."""
    for callback in callbacks:
        callback.on_run_end(heldout, result)


def close(callbacks: Sequence[Callback]) -> None:
    """Every callback's ``close``."""
    for callback in callbacks:
        callback.close()


class Reporter(Protocol):
    """Progress for people (the CLI's progress bars); the runners themselves print nothing."""

    def extraction(self, domain: str, done: int, total: int, cached: bool = False) -> None:
        """``done`` of ``total`` images of ``domain`` encoded (``cached``: all of them read
        from the feature cache at once)."""

    def round_end(self, heldout: str, record: RoundRecord, total_rounds: int) -> None:
        """A round of the ``heldout`` run ended."""

    def info(self, message: str) -> None:
        """A line for the user."""


class SilentReporter(Reporter):
    """A reporter that reports nothing."""

    def extraction(self, domain: str, done: int, total: int, cached: bool = False) -> None:
        pass

    def round_end(self, heldout: str, record: RoundRecord, total_rounds: int) -> None:
        pass

    def info(self, message: str) -> None:
        pass
