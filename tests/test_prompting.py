"""Prompt learning on the offline stand-in: CoOp context vectors among MiniLM's token
embeddings (``fedclip.backbones.standin.MiniLMPromptTower``), the interface the prompt
learners use on every backbone (``fedclip.backbones.PromptTower``)."""

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from fedclip.algorithms import get_algorithm
from fedclip.algorithms.base import Runtime
from fedclip.config import RunConfig
from fedclip.inprocess import experiment as _experiment
from tests.conftest import as_written, has_standin, make_image_folder

pytestmark = pytest.mark.skipif(not has_standin(), reason="needs fedclip[standin]")
run = as_written(_experiment.run)

NAMES = ("dog", "red car", "giraffe", "electric guitar", "house")


@pytest.fixture(scope="module")
def standin():
    from fedclip.backbones import load_backbone

    return load_backbone("standin")


def promptfl(template="a photo of a {}", algorithm="promptfl", **extra):
    cfg = RunConfig.build(algorithm=algorithm, backbone="standin", prompt_template=template,
                          **extra)
    return get_algorithm(cfg, Runtime(tuple(template.format(n) for n in NAMES)))


def test_round_0_reproduces_the_stand_ins_zero_shot_text_features(standin):
    """The context initialised from "a photo of a" (its 4 word-piece embeddings) gives the
    sentence transformer's own features of the prompts."""
    algo = promptfl()
    assert (algo.tower.n_ctx, algo.tower.width) == (4, 384)
    module = algo.build_module(384)
    module.load_state_dict(algo.init_global(384))
    with torch.no_grad():
        prompted = algo.client.class_text(module, torch.empty(0)).cpu()
    zero_shot = F.normalize(standin.encode_texts([f"a photo of a {n}" for n in NAMES]), dim=-1)
    assert (prompted - zero_shot).abs().max() < 1e-5
    # a moved context moves the features (the context is really read)
    with torch.no_grad():
        module.ctx.add_(0.05 * torch.randn_like(module.ctx))
        moved = algo.client.class_text(module, torch.empty(0)).cpu()
    assert (moved - zero_shot).abs().max() > 1e-3


def test_gradients_reach_the_context_and_nothing_of_the_tower():
    algo = promptfl()
    module = algo.build_module(384)
    module.load_state_dict(algo.init_global(384))
    text = algo.client.class_text(module, torch.empty(0))
    loss = F.cross_entropy(100 * text @ text.T.detach().roll(1, 0), torch.arange(len(NAMES)))
    loss.backward()
    assert module.ctx.grad is not None and module.ctx.grad.abs().sum() > 0
    bert = algo.tower.bert
    assert not any(p.requires_grad or p.grad is not None for p in bert.parameters())
    assert not bert.training  # no dropout in the frozen tower


def test_the_context_length_follows_the_template_words():
    assert promptfl("a picture of a {}").tower.n_ctx == 4
    assert promptfl("itap of a {}").tower.n_ctx == 4  # "itap" is 2 word pieces
    assert promptfl("{} in a photo").template_prefix  # no words before the class: refused
    with pytest.raises(Exception, match="template words before the class name"):
        _ = promptfl("{} in a photo").tower


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    return make_image_folder(tmp_path_factory.mktemp("small"), {
        "alpha": {"cat": 4, "dog": 4}, "beta": {"cat": 4, "dog": 4},
        "gamma": {"cat": 3, "dog": 3}}, size=32)


@pytest.mark.parametrize("algorithm", ["promptfl", "promptfolio"])
def test_prompt_learners_run_on_the_stand_in(small, tmp_path, algorithm):
    cfg = RunConfig.build(data_root=str(small), backbone="standin", algorithm=algorithm,
                          heldout="gamma", rounds=1, lr=1e-2, batch_size=4,
                          personalize_epochs=0, extract_workers=0)
    r = run(cfg, tmp_path / algorithm)[0]
    assert r["history"][0]["heldout_accuracy"] == r["zeroshot"]["generalization"]
    assert r["trainable_params"] == 4 * 384 * (1 if algorithm == "promptfl" else 2)
    assert r["bytes_per_round"] == 2 * 2 * 4 * 384 * 4  # only the global context travels
    assert len(r["history"]) == 2 and all(v > 0 for v in r["history"][1]["train_loss"].values())
    trained = load_file(tmp_path / algorithm / "gamma" / "adapter-last.safetensors")["ctx"]
    start = promptfl("a picture of a {}").tower.template_context()
    assert (trained - start).abs().max() > 1e-4  # the context trained
