"""Extract once, train many times: the on-disk feature cache.

The backbone is frozen and there is no augmentation, so every image is encoded exactly once
and every round trains on tensors. A cache entry is keyed by the backbone's fingerprint
(weights and preprocessing) and by the identity of the image files (relative path, size,
modification time). Each entry stores a checksum of its tensors; an entry that fails to load
or whose checksum does not match is reported and rebuilt, never used.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from fedclip.backbones import LazyBackbone
from fedclip.config import EXTRACT_BATCH_SIZE
from fedclip.data.folder import Domain
from fedclip.io import atomic_save_tensors
from fedclip.tensors import checksum

log = logging.getLogger(__name__)

CACHE_VERSION = "1"
Progress = Callable[[int, int], None]  # (images done, images total)


def default_cache_dir() -> Path:
    return Path(os.environ.get("FEDCLIP_CACHE", Path.home() / ".cache" / "fedclip"))


@dataclass(frozen=True)
class ImageFeatures:
    """Features of one domain, one row per file in ``Domain.files`` order."""

    features: torch.Tensor  # [N, d] float32; rows of unreadable images are zero
    valid: torch.Tensor  # [N] bool
    skipped: tuple[str, ...]  # unreadable files, relative to the domain folder
    from_cache: bool = False
    images_per_second: float | None = None


@dataclass(frozen=True)
class TextFeatures:
    features: torch.Tensor  # [C, d] float32, raw (not normalised)
    logit_scale: float


# --- keys and entries ---------------------------------------------------------------------
def image_cache_key(fingerprint: str, domain: Domain) -> str:
    files = []
    for f in domain.files:
        st = f.stat()
        files.append([str(f.relative_to(domain.root)), st.st_size, st.st_mtime_ns])
    blob = json.dumps({"v": CACHE_VERSION, "backbone": fingerprint, "files": files})
    return hashlib.sha256(blob.encode()).hexdigest()


def _entry_path(cache_dir: Path, kind: str, label: str, key: str) -> Path:
    safe = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in label)
    return Path(cache_dir) / kind / f"{safe}-{key[:20]}.safetensors"


def _load_entry(path: Path, key: str) -> tuple[dict[str, torch.Tensor], dict[str, str]] | None:
    """The entry's tensors and metadata, or None when absent, stale or corrupted."""
    if not path.exists():
        return None
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {name: f.get_tensor(name) for name in f.keys()}  # noqa: SIM118
    except Exception as exc:  # safetensors raises several types for a damaged file
        log.warning("feature cache entry %s is unreadable (%s); rebuilding it", path, exc)
        return None
    if meta.get("key") != key:
        log.warning("feature cache entry %s belongs to other inputs; rebuilding it", path)
        return None
    if meta.get("checksum") != checksum(tensors):
        log.warning("feature cache entry %s is corrupted (checksum mismatch); rebuilding it", path)
        return None
    return tensors, meta


def _save_entry(path: Path, key: str, tensors: dict[str, torch.Tensor], **meta: str) -> None:
    atomic_save_tensors(path, tensors, {"key": key, "checksum": checksum(tensors), **meta})


# --- images -------------------------------------------------------------------------------
class _ImageFiles(torch.utils.data.Dataset):
    def __init__(self, files: tuple[Path, ...], preprocess: Callable) -> None:
        self.files, self.preprocess = files, preprocess

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> tuple[int, torch.Tensor | None]:
        try:
            with Image.open(self.files[i]) as img:
                return i, self.preprocess(img.convert("RGB"))
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError):
            return i, None


def _collate(batch: list[tuple[int, torch.Tensor | None]]):  # noqa: ANN202
    ok = [(i, t) for i, t in batch if t is not None]
    bad = [i for i, t in batch if t is None]
    pixels = torch.stack([t for _, t in ok]) if ok else None
    return [i for i, _ in ok], pixels, bad


def image_features(
    backbone: LazyBackbone,
    domain: Domain,
    cache_dir: str | Path | None = None,
    batch_size: int | None = None,
    workers: int = 1,
    progress: Progress | None = None,
    decode: str = "cpu",
) -> ImageFeatures:
    """Features of every image of ``domain``, from the cache or extracted (and cached).

    ``decode="device"``: loader processes read bytes and the batch is decoded and
    preprocessed on the backbone's device (see :mod:`fedclip.decode`); its features are
    cached under their own key."""
    cache_dir = Path(cache_dir) if cache_dir else default_cache_dir()
    key = image_cache_key(backbone.fingerprint + ("|device-decode" if decode == "device"
                                                  else ""), domain)
    path = _entry_path(cache_dir, "images", f"{domain.name}", key)
    hit = _load_entry(path, key)
    if hit is not None:
        tensors, meta = hit
        if progress:
            progress(len(domain), len(domain))
        return ImageFeatures(tensors["features"], tensors["valid"].bool(),
                             tuple(json.loads(meta.get("skipped", "[]"))), from_cache=True)

    model = backbone.get()
    pre = None
    if decode == "device":
        from fedclip.decode import device_preprocess

        pre = device_preprocess(model.preprocess)
        if pre is None:
            log.warning("%s's preprocessing is not Resize/CenterCrop/Normalize: decoding on "
                        "the CPU", backbone.spec)
    loader = _loader(domain, model, batch_size, workers, pre, backbone.device)
    feats = torch.zeros(len(domain), model.embed_dim)
    valid = torch.zeros(len(domain), dtype=torch.bool)
    skipped: list[str] = []
    done, start = 0, time.perf_counter()
    for idx, pixels, bad in loader:
        if pixels is not None:
            feats[idx] = backbone.encode_images(pixels).float().cpu()
            valid[idx] = True
        skipped += [str(domain.files[i].relative_to(domain.root)) for i in bad]
        done += len(idx) + len(bad)
        if progress:
            progress(done, len(domain))
    rate = len(domain) / max(time.perf_counter() - start, 1e-9)
    for s in skipped:
        log.warning("skipped unreadable image %s/%s", domain.name, s)
    _save_entry(path, key, {"features": feats, "valid": valid.to(torch.uint8)},
                skipped=json.dumps(skipped), backbone=backbone.spec, domain=domain.name)
    return ImageFeatures(feats, valid, tuple(skipped), from_cache=False, images_per_second=rate)


def _loader(domain: Domain, model, batch_size: int | None, workers: int,  # noqa: ANN001
            pre, device: str):  # noqa: ANN001, ANN202 - an iterable of (ids, pixels, bad ids)
    batch = batch_size or model.default_batch_size
    cuda = str(device).startswith("cuda")
    extra: dict[str, Any] = {"pin_memory": cuda, "prefetch_factor": 4} if workers > 0 else {}
    if pre is None:
        return torch.utils.data.DataLoader(
            _ImageFiles(domain.files, model.preprocess), batch_size=batch,
            num_workers=workers, collate_fn=_collate, **extra)
    from fedclip.decode import FileBytes, collate_bytes, decode_batch

    prefetch: dict[str, Any] = {"prefetch_factor": 4} if workers > 0 else {}
    raw = torch.utils.data.DataLoader(FileBytes(domain.files), batch_size=batch,
                                      num_workers=workers, collate_fn=collate_bytes, **prefetch)

    def batches():  # noqa: ANN202
        for ids, data in raw:
            pixels, ok = decode_batch(data, pre, device)
            yield ([i for i, good in zip(ids, ok, strict=True) if good], pixels,
                   [i for i, good in zip(ids, ok, strict=True) if not good])
    return batches()


def image_pixels(backbone: LazyBackbone, domain: Domain, batch_size: int | None = None,
                 workers: int = 1, progress: Progress | None = None,
                 preprocess: Callable | None = None) -> ImageFeatures:
    """Preprocessed pixels of every image, in memory (for algorithms that train a network on
    pixels and so cannot use cached features). ``features`` holds the pixels: [N, 3, H, W].
    ``preprocess``: the algorithm's own (default: the backbone's)."""
    if preprocess is None:
        model = backbone.get()
        preprocess, default_batch = model.preprocess, model.default_batch_size
    else:
        default_batch = EXTRACT_BATCH_SIZE
    loader = torch.utils.data.DataLoader(
        _ImageFiles(domain.files, preprocess), batch_size=batch_size or default_batch,
        num_workers=workers, collate_fn=_collate)
    pixels: torch.Tensor | None = None
    valid = torch.zeros(len(domain), dtype=torch.bool)
    skipped: list[str] = []
    done = 0
    for idx, batch, bad in loader:
        if batch is not None:
            if pixels is None:
                pixels = torch.zeros(len(domain), *batch.shape[1:])
            pixels[idx] = batch
            valid[idx] = True
        skipped += [str(domain.files[i].relative_to(domain.root)) for i in bad]
        done += len(idx) + len(bad)
        if progress:
            progress(done, len(domain))
    if pixels is None:
        pixels = torch.zeros(len(domain), 3, 1, 1)
    return ImageFeatures(pixels, valid, tuple(skipped))


# --- class prompts ------------------------------------------------------------------------
def text_features(backbone: LazyBackbone, prompts: list[str],
                  cache_dir: str | Path | None = None) -> TextFeatures:
    """Raw text features of the class prompts, with the backbone's logit scale (cached)."""
    cache_dir = Path(cache_dir) if cache_dir else default_cache_dir()
    key = hashlib.sha256(json.dumps(
        {"v": CACHE_VERSION, "backbone": backbone.fingerprint, "prompts": prompts}).encode()
    ).hexdigest()
    path = _entry_path(cache_dir, "texts", "prompts", key)
    hit = _load_entry(path, key)
    if hit is not None:
        tensors, meta = hit
        return TextFeatures(tensors["features"], float(meta["logit_scale"]))
    model = backbone.get()
    feats = model.encode_texts(prompts)
    _save_entry(path, key, {"features": feats}, logit_scale=repr(model.logit_scale),
                backbone=backbone.spec)
    return TextFeatures(feats, float(model.logit_scale))
