"""The CLIP-in-FL methods after FedCLIP (FedPFT, training-free prototypes, PromptFolio, the
personal feature transform): what each computes, checked by hand; what never leaves a client;
resume and predict on what they write. Flower equals in-process for each in
tests/test_algorithms.py."""

import math

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from fedclip.algorithms import get_algorithm
from fedclip.algorithms.base import ClientJob, Runtime
from fedclip.algorithms.fedpft import dp_noise_std, sample_mixtures
from fedclip.config import RunConfig
from fedclip.core.client import ClientData, Split
from fedclip.errors import ConfigError
from fedclip.inprocess import experiment as _experiment
from fedclip.inprocess.experiment import build_federation, prepare
from fedclip.inprocess.federation import Federation
from fedclip.tensors import tensor_bytes
from tests.conftest import as_written, interrupted_at_round_2

run = as_written(_experiment.run)
run_heldout = as_written(_experiment.run_heldout)


def config(root, arch, **extra):
    values = {"data_root": str(root), "backbone": arch, "heldout": "beta", "rounds": 2,
              "lr": 1e-3, "batch_size": 8, "personalize_epochs": 1, **extra}
    return RunConfig.build(**values)


# --- training-free prototypes ---------------------------------------------------------------
def test_prototypes_are_the_per_class_means_of_the_union_of_train_features(tiny_arch,
                                                                           toy_root):
    cfg = config(toy_root, tiny_arch, algorithm="prototypes", heldout="gamma")
    fed = build_federation(cfg, prepare(cfg), "gamma")
    state = fed.initial_state()
    fed.run_round(state)
    x = torch.cat([c.train.x for c in fed.clients])
    y = torch.cat([c.train.y for c in fed.clients])
    unit = x / x.norm(dim=1, keepdim=True)
    for c in range(fed.class_text.shape[0]):  # by hand: the mean of the class's unit vectors
        rows = unit[y == c]
        want = rows.sum(0) / len(rows) if len(rows) else torch.zeros(unit.shape[1])
        assert torch.allclose(state.params["prototypes"][c], want, atol=1e-6)
    assert state.history[-1].train_loss == {c.name: 0.0 for c in fed.clients}  # no training


def test_prototypes_with_mixing_weight_zero_are_the_zero_shot_classifier(tiny_arch, toy_root,
                                                                         tmp_path):
    cfg = config(toy_root, tiny_arch, algorithm="prototypes", rounds=1,
                 options={"prototypes": {"alpha": 0.0, "search": False}})
    result = run(cfg, tmp_path / "r")[0]
    assert result["rounds"] == 1
    assert result["history"][1]["heldout_accuracy"] == result["zeroshot"]["generalization"]
    assert result["history"][1]["test_accuracy"] == \
        result["zeroshot"]["personalization"]["per_client"]
    text = F.normalize(torch.randn(3, 8), dim=-1)
    algorithm = get_algorithm(cfg, Runtime(("a", "b", "c"), text))
    module = algorithm.build_module(8)
    module.prototypes.copy_(torch.randn(3, 8))
    emb = F.normalize(torch.randn(5, 8), dim=-1)
    assert torch.equal(algorithm.client.logits(module, emb, text, 7.0), 7.0 * (emb @ text.T))
    module.alpha.fill_(1.0)
    assert not torch.equal(algorithm.client.logits(module, emb, text, 7.0), 7.0 * (emb @ text.T))


def test_prototypes_choose_alpha_and_beta_on_the_val_splits(tiny_arch, toy_root, tmp_path):
    from fedclip.algorithms.prototypes import GRID

    result = run(config(toy_root, tiny_arch, algorithm="prototypes", rounds=50),
                 tmp_path / "r")[0]
    assert result["rounds"] == len(GRID)  # one grid point a round, then it stops
    val = [sum(r["val_accuracy"].values()) / 2 for r in result["history"]]
    assert val[result["best_round"]] == max(val)
    assert result["personalized"] is None  # training-free: nothing to fine-tune


# --- FedPFT ---------------------------------------------------------------------------------
def _job(x, y, classes, seed=0):
    split = Split(x, y)
    return ClientJob("c", split, {}, {}, {}, None, {}, torch.zeros(classes, x.shape[1]), 1.0,
                     seed)


@pytest.mark.parametrize("covariance", ["diag", "spherical", "full"])
def test_fedpft_samples_reproduce_the_union_means_and_variances(covariance):
    gen = torch.Generator().manual_seed(0)
    d, classes = 4, 2
    # two clients with different class-conditional Gaussians (and different sizes)
    a_x = torch.cat([torch.randn(300, d, generator=gen) * 0.5 + 2,
                     torch.randn(100, d, generator=gen) * 2 - 1])
    a_y = torch.tensor([0] * 300 + [1] * 100)
    b_x = torch.cat([torch.randn(100, d, generator=gen) * 1.5 - 2,
                     torch.randn(200, d, generator=gen) + 3])
    b_y = torch.tensor([0] * 100 + [1] * 200)
    cfg = RunConfig.build(algorithm="fedpft", backbone="standin",
                          options={"fedpft": {"covariance": covariance,
                                              "samples_per_class": 100000}})
    algorithm = get_algorithm(cfg)
    updates = [algorithm.client.train_client(_job(x, y, classes)) for x, y in ((a_x, a_y),
                                                                        (b_x, b_y))]
    synthetic = sample_mixtures(updates, 100000, torch.Generator().manual_seed(1))
    x, y = torch.cat([a_x, b_x]), torch.cat([a_y, b_y])
    for c in range(classes):  # the union's moments by hand: a mixture of the two clients
        real, fake = x[y == c], synthetic.x[synthetic.y == c]
        assert len(fake) == 100000
        assert torch.allclose(fake.mean(0), real.mean(0), atol=0.03)
        if covariance == "spherical":  # one variance per client: the union's mean variance
            n = [(a_y == c).sum(), (b_y == c).sum()]
            parts = [a_x[a_y == c], b_x[b_y == c]]
            within = sum(k * p.var(0, unbiased=False).mean() for k, p in zip(n, parts,
                                                                             strict=True))
            between = sum(k * ((p.mean(0) - real.mean(0)) ** 2) for k, p in zip(n, parts,
                                                                                strict=True))
            want = within / sum(n) + between / sum(n)
            assert torch.allclose(fake.var(0), want, rtol=0.03)
        else:
            assert torch.allclose(fake.var(0), real.var(0, unbiased=False), rtol=0.03)


def test_fedpft_sends_exactly_the_analytic_bytes_and_is_refused_where_it_cannot_run(
        tiny_arch, toy_root, tmp_path):
    d, classes, k = 8, 3, 2
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(60, d, generator=gen), torch.arange(60) % classes
    for cov, per in (("spherical", 1), ("diag", d), ("full", d * d)):
        for half in (False, True):
            algorithm = get_algorithm(RunConfig.build(
                algorithm="fedpft", backbone="standin",
                options={"fedpft": {"components": k, "covariance": cov, "half": half}}))
            update = algorithm.client.train_client(_job(x, y, classes))
            mixture_values = classes * (k * d + k * per + k)  # means, covariances, weights
            want = mixture_values * (2 if half else 4) + classes * 4  # + counts (fp32)
            assert tensor_bytes(update.extras) == want and update.params == {}
    cfg = config(toy_root, tiny_arch, algorithm="fedpft", rounds=5, personalize_epochs=0)
    result = run(cfg, tmp_path / "r")[0]
    dim = 32
    head = 3 * dim * 4  # sent down once, to each of the two clients
    upload = 3 * (dim + dim + 1) * 4 + 3 * 4  # K=1, diag
    assert result["rounds"] == 1 and result["bytes_per_round"] == 2 * (head + upload)
    with pytest.raises(ConfigError, match="statistics"):
        run(config(toy_root, tiny_arch, algorithm="fedpft", aggregation="median"),
            tmp_path / "m")
    with pytest.raises(ConfigError, match="dp_epsilon needs components=1"):
        get_algorithm(RunConfig.build(algorithm="fedpft", options={
            "fedpft": {"dp_epsilon": 1.0, "components": 2}}))


def test_fedpft_dp_release_spends_its_epsilon_and_adds_noise():
    from fedclip.privacy import epsilon_after

    std = dp_noise_std(2.0, 1e-5)
    assert epsilon_after(1, std / math.sqrt(3), 1, 1, 1e-5) <= 2.0 * 1.001
    assert epsilon_after(1, 0.95 * std / math.sqrt(3), 1, 1, 1e-5) > 2.0
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(200, 8, generator=gen), torch.arange(200) % 2
    plain = get_algorithm(RunConfig.build(algorithm="fedpft", backbone="standin"))
    private = get_algorithm(RunConfig.build(algorithm="fedpft", backbone="standin",
                                            options={"fedpft": {"dp_epsilon": 2.0}}))
    a = plain.client.train_client(_job(F.normalize(x, dim=-1), y, 2)).extras
    b = private.client.train_client(_job(x, y, 2)).extras
    assert (a["means"] - b["means"]).abs().max() > 1e-3  # noised
    assert (a["means"] - b["means"]).abs().max() < 1.0  # and still near (std / 100 samples)


def test_fedpft_dp_noise_is_a_secret_of_the_client():
    """The server FedPFT's DP protects against knows the run seed, the round and the client's
    name (the job's seed comes from them): none of them regenerates the client's noise. Two
    releases of the same job differ, and removing the noise regenerated from the job's seed
    (the previous versions' source) leaves the noise in place; an injected generator is what
    the noise then comes from."""
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(200, 8, generator=gen), torch.arange(200) % 2
    private = get_algorithm(RunConfig.build(algorithm="fedpft", backbone="standin",
                                            options={"fedpft": {"dp_epsilon": 2.0}}))
    job = _job(x, y, 2, seed=1234)
    first, second = (private.client.train_client(job).extras["counts"] for _ in range(2))
    assert not torch.equal(first, second)
    exact = torch.bincount(y, minlength=2).float()
    std = dp_noise_std(2.0, 1e-5)
    regenerated = exact + std * torch.randn(2, generator=torch.Generator().manual_seed(1234))
    assert not torch.allclose(first, regenerated.clamp(min=0), atol=1e-3)
    injected = [private.client.train_client(job, noise=torch.Generator().manual_seed(1234))
                .extras["counts"] for _ in range(2)]
    assert torch.equal(injected[0], injected[1])
    assert torch.allclose(injected[0], regenerated.clamp(min=0))


# --- personal parts: never sent, and they pay off where label maps differ --------------------
def test_personal_parts_never_leave_a_client(tiny_arch, toy_root, tmp_path):
    from fedclip.flower.client_app import build_client_app
    from fedclip.flower.server_app import main as server_main
    from tests.flower_grid import LocalGrid

    for algorithm, personal in (("promptfolio", "local."), ("personal-transform",
                                                            "transform.")):
        run_config = {"backbone": tiny_arch, "data-root": str(toy_root), "heldout": "beta",
                      "rounds": 2, "lr": 1e-3, "batch-size": 8, "personalize-epochs": 1,
                      "classes": "cat,dog,red_car", "algorithm": algorithm,
                      "out": str(tmp_path / algorithm)}
        nodes = [{"partition-id": i, "num-partitions": 3} for i in range(3)]
        grid = LocalGrid(build_client_app(), nodes, run_config)
        server_main(grid, run_config)
        trained = [m for m in grid.received if m.metadata.message_type == "train"
                   and not m.has_error()]
        assert len(trained) == 4  # two clients, two rounds
        for msg in [*grid.received, *grid.sent]:
            if msg.has_error() or msg.metadata.message_type == "query":
                continue
            keys = [k for r in msg.content.array_records.values() for k in r]
            assert not any(k.startswith(personal) for k in keys), (algorithm, keys)


def _swapped_federation(algorithm_name, **options):
    """Two clients whose label maps differ (client b calls class 0 what a calls 1): one
    global classifier cannot serve both; a personal part can."""
    gen = torch.Generator().manual_seed(0)
    d, classes = 16, 2
    centres = F.normalize(torch.randn(classes, d, generator=gen), dim=-1) * 3

    def split(n, swap):
        y = torch.arange(n) % classes
        x = centres[y] + 0.3 * torch.randn(n, d, generator=gen)
        return Split(x, (1 - y) if swap else y)

    clients = [ClientData(name, split(64, swap), split(32, swap), split(32, swap),
                          torch.ones(classes, dtype=torch.bool))
               for name, swap in (("a", False), ("b", True))]
    text = F.normalize(centres + torch.randn(classes, d, generator=gen), dim=-1)
    cfg = RunConfig.build(algorithm=algorithm_name, backbone="standin", rounds=20, lr=1e-2,
                          batch_size=16, weight_decay=0.0, loss="ce", personalize_epochs=0,
                          options={algorithm_name: options} if options else {})
    algorithm = get_algorithm(cfg, Runtime(("x", "y"), text, 10.0, len(clients)))
    return Federation(algorithm, clients, text, 10.0)


def test_a_personal_transform_beats_the_global_classifier_when_label_maps_differ():
    results = {}
    for name in ("linear-probe", "personal-transform"):
        state = _swapped_federation(name).run()
        results[name] = state.history[-1].test_accuracy
    assert min(results["personal-transform"].values()) > 0.9  # both clients served
    assert min(results["linear-probe"].values()) < 0.6  # one head: one client loses
    lowrank = _swapped_federation("personal-transform", kind="lowrank", rank=4).run()
    assert min(lowrank.history[-1].test_accuracy.values()) > 0.9


def test_stateful_methods_resume_bit_identically(tiny_arch, toy_root, tmp_path):
    for algorithm in ("personal-transform", "promptfolio", "prototypes"):
        cfg = config(toy_root, tiny_arch, algorithm=algorithm, rounds=4, checkpoint_every=1,
                     personalize_epochs=0)
        prep = prepare(cfg)
        full = run_heldout(cfg, prep, "beta", tmp_path / f"{algorithm}-full")
        interrupted_at_round_2(cfg, prep, "beta", tmp_path / f"{algorithm}-cut")
        resumed = run_heldout(cfg, prep, "beta", tmp_path / f"{algorithm}-cut", resume=True)
        own = ("adapter-alpha", "adapter-gamma") if algorithm != "prototypes" else ()
        for name in ("adapter-last", *own):
            wf = load_file(tmp_path / f"{algorithm}-full" / "beta" / f"{name}.safetensors")
            wr = load_file(tmp_path / f"{algorithm}-cut" / "beta" / f"{name}.safetensors")
            assert all(torch.equal(wf[k], wr[k]) for k in wf), (algorithm, name)
        assert [r["test_accuracy"] for r in resumed["history"]] == \
            [r["test_accuracy"] for r in full["history"]]
        assert resumed["best_round"] == full["best_round"]


# --- predict on what they write -------------------------------------------------------------
@pytest.mark.parametrize("algorithm", ["prototypes", "fedpft", "personal-transform"])
def test_predict_reproduces_the_heldout_accuracy_of_each_head(tiny_arch, toy_root, tmp_path,
                                                               algorithm):
    from fedclip.predict import predict

    cfg = config(toy_root, tiny_arch, algorithm=algorithm, rounds=3, personalize_epochs=0)
    result = run(cfg, tmp_path / "r")[0]
    rows = predict(tmp_path / "r" / "beta" / "adapter.safetensors", [toy_root / "beta"])
    files = sorted((toy_root / "beta").rglob("*.png"))
    predicted = {r["file"]: r["class"] for r in rows}
    right = sum(predicted[str(f.resolve())] == f.parent.name for f in files)
    assert right / len(files) == pytest.approx(result["generalization"])


@pytest.mark.parametrize(("algorithm", "why"), [
    ("prototypes", "per-client extras"), ("fedpft", "per-client extras"),
    ("personal-transform", "keeps a model per client"),
    ("promptfolio", "keeps a model per client")])
def test_secagg_refuses_each_method_in_one_line(algorithm, why):
    from fedclip.config import FlowerSettings
    from fedclip.flower.secagg import refusal

    line = refusal(get_algorithm(RunConfig.build(algorithm=algorithm)), FlowerSettings())
    assert line is not None and why in line and "\n" not in line
