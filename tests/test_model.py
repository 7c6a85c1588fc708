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


def _clients(d: int = 16, classes: int = 4, sizes: tuple[int, ...] = (1, 2, 3, 5, 40)):
    from fedclip.core.client import Split

    gen = torch.Generator().manual_seed(0)
    text = F.normalize(torch.randn(classes, d, generator=gen), dim=-1)
    splits = [Split(torch.randn(n, d, generator=gen) * 3,
                    torch.randint(0, classes, (n,), generator=gen)) for n in sizes]
    return text, splits


def test_clients_share_one_module_and_train_as_with_a_fresh_one(monkeypatch):
    """A client trains in the module a previous client (or an evaluation) used, with its own
    parameters loaded: the same bits as in a module built for it alone, one build for all.
    A module with an active dropout is built per use (its masks follow the global
    generator, whose stream a build's random initialisation advances)."""
    from fedclip.core.client import evaluate, train_local

    text, splits = _clients()
    cfg = RunConfig.build(loss="ce", batch_size=4, local_epochs=2, lr=1e-2)
    start = get_params(build_adapter(16, seed=1))
    other = get_params(build_adapter(16, seed=2))

    def train(algorithm, params, split):
        return train_local(algorithm, params, split, text, 20.0,
                           config=algorithm.round_config(1), seed=7)

    alone = train(get_algorithm(cfg).client, start, splits[4])
    shared = get_algorithm(cfg)
    builds = []
    original = type(shared).build_module
    monkeypatch.setattr(type(shared), "build_module",
                        lambda self, dim: builds.append(dim) or original(self, dim))
    train(shared.client, other, splits[3])  # another client first, then an evaluation
    evaluate(shared.client, other, splits[2], text, 20.0)
    after = train(shared.client, start, splits[4])
    assert all(torch.equal(alone.params[k], after.params[k]) for k in alone.params)
    assert alone.loss == after.loss and alone.steps == after.steps == 20
    assert builds == [16]  # one module for two clients and an evaluation

    class WithDropout(torch.nn.Module):
        def __init__(self, dim: int) -> None:
            super().__init__()
            self.inner, self.drop = AttentionAdapter(dim), torch.nn.Dropout(0.1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.drop(self.inner(x))

    monkeypatch.setattr(type(shared), "build_module", lambda self, dim: (
        builds.append(dim) or WithDropout(dim)))
    builds.clear()
    dropped = get_algorithm(cfg)
    wrapped = {f"inner.{k}": v for k, v in start.items()}
    train(dropped.client, wrapped, splits[4])
    train(dropped.client, wrapped, splits[3])
    assert builds == [16, 16]


def test_a_clients_update_is_its_own_after_the_next_client_trains(monkeypatch):
    """The shared module hands its trained tensors out instead of copying them: an update
    keeps its values while later clients train and score in the module, a tied parameter
    comes out under both names with the same values (not aliased), and frozen tensors stay in
    the module."""
    from fedclip.core.client import evaluate, train_local

    text, splits = _clients()
    cfg = RunConfig.build(loss="ce", batch_size=4, lr=1e-2)

    class Tied(torch.nn.Module):
        def __init__(self, dim: int) -> None:
            super().__init__()
            self.a, self.b = torch.nn.Linear(dim, dim), torch.nn.Linear(dim, dim)
            self.b.weight = self.a.weight  # one parameter under two names
            self.frozen = torch.nn.Parameter(torch.ones(dim), requires_grad=False)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.b(torch.tanh(self.a(x))) * self.frozen

    shared = get_algorithm(cfg)
    monkeypatch.setattr(type(shared), "build_module", lambda self, dim: Tied(dim))
    start = get_params(Tied(16))

    def train(split):
        return train_local(shared.client, start, split, text, 20.0,
                           config=shared.round_config(1), seed=7)

    first = train(splits[4])
    kept = {k: v.clone() for k, v in first.params.items()}
    assert torch.equal(first.params["a.weight"], first.params["b.weight"])
    assert first.params["a.weight"].data_ptr() != first.params["b.weight"].data_ptr()
    assert not torch.equal(first.params["a.weight"], start["a.weight"])  # it trained
    assert torch.equal(first.params["frozen"], start["frozen"])
    again = train(splits[4])
    assert all(torch.equal(again.params[k], kept[k]) for k in kept)  # the same bits again
    other = train(splits[3])
    evaluate(shared.client, start, splits[2], text, 20.0)
    assert not torch.equal(other.params["a.weight"], kept["a.weight"])
    assert all(torch.equal(first.params[k], kept[k]) and torch.equal(again.params[k], kept[k])
               for k in kept)  # untouched by the client and the scoring after them


def test_evaluate_many_gives_what_each_split_gives_alone():
    """Splits of 1 to 40 inputs (a matrix product's rounding can depend on its row count),
    the global parameters shared by several, a client's own parameters, no parameters
    (zero-shot), an empty split and class masks: the same accuracy and loss, bit for bit, as
    each split scored on its own in a module of its own."""
    from fedclip.core.client import Scoring, Split, evaluate_many, evaluate_module, load_module

    algorithm = get_algorithm(RunConfig.build()).client
    text, splits = _clients()
    shared = get_params(build_adapter(16, seed=1))
    own = get_params(build_adapter(16, seed=2))
    mask = torch.tensor([True, False, True, True])
    empty = Split(torch.zeros(0, 16), torch.zeros(0, dtype=torch.long))
    items = [Scoring(shared, s) for s in splits] + [
        Scoring(own, splits[1], mask), Scoring(shared, splits[0], mask),
        Scoring(None, splits[4]), Scoring(None, splits[0], mask), Scoring(shared, empty)]
    many = evaluate_many(algorithm, items, text, 20.0)
    assert len(many) == len(items)
    for item, got in zip(items, many, strict=True):
        module = load_module(algorithm, item.params, 16)
        alone = evaluate_module(algorithm, module, item.split, text, 20.0, item.class_mask)
        assert got.num_examples == alone.num_examples == len(item.split)
        for a, b in ((got.accuracy, alone.accuracy), (got.loss, alone.loss)):
            assert a == b or (math.isnan(a) and math.isnan(b))
    assert math.isnan(many[-1].accuracy) and many[-1].num_examples == 0
    assert len({r.accuracy for r in many[:5]}) > 1  # the splits score differently


def test_the_weighted_mean_is_pythons_sum_bit_for_bit():
    """``combine`` adds the weighted terms into one buffer: the same bits as ``sum()`` of
    them, signed zeros included (sum starts from 0, and 0 + -0.0 is 0.0)."""
    from fedclip.aggregation import combine

    gen = torch.Generator().manual_seed(0)
    for n in (1, 2, 5):
        params = [{"w": torch.randn(64, 8, generator=gen), "b": torch.randn(8, generator=gen)}
                  for _ in range(n)]
        params[0]["b"][:3] = torch.tensor([-0.0, 0.0, -1e-45])
        weights = [float(w) for w in torch.rand(n, generator=gen) + 0.1]
        got = combine(params, weights, "weighted")
        for k in ("w", "b"):
            want = sum(p[k] * (x / sum(weights)) for p, x in zip(params, weights, strict=True))
            assert torch.equal(got[k], want) and torch.equal(got[k].signbit(), want.signbit())
