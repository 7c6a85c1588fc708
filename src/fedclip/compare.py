"""``fedclip compare``: the paper's tables, every algorithm on the same splits and seeds.

Writes ``compare.json``, ``compare.md`` (generalization, personalization, resources; mean
and standard deviation over seeds) and plots into the output folder; each algorithm's runs
land in their own run folder beside them (``<algorithm>-seed<k>/``), so ``--resume``
continues a comparison where it stopped.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable, Sequence
from pathlib import Path

from fedclip.config import RunConfig
from fedclip.core.records import BaseNovelScores, RunResult, harmonic_mean
from fedclip.io import atomic_write, atomic_write_json, atomic_write_text

Runs = dict[str, dict[int, list[RunResult]]]  # algorithm -> seed -> one result per held-out domain


def _stat(values: list[float | None]) -> tuple[float | None, float | None]:
    vals = [v for v in values if v is not None and v == v]  # NaN (an empty split): unknown
    if not vals:
        return None, None
    return statistics.fmean(vals), statistics.stdev(vals) if len(vals) > 1 else 0.0


def _cell(values: list[float | None], scale: float = 100.0) -> str:
    mean, std = _stat(values)
    if mean is None:
        return "n/a"
    return f"{scale * mean:.1f}" + (f" ± {scale * std:.1f}" if std else "")


def _by_heldout(results: list[RunResult]) -> dict[str, RunResult]:
    return {r.heldout: r for r in results}


def generalization_values(runs: Runs) -> dict[str, dict[str, list[float | None]]]:
    """algorithm -> held-out domain (and "average") -> one generalization per seed."""
    heldouts = list(_by_heldout(next(iter(next(iter(runs.values())).values()))))
    values: dict[str, dict[str, list[float | None]]] = {}
    for a, seeds in runs.items():
        per: dict[str, list[float | None]] = {h: [] for h in [*heldouts, "average"]}
        for results in seeds.values():
            by = _by_heldout(results)
            for h in heldouts:
                per[h].append(by[h].generalization if h in by else None)
            per["average"].append(_stat([r.generalization for r in results])[0])
        values[a] = per
    return values


def generalization_table(runs: Runs) -> tuple[list[str], list[list[str]]]:
    values = generalization_values(runs)
    rows = [[h, *(_cell(values[a][h]) for a in runs)] for h in next(iter(values.values()))]
    return ["held out", *runs], rows


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
                clients += [c for c in r.best.per_client if c not in clients]
    rows = []
    for c in [*clients, "average"]:
        row = [c]
        for seeds in runs.values():
            glob, own = [], []
            for results in seeds.values():
                if c == "average":
                    glob.append(_stat([r.personalization for r in results])[0])
                    own.append(_stat([r.personalized.mean if r.personalized else None
                                      for r in results])[0])
                    continue
                glob.append(_stat([r.best.per_client.get(c) for r in results])[0])
                own.append(_stat([r.personalized.per_client.get(c) if r.personalized else None
                                  for r in results])[0])
            row += [_cell(glob), _cell(own)]
        rows.append(row)
    return header, rows


def resource_table(runs: Runs, backbone_params: int | None) -> tuple[list[str], list[list[str]]]:
    """Per algorithm: parameters, bytes per training client (per round it trains in, and in
    total over the run), seconds, the ratio to backbone FedAvg and what it uses of the text
    side (``Algorithm.uses_text``)."""
    from fedclip.algorithms import ALGORITHMS, names

    names()  # the registry, loaded
    header = ["algorithm", "trainable params", "bytes / client / round",
              "bytes / client, total", "rounds", "s / round", "total s",
              "vs backbone FedAvg", "text"]
    rows = []
    for a, seeds in runs.items():
        results = [r for rs in seeds.values() for r in rs]
        first = results[0]
        trained = [r for r in first.history if r.round > 0 and r.bytes]
        per_round = statistics.fmean(r.bytes / max(len(r.train_loss), 1)
                                     for r in trained) if trained else 0.0
        total = sum(r.bytes for r in trained) / max(len(first.clients), 1)
        params = first.trainable_params
        ratio = "-"
        if backbone_params and params:
            ratio = (f"{backbone_params / params:,.0f}x fewer"
                     if backbone_params / params > 1.5 else "1x")
        text = ALGORITHMS[a].uses_text if a in ALGORITHMS else "?"
        rows.append([a, f"{params:,}", f"{per_round:,.0f}", f"{total:,.0f}",
                     f"{first.rounds}",
                     f"{statistics.fmean(r.seconds_per_round for r in results):.3f}",
                     f"{sum(r.train_seconds for r in results):.0f}", ratio, text])
    if backbone_params:
        rows.append(["backbone FedAvg (both encoders)", f"{backbone_params:,}",
                     f"{2 * 4 * backbone_params:,}", "-", "-", "-", "-", "1x", "tower"])
    return header, rows


BASE_NOVEL_KEYS = ("base", "novel", "hm", "heldout_base", "heldout_novel", "heldout_hm")
ZERO_SHOT = "zero-shot"  # the base-to-novel table's first row: what a method must beat on novel


def _known(values: list[float | None]) -> float | None:
    vals = [v for v in values if v is not None and v == v]  # NaN (an empty split): unknown
    return statistics.fmean(vals) if vals else None


def _base_novel_seed(scores: list[BaseNovelScores]) -> dict[str, float | None]:
    """One seed's base-to-novel numbers over its held-out runs: the mean base and novel, and
    the harmonic mean of those means (as the papers average over datasets)."""
    out = {k: _known([getattr(s, k) for s in scores]) for k in
           ("base", "novel", "heldout_base", "heldout_novel")}
    return {**out, "hm": harmonic_mean(out["base"], out["novel"]),
            "heldout_hm": harmonic_mean(out["heldout_base"], out["heldout_novel"])}


def base_novel_values(runs: Runs) -> dict[str, dict[str, list[float | None]]] | None:
    """Under protocol=base2novel: the zero-shot classifier (from the runs that score it: it
    is the backbone's, the same for every method), then each algorithm's selected model ->
    base, novel, HM (clients' test splits; held-out domain) -> one value per seed. None: the
    runs are of another protocol."""
    if not any(r.base2novel for seeds in runs.values() for rs in seeds.values() for r in rs):
        return None
    values: dict[str, dict[str, list[float | None]]] = {}

    def per_seed(seeds: dict[int, list[RunResult]], zero: bool
                 ) -> dict[str, list[float | None]]:
        rows = [_base_novel_seed([(r.base2novel.zeroshot if zero else r.base2novel.best)
                                  for r in rs if r.base2novel is not None])
                for rs in seeds.values()]
        return {k: [row[k] for row in rows] for k in BASE_NOVEL_KEYS}

    scored = [seeds for seeds in runs.values() if any(
        r.base2novel is not None and _known([r.base2novel.zeroshot.novel]) is not None
        for rs in seeds.values() for r in rs)]
    if scored:
        values[ZERO_SHOT] = per_seed(scored[0], zero=True)
    for a, seeds in runs.items():
        if a != "zeroshot":  # its selected model is the zero-shot classifier: that row
            values[a] = per_seed(seeds, zero=False)
    return values


def base_novel_table(runs: Runs) -> tuple[list[str], list[list[str]]] | None:
    """Base, novel and HM per method (mean ± std over seeds), the zero-shot row first, and
    how far each method's novel accuracy is above zero-shot's (points)."""
    values = base_novel_values(runs)
    if values is None:
        return None
    zero = _stat(values[ZERO_SHOT]["novel"])[0] if ZERO_SHOT in values else None
    header = ["method", "base", "novel", "HM", "novel vs 0-shot", "held-out base",
              "held-out novel", "held-out HM"]
    rows = []
    for m, per in values.items():
        novel = _stat(per["novel"])[0]
        gain = ("-" if m == ZERO_SHOT else "n/a" if novel is None or zero is None
                else f"{100 * (novel - zero):+.1f}")
        rows.append([m, _cell(per["base"]), _cell(per["novel"]), _cell(per["hm"]), gain,
                     _cell(per["heldout_base"]), _cell(per["heldout_novel"]),
                     _cell(per["heldout_hm"])])
    return header, rows


def markdown(header: list[str], rows: list[list[str]]) -> str:
    return "\n".join(["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
                     + ["| " + " | ".join(r) + " |" for r in rows])


def plot(runs: Runs, out: Path) -> None:
    """``compare.png``: generalization per round and per held-out domain, each algorithm in
    one colour, marker and line style across both panels, one legend outside the data."""
    from fedclip.plots import pyplot, styles

    plt = pyplot()
    if plt is None:
        return
    from matplotlib.ticker import MaxNLocator

    style = styles(list(runs))
    b2n = base_novel_values(runs)
    fig, axes = plt.subplots(1, 3 if b2n else 2, figsize=(18 if b2n else 12, 4.2))
    ax_round, ax_bar = axes[0], axes[1]
    for a, seeds in runs.items():
        results = [r for rs in seeds.values() for r in rs]
        evaluated: dict[int, list[float]] = {}
        for r in results:
            for h in r.history:
                if h.heldout_accuracy is not None:
                    evaluated.setdefault(h.round, []).append(h.heldout_accuracy)
        rounds = sorted(evaluated)
        if len(rounds) > 1:
            ax_round.plot(rounds, [100 * statistics.fmean(evaluated[k]) for k in rounds],
                          label=a, markevery=max(1, len(rounds) // 10), markersize=5,
                          alpha=0.9, **style[a])
        else:  # nothing trained: a level line, in the algorithm's own colour
            level = _stat([r.generalization for r in results])[0]
            if level is not None:
                ax_round.axhline(100 * level, label=a, color=style[a]["color"],
                                 linestyle=style[a]["linestyle"] if style[a]["linestyle"] != "-"
                                 else "--")
    ax_round.set(xlabel="round", ylabel="held-out accuracy (%)",
                 title="generalization per round (mean over held-out domains)")
    ax_round.xaxis.set_major_locator(MaxNLocator(integer=True))  # rounds are whole numbers
    values = generalization_values(runs)
    groups = list(next(iter(values.values())))
    width = 0.8 / len(values)
    for i, (a, per) in enumerate(values.items()):
        xs = [g + i * width for g in range(len(groups))]
        means = [_stat(per[h])[0] for h in groups]
        stds = [_stat(per[h])[1] for h in groups]
        spread = [100 * (s or 0.0) for s, m in zip(stds, means, strict=True) if m is not None]
        ax_bar.bar([x for x, m in zip(xs, means, strict=True) if m is not None],
                   [100 * m for m in means if m is not None], width,
                   yerr=spread if any(len([v for v in per[h] if v is not None]) > 1
                                      for h in groups) else None,  # one seed: no bar
                   color=style[a]["color"], label=a, capsize=2)
        for x, m in zip(xs, means, strict=True):  # no result: say so, never a 0 % bar
            if m is None:
                ax_bar.text(x, 1, "n/a", rotation=90, ha="center", va="bottom", fontsize=7)
    ax_bar.set_xticks([g + 0.4 - width / 2 for g in range(len(groups))], groups, rotation=20)
    ax_bar.set(ylabel="accuracy (%)", title="generalization (held-out domain)")
    if b2n:
        base_novel_panel(axes[2], b2n, style)
    handles, labels = ax_round.get_legend_handles_labels()
    fig.legend(handles, labels, loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=8,
               title="algorithm")
    fig.tight_layout()
    atomic_write(out / COMPARE_FILES[2],
                 lambda tmp: fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight"))
    plt.close(fig)


def base_novel_panel(ax, values: dict[str, dict[str, list[float | None]]],  # noqa: ANN001
                     style: dict[str, dict]) -> None:
    """Base, novel and HM (clients' test splits) per method, bars side by side, zero-shot's
    novel accuracy as the line to beat."""
    groups = ("base", "novel", "hm")
    width = 0.8 / len(values)
    for i, (m, per) in enumerate(values.items()):
        colour = "grey" if m == ZERO_SHOT else style.get(m, {}).get("color")
        xs = [g + i * width for g in range(len(groups))]
        means = [_stat(per[k])[0] for k in groups]
        ax.bar([x for x, v in zip(xs, means, strict=True) if v is not None],
               [100 * v for v in means if v is not None], width, color=colour, label=m,
               hatch="//" if m == ZERO_SHOT else None)
        for x, v in zip(xs, means, strict=True):  # not applicable: say so, never a 0 % bar
            if v is None:
                ax.text(x, 1, "n/a", rotation=90, ha="center", va="bottom", fontsize=7)
    zero = _stat(values[ZERO_SHOT]["novel"])[0] if ZERO_SHOT in values else None
    if zero is not None:
        ax.axhline(100 * zero, color="grey", ls="--", lw=1, label="zero-shot novel")
    ax.set_xticks([g + 0.4 - width / 2 for g in range(len(groups))], ["base", "novel", "HM"])
    ax.set(ylabel="accuracy (%)", title="base to novel (clients' test splits)")
    ax.legend(fontsize=7, loc="lower right")


COMPARE_FILES = ("compare.md", "compare.json", "compare.png")


def base_novel_intro(runs: Runs) -> str:
    """What the base-to-novel table says, and the class split it used."""
    first = next(r.base2novel for seeds in runs.values() for rs in seeds.values() for r in rs
                 if r.base2novel is not None)
    notes = sorted({r.base2novel.novel_note for seeds in runs.values() for rs in seeds.values()
                    for r in rs if r.base2novel is not None and r.base2novel.novel_note})
    return (f"Protocol base2novel (class split seed {first.split_seed}): base classes "
            f"{', '.join(first.base_classes)}; novel classes {', '.join(first.novel_classes)}. "
            f"Clients train and validate on base classes only, so the generalization and "
            f"personalization tables are on base classes. base-to-novel: base accuracy (base "
            f"test images among the base classes), novel (novel test images among the novel "
            f"classes, with their prompts), HM their harmonic mean (of the means over held-out "
            f"runs), on the clients' test splits and on the held-out domain; zero-shot is the "
            f"row to beat on novel classes."
            + "".join(f" {n}." for n in notes))


def check_compare_folder(out: Path) -> None:
    """Refuse an ``out`` that is a file, or a folder holding anything but what compare
    writes (``compare.*`` and ``<algorithm>-seed<k>`` run folders): the rule ``run`` follows."""
    import re

    from fedclip.errors import RunFolderError

    if out.exists() and not out.is_dir():
        raise RunFolderError(f"--out {out} is a file; pass a folder for the comparison")
    if not out.is_dir():
        return
    foreign = sorted(e.name for e in out.iterdir() if e.name not in COMPARE_FILES
                     and not (e.is_dir() and re.fullmatch(r".+-seed\d+", e.name))
                     and not e.name.startswith("."))
    if foreign:
        raise RunFolderError(f"--out {out} holds other files ({', '.join(foreign[:3])}"
                             f"{' ...' if len(foreign) > 3 else ''}) and is not a fedclip "
                             f"compare folder; choose a new or empty folder")


def compare(base: RunConfig, algorithms: list[str], seeds: list[int], out: str | Path, *,
            resume: bool = False, reporter=None,  # noqa: ANN001
            backbone_params: Callable[[], int | None] | None = None,
            log_to: Sequence[str] = ()) -> dict:
    """Run every algorithm for every seed over the configured held-out domains; ``log_to``
    names loggers (:mod:`fedclip.callbacks`) built for each run, inside its run folder."""
    from fedclip.algorithms import get_algorithm
    from fedclip.callbacks import loggers_from_specs
    from fedclip.inprocess.experiment import run

    out = Path(out)
    if not algorithms or not seeds:
        from fedclip.errors import ConfigError

        raise ConfigError("compare needs at least one algorithm and one seed")
    for what, items in (("algorithm", algorithms), ("seed", seeds)):
        repeated = sorted({str(x) for x in items if list(items).count(x) > 1})
        if repeated:
            from fedclip.errors import ConfigError

            raise ConfigError(f"compare lists {what} {', '.join(repeated)} more than once")
    for a in algorithms:  # the whole plan is checked before the first run
        get_algorithm(base.replace(algorithm=a))
    loggers_from_specs(log_to, out)  # an unknown logger fails before any run
    check_compare_folder(out)
    runs: Runs = {}
    for algorithm in algorithms:
        for seed in seeds:
            cfg = base.replace(algorithm=algorithm, seed=seed)
            folder = out / f"{algorithm}-seed{seed}"
            runs.setdefault(algorithm, {})[seed] = run(
                cfg, folder, resume=resume, reporter=reporter,
                callbacks=loggers_from_specs(log_to, folder, run_name=folder.name))
    n_params = backbone_params() if backbone_params else None
    tables = {"generalization": generalization_table(runs),
              "personalization": personalization_table(runs),
              "resources": resource_table(runs, n_params)}
    text = [f"# fedclip compare: {', '.join(algorithms)}", "",
            f"Backbone `{base.backbone}`, {base.rounds} rounds, seeds {seeds}; accuracy % "
            f"(mean ± std over seeds).", ""]
    if (b2n := base_novel_table(runs)) is not None:
        tables = {"base-to-novel": b2n, **tables}
        text += [base_novel_intro(runs), ""]
    for name, (header, rows) in tables.items():
        text += [f"## {name}", "", markdown(header, rows), ""]
    atomic_write_text(out / COMPARE_FILES[0], "\n".join(text))
    summary = {"schema": "fedclip-compare/1", "config": base.model_dump(),
               "algorithms": algorithms, "seeds": seeds, "backbone_params": n_params,
               "tables": {k: {"header": h, "rows": r} for k, (h, r) in tables.items()}}
    atomic_write_json(out / COMPARE_FILES[1], summary)
    plot(runs, out)
    return summary
