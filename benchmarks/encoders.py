"""What training through an encoder costs: one local step of each pixel method against the
backbone's plain forward, on the same batch, side by side.

    OMP_NUM_THREADS=2 python benchmarks/encoders.py                       # ViT-B/32, random
    OMP_NUM_THREADS=2 python benchmarks/encoders.py --batch 8 --steps 5 --out enc.json
    python benchmarks/encoders.py --device cuda --precision bf16 --batch 64
    python benchmarks/encoders.py --smoke                                 # seconds (tests, CI)

The methods are read from the registry: every algorithm with ``inputs = "pixels"`` that trains
through its run's backbone (it has a ``backbone``; a torchvision classifier of its own is
listed as skipped), so a method added later is measured too. A method that refuses the
backbone (one ConfigError or BackboneError line) is skipped with that line.

For each method, ``--steps`` times, alternated: the backbone's plain image forward without
gradients (what feature extraction runs), then one local step of the method as
``fedclip.core.client.train_local`` runs it (its module's forward through the frozen or
trained encoders, the text tower where the method uses it, the loss, backward and the Adam
step, under the run's ``--precision``), both on the same batch of random pixels at the
backbone's image size. Reported: images per second of each (the median step), their ratio
(how many plain forwards one training step costs) and the method's trainable parameters (what
it sends each round). One warm-up step of each comes first (none with ``--smoke``).
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

CLASSES = ("dog", "elephant", "giraffe", "guitar", "horse", "house", "person")  # PACS
DEFAULT_BACKBONE = "open_clip:ViT-B-32@none"
SMOKE_ARCH = "fedclip-encoders-smoke"
SMOKE_CONFIG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 32, "patch_size": 16,
                   "head_width": 16},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2,
                 "layers": 2},
}



class NotMeasured(Exception):
    """A method whose one local step this benchmark cannot build generically (why)."""

def smoke_backbone() -> str:
    """A tiny random open_clip architecture (two layers each), registered in this process."""
    import open_clip

    folder = Path(tempfile.mkdtemp(prefix="fedclip-encoders-"))
    (folder / f"{SMOKE_ARCH}.json").write_text(json.dumps(SMOKE_CONFIG))
    open_clip.add_model_config(folder / f"{SMOKE_ARCH}.json")
    return f"open_clip:{SMOKE_ARCH}@none"


def encoder_methods() -> tuple[list[str], dict[str, str]]:
    """The registry's pixel methods that train through the run's backbone, and the other
    pixel methods with why they are not measured."""
    from fedclip.algorithms import algorithm_class, names

    measured, skipped = [], {}
    for name in names():
        cls = algorithm_class(name)
        if cls.inputs != "pixels":
            continue
        if hasattr(cls, "backbone"):
            measured.append(name)
        else:
            skipped[name] = "trains a network of its own, not the run's backbone"
    return measured, skipped


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _timed(fn: Callable[[], Any], device: str) -> float:
    _sync(device)
    start = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - start


def local_step(algorithm: Any, init: dict, pixels: torch.Tensor, labels: torch.Tensor,
               class_text: torch.Tensor, logit_scale: float) -> Callable[[], None]:
    """One step of ``train_local``'s loop for ``algorithm`` on this batch (the module, the
    Adam and the precision of ``fedclip.core.client``)."""
    from fedclip.core.client import (
        Split,
        adam,
        autocast,
        client_job,
        grad_scaler,
        working_module,
    )

    client, device = algorithm.client, pixels.device
    config = algorithm.round_config(1)
    job = client_job(client, "bench", Split(pixels, labels), init, {}, config, {}, class_text,
                     logit_scale)
    module = working_module(client, pixels.shape[1], device, init)
    module.train()
    if not any(p.requires_grad for p in module.parameters()):
        raise NotMeasured("its client draws its trainable adapters each round (FLoRA: fresh "
                          "adapters of its rank on the merged weights); its step is FedIT's "
                          "at that rank")
    optimizer = adam(algorithm.cfg, [{"params": list(module.parameters()), "lr": config.lr}])
    scaler = grad_scaler(client, device)

    def step() -> None:
        with autocast(client, device):
            emb = client.embed(module, pixels)
            text = client.class_text(module, class_text)
            loss = client.task_loss(emb, labels, text, logit_scale)
            total = client.local_loss(loss, module, job)
        float(total.detach())  # train_local's finiteness check: a sync point
        optimizer.zero_grad(set_to_none=True)
        if scaler is None:
            total.backward()
            optimizer.step()
        else:
            scaler.scale(total).backward()
            scaler.step(optimizer)
            scaler.update()

    return step


def plain_forward(model: Any, pixels: torch.Tensor, algorithm: Any) -> Callable[[], None]:
    """The backbone's image forward on this batch without gradients, under the precision the
    method's step runs with (what feature extraction runs)."""
    from fedclip.core.client import autocast

    def forward() -> None:
        with torch.no_grad(), autocast(algorithm.client, pixels.device):
            model.encode_image(pixels)

    return forward


def measure(args: argparse.Namespace) -> dict[str, Any]:
    from PIL import Image

    from fedclip.algorithms import get_algorithm
    from fedclip.algorithms.base import Runtime
    from fedclip.backbones import load_backbone, resolve_device
    from fedclip.config import RunConfig
    from fedclip.errors import FedclipError

    device = resolve_device(args.device)
    spec = args.backbone or (smoke_backbone() if args.smoke else DEFAULT_BACKBONE)
    steps, warmup = (1, 0) if args.smoke else (args.steps, 1)
    batch = 2 if args.smoke and args.batch is None else (args.batch or 8)
    names, skipped = encoder_methods()
    prompts = tuple(f"a picture of a {c}" for c in CLASSES)
    out: dict[str, Any] = {
        "backbone": spec, "device": device, "precision": args.precision, "batch": batch,
        "steps": steps, "threads": torch.get_num_threads(), "torch": torch.__version__,
        "methods": {}, "skipped": skipped}
    plain: Any = None
    for name in names:
        cfg = RunConfig.build(backbone=spec, algorithm=name, device=device,
                              precision=args.precision, batch_size=batch, lr=1e-5)
        try:
            probe = get_algorithm(cfg, Runtime(prompts, None, None, 2))
            _ = probe.backbone  # a method that refuses the backbone does so here
        except FedclipError as exc:
            skipped[name] = str(exc)
            continue
        del probe
        if plain is None:  # the frozen backbone: its plain forward and the class prompts
            plain = load_backbone(spec, device)
            with torch.no_grad():
                class_text = torch.nn.functional.normalize(
                    plain.encode_texts(list(prompts)), dim=-1).to(device)
            # the backbone's own preprocessing decides the input size (open_clip, hf: and
            # plug-ins alike), read off one blank image
            size = tuple(plain.preprocess(Image.new("RGB", (256, 256))).shape[-2:])
            generator = torch.Generator().manual_seed(0)
            pixels = torch.randn(batch, 3, *size, generator=generator).to(device)
            labels = (torch.arange(batch) % len(CLASSES)).to(device)
        algorithm = get_algorithm(cfg, Runtime(prompts, class_text, plain.logit_scale, 2))
        init = algorithm.init_global(plain.embed_dim)
        trainable = sum(v.numel() for v in algorithm.shared(init).values())
        try:
            step = local_step(algorithm, init, pixels, labels, class_text, plain.logit_scale)
        except NotMeasured as exc:
            skipped[name] = str(exc)
            continue

        forward = plain_forward(plain.model, pixels, algorithm)
        for _ in range(warmup):
            forward()
            step()
        times: dict[str, list[float]] = {"forward": [], "step": []}
        for _ in range(steps):  # alternated: the machine's load hits both alike
            times["forward"].append(_timed(forward, device))
            times["step"].append(_timed(step, device))
        fwd, stp = (statistics.median(times[k]) for k in ("forward", "step"))
        out["methods"][name] = {
            "trainable_params": trainable, "bytes_per_direction": 4 * trainable,
            "forward_images_per_second": batch / fwd, "step_images_per_second": batch / stp,
            "step_over_forward": stp / fwd, "seconds": times}
        del algorithm, init, step
        gc.collect()
    return out


def report(out: dict[str, Any]) -> str:
    lines = [f"{out['backbone']} on {out['device']} ({out['precision']}, {out['threads']} "
             f"threads), batch {out['batch']}, median of {out['steps']} steps",
             f"{'method':<16}{'trainable':>14}{'forward img/s':>15}{'step img/s':>12}"
             f"{'step/forward':>14}"]
    for name, m in out["methods"].items():
        lines.append(f"{name:<16}{m['trainable_params']:>14,}"
                     f"{m['forward_images_per_second']:>15.2f}"
                     f"{m['step_images_per_second']:>12.2f}{m['step_over_forward']:>13.1f}x")
    lines += [f"skipped {name}: {why}" for name, why in out["skipped"].items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backbone", default=None,
                        help=f"backbone spec (default {DEFAULT_BACKBONE}; --smoke: a tiny one)")
    parser.add_argument("--batch", type=int, default=None, help="images per step (default 8)")
    parser.add_argument("--steps", type=int, default=5, help="timed steps of each (median)")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--precision", default="fp32", choices=["fp32", "fp16", "bf16"])
    parser.add_argument("--smoke", action="store_true",
                        help="a tiny model, one step, no warm-up: seconds (tests, CI)")
    parser.add_argument("--out", type=Path, default=None, help="write the numbers as JSON")
    args = parser.parse_args(argv)
    out = measure(args)
    print(report(out))
    if args.out is not None:
        args.out.write_text(json.dumps(out, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
