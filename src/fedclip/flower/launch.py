"""``fedclip flower-run``: ``flwr run --stream`` that fails when the run failed.

``flwr run --stream`` exits 0 even when the run failed, so this wrapper reads the run id it
printed and asks the SuperLink for the run's final status (``flwr ls --run-id``); anything
but ``finished:completed`` is an error. It drives the CLI (no ``flwr`` import), except for
the managed local SuperLink of a simulation (``address = ":local:"``): ``flwr run`` starts
that daemon detached and records nothing about it, so when none is running this module
starts it, with Flower's own command, and records its pid in
``$FLWR_HOME/local-superlink/fedclip-superlink.json``; ``fedclip flower-stop`` stops
exactly that process (and the processes it started), never another one by name.
"""

from __future__ import annotations

import difflib
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
import tomllib
import urllib.request
from collections.abc import Callable
from pathlib import Path

from fedclip.errors import FedclipError

QUIET_FLOWER = {"FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1",
                "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1"}
RUN_ID = re.compile(r"Successfully started run (\d+)")
RESULTS = re.compile(r"results: (.+results\.json)\s*$")  # the ServerApp's last line
LOCAL_ADDRESSES = (":local:", ":local-in-memory:")  # Flower's managed local SuperLink
PID_FILE = "fedclip-superlink.json"


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


def flwr_home() -> Path:
    """``$FLWR_HOME``, or Flower's default ``~/.flwr``."""
    home = os.environ.get("FLWR_HOME", "").strip()
    return Path(home).expanduser() if home else Path.home() / ".flwr"


def connection_address(superlink: str | None, home: Path) -> str | None:
    """The address of a SuperLink connection in ``home/config.toml`` (the default connection
    when ``superlink`` is None); None when the file or the connection is not there (``flwr``
    then says what is wrong)."""
    try:
        table = tomllib.loads((home / "config.toml").read_text(encoding="utf-8"))["superlink"]
        name = superlink or table["default"]
        address = table[name]["address"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return address if isinstance(address, str) else None


def local_ports() -> tuple[str, str]:
    """The managed local SuperLink's HTTP and Control API ports, as Flower 1.42 chooses them
    (``flwr.cli.constant``; a test keeps these equal)."""
    return (os.environ.get("FLWR_LOCAL_SUPERLINK_HTTP_API_PORT", "39091"),
            os.environ.get("FLWR_LOCAL_CONTROL_API_PORT", "39093"))


def _local_superlink() -> tuple[list[str], str]:
    """Flower 1.42's command for its managed local SuperLink (``flwr.cli.local_superlink``)
    and its health URL, with the same ports and log file, so that ``flwr run`` finds it."""
    http, control = local_ports()
    log_file = flwr_home() / "local-superlink" / "superlink.log"
    command = [str(Path(_flwr()).with_name("flower-superlink")), "--insecure", "--simulation",
               "--isolation", "subprocess", "--control-api-address", f"127.0.0.1:{control}",
               "--host", "127.0.0.1", "--port", http, "--log-file", str(log_file),
               "--log-rotation-interval-hours", "24", "--log-rotation-backup-count", "7"]
    return command, f"http://127.0.0.1:{http}/health"


def _healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=0.4) as response:  # noqa: S310 - localhost
            return bool(200 <= response.status < 300)
    except OSError:
        return False


def _start_time(pid: int) -> str | None:
    """When process ``pid`` started (Linux: clock ticks since boot), to tell it from a later
    process that reuses the pid; None where /proc is not there or the process is gone."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[19]
    except (OSError, IndexError):
        return None


def start_local_superlink(home: Path, in_memory: bool = False,
                          command: list[str] | None = None, health: str | None = None,
                          timeout: float = 30.0) -> int:
    """Start the managed local SuperLink (``command`` and ``health`` default to Flower's),
    detached, wait until it answers, and record its pid; returns the pid."""
    if command is None or health is None:
        command, health = _local_superlink()
        if not in_memory:
            command += ["--database", str(home / "local-superlink" / "state.db")]
    (home / "local-superlink").mkdir(parents=True, exist_ok=True)
    env = {**os.environ, **QUIET_FLOWER, "FLWR_HOME": str(home)}
    env["PATH"] = f"{Path(command[0]).parent}{os.pathsep}{env.get('PATH', '')}"
    proc = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL,  # noqa: S603
                            stderr=subprocess.DEVNULL, start_new_session=True)
    record = home / "local-superlink" / PID_FILE
    record.write_text(json.dumps({"pid": proc.pid, "started": _start_time(proc.pid),
                                  "command": command}) + "\n")
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            record.unlink(missing_ok=True)
            raise FedclipError(f"the local SuperLink exited at once (status {proc.returncode}); "
                               f"see {home / 'local-superlink' / 'superlink.log'}")
        if _healthy(health):
            return proc.pid
        time.sleep(0.2)
    stop_local_superlink(home)
    raise FedclipError(f"the local SuperLink did not answer within {timeout:.0f} s; see "
                       f"{home / 'local-superlink' / 'superlink.log'}")


def stop_local_superlink(home: Path, wait: float = 10.0) -> str:
    """Stop the local SuperLink this module started (its recorded pid, and the processes it
    started: its session), only if that pid is still that process; say what was done."""
    record = home / "local-superlink" / PID_FILE
    try:
        saved = json.loads(record.read_text(encoding="utf-8"))
        pid, started = int(saved["pid"]), saved.get("started")
    except (OSError, ValueError, KeyError, TypeError):
        return (f"no SuperLink started by fedclip is recorded under {home} (one that `flwr "
                f"run` started itself has no recorded pid: find it in `ps` and stop it by its "
                f"pid)")
    if started is not None and _start_time(pid) != started:
        record.unlink(missing_ok=True)
        return f"the local SuperLink (pid {pid}) had already stopped"
    for sig, patience in ((signal.SIGTERM, wait), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(pid, sig)  # its own session: the SuperLink and what it started
        except ProcessLookupError:
            break
        deadline = time.monotonic() + patience
        while time.monotonic() < deadline and _alive(pid):
            time.sleep(0.1)
        if not _alive(pid):
            break
    record.unlink(missing_ok=True)
    return f"stopped the local SuperLink (pid {pid})"


def _alive(pid: int) -> bool:
    try:
        if os.waitpid(pid, os.WNOHANG)[0] == pid:  # a child of this process: reaped now
            return False
    except ChildProcessError:
        pass
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def ensure_local_superlink(superlink: str | None, echo: Callable[[str], None] | None = None
                           ) -> int | None:
    """For a connection to Flower's managed local SuperLink, start it when it is not running
    (recording its pid); the pid started, or None (running already, or not local)."""
    home = flwr_home()
    address = connection_address(superlink, home)
    if address not in LOCAL_ADDRESSES:
        return None
    _, health = _local_superlink()
    if _healthy(health):
        return None
    pid = start_local_superlink(home, in_memory=address == LOCAL_ADDRESSES[1])
    if echo:
        echo(f"started the local SuperLink (pid {pid}, log "
             f"{home / 'local-superlink' / 'superlink.log'}); it keeps running for the next "
             f"runs: stop it with `fedclip flower-stop`")
    return pid


def flower_run(app_dir: str | Path = ".", superlink: str | None = None,
               run_config: list[str] | None = None,
               echo: Callable[[str], None] | None = None,
               federation_config: list[str] | None = None) -> tuple[str, str]:
    """Run the app, stream its log through ``echo``, return (run id, final status).

    Raises :class:`FedclipError` when the run did not complete."""
    check_run_config(run_config or [], app_config_keys(app_dir))
    ensure_local_superlink(superlink, echo)
    env = {**os.environ, **QUIET_FLOWER}
    env["PATH"] = f"{Path(_flwr()).parent}{os.pathsep}{env.get('PATH', '')}"
    cmd = [_flwr(), "run", str(app_dir), *([superlink] if superlink else []), "--stream"]
    if run_config:  # one string: Flower 1.42 merges separate --run-config items shallowly,
        # so of two keys of one table (fedprox-cnn.model, fedprox-cnn.image-size) given in
        # separate items only the last would remain
        cmd += ["--run-config", " ".join(run_config)]
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
