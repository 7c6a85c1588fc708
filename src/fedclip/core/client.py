"""What a client does, as plain functions on tensors: train locally, evaluate, personalize;
and the values that cross the algorithm contract (a round's configuration, a client's job
and its update).

Every runtime calls these (the in-process runner, Flower's ClientApp, the SecAgg+ client, the
clients trained together), so they agree bit for bit. The functions take the algorithm as a
:class:`Model`: the hooks of :class:`fedclip.algorithms.base.Algorithm` that training needs.
"""

from __future__ import annotations

import contextlib
import copy
import math
import threading
import time
import weakref
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, NamedTuple, Protocol, cast

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from fedclip.adapters import get_params, mask_classes
from fedclip.config import RunConfig
from fedclip.errors import TrainingError
from fedclip.tensors import Params, State, all_finite


@dataclass(frozen=True)
class Split:
    """Inputs and labels of one split (train, val, test or a held-out domain)."""

    x: torch.Tensor  # [n, d] raw image features
    y: torch.Tensor  # [n] class indices

    def __len__(self) -> int:
        return len(self.y)

    def to(self, device: str | torch.device) -> Split:
        """The same split on ``device``."""
        return Split(self.x.to(device), self.y.to(device))


@dataclass(frozen=True)
class ClientData:
    """A client's features: its splits and the classes its domain has."""

    name: str
    train: Split
    val: Split
    test: Split
    class_mask: torch.Tensor  # [C] bool

    def to(self, device: str | torch.device) -> ClientData:
        """The same client on ``device``."""
        return ClientData(self.name, self.train.to(device), self.val.to(device),
                          self.test.to(device), self.class_mask.to(device))


@dataclass(frozen=True)
class RoundConfig:
    """What the server tells every client about a round: the round and its hyperparameters.

    Clients train with these values, never with their own configuration, so a server-side
    schedule (``lr_decay``) reaches every client in every runtime."""

    server_round: int
    lr: float
    local_epochs: int
    values: dict[str, bool | int | float | str] = field(default_factory=dict)  # the options

    def record(self) -> dict[str, Any]:
        """As flat scalars (a Flower ConfigRecord, a legacy fit config)."""
        return {"server-round": self.server_round, "lr": self.lr,
                "local-epochs": self.local_epochs,
                **{f"option.{k}": v for k, v in self.values.items()}}

    @classmethod
    def from_record(cls, record: dict[str, Any]) -> RoundConfig:
        """Back from :meth:`record`."""
        values = {k.removeprefix("option."): v for k, v in record.items()
                  if k.startswith("option.")}
        return cls(int(record["server-round"]), float(record["lr"]),
                   int(record["local-epochs"]), values)


@dataclass
class ClientJob:
    """One client's round: where it starts, what came with the round, what it keeps."""

    name: str
    train: Split
    params: Params  # the global parameters, with this client's personal ones in place
    global_params: Params  # the global parameters as the server sent them (+ personal)
    extras: dict[str, torch.Tensor]
    config: RoundConfig
    state: State  # this client's own state; hooks update it in place
    class_text: torch.Tensor  # normalised class prompts
    logit_scale: float
    seed: int


@dataclass(frozen=True)
class ClientUpdate:
    """What a client sends back: its shared parameters, extras and a few numbers."""

    params: Params
    extras: dict[str, torch.Tensor]
    num_examples: int
    loss: float
    seconds: float = 0.0
    steps: int = 0
    weight: float = 1.0  # set by the server (declared train size, or 1): never by a client


class Model(Protocol):
    """The hooks of an algorithm that the client functions call."""

    cfg: RunConfig

    @property
    def eval_batch(self) -> int:
        """Inputs per forward when evaluating."""

    def build_module(self, dim: int) -> nn.Module:
        """The trainable module for features of size ``dim``."""

    def embed(self, module: Any, x: torch.Tensor) -> torch.Tensor:
        """Normalised image embeddings of inputs ``x`` through ``module``."""

    def class_text(self, module: Any, class_text: torch.Tensor) -> torch.Tensor:
        """Normalised class-prompt embeddings."""

    def logits(self, module: Any, emb: torch.Tensor, class_text: torch.Tensor,
               logit_scale: float) -> torch.Tensor:
        """Class scores of normalised embeddings."""

    def task_loss(self, emb: torch.Tensor, labels: torch.Tensor, class_text: torch.Tensor,
                  logit_scale: float) -> torch.Tensor:
        """The loss of a batch."""

    def round_config(self, server_round: int) -> RoundConfig:
        """The hyperparameters of a round."""


@dataclass(frozen=True)
class TrainResult:
    params: Params
    num_examples: int
    loss: float
    seconds: float
    optimizer_state: dict[str, torch.Tensor]  # flat tensors (flatten_optimizer); none: reset
    steps: int


@dataclass(frozen=True)
class EvalResult:
    accuracy: float
    loss: float
    num_examples: int


def round_seed(seed: int, server_round: int, client_key: str) -> int:
    """A seed for one client's batches in one round, independent of process and order."""
    entropy = [seed, server_round, *client_key.encode()]
    return int(np.random.SeedSequence(entropy).generate_state(1, dtype=np.uint64)[0] >> 1)


def flatten_optimizer(state_dict: dict) -> dict[str, torch.Tensor]:
    """An optimizer's per-parameter tensors as ``{"<param id>/<name>": tensor}``."""
    return {f"{pid}/{name}": torch.as_tensor(value)
            for pid, slot in state_dict["state"].items() for name, value in slot.items()}


def unflatten_optimizer(tensors: dict[str, torch.Tensor], fresh: dict) -> dict:
    """Back into a state dict, with the param groups (lr, betas) of the ``fresh`` optimizer:
    the round's hyperparameters win over the ones the state was saved with."""
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        pid, name = key.split("/", 1)
        state.setdefault(int(pid), {})[name] = value
    return {"state": state, "param_groups": fresh["param_groups"]}


def batch_schedule(cfg: RunConfig, n: int, epochs: int, seed: int) -> list[torch.Tensor]:
    """A client's batches (index tensors) for ``epochs`` epochs, from a generator seeded with
    ``seed``; with the contrastive loss a batch of one sample is skipped (reference code)."""
    generator = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(epochs):
        order = torch.randperm(n, generator=generator)  # CPU generator: the same everywhere
        batches += [b for b in order.split(cfg.batch_size)
                    if not (len(b) < 2 and cfg.loss == "clip")]
    return batches


def client_weights(sizes: Mapping[str, int], cfg: RunConfig) -> dict[str, float]:
    """Every training client's aggregation weight: its train size under ``weighted`` and
    ``multikrum`` (capped
    at ``max_weight_ratio`` x the median size of all training clients, so that no single
    declaration owns the average), 1 otherwise. The same in every runtime."""
    if cfg.aggregation not in ("weighted", "multikrum"):  # multikrum averages its kept ones
        return {c: 1.0 for c in sizes}
    cap = weight_cap(sizes, cfg)
    return {c: float(n) if cap is None else min(float(n), cap) for c, n in sizes.items()}


def weight_cap(sizes: Mapping[str, int], cfg: RunConfig) -> float | None:
    """The largest weight a client may have: ``max_weight_ratio`` x the median train size
    (None: no bound). SecAgg+ sends it to the clients, which weigh themselves."""
    if cfg.max_weight_ratio <= 0 or not sizes:
        return None
    return cfg.max_weight_ratio * float(np.median(list(sizes.values())))


def client_clip(cfg: RunConfig, params: Params, start: Params) -> Params:
    """``dp=client``: the client clips its own update to ``dp_clipping_norm`` before it
    leaves (so no unclipped update is ever sent; SecAgg+ needs this). Otherwise unchanged:
    the server clips every update in any case (``fedclip.core.server.aggregate_round``)."""
    if cfg.dp != "client":
        return params
    from fedclip.privacy import clip_update  # DP's code runs (and loads) only with DP on

    return clip_update(params, start, cfg.dp_clipping_norm)


def steps_per_round(cfg: RunConfig, n: int, epochs: int) -> int:
    """How many batches :func:`batch_schedule` gives a client of ``n`` examples (what the
    server can know from a declared train size, without the data)."""
    full, rest = divmod(n, cfg.batch_size)
    last = 1 if rest >= 2 or (rest == 1 and cfg.loss != "clip") else 0
    return epochs * (full + last)


def diverged(config: RoundConfig, value: float | None = None) -> TrainingError:
    """The error of a client whose training diverged (the run keeps its last checkpoint)."""
    what = "non-finite weights" if value is None else f"a local loss of {value}"
    return TrainingError(f"training diverged: {what} in round {config.server_round} (lr "
                         f"{config.lr:g}); lower the learning rate. The last good checkpoint "
                         f"is kept")


def adam(cfg: RunConfig, groups: list[dict[str, Any]]) -> torch.optim.Adam:
    """torch's Adam with the run's betas, eps and L2 weight decay (the reference recipe).
    Its multi-tensor ("foreach") form everywhere: torch's default on CUDA, and on the CPU
    one call per operation over all tensors, each running the single-tensor form's kernel
    (the same bits, without a Python round trip per tensor and operation)."""
    on_cpu = all(p.device.type == "cpu" for g in groups for p in g["params"])
    return torch.optim.Adam(groups, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps,
                            weight_decay=cfg.weight_decay, foreach=True if on_cpu else None)


# --- the algorithm's module, built once per process --------------------------------------
# An algorithm's module is a function of its state dict (parameters and persistent buffers):
# what a hook needs of a client lives in the job, never on the module. So one module per
# (algorithm, feature size, device) serves every client: its parameters are loaded, not
# re-initialised at random (``build_module``'s initialisation is overwritten at once anyway).
# A module with a random layer is the exception, built per use as before: its masks come
# from torch's global generator, whose stream every build's random initialisation advances.
_MODULES = threading.local()  # per thread: two threads never share a module
_RANDOM_LAYERS = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout,
                  nn.FeatureAlphaDropout)


def _draws_at_random(module: nn.Module) -> bool:
    """Whether training ``module`` draws from torch's global generator (an active dropout,
    RReLU, open_clip's patch dropout)."""
    return any((isinstance(m, _RANDOM_LAYERS) and m.p > 0) or isinstance(m, nn.RReLU)
               or (type(m).__name__ == "PatchDropout" and getattr(m, "prob", 0.0) > 0)
               for m in module.modules())


def _modules_of(algorithm: Model) -> dict[tuple[int, str], nn.Module | None]:
    """This thread's modules of ``algorithm`` (None: built per use), kept as long as the
    algorithm lives; an algorithm that cannot be a weak key gets a fresh dict each time."""
    if not hasattr(_MODULES, "by_algorithm"):
        _MODULES.by_algorithm = weakref.WeakKeyDictionary()
    try:
        return cast(dict[tuple[int, str], nn.Module | None],
                    _MODULES.by_algorithm.setdefault(algorithm, {}))
    except TypeError:
        return {}


@dataclass
class _Kept:
    """What is kept with a shared module: its state dict's tensors by name, when loading is
    plain copying (no module in it customises loading or has state-dict hooks); the Adam of
    clients whose optimizer state nothing keeps, and its moment buffers."""

    tensors: dict[str, torch.Tensor] | None
    optimizer: torch.optim.Adam | None = None
    moments: list[tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list)
    slots: list[dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]] = field(
        default_factory=list)  # clients trained together: a leaf and two moments per name


_KEPT: weakref.WeakKeyDictionary[nn.Module, _Kept] = weakref.WeakKeyDictionary()


def _plain_tensors(module: nn.Module) -> dict[str, torch.Tensor] | None:
    """``module``'s state-dict tensors by name, if ``load_state_dict`` only copies into them."""
    base = nn.Module
    for m in module.modules():
        if (type(m)._load_from_state_dict is not base._load_from_state_dict
                or type(m)._save_to_state_dict is not base._save_to_state_dict
                or m._load_state_dict_pre_hooks or m._load_state_dict_post_hooks
                or m._state_dict_hooks or m._state_dict_pre_hooks):
            return None
    return module.state_dict(keep_vars=True)


def _load(module: nn.Module, params: Params) -> None:
    """``module.load_state_dict(params)``; for a shared module with plain loading, the same
    copies without walking the module tree (a mismatch still goes through it: its error)."""
    kept = _KEPT.get(module)
    tensors = kept.tensors if kept is not None else None
    if tensors is not None and params.keys() == tensors.keys() and all(
            params[k].shape == t.shape for k, t in tensors.items()):
        with torch.no_grad():
            for k, t in tensors.items():
                t.copy_(params[k])
    else:
        module.load_state_dict(params)


def _module(algorithm: Model, dim: int, device: str | torch.device, params: Params
            ) -> tuple[nn.Module, bool]:
    """The algorithm's module holding ``params``, and whether it is the shared one."""
    own = _modules_of(algorithm)
    key = (dim, str(device))
    module = own.get(key)
    if module is None:
        module = algorithm.build_module(dim).to(device)
        if key not in own:
            shared = not _draws_at_random(module)
            own[key] = module if shared else None
            if shared:
                _KEPT[module] = _Kept(_plain_tensors(module))
    else:
        module.zero_grad(set_to_none=True)
    _load(module, params)
    return module, own.get(key) is module


def _hand_out(module: nn.Module) -> Params:
    """The shared module's state dict after training (what ``get_params`` gives): its trained
    parameters' own tensors handed out, not copied, the module getting fresh room in their
    place (the next client's load fills it); frozen tensors and buffers copied as before. A
    module whose loading is not plain copying: copies."""
    kept = _KEPT.get(module)
    if kept is None or kept.tensors is None:
        return get_params(module)
    out: Params = {}
    given: dict[int, torch.Tensor] = {}  # a parameter under two names (tied): once, copied
    with torch.no_grad():
        for k, t in kept.tensors.items():
            if id(t) in given:
                out[k] = given[id(t)].clone()
            elif isinstance(t, nn.Parameter) and t.requires_grad:
                out[k] = given[id(t)] = t.detach()
                t.data = torch.empty_like(t)
            else:
                out[k] = t.detach().clone()
    return out


def _lent_adam(cfg: RunConfig, module: nn.Module, lr: float) -> torch.optim.Adam | None:
    """The shared module's Adam at its start (step 0, zero moments: what a fresh Adam creates
    at its first step), for a client whose optimizer state nothing keeps. One Adam per
    module, its moments in buffers zeroed in place: a client allocates nothing for its
    optimizer (fresh memory costs page faults, more than a step here). None where Adam would
    keep more state than that."""
    kept = _KEPT.get(module)
    if kept is None:
        return None
    if kept.optimizer is None:
        kept.optimizer = adam(cfg, [{"params": list(module.parameters()), "lr": lr}])
        kept.moments = [(torch.zeros_like(p, memory_format=torch.preserve_format),
                         torch.zeros_like(p, memory_format=torch.preserve_format))
                        for p in kept.optimizer.param_groups[0]["params"]]
    optimizer = kept.optimizer
    if not _plain_adam(optimizer):
        return None
    optimizer.param_groups[0]["lr"] = lr
    _adam_start(optimizer, optimizer.param_groups[0]["params"], kept.moments)
    return optimizer


def _adam_start(optimizer: torch.optim.Adam, tensors: Sequence[torch.Tensor],
                moments: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> None:
    """Adam's state at its start for ``tensors`` (step 0, zero moments: what it creates at
    its first step), in ``moments`` zeroed in place."""
    step_dtype = torch.float64 if torch.get_default_dtype() == torch.float64 else torch.float32
    for p, (exp_avg, exp_avg_sq) in zip(tensors, moments, strict=True):
        optimizer.state[p] = {"step": torch.tensor(0.0, dtype=step_dtype),
                              "exp_avg": exp_avg.zero_(), "exp_avg_sq": exp_avg_sq.zero_()}


def _plain_adam(optimizer: torch.optim.Adam) -> bool:
    """Whether Adam keeps only a step and two moments per tensor."""
    return not any(group.get(flag) for group in optimizer.param_groups
                   for flag in ("amsgrad", "capturable", "fused", "differentiable"))


def together_slots(module: nn.Module, starts: Sequence[Params]
                   ) -> list[dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]]:
    """For clients trained at once through ``module``: per client and parameter name, a leaf
    tensor holding ``starts[i]`` and Adam's two moments, zeroed (Adam's start). For a shared
    module they are buffers kept with it between rounds, filled in place: fresh memory
    costs page faults, more than the arithmetic here."""
    params = dict(module.named_parameters())
    kept = _KEPT.get(module)
    reuse = kept is not None and all(start[n].dtype == p.dtype and start[n].shape == p.shape
                                     for start in starts for n, p in params.items())
    slots = kept.slots if reuse and kept is not None else []
    while len(slots) < len(starts):
        slots.append({n: (torch.empty_like(p).requires_grad_(True), torch.empty_like(p),
                          torch.empty_like(p)) for n, p in params.items()})
    with torch.no_grad():
        for start, slot in zip(starts, slots, strict=False):
            for n, (leaf, exp_avg, exp_avg_sq) in slot.items():
                leaf.grad = None
                leaf.copy_(start[n])
                exp_avg.zero_()
                exp_avg_sq.zero_()
    return slots[:len(starts)]


@contextlib.contextmanager
def _seeded_draws(device: str | torch.device, seed: int, draws: bool) -> Iterator[None]:
    """``draws``: a module that draws from torch's global generator (dropout) draws, for
    one client's round, from a stream seeded with the round's seed, so that its masks are
    the same in every runtime and process; the global generators are restored after."""
    if not draws:
        yield
        return
    device = torch.device(device)
    cuda = [device.index if device.index is not None else torch.cuda.current_device()] \
        if device.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda):
        torch.default_generator.manual_seed(seed)
        for index in cuda:
            with torch.cuda.device(index):
                torch.cuda.manual_seed(seed)
        yield


# --- the run's precision for what goes through an encoder ---------------------------------
_HALF = {"fp16": torch.float16, "bf16": torch.bfloat16}


def _through_encoder(algorithm: Model) -> bool:
    """Whether ``algorithm`` trains and scores through an encoder on pixels (``inputs =
    "pixels"``), where ``precision`` applies as in feature extraction."""
    return getattr(algorithm, "inputs", "features") == "pixels"


def autocast(algorithm: Model, device: str | torch.device) -> contextlib.AbstractContextManager:
    """The run's ``precision`` (fp16 / bf16: torch.autocast on ``device``) for a pixel
    method's forward through its encoder, in training and evaluation alike; fp32 and methods
    on cached features: nothing (the same bits as without it)."""
    precision = algorithm.cfg.precision
    if precision == "fp32" or not _through_encoder(algorithm):
        return contextlib.nullcontext()
    return torch.autocast(device_type=torch.device(device).type, dtype=_HALF[precision])


def grad_scaler(algorithm: Model, device: str | torch.device) -> torch.amp.GradScaler | None:
    """A gradient scaler for a pixel method trained in fp16 on CUDA (fp16's range would
    flush small gradients to zero), fresh each round with torch's defaults; None otherwise
    (bf16 has fp32's range; CPU autocast needs none)."""
    if (algorithm.cfg.precision != "fp16" or torch.device(device).type != "cuda"
            or not _through_encoder(algorithm)):
        return None
    return torch.amp.GradScaler("cuda")


def working_module(algorithm: Model, dim: int, device: str | torch.device, params: Params
                   ) -> nn.Module:
    """The algorithm's module for features of size ``dim`` on ``device``, holding ``params``:
    one module per (algorithm, size, device) and thread, built once and reused by every
    client after it (see above). A caller uses it until its next call in the same thread
    and does not keep it (:func:`load_module` gives a module to keep)."""
    return _module(algorithm, dim, device, params)[0]


def train_local(
    algorithm: Model,
    start_params: Params,
    train: Split,
    class_text: torch.Tensor,
    logit_scale: float,
    *,
    config: RoundConfig,
    seed: int,
    objective: Callable[[torch.Tensor, nn.Module], torch.Tensor] | None = None,
    optimizer_state: dict[str, torch.Tensor] | None = None,
) -> TrainResult:
    """``config.local_epochs`` epochs of Adam (lr ``config.lr``) from ``start_params``.

    ``class_text`` are the normalised class-prompt features. ``objective(task_loss, module)``
    is what is minimised (default: the task loss). Batches come from a generator seeded with
    ``seed`` (see :func:`round_seed`). With the contrastive loss, a batch of one sample is
    skipped, as in the reference code. The module is the algorithm's, reused between clients
    (:func:`working_module`).
    """
    cfg = algorithm.cfg
    start = time.perf_counter()
    device = train.x.device
    module, shared = _module(algorithm, train.x.shape[1], device, start_params)
    module.train()
    # with optimizer_state=reset nothing keeps the optimizer's state: the shared module's
    # Adam is lent (see _lent_adam), and its state is not returned
    lent = _lent_adam(cfg, module, config.lr) if (
        shared and not optimizer_state and cfg.optimizer_state == "reset") else None
    optimizer = lent or adam(cfg, [{"params": list(module.parameters()), "lr": config.lr}])
    if optimizer_state:
        optimizer.load_state_dict(unflatten_optimizer(optimizer_state, optimizer.state_dict()))
    losses: list[float] = []
    scaler = grad_scaler(algorithm, device)
    with _seeded_draws(device, seed, not shared):
        for batch in batch_schedule(cfg, len(train), config.local_epochs, seed):
            batch = batch.to(device)
            with autocast(algorithm, device):
                emb = algorithm.embed(module, train.x[batch])
                text = algorithm.class_text(module, class_text)
                loss = algorithm.task_loss(emb, train.y[batch], text, logit_scale)
                total = objective(loss, module) if objective is not None else loss
            if not math.isfinite(value := float(total.detach())):
                raise diverged(config, value)
            optimizer.zero_grad(set_to_none=True)
            if scaler is None:
                total.backward()
                optimizer.step()
            else:  # fp16 on CUDA: a step whose scaled gradients overflowed is skipped
                scaler.scale(total).backward()
                scaler.step(optimizer)
                scaler.update()
            losses.append(float(loss.detach()))
    params = _hand_out(module) if shared else get_params(module)
    module.zero_grad(set_to_none=True)
    if not all_finite(params):
        raise diverged(config)
    return TrainResult(params, len(train), float(np.mean(losses)) if len(losses) > 1 else
                       losses[0] if losses else float("nan"), time.perf_counter() - start,
                       {} if lent is not None else flatten_optimizer(optimizer.state_dict()),
                       len(losses))


def load_module(algorithm: Model, params: Params | None, dim: int) -> nn.Module | None:
    """A module of the algorithm's own holding ``params``, in eval mode (None: no adapter),
    for a caller that keeps it (a copy of one built module: no random initialisation)."""
    if params is None:
        return None
    module, shared = _module(algorithm, dim, next(iter(params.values())).device, params)
    return (copy.deepcopy(module) if shared else module).eval()


def evaluate(
    algorithm: Model,
    params: Params | None,
    split: Split,
    class_text: torch.Tensor,
    logit_scale: float,
    class_mask: torch.Tensor | None = None,
) -> EvalResult:
    """Accuracy (over the classes in ``class_mask``) and class cross-entropy of ``params``."""
    return evaluate_many(algorithm, [Scoring(params, split, class_mask)], class_text,
                         logit_scale)[0]


@torch.no_grad()
def evaluate_module(
    algorithm: Model,
    module: nn.Module | None,
    split: Split,
    class_text: torch.Tensor,
    logit_scale: float,
    class_mask: torch.Tensor | None = None,
) -> EvalResult:
    """As :func:`evaluate`, with the module already built (one build for many splits)."""
    if len(split) == 0:
        return EvalResult(float("nan"), float("nan"), 0)
    with autocast(algorithm, split.x.device):
        text = algorithm.class_text(module, class_text)
        logits = mask_classes(_forward(algorithm, module, split.x, text, logit_scale),
                              class_mask)
    accuracy = float((logits.argmax(dim=1) == split.y).float().mean())
    return EvalResult(accuracy, _loss(logits, split.y), len(split))


def _forward(algorithm: Model, module: nn.Module | None, x: torch.Tensor, text: torch.Tensor,
             logit_scale: float) -> torch.Tensor:
    """Class scores of one split's inputs, ``eval_batch`` inputs per forward."""
    emb = torch.cat([algorithm.embed(module, chunk) for chunk in x.split(algorithm.eval_batch)])
    logits = algorithm.logits(module, emb, text, logit_scale)
    return logits.float() if logits.dtype in _HALF.values() else logits  # autocast's


def _loss(logits: torch.Tensor, y: torch.Tensor) -> float:
    """Class cross-entropy of masked logits (masked classes at -1e4, not -inf)."""
    return float(F.cross_entropy(logits.masked_fill(torch.isinf(logits), -1e4), y))


class Scoring(NamedTuple):
    """One split to score with ``params`` (None: no adapter), over ``class_mask``."""

    params: Params | None
    split: Split
    class_mask: torch.Tensor | None = None


@torch.no_grad()
def evaluate_many(algorithm: Model, items: Sequence[Scoring], class_text: torch.Tensor,
                  logit_scale: float) -> list[EvalResult]:
    """:func:`evaluate` of every item, in order, with the same numbers, in one pass.

    Items that share their ``params`` (the same dict object, as every client scored with the
    global parameters does) share one loaded module and one computation of the class
    embeddings; their predictions are compared, and their accuracies reduced, all at once.
    Each split's forward stays at that split's own size: the rounding of a matrix product
    can depend on how many rows it has (it does on CPU below four rows), and a split
    scored with others must give what it gives alone."""
    results: list[EvalResult | None] = [None] * len(items)
    groups: dict[int, list[int]] = {}
    for i, item in enumerate(items):
        if len(item.split) == 0:
            results[i] = EvalResult(float("nan"), float("nan"), 0)
        else:
            groups.setdefault(id(item.params), []).append(i)
    for members in groups.values():
        params = items[members[0]].params
        module = None
        if params is not None:
            dim = items[members[0]].split.x.shape[1]
            device = next(iter(params.values())).device
            module = working_module(algorithm, dim, device, params).eval()
        with autocast(algorithm, items[members[0]].split.x.device):
            text = algorithm.class_text(module, class_text)
            logits = [mask_classes(_forward(algorithm, module, items[i].split.x, text,
                                            logit_scale), items[i].class_mask)
                      for i in members]
        labels = [items[i].split.y for i in members]
        correct = (torch.cat(logits).argmax(dim=1) == torch.cat(labels)).float()
        sizes = [len(y) for y in labels]
        accuracies = torch.stack([part.mean() for part in correct.split(sizes)]).tolist()
        for i, scores, y, accuracy in zip(members, logits, labels, accuracies, strict=True):
            results[i] = EvalResult(accuracy, _loss(scores, y), len(y))
    return [r for r in results if r is not None]


PERSONAL_ROUNDS = 10**6  # seeds of personalization epochs never collide with rounds


def personalize(algorithm: Model, params: Params, data: ClientData, class_text: torch.Tensor,
                logit_scale: float, epochs: int) -> tuple[float, int]:
    """Fine-tune a copy of ``params`` on the client's train split for up to ``epochs`` epochs,
    keep the epoch (0 = ``params`` itself) with the best val accuracy; return its test
    accuracy and the epoch. ``params`` is never modified. Both runtimes call this."""
    args = (class_text, logit_scale)
    own = {k: v.clone() for k, v in params.items()}
    best_val = evaluate(algorithm, own, data.val, *args, data.class_mask)
    best, best_epoch = own, 0
    for epoch in range(1, epochs + 1):
        config = algorithm.round_config(1)
        config = RoundConfig(PERSONAL_ROUNDS + epoch, config.lr, 1, config.values)
        own = train_local(algorithm, own, data.train, *args, config=config,
                          seed=round_seed(algorithm.cfg.seed, PERSONAL_ROUNDS + epoch,
                                          data.name)).params
        val = evaluate(algorithm, own, data.val, *args, data.class_mask)
        if val.accuracy > best_val.accuracy:
            best, best_val, best_epoch = own, val, epoch
    return evaluate(algorithm, best, data.test, *args, data.class_mask).accuracy, best_epoch


# --- the one client entry: every driver builds, trains and scores a client through these ---
class Trainer(Model, Protocol):
    """The hooks of an algorithm that a client's round needs beyond :class:`Model`."""

    @property
    def communicates(self) -> bool:
        """Whether anything leaves a client."""

    def with_personal(self, params: Params, state: State) -> Params:
        """``params`` with the client's personal parameters in place."""

    def shared(self, params: Params) -> Params:
        """The parameters that travel."""

    def train_client(self, job: ClientJob) -> ClientUpdate:
        """One round on one client."""

    def eval_params(self, global_params: Params | None, state: State) -> Params | None:
        """What a client is scored with on its own splits."""


def client_job(algorithm: Trainer, name: str, train: Split, received: Params,
               extras: dict[str, torch.Tensor], config: RoundConfig, state: State,
               class_text: torch.Tensor, logit_scale: float) -> ClientJob:
    """What client ``name`` trains in a round: the parameters it ``received`` (the shared
    ones, completed) with its personal ones from ``state`` in place, the round's extras and
    configuration, and its batch seed (:func:`round_seed`)."""
    start = algorithm.with_personal(received, state)
    return ClientJob(name, train, start, start, extras, config, state, class_text, logit_scale,
                     round_seed(algorithm.cfg.seed, config.server_round, name))


def run_jobs(algorithm: Trainer, jobs: list[ClientJob],
             together: Callable[[Any, list[ClientJob]], list[ClientUpdate]] | None = None
             ) -> list[ClientUpdate | None]:
    """The clients' rounds (``together``: :func:`fedclip.core.together.train_together`, for a
    batchable algorithm), each update clipped by its client under ``dp=client``; None for a
    client whose training diverged (the server decides what that means for the run)."""
    trained: list[ClientUpdate | None]
    try:
        trained = list(together(algorithm, jobs)) if together is not None and jobs else \
            [_train(algorithm, job) for job in jobs]
    except TrainingError:  # one of them diverged: find which, one after another (same bits)
        trained = [_train(algorithm, job) for job in jobs]
    if not algorithm.communicates:  # nothing leaves the client: nothing to clip
        return trained
    return [None if update is None else replace(
        update, params=client_clip(algorithm.cfg, update.params, algorithm.shared(job.params)))
        for job, update in zip(jobs, trained, strict=True)]


def _train(algorithm: Trainer, job: ClientJob) -> ClientUpdate | None:
    try:
        return algorithm.train_client(job)
    except TrainingError:
        return None


def run_job(algorithm: Trainer, job: ClientJob) -> ClientUpdate | None:
    """One client's round (see :func:`run_jobs`)."""
    return run_jobs(algorithm, [job])[0]


def score(algorithm: Trainer, data: ClientData, params: Params | None, state: State,
          class_text: torch.Tensor, logit_scale: float) -> tuple[float, float]:
    """A training client's (val, test) accuracy of the global ``params`` with its own state
    (personal parameters, a personal model): how every runtime scores a client."""
    own = algorithm.eval_params(params, state) if params is not None else None
    module = load_module(algorithm, own, data.train.x.shape[1]) if own is not None else None
    args = (class_text, logit_scale, data.class_mask)
    return (evaluate_module(algorithm, module, data.val, *args).accuracy,
            evaluate_module(algorithm, module, data.test, *args).accuracy)
