"""The package's layering, read from the source with ``ast``: imports point down only.

    cli, __main__, ui > batch > the tasks: pipeline, training, eval, export > components (the one store)
    > hub > weights (+ lora, layouts: the other readers and writers of weight files) > convert
    > models, text_encoders, schedulers, ops, tiny, settings, images > validation, png, distributed

Modules of one layer may import each other. The package root imports nothing when imported; its public names
(``from kandinsky import Kandinsky21, save_png``) load pipeline and png on first use. Proof tooling (parity, benchmark, testing) may import anything;
only the CLI imports parity and benchmark, and only tooling imports testing. Every import counts, including
those inside functions and module names given to ``importlib.import_module`` as plain strings.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "kandinsky"
LAYERS = [  # top first
    {"cli", "__main__", "ui"},
    {"batch"},
    {"pipeline", "training", "eval", "export"},
    {"components"},
    {"hub"},
    {"weights", "lora", "layouts"},
    {"convert"},
    {"models", "text_encoders", "schedulers", "ops", "tiny", "settings", "images"},
    {"validation", "png", "distributed"},
]
TASKS = {"pipeline", "training", "eval", "export"}  # each takes a Components store, never another task
TOOLING = {"parity", "benchmark", "testing"}
INIT_LAZY = {"pipeline", "png"}  # what the package root's public names come from
RANK = {unit: rank for rank, units in enumerate(LAYERS) for unit in units}
MODULE_NAME = re.compile(r"^kandinsky(\.\w+)+$")


def _unit(path: Path, root: Path = PACKAGE) -> str:
    """The top-level module or subpackage of the package that ``path`` belongs to."""
    parts = path.relative_to(root).with_suffix("").parts
    return "__init__" if parts == ("__init__",) else parts[0]


def imported_units(path: Path, root: Path = PACKAGE) -> set[str]:
    """The package units that the file at ``path`` imports (``kandinsky.X...`` -> ``X``)."""
    parts = ["kandinsky", *path.relative_to(root).with_suffix("").parts]
    package = parts[:-1]  # what a relative import starts from (a package's __init__ is inside the package)
    names = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = package[:len(package) - node.level + 1] if node.level else []
            module = ".".join(base + ([node.module] if node.module else []))
            # `from kandinsky import ops` imports the unit `ops`
            names += [f"{module}.{alias.name}" for alias in node.names] if module == "kandinsky" else [module]
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and MODULE_NAME.match(node.value):
            names.append(node.value)
    return {name.split(".")[1] for name in names if name.startswith("kandinsky.")}


def _files() -> list[Path]:
    return sorted(PACKAGE.rglob("*.py"))


def test_every_module_has_a_layer():
    unknown = sorted({_unit(p) for p in _files()} - set(RANK) - TOOLING - {"__init__"})
    assert not unknown, f"give {unknown} a place in LAYERS or TOOLING of tests/test_structure.py"


@pytest.mark.parametrize("path", _files(), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_imports_point_down(path):
    unit = _unit(path)
    imported = imported_units(path) - {unit}
    if unit == "__init__":  # `import kandinsky` stays light: the public names load their modules on first use
        assert imported <= INIT_LAZY, f"kandinsky/__init__.py may only name {sorted(INIT_LAZY)}, not {sorted(imported)}"
        eager = [node for node in ast.parse(path.read_text()).body if isinstance(node, (ast.Import, ast.ImportFrom))]
        assert not eager, "kandinsky/__init__.py must import nothing at import time"
        return
    if unit in TOOLING:
        return
    assert "testing" not in imported, f"{unit} imports the test helpers (kandinsky.testing)"
    if unit != "cli":
        assert not imported & {"parity", "benchmark"}, f"{unit} imports proof tooling: only the CLI may"
    upward = sorted(u for u in imported - TOOLING if RANK.get(u, len(LAYERS)) < RANK[unit])
    assert not upward, f"kandinsky/{path.relative_to(PACKAGE)} ({unit}) imports upward: {upward}"


def test_the_checker_sees_every_kind_of_import(tmp_path):
    """A guard for the checker itself: absolute, relative, from-package, in-function and string imports."""
    (tmp_path / "sub").mkdir()
    file = tmp_path / "sub" / "inner.py"
    file.write_text("import kandinsky.cli\nfrom .. import pipeline\nfrom kandinsky import training\n"
                    "from . import sibling\n"
                    "def load():\n    from ..weights import x\n"
                    "MODULE = 'kandinsky.parity'\nTEXT = 'see kandinsky.lora for adapters'\n")
    assert imported_units(file, tmp_path) == {"cli", "pipeline", "training", "sub", "weights", "parity"}


@pytest.mark.parametrize("path", _files(), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_no_private_names_are_imported_from_other_modules(path):
    private = [f"{node.module}.{alias.name}" for node in ast.walk(ast.parse(path.read_text()))
               if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("kandinsky")
               for alias in node.names if alias.name.startswith("_") and not alias.name.startswith("__")]
    assert not private, f"kandinsky/{path.relative_to(PACKAGE)} imports private names {private}: make them public"


def test_tasks_do_not_import_each_other():
    """Training, export and evaluation take a Components store (or a model from it), never a pipeline; the
    component benchmarks and the parity tooling neither (only the end-to-end benchmarks run the pipeline)."""
    for path in _files():
        unit = _unit(path)
        if unit in TASKS:
            others = sorted(imported_units(path) & TASKS - {unit})
            assert not others, f"kandinsky/{path.relative_to(PACKAGE)} ({unit}) imports other tasks: {others}"
    end_to_end = {"pipeline.py", "gpu.py", "batch.py", "__init__.py"}  # benchmark/: the end-to-end benchmarks
    for path in sorted((PACKAGE / "benchmark").glob("*.py")) + sorted((PACKAGE / "parity").glob("*.py")):
        if path.parent.name == "benchmark" and path.name in end_to_end:
            continue
        assert "pipeline" not in imported_units(path), f"kandinsky/{path.relative_to(PACKAGE)} imports the pipeline"


MAX_POSITIONAL = 8  # more and a call reads as a row of unnamed values: take the rest by keyword


@pytest.mark.parametrize("path", _files(), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_no_function_takes_more_than_8_positional_parameters(path):
    wide = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            names = [a.arg for a in node.args.posonlyargs + node.args.args if a.arg not in ("self", "cls")]
            if len(names) > MAX_POSITIONAL:
                wide.append(f"{node.name}({len(names)})")
    assert not wide, f"kandinsky/{path.relative_to(PACKAGE)}: {wide} take more than {MAX_POSITIONAL} positional " \
                     "parameters: make the rest keyword-only"


def test_pipeline_files_stay_readable():
    long = {str(p.relative_to(PACKAGE)): n for p in sorted((PACKAGE / "pipeline").glob("*.py"))
            if (n := len(p.read_text().splitlines())) > 600}
    assert not long, f"pipeline files over 600 lines: {long}"
