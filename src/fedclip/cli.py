"""The ``fedclip`` command line. ``main(argv)`` takes a list, so tests run the real CLI."""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
import threading
import tomllib
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

from fedclip.config import RunConfig
from fedclip.core.records import RoundRecord
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


@app.callback()
def _options(
    verbose: int = typer.Option(0, "--verbose", "-v", count=True, metavar="", show_default=False,
                                help="More of fedclip's log lines: -v info, -vv debug."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="Errors only."),
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                 help="Print the version and exit."),
) -> None:
    """FedCLIP: federated adaptation of a frozen CLIP with an attention adapter."""
    level = logging.ERROR if quiet else (logging.DEBUG if verbose > 1 else
                                         logging.INFO if verbose else logging.WARNING)
    # fedclip's own loggers only: libraries (matplotlib's font search, ...) stay at warnings
    logging.getLogger("fedclip").setLevel(level)
    if quiet:
        logging.getLogger().setLevel(logging.ERROR)


class RichReporter:
    """Progress bars for extraction (images/s) and rounds (accuracy so far); where the output
    is not a terminal (logs, CI), a plain line every tenth of the work instead."""

    def __init__(self, progress: Progress) -> None:
        self.progress = progress
        self.tasks: dict[str, Any] = {}
        self.plain = not progress.console.is_terminal

    def _log(self, done: int, total: int, text: str) -> None:
        if self.plain and (done == total or done % max(1, total // 10) == 0):
            self.progress.console.print(text, highlight=False, markup=False)

    def _task(self, key: str, label: str, total: int) -> Any:
        if key not in self.tasks:
            self.tasks[key] = self.progress.add_task(escape(label), total=total, info="")
        return self.tasks[key]

    def extraction(self, domain: str, done: int, total: int, cached: bool = False) -> None:
        if cached:  # read at once: no rate to show, and nothing was extracted
            task = self._task(f"x:{domain}", f"features {domain}", total)
            self.progress.update(task, completed=total, info="from the cache")
            if self.plain:
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
                  f"held out {heldout}: round {record.round}/{total_rounds} {info}")

    def info(self, message: str) -> None:
        self.progress.console.print(message, markup=False, highlight=False)


def _settings(preset: Path | None, items: list[str], resume_from: Path | None = None,
              **flags: Any) -> RunConfig:
    """Defaults, then (``--resume``) the run folder's own config.json, then the preset, then
    ``--set``, then flags; one key set two ways to two values is an error that names it."""
    saved: Any = {}
    if resume_from is not None and (resume_from / "config.json").is_file():
        try:
            saved = json.loads((resume_from / "config.json").read_text(encoding="utf-8"))
        except ValueError:  # UnicodeDecodeError included
            saved = None
        if not isinstance(saved, dict):
            raise ConfigError(f"{resume_from / 'config.json'} is not a JSON object of "
                              f"settings; pass the settings again, or start another --out")
    values = _parse_set(items)
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


def _parse_set(items: list[str]) -> dict[str, Any]:
    values: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep:
            raise ConfigError(f"--set expects key=value (got {item!r})")
        algo, dot, name = key.strip().rpartition(".")
        key = f"{algo}.{name.replace('-', '_')}" if dot else name.replace("-", "_")
        try:
            values[key] = tomllib.loads(f"v = {raw}")["v"]
        except tomllib.TOMLDecodeError:
            values[key] = raw
    return values


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


class RegistryHelp(PlainHelp):
    """Adds the registered algorithms and backbone providers (plugins included) to the help
    when help is shown: importing the registries takes seconds, parsing should not."""

    def format_help(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        from fedclip.algorithms import names
        from fedclip.backbones import providers

        extra = {"algorithm": f" One of: {', '.join(names())}.",
                 "algorithms": f" Registered: {', '.join(names())}.",
                 "backbone": f" Providers: {', '.join(providers())}."}
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


def _print_note(backbone: str) -> None:
    from fedclip.core.report import backbone_note

    note = backbone_note(backbone)
    if note:
        console.print(f"[yellow]note:[/] {escape(note)}")


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
    out: Annotated[Path, typer.Option(help="Run folder for all outputs.")] = Path("runs/latest"),
    resume: Resume = False,
    config: Preset = None,
    set_: SetItems = None,
    cache_dir: CacheDir = None,
    threads: Threads = 0,
    log_to: LogTo = None,
) -> None:
    """Train with leave-one-domain-out and report generalization and personalization."""
    from fedclip.dynamo import defer_dynamo_import

    defer_dynamo_import()  # this process never compiles: no torch._dynamo for the optimizer
    from fedclip.callbacks import loggers_from_specs
    from fedclip.core.report import COLUMNS, privacy_note, round_zero_note, table_rows
    from fedclip.inprocess.experiment import run

    _outs.append(out)
    cfg = _settings(config, set_ or [], resume_from=out if resume else None,
                    **_flags(locals()))
    _threads(threads)
    _print_note(cfg.backbone)
    loggers = loggers_from_specs(log_to or [], out)
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
               TextColumn("{task.fields[info]}"), TimeElapsedColumn(), TimeRemainingColumn())
    with Progress(*columns, console=console, transient=False,
                  disable=not console.is_terminal) as progress:
        results = run(cfg, out, resume=resume, reporter=RichReporter(progress),
                      callbacks=loggers)
    table = Table(title=f"{cfg.algorithm} — accuracy % (gen.: held-out domain; pers.: "
                        f"clients' test splits)")
    for col in COLUMNS:
        table.add_column(col, justify="right")
    for row in table_rows(results):
        table.add_row(*map(escape, row))
    out_console.print(table)
    for note in (round_zero_note(results), privacy_note(results)):
        if note is not None:
            out_console.print(note, markup=False, highlight=False)
    out_console.print(f"results: {out / 'results.json'}, {out / 'results.md'}, plots in {out}/*/",
                      markup=False, soft_wrap=True)


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
    with Progress(*columns, console=console, disable=not console.is_terminal) as progress:
        summary = compare(cfg, [a.strip() for a in algorithms.split(",") if a.strip()],
                          seed_list, out, resume=resume, reporter=RichReporter(progress),
                          backbone_params=count_backbone, log_to=log_to or [])
    for name, table in summary["tables"].items():
        out_console.print(f"\n[bold]{name}[/]")
        out_console.print(markdown(table["header"], table["rows"]))
    out_console.print(f"\ntables: {out / 'compare.md'}, plots: {out / 'compare.png'}")


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
    """`flwr run --stream`, but exits non-zero when the run did not complete."""
    from fedclip.flower.launch import flower_run

    run_id, status = flower_run(app_dir, superlink, run_config, echo=out_console.out,
                                federation_config=federation_config)
    out_console.print(f"run {run_id}: {status}")


@app.command("predict", cls=PlainHelp)
def predict_command(
    adapter: Path = typer.Argument(..., help="An adapter file from a run folder."),
    inputs: list[Path] = typer.Argument(..., help="Image files or folders."),
    backbone: str | None = typer.Option(None, help="Must match the adapter's (checked)."),
    top: int = typer.Option(1, min=1, help="Classes to list per image."),
    allow_download: bool = typer.Option(
        False, help="Let the adapter file's backbone spec download weights (otherwise a "
                    "spec that would download must be confirmed with --backbone)."),
    out: Path | None = typer.Option(None, help="Write the predictions as CSV."),
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
        table.add_row(escape(r["file"]), escape(r.get("class", r.get("error", ""))),
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
    if any((f / "config.json").is_file() for f in folders):
        return (f"continue with the same command and --resume (--out {out}: what was done "
                f"is kept)")
    return "nothing resumable was written yet; run the command again"


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    logging.basicConfig(level=logging.WARNING, format="%(message)s",
                        handlers=[RichHandler(console=console, show_path=False)])
    _outs.clear()
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
