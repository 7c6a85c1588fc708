"""The GPU code paths checked against the CPU, in one short run (CI has no GPU; run it where
one is, next to ``scale.py --device cuda``):

    python benchmarks/gpu_checks.py --device cuda --out gpu_checks.json
    python benchmarks/gpu_checks.py --device cpu                  # the same checks, CPU only

A tiny random open_clip model on generated images; each check prints one PASS/FAIL line with
its numbers, the process exits 1 when any failed.

* algorithms: every registered algorithm, 2 rounds + 1 personalization epoch, 2 clients per
  domain, on the device and on the CPU from the SAME cached features (extracted once on the
  CPU): it runs, its trainable modules and their inputs sit on the device while it trains,
  and its saved adapters match the CPU run's (max abs difference; algorithms that train on
  pixels run the backbone on the device too, so they get a looser bound);
* together: clients trained together (vmap, one Adam) on the device against the sequential
  loop on the device and on the CPU (uneven clients, batches of one);
* decode: nvJPEG / batched device decoding against the PIL path (JPEG and PNG, a broken
  file), as the unit test does on the CPU;
* precision: fp16 / bf16 autocast features against fp32 on the device.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import time
import traceback
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

PIXEL_ALGORITHMS = {"fedavg-full", "fedprox-full", "fedavg-cnn", "fedprox-cnn", "promptfl"}
TOL_FEATURES, TOL_PIXELS = 1e-4, 5e-2  # max abs difference of saved parameters, device vs CPU
# clients trained together against one after another: 1e-5 on the CPU (tests/test_scale.py);
# a GPU's batched and single matmuls round differently, and 14 Adam steps at lr 1e-2 carry
# it to ~3e-5, as far as the sequential loop on the GPU is from the CPU's (H200, 2026-12)
TOL_TOGETHER = 1e-4


def tiny_arch() -> str:
    import open_clip
    from tests.conftest import TINY_ARCH, TINY_CONFIG, TINY_SPEC

    path = Path(tempfile.mkdtemp()) / f"{TINY_ARCH}.json"
    path.write_text(json.dumps(TINY_CONFIG))
    open_clip.add_model_config(path)
    return TINY_SPEC


def record(results: list[dict], name: str, ok: bool, **numbers: object) -> None:
    results.append({"check": name, "ok": bool(ok), **numbers})
    shown = ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}"
                      for k, v in numbers.items())
    print(f"{'PASS' if ok else 'FAIL'} {name}: {shown}", flush=True)


def spy_devices(seen: set) -> None:
    """Record (parameter device, input device) of every module trained through embed."""
    from fedclip.algorithms import registry
    from fedclip.algorithms.base import Algorithm

    registry._load()
    for cls in {Algorithm, *registry.ALGORITHMS.values()}:
        if "embed" not in vars(cls):
            continue
        real = vars(cls)["embed"]

        def embed(self, module, x, _real=real):  # noqa: ANN001, ANN202
            if isinstance(module, torch.nn.Module) and module.training:
                params = next(module.parameters(), None)
                if params is not None:
                    seen.add((params.device.type, x.device.type))
            return _real(self, module, x)

        cls.embed = embed  # type: ignore[method-assign]


def check_algorithms(device: str, arch: str, root: Path, work: Path, results: list[dict],
                     only: list[str] | None) -> None:
    from safetensors.torch import load_file

    from fedclip.algorithms.registry import names
    from fedclip.config import RunConfig
    from fedclip.inprocess.experiment import run

    seen: set = set()
    spy_devices(seen)
    cache = work / "cache"  # shared: the device runs reuse the CPU's features
    base = {"data_root": str(root), "backbone": arch, "heldout": "gamma", "rounds": 2,
            "lr": 1e-3, "batch_size": 8, "personalize_epochs": 1, "clients_per_domain": 2,
            "extract_workers": 0, "extract_decode": "cpu", "cache_dir": str(cache)}
    small = {a: {f"{a}.image_size": 64} for a in ("fedavg-cnn", "fedprox-cnn")}  # AlexNet
    ordered = sorted(names(), key=lambda a: a in PIXEL_ALGORITHMS)  # the slow ones last
    cases = [(a, small.get(a, {})) for a in ordered] + [
        ("fedclip+together", {"train_clients_together": True})]
    for algorithm, extra in cases:
        label, algorithm = algorithm, algorithm.split("+")[0]
        if only and algorithm not in only:
            continue
        out: dict[str, dict[str, torch.Tensor]] = {}
        gen: dict[str, float] = {}
        try:
            for side, dev in (("ref", "cpu"), ("dev", device)):
                seen.clear()
                cfg = RunConfig.build(algorithm=algorithm, device=dev, **base, **extra)
                folder = work / f"{label}-{side}"
                start = time.perf_counter()
                result = run(cfg, folder)[0]
                gen[side] = float(result.generalization or 0.0)
                out[side] = {f"{p.stem}/{k}": v for p in sorted((folder / "gamma").glob(
                    "adapter*.safetensors")) for k, v in load_file(p).items()}
                placed = sorted(seen)
                seconds = time.perf_counter() - start
            common = sorted(set(out["ref"]) & set(out["dev"]))
            diff = max(((out["ref"][k] - out["dev"][k]).abs().max().item() for k in common),
                       default=0.0)
            finite = all(torch.isfinite(v).all() for v in out["dev"].values())
            tol = TOL_PIXELS if algorithm in PIXEL_ALGORITHMS else TOL_FEATURES
            on_device = all(p == torch.device(device).type and x == p for p, x in placed)
            ok = (finite and diff <= tol and on_device
                  and set(out["ref"]) == set(out["dev"]))
            record(results, f"algorithm {label}", ok, max_abs_diff=diff, tensors=len(common),
                   trained_on=placed, generalization_cpu=gen["ref"],
                   generalization_device=gen["dev"], device_seconds=seconds)
        except Exception as exc:  # noqa: BLE001 - every algorithm is checked, each reported
            record(results, f"algorithm {label}", False, error=f"{type(exc).__name__}: {exc}",
                   where=traceback.format_exc(limit=-3).strip().splitlines()[-3:])


def check_together(device: str, results: list[dict]) -> None:
    from fedclip.adapters import build_adapter, get_params
    from fedclip.algorithms import get_algorithm
    from fedclip.config import RunConfig
    from fedclip.core.client import ClientJob, Split
    from fedclip.core.together import train_together

    for algorithm in ("fedclip", "fedprox"):
        for loss in ("clip", "ce"):
            cfg = RunConfig.build(algorithm=algorithm, loss=loss, batch_size=32, local_epochs=2,
                                  lr=1e-2, **{"fedprox.mu": 0.5} if algorithm == "fedprox"
                                  else {})
            algo = get_algorithm(cfg)
            d, classes = 64, 7
            text = torch.nn.functional.normalize(
                torch.randn(classes, d, generator=torch.Generator().manual_seed(0)), dim=-1)
            start = get_params(build_adapter(d, seed=1))

            def jobs(dev: str, algo=algo, text=text, start=start, d=d,  # noqa: ANN001
                     classes=classes) -> list[ClientJob]:
                made = []
                for i, n in enumerate((1, 7, 33, 64, 65, 200)):
                    g = torch.Generator().manual_seed(i)
                    split = Split(torch.randn(n, d, generator=g).to(dev),
                                  torch.randint(0, classes, (n,), generator=g).to(dev))
                    params = {k: v.to(dev) for k, v in start.items()}
                    made.append(ClientJob(f"c{i}", split, params, params, {},
                                          algo.round_config(3), {}, text.to(dev), 20.0,
                                          seed=100 + i))
                return made

            cpu = [algo.client.train_client(job) for job in jobs("cpu")]
            seq = [algo.client.train_client(job) for job in jobs(device)]
            tog = train_together(algo.client, jobs(device))

            def gap(a, b) -> float:  # noqa: ANN001
                return max(max((x.params[k].cpu() - y.params[k].cpu()).abs().max().item()
                               for k in x.params) for x, y in zip(a, b, strict=True))

            where = {v.device.type for u in tog for v in u.params.values()}
            steps = [u.steps for u in tog] == [u.steps for u in seq]
            record(results, f"together {algorithm}/{loss}",
                   gap(seq, tog) < TOL_TOGETHER and gap(cpu, seq) < TOL_TOGETHER and steps
                   and where == {torch.device(device).type},
                   together_vs_sequential=gap(seq, tog), device_vs_cpu=gap(cpu, seq),
                   params_on=sorted(where))


def check_decode(device: str, arch: str, work: Path, results: list[dict]) -> None:
    from PIL import Image

    from fedclip.config import RunConfig
    from fedclip.task import prepare

    root = work / "decode"
    gen = np.random.default_rng(0)
    for domain in ("alpha", "beta"):
        for cls in ("cat", "dog"):
            folder = root / domain / cls
            folder.mkdir(parents=True)
            for k in range(4):
                size = (48 + 8 * k, 40 + 4 * k)
                pix = np.clip(gen.normal(120 + 60 * (cls == "dog"), 30, (*size[::-1], 3)),
                              0, 255).astype(np.uint8)
                ext = "png" if k == 3 else "jpg"
                Image.fromarray(pix).save(folder / f"{k}.{ext}", **(
                    {"quality": 95} if ext == "jpg" else {}))
            (folder / "broken.jpg").write_bytes(b"\xff\xd8not a jpeg")
    for workers in (0, 2):
        cfg = RunConfig.build(data_root=str(root), backbone=arch, heldout="beta",
                              extract_workers=workers, device=device,
                              cache_dir=str(work / f"decode-cache-{workers}"))
        pil = prepare(cfg.replace(extract_decode="cpu"))
        dev = prepare(cfg.replace(extract_decode="device"))
        cos, same = 1.0, True
        for d in ("alpha", "beta"):
            a, b = pil.features[d], dev.features[d]
            same = same and torch.equal(a.valid, b.valid) and int(a.valid.sum()) == 8
            cos = min(cos, float(torch.nn.functional.cosine_similarity(
                a.features[a.valid], b.features[b.valid]).min()))
        record(results, f"decode device vs PIL (workers {workers})", same and cos > 0.98,
               min_cosine=cos, valid_match=same)


def check_precision(device: str, arch: str, work: Path, results: list[dict]) -> None:
    from tests.conftest import make_image_folder

    from fedclip.config import RunConfig
    from fedclip.task import prepare

    root = make_image_folder(work / "precision", {d: {"cat": 6, "dog": 6}
                                                  for d in ("alpha", "beta")}, size=40)
    base = RunConfig.build(data_root=str(root), backbone=arch, heldout="beta", device=device,
                           extract_workers=0, extract_decode="cpu",
                           cache_dir=str(work / "precision-cache"))
    ref = prepare(base).features["alpha"].features
    for precision in ("fp16", "bf16"):
        feats = prepare(base.replace(precision=precision)).features["alpha"].features
        cos = float(torch.nn.functional.cosine_similarity(ref, feats, dim=1).min())
        record(results, f"precision {precision} vs fp32", cos > 0.99 and feats.dtype ==
               torch.float32 and not torch.equal(ref, feats), min_cosine=cos,
               dtype=str(feats.dtype))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--only", default="", help="comma-separated algorithms (default: all)")
    parser.add_argument("--skip", default="", help="comma-separated parts to skip: "
                                                   "algorithms,together,decode,precision")
    parser.add_argument("--out", default="")
    args = parser.parse_args()
    from tests.conftest import make_image_folder

    from fedclip.backbones import resolve_device

    device = resolve_device(args.device)
    logging.getLogger("fedclip").setLevel(logging.ERROR)  # skipped files: expected here
    logging.getLogger("root").setLevel(logging.ERROR)  # open_clip: "no pretrained weights"
    skip = set(filter(None, args.skip.split(",")))
    arch = tiny_arch()
    results: list[dict] = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        root = make_image_folder(work / "data", {d: {"cat": 8, "dog": 8, "red_car": 8}
                                                 for d in ("alpha", "beta", "gamma")}, size=32)
        parts = {
            "together": lambda: check_together(device, results),
            "decode": lambda: check_decode(device, arch, work, results),
            "precision": lambda: check_precision(device, arch, work, results),
            "algorithms": lambda: check_algorithms(device, arch, root, work, results, list(
                filter(None, args.only.split(","))) or None),
        }
        for name, part in parts.items():
            if name in skip:
                continue
            try:
                part()
            except Exception as exc:  # noqa: BLE001 - one broken part must not hide the rest
                record(results, name, False, error=f"{type(exc).__name__}: {exc}",
                       where=traceback.format_exc(limit=-3).strip().splitlines()[-3:])
    failed = [r["check"] for r in results if not r["ok"]]
    print(f"\n{len(results) - len(failed)} of {len(results)} checks passed on {device}"
          + (f"; failed: {', '.join(failed)}" if failed else ""))
    if args.out:
        Path(args.out).write_text(json.dumps({"device": device, "torch": torch.__version__,
                                              "checks": results}, indent=1, default=str) + "\n")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
