"""The codec: parameters <-> Flower records, and checks on what comes back (arrays before
they are decoded, metric values)."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from flwr.app import Array, ArrayRecord

from fedclip.tensors import Params

TRANSFER_DTYPES = {"fp32": torch.float32, "fp16": torch.float16}

HEADER_BYTES = 4096  # the most an array's wire header may add to its data (numpy's .npy: 128)


def encode(params: Params, transfer: str = "fp32") -> ArrayRecord:
    """Parameters as an ArrayRecord in the transfer dtype, on the CPU."""
    dtype = TRANSFER_DTYPES[transfer]
    return ArrayRecord({k: v.detach().to("cpu", dtype).contiguous() for k, v in params.items()})


def decode(record: ArrayRecord, device: str | torch.device = "cpu") -> Params:
    """An ArrayRecord back as fp32 tensors on ``device``."""
    return {k: v.to(device, torch.float32) for k, v in record.to_torch_state_dict().items()}


def _declared_nbytes(array: Array) -> int | None:
    """The bytes an array's declared shape and dtype need, or None when they are not a
    plain numeric array's (read from the metadata only: nothing is decoded)."""
    try:
        itemsize = np.dtype(str(array.dtype)).itemsize
        shape = tuple(int(n) for n in array.shape)
    except (TypeError, ValueError):
        return None
    if any(n < 0 for n in shape) or len(shape) > 32:
        return None
    return itemsize * math.prod(shape)


def _held_nbytes(array: Array) -> int | None:
    """The declared size of a plain numpy array whose bytes hold exactly that (plus the wire
    header), or None; from the metadata alone."""
    need = _declared_nbytes(array)
    if str(array.stype) != "numpy.ndarray" or need is None \
            or not 0 <= len(array.data) - need <= HEADER_BYTES:
        return None
    return need


def payload_bytes(record: ArrayRecord) -> int:
    """The bytes of a record's arrays: the declared size where the data holds it (the wire
    format adds a small header), else the bytes that came. Nothing is decoded."""
    return sum(n if (n := _held_nbytes(a)) is not None else len(a.data) for a in record.values())


def well_formed(record: ArrayRecord, max_bytes: int) -> str | None:
    """Why ``record`` cannot be decoded safely (an array whose bytes do not hold its declared
    shape, or more than ``max_bytes`` in all), or None; nothing is decoded."""
    total = 0
    for key, array in record.items():
        need = _held_nbytes(array)
        if need is None:
            return f"array {key} does not hold the shape and dtype it declares"
        total += need
    return f"arrays of {total} bytes, over the {max_bytes} allowed" if total > max_bytes else None


def check_arrays(record: ArrayRecord, expected: dict[str, torch.Size], transfer: str,
                 what: str = "update") -> tuple[Params | None, str | None]:
    """Decode ``record`` if it holds exactly ``expected`` (names, shapes, the run's transfer
    dtype, finite values); else return why not.

    Names, dtype, shape, storage type and byte length are checked on the arrays' metadata
    **before** anything is decoded, so a reply declaring a shape its bytes do not hold (or
    a billion elements) costs nothing: the largest allocation is what ``expected`` needs."""
    if set(record) != set(expected):
        return None, f"{what} keys {sorted(set(record) ^ set(expected))} differ from the expected"
    wire = str(TRANSFER_DTYPES[transfer]).removeprefix("torch.")
    for key, array in record.items():
        if str(array.stype) != "numpy.ndarray" or str(array.dtype) != wire:
            return None, (f"{what} {key} is {array.stype} of {array.dtype}, this run "
                          f"transfers {transfer} arrays")
        if list(array.shape) != list(expected[key]):
            return None, f"{what} {key} has shape {array.shape}, expected {tuple(expected[key])}"
        if _held_nbytes(array) is None:
            return None, (f"{what} {key} holds {len(array.data)} bytes, not the "
                          f"{_declared_nbytes(array)} its shape and dtype need")
    params: Params = {}
    for key, array in record.items():
        try:
            value = torch.from_numpy(np.array(array.numpy(), dtype=np.dtype(wire), copy=True))
        except Exception as exc:  # noqa: BLE001 - a malformed payload of the right length
            return None, f"{what} {key} is not decodable ({type(exc).__name__})"
        if tuple(value.shape) != tuple(expected[key]):
            return None, f"{what} {key} decodes to shape {tuple(value.shape)}"
        if not torch.isfinite(value).all():
            return None, f"{what} {key} contains NaN or inf"
        params[key] = value.float()
    return params, None


def finite_number(value: Any, low: float = -math.inf, high: float = math.inf) -> float | None:
    """``value`` as a float when it is a real, finite number in [low, high]; else None."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    value = float(value)
    return value if math.isfinite(value) and low <= value <= high else None


def fp16_half_step(magnitude: float) -> float:
    """Half of float16's spacing at ``magnitude`` (10 mantissa bits): the most rounding to
    half precision moves such a value (subnormals: half of 2^-24)."""
    if magnitude < 2.0 ** -14:
        return 2.0 ** -25
    return 2.0 ** (math.floor(math.log2(magnitude)) - 11)


def fp16_rounds_away(params: Params, move: float) -> str | None:
    """Why ``transfer=fp16`` would change a run's result, or None: a tensor whose values'
    half-precision rounding (at the tensor's median magnitude) is over what a round moves
    each of them (``move``: Adam moves a coordinate about lr per step) gets its update
    rounded away every round, so it never trains. Measured on a whole CLIP (pixel methods):
    at lr 1e-5 and a few steps, its LayerNorm gains (1.0) stay at 1.0."""
    over = []
    for key, value in params.items():
        if value.is_floating_point() and value.numel():
            magnitude = float(value.detach().abs().float().median())
            if fp16_half_step(magnitude) > move:
                over.append((magnitude, key))
    if not over:
        return None
    magnitude, key = max(over)
    return (f"transfer=fp16 would round away every round's update of {len(over)} parameter "
            f"tensor(s) (e.g. {key}: values of about {magnitude:.3g} round by up to "
            f"{fp16_half_step(magnitude):.2g}, a round moves them about {move:.2g}); use "
            f"transfer=fp32")
