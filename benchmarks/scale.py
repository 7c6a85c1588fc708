"""Extraction throughput and the cost of a round as clients grow, on one device.

    python benchmarks/scale.py --smoke                      # seconds, any machine (CI-sized)
    python benchmarks/scale.py --data-root ../shared/data/PACS --backbone standin
    python benchmarks/scale.py --data-root PACS --backbone open_clip:ViT-B-32@none \\
        --device cuda --lodo                                # the GPU targets, one run

Parts (each prints a markdown table; everything also goes to --out as JSON):

* extraction: images/s of the real pipeline (decode on the CPU with PIL in loader processes,
  or batched on the device) against the backbone's pure forward on pre-decoded tensors, at
  fp32 and under fp16 / bf16 autocast (GPU only), side by side in one run;
* rounds: seconds per round (train + aggregate) for 4, 40 and 400 clients (Dirichlet over
  the training domains; 10% participation at 400), clients one after another against
  trained together (``train_clients_together``);
* --lodo: leave-one-domain-out, every held-out domain x 200 rounds (--lodo-rounds),
  extraction included, with the median round.

--workers 2,8 repeats the extraction rows per loader-process count; --no-extraction and
--no-rounds skip those parts. Each part's table is printed, and the JSON rewritten, as soon as
it is measured (a run stopped by a time limit keeps what it measured). The GPU figures and
how they were taken: benchmarks/README.md, "GPU (H200)"; correctness on a GPU:
benchmarks/gpu_checks.py.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))


def smoke_data(root: Path) -> Path:
    from tests.conftest import make_image_folder

    classes = {c: 12 for c in ("cat", "dog", "red_car", "tree")}
    return make_image_folder(root, {d: classes for d in ("alpha", "beta", "gamma", "delta")},
                             size=48)


def tiny_backbone() -> str:
    import open_clip
    from tests.conftest import TINY_ARCH, TINY_CONFIG

    path = Path(tempfile.mkdtemp()) / f"{TINY_ARCH}.json"
    path.write_text(json.dumps(TINY_CONFIG))
    open_clip.add_model_config(path)
    return f"open_clip:{TINY_ARCH}@none"


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def extraction(cfg, images: int, workers: tuple[int, ...] = (2,)) -> list[dict]:  # noqa: ANN001
    from fedclip.backbones import LazyBackbone, resolve_device
    from fedclip.data.folder import Domain
    from fedclip.features import image_features
    from fedclip.task import scan

    device = resolve_device(cfg.device)
    dataset = scan(cfg)
    files = [f.resolve() for d in dataset.domains.values() for f in d.files][:images]
    domain = Domain("bench", Path("/"), tuple(files), torch.zeros(len(files)).long().numpy(),
                    (0,))
    rows = []
    precisions = ["fp32", "fp16", "bf16"] if device.startswith("cuda") else ["fp32"]
    decodes = ["cpu", "device"]
    for precision in precisions:
        lazy = LazyBackbone(cfg.backbone, device, precision)
        model = lazy.get()
        from PIL import Image

        with Image.open(files[0]) as img:
            one = model.preprocess(img.convert("RGB"))
        batch = one.unsqueeze(0).repeat(cfg.extract_batch_size or model.default_batch_size,
                                        1, 1, 1).to(device)
        lazy.encode_images(batch)  # warm up
        sync(device)
        start, n = time.perf_counter(), 0
        while n < len(files):
            lazy.encode_images(batch)
            n += len(batch)
        sync(device)
        forward = n / (time.perf_counter() - start)
        for decode in decodes:
            for n_workers in workers:
                with tempfile.TemporaryDirectory() as cache:
                    start = time.perf_counter()
                    feats = image_features(lazy, domain, cache, cfg.extract_batch_size,
                                           n_workers, decode=decode)
                    sync(device)
                    rate = len(files) / (time.perf_counter() - start)
                rows.append({"precision": precision, "decode": decode, "workers": n_workers,
                             "images": len(files), "pipeline": rate, "forward": forward,
                             "ratio": rate / forward, "valid": int(feats.valid.sum())})
    return rows


def rounds(cfg, clients: tuple[int, ...], repeats: int) -> list[dict]:  # noqa: ANN001
    from dataclasses import replace

    from fedclip.inprocess.experiment import build_federation
    from fedclip.task import plan_clients, prepare

    prep = prepare(cfg)
    heldout = list(prep.dataset.domains)[-1]
    training = len(prep.dataset.domains) - 1
    rows = []
    for total in clients:
        per_domain = max(1, round(total / training))
        participate = max(1, per_domain * training // 10) if total >= 400 else 0
        for together in (False, True):
            run_cfg = cfg.replace(clients_per_domain=per_domain, partition="dirichlet",
                                  dirichlet_alpha=0.5, clients_per_round=participate,
                                  train_clients_together=together, eval_every=10**6,
                                  rounds=repeats + 1)
            # the clients of this count (prepare planned the default one client per domain)
            fed = build_federation(run_cfg, replace(prep, splits=plan_clients(
                run_cfg, prep.dataset)), heldout)
            state = fed.initial_state()
            fed.run_round(state)  # warm up
            sync(fed.device.type)
            times = []
            for _ in range(repeats):
                sync(fed.device.type)
                start = time.perf_counter()
                record = fed.run_round(state)
                sync(fed.device.type)
                times.append(time.perf_counter() - start)
            rows.append({"clients": len(fed.clients), "per_round": len(record.train_loss),
                         "mode": "together" if together else "one after another",
                         "seconds": sorted(times)[len(times) // 2]})
    return rows


def flower_rounds(cfg, clients: tuple[int, ...], rounds: int = 5,  # noqa: ANN001
                  cpus_per_node: float = 1.0) -> list[dict]:
    """The same federations as Flower simulations (Ray; one SuperNode per client + the
    held-out one): steady seconds per round (rounds 2 to the one before last, which is
    evaluated on every node), messages included, and discovery. ``cpus_per_node``: Ray's
    ``client_resources`` (1.0: one actor per CPU)."""
    from flwr.simulation import run_simulation

    from fedclip.flower.client_app import build_client_app
    from fedclip.flower.server_app import build_server_app
    from fedclip.task import scan

    domains = list(scan(cfg).domains)
    heldout, training = domains[-1], len(domains) - 1
    rows = []
    for total in clients:
        per_domain = max(1, round(total / training))
        participate = max(1, per_domain * training // 10) if total >= 400 else 0
        with tempfile.TemporaryDirectory() as tmp:
            defaults = {"backbone": cfg.backbone, "heldout": heldout, "rounds": rounds,
                        "out": tmp, "clients-per-domain": per_domain,
                        "partition": "dirichlet", "clients-per-round": participate,
                        "eval-every": 10**6, "personalize-epochs": 0,
                        "data-root": cfg.data_root or "", "discover-timeout": 3600.0,
                        "cache-dir": cfg.cache_dir or ""}
            run_simulation(build_server_app(defaults), build_client_app(defaults),
                           num_supernodes=per_domain * training + 1,
                           backend_config={"client_resources": {"num_cpus": cpus_per_node}})
            r = json.loads((Path(tmp) / "results.json").read_text())["runs"][0]
        steady = [h["round_seconds"] for h in r["history"] if 1 < h["round"] < rounds and
                  "round_seconds" in h]
        rows.append({"clients": per_domain * training, "per_round": participate or
                     per_domain * training,
                     "mode": f"Flower simulation (Ray, {cpus_per_node:g} CPU per actor)",
                     "seconds": sorted(steady)[len(steady) // 2],
                     "discovery": r.get("discovery_seconds")})
    return rows


def lodo(cfg, rounds: int = 200) -> dict:  # noqa: ANN001
    from fedclip.inprocess.experiment import run

    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        results = run(cfg.replace(heldout="all", rounds=rounds, personalize_epochs=0,
                                  train_clients_together=True, cache_dir=str(Path(tmp) / "c")),
                      Path(tmp) / "run")
        seconds = time.perf_counter() - start
        times = sorted(h.round_seconds for r in results for h in r.history
                       if h.round > 0 and h.round_seconds is not None)
        return {"seconds": seconds, "rounds_each": rounds, "rounds": len(times),
                "round_seconds_median": times[len(times) // 2] if times else None,
                "generalization": sum(r.generalization or 0.0 for r in results) / len(results)}


def show(report: dict, part: str) -> None:
    """Print one part's table (each part as soon as it is measured: a run stopped by a time
    limit keeps what it measured)."""
    if part == "extraction" and report["extraction"]:
        print("| precision | decode | workers | pipeline img/s | pure forward img/s | ratio |")
        print("|---|---|---|---|---|---|")
        for r in report["extraction"]:
            print(f"| {r['precision']} | {r['decode']} | {r['workers']} | {r['pipeline']:.0f} "
                  f"| {r['forward']:.0f} | {r['ratio']:.2f} |")
    elif part == "rounds":
        print("| clients | trained per round | mode | s/round (train + aggregate) |")
        print("|---|---|---|---|")
        for r in report["rounds"]:
            disc = f" (discovery {r['discovery']:.1f} s)" if r.get("discovery") else ""
            print(f"| {r['clients']} | {r['per_round']} | {r['mode']}{disc} "
                  f"| {r['seconds']:.4f} |")
    elif part == "lodo":
        lodo = report["lodo"]
        median = lodo["round_seconds_median"]
        print(f"leave-one-domain-out, {lodo['rounds_each']} rounds each, extraction included: "
              f"{lodo['seconds']:.1f} s; median round (train, aggregate, evaluate) "
              f"{1000 * (median or float('nan')):.1f} ms over {lodo['rounds']} rounds (mean "
              f"generalization {100 * lodo['generalization']:.1f})")
    print(flush=True)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--smoke", action="store_true", help="tiny model, generated images")
    parser.add_argument("--data-root")
    parser.add_argument("--backbone", default="standin")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--images", type=int, default=2048)
    parser.add_argument("--workers", default="2",
                        help="loader processes for the extraction rows, e.g. 2,8")
    parser.add_argument("--clients", default="4,40,400")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--lodo", action="store_true")
    parser.add_argument("--lodo-rounds", type=int, default=200)
    parser.add_argument("--no-extraction", action="store_true")
    parser.add_argument("--no-rounds", action="store_true")
    parser.add_argument("--flower", default="", help="client counts to also run as Flower "
                                                     "simulations, e.g. 4,40")
    parser.add_argument("--ray-cpus", type=float, default=1.0,
                        help="Ray client_resources num_cpus per simulated node's actor")
    parser.add_argument("--out", default="benchmarks/results/scale.json")
    args = parser.parse_args()
    from fedclip.backbones import resolve_device
    from fedclip.config import RunConfig

    torch.set_num_threads(max(1, torch.get_num_threads()))
    backbone, root = args.backbone, args.data_root
    if args.smoke:
        backbone, root = tiny_backbone(), str(smoke_data(Path(tempfile.mkdtemp()) / "data"))
        args.images, args.clients, args.repeats = 96, "4,12", 2
    cfg = RunConfig.build(data_root=root, backbone=backbone, device=args.device,
                          extract_workers=2)
    device = resolve_device(cfg.device)
    name = torch.cuda.get_device_name() if device.startswith("cuda") else "CPU"
    report: dict = {"device": name, "torch": torch.__version__, "backbone": backbone,
                    "extraction": [], "rounds": []}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)

    def save(part: str) -> None:
        show(report, part)
        out.write_text(json.dumps(report, indent=2) + "\n")

    print(f"device: {name}, backbone: {backbone}\n", flush=True)
    if not args.no_extraction:
        report["extraction"] = extraction(cfg, args.images, tuple(
            int(w) for w in args.workers.split(",")))
        save("extraction")
    if not args.no_rounds:
        report["rounds"] = rounds(cfg, tuple(int(c) for c in args.clients.split(",")),
                                  args.repeats)
    if args.flower:
        report["rounds"] += flower_rounds(cfg, tuple(int(c) for c in args.flower.split(",")),
                                          cpus_per_node=args.ray_cpus)
    if report["rounds"]:
        save("rounds")
    if args.lodo:
        report["lodo"] = lodo(cfg, args.lodo_rounds)
        save("lodo")


if __name__ == "__main__":
    main()
