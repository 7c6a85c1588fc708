"""Training-free class prototypes: Tip-Adapter's cache model, federated, with one prototype per
class (the Tip-Adapter / TOFA family; no gradient step anywhere).

Tip-Adapter (Zhang et al., ECCV 2022, training-free form, its Eq. 5-6) adds to CLIP's
zero-shot logits a cache model over the few-shot training features F with one-hot labels L:
``logits = f W^T + alpha * exp(-beta (1 - f F^T)) L``. A federation cannot ship F (it is the
clients' data), so each class's cache collapses to its **prototype**, the mean of the class's
normalised train features over the union of the clients (as federated prototype methods do,
e.g. FedProto, Tan et al., AAAI 2022):

    P_c = sum_k S_kc / sum_k n_kc,   S_kc = sum of client k's normalised features of class c
    logits = s * (f T^T + alpha * exp(-beta (1 - f normalise(P)^T)))

with ``f`` the normalised image feature, ``T`` the normalised class prompts, ``s`` the
backbone's logit scale. Choices where the paper leaves one open:

* ``alpha`` is relative to the zero-shot cosine (the zero-shot term is inside the logit
  scale): a prototype stands for a whole class, not one shot, so Tip-Adapter's alpha (which
  multiplies a sum over K shots per class) does not transfer as a number;
* alpha and beta are chosen on the clients' val splits, as the paper tunes them on a
  validation set: round ``r`` scores grid point ``r`` of ``ALPHAS x BETAS`` (alpha-major) and
  the run's best-round rule (mean of the clients' val accuracies; the median under a robust
  aggregator) picks one. The run has ``min(rounds, 15)`` rounds; ``search=false`` (or
  ``rounds=1``) uses the options ``alpha`` and ``beta`` in a single round.

Clients send per-class sums S_kc (C x d) and counts n_kc (C) each round (the same values;
one round when not searching) and receive the prototypes: no local training. A class no client
holds has a zero prototype (its cache term is the same constant for every image, so it changes
no prediction). ``alpha = 0`` is the zero-shot classifier exactly. The server bounds every
reply: counts are whole, non-negative and sum to the train size the node declared, and each
class sum is no longer than its count (the features are unit vectors).
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Sequence
from typing import cast

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from fedclip.adapters import get_params
from fedclip.algorithms.base import (
    Algorithm,
    ClientJob,
    ClientSide,
    ClientUpdate,
    RoundConfig,
    ServerSide,
    State,
)
from fedclip.algorithms.registry import register
from fedclip.errors import ConfigError
from fedclip.tensors import Params

ALPHAS = (0.25, 0.5, 1.0, 2.0, 4.0)
BETAS = (1.0, 5.5, 10.0)  # 5.5: Tip-Adapter's default sharpness
GRID = tuple(itertools.product(ALPHAS, BETAS))


class PrototypeOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    alpha: float = Field(1.0, ge=0, le=1e3, allow_inf_nan=False,
                         description="Weight of the cache term (0: zero-shot exactly).")
    beta: float = Field(5.5, ge=0, le=1e3, allow_inf_nan=False,
                        description="Sharpness of the cache affinity (Tip-Adapter: 5.5).")
    search: bool = Field(True, description="Choose alpha and beta on the clients' val "
                         "splits, one grid point a round (alpha x beta over "
                         f"{list(ALPHAS)} x {list(BETAS)}); false: the options' values.")


class PrototypeHead(nn.Module):
    """The class prototypes (mean normalised train feature per class) and the mixing."""

    prototypes: torch.Tensor
    alpha: torch.Tensor
    beta: torch.Tensor

    def __init__(self, classes: int, dim: int) -> None:
        super().__init__()
        self.register_buffer("prototypes", torch.zeros(classes, dim))
        self.register_buffer("alpha", torch.zeros(()))
        self.register_buffer("beta", torch.zeros(()))


def class_sums(x: torch.Tensor, y: torch.Tensor, classes: int) -> tuple[torch.Tensor,
                                                                         torch.Tensor]:
    """Per-class sums of the normalised features ``x`` and per-class counts (float)."""
    sums = torch.zeros(classes, x.shape[1], dtype=torch.float32, device=x.device)
    sums.index_add_(0, y, F.normalize(x.float(), dim=-1))
    counts = torch.bincount(y, minlength=classes).to(torch.float32)
    return sums, counts


def check_class_stats(counts: torch.Tensor, norms: torch.Tensor, num_examples: int,
                      quantum: float) -> str | None:
    """Why per-class counts and the norms of per-class sums of unit vectors cannot come from
    ``num_examples`` train features, or None."""
    if bool((counts < 0).any()) or bool(((counts - counts.round()).abs() > 1e-3).any()):
        return "class counts must be whole numbers >= 0"
    if abs(float(counts.sum()) - num_examples) > 0.5:
        return (f"class counts sum to {float(counts.sum()):g}, not the {num_examples} train "
                f"examples declared at discovery")
    if bool((norms > counts * (1 + 4 * quantum) + 1e-3).any()):
        return "a class sum is longer than its count of unit-length features allows"
    return None


class PrototypesClient(ClientSide):
    """Prototypes's client side."""

    def embed(self, module: nn.Module | None, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(x, dim=-1)

    def logits(self, module: nn.Module | None, emb: torch.Tensor, class_text: torch.Tensor,
               logit_scale: float) -> torch.Tensor:
        zero_shot = emb @ class_text.T
        if module is None:
            return logit_scale * zero_shot
        head = cast(PrototypeHead, module)
        protos = F.normalize(head.prototypes, dim=-1)
        cache = torch.exp(-head.beta * (1 - emb @ protos.T))
        return logit_scale * (zero_shot + head.alpha * cache)

    def train_client(self, job: ClientJob) -> ClientUpdate:
        start = time.perf_counter()
        sums, counts = class_sums(job.train.x, job.train.y, job.class_text.shape[0])
        return ClientUpdate({}, {"sums": sums, "counts": counts}, len(job.train), 0.0,
                            time.perf_counter() - start)


class PrototypesServer(ServerSide):
    """Prototypes's server side."""

    def planned_rounds(self, configured: int) -> int:
        if not self.options.search:
            return min(configured, 1)
        return min(configured, len(GRID))

    def init_server_state(self, global_params: Params) -> State:
        return {"round": torch.zeros(())}

    def reply_extras(self, global_params: Params) -> dict[str, torch.Size]:
        classes, dim = global_params["prototypes"].shape
        return {"sums": torch.Size([classes, dim]), "counts": torch.Size([classes])}

    def update_bound(self, current: Params, num_examples: int, config: RoundConfig
                     ) -> float | None:
        return None  # no parameters travel up; the extras are bounded in check_extras

    def check_extras(self, current: Params, update: ClientUpdate, server_state: State,
                     config: RoundConfig, quantum: float) -> str | None:
        return check_class_stats(update.extras["counts"],
                                 update.extras["sums"].norm(dim=-1), update.num_examples,
                                 quantum)

    def aggregate(self, current: Params, updates: Sequence[ClientUpdate], server_state: State
                  ) -> tuple[Params, State]:
        server_round = int(server_state.get("round", torch.zeros(()))) + 1
        sums = torch.stack([u.extras["sums"].float() for u in updates]).sum(0)
        counts = torch.stack([u.extras["counts"].float() for u in updates]).sum(0)
        alpha, beta = self._grid_point(server_round)
        device = current["prototypes"].device
        new = {"prototypes": (sums / counts.clamp(min=1).unsqueeze(1)).to(device),
               "alpha": torch.tensor(alpha, device=device),
               "beta": torch.tensor(beta, device=device)}
        return new, {**server_state, "round": torch.tensor(float(server_round))}


@register
class Prototypes(Algorithm):
    name = "prototypes"
    summary = "training-free: class prototypes (feature means) as a cache beside zero-shot"
    init_needs_text = True  # the class count comes from the prompts' features
    aggregates_mean = False  # sums and counts per client, not a mean of parameters
    sends_params = False
    fine_tunes = False
    open_vocabulary = False  # a prototype per class
    Options = PrototypeOptions
    options: PrototypeOptions
    Client = PrototypesClient
    Server = PrototypesServer

    def _classes(self) -> int:
        if self.text is None:
            raise ConfigError(f"{self.name} needs the class prompts' features: call "
                              f"build it with get_algorithm(cfg, Runtime(prompts, class_text))")
        return self.text.shape[0]

    def _grid_point(self, server_round: int) -> tuple[float, float]:
        """(alpha, beta) of ``server_round`` (1-based; round 0: the options')."""
        opts = self.options
        if not opts.search or server_round < 1:
            return opts.alpha, opts.beta
        return GRID[min(server_round, len(GRID)) - 1]

    def init_global(self, dim: int) -> Params | None:
        params = get_params(PrototypeHead(self._classes(), dim))
        alpha, beta = self._grid_point(0)
        return {**params, "alpha": torch.tensor(alpha), "beta": torch.tensor(beta)}

    def build_module(self, dim: int) -> nn.Module:
        return PrototypeHead(self._classes(), dim)
