"""Training losses on normalised embeddings (reference semantics)."""

from __future__ import annotations

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
