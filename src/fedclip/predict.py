"""Use a trained adapter: classify image files with the backbone it was trained on.

An adapter file (``adapter.safetensors`` in a run folder) carries its backbone spec, class
names, prompt template, dimension and logit scale, so nothing else is needed to use it.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from fedclip.algorithms import get_algorithm
from fedclip.algorithms.base import Runtime
from fedclip.backbones import LazyBackbone, resolve_device, weights_source
from fedclip.config import RunConfig
from fedclip.core.adapter_file import load_adapter
from fedclip.data.folder import IMG_EXTENSIONS, Domain
from fedclip.data.specs import class_to_text
from fedclip.errors import BackboneError, FedclipError
from fedclip.features import default_cache_dir, image_features, image_pixels


def list_images(inputs: Sequence[str | Path]) -> list[Path]:
    files: list[Path] = []
    for item in map(Path, inputs):
        if item.is_dir():
            files += sorted(p for p in item.rglob("*") if p.suffix.lower() in IMG_EXTENSIONS)
        elif item.is_file():
            files.append(item)
        else:
            raise FedclipError(f"{item} does not exist; pass image files or folders")
    if not files:
        raise FedclipError(f"no images found in {', '.join(map(str, inputs))}")
    return files


def predict(adapter_path: str | Path, inputs: Sequence[str | Path], backbone: str | None = None,
            cache_dir: str | None = None, top: int = 1, allow_download: bool = False
            ) -> list[dict]:
    """Predictions for every image: file, top classes with probabilities (unreadable: error).

    An adapter file names its backbone; a spec that would download weights (a pretrained tag,
    an hf-hub repository) is used only when the caller confirms it (``backbone`` equal to it)
    or passes ``allow_download``: a file from elsewhere cannot make this machine fetch an
    arbitrary repository."""
    if top < 1:
        raise FedclipError(f"--top must be at least 1 (got {top})")
    adapter = load_adapter(adapter_path)
    if backbone is not None and backbone != adapter.backbone:
        raise BackboneError(f"the adapter was trained on {adapter.backbone!r}, not {backbone!r};"
                            f" use --backbone {adapter.backbone} (or leave it out)")
    if weights_source(adapter.backbone) and backbone is None and not allow_download:
        raise BackboneError(f"the adapter names backbone {adapter.backbone!r}, which downloads "
                            f"weights; confirm it with --backbone {adapter.backbone} or pass "
                            f"--allow-download")
    # the adapter's own backbone: an algorithm that loads a backbone (fedavg-full, promptfl)
    # loads this one, which the download guard above covered, never the default
    try:
        run = RunConfig(algorithm=adapter.algorithm, backbone=adapter.backbone,
                        options={adapter.algorithm: adapter.options},
                        prompt_template=adapter.prompt_template, seed=adapter.seed)
    except ValueError as exc:
        raise FedclipError(f"{adapter_path} has settings fedclip cannot use ({exc})") from None
    lazy = LazyBackbone(adapter.backbone, resolve_device("auto"))
    files = [f.resolve() for f in list_images(inputs)]
    root = Path(os.path.commonpath([str(f.parent) for f in files]))
    domain = Domain("predict", root, tuple(files),
                    torch.zeros(len(files), dtype=torch.long).numpy(), ())
    prompts = [adapter.prompt_template.format(class_to_text(c)) for c in adapter.classes]
    from fedclip.task import class_text_features

    text = class_text_features(lazy, adapter.classes, adapter.prompt_template,
                               adapter.prompt_templates or None,
                               Path(cache_dir) if cache_dir else default_cache_dir())
    if text.features.shape[1] != adapter.dim:
        raise BackboneError(f"backbone {adapter.backbone} gives {text.features.shape[1]}-d "
                            f"features but the adapter expects {adapter.dim}")
    class_text = F.normalize(text.features, dim=-1)
    algorithm = get_algorithm(run, Runtime(tuple(prompts), class_text, text.logit_scale))
    client = algorithm.client
    # a pixel method (fedavg-full, fedmaple) runs its images through the backbone it
    # trains, on that backbone's device; the others score the cached features on the CPU
    pixels = algorithm.inputs == "pixels"
    device = torch.device(resolve_device(run.device) if pixels else "cpu")
    feats = image_pixels(lazy, domain, preprocess=client.preprocess()) if pixels else \
        image_features(lazy, domain, cache_dir, tokens=algorithm.inputs == "tokens")
    module = algorithm.build_module(adapter.dim)
    try:
        module.load_state_dict(adapter.params)
    except RuntimeError as exc:
        raise FedclipError(f"{adapter_path} does not hold a {adapter.algorithm} module of "
                           f"dimension {adapter.dim} ({str(exc).splitlines()[0]})") from None
    module = client.merged(module).to(device).eval()
    with torch.no_grad():  # eval_batch inputs per forward, as a run's evaluation
        emb = torch.cat([client.embed(module, chunk.to(device))
                         for chunk in feats.features.split(algorithm.eval_batch)])
        logits = client.logits(module, emb, client.class_text(module, class_text.to(device)),
                               text.logit_scale).cpu()
    probs = logits.softmax(dim=-1)
    rows: list[dict[str, Any]] = []
    for i, f in enumerate(files):
        if not feats.valid[i]:
            rows.append({"file": str(f), "error": "unreadable image"})
            continue
        p, idx = probs[i].topk(min(top, len(adapter.classes)))
        rows.append({"file": str(f), "class": adapter.classes[int(idx[0])],
                     "probability": float(p[0]),
                     "top": [(adapter.classes[int(j)], float(q)) for q, j in zip(p, idx,
                                                                             strict=True)]})
    return rows
