"""The package's shape: no import circle anywhere (function-level imports included), and the
folders say which code is the shared core, the in-process runner and the Flower apps. The
layer rules themselves are import-linter's contract in pyproject.toml (make lint)."""

from __future__ import annotations

import ast
from pathlib import Path

import grimp

SRC = Path(__file__).resolve().parents[1] / "src" / "fedclip"


def _cycles(graph: grimp.ImportGraph) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph.find_modules_directly_imported_by(v):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for module in sorted(graph.modules):
        if module not in index:
            visit(module)
    return found


def test_no_import_circle():
    graph = grimp.build_graph("fedclip", include_external_packages=False,
                              exclude_type_checking_imports=True, cache_dir=None)
    assert "fedclip.core.run_folder" in graph.modules  # the graph sees the whole package
    assert "fedclip.report" in graph.find_modules_directly_imported_by(
        "fedclip.core.run_folder")  # ... function-level imports included
    assert _cycles(graph) == []


def test_only_the_run_folder_writes_results():
    """One writer of a run folder: results.json, result.json and adapters are written in
    fedclip.core.run_folder alone (every runtime calls it)."""
    writers = set()
    for path in SRC.rglob("*.py"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and getattr(node.func, "id", getattr(
                    node.func, "attr", "")) in ("save_adapter", "results_document"):
                writers.add(path.relative_to(SRC).as_posix())
    assert writers == {"core/run_folder.py"}


def test_public_functions_say_what_they_do():
    """Every public function and method that is not an override carries a docstring."""
    import importlib

    missing = []
    for folder in ("core", "inprocess", "flower", "algorithms"):
        for path in sorted((SRC / folder).glob("*.py")):
            module = importlib.import_module(f"fedclip.{folder}.{path.stem}".removesuffix(
                ".__init__"))
            for node in ast.parse(path.read_text()).body:
                if isinstance(node, ast.FunctionDef):
                    items, bases = [node], ()
                elif isinstance(node, ast.ClassDef):
                    items = [n for n in node.body if isinstance(n, ast.FunctionDef)]
                    bases = getattr(module, node.name).__mro__[1:]
                else:
                    continue
                for fn in items:
                    if fn.name.startswith("_") or ast.get_docstring(fn):
                        continue
                    if any(hasattr(b, fn.name) for b in bases):  # an override
                        continue
                    missing.append(f"{path.relative_to(SRC)}:{fn.name}")
    assert missing == [], "\n".join(missing)


def test_the_client_app_imports_only_what_a_message_needs():
    """A deployed SuperNode starts a fresh process for every message: importing the
    ClientApp must not pull the backbones' libraries, plotting, Ray or the DP accountant (flwr
    itself imports typer, rich and click, so those are not fedclip's to avoid)."""
    import subprocess
    import sys

    heavy = ("open_clip", "transformers", "torchvision", "timm", "matplotlib", "pandas",
             "tensorboard", "ray", "datasets", "scipy", "dp_accounting", "sentence_transformers")
    script = ("import sys, fedclip.flower.client_app; "
              f"print(sorted(m for m in {heavy!r} if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "[]"


DYNAMO_SCRIPT = """
import sys, torch
from fedclip.dynamo import defer_dynamo_import
deferred = defer_dynamo_import() if sys.argv[1] == "defer" else False
torch.manual_seed(0)
p = torch.nn.Parameter(torch.randn(64, 64))
opt = torch.optim.Adam([p], lr=1e-3, betas=(0.9, 0.98), eps=1e-6, weight_decay=0.2)
for _ in range(3):
    opt.zero_grad()
    (p.tanh() * p).sum().backward()
    opt.step()
opt.load_state_dict(opt.state_dict())
loaded = "sympy" in sys.modules
if sys.argv[2] == "submodule":  # as torchvision.ops does
    from torch._dynamo.utils import is_compile_supported
    assert callable(is_compile_supported)
    import torch._dynamo.testing  # one the package does not import itself
torch._dynamo.config  # anything else loads the real module
print(deferred, loaded, type(sys.modules["torch._dynamo"].config).__name__,
      type(sys.modules["torch._dynamo"]).__name__, sys.modules["torch._dynamo"].__file__,
      p.detach().double().sum().item())
"""


def test_a_clientapp_process_trains_without_importing_torch_dynamo():
    """torch.optim imports torch._dynamo (and sympy) only to mark itself untraceable; a
    deployed node's fresh process skips that import and trains to the same bits, and
    anything else asked of torch._dynamo still gets the real module."""
    import subprocess
    import sys

    def run(mode, then=""):
        done = subprocess.run([sys.executable, "-c", DYNAMO_SCRIPT, mode, then],
                              capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-2000:]
        return done.stdout.split()

    deferred, plain = run("defer"), run("plain")
    assert deferred[:2] == ["True", "False"] and plain[:2] == ["False", "True"]
    assert deferred[2:5] == plain[2:5]  # the real module (and its config), when asked
    assert deferred[4].endswith("__init__.py")
    assert deferred[5] == plain[5]  # bit for bit
    assert run("defer", "submodule")[2:] == deferred[2:]  # submodules load the real package


def test_the_dynamo_stand_in_is_set_only_on_a_torch_it_is_tested_with(monkeypatch, caplog):
    """On a torch release the stand-in was not tested with, torch._dynamo is left to load as
    usual (nothing replaced, no import hook added), and the log says so at info level (-v)."""
    import logging
    import sys

    import torch

    from fedclip import dynamo

    # the release this environment runs is one the test above checks
    assert dynamo.torch_release(torch.__version__) in dynamo.DYNAMO_STAND_IN_TORCH
    assert dynamo.torch_release("2.14.1+cu130") == "2.14"
    before, finders = sys.modules.get("torch._dynamo"), list(sys.meta_path)
    monkeypatch.setattr(torch, "__version__", "2.99.0+cpu")
    with caplog.at_level(logging.INFO, logger="fedclip.dynamo"):
        assert dynamo.defer_dynamo_import() is False
    assert sys.modules.get("torch._dynamo") is before and sys.meta_path == finders
    assert "torch 2.99.0+cpu: torch._dynamo is imported as usual" in caplog.text
