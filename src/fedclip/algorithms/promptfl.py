"""PromptFL (Guo et al., 2023): federated prompt learning. CoOp context vectors replace the
words of the prompt template before the class name (``a picture of a`` -> M learned token
embeddings); they go through the **frozen** text encoder with each class name, and the server
averages the context vectors. Image features still come from the cache.

The context starts at the template words' own token embeddings, so round 0 is exactly the
zero-shot classifier. It needs the text encoder in every client process (class prompts only,
never images): each training step runs the text tower forward and backward over the C class
prompts, which is the price of its tiny payload (M x text width: 2,048 values for ViT-B/32
with "a picture of a"). Open_clip backbones with a CLIP text tower only: the offline stand-in
encodes text with MiniLM followed by a ridge map fitted to ImageNet, so there is no token
sequence of a CLIP text tower to put context vectors into.
"""

from __future__ import annotations

from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import nn

from fedclip.adapters import get_params
from fedclip.algorithms.base import Algorithm, ClientSide
from fedclip.algorithms.registry import register
from fedclip.errors import ConfigError
from fedclip.tensors import Params


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
    def backbone(self):  # noqa: ANN201 - fedclip.backbones.FinetunableBackbone
        """The frozen backbone whose text tower the prompt runs through (loaded once)."""
        if getattr(self, "_backbone", None) is None:
            from fedclip.backbones import load_finetunable, resolve_device

            backbone = load_finetunable(self.cfg.backbone, resolve_device(self.cfg.device),
                                        f"{self.name} learns tokens of a CLIP text tower")
            if not hasattr(backbone.model, "token_embedding"):
                raise ConfigError(f"{self.cfg.backbone} has a custom text tower; {self.name} "
                                  f"needs a CLIP-style one (token_embedding + transformer)")
            self._backbone = backbone
        return self._backbone

    def _tokens(self) -> tuple[torch.Tensor, int]:
        """The class prompts' tokens, and how many template tokens the context replaces."""
        template = self.cfg.prompt_template
        prefix = template.split("{}")[0].strip()
        if not prefix:
            raise ConfigError(f"{self.name} replaces the template words before the class name; "
                              "prompt_template has none")
        tok = self.backbone.tokenizer
        n_ctx = int((tok([prefix])[0] != 0).sum()) - 2  # without start and end tokens
        if not self.prompts:
            raise ConfigError(f"{self.name} needs the class prompts: build it with "
                              f"get_algorithm(cfg, Runtime(prompts=...))")
        return tok(list(self.prompts)).to(self.backbone.model.token_embedding.weight.device), \
            n_ctx

    def init_global(self, dim: int) -> Params | None:
        tokens, n_ctx = self._tokens()
        model = self.backbone.model
        module = PromptContext(n_ctx, model.token_embedding.weight.shape[1])
        with torch.no_grad():
            module.ctx.copy_(model.token_embedding(tokens[0, 1:1 + n_ctx]).cpu())
        return get_params(module)

    def build_module(self, dim: int) -> nn.Module:
        tokens, n_ctx = self._tokens()
        return PromptContext(n_ctx, self.backbone.model.token_embedding.weight.shape[1])

    def encode_context(self, ctx: torch.Tensor) -> torch.Tensor:
        """Normalised class embeddings with the context vectors ``ctx`` [M, width] in place of
        the template words, through the frozen text tower."""
        tokens, n_ctx = self._tokens()
        return through_text_tower(self.backbone.model, ctx.unsqueeze(0).expand(
            len(tokens), -1, -1), tokens, n_ctx)


def through_text_tower(model: Any, ctx: torch.Tensor, tokens: torch.Tensor,
                       n_ctx: int) -> torch.Tensor:
    """Normalised features of the prompts ``tokens`` [P, L] with the context vectors ``ctx``
    [P, M, width] in place of the M token embeddings after the start token, through the
    frozen open_clip text tower of ``model``."""
    from open_clip.transformer import text_global_pool

    x = model.token_embedding(tokens)
    x = torch.cat([x[:, :1], ctx.to(x.dtype), x[:, 1 + n_ctx:]], dim=1)
    x = model.transformer(x + model.positional_embedding, attn_mask=model.attn_mask)
    x = text_global_pool(model.ln_final(x), tokens, model.text_pool_type,
                         eos_token_id=getattr(model, "text_eos_id", None))
    proj = model.text_projection
    if proj is not None:
        x = proj(x) if isinstance(proj, nn.Linear) else x @ proj
    return F.normalize(x.float(), dim=-1)
