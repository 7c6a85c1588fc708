"""FedCLIP: federated adaptation of a frozen CLIP with an attention adapter (Lu et al., 2023)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from fedclip.errors import FedclipError

if TYPE_CHECKING:
    from fedclip.config import RunConfig

__all__ = ["RunConfig", "FedclipError", "run"]
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    """``fedclip.RunConfig`` on first use: ``import fedclip`` (which every submodule's import
    runs first, the plot process's too) stays free of pydantic and the configuration."""
    if name == "RunConfig":
        from fedclip.config import RunConfig

        return RunConfig
    raise AttributeError(f"module 'fedclip' has no attribute {name!r}")


def run(*args, **kwargs):  # noqa: ANN002, ANN003, ANN201 - keeps `import fedclip` light
    """See :func:`fedclip.inprocess.experiment.run`."""
    from fedclip.inprocess.experiment import run as _run

    return _run(*args, **kwargs)
