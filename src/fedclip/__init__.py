"""FedCLIP: federated adaptation of a frozen CLIP with an attention adapter (Lu et al., 2023)."""

from fedclip.config import RunConfig
from fedclip.errors import FedclipError

__all__ = ["RunConfig", "FedclipError", "run"]
__version__ = "0.1.0"


def run(*args, **kwargs):  # noqa: ANN002, ANN003, ANN201 - keeps `import fedclip` light
    """See :func:`fedclip.inprocess.experiment.run`."""
    from fedclip.inprocess.experiment import run as _run

    return _run(*args, **kwargs)
