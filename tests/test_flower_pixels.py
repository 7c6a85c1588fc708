"""Every pixel method (``inputs = "pixels"``: it trains through the backbone) on Flower: each
site runs the backbone on its own images, with the same results as in-process.

The parameter list is every registered algorithm whose inputs are pixels, read from the
registry when the tests are collected, so a pixel method added later is covered here too.
The tiny random open_clip model (``tiny_arch``) and a few 40-pixel images keep a case to
seconds; a torchvision classifier runs as SqueezeNet 1.1 at 32 pixels (not AlexNet).
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from fedclip.algorithms import algorithm_class, get_algorithm, names
from fedclip.algorithms.base import Runtime
from fedclip.config import RunConfig
from fedclip.errors import ConfigError
from fedclip.flower.client_app import build_client_app
from fedclip.flower.server_app import main as _server_main
from fedclip.inprocess import experiment as _experiment
from tests.conftest import as_written, make_image_folder
from tests.flower_grid import LocalGrid

PIXELS = [n for n in names() if algorithm_class(n).inputs == "pixels"]
CLASSES = ("cat", "dog", "red_car")
ROUNDS = 3
run = as_written(_experiment.run)
server_main = as_written(_server_main)


def small_options(name: str) -> dict[str, Any]:
    """Options that keep a case to seconds: a torchvision classifier as SqueezeNet 1.1 (1.2M
    parameters, no batch norm: nothing but parameters is averaged) at 32 pixels."""
    fields = algorithm_class(name).Options.model_fields
    out: dict[str, Any] = {}
    if "model" in fields:
        out["model"] = "squeezenet1_1@none"
    if "image_size" in fields:
        out["image_size"] = 32
    return out


@pytest.fixture
def images(tmp_path) -> Path:
    per_class = dict.fromkeys(CLASSES, 4)
    return make_image_folder(tmp_path / "toy", {"alpha": per_class, "beta": per_class,
                                                "gamma": per_class})


def flower_config(name: str, backbone: str, root: Path, out: Path, **extra: Any) -> dict:
    opts = {f"{name}.{k.replace('_', '-')}": v for k, v in small_options(name).items()}
    return {"backbone": backbone, "data-root": str(root), "heldout": "gamma",
            "rounds": ROUNDS, "lr": 1e-3, "out": str(out), "classes": ",".join(CLASSES),
            "algorithm": name, **opts, **extra}


NODES = [{"partition-id": i, "num-partitions": 3} for i in range(3)]


def in_process(name: str, backbone: str, root: Path, out: Path, **extra: Any) -> dict:
    cfg = RunConfig.build(backbone=backbone, data_root=str(root), heldout="gamma",
                          rounds=ROUNDS, lr=1e-3, classes=list(CLASSES), algorithm=name,
                          options={name: small_options(name)}, **extra)
    return run(cfg, out)[0]


def initial(name: str, backbone: str) -> dict[str, torch.Tensor]:
    cfg = RunConfig.build(backbone=backbone, algorithm=name, classes=list(CLASSES),
                          options={name: small_options(name)})
    algorithm = get_algorithm(cfg, Runtime(tuple(CLASSES), None, 100.0, 2))
    init = algorithm.init_global(32)
    assert init is not None
    return algorithm.shared(init)


def reply_of(name: str, backbone: str) -> dict[str, torch.Tensor]:
    """What a train reply carries: the shared parameters (FLoRA: its client's adapters)."""
    cfg = RunConfig.build(backbone=backbone, algorithm=name, classes=list(CLASSES),
                          options={name: small_options(name)})
    algorithm = get_algorithm(cfg, Runtime(tuple(CLASSES), None, 100.0, 2))
    init = algorithm.init_global(32)
    assert init is not None
    return {k: torch.empty(shape) for k, shape in algorithm.server.reply_shapes(init).items()}


def final(out: Path) -> dict[str, torch.Tensor]:
    return load_file(out / "gamma" / "adapter-last.safetensors")


def max_diff(a: dict, b: dict) -> float:
    assert set(a) == set(b)
    return max((a[k] - b[k]).abs().max().item() for k in b)


def same(a: Any, b: Any, tol: float = 1e-5) -> bool:
    """Equal numbers (NaN equals NaN: no zero-shot), dicts and lists, to ``tol``."""
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k], tol) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(same(x, y, tol) for x, y in zip(a, b, strict=True))
    if isinstance(a, float | int) and isinstance(b, float | int):
        return (math.isnan(a) and math.isnan(b)) or abs(a - b) <= tol
    return a == b


def norm(a: dict, b: dict) -> float:
    return math.sqrt(sum(float(((a[k] - b[k]) ** 2).sum()) for k in b))


def nbytes(params: dict[str, torch.Tensor], itemsize: int = 4) -> int:
    return sum(v.numel() for v in params.values()) * itemsize


@pytest.mark.parametrize("name", PIXELS)
def test_a_pixel_method_on_flower_gives_the_in_process_result(name, tiny_arch, images,
                                                             tmp_path):
    """Each site decodes its own images and trains through its backbone: the final
    parameters and every round's accuracies equal the in-process run's; only the shared
    parameters travel (never a pixel), and each round's bytes are recorded."""
    run_config = flower_config(name, tiny_arch, images, tmp_path / "flower")
    grid = LocalGrid(build_client_app(), NODES, run_config)
    flower = server_main(grid, run_config)
    local = in_process(name, tiny_arch, images, tmp_path / "local")
    init = initial(name, tiny_arch)
    assert max_diff(final(tmp_path / "flower"), final(tmp_path / "local")) < 1e-5
    assert max_diff(final(tmp_path / "flower"), init) > 1e-4  # it trained
    for key in ("val_accuracy", "test_accuracy", "heldout_accuracy"):
        assert same([r[key] for r in flower["history"]], [r[key] for r in local["history"]])
    assert same(flower["zeroshot"], local["zeroshot"])
    assert flower["best_round"] == local["best_round"]
    assert flower["runtime"] == "flower" and len(flower["history"]) == ROUNDS + 1
    # the shared parameters down to and the reply up from each of the 2 training nodes,
    # fp32, every round (the reply: the shared parameters, but FLoRA's adapters)
    up = reply_of(name, tiny_arch)
    per_round = 2 * (nbytes(init) + nbytes(up))
    assert flower["bytes_per_round"] == local["bytes_per_round"] == per_round
    assert all(r["bytes"] == per_round for r in flower["history"][1:])
    # what came back: a train reply holds the shared parameters only; a discovery reply the
    # initial parameters where the nodes compute them (init_needs_text); any other none
    for reply in grid.received:
        arrays = reply.content.array_records
        if reply.metadata.message_type == "train":
            assert set(arrays) == {"arrays"} and set(arrays["arrays"]) == set(up)
        elif "init" in arrays and algorithm_class(name).init_needs_text:
            assert set(arrays) == {"init"} and set(arrays["init"]) == set(init)
        else:
            assert not arrays
    # decoded pixels stay in memory: no site file is written for a pixel method
    sites = Path(run_config.get("cache-dir") or _cache()) / "sites"
    assert not sites.exists() or not any(sites.iterdir())


def _cache() -> str:
    import os

    return os.environ["FEDCLIP_CACHE"]


@pytest.mark.parametrize("name", PIXELS)
def test_a_pixel_method_on_flower_resumes_where_it_was_cut(name, tiny_arch, images, tmp_path):
    """Cut in round 2 (after round 1's checkpoint), resumed from the run folder: the same
    history and final parameters as an uninterrupted run."""
    run_config = flower_config(name, tiny_arch, images, tmp_path / "full",
                               **{"checkpoint-every": 1})
    full = server_main(LocalGrid(build_client_app(), NODES, run_config), run_config)

    class Crash(Exception):
        pass

    trained: list[int] = []

    def interrupt(node, reply):  # noqa: ANN001, ANN202
        if reply.metadata.message_type == "train":
            trained.append(node)
            if len(trained) > 2:  # the first train reply of round 2
                raise Crash
        return reply

    run_config["out"] = str(tmp_path / "cut")
    with pytest.raises(Crash):
        server_main(LocalGrid(build_client_app(), NODES, run_config, tamper=interrupt),
                    run_config)
    resumed = server_main(LocalGrid(build_client_app(), NODES, run_config),
                          {**run_config, "resume": True})
    assert max_diff(final(tmp_path / "cut"), final(tmp_path / "full")) < 1e-6

    def strip(history):  # noqa: ANN001, ANN202
        return [{k: v for k, v in r.items() if "seconds" not in k} for r in history]

    assert same(strip(resumed["history"]), strip(full["history"]))


def _secagg(run_config: dict) -> dict:
    from flwr.app import Context, RecordDict

    from fedclip.flower import secagg

    grid = LocalGrid(secagg.build_client_app(), NODES, run_config)
    context = Context(run_id=1, node_id=0, node_config={}, state=RecordDict(),
                      run_config=run_config)
    return secagg.run(grid, context, run_config).to_json()


@pytest.mark.parametrize("name", PIXELS)
def test_a_pixel_method_through_secagg_plus(name, tiny_arch, images, tmp_path):
    """Through SecAgg+ where its aggregate is a mean: the in-process result to the secure
    sum's quantization (uniform weights of 1 stay exact; 2^22 levels over [-8, 8] remain, as
    in tests/test_flower.py); otherwise refused in one line before anything is written."""
    run_config = flower_config(name, tiny_arch, images, tmp_path / "secure", rounds=2,
                               aggregation="uniform", **{"secagg-max-weight": 1.0})
    if not algorithm_class(name).aggregates_mean:
        with pytest.raises(ConfigError, match="SecAgg") as info:
            _secagg(run_config)
        assert "\n" not in str(info.value) and not (tmp_path / "secure").exists()
        return
    secure = _secagg(run_config)
    cfg = RunConfig.build(backbone=tiny_arch, data_root=str(images), heldout="gamma",
                          rounds=2, lr=1e-3, classes=list(CLASSES), algorithm=name,
                          aggregation="uniform", options={name: small_options(name)})
    local = run(cfg, tmp_path / "local")[0]
    secured, plain, init = final(tmp_path / "secure"), final(tmp_path / "local"), \
        initial(name, tiny_arch)
    # the quantization, up to about lr where Adam's normalised step meets a tiny gradient
    assert max_diff(secured, plain) < 1e-3
    error, update = norm(secured, plain), norm(plain, init)
    print(f"{name}: secagg+ vs in-process {error:.2e}, the update {update:.2e}")
    assert error < 0.01 * update  # the update itself is far larger than the difference
    assert secure["runtime"] == "flower-secagg+" and [r["round"] for r in secure["history"]] \
        == [0, 1, 2]
    assert not any(r.get("rejected") for r in secure["history"])
    assert same(secure["zeroshot"], local["zeroshot"])


def test_secagg_plus_refuses_values_its_clipping_would_change(tiny_arch, images, tmp_path):
    """A whole backbone can hold values beyond the secure sum's clipping range (8): refused
    in one line, not averaged wrong. The tiny model's logit scale (ln 1/0.07 = 2.66) is
    raised to 20 in the node's initial parameters."""
    from fedclip.flower import secagg_client

    name = "fedavg-full"
    real = secagg_client.AdapterClient.get_parameters

    def bigger(self, config):  # noqa: ANN001, ANN202
        arrays = real(self, config)
        return [a * 0 + 20.0 if key == "logit_scale" else a
                for key, a in zip(self.keys, arrays, strict=True)]

    run_config = flower_config(name, tiny_arch, images, tmp_path / "secure", rounds=1,
                               aggregation="uniform", **{"secagg-max-weight": 1.0})
    secagg_client.AdapterClient.get_parameters = bigger
    try:
        with pytest.raises(ConfigError, match="clipping range 8.*logit_scale: 20") as info:
            _secagg(run_config)
    finally:
        secagg_client.AdapterClient.get_parameters = real
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("name", PIXELS)
def test_fp16_transfer_is_refused_only_where_it_rounds_updates_away(name, tiny_arch, images,
                                                                    tmp_path):
    """fp16 halves the bytes where a round moves every tensor past its half-precision
    rounding (lr 1e-3 here); at lr 1e-6 a round's update of the backbone's tensors (a
    LayerNorm gain of 1.0 rounds by up to 5e-4) is lost: refused in one line, naming fp32."""
    run_config = flower_config(name, tiny_arch, images, tmp_path / "half", rounds=1,
                               transfer="fp16")
    half = server_main(LocalGrid(build_client_app(), NODES, run_config), run_config)
    assert half["bytes_per_round"] == 2 * (nbytes(initial(name, tiny_arch), 2)
                                           + nbytes(reply_of(name, tiny_arch), 2))
    assert half["transfer"] == "fp16"
    slow = {**run_config, "lr": 1e-6, "out": str(tmp_path / "slow")}
    if all(float(v.abs().max()) == 0 for v in initial(name, tiny_arch).values()):
        # what travels starts at zero (FFA-LoRA's B): fp16 keeps a small value's relative
        # precision, so nothing is rounded away and the slow run is not refused
        assert server_main(LocalGrid(build_client_app(), NODES, slow), slow)["transfer"] \
            == "fp16"
        return
    with pytest.raises(ConfigError, match="transfer=fp16 would round away.*use transfer=fp32"
                       ) as info:
        server_main(LocalGrid(build_client_app(), NODES, slow), slow)
    assert "\n" not in str(info.value)
    assert not (tmp_path / "slow" / "gamma" / "adapter-last.safetensors").exists()


# --- a deployment: a SuperLink and SuperNodes as processes (slow) ---------------------------
def tiny_model_folder(folder: Path) -> str:
    """The tiny random open_clip model as an open_clip folder (``local-dir:``), which every
    process of a deployment loads (a model config registered in this process would not
    reach them)."""
    import open_clip
    from safetensors.torch import save_file

    from tests.conftest import TINY_CONFIG

    folder.mkdir(parents=True)
    config = {"model_cfg": TINY_CONFIG,
              "preprocess_cfg": {"mean": [0.48145466, 0.4578275, 0.40821073],
                                 "std": [0.26862954, 0.26130258, 0.27577711]}}
    (folder / "open_clip_config.json").write_text(json.dumps(config))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = open_clip.CLIP(**TINY_CONFIG)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()},
              folder / "open_clip_model.safetensors")
    return f"open_clip:local-dir:{folder}"


@pytest.mark.slow  # each message starts a ClientApp process, which decodes its images
@pytest.mark.parametrize("name", PIXELS)
def test_a_pixel_method_deployed_gives_the_in_process_result(name, images, tmp_path,
                                                             monkeypatch):
    """Three SuperNodes, each holding only its own domain's folder: the run completes with
    the in-process result."""
    from tests.deployment import LocalDeployment

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    backbone = tiny_model_folder(tmp_path / "model")
    configs = []
    for domain in ("alpha", "beta", "gamma"):
        site = tmp_path / "sites" / domain
        shutil.copytree(images / domain, site / domain)
        configs.append(f"data-root='{site}' domain='{domain}'")
    out = tmp_path / "deployed"
    options = {f"{name}.{k.replace('_', '-')}": v for k, v in small_options(name).items()}
    items = {"backbone": backbone, "heldout": "gamma", "rounds": 2, "lr": 1e-3,
             "out": str(out), "classes": ",".join(CLASSES), "algorithm": name,
             "round-timeout": 120.0, "discover-timeout": 120.0, "min-nodes": 3,
             "personalize-epochs": 0, "cache-dir": str(tmp_path / "cache"), **options}
    run_config = [f"{k}={v!r}" if isinstance(v, str) else f"{k}={v}" for k, v in items.items()]
    with LocalDeployment(tmp_path, configs) as dep:
        _, status = dep.run(run_config)
    assert status == "finished:completed"
    cfg = RunConfig.build(backbone=backbone, data_root=str(images), heldout="gamma", rounds=2,
                          lr=1e-3, classes=list(CLASSES), algorithm=name,
                          options={name: small_options(name)})
    local = run(cfg, tmp_path / "local")[0]
    assert max_diff(final(out), final(tmp_path / "local")) < 1e-5
    (deployed,) = json.loads((out / "results.json").read_text())["runs"]
    for key in ("val_accuracy", "test_accuracy", "heldout_accuracy"):
        assert same([r[key] for r in deployed["history"]], [r[key] for r in local["history"]])
    assert deployed["bytes_per_round"] == local["bytes_per_round"] > 0


@pytest.mark.slow  # Ray starts its actors (about 20 s)
@pytest.mark.parametrize("name", PIXELS)
def test_a_pixel_method_in_a_ray_simulation_gives_the_in_process_result(name, images,
                                                                       tmp_path, monkeypatch):
    """Flower's Ray simulation (an actor per node, each decoding its own part of the
    shared folder): the in-process result."""
    from flwr.simulation import run_simulation

    from fedclip.flower.server_app import build_server_app

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    # Ray gives an actor with num_cpus=1 one OpenMP thread unless OMP_NUM_THREADS is set; the
    # in-process run must use the same count, or Adam turns the rounding difference on
    # near-zero gradients into lr-sized steps (CI: 1.08e-3 with 2 threads here, 1 there).
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)  # restored by conftest's autouse fixture
    backbone = tiny_model_folder(tmp_path / "model")
    defaults = {**flower_config(name, backbone, images, tmp_path / "sim", rounds=2),
                "cache-dir": str(tmp_path / "cache")}
    run_simulation(build_server_app(defaults), build_client_app(defaults), num_supernodes=3,
                   backend_config={"client_resources": {"num_cpus": 1}})
    (sim,) = json.loads((tmp_path / "sim" / "results.json").read_text())["runs"]
    cfg = RunConfig.build(backbone=backbone, data_root=str(images), heldout="gamma", rounds=2,
                          lr=1e-3, classes=list(CLASSES), algorithm=name,
                          options={name: small_options(name)})
    local = run(cfg, tmp_path / "local")[0]
    assert max_diff(final(tmp_path / "sim"), final(tmp_path / "local")) < 1e-5
    for key in ("val_accuracy", "test_accuracy", "heldout_accuracy"):
        assert same([r[key] for r in sim["history"]], [r[key] for r in local["history"]])
    assert sim["bytes_per_round"] == local["bytes_per_round"] > 0


@pytest.mark.parametrize("name", [n for n in names() if algorithm_class(n).Options.model_fields])
def test_a_methods_options_are_keys_of_the_flower_app(name):
    """A deployment's `flwr run -c` accepts only the keys the app declares: each option of
    every method is one ([tool.flwr.app.config] NAME.KEY), at the option's default."""
    import tomllib

    from fedclip.flower.settings import run_config_to_cfg

    app = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())
    declared = app["tool"]["flwr"]["app"]["config"].get(name, {})
    options = algorithm_class(name).Options()
    assert {k.replace("-", "_") for k in declared} == set(type(options).model_fields)
    cfg, _ = run_config_to_cfg({"algorithm": name, **{f"{name}.{k}": v
                                                      for k, v in declared.items()}})
    assert cfg.options.get(name, {}) == options.model_dump()


def test_a_deployments_run_config_reaches_flower_as_one_string(monkeypatch):
    """Flower 1.42 merges separate ``--run-config`` items shallowly: of two keys of one
    option table given apart only the last would reach the run (a pixel method's model and
    image size). ``fedclip flower-run`` passes them as one string, which keeps both."""
    from flwr.common.config import parse_config_args

    from fedclip.errors import FedclipError
    from fedclip.flower import launch

    items = ["fedprox-cnn.model='squeezenet1_1@none'", "fedprox-cnn.image-size=32",
             "algorithm='fedprox-cnn'"]
    seen: dict[str, list[str]] = {}

    class Popen:  # flwr run, as far as the command line it is given
        def __init__(self, cmd: list[str], **kwargs: Any) -> None:
            seen["cmd"], self.stdout, self.returncode = cmd, iter(()), 0

        def __enter__(self) -> Popen:
            return self

        def __exit__(self, *exc: object) -> None:
            return None

    monkeypatch.setattr(launch.subprocess, "Popen", Popen)
    monkeypatch.setattr(launch, "ensure_local_superlink", lambda *args: None)
    with pytest.raises(FedclipError, match="did not start a run"):
        launch.flower_run(Path(__file__).parents[1], "deploy", items)
    given = [seen["cmd"][i + 1] for i, a in enumerate(seen["cmd"]) if a == "--run-config"]
    assert parse_config_args(given) == {"fedprox-cnn.model": "squeezenet1_1@none",
                                        "fedprox-cnn.image-size": 32,
                                        "algorithm": "fedprox-cnn"}
    assert "fedprox-cnn.model" not in parse_config_args(items)  # Flower's merge, item by item
