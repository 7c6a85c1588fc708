"""Clients trained together (``torch.func.vmap`` over the algorithm's own module, one
``torch.optim.Adam``) against one after another (``Algorithm.train_client``), side by side in
one process: seconds per round and the largest difference of the resulting adapters.

    OMP_NUM_THREADS=1 python benchmarks/together.py            # CPU, one thread
    python benchmarks/together.py --device cuda                 # where a GPU is at hand

Features are generated (PACS-like shapes: the stand-in's d=384, 7 classes; 3 clients of 1,200
train images as full PACS leave-one-domain-out, 39 of 120 as the 40-client Dirichlet shape),
so the timing is the trainer's alone.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from fedclip.algorithms import get_algorithm
from fedclip.config import RunConfig
from fedclip.core.client import ClientJob, Split, round_seed
from fedclip.core.together import train_together


def jobs(algorithm, clients: int, size: int, dim: int, device: str) -> list[ClientJob]:  # noqa: ANN001
    generator = torch.Generator().manual_seed(0)
    text = F.normalize(torch.randn(7, dim, generator=generator), dim=-1).to(device)
    init = {k: v.to(device) for k, v in (algorithm.init_global(dim) or {}).items()}
    out = []
    for c in range(clients):
        y = torch.randint(0, 7, (size,), generator=generator)
        x = (text.cpu()[y] * 3 + torch.randn(size, dim, generator=generator)).to(device)
        name = f"client{c}"
        out.append(ClientJob(name, Split(x, y.to(device)), init, init, {},
                             algorithm.round_config(1), {}, text, 100.0,
                             round_seed(0, 1, name)))
    return out


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--shapes", default="3x1200,39x120")
    parser.add_argument("--out", default="benchmarks/results/together.json")
    args = parser.parse_args()
    rows = []
    for algorithm_name in ("fedclip", "fedprox"):
        algorithm = get_algorithm(RunConfig.build(backbone="standin", algorithm=algorithm_name,
                                                  lr=1e-3))
        for shape in args.shapes.split(","):
            clients, size = (int(v) for v in shape.split("x"))
            batch = jobs(algorithm, clients, size, 384, args.device)
            times: dict[str, list[float]] = {"sequential": [], "together": []}
            for _ in range(args.repeats + 1):  # the first of each is a warm-up
                for mode in times:
                    sync(args.device)
                    start = time.perf_counter()
                    updates = (train_together(algorithm.client, batch) if mode == "together"
                               else [algorithm.client.train_client(job) for job in batch])
                    sync(args.device)
                    times[mode].append(time.perf_counter() - start)
                    if mode == "sequential":
                        reference = updates
                    else:
                        diff = max((u.params[k] - r.params[k]).abs().max().item()
                                   for u, r in zip(updates, reference, strict=True)
                                   for k in r.params)
            seq, tog = (statistics.median(times[m][1:]) for m in ("sequential", "together"))
            rows.append({"algorithm": algorithm_name, "clients": clients, "train": size,
                         "sequential": seq, "together": tog, "ratio": tog / seq,
                         "max_abs_diff": diff})
    print(f"device: {args.device}, torch threads: {torch.get_num_threads()}\n")
    print("| algorithm | clients x train | one after another s | together s | together / "
          "sequential | max abs diff |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['algorithm']} | {r['clients']} x {r['train']} | {r['sequential']:.3f} | "
              f"{r['together']:.3f} | {r['ratio']:.2f} | {r['max_abs_diff']:.1e} |")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"device": args.device, "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
