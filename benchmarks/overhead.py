"""What a client costs beyond its arithmetic, and what a run costs before its first round.

    OMP_NUM_THREADS=1 python benchmarks/overhead.py                  # this checkout
    OMP_NUM_THREADS=1 python benchmarks/overhead.py --before ../old  # side by side with another

Data: a PACS subset (``--per-class`` images of every class of every domain, symlinked from
``--data-root``), photo held out, features of ``--backbone`` (default: ViT-B/32 with random
weights) extracted once into the benchmark's own cache before anything is timed.

* **Per-client fixed cost.** The same training images as 3 clients (one per domain) and as
  ``--many`` clients (``many / 3`` per domain), one after another and trained together
  (``train_clients_together``): the median ``round_seconds`` of rounds 2..N of an in-process
  run (training, the server's rules and aggregate, every client's evaluation). The slope of
  round time against client count is what one more client costs. Part of it is arithmetic
  every client needs at these sizes, measured apart in the same process on tensors of the
  same shapes: the training steps it adds (forward, backward and Adam step of the algorithm's
  module on a batch of its size), the norm of its update as the checkout's distance rule
  computes it (float64 before ``fedclip.tensors.distance``, float32 since) and its share of
  the weighted mean. **Fixed** = slope - arithmetic: what a client costs
  beyond its arithmetic.
* **Start-up.** ``python -m fedclip.cli run --rounds 1`` on those cached features against
  ``python -c "import torch"``, fresh processes, alternated, median; each checkout's sources
  compiled to bytecode first, as pip compiles an installed package's (and torch's).

Every checkout is measured by the same workers (``--before DIR``: DIR/src first on
PYTHONPATH), alternated within one invocation, so that the machine's load hits both alike.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
DEFAULT_ROOT = HERE.parents[1] / "shared" / "data" / "PACS"
HELDOUT = "photo"

WORKER = r"""
import json, statistics, sys, tempfile, time
from pathlib import Path
try:  # what every fedclip command does first (a checkout before fedclip.allocator: nothing)
    from fedclip.allocator import keep_freed_memory
    keep_freed_memory()
except ImportError:
    pass
import torch
from fedclip.algorithms import get_algorithm
from fedclip.callbacks import Callback
from fedclip.config import RunConfig
from fedclip.inprocess.experiment import run

class Clock(Callback):  # CPU seconds between round ends: one round each, rounds 2..N
    def __init__(self):
        self.marks = []
    def on_round_end(self, heldout, record):
        self.marks.append(time.process_time())

args = json.loads(sys.argv[1])
out = {"rounds": {}}
for clients, together in args["shapes"]:
    cfg = RunConfig.build(data_root=args["root"], backbone=args["backbone"], heldout="photo",
                          cache_dir=args["cache"], rounds=args["rounds"],
                          clients_per_domain=clients // 3, personalize_epochs=0,
                          train_clients_together=together, checkpoint_every=10**6,
                          checkpoint_seconds=10**6)
    clock = Clock()
    with tempfile.TemporaryDirectory() as tmp:
        r = run(cfg, Path(tmp) / "run", callbacks=[clock])[0].to_json()
    cpu = [b - a for a, b in zip(clock.marks[1:], clock.marks[2:])]  # marks[0]: round 0
    wall = [h["round_seconds"] for h in r["history"] if h["round"] >= 2]
    out["rounds"][f"{clients}/{int(together)}"] = {
        "cpu": statistics.median(cpu), "wall": statistics.median(wall),
        "train": [c["train"] for c in r["clients"]]}

# the arithmetic a client needs at these sizes, right after, in the same process: the least
# CPU a step, an update's norm, its term of the mean and a small forward cost (warm tensors)
cfg = RunConfig.build(backbone=args["backbone"], heldout="photo")
algorithm = get_algorithm(cfg).client  # the client side: module, embed, task loss
dim, classes = args["dim"], 7
gen = torch.Generator().manual_seed(0)
text = torch.nn.functional.normalize(torch.randn(classes, dim, generator=gen), dim=-1)
module = algorithm.build_module(dim)
optimizer = torch.optim.Adam(module.parameters(), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2),
                             eps=cfg.eps, weight_decay=cfg.weight_decay, foreach=True)

def timed(fn, repeats=40):  # CPU seconds per call, the least of 5 samples
    fn()
    samples = []
    for _ in range(5):
        start = time.process_time()
        for _ in range(repeats):
            fn()
        samples.append((time.process_time() - start) / repeats)
    return min(samples)

def step(n):
    x, y = torch.randn(n, dim, generator=gen) * 3, torch.randint(0, classes, (n,), generator=gen)
    def one():
        loss = algorithm.task_loss(algorithm.embed(module, x), y, text, 100.0)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return timed(one)

batch = cfg.batch_size
sizes = sorted({max(2, min(n, batch)) for row in out["rounds"].values() for n in row["train"]})
arith = {"step": {str(n): step(n) for n in sizes}}
a = {k: v.detach().clone() for k, v in module.state_dict().items()}
b = {k: v + 1e-3 for k, v in a.items()}
try:  # the norm of an update as this checkout's distance rule computes it
    from fedclip.tensors import distance
except ImportError:  # a checkout before fedclip.tensors.distance: float64, as it computed it
    distance = None
def norm():
    if distance is not None:
        distance(b, a)
    else:
        sum(float(b[k].to(torch.float64, copy=True).sub_(a[k]).pow_(2).sum()) for k in a)
arith["norm"] = timed(norm)
acc = {k: torch.zeros_like(v) for k, v in a.items()}
def mean_share():  # one update's term of a weighted mean
    for k in acc:
        acc[k].add_(b[k], alpha=0.5)
arith["mean"] = timed(mean_share)
with torch.no_grad():
    arith["eval"] = timed(lambda: algorithm.embed(module, torch.randn(3, dim)))
out["arithmetic"] = arith
print("RESULT " + json.dumps(out))
"""


def subset(root: Path, per_class: int, dest: Path) -> Path:
    """``per_class`` images of every class of every domain of ``root``, as symlinks."""
    for domain in sorted(p for p in root.iterdir() if p.is_dir()):
        for cls in sorted(p for p in domain.iterdir() if p.is_dir()):
            target = dest / domain.name / cls.name
            target.mkdir(parents=True, exist_ok=True)
            for f in sorted(cls.iterdir())[:per_class]:
                if not (target / f.name).exists():
                    (target / f.name).symlink_to(f.resolve())
    return dest


def worker(script: str, src: Path | None, payload: dict) -> dict:
    env = dict(os.environ)
    if src is not None:
        env["PYTHONPATH"] = os.pathsep.join([str(src), env.get("PYTHONPATH", "")])
    done = subprocess.run([sys.executable, "-c", script, json.dumps(payload)], env=env,
                          capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"worker failed:\n{done.stderr[-3000:]}")
    line = next(ln for ln in done.stdout.splitlines() if ln.startswith("RESULT "))
    return json.loads(line.removeprefix("RESULT "))


def started(cmd: list[str], src: Path | None, cwd: Path) -> tuple[float, float]:
    """Wall and CPU seconds (user + system) of one fresh process running ``cmd``."""
    import resource

    env = dict(os.environ)
    if src is not None:
        env["PYTHONPATH"] = os.pathsep.join([str(src), env.get("PYTHONPATH", "")])
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    done = subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(cmd[:4])}... failed:\n{done.stderr[-3000:]}")
    return seconds, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data-root", default=str(DEFAULT_ROOT))
    parser.add_argument("--per-class", type=int, default=8)
    parser.add_argument("--backbone", default="open_clip:ViT-B-32@none")
    parser.add_argument("--many", type=int, default=39, help="clients of the second shape")
    parser.add_argument("--rounds", type=int, default=12)
    parser.add_argument("--repeats", type=int, default=2,
                        help="alternated runs per checkout (0: start-up only)")
    parser.add_argument("--startups", type=int, default=5)
    parser.add_argument("--before", help="an earlier checkout, measured side by side")
    parser.add_argument("--work", help="where the subset and its cache live (kept)")
    parser.add_argument("--out", default=str(HERE / "results" / "overhead.json"))
    args = parser.parse_args()
    root = Path(args.data_root)
    if not root.is_dir():
        raise SystemExit(f"no PACS at {root}; pass --data-root")
    work = Path(args.work) if args.work else Path(tempfile.gettempdir()) / "fedclip-overhead"
    data = subset(root, args.per_class, work / f"pacs-{args.per_class}")
    cache = work / "cache"
    checkouts: list[tuple[str, Path | None]] = [("after", HERE.parent / "src")]
    if args.before:
        checkouts.insert(0, ("before", Path(args.before).resolve() / "src"))

    from fedclip.config import RunConfig
    from fedclip.core.client import steps_per_round
    from fedclip.task import prepare

    prep = prepare(RunConfig.build(data_root=str(data), backbone=args.backbone,
                                   heldout=HELDOUT, cache_dir=str(cache)))  # the cache, once
    dim = int(prep.text.features.shape[1])
    batch = RunConfig.build().batch_size
    shapes = [(3, False), (args.many, False), (3, True), (args.many, True)]
    payload = {"root": str(data), "backbone": args.backbone, "cache": str(cache),
               "rounds": args.rounds, "shapes": shapes, "dim": dim}
    runs: dict[str, list[dict]] = {name: [] for name, _ in checkouts}
    for _ in range(args.repeats):
        for name, src in checkouts:
            runs[name].append(worker(WORKER, src, payload))

    # start-up as an installed fedclip has it: pip compiles a package's bytecode when it
    # installs it (torch's is); a checkout on PYTHONPATH or installed editable writes its
    # __pycache__ on first import, unless PYTHONDONTWRITEBYTECODE is set (as on the machines
    # this was measured on), where every start would compile fedclip's sources again
    import compileall

    for _, src in checkouts:
        if src is not None and not compileall.compile_dir(str(src), quiet=1):
            raise SystemExit(f"could not compile {src} to bytecode")
    torch_cmd = [sys.executable, "-c", "import torch"]
    startup: dict[str, list[tuple[float, float]]] = {"import torch": []}
    startup.update({name: [] for name, _ in checkouts})
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.startups):
            startup["import torch"].append(started(torch_cmd, None, Path(tmp)))
            for name, src in checkouts:
                run_cmd = [sys.executable, "-m", "fedclip.cli", "run", "--data-root", str(data),
                           "--backbone", args.backbone, "--heldout", HELDOUT, "--rounds", "1",
                           "--cache-dir", str(cache), "--out", str(Path(tmp) / f"{name}{i}"),
                           "--set", "personalize_epochs=0"]
                startup[name].append(started(run_cmd, src, Path(tmp)))

    def arithmetic(result: dict, key: str) -> float:
        """The arithmetic of one round of shape ``key`` in one run: every client's training
        steps (each at its batch size, at most ``batch_size``), the norm and the mean term
        of its update, the forwards that score its val and test splits."""
        arith, row, cfg = result["arithmetic"], result["rounds"][key], RunConfig.build()
        steps = sum(arith["step"][str(max(2, min(m, batch)))] * steps_per_round(cfg, m, 1)
                    for m in row["train"])
        return steps + len(row["train"]) * (arith["norm"] + arith["mean"] + 2 * arith["eval"])

    report: dict = {"backbone": args.backbone, "dim": dim, "many": args.many,
                    "threads": os.environ.get("OMP_NUM_THREADS"), "startup": startup,
                    "runs": runs, "rows": []}
    print(f"{args.backbone} features (d={dim}), PACS subset of {args.per_class} images per "
          f"class and domain, photo held out; OMP_NUM_THREADS="
          f"{os.environ.get('OMP_NUM_THREADS', 'unset')}; {args.repeats} alternated run(s) per "
          f"checkout, median of rounds 2-{args.rounds}, then of the runs; CPU seconds of the "
          f"process (wall seconds in brackets)\n")
    print(f"| checkout | mode | s/round, 3 clients | s/round, {args.many} clients | slope "
          f"ms/client-round | arithmetic ms/client-round | **fixed ms/client-round** |")
    print("|---|---|---|---|---|---|---|")
    delta = args.many - 3
    for name, _ in checkouts if args.repeats else ():
        for together in (0, 1):
            few_key, many_key = f"3/{together}", f"{args.many}/{together}"
            mine = runs[name]

            def cpu(r: dict, key: str) -> float:
                return float(r["rounds"][key]["cpu"])

            few = statistics.median([cpu(r, few_key) for r in mine])
            many = statistics.median([cpu(r, many_key) for r in mine])
            walls = [statistics.median([r["rounds"][k]["wall"] for r in mine])
                     for k in (few_key, many_key)]
            slope = statistics.median([(cpu(r, many_key) - cpu(r, few_key)) / delta
                                       for r in mine])
            arith = statistics.median([(arithmetic(r, many_key) - arithmetic(r, few_key))
                                       / delta for r in mine])
            fixed = statistics.median([(cpu(r, many_key) - cpu(r, few_key) - arithmetic(
                r, many_key) + arithmetic(r, few_key)) / delta for r in mine])
            row = {"checkout": name, "mode": "together" if together else "one after another",
                   "few": few, "many": many, "few_wall": walls[0], "many_wall": walls[1],
                   "slope_ms": 1e3 * slope, "slope_wall_ms": 1e3 * (walls[1] - walls[0]) / delta,
                   "arithmetic_ms": 1e3 * arith, "fixed_ms": 1e3 * fixed}
            report["rows"].append(row)
            print(f"| {name} | {row['mode']} | {few:.3f} ({walls[0]:.3f}) | {many:.3f} "
                  f"({walls[1]:.3f}) | {row['slope_ms']:.1f} ({row['slope_wall_ms']:.1f}) | "
                  f"{row['arithmetic_ms']:.1f} | **{row['fixed_ms']:.1f}** |")
        ratio = statistics.median([r["rounds"][f"{args.many}/1"]["cpu"]
                                   / r["rounds"][f"{args.many}/0"]["cpu"] for r in runs[name]])
        print(f"| {name} | together / one after another, {args.many} clients | | "
              f"**{ratio:.2f}** | | | |")
    if args.repeats:
        arith = runs[checkouts[-1][0]][-1]["arithmetic"]
        step_text = ", ".join(f"{1e3 * v:.2f} ms (batch {k})" for k, v in arith["step"].items())
        print(f"\narithmetic of the last run (CPU, least of 5): a training step {step_text}; "
              f"an update's norm (distance rule) {1e3 * arith['norm']:.2f} ms; its term of the "
              f"mean {1e3 * arith['mean']:.2f} ms; a 3-input forward "
              f"{1e3 * arith['eval']:.2f} ms\n")
    if args.startups:
        base_wall, base_cpu = (statistics.median(v[i] for v in startup["import torch"])
                               for i in (0, 1))
        print("| start-up (fresh process, median) | CPU s | x `import torch` | wall s | x |")
        print("|---|---|---|---|---|")
        print(f"| `python -c \"import torch\"` | {base_cpu:.2f} | 1.00 | {base_wall:.2f} | 1.00 |")
        for name, _ in checkouts:
            w, c = (statistics.median(v[i] for v in startup[name]) for i in (0, 1))
            print(f"| cached 1-round run, {name} | {c:.2f} | **{c / base_cpu:.2f}** | {w:.2f} | "
                  f"{w / base_wall:.2f} |")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
