"""The state of a federation between rounds, shared by every runtime's server and checkpoints."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from fedclip.aggregation import ROBUST
from fedclip.config import RunConfig
from fedclip.core.records import RoundRecord, is_better
from fedclip.tensors import Params, State


@dataclass
class FederationState:
    """Everything needed to continue a run exactly where it stopped."""

    round: int
    global_params: Params | None
    best_round: int = 0
    best_val: float = -math.inf
    best_params: Params | None = None
    server_state: State = field(default_factory=dict)
    client_states: dict[str, State] = field(default_factory=dict)
    best_client_states: dict[str, State] = field(default_factory=dict)
    history: list[RoundRecord] = field(default_factory=list)

    @property
    def params(self) -> Params:
        """The global parameters, for the algorithms that have them (every one that trains
        a shared model; ``zeroshot`` and ``local`` have none)."""
        if self.global_params is None:
            raise RuntimeError("this federation has no global parameters (the algorithm "
                               "trains no shared model)")
        return self.global_params

    def to(self, device: str | torch.device) -> FederationState:
        """The same state with every tensor on ``device`` (a checkpoint loads on the CPU)."""
        def move(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
            return {k: v.to(device) for k, v in tensors.items()}

        return FederationState(
            self.round, None if self.global_params is None else move(self.global_params),
            self.best_round, self.best_val,
            None if self.best_params is None else move(self.best_params),
            move(self.server_state), {c: move(s) for c, s in self.client_states.items()},
            {c: move(s) for c, s in self.best_client_states.items()}, self.history)

    def select(self, record: RoundRecord, rule: str = "mean") -> None:
        """Apply the one best-round rule (``rule``: mean or median of the val accuracies) to
        an evaluated round."""
        if is_better(record, self.best_val, rule):
            score = record.val_score(rule)
            assert score is not None  # is_better: evaluated
            self.best_round, self.best_val = record.round, score
            self.best_params = self.global_params
            self.best_client_states = {c: dict(s) for c, s in self.client_states.items()}


def selection_rule(cfg: RunConfig) -> str:
    """How the best round is chosen: by the mean of the clients' val accuracies, or by their
    median, which one client cannot move outside the range of the others' values; ``selection``
    says which ('auto': the median with a robust aggregator, which assumes some clients lie)."""
    if cfg.selection != "auto":
        return cfg.selection
    return "median" if cfg.aggregation in ROBUST else "mean"
