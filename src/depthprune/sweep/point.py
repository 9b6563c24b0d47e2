"""One point of a sweep: its layers chosen, the cut (healed or not) evaluated, its row recorded.

Unhealed points are cut from the one loaded model in memory (``layers_removed``: no copy, no reload); healed
points heal a copy of the cut (:mod:`.heal_point`) and evaluate the merged result. The executors
(:mod:`.executors`) call these three steps: :func:`select_point` and :func:`record_point` where
``results.sqlite`` is, :func:`run_point` wherever the point runs.
"""

from __future__ import annotations

import dataclasses
import shutil
import time
from pathlib import Path

from ..model.surgery import layers_removed
from ..select import SelectionContext, choose
from .config import SweepConfig
from .heal_point import free_accelerator_cache, heal_point, heal_status, heal_steps, healed_line, offloaded
from .metrics import flatten_metrics
from .plan import Point, point_dir
from .progress import SweepProgress, duration
from .settings import eval_options
from .store import save_point


def select_point(point: Point, context: SelectionContext):
    """The layers a point removes (its criterion's :class:`~depthprune.select.Selection`; None for the full model).
    Cheap once the analysis is done: the Ray driver computes it for every point and sends it by value."""
    return choose(point.criterion, point.n, context) if point.n > 0 else None


def run_point(model, tokenizer, c: SweepConfig, work: Path, point: Point, selection, total: int,
              progress: SweepProgress) -> dict:
    """Evaluate one point (cut, heal, evaluate) and return its row, the keyword arguments of
    :func:`~depthprune.sweep.store.save_point` (with the seconds it took in ``details``); writes no row.

    ``model`` comes back unchanged, so the next point can use it. Its cost metrics come later, from the cost
    phase. Runs in the sweep's process (serial) or in a Ray worker (:mod:`.executors.ray`), which returns
    the row to the driver.
    """
    start = time.perf_counter()
    layers = selection.layers if selection else ()
    progress.say(f"cut: removing layers {list(layers) if layers else 'none'}")
    healing = None
    if not point.healed:
        with layers_removed(model, layers) as cut:
            evaluation = _evaluate(cut, tokenizer, c, progress=progress)
    else:
        steps = heal_steps(c, point.heal)
        with offloaded(model, c.device):
            with progress.stage(f"healing ({point.heal}, {steps} steps)", detail=heal_status(work, point, steps)):
                healed, healing = heal_point(model, tokenizer, c, work, point, selection, total)
            progress.say(healed_line(healing))
            evaluation = _evaluate(healed, tokenizer, c, progress=progress)
            del healed
            free_accelerator_cache()
    metrics = flatten_metrics(evaluation, None, healing)
    seconds = round(time.perf_counter() - start, 1)
    return dict(n=point.n, fraction=point.n / total, criterion=point.criterion, heal=point.heal,
                removed_layers=tuple(layers), distance=selection.distance if selection else None, metrics=metrics,
                details={"evaluation": evaluation, "cost": None, "healing": healing, "seconds": seconds})


def record_point(c: SweepConfig, work: Path, db, row: dict, progress: SweepProgress) -> None:
    """Save one point's row (one transaction; a failure recorded for it goes), say its numbers, and drop its
    healed model unless kept. Only the process that owns ``results.sqlite`` calls this."""
    save_point(db, **row)
    metrics = row["metrics"]
    progress.say(f"done in {duration(row['details']['seconds'])}: " + ", ".join(
        f"{k}={v:.4g}" for k, v in metrics.items() if isinstance(v, float) and not k.endswith("_chance")))
    point = Point(row["n"], row["criterion"], row["heal"])
    if point.healed and not c.keep_models:
        shutil.rmtree(point_dir(work, point), ignore_errors=True)


def _evaluate(model, tokenizer, c: SweepConfig, progress: SweepProgress) -> dict:
    """Every task of ``c`` on ``model``, one after the other, each saying it starts (and drawing its bar)."""
    from ..evaluate.suite import evaluate

    runs = [([task], None) for task in c.tasks] + ([([], c.lm_eval)] if c.lm_eval else [])
    result: dict | None = None
    for index, (tasks, lm_eval) in enumerate(runs, 1):
        name = tasks[0] if tasks else "lm-eval " + ",".join(lm_eval)
        with progress.stage(f"evaluating {name} ({index}/{len(runs)})", has_bar=bool(tasks)):
            options = dataclasses.replace(eval_options(c), lm_eval=lm_eval or [])  # lm-eval runs once, last
            r = evaluate(model, tasks, tokenizer=tokenizer, options=options, progress=progress.bars,
                         **{task: c.task_data[task] for task in tasks})
        if result is None:
            result = r
        else:
            result["tasks"].update(r["tasks"])
            if "lm_eval" in r:
                result["lm_eval"] = r["lm_eval"]
    return result
