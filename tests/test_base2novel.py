"""protocol=base2novel: the classes split into base and novel halves; clients train and
validate on base classes only; the result adds novel accuracy and the harmonic mean."""

from __future__ import annotations

import json

import pytest
import torch

from fedclip.algorithms import algorithm_class
from fedclip.config import RunConfig
from fedclip.core.client import Scoring, Split, evaluate_many
from fedclip.core.records import BaseNovelScores, RunResult, harmonic_mean
from fedclip.data.splits import class_split
from fedclip.errors import ConfigError, DataError
from fedclip.inprocess import experiment
from fedclip.inprocess.experiment import build_federation, prepare
from tests.conftest import make_image_folder, one_line_error

CLASSES = {"cat": 8, "dog": 8, "horse": 8, "red_car": 8}


@pytest.fixture
def four_classes(tmp_path):
    return make_image_folder(tmp_path / "four", {d: CLASSES for d in ("alpha", "beta",
                                                                      "gamma")})


def cfg_of(root, arch, **extra) -> RunConfig:  # noqa: ANN001
    values = {"data_root": str(root), "backbone": arch, "heldout": "beta", "rounds": 2,
              "lr": 1e-3, "personalize_epochs": 0, "protocol": "base2novel", **extra}
    return RunConfig.build(**values)


def test_the_class_split_is_seeded_disjoint_and_covers_every_class():
    for n in (2, 3, 7, 65, 345):
        split = class_split(n, 4)
        assert split == class_split(n, 4)  # the same seed: the same split
        assert set(split.base).isdisjoint(split.novel)
        assert sorted(split.base + split.novel) == list(range(n))
        assert len(split.base) == (n + 1) // 2 and len(split.novel) == n // 2
        assert list(split.base) == sorted(split.base)
    assert len({class_split(7, s).novel for s in range(10)}) > 1  # the seed decides it
    assert class_split(7, 4).names(tuple("abcdefg"))[1] == tuple(
        "abcdefg"[i] for i in class_split(7, 4).novel)
    with pytest.raises(DataError, match="1 class"):
        class_split(1, 0)


def test_the_harmonic_mean():
    assert harmonic_mean(0.8, 0.6) == pytest.approx(2 * 0.8 * 0.6 / 1.4)
    assert harmonic_mean(0.5, 0.5) == 0.5
    assert harmonic_mean(0.0, 0.0) == 0.0 and harmonic_mean(1.0, 0.0) == 0.0
    assert harmonic_mean(None, 0.5) is None and harmonic_mean(0.5, float("nan")) is None
    scores = BaseNovelScores(0.9, 0.3, 0.6, 0.2)
    assert scores.hm == pytest.approx(0.45) and scores.heldout_hm == pytest.approx(0.3)
    assert scores.to_json()["hm"] == pytest.approx(0.45)


def test_clients_never_train_on_a_novel_class(tiny_arch, four_classes, monkeypatch):
    """What every client's job holds: base-class images alone (every one of its train split),
    the base prompts' text features and base labels, in every round."""
    from fedclip.inprocess import federation

    cfg = cfg_of(four_classes, tiny_arch)
    prep = prepare(cfg)
    split = class_split(4, cfg.class_split_seed)
    jobs = []
    real = federation.run_jobs

    def spy(algorithm, batch, together=None):  # noqa: ANN001, ANN202
        jobs.extend(batch)
        return real(algorithm, batch, together)

    monkeypatch.setattr(federation, "run_jobs", spy)
    fed = build_federation(cfg, prep, "beta")
    fed.run()
    assert len(jobs) == 2 * 2  # two rounds, two clients (alpha, gamma)
    base_text = prep.class_text[list(split.base)]
    for job in jobs:
        domain = prep.dataset.domains[job.name]
        client = next(c for c in prep.splits[job.name])
        labels = domain.labels[client.train]
        features = prep.features[job.name].features[torch.as_tensor(client.train)]
        is_base = torch.as_tensor([int(y) in split.base for y in labels])
        assert torch.equal(job.class_text, base_text.to(job.class_text.device))
        assert len(job.train) == int(is_base.sum()) > 0
        assert torch.equal(job.train.x, features[is_base])  # each base image, no other
        assert torch.equal(job.train.y, torch.as_tensor(
            [split.base.index(int(y)) for y in labels[is_base.numpy()]]))
        assert int(job.train.y.max()) < len(split.base)
    assert fed.algorithm.prompts == tuple(prep.prompts[i] for i in split.base)
    assert fed.novel is not None and fed.novel.algorithm is not None
    assert fed.novel.algorithm.prompts == tuple(prep.prompts[i] for i in split.novel)


def test_zero_shot_novel_accuracy_is_plain_zero_shot_among_the_novel_classes(
        tiny_arch, four_classes, tmp_path):
    cfg = cfg_of(four_classes, tiny_arch, algorithm="zeroshot")
    result = experiment.run(cfg, tmp_path / "b2n")[0]
    b2n = result.base2novel
    assert b2n is not None and b2n.best == b2n.zeroshot  # nothing trained: the same model
    split = class_split(4, cfg.class_split_seed)
    plain = build_federation(cfg.replace(protocol="all-classes"), prepare(cfg), "beta")
    client, scale = plain.algorithm.client, plain.logit_scale

    def among(data: Split, mask: torch.Tensor, classes: tuple[int, ...]) -> float:
        keep = torch.isin(data.y, torch.as_tensor(classes, device=data.y.device))
        only = torch.zeros_like(mask)
        only[list(classes)] = True
        return evaluate_many(client, [Scoring(None, Split(data.x[keep], data.y[keep]),
                                              mask & only)], plain.class_text, scale)[0].accuracy

    for c in plain.clients:
        assert b2n.zeroshot.per_client_novel[c.name] == among(c.test, c.class_mask, split.novel)
        assert result.zeroshot.per_client[c.name] == among(c.test, c.class_mask, split.base)
    assert plain.heldout is not None and plain.heldout_mask is not None
    assert b2n.zeroshot.heldout_novel == among(plain.heldout, plain.heldout_mask, split.novel)
    assert b2n.zeroshot.heldout_base == among(plain.heldout, plain.heldout_mask, split.base)
    assert b2n.zeroshot.novel == pytest.approx(
        sum(b2n.zeroshot.per_client_novel.values()) / 2)


def test_results_json_and_the_table_say_base_novel_and_hm(tiny_arch, four_classes, tmp_path):
    out = tmp_path / "run"
    cfg = cfg_of(four_classes, tiny_arch, class_split_seed=3)
    experiment.run(cfg, out)
    document = json.loads((out / "results.json").read_text())
    assert document["config"]["protocol"] == "base2novel"
    assert document["config"]["class_split_seed"] == 3
    run = document["runs"][0]
    b2n = run["base2novel"]
    base, novel = class_split(4, 3).names(tuple(sorted(CLASSES)))
    assert (b2n["split_seed"], b2n["base_classes"], b2n["novel_classes"]) == (
        3, list(base), list(novel))
    best = b2n["best"]
    assert best["base"] == run["personalization"]["mean"]  # the selected round, base classes
    assert best["heldout"]["base"] == run["generalization"]
    assert 0 <= best["novel"] <= 1 and set(best["per_client_novel"]) == {"alpha", "gamma"}
    assert best["hm"] == pytest.approx(harmonic_mean(best["base"], best["novel"]))
    assert b2n["zeroshot"]["hm"] == pytest.approx(harmonic_mean(
        b2n["zeroshot"]["base"], b2n["zeroshot"]["novel"]))
    assert b2n["novel_note"] is None
    again = RunResult.from_json(run)  # read back typed, the same
    assert again.base2novel is not None and again.base2novel.to_json() == b2n
    report = (out / "results.md").read_text()
    assert "## Base to novel" in report and "| HM |" in report
    assert f"novel classes {', '.join(novel)}" in report and "zero-shot" in report
    result = json.loads((out / "beta" / "result.json").read_text())
    assert result["base2novel"] == b2n


def test_a_per_class_method_reports_novel_as_not_applicable(tiny_arch, four_classes, tmp_path):
    """linear-probe's head has a vector per base class: its novel accuracy and HM are n/a
    (one line says why), its base accuracy and the zero-shot row are measured."""
    for name in ("linear-probe", "personal-transform", "prototypes", "fedpft", "fedavg-cnn"):
        assert not algorithm_class(name).capabilities().open_vocabulary, name
    for name in ("fedclip", "promptfl", "zeroshot", "ditto", "local", "clip-adapter"):
        assert algorithm_class(name).capabilities().open_vocabulary, name
    out = tmp_path / "probe"
    experiment.run(cfg_of(four_classes, tiny_arch, algorithm="linear-probe"), out)
    run = json.loads((out / "results.json").read_text())["runs"][0]
    b2n = run["base2novel"]
    assert b2n["best"]["novel"] is None and b2n["best"]["hm"] is None
    assert b2n["best"]["heldout"]["novel"] is None
    assert 0 <= b2n["best"]["base"] <= 1 and b2n["zeroshot"]["novel"] is not None
    note = b2n["novel_note"]
    assert "\n" not in note and "per class" in note and "linear-probe" in note
    assert note in (out / "results.md").read_text()
    assert "n/a" in (out / "results.md").read_text().split("## Base to novel")[1]


def test_compare_shows_base_novel_hm_with_the_zero_shot_row(tiny_arch, four_classes,
                                                            tmp_path):
    from fedclip.compare import compare

    out = tmp_path / "cmp"
    summary = compare(cfg_of(four_classes, tiny_arch, rounds=1),
                      ["zeroshot", "fedclip", "linear-probe"], [0, 1], out)
    table = summary["tables"]["base-to-novel"]
    assert table["header"][:5] == ["method", "base", "novel", "HM", "novel vs 0-shot"]
    rows = {r[0]: r for r in table["rows"]}
    assert list(rows) == ["zero-shot", "fedclip", "linear-probe"]  # zeroshot: the first row
    assert rows["zero-shot"][4] == "-" and rows["linear-probe"][2:5] == ["n/a", "n/a", "n/a"]
    assert rows["fedclip"][4] != "n/a"
    results = [json.loads((out / f"fedclip-seed{s}" / "results.json").read_text())["runs"][0]
               for s in (0, 1)]
    novel = [100 * r["base2novel"]["best"]["novel"] for r in results]
    assert rows["fedclip"][2].split(" ± ")[0] == f"{sum(novel) / 2:.1f}"
    text = (out / "compare.md").read_text()
    assert "## base-to-novel" in text and "zero-shot is the row to beat" in text
    assert "per class" in text  # linear-probe's n/a, said


def test_the_command_line_prints_the_base_to_novel_table(tiny_arch, four_classes, tmp_path,
                                                         capsys):
    from fedclip.cli import main

    assert main(["run", "--data-root", str(four_classes), "--backbone", tiny_arch,
                 "--heldout", "gamma", "--rounds", "1", "--out", str(tmp_path / "cli"),
                 "--set", "protocol=base2novel", "--set", "personalize_epochs=0"]) == 0
    printed = capsys.readouterr().out
    assert "base to novel" in printed and "held-out novel" in printed
    assert "Base to novel (class split seed 0)" in printed


def test_a_client_without_a_base_class_is_refused_before_extraction(tiny_arch, tmp_path,
                                                                    capsys):
    root = make_image_folder(tmp_path / "skew", {"alpha": {"cat": 6, "dog": 6},
                                                 "beta": {"cat": 6, "dog": 6},
                                                 "gamma": {"cat": 6}})
    seed = next(s for s in range(50) if class_split(2, s).novel == (0,))  # cat is novel
    line = one_line_error(capsys, [
        "run", "--data-root", str(root), "--backbone", tiny_arch, "--heldout", "alpha",
        "--out", str(tmp_path / "o"), "--set", "protocol=base2novel",
        "--set", f"class_split_seed={seed}"])
    assert "'gamma' has no training image of a base class" in line
    assert not (tmp_path / "o" / "alpha").exists()


def test_flower_refuses_base2novel_in_one_line():
    from fedclip.flower.settings import require_one_heldout

    with pytest.raises(ConfigError, match="protocol=base2novel runs in-process") as info:
        require_one_heldout(RunConfig.build(heldout="sketch", protocol="base2novel"))
    assert "\n" not in str(info.value)
    require_one_heldout(RunConfig.build(heldout="sketch"))  # every class: runs


def test_the_protocol_decides_the_numbers_a_resume_must_match():
    cfg = RunConfig.build(protocol="base2novel", class_split_seed=2)
    fields = cfg.fingerprint_fields()
    assert fields["protocol"] == "base2novel" and fields["class_split_seed"] == 2
    with pytest.raises(ConfigError, match="protocol"):
        RunConfig.build(protocol="novel")


def test_a_prompt_method_scores_the_novel_names_through_the_text_tower(tiny_arch, four_classes,
                                                                      tmp_path):
    """promptfl's learned context, trained with the base prompts, is run through the text
    tower with the novel class names: the scorer's class embeddings are the novel prompts'
    with that context (not the base ones, not the fixed novel text features)."""
    from fedclip.core.client import working_module

    cfg = cfg_of(four_classes, tiny_arch, algorithm="promptfl", rounds=1, lr=1e-2)
    prep = prepare(cfg)
    fed = build_federation(cfg, prep, "beta")
    state = fed.run()
    scorer = fed.novel.algorithm if fed.novel is not None else None
    assert scorer is not None and state.best_params is not None
    split = class_split(4, cfg.class_split_seed)
    module = working_module(scorer, fed.dim, fed.device, state.params)
    novel = scorer.client.class_text(module, fed.novel.class_text)
    assert novel.shape[0] == len(split.novel)
    assert torch.allclose(novel, scorer.encode_context(state.params["ctx"]))
    assert not torch.allclose(novel, fed.novel.class_text, atol=1e-3)  # the context counts
    result = experiment.run(cfg, tmp_path / "p")[0].base2novel
    assert result is not None and result.best.novel is not None and result.novel_note is None
