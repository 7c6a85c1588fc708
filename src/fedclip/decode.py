"""Decoding and preprocessing on the device, to keep a GPU fed during extraction.

Loader processes only read each file's bytes; the main process decodes a whole batch of
JPEGs at once with ``torchvision.io.decode_jpeg(..., device=...)`` (nvJPEG on a GPU), then
resizes, crops and normalises there, with the parameters read from the backbone's own
torchvision preprocessing (Resize -> CenterCrop -> ToTensor -> Normalize; open_clip's and the
stand-in's are). Files that are not JPEG are decoded on the CPU (``decode_image``) and join
the batch. The result is close to the PIL path but not bit-identical (another resize
implementation), so the cache keys of the two paths differ. Where the preprocessing is not of
that form, extraction stays on the CPU path.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch


@dataclass(frozen=True)
class DevicePreprocess:
    size: int
    crop: tuple[int, int]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    interpolation: str  # torchvision InterpolationMode value, e.g. "bicubic"

    @property
    def key(self) -> str:
        return f"devdecode-{self.size}-{self.crop}-{self.interpolation}"


def device_preprocess(preprocess: Callable) -> DevicePreprocess | None:
    """The parameters of a Resize -> CenterCrop -> (convert) -> ToTensor -> Normalize
    pipeline, or None when ``preprocess`` is anything else."""
    steps = getattr(preprocess, "transforms", None)
    if not steps:
        return None
    names = [type(t).__name__ for t in steps]
    if names[:2] != ["Resize", "CenterCrop"] or names[-1] != "Normalize":
        return None
    if any(n not in ("MaybeConvertMode", "MaybeToTensor", "ToTensor", "function")
           for n in names[2:-1]):
        return None
    resize, crop, norm = steps[0], steps[1], steps[-1]
    size = resize.size if isinstance(resize.size, int) else (
        resize.size[0] if len(resize.size) == 1 else None)
    if size is None or getattr(resize, "max_size", None):
        return None
    crop_size = tuple(crop.size) if not isinstance(crop.size, int) else (crop.size, crop.size)
    return DevicePreprocess(int(size), (int(crop_size[0]), int(crop_size[1])),
                            tuple(float(m) for m in norm.mean),
                            tuple(float(s) for s in norm.std), str(resize.interpolation.value))


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """torchvision 0.29 deprecates its image IO for TorchCodec; it still works (and is the
    nvJPEG path here): do not warn on every batch."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The image decoding",
                                category=DeprecationWarning)
        yield


class FileBytes(torch.utils.data.Dataset):
    """Each file's raw bytes (what loader processes do on this path)."""

    def __init__(self, files: tuple[Path, ...]) -> None:
        self.files = files

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> tuple[int, bytes | None]:
        # plain bytes: pickled through the loader's pipe (tensors would travel as shared
        # file descriptors, thousands of them)
        try:
            return i, self.files[i].read_bytes()
        except OSError:
            return i, None


def collate_bytes(batch: list[tuple[int, bytes | None]]):  # noqa: ANN201
    return [i for i, _ in batch], [b for _, b in batch]  # bytes: tensors are made in decode


def decode_batch(raw: list[bytes | None], pre: DevicePreprocess, device: str,
                 max_aspect: float = float("inf")) -> tuple[torch.Tensor | None, list[bool]]:
    """Decode, resize, crop and normalise a batch of files' bytes on ``device``; (pixels of
    the readable images, which were readable). An image whose sides differ by more than
    ``max_aspect`` counts as unreadable (its resize would be enormous)."""
    data = [None if b is None else torch.frombuffer(bytearray(b), dtype=torch.uint8)
            for b in raw]
    with _quiet():
        return _decode(data, pre, device, max_aspect)


def _decode(data: list[torch.Tensor | None], pre: DevicePreprocess, device: str,
            max_aspect: float) -> tuple[torch.Tensor | None, list[bool]]:
    from torchvision.io import ImageReadMode, decode_image, decode_jpeg
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms.v2 import functional as TF

    images: list[torch.Tensor | None] = [None] * len(data)
    jpegs = [i for i, d in enumerate(data) if d is not None and len(d) > 2
             and int(d[0]) == 0xFF and int(d[1]) == 0xD8]
    if jpegs:
        try:
            decoded = decode_jpeg([data[i] for i in jpegs], mode=ImageReadMode.RGB, device=device)
        except RuntimeError:  # one bad file fails the batch: decode one by one
            decoded = []
            for i in jpegs:
                try:
                    decoded.append(decode_jpeg(data[i], mode=ImageReadMode.RGB, device=device))
                except RuntimeError:
                    decoded.append(None)
        for i, img in zip(jpegs, decoded, strict=True):
            images[i] = img
    done = set(jpegs)
    for i, d in enumerate(data):
        if d is not None and i not in done:
            try:
                images[i] = decode_image(d, mode=ImageReadMode.RGB).to(device)
            except RuntimeError:
                images[i] = None
    mode = InterpolationMode(pre.interpolation)
    mean = torch.tensor(pre.mean, device=device).view(3, 1, 1)
    std = torch.tensor(pre.std, device=device).view(3, 1, 1)
    for i, img in enumerate(images):
        if img is not None and (min(img.shape[-2:]) < 1
                                or max(img.shape[-2:]) / min(img.shape[-2:]) > max_aspect):
            images[i] = None
        elif img is not None and img.dtype == torch.uint16:  # 16-bit PNG: scale to 8 bits
            images[i] = (img.to(torch.float32) * (255 / 65535)).round().to(torch.uint8)
    out = []
    for img in images:
        if img is None:
            continue
        img = TF.resize(img, [pre.size], interpolation=mode, antialias=True)
        img = TF.center_crop(img, list(pre.crop))
        out.append((img.float() / 255 - mean) / std)
    return (torch.stack(out) if out else None), [img is not None for img in images]
