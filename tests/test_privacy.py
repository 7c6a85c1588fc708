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
                             privacy.secret_generator())
    noise = out["w"].flatten().double()
    expected = z * clip / sampled  # Flower's compute_stdv: z C / n
    assert abs(noise.std().item() / expected - 1) < 0.01  # 200k draws: std error 0.16 %
    assert abs(noise.mean().item()) < 4 * expected / noise.numel() ** 0.5
    again = privacy.noisy_mean(current, [current] * sampled, sampled, clip, z,
                               privacy.secret_generator())
    assert not torch.equal(out["w"], again["w"])  # a fresh secret each time
    injected = [privacy.noisy_mean(current, [current] * sampled, sampled, clip, z,
                                   torch.Generator().manual_seed(7)) for _ in range(2)]
    assert torch.equal(injected[0]["w"], injected[1]["w"])  # what a test injects, it gets


def test_clipping_bounds_each_update_and_the_mean_divides_by_the_clients_sampled():
    current = {"w": torch.ones(10)}
    far = {"w": current["w"] + 10.0}
    clipped = privacy.clip_update(far, current, 0.5)
    assert privacy.update_norm(clipped, current) == pytest.approx(0.5, rel=1e-6)
    near = {"w": current["w"] + 1e-3}
    assert privacy.clip_update(near, current, 0.5) is near  # inside the bound: untouched
    # 3 sampled, 2 answered: a missing client adds 0, the denominator stays 3
    out = privacy.noisy_mean(current, [clipped, clipped], 3, 0.5, 1e-12,
                             privacy.secret_generator())
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


def inject_noise(monkeypatch, seed: int = 7) -> None:
    """Every runtime's default noise source replaced by a generator seeded with ``seed``,
    fresh at each call (one per round): the runtimes then draw the same noise each round,
    so their parity can be compared with the noise on."""
    monkeypatch.setattr(privacy, "secret_generator",
                        lambda device="cpu": torch.Generator(device=device).manual_seed(seed))


def old_noise_generator(seed: int, server_round: int) -> torch.Generator:
    """The noise source of the previous versions: seeded by (run seed, round), both written
    to config.json and results.json and sent to every node."""
    import numpy as np

    state = np.random.SeedSequence([seed, server_round, 0xD9]).generate_state(2, np.uint64)
    return torch.Generator().manual_seed(int(state[0] >> np.uint64(1)))


def test_nothing_written_or_sent_regenerates_the_dp_noise(tiny_arch, pacs_like,  # noqa: F811
                                                          tmp_path):
    """The noise of a run cannot be rebuilt from its seed, round, config.json or results.json:
    two runs that write the same config and are sent the same run config release different
    adapters, and subtracting the noise regenerated the old way from (seed, round) does not
    give back the noise-free aggregate."""
    import json

    first = in_process(tiny_arch, pacs_like, tmp_path, rounds=1, name="a", **DP)
    second = in_process(tiny_arch, pacs_like, tmp_path, rounds=1, name="b", **DP)
    assert json.loads((tmp_path / "a/config.json").read_text()) == \
        json.loads((tmp_path / "b/config.json").read_text())
    assert first["privacy"] == second["privacy"]
    a = adapter(tmp_path / "a/sketch/adapter-last.safetensors")
    b = adapter(tmp_path / "b/sketch/adapter-last.safetensors")
    std = first["privacy"]["noise_std"]
    assert max_diff(a, b) > 2 * std  # different noise (independent draws differ by ~4 std)
    # the mechanism itself: the same round aggregated with the noise on and off
    from fedclip.core.client import ClientUpdate
    from fedclip.core.server import aggregate_round

    cfg = RunConfig.build(**DP, seed=0)
    algo = get_algorithm(cfg)
    rules = server_rules(cfg, algo, 3)
    current = {"w": torch.zeros(2000)}
    gen = torch.Generator().manual_seed(1)
    updates = [ClientUpdate({"w": 0.01 * torch.randn(2000, generator=gen)}, {}, 10, 0.0)
               for _ in range(3)]
    plan = rules.privacy
    assert plan is not None
    clipped = [privacy.clip_update(u.params, current, plan.clipping_norm) for u in updates]
    clean = sum(c["w"] for c in clipped) / plan.sampled
    noisy = [aggregate_round(algo.server, current, updates, {}, rules, cfg.seed, 1)[0]["w"]
             for _ in range(2)]
    assert not torch.equal(noisy[0], noisy[1])
    regenerated = torch.randn(2000, generator=old_noise_generator(cfg.seed, 1)) * (
        plan.noise_multiplier * plan.clipping_norm) / plan.sampled
    recovered = noisy[0] - regenerated
    # what is left is still the full noise (~ std per coordinate), not zero
    left = (recovered - clean).std().item()
    assert left > 0.9 * plan.noise_multiplier * plan.clipping_norm / plan.sampled
    # and an injected generator is what the noise then comes from (tests' parity)
    injected = aggregate_round(algo.server, current, updates, {}, rules, cfg.seed, 1,
                               noise=old_noise_generator(cfg.seed, 1))[0]["w"]
    assert torch.allclose(injected - regenerated, clean, atol=1e-6)


@pytest.mark.parametrize("mode", ["server", "client"])
def test_flower_equals_in_process_under_dp(tiny_arch, pacs_like, tmp_path, mode,  # noqa: F811
                                           monkeypatch):
    inject_noise(monkeypatch)
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


def test_secagg_with_client_side_dp_equals_in_process(tiny_arch, pacs_like, tmp_path,  # noqa: F811
                                                      monkeypatch):
    from flwr.app import Context, RecordDict

    inject_noise(monkeypatch)
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


def test_the_results_say_what_dp_covers_next_to_the_epsilon():
    plan = privacy.plan("server", 0.1, 1.0, 0.0, 1e-5, 5, 3, 3).to_json()
    assert "accuracies" in plan["not_covered"] and "sizes" in plan["not_covered"]
    assert plan["noise"].startswith("secret") and "participation" in plan["protects"]
