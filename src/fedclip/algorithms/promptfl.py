"""PromptFL (Guo et al., 2023): federated prompt learning. CoOp context vectors replace the
words of the prompt template before the class name (``a picture of a`` -> M learned token
embeddings); they go through the **frozen** text encoder with each class name, and the server
averages the context vectors. Image features still come from the cache.

The context starts at the template words' own token embeddings, so round 0 is exactly the
zero-shot classifier. It needs the text encoder in every client process (class prompts only,
never images): each training step runs the text tower forward and backward over the C class
prompts, which is the price of its tiny payload (M x text width: 2,048 values for ViT-B/32
with "a picture of a"). It runs on any backbone whose text tower can be prompted
(``fedclip.backbones.PromptTower``): open_clip's CLIP text tower, and the offline stand-in's
MiniLM (whose numbers are the stand-in's, not CLIP's).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import cast

import torch
import torch.nn.functional as F
from torch import nn

from fedclip.adapters import get_params
from fedclip.algorithms.base import Algorithm, ClientSide
from fedclip.algorithms.registry import register
from fedclip.errors import ConfigError
from fedclip.tensors import Params

PLACEHOLDER = "X"  # the placeholder word of a prompt whose context starts at random


class PromptContext(nn.Module):
    def __init__(self, n_ctx: int, width: int) -> None:
        super().__init__()
        self.ctx = nn.Parameter(torch.zeros(n_ctx, width))


class PromptFLClient(ClientSide):
    """PromptFL's client side."""

    def embed(self, module: nn.Module | None, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(x, dim=-1)

    def class_text(self, module: nn.Module | None, class_text: torch.Tensor) -> torch.Tensor:
        if module is None:
            return class_text
        return self.encode_context(cast(torch.Tensor, module.ctx))


@register
class PromptFL(Algorithm):
    uses_text = "tower"  # the context runs through the text encoder at every step
    name = "promptfl"
    summary = "learned prompt context (CoOp) through the frozen text encoder, averaged"
    init_needs_text = True  # the context starts at the template words' embeddings (nodes')
    Client = PromptFLClient

    @property
    def backbone(self):  # noqa: ANN201 - fedclip.backbones.PromptableBackbone
        """The frozen backbone whose text tower the prompt runs through (loaded once)."""
        if getattr(self, "_backbone", None) is None:
            from fedclip.backbones import load_promptable, resolve_device

            self._backbone = load_promptable(self.cfg.backbone, resolve_device(self.cfg.device),
                                             f"{self.name} learns tokens of a text tower")
        return self._backbone

    def template_prefix(self) -> str:
        """The template words before the class name, which the context replaces."""
        prefix = self.cfg.prompt_template.split("{}")[0].strip()
        if not prefix:
            raise ConfigError(f"{self.name} replaces the template words before the class name; "
                              "prompt_template has none")
        return prefix

    def prompt_tower(self, prompts: Sequence[str], prefix: str):  # noqa: ANN201 - PromptTower
        """The backbone's text tower for ``prompts`` (each beginning with ``prefix``), built
        once per pair."""
        towers = self.__dict__.setdefault("_towers", {})
        key = (tuple(prompts), prefix)
        if key not in towers:
            towers[key] = self.backbone.prompt_tower(list(prompts), prefix)
        return towers[key]

    def placeholder_tower(self, n_ctx: int):  # noqa: ANN201 - fedclip.backbones.PromptTower
        """The text tower for the class prompts with ``n_ctx`` placeholder words "X" in place
        of the template's words before the class name (FedPGP's and FedTPG's prompt)."""
        prefix, words = self.template_prefix(), " ".join([PLACEHOLDER] * n_ctx)
        if not self.prompts:
            raise ConfigError(f"{self.name} needs the class prompts: build it with "
                              f"get_algorithm(cfg, Runtime(prompts=...))")
        tower = self.prompt_tower(tuple(words + p[len(prefix):] for p in self.prompts), words)
        if tower.n_ctx != n_ctx:
            raise ConfigError(f"the backbone's tokenizer splits the placeholder word "
                              f"{PLACEHOLDER!r} into several tokens; {self.name} needs one")
        return tower

    def class_names(self) -> tuple[str, ...]:
        """The class names, read back from the class prompts (the template's words around
        them removed)."""
        prefix = self.template_prefix()
        suffix = self.cfg.prompt_template.split("{}", 1)[1].strip()
        return tuple(p[len(prefix):].strip().removesuffix(suffix).strip() if suffix else
                     p[len(prefix):].strip() for p in self.prompts)

    @property
    def tower(self):  # noqa: ANN201 - fedclip.backbones.PromptTower
        """The text tower for the class prompts, the template words as the context."""
        if not self.prompts:
            raise ConfigError(f"{self.name} needs the class prompts: build it with "
                              f"get_algorithm(cfg, Runtime(prompts=...))")
        return self.prompt_tower(self.prompts, self.template_prefix())

    def init_global(self, dim: int) -> Params | None:
        tower = self.tower
        module = PromptContext(tower.n_ctx, tower.width)
        with torch.no_grad():
            module.ctx.copy_(tower.template_context())
        return get_params(module)

    def build_module(self, dim: int) -> nn.Module:
        return PromptContext(self.tower.n_ctx, self.tower.width)

    def encode_context(self, ctx: torch.Tensor) -> torch.Tensor:
        """Normalised class embeddings with the context vectors ``ctx`` [M, width] in place of
        the template words, through the frozen text tower."""
        return self.tower.encode(ctx)
