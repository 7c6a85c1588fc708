"""Adapter, losses, aggregation and the proximal term against hand computations."""

import math

import pytest
import torch
import torch.nn.functional as F

from fedclip.adapters import AttentionAdapter, build_adapter, count_parameters, get_params
from fedclip.algorithms import get_algorithm
from fedclip.config import RunConfig
from fedclip.errors import ConfigError
from fedclip.losses import class_ce_loss, clip_loss, proximal_term


def test_adapter_shape_and_parameter_count():
    adapter = AttentionAdapter(512)
    assert count_parameters(adapter) == 525_312 == 2 * (512 * 512 + 512)
    x = torch.randn(5, 512)
    y = adapter(x)
    assert y.shape == (5, 512)
    weights = adapter.attention(x)
    torch.testing.assert_close(weights.sum(dim=1), torch.ones(5))  # a softmax over features
    torch.testing.assert_close(y, weights * x)


def test_adapter_init_is_seeded_and_leaves_global_rng_alone():
    state = torch.random.get_rng_state()
    a, b, c = build_adapter(8, seed=1), build_adapter(8, seed=1), build_adapter(8, seed=2)
    assert torch.equal(torch.random.get_rng_state(), state)
    assert all(torch.equal(a.state_dict()[k], b.state_dict()[k]) for k in a.state_dict())
    key = "attention.0.weight"
    assert not torch.equal(a.state_dict()[key], c.state_dict()[key])


def test_clip_loss_matches_hand_computation():
    img = F.normalize(torch.tensor([[1.0, 0.0], [0.6, 0.8]]), dim=-1)
    txt = F.normalize(torch.tensor([[1.0, 0.0], [0.0, 1.0]]), dim=-1)
    s = 10.0
    sim = [[1.0, 0.0], [0.6, 0.8]]  # img_i . txt_j
    def ce(row, target):
        return -(s * row[target] - math.log(sum(math.exp(s * v) for v in row)))
    per_image = (ce(sim[0], 0) + ce(sim[1], 1)) / 2
    cols = [[sim[0][0], sim[1][0]], [sim[0][1], sim[1][1]]]
    per_text = (ce(cols[0], 0) + ce(cols[1], 1)) / 2
    assert clip_loss(img, txt, s).item() == pytest.approx((per_image + per_text) / 2, rel=1e-5)


def test_class_ce_loss_matches_cross_entropy_over_all_prompts():
    img = F.normalize(torch.randn(4, 3), dim=-1)
    txt = F.normalize(torch.randn(5, 3), dim=-1)
    y = torch.tensor([0, 4, 2, 2])
    expected = F.cross_entropy(100 * img @ txt.T, y)
    torch.testing.assert_close(class_ce_loss(img, txt, y, 100.0), expected)


@pytest.mark.parametrize("mode,expected", [("weighted", 0.25 * 1 + 0.75 * 5), ("uniform", 3.0),
                                           ("median", 3.0), ("trimmed-mean", 3.0)])
def test_aggregation_against_hand_computation(mode, expected):
    from fedclip.algorithms.base import ClientUpdate

    algo = get_algorithm(RunConfig.build(aggregation=mode))
    updates = [ClientUpdate({"w": torch.full((2,), v)}, {}, n, 0.0, weight=float(n))
               for v, n in ((1.0, 10), (5.0, 30))]
    out, state = algo.server.aggregate({"w": torch.zeros(2)}, updates, {})
    torch.testing.assert_close(out["w"], torch.full((2,), expected))
    assert state == {}


def test_robust_aggregation_bounds_one_scaled_up_client():
    """One client of five sends its adapter x1e6: the mean follows it, the median and the
    trimmed mean stay within the honest clients' range (the stated bound)."""
    from fedclip.aggregation import combine

    gen = torch.Generator().manual_seed(0)
    honest = [{"w": torch.randn(50, generator=gen)} for _ in range(4)]
    attacker = {"w": honest[0]["w"] * 1e6}
    low = torch.stack([h["w"] for h in honest]).min(0).values
    high = torch.stack([h["w"] for h in honest]).max(0).values
    weights = [1.0] * 5
    mean = combine([*honest, attacker], weights, "uniform")["w"]
    assert (mean - honest[0]["w"]).abs().max() > 1e4
    for mode in ("median", "trimmed-mean"):
        robust = combine([*honest, attacker], weights, mode, trim=0.2)["w"]
        assert ((robust >= low - 1e-6) & (robust <= high + 1e-6)).all(), mode
    with pytest.raises(ValueError, match="weights"):
        combine(honest[:2], [float("inf"), 1.0], "weighted")
    with pytest.raises(ValueError, match="weights"):
        combine(honest[:2], [-5.0, 1.0], "weighted")


def test_proximal_term_against_hand_computation():
    adapter = build_adapter(2, seed=0)
    params = dict(adapter.named_parameters())
    glob = {k: torch.zeros_like(v) for k, v in get_params(adapter).items()}
    squared = sum((p.detach() ** 2).sum().item() for p in adapter.parameters())
    assert proximal_term(params, glob, mu=0.3).item() == pytest.approx(0.5 * 0.3 * squared,
                                                                       rel=1e-5)
    same = get_params(adapter)
    assert proximal_term(params, same, mu=0.3).item() == 0.0
    # only the parameters both name count (a reference may hold more, a module other ones)
    first = next(iter(params))
    part = proximal_term(params, {first: glob[first], "other": torch.ones(3)}, mu=0.3)
    assert part.item() == pytest.approx(0.5 * 0.3 * (params[first].detach() ** 2).sum().item(),
                                        rel=1e-5)
    assert proximal_term(params, {"other": torch.ones(3)}, mu=0.3).item() == 0.0


def test_unknown_algorithm_and_bad_config_are_clear():
    with pytest.raises(ConfigError, match="unknown algorithm 'fedfoo'.*fedclip"):
        get_algorithm(RunConfig.build(algorithm="fedfoo"))
    with pytest.raises(ConfigError, match="lr"):
        RunConfig.build(lr=-1)
    with pytest.raises(ConfigError, match="not_a_key"):
        RunConfig.build(not_a_key=1)
    with pytest.raises(ConfigError, match="fractions"):
        RunConfig.build(train_fraction=0.8, val_fraction=0.2, test_fraction=0.2)


def test_client_weights_are_sizes_capped_at_a_multiple_of_the_median():
    """The one rule every runtime weighs clients by: train size, at most max_weight_ratio x
    the median size (by hand: sizes 10, 20, 30, 10^9 have median 25, so the cap is 50)."""
    from fedclip.core.client import client_weights
    from fedclip.errors import ConfigError

    sizes = {"a": 10, "b": 30, "c": 20, "d": 10**9}
    assert client_weights(sizes, RunConfig.build()) == {"a": 10.0, "b": 30.0, "c": 20.0,
                                                        "d": 50.0}
    assert client_weights(sizes, RunConfig.build(max_weight_ratio=0.0))["d"] == 1e9
    assert set(client_weights(sizes, RunConfig.build(aggregation="uniform")).values()) == {1.0}
    with pytest.raises(ConfigError, match="max_weight_ratio"):
        RunConfig.build(max_weight_ratio=0.5)
