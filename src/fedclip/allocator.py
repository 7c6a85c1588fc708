"""Freed memory kept for the next tensor, in a process fedclip owns.

torch allocates CPU tensors with the C library's ``malloc``. glibc gives a large block (above
``M_MMAP_THRESHOLD``: 128 KiB at first, raised by each freed block up to 32 MiB) its own
fresh pages from the kernel and returns them on ``free``; it also hands the top of its heap
back to the kernel once more than ``M_TRIM_THRESHOLD`` of it is free. A page handed back is
a page fault the next time a tensor lands on it. A round of many small clients allocates and
frees the same few megabytes over and over (each client's gradients, Adam's temporaries, the
update it returns), so a client paid more in page faults than in arithmetic (measured in
``benchmarks/README.md``: 142,000 faults in 12 rounds of 39 clients, 6,000 with this).

:func:`keep_freed_memory` raises both thresholds, so that freed blocks stay in the process
for the next tensor. A process fedclip owns calls it (``fedclip`` commands, Flower's
ClientApp and ServerApp, the in-process benchmark workers); a program that uses fedclip as a
library may call it too. What it costs: a process keeps up to ``trim`` bytes of freed memory
it no longer uses, and blocks above ``mmap`` (1 GiB by default) still come and go on their own
pages. Elsewhere than glibc (macOS, Windows, musl) it changes nothing and returns False.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import platform

_M_TRIM_THRESHOLD = -1  # glibc's malloc.h
_M_MMAP_THRESHOLD = -3
_DONE: list[bool] = []


def keep_freed_memory(mmap: int = 1 << 30, trim: int = 1 << 30) -> bool:
    """Keep freed blocks below ``mmap`` bytes in the heap, and up to ``trim`` bytes of free
    heap in the process (glibc's ``mallopt``); see the module docstring. Returns whether
    the settings are in effect (the first call sets them; later calls return its answer)."""
    if _DONE:
        return _DONE[0]
    ok = False
    if platform.system() == "Linux" and platform.libc_ver()[0] == "glibc":
        try:
            libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
            ok = bool(libc.mallopt(_M_MMAP_THRESHOLD, int(mmap))) and \
                bool(libc.mallopt(_M_TRIM_THRESHOLD, int(trim)))
        except (OSError, AttributeError):
            ok = False
    _DONE.append(ok)
    return ok
