"""Per-round wall time and bytes: in-process runner, Flower simulation (Ray), Flower
deployment on localhost (SuperLink + 4 SuperNodes), fp32 against fp16 transfer.

    python benchmarks/flower_rounds.py [--rounds 5]

Stand-in backbone on the embedded PACS sample (features cached first, so every runtime
measures rounds, not extraction). Start-up (process and Ray start, node discovery) is
reported apart from steady-state rounds.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # tests.deployment: the localhost harness

from fedclip.config import RunConfig  # noqa: E402
from fedclip.inprocess.experiment import run  # noqa: E402

HELDOUT = "sketch"


def steady(history: list[dict], key: str) -> float:
    rounds = [r[key] for r in history if r["round"] > 1 and key in r]  # round 1 warms up
    return sum(rounds) / len(rounds) if rounds else float("nan")


def in_process(rounds: int, out: Path) -> dict:
    start = time.perf_counter()
    r = run(RunConfig.build(backbone="standin", heldout=HELDOUT, rounds=rounds), out)[0].to_json()
    wall = time.perf_counter() - start
    return {"runtime": "in-process", "wall": wall, "startup": wall - r["train_seconds"],
            "round": steady(r["history"], "round_seconds"), "bytes": r["bytes_per_round"],
            "gen": r["generalization"]}


def simulation(rounds: int, out: Path, transfer: str = "fp32") -> dict:
    from flwr.simulation import run_simulation

    from fedclip.flower.client_app import build_client_app
    from fedclip.flower.server_app import build_server_app

    defaults = {"backbone": "standin", "heldout": HELDOUT, "rounds": rounds,
                "out": str(out), "transfer": transfer}
    start = time.perf_counter()
    run_simulation(build_server_app(defaults), build_client_app(defaults), num_supernodes=4,
                   backend_config={"client_resources": {"num_cpus": 1}})
    wall = time.perf_counter() - start
    r = json.loads((out / "results.json").read_text())["runs"][0]
    return {"runtime": f"Flower simulation ({transfer})", "wall": wall,
            "startup": wall - r["train_seconds"], "round": steady(r["history"],
                                                                   "round_seconds"),
            "bytes": r["bytes_per_round"], "gen": r["generalization"]}


def deployment(rounds: int, work: Path, transfer: str = "fp32") -> dict:
    from tests.deployment import LocalDeployment

    out = work / "out"
    nodes = [f"domain='{d}'" for d in ("art_painting", "cartoon", "photo", "sketch")]
    start = time.perf_counter()
    with LocalDeployment(work, nodes) as dep:
        dep.run([f"rounds={rounds}", f"out='{out}'", f"heldout='{HELDOUT}'", "min-nodes=4",
                 f"transfer='{transfer}'", f"cache-dir='{os.environ['FEDCLIP_CACHE']}'"])
    wall = time.perf_counter() - start
    r = json.loads((out / "results.json").read_text())["runs"][0]
    return {"runtime": f"Flower deployment, localhost ({transfer})", "wall": wall,
            "startup": wall - r["train_seconds"],
            "round": steady(r["history"], "round_seconds"), "bytes": r["bytes_per_round"],
            "gen": r["generalization"]}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--skip-deployment", action="store_true")
    args = parser.parse_args()
    os.environ.setdefault("FEDCLIP_CACHE", str(Path(tempfile.mkdtemp()) / "cache"))
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        rows.append(in_process(args.rounds, tmp / "inproc"))  # also fills the feature cache
        rows.append(simulation(args.rounds, tmp / "sim32"))
        rows.append(simulation(args.rounds, tmp / "sim16", "fp16"))
        if not args.skip_deployment:
            for transfer in ("fp32", "fp16"):
                (tmp / f"dep-{transfer}").mkdir()
                rows.append(deployment(args.rounds, tmp / f"dep-{transfer}", transfer))
    print(f"| runtime ({args.rounds} rounds) | start-up s | s/round (steady) | bytes/round "
          f"| held-out acc |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['runtime']} | {r['startup']:.1f} | {r['round']:.2f} | {r['bytes']:,} | "
              f"{100 * r['gen']:.1f} |")


if __name__ == "__main__":
    main()
