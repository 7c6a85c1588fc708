"""Federated LoRA on CLIP's encoders (Hugging Face ``peft``): FedIT, FFA-LoRA and FLoRA.

Each client trains low-rank adapters ``W + s B A`` (``s = alpha / rank``, peft's scaling) on
Linear layers of the transformer blocks of one or both towers (see Backbones below), through
the frozen backbone. The three methods differ in what the
server does with the adapters, which decides whether the aggregate is the mean of the
clients' own updates ``s B_k A_k`` (weighted by train size):

* ``fedit`` (FedIT, Zhang et al. 2024): A and B are averaged separately. ``mean(B) mean(A)``
  is not ``mean(B A)``: the inexact baseline, kept to show the error (recorded per round).
* ``ffa-lora`` (FFA-LoRA, Sun et al. 2024): A is frozen at a random initialisation seeded by
  the run's seed (the same on every node, never sent); only B trains and travels, half the
  bytes, and ``mean(B) A = mean(B A)``: exact.
* ``flora`` (FLoRA, Wang et al. 2024): the clients' adapters are stacked,
  ``[w_1 s_1 B_1 ... w_K s_K B_K] [A_1; ...; A_K] = sum_k w_k s_k B_k A_k``: exact, and each
  client may have its own rank (``flora.ranks``). Every round the server adds that sum to the
  targeted weights, which are its global parameters (they travel down; only the adapters come
  up), and clients start the next round from fresh adapters (A seeded per client and round,
  B = 0). Its aggregate is a sum of products, not a mean: robust rules, DP and SecAgg+ are
  refused.

Backbones (:func:`host`: what LoRA adapts on each). Open_clip (and any ``FINETUNABLE``
backbone with open_clip's module names) and transformers CLIP models (``hf:``): both towers,
through the images (``inputs = "pixels"``). The offline stand-in: its text tower only
(MiniLM, a BERT; its image encoder is EfficientNet, convolutional: ``target=vision`` or
``both`` is refused in one line). With
``target=text`` (any backbone) the image encoder is frozen and unchanged, so the run reads the
cached image features (``inputs = "features"``, like the prompt learners) and only the class
prompts go through the adapted text tower at every step: at B = 0 it gives the backbone's
zero-shot text features.

Targets (``target_modules``, comma-separated suffixes of module names; ``auto``: the backbone's
defaults). Open_clip's blocks: ``mlp.c_fc`` and ``mlp.c_proj`` (the default). Its attention is
``nn.MultiheadAttention``, whose packed q/k/v projection is a parameter (``in_proj_weight``),
not a Linear layer, and whose ``out_proj`` Linear is never called (the functional attention
reads its weight): LoRA there would be ignored, so ``attn``, ``attn.out_proj`` and
``attn.in_proj`` are refused. The stand-in's MiniLM: ``attention.self.query`` and
``attention.self.value`` (the LoRA paper's W_q and W_v, and peft's default for BERT); its
``attention.self.key``, ``attention.output.dense``, ``intermediate.dense`` and
``output.dense`` may be named too. A transformers CLIP (``hf:``): ``self_attn.q_proj`` and
``self_attn.v_proj`` (likewise); ``self_attn.k_proj``, ``self_attn.out_proj``, ``mlp.fc1``
and ``mlp.fc2`` may be named too. A backbone with nothing to target is refused in one line.

The global parameters are the LoRA tensors that travel (FFA-LoRA: B; FLoRA: the merged
targeted weights); the backbone's other weights are buffers of the module, never sent, never
changed. The frozen backbone runs as it computed the zero-shot features: its own dropout is
off in training too (only the adapters' ``dropout`` draws). ``fedclip predict`` merges the
adapters into the weights (peft's ``merge``, then the LoRA layers are unloaded).
"""

from __future__ import annotations

import copy
import math
import re
from collections.abc import Sequence
from typing import Any, ClassVar, Literal, cast

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, field_validator
from torch import nn

from fedclip.algorithms.base import Algorithm, ClientSide, Runtime, ServerSide
from fedclip.algorithms.registry import register
from fedclip.config import RunConfig
from fedclip.core.client import ClientJob, ClientUpdate, train_local
from fedclip.errors import ConfigError
from fedclip.tensors import Params, State

ADAPTER = "default"  # peft's adapter name
A_KEY = f".lora_A.{ADAPTER}.weight"
B_KEY = f".lora_B.{ADAPTER}.weight"
W_KEY = ".base_layer.weight"
# module-name prefixes of each tower: open_clip (CLIP, CustomTextCLIP)
TOWERS = {"vision": ("visual.",), "text": ("transformer.", "text.")}
DEFAULT_MODULES = "mlp.c_fc,mlp.c_proj"
BERT_MODULES = "attention.self.query,attention.self.value"  # the stand-in's MiniLM
# a transformers CLIP (fedclip.backbones.hf.HfClip holds it as ``clip``)
HF_TOWERS: dict[str, tuple[str, ...]] = {"vision": ("clip.vision_model.",),
                                        "text": ("clip.text_model.",)}
HF_MODULES = "self_attn.q_proj,self_attn.v_proj"
_DROPOUTS = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout,
             nn.FeatureAlphaDropout)
ATTENTION = ("attn", "attn.out_proj", "attn.in_proj", "attn.in_proj_weight")


def _modules(value: str) -> tuple[str, ...]:
    return tuple(m.strip() for m in value.split(",") if m.strip())


class LoraOptions(BaseModel):
    """LoRA's hyperparameters (peft's names; rank 8, alpha 16, no dropout: FedIT's and
    FFA-LoRA's settings)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    target: Literal["vision", "text", "both"] = Field(
        "both", description="Which encoder's transformer blocks get adapters.")
    target_modules: str = Field(
        "auto", description="Comma-separated module-name suffixes (auto: the backbone's: "
                            "mlp.c_fc,mlp.c_proj for open_clip, attention.self.query,"
                            "attention.self.value for the stand-in's MiniLM).")
    rank: int = Field(8, ge=1, le=1024, description="LoRA rank r.")
    alpha: int = Field(16, ge=1, description="LoRA alpha: the update is alpha/r * B A.")
    dropout: float = Field(0.0, ge=0, lt=1, description="Dropout on the adapters' input.")

    @field_validator("target_modules")
    @classmethod
    def _known(cls, value: str) -> str:
        names = _modules(value)
        if not names:
            raise ValueError("name at least one module (or auto)")
        attention = [n for n in names if n in ATTENTION]
        if attention:
            raise ValueError(
                f"{attention[0]!r} is inside nn.MultiheadAttention, whose packed q/k/v "
                f"projection is a parameter, not a Linear, and whose out_proj is never called "
                f"(LoRA there would be ignored); target {DEFAULT_MODULES}")
        return value


class FloraOptions(LoraOptions):
    """FLoRA's: LoRA's, and a rank per client."""

    ranks: str = Field(
        "", description="Per-client ranks as CLIENT=RANK pairs, comma-separated (e.g. "
                        "'art_painting=4,cartoon=16'); unnamed clients use rank.")

    @field_validator("ranks")
    @classmethod
    def _pairs(cls, value: str) -> str:
        client_ranks(value)
        return value


def client_ranks(value: str) -> dict[str, int]:
    """``flora.ranks`` as {client: rank} (a ValueError naming a malformed pair)."""
    out: dict[str, int] = {}
    for pair in _modules(value):
        client, sep, rank = pair.partition("=")
        if not sep or not client.strip() or not rank.strip().isdigit() or int(rank) < 1:
            raise ValueError(f"{pair!r} is not CLIENT=RANK with a rank of at least 1")
        out[client.strip()] = int(rank)
    return out


# --- the LoRA module ---------------------------------------------------------------------
def layer_prefixes(params: Params) -> list[str]:
    """The LoRA layers named in ``params`` (by their A, B or merged weight keys), sorted."""
    out = set()
    for key in params:
        for suffix in (A_KEY, B_KEY, W_KEY):
            if key.endswith(suffix):
                out.add(key.removesuffix(suffix))
    return sorted(out)


def targeted(model: nn.Module, target: str, modules: Sequence[str],
             towers: dict[str, tuple[str, ...]] | None = None) -> list[str]:
    """Names of the Linear layers of ``model`` that LoRA goes on: in the ``target`` tower(s)
    (``towers``: each tower's module-name prefixes; default open_clip's), whose names end
    with one of ``modules``."""
    towers = towers or TOWERS
    prefixes = tuple(p for t in (("vision", "text") if target == "both" else (target,))
                     for p in towers.get(t, ()))
    return [name for name, m in model.named_modules()
            if isinstance(m, nn.Linear) and name.startswith(prefixes)
            and any(name == s or name.endswith("." + s) for s in modules)]


def build_lora(clip: nn.Module, names: Sequence[str], rank: int, alpha: int, dropout: float,
               seed: int, trained: Sequence[str] = ("lora_A", "lora_B"),
               kept: Sequence[str] = ()) -> nn.Module:
    """A copy of ``clip`` with peft's LoRA layers on ``names`` (A at peft's Kaiming init drawn
    from ``seed``, B = 0). Its parameters are the adapters' ``trained`` ones; every other
    tensor becomes a buffer, persistent (in the state dict, loaded and saved) only for the
    adapters' ``kept`` ones and the targeted base weights when ``"base"`` is in ``kept``.
    So the state dict is exactly what the algorithm's parameters hold. The copy's own dropout
    layers are set to p = 0 (the frozen backbone runs in training as it does in eval mode)."""
    from peft import LoraConfig, inject_adapter_in_model

    model = copy.deepcopy(clip)
    for module in model.modules():  # the frozen backbone's own dropout (BERT's): off
        if isinstance(module, _DROPOUTS):
            module.p = 0.0
    pattern = "^(" + "|".join(map(re.escape, names)) + ")$"
    config = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, bias="none",
                        target_modules=pattern)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        inject_adapter_in_model(config, model, adapter_name=ADAPTER)
    for module_name, module in list(model.named_modules()):
        for name, p in list(module.named_parameters(recurse=False)):
            full = f"{module_name}.{name}" if module_name else name
            if any(f".{t}." in full for t in trained):
                p.requires_grad_(True)
                continue
            persistent = any(f".{t}." in full for t in kept) or (
                "base" in kept and full.endswith(W_KEY))
            delattr(module, name)
            module.register_buffer(name, p.detach(), persistent=persistent)
    return model


def merge(model: nn.Module) -> nn.Module:
    """``model`` with every LoRA layer merged into its base weight and unloaded (peft's
    ``merge_and_unload``, for a model whose adapters were injected): plain Linear layers."""
    from peft.tuners.lora import LoraLayer

    for name, module in list(model.named_modules()):
        if isinstance(module, LoraLayer):
            module.merge()
            parent_name, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent_name) if parent_name else model, child,
                    module.get_base_layer())
    return model


def delta(a: torch.Tensor, b: torch.Tensor, alpha: float) -> torch.Tensor:
    """A LoRA layer's weight update ``alpha / r * B A`` (r: the adapters' rank), in float64
    (what the round metrics compare: no rounding of their own)."""
    return (alpha / a.shape[0]) * (b.double() @ a.double())


# --- what LoRA adapts on each backbone ---------------------------------------------------
class Host:
    """What LoRA adapts on one backbone: the frozen module it copies (``model``), the
    module-name prefixes of each tower in it that LoRA can target (``towers``), the default
    ``target_modules`` (``modules``), why a tower it lacks cannot be adapted, and how a copy
    of ``model`` (adapted) encodes images and the class prompts, as the backbone's
    ``encode_images`` / ``encode_texts`` do (differentiable, on the copy's device)."""

    backbone: Any  # the loaded backbone (fedclip.backbones.Backbone)
    model: nn.Module
    towers: dict[str, tuple[str, ...]]
    modules: str
    missing: str = "it has no such transformer"

    def encode_image(self, module: nn.Module, pixels: torch.Tensor) -> torch.Tensor:
        """Raw image features of ``pixels`` through the adapted copy ``module``."""
        raise NotImplementedError

    def encode_text(self, module: nn.Module, prompts: Sequence[str]) -> torch.Tensor:
        """Raw text features of ``prompts`` through the adapted copy ``module``."""
        raise NotImplementedError


def _device(module: nn.Module) -> torch.device:
    return next(iter(module.buffers())).device


class ClipHost(Host):
    """A ``FINETUNABLE`` backbone (``model.encode_image``, ``model.encode_text`` and its
    ``tokenizer``): both towers. Open_clip's module names by default; a transformers CLIP's
    (``hf:``) with ``HF_TOWERS`` and ``HF_MODULES``."""

    def __init__(self, backbone: Any, towers: dict[str, tuple[str, ...]] = TOWERS,
                 modules: str = DEFAULT_MODULES) -> None:
        self.backbone, self.model, self.tokenizer = backbone, backbone.model, backbone.tokenizer
        self.towers, self.modules = towers, modules
        self._tokens: dict[tuple[tuple[str, ...], str], Any] = {}

    def encode_image(self, module: nn.Module, pixels: torch.Tensor) -> torch.Tensor:
        return cast(Any, module).encode_image(pixels)

    def encode_text(self, module: nn.Module, prompts: Sequence[str]) -> torch.Tensor:
        device = _device(module)
        key = (tuple(prompts), str(device))
        if key not in self._tokens:  # a tensor (open_clip) or a BatchEncoding (hf)
            self._tokens[key] = self.tokenizer(list(prompts)).to(device)
        return cast(Any, module).encode_text(self._tokens[key])


class StandinTextHost(Host):
    """The stand-in's text tower: its sentence transformer (MiniLM, then mean pooling and
    normalisation), whose BERT's Linear layers LoRA targets. Its image encoder is
    EfficientNet: convolutional, no transformer block to adapt."""

    towers = {"text": ("",)}
    modules = BERT_MODULES
    missing = ("its image encoder is EfficientNet-Lite0 (convolutional, no transformer "
               "blocks); LoRA adapts the stand-in's MiniLM text tower only")

    def __init__(self, backbone: Any) -> None:
        self.backbone = backbone
        self.model = backbone.text_model  # sentence_transformers.SentenceTransformer
        self._features: dict[tuple[tuple[str, ...], str], dict[str, Any]] = {}

    def encode_text(self, module: nn.Module, prompts: Sequence[str]) -> torch.Tensor:
        """``encode_texts``: the prompts tokenised as one batch (padded to the longest), the
        sentence transformer's modules (BERT, mean pooling, its normalisation), then
        ``normalize_embeddings``' normalisation; at B = 0 the same bits as ``encode_texts``
        for up to its batch of 128 prompts (more: it sorts them by length into batches, whose
        padding may round differently)."""
        device = _device(module)
        key = (tuple(prompts), str(device))
        if key not in self._features:
            st: Any = module
            tokenize = getattr(st, "preprocess", None) or st.tokenize
            self._features[key] = {k: v.to(device) if isinstance(v, torch.Tensor) else v
                                   for k, v in tokenize(list(prompts)).items()}
        out = module(dict(self._features[key]))["sentence_embedding"]  # its modules add keys
        return F.normalize(out, p=2, dim=1)


def host(spec: str, device: str, purpose: str) -> Host:
    """What LoRA adapts on backbone ``spec`` (a one-line ConfigError where nothing)."""
    from fedclip.backbones import backbone_traits, load_backbone, load_finetunable

    traits = backbone_traits(spec)
    if traits.prefix == "standin":
        return StandinTextHost(load_backbone(spec, device))
    if traits.prefix == "hf":
        return ClipHost(load_finetunable(spec, device, purpose), HF_TOWERS, HF_MODULES)
    if traits.finetunable:
        return ClipHost(load_finetunable(spec, device, purpose))
    raise ConfigError(f"{purpose}: backbone {spec!r} has no transformer blocks it can adapt "
                      f"(use open_clip:ARCH@TAG, hf:MODEL, or standin with target=text)")


# --- the client side ---------------------------------------------------------------------
class LoraClient(ClientSide):
    """LoRA's client side: CLIP's encoders through the adapted model (the cached image
    features where only the text tower is adapted)."""

    def embed(self, module: nn.Module | None, x: torch.Tensor) -> torch.Tensor:
        if self.inputs == "features":  # target=text: the image encoder is the backbone's
            return F.normalize(x, dim=-1)
        model: Any = module if module is not None else self.host.model
        return F.normalize(self.host.encode_image(model, x).float(), dim=-1)

    def class_text(self, module: nn.Module | None, class_text: torch.Tensor) -> torch.Tensor:
        if module is None or self.options.target == "vision":  # an unchanged text tower
            return class_text
        return F.normalize(self.host.encode_text(module, self.prompts).float(), dim=-1)

    def merged(self, module: nn.Module) -> nn.Module:
        """The module with its adapters merged into the weights (what predict runs)."""
        return merge(module)


class LoraServer(ServerSide):
    """LoRA's server side: the mean (FedIT, FFA-LoRA), and what it measures of it."""

    def round_metrics(self, current: Params, new: Params, updates: Sequence[ClientUpdate]
                      ) -> dict[str, float]:
        """The aggregation error (the Frobenius distance, summed over the LoRA layers, of the
        aggregate's weight update from the weighted mean of the clients' own ``s B_k A_k``),
        the size of that mean (its norm, summed likewise: what the error compares to) and
        the parameters each client sent (their mean)."""
        total = sum(u.weight for u in updates)
        error = 0.0
        size = 0.0
        algorithm = cast(LoraAlgorithm, self.algorithm)
        for prefix, aggregated in algorithm.applied(current, new).items():
            own = sum(u.weight * algorithm.own_delta(prefix, u.params) for u in updates)
            error += float(torch.linalg.matrix_norm(aggregated - own / total))
            size += float(torch.linalg.matrix_norm(own / total))
        sent = sum(sum(v.numel() for v in u.params.values()) for u in updates) / len(updates)
        return {"aggregation_error": error, "mean_update_norm": size, "sent_params": sent}


class LoraAlgorithm(Algorithm):
    """What the three methods share: the adapted backbone, its options, the round metrics.
    Its inputs are pixels (the images through the adapted encoders), but the cached features
    with ``target=text`` (the image encoder is the backbone's, unchanged)."""

    inputs = "pixels"
    uses_text = "tower"  # the text tower runs where it is adapted
    eval_batch = 32
    Options: ClassVar[type[BaseModel]] = LoraOptions
    Client = LoraClient
    Server = LoraServer
    options: Any  # its Options instance
    trained: ClassVar[tuple[str, ...]] = ("lora_A", "lora_B")  # what clients train
    kept: ClassVar[tuple[str, ...]] = ("lora_A", "lora_B")  # the global parameters

    def __init__(self, cfg: RunConfig, runtime: Runtime | None = None) -> None:
        super().__init__(cfg, runtime)
        if self.options.target == "text":  # the run's inputs, narrowed by its options
            self.__dict__["inputs"] = "features"

    @property
    def host(self) -> Host:
        """What the adapters go on: the frozen backbone's module (loaded once)."""
        if getattr(self, "_host", None) is None:
            from fedclip.backbones import resolve_device

            self._host = host(self.cfg.backbone, resolve_device(self.cfg.device),
                              f"{self.name} puts LoRA on the Linear layers of the backbone's "
                              f"transformer blocks")
        return self._host

    @property
    def backbone(self):  # noqa: ANN201 - fedclip.backbones.Backbone
        """The frozen backbone the adapters go on (a one-line ConfigError where its towers
        cannot take the configured target)."""
        _ = self.targets
        return self.host.backbone

    @property
    def targets(self) -> list[str]:
        """The targeted Linear layers' names (a one-line ConfigError where none match, or
        where the backbone has no such tower)."""
        if getattr(self, "_targets", None) is None:
            opts, where = self.options, self.host
            towers = ("vision", "text") if opts.target == "both" else (opts.target,)
            lacking = [t for t in towers if t not in where.towers]
            if lacking:
                raise ConfigError(
                    f"{self.name}.target={opts.target} on {self.cfg.backbone}: no {lacking[0]} "
                    f"tower to adapt ({where.missing}); set {self.name}.target="
                    f"{next(iter(where.towers))}")
            modules = _modules(where.modules if opts.target_modules == "auto"
                               else opts.target_modules)
            names = targeted(where.model, opts.target, modules, where.towers)
            if not names:
                raise ConfigError(
                    f"{self.name}.target_modules={','.join(modules)} matches no Linear layer "
                    f"of the {opts.target} transformer blocks of {self.cfg.backbone} (its "
                    f"default: {where.modules})")
            self._targets = names
        return self._targets

    def lora_module(self, rank: int, trained: Sequence[str], kept: Sequence[str]) -> nn.Module:
        """The backbone with adapters of ``rank`` (A drawn from the run's seed)."""
        opts = self.options
        return build_lora(self.host.model, self.targets, rank, opts.alpha, opts.dropout,
                          self.cfg.seed, trained, kept)

    def build_module(self, dim: int) -> nn.Module:
        """The backbone with LoRA adapters of the configured rank (what trains and what is
        kept as this method says)."""
        return self.lora_module(self.options.rank, self.trained, self.kept)

    def init_global(self, dim: int) -> Params | None:
        return {k: v.detach().clone() for k, v in self.build_module(dim).state_dict().items()}

    # what the round metrics compare (per LoRA layer, keyed by its prefix)
    def frozen(self) -> Params:
        """The adapters' tensors that never travel (FFA-LoRA's A), from the run's seed."""
        return {}

    def applied(self, current: Params, new: Params) -> dict[str, torch.Tensor]:
        """Each layer's weight update of the global model ``new`` (from the frozen weights)."""
        both = {**self.frozen(), **new}
        return {p: delta(both[p + A_KEY], both[p + B_KEY], self.options.alpha)
                for p in layer_prefixes(new)}

    def own_delta(self, prefix: str, params: Params) -> torch.Tensor:
        """A client's own weight update of one layer."""
        both = {**self.frozen(), **params}
        return delta(both[prefix + A_KEY], both[prefix + B_KEY], self.options.alpha)


@register
class FedIT(LoraAlgorithm):
    name = "fedit"
    summary = "LoRA on CLIP's encoders, A and B averaged separately (inexact)"


@register
class FFALoRA(LoraAlgorithm):
    name = "ffa-lora"
    summary = "LoRA with A frozen at a seeded init, only B trained and sent (exact)"
    trained = ("lora_B",)
    kept = ("lora_B",)

    def frozen(self) -> Params:
        if getattr(self, "_frozen", None) is None:
            module = self.lora_module(self.options.rank, (), ("lora_A",))
            self._frozen = {k: v.detach().clone() for k, v in module.state_dict().items()}
        return self._frozen


# --- FLoRA -------------------------------------------------------------------------------
class RankView:
    """FLoRA's client side as the training functions see it, with adapters of one rank."""

    def __init__(self, client: FloraClient, rank: int) -> None:
        self.client, self.rank, self.cfg = client, rank, client.cfg
        self.eval_batch = client.eval_batch

    def build_module(self, dim: int) -> nn.Module:
        """The merged backbone with fresh adapters of this client's rank."""
        algorithm = cast(LoraAlgorithm, self.client.algorithm)
        return algorithm.lora_module(self.rank, ("lora_A", "lora_B"), ("base",))

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        return getattr(self.client, name)


class FloraClient(LoraClient):
    """FLoRA's client side: fresh adapters of the client's rank on the merged weights; its
    reply is the adapters alone."""

    def train_client(self, job: ClientJob) -> ClientUpdate:
        rank = self.rank_of(job.name)
        views = self.__dict__.setdefault("_views", {})
        view = views.setdefault(rank, RankView(self, rank))
        start = {**job.params, **self.fresh(rank, job.seed, job.params)}
        result = train_local(view, start, job.train, job.class_text, job.logit_scale,
                             config=job.config, seed=job.seed)
        adapters = {k: v for k, v in result.params.items() if k.endswith((A_KEY, B_KEY))}
        return ClientUpdate(adapters, {}, result.num_examples, result.loss, result.seconds,
                            result.steps)

    def fresh(self, rank: int, seed: int, weights: Params) -> Params:
        """A round's fresh adapters for every layer: A at peft's init (Kaiming uniform,
        a = sqrt(5)) drawn from ``seed``, B = 0."""
        generator = torch.Generator().manual_seed(seed)
        out: Params = {}
        for prefix in layer_prefixes(weights):
            w = weights[prefix + W_KEY]
            a = torch.empty(rank, w.shape[1])
            nn.init.kaiming_uniform_(a, a=math.sqrt(5), generator=generator)
            out[prefix + A_KEY] = a.to(w.device)
            out[prefix + B_KEY] = torch.zeros(w.shape[0], rank, device=w.device)
        return out


class FloraServer(LoraServer):
    """FLoRA's server side: the stacked adapters' product added to the targeted weights."""

    def reply_shapes(self, global_params: Params, client: str | None = None
                     ) -> dict[str, torch.Size]:
        rank = self.rank_of(client)
        out: dict[str, torch.Size] = {}
        for prefix in layer_prefixes(global_params):
            d_out, d_in = global_params[prefix + W_KEY].shape
            out[prefix + A_KEY] = torch.Size((rank, d_in))
            out[prefix + B_KEY] = torch.Size((d_out, rank))
        return out

    def check_update(self, client: str, update: ClientUpdate, current: Params) -> str | None:
        expected = self.reply_shapes(current, client)
        got = {k: tuple(v.shape) for k, v in update.params.items()}
        if got != {k: tuple(v) for k, v in expected.items()}:
            ranks = sorted({v.shape[0] for k, v in update.params.items() if k.endswith(A_KEY)})
            return (f"its adapters (rank {', '.join(map(str, ranks)) or 'none'}) are not the "
                    f"rank {self.rank_of(client)} it declared (flora.ranks) on every layer")
        return None

    def as_global(self, current: Params, params: Params) -> Params:
        """The targeted weights with this client's adapters alone merged in."""
        return {prefix + W_KEY: current[prefix + W_KEY] + delta(
            params[prefix + A_KEY], params[prefix + B_KEY], self.options.alpha)
            for prefix in layer_prefixes(current)}

    def update_bound(self, current: Params, num_examples: int, config: Any) -> float | None:
        return None  # a product of fresh adapters: the rule falls back to the weights' norm

    def aggregate(self, current: Params, updates: Sequence[ClientUpdate], server_state: State
                  ) -> tuple[Params, State]:
        total = sum(u.weight for u in updates)
        alpha = self.options.alpha
        new = dict(current)
        for prefix in layer_prefixes(current):
            # stacked: [w_1 s_1 B_1, ..., w_K s_K B_K] @ [A_1; ...; A_K]
            b = torch.cat([u.params[prefix + B_KEY] * (u.weight / total * alpha
                                                       / u.params[prefix + A_KEY].shape[0])
                           for u in updates], dim=1)
            a = torch.cat([u.params[prefix + A_KEY] for u in updates], dim=0)
            new[prefix + W_KEY] = current[prefix + W_KEY] + b @ a
        return new, server_state

    def round_metrics(self, current: Params, new: Params, updates: Sequence[ClientUpdate]
                      ) -> dict[str, float]:
        total = sum(u.weight for u in updates)
        error = size = 0.0
        for prefix in layer_prefixes(current):
            key = prefix + W_KEY
            own = sum(u.weight * delta(u.params[prefix + A_KEY], u.params[prefix + B_KEY],
                                       self.options.alpha) for u in updates)
            moved = new[key].double() - current[key].double()
            error += float(torch.linalg.matrix_norm(moved - own / total))
            size += float(torch.linalg.matrix_norm(own / total))
        sent = sum(sum(v.numel() for v in u.params.values()) for u in updates) / len(updates)
        return {"aggregation_error": error, "mean_update_norm": size, "sent_params": sent}


@register
class FLoRA(LoraAlgorithm):
    name = "flora"
    summary = "LoRA adapters stacked (exact, a rank per client), merged each round"
    Options = FloraOptions
    Client = FloraClient
    Server = FloraServer
    aggregates_mean = False
    # why its aggregate is not a mean (the refusals of robust rules, DP and SecAgg+ say it)
    not_a_mean = "stacks the clients' adapters (a sum of products, not a mean of parameters)"
    trained = ()
    kept = ("base",)

    @property
    def personalizes(self) -> bool:
        """False: its global parameters are the merged weights, with no adapters in them to
        fine-tune per client (a client's adapters are fresh each round)."""
        return False

    def trainable_parameters(self, params: Params | None) -> int:
        """A client's adapters at ``flora.rank`` (a client of rank r trains r / rank x it)."""
        return sum(s.numel() for s in self.server.reply_shapes(params or {}).values())

    def rank_of(self, client: str | None) -> int:
        """The rank ``client`` declared (``flora.ranks``; default ``rank``)."""
        return int(client_ranks(self.options.ranks).get(client or "", self.options.rank))
