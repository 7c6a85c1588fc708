"""Algorithms, registered by name.

Adding one is one new module in this package (it is found and imported automatically) or, from
outside the package, an entry point in the group ``fedclip.algorithms``. Each algorithm class
declares its hyperparameters as a small pydantic model (``Options``), set with
``--set NAME.KEY=VALUE`` or the Flower run-config key ``NAME.KEY``.
"""

from fedclip.algorithms.registry import (
    ALGORITHMS,
    algorithm_class,
    check_options,
    get_algorithm,
    listed,
    names,
    register,
)

__all__ = ["ALGORITHMS", "algorithm_class", "check_options", "get_algorithm", "listed",
           "names", "register"]
