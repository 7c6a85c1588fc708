"""FedOTP and TRIP / TRIP-Lite: their transport plans, their routing, and their runs in
both runtimes (parity, resume, predict, what a reply carries)."""

import math

import pytest
import torch
from safetensors.torch import load_file

from fedclip.algorithms import algorithm_class
from fedclip.algorithms.transport import balanced, one_sided, unbalanced
from fedclip.algorithms.trip import capacity_kmeans, expert_weights
from fedclip.config import RunConfig
from fedclip.flower.client_app import build_client_app
from fedclip.flower.server_app import main as _server_main
from fedclip.inprocess import experiment as _experiment
from fedclip.inprocess.experiment import prepare, run_heldout
from tests.conftest import as_written, interrupted_at_round_2
from tests.flower_grid import LocalGrid

run = as_written(_experiment.run)
server_main = as_written(_server_main)
TOKEN_METHODS = ["fedotp", "trip", "trip-lite"]


def _costs(b=4, n=6, m=3, seed=0):  # noqa: ANN001, ANN202
    g = torch.Generator().manual_seed(seed)
    cost = torch.rand(b, n, m, generator=g, dtype=torch.float64) * 2
    a = torch.full((b, n), 1.0 / n, dtype=torch.float64)
    return cost, a, torch.full((b, m), 1.0 / m, dtype=torch.float64)


def test_transport_plans_meet_the_requested_marginals():
    cost, a, b = _costs()
    # balanced (POT): both marginals
    plan = balanced(cost, a, b, 0.1, 10_000, 1e-12)
    assert (plan.sum(2) - a).abs().max() < 1e-6 and (plan.sum(1) - b).abs().max() < 1e-6
    # the released code's one-sided loop: the prompt side exactly gamma / N, the token side
    # at most 1 / M, the moved mass gamma
    gamma = 0.8
    plan = one_sided(cost, a, gamma * b, 0.1, 10_000, 1e-13)
    assert (plan.sum(1) - gamma * b).abs().max() < 1e-6
    assert (plan.sum(2) - a).max() < 1e-6 and (plan.sum(2) < a - 1e-3).any()  # some held back
    assert (plan.sum((1, 2)) - gamma).abs().max() < 1e-6
    # the relaxed moves the cheap mass: a token whose costs are all high keeps its mass
    expensive = cost.clone()
    expensive[:, 0] = 2.0
    kept = one_sided(expensive, a, gamma * b, 0.1, 10_000, 1e-13)
    assert (kept[:, 0].sum(1) < plan[:, 0].sum(1)).all()


@pytest.mark.filterwarnings("ignore:Stabilized Unbalanced Sinkhorn")
def test_unbalanced_transport_is_balanced_when_its_relaxation_is_off():
    cost, a, b = _costs()
    exact = balanced(cost, a, b, 0.1, 10_000, 1e-12)
    # the released loop with all the mass moved (gamma = 1) is Sinkhorn
    assert (one_sided(cost, a, b, 0.1, 10_000, 1e-13) - exact).abs().max() < 1e-6
    # POT's KL-relaxed plan: rho = inf is balanced; a huge rho tends to it; a small one moves
    # less mass
    assert torch.equal(unbalanced(cost, a, b, 0.1, 10_000, 1e-12, math.inf), exact)
    assert (unbalanced(cost, a, b, 0.1, 10_000, 1e-12, 1e6) - exact).abs().max() < 1e-5
    loose = unbalanced(cost, a, b, 0.1, 10_000, 1e-12, 0.05)
    assert (loose.sum((1, 2)) < 0.99).all()


def test_token_routing_respects_capacity_and_matching_gives_token_shares():
    g = torch.Generator().manual_seed(0)
    tokens = torch.randn(5, 49, 16, generator=g)
    centroids, sizes = capacity_kmeans(tokens, 4, 1.0, torch.Generator().manual_seed(1))
    assert (sizes <= 12 + 1).all() and (sizes.sum(1) <= 49).all()  # floor(49 / 4) (+1 rest)
    again = capacity_kmeans(tokens, 4, 1.0, torch.Generator().manual_seed(1))
    assert torch.equal(again[0], centroids) and torch.equal(again[1], sizes)  # seeded
    keys = torch.linalg.qr(torch.randn(16, 4, generator=g))[0].T
    hungarian = expert_weights(centroids, sizes, keys, "hungarian", 0.05)
    torch.testing.assert_close(hungarian.sum(1), torch.ones(5), atol=1e-6, rtol=0)
    # each expert weighs exactly one cluster's share (a permutation of the shares)
    share = sizes / sizes.sum(1, keepdim=True)
    assert torch.equal(hungarian.sort(1).values, share.sort(1).values)
    # the paper's Sinkhorn plan: the same at a small eps, token shares in any case
    sinkhorn = expert_weights(centroids, sizes, keys, "sinkhorn", 1e-3)
    torch.testing.assert_close(sinkhorn.sum(1), torch.ones(5), atol=1e-4, rtol=0)
    assert (sinkhorn - hungarian).abs().max() < 1e-3


@pytest.mark.parametrize("name", TOKEN_METHODS)
def test_a_token_methods_options_are_keys_of_the_flower_app(name):
    from tests import test_flower_pixels as pixels

    pixels.test_a_methods_options_are_keys_of_the_flower_app(name)  # declared, at defaults
    cls = algorithm_class(name)
    assert cls.inputs == "tokens" and cls(RunConfig.build(algorithm=name)).runs_on_flower


@pytest.mark.parametrize("name", ["fedotp", "trip"])
def test_flower_matches_in_process_and_no_personal_prompt_leaves_a_client(
        tiny_arch, toy_root, tmp_path, name):
    replies: list[dict] = []

    def record(node, reply):  # noqa: ANN001, ANN202
        if reply.metadata.message_type == "train" and reply.has_content():
            replies.append(reply.content["arrays"].to_torch_state_dict())
        return reply

    run_config = {"backbone": tiny_arch, "data-root": str(toy_root), "heldout": "gamma",
                  "rounds": 2, "lr": 1e-3, "out": str(tmp_path / "flower"),
                  "classes": "cat,dog,red_car", "personalize-epochs": 0, "algorithm": name}
    nodes = [{"partition-id": i, "num-partitions": 3} for i in range(3)]
    flower = server_main(LocalGrid(build_client_app(), nodes, run_config, tamper=record),
                         run_config)
    cfg = RunConfig.build(backbone=tiny_arch, data_root=str(toy_root), heldout="gamma",
                          rounds=2, lr=1e-3, algorithm=name, personalize_epochs=0)
    local = run(cfg, tmp_path / "local")[0]
    wf = load_file(tmp_path / "flower" / "gamma" / "adapter-last.safetensors")
    wl = load_file(tmp_path / "local" / "gamma" / "adapter-last.safetensors")
    assert wf.keys() == wl.keys()
    assert max((wf[k] - wl[k]).abs().max().item() for k in wl) < 1e-5
    for key in ("val_accuracy", "test_accuracy", "heldout_accuracy"):
        assert [r[key] for r in flower["history"]] == [r[key] for r in local["history"]]
    assert flower["bytes_per_round"] == local["bytes_per_round"]
    assert len(replies) == 4  # 2 training nodes x 2 rounds
    sent = {k for r in replies for k in r}
    assert sent == ({"ctx"} if name == "fedotp" else {"experts"})  # never local.ctx
    shared = wl["ctx"] if name == "fedotp" else wl["experts"]
    assert all(r[k].numel() == shared.numel() for r in replies for k in r)
    assert flower["bytes_per_round"] == 2 * 2 * shared.numel() * 4  # only that, both ways
    # a token site stays in the node's memory: no site file holds its tokens a second time
    from fedclip.features import default_cache_dir

    assert (default_cache_dir() / "tokens").is_dir()
    assert not list((default_cache_dir() / "sites").glob("*"))


@pytest.mark.parametrize("name", TOKEN_METHODS)
def test_resume_is_bit_identical_and_predict_uses_what_a_run_wrote(tiny_arch, toy_root,
                                                                   tmp_path, name):
    from fedclip.predict import predict

    cfg = RunConfig.build(data_root=str(toy_root), backbone=tiny_arch, heldout="beta",
                          rounds=3, lr=1e-3, checkpoint_every=1, algorithm=name,
                          personalize_epochs=0)
    prep = prepare(cfg)
    assert prep.features["alpha"].features.dim() == 3  # pooled + patch tokens
    full = run_heldout(cfg, prep, "beta", tmp_path / "full")
    interrupted_at_round_2(cfg, prep, "beta", tmp_path / "cut")
    resumed = run_heldout(cfg, prep, "beta", tmp_path / "cut", resume=True)
    strip = lambda h: [{k: v for k, v in r.items() if not k.endswith("seconds")}  # noqa: E731
                       for r in h]
    assert strip(resumed.to_json()["history"]) == strip(full.to_json()["history"])
    wf = load_file(tmp_path / "full" / "beta" / "adapter-last.safetensors")
    wr = load_file(tmp_path / "cut" / "beta" / "adapter-last.safetensors")
    assert wf.keys() == wr.keys() and all(torch.equal(wf[k], wr[k]) for k in wf)

    rows = predict(tmp_path / "full" / "beta" / "adapter.safetensors", [toy_root / "beta"])
    files = sorted((toy_root / "beta").rglob("*.png"))
    predicted = {r["file"]: r["class"] for r in rows}
    correct = sum(predicted[str(f.resolve())] == f.parent.name for f in files)
    assert correct / len(files) == pytest.approx(full.to_json()["generalization"])


@pytest.mark.parametrize("extra", [
    {"dp": "server", "dp_clipping_norm": 0.1, "dp_noise_multiplier": 0.5,
     "aggregation": "uniform"},
    {"aggregation": "median"},
])
def test_dp_and_robust_rules_run_on_the_averaged_prompt(tiny_arch, toy_root, tmp_path, extra):
    """The shared prompt is a mean of the replies: DP and the robust rules apply as to
    FedCLIP's adapter (the personal prompt never reaches them)."""
    cfg = RunConfig.build(data_root=str(toy_root), backbone=tiny_arch, heldout="beta",
                          rounds=1, lr=1e-3, algorithm="fedotp", personalize_epochs=0, **extra)
    result = run(cfg, tmp_path / "r")[0]
    assert 0 <= result["generalization"] <= 1
    assert result["bytes_per_round"] == 2 * 2 * 4 * 32 * 4  # the global context only


def test_trip_runs_with_the_released_scripts_32_tokens_and_more_experts_than_tokens(
        tiny_arch, toy_root, tmp_path):
    """The released PACS script's 32 context tokens per expert are an option, not a refusal:
    a round trains and sends experts x 32 x width values where the defaults send experts x 2
    x width (TRIP-Lite: 2 x 1). More experts than the backbone has patch tokens (8 on this
    tiny one's 4) trains too, every expert sent."""
    sent = {}
    for name, options in [("trip", {"n_ctx": 32}), ("trip", {}), ("trip-lite", {}),
                          ("trip", {"experts": 8, "matching": "sinkhorn"})]:
        cfg = RunConfig.build(data_root=str(toy_root), backbone=tiny_arch, heldout="beta",
                              rounds=1, lr=1e-3, algorithm=name, personalize_epochs=0,
                              options={name: options} if options else {})
        result = run(cfg, tmp_path / f"{name}{len(options)}")[0]
        assert 0 <= result["generalization"] <= 1
        sent[(name, len(options))] = result["bytes_per_round"]
    assert sent[("trip", 1)] == 16 * sent[("trip", 0)] == 64 * sent[("trip-lite", 0)]
    assert sent[("trip", 2)] == 2 * sent[("trip", 0)]


@pytest.mark.parametrize("matching", ["hungarian", "sinkhorn"])
def test_fewer_tokens_than_experts_route_each_token_to_its_own_expert(matching):
    """T = 3 tokens, K = 5 experts: 3 clusters of one token each, matched to 3 of the 5
    experts (Hungarian: the other 2 weigh 0) or spread by the plan; weights sum to 1."""
    g = torch.Generator().manual_seed(0)
    tokens = torch.randn(4, 3, 16, generator=g)
    centroids, sizes = capacity_kmeans(tokens, 5, 1.0, torch.Generator().manual_seed(1))
    assert centroids.shape == (4, 3, 16) and torch.equal(sizes, torch.ones(4, 3))
    keys = torch.linalg.qr(torch.randn(16, 5, generator=g))[0].T
    weights = expert_weights(centroids, sizes, keys, matching, 0.05)
    assert weights.shape == (4, 5)
    torch.testing.assert_close(weights.sum(1), torch.ones(4), atol=1e-6, rtol=0)
    if matching == "hungarian":
        assert ((weights > 0).sum(1) == 3).all()
