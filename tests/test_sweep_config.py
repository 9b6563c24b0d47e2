"""Sweep settings: YAML + flags, and a clear error for every bad value."""

from __future__ import annotations

import pytest

from depthprune.errors import DepthpruneError
from depthprune.sweep import block_sizes, resolve_config


def test_yaml_then_flags(tmp_path):
    path = tmp_path / "sweep.yaml"
    path.write_text("model: gemma3-270m\ndata: c4.jsonl\nfractions: 0:0.3:0.1\nstrategies: [deepest]\nlimit: 5\n")
    c = resolve_config(path, limit=7, heal=None)
    assert c.model == "gemma3-270m" and c.fractions == [0.0, 0.1, 0.2, 0.3] and c.strategies == ["deepest"]
    assert c.limit == 7 and c.heal == ["none"]
    assert block_sizes(c, 18) == [0, 2, 4, 5]
    assert block_sizes(resolve_config(data="x", n="0,4,2,4"), 18) == [0, 2, 4]


@pytest.mark.parametrize("settings,message", [
    ({"data": "x", "fractions": "0,1.2"}, "out of range"),
    ({"data": "x", "fractions": "0:0.5"}, "start:stop:step"),
    ({"data": "x", "heal_fractions": "-0.1"}, "out of range"),
    ({"data": "x", "strategies": "similarity,random"}, "unknown strategy 'random'"),
    ({"data": "x", "heal": "qlora"}, "needs training text"),
    ({"data": "x", "tasks": "mmlu,squad"}, "unknown task 'squad'"),
    ({}, "needs calibration data"),
])
def test_bad_settings(settings, message):
    with pytest.raises(DepthpruneError, match=message):
        resolve_config(**settings)


def test_unknown_key_in_yaml(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("data: x\nfractons: [0.1]\n")
    with pytest.raises(DepthpruneError, match="unknown sweep setting.*fractons"):
        resolve_config(path)
    path.write_text("data: [unclosed\n")
    with pytest.raises(DepthpruneError, match="not valid YAML"):
        resolve_config(path)


def test_n_beyond_the_model():
    with pytest.raises(DepthpruneError, match="out of range"):
        block_sizes(resolve_config(data="x", n="0,30"), 30)
