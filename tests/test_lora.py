"""Federated LoRA (fedit, ffa-lora, flora): exactness of the aggregate on hand-built matrices,
FLoRA's per-client ranks, frozen backbone weights, resume, predict, DP and robust rules, and
the refusals. The tiny open_clip (``tiny_arch``) and a few 40-pixel images."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from fedclip.algorithms import get_algorithm
from fedclip.algorithms.base import Runtime
from fedclip.algorithms.lora import A_KEY, B_KEY, W_KEY
from fedclip.config import RunConfig
from fedclip.core.client import ClientUpdate, RoundConfig, Split
from fedclip.errors import ConfigError
from fedclip.inprocess.experiment import run_heldout
from fedclip.task import prepare
from tests.conftest import (
    assert_backbone_unchanged,
    assert_resumes_bit_identically,
    make_image_folder,
)

CLASSES = {"cat": 4, "dog": 4, "red_car": 4}
LORA = ["fedit", "ffa-lora", "flora"]


@pytest.fixture
def images(tmp_path):
    return make_image_folder(tmp_path / "toy", {d: CLASSES for d in
                                                ("alpha", "beta", "gamma", "delta")})


def config(root, backbone, name, **extra):  # noqa: ANN001, ANN003, ANN201
    values = {"rounds": 1, "lr": 1e-3, "personalize_epochs": 0, **extra}
    options = values.pop("options", {})
    return RunConfig.build(backbone=backbone, data_root=str(root), heldout="delta",
                           algorithm=name, options={name: options}, **values)


def algorithm(backbone: str, name: str, **options):  # noqa: ANN003, ANN201
    cfg = RunConfig.build(backbone=backbone, algorithm=name, options={name: options})
    return get_algorithm(cfg, Runtime(("a cat", "a dog"), None, 100.0, 2))


# --- exactness, by hand ------------------------------------------------------------------
def test_the_aggregate_is_exact_for_ffa_lora_and_flora_and_off_by_hand_for_fedit(tiny_arch):
    """One layer ``p``, two clients of weights 1 and 3, alpha 16. FedIT's aggregate
    ``s mean(B) mean(A)`` misses ``s mean(B A)`` by what is computed by hand below;
    FFA-LoRA's and FLoRA's equal it to 1e-6 (FLoRA with ranks 1 and 2)."""
    p = "p"  # one layer; rank 1, alpha 16: the scaling s is 16
    a1, b1 = torch.tensor([[1.0]]), torch.tensor([[1.0]])
    a2, b2 = torch.tensor([[3.0]]), torch.tensor([[2.0]])
    updates = [ClientUpdate({p + A_KEY: a1, p + B_KEY: b1}, {}, 1, 0.0, weight=1.0),
               ClientUpdate({p + A_KEY: a2, p + B_KEY: b2}, {}, 3, 0.0, weight=3.0)]
    fedit = algorithm(tiny_arch, "fedit", rank=1)
    current = {p + A_KEY: torch.zeros(1, 1), p + B_KEY: torch.zeros(1, 1)}
    new, _ = fedit.server.aggregate(current, updates, {})
    # mean(A) = (1 + 9) / 4 = 2.5, mean(B) = (1 + 6) / 4 = 1.75: s * 4.375 = 70;
    # mean(B A) = (1 + 3 * 6) / 4 = 4.75: s * 4.75 = 76; the error is s * 0.375 = 6
    assert float(new[p + A_KEY]) == 2.5 and float(new[p + B_KEY]) == 1.75
    metrics = fedit.server.round_metrics(current, new, updates)
    assert metrics["aggregation_error"] == pytest.approx(6.0, abs=1e-6)
    assert metrics["sent_params"] == 2

    # FFA-LoRA: the same B's on one frozen A (a 2 x 3 layer of rank 2)
    ffa = algorithm(tiny_arch, "ffa-lora", rank=2)
    torch.manual_seed(0)
    a = torch.randn(2, 3)
    ffa._frozen = {p + A_KEY: a}
    bs = [0.1 * torch.randn(4, 2), 0.1 * torch.randn(4, 2)]
    ups = [ClientUpdate({p + B_KEY: b}, {}, 1, 0.0, weight=w) for b, w in zip(bs, (1.0, 3.0),
                                                                               strict=True)]
    new, _ = ffa.server.aggregate({p + B_KEY: torch.zeros(4, 2)}, ups, {})
    want = (1 * (16 / 2) * bs[0] @ a + 3 * (16 / 2) * bs[1] @ a) / 4
    assert torch.allclose((16 / 2) * new[p + B_KEY] @ a, want, atol=1e-6)
    assert ffa.server.round_metrics({}, new, ups)["aggregation_error"] < 1e-6

    # FLoRA: ranks 1 and 2 stacked onto a 4 x 3 weight
    flora = algorithm(tiny_arch, "flora")
    w = 0.1 * torch.randn(4, 3)
    mine = [(torch.randn(1, 3), 0.01 * torch.randn(4, 1)),
            (torch.randn(2, 3), 0.01 * torch.randn(4, 2))]
    ups = [ClientUpdate({p + A_KEY: a_, p + B_KEY: b_}, {}, 1, 0.0, weight=wt)
           for (a_, b_), wt in zip(mine, (1.0, 3.0), strict=True)]
    new, _ = flora.server.aggregate({p + W_KEY: w}, ups, {})
    want = (1 * 16 * mine[0][1] @ mine[0][0] + 3 * 8 * mine[1][1] @ mine[1][0]) / 4
    assert torch.allclose(new[p + W_KEY] - w, want, atol=1e-6)
    assert flora.server.round_metrics({p + W_KEY: w}, new, ups)["aggregation_error"] < 1e-6


# --- FLoRA's ranks -------------------------------------------------------------------------
def test_flora_aggregates_ranks_2_4_8_and_rejects_a_rank_it_was_not_told(
        tiny_arch, images, tmp_path, monkeypatch):
    from fedclip.algorithms.lora import FloraClient

    ranks = {"alpha": 2, "beta": 4, "gamma": 8}
    cfg = config(images, tiny_arch, "flora", rounds=2,
                 options={"ranks": ",".join(f"{c}={r}" for c, r in ranks.items())})
    prep = prepare(cfg)
    result = run_heldout(cfg, prep, "delta", tmp_path / "ok").to_json()
    # per layer a client sends r (d_in + d_out); the tiny model's targets: 2 towers x
    # (c_fc 32 -> 128, c_proj 128 -> 32), so r * 2 * 2 * 160 values
    per_client = [r * 2 * 2 * 160 for r in ranks.values()]
    for record in result["history"][1:]:
        assert record["metrics"]["sent_params"] == pytest.approx(sum(per_client) / 3)
        assert record["metrics"]["aggregation_error"] < 1e-5
        assert not record.get("rejected")
    start = algorithm(tiny_arch, "flora").init_global(32)
    last = load_file(tmp_path / "ok" / "delta" / "adapter-last.safetensors")
    assert set(last) == set(start) and max((last[k] - start[k]).abs().max() for k in last) > 0

    real = FloraClient.train_client

    def liar(self, job):  # noqa: ANN001, ANN202 - beta trains rank 3, not its declared 4
        if job.name == "beta":
            monkeypatch.setattr(FloraClient, "rank_of", lambda self, c: 3, raising=False)
        try:
            return real(self, job)
        finally:
            monkeypatch.delattr(FloraClient, "rank_of", raising=False)

    monkeypatch.setattr(FloraClient, "train_client", liar)
    bad = run_heldout(cfg.replace(rounds=1), prep, "delta", tmp_path / "bad").to_json()
    rejected = bad["history"][1]["rejected"]
    assert list(rejected) == ["beta"] and "\n" not in rejected["beta"]
    assert "rank 3" in rejected["beta"] and "rank 4" in rejected["beta"]


# --- the frozen backbone, resume ------------------------------------------------------------
@pytest.mark.parametrize("name", LORA)
def test_only_adapters_move_in_a_round(tiny_arch, name):
    """After a client's round, every backbone weight in the trained module is bit-identical
    to the backbone's (FLoRA: to the global merged weights, which only the server changes)."""
    algo = algorithm(tiny_arch, name, rank=2)
    client = algo.client
    start = algo.init_global(32)
    assert start is not None
    backbone = {k: v.clone() for k, v in algo.host.model.state_dict().items()}
    torch.manual_seed(0)
    train = Split(torch.randn(6, 3, 32, 32), torch.tensor([0, 1, 0, 1, 0, 1]))
    from fedclip.core.client import client_job

    text = torch.nn.functional.normalize(torch.randn(2, 32), dim=-1)
    job = client_job(client, "alpha", train, start, {}, RoundConfig(1, 1e-2, 1), {}, text, 10.0)
    update = client.train_client(job)
    assert update.params and max(float((v - start.get(k, torch.zeros_like(v))).abs().max())
                                 for k, v in update.params.items()) > 0
    trainer = client.__dict__["_views"][2] if name == "flora" else client
    assert_backbone_unchanged(algo, trainer, backbone)


@pytest.mark.parametrize("name", ["ffa-lora", "flora"])
def test_lora_state_resumes_bit_identically(tiny_arch, images, tmp_path, name):
    cfg = config(images, tiny_arch, name, rounds=3, checkpoint_every=1, options={"rank": 2})
    assert_resumes_bit_identically(cfg, "delta", tmp_path)


# --- predict, privacy, robust rules, refusals ---------------------------------------------
@pytest.mark.parametrize("name", LORA)
def test_predict_loads_and_merges_a_lora_result(tiny_arch, images, tmp_path, name):
    from fedclip.core.adapter_file import load_adapter
    from fedclip.predict import predict

    cfg = config(images, tiny_arch, name, seed=7, options={"rank": 2})
    run_heldout(cfg, prepare(cfg), "delta", tmp_path / "r")
    path = tmp_path / "r" / "delta" / "adapter.safetensors"
    adapter = load_adapter(path)
    assert adapter.seed == 7
    algo = get_algorithm(cfg)
    module = algo.build_module(32)
    module.load_state_dict(adapter.params)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        before = module.eval().encode_image(x)
        merged = algo.client.merged(module)
        after = merged.encode_image(x)
    from peft.tuners.lora import LoraLayer

    assert not any(isinstance(m, LoraLayer) for m in merged.modules())
    assert torch.allclose(before, after, atol=1e-5)
    images_ = sorted((images / "delta" / "cat").iterdir())[:2]
    rows = predict(path, images_)
    assert len(rows) == 2 and all(r["class"] in CLASSES for r in rows)


@pytest.mark.parametrize("name", ["fedit", "ffa-lora"])
def test_dp_and_a_robust_rule_run_for_a_mean(tiny_arch, images, tmp_path, name):
    prep = None
    for extra in ({"dp": "server", "dp_clipping_norm": 1.0, "dp_noise_multiplier": 0.1,
                   "aggregation": "uniform"},
                  {"aggregation": "median"}):
        cfg = config(images, tiny_arch, name, options={"rank": 2}, **extra)
        prep = prep or prepare(cfg)
        result = run_heldout(cfg, prep, "delta", tmp_path / next(iter(extra))).to_json()
        assert result["history"][1]["metrics"]["aggregation_error"] >= 0
        assert not result["history"][1].get("rejected")


@pytest.mark.parametrize("extra", [{"aggregation": "median"}, {"aggregation": "krum"},
                                   {"dp": "server", "dp_clipping_norm": 1.0,
                                    "dp_noise_multiplier": 0.1}])
def test_flora_refuses_robust_rules_and_dp_in_one_line(tiny_arch, extra):
    from fedclip.core.server import server_rules

    cfg = RunConfig.build(backbone=tiny_arch, algorithm="flora",
                          **({"aggregation": "uniform"} if "dp" in extra else {}), **extra)
    with pytest.raises(ConfigError, match="flora.*stacks the clients' adapters") as info:
        server_rules(cfg, get_algorithm(cfg), 4)
    assert "\n" not in str(info.value)


def test_flora_refuses_secagg_in_one_line(tiny_arch):
    from fedclip.core.server import secure_sum_refusal

    why = secure_sum_refusal(algorithm(tiny_arch, "flora"))
    assert why is not None and "secure sum" in why and "\n" not in why
    assert secure_sum_refusal(algorithm(tiny_arch, "ffa-lora")) is None


@pytest.mark.parametrize(("backbone", "options", "match"), [
    ("standin", {}, "target=both on standin: no vision tower.*EfficientNet.*target=text"),
    ("standin", {"target": "vision"}, "no vision tower.*set fedit.target=text"),
    (None, {"target_modules": "mlp.nothing"}, "target_modules=mlp.nothing matches no Linear"),
    (None, {"target_modules": "attn.out_proj"}, "MultiheadAttention.*not a Linear"),
    (None, {"target_modules": "attn"}, "MultiheadAttention"),
])
def test_what_lora_cannot_target_is_refused_in_one_line(tiny_arch, backbone, options, match):
    with pytest.raises(ConfigError, match=match) as info:
        algorithm(backbone or tiny_arch, "fedit", **options).init_global(32)
    assert "\n" not in str(info.value)
