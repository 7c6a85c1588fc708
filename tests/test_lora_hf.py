"""Federated LoRA and full fine-tuning on a transformers CLIP (``hf:``): a tiny random
CLIPModel saved locally (``tiny_hf``), a few 40-pixel images."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from fedclip.algorithms import get_algorithm
from fedclip.algorithms.base import Runtime
from fedclip.algorithms.lora import A_KEY, B_KEY
from fedclip.config import RunConfig
from fedclip.core.client import RoundConfig, Split, client_job
from fedclip.inprocess.experiment import run_heldout
from fedclip.task import prepare
from tests.conftest import assert_backbone_unchanged, make_image_folder

CLASSES = ("cat", "dog", "red_car")
PROMPTS = tuple(f"a picture of a {c.replace('_', ' ')}" for c in CLASSES)
LORA = ["fedit", "ffa-lora", "flora"]


@pytest.fixture
def images(tmp_path) -> Path:
    per_class = dict.fromkeys(CLASSES, 3)
    return make_image_folder(tmp_path / "toy", {d: per_class for d in ("alpha", "beta", "gamma")})


def lora(spec: str, name: str, **options):  # noqa: ANN003, ANN201
    from fedclip.backbones import load_backbone

    cfg = RunConfig.build(backbone=spec, algorithm=name, seed=3,
                          options={name: {"rank": 2, **options}})
    text = F.normalize(load_backbone(spec).encode_texts(list(PROMPTS)), dim=-1)
    return get_algorithm(cfg, Runtime(PROMPTS, text, 100.0, 2)), text


def test_the_hf_backbone_encodes_as_the_transformers_model_does(tiny_hf):
    """The fine-tunable form (HfClip) gives, bit for bit, what CLIPModel's own
    get_text_features / get_image_features give for the processor's inputs."""
    from transformers import CLIPModel, CLIPProcessor

    from fedclip.backbones import backbone_traits, load_backbone

    assert backbone_traits(tiny_hf).finetunable
    folder = tiny_hf.removeprefix("hf:")
    model, processor = CLIPModel.from_pretrained(folder).eval(), \
        CLIPProcessor.from_pretrained(folder)
    backbone = load_backbone(tiny_hf)
    with torch.no_grad():
        text = model.get_text_features(**processor.tokenizer(list(PROMPTS), padding=True,
                                                             return_tensors="pt"))
        pixels = torch.randn(2, 3, 32, 32)
        image = model.get_image_features(pixel_values=pixels)
    text = text if isinstance(text, torch.Tensor) else text.pooler_output
    image = image if isinstance(image, torch.Tensor) else image.pooler_output
    assert torch.equal(backbone.encode_texts(list(PROMPTS)), text)
    assert torch.equal(backbone.encode_images(pixels), image)


@pytest.mark.parametrize("name", LORA)
def test_lora_on_hf_clip_starts_at_the_zero_shot_model_and_moves_only_adapters(tiny_hf, name):
    """The auto targets are q_proj and v_proj of both towers; with B = 0 the class features
    are the backbone's bit for bit and the images' its features; after a client's round the
    backbone's weights in the trained module are bit-identical to the model's."""
    algo, text = lora(tiny_hf, name)
    assert sorted(t.rsplit(".", 1)[1] for t in algo.targets) == ["q_proj", "q_proj",
                                                                "v_proj", "v_proj"]
    assert {t.split(".")[1] for t in algo.targets} == {"vision_model", "text_model"}
    init = algo.init_global(3)
    assert init is not None
    trainer = algo.client
    if name == "flora":
        from fedclip.algorithms.lora import RankView

        trainer = trainer.__dict__.setdefault("_views", {}).setdefault(
            2, RankView(algo.client, 2))
        init_trained = {**init, **algo.client.fresh(2, 0, init)}
    else:
        init_trained = init
    module = trainer.build_module(3)
    module.load_state_dict(init_trained)
    pixels = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(algo.client.class_text(module, text), text)
        assert torch.equal(algo.client.embed(module, pixels),
                           F.normalize(algo.host.model.encode_image(pixels), dim=-1))
    frozen = {k: v.clone() for k, v in algo.host.model.state_dict().items()}
    job = client_job(algo.client, "alpha", Split(pixels, torch.tensor([0, 1, 2, 0])), init, {},
                     RoundConfig(1, 1e-2, 1), {}, text, 100.0)
    update = algo.client.train_client(job)
    assert max(float(v.abs().max()) for k, v in update.params.items()
               if k.endswith(B_KEY)) > 0
    assert_backbone_unchanged(algo, trainer, frozen, skip_targeted_weights=name == "flora")


@pytest.mark.parametrize(("name", "target"), [("fedit", "both"), ("ffa-lora", "both"),
                                              ("flora", "both"), ("ffa-lora", "text")])
def test_lora_runs_on_hf_clip_and_predict_merges_it(tiny_hf, images, tmp_path, name, target):
    """Two rounds (FFA-LoRA and FLoRA exact; with target=text on the cached features), and
    predict loads and merges what the run wrote."""
    from fedclip.predict import predict

    cfg = RunConfig.build(backbone=tiny_hf, data_root=str(images), heldout="gamma",
                          algorithm=name, rounds=2, lr=1e-2, personalize_epochs=0,
                          options={name: {"target": target, "rank": 2}})
    assert get_algorithm(cfg).inputs == ("features" if target == "text" else "pixels")
    result = run_heldout(cfg, prepare(cfg), "gamma", tmp_path / "r").to_json()
    for record in result["history"][1:]:
        metrics = record["metrics"]
        assert metrics["mean_update_norm"] > 0
        if name != "fedit":
            assert metrics["aggregation_error"] < 1e-5 * metrics["mean_update_norm"]
    last = load_file(tmp_path / "r" / "gamma" / "adapter-last.safetensors")
    assert any(k.endswith(A_KEY) or k.endswith(B_KEY) or "base_layer" in k for k in last)
    rows = predict(tmp_path / "r" / "gamma" / "adapter.safetensors",
                   sorted((images / "gamma" / "cat").iterdir())[:2])
    assert len(rows) == 2 and all(r["class"] in CLASSES for r in rows)


def test_fedavg_full_trains_an_hf_clip(tiny_hf, images, tmp_path):
    cfg = RunConfig.build(backbone=tiny_hf, data_root=str(images), heldout="gamma",
                          algorithm="fedavg-full", rounds=1, lr=1e-3, personalize_epochs=0)
    result = run_heldout(cfg, prepare(cfg), "gamma", tmp_path / "r").to_json()
    from fedclip.backbones import load_backbone

    model = load_backbone(tiny_hf).model
    assert result["trainable_params"] == sum(p.numel() for p in model.parameters())
    last = load_file(tmp_path / "r" / "gamma" / "adapter-last.safetensors")
    start = model.state_dict()
    assert max(float((last[k] - start[k]).abs().max()) for k in last) > 0


def test_lora_on_hf_clip_on_flower_gives_the_in_process_result(tiny_hf, images, tmp_path):
    """FFA-LoRA on both towers of an hf CLIP (pixels, each site through its own backbone):
    the Flower apps' final parameters equal the in-process run's to 1e-5."""
    from fedclip.flower.client_app import build_client_app
    from fedclip.flower.server_app import main as server_main
    from fedclip.inprocess.experiment import run
    from tests.flower_grid import LocalGrid

    name = "ffa-lora"
    nodes = [{"partition-id": i, "num-partitions": 3} for i in range(3)]
    config = {"backbone": tiny_hf, "data-root": str(images), "heldout": "gamma", "rounds": 2,
              "lr": 1e-2, "out": str(tmp_path / "fl"), "classes": ",".join(CLASSES),
              "algorithm": name, f"{name}.rank": 2}
    flower = server_main(LocalGrid(build_client_app(), nodes, config), config).to_json()
    cfg = RunConfig.build(backbone=tiny_hf, data_root=str(images), heldout="gamma", rounds=2,
                          lr=1e-2, classes=list(CLASSES), algorithm=name,
                          options={name: {"rank": 2}})
    local = run(cfg, tmp_path / "ip")[0].to_json()
    a = load_file(tmp_path / "fl" / "gamma" / "adapter-last.safetensors")
    b = load_file(tmp_path / "ip" / "gamma" / "adapter-last.safetensors")
    assert a.keys() == b.keys() and max(float((a[k] - b[k]).abs().max()) for k in a) < 1e-5
    assert max(float(a[k].abs().max()) for k in a) > 0  # it trained (B moved from 0)
    for key in ("val_accuracy", "heldout_accuracy"):
        assert [r[key] for r in flower["history"]] == [r[key] for r in local["history"]]
