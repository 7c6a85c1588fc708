"""The in-process runner: every client of a federation in this process, no Flower.

Fast and exact (the Flower apps reproduce its numbers), for experiments and tests.
``run`` (also ``fedclip.run``) is the whole experiment; ``Federation`` is the round loop.
"""

from fedclip.inprocess.experiment import prepare, run, run_heldout

__all__ = ["prepare", "run", "run_heldout"]
