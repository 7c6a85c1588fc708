"""One client's influence: the trust preset, the selection rule, the bound one client has on
the global model, the tolerance of each rule, and the warnings for echoed or frozen models."""

from __future__ import annotations

import math

import pytest
import torch

from fedclip.config import UNTRUSTED, RunConfig
from fedclip.core.influence import (
    influence_bound,
    stalled,
    suspicious,
    tolerance_note,
    tolerated,
)
from fedclip.core.server import selection_rule
from fedclip.errors import ConfigError
from tests.test_federation import in_process, pacs_like  # noqa: F401  (a fixture)


# --- trust and selection settings ------------------------------------------------------------
def test_untrusted_replaces_the_reference_defaults_and_keeps_what_was_set():
    ref = RunConfig.build()
    assert (ref.trust, ref.aggregation, ref.norm_factor, ref.max_weight_ratio,
            ref.selection) == ("reference", "weighted", 10.0, 2.0, "auto")
    cfg = RunConfig.build(trust="untrusted")
    assert {k: getattr(cfg, k) for k in UNTRUSTED} == UNTRUSTED
    assert (cfg.aggregation, cfg.norm_factor, cfg.max_weight_ratio, cfg.selection) == (
        "median", 3.0, 1.0, "median")
    kept = RunConfig.build(trust="untrusted", aggregation="krum", byzantine=1,
                           norm_factor=5.0)
    assert (kept.aggregation, kept.norm_factor, kept.selection) == ("krum", 5.0, "median")
    dp = RunConfig.build(trust="untrusted", dp="server", dp_clipping_norm=0.1,
                         dp_noise_multiplier=1.0)
    assert dp.aggregation == "uniform"  # DP's clipping bounds each client; the median cannot
    assert cfg.replace(seed=3).aggregation == "median"  # a validated copy stays untrusted
    with pytest.raises(ConfigError, match="trust"):
        RunConfig.build(trust="paranoid")


def test_untrusted_on_flower_where_the_app_config_lists_every_default():
    """The Flower app config holds every default explicitly (aggregation = "weighted", ...);
    trust=untrusted still replaces them."""
    import tomllib
    from pathlib import Path

    from fedclip.flower.settings import run_config_to_cfg

    app = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())
    flat = {k: v for k, v in app["tool"]["flwr"]["app"]["config"].items()
            if not isinstance(v, dict)}
    reference, _ = run_config_to_cfg(flat)
    assert reference.aggregation == "weighted" and selection_rule(reference) == "mean"
    cfg, _ = run_config_to_cfg({**flat, "trust": "untrusted"})
    assert (cfg.aggregation, cfg.norm_factor, cfg.max_weight_ratio, cfg.selection) == (
        "median", 3.0, 1.0, "median")


def test_selection_is_an_option():
    assert selection_rule(RunConfig.build()) == "mean"
    assert selection_rule(RunConfig.build(aggregation="median")) == "median"  # auto
    assert selection_rule(RunConfig.build(selection="median")) == "median"
    assert selection_rule(RunConfig.build(aggregation="median", selection="mean")) == "mean"


def test_a_run_selects_by_the_rule_it_is_given(tiny_arch, pacs_like, tmp_path):  # noqa: F811
    result = in_process(tiny_arch, pacs_like, tmp_path, rounds=1, selection="median")
    assert result["selection"] == "median of the clients' val accuracies"
    untrusted = in_process(tiny_arch, pacs_like, tmp_path, rounds=1, name="u",
                           trust="untrusted")
    assert untrusted["selection"] == "median of the clients' val accuracies"


# --- tolerance -------------------------------------------------------------------------------
@pytest.mark.parametrize(("settings", "clients", "expected"), [
    ({}, 3, 0),  # weighted mean: none
    ({"aggregation": "uniform"}, 10, 0),
    ({"aggregation": "median"}, 2, 0),  # the median of two is their mean
    ({"aggregation": "median"}, 3, 1),
    ({"aggregation": "median"}, 6, 2),
    ({"aggregation": "median", "clients_per_round": 4}, 10, 1),  # per round: 4 updates
    ({"aggregation": "trimmed-mean"}, 3, 0),  # 0.2 x 3 cuts none
    ({"aggregation": "trimmed-mean"}, 6, 1),
    ({"aggregation": "trimmed-mean", "trim_fraction": 0.4}, 10, 4),
    ({"aggregation": "krum", "byzantine": 1}, 5, 1),
    ({"aggregation": "krum", "byzantine": 1}, 4, 0),  # 2f+3 not met
    ({"aggregation": "multikrum"}, 9, 0),  # f = 0 assumed
    ({"aggregation": "bulyan", "byzantine": 1}, 7, 1),
    ({"aggregation": "bulyan", "byzantine": 1}, 6, 0),
])
def test_tolerated_counts_the_bad_updates_each_rule_survives(settings, clients, expected):
    assert tolerated(RunConfig.build(**settings), clients) == expected


def test_tolerance_note_says_both_rules():
    note = tolerance_note(RunConfig.build(trust="untrusted"), 3)
    assert note == ("median tolerates 1 bad update of 3 per round; the best round by the "
                    "median val accuracy tolerates 1 lying client of 3")
    note = tolerance_note(RunConfig.build(aggregation="trimmed-mean"), 3)
    assert "trim 0.2: 0 cut per end) tolerates 0 bad updates of 3" in note
    assert "median val accuracy tolerates 1 lying client of 3" in note
    assert "mean val accuracy tolerates 0" in tolerance_note(RunConfig.build(), 3)


# --- the bound on one client's influence -----------------------------------------------------
def test_influence_bound_under_the_defaults_and_the_untrusted_setting():
    """Sizes in whole batches of 32, so that steps are proportional to sizes: 320 -> 10."""
    equal = [320, 320, 320]
    # weighted, equal sizes: the distance rule's factor (10) x an honest client's reach
    assert influence_bound(RunConfig.build(), equal) == pytest.approx(10.0)
    # a client declaring twice the median (the cap): twice the weight, twice the steps,
    # still under max(10 x median distance, its own bound): 2 x 10
    assert influence_bound(RunConfig.build(), [320, 320, 640]) == pytest.approx(20.0)
    # declaring more buys no weight over the cap, but its own distance limit grows with the
    # declared steps (200 here: max(10 x 10, 200)): 2 x 20, growing with the declaration
    assert influence_bound(RunConfig.build(), [320, 320, 6400]) == pytest.approx(40.0)
    # uniform: the weight is 1 whatever the declaration
    assert influence_bound(RunConfig.build(aggregation="uniform"), [320, 320, 640]) == \
        pytest.approx(10.0)
    # two updates: no median limit, only the ceiling: 10 x its own (doubled) bound x 2
    assert influence_bound(RunConfig.build(), [320, 640]) == pytest.approx(
        640 * 10 * 20 / (480 * 15))
    # the distance rule off: nothing bounds it
    assert influence_bound(RunConfig.build(norm_factor=0.0), equal) == math.inf
    # untrusted: the median keeps every coordinate within the honest values
    assert influence_bound(RunConfig.build(trust="untrusted"), [320, 320, 6400]) == 1.0
    # a trimmed mean that cuts none (3 clients) is a mean; cutting one per end it holds
    assert influence_bound(RunConfig.build(aggregation="trimmed-mean"), equal) == \
        pytest.approx(10.0)
    assert influence_bound(RunConfig.build(aggregation="trimmed-mean"), [320] * 6) == 1.0
    with pytest.raises(ValueError, match="sizes"):
        influence_bound(RunConfig.build(), [])


def test_influence_bound_under_dp_is_the_clip_over_an_honest_reach():
    cfg = RunConfig.build(dp="server", aggregation="uniform", dp_clipping_norm=0.05,
                          dp_noise_multiplier=1.0, lr=1e-4)
    sizes = [320, 320, 320]
    # an honest client: 10 steps x 1e-4 x sqrt(10000) = 0.1 > C: clipped like the attacker
    assert influence_bound(cfg, sizes, shared_params=10_000) == pytest.approx(1.0)
    # 100 parameters: honest reach 10 x 1e-4 x 10 = 0.01 < C = 0.05: five times
    assert influence_bound(cfg, sizes, shared_params=100) == pytest.approx(5.0)
    assert influence_bound(cfg, sizes) == 1.0  # no P: the honest client taken at the clip


# --- echoes and a frozen model ---------------------------------------------------------------
def test_suspicious_names_echoes_and_identical_updates():
    gen = torch.Generator().manual_seed(0)
    current = {"w": torch.randn(50, generator=gen), "personal": torch.zeros(3)}
    honest = {c: {"w": current["w"] + 0.01 * torch.randn(50, generator=gen)} for c in "abc"}
    assert suspicious(current, honest) == []
    echo = {"w": current["w"].clone()}
    warnings = suspicious(current, {**honest, "x": echo, "y": {"w": current["w"].clone()}})
    assert warnings == ["2 accepted updates did not move the global parameters (x, y): "
                        "clients that did not train, or that echo the global model"]
    copied = {"w": honest["a"]["w"].clone()}
    warnings = suspicious(current, {**honest, "z": copied})
    assert warnings == ["clients a, z sent identical updates: colluding, or one update "
                        "replayed"]
    assert suspicious(current, {}) == []


def test_an_honest_round_hashes_no_update(monkeypatch):
    """Identical updates have equal distances: updates at distinct distances are never hashed
    (the check costs the server nothing beyond the distances its distance rule computes)."""
    from fedclip.core import influence

    gen = torch.Generator().manual_seed(1)
    current = {"w": torch.randn(50, generator=gen)}
    honest = {c: {"w": current["w"] + 0.01 * torch.randn(50, generator=gen)} for c in "abcd"}
    hashed = []
    real = influence._digest
    monkeypatch.setattr(influence, "_digest", lambda p: hashed.append(1) or real(p))
    assert suspicious(current, honest) == [] and hashed == []
    copied = {**honest, "z": {"w": honest["b"]["w"].clone()}}
    assert "b, z sent identical" in suspicious(current, copied)[0] and len(hashed) == 2


def test_stalled_when_the_model_has_not_moved_for_k_trained_rounds():
    assert stalled([0.3, 0.0, 0.0, 0.0], k=3)
    assert not stalled([0.3, 0.2, 0.0, 0.0], k=3)
    assert not stalled([0.0, 0.0], k=3)  # too few rounds to say
    assert not stalled([0.3, 0.0, None, 0.0], k=3)  # a round without updates is skipped
    assert stalled([0.0, None, 0.0, 1e-12], k=3)
    with pytest.raises(ValueError, match="k >= 1"):
        stalled([0.0], k=0)


def test_help_says_what_each_rule_tolerates_and_trust_is_a_flag(capsys, monkeypatch):
    from fedclip.cli import _settings, main

    monkeypatch.setenv("COLUMNS", "400")
    for command in ("run", "compare"):
        assert main([command, "--help"]) == 0
        words = " ".join(capsys.readouterr().out.split())
        assert "--trust [reference|untrusted]" in words
        assert "median (n-1)//2; trimmed-mean int(trim_fraction x n)" in words
    assert _settings(None, [], trust="untrusted").aggregation == "median"
