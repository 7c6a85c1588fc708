"""Algorithms that carry state: each works in-process and on Flower with the same numbers,
and none silently degenerates to FedAvg."""

import pytest
import torch
from safetensors.torch import load_file

from fedclip.config import RunConfig
from fedclip.flower.client_app import build_client_app
from fedclip.flower.server_app import main as _server_main
from fedclip.inprocess import experiment as _experiment
from fedclip.inprocess.experiment import prepare
from tests.conftest import as_written, interrupted_at_round_2
from tests.flower_grid import LocalGrid

run = as_written(_experiment.run)
run_heldout = as_written(_experiment.run_heldout)
server_main = as_written(_server_main)

FLOWER_ALGORITHMS = ["scaffold", "ditto", "fedadam", "fedyogi", "fedavgm", "linear-probe",
                     "clip-adapter", "promptfl", "prototypes", "fedpft", "personal-transform",
                     "promptfolio"]


def config(root, arch, **extra):
    values = {"data_root": str(root), "backbone": arch, "heldout": "gamma", "rounds": 2,
              "lr": 1e-3, "batch_size": 8, "personalize_epochs": 1, **extra}
    return RunConfig.build(**values)


def last(path):
    return load_file(path / "gamma" / "adapter-last.safetensors")


def initial(cfg):
    from fedclip.algorithms import get_algorithm
    from fedclip.algorithms.base import Runtime

    prep = prepare(cfg)
    algorithm = get_algorithm(cfg, Runtime(prep.prompts, prep.class_text))
    return algorithm.init_global(prep.class_text.shape[1])


def diff(a, b):
    return max((a[k] - b[k]).abs().max().item() for k in b)


@pytest.fixture
def skewed(tmp_path):
    """Non-IID clients: each training domain holds mostly one class."""
    from tests.conftest import make_image_folder

    return make_image_folder(tmp_path / "skewed", {
        "alpha": {"cat": 14, "dog": 3, "red_car": 3}, "beta": {"cat": 3, "dog": 3, "red_car": 14},
        "gamma": {"cat": 6, "dog": 6, "red_car": 6}}, size=32)


@pytest.mark.parametrize("algorithm", FLOWER_ALGORITHMS)
def test_flower_equals_in_process(tiny_arch, skewed, tmp_path, algorithm):
    run_config = {"backbone": tiny_arch, "data-root": str(skewed), "heldout": "gamma",
                  "rounds": 2, "lr": 1e-3, "batch-size": 8, "personalize-epochs": 1,
                  "classes": "cat,dog,red_car", "algorithm": algorithm,
                  "out": str(tmp_path / "flower")}
    nodes = [{"partition-id": i, "num-partitions": 3} for i in range(3)]
    flower = server_main(LocalGrid(build_client_app(), nodes, run_config), run_config)
    local = run(config(skewed, tiny_arch, algorithm=algorithm), tmp_path / "local")[0]
    assert diff(last(tmp_path / "flower"), last(tmp_path / "local")) < 1e-5
    for key in ("val_accuracy", "test_accuracy", "heldout_accuracy"):
        assert [r[key] for r in flower["history"]] == [r[key] for r in local["history"]]
    assert flower["bytes_per_round"] == local["bytes_per_round"]
    personalized = [(r["personalized"] or {}).get("per_client") for r in (flower, local)]
    assert personalized[0] == personalized[1]
    assert (personalized[0] is None) == (algorithm == "prototypes")  # nothing to fine-tune


def test_scaffold_differs_from_fedavg_and_its_control_variates_move(tiny_arch, skewed,
                                                                      tmp_path):
    run(config(skewed, tiny_arch), tmp_path / "avg")
    r = run(config(skewed, tiny_arch, algorithm="scaffold"), tmp_path / "scaffold")[0]
    assert diff(last(tmp_path / "avg"), last(tmp_path / "scaffold")) > 1e-6
    ckpt = load_file(tmp_path / "scaffold" / "gamma" / "checkpoint.safetensors")
    server = [v for k, v in ckpt.items() if k.startswith("server/c/")]
    clients = [v for k, v in ckpt.items() if k.startswith("client/") and "/ci/" in k]
    assert server and all(v.abs().sum() > 0 for v in server)
    assert len(clients) == 2 * len(server) and all(v.abs().sum() > 0 for v in clients)
    adapter = 2 * (32 * 32 + 32)
    assert r["bytes_per_round"] == 2 * 2 * 2 * adapter * 4  # params and variates, both ways


def test_stateful_algorithm_resumes_exactly(tiny_arch, skewed, tmp_path):
    cfg = config(skewed, tiny_arch, algorithm="scaffold", rounds=4, checkpoint_every=1,
                 optimizer_state="keep")
    prep = prepare(cfg)
    full = run_heldout(cfg, prep, "gamma", tmp_path / "full")

    interrupted_at_round_2(cfg, prep, "gamma", tmp_path / "cut")
    resumed = run_heldout(cfg, prep, "gamma", tmp_path / "cut", resume=True)
    wf = load_file(tmp_path / "full" / "gamma" / "adapter-last.safetensors")
    wr = load_file(tmp_path / "cut" / "gamma" / "adapter-last.safetensors")
    assert all(torch.equal(wf[k], wr[k]) for k in wf)
    assert resumed["best_round"] == full["best_round"]


def test_ditto_keeps_personal_adapters_apart_from_the_global_one(tiny_arch, skewed, tmp_path):
    run(config(skewed, tiny_arch), tmp_path / "fedclip")
    ditto = run(config(skewed, tiny_arch, algorithm="ditto", **{"ditto.lam": 0.01}),
                tmp_path / "ditto")[0]
    # the global adapter is FedCLIP's (same seeds), the personal ones are not
    assert diff(last(tmp_path / "fedclip"), last(tmp_path / "ditto")) == 0
    ckpt = load_file(tmp_path / "ditto" / "gamma" / "checkpoint.safetensors")
    glob = {k.removeprefix("global/"): v for k, v in ckpt.items() if k.startswith("global/")}
    for client in ("alpha", "beta"):
        own = {k.split("/ditto/")[1]: v for k, v in ckpt.items()
               if k.startswith(f"client/{client}/ditto/")}
        assert set(own) == set(glob) and diff(own, glob) > 1e-6
        assert (tmp_path / "ditto" / "gamma" / f"adapter-{client}.safetensors").exists()
    assert ditto["personalization"]["per_client"].keys() == {"alpha", "beta"}


def test_server_optimizers_reduce_to_fedavg_where_they_should(tiny_arch, skewed, tmp_path):
    run(config(skewed, tiny_arch), tmp_path / "avg")
    avg = last(tmp_path / "avg")
    run(config(skewed, tiny_arch, algorithm="fedavgm",
               options={"fedavgm": {"server_lr": 1.0, "momentum": 0.0}}), tmp_path / "m0")
    assert diff(avg, last(tmp_path / "m0")) < 1e-6
    run(config(skewed, tiny_arch, algorithm="fedadam",
               options={"fedadam": {"server_lr": 1e6, "tau": 1e6, "beta1": 0.0,
                                    "beta2": 0.0}}), tmp_path / "adam-limit")
    assert diff(avg, last(tmp_path / "adam-limit")) < 1e-4
    for algorithm in ("fedadam", "fedyogi", "fedavgm"):
        run(config(skewed, tiny_arch, algorithm=algorithm), tmp_path / algorithm)
        assert diff(avg, last(tmp_path / algorithm)) > 1e-4, algorithm
    ckpt = load_file(tmp_path / "fedadam" / "gamma" / "checkpoint.safetensors")
    assert ckpt["server/t"].item() == 2 and any(
        v.abs().sum() > 0 for k, v in ckpt.items() if k.startswith("server/v/"))


def test_linear_probe_starts_at_zero_shot_and_trains(tiny_arch, skewed, tmp_path):
    r = run(config(skewed, tiny_arch, algorithm="linear-probe"), tmp_path / "lp")[0]
    round0 = r["history"][0]
    assert round0["heldout_accuracy"] == r["zeroshot"]["generalization"]
    assert round0["test_accuracy"] == r["zeroshot"]["personalization"]["per_client"]
    assert r["trainable_params"] == 3 * 32
    init = initial(config(skewed, tiny_arch, algorithm="linear-probe"))
    assert torch.allclose(init["weight"].norm(dim=1), torch.ones(3))  # the prompts' features
    assert diff(last(tmp_path / "lp"), init) > 1e-6  # trained


def test_clip_adapter_blend_and_size(tiny_arch, skewed, tmp_path):
    r = run(config(skewed, tiny_arch, algorithm="clip-adapter"), tmp_path / "ca")[0]
    assert r["trainable_params"] == 2 * 32 * 8  # d x d/4, twice, no biases
    off = run(config(skewed, tiny_arch, algorithm="clip-adapter",
                     **{"clip-adapter.alpha": 0.0}), tmp_path / "off")[0]
    # alpha = 0: the adapter contributes nothing, every round scores as zero-shot
    assert all(h["heldout_accuracy"] == off["zeroshot"]["generalization"]
               for h in off["history"])
    init = initial(config(skewed, tiny_arch, algorithm="clip-adapter"))
    assert diff(last(tmp_path / "ca"), init) > 1e-6


def test_algorithm_options_are_validated_and_reach_clients(tiny_arch, skewed, tmp_path):
    from fedclip.algorithms import get_algorithm
    from fedclip.errors import ConfigError

    # options are the algorithm's to check (the config does not import the algorithms)
    with pytest.raises(ConfigError, match="fedprox.*mu"):
        get_algorithm(RunConfig.build(algorithm="fedprox", options={"fedprox": {"mu": -1}}))
    with pytest.raises(ConfigError, match="its options: fedprox.mu"):
        get_algorithm(RunConfig.build(**{"fedprox.nu": 1}))
    with pytest.raises(ConfigError, match="unknown algorithm 'nope'"):
        get_algorithm(RunConfig.build(**{"nope.x": 1}))
    cfg = RunConfig.build(algorithm="fedprox", **{"fedprox.mu": 0.5})
    from fedclip.algorithms import get_algorithm

    assert get_algorithm(cfg).round_config(3).values == {"mu": 0.5}


def test_promptfl_starts_at_zero_shot_sends_only_the_context_and_trains(tiny_arch, skewed,
                                                                        tmp_path):
    r = run(config(skewed, tiny_arch, algorithm="promptfl"), tmp_path / "p")[0]
    assert r["history"][0]["heldout_accuracy"] == r["zeroshot"]["generalization"]
    assert r["trainable_params"] == 4 * 32  # "a picture of a": 4 tokens x text width 32
    assert r["bytes_per_round"] == 2 * 2 * 4 * 32 * 4
    init = initial(config(skewed, tiny_arch, algorithm="promptfl"))
    assert diff(last(tmp_path / "p"), init) > 1e-6
    with pytest.raises(Exception, match="has no text tower to prompt"):
        from fedclip.algorithms import get_algorithm

        _ = get_algorithm(RunConfig.build(algorithm="promptfl", backbone="hf:org/model")).backbone


@pytest.mark.slow  # AlexNet: 57M parameters trained on the CPU (about 45 s)
def test_torchvision_classifier_baselines_train_on_pixels(tiny_arch, skewed, tmp_path):
    """The paper's AlexNet baselines (random init offline), with FedProx's pull."""
    extra = {"fedavg-cnn.image_size": 64, "batch_size": 6, "rounds": 1, "personalize_epochs": 0}
    r = run(config(skewed, tiny_arch, algorithm="fedavg-cnn", **extra), tmp_path / "avg")[0]
    init = initial(config(skewed, tiny_arch, algorithm="fedavg-cnn", **extra))
    assert r["trainable_params"] == sum(v.numel() for v in init.values()) > 50_000_000
    assert r["bytes_per_round"] == 2 * 2 * r["trainable_params"] * 4
    assert init["classifier.6.weight"].shape == (3, 4096)  # a 3-way head
    avg = last(tmp_path / "avg")
    assert diff(avg, init) > 0
    prox = {"fedprox-cnn.image_size": 64, "fedprox-cnn.mu": 1e4, **{
        k: v for k, v in extra.items() if "." not in k}}
    run(config(skewed, tiny_arch, algorithm="fedprox-cnn", **prox), tmp_path / "prox")

    def drift(w):
        return sum(((w[k] - init[k]) ** 2).sum().item() for k in init)

    assert drift(last(tmp_path / "prox")) < drift(avg)
