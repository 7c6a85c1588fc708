"""PromptFolio (Pan et al., NeurIPS 2024, "Federated Learning from Vision-Language Foundation
Models: Theoretical Analysis and Method"): a global prompt and a local prompt per client,
mixed like a portfolio. Both are CoOp context vectors through the frozen text tower (the
PromptFL code in ``fedclip.algorithms.promptfl``); the class embedding a client scores with is

    t_c = normalise((1 - theta) * g_c + theta * l_c)

where ``g_c`` and ``l_c`` are the normalised text features of class ``c`` with the global and
the local context. Each round a client trains both on its data; only the global context goes
to the server (FedAvg), the local one is the contract's personal parameter and never leaves
the client (kept in its state; a resumed run keeps it). ``theta`` (default 0.2, the mixing the
paper recommends for its setting) weighs the local prompt; ``theta = 0`` is PromptFL.

Choices where the paper leaves one open: both contexts start at the template words' own token
embeddings (round 0 is the zero-shot classifier), and the held-out domain, which has no local
prompt, is scored with the global context and the untrained local one (their mix at round 0's
local context). Runs on any backbone whose text tower can be prompted, as PromptFL.
"""

from __future__ import annotations

from typing import cast

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from fedclip.adapters import get_params
from fedclip.algorithms.promptfl import PromptContext, PromptFL, PromptFLClient
from fedclip.algorithms.registry import register
from fedclip.tensors import Params


class FolioOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    theta: float = Field(0.2, ge=0, le=1, allow_inf_nan=False,
                         description="Weight of the local prompt's class features.")


class PromptPair(nn.Module):
    """The global context (``ctx``, averaged) and this client's local one (``local.ctx``)."""

    def __init__(self, n_ctx: int, width: int) -> None:
        super().__init__()
        self.ctx = nn.Parameter(torch.zeros(n_ctx, width))
        self.local: PromptContext = PromptContext(n_ctx, width)


class PromptFolioClient(PromptFLClient):
    """PromptFolio's client side."""

    def class_text(self, module: nn.Module | None, class_text: torch.Tensor) -> torch.Tensor:
        if module is None:
            return class_text
        theta = self.options.theta
        glob = self.encode_context(cast(torch.Tensor, module.ctx))
        if theta == 0:
            return glob
        local = self.encode_context(cast(PromptPair, module).local.ctx)
        return F.normalize((1 - theta) * glob + theta * local, dim=-1)


class GlobalLocalPrompt(PromptFL):
    """A global context (sent, averaged) and a local one (``local.*``, personal), both
    starting at the template words: PromptFolio's and FedOTP's pair of prompts."""

    personal = ("local.*",)

    def init_global(self, dim: int) -> Params | None:
        start = super().init_global(dim)
        assert start is not None
        module = cast(PromptPair, self.build_module(dim))
        with torch.no_grad():
            module.ctx.copy_(start["ctx"])
            module.local.ctx.copy_(start["ctx"])
        return get_params(module)

    def build_module(self, dim: int) -> nn.Module:
        return PromptPair(self.tower.n_ctx, self.tower.width)


@register
class PromptFolio(GlobalLocalPrompt):
    name = "promptfolio"
    summary = "a global prompt (averaged) mixed with a personal local prompt (never sent)"
    Options = FolioOptions
    options: FolioOptions
    Client = PromptFolioClient
