"""A process that never compiles need not import ``torch._dynamo``.

torch's optimizers import ``torch._dynamo`` (and sympy with it: 1.3-1.7 s of CPU here, about
as much as ``import torch`` itself) on first use only to mark themselves as not to be traced.
A process that fedclip owns and that never compiles (a deployed node's ``flwr-clientapp``
message, a ``fedclip run``) installs a stand-in first; everything else is left alone.
"""

from __future__ import annotations

import logging
import sys
from typing import Any

import torch

# torch releases (major.minor) whose torch.optim the stand-in is tested with
# (tests/test_structure.py): on any other, torch._dynamo is imported as usual
DYNAMO_STAND_IN_TORCH = ("2.14",)


def torch_release(version: str) -> str:
    """``major.minor`` of a torch version string (``2.14.1+cu130`` -> ``2.14``)."""
    return ".".join(version.split("+")[0].split(".")[:2])


def defer_dynamo_import() -> bool:
    """In a process that never compiles, keep torch.optim from importing ``torch._dynamo``.

    A torch optimizer's ``__init__`` and ``step`` import ``torch._dynamo`` (and sympy with
    it: 1.35 s on this machine's core, most of a deployed node's training message) only to
    mark themselves as not to be traced, which matters only under ``torch.compile``. Until
    something asks for more, a stand-in module answers ``disable`` (the function itself: what
    it is outside compilation) and ``graph_break`` (nothing to break); any other attribute,
    and any import of a submodule (``from torch._dynamo.utils import ...``, as torchvision
    does), loads the real ``torch._dynamo`` in its place first. Returns whether the stand-in
    was set: not when ``torch._dynamo`` is already loaded, nor on a torch release the stand-in
    is not tested with (:data:`DYNAMO_STAND_IN_TORCH`; said in the log at info level)."""
    if torch_release(torch.__version__) not in DYNAMO_STAND_IN_TORCH:
        logging.getLogger(__name__).info(
            "torch %s: torch._dynamo is imported as usual (fedclip's stand-in, which spares a "
            "process that import, is tested with torch %s)", torch.__version__,
            ", ".join(DYNAMO_STAND_IN_TORCH))
        return False
    import importlib
    import importlib.abc
    import importlib.machinery
    import importlib.util
    import types

    if "torch._dynamo" in sys.modules:
        return False
    stand_in = types.ModuleType("torch._dynamo", "fedclip's stand-in until the real one "
                                                 "is needed (see defer_dynamo_import)")

    def load_real() -> types.ModuleType:
        if sys.modules.get("torch._dynamo") is stand_in:
            del sys.modules["torch._dynamo"]
        return importlib.import_module("torch._dynamo")

    class Loaded(importlib.abc.Loader):
        """Hands the import system a submodule the real package has just loaded."""

        def create_module(self, spec: importlib.machinery.ModuleSpec) -> types.ModuleType:
            return sys.modules[spec.name]

        def exec_module(self, module: types.ModuleType) -> None:
            pass

    class RealOnSubmodule(importlib.abc.MetaPathFinder):
        """``import torch._dynamo.X`` while the stand-in is there: load the real package."""

        def find_spec(self, fullname: str, path: Any = None, target: Any = None
                      ) -> importlib.machinery.ModuleSpec | None:
            if not fullname.startswith("torch._dynamo.") or \
                    sys.modules.get("torch._dynamo") is not stand_in:
                return None
            load_real()
            if fullname in sys.modules:
                return importlib.machinery.ModuleSpec(fullname, Loaded())
            return importlib.util.find_spec(fullname)  # in the real package's folder

    def disable(fn: Any = None, recursive: bool = True, **_: Any) -> Any:
        return fn if fn is not None else (lambda f: f)

    stand_in.__getattr__ = lambda name: getattr(load_real(), name)  # type: ignore[method-assign]
    stand_in.__path__ = []  # a package: submodule imports reach RealOnSubmodule
    stand_in.disable = disable  # type: ignore[attr-defined]
    stand_in.graph_break = lambda *args, **kwargs: None  # type: ignore[attr-defined]
    sys.meta_path.insert(0, RealOnSubmodule())
    sys.modules["torch._dynamo"] = stand_in
    torch._dynamo = stand_in
    return True
