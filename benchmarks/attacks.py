"""The attack table: every aggregator against every attack, and DP's accuracy against epsilon.

    python benchmarks/attacks.py [--data-root ../shared/data/PACS] [--rounds 8] [--quick]

Full PACS with the stand-in backbone, photo held out, in-process (the server's rules are the
same code as on Flower: ``fedclip.core.server``), and one row set confirmed on Flower (the
real ServerApp and ClientApps over an in-memory grid, the attacker tampering with its replies).
Two shapes: 4 sites (3 training domains + the held-out one) and 39 Dirichlet(0.1) clients
(13 per domain), 10 sampled per round. Writes ``docs/attacks.md`` and
``benchmarks/results/attacks.json``; ``--quick`` is a smoke run (2 rounds, a few rows) into
``benchmarks/results/attacks-quick.*``.

Attacks (a malicious client trains honestly, then changes what it sends; ``D`` its honest
update, ``nf`` the distance rule's ``norm_factor``):

* ``scaled``: ``0.9 nf D``, just under the distance rule's median bound;
* ``flip``: ``-9 D`` (sign-flipped, under the rule too);
* ``noise``: Gaussian noise of norm ``9 ||D||`` instead of ``D``;
* ``lie``: an honest update, but a val accuracy of 1.0 in round 1 and 0.0 afterwards (aimed at
  the best-round selection);
* ``collude``: every malicious client (two at least) sends the same crafted update, the first
  one's ``-9 D``.

Personalization is the mean test accuracy of the honest clients. Every row reports both the
selected round's accuracies (what a run reports) and the last round's, so that a defence that
silently stopped learning (a run that selects round 0) is visible. ``untrusted`` rows run
``trust=untrusted`` (median, norm-factor 3, weights capped at the median, median selection),
the deployment setting; the attacks adapt to its tighter distance factor.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # tests.flower_grid: the in-memory Flower grid

from fedclip.config import RunConfig  # noqa: E402
from fedclip.core.client import ClientJob, ClientUpdate  # noqa: E402
from fedclip.inprocess.experiment import build_federation  # noqa: E402
from fedclip.inprocess.federation import Federation  # noqa: E402
from fedclip.task import prepare  # noqa: E402

AGGREGATORS = ("weighted", "median", "trimmed-mean", "krum", "multikrum", "bulyan",
               "untrusted")
ATTACKS = ("scaled", "flip", "noise", "lie", "collude")
HELDOUT = "photo"


def _norm(tensors: dict[str, torch.Tensor]) -> float:
    return float(sum(float((v.double() ** 2).sum()) for v in tensors.values()) ** 0.5)


def crafted(kind: str, start: dict[str, torch.Tensor], update: ClientUpdate, nf: float,
            seed: int) -> dict[str, torch.Tensor]:
    """What a malicious client sends instead of its honest ``update``."""
    delta = {k: update.params[k] - start[k] for k in update.params}
    if kind == "scaled":
        return {k: start[k] + 0.9 * nf * d for k, d in delta.items()}
    if kind in ("flip", "collude"):
        return {k: start[k] - 9 * d for k, d in delta.items()}
    if kind == "noise":
        gen = torch.Generator().manual_seed(seed)
        noise = {k: torch.randn(d.shape, generator=gen) for k, d in delta.items()}
        scale = 9 * _norm(delta) / max(_norm(noise), 1e-30)
        return {k: start[k] + noise[k] * scale for k in delta}
    raise ValueError(kind)


def attack(fed: Federation, kind: str, malicious: set[str]) -> None:
    """Make ``malicious`` clients of ``fed`` misbehave (``kind``); in place."""
    algo, nf = fed.algorithm, fed.cfg.norm_factor
    if kind == "lie":
        honest_eval = fed.evaluate

        def evaluate(params, states=None):  # noqa: ANN001, ANN202
            val, test, held = honest_eval(params, states)
            rnd = fed.current().state.round  # the round being evaluated
            for c in malicious & set(val):
                val[c] = 1.0 if rnd == 1 else 0.0
            return val, test, held

        fed.evaluate = evaluate  # type: ignore[method-assign]
        return
    honest_train = algo.client.train_client
    shared: dict[int, dict[str, torch.Tensor]] = {}  # collude: the round's one crafted update

    def train(job: ClientJob) -> ClientUpdate:
        update = honest_train(job)
        if job.name not in malicious:
            return update
        start, rnd = algo.shared(job.params), job.config.server_round
        if kind == "collude" and rnd in shared:
            return replace(update, params=shared[rnd])
        params = crafted(kind, start, update, nf, job.seed)
        shared[rnd] = params
        return replace(update, params=params)

    algo.client.train_client = train  # type: ignore[method-assign]


def run_one(cfg: RunConfig, prep, kind: str | None, malicious: set[str]) -> dict:  # noqa: ANN001
    fed = build_federation(cfg, prep, HELDOUT)
    if kind is not None:
        attack(fed, kind, malicious)
    start = time.perf_counter()
    state = fed.run()
    seconds = time.perf_counter() - start
    return {**accuracies([r.__dict__ for r in state.history], state.best_round, malicious),
            "rejected": sum(len(r.rejected or {}) for r in state.history),
            "seconds_per_round": seconds / max(state.round, 1),
            "epsilon": state.history[-1].epsilon}


def accuracies(history: list[dict], best_round: int, malicious: set[str]) -> dict:
    """Held-out and personalization (the honest clients' mean test accuracy) of the selected
    round and of the last evaluated one."""
    def of(record: dict) -> tuple[float | None, float]:
        honest = [a for c, a in (record["test_accuracy"] or {}).items() if c not in malicious]
        return record["heldout_accuracy"], statistics.fmean(honest)

    best = next(r for r in history if r["round"] == best_round)
    last = [r for r in history if r["test_accuracy"] is not None][-1]
    (heldout, pers), (last_heldout, last_pers) = of(best), of(last)
    return {"heldout": heldout, "personalization": pers, "best_round": best_round,
            "last_heldout": last_heldout, "last_personalization": last_pers,
            "last_round": last["round"]}


def configured(cfg: RunConfig, aggregation: str, per_round: int) -> RunConfig:
    """A row's config: the aggregator with the largest f its assumption allows, or the
    untrusted setting (``trust=untrusted`` replaces the reference defaults)."""
    if aggregation == "untrusted":
        return cfg.replace(trust="untrusted")
    return cfg.replace(aggregation=aggregation, byzantine=byzantine(aggregation, per_round))


def shapes(base: RunConfig, quick: bool, many_lr: float
           ) -> dict[str, tuple[RunConfig, list[tuple[str, int]]]]:
    """shape -> (config, [(fraction label, malicious count)]). The many-client shape trains
    with ``many_lr``: at the reference 5e-5 its clients (about 90 train images, 3 steps a
    round) barely move in a few rounds and every run selects round 0."""
    many = base.replace(clients_per_domain=13, partition="dirichlet", dirichlet_alpha=0.1,
                        clients_per_round=10, lr=many_lr)
    out = {"4 sites (3 train)": (base, [("1 of 3", 1)])}
    if not quick:
        out["39 Dirichlet(0.1) clients, 10/round"] = (many, [("1 of 39", 1), ("25%", 10)])
    return out


def byzantine(aggregation: str, per_round: int) -> int:
    """The largest f each rule's assumption allows with ``per_round`` updates."""
    if aggregation in ("krum", "multikrum"):
        return max(0, (per_round - 3) // 2)
    if aggregation == "bulyan":
        return max(0, (per_round - 3) // 4)
    return 0


def robust_rows(base: RunConfig, quick: bool, many_lr: float, log: Callable[[str], None]
                ) -> list[dict]:
    rows = []
    aggregators = AGGREGATORS if not quick else ("weighted", "krum", "untrusted")
    attacks = ATTACKS if not quick else ("flip", "lie")
    for shape, (cfg, fractions) in shapes(base, quick, many_lr).items():
        prep = prepare(cfg)
        clients = sorted(n for d in prep.dataset.domains if d != HELDOUT
                         for n in (s.name for s in prep.splits[d]))
        per_round = cfg.clients_per_round or len(clients)
        for aggregation in aggregators:
            run_cfg = configured(cfg, aggregation, per_round)
            cases = [("none", "0", None, set())]
            for label, count in fractions:
                for kind in attacks:
                    n = max(count, 2) if kind == "collude" else count
                    cases.append((kind, label if n == count else f"{n} of {len(clients)}",
                                  kind, set(clients[:n])))
            for name, label, kind, malicious in cases:
                result = run_one(run_cfg, prep, kind, malicious)
                rows.append({"shape": shape, "aggregation": aggregation,
                             "byzantine": run_cfg.byzantine, "attack": name,
                             "malicious": label, "runtime": "in-process", **result})
                log(f"{shape} | {aggregation} | {name} {label}: held-out "
                    f"{result['heldout']:.3f}, pers {result['personalization']:.3f}")
    return rows


def flower_rows(base: RunConfig, data_root: str, out: Path, log: Callable[[str], None]
                ) -> list[dict]:
    """The 4-site flip and lie rows on Flower: the real apps over the in-memory grid, the
    attacker (the first training client) tampering with its own replies."""
    from flwr.app import ArrayRecord, MetricRecord
    from tests.flower_grid import LocalGrid

    from fedclip.flower.client_app import build_client_app
    from fedclip.flower.codec import decode
    from fedclip.flower.server_app import main as server_main

    domains = sorted(p.name for p in Path(data_root).iterdir() if p.is_dir())
    node_of = {1000 + i: d for i, d in enumerate(domains)}
    victim = next(d for d in domains if d != HELDOUT)
    rows = []
    for aggregation in ("weighted", "median", "krum", "untrusted"):
        for kind in ("none", "flip", "lie"):
            setting = ({"trust": "untrusted"} if aggregation == "untrusted" else
                       {"aggregation": aggregation})
            run_config = {"backbone": base.backbone, "heldout": HELDOUT, "rounds": base.rounds,
                          **setting, "data-root": data_root,
                          "out": str(out / f"{aggregation}-{kind}"),
                          "discover-timeout": 600.0, "personalize-epochs": 0}
            nodes = [{"domain": d} for d in domains]
            sent: dict[str, dict] = {}

            def tamper(node: int, reply, kind: str = kind, sent: dict = sent):  # noqa: ANN001, ANN202
                if node_of[node] != victim or reply.has_error():
                    return reply
                content = reply.content
                if kind == "flip" and "arrays" in content.array_records:
                    params = decode(content.array_records["arrays"])
                    start = sent["params"]
                    content["arrays"] = ArrayRecord({k: (start[k] - 9 * (v - start[k]))
                                                     .contiguous() for k, v in params.items()})
                if kind == "lie" and "metrics" in content.metric_records:
                    metrics = dict(content.metric_records["metrics"])
                    if "val-accuracy" in metrics:
                        metrics["val-accuracy"] = 1.0 if sent.get("round") == 1 else 0.0
                        content["metrics"] = MetricRecord(metrics)
                return reply

            grid = LocalGrid(build_client_app(), nodes, run_config, tamper=tamper)
            honest_send = grid.send_and_receive

            def send_and_receive(messages, *, timeout=None, sent=sent, honest=honest_send):  # noqa: ANN001, ANN202
                messages = list(messages)
                for m in messages:  # what the attacker's node received (its start)
                    if "arrays" in m.content.array_records and len(m.content["arrays"]):
                        sent["params"] = decode(m.content["arrays"])
                        config = m.content["config"]  # the round whose params it scores
                        sent["round"] = config.get("evaluate-round",
                                                   config.get("server-round", 0))
                return honest(messages, timeout=timeout)

            grid.send_and_receive = send_and_receive  # type: ignore[method-assign]
            start = time.perf_counter()
            result = server_main(grid, run_config).to_json()
            seconds = (time.perf_counter() - start) / base.rounds
            malicious = set() if kind == "none" else {victim}
            history = [{"test_accuracy": None, **r} for r in result["history"]]
            rows.append({"shape": "4 sites (3 train)", "aggregation": aggregation,
                         "byzantine": 0, "attack": kind,
                         "malicious": "0" if kind == "none" else "1 of 3",
                         "runtime": "flower",
                         **accuracies(history, result["best_round"], malicious),
                         "rejected": sum(len(r.get("rejected") or {})
                                         for r in result["history"]),
                         "seconds_per_round": seconds, "epsilon": None})
            log(f"flower | {aggregation} | {kind}: held-out {rows[-1]['heldout']:.3f}")
    return rows


def dp_rows(base: RunConfig, quick: bool, log: Callable[[str], None]) -> list[dict]:
    """FedCLIP and the linear probe (uniform mean) without DP and at three budgets; the
    clipping norm is the median honest update norm of round 1 (measured here, per
    algorithm); the noise multiplier is calibrated so that the rounds spend the budget."""
    rows = []
    budgets = (None, 30.0, 10.0, 3.0) if not quick else (None, 10.0)
    prep = prepare(base)
    for algorithm in ("fedclip", "linear-probe"):
        cfg = base.replace(algorithm=algorithm, aggregation="uniform")
        fed = build_federation(cfg.replace(rounds=1), prep, HELDOUT)
        state = fed.initial_state()
        norms = []
        honest_train = fed.algorithm.client.train_client

        def measure(job: ClientJob, honest=honest_train, norms=norms,  # noqa: ANN001
                    algo=fed.algorithm) -> ClientUpdate:  # noqa: ANN001
            update = honest(job)
            start = algo.shared(job.params)
            norms.append(_norm({k: update.params[k] - start[k] for k in update.params}))
            return update

        fed.algorithm.client.train_client = measure  # type: ignore[method-assign]
        fed.run_round(state)
        clip = statistics.median(norms)
        for budget in budgets:
            run_cfg = cfg if budget is None else cfg.replace(
                dp="server", dp_clipping_norm=clip, dp_epsilon=budget)
            result = run_one(run_cfg, prep, None, set())
            fed_dp = build_federation(run_cfg, prep, HELDOUT)
            plan = fed_dp.rules.privacy
            rows.append({"algorithm": algorithm, "budget": budget,
                         "noise_multiplier": plan.noise_multiplier if plan else None,
                         "clipping_norm": clip if plan else None, **result})
            log(f"dp | {algorithm} | epsilon {budget}: held-out {result['heldout']:.3f}")
    return rows


def pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}"


def num(x: float | None, fmt: str) -> str:
    return "-" if x is None else format(x, fmt)


def write(rows: list[dict], dp: list[dict], args: argparse.Namespace, seconds: float,
          stem: str) -> None:
    out_md = HERE.parent / "docs" / f"{stem}.md" if not args.quick else \
        HERE / "results" / f"{stem}.md"
    lines = [
        "# Attacks and defences, measured", "",
        f"Generated by `python benchmarks/attacks.py --rounds {args.rounds}"
        f"{' --quick' if args.quick else ''}` (no number typed by hand) in {seconds / 60:.0f} "
        f"min on {platform.machine()}, {os.cpu_count()} cores, CPU only. Full PACS "
        f"(9,991 images), stand-in backbone (not CLIP), {HELDOUT} held out, "
        f"{args.rounds} rounds, FedCLIP's reference recipe (the many-client shape with lr "
        f"{args.many_lr:g}: at 5e-5 its small clients barely move in {args.rounds} rounds), the "
        f"distance rule on (norm-factor 10). With 3 training clients every rule's assumption "
        f"allows only f = 0: trimmed-mean (trim 0.2 of 3 cuts none) and bulyan are then the "
        f"plain mean, multikrum (keeps n - f = 3) the weighted one. `untrusted`: "
        f"`trust=untrusted`, the deployment setting (median, norm-factor 3, weights capped at "
        f"the median size, best round by the median val accuracy; the attacks scale to its "
        f"factor). Accuracy % at the round each run selects (`sel.`: what a run reports) and at "
        f"its last round (`last`): a defence that stopped learning selects round 0 and shows "
        f"it there. Personalization over the honest clients. `f`: the byzantine count each "
        f"rule assumes (the largest its assumption allows with the round's updates: Krum "
        f"2f+3, Bulyan 4f+3). `rej.`: updates the distance rule rejected over the run.", "",
        "| shape | aggregation | f | attack | malicious | runtime | held-out sel. | "
        "held-out last | pers. sel. | pers. last | best round | rej. | s/round |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['shape']} | {r['aggregation']} | {r['byzantine']} | {r['attack']} | "
                     f"{r['malicious']} | {r['runtime']} | {pct(r['heldout'])} | "
                     f"{pct(r['last_heldout'])} | {pct(r['personalization'])} | "
                     f"{pct(r['last_personalization'])} | {r['best_round']} | "
                     f"{r['rejected']} | {r['seconds_per_round']:.2f} |")
    lines += ["", "## Differential privacy: accuracy against epsilon", "",
              "4 sites, uniform mean, client-level DP (clip each update, noise the sum, divide by "
              "the 3 clients), delta 1e-5, Flower's RDP accountant without sampling "
              "amplification; the noise multiplier is calibrated to spend the budget in the "
              "rounds run; the clipping norm is the median honest update norm of round 1. The "
              "noise is secret (the OS's entropy), so a DP row differs from run to run. A row "
              "whose selected round is 0 reports the untrained model: its last round says what "
              "the DP-trained model reached.", "",
              "| algorithm | epsilon budget | epsilon spent | noise multiplier | clipping norm | "
              "held-out sel. | held-out last | pers. sel. | pers. last | best round | s/round |",
              "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in dp:
        lines.append(f"| {r['algorithm']} | {r['budget'] or 'no DP'} | {num(r['epsilon'], '.2f')} "
                     f"| {num(r['noise_multiplier'], '.3g')} | {num(r['clipping_norm'], '.3g')} | "
                     f"{pct(r['heldout'])} | {pct(r['last_heldout'])} | "
                     f"{pct(r['personalization'])} | {pct(r['last_personalization'])} | "
                     f"{r['best_round']} | {r['seconds_per_round']:.2f} |")
    out_md.write_text("\n".join(lines) + "\n")
    (HERE / "results" / f"{stem}.json").write_text(json.dumps(
        {"robust": rows, "dp": dp, "rounds": args.rounds, "seconds": seconds}, indent=1))
    print(f"wrote {out_md}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-root", default=str(HERE.parent.parent / "shared/data/PACS"))
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--quick", action="store_true", help="smoke run: 2 rounds, a few rows")
    parser.add_argument("--no-flower", action="store_true", help="skip the Flower rows")
    parser.add_argument("--many-lr", type=float, default=1e-3,
                        help="the many-client shape's learning rate")
    args = parser.parse_args()
    if args.quick:
        args.rounds = 2
    torch.set_num_threads(1)  # tiny tensors: threads cost more than they give on 2 cores
    base = RunConfig.build(data_root=args.data_root, backbone="standin", heldout=HELDOUT,
                           rounds=args.rounds, personalize_epochs=0)
    began = time.perf_counter()
    rows = robust_rows(base, args.quick, args.many_lr, print)
    if not args.no_flower:
        # a fresh folder per invocation: a --quick run and a full one never meet
        out = Path(tempfile.mkdtemp(prefix="bench-attacks-flower-", dir="runs")) if \
            Path("runs").is_dir() else Path(tempfile.mkdtemp(prefix="bench-attacks-flower-"))
        rows += flower_rows(base, args.data_root, out, print)
    dp = dp_rows(base, args.quick, print)
    write(rows, dp, args, time.perf_counter() - began,
          "attacks" if not args.quick else "attacks-quick")


if __name__ == "__main__":
    main()
