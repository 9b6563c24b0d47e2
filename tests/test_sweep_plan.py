"""A sweep's points: the full model once, then every size by each criterion and healing, in that order."""

from __future__ import annotations

import pickle
from pathlib import Path

from depthprune.sweep.plan import UNPRUNED_POINT, Point, point_dir, sweep_points
from depthprune.sweep.settings import resolve_config


def test_points_cover_sizes_criteria_and_healings_in_order():
    c = resolve_config(data="docs.jsonl", n=[0, 2, 4], criteria=["deepest", "similarity"], heal=["none", "lora"],
                       heal_fractions=[0.25], heal_data="docs.jsonl", tasks=["c4"], c4="docs.jsonl")
    points = sweep_points(c, 8)
    assert points == [UNPRUNED_POINT, Point(2, "deepest", "none"), Point(2, "deepest", "lora"),
                      Point(2, "similarity", "none"), Point(2, "similarity", "lora"),
                      Point(4, "deepest", "none"), Point(4, "similarity", "none")]
    assert [p.key for p in points[:3]] == ["n=0/unpruned/none", "n=2/deepest/none", "n=2/deepest/lora"]
    assert [p.healed for p in points[1:3]] == [False, True]


def test_a_point_is_a_value():
    point = Point(2, "deepest", "lora")
    assert pickle.loads(pickle.dumps(point)) == point and hash(point) == hash(Point(2, "deepest", "lora"))
    assert point_dir(Path("out"), point) == Path("out/points/n002-deepest-lora")
