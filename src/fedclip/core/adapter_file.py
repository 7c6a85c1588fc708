"""The adapter file format, read and written here alone (``fedclip predict`` reads what any
runtime wrote): safetensors with the backbone, classes, prompts and the algorithm (with its
options) that built the module, and a checksum.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch

from fedclip.config import PROMPT_ENSEMBLES, RunConfig, check_template
from fedclip.errors import FedclipError
from fedclip.io import atomic_save_tensors
from fedclip.tensors import Params, checksum

ADAPTER_FORMAT = "fedclip-adapter/1"


@dataclass(frozen=True)
class Adapter:
    """An adapter file read back: the parameters and everything needed to use them."""

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
    seed: int = 0  # the run's seed (FFA-LoRA's frozen A is drawn from it)


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
            "prompt_templates": json.dumps(list(cfg.prompt_templates or [])),
            "seed": str(cfg.seed)}
    meta["checksum"] = checksum(params, meta)
    atomic_save_tensors(path, params, meta)


def load_adapter(path: str | Path) -> Adapter:
    """An adapter file read and checked (format, checksum, finite weights, classes)."""
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
    if saved is not None and saved != checksum(params, meta):
        raise FedclipError(f"{path} is damaged or was edited (checksum mismatch); re-export it "
                           f"from its run folder")
    try:
        adapter = Adapter(params, meta["backbone"], tuple(json.loads(meta["classes"])),
                          meta["prompt_template"], int(meta["dim"]),
                          float(meta["logit_scale"]), meta.get("algorithm", "fedclip"),
                          json.loads(meta.get("options", "{}")), int(meta.get("round", 0)),
                          tuple(json.loads(meta.get("prompt_templates", "[]"))),
                          int(meta.get("seed", 0)))
    except (KeyError, ValueError, TypeError) as exc:
        raise FedclipError(f"{path} has damaged adapter metadata ({type(exc).__name__}: "
                           f"{exc}); re-export it from its run folder") from None
    try:  # a template is a format string: one from a file is checked before any use
        for template in (adapter.prompt_template, *adapter.prompt_templates):
            if not isinstance(template, str) or not (
                    template in PROMPT_ENSEMBLES or check_template(template)):
                raise ValueError(f"prompt template {template!r} is not a string")
    except ValueError as exc:
        raise FedclipError(f"{path}: {exc}; it cannot be used safely") from None
    if not all(isinstance(c, str) and 0 < len(c) <= 256 for c in adapter.classes):
        raise FedclipError(f"{path} has class names that are not short strings")
    if not adapter.classes or not adapter.logit_scale > 0:
        raise FedclipError(f"{path} has no classes or no logit scale; it cannot classify")
    if not all(torch.isfinite(v).all() for v in params.values()):
        raise FedclipError(f"{path} holds NaN or inf weights; it cannot classify")
    return adapter
