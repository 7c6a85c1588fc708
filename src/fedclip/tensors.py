"""Named tensors, the one currency between the algorithms, the runtimes and the files.

``Params`` are a model's parameters by name; ``State`` is whatever an algorithm keeps between
rounds (server or client side). Both are plain dicts so that every runtime can encode them.
"""

from __future__ import annotations

import hashlib
import json
import math

import torch

Params = dict[str, torch.Tensor]
State = dict[str, torch.Tensor]
BYTES_PER_VALUE = 4  # fp32 on the wire


def tensor_bytes(tensors: dict[str, torch.Tensor], bytes_per_value: int = BYTES_PER_VALUE
                 ) -> int:
    """The bytes ``tensors`` take on the wire at ``bytes_per_value`` per element (16-bit
    floats, which an algorithm sends as such: 2)."""
    return sum(t.numel() * (2 if t.dtype in (torch.float16, torch.bfloat16)
                            else bytes_per_value) for t in tensors.values())


def all_finite(tensors: dict[str, torch.Tensor]) -> bool:
    """Whether every value of every tensor is finite (integer tensors always are).

    One sum per tensor, added up as Python floats, and one check: a sum is finite only if
    every value is (an inf or a NaN makes it inf or NaN), so a finite sum answers at once;
    only a non-finite sum, which large finite values can also reach by overflowing, is
    checked value by value. The same answer as ``torch.isfinite(v).all()`` on each tensor, in
    one pass over the values instead of three."""
    values = [v for v in tensors.values() if v.is_floating_point() or v.is_complex()]
    if not values:
        return True
    if math.isfinite(sum(float(v.sum().abs() if v.is_complex() else v.sum()) for v in values)):
        return True
    return all(bool(torch.isfinite(v).all()) for v in values)


def distance(params: dict[str, torch.Tensor], current: dict[str, torch.Tensor]) -> float:
    """``||params - current||`` over the keys of ``params``, as one vector: how far an update
    moved, for the server's rules that compare it with a bound (the distance rule, echoes and
    replays). Each tensor's difference and norm in its own precision (at least float32), the
    squares summed in Python floats: within about 1e-6 of the float64 norm, at half its cost
    (one pass and no widened copy per tensor). Identical updates get identical distances
    (exact in floats), an update equal to ``current`` gets 0. DP's clipping, whose factor sets
    the bits of what is released, keeps the float64 :func:`fedclip.privacy.update_norm`."""
    total = 0.0
    for k, v in params.items():
        c = current[k]
        if v.shape != c.shape:  # the drivers check a reply's shapes; never broadcast here
            raise ValueError(f"{k}: an update of shape {tuple(v.shape)} against "
                             f"{tuple(c.shape)}")
        if v.dtype in (torch.float16, torch.bfloat16) or not (
                v.is_floating_point() or v.is_complex()):  # 16-bit, integer, boolean: wider
            v, c = v.float(), c.float()
        total += float(torch.linalg.vector_norm(v - c)) ** 2
    return math.sqrt(total)


def checksum(tensors: dict[str, torch.Tensor], meta: dict[str, str] | None = None) -> str:
    """SHA-256 over metadata (sorted JSON; none for cached features) and tensors (sorted by
    name, raw bytes): the one integrity check of checkpoints, adapter files and the cache."""
    h = hashlib.sha256()
    if meta is not None:
        h.update(json.dumps(meta, sort_keys=True).encode())
    for name in sorted(tensors):
        h.update(name.encode())
        h.update(tensors[name].detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()
