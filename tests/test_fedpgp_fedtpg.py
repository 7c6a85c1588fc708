"""FedPGP (a global prompt + a personal low-rank term) and FedTPG (a prompt generator from the
class names) on the algorithm contract: both runtimes, resume, predict, base2novel."""

import json

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

import tests.test_flower_pixels as pixels
from fedclip.algorithms import algorithm_class, get_algorithm
from fedclip.algorithms.base import Runtime
from fedclip.config import RunConfig
from fedclip.flower.client_app import build_client_app
from fedclip.flower.server_app import main as _server_main
from fedclip.inprocess import experiment as _experiment
from fedclip.inprocess.experiment import build_federation, prepare
from tests.conftest import as_written, interrupted_at_round_2, make_image_folder
from tests.flower_grid import LocalGrid

run = as_written(_experiment.run)
run_heldout = as_written(_experiment.run_heldout)
server_main = as_written(_server_main)
METHODS = ["fedpgp", "fedtpg"]
SMALL = {"fedpgp.n_ctx": 4}  # 4 placeholder tokens: the same code path, faster


def config(root, arch, **extra):
    values = {"data_root": str(root), "backbone": arch, "heldout": "gamma", "rounds": 2,
              "lr": 1e-2, "batch_size": 8, "personalize_epochs": 0, **SMALL, **extra}
    return RunConfig.build(**values)


@pytest.fixture(scope="module")
def skewed(tmp_path_factory):
    return make_image_folder(tmp_path_factory.mktemp("skewed"), {
        "alpha": {"cat": 8, "dog": 2, "red_car": 2}, "beta": {"cat": 2, "dog": 2, "red_car": 8},
        "gamma": {"cat": 3, "dog": 3, "red_car": 3}}, size=32)


def adapter(folder, name="adapter-last"):
    return load_file(folder / "gamma" / f"{name}.safetensors")


def algo(name, arch, prompts=("a picture of a cat", "a picture of a dog"), **options):
    cfg = RunConfig.build(algorithm=name, backbone=arch, **{f"{name}.{k}": v
                                                          for k, v in options.items()})
    return get_algorithm(cfg, Runtime(tuple(prompts)))


# --- the methods themselves -----------------------------------------------------------------
def test_fedpgp_sends_the_global_prompt_and_keeps_the_low_rank_term(tiny_arch):
    a = algo("fedpgp", tiny_arch, n_ctx=4, rank=2)
    params = a.init_global(32)
    assert {k: tuple(v.shape) for k, v in params.items()} == {
        "ctx": (4, 32), "U": (4, 2), "V": (2, 32)}
    assert set(a.shared(params)) == {"ctx"}
    assert a.open_vocabulary and a.aggregates_mean and a.uses_text == "tower"
    # the official code's start: N(0, 0.02^2), seeded (the same on every node)
    assert 0.01 < float(params["ctx"].std()) < 0.03
    assert all(torch.equal(v, a.init_global(32)[k]) for k, v in params.items())
    # the positive anchor is the frozen placeholder prompt "X X X X cat", not a written one
    tower = a.tower
    assert tower.n_ctx == 4
    ref = a.backbone.encode_texts(["x x x x cat", "x x x x dog"])
    assert torch.allclose(a.anchor.cpu(), F.normalize(ref, dim=-1), atol=1e-5)


def test_fedpgp_adds_the_contrastive_term_with_its_gradient_on_both_parts(tiny_arch):
    from fedclip.core.client import ClientJob, RoundConfig

    a = algo("fedpgp", tiny_arch, n_ctx=4, mu=1.0)
    module = a.build_module(32)
    module.load_state_dict(a.init_global(32))
    module.train()
    a.client.class_text(module, torch.empty(0))

    def job(**values):
        config = RoundConfig(1, 1e-3, 1, {**a.round_config(1).values, **values})
        return ClientJob("c", None, {}, {}, {}, config, {}, torch.empty(0), 100.0, 0)

    zero = torch.zeros(())
    total = a.client.local_loss(zero, module, job())
    assert float(total) > 0  # CE of [pos, neg] / temp: positive when the two are close
    total.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in module.parameters())
    module.zero_grad()
    a.client.class_text(module, torch.empty(0))
    assert float(a.client.local_loss(zero, module, job(mu=0.0))) == 0  # mu = 0: the task loss


def test_fedtpg_writes_prompts_for_class_names_it_never_saw(tiny_arch):
    """The generator's parameters do not depend on the classes: built for other names, the
    same parameters prompt them (the context is a function of the names' embeddings)."""
    base = algo("fedtpg", tiny_arch, ("a picture of a cat", "a picture of a dog"))
    novel = algo("fedtpg", tiny_arch, ("a picture of a horse", "a picture of a red car",
                                        "a picture of a tree"))
    params = base.init_global(32)
    assert {k: v.shape for k, v in params.items()} == {
        k: v.shape for k, v in novel.init_global(32).items()}
    module = novel.build_module(32)
    module.load_state_dict(params)
    module.eval()
    with torch.no_grad():
        text = novel.client.class_text(module, torch.empty(0))
        ctx_novel = module(novel.name_features)
        ctx_base = module(base.name_features)
    assert text.shape == (3, 32) and novel.class_names() == ("horse", "red car", "tree")
    assert (ctx_novel - ctx_base).abs().max() > 1e-4  # the names decide the context
    assert novel.open_vocabulary and novel.aggregates_mean and not novel.personal


def test_options_are_checked_and_declared_for_the_flower_app(tiny_arch):
    for name in METHODS:  # declared: tests/test_flower_pixels.py covers every method
        pixels.test_a_methods_options_are_keys_of_the_flower_app(name)
    with pytest.raises(Exception, match="heads=5 must divide the token width 32"):
        algo("fedtpg", tiny_arch, heads=5).init_global(32)
    with pytest.raises(Exception, match="fedpgp.rank"):
        algo("fedpgp", tiny_arch, rank=0)


# --- both runtimes, resume, what never leaves a client ----------------------------------------
@pytest.mark.parametrize("name", METHODS)
def test_flower_equals_in_process_and_the_personal_term_never_travels(tiny_arch, skewed,
                                                                     tmp_path, name):
    run_config = {"backbone": tiny_arch, "data-root": str(skewed), "heldout": "gamma",
                  "rounds": 2, "lr": 1e-2, "batch-size": 8, "personalize-epochs": 0,
                  "classes": "cat,dog,red_car", "algorithm": name, "fedpgp.n-ctx": 4,
                  "out": str(tmp_path / "flower")}
    nodes = [{"partition-id": i, "num-partitions": 3} for i in range(3)]
    grid = LocalGrid(build_client_app(), nodes, run_config)
    flower = server_main(grid, run_config)
    local = run(config(skewed, tiny_arch, algorithm=name), tmp_path / "local")[0]
    a, b = adapter(tmp_path / "flower"), adapter(tmp_path / "local")
    assert max((a[k] - b[k]).abs().max().item() for k in b) < 1e-5
    init = get_algorithm(config(skewed, tiny_arch, algorithm=name),
                         Runtime(prepare(config(skewed, tiny_arch)).prompts)).init_global(32)
    assert max((b[k] - init[k]).abs().max().item() for k in init if k in ("ctx", "queries")
               ) > 1e-4  # it trained
    for key in ("val_accuracy", "test_accuracy", "heldout_accuracy"):
        assert [r[key] for r in flower["history"]] == [r[key] for r in local["history"]]
    assert flower["bytes_per_round"] == local["bytes_per_round"]
    sent = {k for msg in [*grid.received, *grid.sent]
            if not msg.has_error() and msg.metadata.message_type != "query"
            for r in msg.content.array_records.values() for k in r}
    if name == "fedpgp":
        assert local["bytes_per_round"] == 2 * 2 * 4 * 32 * 4  # sigma only, both ways
        assert not any(k in ("U", "V") or k.startswith(("U.", "V.")) for k in sent), sent
        assert any("ctx" in k for k in sent)
        # each client's personal term is its own (kept, trained, different)
        ckpt = load_file(tmp_path / "local" / "gamma" / "checkpoint.safetensors")
        own = [v for k, v in ckpt.items() if k.startswith("client/") and k.endswith("/U")]
        assert len(own) == 2 and (own[0] - own[1]).abs().max() > 1e-6


@pytest.mark.parametrize("name", METHODS)
def test_a_resumed_run_is_bit_identical(tiny_arch, skewed, tmp_path, name):
    cfg = config(skewed, tiny_arch, algorithm=name, rounds=3, checkpoint_every=1)
    prep = prepare(cfg)
    full = run_heldout(cfg, prep, "gamma", tmp_path / "full")
    interrupted_at_round_2(cfg, prep, "gamma", tmp_path / "cut")
    resumed = run_heldout(cfg, prep, "gamma", tmp_path / "cut", resume=True)
    own = ("adapter-alpha", "adapter-beta") if name == "fedpgp" else ()
    for file in ("adapter-last", *own):
        wf, wr = adapter(tmp_path / "full", file), adapter(tmp_path / "cut", file)
        assert all(torch.equal(wf[k], wr[k]) for k in wf), file
    assert [r["test_accuracy"] for r in resumed["history"]] == \
        [r["test_accuracy"] for r in full["history"]]


@pytest.mark.parametrize("name", METHODS)
def test_predict_reproduces_the_heldout_accuracy(tiny_arch, skewed, tmp_path, name):
    from fedclip.predict import predict

    result = run(config(skewed, tiny_arch, algorithm=name), tmp_path / "r")[0]
    rows = predict(tmp_path / "r" / "gamma" / "adapter.safetensors", [skewed / "gamma"])
    files = sorted((skewed / "gamma").rglob("*.png"))
    predicted = {r["file"]: r["class"] for r in rows}
    right = sum(predicted[str(f.resolve())] == f.parent.name for f in files)
    assert right / len(files) == pytest.approx(result["generalization"])


def test_dp_and_the_robust_rules_run_on_their_mean(tiny_arch, skewed, tmp_path):
    for name, extra in (("fedpgp", {"aggregation": "median"}),
                        ("fedtpg", {"dp": "server", "dp_clipping_norm": 1.0,
                                    "dp_noise_multiplier": 0.1, "aggregation": "uniform"})):
        r = run(config(skewed, tiny_arch, algorithm=name, rounds=1, **extra), tmp_path / name)
        assert len(r[0]["history"]) == 2, name


# --- base to novel --------------------------------------------------------------------------
def test_fedtpg_prompts_the_novel_classes_and_reports_them_apart(tiny_arch, tmp_path):
    four = make_image_folder(tmp_path / "four", {d: {"cat": 6, "dog": 6, "horse": 6,
                                                     "red_car": 6}
                                                 for d in ("alpha", "beta", "gamma")}, size=32)
    cfg = config(four, tiny_arch, algorithm="fedtpg", protocol="base2novel", rounds=1,
                 heldout="beta")
    prep = prepare(cfg)
    fed = build_federation(cfg, prep, "beta")
    assert fed.novel is not None and fed.novel.algorithm is not None
    scorer, trainer = fed.novel.algorithm, fed.algorithm
    assert set(scorer.class_names()).isdisjoint(trainer.class_names())  # never trained on
    state = fed.run()
    from fedclip.core.client import working_module

    module = working_module(scorer, fed.dim, fed.device, state.params)
    with torch.no_grad():
        novel = scorer.client.class_text(module, fed.novel.class_text)
        expected = scorer.tower.encode(module(scorer.name_features))
    assert novel.shape[0] == len(scorer.class_names()) == 2
    assert torch.allclose(novel, expected)
    assert not torch.allclose(novel, fed.novel.class_text, atol=1e-3)  # the prompt counts
    _experiment.run(cfg, tmp_path / "out")
    b2n = json.loads((tmp_path / "out" / "results.json").read_text())["runs"][0]["base2novel"]
    assert b2n["novel_note"] is None
    assert b2n["best"]["novel"] is not None and b2n["best"]["base"] is not None
    assert b2n["best"]["heldout"]["novel"] is not None
    assert algorithm_class("fedpgp").capabilities().open_vocabulary


def test_fedpgp_scores_novel_classes_with_its_prompt_and_can_start_at_the_template(tiny_arch,
                                                                                   tmp_path):
    """The personal term is one U V for every class name (not per class): open-vocabulary,
    the novel classes scored with the same prompt. init=template: the global prompt starts at
    the template words and the positive anchor is the zero-shot prompt itself."""
    four = make_image_folder(tmp_path / "four", {d: {"cat": 4, "dog": 4, "horse": 4,
                                                     "red_car": 4}
                                                 for d in ("alpha", "beta", "gamma")}, size=32)
    cfg = config(four, tiny_arch, algorithm="fedpgp", protocol="base2novel", rounds=1,
                 heldout="beta")
    result = _experiment.run(cfg, tmp_path / "out")[0].base2novel
    assert result is not None and result.novel_note is None and result.best.novel is not None
    a = algo("fedpgp", tiny_arch, init="template")
    zero_shot = F.normalize(a.backbone.encode_texts(["a picture of a cat", "a picture of a dog"]),
                            dim=-1)
    assert torch.allclose(a.anchor.cpu(), zero_shot, atol=1e-5)
    assert torch.equal(a.init_global(32)["ctx"], a.tower.template_context())
