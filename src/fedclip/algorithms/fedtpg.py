"""FedTPG (Qiu et al., ICLR 2024, "Text-driven Prompt Generation for Vision-Language Models
in Federated Learning"): instead of a context, the clients learn a small **prompt generator**
that writes the context from the class names, shared and averaged by the server. Since the
context is a function of the names, the generator prompts classes it never trained on: a
client (or the held-out domain, or ``protocol=base2novel``'s novel classes) gives it the names
it has, and it writes their prompt.

The generator, as the paper describes it: ``n_ctx`` learnable queries (N(0, 0.02^2)) cross-
attend (``heads`` heads) to the class names' text embeddings (the frozen text tower's
normalised features of each bare class name), a feed-forward block (GEGLU, 4x wide) is added
to the result, then ``depth`` self-attention blocks (pre-norm, residual; 0 by default as in
the authors' configuration); the output is the context, ``[n_ctx, width]`` in the token
embedding's space, which takes the place of ``n_ctx`` placeholder words "X" before the class
name in every class prompt, through the frozen text tower. Everything in the generator is
averaged (FedAvg, weighted by train size), so differential privacy and the robust rules apply.

Written from the paper; the authors' code (AGPL-3.0) was read for understanding only and is
not copied. Differences, each named: the context conditions on the class names of the run
(under ``base2novel``: the base classes while training, the novel classes when scoring them),
where the authors' clients condition on their own class subsets (a client here holds images
of any class); the prompt is the run's template with the placeholders in place of the words
before the class name; the optimiser is the run's Adam (the authors': SGD, cosine schedule).
"""

from __future__ import annotations

from typing import cast

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from fedclip.adapters import get_params
from fedclip.algorithms.promptfl import PromptFL, PromptFLClient
from fedclip.algorithms.registry import register
from fedclip.errors import ConfigError
from fedclip.tensors import Params


class TPGOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    n_ctx: int = Field(4, ge=1, le=64, strict=True, description="Context tokens generated.")
    depth: int = Field(0, ge=0, le=8, strict=True,
                       description="Self-attention blocks after the cross-attention.")
    heads: int = Field(4, ge=1, le=64, strict=True, description="Attention heads.")


class GEGLUFeedForward(nn.Module):
    """LayerNorm, a linear map to 2 x 4 widths, a GELU gate, a linear map back."""

    def __init__(self, width: int, mult: int = 4) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.up = nn.Linear(width, 2 * mult * width)
        self.down = nn.Linear(mult * width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        value, gate = self.up(self.norm(x)).chunk(2, dim=-1)
        return self.down(value * F.gelu(gate))


class SelfBlock(nn.Module):
    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.attn = nn.MultiheadAttention(width, heads, batch_first=True)
        self.ff = GEGLUFeedForward(width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        return x + self.ff(x)


class PromptGenerator(nn.Module):
    """Learnable queries cross-attending to the class-name embeddings -> the context."""

    def __init__(self, n_ctx: int, width: int, text_dim: int, heads: int, depth: int) -> None:
        super().__init__()
        self.queries = nn.Parameter(torch.randn(n_ctx, width) * 0.02)
        self.norm_q = nn.LayerNorm(width)
        self.norm_kv = nn.LayerNorm(text_dim)
        self.cross = nn.MultiheadAttention(width, heads, kdim=text_dim, vdim=text_dim,
                                           batch_first=True)
        self.ff = GEGLUFeedForward(width)
        self.blocks = nn.ModuleList(SelfBlock(width, heads) for _ in range(depth))

    def forward(self, names: torch.Tensor) -> torch.Tensor:
        """``names``: [C, text_dim] embeddings of the class names -> [n_ctx, width]."""
        kv = self.norm_kv(names).unsqueeze(0)
        x = self.cross(self.norm_q(self.queries).unsqueeze(0), kv, kv, need_weights=False)[0]
        x = x + self.ff(x)
        for block in self.blocks:
            x = block(x)
        return x[0]


class FedTPGClient(PromptFLClient):
    """FedTPG's client side: the generator writes the context from the class names."""

    def class_text(self, module: nn.Module | None, class_text: torch.Tensor) -> torch.Tensor:
        if module is None:
            return class_text
        generator = cast(PromptGenerator, module)
        names = self.name_features.to(generator.queries.device)
        return self.tower.encode(generator(names))


@register
class FedTPG(PromptFL):
    name = "fedtpg"
    summary = "a prompt generator from the class names' embeddings, averaged (open-vocabulary)"
    Options = TPGOptions
    options: TPGOptions
    Client = FedTPGClient

    @property
    def tower(self):  # noqa: ANN201 - fedclip.backbones.PromptTower
        """The class prompts' tower, the context in place of ``n_ctx`` placeholder words."""
        return self.placeholder_tower(self.options.n_ctx)

    @property
    def name_features(self) -> torch.Tensor:
        """The class names' normalised text features (the frozen tower, bare names): what
        the generator conditions on."""
        cache = self.__dict__.setdefault("_names", {})
        key = self.class_names()
        if key not in cache:
            cache[key] = F.normalize(self.backbone.encode_texts(list(key)).float(), dim=-1)
        return cache[key]

    def _generator(self) -> PromptGenerator:
        tower, opts = self.tower, self.options
        if tower.width % opts.heads:
            raise ConfigError(f"{self.name}.heads={opts.heads} must divide the token width "
                              f"{tower.width}")
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.cfg.seed)  # the same start on every node
            return PromptGenerator(opts.n_ctx, tower.width, self.name_features.shape[1],
                                   opts.heads, opts.depth)

    def init_global(self, dim: int) -> Params | None:
        return get_params(self._generator())

    def build_module(self, dim: int) -> nn.Module:
        return self._generator()
