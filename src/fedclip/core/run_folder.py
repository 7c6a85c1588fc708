"""The one owner of a run folder, for every runtime.

The in-process runner, the Flower ServerApp and the SecAgg+ server all go through a
:class:`RunFolder`: it names the folder's files, holds the lock, decides a resume (with every
refusal: no ``--resume``, another configuration, fewer rounds than done, a damaged file),
writes checkpoints by rounds and by seconds, and at the end writes the adapters, the held-out
run's ``result.json``, the merged ``results.json``, ``results.md`` and the plot. Nothing else
writes into a run folder.

Layout::

    out/
      config.json  results.json  results.md  .fedclip.lock
      <heldout>/checkpoint.safetensors  history.jsonl  result.json  history.png
                adapter.safetensors  adapter-last.safetensors  [adapter-<client>.safetensors]

Under ``protocol=base2novel`` config.json holds the protocol and its ``class_split_seed``, and
results.json, result.json and results.md name the base and novel classes beside their scores
(the adapters are of the base classes, the classes they were trained on).
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import stat
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from fedclip.config import RunConfig
from fedclip.core.adapter_file import save_adapter
from fedclip.core.checkpoint import (
    HISTORY,
    append_history,
    config_fingerprint,
    fingerprint_fields,
    load_checkpoint,
    save_checkpoint,
)
from fedclip.core.records import (
    Base2Novel,
    ClientInfo,
    Personalized,
    RecordError,
    RoundRecord,
    RunResult,
    read_results_document,
    results_document,
    safe_name,
)
from fedclip.core.state import FederationState
from fedclip.errors import ConfigError, DataError, ResumeError, RunFolderError
from fedclip.io import atomic_write_json, atomic_write_text, remove_stale_temporaries
from fedclip.tensors import Params

CONFIG = "config.json"
RESULTS = "results.json"
REPORT = "results.md"
LOCK = ".fedclip.lock"
CHECKPOINT = "checkpoint.safetensors"
RESULT = "result.json"
PLOT = "history.png"
MARKERS = (CONFIG, RESULTS, LOCK)  # a folder holding one of these is a run folder

AdapterSpec = tuple[str, Params | None, int]  # (file stem, parameters, round)


class RunFolder:
    """``out`` for one configuration: its files, lock, resume decisions and final writes."""

    def __init__(self, out: str | Path, cfg: RunConfig, data: str | None = None) -> None:
        self.out, self.cfg = Path(out), cfg
        self.data = data  # the dataset's identity (in-process: task.dataset_identity), or None
        self._previous: list[RunResult] = []

    # --- paths ----------------------------------------------------------------------------
    def heldout_dir(self, heldout: str) -> Path:
        """The sub-folder of one held-out run."""
        return self.out / safe_name(heldout)

    def checkpoint_path(self, heldout: str) -> Path:
        """Where the held-out run's checkpoint lives."""
        return self.heldout_dir(heldout) / CHECKPOINT

    # --- the lock -------------------------------------------------------------------------
    @contextlib.contextmanager
    def claimed(self) -> Iterator[RunFolder]:
        """Hold ``out`` for this process (a lock file naming host, pid and process start), so
        a second run into the same folder is refused while this one lives; a lock left by a
        dead process is taken over."""
        out = self.out
        if out.exists() and not out.is_dir():
            raise RunFolderError(f"--out {out} is a file; pass a folder for the run")
        if out.is_dir() and any(out.iterdir()) and not any((out / m).exists() for m in MARKERS):
            raise RunFolderError(f"--out {out} holds other files and is not a fedclip run "
                                 f"folder; choose a new or empty folder")
        lock = out / LOCK
        try:
            out.mkdir(parents=True, exist_ok=True)
            _take_lock(lock, out)
        except PermissionError:
            raise RunFolderError(f"--out {out} is not writable; choose a folder you can write "
                                 f"to") from None
        except OSError as exc:
            raise RunFolderError(f"--out {out} cannot be written ({exc.strerror}); choose "
                                 f"another folder") from None
        try:
            yield self
        finally:
            lock.unlink(missing_ok=True)

    # --- before any expensive step --------------------------------------------------------
    def check_names(self, domains: Sequence[str]) -> None:
        """Refuse domains whose folder names would collide."""
        folders: dict[str, str] = {}
        for h in domains:
            if safe_name(h) in folders:
                raise DataError(f"domains {folders[safe_name(h)]!r} and {h!r} would share "
                                     f"the run folder {safe_name(h)!r}; rename one of them")
            folders[safe_name(h)] = h

    def prepare(self, heldouts: Sequence[str], resume: bool) -> dict[str, FederationState | None]:
        """Decide every held-out run's start before anything expensive happens: the state to
        continue from (loaded and verified once) or None for a fresh start. Refuses a run
        that exists without ``resume``, another configuration, a shrink, and a results.json
        that later writes could not merge into."""
        self._previous = self._read_previous()
        taken = [h for h in heldouts if self.checkpoint_path(h).exists()]
        if taken and not resume:
            raise ResumeError(f"{self.out} already holds a run for {', '.join(taken)}; pass "
                              f"--resume (Flower: resume=true) to continue it, or choose "
                              f"another --out")
        return {h: self._resumed(h) if h in taken else None for h in heldouts}

    def _resumed(self, heldout: str) -> FederationState:
        fields = fingerprint_fields(self.cfg, heldout, self.data)
        state = load_checkpoint(self.checkpoint_path(heldout),
                                config_fingerprint(self.cfg, heldout, self.data), fields)
        if state.round > self.cfg.rounds:
            raise ResumeError(f"{self.heldout_dir(heldout)} is at round {state.round}, past "
                              f"rounds={self.cfg.rounds}: a resume cannot shrink a run; pass "
                              f"--rounds {state.round} or more (extending is fine)")
        return state

    def _read_previous(self) -> list[RunResult]:
        """The runs of other held-out domains already in results.json (same configuration),
        read and checked now so that a damaged file fails before training, not after."""
        path = self.out / RESULTS
        if not path.exists():
            return []
        if not path.is_file():
            raise RunFolderError(f"{path} is not a regular file; remove it or choose another "
                                 f"--out")
        try:
            config, runs = read_results_document(json.loads(path.read_text(encoding="utf-8")))
        except (ValueError, UnicodeDecodeError, RecordError) as exc:
            raise RunFolderError(f"{path} is damaged ({exc}); move it away or choose another "
                                 f"--out") from None
        mine = self.cfg.model_dump(mode="json")
        same = {k: v for k, v in config.items() if k != "heldout"} == {
            k: v for k, v in mine.items() if k != "heldout"}
        return runs if same else []

    def write_config(self) -> None:
        """config.json: what ``--resume`` continues with."""
        atomic_write_json(self.out / CONFIG, self.cfg.model_dump(mode="json"))

    @staticmethod
    def saved_settings(out: str | Path) -> dict[str, Any]:
        """The settings ``out`` was run with (its config.json, what ``--resume`` continues
        with); empty when it holds none. One that is not a JSON object: a one-line error."""
        path = Path(out) / CONFIG
        if not path.is_file():
            return {}
        try:
            saved = json.loads(path.read_text(encoding="utf-8"))
        except ValueError:  # UnicodeDecodeError included
            saved = None
        if not isinstance(saved, dict):
            raise ConfigError(f"{path} is not a JSON object of settings; pass the settings "
                              f"again, or start another --out")
        return saved

    @staticmethod
    def holds_settings(out: str | Path) -> bool:
        """Whether ``out`` holds a run's settings (so that ``--resume`` can continue it)."""
        return (Path(out) / CONFIG).is_file()

    def start(self, heldout: str, resumed: FederationState | None) -> HeldoutRun:
        """The writer of one held-out run (``resumed`` from :meth:`prepare`)."""
        return HeldoutRun(self, heldout, resumed)

    # --- results --------------------------------------------------------------------------
    def merge(self, result: RunResult) -> list[RunResult]:
        """Every run of this configuration in the folder, ``result`` replacing its held-out
        domain's earlier run; written to results.json and results.md."""
        from fedclip import report

        runs = [r for r in self._previous if r.heldout != result.heldout] + [result]
        self._previous = runs
        note = report.backbone_note(self.cfg.backbone)
        atomic_write_json(self.out / RESULTS,
                          results_document(self.cfg.model_dump(mode="json"), note, runs))
        atomic_write_text(self.out / REPORT, report.markdown_report(self.cfg, runs))
        return runs


class HeldoutRun:
    """One held-out run's files: checkpoints during training, everything else at the end."""

    def __init__(self, folder: RunFolder, heldout: str, resumed: FederationState | None
                 ) -> None:
        self.folder, self.heldout, self.resumed = folder, heldout, resumed
        self.dir = folder.heldout_dir(heldout)
        cfg = folder.cfg
        self.fingerprint = config_fingerprint(cfg, heldout, folder.data)
        self.fields = fingerprint_fields(cfg, heldout, folder.data)
        self.dir.mkdir(parents=True, exist_ok=True)
        remove_stale_temporaries(self.dir)
        if resumed is None:
            (self.dir / HISTORY).unlink(missing_ok=True)  # a fresh run: no stale history
        self._saved = time.monotonic()

    def check_shapes(self, init: Params | None) -> None:
        """Refuse a resumed state whose parameters are not those of this run's model (the
        names and shapes of ``init``, the algorithm's fresh parameters), in one line, before
        they reach a module (a checkpoint edited and its checksum recomputed)."""
        if self.resumed is None or init is None:
            return
        for what, params in (("global", self.resumed.global_params),
                             ("best", self.resumed.best_params)):
            if params is None:
                continue
            wrong = sorted(set(params) ^ set(init)) or [
                k for k in init if tuple(params[k].shape) != tuple(init[k].shape)]
            if wrong:
                key = wrong[0]
                got = tuple(params[key].shape) if key in params else "missing"
                want = tuple(init[key].shape) if key in init else "none"
                raise ResumeError(f"checkpoint {self.dir / CHECKPOINT} does not fit this run's "
                                  f"model ({what} {key}: {got}, expected {want}); delete it "
                                  f"to start over")

    def checkpoint(self, state: FederationState) -> None:
        """Write ``state`` now."""
        save_checkpoint(self.dir / CHECKPOINT, state, self.fingerprint, self.fields)
        self._saved = time.monotonic()

    def round_end(self, state: FederationState, last: bool = False) -> None:
        """Checkpoint when due: every ``checkpoint_every`` rounds, at the last round (``last``,
        or ``rounds``), or when ``checkpoint_seconds`` have passed since the last write."""
        cfg = self.folder.cfg
        if (last or state.round % cfg.checkpoint_every == 0 or state.round == cfg.rounds
                or time.monotonic() - self._saved >= cfg.checkpoint_seconds):
            self.checkpoint(state)

    def write_history(self, state: FederationState) -> None:
        """Append ``state``'s rounds not yet in the history file (a refused round, recorded
        when the run stops; the checkpoint stays at the last good round)."""
        append_history(self.dir / HISTORY, state.history)

    def result(self, state: FederationState, zero: RoundRecord, *, dataset: str,
               trainable_params: int, seconds: float, clients: Sequence[ClientInfo],
               heldout_images: int, runtime: str, skipped: dict[str, list[str]] | None = None,
               personalized: Personalized | None = None, base2novel: Base2Novel | None = None,
               **extra: Any) -> RunResult:
        """The run's result from its state (history, selected round) and what the runtime
        knows (sizes, costs; ``base2novel``: the novel classes' scores and the class split,
        under that protocol)."""
        from fedclip.backbones import backbone_traits

        cfg = self.folder.cfg
        by_round = {r.round: r for r in state.history}
        return RunResult(
            heldout=self.heldout, algorithm=cfg.algorithm, dataset=dataset,
            backbone=cfg.backbone, backbone_is_clip=backbone_traits(cfg.backbone).is_clip,
            loss=cfg.loss, seed=cfg.seed, best=by_round[state.best_round].scores(),
            best_round=state.best_round, last=state.history[-1].scores(),
            zeroshot=zero.scores(), trainable_params=trainable_params, train_seconds=seconds,
            clients=tuple(clients), heldout_images=heldout_images,
            history=tuple(state.history), runtime=runtime, skipped_images=skipped or {},
            personalized=personalized, extra=extra, base2novel=base2novel)

    def finish(self, result: RunResult, adapters: Sequence[AdapterSpec],
               classes: tuple[str, ...], logit_scale: float, dim: int,
               plots: bool = True) -> list[RunResult]:
        """Write the adapters, result.json, the merged results.json and results.md, and the
        plot; return every run now in results.json."""
        cfg = self.folder.cfg
        for name, params, rnd in adapters:
            if params is not None:
                save_adapter(self.dir / f"{name}.safetensors", params, cfg, classes,
                             logit_scale, rnd, dim)
        atomic_write_json(self.dir / RESULT, result.to_json())
        runs = self.folder.merge(result)
        if plots:
            from fedclip import report

            report.plot_history(result, self.dir / PLOT)
        return runs


# --- the lock file ----------------------------------------------------------------------
def _process_start(pid: int) -> str:
    """The start time of ``pid`` (Linux: /proc; elsewhere empty), so a reused pid is told
    apart from the process that wrote a lock."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return ""


def _lock_text() -> str:
    pid = os.getpid()
    return json.dumps({"host": socket.gethostname(), "pid": pid, "start": _process_start(pid)})


def _lock_owner_alive(text: str) -> tuple[bool, str]:
    """(whether the lock's writer still runs, a description of it)."""
    try:
        info = json.loads(text)
        if isinstance(info, int):  # an older lock: the pid alone
            info = {"pid": info}
        pid = int(info.get("pid", 0))
    except (ValueError, TypeError, AttributeError):
        return False, "an unreadable lock"
    host = str(info.get("host", socket.gethostname()))
    who = f"pid {pid} on {host}"
    if host != socket.gethostname():
        return True, who  # another machine's process: never taken over
    if pid <= 0 or not _alive(pid):
        return False, who
    start = str(info.get("start", ""))
    return (not start or start == _process_start(pid)), who


def _take_lock(lock: Path, out: Path) -> None:
    for _ in range(2):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            break
        except FileExistsError:
            try:
                text = lock.read_text().strip() if stat.S_ISREG(lock.lstat().st_mode) else ""
            except OSError:
                text = ""
            alive, who = _lock_owner_alive(text)
            if alive:
                raise RunFolderError(f"another run ({who}) is writing to {out}; wait for it, "
                                     f"or choose another --out (if no such run exists, delete "
                                     f"{lock})") from None
            lock.unlink(missing_ok=True)  # left by a process that no longer exists
    else:
        raise RunFolderError(f"could not lock {out}; is another run starting there?")
    os.write(fd, _lock_text().encode())
    os.close(fd)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
