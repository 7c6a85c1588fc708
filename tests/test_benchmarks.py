"""The benchmarks that have a ``--smoke`` mode run, in seconds, and write what they say."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from fedclip.algorithms import algorithm_class, names

ROOT = Path(__file__).resolve().parents[1]


def _benchmark(name: str):  # noqa: ANN202 - the script as a module
    spec = importlib.util.spec_from_file_location(f"_bench_{name}",
                                                  ROOT / "benchmarks" / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_encoder_benchmark_measures_every_pixel_method_of_the_registry(tmp_path, capsys):
    """benchmarks/encoders.py --smoke: each registered pixel method that trains through the
    backbone is measured against the plain forward (positive rates, its trainable count);
    the others are listed with why not."""
    encoders = _benchmark("encoders")
    assert encoders.main(["--smoke", "--out", str(tmp_path / "e.json")]) == 0
    out = json.loads((tmp_path / "e.json").read_text())
    pixels = {n for n in names() if algorithm_class(n).inputs == "pixels"}
    assert set(out["methods"]) | set(out["skipped"]) == pixels
    assert {"fedmaple", "fedavg-full"} <= set(out["methods"])
    assert "fedavg-cnn" in out["skipped"]
    for m in out["methods"].values():
        assert m["step_images_per_second"] > 0 and m["forward_images_per_second"] > 0
        assert m["step_over_forward"] > 0 and m["trainable_params"] > 0
    # the tiny backbone's 2 layers: 2 prompts of 2 x 32 and 2 couplings 32 -> 32
    assert out["methods"]["fedmaple"]["trainable_params"] == 2 * 2 * 32 + 2 * (32 * 32 + 32)
    assert out["methods"]["fedavg-full"]["trainable_params"] > 100 * out["methods"][
        "fedmaple"]["trainable_params"]
    printed = capsys.readouterr().out
    assert "fedmaple" in printed and "step/forward" in printed


def test_the_encoder_benchmark_skips_a_method_that_refuses_the_backbone(tmp_path, capsys):
    """The stand-in has no open_clip encoders: every method refuses it, each skipped with its
    one-line reason (nothing is measured, no backbone loaded)."""
    encoders = _benchmark("encoders")
    assert encoders.main(["--smoke", "--backbone", "standin", "--out",
                          str(tmp_path / "e.json")]) == 0
    out = json.loads((tmp_path / "e.json").read_text())
    assert out["methods"] == {}
    assert "open_clip" in out["skipped"]["fedmaple"] and "\n" not in out["skipped"]["fedmaple"]
    assert "cannot be trained" in out["skipped"]["fedavg-full"]
    assert "skipped fedmaple:" in capsys.readouterr().out


def test_the_encoder_benchmark_measures_a_transformers_clip(tmp_path, tiny_hf):
    """An hf: backbone (no open_clip ``visual.image_size``): the batch takes the size its own
    preprocessing gives, and full FedAvg and the LoRA methods are measured on it."""
    encoders = _benchmark("encoders")
    assert encoders.main(["--smoke", "--backbone", tiny_hf, "--out",
                          str(tmp_path / "e.json")]) == 0
    out = json.loads((tmp_path / "e.json").read_text())
    assert {"fedavg-full", "fedit", "ffa-lora"} <= set(out["methods"])
    assert "open_clip" in out["skipped"]["fedmaple"] and "FLoRA" in out["skipped"]["flora"]
    lora = out["methods"]["ffa-lora"]
    assert 0 < lora["trainable_params"] < out["methods"]["fedavg-full"]["trainable_params"]
    assert lora["step_over_forward"] > 0


def test_the_methods_benchmark_runs_every_prompt_family_and_one_dp_run_per_family():
    """benchmarks/methods.py: the prompt comparison lists a registered method of each family
    under base2novel; each DP method has its own command (dp=server, its C) and is also in
    the no-DP command of the same setting."""
    methods = _benchmark("methods")
    argvs = methods.commands("data", quick=False)
    prompts = argvs["prompts"]
    listed = prompts[prompts.index("--algorithms") + 1].split(",")
    assert set(listed) <= set(names()) and "protocol=base2novel" in prompts
    assert {"promptfl", "fedpgp", "fedtpg", "fedotp", "trip"} <= set(listed)
    off = argvs["dp:off"]
    assert set(methods.DP) <= set(off[off.index("--algorithms") + 1].split(","))
    groups = {"dp:off-lora": methods.DP_LORA, "dp:off-trip": methods.DP_TRIP}
    for group, members in groups.items():
        listed = argvs[group][argvs[group].index("--algorithms") + 1].split(",")
        assert set(members) == set(listed) and set(listed) <= set(names())
    assert "trip" in methods.DP_TRIP  # the mixture-of-experts family has its DP row
    for name, (_, clip) in {**methods.DP, **methods.DP_LORA, **methods.DP_TRIP}.items():
        off = next((argvs[g] for g, m in groups.items() if name in m), argvs["dp:off"])
        argv = argvs[f"dp:{name}"]
        assert argv[argv.index("--algorithms") + 1] == name
        assert {"dp=server", f"dp_clipping_norm={clip}"} <= set(argv)
        setting = [a for a in argv if not a.startswith(("dp", "aggregation"))]
        listed = off[off.index("--algorithms") + 1]
        only = [listed, off[-1]] if listed != name else [off[-1]]  # the list and folder
        assert [a for a in off if a not in setting] == only


def test_the_encoder_comparison_runs_every_lora_method_on_the_text_tower():
    """benchmarks/methods.py encoders: each LoRA method is listed with target=text (the stand-in
    has no open_clip image tower to target), beside FedCLIP and PromptFL."""
    methods = _benchmark("methods")
    argv = methods.commands("data", quick=False)["encoders"]
    listed = argv[argv.index("--algorithms") + 1].split(",")
    assert set(listed) <= set(names()) and {"fedclip", "promptfl"} <= set(listed)
    for name in ("fedit", "ffa-lora", "flora"):
        assert name in listed and f"{name}.target=text" in argv


def test_the_encoder_section_reports_each_lora_methods_aggregation_error(tmp_path):
    """The error table reads every round's record of every seed (round 0 has none) and a method
    without runs is left out."""
    methods = _benchmark("methods")
    for seed, errors in enumerate([(0.2, 0.6), (0.4, 1.0)]):
        run = tmp_path / f"fedit-seed{seed}"
        run.mkdir()
        history = [{"round": 0}, *[{"round": i + 1, "metrics": {
            "aggregation_error": e, "mean_update_norm": 2.0}} for i, e in enumerate(errors)]]
        (run / "results.json").write_text(json.dumps({"runs": [{"history": history}]}))
    rows = methods.lora_errors(tmp_path).splitlines()[2:]
    assert rows == ["| fedit | 0.5 (0.2 to 1) | 0.25 (0.1 to 0.5) |"]
    assert methods.lora_errors(tmp_path / "nothing") == ""


def _dp_folders(methods, tmp_path: Path) -> tuple[dict, list[str]]:
    """The DP commands with their folders in ``tmp_path``, each run's results written there
    (no DP: 50.0 ± 1.0, DP: 40.0 ± 2.0; method i's seed-0 epsilon history 3.5 + i/10, 7.9)."""
    argvs = {k: v for k, v in methods.commands("data", quick=False).items()
             if k.startswith("dp:")}
    argvs = {k: [*v[:-1], str(tmp_path / k.replace(":", "-"))] for k, v in argvs.items()}

    def write(folder: Path, algorithms: list[str], value: str) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        tables = {t: {"header": ["x", *algorithms], "rows": [["average", *[value] * len(
            algorithms)]]} for t in ("generalization", "personalization")}
        (folder / "compare.json").write_text(json.dumps({"tables": tables}))

    write(tmp_path / "dp-off", ["zeroshot", *methods.DP], "50.0 ± 1.0")
    write(tmp_path / "dp-off-lora", [*methods.DP_LORA], "50.0 ± 1.0")
    write(tmp_path / "dp-off-trip", [*methods.DP_TRIP], "50.0 ± 1.0")
    every = [*methods.DP, *methods.DP_LORA, *methods.DP_TRIP]
    for i, name in enumerate(every):
        write(tmp_path / f"dp-{name}", [name], "40.0 ± 2.0")
        history = [{"round": 0}, {"round": 1, "epsilon": 3.5 + i / 10},
                   {"round": 2, "epsilon": 7.9}]
        run = tmp_path / f"dp-{name}" / f"{name}-seed0"
        run.mkdir()
        (run / "results.json").write_text(json.dumps({"runs": [
            {"privacy": {"noise_multiplier": 1.25}, "history": history, "best_round": 2}]}))
        off = ("dp-off-lora" if name in methods.DP_LORA else
               "dp-off-trip" if name in methods.DP_TRIP else "dp-off")
        off_run = tmp_path / off / f"{name}-seed{i % 2}"
        off_run.mkdir()
        (off_run / "results.json").write_text(json.dumps({"runs": [{"best_round": i}]}))
    return argvs, every


def test_the_dp_table_reads_each_runs_spent_epsilon_and_both_accuracies(tmp_path):
    methods = _benchmark("methods")
    argvs, every = _dp_folders(methods, tmp_path)
    text = methods.dp_section(argvs)
    rows = [r for r in text.splitlines() if r.startswith("| ") and "family" not in r]
    for i, (row, name) in enumerate(zip(rows, every, strict=True)):
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert cells[0] == name and cells[3:5] == ["1.25", "7.90"]
        assert cells[5:] == ["50.0 ± 1.0", "40.0 ± 2.0", "50.0 ± 1.0", "40.0 ± 2.0",
                             f"{i} / 2"]
    assert text.count("fedclip compare") == len(argvs)
    assert "kept from this table's previous write" not in text


def test_the_dp_table_keeps_the_rows_of_runs_not_on_this_machine_and_refuses_rows_it_has_nowhere(
        tmp_path):
    """A family is added without re-running the others: a row whose runs are absent is kept
    as the previous write has it (and named), the zero-shot line too; one found nowhere is
    refused, naming its commands."""
    import shutil

    methods = _benchmark("methods")
    argvs, every = _dp_folders(methods, tmp_path)
    previous = methods.dp_section(argvs)
    for folder in ["dp-off", *(f"dp-{name}" for name in methods.DP)]:  # not on this machine
        shutil.rmtree(tmp_path / folder)
    (tmp_path / "dp-trip" / "compare.json").write_text(json.dumps({"tables": {t: {
        "header": ["x", "trip"], "rows": [["average", "41.0 ± 2.0"]]}
        for t in ("generalization", "personalization")}}))
    text = methods.dp_section(argvs, previous)
    rows = {r.split("|")[1].strip(): r for r in text.splitlines()
            if r.startswith("| ") and "family" not in r}
    assert list(rows) == every
    old_rows = {r.split("|")[1].strip(): r for r in previous.splitlines() if r.startswith("| ")}
    for name in methods.DP:  # the group's runs are gone: its rows are the previous ones
        assert rows[name] == old_rows[name]
    assert "41.0 ± 2.0" in rows["trip"] and "41.0 ± 2.0" not in previous
    # TRIP runs one seed (35 minutes a run), and its row says so; the others run three
    assert "| mixture of experts (seed 0 only) |" in rows["trip"]
    assert all("only" not in rows[name] for name in every if name != "trip")
    assert "Zero-shot: held-out 50.0 ± 1.0, clients 50.0 ± 1.0." in text
    assert f"The rows of {', '.join(methods.DP)} are kept" in text
    # half a row here (the DP run of TRIP without its no-DP run): refused, not kept, with the
    # one run to do named
    shutil.rmtree(tmp_path / "dp-off-trip")
    with pytest.raises(SystemExit, match=r"--only dp:off-trip\)"):
        methods.dp_section(argvs, previous)
    shutil.rmtree(tmp_path / "dp-trip")
    assert "| trip |" in methods.dp_section(argvs, previous)  # neither: kept
    with pytest.raises(SystemExit, match=r"--only dp:off-trip,dp:trip\)"):
        methods.dp_section(argvs, previous.replace("| trip |", "| gone |"))
    # a kept row whose C is not its command's any more is refused
    changed = previous.replace("| mixture of experts (seed 0 only) | 0.27 |",
                               "| mixture of experts (seed 0 only) | 0.5 |")
    assert changed != previous
    with pytest.raises(SystemExit, match="trip row has C 0.5, its command now 0.27"):
        methods.dp_section(argvs, changed)
    with pytest.raises(SystemExit, match="zero-shot row of dp:off"):
        methods.dp_section(argvs, previous.replace("Zero-shot:", "Zero shot:"))
