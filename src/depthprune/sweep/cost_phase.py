"""The sweep's cost phase: the speed and memory of every cut size (layer count, or count of attention or MLP
sub-layers removed), timed at the end of each run that finishes and copied into the points' rows."""

from __future__ import annotations

import time

from ..errors import DepthpruneError
from ..select import SelectionContext
from .config import SweepConfig
from .metrics import flatten_metrics
from .plan import Point
from .point import select_point
from .progress import SweepProgress, duration
from .settings import _cost_options
from .store import LAYER, CutSize, read_cost, read_points, save_cost


def last_cost_seconds(db) -> float | None:
    """How long the last cost phase of this sweep took (None before the first)."""
    try:
        record = next(iter(read_cost(db).values()), None)
    except DepthpruneError:  # a damaged cost table: the phase rewrites it
        return None
    seconds = ((record or {}).get("phase") or {}).get("seconds")
    return seconds if isinstance(seconds, (int, float)) else None


def cost_phase(model, c: SweepConfig, db, points: list[Point], total: int,
               context: SelectionContext, progress: SweepProgress) -> dict[CutSize, dict]:
    """Time every distinct cut size (n, granularity) of the sweep, in interleaved rounds, and record it (one
    transaction).

    A cut's cost depends only on its size: how many layers it removes, or how many attention or MLP sub-layers
    (the shapes of what is kept are the same whichever go, healed or not). So each size is cut once per round
    from the one loaded model, as a loaded checkpoint of it is (a removed sub-layer's stand-in computes nothing
    and holds no KV cache: :func:`~depthprune.measure.cost.removed`); every point's cost metrics are then the
    median of its size. Runs at the end of every run that finishes, so all sizes are timed under the same
    conditions, now.
    """
    from tqdm.auto import tqdm

    from ..measure.cost import interleaved_costs, round_order

    removals: dict[CutSize, object] = {}
    for p in points:
        size = (p.n, p.granularity if p.n else LAYER)
        if size not in removals:
            layers = tuple(select_point(p, context).layers) if p.n else ()
            removals[size] = layers if size[1] == LAYER else {p.granularity: layers}
    order = round_order(removals, c.cost_rounds)
    start = time.perf_counter()
    with progress.stage(f"cost: timing {len(removals)} cut sizes (n = {', '.join(map(_size_name, sorted(removals)))}) in "
                        f"{c.cost_rounds} interleaved rounds, each the best of {c.cost_repeats} repeats", has_bar=True):
        bar = tqdm(total=len(order), unit="timing", desc="cost", disable=not progress.bars)

        def on_measure(index: int, r: int, size: CutSize) -> None:
            if index:
                bar.update(1)
            bar.set_postfix_str(f"round {r + 1}/{c.cost_rounds}, n={_size_name(size)}")
            if not progress.bars and (index == 0 or order[index - 1][0] != r):
                progress.say(f"cost round {r + 1}/{c.cost_rounds}")

        with bar:
            o = _cost_options(c)
            costs = interleaved_costs(model, removals, o.rounds, on_measure=on_measure, prefill_len=o.prefill_len,
                                      decode_tokens=o.decode_tokens, repeats=o.repeats, seed=c.seed)
            bar.update(1)
    phase = {"seconds": round(time.perf_counter() - start, 1), "order": [_size_name(size) for _, size in order],
             "total_layers": total}
    for (n, granularity), record in costs.items():
        record.update(phase=phase, granularity=granularity, removed=n)
    updates = {}
    for p in read_points(db):
        record = costs.get((p["n"], p.get("granularity", LAYER) if p["n"] else LAYER))
        if record is not None:
            details = {**p["details"], "cost": record}
            metrics = {**p["metrics"], **flatten_metrics(details["evaluation"], record, details.get("healing"))}
            updates[p["key"]] = (metrics, details)
    save_cost(db, costs, updates)
    for size, r in costs.items():
        progress.say(_cost_line(size, r))
    progress.say(f"cost timed in {duration(phase['seconds'])}; {len(updates)} points updated")
    return costs


def _size_name(size: CutSize) -> str:
    """'2' for two layers removed, '8@attention' for eight attention sub-layers (as in the points' keys)."""
    n, granularity = size
    return str(n) if granularity == LAYER else f"{n}@{granularity}"


def _cost_line(size: CutSize, r: dict) -> str:
    def ms(key: str) -> str:
        low, high = r["spread"][key]
        return f"{r[key]:.3g} ms/token [{low:.3g}–{high:.3g}]"

    return (f"cost n={_size_name(size)} ({r['num_layers']} layers): prefill {ms('prefill_ms_per_token')}, decode "
            f"{ms('decode_ms_per_token')}, weights {r['weight_bytes'] / 2**20:,.1f} MiB, peak "
            f"{r['peak_memory_bytes'] / 2**20:,.1f} MiB, KV cache {r['kv_bytes_per_token'] / 2**10:,.1f} KiB/token")
