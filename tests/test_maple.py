"""FedMaPLe: only the prompts and coupling layers train, the vision prompts follow the text
prompts, resume and predict, refusals, DP and a robust rule.

A three-layer tiny open_clip (text width 32, vision width 48) so that deep prompts exist
(depth 9 is clamped to 3); the shared ``tiny_arch`` (one layer) for the one-line refusals."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from fedclip.algorithms import get_algorithm
from fedclip.algorithms.base import Runtime
from fedclip.config import RunConfig
from fedclip.core.client import Split, client_job
from fedclip.errors import ConfigError
from fedclip.inprocess import experiment as _experiment
from fedclip.inprocess.experiment import prepare
from tests.conftest import as_written, interrupted_at_round_2, make_image_folder

run = as_written(_experiment.run)
run_heldout = as_written(_experiment.run_heldout)
ARCH = "fedclip-maple-test"
SPEC = f"open_clip:{ARCH}@none"
CONFIG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 3, "width": 48, "patch_size": 16,
                   "head_width": 16},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2,
                 "layers": 3},
}
PROMPTS = ("a picture of a cat", "a picture of a dog", "a picture of a red car")


@pytest.fixture(scope="module")
def arch(tmp_path_factory) -> str:
    import open_clip

    path = tmp_path_factory.mktemp("maple_configs") / f"{ARCH}.json"
    path.write_text(json.dumps(CONFIG))
    open_clip.add_model_config(path)
    return SPEC


@pytest.fixture
def images(tmp_path) -> Path:
    per_class = {"cat": 3, "dog": 3, "red_car": 3}
    return make_image_folder(tmp_path / "toy", {"alpha": per_class, "beta": per_class,
                                                "gamma": per_class}, size=32)


def algorithm(spec: str, **options):  # noqa: ANN003, ANN201
    cfg = RunConfig.build(backbone=spec, algorithm="fedmaple", options={"fedmaple": options},
                          lr=1e-2)
    return get_algorithm(cfg, Runtime(PROMPTS, None, 100.0, 2))


def cfg_of(spec: str, root: Path, **extra) -> RunConfig:  # noqa: ANN003
    values = {"data_root": str(root), "backbone": spec, "heldout": "gamma", "rounds": 2,
              "lr": 1e-2, "algorithm": "fedmaple", "personalize_epochs": 0, **extra}
    return RunConfig.build(**values)


def test_a_round_moves_only_the_prompts_and_the_coupling(arch):
    """One client's round: every prompt and coupling tensor moves, the frozen encoders'
    weights stay bit-identical, and the update holds exactly the prompts and couplings."""
    maple = algorithm(arch)
    assert maple.depth == 3  # 9, clamped to the three layers
    frozen = {k: v.clone() for k, v in maple.backbone.model.state_dict().items()}
    init = maple.init_global(32)
    assert set(init) == {"ctx", "deep_text.0", "deep_text.1", *(
        f"coupling.{i}.{w}" for i in range(3) for w in ("weight", "bias"))}
    assert sum(v.numel() for v in init.values()) == 3 * 2 * 32 + 3 * (32 * 48 + 48)
    generator = torch.Generator().manual_seed(0)
    train = Split(torch.randn(6, 3, 32, 32, generator=generator), torch.tensor([0, 1, 2] * 2))
    job = client_job(maple.client, "alpha/0", train, init, {}, maple.round_config(1), {},
                     torch.zeros(3, 32), 100.0)
    update = maple.client.train_client(job)
    assert set(update.params) == set(init) and update.steps == 1
    assert all(not torch.equal(update.params[k], init[k]) for k in init)
    after = maple.backbone.model.state_dict()
    assert all(torch.equal(after[k], frozen[k]) for k in frozen)
    assert not any(p.requires_grad for p in maple.backbone.model.parameters())


def test_the_vision_prompts_are_the_coupled_text_prompts(arch):
    """Changing one depth's text prompt changes that depth's vision prompt, through its
    coupling layer, and the image embedding with it; the other depths' stay."""
    maple = algorithm(arch)
    module = maple.build_module(3)
    module.load_state_dict(maple.init_global(32))
    module.eval()
    pixels = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        before = [p.clone() for p in module.vision_prompts()]
        emb = maple.client.embed(module, pixels)
        module.deep_text[1].add_(0.5)
        after = module.vision_prompts()
        assert torch.equal(after[0], before[0]) and torch.equal(after[1], before[1])
        assert not torch.allclose(after[2], before[2])
        assert torch.allclose(after[2], module.coupling[2](module.deep_text[1]))
        assert not torch.allclose(maple.client.embed(module, pixels), emb)


def test_round_zero_is_the_initial_prompts_seeded_text_input_exact(arch):
    """Round 0: the input context is the words' embeddings, so with depth 1 the text side is
    exactly the zero-shot features of "a photo of a {class}."; the initial prompts are the
    same for every build of one seed (every node) and differ for another seed; the image
    side is not zero-shot (the vision prompts join the attention)."""
    maple = algorithm(arch, depth=1)
    init = maple.init_global(32)
    assert torch.equal(init["ctx"], algorithm(arch, depth=1).init_global(32)["ctx"])
    module = maple.build_module(3)
    module.load_state_dict(init)
    model, tokenizer = maple.backbone.model, maple.backbone.tokenizer
    with torch.no_grad():
        text = maple.client.class_text(module, torch.zeros(3, 32))
        zero = F.normalize(model.encode_text(tokenizer(
            ["a photo of a cat.", "a photo of a dog.", "a photo of a red car."])), dim=-1)
        assert torch.equal(text, zero)
        pixels = torch.randn(2, 3, 32, 32)
        assert not torch.allclose(maple.client.embed(module, pixels),
                                  maple.client.embed(None, pixels))
    deep = algorithm(arch).init_global(32)
    assert all(torch.equal(deep[k], algorithm(arch).init_global(32)[k]) for k in deep)
    other = get_algorithm(RunConfig.build(backbone=arch, algorithm="fedmaple", seed=1),
                          Runtime(PROMPTS, None, 100.0, 2)).init_global(32)
    assert torch.equal(other["ctx"], deep["ctx"])  # the words' embeddings
    assert not torch.equal(other["deep_text.0"], deep["deep_text.0"])
    # an init with fewer tokens than n_ctx: random context and placeholder words
    short = algorithm(arch, n_ctx=3, init="a photo")
    assert short.tokens()[0, 1:4].tolist() == tokenizer(["X X X"])[0, 1:4].tolist()


def test_resume_after_interruption_is_bit_identical(arch, images, tmp_path):
    cfg = cfg_of(arch, images, rounds=3, checkpoint_every=1, batch_size=4)
    prep = prepare(cfg)
    full = run_heldout(cfg, prep, "gamma", tmp_path / "full")
    interrupted_at_round_2(cfg, prep, "gamma", tmp_path / "cut")
    resumed = run_heldout(cfg, prep, "gamma", tmp_path / "cut", resume=True)
    wf = load_file(tmp_path / "full" / "gamma" / "adapter-last.safetensors")
    wr = load_file(tmp_path / "cut" / "gamma" / "adapter-last.safetensors")
    assert wf.keys() == wr.keys() and all(torch.equal(wf[k], wr[k]) for k in wf)

    def strip(history):  # noqa: ANN001, ANN202
        return [{k: v for k, v in r.items() if "seconds" not in k} for r in history]

    assert strip(resumed["history"]) == strip(full["history"])


def test_predict_reproduces_the_reported_heldout_accuracy(arch, images, tmp_path):
    from fedclip.cli import main
    from fedclip.predict import predict

    result = run(cfg_of(arch, images, rounds=1), tmp_path / "r")[0]
    adapter = tmp_path / "r" / "gamma" / "adapter.safetensors"
    rows = predict(adapter, [images / "gamma"])
    files = sorted((images / "gamma").rglob("*.png"))
    predicted = {r["file"]: r["class"] for r in rows}
    correct = sum(predicted[str(f.resolve())] == f.parent.name for f in files)
    assert correct / len(files) == pytest.approx(result["generalization"])
    assert result["trainable_params"] == 3 * 2 * 32 + 3 * (32 * 48 + 48)
    assert main(["predict", str(adapter), str(files[0]), "--out", str(tmp_path / "p.csv")]) == 0


def test_a_backbone_without_transformers_to_prompt_is_refused_in_one_line(tiny_arch,
                                                                          tmp_path):
    import open_clip

    with pytest.raises(ConfigError, match="open_clip:ARCH@TAG") as info:
        _ = algorithm("standin").backbone
    assert "\n" not in str(info.value)
    resnet = {"embed_dim": 32, "vision_cfg": {"image_size": 32, "layers": [1, 1, 1, 1],
                                              "width": 8},
              "text_cfg": CONFIG["text_cfg"]}
    path = tmp_path / "fedclip-maple-resnet.json"
    path.write_text(json.dumps(resnet))
    open_clip.add_model_config(path)
    with pytest.raises(ConfigError, match="ModifiedResNet image encoder, not a ViT") as info:
        _ = algorithm("open_clip:fedclip-maple-resnet@none").backbone
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("extra", [
    {"dp": "server", "dp_clipping_norm": 1.0, "dp_noise_multiplier": 0.1,
     "aggregation": "uniform"},
    {"aggregation": "median"},
])
def test_dp_and_a_robust_rule_run_on_the_prompts(arch, images, tmp_path, extra):
    """The prompts and couplings are averaged as any mean: DP (clipped, noised) and the
    coordinate-wise median run and move them."""
    cfg = cfg_of(arch, images, rounds=1, clients_per_domain=2, **extra)
    result = run(cfg, tmp_path / "r")[0]
    final = load_file(tmp_path / "r" / "gamma" / "adapter-last.safetensors")
    maple = get_algorithm(cfg, Runtime(PROMPTS, None, 100.0, 2))
    init = maple.init_global(32)
    assert all(torch.isfinite(v).all() for v in final.values())
    assert any(not torch.equal(final[k], init[k]) for k in init)
    assert len(result["history"]) == 2 and not result["history"][1].get("rejected")


@pytest.mark.parametrize("name", ["fedmaple", "fedavg-full"])
def test_the_runs_precision_applies_to_a_pixel_method_in_training_and_evaluation(
        arch, name, monkeypatch):
    """``precision`` reaches training and evaluation through the encoder (autocast, in one
    place: core/client.py) for every pixel method; fp32 runs without it, bit for bit."""
    from fedclip.core import client as core

    seen: list[torch.dtype | None] = []

    def trained(precision: str) -> tuple[dict, float]:
        cfg = RunConfig.build(backbone=arch, algorithm=name, lr=1e-3, precision=precision)
        method = get_algorithm(cfg, Runtime(PROMPTS, None, 100.0, 2))
        embed = method.client.embed

        def spy(module, x):  # noqa: ANN001, ANN202
            seen.append(torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu")
                        else None)
            return embed(module, x)

        monkeypatch.setattr(method.client, "embed", spy)
        init = method.init_global(32)
        generator = torch.Generator().manual_seed(0)
        train = Split(torch.randn(4, 3, 32, 32, generator=generator), torch.tensor([0, 1, 2, 0]))
        job = client_job(method.client, "alpha/0", train, init, {}, method.round_config(1), {},
                         torch.zeros(3, 32), 100.0)
        params = method.client.train_client(job).params
        accuracy = core.evaluate(method.client, params, train, torch.zeros(3, 32), 100.0).accuracy
        return params, accuracy

    fp32, _ = trained("fp32")
    assert seen and set(seen) == {None}
    seen.clear()
    again, _ = trained("fp32")
    assert all(torch.equal(fp32[k], again[k]) for k in fp32)
    seen.clear()
    bf16, _ = trained("bf16")
    assert set(seen) == {torch.bfloat16} and len(seen) == 2  # a step, then the evaluation
    assert any(not torch.equal(fp32[k], bf16[k]) for k in fp32)
    assert max((fp32[k] - bf16[k]).abs().max().item() for k in fp32) < 0.05


def test_base_to_novel_scores_the_novel_classes_with_the_learned_prompts(arch, tmp_path):
    """MaPLe's prompts are class-agnostic (the paper's base-to-novel setting): built with the
    novel classes' prompts, the same parameters score them."""
    per_class = {"cat": 2, "dog": 2, "horse": 2, "red_car": 2}
    root = make_image_folder(tmp_path / "four", {d: per_class for d in ("alpha", "beta",
                                                                        "gamma")}, size=32)
    result = run(cfg_of(arch, root, rounds=1, heldout="beta", protocol="base2novel"),
                 tmp_path / "r")[0]
    b2n = result["base2novel"]
    assert b2n["novel_note"] is None and len(b2n["novel_classes"]) == 2
    assert 0 <= b2n["best"]["heldout"]["novel"] <= 1  # (the clients' test splits: too small)
