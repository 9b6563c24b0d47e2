"""Choosing the block: similarity argmin, the deepest-layers heuristic, explicit specs, and bad input."""

from __future__ import annotations

import numpy as np
import pytest

from depthprune.errors import DepthpruneError
from depthprune.measure.distances import AngularDistances
from depthprune.select import block_size, choose_block, explicit_selection, format_layers, parse_layers


def _distances(L: int = 8) -> AngularDistances:
    # Distance grows with block size and is smallest for blocks starting at layer 4.
    pairwise = np.zeros((L + 1, L + 1))
    for i in range(L + 1):
        for j in range(L + 1):
            pairwise[i, j] = 0.05 * abs(i - j) + (0.0 if min(i, j) == 4 else 0.01 * abs(min(i, j) - 4))
    return AngularDistances(pairwise, 10, "last")


def test_similarity_picks_the_argmin():
    sel = choose_block("similarity", 3, 8, _distances())
    assert sel.layers == (4, 5, 6) and sel.criterion == "similarity"
    assert sel.distance == pytest.approx(0.15)


def test_deepest_keeps_the_final_layer():
    sel = choose_block("deepest", 3, 8)
    assert sel.layers == (4, 5, 6) and sel.distance is None
    assert choose_block("deepest", 7, 8).layers == tuple(range(7))
    assert choose_block("deepest", 2, 8, _distances()).distance == pytest.approx(_distances().block(2)[5])


def test_similarity_needs_matching_distances():
    with pytest.raises(DepthpruneError, match="needs angular distances"):
        choose_block("similarity", 2, 8)
    with pytest.raises(DepthpruneError, match="8-layer model but this one has 12"):
        choose_block("similarity", 2, 12, _distances())


@pytest.mark.parametrize("spec,expected", [("20-27", tuple(range(20, 28))), ("3,7,9", (3, 7, 9)),
                                           ("0, 5-7 ,5", (0, 5, 6, 7)), ("4", (4,))])
def test_parse_layers(spec, expected):
    assert parse_layers(spec, 30) == expected


@pytest.mark.parametrize("spec,message", [("30", "out of range"), ("0-29", "removes all"), ("5-3", "must not exceed"),
                                          ("a-b", "bad layer spec"), ("", "bad layer spec"), ("-1", "bad layer spec")])
def test_parse_layers_rejects(spec, message):
    with pytest.raises(DepthpruneError, match=message):
        parse_layers(spec, 30)


def test_format_layers():
    assert format_layers([9, 3, 7, 8, 20]) == "3,7-9,20"
    assert format_layers(range(20, 28)) == "20-27"


def test_block_size_from_count_or_fraction():
    assert block_size(30, n=8) == 8
    assert block_size(30, fraction=0.25) == 8  # round(7.5) = 8, banker's rounding
    assert block_size(18, fraction=0.5) == 9
    for kwargs, message in [({"n": 0}, "out of range"), ({"n": 30}, "out of range"), ({"fraction": 1.0}, "out of range"),
                            ({"fraction": 0.01}, "rounds to 0"), ({}, "exactly one"), ({"n": 2, "fraction": .1}, "exactly one")]:
        with pytest.raises(DepthpruneError, match=message):
            block_size(30, **kwargs)


def test_explicit_selection_distance_only_when_contiguous():
    d = _distances()
    assert explicit_selection("4-6", 8, d).distance == pytest.approx(0.15)
    assert explicit_selection("1,5", 8, d).distance is None
    assert explicit_selection("1,5", 8, d).criterion == "explicit"
