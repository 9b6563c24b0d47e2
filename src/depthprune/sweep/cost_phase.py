"""The sweep's cost phase: the speed and memory of every layer count, timed at the end of each run that
finishes and copied into the points' rows."""

from __future__ import annotations

import time

from ..errors import DepthpruneError
from ..select import SelectionContext, choose
from .config import SweepConfig
from .metrics import flatten_metrics
from .plan import Point
from .progress import SweepProgress, duration
from .settings import _cost_options
from .store import read_cost, read_points, save_cost


def last_cost_seconds(db) -> float | None:
    """How long the last cost phase of this sweep took (None before the first)."""
    try:
        record = next(iter(read_cost(db).values()), None)
    except DepthpruneError:  # a damaged cost table: the phase rewrites it
        return None
    seconds = ((record or {}).get("phase") or {}).get("seconds")
    return seconds if isinstance(seconds, (int, float)) else None


def cost_phase(model, c: SweepConfig, db, points: list[Point], total: int,
               context: SelectionContext, progress: SweepProgress) -> dict[int, dict]:
    """Time every distinct layer count of the sweep, in interleaved rounds, and record it (one transaction).

    A model's cost depends only on its layer count, so each count is cut once per round from the one loaded
    model (healed points have the same shapes); every point's cost metrics are then the median of its count.
    Runs at the end of every run that finishes, so all counts are timed under the same conditions, now.
    """
    from tqdm.auto import tqdm

    from ..measure.cost import interleaved_costs, round_order

    removals: dict[int, tuple[int, ...]] = {}
    for p in points:
        if p.n not in removals:
            removals[p.n] = tuple(choose(p.criterion, p.n, context).layers) if p.n else ()
    order = round_order(removals, c.cost_rounds)
    start = time.perf_counter()
    with progress.stage(f"cost: timing {len(removals)} layer counts (n = {', '.join(map(str, sorted(removals)))}) in "
                        f"{c.cost_rounds} interleaved rounds, each the best of {c.cost_repeats} repeats", has_bar=True):
        bar = tqdm(total=len(order), unit="timing", desc="cost", disable=not progress.bars)

        def on_measure(index: int, r: int, n: int) -> None:
            if index:
                bar.update(1)
            bar.set_postfix_str(f"round {r + 1}/{c.cost_rounds}, n={n}")
            if not progress.bars and (index == 0 or order[index - 1][0] != r):
                progress.say(f"cost round {r + 1}/{c.cost_rounds}")

        with bar:
            o = _cost_options(c)
            costs = interleaved_costs(model, removals, o.rounds, on_measure=on_measure, prefill_len=o.prefill_len,
                                      decode_tokens=o.decode_tokens, repeats=o.repeats, seed=c.seed)
            bar.update(1)
    phase = {"seconds": round(time.perf_counter() - start, 1), "order": [n for _, n in order], "total_layers": total}
    for record in costs.values():
        record["phase"] = phase
    updates = {}
    for p in read_points(db):
        record = costs.get(p["n"])
        if record is not None:
            details = {**p["details"], "cost": record}
            updates[p["key"]] = (flatten_metrics(details["evaluation"], record, details.get("healing")), details)
    save_cost(db, costs, updates)
    for n, r in costs.items():
        progress.say(_cost_line(n, r))
    progress.say(f"cost timed in {duration(phase['seconds'])}; {len(updates)} points updated")
    return costs


def _cost_line(n: int, r: dict) -> str:
    def ms(key: str) -> str:
        low, high = r["spread"][key]
        return f"{r[key]:.3g} ms/token [{low:.3g}–{high:.3g}]"

    return (f"cost n={n} ({r['num_layers']} layers): prefill {ms('prefill_ms_per_token')}, decode "
            f"{ms('decode_ms_per_token')}, weights {r['weight_bytes'] / 2**20:,.1f} MiB, peak "
            f"{r['peak_memory_bytes'] / 2**20:,.1f} MiB")
