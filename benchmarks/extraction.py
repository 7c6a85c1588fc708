"""Extraction throughput (images/s) against the backbone's pure forward on pre-decoded tensors,
and time per round with the feature cache against re-encoding every image every round (what
the reference code does).

    python benchmarks/extraction.py [--data-root ../shared/data/PACS] [--images 256]

Prints a markdown table; results and the machine are recorded in benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from fedclip.backbones import LazyBackbone
from fedclip.config import RunConfig
from fedclip.data.folder import Domain, scan_dataset
from fedclip.features import image_features
from fedclip.inprocess.experiment import build_federation, prepare

HERE = Path(__file__).resolve().parent


def subset(domain: Domain, n: int) -> Domain:
    step = max(1, len(domain) // n)
    idx = list(range(0, len(domain), step))[:n]
    return Domain(domain.name, domain.root, tuple(domain.files[i] for i in idx),
                  domain.labels[idx], domain.present)


def throughput(spec: str, domain: Domain, batch: int, workers: int) -> tuple[float, float]:
    from PIL import Image

    lazy = LazyBackbone(spec)
    model = lazy.get()
    first = model.preprocess(Image.open(domain.files[0]).convert("RGB"))[None]
    model.encode_images(first)  # one-time set-up (the stand-in's alignment) is not throughput
    with tempfile.TemporaryDirectory() as cache:
        start = time.perf_counter()
        image_features(lazy, domain, cache, batch_size=batch, workers=workers)
        pipeline = len(domain) / (time.perf_counter() - start)
    pixels = torch.stack([model.preprocess(Image.open(f).convert("RGB")) for f in domain.files])
    model.encode_images(pixels[:batch])  # warm-up
    start = time.perf_counter()
    for chunk in pixels.split(batch):
        model.encode_images(chunk)
    forward = len(domain) / (time.perf_counter() - start)
    return pipeline, forward


def round_times(data_root: str, n_per_domain: int) -> tuple[float, float]:
    """Seconds per round: cached features vs re-encoding every client's images each round."""
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "pacs"
        full = scan_dataset(data_root)
        for name, domain in full.domains.items():
            for f in subset(domain, n_per_domain).files:
                target = root / name / f.parent.name / f.name
                target.parent.mkdir(parents=True, exist_ok=True)
                target.symlink_to(f)
        cfg = RunConfig.build(data_root=str(root), backbone="standin", heldout="photo",
                              rounds=3, cache_dir=str(Path(tmp) / "cache"))
        prep = prepare(cfg)
        fed = build_federation(cfg, prep, "photo")
        state = fed.initial_state()
        start = time.perf_counter()
        for _ in range(3):
            fed.run_round(state)
        cached = (time.perf_counter() - start) / 3
        lazy = LazyBackbone("standin")
        lazy.get()
        start = time.perf_counter()
        for _ in range(2):  # the reference: every image through the backbone every round
            for name, domain in prep.dataset.domains.items():
                if name != "photo":
                    image_features(lazy, domain, Path(tmp) / f"nocache-{time.time_ns()}")
            fed.run_round(state)
        reencode = (time.perf_counter() - start) / 2
    return cached, reencode


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--data-root", default=str(HERE.parent.parent / "shared/data/PACS"))
    parser.add_argument("--images", type=int, default=256)
    args = parser.parse_args()
    photo = subset(scan_dataset(args.data_root).domains["photo"], args.images)
    print("| backbone | batch | loader workers | pipeline img/s | pure forward img/s | ratio |")
    print("|---|---|---|---|---|---|")
    for spec, batch in (("standin", 16), ("open_clip:ViT-B-32@none", 64)):
        for workers in (0, 1, 2):
            pipe, fwd = throughput(spec, photo, batch, workers)
            print(f"| {spec} | {batch} | {workers} | {pipe:.1f} | {fwd:.1f} | {pipe / fwd:.2f} |",
                  flush=True)
    cached, reencode = round_times(args.data_root, 64)
    print(f"\nPACS subset (64 images per domain, held out photo, stand-in): "
          f"{cached:.3f} s/round with the cache, {reencode:.2f} s/round re-encoding; "
          f"ratio {reencode / cached:.0f}x")


if __name__ == "__main__":
    main()
