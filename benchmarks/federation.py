"""A real federation's costs: node discovery and rounds of a localhost deployment whose nodes
hold only their own domain, against nodes that all see the whole data root (how nodes were
set up before sites held their own data); and what robust aggregation costs per round.

    python benchmarks/federation.py [--rounds 3] [--skip-deployment]

Stand-in backbone on the embedded PACS sample (3 training nodes + the held-out node),
features cached beforehand, so discovery measures the node processes and the checks, not
extraction. The aggregation part times ``fedclip.aggregation.combine`` on adapter-sized
updates (d = 512: 525,312 values per client), one thread.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # tests.deployment: the localhost harness

DOMAINS = ("art_painting", "cartoon", "photo", "sketch")


def deployment(work: Path, cache: Path, rounds: int, own_data: bool) -> dict:
    from tests.deployment import LocalDeployment

    from fedclip.data.sources import embedded_sample_root

    configs = []
    for d in DOMAINS:
        if own_data:
            site = work / "sites" / d
            shutil.copytree(embedded_sample_root() / d, site / d)
            configs.append(f"data-root='{site}' domain='{d}'")
        else:
            configs.append(f"domain='{d}'")  # every node sees the whole embedded root
    out = work / "out"
    items = [f"rounds={rounds}", f"out='{out}'", "heldout='sketch'", "min-nodes=4",
             f"cache-dir='{cache}'", "round-timeout=120.0", "personalize-epochs=0"]
    start = time.perf_counter()
    with LocalDeployment(work, configs) as dep:
        dep.run(items)
    wall = time.perf_counter() - start
    r = json.loads((out / "results.json").read_text())["runs"][0]
    steady = [h["round_seconds"] for h in r["history"] if h["round"] > 1]
    return {"nodes": "own domain only" if own_data else "whole data root",
            "discovery": r["discovery_seconds"], "round": sum(steady) / len(steady),
            "wall": wall}


def aggregation_costs(clients: tuple[int, ...] = (4, 40), repeats: int = 5) -> list[dict]:
    import torch

    from fedclip.aggregation import combine

    torch.set_num_threads(1)
    gen = torch.Generator().manual_seed(0)
    rows = []
    for n in clients:
        updates = [{"w1": torch.randn(512, 512, generator=gen), "b1": torch.randn(512),
                    "w2": torch.randn(512, 512, generator=gen), "b2": torch.randn(512)}
                   for _ in range(n)]
        weights = [float(i + 1) for i in range(n)]
        row = {"clients": n}
        for mode in ("weighted", "median", "trimmed-mean"):
            combine(updates, weights, mode)
            start = time.perf_counter()
            for _ in range(repeats):
                combine(updates, weights, mode)
            row[mode] = (time.perf_counter() - start) / repeats
        rows.append(row)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--skip-deployment", action="store_true")
    args = parser.parse_args()
    print("| clients | weighted mean (ms) | median (ms) | trimmed mean (ms) |")
    print("|---|---|---|---|")
    for row in aggregation_costs():
        print(f"| {row['clients']} | {1e3 * row['weighted']:.1f} | {1e3 * row['median']:.1f} "
              f"| {1e3 * row['trimmed-mean']:.1f} |")
    if args.skip_deployment:
        return
    from fedclip.config import RunConfig
    from fedclip.inprocess.experiment import run

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        cache = tmp / "cache"
        run(RunConfig.build(backbone="standin", heldout="sketch", rounds=0,
                            cache_dir=str(cache)), tmp / "warm")  # extract once
        rows = [deployment(tmp / name, cache, args.rounds, own)
                for name, own in (("shared", False), ("own", True))]
    print()
    print("| nodes hold | discovery (s) | s/round (steady) | wall (s) |")
    print("|---|---|---|---|")
    for r in rows:
        print(f"| {r['nodes']} | {r['discovery']:.1f} | {r['round']:.1f} | {r['wall']:.0f} |")


if __name__ == "__main__":
    main()
