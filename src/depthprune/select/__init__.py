"""Which layers to remove: the selection criteria, one module each, in the ``CRITERIA`` registry.

A :class:`Criterion` names what it needs (``"distances"``: the analysis pass; ``"calibration"``: the model,
its tokenizer and tokenized calibration sequences; ``"nothing"``) and chooses ``n`` layers from a
:class:`SelectionContext`. :func:`choose` checks the request and the answer, whichever criterion it is.
Built in, one module each: ``similarity``, ``deepest``, ``block-influence``, ``iterative-similarity``,
``perplexity-greedy``, ``perplexity-oneshot``, ``taylor`` and ``taylor-plus`` (the loss-based ones share the fast path of
``select/calibration.py``). An explicit ``--layers`` spec is not a criterion: :func:`explicit_selection`
records it as ``explicit``. Every module of ``criteria/`` is imported here (``registry.import_plugins``): a
new criterion is one new file there.

A cut may remove whole layers or one kind of sub-layer (``SelectionContext.granularity``: 'layer', 'attention',
'mlp'); a criterion lists what it can choose in ``granularities`` (deepest, similarity and perplexity-greedy: all
three) and :func:`choose` refuses the others in one line. At a sub-layer granularity the selection's ``layers``
are the layers whose attention or MLP goes.

A criterion may declare ``options``, a dataclass of ``option(...)`` fields (its flags, YAML keys and API
keywords). :func:`criterion_options_class` composes those of every registered criterion into one flat
dataclass, and ``SelectionContext.options`` holds an instance of it: a criterion reads its own settings
there (``context.options.window``). ``CriterionOptions`` read as a module attribute is that class.

This package stays light (no torch at import): the CLI reads the registry to build its flags.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ..errors import DepthpruneError
from ..model.granularity import GRANULARITIES, check_granularity, unit_name
from ..options import Checked, compose, plugin_options
from ..registry import AFTER_BUILT_INS, Registry, import_plugins

if TYPE_CHECKING:
    from ..measure.distances import AngularDistances

NEEDS = ("distances", "calibration", "nothing")


@dataclass(frozen=True)
class Selection:
    """Layers to remove (0-based, sorted), the criterion that chose them, and its evidence.

    ``granularity``: 'layer' (the layers go), or 'attention' / 'mlp' (only that sub-layer of each of ``layers``
    goes). ``distance``: D[n][ℓ] of the removed block, when it is one contiguous measured block of whole layers.
    ``scores``: the criterion's own per-layer or per-block scores (JSON-ready), written into ``depthprune.json``.
    """

    layers: tuple[int, ...]
    criterion: str  # a registered criterion, or 'explicit'
    distance: float | None = None
    scores: dict = field(default_factory=dict)
    granularity: str = "layer"

    def describe(self) -> str:
        what = "layer(s)" if self.granularity == "layer" else f"{self.granularity} sub-layer(s) of layers"
        text = f"remove {len(self.layers)} {what} {format_layers(self.layers)} ({self.criterion}"
        return text + (f", angular distance {self.distance:.4f})" if self.distance is not None else ")")


@dataclass
class SelectionContext:
    """What a criterion may look at: the layer count always; distances, model and data when it needs them.

    ``batch_size``, ``token_mode`` (None: the distances' mode, else 'last') and ``progress`` tell the criteria
    that measure how to. ``cache`` holds what a criterion computed that serves other n (the greedy order, the
    one-shot losses, the captured layer arguments): one context per model and calibration set, e.g. a sweep's.
    ``options``: the criteria's options (:func:`criterion_options`; default: every option at its default).
    ``granularity``: what the chosen layers lose, 'layer' (all of it), 'attention' or 'mlp'.
    """

    num_layers: int
    distances: AngularDistances | None = None
    model: Any = None
    tokenizer: Any = None
    sequences: Sequence[Sequence[int]] | None = None  # tokenized calibration sequences
    batch_size: int = 8
    token_mode: str | None = None
    progress: bool = False
    cache: dict = field(default_factory=dict, compare=False, repr=False)
    options: Any = field(default_factory=lambda: criterion_options())
    granularity: str = "layer"


@dataclass(frozen=True)
class Criterion:
    """A way to choose the layers to remove.

    ``description``: one line, naming the paper it comes from. ``needs``: 'distances', 'calibration' or
    'nothing'. ``contiguous``: whether it always removes one block (of whole layers). ``granularities``: what it
    can choose, of 'layer', 'attention', 'mlp' (``context.granularity`` tells which is asked).
    ``select(context, n)`` returns a :class:`Selection` of exactly ``n`` layers. ``check_distances(distances)``, optional: raise a one-line
    :class:`DepthpruneError` when given distances cannot serve it (checked before any model loads).
    ``options``, optional: the dataclass of its own options (read from ``context.options``). ``order``: its
    place in the CLI's choices and the report (built-ins: 10, 20, ...).
    """

    name: str
    description: str
    needs: str
    contiguous: bool
    select: Callable[[SelectionContext, int], Selection]
    check_distances: Callable[[AngularDistances], None] | None = None
    options: type | None = None
    order: int = AFTER_BUILT_INS
    granularities: tuple[str, ...] = ("layer",)

    def __post_init__(self) -> None:
        if self.needs not in NEEDS:
            raise ValueError(f"criterion '{self.name}': needs must be one of {', '.join(NEEDS)}, not {self.needs!r}")
        if not self.granularities or not set(self.granularities) <= set(GRANULARITIES):
            raise ValueError(f"criterion '{self.name}': granularities must be some of {', '.join(GRANULARITIES)}, "
                             f"not {self.granularities!r}")


def check_criterion_granularity(criterion: str, granularity: str) -> None:
    """Refuse in one line a criterion that cannot choose at ``granularity``, naming those that can."""
    check_granularity(granularity)
    if granularity not in CRITERIA.get(criterion).granularities:
        able = [name for name in CRITERIA.names() if granularity in CRITERIA.get(name).granularities]
        raise DepthpruneError(f"criterion '{criterion}' cannot choose {unit_name(granularity)}: use one of "
                              f"{', '.join(able)}, or list them with --layers")


CRITERIA: Registry[Criterion] = Registry("criterion")


def criterion_options_class() -> type:
    """The options of every registered criterion, as one dataclass (checked when made)."""
    return compose("CriterionOptions", CRITERIA.option_classes(), module=__name__, bases=(Checked,),
                   doc="The options of the registered criteria, one field each (flags and YAML keys).")


def criterion_options(**values) -> Any:
    """The criteria's options from keyword values (the rest at their defaults), checked: one-line errors."""
    return plugin_options(criterion_options_class(), values, "criterion", "criteria")


def __getattr__(name: str):
    if name == "CriterionOptions":
        return criterion_options_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def format_layers(layers) -> str:
    """'20-27' or '3,7,9-10': compact, 0-based, inclusive ranges."""
    layers = sorted(layers)
    parts, start = [], None
    for i, layer in enumerate(layers):
        start = layer if start is None else start
        if i + 1 == len(layers) or layers[i + 1] != layer + 1:
            parts.append(str(start) if start == layer else f"{start}-{layer}")
            start = None
    return ",".join(parts)


def layer_ranges(spec: str) -> list[tuple[int, int]]:
    """The inclusive ranges of a spec ('20-27', '3,7,9', '0,5-7'), checked for syntax only, nothing expanded."""
    if not isinstance(spec, str):
        raise DepthpruneError(f"bad layer spec {spec!r}: give a string such as '20-27' or '3,7,9'")
    ranges = []
    for part in spec.split(","):
        match = re.fullmatch(r"\s*(\d+)\s*(?:-\s*(\d+)\s*)?", part)
        if not match:
            raise DepthpruneError(f"bad layer spec '{spec}': use 0-based indices and inclusive ranges, e.g. '20-27' or '3,7,9'")
        first, last = int(match[1]), int(match[2] if match[2] is not None else match[1])
        if first > last:
            raise DepthpruneError(f"bad layer range '{part.strip()}' in '{spec}': the first index must not exceed the last")
        ranges.append((first, last))
    return ranges


def parse_layers(spec: str, num_layers: int, granularity: str = "layer") -> tuple[int, ...]:
    """Parse '20-27', '3,7,9' or a mix ('0,5-7') into sorted 0-based layer indices; ranges are inclusive. At a
    sub-layer ``granularity`` they name the layers whose attention or MLP goes."""
    ranges = layer_ranges(spec)
    top = max(last for _, last in ranges)
    if top >= num_layers:  # checked before expanding: '0-3000000000' must not fill the memory first
        raise DepthpruneError(f"layer {top} out of range: the model has layers 0..{num_layers - 1}")
    layers = {layer for first, last in ranges for layer in range(first, last + 1)}
    if len(layers) >= num_layers:
        raise DepthpruneError(f"layer spec '{spec}' removes all {num_layers} {unit_name(granularity)}: keep at least one")
    return tuple(sorted(layers))


def _check_layer_count(distances: AngularDistances | None, num_layers: int) -> None:
    if distances is not None and distances.num_layers != num_layers:
        raise DepthpruneError(
            f"the distances were measured on a {distances.num_layers}-layer model but this one has {num_layers}: "
            "analyze this model"
        )


def check_block_request(n: int | None = None, fraction: float | None = None) -> None:
    """What can be checked of a block size without the model: exactly one of a whole ``n`` >= 1 or a fraction in (0, 1)."""
    if (n is None) == (fraction is None):
        raise DepthpruneError("give exactly one of a layer count n or a fraction")
    if fraction is not None and (isinstance(fraction, bool) or not isinstance(fraction, (int, float))
                                 or not 0 < fraction < 1):
        raise DepthpruneError(f"fraction {fraction} out of range: it must be between 0 and 1 (exclusive)")
    if n is not None and (isinstance(n, bool) or not isinstance(n, int)):
        raise DepthpruneError(f"n={n!r} is not a whole number of layers")
    if n is not None and n < 1:
        raise DepthpruneError(f"n={n} out of range: remove at least 1 layer")


def check_cut_request(n: int | None, fraction: float | None, layers: str | None, criterion: str,
                      granularity: str = "layer") -> str:
    """Check how the layers (or sub-layers) to cut are asked for (before anything loads); returns what the
    criterion needs."""
    if sum(x is not None for x in (n, fraction, layers)) != 1:
        raise DepthpruneError("give exactly one of --n, --fraction or --layers")
    check_granularity(granularity)
    if layers is not None:
        layer_ranges(layers)
        return "nothing"
    check_block_request(n, fraction)
    check_criterion_granularity(criterion, granularity)
    return CRITERIA.get(criterion).needs


def block_size(num_layers: int, n: int | None = None, fraction: float | None = None, granularity: str = "layer") -> int:
    """The number of layers (or sub-layers of one kind) to remove, from a count ``n`` or a ``fraction`` of the L
    layers (rounded)."""
    check_block_request(n, fraction)
    unit = unit_name(granularity)
    if fraction is not None:
        n = round(fraction * num_layers)
        if n == 0:
            raise DepthpruneError(f"fraction {fraction} of {num_layers} {unit} rounds to 0: use a larger fraction")
    if not 1 <= n < num_layers:
        raise DepthpruneError(f"n={n} out of range: remove between 1 and {num_layers - 1} of the {num_layers} {unit}")
    return n


def needs_of(names) -> set[str]:
    """What the criteria ``names`` need between them ('distances', 'calibration')."""
    return {CRITERIA.get(name).needs for name in names}


def check_distances_serve(criterion: str | None, distances: AngularDistances | None, granularity: str = "layer") -> None:
    """Whether given distances can serve ``criterion`` (None: no criterion chooses) at ``granularity``: its own
    check (e.g. block influence from distances that predate it), and sub-layer distances where it reads them."""
    entry = CRITERIA.get(criterion) if criterion is not None else None
    if entry is None or distances is None:
        return
    if entry.check_distances is not None:
        entry.check_distances(distances)
    if entry.needs == "distances" and granularity != "layer" and distances.sublayer_distances is None:
        raise DepthpruneError(f"criterion '{criterion}' at --granularity {granularity} needs sub-layer distances, "
                              "which these distances lack (measured before they were, or on an architecture whose "
                              "sub-layers are unknown): analyze the model again")


def choose(criterion: str, n: int, context: SelectionContext) -> Selection:
    """The ``n`` layers ``criterion`` removes, checked: n in range, what it needs present, its answer sound."""
    entry = CRITERIA.get(criterion)
    total = context.num_layers
    check_criterion_granularity(criterion, context.granularity)
    n = block_size(total, n=n, granularity=context.granularity)
    _check_layer_count(context.distances, total)
    if entry.needs == "distances" and context.distances is None:
        raise DepthpruneError(f"criterion '{criterion}' needs angular distances: pass --distances DIR or --data SRC")
    if entry.needs == "calibration" and (context.model is None or not context.sequences):
        raise DepthpruneError(f"criterion '{criterion}' needs the model and calibration text: pass --data SRC")
    check_distances_serve(criterion, context.distances, context.granularity)
    selection = entry.select(context, n)
    layers = selection.layers
    if len(layers) != n or len(set(layers)) != n or list(layers) != sorted(layers) or not all(
            0 <= layer < total for layer in layers):
        raise ValueError(f"criterion '{criterion}' chose {layers!r}, not {n} distinct sorted layers of 0..{total - 1}")
    if entry.contiguous and context.granularity == "layer" and layers[-1] - layers[0] + 1 != n:
        raise ValueError(f"criterion '{criterion}' is declared contiguous but chose {format_layers(layers)}")
    if selection.granularity != context.granularity:
        raise ValueError(f"criterion '{criterion}' was asked for {context.granularity}, chose {selection.granularity}")
    return selection


def choose_block(criterion: str, n: int, num_layers: int, distances: AngularDistances | None = None) -> Selection:
    """:func:`choose` for the criteria that need at most the distances (similarity, deepest)."""
    return choose(criterion, n, SelectionContext(num_layers, distances))


def block_distance(distances: AngularDistances | None, layers: Sequence[int]) -> float | None:
    """D[n][ℓ] of ``layers`` when they form one block and distances are known; else None."""
    contiguous = layers[-1] - layers[0] + 1 == len(layers)
    return float(distances.block(len(layers))[layers[0]]) if distances is not None and contiguous else None


def explicit_selection(spec: str, num_layers: int, distances: AngularDistances | None = None,
                       granularity: str = "layer") -> Selection:
    """A user-listed set of layers (at a sub-layer ``granularity``: whose attention or MLP goes); its distance is
    known when it is one contiguous block of whole layers."""
    layers = parse_layers(spec, num_layers, check_granularity(granularity))
    _check_layer_count(distances, num_layers)
    distance = block_distance(distances, layers) if granularity == "layer" else None
    return Selection(layers, "explicit", distance, granularity=granularity)


import_plugins(f"{__name__}.criteria")  # each registers itself; its ``order`` places it (the CLI's, the report's)
