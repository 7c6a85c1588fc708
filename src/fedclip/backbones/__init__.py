"""Frozen backbones behind one small interface, selected by a spec string.

==============================  ================================================================
spec                            what it loads
==============================  ================================================================
``open_clip:ARCH@TAG``          any open_clip architecture with a pretrained tag (the paper:
                                ``open_clip:ViT-B-32@openai``); ``@/path/ckpt.pt`` a local file;
                                ``@none`` random weights (seeded, for tests and speed checks)
``hf:ORG/MODEL``, ``hf:/dir``   a transformers CLIP-style model (CLIPModel, SiglipModel) and
                                its own processor, from the hub or a save_pretrained folder
``standin``                     the offline stand-in (NOT CLIP): EfficientNet-Lite0 + MiniLM,
                                aligned through the ImageNet classifier; see ``standin.py``
==============================  ================================================================

Providers are registered by prefix; each lives in its own module and imports its heavy
dependencies only when a backbone of that kind is built. A provider module has

* ``load(rest, device) -> Backbone`` and ``fingerprint(rest) -> str`` (known without building
  the model or importing its library, so a feature-cache hit never loads a backbone);
* optionally ``validate(rest)``: checks that need the library (open_clip's architecture and
  tag names), made by :func:`backbone_fingerprint` and when the backbone is built, never for
  a run whose features are all cached (the cache entry was written by a backbone that was);
* ``FORMS``: ``(form, description)`` pairs, what ``fedclip backbones`` lists;
* optionally ``NO_TOKENS``: why its backbones give no patch tokens (the token store,
  ``inputs = "tokens"`` algorithms, refuses them with it); a backbone that gives them has
  ``encode_image_tokens`` and ``token_count`` (:class:`TokenBackbone`);
* optionally ``IS_CLIP`` (a contrastive image-text model; default True), ``NOTE`` (a warning
  shown with every result, e.g. the stand-in's), ``FINETUNABLE`` (its backbones are
  :class:`FinetunableBackbone`: the ``-full`` baselines can train it), ``PROMPTABLE`` (its
  backbones are :class:`PromptableBackbone`: the prompt learners, PromptFL and the others,
  put learned context vectors into its text tower) and
  ``weights_to_download(rest) -> str | None`` (where weights would come from when they are not
  on this machine; :func:`check_available` fails fast with it offline).
"""

from __future__ import annotations

import importlib
import socket
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, cast, runtime_checkable

import torch
from PIL import Image

from fedclip.config import env_flag
from fedclip.errors import BackboneError, ConfigError


@runtime_checkable
class Backbone(Protocol):
    """A frozen image/text encoder pair.

    ``encode_images`` returns the raw image features the adapter sees (not normalised);
    ``encode_texts`` the raw text features. Both are float32 on the CPU.
    """

    spec: str
    embed_dim: int
    logit_scale: float
    default_batch_size: int
    preprocess: Callable[[Image.Image], torch.Tensor]  # picklable: runs in loader workers

    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor: ...

    def encode_texts(self, texts: list[str]) -> torch.Tensor: ...

    def num_parameters(self) -> int:
        """Parameters of both encoders (what backbone fine-tuning would train)."""
        ...


class TokenBackbone(Backbone, Protocol):
    """A backbone that gives its image encoder's patch tokens in the joint space (the token
    store: :func:`fedclip.features.image_tokens`)."""

    def encode_image_tokens(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(pooled [B, d] as ``encode_images`` gives it, patch tokens [B, T, d] through the
        same final norm and projection), float32 on the CPU."""
        ...

    def token_count(self) -> int:
        """T, the patch tokens per image."""
        ...


def token_refusal(spec: str) -> str | None:
    """Why ``spec`` cannot give patch tokens, known without building it (its provider's
    ``NO_TOKENS``), or None."""
    prefix, _ = parse_spec(spec)
    why = getattr(_provider(prefix), "NO_TOKENS", None)
    return None if why is None else f"backbone {spec!r} gives no patch tokens: {why}"


def _token_backbone(model: Backbone) -> TokenBackbone:
    if not hasattr(model, "encode_image_tokens"):
        raise BackboneError(f"backbone {model.spec!r} gives no patch tokens (an algorithm "
                            f"with inputs='tokens' needs an open_clip ViT, an hf CLIP or "
                            f"the stand-in)")
    return cast(TokenBackbone, model)


class FinetunableBackbone(Backbone, Protocol):
    """What the backbone-training baselines (``fedavg-full``, ``fedprox-full``), MaPLe and
    LoRA use: the whole model as a module with CLIP's two encoders, and its tokenizer (open_clip;
    transformers CLIP models, ``hf:``, as :class:`fedclip.backbones.hf.HfClip`)."""

    model: Any  # nn.Module with encode_image(pixels) and encode_text(tokens)
    # texts -> the tokens model.encode_text takes, with .to(device): a tensor (open_clip), a
    # BatchEncoding of ids and attention mask (hf)
    tokenizer: Callable[[list[str]], Any]


class PromptTower(Protocol):
    """A frozen text tower with the words of a prompt template replaced by learned context
    vectors (CoOp), for a fixed list of class prompts: what the prompt learners (PromptFL,
    PromptFolio, FedPGP, FedTPG) train through, whatever the backbone.

    Built by :meth:`PromptableBackbone.prompt_tower` for ``prompts`` (the class prompts, each
    beginning with ``prefix``, the template words before the class name): the ``n_ctx``
    tokens of ``prefix`` are the positions the context takes, each ``width`` wide (the token
    embedding's size)."""

    n_ctx: int
    width: int

    def template_context(self) -> torch.Tensor:
        """The prefix words' own token embeddings, [n_ctx, width]: with them as the context,
        :meth:`encode` gives the backbone's text features of the prompts themselves."""
        ...

    def encode(self, ctx: torch.Tensor) -> torch.Tensor:
        """The prompts' normalised text features [C, embed_dim] with ``ctx`` ([n_ctx, width],
        the same for every prompt, or [C, n_ctx, width], one per prompt) in place of the
        prefix's tokens; differentiable in ``ctx`` (the tower itself stays frozen)."""
        ...


class PromptableBackbone(Backbone, Protocol):
    """A backbone whose text tower takes learned context vectors (a provider's
    ``PROMPTABLE``)."""

    def prompt_tower(self, prompts: Sequence[str], prefix: str) -> PromptTower: ...


@dataclass(frozen=True)
class Traits:
    """What a spec's provider declares, known without building the model."""

    prefix: str
    is_clip: bool
    finetunable: bool
    note: str | None
    promptable: bool = False


# prefix -> provider module, imported only when the prefix is used (see the module docstring)
_PROVIDERS: dict[str, str] = {
    "open_clip": "fedclip.backbones.openclip",
    "standin": "fedclip.backbones.standin",
    "hf": "fedclip.backbones.hf",
}


def register_backbone(prefix: str, module: str) -> None:
    """Register a provider module for specs that start with ``prefix:``."""
    _PROVIDERS[prefix] = module


def _plugins() -> None:
    """Providers from other packages: entry points in the group ``fedclip.backbones``, each
    naming a provider module (``myproj.backbone = "my_package.provider_module"``)."""
    from importlib.metadata import entry_points

    for ep in entry_points(group="fedclip.backbones"):
        _PROVIDERS.setdefault(ep.name, ep.value)


def parse_spec(spec: str) -> tuple[str, str]:
    prefix, _, rest = spec.partition(":")
    if prefix not in _PROVIDERS:
        _plugins()
    if prefix not in _PROVIDERS:
        raise BackboneError(
            f"unknown backbone spec {spec!r}; use one of: "
            + ", ".join(f"{p}:..." if p != "standin" else p for p in _PROVIDERS)
            + " (e.g. open_clip:ViT-B-32@openai or standin)"
        )
    return prefix, rest


def _provider(prefix: str):  # noqa: ANN202 - a module
    try:
        return importlib.import_module(_PROVIDERS[prefix])
    except ImportError as exc:
        hint = " (pip install 'fedclip[standin]')" if prefix == "standin" else ""
        raise BackboneError(f"backbone {prefix!r} needs a missing package: {exc}{hint}") from None


def load_backbone(spec: str, device: str = "cpu") -> Backbone:
    """Build the backbone a spec names, frozen and in eval mode (offline, a spec whose weights
    must be downloaded fails at once: :func:`check_available`)."""
    prefix, rest = parse_spec(spec)
    check_available(spec)
    return _provider(prefix).load(rest, device)


def load_finetunable(spec: str, device: str, purpose: str) -> FinetunableBackbone:
    """A backbone its caller trains; ``purpose`` (what the caller does with it) names the
    refusal when the spec's provider is not ``FINETUNABLE``."""
    if not backbone_traits(spec).finetunable:
        raise BackboneError(f"{purpose}; backbone {spec!r} cannot be trained (use "
                            f"open_clip:ARCH@TAG or hf:MODEL)")
    return cast(FinetunableBackbone, load_backbone(spec, device))


def load_promptable(spec: str, device: str, purpose: str) -> PromptableBackbone:
    """A backbone whose text tower its caller prompts; ``purpose`` (what the caller does with
    it) names the refusal when the spec's provider is not ``PROMPTABLE``."""
    if not backbone_traits(spec).promptable:
        raise BackboneError(f"{purpose}; backbone {spec!r} has no text tower to prompt (use "
                            f"open_clip:ARCH@TAG or standin)")
    return cast(PromptableBackbone, load_backbone(spec, device))


def providers() -> dict[str, str]:
    """Every registered provider (prefix -> module), plugins included."""
    _plugins()
    return dict(_PROVIDERS)


def provider_module(prefix: str):  # noqa: ANN201 - a module
    """The provider module for ``prefix`` (a clear error when its packages are missing)."""
    if prefix not in _PROVIDERS:
        _plugins()
    return _provider(prefix)


def backbone_traits(spec: str) -> Traits:
    prefix, _ = parse_spec(spec)
    module = _provider(prefix)
    return Traits(prefix, bool(getattr(module, "IS_CLIP", True)),
                  bool(getattr(module, "FINETUNABLE", False)), getattr(module, "NOTE", None),
                  bool(getattr(module, "PROMPTABLE", False)))


OFFLINE_HINT = ("offline, use --backbone standin (no download), a local checkpoint "
                "(open_clip:ARCH@/path/to/ckpt.pt) or a saved model (hf:/path/to/folder)")


def _reachable(host: str, timeout: float = 3.0) -> str | None:
    """None when ``host:443`` accepts a connection, else why not (one short try: a library's
    own retries take about a minute offline)."""
    try:
        with socket.create_connection((host, 443), timeout=timeout):
            return None
    except OSError as exc:
        return exc.strerror or type(exc).__name__


def weights_source(spec: str) -> str | None:
    """Where ``spec``'s weights would be downloaded from; None when nothing would be."""
    prefix, rest = parse_spec(spec)
    return getattr(_provider(prefix), "weights_to_download", lambda _: None)(rest)


def check_available(spec: str) -> None:
    """Fail at once, in one line, when ``spec``'s weights are not on this machine and cannot
    be downloaded (``HF_HUB_OFFLINE=1`` set, or the host unreachable)."""
    source = weights_source(spec)
    if source is None:
        return
    host = source.split("://", 1)[-1].split("/", 1)[0]
    if env_flag("HF_HUB_OFFLINE") and "huggingface" in host:
        why = "HF_HUB_OFFLINE is set"
    else:
        failure = _reachable(host)
        if failure is None:
            return
        why = f"{host} is unreachable: {failure}"
    raise BackboneError(f"{spec} needs to download its weights from {source} ({why}); "
                        f"{OFFLINE_HINT}")


def backbone_fingerprint(spec: str, check: bool = True) -> str:
    """Identity of a backbone's weights and preprocessing, without building it; ``check``:
    with the provider's ``validate`` (which may import the backbone's library)."""
    prefix, rest = parse_spec(spec)
    provider = _provider(prefix)
    if check and hasattr(provider, "validate"):
        provider.validate(rest)
    return f"{prefix}-{provider.fingerprint(rest)}"


class LazyBackbone:
    """Builds the backbone on first use: runs whose features are all cached never do, nor
    import its library (the fingerprint is known without it; the spec's names are checked
    when the backbone is built, see ``validate`` in the module docstring)."""

    def __init__(self, spec: str, device: str = "cpu", precision: str = "fp32") -> None:
        if precision not in PRECISIONS:
            raise BackboneError(f"precision must be one of {', '.join(PRECISIONS)}")
        self.spec, self.device, self.precision = spec, device, precision
        # a precision other than fp32 is part of the features' identity: never mixed in a cache
        self.fingerprint = backbone_fingerprint(spec, check=False) + (
            "" if precision == "fp32" else f"-{precision}")
        self._backbone: Backbone | None = None

    def get(self) -> Backbone:
        if self._backbone is None:
            self._backbone = load_backbone(self.spec, self.device)
        return self._backbone

    @property
    def loaded(self) -> bool:
        return self._backbone is not None

    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        """The backbone's image features, under autocast for fp16 / bf16 (float32 out)."""
        model = self.get()
        if self.precision == "fp32":
            return model.encode_images(pixels)
        kind = "cuda" if str(self.device).startswith("cuda") else "cpu"
        with torch.autocast(device_type=kind, dtype=PRECISIONS[self.precision]):
            return model.encode_images(pixels).float()


    def token_count(self) -> int:
        """Patch tokens per image (a one-line BackboneError for a backbone without them)."""
        return _token_backbone(self.get()).token_count()

    def encode_image_tokens(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(pooled, patch tokens) of a batch, under autocast as ``encode_images``."""
        model = _token_backbone(self.get())
        if self.precision == "fp32":
            return model.encode_image_tokens(pixels)
        kind = "cuda" if str(self.device).startswith("cuda") else "cpu"
        with torch.autocast(device_type=kind, dtype=PRECISIONS[self.precision]):
            pooled, tokens = model.encode_image_tokens(pixels)
        return pooled.float(), tokens.float()


PRECISIONS = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def available_devices() -> list[str]:
    """The devices torch can use here."""
    found = ["cpu"] + [f"cuda:{i}" for i in range(torch.cuda.device_count())
                       if torch.cuda.is_available()]
    mps = getattr(torch.backends, "mps", None)
    return found + (["mps"] if mps is not None and mps.is_available() else [])


def resolve_device(device: str) -> str:
    """``device`` ("auto": cuda when there is one), checked: a device this machine lacks is
    a one-line ConfigError that lists those it has (not a driver's stack trace)."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    here = available_devices()
    kind, _, index = device.partition(":")
    known = kind in ("cpu", "cuda", "mps") and (not index or (kind == "cuda" and index.isdigit()))
    present = device in here or (device == "cuda" and "cuda:0" in here) or (
        kind == "cpu" and not index)
    if not known or not present:
        what = "is not a device torch knows" if not known else "is not available here"
        raise ConfigError(f"device {device!r} {what}; this machine has {', '.join(here)} "
                          f"(or pass --device auto)")
    return device
