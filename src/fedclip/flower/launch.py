"""``fedclip flower-run``: ``flwr run --stream`` that fails when the run failed.

``flwr run --stream`` exits 0 even when the run failed, so this wrapper reads the run id it
printed and asks the SuperLink for the run's final status (``flwr ls --run-id``); anything
but ``finished:completed`` is an error. No ``flwr`` import: it drives the CLI.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
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


def flower_run(app_dir: str | Path = ".", superlink: str | None = None,
               run_config: list[str] | None = None,
               echo: Callable[[str], None] | None = None) -> tuple[str, str]:
    """Run the app, stream its log through ``echo``, return (run id, final status).

    Raises :class:`FedclipError` when the run did not complete."""
    env = {**os.environ, **QUIET_FLOWER}
    env["PATH"] = f"{Path(_flwr()).parent}{os.pathsep}{env.get('PATH', '')}"
    cmd = [_flwr(), "run", str(app_dir), *([superlink] if superlink else []), "--stream"]
    for item in run_config or []:
        cmd += ["--run-config", item]
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
