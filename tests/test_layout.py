"""The package's shape (ARCHITECTURE.md): stages as sub-packages, imports only downwards, no cycles, small files.

Stages in the order data flows; a module may import its own stage and the stages before it, never a later one.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "depthprune"

# A module's stage is its first path component under depthprune/ (a top-level module is its own name).
STAGES = [
    {"errors", "registry", "options", "outputs", "progress", "data", "config"},  # building blocks
    {"model"},
    {"measure"},
    {"select"},
    {"repair"},
    {"heal"},
    {"evaluate"},
    {"gguf"},
    {"sweep"},
    {"report"},
    {"api", "__init__"},
    {"cli"},
]
MAX_FILE_LINES = 500
MAX_FUNCTION_LINES = 80
MAX_TOP_LEVEL_MODULES = 12


def _stage(module: str) -> int:
    head = module.split(".")[0]
    for i, names in enumerate(STAGES):
        if head in names:
            return i
    raise AssertionError(f"depthprune.{module} belongs to no stage: add it to STAGES in this test")


def _modules() -> dict[str, Path]:
    found = {}
    for path in SRC.rglob("*.py"):
        parts = list(path.relative_to(SRC).with_suffix("").parts)
        if parts[-1] == "__init__" and len(parts) > 1:
            parts = parts[:-1]
        found[".".join(parts)] = path
    return found


def _imports(module: str, path: Path) -> set[str]:
    """The depthprune modules ``module`` imports (absolute names under depthprune, without the prefix)."""
    package = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
    if module == "__init__":
        package = []
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - (node.level - 1)] if node.level > 1 else package
                target = [*base, *(node.module.split(".") if node.module else [])]
            elif node.module and node.module.split(".")[0] == "depthprune":
                target = node.module.split(".")[1:]
            else:
                continue
            names = [a.name for a in node.names]
            for name in names:  # `from . import x` names a module when x is one
                candidate = ".".join([*target, name])
                found.add(candidate if candidate in MODULES else ".".join(target))
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "depthprune":
                    found.add(".".join(alias.name.split(".")[1:]))
    return {m for m in found if m and m in MODULES}


MODULES = _modules()
GRAPH = {module: _imports(module, path) for module, path in MODULES.items()}


def test_imports_go_down_the_stages():
    upward = [f"depthprune.{m} imports depthprune.{t}" for m, targets in GRAPH.items() for t in targets
              if _stage(t) > _stage(m)]
    assert not upward, "\n".join(sorted(upward))


def test_no_import_cycles():
    """No cycle among modules (a package's __init__ importing its own plug-ins is the one allowed pattern)."""
    def edges(module):
        # A plug-in importing its package's registry and the package importing its plug-ins is registration,
        # not a cycle of meaning: the package's __init__ is left out of its own sub-modules' edges.
        return {t for t in GRAPH[module] if not module.startswith(t + ".")}

    state: dict[str, int] = {}
    cycles = []

    def visit(module, trail):
        state[module] = 1
        for target in sorted(edges(module)):
            if state.get(target) == 1:
                cycles.append(" -> ".join([*trail[trail.index(target):], target]))
            elif target not in state:
                visit(target, [*trail, target])
        state[module] = 2

    for module in sorted(GRAPH):
        if module not in state:
            visit(module, [module])
    assert not cycles, "\n".join(cycles)


def test_few_modules_at_the_top():
    top = sorted(m for m in MODULES if "." not in m and not (SRC / m).is_dir())
    assert len(top) <= MAX_TOP_LEVEL_MODULES, top


@pytest.mark.parametrize("module", sorted(MODULES))
def test_files_and_functions_are_small(module):
    text = MODULES[module].read_text()
    assert text.count("\n") <= MAX_FILE_LINES, f"{MODULES[module]} has {text.count(chr(10))} lines"
    long = [f"{node.name} ({node.end_lineno - node.lineno + 1} lines)" for node in ast.walk(ast.parse(text))
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)
            and node.end_lineno - node.lineno + 1 > MAX_FUNCTION_LINES]
    assert not long, f"{MODULES[module]}: {', '.join(long)}"
