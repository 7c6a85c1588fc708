"""Training losses on normalised embeddings (reference semantics), and the proximal term."""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F


def clip_loss(image_emb: torch.Tensor, text_emb: torch.Tensor, logit_scale: float) -> torch.Tensor:
    """Symmetric CLIP contrastive loss over a batch.

    ``text_emb[i]`` is the prompt of sample ``i``'s own class; targets are ``arange(batch)``, so
    two samples of the same class count as negatives of each other, as in the reference code.
    """
    logits = logit_scale * image_emb @ text_emb.T
    target = torch.arange(len(image_emb), device=image_emb.device)
    return (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2


def class_ce_loss(image_emb: torch.Tensor, class_text_emb: torch.Tensor, labels: torch.Tensor,
                  logit_scale: float) -> torch.Tensor:
    """Cross-entropy over all class prompts."""
    return F.cross_entropy(logit_scale * image_emb @ class_text_emb.T, labels)


def proximal_term(params: Mapping[str, torch.Tensor], reference: Mapping[str, torch.Tensor],
                  mu: float) -> torch.Tensor:
    """``mu/2 ||params - reference||^2`` over the parameters both name: FedProx's term (and
    Ditto's pull toward the global adapter), for one client trained alone
    (``dict(module.named_parameters())``) or among clients trained together."""
    terms = [((p - reference[k]) ** 2).sum() for k, p in params.items() if k in reference]
    if not terms:  # nothing in common: no pull
        return torch.zeros((), device=next((p.device for p in params.values()), None))
    return 0.5 * mu * torch.stack(terms).sum()
