"""Differential privacy: the clipping and noise the mechanism claims, the accountant's epsilon
against Flower's RdpAccountant, a budget that stops the run, and both runtimes agreeing."""

from __future__ import annotations

import pytest
import torch
from flwr.supercore import privacy_accounting as pa
from flwr.supercore.privacy_accounting.rdp_accountant import RdpAccountant

from fedclip import privacy
from fedclip.algorithms import get_algorithm
from fedclip.config import RunConfig
from fedclip.core.server import server_rules
from fedclip.errors import ConfigError
from fedclip.flower.client_app import build_client_app
from tests.flower_grid import LocalGrid
from tests.test_federation import (
    adapter,
    flower_config,
    in_process,
    max_diff,
    own_sites,
    pacs_like,  # noqa: F401  (a fixture)
    server_main,
)

DP = {"dp": "server", "aggregation": "uniform", "dp_clipping_norm": 0.05,
      "dp_noise_multiplier": 1.0}


def _accountant_epsilons(z: float, rounds: int, sampled: int, population: int,
                         delta: float = 1e-5) -> list[float]:
    """Flower's RdpAccountant, one release composed per round, read after each."""
    accountant = RdpAccountant(pa.PrivacyConfig(
        target_delta=delta, population_size=population,
        neighboring_relation=pa.NeighboringRelation.ADD_OR_REMOVE_ONE,
        sampling_method=pa.SamplingMethod.NO_AMPLIFICATION))
    out = []
    for _ in range(rounds):
        accountant.compose(pa.GaussianPrivacyEvent(z, sampled, population))
        out.append(accountant.get_privacy_spent().epsilon)
    return out


def test_the_noise_has_the_scale_the_mechanism_claims():
    current = {"w": torch.zeros(400, 500)}
    clip, z, sampled = 0.5, 1.2, 3
    out = privacy.noisy_mean(current, [current] * sampled, sampled, clip, z,
                             privacy.noise_generator(7, 1))
    noise = out["w"].flatten().double()
    expected = z * clip / sampled  # Flower's compute_stdv: z C / n
    assert abs(noise.std().item() / expected - 1) < 0.01  # 200k draws: std error 0.16 %
    assert abs(noise.mean().item()) < 4 * expected / noise.numel() ** 0.5
    again = privacy.noisy_mean(current, [current] * sampled, sampled, clip, z,
                               privacy.noise_generator(7, 1))
    assert torch.equal(out["w"], again["w"])  # seeded: both runtimes draw the same
    other = privacy.noisy_mean(current, [current] * sampled, sampled, clip, z,
                               privacy.noise_generator(7, 2))
    assert not torch.equal(out["w"], other["w"])


def test_clipping_bounds_each_update_and_the_mean_divides_by_the_clients_sampled():
    current = {"w": torch.ones(10)}
    far = {"w": current["w"] + 10.0}
    clipped = privacy.clip_update(far, current, 0.5)
    assert privacy.update_norm(clipped, current) == pytest.approx(0.5, rel=1e-6)
    near = {"w": current["w"] + 1e-3}
    assert privacy.clip_update(near, current, 0.5) is near  # inside the bound: untouched
    # 3 sampled, 2 answered: a missing client adds 0, the denominator stays 3
    out = privacy.noisy_mean(current, [clipped, clipped], 3, 0.5, 1e-12,
                             privacy.noise_generator(0, 1))
    moved = privacy.update_norm(out, current)
    assert moved == pytest.approx(2 * 0.5 / 3, rel=1e-5)


def test_epsilon_matches_flowers_rdp_accountant():
    expected = _accountant_epsilons(1.3, 12, 3, 3)
    got = [privacy.epsilon_after(r, 1.3, 3, 3, 1e-5) for r in range(1, 13)]
    assert got == pytest.approx(expected, rel=1e-9)
    assert privacy.epsilon_after(0, 1.3, 3, 3, 1e-5) == 0.0


def test_a_target_epsilon_calibrates_the_noise_to_spend_it():
    plan = privacy.plan("server", 0.1, 0.0, 5.0, 1e-5, 10, 3, 3)
    assert 4.95 <= plan.epsilon(10) <= 5.0
    assert plan.rounds == 10 and not plan.stopped_by_budget


def test_a_budget_stops_the_run_at_the_round_the_accountant_says(tiny_arch, pacs_like,  # noqa: F811
                                                                 tmp_path):
    budget = 10.0
    epsilons = _accountant_epsilons(1.0, 8, 3, 3)
    allowed = max(r for r in range(1, 9) if epsilons[r - 1] <= budget)
    assert allowed == 3  # z = 1, 3 clients, delta 1e-5: 9.01 after 3 rounds, 10.7 after 4
    result = in_process(tiny_arch, pacs_like, tmp_path, rounds=8, dp_epsilon=budget, **DP)
    assert result["rounds"] == allowed
    assert [r.get("epsilon") for r in result["history"]] == pytest.approx(
        [None, *epsilons[:allowed]])
    assert result["privacy"]["epsilon"] == pytest.approx(epsilons[allowed - 1])
    assert result["privacy"]["stopped_by_budget"] is True
    assert "val_accuracy" in result["history"][-1]  # the last round run is evaluated
    from fedclip.core.records import RunResult
    from fedclip.report import privacy_note

    note = privacy_note([RunResult.from_json(result)]) or ""  # the line the CLI prints
    assert f"epsilon {epsilons[allowed - 1]:.3g} spent" in note
    assert f"stopped it after round {allowed}" in note


@pytest.mark.parametrize("mode", ["server", "client"])
def test_flower_equals_in_process_under_dp(tiny_arch, pacs_like, tmp_path, mode):  # noqa: F811
    nodes = own_sites(pacs_like, tmp_path)
    dp = {**DP, "dp": mode}
    run_config = flower_config(tiny_arch, tmp_path, rounds=2,
                               **{k.replace("_", "-"): v for k, v in dp.items()})
    flower = server_main(LocalGrid(build_client_app(), nodes, run_config), run_config)
    local = in_process(tiny_arch, pacs_like, tmp_path, rounds=2, **dp)
    assert max_diff(adapter(tmp_path / "flower/sketch/adapter-last.safetensors"),
                    adapter(tmp_path / "local/sketch/adapter-last.safetensors")) < 1e-5
    assert [r.get("epsilon") for r in flower["history"]] == \
        [r.get("epsilon") for r in local["history"]]
    assert flower["privacy"] == local["privacy"]
    # the noise is what moved it: without DP the same run lands elsewhere
    in_process(tiny_arch, pacs_like, tmp_path, rounds=2, name="plain",
               aggregation="uniform")
    assert max_diff(adapter(tmp_path / "plain/sketch/adapter-last.safetensors"),
                    adapter(tmp_path / "local/sketch/adapter-last.safetensors")) > 1e-3


def test_secagg_with_client_side_dp_equals_in_process(tiny_arch, pacs_like, tmp_path):  # noqa: F811
    from flwr.app import Context, RecordDict

    from fedclip.flower import secagg

    nodes = own_sites(pacs_like, tmp_path)
    dp = {**DP, "dp": "client"}
    run_config = flower_config(tiny_arch, tmp_path, rounds=2,
                               **{k.replace("_", "-"): v for k, v in dp.items()})
    grid = LocalGrid(secagg.build_client_app(), nodes, run_config)
    context = Context(run_id=1, node_id=0, node_config={}, state=RecordDict(),
                      run_config=run_config)
    result = secagg.run(grid, context, run_config)
    secure = adapter(tmp_path / "flower/sketch/adapter-last.safetensors")
    local = in_process(tiny_arch, pacs_like, tmp_path, rounds=2, **dp)
    # SecAgg+ quantizes the clipped updates (2^22 levels): about 1e-4 apart
    local_adapter = adapter(tmp_path / "local/sketch/adapter-last.safetensors")
    assert max_diff(secure, local_adapter) < 1e-3
    assert result.to_json()["privacy"]["epsilon"] == local["privacy"]["epsilon"]


@pytest.mark.parametrize(("settings", "match"), [
    ({"dp": "server", "dp_clipping_norm": 0.1, "dp_noise_multiplier": 1.0},
     "set aggregation=uniform"),
    ({"dp": "server", "aggregation": "uniform", "dp_noise_multiplier": 1.0},
     "dp_clipping_norm > 0"),
    ({"dp": "server", "aggregation": "uniform", "dp_clipping_norm": 0.1},
     "dp_noise_multiplier > 0 or a dp_epsilon"),
])
def test_incomplete_dp_settings_are_refused_in_one_line(settings, match):
    with pytest.raises(ConfigError, match=match):
        RunConfig.build(**settings)


def test_dp_that_cannot_hold_is_refused_before_a_round():
    scaffold = RunConfig.build(algorithm="scaffold", **DP)
    with pytest.raises(ConfigError, match="extras, which would leak"):
        server_rules(scaffold, get_algorithm(scaffold), 3)
    tight = RunConfig.build(**{**DP, "dp_epsilon": 1.0})
    with pytest.raises(ConfigError, match="one round .* already spends"):
        server_rules(tight, get_algorithm(tight), 3)


def test_secagg_refuses_server_side_clipping():
    from fedclip.config import FlowerSettings
    from fedclip.flower.secagg import refusal

    cfg = RunConfig.build(**DP)
    assert "use dp=client" in (refusal(get_algorithm(cfg), FlowerSettings()) or "")
