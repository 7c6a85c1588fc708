"""What a run produces, typed: a round's record and a held-out run's result.

Every runtime builds these (the in-process runner, the Flower server, the SecAgg+ server),
the run folder (:mod:`fedclip.core.run_folder`) writes them, and the report, ``compare``, the
CLI and the loggers read their attributes. Serialisation lives here alone: ``to_json`` writes
the ``results.json`` schema the README documents and ``from_json`` reads it back, refusing a
file that does not follow it.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable
from dataclasses import dataclass, field, fields
from typing import Any

from fedclip.errors import FedclipError

SCHEMA = "fedclip-results/1"


class RecordError(FedclipError):
    """A results file or history line that does not follow the schema."""


def nanmean(values: Iterable[float | None]) -> float:
    """Mean ignoring NaN and None (an empty split); NaN when nothing is left."""
    vals = [v for v in values if v is not None and not math.isnan(v)]
    return sum(vals) / len(vals) if vals else float("nan")


def json_safe(obj: Any) -> Any:
    """NaN and inf become null, so results.json is strict JSON."""
    if isinstance(obj, float):
        return None if math.isnan(obj) or math.isinf(obj) else obj
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [json_safe(v) for v in obj]
    return obj


def safe_name(name: str) -> str:
    """A domain or client name as a file or folder name."""
    return "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in name)


def _num(value: Any) -> float | None:
    """A number read from JSON (null: NaN in memory is written as null)."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise RecordError(f"expected a number, got {value!r}")
    return float(value)


def _accuracies(value: Any) -> dict[str, float]:
    if not isinstance(value, dict):
        raise RecordError(f"expected per-client values, got {type(value).__name__}")
    return {str(k): (math.nan if (v := _num(x)) is None else v) for k, x in value.items()}


def _strings(value: Any) -> list[str] | None:
    if value is None:
        return None
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise RecordError(f"expected a list of strings, got {value!r}"[:200])
    return list(value)


# --- rounds -------------------------------------------------------------------------------
@dataclass
class RoundRecord:
    """One round: training (per-client loss, wall time, bytes) and, when the round was
    evaluated, each client's val/test accuracy and the held-out accuracy. Round 0 is the
    initial model (nothing trained)."""

    round: int
    train_loss: dict[str, float] = field(default_factory=dict)
    seconds: float = 0.0  # training and aggregation
    bytes_sent: int = 0
    bytes_received: int = 0
    val_accuracy: dict[str, float] | None = None  # None: not evaluated this round
    test_accuracy: dict[str, float] | None = None
    heldout_accuracy: float | None = None  # None: no held-out domain (or not evaluated)
    round_seconds: float | None = None  # train, aggregate and evaluate
    missing: list[str] | None = None  # Flower: sampled clients that did not answer
    rejected: dict[str, str] | None = None  # Flower: client -> why its update was refused
    eval_missing: list[str] | None = None  # Flower: nodes whose evaluation did not come
    epsilon: float | None = None  # dp: the privacy spent after this round (accountant's)
    # Flower: what the slowest training node says each part of its message took (process
    # start and imports, loading its site, evaluating the previous round, training)
    node_seconds: dict[str, float] | None = None
    # what the server noticed about the round (identical or echoing updates, a model that
    # stopped moving while clients report training)
    warnings: list[str] | None = None
    # what the algorithm's server side measured of its aggregate (``round_metrics``: LoRA's
    # aggregation error), by name
    metrics: dict[str, float] | None = None

    @property
    def evaluated(self) -> bool:
        """Whether this round was evaluated (``eval_every``)."""
        return self.val_accuracy is not None

    @property
    def mean_val_accuracy(self) -> float | None:
        """The mean over clients' val splits (the selection criterion); None if not evaluated."""
        return None if self.val_accuracy is None else nanmean(self.val_accuracy.values())

    def val_score(self, rule: str = "mean") -> float | None:
        """What the best-round rule compares: the mean (or, ``rule="median"``, the median)
        of the clients' val accuracies; None if not evaluated."""
        if self.val_accuracy is None or rule == "mean":
            return self.mean_val_accuracy
        values = [v for v in self.val_accuracy.values() if not math.isnan(v)]
        return float(statistics.median(values)) if values else math.nan

    @property
    def mean_test_accuracy(self) -> float | None:
        """Personalization: the mean over clients' own test splits."""
        return None if self.test_accuracy is None else nanmean(self.test_accuracy.values())

    @property
    def mean_train_loss(self) -> float | None:
        """The mean local loss of the round's updates (None: round 0 or no update)."""
        return nanmean(self.train_loss.values()) if self.train_loss else None

    @property
    def bytes(self) -> int:
        """Bytes on the wire, both ways."""
        return self.bytes_sent + self.bytes_received

    def set_evaluation(self, val: dict[str, float], test: dict[str, float],
                       heldout: float | None) -> None:
        """Record an evaluation (per-client accuracies sorted by client)."""
        self.val_accuracy = dict(sorted(val.items()))
        self.test_accuracy = dict(sorted(test.items()))
        self.heldout_accuracy = heldout

    def scores(self) -> Scores:
        """This round's generalization and personalization."""
        return Scores(self.heldout_accuracy, self.mean_test_accuracy,
                      dict(self.test_accuracy or {}))

    def to_json(self) -> dict[str, Any]:
        """The history entry of results.json (and a line of history.jsonl)."""
        out: dict[str, Any] = {
            "round": self.round, "train_loss": dict(sorted(self.train_loss.items())),
            "mean_train_loss": self.mean_train_loss, "seconds": self.seconds,
            "bytes": self.bytes, "bytes_sent": self.bytes_sent,
            "bytes_received": self.bytes_received}
        for name in ("missing", "rejected", "eval_missing", "node_seconds", "warnings",
                     "metrics"):
            if getattr(self, name) is not None:
                out[name] = getattr(self, name)
        if self.evaluated:
            out |= {"val_accuracy": self.val_accuracy, "test_accuracy": self.test_accuracy,
                    "mean_val_accuracy": self.mean_val_accuracy,
                    "mean_test_accuracy": self.mean_test_accuracy,
                    "heldout_accuracy": self.heldout_accuracy}
        if self.round_seconds is not None:
            out["round_seconds"] = self.round_seconds
        if self.epsilon is not None:
            out["epsilon"] = self.epsilon
        return json_safe(out)

    @classmethod
    def from_json(cls, data: Any) -> RoundRecord:
        """A history entry back; a malformed one raises :class:`RecordError`."""
        if not isinstance(data, dict):
            raise RecordError(f"a round record is an object, got {type(data).__name__}")
        try:
            rnd = data["round"]
            if isinstance(rnd, bool) or not isinstance(rnd, int) or rnd < 0:
                raise RecordError(f"round must be a non-negative integer, got {rnd!r}")
            record = cls(rnd, _accuracies(data.get("train_loss", {})),
                         _num(data.get("seconds", 0.0)) or 0.0,
                         int(data.get("bytes_sent", 0)), int(data.get("bytes_received", 0)),
                         round_seconds=_num(data.get("round_seconds")),
                         missing=data.get("missing"), rejected=data.get("rejected"),
                         eval_missing=data.get("eval_missing"),
                         epsilon=_num(data.get("epsilon")),
                         node_seconds=(_accuracies(data["node_seconds"])
                                       if "node_seconds" in data else None),
                         warnings=_strings(data.get("warnings")),
                         metrics=(_accuracies(data["metrics"]) if "metrics" in data
                                  else None))
            if "val_accuracy" in data:
                record.set_evaluation(_accuracies(data["val_accuracy"]),
                                      _accuracies(data["test_accuracy"]),
                                      _num(data.get("heldout_accuracy")))
        except KeyError as exc:
            raise RecordError(f"a round record lacks {exc}") from None
        except (TypeError, ValueError) as exc:
            raise RecordError(f"a malformed round record ({exc})") from None
        return record


def is_better(record: RoundRecord, best_val: float, rule: str = "mean") -> bool:
    """The one selection rule: a round (round 0 included) is selected when its val score
    (the mean of the clients' val accuracies, or their median with a robust aggregator:
    ``fedclip.core.server.selection_rule``) is strictly higher than every earlier round's; a
    NaN is never better."""
    val = record.val_score(rule)
    return val is not None and not math.isnan(val) and val > best_val


# --- results ------------------------------------------------------------------------------
@dataclass(frozen=True)
class Scores:
    """Generalization (held-out accuracy) and personalization (mean of, and each client's,
    accuracy on its own test split)."""

    generalization: float | None
    personalization: float | None
    per_client: dict[str, float] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        """``{"generalization": .., "personalization": {"mean": .., "per_client": ..}}``."""
        return {"generalization": self.generalization,
                "personalization": {"mean": self.personalization,
                                    "per_client": dict(self.per_client)}}

    @classmethod
    def from_json(cls, data: Any) -> Scores:
        """Scores back from their JSON form."""
        pers = data["personalization"]
        return cls(_num(data["generalization"]), _num(pers["mean"]),
                   _accuracies(pers.get("per_client", {})))


@dataclass(frozen=True)
class Personalized:
    """Each client's fine-tuned copy of the selected model: test accuracy and chosen epoch."""

    per_client: dict[str, float]
    epochs: dict[str, int] = field(default_factory=dict)

    @property
    def mean(self) -> float:
        """The mean over clients."""
        return nanmean(self.per_client.values())

    def to_json(self) -> dict[str, Any]:
        """``{"mean", "per_client", "epochs"}``."""
        return {"mean": self.mean, "per_client": dict(sorted(self.per_client.items())),
                "epochs": dict(sorted(self.epochs.items()))}

    @classmethod
    def from_json(cls, data: Any) -> Personalized | None:
        """None stays None (no personalization step)."""
        if data is None:
            return None
        return cls(_accuracies(data.get("per_client", {})),
                   {str(k): int(v) for k, v in data.get("epochs", {}).items()})


def harmonic_mean(base: float | None, novel: float | None) -> float | None:
    """The base-to-novel summary: ``2 b n / (b + n)`` of base and novel accuracy (0 when both
    are 0; None when either is unknown)."""
    if base is None or novel is None or math.isnan(base) or math.isnan(novel):
        return None
    return 0.0 if base + novel == 0 else 2 * base * novel / (base + novel)


@dataclass(frozen=True)
class BaseNovelScores:
    """One model under the base-to-novel protocol: on the clients' own test splits (the mean
    over clients) and on the held-out domain, the accuracy on base-class images among the
    base classes and on novel-class images among the novel classes (scored with the novel
    class names' prompts). None: not applicable (a model whose parameters are per class)."""

    base: float | None
    novel: float | None
    heldout_base: float | None = None
    heldout_novel: float | None = None
    per_client_novel: dict[str, float] = field(default_factory=dict)

    @property
    def hm(self) -> float | None:
        """The harmonic mean of base and novel on the clients' test splits."""
        return harmonic_mean(self.base, self.novel)

    @property
    def heldout_hm(self) -> float | None:
        """The harmonic mean on the held-out domain."""
        return harmonic_mean(self.heldout_base, self.heldout_novel)

    def to_json(self) -> dict[str, Any]:
        """``{"base", "novel", "hm", "heldout": {"base", "novel", "hm"}, "per_client_novel"}``."""
        return {"base": self.base, "novel": self.novel, "hm": self.hm,
                "heldout": {"base": self.heldout_base, "novel": self.heldout_novel,
                            "hm": self.heldout_hm},
                "per_client_novel": dict(sorted(self.per_client_novel.items()))}

    @classmethod
    def from_json(cls, data: Any) -> BaseNovelScores:
        """Back from :meth:`to_json` (the harmonic means are recomputed)."""
        held = data.get("heldout") or {}
        return cls(_num(data.get("base")), _num(data.get("novel")), _num(held.get("base")),
                   _num(held.get("novel")), _accuracies(data.get("per_client_novel") or {}))


@dataclass(frozen=True)
class Base2Novel:
    """What a run under ``protocol=base2novel`` adds to its result: the class split (its seed
    and the class names of each half), the selected model's and the zero-shot classifier's
    base and novel accuracies, and why novel is not applicable when it is not."""

    split_seed: int
    base_classes: tuple[str, ...]
    novel_classes: tuple[str, ...]
    best: BaseNovelScores
    zeroshot: BaseNovelScores
    novel_note: str | None = None

    def to_json(self) -> dict[str, Any]:
        """The ``base2novel`` entry of a run in results.json."""
        return {"split_seed": self.split_seed, "base_classes": list(self.base_classes),
                "novel_classes": list(self.novel_classes), "best": self.best.to_json(),
                "zeroshot": self.zeroshot.to_json(), "novel_note": self.novel_note}

    @classmethod
    def from_json(cls, data: Any) -> Base2Novel | None:
        """None stays None (a run of another protocol)."""
        if data is None:
            return None
        if not isinstance(data, dict):
            raise RecordError(f"base2novel is an object, got {type(data).__name__}")
        note = data.get("novel_note")
        return cls(int(data["split_seed"]), tuple(_strings(data["base_classes"]) or ()),
                   tuple(_strings(data["novel_classes"]) or ()),
                   BaseNovelScores.from_json(data["best"]),
                   BaseNovelScores.from_json(data["zeroshot"]),
                   str(note) if note is not None else None)


@dataclass(frozen=True)
class ClientInfo:
    """A training client and its split sizes (None where the server cannot know them)."""

    name: str
    train: int | None = None
    val: int | None = None
    test: int | None = None

    def to_json(self) -> dict[str, Any]:
        """Only the sizes that are known."""
        return {k: v for k, v in (("name", self.name), ("train", self.train),
                                  ("val", self.val), ("test", self.test)) if v is not None}


@dataclass(frozen=True)
class RunResult:
    """One held-out run: its scores at the selected round, at the last round and zero-shot,
    its costs and its whole history (a ``runs`` entry of results.json)."""

    heldout: str
    algorithm: str
    dataset: str
    backbone: str
    backbone_is_clip: bool
    loss: str
    seed: int
    best: Scores
    best_round: int
    last: Scores
    zeroshot: Scores
    trainable_params: int
    train_seconds: float
    clients: tuple[ClientInfo, ...]
    heldout_images: int
    history: tuple[RoundRecord, ...]
    runtime: str
    skipped_images: dict[str, list[str]] = field(default_factory=dict)
    personalized: Personalized | None = None
    extra: dict[str, Any] = field(default_factory=dict)  # runtime-specific: transfer, ...
    base2novel: Base2Novel | None = None  # protocol=base2novel: novel accuracy, the split

    @property
    def rounds(self) -> int:
        """The last round trained."""
        return self.history[-1].round

    @property
    def generalization(self) -> float | None:
        """Held-out accuracy at the selected round."""
        return self.best.generalization

    @property
    def personalization(self) -> float | None:
        """Mean own-test accuracy at the selected round."""
        return self.best.personalization

    @property
    def bytes_per_round(self) -> int:
        """Mean bytes on the wire per trained round."""
        trained = [r for r in self.history if r.round > 0]
        return sum(r.bytes for r in trained) // len(trained) if trained else 0

    @property
    def seconds_per_round(self) -> float:
        """Mean training seconds per trained round."""
        trained = [r for r in self.history if r.round > 0]
        return sum(r.seconds for r in trained) / len(trained) if trained else 0.0

    def to_json(self) -> dict[str, Any]:
        """The results.json ``runs`` entry (the schema the README documents)."""
        best = self.best.to_json()
        return json_safe({
            "heldout": self.heldout, "algorithm": self.algorithm, "dataset": self.dataset,
            "backbone": self.backbone, "backbone_is_clip": self.backbone_is_clip,
            "loss": self.loss, "seed": self.seed, "rounds": self.rounds, **best,
            "best_round": self.best_round, "last": self.last.to_json(),
            "zeroshot": self.zeroshot.to_json(), "trainable_params": self.trainable_params,
            "bytes_per_round": self.bytes_per_round,
            "seconds_per_round": self.seconds_per_round, "train_seconds": self.train_seconds,
            "clients": [c.to_json() for c in self.clients],
            "heldout_images": self.heldout_images, "skipped_images": self.skipped_images,
            "personalized": self.personalized.to_json() if self.personalized else None,
            "runtime": self.runtime, **self.extra,
            **({"base2novel": self.base2novel.to_json()} if self.base2novel else {}),
            "history": [r.to_json() for r in self.history]})

    @classmethod
    def from_json(cls, data: Any) -> RunResult:
        """A ``runs`` entry back; anything off the schema raises :class:`RecordError`."""
        if not isinstance(data, dict):
            raise RecordError(f"a run is an object, got {type(data).__name__}")
        known = {f.name for f in fields(cls)} | {
            "rounds", "generalization", "personalization", "bytes_per_round",
            "seconds_per_round"}
        try:
            history = tuple(RoundRecord.from_json(r) for r in data["history"])
            if not history:
                raise RecordError("a run has no history")
            return cls(
                heldout=str(data["heldout"]), algorithm=str(data["algorithm"]),
                dataset=str(data["dataset"]), backbone=str(data["backbone"]),
                backbone_is_clip=bool(data["backbone_is_clip"]), loss=str(data["loss"]),
                seed=int(data["seed"]), best=Scores.from_json(data),
                best_round=int(data["best_round"]), last=Scores.from_json(data["last"]),
                zeroshot=Scores.from_json(data["zeroshot"]),
                trainable_params=int(data["trainable_params"]),
                train_seconds=float(data["train_seconds"]),
                clients=tuple(ClientInfo(str(c["name"]), c.get("train"), c.get("val"),
                                         c.get("test")) for c in data["clients"]),
                heldout_images=int(data["heldout_images"]), history=history,
                runtime=str(data.get("runtime", "in-process")),
                skipped_images={str(k): list(v) for k, v in
                                (data.get("skipped_images") or {}).items()},
                personalized=Personalized.from_json(data.get("personalized")),
                extra={k: v for k, v in data.items() if k not in known},
                base2novel=Base2Novel.from_json(data.get("base2novel")))
        except RecordError:
            raise
        except KeyError as exc:
            raise RecordError(f"a run lacks {exc}") from None
        except (TypeError, ValueError, AttributeError) as exc:
            raise RecordError(f"a malformed run ({type(exc).__name__}: {exc})") from None


def results_document(config: dict[str, Any], note: str | None, runs: list[RunResult]
                     ) -> dict[str, Any]:
    """The whole results.json: schema, the configuration, the backbone's note, the runs."""
    return json_safe({"schema": SCHEMA, "config": config, "backbone_note": note,
                      "runs": [r.to_json() for r in runs]})


def read_results_document(data: Any) -> tuple[dict[str, Any], list[RunResult]]:
    """(config, runs) of a results.json document; anything off the schema raises."""
    if not isinstance(data, dict) or data.get("schema") != SCHEMA:
        raise RecordError(f"not a {SCHEMA} document")
    config, runs = data.get("config"), data.get("runs")
    if not isinstance(config, dict) or not isinstance(runs, list):
        raise RecordError("config must be an object and runs a list")
    return config, [RunResult.from_json(r) for r in runs]
