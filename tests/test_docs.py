"""Every command and code block of README.md and docs/*.md runs as written, so that no example
breaks unnoticed.

A doc's blocks run in order, in a fresh folder, as a reader would run them one after the
other; what the test changes is said here and nowhere else:

* ``fedclip fetch pacs data/PACS`` writes a small generated PACS (its domains and classes, 8
  images each) into ``data/PACS`` (the tests are offline; the real download is tested with a
  fake hub in test_cli.py), and ``../shared/data/PACS`` (the original release, named by the
  measured docs) reads that folder;
* backbones that need weights (``standin``, ``open_clip:...``) become a tiny random open_clip
  model, rounds become 1 (``--rounds N``, ``rounds=N``; added where a command has none),
  ``--seeds`` one seed, ``configs/`` the repository's;
* ``make run`` runs the Makefile's own command; the other make targets, ``pip install`` and
  the environment set-up are checked (targets, files and extras exist), not run.

The Flower recipes (a simulation, a SuperLink and SuperNodes on localhost) and the paper's
table run as written, with the data on the embedded sample and few rounds, under the
``slow`` marker. A block that cannot run here says why in a ``<!-- docs-test: not run (...)
-->`` line above it.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from dataclasses import dataclass
from pathlib import Path

import pytest

from fedclip.cli import main

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^```(\w*)\n(.*?)^```\n", re.M | re.S)
NOT_RUN = re.compile(r"<!-- docs-test: not run \((.+?)\).*?-->\s*$")
SHELL_WORDS = {"for", "do", "done", "export", "kill", "printf", "flower-superlink",
               "flower-supernode", "flwr"}  # a shell recipe, not a list of commands


@dataclass(frozen=True)
class Block:
    doc: Path
    line: int
    lang: str
    text: str
    not_run: str | None  # the reason given in the doc, for a block that cannot run here

    def __str__(self) -> str:
        return f"{self.doc.relative_to(ROOT)}:{self.line}"


def blocks(doc: Path) -> list[Block]:
    text = doc.read_text(encoding="utf-8")
    found = []
    for m in FENCE.finditer(text):
        before = text[:m.start()].rstrip().splitlines()
        note = NOT_RUN.search(before[-1]) if before else None
        found.append(Block(doc, text[:m.start()].count("\n") + 1, m.group(1), m.group(2),
                           note.group(1) if note else None))
    return found


def commands(script: str) -> list[list[str]]:
    """The commands of a shell block: continuation lines joined, comments dropped, ``&&``
    chains split."""
    out: list[list[str]] = []
    for line in script.replace("\\\n", " ").splitlines():
        words = shlex.split(line, comments=True)
        while words:
            cut = words.index("&&") if "&&" in words else len(words)
            out.append(words[:cut])
            words = words[cut + 1:]
    return [c for c in out if c]


def kind(block: Block) -> str:
    """How the tests treat a block: 'not run' (the doc says why), 'script' (a shell recipe
    with Flower processes: slow), 'paper' (the paper's table: slow), 'long' (a comparison,
    hours as documented: slow), 'commands' (quick), 'python', 'toml', 'text' (output and
    layouts)."""
    if block.not_run:
        return "not run"
    if block.lang in ("bash", "sh"):
        found = commands(block.text)
        if any(c[0] in SHELL_WORDS or "&" in c or any(">" in w or "$(" in w for w in c)
               for c in found):
            return "script"
        if any(c[:2] == ["fedclip", "paper"] for c in found):
            return "paper"
        if any(c[:2] == ["fedclip", "compare"] for c in found):
            return "long"
        return "commands"
    return {"python": "python", "toml": "toml"}.get(block.lang, "text")


ALL = [b for doc in DOCS for b in blocks(doc)]


# --- what the tests change in a command ------------------------------------------------------
def substituted(argv: list[str], tiny: str, weights_only: bool = False) -> list[str]:
    """``argv`` (after ``fedclip``) with the substitutions of the module docstring;
    ``weights_only``: only backbones that would need weights from elsewhere."""
    argv = list(argv)
    for i, word in enumerate(argv):
        prev = argv[i - 1] if i else ""
        if prev == "--backbone" and (word.startswith("open_clip:") or (
                word == "standin" and not weights_only)):
            argv[i] = tiny
        elif prev == "--rounds":
            argv[i] = "1"
        elif prev == "--seeds":
            argv[i] = word.split(",")[0]
        elif prev == "--config" and word.startswith("configs/"):
            argv[i] = str(ROOT / word)
        elif prev in ("-c", "--run-config"):
            argv[i] = re.sub(r"\brounds=\d+", "rounds=1", word)
    command = next((w for w in argv if not w.startswith("-")), "")
    if command in ("run", "compare", "paper") and "--rounds" not in argv and "--resume" not in argv:
        argv += ["--rounds", "1"]
    return argv


def sample_copy(target: Path) -> None:
    """What ``fedclip fetch pacs`` leaves, small: PACS's domains and classes, 8 generated
    images each (the embedded sample's 10 a domain cannot hold 13 clients a domain)."""
    from fedclip.data.specs import PACS
    from tests.conftest import make_image_folder

    make_image_folder(target, {d: dict.fromkeys(PACS.classes, 8) for d in PACS.domains},
                      size=32)


def makefile_target(name: str) -> list[str]:
    """A Makefile target's recipe lines, continuation lines joined."""
    text = (ROOT / "Makefile").read_text()
    m = re.search(rf"^{re.escape(name)}:.*\n((?:\t.*\n)+)", text, re.M)
    assert m, f"the Makefile has no target {name!r}"
    return [line.strip() for line in m.group(1).replace("\\\n", " ").splitlines()
            if not line.strip().startswith("#")]


def check_pip(argv: list[str]) -> None:
    """A ``pip install`` line names files and extras that exist."""
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"][
        "optional-dependencies"]
    for i, word in enumerate(argv):
        if argv[i - 1] in ("-r", "-c"):
            assert (ROOT / word).is_file(), word
        if m := re.fullmatch(r"\.\[([\w,-]+)\]", word):
            assert set(m.group(1).split(",")) <= set(extras), word


class Reader:
    """Runs a doc's blocks in order in ``cwd``, as a reader would, with the substitutions."""

    def __init__(self, cwd: Path, tiny: str, capsys) -> None:  # noqa: ANN001
        self.cwd, self.tiny, self.capsys = cwd, tiny, capsys

    def fedclip(self, argv: list[str], where: Block, weights_only: bool = False) -> str:
        if argv[:2] == ["fetch", "pacs"]:  # offline: a small generated PACS stands in
            sample_copy(self.cwd / argv[2])
            return ""
        if "../shared/data/PACS" in argv:  # a measured doc's command, on the original release
            if not (self.cwd / "data" / "PACS").exists():
                sample_copy(self.cwd / "data" / "PACS")
            argv = [w.replace("../shared/data/PACS", "data/PACS") for w in argv]
        argv = substituted(argv, self.tiny, weights_only)
        code = main(argv)
        out, err = self.capsys.readouterr()
        assert code == 0, f"{where}: fedclip {shlex.join(argv)} exited {code}\n{out}\n{err}"
        return out

    def command(self, argv: list[str], where: Block) -> None:
        name = argv[0]
        if name == "fedclip":
            self.fedclip(argv[1:], where)
        elif name == "make":
            recipe = makefile_target(argv[1])
            if argv[1] == "run":  # the Makefile's own command
                line = next(r for r in recipe if "bin/fedclip run" in r)
                self.fedclip(shlex.split(line)[1:], where)
            elif argv[1] == "test":  # running the suite from inside it: checked, not run
                assert any("--durations" in r for r in recipe)
        elif name == "pip" and argv[1] == "install":
            check_pip(argv)
        elif name in ("python", "python3") and argv[1] == "-c":
            done = subprocess.run([sys.executable, *argv[1:]], cwd=self.cwd,
                                  capture_output=True, text=True, timeout=120)
            assert done.returncode == 0, f"{where}: {done.stderr[-2000:]}"
        elif argv[:3] == ["python3", "-m", "venv"] or name in (".", "source"):
            pass  # the reader's own environment: the tests run in theirs
        else:
            raise AssertionError(f"{where}: the docs test does not know how to run "
                                 f"{shlex.join(argv)!r}; teach it or say why not")

    def python(self, block: Block) -> None:
        code = block.text.replace('backbone="standin"', f'backbone="{self.tiny}"')
        code = re.sub(r"\brounds=\d+", "rounds=1", code)
        exec(compile(code, str(block), "exec"), {"__name__": "__docs__"})  # noqa: S102
        self.capsys.readouterr()


@pytest.fixture(scope="module")
def shared_cache(tmp_path_factory) -> Path:
    """One feature cache for the docs: each sample is extracted once, not once a doc."""
    return tmp_path_factory.mktemp("docs-cache")


@pytest.fixture
def reader(tmp_path, tiny_arch, capsys, monkeypatch, shared_cache):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # nothing here may reach the network
    monkeypatch.setenv("FEDCLIP_CACHE", str(shared_cache))
    return Reader(tmp_path, tiny_arch, capsys)


def read(doc: Path, reader: Reader, kinds: tuple[str, ...]) -> None:
    """Run a doc's blocks of these kinds, in order."""
    for block in blocks(doc):
        what = kind(block)
        if what in kinds and what in ("commands", "long"):
            for argv in commands(block.text):
                reader.command(argv, block)
        elif what in kinds and what == "python":
            reader.python(block)
        elif what in kinds and what == "toml":
            tomllib.loads(block.text)


# --- the quick examples, doc by doc ----------------------------------------------------------
@pytest.mark.parametrize("doc", DOCS, ids=lambda d: d.name)
def test_the_examples_of_a_doc_run_as_written(doc, reader):
    read(doc, reader, ("commands", "python", "toml"))


@pytest.mark.slow
@pytest.mark.parametrize("doc", [d for d in DOCS if any(kind(b) == "long" for b in blocks(d))],
                         ids=lambda d: d.name)
def test_the_comparisons_of_a_doc_run_with_one_round(doc, reader):
    read(doc, reader, ("commands", "python", "toml", "long"))


def test_every_block_is_run_or_says_why_not():
    kinds = {str(b): kind(b) for b in ALL}
    assert set(kinds.values()) <= {"commands", "python", "toml", "text", "script", "paper",
                                   "long", "not run"}
    # the blocks that do not run here, each with its reason in the doc
    assert sorted((str(b), b.not_run) for b in ALL if b.not_run) == sorted(
        (str(b), b.not_run) for b in ALL if kind(b) == "not run")
    assert all(len(b.not_run) > 10 for b in ALL if b.not_run)
    scripts = sorted(str(b) for b in ALL if kind(b) == "script")
    assert scripts == sorted(str(_script(*s)) for s in SCRIPTS), (
        "a new shell recipe: give it a slow test below")
    for b in ALL:  # a text block holds no command a reader would copy
        if kind(b) == "text":
            assert not re.search(r"^\s*(fedclip|pip|make|python) ", b.text, re.M), str(b)


def test_the_readme_installs_every_extra_and_all_is_their_union():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]
    (everything,) = extras["all"]
    named = set(re.fullmatch(r"fedclip\[([\w,-]+)\]", everything).group(1).split(","))
    assert named == set(extras) - {"all", "dev"}
    readme = (ROOT / "README.md").read_text()
    assert "pip install -c constraints.txt '.[all]'" in readme


def test_the_algorithm_table_follows_the_registry():
    """docs/algorithms.md has a row for every registered algorithm, and its 'text tower'
    column says yes (, prompted / , open_clip) exactly for the algorithms that train through
    one."""
    from fedclip.algorithms import ALGORITHMS, names

    text = (ROOT / "docs" / "algorithms.md").read_text()
    header = next(line for line in text.splitlines() if line.startswith("| name |"))
    col = [c.strip() for c in header.strip("|").split("|")].index("text tower")
    tower: dict[str, str] = {}
    for line in text.splitlines():
        if line.startswith("| `"):
            cells = [c.strip() for c in line.strip().strip("|").split(" | ")]
            for name in re.findall(r"`([\w-]+)`", cells[0]):
                tower[name] = cells[col].split(",")[0]
    assert set(tower) == set(names())
    expected = {"tower": "yes", "features": "features", "none": "no"}
    assert {n: tower[n] for n in names()} == {n: expected[ALGORITHMS[n].uses_text]
                                             for n in names()}


def test_clip_weights_brought_as_a_folder_load_offline_as_the_doc_says(tmp_path, capsys,
                                                                        monkeypatch):
    """docs/reproducing.md: the two files of an open_clip model folder, passed as
    ``open_clip:local-dir:DIR``, load with no network (QuickGELU from the config), and run."""
    import open_clip
    import torch
    from safetensors.torch import save_file

    from fedclip.backbones import load_backbone
    from tests.conftest import TINY_CONFIG

    folder = tmp_path / "vit-b-32-openai"
    folder.mkdir()
    config = {"model_cfg": {**TINY_CONFIG, "quick_gelu": True},
              "preprocess_cfg": {"mean": [0.48145466, 0.4578275, 0.40821073],
                                 "std": [0.26862954, 0.26130258, 0.27577711],
                                 "interpolation": "bicubic", "resize_mode": "shortest"}}
    (folder / "open_clip_config.json").write_text(json.dumps(config))
    torch.manual_seed(1)
    model = open_clip.CLIP(**config["model_cfg"]).eval()
    save_file({k: v.contiguous() for k, v in model.state_dict().items()},
              folder / "open_clip_model.safetensors")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    spec = f"open_clip:local-dir:{folder}"
    backbone = load_backbone(spec)
    pixels = torch.randn(2, 3, 32, 32)
    assert torch.allclose(backbone.encode_images(pixels), model.encode_image(pixels), atol=1e-5)
    assert any(type(m).__name__ == "QuickGELU" for m in backbone.model.modules())
    assert main(["run", "--backbone", spec, "--heldout", "sketch", "--rounds", "1",
                 "--out", str(tmp_path / "run")]) == 0
    assert "sketch" in capsys.readouterr().out


# --- the slow ones: Flower recipes and the paper's table, as written -------------------------
SCRIPTS = [  # (first line, a command it holds): each shell recipe, run by a test below
    ("export FLWR_TELEMETRY_ENABLED", "flower-stop"),  # the simulation
    ("export FLWR_TELEMETRY_ENABLED", "flower-superlink --insecure"),  # localhost deployment
]


def _script(first: str, contains: str) -> Block:
    (block,) = [b for b in ALL if kind(b) == "script" and b.text.startswith(first)
                and contains in b.text]
    return block


def _free_port() -> int:
    from tests.deployment import free_port

    return free_port()


def _env(tmp_path: Path) -> dict[str, str]:
    bin_dir = Path(sys.executable).parent
    return {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
            "FEDCLIP_CACHE": str(tmp_path / "cache"), "HOME": str(tmp_path / "home")}


@pytest.mark.slow
def test_the_flower_simulation_recipe_works_as_written(tmp_path):
    """docs/flower.md: the config.toml, then flower-run (its table at the end) and
    flower-stop, which stops the SuperLink flower-run started (ports of the test's own)."""
    toml = next(b for b in ALL if b.doc.name == "flower.md" and b.lang == "toml"
                and "local-sim" in b.text)
    recipe = _script("export FLWR_TELEMETRY_ENABLED", "flower-stop").text
    recipe = re.sub(r"\brounds=\d+", "rounds=2", recipe)
    home = tmp_path / "flwr-home"
    home.mkdir()
    (home / "config.toml").write_text(toml.text)
    env = {**_env(tmp_path), "FLWR_HOME": str(home),
           "FLWR_LOCAL_SUPERLINK_HTTP_API_PORT": str(_free_port()),
           "FLWR_LOCAL_CONTROL_API_PORT": str(_free_port())}
    project = _project_copy(tmp_path)
    try:
        done = subprocess.run(["bash", "-c", f"set -e\n{recipe}"], cwd=project, env=env,
                              capture_output=True, text=True, timeout=900)
    finally:  # whatever happened, the SuperLink it started is stopped by its pid
        subprocess.run([sys.executable, "-m", "fedclip.cli", "flower-stop"], env=env,
                       capture_output=True, check=False)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert re.search(r"run \d+: finished:completed", done.stdout)
    assert "│   sketch │" in done.stdout  # the in-process table
    assert "stopped the local SuperLink (pid " in done.stdout
    result = json.loads((project / "runs" / "sim" / "results.json").read_text())
    assert result["runs"][0]["heldout"] == "sketch" and result["runs"][0]["rounds"] == 2


def _project_copy(tmp_path: Path) -> Path:
    project = tmp_path / "fedclip"
    project.mkdir()
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy(ROOT / name, project / name)
    shutil.copytree(ROOT / "src", project / "src",
                    ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    return project


@pytest.mark.slow
def test_the_localhost_deployment_recipe_works_as_written(tmp_path):
    """docs/flower.md: a SuperLink and four SuperNodes on one machine, as a user copies it (in
    a copy of the project, with free ports in place of the doc's and two rounds, not five)."""
    recipe = _script("export FLWR_TELEMETRY_ENABLED", "flower-superlink --insecure").text
    link, first = _free_port(), _free_port()
    recipe = recipe.replace("9093", str(link)).replace("port=9101", f"port={first}")
    recipe = recipe.replace("rounds=5", "rounds=2")
    assert "--port \"$port\"" in recipe and f"127.0.0.1:{link}" in recipe
    project = _project_copy(tmp_path)
    try:
        done = subprocess.run(["bash", "-c", f"set -e\n{recipe}"], cwd=project,
                              env=_env(tmp_path), capture_output=True, text=True, timeout=900)
    finally:  # whatever happened, no SuperLink or SuperNode of this test survives it
        for port in (link, *range(first, first + 4)):
            subprocess.run(["pkill", "-f", f"127.0.0.1:{port}"], check=False)
            subprocess.run(["pkill", "-f", "--", f"--port {port}"], check=False)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert re.search(r"run \d+: finished:completed", done.stdout)
    assert "│   sketch │" in done.stdout
    result = json.loads((project / "runs" / "deploy" / "results.json").read_text())
    assert result["runs"][0]["heldout"] == "sketch" and result["runs"][0]["rounds"] == 2
    for d in ("art_painting", "cartoon", "photo", "sketch"):
        assert "address already in use" not in (project / f"node-{d}.log").read_text()


@pytest.mark.slow
def test_the_papers_table_commands_run_as_written(reader):
    """docs/reproducing.md: the paper's table (weights that need a download: a tiny CLIP) and
    the trial on the stand-in, as written, on the embedded sample, one round."""
    (data,) = [b for b in ALL if kind(b) == "paper" and "data/PACS" in b.text]
    (trial,) = [b for b in ALL if kind(b) == "paper" and "standin" in b.text]
    sample_copy(reader.cwd / "data" / "PACS")
    for block in (data, trial):
        for argv in commands(block.text):
            shown = reader.fedclip(argv[1:], block, weights_only=True)
    assert "standin is NOT CLIP" in shown and "CLIP FedAvg not run" in shown
    rows = json.loads((reader.cwd / "runs" / "paper-trial" / "paper.json").read_text())["rows"]
    assert [r[0] for r in rows] == ["art_painting", "cartoon", "photo", "sketch", "average"]
    assert all(r[6] == "-" and r[10] != "-" for r in rows)  # CLIP FedAvg not run; FedCLIP did


def test_the_readme_methods_table_lists_every_registered_method():
    """The README's family table names each registered algorithm once, and b2n only where
    the algorithm is open-vocabulary."""
    from fedclip.algorithms.registry import algorithm_class, names

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = readme.split("## Methods", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("| ") and "`" in line]
    listed: dict[str, str] = {}
    for row in rows:
        cells = row.split(" | ")
        for name in re.findall(r"`([a-z0-9-]+)`", cells[1]):
            assert name not in listed, name
            listed[name] = cells[-1]
    assert set(listed) == set(names())
    for name, protocols in listed.items():
        if "b2n" in protocols:
            assert algorithm_class(name).open_vocabulary, name
