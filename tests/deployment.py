"""A SuperLink and SuperNodes as real processes on localhost, always stopped by PID."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from fedclip.flower.launch import QUIET_FLOWER, flower_run

PROJECT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_port(port: int, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.2)
    raise TimeoutError(f"nothing listens on 127.0.0.1:{port} after {timeout} s")


class LocalDeployment:
    """``with LocalDeployment(tmp, node_configs) as dep: dep.run([...])``."""

    def __init__(self, workdir: Path, node_configs: list[str], tls: dict | None = None,
                 superlink_args: tuple[str, ...] = ()) -> None:
        self.workdir, self.node_configs, self.tls = workdir, node_configs, tls
        self.superlink_args = superlink_args
        self.home = workdir / "flwr-home"
        self.port = free_port()
        # the SuperLink and SuperNodes start flower-superexec and flwr-* by name
        path = f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"
        # the nodes' ClientApps use this process's thread count: a parity test compares their
        # result with an in-process run, and a sum split over other threads rounds otherwise
        # (Adam turns that rounding into a step of lr on a parameter whose gradient is ~0)
        import torch

        self.env = {**os.environ, **QUIET_FLOWER, "FLWR_HOME": str(self.home), "PATH": path,
                    "OMP_NUM_THREADS": str(torch.get_num_threads())}
        self.procs: dict[str, subprocess.Popen] = {}
        self.log: list[str] = []

    def _start(self, name: str, cmd: list[str]) -> subprocess.Popen:
        out = open(self.workdir / f"{name}.log", "w")  # noqa: SIM115 - closed with the process
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=self.env,
                                cwd=self.workdir, start_new_session=True)
        self.procs[name] = proc
        return proc

    def security(self, node: bool) -> list[str]:
        if self.tls is None:
            return ["--insecure"]
        if node:
            return ["--root-certificates", str(self.tls["ca"])]
        return ["--ssl-certfile", str(self.tls["cert"]), "--ssl-keyfile", str(self.tls["key"]),
                "--ssl-ca-certfile", str(self.tls["ca"])]

    def __enter__(self) -> LocalDeployment:
        self.home.mkdir(parents=True, exist_ok=True)
        conn = (f'root-certificates = "{self.tls["ca"]}"' if self.tls else "insecure = true")
        (self.home / "config.toml").write_text(
            f'[superlink]\ndefault = "deploy"\n\n[superlink.deploy]\n'
            f'address = "127.0.0.1:{self.port}"\n{conn}\n')
        try:
            self._start("superlink", [str(BIN / "flower-superlink"), *self.security(False),
                                      "--port", str(self.port), "--database", ":flwr-in-memory:",
                                      *self.superlink_args])
            wait_for_port(self.port)
            for i, node_config in enumerate(self.node_configs):
                self.start_node(f"node{i}", node_config)
        except BaseException:
            self.stop()
            raise
        return self

    def start_node(self, name: str, node_config: str, *extra: str) -> subprocess.Popen:
        return self._start(name, [
            str(BIN / "flower-supernode"), *self.security(True), "--superlink",
            f"127.0.0.1:{self.port}", "--port", str(free_port()), "--node-config", node_config,
            *extra])

    def kill(self, name: str) -> None:
        proc = self.procs.get(name)
        if proc is not None and proc.poll() is None:
            for sig in (signal.SIGTERM, signal.SIGKILL):
                try:
                    os.killpg(proc.pid, sig)  # the node and the processes it started
                except ProcessLookupError:
                    break
                try:
                    proc.wait(timeout=5)
                    break
                except subprocess.TimeoutExpired:
                    continue

    def stop(self) -> None:
        for name in list(self.procs):
            self.kill(name)

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def run(self, run_config: list[str], on_line=None, app: Path = PROJECT  # noqa: ANN001
            ) -> tuple[str, str]:
        run_log = open(self.workdir / "run.log", "a")  # noqa: SIM115

        def echo(line: str) -> None:
            self.log.append(line)
            run_log.write(line + "\n")
            run_log.flush()
            if on_line:
                on_line(line)

        old = os.environ.get("FLWR_HOME")
        os.environ["FLWR_HOME"] = str(self.home)
        try:
            return flower_run(app, "deploy", run_config, echo=echo)
        finally:
            run_log.close()
            if old is None:
                os.environ.pop("FLWR_HOME", None)
            else:
                os.environ["FLWR_HOME"] = old

    def node_log(self, name: str) -> str:
        return (self.workdir / f"{name}.log").read_text(errors="replace")


def make_tls(folder: Path) -> dict[str, Path]:
    """A CA and a server certificate for 127.0.0.1/localhost, made for the test."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    folder.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.UTC)

    def name(cn: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])

    ca_key = ec.generate_private_key(ec.SECP384R1())
    ca = (x509.CertificateBuilder().subject_name(name("fedclip test CA"))
          .issuer_name(name("fedclip test CA")).public_key(ca_key.public_key())
          .serial_number(x509.random_serial_number()).not_valid_before(now)
          .not_valid_after(now + datetime.timedelta(days=1))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .sign(ca_key, hashes.SHA256()))
    key = ec.generate_private_key(ec.SECP384R1())
    cert = (x509.CertificateBuilder().subject_name(name("localhost")).issuer_name(ca.subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now).not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([
                x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                critical=False)
            .sign(ca_key, hashes.SHA256()))
    pem = serialization.Encoding.PEM
    paths = {"ca": folder / "ca.pem", "cert": folder / "server.pem", "key": folder / "server.key"}
    paths["ca"].write_bytes(ca.public_bytes(pem))
    paths["cert"].write_bytes(cert.public_bytes(pem))
    paths["key"].write_bytes(key.private_bytes(pem, serialization.PrivateFormat.PKCS8,
                                               serialization.NoEncryption()))
    return paths


def make_node_key(stem: Path) -> tuple[Path, Path]:
    """A SuperNode authentication key pair (EC P-384, OpenSSH format): (private, public)."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    key = ec.generate_private_key(ec.SECP384R1())
    private, public = stem.with_suffix(".key"), stem.with_suffix(".pub")
    private.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                          serialization.PrivateFormat.OpenSSH,
                                          serialization.NoEncryption()))
    public.write_bytes(key.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                                     serialization.PublicFormat.OpenSSH))
    return private, public
