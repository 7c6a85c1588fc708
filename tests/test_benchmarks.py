"""The benchmarks that have a ``--smoke`` mode run, in seconds, and write what they say."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

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
