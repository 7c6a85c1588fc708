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
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from fedclip.backbones import LazyBackbone
from fedclip.config import (
    EXTRACT_BATCH_SIZE,
    EXTRACT_CHUNK_IMAGES,
    MAX_ASPECT_RATIO,
    SKIPPED_SHOWN,
    env_path,
)
from fedclip.data.folder import Domain
from fedclip.errors import BackboneError, RunFolderError
from fedclip.io import atomic_save_tensors
from fedclip.tensors import checksum

log = logging.getLogger(__name__)

CACHE_VERSION = "1"
Progress = Callable[[int, int, bool], None]  # (images done, images total, from the cache)


def default_cache_dir() -> Path:
    """``$FEDCLIP_CACHE`` (``~`` expanded; blank counts as unset), else ~/.cache/fedclip."""
    return env_path("FEDCLIP_CACHE") or Path.home() / ".cache" / "fedclip"


@dataclass(frozen=True)
class ImageFeatures:
    """Features of one domain, one row per file in ``Domain.files`` order."""

    features: torch.Tensor  # [N, d] float32; rows of unreadable images are zero (token
    # methods: [N, 1 + T, d], the pooled embedding then the T patch tokens, see image_tokens)
    valid: torch.Tensor  # [N] bool
    skipped: tuple[str, ...]  # unreadable files, relative to the domain folder
    from_cache: bool = False
    images_per_second: float | None = None


@dataclass(frozen=True)
class TextFeatures:
    features: torch.Tensor  # [C, d] float32, raw (not normalised)
    logit_scale: float


# --- keys and entries ---------------------------------------------------------------------
def file_identity(path: Path) -> tuple[int, int]:
    """(size, modification time) of a file; (-1, -1) once it is gone (deleted after the scan:
    it is then skipped as unreadable, not a crash)."""
    try:
        st = path.stat()
    except OSError:
        return -1, -1
    return st.st_size, st.st_mtime_ns


def image_cache_key(fingerprint: str, domain: Domain) -> str:
    files = [[str(f.relative_to(domain.root)), *file_identity(f)] for f in domain.files]
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
def check_aspect(width: int, height: int) -> str | None:
    """Why an image of this size is skipped (resizing its shorter side to the backbone's
    input would make billions of pixels), or None."""
    if min(width, height) < 1 or max(width, height) / min(width, height) > MAX_ASPECT_RATIO:
        return (f"{width} x {height} pixels: aspect ratio over {MAX_ASPECT_RATIO:g}, "
                f"fedclip's limit")
    return None


def to_rgb(img: Image.Image) -> Image.Image:
    """An 8-bit RGB image. 16-bit grey ('I;16', or 'I' with 16-bit values) is scaled to 8
    bits (PIL's own conversion clips it to near white); a float or 32-bit image is a
    ValueError (skipped, with the reason)."""
    if img.mode.startswith("I;16") or img.mode == "I":
        values = np.asarray(img, dtype=np.float64)
        if img.mode == "I" and (values.min() < 0 or values.max() > 65535):
            raise ValueError(f"a 32-bit image (values {values.min():g}..{values.max():g})")
        return Image.fromarray(np.round(values * (255 / 65535)).astype(np.uint8)).convert("RGB")
    if img.mode == "F":
        raise ValueError("a floating-point image (no 8-bit scale is implied)")
    return img.convert("RGB")


def read_image(path: Path, preprocess: Callable) -> tuple[torch.Tensor | None, str | None]:
    """``preprocess(image)``, or (None, why the file is skipped)."""
    try:
        with Image.open(path) as img:
            why = check_aspect(*img.size)
            if why is not None:
                return None, why
            return preprocess(to_rgb(img)), None
    except FileNotFoundError:
        return None, "deleted while the run read it"
    except Image.DecompressionBombError:
        return None, "too many pixels (PIL's decompression-bomb limit)"
    except Image.UnidentifiedImageError:
        return None, "not an image PIL can read"
    except ValueError as exc:  # to_rgb's reasons
        return None, str(exc)[:100]
    except (OSError, SyntaxError) as exc:
        return None, f"unreadable ({type(exc).__name__})"


class _ImageFiles(torch.utils.data.Dataset):
    def __init__(self, files: tuple[Path, ...], preprocess: Callable) -> None:
        self.files, self.preprocess = files, preprocess

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> tuple[int, torch.Tensor | None, str | None]:
        return i, *read_image(self.files[i], self.preprocess)


def _collate(batch: list[tuple[int, torch.Tensor | None, str | None]]):  # noqa: ANN202
    ok = [(i, t) for i, t, _ in batch if t is not None]
    bad = [(i, why or "unreadable") for i, t, why in batch if t is None]
    pixels = torch.stack([t for _, t in ok]) if ok else None
    return [i for i, _ in ok], pixels, bad


def warn_skipped(domain: str, skipped: list[tuple[str, str]]) -> None:
    """One warning per folder: how many files were skipped there, the first few with their
    reason (the whole list goes into results.json, ``skipped_images``)."""
    by_folder: dict[str, list[tuple[str, str]]] = {}
    for name, why in skipped:
        by_folder.setdefault(str(Path(name).parent), []).append((name, why))
    for folder, items in by_folder.items():
        shown = "; ".join(f"{Path(n).name} ({why})" for n, why in items[:SKIPPED_SHOWN])
        more = f"; and {len(items) - SKIPPED_SHOWN} more" if len(items) > SKIPPED_SHOWN else ""
        log.warning("skipped %d image(s) in %s/%s: %s%s (all listed in results.json)",
                    len(items), domain, folder, shown, more)


def image_features(
    backbone: LazyBackbone,
    domain: Domain,
    cache_dir: str | Path | None = None,
    batch_size: int | None = None,
    workers: int = 1,
    progress: Progress | None = None,
    decode: str = "cpu",
    tokens: bool = False,
) -> ImageFeatures:
    """Features of every image of ``domain``, from the cache or extracted (and cached).

    ``decode="device"``: loader processes read bytes and the batch is decoded and
    preprocessed on the backbone's device (see :mod:`fedclip.decode`); its features are
    cached under their own key. ``tokens``: the token store instead (:func:`image_tokens`)."""
    cache_dir = Path(cache_dir) if cache_dir else default_cache_dir()
    key = image_cache_key(backbone.fingerprint + ("|device-decode" if decode == "device"
                                                  else "") + ("|tokens" if tokens else ""),
                          domain)
    path = _entry_path(cache_dir, "tokens" if tokens else "images", f"{domain.name}", key)
    hit = _load_entry(path, key)
    if hit is not None:
        tensors, meta = hit
        if progress:
            progress(len(domain), len(domain), True)
        return ImageFeatures(_joined(tensors), tensors["valid"].bool(),
                             tuple(json.loads(meta.get("skipped", "[]"))), from_cache=True)

    if tokens:
        check_tokens(backbone.spec)
    model = backbone.get()
    pre = None
    if decode == "device":
        from fedclip.decode import device_preprocess

        pre = device_preprocess(model.preprocess)
        if pre is None:
            log.warning("%s's preprocessing is not Resize/CenterCrop/Normalize: decoding on "
                        "the CPU", backbone.spec)
    feats = torch.zeros(len(domain), model.embed_dim)
    valid = torch.zeros(len(domain), dtype=torch.bool)
    grid: torch.Tensor | None = None  # [N, T, d] patch tokens (tokens=True), sized at once
    if tokens:
        grid = torch.zeros(len(domain), backbone.token_count(), model.embed_dim)
    partial = path.with_suffix(".partial")  # chunks of an extraction in progress
    bad_files, done_ids = _load_chunks(partial, key, feats, valid, grid)  # interrupted before
    todo = [i for i in range(len(domain)) if i not in done_ids]
    if done_ids:
        log.info("%s: %d of %d images already extracted (continuing)", domain.name,
                 len(done_ids), len(domain))
    done, start = len(done_ids), time.perf_counter()
    chunk: list[int] = []
    chunk_bad: list[tuple[str, str]] = []
    for idx, pixels, bad in _loader(domain, model, batch_size, workers, pre, backbone.device,
                                    todo):
        if pixels is not None:
            if grid is not None:
                pooled, patches = backbone.encode_image_tokens(pixels)
                feats[idx], grid[idx] = pooled.float().cpu(), patches.float().cpu()
            else:
                feats[idx] = backbone.encode_images(pixels).float().cpu()
            valid[idx] = True
        named = [(str(domain.files[i].relative_to(domain.root)), why) for i, why in bad]
        chunk += [*idx, *(i for i, _ in bad)]
        chunk_bad += named
        done += len(idx) + len(bad)
        if len(chunk) >= EXTRACT_CHUNK_IMAGES and done < len(domain):
            _save_chunk(partial, key, chunk, feats, valid, chunk_bad, grid)  # kept if cut
            bad_files += chunk_bad
            chunk, chunk_bad = [], []
        if progress:
            progress(done, len(domain), False)
    bad_files += chunk_bad
    rate = len(todo) / max(time.perf_counter() - start, 1e-9)
    warn_skipped(domain.name, bad_files)
    skipped = [name for name, _ in bad_files]
    entry = {"features": feats, "valid": valid.to(torch.uint8)}
    if grid is not None:
        entry["tokens"] = stored_tokens(grid)
    _save_entry(path, key, entry, skipped=json.dumps(skipped), backbone=backbone.spec,
                domain=domain.name)
    shutil.rmtree(partial, ignore_errors=True)
    return ImageFeatures(_joined(entry), valid, tuple(skipped), from_cache=False,
                         images_per_second=rate)


def stored_tokens(grid: torch.Tensor) -> torch.Tensor:
    """Patch tokens as the token store keeps them: float16 where every value survives the
    round trip exactly (a backbone run in fp16 or bf16 within fp16's range: half the disk,
    the same numbers), else float32 (float16 would change the numbers a run computes)."""
    half = grid.half()
    return half if torch.equal(half.float(), grid) else grid


def _joined(tensors: dict[str, torch.Tensor]) -> torch.Tensor:
    """An entry's inputs: its features, or (a token entry) [N, 1 + T, d], the pooled
    embedding first and the patch tokens after it, float32."""
    if "tokens" not in tensors:
        return tensors["features"]
    return torch.cat([tensors["features"].unsqueeze(1), tensors["tokens"].float()], dim=1)


def check_tokens(spec: str) -> None:
    """Refuse, in one line, a backbone that cannot give patch tokens (before it is built)."""
    from fedclip.backbones import token_refusal

    why = token_refusal(spec)
    if why is not None:
        raise BackboneError(why)


def image_tokens(backbone: LazyBackbone, domain: Domain, cache_dir: str | Path | None = None,
                 batch_size: int | None = None, workers: int = 1,
                 progress: Progress | None = None) -> ImageFeatures:
    """The token store: every image's pooled embedding and its patch tokens projected into
    the joint space, ``features`` [N, 1 + T, d] (row 0 the pooled embedding, the same as
    :func:`image_features` gives; rows 1.. the T patch tokens). Opt-in: only an algorithm
    with ``inputs = "tokens"`` asks for it; cached under ``tokens/`` beside ``images/``,
    resumable like it, the tokens float16 on disk where that changes no value
    (:func:`stored_tokens`). Size: T x d values per image (ViT-B/32: 49 x 512, 100 KB in
    float32, 50 KB in float16)."""
    return image_features(backbone, domain, cache_dir, batch_size, workers, progress,
                          tokens=True)


def _save_chunk(folder: Path, key: str, ids: list[int], feats: torch.Tensor,
                valid: torch.Tensor, bad: list[tuple[str, str]],
                grid: torch.Tensor | None = None) -> None:
    """One chunk of an extraction in progress (rows ``ids``), written atomically."""
    index = torch.tensor(sorted(ids), dtype=torch.long)
    tensors = {"ids": index, "features": feats[index], "valid": valid[index].to(torch.uint8)}
    if grid is not None:
        tensors["tokens"] = stored_tokens(grid[index])
    _save_entry(folder / f"chunk-{int(index[0]):09d}.safetensors", key, tensors,
                skipped=json.dumps(bad))


def _load_chunks(folder: Path, key: str, feats: torch.Tensor, valid: torch.Tensor,
                 grid: torch.Tensor | None = None) -> tuple[list[tuple[str, str]], set[int]]:
    """Fill ``feats``/``valid`` from the chunks an interrupted extraction of the same inputs
    left (each checked like a cache entry; a damaged one is extracted again)."""
    bad: list[tuple[str, str]] = []
    done: set[int] = set()
    if not folder.is_dir():
        return bad, done
    for path in sorted(folder.glob("chunk-*.safetensors")):
        entry = _load_entry(path, key)
        if entry is None:
            continue
        tensors, meta = entry
        ids = tensors["ids"]
        if ids.numel() == 0 or int(ids.min()) < 0 or int(ids.max()) >= len(feats) \
                or tensors["features"].shape != (len(ids), feats.shape[1]):
            continue
        if grid is not None:
            if tensors.get("tokens") is None or tensors["tokens"].shape != (len(ids),
                                                                            *grid.shape[1:]):
                continue
            grid[ids] = tensors["tokens"].float()
        feats[ids], valid[ids] = tensors["features"], tensors["valid"].bool()
        bad += [(str(n), str(w)) for n, w in json.loads(meta.get("skipped", "[]"))]
        done.update(int(i) for i in ids)
    return bad, done


def _loader(domain: Domain, model, batch_size: int | None, workers: int,  # noqa: ANN001
            pre, device: str, todo: list[int]):  # noqa: ANN001, ANN202
    """Batches (ids, pixels, [(id, why skipped)]) of the images ``todo`` (ids index
    ``domain.files``)."""
    batch = batch_size or model.default_batch_size
    cuda = str(device).startswith("cuda")
    extra: dict[str, Any] = {"pin_memory": cuda, "prefetch_factor": 4} if workers > 0 else {}
    files = tuple(domain.files[i] for i in todo)
    if pre is None:
        plain = torch.utils.data.DataLoader(
            _ImageFiles(files, model.preprocess), batch_size=batch,
            num_workers=workers, collate_fn=_collate, **extra)
        return (([todo[j] for j in ok], pixels, [(todo[j], why) for j, why in bad])
                for ok, pixels, bad in plain)
    from fedclip.decode import FileBytes, collate_bytes, decode_batch

    prefetch: dict[str, Any] = {"prefetch_factor": 4} if workers > 0 else {}
    raw = torch.utils.data.DataLoader(FileBytes(files), batch_size=batch,
                                      num_workers=workers, collate_fn=collate_bytes, **prefetch)

    def batches():  # noqa: ANN202
        for ids, data in raw:
            pixels, ok = decode_batch(data, pre, device, MAX_ASPECT_RATIO)
            yield ([todo[i] for i, good in zip(ids, ok, strict=True) if good], pixels,
                   [(todo[i], "unreadable, or its aspect ratio is over the limit")
                    for i, good in zip(ids, ok, strict=True) if not good])
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
    bad_files: list[tuple[str, str]] = []
    done = 0
    for idx, batch, bad in loader:
        if batch is not None:
            if pixels is None:
                pixels = torch.zeros(len(domain), *batch.shape[1:])
            pixels[idx] = batch
            valid[idx] = True
        bad_files += [(str(domain.files[i].relative_to(domain.root)), why) for i, why in bad]
        done += len(idx) + len(bad)
        if progress:
            progress(done, len(domain), False)
    if pixels is None:
        pixels = torch.zeros(len(domain), 3, 1, 1)
    warn_skipped(domain.name, bad_files)
    return ImageFeatures(pixels, valid, tuple(name for name, _ in bad_files))


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


def check_cache_writable(folder: Path) -> None:
    """Refuse an unwritable feature cache before anything is extracted."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder):
            pass
    except OSError as exc:
        raise RunFolderError(f"the feature cache {folder} is not writable ({exc.strerror}); "
                             f"pass --cache-dir with a folder you can write to, or set "
                             f"FEDCLIP_CACHE") from None
