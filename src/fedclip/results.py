"""What a run produces, in one place for both runtimes: round records, the best-round rule,
a held-out run's result (the ``results.json`` schema) and the adapter file format.

Both the in-process runner and the Flower server build their records and results here, and
``fedclip predict`` reads adapters here, so a file written by one path is read by every other.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch

from fedclip.config import RunConfig
from fedclip.errors import FedclipError
from fedclip.io import atomic_save_tensors

SCHEMA = "fedclip-results/1"
ADAPTER_FORMAT = "fedclip-adapter/1"
Params = dict[str, torch.Tensor]


def nanmean(values) -> float:  # noqa: ANN001 - any iterable of floats
    """Mean ignoring NaN and None (an empty split); NaN when nothing is left."""
    vals = [v for v in values if v is not None and not math.isnan(v)]
    return sum(vals) / len(vals) if vals else float("nan")


# --- rounds -------------------------------------------------------------------------------
def evaluation(val: dict[str, float], test: dict[str, float], heldout: float | None) -> dict:
    """The evaluation part of a round record (per-client accuracies sorted by client)."""
    val, test = dict(sorted(val.items())), dict(sorted(test.items()))
    return {"val_accuracy": val, "test_accuracy": test,
            "mean_val_accuracy": nanmean(val.values()),
            "mean_test_accuracy": nanmean(test.values()), "heldout_accuracy": heldout}


def round_record(server_round: int, losses: dict[str, float], seconds: float, sent: int,
                 received: int, **extra: object) -> dict:
    """A round's training part: per-client loss, wall time, bytes on the wire."""
    losses = dict(sorted(losses.items()))
    return {"round": server_round, "train_loss": losses,
            "mean_train_loss": nanmean(losses.values()) if losses else None, "seconds": seconds,
            "bytes": sent + received, "bytes_sent": sent, "bytes_received": received, **extra}


def is_better(record: dict, best_val: float) -> bool:
    """The one selection rule: a round (round 0 included) is selected when its mean val
    accuracy is strictly higher than every earlier round's; a NaN is never better."""
    val = record.get("mean_val_accuracy")
    return val is not None and not math.isnan(val) and val > best_val


def scores(record: dict) -> dict:
    return {"generalization": record["heldout_accuracy"],
            "personalization": {"mean": record["mean_test_accuracy"],
                                "per_client": record["test_accuracy"]}}


def _is_clip(spec: str) -> bool:
    from fedclip.backbones import backbone_traits

    return backbone_traits(spec).is_clip


def summarize(cfg: RunConfig, history: list[dict], best_round: int, zero: dict, *,
              heldout: str, dataset: str, trainable_params: int, seconds: float,
              clients: list[dict], heldout_images: int, skipped: dict[str, list[str]],
              **extra: object) -> dict:
    """One held-out run as a results.json entry (the schema the README documents)."""
    by_round = {r["round"]: r for r in history}
    last_round = history[-1]["round"]
    trained = [r for r in history if r["round"] > 0]
    return {
        "heldout": heldout, "algorithm": cfg.algorithm, "dataset": dataset,
        "backbone": cfg.backbone, "backbone_is_clip": _is_clip(cfg.backbone),
        "loss": cfg.loss, "seed": cfg.seed, "rounds": last_round,
        **scores(by_round[best_round]), "best_round": best_round,
        "last": scores(by_round[last_round]), "zeroshot": scores(zero),
        "trainable_params": trainable_params,
        "bytes_per_round": (sum(r.get("bytes", 0) for r in trained) // len(trained)
                            if trained else 0),
        "seconds_per_round": (sum(r["seconds"] for r in trained) / len(trained)
                              if trained else 0.0),
        "train_seconds": seconds, "clients": clients, "heldout_images": heldout_images,
        "skipped_images": skipped, **extra, "history": history,
    }


def json_safe(obj):  # noqa: ANN001, ANN201
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


# --- adapter files ------------------------------------------------------------------------
@dataclass(frozen=True)
class Adapter:
    params: Params
    backbone: str
    classes: tuple[str, ...]
    prompt_template: str
    dim: int
    logit_scale: float
    algorithm: str
    options: dict
    round: int
    prompt_templates: tuple[str, ...] = ()


def save_adapter(path: Path, params: Params, cfg: RunConfig, classes: tuple[str, ...],
                 logit_scale: float, rnd: int, dim: int) -> None:
    """An adapter file that carries what is needed to use it: backbone, classes, prompts,
    the algorithm (and its options) that built the module."""
    if not classes or not math.isfinite(logit_scale) or logit_scale <= 0:
        raise ValueError(f"an adapter file needs its classes and a positive logit scale "
                         f"(got {len(classes)} classes, scale {logit_scale})")
    meta = {"format": ADAPTER_FORMAT, "backbone": cfg.backbone,
            "classes": json.dumps(list(classes)), "prompt_template": cfg.prompt_template,
            "dim": str(dim), "logit_scale": repr(float(logit_scale)), "round": str(rnd),
            "algorithm": cfg.algorithm,
            "options": json.dumps(cfg.options.get(cfg.algorithm, {})),
            "prompt_templates": json.dumps(list(cfg.prompt_templates or []))}
    meta["checksum"] = _checksum(params, meta)
    atomic_save_tensors(path, params, meta)


def _checksum(params: Params, meta: dict[str, str]) -> str:
    import hashlib

    h = hashlib.sha256(json.dumps(meta, sort_keys=True).encode())
    for name in sorted(params):
        h.update(name.encode())
        h.update(params[name].detach().cpu().float().contiguous().numpy().tobytes())
    return h.hexdigest()


def load_adapter(path: str | Path) -> Adapter:
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise FedclipError(f"adapter file {path} does not exist; pass a run folder's "
                           f"<heldout>/adapter.safetensors")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            params = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    except Exception as exc:
        raise FedclipError(f"{path} is not a readable safetensors file ({exc})") from None
    if meta.get("format") != ADAPTER_FORMAT:
        raise FedclipError(f"{path} is not a fedclip adapter (no {ADAPTER_FORMAT} metadata)")
    saved = meta.pop("checksum", None)
    if saved is not None and saved != _checksum(params, meta):
        raise FedclipError(f"{path} is damaged or was edited (checksum mismatch); re-export it "
                           f"from its run folder")
    try:
        adapter = Adapter(params, meta["backbone"], tuple(json.loads(meta["classes"])),
                          meta["prompt_template"], int(meta["dim"]),
                          float(meta["logit_scale"]), meta.get("algorithm", "fedclip"),
                          json.loads(meta.get("options", "{}")), int(meta.get("round", 0)),
                          tuple(json.loads(meta.get("prompt_templates", "[]"))))
    except (KeyError, ValueError, TypeError) as exc:
        raise FedclipError(f"{path} has damaged adapter metadata ({type(exc).__name__}: "
                           f"{exc}); re-export it from its run folder") from None
    if not adapter.classes or not adapter.logit_scale > 0:
        raise FedclipError(f"{path} has no classes or no logit scale; it cannot classify")
    if not all(torch.isfinite(v).all() for v in params.values()):
        raise FedclipError(f"{path} holds NaN or inf weights; it cannot classify")
    return adapter
