"""The algorithm contract: a few hooks that both runtimes call, and named state.

An algorithm declares how it differs from FedCLIP by overriding a hook; it never copies the
round loop. Every runtime (the in-process runner ``fedclip.inprocess``, the Flower apps and the
SecAgg+ path in ``fedclip.flower``) calls the same hooks with the same values, so they give the
same numbers. The values that cross the contract (``RoundConfig``, ``ClientJob``,
``ClientUpdate``) and the client functions live in ``fedclip.core.client``.

What an algorithm may keep and send:

* **global parameters** (``init_global``): what the server averages and sends down, except
  the names matching ``personal`` (fnmatch patterns), which never leave a client;
* **server state** (``init_server_state``): tensors the server keeps between rounds
  (SCAFFOLD's global control variate, FedAdam's moments), checkpointed generically;
* **client state** (``ClientJob.state``): tensors a client keeps between rounds (its personal
  parameters, its optimizer state, SCAFFOLD's own control variate, Ditto's personal model).
  In-process it lives in ``FederationState.client_states``; on Flower in ``context.state``;
* **extras**: tensors that travel with a round, down (``client_extras``) and up
  (``ClientUpdate.extras``, declared by ``reply_extras`` so that the server can check them);
* **options**: the algorithm's hyperparameters, a small pydantic model (``Options``), set as
  ``--set NAME.KEY=VALUE`` (Flower: run-config key ``NAME.KEY``); their values reach clients
  each round in the ``RoundConfig`` the server sends, so a server-side schedule is possible.
"""

from __future__ import annotations

import fnmatch
import math
from collections.abc import Callable, Sequence
from typing import Any, ClassVar

import torch
from pydantic import BaseModel, ConfigDict, ValidationError
from torch import nn

from fedclip.adapters import AttentionAdapter, build_adapter, embed, get_params
from fedclip.aggregation import combine
from fedclip.config import RunConfig
from fedclip.core.client import (
    ClientJob,
    ClientUpdate,
    RoundConfig,
    steps_per_round,
    train_local,
)
from fedclip.errors import ConfigError
from fedclip.losses import class_ce_loss, clip_loss
from fedclip.tensors import Params, State

__all__ = ["Algorithm", "ClientJob", "ClientUpdate", "NoOptions", "Objective", "Params",
           "RoundConfig", "State"]
PERSONAL = "personal/"  # client-state prefix of personal parameters
OPTIMIZER = "optimizer/"  # client-state prefix of the optimizer's tensors (optimizer_state=keep)


class NoOptions(BaseModel):
    """An algorithm without hyperparameters of its own."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class Algorithm:
    """FedCLIP's behaviour; subclasses override what differs."""

    name: ClassVar[str] = ""
    summary: ClassVar[str] = ""  # one line for help texts and tables
    trains: ClassVar[bool] = True  # False: nothing is trained (zero-shot)
    inputs: ClassVar[str] = "features"  # "pixels": trains through the backbone (no cache)
    eval_batch: ClassVar[int] = 4096  # inputs per forward when evaluating
    personal: ClassVar[tuple[str, ...]] = ()  # fnmatch patterns: parameters kept by clients
    init_needs_text: ClassVar[bool] = False  # init_global uses the class prompts' features
    has_zero_shot: ClassVar[bool] = True  # False: its inputs never meet the class prompts
    # what it uses of the text side: "features" (the class prompts' text features, computed
    # once), "tower" (runs the text encoder while training), "none"
    uses_text: ClassVar[str] = "features"
    # clients minimise the task loss + proximal_weight(job) * prox term, so
    # fedclip.core.together can train many of them at once (train_clients_together)
    batchable: ClassVar[bool] = False
    # aggregate() depends on the updates only through their weighted mean (no per-client
    # extras), so it can run on a secure sum (SecAgg+)
    aggregates_mean: ClassVar[bool] = True
    # False: a reply carries no parameters, only its declared extras (statistics such as
    # per-class feature sums), from which ``aggregate`` builds the global parameters
    sends_params: ClassVar[bool] = True
    # False: the selected global model is not fine-tuned per client afterwards (nothing in
    # it is trained by gradient steps: the training-free prototypes)
    fine_tunes: ClassVar[bool] = True
    Options: ClassVar[type[BaseModel]] = NoOptions

    def __init__(self, cfg: RunConfig) -> None:
        self.cfg = cfg
        self.options = self.parse_options(cfg.options.get(self.name, {}))
        self.num_clients = 0  # set by the runtime: the planned training clients
        self.logit_scale: float | None = None  # set by the runtime: the backbone's
        self.prompts: tuple[str, ...] = ()
        self.text: torch.Tensor | None = None

    @classmethod
    def parse_options(cls, values: dict[str, Any]) -> BaseModel:
        """``values`` checked against ``Options``, strictly as the run configuration is (true
        is not a number, 2.0 or "2" not a count, 1 not a switch; an int is a float): a
        one-line ConfigError naming each problem."""
        try:
            return cls.Options.model_validate(values, strict=True)
        except ValidationError as exc:
            problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}"
                                 for e in exc.errors())
            known = ", ".join(f"{cls.name}.{k}" for k in cls.Options.model_fields) or "none"
            raise ConfigError(f"invalid options for algorithm {cls.name!r} ({problems}); "
                              f"its options: {known}") from None

    # --- where it runs --------------------------------------------------------------------
    @property
    def communicates(self) -> bool:
        """Whether anything is averaged by a server (False: every parameter is personal)."""
        return self.trains and "*" not in self.personal

    @property
    def keeps_own_models(self) -> bool:
        """Whether a client is scored with a model of its own (personal parameters, or an
        ``eval_params`` override such as Ditto's personal adapter)."""
        return bool(self.personal) or type(self).eval_params is not Algorithm.eval_params

    @property
    def runs_on_flower(self) -> bool:
        """Whether the Flower apps can run it (it communicates, on cached features)."""
        return self.communicates and self.inputs == "features"

    @property
    def personalizes(self) -> bool:
        """Whether clients fine-tune the selected global model afterwards
        (``personalize_epochs``): it communicates, on cached features, by gradient steps."""
        return self.communicates and self.inputs == "features" and self.fine_tunes

    def planned_rounds(self, configured: int) -> int:
        """The rounds this algorithm trains when ``rounds`` = ``configured`` (one-shot
        methods: fewer)."""
        return configured

    # --- model ----------------------------------------------------------------------------
    def setup(self, prompts: tuple[str, ...], class_text: torch.Tensor | None = None) -> None:
        """Called once before any training with the class prompts and their normalised
        text features (algorithms that start from them, or train the text side)."""
        self.prompts, self.text = prompts, class_text

    def preprocess(self) -> Callable | None:
        """The image preprocessing of ``inputs = "pixels"`` algorithms (None: the
        backbone's)."""
        return None

    def init_global(self, dim: int) -> Params | None:
        """The global trainable state before round 1 (None: nothing to train)."""
        return get_params(build_adapter(dim, self.cfg.seed))

    def build_module(self, dim: int) -> nn.Module:
        """The trainable module (FedCLIP: the attention adapter)."""
        return AttentionAdapter(dim)

    def is_personal(self, key: str) -> bool:
        """Whether parameter ``key`` stays on its client."""
        return any(fnmatch.fnmatchcase(key, p) for p in self.personal)

    def shared(self, params: Params) -> Params:
        """The parameters that travel (everything but the personal ones)."""
        return {k: v for k, v in params.items() if not self.is_personal(k)}

    def complete(self, received: Params, dim: int) -> Params:
        """Parameters as a client received them (the shared ones) with the personal ones at
        their initial values (``init_global``, seeded: the same on every node), which the
        client's own state then replaces (:meth:`with_personal`) once it has trained."""
        if not self.personal:
            return received
        if getattr(self, "_personal_init", None) is None:
            self._personal_init = {k: v for k, v in (self.init_global(dim) or {}).items()
                                   if self.is_personal(k)}
        device = next(iter(received.values())).device if received else "cpu"
        return {**{k: v.to(device) for k, v in self._personal_init.items()}, **received}

    def with_personal(self, params: Params, state: State) -> Params:
        """``params`` with this client's personal parameters (if it has any yet) in place."""
        own = {k.removeprefix(PERSONAL): v for k, v in state.items()
               if k.startswith(PERSONAL) and k.removeprefix(PERSONAL) in params}
        return {**params, **own} if own else params

    # --- server ---------------------------------------------------------------------------
    def init_server_state(self, global_params: Params) -> State:
        """What the server keeps between rounds (none by default)."""
        return {}

    def round_config(self, server_round: int) -> RoundConfig:
        """The hyperparameters of one round, sent to every client (``lr_decay`` schedule)."""
        values = {k: v for k, v in self.options.model_dump().items()
                  if isinstance(v, bool | int | float | str)}
        return RoundConfig(server_round, self.cfg.lr * self.cfg.lr_decay ** (server_round - 1),
                           self.cfg.local_epochs, values)

    def client_extras(self, server_state: State, client: str) -> dict[str, torch.Tensor]:
        """Tensors sent down to ``client`` with the round, beside the global parameters."""
        return {}

    def reply_extras(self, global_params: Params) -> dict[str, torch.Size]:
        """Names and shapes of the extras a client must send back (checked by the server)."""
        return {}

    def sends_extras(self) -> bool:
        """Whether its replies carry per-client extras (``reply_extras``), which a rule that
        selects whole updates (Krum) or DP's clipping would have to cover too."""
        return type(self).reply_extras is not Algorithm.reply_extras

    def update_bound(self, current: Params, num_examples: int, config: RoundConfig
                     ) -> float | None:
        """About the farthest an honest client of ``num_examples`` train examples moves the
        shared parameters in one round: Adam moves each coordinate by about ``lr`` per step,
        so K steps move the P shared parameters by about ``K lr sqrt(P)`` (K from the declared
        size, lr from the round). The server's distance rule scales it by ``norm-factor``; it
        depends on no reply, so an attacker cannot grow it. None: no such bound."""
        shared = self.shared(current)
        size = sum(v.numel() for v in shared.values())
        return steps_per_round(self.cfg, num_examples, config.local_epochs) * config.lr \
            * math.sqrt(size)

    def check_extras(self, current: Params, update: ClientUpdate, server_state: State,
                     config: RoundConfig, quantum: float) -> str | None:
        """Why a reply's extras are out of the bounds its parameters allow, or None (the
        server calls this after the parameters passed its own rules; ``quantum`` is the
        transfer's relative rounding: fp16 ~1e-3). Extras are otherwise checked only for
        names, shapes and finiteness, so an algorithm that declares extras bounds them here."""
        return None

    def aggregate(self, current: Params, updates: Sequence[ClientUpdate], server_state: State
                  ) -> tuple[Params, State]:
        """The next global parameters (and server state) from this round's updates."""
        cfg = self.cfg
        params = combine([u.params for u in updates], [u.weight for u in updates],
                         cfg.aggregation, cfg.trim_fraction, cfg.byzantine, cfg.multikrum_keep)
        return {**current, **params}, server_state

    # --- client ---------------------------------------------------------------------------
    def embed(self, module: nn.Module | None, x: torch.Tensor) -> torch.Tensor:
        """Normalised image embeddings of a batch of inputs (features: through the adapter)."""
        return embed(module, x)

    def class_text(self, module: nn.Module | None, class_text: torch.Tensor) -> torch.Tensor:
        """Normalised class-prompt embeddings (fixed, unless the module changes them)."""
        return class_text

    def logits(self, module: nn.Module | None, emb: torch.Tensor, class_text: torch.Tensor,
               logit_scale: float) -> torch.Tensor:
        """Class scores of normalised image embeddings ``emb`` against the normalised class
        embeddings (``class_text(module, ...)``): ``s * emb @ class_text.T`` unless the
        module scores otherwise (a cache model)."""
        return logit_scale * emb @ class_text.T

    def reply_shapes(self, global_params: Params) -> dict[str, torch.Size]:
        """Names and shapes of the parameters a reply carries (the shared ones, or none)."""
        if not self.sends_params:
            return {}
        return {k: v.shape for k, v in self.shared(global_params).items()}

    def task_loss(self, emb: torch.Tensor, labels: torch.Tensor, class_text: torch.Tensor,
                  logit_scale: float) -> torch.Tensor:
        """``emb`` normalised image embeddings, ``class_text`` normalised class prompts."""
        if self.cfg.loss == "ce":
            return class_ce_loss(emb, class_text, labels, logit_scale)
        return clip_loss(emb, class_text[labels], logit_scale)

    def local_loss(self, loss: torch.Tensor, module: nn.Module, job: ClientJob) -> torch.Tensor:
        """The objective a client minimises, given the task loss (FedProx adds a term)."""
        return loss

    def proximal_weight(self, job: ClientJob) -> float:
        """The weight of ``||w - w_global||^2 / 2`` in the local objective (FedProx: mu)."""
        return 0.0

    def train_client(self, job: ClientJob) -> ClientUpdate:
        """One round on one client: local epochs from ``job.params``; personal parameters and
        (``optimizer_state=keep``) the optimizer's state stay in ``job.state``."""
        keep = self.cfg.optimizer_state == "keep"
        result = train_local(self, job.params, job.train, job.class_text, job.logit_scale,
                             config=job.config, seed=job.seed,
                             objective=lambda loss, module: self.local_loss(loss, module, job),
                             optimizer_state=_prefixed(job.state, OPTIMIZER) if keep else None)
        if keep:
            job.state.update({OPTIMIZER + k: v for k, v in result.optimizer_state.items()})
        job.state.update({PERSONAL + k: v for k, v in result.params.items()
                          if self.is_personal(k)})
        return ClientUpdate(self.shared(result.params), {}, result.num_examples, result.loss,
                            result.seconds, result.steps)

    def eval_params(self, global_params: Params | None, state: State) -> Params | None:
        """What a client is scored with on its own splits (personalization)."""
        if global_params is None:
            return None
        return self.with_personal(global_params, state)


def _prefixed(state: State, prefix: str) -> State:
    return {k.removeprefix(prefix): v for k, v in state.items() if k.startswith(prefix)}


Objective = Callable[[torch.Tensor, nn.Module], torch.Tensor]
