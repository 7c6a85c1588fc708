"""``fedclip flower-run``: ``flwr run --stream`` that fails when the run failed.

``flwr run --stream`` exits 0 even when the run failed, so this wrapper reads the run id it
printed and asks the SuperLink for the run's final status (``flwr ls --run-id``); anything
but ``finished:completed`` is an error. No ``flwr`` import: it drives the CLI.
"""

from __future__ import annotations

import difflib
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from collections.abc import Callable
from pathlib import Path

from fedclip.errors import FedclipError

QUIET_FLOWER = {"FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1",
                "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1"}
RUN_ID = re.compile(r"Successfully started run (\d+)")


def _flwr() -> str:
    exe = shutil.which("flwr") or str(Path(sys.executable).with_name("flwr"))
    if not Path(exe).exists():
        raise FedclipError("the flwr command is not installed: pip install 'flwr==1.42.0'")
    return exe


def run_status(superlink: str | None, run_id: str, env: dict[str, str]) -> str:
    """A run's final status as ``flwr ls`` reports it."""
    cmd = [_flwr(), "ls", *([superlink] if superlink else []), "--run-id", run_id,
           "--format", "json"]
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False).stdout
    try:
        return str(json.loads(out)["runs"][0]["status"])
    except (ValueError, KeyError, IndexError):
        return f"unknown (flwr ls said: {out.strip()[:200]})"


def app_config_keys(app_dir: str | Path) -> set[str]:
    """The run-config keys the app declares (``[tool.flwr.app.config]``, tables flattened to
    ``NAME.KEY`` as Flower flattens them): the only keys ``flwr run -c`` accepts."""
    path = Path(app_dir) / "pyproject.toml"
    try:
        table = tomllib.loads(path.read_text(encoding="utf-8"))["tool"]["flwr"]["app"]["config"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise FedclipError(f"{path} declares no Flower app config ({type(exc).__name__}); "
                           f"pass --app pointing at the fedclip checkout") from None

    def flat(d: dict, prefix: str = "") -> set[str]:
        keys: set[str] = set()
        for k, v in d.items():
            keys |= flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {prefix + k}
        return keys
    return flat(table)


def check_run_config(items: list[str], known: set[str]) -> None:
    """Refuse, in one line naming the key and the closest known one, a run-config key the
    app does not declare (Flower says only ``[code: 15] Invalid run configuration``)."""
    for item in items:
        try:
            pairs = shlex.split(item)
        except ValueError as exc:
            raise FedclipError(f"run config {item!r} cannot be parsed ({exc})") from None
        for pair in pairs:
            key, sep, _ = pair.partition("=")
            if not sep:
                raise FedclipError(f"run config expects key=value pairs (got {pair!r})")
            if key not in known:
                close = difflib.get_close_matches(key, sorted(known), n=1)
                hint = f"; did you mean {close[0]!r}?" if close else ""
                raise FedclipError(f"unknown run-config key {key!r}{hint} (the keys are those "
                                   f"of [tool.flwr.app.config] in pyproject.toml)")


def flower_run(app_dir: str | Path = ".", superlink: str | None = None,
               run_config: list[str] | None = None,
               echo: Callable[[str], None] | None = None,
               federation_config: list[str] | None = None) -> tuple[str, str]:
    """Run the app, stream its log through ``echo``, return (run id, final status).

    Raises :class:`FedclipError` when the run did not complete."""
    check_run_config(run_config or [], app_config_keys(app_dir))
    env = {**os.environ, **QUIET_FLOWER}
    env["PATH"] = f"{Path(_flwr()).parent}{os.pathsep}{env.get('PATH', '')}"
    cmd = [_flwr(), "run", str(app_dir), *([superlink] if superlink else []), "--stream"]
    for item in run_config or []:
        cmd += ["--run-config", item]
    for item in federation_config or []:  # simulation: num-supernodes=4, ...
        cmd += ["--federation-config", item]
    run_id = None
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          env=env) as proc:
        assert proc.stdout is not None  # stdout=PIPE
        for line in proc.stdout:
            if echo:
                echo(line.rstrip("\n"))
            if run_id is None and (m := RUN_ID.search(line)):
                run_id = m.group(1)
    if run_id is None:
        raise FedclipError(f"flwr run did not start a run (exit status {proc.returncode}); "
                           f"see the output above")
    status = run_status(superlink, run_id, env)
    if status != "finished:completed":
        raise FedclipError(f"Flower run {run_id} ended as {status!r}; see the log above, or "
                           f"`flwr log {run_id}`")
    return run_id, status
