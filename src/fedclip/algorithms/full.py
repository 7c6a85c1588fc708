"""FedAvg and FedProx that fine-tune the whole backbone: the paper's baselines.

Both CLIP encoders train with the same contrastive loss (the reference code never released
these; users asked for them). No feature cache is possible: images go through the backbone at
every step (decoded once, kept in memory as pixels), so on a CPU they are practical only for
a small backbone or a small subset. The trainable-parameter and byte counts are those of the
whole model: 151,277,313 for ViT-B/32, 288x FedCLIP's adapter.

Open_clip backbones (``open_clip:ARCH@TAG``) and transformers CLIP models (``hf:``, as
``fedclip.backbones.hf.HfClip``): the stand-in's encoders are not a jointly trained pair.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from fedclip.adapters import get_params
from fedclip.algorithms.base import Algorithm, ClientSide
from fedclip.algorithms.fedprox import FedProx, FedProxClient
from fedclip.algorithms.registry import register
from fedclip.tensors import Params


class FullFineTuningClient(ClientSide):
    """FullFineTuning's client side."""

    def embed(self, module: nn.Module | None, x: torch.Tensor) -> torch.Tensor:
        model: Any = module if module is not None else self.backbone.model  # a CLIP
        return F.normalize(model.encode_image(x).float(), dim=-1)

    def class_text(self, module: nn.Module | None, class_text: torch.Tensor) -> torch.Tensor:
        if module is None:  # the frozen backbone: its cached prompt features
            return class_text
        tokens = self.backbone.tokenizer(list(self.prompts)).to(x_device(module))
        clip: Any = module  # a copy of the backbone's model
        return F.normalize(clip.encode_text(tokens).float(), dim=-1)


class FullFineTuning(Algorithm):
    uses_text = "tower"  # both encoders train
    inputs = "pixels"
    eval_batch = 32
    Client = FullFineTuningClient

    @property
    def backbone(self):  # noqa: ANN201 - fedclip.backbones.FinetunableBackbone
        """The trained backbone (loaded once)."""
        if getattr(self, "_backbone", None) is None:
            from fedclip.backbones import load_finetunable, resolve_device

            self._backbone = load_finetunable(self.cfg.backbone, resolve_device(self.cfg.device),
                                              f"{self.name} fine-tunes the backbone")
        return self._backbone

    def init_global(self, dim: int) -> Params | None:
        return get_params(self.backbone.model)

    def build_module(self, dim: int) -> nn.Module:
        module = copy.deepcopy(self.backbone.model)
        return module.requires_grad_(True)


@register
class FedAvgFull(FullFineTuning):
    name = "fedavg-full"
    summary = "both CLIP encoders fine-tuned (the paper's FedAvg baseline)"


class FedProxFullClient(FullFineTuningClient):
    """FedProxFull's client side."""

    proximal_weight = FedProxClient.proximal_weight  # the same objective, on the whole model


@register
class FedProxFull(FullFineTuning):
    name = "fedprox-full"
    summary = "the same, plus the proximal term"
    Options = FedProx.Options
    Client = FedProxFullClient
def x_device(module: nn.Module) -> torch.device:
    """The device inputs go to."""
    return next(module.parameters()).device
