"""The algorithm contract: an algorithm in three parts, under one registry name and one
``Options`` model (FL-bench's server/client pair).

* :class:`Algorithm`, the registered unit: its name, its declared capabilities (checked
  against each other when it registers: ``capabilities``, ``RULES``), its options, and its
  model: ``build_module`` and ``init_global`` (the trainable module and its parameters before
  round 1), ``shared`` (what travels), ``round_config`` (what a round tells the clients). It
  is built with what the runtime knows (:class:`Runtime`) and never written into afterwards.
* :class:`ClientSide` (``Algorithm.Client``): what runs on a client: the objective
  (``task_loss``, ``local_loss``, ``proximal_weight``), local training (``train_client``) and
  scoring (``embed``, ``class_text``, ``logits``, ``eval_params``).
* :class:`ServerSide` (``Algorithm.Server``): what runs on the server: its state
  (``init_server_state``), the extras sent with a round and their bounds (``client_extras``,
  ``reply_extras``, ``check_extras``, ``update_bound``) and ``aggregate``.

An algorithm declares how it differs from FedCLIP by overriding a hook of one side; it never
copies the round loop. Every runtime (the in-process runner, the Flower apps and SecAgg+)
calls the client side through the one client entry (``fedclip.core.client``) and the server
side through the one server (``fedclip.core.server.Server``), so they give the same numbers.

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
from dataclasses import dataclass
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
from fedclip.losses import class_ce_loss, clip_loss, proximal_term
from fedclip.tensors import Params, State

__all__ = ["Algorithm", "ClientJob", "ClientSide", "ClientUpdate", "NoOptions", "Objective",
           "Params", "RoundConfig", "Runtime", "ServerSide", "State"]
PERSONAL = "personal/"  # client-state prefix of personal parameters
OPTIMIZER = "optimizer/"  # client-state prefix of the optimizer's tensors (optimizer_state=keep)


@dataclass(frozen=True)
class Runtime:
    """What the runtime knows and tells an algorithm when it builds it (never written into
    the algorithm afterwards): the class prompts and their normalised text features (where a
    backbone runs), the backbone's logit scale, the number of planned training clients."""

    prompts: tuple[str, ...] = ()
    class_text: torch.Tensor | None = None
    logit_scale: float | None = None
    num_clients: int = 0


@dataclass(frozen=True)
class Capabilities:
    """An algorithm's capabilities: the declared ones and those derived from its hooks."""

    trains: bool
    inputs: str
    uses_text: str
    personal: tuple[str, ...]
    init_needs_text: bool
    has_zero_shot: bool
    sends_params: bool
    fine_tunes: bool
    aggregates_mean: bool
    batchable: bool
    open_vocabulary: bool
    sends_extras: bool  # derived: it declares reply extras
    overrides: frozenset[str]  # derived: the hooks it overrides


HOOKS = ("train_client", "local_loss", "proximal_weight", "embed", "class_text", "logits",
         "aggregate", "reply_extras", "check_extras", "eval_params")


def _defined_in(cls: type, hook: str) -> type | None:
    return next((k for k in cls.__mro__ if hook in vars(k)), None)


# (the rule, as the refusal names it; when a class breaks it)
RULES: tuple[tuple[str, Callable[[Any, Capabilities], bool]], ...] = (
    ("inputs must be 'features', 'tokens' or 'pixels'",
     lambda cls, c: c.inputs not in ("features", "tokens", "pixels")),
    ("inputs = 'tokens' needs has_zero_shot = True (row 0 of a token input is the pooled "
     "embedding the zero-shot classifier scores)",
     lambda cls, c: c.inputs == "tokens" and not c.has_zero_shot),
    ("uses_text must be 'features', 'tower' or 'none'",
     lambda cls, c: c.uses_text not in ("features", "tower", "none")),
    ("init_needs_text = True needs uses_text other than 'none'",
     lambda cls, c: c.init_needs_text and c.uses_text == "none"),
    ("fine_tunes = True needs trains = True",
     lambda cls, c: c.fine_tunes and not c.trains),
    ("trains = False must not override train_client or aggregate (nothing would call them)",
     lambda cls, c: not c.trains and bool({"train_client", "aggregate"} & c.overrides)),
    ("aggregates_mean = True cannot hold with reply extras (reply_extras is overridden): a "
     "secure sum or DP mean cannot carry per-client extras",
     lambda cls, c: c.aggregates_mean and c.sends_extras),
    ("sends_params = False needs aggregates_mean = False, declared reply_extras and its own "
     "aggregate (the server builds the parameters from the statistics)",
     lambda cls, c: not c.sends_params and (c.aggregates_mean or not c.sends_extras
                                            or "aggregate" not in c.overrides)),
    ("batchable = True needs the objective that clients trained together compute: no own "
     "train_client, embed, class_text or logits, and a local_loss only beside the "
     "proximal_weight that states it",
     lambda cls, c: c.batchable and (
         bool({"train_client", "embed", "class_text", "logits"} & c.overrides)
         or ("local_loss" in c.overrides
             and _defined_in(cls.Client, "local_loss")
             is not _defined_in(cls.Client, "proximal_weight")))),
    ("batchable = True needs inputs = 'features' and no personal parameters",
     lambda cls, c: c.batchable and (c.inputs != "features" or bool(c.personal))),
)


class NoOptions(BaseModel):
    """An algorithm without hyperparameters of its own."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class Algorithm:
    """FedCLIP's behaviour; subclasses override what differs."""

    name: ClassVar[str] = ""
    summary: ClassVar[str] = ""  # one line for help texts and tables
    trains: ClassVar[bool] = True  # False: nothing is trained (zero-shot)
    # "features": the cached pooled embeddings [n, d]; "pixels": trains through the backbone
    # (no cache); "tokens": the token store, [n, 1 + T, d] (the pooled embedding, then the T
    # patch tokens in the joint space; fedclip.features.image_tokens). Only an algorithm that
    # declares "tokens" makes a run extract or read tokens. The class declares it (help,
    # capabilities); an algorithm may narrow it for a run from its options, in __init__ (LoRA
    # with target=text reads features): runtimes read the built algorithm's ``inputs``.
    inputs: ClassVar[str] = "features"
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
    # why its aggregate is not a mean of the clients' parameters, where it is not (FLoRA
    # stacks adapters): robust rules, DP and SecAgg+ are refused with this reason ("": none)
    not_a_mean: ClassVar[str] = ""
    # False: the selected global model is not fine-tuned per client afterwards (nothing in
    # it is trained by gradient steps: the training-free prototypes)
    fine_tunes: ClassVar[bool] = True
    # False: its parameters are per class (a classifier head, class prototypes), so it cannot
    # score classes it never trained on; protocol=base2novel reports its novel accuracy n/a
    # (True: built with other classes' prompts, the same parameters score those classes)
    open_vocabulary: ClassVar[bool] = True
    Options: ClassVar[type[BaseModel]] = NoOptions
    # its two sides: what runs on a client and what runs on the server (defaults: FedCLIP's)
    Client: ClassVar[type[ClientSide]]
    Server: ClassVar[type[ServerSide]]

    def __init__(self, cfg: RunConfig, runtime: Runtime | None = None) -> None:
        self.cfg = cfg
        self.options = self.parse_options(cfg.options.get(self.name, {}))
        self.runtime = runtime or Runtime()
        self._client: ClientSide | None = None
        self._server: ServerSide | None = None

    @property
    def client(self) -> ClientSide:
        """Its client side: the objective, training and scoring (built once)."""
        if self._client is None:
            self._client = self.Client(self)
        return self._client

    @property
    def server(self) -> ServerSide:
        """Its server side: the server state, aggregation, the extras and their bounds."""
        if self._server is None:
            self._server = self.Server(self)
        return self._server

    # what the runtime told it (read-only: a runtime never writes into an algorithm)
    @property
    def num_clients(self) -> int:
        """The planned training clients (0 where unknown: on a node)."""
        return self.runtime.num_clients

    @property
    def logit_scale(self) -> float | None:
        """The backbone's logit scale (None where unknown)."""
        return self.runtime.logit_scale

    @property
    def prompts(self) -> tuple[str, ...]:
        """The class prompts, in label order."""
        return self.runtime.prompts

    @property
    def text(self) -> torch.Tensor | None:
        """The class prompts' normalised text features (None where no backbone runs: the
        server)."""
        return self.runtime.class_text

    @classmethod
    def capabilities(cls) -> Capabilities:
        """What the algorithm declares and what follows from the hooks it overrides, in one
        typed value (help, tables and the runtimes read this)."""
        def overrides(hook: str) -> bool:
            side, base = (cls.Client, ClientSide) if hasattr(ClientSide, hook) else \
                (cls.Server, ServerSide)
            return getattr(side, hook) is not getattr(base, hook)

        return Capabilities(
            trains=cls.trains, inputs=cls.inputs, uses_text=cls.uses_text,
            personal=cls.personal, init_needs_text=cls.init_needs_text,
            has_zero_shot=cls.has_zero_shot, sends_params=cls.sends_params,
            fine_tunes=cls.fine_tunes, aggregates_mean=cls.aggregates_mean,
            batchable=cls.batchable, open_vocabulary=cls.open_vocabulary,
            sends_extras=overrides("reply_extras"),
            overrides=frozenset(h for h in HOOKS if overrides(h)))

    @classmethod
    def contradiction(cls) -> str | None:
        """The first rule the class's declarations break (None: they agree). The registry
        refuses such a class, naming the rule."""
        caps = cls.capabilities()
        for rule, broken in RULES:
            if broken(cls, caps):
                return rule
        return None

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

    @property
    def communicates(self) -> bool:
        """Whether anything is averaged by a server (False: every parameter is personal)."""
        return self.trains and "*" not in self.personal

    @property
    def keeps_own_models(self) -> bool:
        """Whether a client is scored with a model of its own (personal parameters, or an
        ``eval_params`` override such as Ditto's personal adapter)."""
        return bool(self.personal) or self.Client.eval_params is not ClientSide.eval_params

    @property
    def runs_on_flower(self) -> bool:
        """Whether the Flower apps can run it: it communicates (a pixel method's site runs
        its backbone on its own images)."""
        return self.communicates

    @property
    def personalizes(self) -> bool:
        """Whether clients fine-tune the selected global model afterwards
        (``personalize_epochs``): it communicates, on cached features, by gradient steps."""
        return self.communicates and self.inputs in ("features", "tokens") and self.fine_tunes

    def init_global(self, dim: int) -> Params | None:
        """The global trainable state before round 1 (None: nothing to train)."""
        return get_params(build_adapter(dim, self.cfg.seed))

    def build_module(self, dim: int) -> nn.Module:
        """The trainable module (FedCLIP: the attention adapter)."""
        return AttentionAdapter(dim)

    def trainable_parameters(self, params: Params | None) -> int:
        """How many parameters a client trains, given the global ``params`` (by default all of
        them; FLoRA: its adapters, not the merged weights it is sent)."""
        return sum(v.numel() for v in (params or {}).values())

    def is_personal(self, key: str) -> bool:
        """Whether parameter ``key`` stays on its client."""
        return any(fnmatch.fnmatchcase(key, p) for p in self.personal)

    def shared(self, params: Params) -> Params:
        """The parameters that travel (everything but the personal ones)."""
        return {k: v for k, v in params.items() if not self.is_personal(k)}

    def round_config(self, server_round: int) -> RoundConfig:
        """The hyperparameters of one round, sent to every client (``lr_decay`` schedule)."""
        values = {k: v for k, v in self.options.model_dump().items()
                  if isinstance(v, bool | int | float | str)}
        return RoundConfig(server_round, self.cfg.lr * self.cfg.lr_decay ** (server_round - 1),
                           self.cfg.local_epochs, values)


class Side:
    """One side of an algorithm, built by it: the run's settings (``cfg``), the algorithm's
    options, and, by name, what the algorithm declares and holds (its model: ``build_module``,
    ``init_global``; ``shared``; what the runtime told it). A side never sees the other
    side's hooks."""

    options: Any  # the algorithm's Options instance

    def __init__(self, algorithm: Algorithm) -> None:
        self.algorithm = algorithm
        self.cfg, self.options = algorithm.cfg, algorithm.options

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        return getattr(self.algorithm, name)


class ClientSide(Side):
    """What runs on a client: the objective, local training and scoring (FedCLIP's: the
    attention adapter against the class prompts, the run's loss)."""

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

    def task_loss(self, emb: torch.Tensor, labels: torch.Tensor, class_text: torch.Tensor,
                  logit_scale: float) -> torch.Tensor:
        """``emb`` normalised image embeddings, ``class_text`` normalised class prompts."""
        if self.cfg.loss == "ce":
            return class_ce_loss(emb, class_text, labels, logit_scale)
        return clip_loss(emb, class_text[labels], logit_scale)

    def local_loss(self, loss: torch.Tensor, module: nn.Module, job: ClientJob) -> torch.Tensor:
        """The objective a client minimises, given the task loss: plus
        ``proximal_weight(job)/2 ||w - w_global||^2`` when that weight is not 0 (FedProx),
        the one proximal term the clients trained together compute too."""
        mu = self.proximal_weight(job)
        if mu == 0:
            return loss
        return loss + proximal_term(dict(module.named_parameters()), job.global_params, mu)

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

    def merged(self, module: nn.Module) -> nn.Module:
        """The module as ``fedclip predict`` runs it (LoRA: its adapters merged into the
        weights); by default the module itself."""
        return module

    def preprocess(self) -> Callable | None:
        """The image preprocessing of ``inputs = "pixels"`` algorithms (None: the
        backbone's)."""
        return None


class ServerSide(Side):
    """What runs on the server: its state between rounds, the extras sent with a round and
    their bounds, and aggregation (FedCLIP's: the weighted mean of the shared parameters)."""

    def init_server_state(self, global_params: Params) -> State:
        """What the server keeps between rounds (none by default)."""
        return {}

    def client_extras(self, server_state: State, client: str) -> dict[str, torch.Tensor]:
        """Tensors sent down to ``client`` with the round, beside the global parameters."""
        return {}

    def reply_extras(self, global_params: Params) -> dict[str, torch.Size]:
        """Names and shapes of the extras a client must send back (checked by the server)."""
        return {}

    def reply_shapes(self, global_params: Params, client: str | None = None
                     ) -> dict[str, torch.Size]:
        """Names and shapes of the parameters a reply (of ``client``, where that matters:
        FLoRA's ranks) carries (the shared ones, or none)."""
        if not self.sends_params:
            return {}
        return {k: v.shape for k, v in self.shared(global_params).items()}

    def sends_extras(self) -> bool:
        """Whether its replies carry per-client extras (``reply_extras``), which a rule that
        selects whole updates (Krum) or DP's clipping would have to cover too."""
        return type(self).reply_extras is not ServerSide.reply_extras

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

    def check_update(self, client: str, update: ClientUpdate, current: Params) -> str | None:
        """Why ``client``'s reply is not what that client must send (FLoRA: adapters of the
        rank it declared), or None; the server rejects it with this line (every runtime)."""
        return None

    def as_global(self, current: Params, params: Params) -> Params:
        """A reply's parameters as the global parameters they would make alone, for the
        server's distance rule and warnings (FLoRA: its adapters merged into the weights);
        by default the reply's parameters themselves."""
        return params

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

    def round_metrics(self, current: Params, new: Params, updates: Sequence[ClientUpdate]
                      ) -> dict[str, float]:
        """What to record about a round's aggregate (``RoundRecord.metrics``): ``current`` the
        global parameters before it, ``new`` after, ``updates`` the accepted ones (weights
        set). Called only where the server sees the individual updates (not SecAgg+)."""
        return {}

    def planned_rounds(self, configured: int) -> int:
        """The rounds this algorithm trains when ``rounds`` = ``configured`` (one-shot
        methods: fewer)."""
        return configured


Algorithm.Client = ClientSide
Algorithm.Server = ServerSide


def _prefixed(state: State, prefix: str) -> State:
    return {k.removeprefix(prefix): v for k, v in state.items() if k.startswith(prefix)}


Objective = Callable[[torch.Tensor, nn.Module], torch.Tensor]
