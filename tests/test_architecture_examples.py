"""The plug-in examples of ARCHITECTURE.md work as written: each is one module that registers itself, and its
option becomes a flag of the commands that use it. (A doc that shows how to add a plug-in must not rot.)"""

from __future__ import annotations

import argparse
import re
import sys
import types
from pathlib import Path

import pytest

from depthprune.cli.app import build_parser
from depthprune.evaluate.registry import EVAL_TASKS
from depthprune.heal import HEAL_METHODS
from depthprune.select import CRITERIA, SelectionContext, choose, criterion_options_class

DOC = (Path(__file__).resolve().parents[1] / "ARCHITECTURE.md").read_text()


def _example(heading: str) -> str:
    """The first python block after the heading that starts with ``heading``."""
    section = DOC[DOC.index(f"### {heading}"):]
    return re.search(r"```python\n(.*?)```", section, flags=re.S).group(1)


def _load(source: str, package: str) -> types.ModuleType:
    """Run an example as a module of ``package`` (its relative imports resolve there)."""
    module = types.ModuleType(f"{package}._architecture_example")
    module.__package__ = package
    sys.modules[module.__name__] = module  # dataclasses look their module up
    exec(compile(source, f"ARCHITECTURE.md ({package})", "exec"), module.__dict__)
    return module


def _flags(command: str) -> set[str]:
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices[command]
    return {s for action in sub._actions for s in action.option_strings}


@pytest.fixture
def registered():
    added = []
    yield added
    for registry, name in added:
        registry.unregister(name)
    for name in [m for m in sys.modules if m.endswith("._architecture_example")]:
        del sys.modules[name]


def test_the_criterion_example(registered):
    _load(_example("A selection criterion"), "depthprune.select.criteria")
    registered.append((CRITERIA, "first"))
    assert "--skip" in _flags("prune") and "--skip" in _flags("sweep")
    context = SelectionContext(10, options=criterion_options_class()(skip=2))
    assert choose("first", 4, context).layers == (2, 3, 4, 5)


def test_the_task_example(registered):
    _load(_example("An evaluation task"), "depthprune.evaluate.tasks")
    registered.append((EVAL_TASKS, "piqa"))
    assert {"--piqa", "--piqa-limit"} <= _flags("eval") and {"--piqa", "--piqa-limit"} <= _flags("sweep")
    assert EVAL_TASKS.names().index("piqa") == len(EVAL_TASKS) - 1  # order=60: after the built-in tasks


def test_the_healing_method_example(registered):
    _load(_example("A healing method"), "depthprune.heal.methods")
    registered.append((HEAL_METHODS, "head"))
    assert "--head-lr-scale" in _flags("heal") and "head" in HEAL_METHODS
