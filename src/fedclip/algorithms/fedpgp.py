"""FedPGP (Cui et al., ICML 2024, "Harmonizing Generalization and Personalization in Federated
Prompt Learning"): a global prompt, averaged by the server, plus a personal low-rank term that
never leaves its client. A client scores with the context

    ctx = sigma + U V        (sigma: n_ctx x width, global; U: n_ctx x rank, V: rank x width)

through the frozen text tower (CoOp's prompt, ``fedclip.backbones.PromptTower``), trained
with the task loss plus ``mu`` times a CLIP-guided contrastive term per class: the class's
features with the global prompt alone (``g_c``, ``sigma``) are the anchor, the frozen text
features of the placeholder prompt (``f0_c``, the initial token embeddings of "X X ... X
{class}" through the tower) the positive and the personalised features (``p_c``, ``sigma +
U V``) the negative:

    L_con = CE([cos(f0_c, g_c), cos(g_c, p_c)] / temp, target 0), averaged over the classes,

so the global prompt keeps the pretrained model's knowledge of the class names (it
generalises) while the low-rank term carries what is personal.

What follows the official code (github.com/TianyuCuiOvO/FedPGP, read for reference): ``sigma``,
``U`` and ``V`` start from N(0, 0.02^2) (``init=random``), the prompt's words are ``n_ctx``
placeholders "X" (16), ``rank`` 4 (its ``bottleneck``), ``mu`` 1 and ``temp`` 0.5; the
positive anchor is the frozen placeholder prompt's embedding, not a hand-written prompt; only
``sigma`` is averaged (weighted by the clients' train sizes).

Differences, each named: one prompt per client (the code's ``N`` prompts, default 1, are not
offered); the prompt is the run's template with the placeholder words in place of the words
before the class name ("X X ... X" + the rest of ``prompt_template``, where the code writes
"X ... X {class}."); ``init=template`` (not in the code) starts ``sigma`` at the template words'
own token embeddings, with the zero-shot prompt as the positive anchor; the held-out domain,
which has no personal term, is scored with the global prompt and the untrained ``U V``
(seeded, the same on every node). The personal term is not per class (one ``U V`` for every
class name), so the same parameters prompt classes never trained on: ``open_vocabulary``.
"""

from __future__ import annotations

from typing import Literal, cast

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from fedclip.adapters import get_params
from fedclip.algorithms.base import ClientJob
from fedclip.algorithms.promptfl import PromptFL, PromptFLClient
from fedclip.algorithms.registry import register
from fedclip.tensors import Params


class PGPOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    n_ctx: int = Field(16, ge=1, le=64, strict=True,
                       description="Context tokens (placeholder words; init=random).")
    rank: int = Field(4, ge=1, le=512, strict=True,
                      description="Rank of the personal term U V.")
    mu: float = Field(1.0, ge=0, allow_inf_nan=False,
                      description="Weight of the contrastive term.")
    temp: float = Field(0.5, gt=0, allow_inf_nan=False,
                        description="Temperature of the contrastive term.")
    init: Literal["random", "template"] = Field(
        "random", description="'random': N(0, 0.02^2) as the official code; 'template': the "
                              "global prompt starts at the template words.")


class PGPPrompt(nn.Module):
    """The global prompt ``ctx`` (sigma, averaged) and the personal low-rank ``U``, ``V``."""

    def __init__(self, n_ctx: int, width: int, rank: int) -> None:
        super().__init__()
        self.ctx = nn.Parameter(torch.zeros(n_ctx, width))
        self.U = nn.Parameter(torch.zeros(n_ctx, rank))
        self.V = nn.Parameter(torch.zeros(rank, width))

    def personalised(self) -> torch.Tensor:
        """The personalised context: the global prompt plus the personal low-rank term."""
        return self.ctx + self.U @ self.V


class FedPGPClient(PromptFLClient):
    """FedPGP's client side: scores with the personalised prompt; while training, keeps the
    global prompt's features of the step for the contrastive term (``local_loss``)."""

    _step: tuple[torch.Tensor, torch.Tensor] | None = None  # (global, personalised) features

    def class_text(self, module: nn.Module | None, class_text: torch.Tensor) -> torch.Tensor:
        if module is None:
            return class_text
        pgp = cast(PGPPrompt, module)
        personal = self.tower.encode(pgp.personalised())
        if module.training and torch.is_grad_enabled():
            self._step = (self.tower.encode(pgp.ctx), personal)  # for local_loss
        return personal

    def local_loss(self, loss: torch.Tensor, module: nn.Module, job: ClientJob) -> torch.Tensor:
        loss = super().local_loss(loss, module, job)
        step, self._step = self._step, None
        mu = float(job.config.values["mu"])
        if step is None or mu == 0:
            return loss
        glob, personal = step
        anchor = self.anchor.to(glob.device)
        logits = torch.stack([F.cosine_similarity(anchor, glob, dim=-1),
                              F.cosine_similarity(glob, personal, dim=-1)], dim=1)
        logits = logits / float(job.config.values["temp"])
        target = torch.zeros(len(logits), dtype=torch.long, device=logits.device)
        return loss + mu * F.cross_entropy(logits, target)


@register
class FedPGP(PromptFL):
    name = "fedpgp"
    summary = "a global prompt (averaged) plus a personal low-rank term (never sent)"
    personal = ("U", "V")
    Options = PGPOptions
    options: PGPOptions
    Client = FedPGPClient

    @property
    def tower(self):  # noqa: ANN201 - fedclip.backbones.PromptTower
        """The class prompts' tower: the context in place of ``n_ctx`` placeholder words
        (``init=template``: of the template's words)."""
        if self.options.init == "template":
            return super().tower
        return self.placeholder_tower(self.options.n_ctx)

    @property
    def anchor(self) -> torch.Tensor:
        """The positive anchor: the frozen text features of the prompt with its initial
        words (the placeholder prompt; ``init=template``: the zero-shot prompt)."""
        cache = self.__dict__.setdefault("_anchors", {})
        key = tuple(self.prompts)
        if key not in cache:
            tower = self.tower
            with torch.no_grad():
                cache[key] = tower.encode(tower.template_context())
        return cache[key]

    def init_global(self, dim: int) -> Params | None:
        tower, rank = self.tower, self.options.rank
        module = PGPPrompt(tower.n_ctx, tower.width, rank)
        draws = torch.Generator().manual_seed(self.cfg.seed)
        with torch.no_grad():
            for p in (module.ctx, module.U, module.V):
                p.copy_(torch.randn(p.shape, generator=draws) * 0.02)
            if self.options.init == "template":
                module.ctx.copy_(tower.template_context())
        return get_params(module)

    def build_module(self, dim: int) -> nn.Module:
        return PGPPrompt(self.tower.n_ctx, self.tower.width, self.options.rank)
