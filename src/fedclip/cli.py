"""The ``fedclip`` command line. ``main(argv)`` takes a list, so tests run the real CLI."""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path
from typing import Any

import click
import tomllib
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

from fedclip.config import RunConfig
from fedclip.errors import ConfigError, FedclipError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
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
    verbose: int = typer.Option(0, "--verbose", "-v", count=True,
                                help="More log lines (-v info, -vv debug)."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="Errors only."),
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                 help="Print the version and exit."),
) -> None:
    """FedCLIP: federated adaptation of a frozen CLIP with an attention adapter."""
    level = logging.ERROR if quiet else (logging.DEBUG if verbose > 1 else
                                         logging.INFO if verbose else logging.WARNING)
    logging.getLogger().setLevel(level)


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

    def extraction(self, domain: str, done: int, total: int) -> None:
        task = self._task(f"x:{domain}", f"features {domain}", total)
        elapsed = self.progress.tasks[task].elapsed or 0.0
        rate = f"{done / elapsed:.0f} img/s" if elapsed > 0.5 else ""
        self.progress.update(task, completed=done, info=rate)
        self._log(done, total, f"features {domain}: {done}/{total} {rate}")

    def round_end(self, heldout: str, record: dict, total_rounds: int) -> None:
        task = self._task(f"r:{heldout}", f"rounds (held out: {heldout})", total_rounds)
        info = ""
        if "mean_val_accuracy" in record:
            gen = record["heldout_accuracy"]
            info = (f"val {100 * record['mean_val_accuracy']:.1f}  "
                    f"gen {100 * gen:.1f}" if gen is not None else "")
        self.progress.update(task, completed=record["round"], info=info)
        self._log(record["round"], total_rounds,
                  f"held out {heldout}: round {record['round']}/{total_rounds} {info}")

    def info(self, message: str) -> None:
        self.progress.console.print(message, markup=False, highlight=False)


def _settings(preset: Path | None, items: list[str], resume_from: Path | None = None,
              **flags: Any) -> RunConfig:
    """Defaults, then (``--resume``) the run folder's own config.json, then the preset, then
    ``--set``, then flags; one key set two ways to two values is an error that names it."""
    saved: dict[str, Any] = {}
    if resume_from is not None and (resume_from / "config.json").is_file():
        try:
            saved = json.loads((resume_from / "config.json").read_text())
        except ValueError:
            raise ConfigError(f"{resume_from / 'config.json'} is not valid JSON; pass the "
                              f"settings again, or start another --out") from None
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


@app.command("run")
def run_command(
    data_root: str | None = typer.Option(
        None, help="Folder <domain>/<class>/<image>, or hf:<dataset> (online). "
                   "Default: the embedded PACS sample."),
    backbone: str | None = typer.Option(None, help="open_clip:ARCH@TAG or standin."),
    heldout: str | None = typer.Option(None, help="Held-out domain, or 'all'."),
    rounds: int | None = typer.Option(None, help="Communication rounds."),
    loss: str | None = typer.Option(None, help="clip (contrastive) or ce."),
    algorithm: str | None = typer.Option(
        None, help="Algorithm (default fedclip); `fedclip algorithms` lists them and their "
                   "options (--set NAME.KEY=VALUE)."),
    seed: int | None = typer.Option(None, help="Seed for splits, init and batches."),
    dataset: str | None = typer.Option(None, help="pacs, vlcs, office-home, auto, custom."),
    out: Path = typer.Option(Path("runs/latest"), help="Run folder for all outputs."),
    resume: bool = typer.Option(False, help="Continue the run in --out where it stopped, with "
                                             "its own settings (flags given now override)."),
    config: Path | None = typer.Option(None, help="TOML preset (see configs/)."),
    set_: list[str] = typer.Option([], "--set", help="Any config key: --set lr=1e-4"),  # noqa: B006
    cache_dir: str | None = typer.Option(None, help="Feature cache folder."),
    threads: int = typer.Option(0, min=0, help="torch threads (0: torch's default). The "
                                               "adapter's ops are small: on a busy machine 1 "
                                               "is often fastest."),
) -> None:
    """Train with leave-one-domain-out and report generalization and personalization."""
    from fedclip.experiment import run
    from fedclip.report import COLUMNS, STANDIN_NOTE, table_rows

    if threads:
        import torch

        torch.set_num_threads(threads)
    cfg = _settings(config, set_, resume_from=out if resume else None, data_root=data_root,
                    backbone=backbone, heldout=heldout, rounds=rounds, loss=loss,
                    algorithm=algorithm, seed=seed, dataset=dataset, cache_dir=cache_dir)
    if cfg.backbone == "standin":
        console.print(f"[yellow]note:[/] {STANDIN_NOTE}")
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
               TextColumn("{task.fields[info]}"), TimeElapsedColumn(), TimeRemainingColumn())
    with Progress(*columns, console=console, transient=False) as progress:
        results = run(cfg, out, resume=resume, reporter=RichReporter(progress))
    table = Table(title=f"{cfg.algorithm} — accuracy % (gen.: held-out domain; pers.: "
                        f"clients' test splits)")
    for col in COLUMNS:
        table.add_column(col, justify="right")
    for row in table_rows(results):
        table.add_row(*map(escape, row))
    out_console.print(table)
    out_console.print(f"results: {out / 'results.json'}, {out / 'results.md'}, plots in {out}/*/",
                      markup=False, soft_wrap=True)


@app.command("compare")
def compare_command(
    algorithms: str = typer.Option("zeroshot,fedclip,local,fedprox",
                                   help="Comma-separated algorithms."),
    seeds: str = typer.Option("0", help="Comma-separated seeds (mean ± std over them)."),
    data_root: str | None = typer.Option(None, help="As for run."),
    backbone: str | None = typer.Option(None, help="As for run."),
    heldout: str | None = typer.Option(None, help="As for run (default all)."),
    rounds: int | None = typer.Option(None, help="Communication rounds."),
    out: Path = typer.Option(Path("runs/compare"), help="Folder for all runs and tables."),
    resume: bool = typer.Option(False, help="Continue where a comparison stopped."),
    config: Path | None = typer.Option(None, help="TOML preset."),
    set_: list[str] = typer.Option([], "--set", help="Any config key: --set lr=1e-4"),  # noqa: B006
) -> None:
    """Every algorithm on the same splits and seeds: the paper's comparison tables."""
    from fedclip.compare import compare, markdown

    cfg = _settings(config, set_, data_root=data_root, backbone=backbone,
                          heldout=heldout, rounds=rounds)
    try:
        seed_list = [int(s) for s in seeds.split(",") if s.strip()]
    except ValueError:
        raise ConfigError(f"--seeds takes integers separated by commas (got {seeds!r})") from None

    def count_backbone() -> int | None:
        from fedclip.backbones import load_backbone

        return load_backbone(cfg.backbone).num_parameters()

    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
               TextColumn("{task.fields[info]}"), TimeElapsedColumn())
    with Progress(*columns, console=console) as progress:
        summary = compare(cfg, [a.strip() for a in algorithms.split(",") if a.strip()],
                          seed_list, out, resume=resume, reporter=RichReporter(progress),
                          backbone_params=count_backbone)
    for name, table in summary["tables"].items():
        out_console.print(f"\n[bold]{name}[/]")
        out_console.print(markdown(table["header"], table["rows"]))
    out_console.print(f"\ntables: {out / 'compare.md'}, plots: {out / 'compare.png'}")


@app.command("algorithms")
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


@app.command("flower-run")
def flower_run_command(
    superlink: str | None = typer.Argument(
        None, help="SuperLink connection name in $FLWR_HOME/config.toml (default: its default)."),
    app_dir: Path = typer.Option(Path("."), "--app", help="The Flower app (this project)."),
    run_config: list[str] = typer.Option(  # noqa: B006
        [], "--run-config", "-c", help="Run config overrides, as for flwr run."),
) -> None:
    """`flwr run --stream`, but exits non-zero when the run did not complete."""
    from fedclip.flower.launch import flower_run

    run_id, status = flower_run(app_dir, superlink, run_config, echo=out_console.out)
    out_console.print(f"run {run_id}: {status}")


@app.command("predict")
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


@app.command("backbones")
def backbones_command() -> None:
    """List the backbone spec forms."""
    out_console.print("open_clip:ARCH@TAG   e.g. open_clip:ViT-B-32@openai (the paper), "
                      "open_clip:ViT-B-32@/path/ckpt.pt, open_clip:ViT-B-32@none (random)")
    out_console.print("hf:ORG/MODEL         a transformers CLIP-style model (hub), e.g. "
                      "hf:openai/clip-vit-base-patch32; hf:/path/to/saved (save_pretrained)")
    out_console.print("standin              offline stand-in (EfficientNet-Lite0 + MiniLM), "
                      "NOT CLIP")


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    logging.basicConfig(level=logging.WARNING, format="%(message)s",
                        handlers=[RichHandler(console=console, show_path=False)])
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
    if code == 130:  # typer returns 130 for Ctrl-C when not standalone
        console.print("interrupted; continue with --resume (the last checkpoint is kept)")
        return 130
    return code if isinstance(code, int) else 0


if __name__ == "__main__":
    sys.exit(main())
