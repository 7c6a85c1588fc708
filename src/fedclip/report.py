"""Results for people: the markdown table and the plots (the run folder writes them).

Below the core in the layers (the run folder calls it): it reads a run's results
(:class:`fedclip.core.records.RunResult`) by their fields and never imports the core."""

from __future__ import annotations

import json
import logging
import math
import subprocess
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fedclip.io import atomic_write

if TYPE_CHECKING:
    from fedclip.config import RunConfig
    from fedclip.core.records import BaseNovelScores, RunResult

log = logging.getLogger(__name__)


def backbone_note(spec: str) -> str | None:
    """The provider's warning to print with every result (the stand-in's: not CLIP)."""
    from fedclip.backbones import backbone_traits

    return backbone_traits(spec).note


COLUMNS = ("held out", "best rnd", "gen", "gen 0-shot", "pers", "pers 0-shot",
           "pers (own)", "params", "MB/round", "s/round")


def _pct(x: float | None) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:.1f}"


def _own(r: RunResult) -> float | None:
    return r.personalized.mean if r.personalized is not None else None


def table_rows(results: list[RunResult]) -> list[tuple[str, ...]]:
    """One row per held-out domain, then the mean."""
    rows: list[tuple[str, ...]] = []
    for r in results:
        rows.append((r.heldout, f"{r.best_round}/{r.rounds}", _pct(r.generalization),
                     _pct(r.zeroshot.generalization), _pct(r.personalization),
                     _pct(r.zeroshot.personalization), _pct(_own(r)),
                     f"{r.trainable_params:,}", f"{r.bytes_per_round / 1e6:.2f}",
                     f"{r.seconds_per_round:.3f}"))
    if len(results) > 1:
        def mean(get: Callable[[RunResult], float | None]) -> float | None:
            vals = [v for r in results if (v := get(r)) is not None and not math.isnan(v)]
            return sum(vals) / len(vals) if vals else None
        rows.append(("mean", "", _pct(mean(lambda r: r.generalization)),
                     _pct(mean(lambda r: r.zeroshot.generalization)),
                     _pct(mean(lambda r: r.personalization)),
                     _pct(mean(lambda r: r.zeroshot.personalization)), _pct(mean(_own)),
                     "", "", ""))
    return rows


# protocol=base2novel: the selected model and the zero-shot classifier, a row each
BASE_NOVEL_COLUMNS = ("held out", "model", "base", "novel", "HM", "held-out base",
                      "held-out novel", "held-out HM")


def _mean(values: list[float | None]) -> float | None:
    vals = [v for v in values if v is not None and not math.isnan(v)]
    return sum(vals) / len(vals) if vals else None


def base_novel_rows(results: list[RunResult]) -> list[tuple[str, ...]] | None:
    """Under protocol=base2novel: per held-out run, the selected model's and the zero-shot
    classifier's base, novel and HM on the clients' test splits and on the held-out domain;
    then their means (HM of the mean base and mean novel, as the papers average). None: no
    run of this protocol."""
    runs = [r for r in results if r.base2novel is not None]
    if not runs:
        return None

    def cells(scores: list[BaseNovelScores]) -> tuple[str, ...]:
        # the means, as the records' own type (its hm: the one rule, without importing it)
        m = replace(scores[0], base=_mean([s.base for s in scores]),
                    novel=_mean([s.novel for s in scores]),
                    heldout_base=_mean([s.heldout_base for s in scores]),
                    heldout_novel=_mean([s.heldout_novel for s in scores]))
        return tuple(_pct(v) for v in (m.base, m.novel, m.hm, m.heldout_base, m.heldout_novel,
                                       m.heldout_hm))

    rows: list[tuple[str, ...]] = []
    for r in runs:
        assert r.base2novel is not None
        rows.append((r.heldout, f"{r.algorithm} (rnd {r.best_round})", *cells([r.base2novel.best])))
        rows.append((r.heldout, "zero-shot", *cells([r.base2novel.zeroshot])))
    if len(runs) > 1:
        rows.append(("mean", runs[0].algorithm,
                     *cells([r.base2novel.best for r in runs if r.base2novel])))
        rows.append(("mean", "zero-shot",
                     *cells([r.base2novel.zeroshot for r in runs if r.base2novel])))
    return rows


def base_novel_note(results: list[RunResult]) -> str | None:
    """The class split of a base2novel run and what its columns mean (None: another
    protocol)."""
    runs = [r for r in results if r.base2novel is not None]
    if not runs or runs[0].base2novel is None:
        return None
    b = runs[0].base2novel
    lines = [f"Base to novel (class split seed {b.split_seed}): base classes "
             f"{', '.join(b.base_classes)}; novel classes {', '.join(b.novel_classes)}. "
             f"Clients train and validate on base-class images only. base: accuracy on "
             f"base-class test images among the base classes; novel: on novel-class test "
             f"images among the novel classes, scored with the novel class names' prompts; HM: "
             f"their harmonic mean. Clients' test splits (mean over clients) and the held-out "
             f"domain. Zero-shot is the row a method must beat on novel classes."]
    if b.novel_note:
        lines.append(b.novel_note + ".")
    return "\n".join(lines)


def round_zero_note(results: list[RunResult]) -> str | None:
    """Why a row selected at round 0 shows a gen. other than zero-shot, when one does (a
    method whose round 0 is the zero-shot classifier needs no note)."""
    at_zero = [r for r in results if r.best_round == 0 and r.rounds > 0
               and r.generalization != r.zeroshot.generalization]
    if not at_zero:
        return None
    return (f"Best round 0 ({', '.join(r.heldout for r in at_zero)}): no trained round beat "
            f"the untrained model on validation. Round 0 is {at_zero[0].algorithm}'s model as "
            f"initialised (an adapter's initial re-weighting of the features), not zero-shot, "
            f"so its gen. differs from the 0-shot column.")


def privacy_note(results: list[RunResult]) -> str | None:
    """The privacy each DP run spent (and where a budget stopped it), when any used DP."""
    lines = []
    for r in results:
        p = r.extra.get("privacy")
        if not isinstance(p, dict):
            continue
        stop = (f"; the budget {p.get('epsilon_budget')} stopped it after round {r.rounds}"
                if p.get("stopped_by_budget") else "")
        lines.append(f"DP ({r.heldout}): epsilon {p.get('epsilon', float('nan')):.3g} spent at "
                     f"delta {p.get('delta')} over {r.rounds} rounds (noise multiplier "
                     f"{p.get('noise_multiplier', float('nan')):.3g}, clipping norm "
                     f"{p.get('clipping_norm')}){stop}.")
    return "\n".join(lines) or None


def markdown(header: tuple[str, ...], rows: list[tuple[str, ...]]) -> str:
    """A markdown table."""
    return "\n".join(["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
                     + ["| " + " | ".join(row) + " |" for row in rows])


def markdown_table(results: list[RunResult]) -> str:
    """The results table as markdown."""
    return markdown(COLUMNS, table_rows(results))


def markdown_report(cfg: RunConfig, results: list[RunResult]) -> str:
    """results.md: the table, the backbone's note and a line per held-out run."""
    parts = [f"# fedclip run: {cfg.algorithm} on {results[0].dataset if results else '?'}", ""]
    note = backbone_note(cfg.backbone)
    if note:
        parts += [f"> {note}", ""]
    parts += [f"Backbone `{cfg.backbone}`, loss `{cfg.loss}`, aggregation `{cfg.aggregation}`, "
              f"seed {cfg.seed}. Accuracies in %: generalization on the held-out domain, "
              f"personalization as the mean over clients' own test splits, both at the round "
              f"with the best validation accuracy (the clients' mean; their median under a "
              f"robust aggregation); pers (own): each client's copy of the "
              f"selected adapter fine-tuned locally for up to {cfg.personalize_epochs} epochs "
              f"(chosen on its val split).", "", markdown_table(results), ""]
    for note in (round_zero_note(results), privacy_note(results)):
        if note is not None:
            parts += [note, ""]
    rows = base_novel_rows(results)
    if rows is not None:
        parts += ["## Base to novel", "", "The table above is on the base classes alone.", "",
                  markdown(BASE_NOVEL_COLUMNS, rows), "", base_novel_note(results) or "", ""]
    for r in results:
        clients = ", ".join(f"{k} {_pct(v)}" for k, v in r.best.per_client.items())
        parts.append(f"- held-out **{r.heldout}**: per client {clients}; at the last round "
                     f"gen. {_pct(r.last.generalization)}, pers. "
                     f"{_pct(r.last.personalization)}"
                     + (f"; skipped images: {sum(map(len, r.skipped_images.values()))}"
                        if r.skipped_images else ""))
    return "\n".join(parts) + "\n"


def _num(value: float | None) -> float:
    """A plotted value: 0 stays 0 (a client stuck at 0 % is a line at 0); None is a gap."""
    return float("nan") if value is None else float(value)


def history_data(result: RunResult) -> dict[str, Any]:
    """What the history plot shows of a run, as plain JSON (so that another process can draw
    it): the evaluated rounds' per-client test and held-out accuracies, the trained rounds'
    per-client losses, the selected round."""
    evaluated = [r for r in result.history if r.test_accuracy is not None]
    trained = [r for r in result.history if r.round > 0]
    return {"heldout": result.heldout, "best_round": result.best_round, "loss": result.loss,
            "rounds": [r.round for r in evaluated],
            "test": [dict(r.test_accuracy or {}) for r in evaluated],
            "heldout_accuracy": [r.heldout_accuracy for r in evaluated],
            "trained": [r.round for r in trained],
            "train_loss": [dict(r.train_loss) for r in trained],
            **({"novel": result.base2novel.best.novel,
                "heldout_novel": result.base2novel.best.heldout_novel}
               if result.base2novel is not None else {})}


def plot_history(result: RunResult, path: Path) -> None:
    """Accuracy per round (each client's test split, the held-out domain) and training loss;
    each client in one colour and marker in both panels. Drawn by the background process of
    :func:`plots_in_background` when one is running, else here."""
    data = history_data(result)
    worker = _WORKER.get()
    if worker is not None and worker.submit(data, path):
        return
    draw_history(data, path)


def draw_history(data: dict[str, Any], path: Path) -> None:
    """The history plot of :func:`history_data`'s ``data``, written to ``path`` (PNG)."""
    from fedclip.plots import pyplot, styles

    plt = pyplot()
    if plt is None:
        return
    rounds, nan = data["rounds"], float("nan")
    fig, (ax_acc, ax_loss) = plt.subplots(1, 2, figsize=(11, 4))
    clients = sorted({c for acc in data["test"] for c in acc})
    style = styles(clients)
    every = max(1, len(rounds) // 10)
    for client in clients:  # a client missing from a round (it left) leaves a gap
        ax_acc.plot(rounds, [100 * _num(acc.get(client)) for acc in data["test"]],
                    label=f"{client} (test)", markevery=every, markersize=4, **style[client])
    ax_acc.plot(rounds, [100 * _num(a) for a in data["heldout_accuracy"]], "k-", lw=2,
                label=f"{data['heldout']} (held out)")
    ax_acc.axvline(data["best_round"], color="grey", ls=":", label="selected round")
    title = f"held out: {data['heldout']}"
    if data.get("novel") is not None:  # the lines are base classes; novel: the selected model
        title += " (lines: base classes)"
        for value, marker, where in ((data["novel"], "*", "clients' test"),
                                     (data["heldout_novel"], "X", data["heldout"])):
            if value is not None and not math.isnan(value):
                ax_acc.plot([data["best_round"]], [100 * value], linestyle="none", color="k",
                            marker=marker, markersize=10, label=f"novel classes, {where}")
    ax_acc.set(xlabel="round", ylabel="accuracy (%)", title=title)
    from matplotlib.ticker import MaxNLocator

    for ax in (ax_acc, ax_loss):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # rounds are whole numbers
    for client in clients:
        ax_loss.plot(data["trained"], [loss.get(client, nan) for loss in data["train_loss"]],
                     label=client, markevery=every, markersize=4, **style[client])
    ax_loss.set(xlabel="round", ylabel=f"train loss ({data['loss']})", title="training loss")
    # one legend for both panels (a client has the same colour and marker in each), outside
    fig.legend(*ax_acc.get_legend_handles_labels(), loc="center left",
               bbox_to_anchor=(1.0, 0.5), fontsize=8)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight"))
    plt.close(fig)


class _PlotWorker:
    """A second Python process that imports matplotlib at once and then draws the history
    plots it is sent (one JSON line each: the data and the PNG's path), so that neither the
    import nor the drawing waits on this process's training."""

    def __init__(self) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-c", "from fedclip.report import serve_plots; serve_plots()"],
            stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
            text=True)
        self.sent: list[tuple[dict[str, Any], Path]] = []

    def submit(self, data: dict[str, Any], path: Path) -> bool:
        """Send one plot; False when the process is gone (the caller draws it itself)."""
        if self.proc.poll() is not None or self.proc.stdin is None:
            return False
        try:
            self.proc.stdin.write(json.dumps({"data": data, "path": str(path)})  # NaN survives
                                  + "\n")
            self.proc.stdin.flush()
        except OSError:
            return False
        self.sent.append((data, path))
        return True

    def close(self, timeout: float = 300.0) -> None:
        """Wait for every plot sent; one the process did not draw (it failed: a missing
        import, a full disk) is drawn here, so every plot exists afterwards. Nothing sent:
        stopped at once."""
        if not self.sent:
            self.proc.kill()
        try:
            _, err = self.proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            _, err = self.proc.communicate()
        missing = [(data, path) for data, path in self.sent if not path.exists()]
        if missing:
            why = (err or "").strip().splitlines()[-1:] or [f"exit {self.proc.returncode}"]
            log.debug("the plot process drew %d of %d plots (%s); drawing the rest here",
                      len(self.sent) - len(missing), len(self.sent), why[0])
        for data, path in missing:
            draw_history(data, path)


_WORKER: ContextVar[_PlotWorker | None] = ContextVar("fedclip_plot_worker", default=None)


@contextmanager
def plots_in_background() -> Iterator[None]:
    """Within this block, history plots are drawn by a second process started now, which
    imports matplotlib while this one imports torch and trains; leaving the block waits for
    them (every plot exists afterwards). On a machine with a free core this takes plotting
    off a short run's wall time (the CLI's ``run`` uses it); where the process cannot start,
    plots are drawn here as before."""
    worker: _PlotWorker | None = None
    if _matplotlib_installed():  # else drawn here, where pyplot() warns once what to install
        try:
            worker = _PlotWorker()
        except OSError:
            worker = None
    token = _WORKER.set(worker)
    try:
        yield
    finally:
        _WORKER.reset(token)
        if worker is not None:
            worker.close()


def _matplotlib_installed() -> bool:
    """Whether this process could import matplotlib, found without importing it."""
    import importlib.util

    try:
        return importlib.util.find_spec("matplotlib") is not None
    except (ImportError, ValueError):
        return False


def serve_plots() -> None:
    """The plot process's loop: matplotlib first, then one plot per line on stdin."""
    from fedclip.plots import pyplot

    pyplot()  # the import, while the parent imports torch
    for line in sys.stdin:
        job = json.loads(line)
        draw_history(job["data"], Path(job["path"]))
