"""How a server combines client parameters: weighted or uniform mean, or a robust statistic.

The same functions serve the in-process runner and the Flower strategy, so both runtimes
aggregate identically.

* ``weighted``: the mean weighted by each client's train size, **as declared at discovery**
  (the Flower server never takes a count from a round's reply);
* ``uniform``: the plain mean (the FedCLIP reference code);
* ``median``: the coordinate-wise median (Yin et al., 2018; Flower's ``FedMedian``). One
  client, however far off, moves no coordinate beyond the range of the honest clients' values
  when honest clients are a majority;
* ``trimmed-mean``: per coordinate, drop the ``trim`` fraction of the values at each end and
  average the rest (Flower's ``FedTrimmedAvg``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import cast

import numpy as np
import torch

from fedclip.tensors import Params

MODES = ("weighted", "uniform", "median", "trimmed-mean")


def combine(params: Sequence[Params], weights: Sequence[float], mode: str = "weighted",
            trim: float = 0.2) -> Params:
    if not params:
        raise ValueError("cannot aggregate: no updates")
    if mode not in MODES:
        raise ValueError(f"unknown aggregation {mode!r}; use one of {', '.join(MODES)}")
    keys = params[0].keys()
    if mode in ("weighted", "uniform"):
        w = [float(x) if mode == "weighted" else 1.0 for x in weights]
        if not all(math.isfinite(x) and x >= 0 for x in w) or sum(w) <= 0:
            raise ValueError(f"cannot aggregate with weights {w}: they must be finite, "
                             f"non-negative and not all zero")
        total = sum(w)
        return {k: cast(torch.Tensor, sum(p[k] * (x / total)
                                          for p, x in zip(params, w, strict=True)))
                for k in keys}
    out = {}
    n = len(params)
    for k in keys:
        # numpy's sort along the client axis: 4-8x faster than torch's on these shapes (CPU)
        stacked = torch.stack([p[k].detach().cpu().float() for p in params]).numpy()
        ordered = np.sort(stacked, axis=0)
        if mode == "median":  # the mean of the two middle values for an even count (numpy's)
            flat = (ordered[(n - 1) // 2] + ordered[n // 2]) / 2
        else:
            cut = int(trim * n)
            flat = ordered[cut:n - cut].mean(axis=0)
        out[k] = torch.from_numpy(np.ascontiguousarray(flat)).to(params[0][k].device)
    return out
