"""The attention adapter of FedCLIP (AttAI) and the classifier it feeds.

``I* = adapter(I) * I`` with ``adapter = Linear(d,d) -> Tanh -> Linear(d,d) -> Softmax(dim=1)``;
``I*`` and the class-prompt text features are L2-normalised and compared with the backbone's
logit scale. For d=512 the adapter has 2 * (512*512 + 512) = 525,312 parameters.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fedclip.tensors import Params


class AttentionAdapter(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.dim = dim
        self.attention = nn.Sequential(
            nn.Linear(dim, dim), nn.Tanh(), nn.Linear(dim, dim), nn.Softmax(dim=1)
        )

    def forward(self, image_features: torch.Tensor) -> torch.Tensor:
        return self.attention(image_features) * image_features


def build_adapter(dim: int, seed: int) -> AttentionAdapter:
    """A fresh adapter; the same seed gives the same weights (the global RNG is untouched)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return AttentionAdapter(dim)


def count_parameters(params: Params | nn.Module | None) -> int:
    if params is None:
        return 0
    if isinstance(params, nn.Module):
        return sum(p.numel() for p in params.parameters() if p.requires_grad)
    return sum(t.numel() for t in params.values())


def get_params(module: nn.Module) -> Params:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def embed(adapter: nn.Module | None, image_features: torch.Tensor) -> torch.Tensor:
    """Normalised image embeddings, through the adapter when there is one."""
    x = adapter(image_features) if adapter is not None else image_features
    return F.normalize(x, dim=-1)


def class_logits(image_emb: torch.Tensor, text_emb: torch.Tensor, logit_scale: float,
                 class_mask: torch.Tensor | None = None) -> torch.Tensor:
    """``s * I @ T.T``; classes outside ``class_mask`` get -inf (never predicted)."""
    return mask_classes(logit_scale * image_emb @ text_emb.T, class_mask)


def mask_classes(logits: torch.Tensor, class_mask: torch.Tensor | None) -> torch.Tensor:
    """``logits`` with the classes outside ``class_mask`` at -inf (never predicted)."""
    if class_mask is not None:
        logits = logits.masked_fill(~class_mask, float("-inf"))
    return logits
