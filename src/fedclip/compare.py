"""``fedclip compare``: the paper's tables, every algorithm on the same splits and seeds.

Writes ``compare.json``, ``compare.md`` (generalization, personalization, resources; mean
and standard deviation over seeds) and plots into the output folder; each algorithm's runs
land in their own run folder beside them (``<algorithm>-seed<k>/``), so ``--resume``
continues a comparison where it stopped.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable
from pathlib import Path

from fedclip.config import RunConfig
from fedclip.io import atomic_write, atomic_write_json, atomic_write_text

Runs = dict[str, dict[int, list[dict]]]  # algorithm -> seed -> one result per held-out domain


def _stat(values: list[float | None]) -> tuple[float | None, float | None]:
    vals = [v for v in values if v is not None]
    if not vals:
        return None, None
    return statistics.fmean(vals), statistics.stdev(vals) if len(vals) > 1 else 0.0


def _cell(values: list[float | None], scale: float = 100.0) -> str:
    mean, std = _stat(values)
    if mean is None:
        return "n/a"
    return f"{scale * mean:.1f}" + (f" ± {scale * std:.1f}" if std else "")


def _by_heldout(results: list[dict]) -> dict[str, dict]:
    return {r["heldout"]: r for r in results}


def generalization_table(runs: Runs) -> tuple[list[str], list[list[str]]]:
    algos = list(runs)
    heldouts = list(_by_heldout(next(iter(next(iter(runs.values())).values()))))
    rows = []
    for h in [*heldouts, "average"]:
        row = [h]
        for a in algos:
            per_seed = []
            for results in runs[a].values():
                by = _by_heldout(results)
                vals = [by[h]["generalization"]] if h != "average" else [
                    _stat([r["generalization"] for r in results])[0]]
                per_seed += vals
            row.append(_cell(per_seed))
        rows.append(row)
    return ["held out", *algos], rows


def personalization_table(runs: Runs) -> tuple[list[str], list[list[str]]]:
    """Per client (averaged over held-out runs it took part in) and overall: global adapter
    on the client's own test split, and the personalized adapter (where there is one)."""
    header = ["client"]
    for a in runs:
        header += [f"{a}", f"{a} (personalized)"]
    clients: list[str] = []
    for seeds in runs.values():
        for results in seeds.values():
            for r in results:
                clients += [c for c in r["personalization"]["per_client"] if c not in clients]
    rows = []
    for c in [*clients, "average"]:
        row = [c]
        for seeds in runs.values():
            glob, own = [], []
            for results in seeds.values():
                if c == "average":
                    glob.append(_stat([r["personalization"]["mean"] for r in results])[0])
                    own.append(_stat([(r.get("personalized") or {}).get("mean")
                                      for r in results])[0])
                    continue
                glob.append(_stat([r["personalization"]["per_client"].get(c)
                                   for r in results])[0])
                own.append(_stat([(r.get("personalized") or {}).get("per_client", {}).get(c)
                                  for r in results])[0])
            row += [_cell(glob), _cell(own)]
        rows.append(row)
    return header, rows


def resource_table(runs: Runs, backbone_params: int | None) -> tuple[list[str], list[list[str]]]:
    header = ["algorithm", "trainable params", "bytes / client / round", "s / round",
              "total s", "vs backbone FedAvg"]
    rows = []
    for a, seeds in runs.items():
        results = [r for rs in seeds.values() for r in rs]
        first = results[0]
        clients = max(len(first["clients"]), 1)
        params = first["trainable_params"]
        ratio = "-"
        if backbone_params and params:
            ratio = (f"{backbone_params / params:,.0f}x fewer"
                     if backbone_params / params > 1.5 else "1x")
        rows.append([a, f"{params:,}", f"{first['bytes_per_round'] // clients:,}",
                     f"{statistics.fmean(r['seconds_per_round'] for r in results):.3f}",
                     f"{sum(r['train_seconds'] for r in results):.0f}", ratio])
    if backbone_params:
        rows.append(["backbone FedAvg (both encoders)", f"{backbone_params:,}",
                     f"{2 * 4 * backbone_params:,}", "-", "-", "1x"])
    return header, rows


def markdown(header: list[str], rows: list[list[str]]) -> str:
    return "\n".join(["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
                     + ["| " + " | ".join(r) + " |" for r in rows])


def plot(runs: Runs, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_round, ax_bar) = plt.subplots(1, 2, figsize=(12, 4))
    for a, seeds in runs.items():
        results = [r for rs in seeds.values() for r in rs]
        evaluated: dict[int, list[float]] = {}
        for r in results:
            for h in r["history"]:
                if h.get("heldout_accuracy") is not None:
                    evaluated.setdefault(h["round"], []).append(h["heldout_accuracy"])
        rounds = sorted(evaluated)
        if len(rounds) > 1:
            ax_round.plot(rounds, [100 * statistics.fmean(evaluated[k]) for k in rounds],
                          label=a)
        else:  # nothing trained: a level line
            level = 100 * statistics.fmean(r["generalization"] for r in results)
            ax_round.axhline(level, ls="--", color="grey", label=a)
    ax_round.set(xlabel="round", ylabel="held-out accuracy (%)",
                 title="generalization per round (mean over held-out domains)")
    ax_round.legend(fontsize=8)
    header, rows = generalization_table(runs)
    algos = header[1:]
    width = 0.8 / len(algos)
    for i, a in enumerate(algos):
        vals = [float(r[i + 1].split(" ")[0]) if r[i + 1] != "n/a" else 0 for r in rows]
        ax_bar.bar([x + i * width for x in range(len(rows))], vals, width, label=a)
    ax_bar.set_xticks([x + 0.4 - width / 2 for x in range(len(rows))], [r[0] for r in rows],
                      rotation=20)
    ax_bar.set(ylabel="accuracy (%)", title="generalization (held-out domain)")
    ax_bar.legend(fontsize=8)
    fig.tight_layout()
    atomic_write(out / "compare.png", lambda tmp: fig.savefig(tmp, format="png", dpi=110))
    plt.close(fig)


def compare(base: RunConfig, algorithms: list[str], seeds: list[int], out: str | Path, *,
            resume: bool = False, reporter=None,  # noqa: ANN001
            backbone_params: Callable[[], int | None] | None = None) -> dict:
    """Run every algorithm for every seed over the configured held-out domains."""
    from fedclip.experiment import run

    out = Path(out)
    runs: Runs = {}
    for algorithm in algorithms:
        for seed in seeds:
            cfg = base.replace(algorithm=algorithm, seed=seed)
            runs.setdefault(algorithm, {})[seed] = run(
                cfg, out / f"{algorithm}-seed{seed}", resume=resume, reporter=reporter)
    n_params = backbone_params() if backbone_params else None
    tables = {"generalization": generalization_table(runs),
              "personalization": personalization_table(runs),
              "resources": resource_table(runs, n_params)}
    text = [f"# fedclip compare: {', '.join(algorithms)}", "",
            f"Backbone `{base.backbone}`, {base.rounds} rounds, seeds {seeds}; accuracy % "
            f"(mean ± std over seeds).", ""]
    for name, (header, rows) in tables.items():
        text += [f"## {name}", "", markdown(header, rows), ""]
    atomic_write_text(out / "compare.md", "\n".join(text))
    summary = {"schema": "fedclip-compare/1", "config": base.model_dump(),
               "algorithms": algorithms, "seeds": seeds, "backbone_params": n_params,
               "tables": {k: {"header": h, "rows": r} for k, (h, r) in tables.items()}}
    atomic_write_json(out / "compare.json", summary)
    plot(runs, out)
    return summary
