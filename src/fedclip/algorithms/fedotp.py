"""FedOTP (Li et al., CVPR 2024, "Global and Local Prompts Cooperation via Optimal Transport
for Federated Learning"): a global prompt (sent, averaged) and a local prompt per client
(personal, never sent), both CoOp contexts through the frozen text tower exactly as PromptFL
and PromptFolio prompt it (``fedclip.algorithms.promptfl``), and an image's patch tokens
matched to each class's N = 2 prompt features by optimal transport.

For an image with normalised patch tokens ``f_1..f_M`` (the token store,
``inputs = "tokens"``) and class ``c`` with normalised prompt features ``g_c`` (global
context) and ``l_c`` (local), ``S[m, n] = <f_m, p_n>`` (``p = (g_c, l_c)``) and the cost
``C = 1 - S``; the plan

    T* = argmin_T <T, C> - eps H(T)   s.t.  T 1_N <= 1_M / M,  T^T 1_M = gamma 1_N / N     (1)

moves the ``gamma`` share of the token mass that matches the prompts best (``gamma`` = 0.8:
the unbalanced relaxation; 1 is balanced transport), and the class score is

    logit_c = s * sum_{m,n} T*[m, n] S[m, n]                                                 (2)

trained with cross-entropy (the plan is computed without gradients, as in the paper's code).

Solvers (``fedotp.transport``, see ``fedclip.algorithms.transport``): ``official`` (default)
is the released code's one-sided scaling loop for (1) (``u = min(a / K v, 1)``,
``v = b / K^T u``, ``K = exp(-C / eps)``, stopped when the mean change is under ``tol`` or
after ``iterations``); ``balanced`` is POT's batched Sinkhorn (gamma ignored: both marginals
exact, the code's ``OT=Sinkhorn``); ``unbalanced`` is POT's ``sinkhorn_unbalanced`` with both
marginals relaxed by ``rho * KL`` (the paper's general unbalanced form; ``rho = inf``:
balanced). Defaults are the released scripts': eps 0.01, gamma (``TOP_PERCENT``) 0.8,
100 iterations, tol (``THRESH``) 1e-3.

Differences from the released code: the contexts start at the template words' embeddings
(round 0 is zero-shot; the code draws 16 random context tokens, std 0.02); clients train
with the run's Adam, not SGD; the kernel is computed in float64 (with eps 0.01 a cost near 1
underflows float32 to 0, where the code returns NaN and skips the batch); the held-out domain,
which has no local prompt, is scored with the global one and the untrained local one (as
PromptFolio). Zero-shot (no parameters) scores the pooled embedding, row 0 of a token input.
"""

from __future__ import annotations

from typing import Literal, cast

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from fedclip.algorithms.promptfl import PromptFLClient
from fedclip.algorithms.promptfolio import GlobalLocalPrompt, PromptPair
from fedclip.algorithms.registry import register
from fedclip.algorithms.transport import plan


class OTPOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    transport: Literal["official", "balanced", "unbalanced"] = Field(
        "official", description="official: the released code's one-sided scaling loop; "
                                "balanced: POT Sinkhorn; unbalanced: POT KL-relaxed.")
    eps: float = Field(0.01, gt=0, allow_inf_nan=False, description="Entropic regularisation.")
    gamma: float = Field(0.8, gt=0, le=1, allow_inf_nan=False,
                         description="Share of token mass moved (official; 1: balanced).")
    iterations: int = Field(100, ge=1, description="Most scaling iterations.")
    tol: float = Field(1e-3, gt=0, allow_inf_nan=False,
                       description="Stop when the scalings change less (mean).")
    rho: float = Field(1.0, gt=0, description="KL marginal relaxation (unbalanced; inf: "
                                              "balanced).")


def token_inputs(x: torch.Tensor) -> torch.Tensor:
    """A token input [n, 1 + T, d], every row normalised (row 0: the pooled embedding)."""
    return F.normalize(x, dim=-1)


class FedOTPClient(PromptFLClient):
    """FedOTP's client side: prompts through the text tower, tokens matched by transport."""

    def embed(self, module: nn.Module | None, x: torch.Tensor) -> torch.Tensor:
        return token_inputs(x)

    def class_text(self, module: nn.Module | None, class_text: torch.Tensor) -> torch.Tensor:
        """[C, 2, d]: each class's global and local prompt features (no module: [C, d],
        the class prompts' features)."""
        if module is None:
            return class_text
        pair = cast(PromptPair, module)
        return torch.stack([self.encode_context(cast(torch.Tensor, pair.ctx)),
                            self.encode_context(pair.local.ctx)], dim=1)

    def logits(self, module: nn.Module | None, emb: torch.Tensor, class_text: torch.Tensor,
               logit_scale: float) -> torch.Tensor:
        if class_text.dim() == 2:  # zero-shot: the pooled embedding
            return logit_scale * emb[:, 0] @ class_text.T
        return logit_scale * self.transported(emb[:, 1:], class_text)

    def transported(self, tokens: torch.Tensor, prompts: torch.Tensor) -> torch.Tensor:
        """(2): ``sum T* S`` for every image and class, [B, C]."""
        o = self.options
        b, m = tokens.shape[:2]
        c, n = prompts.shape[:2]
        sim = torch.einsum("bmd,cnd->bcmn", tokens, prompts).reshape(b * c, m, n)
        cost = (1.0 - sim.detach()).double()
        a = torch.full((b * c, m), 1.0 / m, dtype=cost.dtype, device=cost.device)
        mass = 1.0 if o.transport != "official" else o.gamma
        y = torch.full((b * c, n), mass / n, dtype=cost.dtype, device=cost.device)
        t = plan(o.transport, cost, a, y, o.eps, o.iterations, o.tol, o.rho).to(sim.dtype)
        return (t * sim).sum(dim=(1, 2)).view(b, c)

    def task_loss(self, emb: torch.Tensor, labels: torch.Tensor, class_text: torch.Tensor,
                  logit_scale: float) -> torch.Tensor:
        return F.cross_entropy(self.logits(None, emb, class_text, logit_scale), labels)


@register
class FedOTP(GlobalLocalPrompt):
    name = "fedotp"
    summary = ("global prompt (averaged) + personal local prompt, patch tokens matched to "
               "them by unbalanced OT")
    inputs = "tokens"
    eval_batch = 256
    Options = OTPOptions
    options: OTPOptions
    Client = FedOTPClient

