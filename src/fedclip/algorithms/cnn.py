"""The paper's FL baselines without CLIP: FedAvg and FedProx training a torchvision classifier
on pixels (the paper: AlexNet), on the same splits as every other algorithm.

``--set fedavg-cnn.model=alexnet@imagenet`` (ImageNet weights, a new C-way head; needs
internet once) or ``alexnet@none`` (seeded random init, offline); any torchvision
classification model by name (``resnet18@imagenet``...). Images are decoded once, resized to
``image_size`` and normalised with ImageNet statistics, kept in memory as pixels; the whole
network trains with cross-entropy and travels every round (AlexNet: 57M parameters for 7
classes). The run's backbone still gives the zero-shot line of the report.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from fedclip.adapters import get_params
from fedclip.algorithms.base import Algorithm, ClientSide
from fedclip.algorithms.fedprox import FedProxClient
from fedclip.algorithms.registry import register
from fedclip.errors import BackboneError, ConfigError
from fedclip.tensors import Params

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


class CnnOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    model: str = Field("alexnet@none", pattern=r"^[A-Za-z0-9_]+@(none|imagenet)$",
                       description="torchvision model @none (random) or @imagenet.")
    image_size: int = Field(224, ge=32, le=1024)


class CnnProxOptions(CnnOptions):
    mu: float = Field(0.01, ge=0, allow_inf_nan=False)


def _resize_normalise(size: int) -> Callable:
    from torchvision import transforms

    return transforms.Compose([transforms.Resize(size), transforms.CenterCrop(size),
                               transforms.ToTensor(),
                               transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)])


class TorchvisionClassifierClient(ClientSide):
    """TorchvisionClassifier's client side."""

    def preprocess(self) -> Callable | None:
        return _resize_normalise(self.options.image_size)

    def embed(self, module: nn.Module | None, x: torch.Tensor) -> torch.Tensor:
        if module is None:  # zero-shot lines come from the backbone's features, not here
            raise ConfigError(f"{self.name} has no zero-shot classifier of its own")
        return module(x)  # class logits

    def class_text(self, module: nn.Module | None, class_text: torch.Tensor) -> torch.Tensor:
        # logits pass through class_logits unchanged; on the run's device (a GPU's logits)
        return torch.eye(self._classes(), device=class_text.device)

    def task_loss(self, emb: torch.Tensor, labels: torch.Tensor, class_text: torch.Tensor,
                  logit_scale: float) -> torch.Tensor:
        return F.cross_entropy(emb, labels)


class TorchvisionClassifier(Algorithm):
    uses_text = "none"  # class logits from the network, no prompt
    inputs = "pixels"
    eval_batch = 64
    has_zero_shot = False
    open_vocabulary = False  # the network's last layer has an output per class
    Options = CnnOptions
    options: CnnOptions
    Client = TorchvisionClassifierClient

    def _classes(self) -> int:
        if not self.prompts:
            raise ConfigError(f"{self.name} needs the classes: build it with "
                              f"get_algorithm(cfg, Runtime(prompts=...))")
        return len(self.prompts)

    def _build(self, pretrained: bool) -> nn.Module:
        from torchvision import models

        arch, tag = self.options.model.split("@")
        if arch not in models.list_models(module=models):
            raise ConfigError(f"{arch!r} is not a torchvision classification model; e.g. "
                              f"alexnet, resnet18, mobilenet_v3_small")
        if not pretrained or tag == "none":
            return models.get_model(arch, weights=None, num_classes=self._classes())
        try:
            model = models.get_model(arch, weights="DEFAULT")
        except Exception as exc:  # the hub raises many types when offline
            reason = type(exc).__name__
            raise BackboneError(f"could not load ImageNet weights for {arch} ({reason}); "
                                f"offline, use {arch}@none") from None
        head = _last_linear(model)
        old = getattr_path(model, head)
        assert isinstance(old, nn.Linear)  # _last_linear found it as one
        setattr_path(model, head, nn.Linear(old.in_features, self._classes()))
        return model

    def init_global(self, dim: int) -> Params | None:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.cfg.seed)
            return get_params(self._build(pretrained=True))

    def build_module(self, dim: int) -> nn.Module:
        return self._build(pretrained=False)


def _last_linear(model: nn.Module) -> str:
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    if not names:
        raise ConfigError("the model has no linear classification head to replace")
    return names[-1]


def getattr_path(model: nn.Module, path: str) -> nn.Module:
    """The attribute at a dotted path (``features.0``)."""
    for part in path.split("."):
        model = getattr(model, part)
    return model


def setattr_path(model: nn.Module, path: str, value: nn.Module) -> None:
    """Set the attribute at a dotted path."""
    *parents, last = path.split(".")
    setattr(getattr_path(model, ".".join(parents)) if parents else model, last, value)


@register
class FedAvgCnn(TorchvisionClassifier):
    name = "fedavg-cnn"
    summary = "a torchvision classifier on pixels (the paper's AlexNet FedAvg baseline)"


class FedProxCnnClient(TorchvisionClassifierClient):
    """FedProxCnn's client side."""

    proximal_weight = FedProxClient.proximal_weight


@register
class FedProxCnn(TorchvisionClassifier):
    name = "fedprox-cnn"
    summary = "the same with the proximal term (the paper's AlexNet FedProx baseline)"
    Options = CnnProxOptions
    Client = FedProxCnnClient
