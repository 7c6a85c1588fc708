"""Hugging Face transformers backbones: ``hf:ORG/MODEL`` (the hub; needs internet once) or
``hf:/path/to/saved`` (a folder written by ``save_pretrained``).

Any model that transformers exposes with ``get_image_features`` / ``get_text_features``
(``CLIPModel``, ``SiglipModel``, ...) loaded with ``AutoModel``; images go through the
model's own processor (``AutoProcessor``), texts through its tokenizer. The fingerprint holds
the model id (a local folder also by its files' sizes and times) and the transformers
version, so a cache never mixes two models. Flower's own CLIP baseline loads its weights this
way; most users already hold CLIP here.

It can be trained (``FINETUNABLE``): ``model`` is :class:`HfClip`, the transformers model
with CLIP's ``encode_image`` / ``encode_text`` (what ``fedavg-full`` and LoRA run), and
``tokenizer`` gives the tokens ``encode_text`` takes, as ``encode_texts`` tokenises.
"""

from __future__ import annotations

import hashlib
import pickle
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch import nn

from fedclip.config import EXTRACT_BATCH_SIZE
from fedclip.errors import BackboneError

FORMS = [
    ("hf:ORG/MODEL", "a transformers CLIP-style model from the hub, e.g. "
                     "hf:openai/clip-vit-base-patch32 (CLIPModel, SiglipModel, ...)"),
    ("hf:/path/to/folder", "the same, saved with save_pretrained (offline)"),
]
FINETUNABLE = True  # HfClip: the -full baselines and LoRA train it


def weights_to_download(rest: str) -> str | None:
    """The hub page this model would come from; None for a local folder or a cached model."""
    if Path(rest).expanduser().is_dir():
        return None
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return None  # transformers (and its hub client) missing: load() says so
    return (None if isinstance(try_to_load_from_cache(rest, "config.json"), str)
            else f"https://huggingface.co/{rest}")


class ProcessorPreprocess:
    """The model's image processor as a picklable ``PIL image -> [3, H, W]`` callable."""

    def __init__(self, image_processor) -> None:  # noqa: ANN001
        self.image_processor = image_processor

    def __call__(self, image: Image.Image) -> torch.Tensor:
        return self.image_processor(images=image, return_tensors="pt")["pixel_values"][0]


def _features(output) -> torch.Tensor:  # noqa: ANN001 - a tensor, or a model output
    return output if isinstance(output, torch.Tensor) else output.pooler_output


class HfClip(nn.Module):
    """A transformers CLIP-style model (``clip``) with open_clip's two encoder calls: raw
    features, differentiable (the backbone's ``encode_images`` / ``encode_texts`` run these
    under no_grad)."""

    def __init__(self, clip: nn.Module) -> None:
        super().__init__()
        self.clip: Any = clip  # CLIPModel, SiglipModel, ...

    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        return _features(self.clip.get_image_features(pixel_values=pixels))

    def encode_text(self, tokens: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """``tokens``: what :class:`TextTokens` gives (input ids, attention mask)."""
        return _features(self.clip.get_text_features(**tokens))


class TextTokens:
    """The model's tokenizer as ``texts -> tokens`` (a BatchEncoding: ``.to(device)``), padded
    to the longest text: what :meth:`HfClip.encode_text` takes."""

    def __init__(self, tokenizer) -> None:  # noqa: ANN001 - a transformers tokenizer
        self.tokenizer = tokenizer

    def __call__(self, texts: list[str]) -> Any:
        return self.tokenizer(texts, padding=True, return_tensors="pt")


class HfBackbone:
    default_batch_size = EXTRACT_BATCH_SIZE

    def __init__(self, name: str, device: str = "cpu") -> None:
        try:
            from transformers import AutoModel, AutoProcessor
        except ImportError:
            raise BackboneError("hf: backbones need transformers: pip install "
                                "'fedclip[hf]'") from None
        self.spec, self.name, self.device = f"hf:{name}", name, device
        try:
            with warnings.catch_warnings():  # torch's note on a pickle's protocol: refused below
                warnings.filterwarnings("ignore", message="Detected pickle protocol")
                # use_kernels=False: transformers would otherwise swap layers for kernels
                # fetched from the Hub when the model enters training (the `kernels`
                # package is installed with it): not the model that was asked for, and it
                # fails on a module left without parameters (FLoRA's working copy)
                model = AutoModel.from_pretrained(name, use_kernels=False)
            processor = AutoProcessor.from_pretrained(name)
        except (pickle.UnpicklingError, EOFError):  # torch.load(weights_only=True) refused a
            # pickled pytorch_model.bin (its text suggests weights_only=False: never here)
            raise BackboneError(f"{self.spec}: its weights are a pickle that safe loading "
                                f"refuses (no code from it was run); save the model with "
                                f"safetensors (save_pretrained's default) and pass that folder"
                                ) from None
        except (OSError, ValueError) as exc:
            reason = str(exc).splitlines()[0][:200]
            raise BackboneError(f"could not load {self.spec} ({reason}); offline, save the "
                                f"model once with save_pretrained and pass hf:/that/folder"
                                ) from None
        if not (hasattr(model, "get_image_features") and hasattr(model, "get_text_features")):
            raise BackboneError(f"{self.spec} is a {type(model).__name__}, which has no "
                                f"get_image_features / get_text_features (use a CLIP-style "
                                f"model)")
        self.model = HfClip(model).to(device).eval().requires_grad_(False)
        self.tokenizer = TextTokens(processor.tokenizer)
        self.preprocess = ProcessorPreprocess(processor.image_processor)
        self.embed_dim = int(self.encode_texts(["a"]).shape[1])
        scale = getattr(model, "logit_scale", None)
        self.logit_scale = float(scale.exp()) if scale is not None else 100.0

    @torch.no_grad()
    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.model.encode_image(pixels.to(self.device)).float().cpu()

    def _tower(self):  # noqa: ANN202 - the model's vision transformer
        vision = getattr(self.model.clip, "vision_model", None)
        if vision is None or not hasattr(vision, "post_layernorm") or \
                not hasattr(self.model.clip, "visual_projection"):
            raise BackboneError(f"{self.spec} gives no patch tokens: a "
                                f"{type(self.model.clip).__name__} has no vision_model with "
                                f"post_layernorm and visual_projection (use a CLIPModel)")
        return vision

    def token_count(self) -> int:
        config = self._tower().config
        return int((config.image_size // config.patch_size) ** 2)

    @torch.no_grad()
    def encode_image_tokens(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``last_hidden_state`` through ``post_layernorm`` and ``visual_projection``: the
        class token's is the pooled embedding, the others the patch tokens."""
        states = self._tower()(pixel_values=pixels.to(self.device)).last_hidden_state
        out = self.model.clip.visual_projection(self._tower().post_layernorm(states))
        return out[:, 0].float().cpu(), out[:, 1:].float().cpu()

    @torch.no_grad()
    def encode_texts(self, texts: list[str]) -> torch.Tensor:
        return self.model.encode_text(self.tokenizer(texts).to(self.device)).float().cpu()

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.model.parameters())


def fingerprint(rest: str) -> str:
    from importlib.metadata import version

    if not rest:
        raise BackboneError("hf: needs a model: hf:openai/clip-vit-base-patch32 or "
                            "hf:/path/to/saved/model")
    ident = f"{rest}|transformers={version('transformers')}"
    folder = Path(rest).expanduser()
    if folder.is_dir():
        for f in sorted(folder.rglob("*")):
            if f.is_file():
                st = f.stat()
                ident += f"|{f.relative_to(folder)}|{st.st_size}|{st.st_mtime_ns}"
    return hashlib.sha256(ident.encode()).hexdigest()[:16]


def load(rest: str, device: str) -> HfBackbone:
    return HfBackbone(str(Path(rest).expanduser()) if Path(rest).expanduser().is_dir()
                      else rest, device)
