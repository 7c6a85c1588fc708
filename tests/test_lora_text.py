"""Federated LoRA on a text tower alone (``target=text``): the cached image features, the class
prompts through the adapted text tower at every step. The offline stand-in's MiniLM (a BERT)
and the tiny open_clip; a few 40-pixel images."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from fedclip.algorithms import algorithm_class, get_algorithm
from fedclip.algorithms.base import Runtime
from fedclip.algorithms.lora import A_KEY, B_KEY, W_KEY, delta, layer_prefixes
from fedclip.config import RunConfig
from fedclip.core.client import ClientUpdate, RoundConfig, Split, client_job
from fedclip.inprocess.experiment import run_heldout
from fedclip.task import prepare
from tests.conftest import (
    assert_backbone_unchanged,
    assert_resumes_bit_identically,
    has_standin,
    make_image_folder,
)

CLASSES = ("cat", "dog", "red_car")
PROMPTS = tuple(f"a picture of a {c.replace('_', ' ')}" for c in CLASSES)
LORA = ["fedit", "ffa-lora", "flora"]
standin = pytest.mark.skipif(not has_standin(), reason="stand-in packages not installed")


@pytest.fixture
def images(tmp_path) -> Path:
    per_class = dict.fromkeys(CLASSES, 3)
    return make_image_folder(tmp_path / "toy", {d: per_class for d in ("alpha", "beta", "gamma")})


def text_algorithm(name: str, backbone: str = "standin", **options):  # noqa: ANN003, ANN201
    from fedclip.backbones import load_backbone

    cfg = RunConfig.build(backbone=backbone, algorithm=name, seed=3,
                          options={name: {"target": "text", "rank": 2, **options}})
    text = F.normalize(load_backbone(backbone).encode_texts(list(PROMPTS)), dim=-1)
    return get_algorithm(cfg, Runtime(PROMPTS, text, 100.0, 2)), text


def run_config(root: Path, name: str, **extra):  # noqa: ANN003, ANN201
    values = {"rounds": 2, "lr": 1e-2, "personalize_epochs": 0, "seed": 5, **extra}
    return RunConfig.build(backbone="standin", data_root=str(root), heldout="gamma",
                           algorithm=name, options={name: {"target": "text", "rank": 2}},
                           **values)


# --- the inputs a run reads --------------------------------------------------------------
@pytest.mark.parametrize("name", LORA)
def test_a_text_only_lora_reads_features_and_the_others_pixels(tiny_arch, name):
    """The class declares pixels; a run with target=text reads the cached features (the image
    encoder is the backbone's), one with vision or both the pixels."""
    assert algorithm_class(name).inputs == "pixels"
    for target, inputs in (("text", "features"), ("vision", "pixels"), ("both", "pixels")):
        cfg = RunConfig.build(backbone=tiny_arch, algorithm=name,
                              options={name: {"target": target}})
        assert get_algorithm(cfg).inputs == inputs


# --- round 0 is zero-shot; the adapters move the class features ---------------------------
@standin
@pytest.mark.parametrize("name", LORA)
def test_the_adapted_minilm_gives_the_zero_shot_text_features_at_b_0(name):
    """With B = 0 the class features through the adapted MiniLM are bit for bit the
    backbone's (encode_texts, normalised); a gradient reaches the adapters, and a B != 0
    moves them. The auto targets are MiniLM's query and value projections."""
    algo, text = text_algorithm(name)
    assert algo.targets and all(t.endswith(("attention.self.query", "attention.self.value"))
                                for t in algo.targets)
    assert len(algo.targets) == 2 * 6  # 6 BERT layers
    init = algo.init_global(384)
    assert init is not None
    build = algo.client if name != "flora" else _flora_view(algo)
    module = build.build_module(384)
    module.load_state_dict(init if name != "flora" else {
        **init, **algo.client.fresh(2, 0, init)})
    got = algo.client.class_text(module, text)
    assert torch.equal(got, text)
    got.sum().backward()
    grads = [p.grad for n, p in module.named_parameters() if "lora_B" in n]
    assert grads and all(g is not None and float(g.abs().max()) > 0 for g in grads)
    with torch.no_grad():
        for n, p in module.named_parameters():
            if "lora_B" in n:
                p.add_(0.05)
    assert float((algo.client.class_text(module, text).detach() - text).abs().max()) > 1e-4


def _flora_view(algo):  # noqa: ANN001, ANN202
    from fedclip.algorithms.lora import RankView

    return RankView(algo.client, 2)


# --- exactness of the aggregate; the frozen tower ------------------------------------------
@standin
@pytest.mark.parametrize("name", ["ffa-lora", "flora"])
def test_the_aggregate_of_two_trained_minilm_clients_is_their_mean_update(name):
    """Two clients train on cached features (weights 1 and 3); the global weight update of
    every LoRA layer equals the weighted mean of their own ``s B_k A_k`` to 1e-6; the
    backbone's weights in the trained module are bit-identical to MiniLM's."""
    algo, text = text_algorithm(name)
    start = algo.init_global(384)
    assert start is not None
    frozen = {k: v.clone() for k, v in algo.host.model.state_dict().items()}
    torch.manual_seed(0)
    updates = []
    for client, weight in (("alpha", 1.0), ("beta", 3.0)):
        train = Split(torch.randn(6, 384), torch.tensor([0, 1, 2, 0, 1, 2]))
        job = client_job(algo.client, client, train, start, {}, RoundConfig(1, 1e-2, 1), {},
                         text, 100.0)
        update = algo.client.train_client(job)
        updates.append(ClientUpdate(update.params, {}, 6, update.loss, weight=weight))
    new, _ = algo.server.aggregate(start, updates, {})
    layers = layer_prefixes(new)
    assert len(layers) == len(algo.targets)
    s = 16
    worst = 0.0
    for prefix in layers:
        own = sum(u.weight * (s / 2) * (u.params[prefix + B_KEY].double()
                                        @ (u.params.get(prefix + A_KEY)
                                           if prefix + A_KEY in u.params
                                           else algo.frozen()[prefix + A_KEY]).double())
                  for u in updates) / 4
        if name == "flora":
            moved = new[prefix + W_KEY].double() - start[prefix + W_KEY].double()
        else:
            moved = delta(algo.frozen()[prefix + A_KEY], new[prefix + B_KEY], s)
        assert float(own.abs().max()) > 1e-6  # they trained
        worst = max(worst, float((moved - own).abs().max()))
    assert worst < 1e-6
    # the trained module's backbone weights are MiniLM's, bit for bit
    trainer = algo.client.__dict__["_views"][2] if name == "flora" else algo.client
    assert_backbone_unchanged(algo, trainer, frozen, skip_targeted_weights=name == "flora")


# --- a run: metrics, resume, predict ------------------------------------------------------
@standin
def test_text_lora_runs_and_predicts_on_the_standin(images, tmp_path):
    """Each method runs two rounds on the cached features (round 0 is the zero-shot
    accuracy; FFA-LoRA and FLoRA exact, FFA-LoRA sending half of FedIT); predict loads and
    merges what a run wrote."""
    from fedclip.predict import predict

    prep = None
    sent = {}
    for name in LORA:
        cfg = run_config(images, name)
        prep = prep or prepare(cfg)
        result = run_heldout(cfg, prep, "gamma", tmp_path / name).to_json()
        history = result["history"]
        assert history[0]["heldout_accuracy"] == result["zeroshot"]["generalization"]
        metrics = history[-1]["metrics"]
        sent[name] = metrics["sent_params"]
        if name != "fedit":
            assert metrics["aggregation_error"] < 1e-5 * metrics["mean_update_norm"]
        rows = predict(tmp_path / name / "gamma" / "adapter.safetensors",
                       sorted((images / "gamma" / "cat").iterdir())[:2])
        assert len(rows) == 2 and all(r["class"] in CLASSES for r in rows)
    # per layer: A (2 x 384) and B (384 x 2); FFA-LoRA sends B only
    assert sent["fedit"] == sent["flora"] == 12 * 2 * 2 * 384 == 2 * sent["ffa-lora"]


@standin
@pytest.mark.parametrize("name", ["ffa-lora", pytest.param("flora", marks=pytest.mark.slow)])
def test_text_lora_resumes_bit_identically_on_the_standin(images, tmp_path, name):
    assert_resumes_bit_identically(run_config(images, name, rounds=3, checkpoint_every=1),
                                   "gamma", tmp_path)


@standin
def test_predict_merges_the_minilm_adapters_into_the_same_class_features():
    algo, text = text_algorithm("fedit")
    module = algo.build_module(384)
    with torch.no_grad():
        for n, p in module.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    from peft.tuners.lora import LoraLayer

    with torch.no_grad():
        before = algo.client.class_text(module.eval(), text)
        merged = algo.client.merged(module)
        after = algo.client.class_text(merged, text)
    assert not any(isinstance(m, LoraLayer) for m in merged.modules())
    assert float((before - text).abs().max()) > 1e-4
    assert torch.allclose(before, after, atol=1e-5)


# --- refusals -----------------------------------------------------------------------------
@standin
@pytest.mark.parametrize("options", [{"target": "vision"}, {"target": "both"},
                                     {"target": "text", "target_modules": "mlp.c_fc"}])
def test_the_standin_refuses_what_it_cannot_adapt_in_one_line(options):
    from fedclip.errors import ConfigError

    cfg = RunConfig.build(backbone="standin", algorithm="ffa-lora",
                          options={"ffa-lora": options})
    with pytest.raises(ConfigError) as info:
        get_algorithm(cfg).init_global(384)
    message = str(info.value)
    assert "\n" not in message
    if options["target"] == "text":
        assert "matches no Linear" in message and "attention.self.query" in message
    else:
        assert "EfficientNet" in message and "ffa-lora.target=text" in message


# --- Flower ---------------------------------------------------------------------------------
@standin
@pytest.mark.parametrize("name", [pytest.param("fedit", marks=pytest.mark.slow), "ffa-lora",
                                  pytest.param("flora", marks=pytest.mark.slow)])
def test_text_lora_on_flower_gives_the_in_process_result(images, tmp_path, name):
    """A method with target=text on the Flower apps (three nodes, the stand-in's cached
    features, one personalization epoch): the final parameters equal the in-process run's to
    1e-5, and the same accuracies every round. (About 14 s each here: FFA-LoRA in the quick
    suite, FedIT and FLoRA marked slow.)"""
    from fedclip.flower.client_app import build_client_app
    from fedclip.flower.server_app import main as server_main
    from fedclip.inprocess.experiment import run
    from tests.flower_grid import LocalGrid

    nodes = [{"partition-id": i, "num-partitions": 3} for i in range(3)]
    config = {"backbone": "standin", "data-root": str(images), "heldout": "gamma",
              "rounds": 2, "lr": 1e-2, "seed": 5, "out": str(tmp_path / f"{name}-fl"),
              "personalize-epochs": 1,
              "classes": ",".join(CLASSES), "algorithm": name,
              f"{name}.target": "text", f"{name}.rank": 2}
    flower = server_main(LocalGrid(build_client_app(), nodes, config), config).to_json()
    cfg = RunConfig.build(backbone="standin", data_root=str(images), heldout="gamma",
                          rounds=2, lr=1e-2, seed=5, classes=list(CLASSES),
                          personalize_epochs=1,
                          algorithm=name, options={name: {"target": "text", "rank": 2}})
    local = run(cfg, tmp_path / f"{name}-ip")[0].to_json()
    a = load_file(tmp_path / f"{name}-fl" / "gamma" / "adapter-last.safetensors")
    b = load_file(tmp_path / f"{name}-ip" / "gamma" / "adapter-last.safetensors")
    assert a.keys() == b.keys()
    assert max(float((a[k] - b[k]).abs().max()) for k in a) < 1e-5, name
    for key in ("val_accuracy", "heldout_accuracy"):
        assert [r[key] for r in flower["history"]] == [r[key] for r in local["history"]]
    assert flower["zeroshot"] == local["zeroshot"]
