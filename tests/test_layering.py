"""The layers of ARCHITECTURE.md hold: no module imports a higher layer, no folder imports a folder
above it, and no import cycles.

Imports are read from the source (function-level ones too, which hide cycles). `if TYPE_CHECKING:`
blocks never run, so the layer rule skips them, but the cycle rule counts them: two modules that
need each other's names, even only for type hints, are one design split in two. And the heavy
libraries a low module must not load are checked by importing it in a fresh interpreter.
"""

from __future__ import annotations

import ast
import graphlib
import subprocess
import sys
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"

# Lowest first; a module may import its own layer and those below (longest prefix decides).
LAYERS = [
    ["lorasweep", "lorasweep.errors", "lorasweep.files", "lorasweep.redact",
     "lorasweep.packaged_models", "lorasweep.sandbox", "lorasweep.study.defaults",
     "lorasweep.report.numbers", "lorasweep.integrations", "lorasweep.optional"],
    ["lorasweep.variants", "lorasweep.kinds", "lorasweep.denoisers", "lorasweep.peft_config",
     "lorasweep.config",
     "lorasweep.recipe", "lorasweep.precision", "lorasweep.result_key"],  # the study file
    ["lorasweep.space"],  # cells and trials
    ["lorasweep.records"],  # what is recorded, and every CSV
    ["lorasweep.models", "lorasweep.quantize", "lorasweep.methods", "lorasweep.tasks",
     "lorasweep.dropout"],
    ["lorasweep.workbench", "lorasweep.optim"],  # groups: what a trial starts from
    ["lorasweep.train", "lorasweep.curvature.hvp",
     "lorasweep.curvature.lanczos", "lorasweep.curvature.measure"],
    ["lorasweep.study.backend", "lorasweep.study.store"],
    ["lorasweep.trainers", "lorasweep.study.options"],  # how a claimed group trains
    ["lorasweep.analysis"],
    ["lorasweep.report"],
    ["lorasweep.tracking"],  # each finished trial also a run in MLflow or trackio
    ["lorasweep.study", "lorasweep.curvature", "lorasweep.export", "lorasweep.suggest",
     "lorasweep.cli"],  # commands: the worker loop, plan, folder, curvature, export, suggest
]

# What a low module must not load, even indirectly.
NOT_LOADED = {
    "lorasweep.records": ["torch", "optuna", "lorasweep.study", "lorasweep.analysis"],
    "lorasweep.study.store": ["torch", "peft", "lorasweep.train", "lorasweep.workbench"],
    "lorasweep.analysis.transfer": ["torch", "optuna", "lorasweep.report"],
    "lorasweep.report": ["torch", "optuna", "lorasweep.curvature.command"],
    # the optional trackers load when a study names them, never with the worker loop
    "lorasweep.tracking": ["torch", "mlflow", "trackio", "lorasweep.study"],
    # a worker over an external command loads no deep-learning library for it
    "lorasweep.trainers.command": ["torch", "lorasweep.train", "lorasweep.workbench"],
    "lorasweep.workbench": ["optuna", "lorasweep.study", "lorasweep.train", "lorasweep.report"],
    # curvature warms up through the trainer's own step, never through the worker loop
    "lorasweep.curvature.command": ["lorasweep.study.runner", "lorasweep.study.local_workers"],
    # `lorasweep slurm --dry-run` and its refusals load no deep-learning library
    "lorasweep.study.slurm": ["torch", "optuna", "lorasweep.study.runner"],
    "lorasweep.study.shared_storage": ["torch", "optuna", "lorasweep.study.store"],
}


def modules() -> dict[str, Path]:
    out = {}
    for path in (SRC / "lorasweep").rglob("*.py"):
        name = ".".join(path.relative_to(SRC).with_suffix("").parts)
        out[name.removesuffix(".__init__")] = path
    return out


def _skipped(node: ast.AST) -> bool:
    return isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)


def imports(path: Path, known: set[str], type_only: bool = False) -> set[str]:
    """The lorasweep modules `path` imports (`from pkg import mod` counts as pkg.mod); with
    `type_only`, those imported under `if TYPE_CHECKING:` too."""
    found: set[str] = set()
    todo = [ast.parse(path.read_text())]
    while todo:
        for node in ast.iter_child_nodes(todo.pop()):
            if _skipped(node) and not type_only:
                continue
            todo.append(node)
            if isinstance(node, ast.Import):
                found |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                for alias in node.names:
                    sub = f"{node.module}.{alias.name}"
                    found.add(sub if sub in known else node.module)
    return {name for name in found if name in known}


def layer(name: str) -> int:
    matches = [(len(p), i) for i, prefixes in enumerate(LAYERS) for p in prefixes
               if name == p or name.startswith(p + ".")]
    assert matches, f"{name}: in no layer of tests/test_layering.py (and ARCHITECTURE.md)"
    return max(matches)[1]


def graph(type_only: bool = False) -> dict[str, set[str]]:
    known = modules()
    return {name: imports(path, set(known), type_only) for name, path in known.items()}


def test_no_module_imports_a_higher_layer():
    upward = [f"{name} (layer {layer(name)}) imports {dep} (layer {layer(dep)})"
              for name, deps in graph().items() for dep in deps if layer(dep) > layer(name)]
    assert not upward, "\n".join(upward)


def unit(name: str) -> str:
    """The folder a module is in (lorasweep.study.store: lorasweep.study); a module directly in
    lorasweep, and lorasweep itself, is a unit of its own."""
    folder = ".".join(name.split(".")[:2])
    return folder if SRC.joinpath(*folder.split(".")).is_dir() else name


def folder_imports() -> dict[str, set[str]]:
    """Which units each unit imports (type-only imports too, as the cycle rule counts them)."""
    out: dict[str, set[str]] = {}
    for name, deps in graph(type_only=True).items():
        out.setdefault(unit(name), set()).update(unit(d) for d in deps if unit(d) != unit(name))
    return out


def test_no_folder_imports_a_higher_or_cyclic_folder():
    """A folder, taken whole, sits at the layer of its highest module and imports only what sits
    at or below it; folders of one layer import one way (no cycle between folders)."""
    known = modules()
    height = {u: max(layer(n) for n in known if unit(n) == u) for u in map(unit, known)}
    edges = folder_imports()
    upward = [f"{name} (layer {height[name]}) imports {dep} (layer {height[dep]})"
              for name, deps in edges.items() for dep in deps if height[dep] > height[name]]
    assert not upward, "\n".join(upward)
    graphlib.TopologicalSorter(edges).prepare()  # a CycleError names the cycle


def test_no_import_cycles():
    graphlib.TopologicalSorter(graph(type_only=True)).prepare()  # a CycleError names the cycle


def test_the_check_sees_an_upward_and_a_hidden_cyclic_import(tmp_path):
    """The rules above can fail: a lazy import inside a function is seen; one under
    TYPE_CHECKING only by the cycle rule."""
    source = tmp_path / "m.py"
    source.write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n"
                      "    from lorasweep.train import TrialResult\n"
                      "def f():\n    from lorasweep.report import tables\n")
    found = imports(source, set(modules()))
    assert found == {"lorasweep.report.tables"}
    assert imports(source, set(modules()), type_only=True) == {"lorasweep.report.tables",
                                                               "lorasweep.train"}
    assert layer("lorasweep.report.tables") > layer("lorasweep.records")
    assert (unit("lorasweep.study.store"), unit("lorasweep.space")) == ("lorasweep.study",
                                                                         "lorasweep.space")
    with pytest.raises(graphlib.CycleError):
        graphlib.TopologicalSorter({"a": {"b"}, "b": {"a"}}).prepare()


@pytest.mark.parametrize("module", sorted(NOT_LOADED))
def test_low_modules_load_no_heavy_layer(module):
    code = (f"import sys, {module}; print(' '.join(m for m in {NOT_LOADED[module]!r} "
            "if m in sys.modules))")
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            check=True).stdout.split()
    assert not loaded, f"importing {module} loads {loaded}"
