"""``fedclip paper``: the paper's PACS table, measured beside the published numbers.

The paper (Lu et al., 2023, arXiv 2302.13485) reports leave-one-domain-out generalization on
PACS for FedCLIP and four baselines: FedAvg and FedProx fine-tuning CLIP's encoders, and
FedAvg and FedProx training AlexNet. This module runs those five methods on the same splits
(one run folder each, ``<algorithm>-seed<k>/``, so ``--resume`` continues), and writes
``paper.md`` / ``paper.json`` with each published number beside the measured one. A backbone
that is not the paper's (the stand-in, random weights) is said so in the table's title: its
numbers cannot reproduce the paper's.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedclip.config import RunConfig
from fedclip.core.records import RunResult
from fedclip.errors import RunFolderError
from fedclip.io import atomic_write_json, atomic_write_text

SOURCE = ("Lu et al., FedCLIP (arXiv 2302.13485): PACS, leave-one-domain-out generalization "
          "(accuracy % on the held-out domain); the same table is in the authors' code, "
          "microsoft/PersonalizedFL, fedclip/readme.md")
PAPER_BACKBONE = "open_clip:ViT-B-32@openai"  # CLIP ViT-B/32 with OpenAI's weights
HELDOUTS = ("art_painting", "cartoon", "photo", "sketch")  # the paper's A, C, P, S


@dataclass(frozen=True)
class Method:
    label: str  # the paper's column
    algorithm: str  # fedclip's algorithm
    published: dict[str, float]  # held-out domain (and "average") -> accuracy %


def _row(a: float, c: float, p: float, s: float, avg: float) -> dict[str, float]:
    return {**dict(zip(HELDOUTS, (a, c, p, s), strict=True)), "average": avg}


METHODS = (
    Method("AlexNet FedAvg", "fedavg-cnn", _row(60.93, 57.99, 59.68, 56.14, 58.69)),
    Method("AlexNet FedProx", "fedprox-cnn", _row(59.89, 58.88, 59.41, 55.89, 58.52)),
    Method("CLIP FedAvg", "fedavg-full", _row(64.65, 84.50, 87.87, 89.16, 81.55)),
    Method("CLIP FedProx", "fedprox-full", _row(77.81, 87.95, 89.42, 90.08, 86.32)),
    Method("FedCLIP", "fedclip", _row(95.15, 95.36, 95.46, 94.99, 95.24)),
)
FILES = ("paper.md", "paper.json")


def caveat(backbone: str) -> str | None:
    """Why numbers measured on ``backbone`` cannot be the paper's, when they cannot."""
    from fedclip.backbones import backbone_traits

    if not backbone_traits(backbone).is_clip:
        return (f"{backbone} is NOT CLIP: the measured columns show the pipeline, not the "
                f"paper's numbers (which need {PAPER_BACKBONE})")
    if backbone.endswith("@none"):
        return f"{backbone} has random weights: the measured columns mean nothing"
    return None


def not_runnable(algorithm: str, backbone: str) -> str | None:
    """Why ``algorithm`` cannot run on ``backbone`` (the CLIP baselines train the backbone's
    own encoders), or None."""
    from fedclip.backbones import backbone_traits

    if algorithm.endswith("-full") and not backbone_traits(backbone).finetunable:
        return f"needs a CLIP whose encoders can train (open_clip or hf:); {backbone} cannot"
    return None


def check_folder(out: Path) -> None:
    """Refuse an ``out`` holding anything but what this command writes."""
    if out.exists() and not out.is_dir():
        raise RunFolderError(f"--out {out} is a file; pass a folder for the paper's table")
    if not out.is_dir():
        return
    foreign = sorted(e.name for e in out.iterdir() if e.name not in FILES
                     and not e.name.startswith(".")
                     and not (e.is_dir() and re.fullmatch(r".+-seed\d+", e.name)))
    if foreign:
        raise RunFolderError(f"--out {out} holds other files ({', '.join(foreign[:3])}) and is "
                             f"not a fedclip paper folder; choose a new or empty folder")


def reproduce(cfg: RunConfig, out: str | Path, *, resume: bool = False,
              reporter: Any = None, skip: Callable[[str], str | None] | None = None
              ) -> dict[str, Any]:
    """Run the paper's five methods (``cfg.heldout`` should be ``all``) into ``out`` and
    write the side-by-side table; returns it as ``paper.json`` holds it."""
    from fedclip.algorithms import get_algorithm
    from fedclip.inprocess.experiment import run

    out = Path(out)
    skip = skip or (lambda algorithm: not_runnable(algorithm, cfg.backbone))
    plan = [(m, skip(m.algorithm)) for m in METHODS]
    for m, why in plan:  # every runnable method and its options checked before the first run
        if why is None:
            get_algorithm(cfg.replace(algorithm=m.algorithm))
    check_folder(out)
    measured: dict[str, list[RunResult]] = {}
    for m, why in plan:
        if why is None:
            measured[m.algorithm] = run(cfg.replace(algorithm=m.algorithm),
                                        out / f"{m.algorithm}-seed{cfg.seed}", resume=resume,
                                        reporter=reporter)
    table = side_by_side(measured, {m.algorithm: why for m, why in plan if why})
    note = caveat(cfg.backbone)
    not_run = {m.label: why for m, why in plan if why}
    summary = {"schema": "fedclip-paper/1", "source": SOURCE, "backbone": cfg.backbone,
               "rounds": cfg.rounds, "seed": cfg.seed, "caveat": note, "not_run": not_run,
               **table}
    text = [f"# The paper's PACS table, measured with `{cfg.backbone}`", ""]
    if note:
        text += [f"> **{note}.**", ""]
    text += [f"Published: {SOURCE}. Measured: {cfg.rounds} rounds, seed {cfg.seed}, "
             f"accuracy % on the held-out domain at the round with the best validation "
             f"accuracy.", "", markdown(table), ""]
    text += [f"- {label} not run: {why}" for label, why in not_run.items()]
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / FILES[0], "\n".join(text) + "\n")
    atomic_write_json(out / FILES[1], summary)
    return summary


def side_by_side(measured: dict[str, list[RunResult]], skipped: dict[str, str]
                 ) -> dict[str, Any]:
    """``header`` and ``rows``: per held-out domain and the average, each method's published
    and measured accuracy % ("-" where not run, "n/a" where the run has no number)."""
    header = ["held out"]
    for m in METHODS:
        header += [f"{m.label} (paper)", f"{m.label} (measured)"]
    heldouts = [h for h in HELDOUTS if any(
        r.heldout == h for results in measured.values() for r in results)] or list(HELDOUTS)
    rows = []
    for h in [*heldouts, "average"]:
        row = [h]
        for m in METHODS:
            row.append(f"{m.published[h]:.2f}")
            if m.algorithm in skipped or m.algorithm not in measured:
                row.append("-")
                continue
            values = [r.generalization for r in measured[m.algorithm]
                      if h == "average" or r.heldout == h]
            known = [v for v in values if v is not None]
            complete = h != "average" or len(values) == len(HELDOUTS)  # the paper's mean
            row.append(f"{100 * sum(known) / len(known):.2f}" if known and complete
                       and len(known) == len(values) else "n/a")
        rows.append(row)
    return {"header": header, "rows": rows}


def markdown(table: dict[str, Any]) -> str:
    header, rows = table["header"], table["rows"]
    return "\n".join(["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
                     + ["| " + " | ".join(r) + " |" for r in rows])
