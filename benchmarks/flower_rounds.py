"""Per-round wall time and bytes: in-process runner, Flower simulation (Ray), Flower
deployment on localhost (SuperLink + 4 SuperNodes), fp32 against fp16 transfer, and Flower's
own floor.

    python benchmarks/flower_rounds.py [--rounds 5]
    python benchmarks/flower_rounds.py --skip-simulation --deployments fp32,floor

Stand-in backbone on the embedded PACS sample (features cached first, so every runtime
measures rounds, not extraction). Start-up (process and Ray start, node discovery) is
reported apart from steady-state rounds.

**Flower's floor** (``benchmarks/floor_app``): the same localhost deployment and the same
messages per round (the adapter's payload down to and back from each of 3 training nodes, an
evaluation message to the held-out node, one exchange, replies checked every 0.2 s) with an
app that imports only flwr and numpy and returns what it receives: a deployed fedclip round
is stated as a ratio to what Flower itself costs.
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
    """The mean of ``key`` over rounds 2 to the one before last (round 1 warms up; the last
    round is also evaluated on every node in an exchange of its own)."""
    last = max(r["round"] for r in history)
    rounds = [r[key] for r in history if 1 < r["round"] < last and key in r]
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


def deployment(rounds: int, work: Path, transfer: str = "fp32", label: str = "",
               env: dict[str, str] | None = None, extra: tuple[str, ...] = (),
               app: Path | None = None) -> dict:
    """A localhost deployment, 4 SuperNodes; ``env``: for the SuperLink and SuperNodes (a
    Flower setting, or PYTHONPATH to measure another checkout); ``app``: that checkout."""
    from tests.deployment import PROJECT, LocalDeployment

    out = work / "out"
    nodes = [f"domain='{d}'" for d in ("art_painting", "cartoon", "photo", "sketch")]
    saved = dict(os.environ)
    os.environ.update(env or {})
    start = time.perf_counter()
    try:
        with LocalDeployment(work, nodes) as dep:
            dep.run([f"rounds={rounds}", f"out='{out}'", f"heldout='{HELDOUT}'", "min-nodes=4",
                     f"transfer='{transfer}'", f"cache-dir='{os.environ['FEDCLIP_CACHE']}'",
                     "personalize-epochs=0", *extra], app=app or PROJECT)
    finally:
        os.environ.clear()
        os.environ.update(saved)
    wall = time.perf_counter() - start
    r = json.loads((out / "results.json").read_text())["runs"][0]
    last = max(h["round"] for h in r["history"])
    costs = [h["node_seconds"] for h in r["history"] if 1 < h["round"] < last and
             "node_seconds" in h]
    parts = {k: sum(c.get(k, 0.0) for c in costs) / len(costs) for k in
             ("start", "site", "evaluation", "training")} if costs else {}
    return {"runtime": f"Flower deployment, localhost, 4 SuperNodes ({transfer}){label}",
            "wall": wall, "startup": wall - r["train_seconds"],
            "round": steady(r["history"], "round_seconds"), "bytes": r["bytes_per_round"],
            "gen": r["generalization"], "discovery": r.get("discovery_seconds"),
            "parts": parts}


def floor(rounds: int, work: Path, interval: float = 0.2) -> dict:
    """Flower's floor: ``benchmarks/floor_app`` on the same localhost deployment (4
    SuperNodes, fedclip's messages, ``interval`` between checks for replies; 0: Flower's own
    ``send_and_receive``)."""
    from tests.deployment import LocalDeployment

    out = work / "out"
    nodes = [f"domain='{d}'" for d in ("art_painting", "cartoon", "photo", "sketch")]
    start = time.perf_counter()
    with LocalDeployment(work, nodes) as dep:
        dep.run([f"rounds={rounds}", f"out='{out}'", f"poll-interval={interval}",
                 "min-nodes=4", "train-nodes=3", "values=295680"], app=HERE / "floor_app")
    wall = time.perf_counter() - start
    r = json.loads((out / "floor.json").read_text())
    wait = "0.2 s checks" if interval > 0 else "Flower's send_and_receive"
    return {"runtime": f"Flower's floor: flwr + numpy app, localhost, 4 SuperNodes ({wait})",
            "wall": wall, "startup": wall - sum(h["round_seconds"] for h in r["history"]),
            "round": steady(r["history"], "round_seconds"),
            "bytes": 2 * 3 * 295680 * 4, "gen": float("nan"), "floor": True}


FRESH = """
import json, time, sys
t0 = time.perf_counter()
import fedclip.flower.client_app
t1 = time.perf_counter()
from fedclip.config import RunConfig
from fedclip.flower.node import node_for
cfg = RunConfig.build(backbone="standin", heldout="sketch", cache_dir=sys.argv[1])
node_for(cfg, {"domain": "art_painting"})
print(json.dumps({"import": t1 - t0, "site": time.perf_counter() - t1}))
"""


def fresh_process(pythonpath: str | None, cache: str, repeats: int = 3) -> dict:
    """What a deployed node's fresh process pays before its work: importing the ClientApp
    and loading its site (the embedded sample's art_painting), median of ``repeats``."""
    import statistics
    import subprocess

    env = {**os.environ, **({"PYTHONPATH": pythonpath} if pythonpath else {})}
    runs = [json.loads(subprocess.run([sys.executable, "-c", FRESH, cache], env=env,
                                      capture_output=True, text=True, check=True).stdout)
            for _ in range(repeats + 1)][1:]  # the first one may build the site file
    return {k: statistics.median(r[k] for r in runs) for k in ("import", "site")}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--skip-deployment", action="store_true")
    parser.add_argument("--skip-simulation", action="store_true")
    parser.add_argument("--before", help="a checkout of an earlier fedclip (its src/ and "
                        "pyproject.toml), deployed side by side in the same run")
    parser.add_argument("--deployments", default="fp32,fp16,superexec,poll3,floor,floor3",
                        help="deployment rows: fp32, fp16, superexec (its poll 0.1 s), poll3 "
                             "(fedclip with Flower's 3 s grid wait), floor (Flower's floor, "
                             "0.2 s checks), floor3 (the floor with Flower's send_and_receive)")
    args = parser.parse_args()
    chosen = set(args.deployments.split(","))
    os.environ.setdefault("FEDCLIP_CACHE", str(Path(tempfile.mkdtemp()) / "cache"))
    cache = os.environ["FEDCLIP_CACHE"]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        rows.append(in_process(args.rounds, tmp / "inproc"))  # also fills the feature cache
        if not args.skip_simulation:
            rows.append(simulation(args.rounds, tmp / "sim32"))
            rows.append(simulation(args.rounds, tmp / "sim16", "fp16"))
        if not args.skip_deployment:
            fast = {"FLWR_SUPEREXEC_TASK_POLL_INTERVAL": "0.1"}
            runs = [run for key, run in (
                ("fp32", ("fp32", "", {}, ())), ("fp16", ("fp16", "", {}, ())),
                ("superexec", ("fp32", ", superexec poll 0.1 s", fast, ())),
                ("poll3", ("fp32", ", poll-interval 3 s (Flower's grid wait)", {},
                           ("poll-interval=3.0",)))) if key in chosen]
            if args.before:
                before = Path(args.before).resolve()
                runs.insert(0, ("fp32", f", before ({before.name})",
                                {"PYTHONPATH": str(before / "src")}, ()))
            for i, (transfer, label, env, extra) in enumerate(runs):
                (tmp / f"dep-{i}").mkdir()
                app = Path(args.before).resolve() if "before" in label else None
                rows.append(deployment(args.rounds, tmp / f"dep-{i}", transfer, label, env,
                                       extra, app))
            for key, interval in (("floor", 0.2), ("floor3", 0.0)):
                if key in chosen:
                    (tmp / key).mkdir()
                    rows.append(floor(args.rounds, tmp / key, interval))
    print(f"| runtime ({args.rounds} rounds) | start-up s | discovery s | s/round (steady) "
          f"| bytes/round | held-out acc |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        disc = f"{r['discovery']:.1f}" if r.get("discovery") is not None else ""
        gen = "" if r.get("floor") else f"{100 * r['gen']:.1f}"
        print(f"| {r['runtime']} | {r['startup']:.1f} | {disc} | {r['round']:.2f} | "
              f"{r['bytes']:,} | {gen} |")
    if args.skip_deployment:
        return
    floors = [r for r in rows if r.get("floor")]
    deployed = [r for r in rows if "deployment" in r["runtime"] and not r.get("floor")]
    if floors and deployed:
        print("\n| deployed round | s/round | x Flower's floor (" +
              ", ".join(f"{f['round']:.2f} s" for f in floors) + ") |")
        print("|---|---|---|")
        for r in deployed:
            ratios = ", ".join(f"{r['round'] / f['round']:.2f}" for f in floors)
            print(f"| {r['runtime']} | {r['round']:.2f} | **{ratios}** |")
    paths = [("after", None)] + ([("before", str(Path(args.before).resolve() / "src"))]
                                 if args.before else [])
    print("\n| checkout | fresh process: import s | site load s |")
    print("|---|---|---|")
    for name, path in paths:
        f = fresh_process(path, cache)
        print(f"| {name} | {f['import']:.2f} | {f['site']:.3f} |")
    print("\n| deployment | s/round | slowest node: start + imports | site | evaluation "
          "| training | transfer + waiting |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        if r.get("parts"):
            p = r["parts"]
            rest = r["round"] - sum(p.values())
            print(f"| {r['runtime']} | {r['round']:.2f} | {p['start']:.2f} | {p['site']:.3f} "
                  f"| {p['evaluation']:.3f} | {p['training']:.3f} | {rest:.2f} |")


if __name__ == "__main__":
    main()
