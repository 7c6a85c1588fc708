"""Flower deployment on localhost: a SuperLink and SuperNodes as separate processes.

Slow (each message starts a fresh ClientApp process): run by `make test-slow` and CI.
"""

import json
import subprocess
import threading
import time

import pytest

from fedclip.errors import FedclipError
from tests.conftest import has_standin
from tests.deployment import BIN, LocalDeployment, make_node_key, make_tls

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not has_standin(), reason="stand-in packages not installed")]

DOMAINS = ("art_painting", "cartoon", "photo", "sketch")  # the embedded PACS sample
ADAPTER = 2 * (384 * 384 + 384)  # stand-in adapter parameters


def nodes():
    return [f"domain='{d}'" for d in DOMAINS]


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """One feature cache for the module: the first run extracts, the others reuse it."""
    return tmp_path_factory.mktemp("deploy-cache")


def run_config(out, cache, rounds=3, **extra):
    items = [f"rounds={rounds}", f"out='{out}'", "heldout='sketch'", "round-timeout=30.0",
             "min-nodes=4", f"cache-dir='{cache}'"]
    return items + [f"{k}={v!r}" if isinstance(v, str) else f"{k}={v}" for k, v in extra.items()]


def own_data_nodes(tmp_path):
    """Each node's data-root holds only its own domain (the held-out node: only sketch)."""
    import shutil

    from fedclip.data.sources import embedded_sample_root

    configs = []
    for d in DOMAINS:
        site = tmp_path / "sites" / d
        shutil.copytree(embedded_sample_root() / d, site / d)
        configs.append(f"data-root='{site}' domain='{d}'")
    return configs


def test_deployment_on_localhost(tmp_path, cache):
    """Four SuperNodes that each hold only their own domain: the run completes, its records,
    best round, personalization and final adapter equal the in-process runner's on the same
    seed, and each node gets one message per round (a training node evaluates the previous
    round inside its train message)."""
    from safetensors.torch import load_file

    from fedclip.config import RunConfig
    from fedclip.inprocess.experiment import run

    out = tmp_path / "out"
    with LocalDeployment(tmp_path, own_data_nodes(tmp_path)) as dep:
        _, status = dep.run(run_config(out, cache))
    assert status == "finished:completed"
    local = run(RunConfig.build(backbone="standin", heldout="sketch", rounds=3,
                                cache_dir=str(cache)), tmp_path / "local")[0].to_json()
    wd = load_file(out / "sketch" / "adapter-last.safetensors")
    wl = load_file(tmp_path / "local" / "sketch" / "adapter-last.safetensors")
    assert max((wd[k] - wl[k]).abs().max().item() for k in wl) < 1e-5
    (r,) = json.loads((out / "results.json").read_text())["runs"]
    assert r["personalized"]["per_client"] == pytest.approx(local["personalized"]["per_client"])
    for key in ("val_accuracy", "test_accuracy", "heldout_accuracy"):
        assert [h[key] for h in r["history"]] == [h[key] for h in local["history"]]
    assert r["best_round"] == local["best_round"]
    received = [dep.node_log(f"node{i}").count("Received successfully") for i in range(4)]
    # query, round 0, rounds 1-3, round 3's evaluation, personalization (training nodes);
    # the held-out node: query, round 0, rounds 1-3 evaluated (in rounds 2, 3 and apart)
    assert received == [7, 7, 7, 5]
    assert all(set(h["node_seconds"]) >= {"start", "site", "training"}
               for h in r["history"][1:])
    assert [h["round"] for h in r["history"]] == [0, 1, 2, 3]
    assert r["runtime"] == "flower" and set(r["personalization"]["per_client"]) == set(
        DOMAINS[:3])
    # the adapter (fp32), down to and up from each of the 3 training nodes
    assert r["bytes_per_round"] == 2 * 3 * ADAPTER * 4
    assert all(h["bytes"] == 2 * 3 * ADAPTER * 4 for h in r["history"][1:])
    assert (out / "sketch" / "adapter.safetensors").exists()


def test_a_supernode_killed_in_round_2_is_recorded_and_the_run_completes(tmp_path, cache):
    out = tmp_path / "out"
    with LocalDeployment(tmp_path, nodes()) as dep:
        killed = threading.Event()

        def on_line(line):
            if "[ROUND 2/" in line and not killed.is_set():
                killed.set()
                dep.kill("node1")  # cartoon

        _, status = dep.run(run_config(out, cache), on_line=on_line)
    assert killed.is_set() and status == "finished:completed"
    (r,) = json.loads((out / "results.json").read_text())["runs"]
    assert r["missing_clients"] == ["cartoon"]
    assert r["history"][1]["missing"] == [] and "cartoon" in r["history"][2]["missing"]
    assert set(r["history"][3]["train_loss"]) == {"art_painting", "photo"}


def test_failed_run_makes_the_command_fail(tmp_path, cache):
    with LocalDeployment(tmp_path, nodes()) as dep, pytest.raises(FedclipError, match="ended as"):
        dep.run(run_config(tmp_path / "out", cache, algorithm="no-such-algorithm"))


def test_tls_with_supernode_authentication(tmp_path, cache):
    """TLS certificates made by the test; only registered SuperNode keys may join."""
    tls = make_tls(tmp_path / "certs")
    keys = [make_node_key(tmp_path / f"node{i}") for i in range(5)]
    out = tmp_path / "out"
    with LocalDeployment(tmp_path, [], tls=tls,
                         superlink_args=("--enable-supernode-auth",)) as dep:
        for _, public in keys[:4]:
            subprocess.run([str(BIN / "flwr"), "supernode", "register", str(public), "deploy"],
                           env=dep.env, check=True, capture_output=True)
        for i, config in enumerate(nodes()):
            dep.start_node(f"node{i}", config, "--auth-supernode-private-key", str(keys[i][0]))
        unknown = dep.start_node("unknown-key", "domain='photo'", "--auth-supernode-private-key",
                                 str(keys[4][0]))
        no_key = dep.start_node("no-key", "domain='photo'")
        _, status = dep.run(run_config(out, cache, rounds=1))
        deadline = time.monotonic() + 60
        while (unknown.poll() is None or no_key.poll() is None) and time.monotonic() < deadline:
            time.sleep(1)
        assert unknown.poll() not in (None, 0) and no_key.poll() not in (None, 0)
        assert "Failed to activate SuperNode" in dep.node_log("unknown-key")
        assert "must be registered" in dep.node_log("no-key")
    assert status == "finished:completed"
    (r,) = json.loads((out / "results.json").read_text())["runs"]
    assert set(r["personalization"]["per_client"]) == set(DOMAINS[:3])


def test_simulation_with_ray_matches_the_in_process_runner(tmp_path, cache):
    from flwr.simulation import run_simulation
    from safetensors.torch import load_file

    from fedclip.config import RunConfig
    from fedclip.flower.client_app import build_client_app
    from fedclip.flower.server_app import build_server_app
    from fedclip.inprocess.experiment import run

    defaults = {"backbone": "standin", "heldout": "sketch", "rounds": 2,
                "out": str(tmp_path / "sim"), "cache-dir": str(cache)}
    run_simulation(build_server_app(defaults), build_client_app(defaults), num_supernodes=4,
                   backend_config={"client_resources": {"num_cpus": 1}})
    (sim,) = json.loads((tmp_path / "sim" / "results.json").read_text())["runs"]
    local = run(RunConfig.build(backbone="standin", heldout="sketch", rounds=2,
                                cache_dir=str(cache)), tmp_path / "local")[0].to_json()
    ws = load_file(tmp_path / "sim" / "sketch" / "adapter-last.safetensors")
    wl = load_file(tmp_path / "local" / "sketch" / "adapter-last.safetensors")
    assert max((ws[k] - wl[k]).abs().max().item() for k in wl) < 1e-5
    assert [r["heldout_accuracy"] for r in sim["history"]] == [
        r["heldout_accuracy"] for r in local["history"]]
