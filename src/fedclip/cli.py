"""The ``fedclip`` command line. ``main(argv)`` takes a list, so tests run the real CLI."""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
import threading
from pathlib import Path
from typing import Annotated, Any, get_args

import click
import typer
from rich.console import Console
from rich.logging import RichHandler
from rich.markup import escape
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table
from typer.core import TyperCommand

from fedclip.config import RunConfig, parse_settings
from fedclip.core.records import RoundRecord, RunResult
from fedclip.errors import ConfigError, FedclipError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  rich_markup_mode=None,  # click's help: wraps at any width, cuts no name
                  help="FedCLIP: federated adaptation of a frozen CLIP with an attention adapter.")
def _console(stderr: bool = False) -> Console:
    """A terminal's own width (tables fold instead of wrapping rows); logs and pipes get a
    wide one, so that no line is folded in a file."""
    console = Console(stderr=stderr)
    return console if console.is_terminal else Console(stderr=stderr, width=160)


console = _console(stderr=True)
out_console = _console()


def _version(value: bool) -> None:
    if value:
        from importlib.metadata import version

        out_console.print(f"fedclip {version('fedclip')}")
        raise typer.Exit()


class Verbosity:
    """The command's verbosity: -1 quiet (errors and where the results are), 0 progress and
    the table, 1 a line per round, 2 debug (Flower's logs included)."""

    level = 0


@app.callback()
def _options(
    verbose: int = typer.Option(0, "--verbose", "-v", count=True, metavar="", show_default=False,
                                help="-v: a line per round and fedclip's info lines; -vv: "
                                     "debug, Flower's debug logs included."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="Errors and the results path "
                                                            "only: no progress, no table."),
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                 help="Print the version and exit."),
) -> None:
    """FedCLIP: federated adaptation of a frozen CLIP with an attention adapter."""
    if quiet and verbose:
        raise ConfigError("pass -q (errors only) or -v (more), not both")
    Verbosity.level = -1 if quiet else min(verbose, 2)
    level = {-1: logging.ERROR, 0: logging.WARNING, 1: logging.INFO, 2: logging.DEBUG}[
        Verbosity.level]
    # fedclip's own loggers only: libraries (matplotlib's font search, ...) stay at warnings
    logging.getLogger("fedclip").setLevel(level)
    if quiet:
        logging.getLogger().setLevel(logging.ERROR)
    if Verbosity.level == 2:  # Flower reads it when first imported, here or in `flwr run`
        os.environ.setdefault("FLWR_LOG_LEVEL", "DEBUG")


class RichReporter:
    """Progress bars for extraction (images/s) and rounds (accuracy so far); where the output
    is not a terminal (logs, CI), a plain line every tenth of the work instead."""

    def __init__(self, progress: Progress, every_round: bool = False,
                 quiet: bool = False) -> None:
        self.progress = progress
        self.tasks: dict[str, Any] = {}
        self.plain = not progress.console.is_terminal
        self.every_round = every_round  # -v: a line for every round, terminal or not
        self.quiet = quiet  # -q: nothing at all

    def _log(self, done: int, total: int, text: str, every: bool = False) -> None:
        if self.quiet:
            return
        if every or (self.plain and (done == total or done % max(1, total // 10) == 0)):
            self.progress.console.print(text, highlight=False, markup=False)

    def _task(self, key: str, label: str, total: int) -> Any:
        if key not in self.tasks:
            self.tasks[key] = self.progress.add_task(escape(label), total=total, info="")
        return self.tasks[key]

    def extraction(self, domain: str, done: int, total: int, cached: bool = False) -> None:
        if cached:  # read at once: no rate to show, and nothing was extracted
            task = self._task(f"x:{domain}", f"features {domain}", total)
            self.progress.update(task, completed=total, info="from the cache")
            if self.plain and not self.quiet:
                self.progress.console.print(f"features {domain}: {total} images from the "
                                            f"cache", highlight=False, markup=False)
            return
        key = f"x:{domain}"
        if key in self.tasks and done <= self.progress.tasks[self.tasks[key]].completed:
            self.progress.reset(self.tasks[key], total=total)  # a new pass (compare's next run)
        task = self._task(key, f"features {domain}", total)
        elapsed = self.progress.tasks[task].elapsed or 0.0
        rate = f"{done / elapsed:.0f} img/s" if elapsed > 0.5 else ""
        self.progress.update(task, completed=done, info=rate)
        self._log(done, total, f"features {domain}: {done}/{total} {rate}")

    def round_end(self, heldout: str, record: RoundRecord, total_rounds: int) -> None:
        task = self._task(f"r:{heldout}", f"rounds (held out: {heldout})", total_rounds)
        info = ""
        if record.mean_val_accuracy is not None:
            gen = record.heldout_accuracy
            info = (f"val {100 * record.mean_val_accuracy:.1f}  "
                    f"gen {100 * gen:.1f}" if gen is not None else "")
        self.progress.update(task, completed=record.round, info=info)
        self._log(record.round, total_rounds,
                  f"held out {heldout}: round {record.round}/{total_rounds} {info}",
                  every=self.every_round)

    def info(self, message: str) -> None:
        if not self.quiet:
            self.progress.console.print(message, markup=False, highlight=False)


def _progress(*columns: Any) -> Progress:
    """Progress bars on a terminal; plain lines into a pipe; nothing at all with -q."""
    return Progress(*columns, console=console, transient=False,
                    disable=Verbosity.level < 0 or not console.is_terminal)


def _reporter(progress: Progress) -> RichReporter:
    return RichReporter(progress, every_round=Verbosity.level >= 1,
                        quiet=Verbosity.level < 0)


def _settings(preset: Path | None, items: list[str], resume_from: Path | None = None,
              **flags: Any) -> RunConfig:
    """Defaults, then (``--resume``) the run folder's own config.json, then the preset, then
    ``--set``, then flags; one key set two ways to two values is an error that names it."""
    saved: dict[str, Any] = {}
    if resume_from is not None:
        from fedclip.core.run_folder import RunFolder

        saved = RunFolder.saved_settings(resume_from)
    values = parse_settings(items)
    for key, value in flags.items():
        if value is None:
            continue
        if key in values and values[key] != value:
            raise ConfigError(f"{key} is set twice (--set {key}={values[key]!r} and "
                              f"--{key.replace('_', '-')} {value!r}); keep one")
        values[key] = value
    if saved:
        from fedclip.config import load_preset

        return RunConfig.validated({**saved, **(load_preset(preset) if preset else {}),
                                    **values})
    return RunConfig.build(preset, **values)


# --- options shared by `run` and `compare` (one definition each; help from RunConfig) -----
def _default(field: str) -> str:
    return str(RunConfig.model_fields[field].default)


def _choices(field: str) -> click.Choice:
    """The values of a Literal field, as click choices."""
    return click.Choice(list(get_args(RunConfig.model_fields[field].annotation)))


def _datasets() -> click.Choice:
    from fedclip.data.specs import SPECS

    return click.Choice([*SPECS, "auto", "custom"])


DataRoot = Annotated[str | None, typer.Option(
    help="Folder <domain>/<class>/<image>, or hf:<dataset> (online). Default: the embedded "
         "PACS sample (40 images).")]
Backbone = Annotated[str | None, typer.Option(
    help=f"Backbone spec (default {_default('backbone')}, the paper's; downloads once. "
         f"Offline: standin). `fedclip backbones` lists the forms.")]
Heldout = Annotated[str | None, typer.Option(
    help=f"Held-out domain, or 'all' for each in turn (default {_default('heldout')}).")]
Rounds = Annotated[int | None, typer.Option(
    help=f"Communication rounds (default {_default('rounds')}).")]
Loss = Annotated[str | None, typer.Option(click_type=_choices("loss"), help=(
    f"clip (contrastive, the reference) or ce (default {_default('loss')})."))]
Dataset = Annotated[str | None, typer.Option(click_type=_datasets(), help=(
    "Dataset spec the folders are checked against; auto detects it, custom takes any "
    "classes."))]
Device = Annotated[str | None, typer.Option(
    help="auto (a GPU when there is one), cpu, cuda, cuda:N, mps.")]
ClientsPerDomain = Annotated[int | None, typer.Option(
    help=f"Clients each training domain is split into (default "
         f"{_default('clients_per_domain')}: the reference).")]
Partition = Annotated[str | None, typer.Option(click_type=_choices("partition"), help=(
    "How a domain is split between its clients: iid, or dirichlet (label skew, see "
    "--dirichlet-alpha)."))]
DirichletAlpha = Annotated[float | None, typer.Option(
    help=f"Dirichlet concentration: smaller is more skewed (default "
         f"{_default('dirichlet_alpha')}).")]
Trust = Annotated[str | None, typer.Option(click_type=_choices("trust"), help=(
    f"Whom the server trusts (default {_default('trust')}). untrusted, for a deployment: "
    "where the reference defaults stand, aggregation=median, norm_factor=3, weights capped "
    "at the median size, best round by the median val accuracy. Bad updates each rule "
    "tolerates among the n of a round (--set aggregation=..., --set byzantine=f): weighted, "
    "uniform 0 (one client moves the mean up to norm_factor x an honest reach); median "
    "(n-1)//2; trimmed-mean int(trim_fraction x n); krum, multikrum, bulyan f, when n >= "
    "2f+3 (bulyan 4f+3); results.json states the run's."))]
Resume = Annotated[bool, typer.Option(
    help="Continue the run in --out where it stopped, with its own settings (flags given "
         "now override).")]
Preset = Annotated[Path | None, typer.Option("--config", help="TOML preset (see configs/).")]
SetItems = Annotated[list[str] | None, typer.Option(
    "--set", help="Any config key, or an algorithm option: --set lr=1e-4 --set fedprox.mu=0.1")]
CacheDir = Annotated[str | None, typer.Option(help="Feature cache folder (default "
                                                   "$FEDCLIP_CACHE or ~/.cache/fedclip).")]
Threads = Annotated[int, typer.Option(
    min=0, help="torch threads (0: torch's default). The adapter's ops are small: on a busy "
                "machine 1 is often fastest.")]
LogTo = Annotated[list[str] | None, typer.Option(
    help="A logger for every round: tensorboard (into the run folder's tensorboard/) or "
         "tensorboard:DIR (needs the tensorboard extra). Repeatable.")]


class PlainHelp(TyperCommand):
    """click's plain help (it wraps at any width; rich's cuts option names at 80 columns),
    without the backslashes typer 0.20 puts before '[' for rich even in plain mode."""

    def format_help(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        super().format_help(ctx, formatter)
        formatter.buffer[:] = [b.replace("\\[", "[") for b in formatter.buffer]


# The built-in backbone providers' prefixes (fedclip.backbones imports torch, which help must
# not wait for); a test keeps this equal to fedclip.backbones.providers().
BACKBONE_PREFIXES = ("open_clip", "standin", "hf")


def backbone_prefixes() -> list[str]:
    """The backbone spec prefixes, plugins' entry points included, without importing any."""
    from importlib.metadata import entry_points

    plugins = [ep.name for ep in entry_points(group="fedclip.backbones")]
    return [*BACKBONE_PREFIXES, *(p for p in plugins if p not in BACKBONE_PREFIXES)]


class RegistryHelp(PlainHelp):
    """Adds the registered algorithms and backbone providers (plugins included) to the help,
    from the registries' static tables and entry points: help imports no algorithm and no
    backbone (that takes seconds)."""

    def format_help(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        from fedclip.algorithms import listed

        extra = {"algorithm": f" One of: {', '.join(listed())}.",
                 "algorithms": f" Registered: {', '.join(listed())}.",
                 "backbone": f" Providers: {', '.join(backbone_prefixes())}."}
        for param in self.params:
            if param.name in extra and not getattr(param, "_registry_help", False):
                param.help = (getattr(param, "help", None) or "") + extra[param.name]
                param._registry_help = True  # type: ignore[attr-defined]
        super().format_help(ctx, formatter)


def _flags(values: dict[str, Any]) -> dict[str, Any]:
    """A command's parameters that are RunConfig fields (its flags share their names)."""
    return {k: v for k, v in values.items() if k in RunConfig.model_fields}


def _threads(threads: int) -> None:
    if threads:
        import torch

        torch.set_num_threads(threads)


def _print_note(backbone: str, note: str | None = None) -> None:
    """The backbone's warning (the stand-in's: not CLIP); ``note`` when already known."""
    if note is None:
        from fedclip.report import backbone_note

        note = backbone_note(backbone)
    if note and Verbosity.level >= 0:
        console.print(f"[yellow]note:[/] {escape(note)}")


# What a run on the embedded sample can show, and the command for the real experiment
# (times: benchmarks/README.md, 2-core CPU: fetch ~190 MB, 254 s of extraction, 750-980 s).
SAMPLE_NOTE = ("The embedded sample has 40 images (2-3 test images per client): this run "
               "shows that the pipeline works end to end, not how well a method works (each "
               "accuracy moves in steps of 33-50 points).")
REAL_EXPERIMENT = ("The real experiment, full PACS (9,991 images; about 20 minutes on 2 CPU "
                   "cores with the stand-in, after a download of about 190 MB):\n"
                   "  fedclip fetch pacs data/PACS\n"
                   "  fedclip run --data-root data/PACS --backbone standin --heldout all "
                   "--out runs/pacs")


def _print_results(algorithm: str, results: list[RunResult], out: Path, sample: bool) -> None:
    """The table and its notes (not with -q), then where the results are (always);
    ``sample``: a run on the embedded sample, which says what it can show."""
    from fedclip.report import (
        BASE_NOVEL_COLUMNS,
        COLUMNS,
        base_novel_note,
        base_novel_rows,
        privacy_note,
        round_zero_note,
        table_rows,
    )

    if Verbosity.level >= 0:
        table = Table(title=f"{algorithm} — accuracy % (gen.: held-out domain; pers.: "
                            f"clients' test splits)")
        for col in COLUMNS:
            table.add_column(col, justify="right")
        for row in table_rows(results):
            table.add_row(*map(escape, row))
        out_console.print(table)
        if (rows := base_novel_rows(results)) is not None:  # protocol=base2novel
            b2n = Table(title="base to novel — accuracy %")
            for col in BASE_NOVEL_COLUMNS:
                b2n.add_column(col, justify="right")
            for row in rows:
                b2n.add_row(*map(escape, row))
            out_console.print(b2n)
        notes = [round_zero_note(results), privacy_note(results), base_novel_note(results)]
        if sample:
            notes += [SAMPLE_NOTE, REAL_EXPERIMENT]
        for note in notes:
            if note is not None:
                out_console.print(note, markup=False, highlight=False, soft_wrap=True)
    out_console.print(f"results: {out / 'results.json'}, {out / 'results.md'}, plots in {out}/*/",
                      markup=False, soft_wrap=True)


def finished_results(cfg: RunConfig, out: Path) -> tuple[list[RunResult], str | None] | None:
    """The results (and backbone note) of a run that is already finished, read back from
    ``out/results.json`` (nothing is loaded or recomputed), when that file holds every
    requested held-out domain at ``cfg.rounds`` with exactly these settings; otherwise None
    (the run resumes, and any problem with the folder is reported there). The data is
    listed (for ``heldout=all``), never read."""
    from fedclip.core.records import RecordError, read_results_document

    try:
        document = json.loads((out / "results.json").read_text(encoding="utf-8"))
        config, runs = read_results_document(document)
    except (OSError, ValueError, RecordError):
        return None
    if config != cfg.model_dump(mode="json"):
        return None
    if cfg.heldout != "all":
        heldouts = [cfg.heldout]
    elif cfg.data_root is not None and cfg.data_root.startswith("hf:"):
        return None  # its domains are known once the hub copy is resolved: resume
    else:
        from fedclip.data.folder import scan_dataset
        from fedclip.data.sources import resolve_data_root

        try:
            root = resolve_data_root(cfg.data_root, Path("."))
            heldouts = list(scan_dataset(root, cfg.dataset, cfg.classes).domains)
        except FedclipError:
            return None
    by = {r.heldout: r for r in runs}
    if any(h not in by or by[h].rounds != cfg.rounds for h in heldouts):
        return None
    note = document.get("backbone_note")
    return [by[h] for h in heldouts], note if isinstance(note, str) else None


@app.command("run", cls=RegistryHelp)
def run_command(
    data_root: DataRoot = None,
    backbone: Backbone = None,
    heldout: Heldout = None,
    rounds: Rounds = None,
    algorithm: Annotated[str | None, typer.Option(
        help=f"Algorithm (default {_default('algorithm')}); `fedclip algorithms` lists them "
             f"with their options.")] = None,
    seed: Annotated[int | None, typer.Option(help="Seed for splits, init and batches.")] = None,
    loss: Loss = None,
    dataset: Dataset = None,
    device: Device = None,
    clients_per_domain: ClientsPerDomain = None,
    partition: Partition = None,
    dirichlet_alpha: DirichletAlpha = None,
    trust: Trust = None,
    out: Annotated[Path, typer.Option(help="Run folder for all outputs.")] = Path("runs/latest"),
    resume: Resume = False,
    config: Preset = None,
    set_: SetItems = None,
    cache_dir: CacheDir = None,
    threads: Threads = 0,
    log_to: LogTo = None,
) -> None:
    """Train with leave-one-domain-out and report generalization and personalization."""
    from fedclip.report import plots_in_background

    with plots_in_background():  # started first: it imports matplotlib while we import torch
        _run(out, resume, set_, config, threads, log_to, _flags(locals()))


def _run(out: Path, resume: bool, set_: list[str] | None, config: Path | None, threads: int,
         log_to: list[str] | None, flags: dict[str, Any]) -> None:
    from fedclip.dynamo import defer_dynamo_import

    defer_dynamo_import()  # this process never compiles: no torch._dynamo for the optimizer
    _outs.append(out)
    cfg = _settings(config, set_ or [], resume_from=out if resume else None, **flags)
    if resume and not log_to and (done := finished_results(cfg, out)) is not None:
        _print_note(cfg.backbone, done[1] or "")
        if Verbosity.level >= 0:
            console.print(f"{out} is finished ({cfg.rounds} rounds): its table, from "
                          f"results.json (nothing recomputed; --rounds N extends it)",
                          markup=False, highlight=False, soft_wrap=True)
        _print_results(cfg.algorithm, done[0], out, sample=cfg.data_root is None)
        return
    _print_note(cfg.backbone)
    from fedclip.callbacks import loggers_from_specs
    from fedclip.inprocess.experiment import run

    _threads(threads)
    loggers = loggers_from_specs(log_to or [], out)
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
               TextColumn("{task.fields[info]}"), TimeElapsedColumn(), TimeRemainingColumn())
    with _progress(*columns) as progress:
        results = run(cfg, out, resume=resume, reporter=_reporter(progress), callbacks=loggers)
    _print_results(cfg.algorithm, results, out, sample=cfg.data_root is None)


@app.command("compare", cls=RegistryHelp)
def compare_command(
    algorithms: Annotated[str, typer.Option(help="Comma-separated algorithms.")] = (
        "zeroshot,fedclip,local,fedprox"),
    seeds: Annotated[str, typer.Option(help="Comma-separated seeds (mean ± std over them).")
                     ] = "0",
    data_root: DataRoot = None,
    backbone: Backbone = None,
    heldout: Heldout = None,
    rounds: Rounds = None,
    loss: Loss = None,
    dataset: Dataset = None,
    device: Device = None,
    clients_per_domain: ClientsPerDomain = None,
    partition: Partition = None,
    dirichlet_alpha: DirichletAlpha = None,
    trust: Trust = None,
    out: Annotated[Path, typer.Option(help="Folder for all runs and tables.")] = Path(
        "runs/compare"),
    resume: Resume = False,
    config: Preset = None,
    set_: SetItems = None,
    cache_dir: CacheDir = None,
    threads: Threads = 0,
    log_to: LogTo = None,
) -> None:
    """Every algorithm on the same splits and seeds: the paper's comparison tables."""
    from fedclip.compare import compare, markdown

    _outs.append(out)
    cfg = _settings(config, set_ or [], **_flags(locals()))
    _threads(threads)
    try:
        seed_list = [int(s) for s in seeds.split(",") if s.strip()]
    except ValueError:
        raise ConfigError(f"--seeds takes integers separated by commas (got {seeds!r})") from None
    _print_note(cfg.backbone)

    def count_backbone() -> int | None:
        from fedclip.backbones import load_backbone

        return load_backbone(cfg.backbone).num_parameters()

    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
               TextColumn("{task.fields[info]}"), TimeElapsedColumn())
    with _progress(*columns) as progress:
        summary = compare(cfg, [a.strip() for a in algorithms.split(",") if a.strip()],
                          seed_list, out, resume=resume, reporter=_reporter(progress),
                          backbone_params=count_backbone, log_to=log_to or [])
    if Verbosity.level >= 0:
        for name, table in summary["tables"].items():
            out_console.print(f"\n[bold]{name}[/]")
            out_console.print(markdown(table["header"], table["rows"]))
    out_console.print(f"\ntables: {out / 'compare.md'}, plots: {out / 'compare.png'}")


@app.command("paper", cls=RegistryHelp)
def paper_command(
    data_root: DataRoot = None,
    backbone: Backbone = None,
    heldout: Heldout = None,
    rounds: Rounds = None,
    seed: Annotated[int | None, typer.Option(help="Seed for splits, init and batches.")] = None,
    device: Device = None,
    out: Annotated[Path, typer.Option(help="Folder for the five methods' runs and the "
                                           "table.")] = Path("runs/paper"),
    resume: Resume = False,
    config: Preset = None,
    set_: SetItems = None,
    cache_dir: CacheDir = None,
    threads: Threads = 0,
) -> None:
    """The paper's PACS table: FedCLIP, CLIP FedAvg/FedProx, AlexNet FedAvg/FedProx, leave-one-
    domain-out, each published number beside the measured one (docs/reproducing.md: the
    weights, the data and the time it takes)."""
    from fedclip.reproduce import caveat, reproduce

    _outs.append(out)
    cfg = _settings(config, set_ or [], dataset="pacs", **_flags(locals()))
    _threads(threads)
    note = caveat(cfg.backbone)
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
               TextColumn("{task.fields[info]}"), TimeElapsedColumn())
    with _progress(*columns) as progress:
        summary = reproduce(cfg, out, resume=resume, reporter=_reporter(progress))
    if Verbosity.level >= 0:
        table = Table(title=f"The paper's PACS table: published | measured with {cfg.backbone} "
                            f"(generalization %, {cfg.rounds} rounds)")
        for i, col in enumerate(summary["header"]):
            table.add_column(escape(col), justify="right", no_wrap=i == 0)
        for row in summary["rows"]:
            table.add_row(*map(escape, row))
        out_console.print(table)
        for label, why in summary["not_run"].items():
            out_console.print(f"{label} not run: {why}", markup=False, soft_wrap=True)
        if note:
            out_console.print(f"[bold red]{escape(note)}.[/]", soft_wrap=True)
    out_console.print(f"tables: {out / 'paper.md'}, {out / 'paper.json'}", markup=False,
                      soft_wrap=True)


@app.command("fetch", cls=PlainHelp)
def fetch_command(
    dataset: str = typer.Argument(..., help="pacs or office-home (at the revision fedclip "
                                            "pins), or hf:ORG/NAME[@REVISION]."),
    folder: Path = typer.Argument(..., help="Where to write <domain>/<class>/<image>; pass "
                                            "it to run and compare as --data-root."),
    revision: str | None = typer.Option(None, help="Another hub commit than the pinned one."),
) -> None:
    """Download a dataset from the Hugging Face hub into a folder, once (PACS: 191 MB, written
    as 9,991 PNGs, about 0.5 GB; needs internet and the hub extra)."""
    from fedclip.data.sources import data_source, fetch

    target, downloaded = fetch(dataset, folder, revision)
    source = data_source(target) or {}
    if Verbosity.level >= 0:
        what = "fetched" if downloaded else "already there:"
        console.print(f"{what} {source.get('dataset')}@{source.get('revision')}, "
                      f"{source.get('images', 0):,} images", markup=False, highlight=False)
    out_console.print(f"use it with: --data-root {folder}", markup=False, soft_wrap=True)


@app.command("algorithms", cls=PlainHelp)
def algorithms_command() -> None:
    """The registered algorithms, what each trains, where it runs, and its options."""
    from fedclip.algorithms import algorithm_class, names

    table = Table(title="algorithms (--algorithm NAME; options: --set NAME.KEY=VALUE)")
    for col in ("name", "what trains", "Flower", "options (default)"):
        table.add_column(col)
    for name in names():
        cls = algorithm_class(name)
        algo = cls(RunConfig(algorithm=name))
        options = ", ".join(f"{name}.{k}={v}" for k, v in algo.options.model_dump().items())
        table.add_row(name, cls.summary, "yes" if algo.runs_on_flower else "in-process only",
                      options or "-")
    out_console.print(table)


@app.command("flower-run", cls=PlainHelp)
def flower_run_command(
    superlink: str | None = typer.Argument(
        None, help="SuperLink connection name in $FLWR_HOME/config.toml (default: its default)."),
    app_dir: Path = typer.Option(Path("."), "--app", help="The Flower app (this project)."),
    run_config: list[str] = typer.Option(  # noqa: B006
        [], "--run-config", "-c", help="Run config overrides, as for flwr run (keys checked "
        "against the app's [tool.flwr.app.config] first)."),
    federation_config: list[str] = typer.Option(  # noqa: B006
        [], "--federation-config", help="Simulation settings, as for flwr run: "
        "'num-supernodes=4'."),
) -> None:
    """`flwr run --stream`, but exits non-zero when the run did not complete; ends with the
    same table as an in-process run."""
    from fedclip.flower import launch

    found: list[Path] = []

    def echo(line: str) -> None:
        if (m := launch.RESULTS.search(line)) is not None:
            found.append(Path(m.group(1)))
        if Verbosity.level >= 0:  # -q: only the status and where the results are
            out_console.out(line, highlight=False)

    run_id, status = launch.flower_run(app_dir, superlink, run_config, echo=echo,
                                       federation_config=federation_config)
    out_console.print(f"run {run_id}: {status}")
    if not found:
        return
    results = found[-1]
    try:
        from fedclip.core.records import read_results_document

        config, runs = read_results_document(json.loads(results.read_text(encoding="utf-8")))
    except OSError:  # a deployment: the run folder is on the SuperLink host
        out_console.print(f"results: {results} (on the SuperLink's machine)", markup=False,
                          soft_wrap=True)
        return
    except ValueError as exc:  # RecordError included
        raise FedclipError(f"{results} cannot be read back ({exc})") from None
    _print_results(str(config.get("algorithm", "?")), runs, results.parent, sample=False)


@app.command("flower-stop", cls=PlainHelp)
def flower_stop_command() -> None:
    """Stop the local simulation SuperLink that `fedclip flower-run` started (by its
    recorded pid, with the processes it started; nothing else)."""
    from fedclip.flower.launch import flwr_home, stop_local_superlink

    out_console.print(stop_local_superlink(flwr_home()), markup=False, soft_wrap=True)


@app.command("predict", cls=PlainHelp)
def predict_command(
    adapter: Path = typer.Argument(..., help="An adapter file from a run folder."),
    inputs: list[Path] = typer.Argument(..., help="Image files or folders."),
    backbone: str | None = typer.Option(None, help="Must match the adapter's (checked)."),
    top: int = typer.Option(1, min=1, help="Classes to list per image."),
    allow_download: bool = typer.Option(
        False, help="Let the adapter file's backbone spec download weights (otherwise a "
                    "spec that would download must be confirmed with --backbone)."),
    out: Path | None = typer.Option(None, help="Write the predictions as CSV (absolute "
                                                "paths)."),
    cache_dir: str | None = typer.Option(None, help="Feature cache folder."),
) -> None:
    """Classify images with a trained adapter."""
    import csv

    from fedclip.io import atomic_write
    from fedclip.predict import predict

    rows = predict(adapter, inputs, backbone=backbone, cache_dir=cache_dir, top=top,
                   allow_download=allow_download)
    table = Table(title=f"predictions ({adapter})")
    for col in ("file", "class", "probability", "top"):
        table.add_column(col)
    for r in rows:
        table.add_row(escape(_shown(r["file"])), escape(r.get("class", r.get("error", ""))),
                      f"{r['probability']:.3f}" if "probability" in r else "",
                      escape(", ".join(f"{c} {p:.2f}" for c, p in r.get("top", []))))
    out_console.print(table)
    if out is not None:
        def write(tmp: Path) -> None:
            with tmp.open("w", newline="") as f:
                writer = csv.writer(f)
                writer.writerow(["file", "rank", "class", "probability", "error"])
                for r in rows:
                    for rank, (c, p) in enumerate(r.get("top", []), start=1):
                        writer.writerow([r["file"], rank, c, f"{p:.6f}", ""])
                    if "error" in r:
                        writer.writerow([r["file"], "", "", "", r["error"]])
        atomic_write(out, write)
        out_console.print(f"wrote {out}")


def _shown(path: str) -> str:
    """A file as people write it: relative to the current folder when it lies inside it."""
    try:
        return str(Path(path).relative_to(Path.cwd().resolve()))
    except ValueError:
        return path


@app.command("backbones", cls=PlainHelp)
def backbones_command() -> None:
    """The backbone spec forms of every registered provider (plugins included)."""
    from fedclip.backbones import provider_module, providers
    from fedclip.errors import BackboneError

    table = Table(title="backbones (--backbone SPEC)")
    for col in ("spec", "what it loads"):
        table.add_column(col)
    for prefix in providers():
        try:
            forms = getattr(provider_module(prefix), "FORMS", None) or [(f"{prefix}:...", "")]
        except BackboneError as exc:  # its packages are missing: say which
            forms = [(f"{prefix}:...", str(exc))]
        for form, what in forms:
            table.add_row(escape(form), escape(what))
    out_console.print(table)


class Terminated(KeyboardInterrupt):
    """SIGTERM, handled as Ctrl-C is (locks released, checkpoints kept), exit 143."""


_signals: list[int] = []  # the signals this process received (click turns them into Abort)


def _on_sigterm(signum: int, frame: object) -> None:
    _signals.append(signum)
    raise Terminated


_outs: list[Path] = []  # the run folder of the command running (for the interrupt hint)


def _interrupted_hint() -> str:
    """What to do after an interrupt: ``--resume`` only where the run folder can resume
    (it holds its settings), never during a command that has none."""
    if not _outs:
        return "nothing to resume"
    out = _outs[-1]
    folders = [out, *(f for f in out.glob("*-seed*") if f.is_dir())] if out.is_dir() else []
    from fedclip.core.run_folder import RunFolder

    if any(RunFolder.holds_settings(f) for f in folders):
        return (f"continue with the same command and --resume (--out {out}: what was done "
                f"is kept)")
    return "nothing resumable was written yet; run the command again"


def main(argv: list[str] | None = None) -> int:
    from fedclip.allocator import keep_freed_memory

    keep_freed_memory()  # freed tensors' memory stays for the next one (fedclip.allocator)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    logging.basicConfig(level=logging.WARNING, format="%(message)s",
                        handlers=[RichHandler(console=console, show_path=False)])
    _outs.clear()
    Verbosity.level = 0
    flower_level = os.environ.get("FLWR_LOG_LEVEL")  # -vv sets it for this command only
    previous = None
    if threading.current_thread() is threading.main_thread():
        previous = signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        code = app(args=argv, prog_name="fedclip", standalone_mode=False)
    except FedclipError as exc:
        console.print(f"[red]error:[/] {escape(str(exc))}", soft_wrap=True)
        return 2
    except click.ClickException as exc:
        exc.show()
        return exc.exit_code
    except (click.Abort, KeyboardInterrupt):
        code = 130
    except Exception:  # not bad input (that is a FedclipError): a bug, said as one
        import traceback

        traceback.print_exc()
        console.print("[red]error:[/] the traceback above is a bug in fedclip, not a problem "
                      "with your input; please report it with the traceback", soft_wrap=True)
        return 1
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
        if flower_level is None:
            os.environ.pop("FLWR_LOG_LEVEL", None)
        else:
            os.environ["FLWR_LOG_LEVEL"] = flower_level
    if code == 130 and signal.SIGTERM in _signals:
        _signals.clear()
        console.print(f"terminated (SIGTERM); {_interrupted_hint()}")
        return 143
    if code == 130:  # typer returns 130 for Ctrl-C when not standalone
        console.print(f"interrupted; {_interrupted_hint()}")
        return 130
    return code if isinstance(code, int) else 0


if __name__ == "__main__":
    sys.exit(main())
