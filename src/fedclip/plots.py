"""Plotting helpers: matplotlib is the optional extra ``fedclip[plots]``; without it a run
writes every table and result and skips its plots, with one warning."""

from __future__ import annotations

import itertools
import logging
from typing import Any

log = logging.getLogger(__name__)
_warned = False

MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*", "<", ">")
LINESTYLES = ("-", "--", "-.", ":")


def pyplot() -> Any | None:
    """``matplotlib.pyplot`` on the Agg backend, or None (warned once) when it is missing."""
    global _warned
    try:
        import matplotlib
    except ImportError:
        if not _warned:
            log.warning("plots skipped: matplotlib is not installed (pip install "
                        "'fedclip[plots]'); tables and results are written as usual")
            _warned = True
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def styles(names: list[str]) -> dict[str, dict[str, Any]]:
    """One colour, marker and line style per name, the same in every panel of a figure.
    Markers and line styles cycle at different lengths, so lines that coincide (FedCLIP and
    FedProx with a small mu) still tell apart."""
    plt = pyplot()
    colours = (plt.get_cmap("tab10" if len(names) <= 10 else "tab20").colors if plt else [None])
    cycle = zip(itertools.cycle(colours), itertools.cycle(MARKERS),
                itertools.cycle(LINESTYLES), strict=False)
    return {name: {"color": c, "marker": m, "linestyle": ls}
            for name, (c, m, ls) in zip(names, cycle, strict=False)}
