"""Atomic writes: a reader sees the old file or the new one, never half of one."""

from __future__ import annotations

import errno
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from fedclip.errors import StorageError

# errno values (and the texts libraries that wrap them print) of a full or read-only disk
_FULL = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
_FULL_TEXTS = ("No space left on device", "os error 28", "Disk quota exceeded")
_READ_ONLY_TEXTS = ("Read-only file system", "os error 30")


def storage_problem(exc: BaseException) -> str | None:
    """'full' or 'read-only' when ``exc`` says the disk is, else None (safetensors raises
    its own error type with the OS message inside)."""
    code = getattr(exc, "errno", None)
    text = str(exc)
    if code in _FULL or any(t in text for t in _FULL_TEXTS):
        return "full"
    if code == errno.EROFS or any(t in text for t in _READ_ONLY_TEXTS):
        return "read-only"
    return None


def storage_error(path: Path, exc: BaseException, size: int | None) -> StorageError:
    """The one-line error for ``exc`` (a full or read-only disk) while writing ``path``."""
    problem = storage_problem(exc)
    if problem == "read-only":
        return StorageError(f"cannot write {path}: the file system is read-only; choose a "
                            f"writable folder")
    try:
        free = f", {shutil.disk_usage(path.parent).free / 1e6:.1f} MB free"
    except OSError:
        free = ""
    need = f" (about {size / 1e6:.1f} MB needed{free})" if size else ""
    return StorageError(f"cannot write {path}: no space left on the disk{need}; free some "
                        f"space or choose another folder (nothing partial was left)")


def atomic_write(path: str | Path, write: Callable[[Path], object], size: int | None = None
                 ) -> Path:
    """Call ``write(tmp)`` on a temporary file beside ``path``, then rename it into place.
    A full or read-only disk is a :class:`StorageError` naming ``path`` (and ``size``, the
    bytes it needed, when known); the temporary file is removed."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as exc:
        if storage_problem(exc):
            raise storage_error(path, exc, size) from None
        raise
    os.close(fd)
    try:
        write(Path(tmp))
        with open(tmp, "rb") as f:  # on disk before it replaces the old file
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; results and caches are meant to be read
        os.replace(tmp, path)
    except BaseException as exc:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(exc, Exception) and storage_problem(exc):
            raise storage_error(path, exc, size) from None
        raise
    return path


def atomic_write_text(path: str | Path, text: str) -> Path:
    data = text.encode("utf-8")
    return atomic_write(path, lambda tmp: tmp.write_bytes(data), len(data))


def atomic_write_json(path: str | Path, obj: Any) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def atomic_save_tensors(path: str | Path, tensors: dict, metadata: dict[str, str]) -> Path:
    from safetensors.torch import save_file

    tensors = {k: v.detach().cpu().clone().contiguous() for k, v in tensors.items()}  # unshared
    size = sum(v.numel() * v.element_size() for v in tensors.values())
    return atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=metadata), size)


def remove_stale_temporaries(folder: str | Path) -> int:
    """Delete ``.*.tmp`` files that a killed writer left behind in ``folder``."""
    removed = 0
    for tmp in Path(folder).glob(".*.tmp"):
        tmp.unlink(missing_ok=True)
        removed += 1
    return removed
