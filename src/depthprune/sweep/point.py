"""One point of a sweep: its layers chosen, the cut (repaired or not, healed or not) evaluated, its row recorded.

Unhealed points are cut from the one loaded model in memory (:mod:`.cut`: no copy, no reload; a repaired cut
changes one weight matrix, put back after); healed points heal a copy of the cut (:mod:`.heal_point`) and
evaluate the merged result.

Agreement: the full model (n = 0) is evaluated with each multiple-choice question's choice kept, and its
choices are stored in its row (``details["predictions"]``); every later point is evaluated with them as its
``reference``, so its metrics hold ``{task}_agreement``. A sweep without n = 0 has no agreement. The executors
(:mod:`.executors`) call these three steps: :func:`select_point` and :func:`record_point` where
``results.sqlite`` is, :func:`run_point` wherever the point runs.
"""

from __future__ import annotations

import dataclasses
import shutil
import time
from pathlib import Path

from ..select import SelectionContext, choose
from .config import SweepConfig
from .cut import parameters_removed, point_cut
from .heal_point import free_accelerator_cache, heal_point, heal_status, heal_steps, healed_line, offloaded
from .metrics import flatten_metrics
from .plan import Point, point_dir
from .progress import SweepProgress, duration
from .settings import eval_options
from .store import UNPRUNED, save_point

Predictions = dict[str, list[int]]  # task -> the full model's choice per question


def select_point(point: Point, context: SelectionContext):
    """The layers a point removes, or whose attention or MLP it removes (its criterion's
    :class:`~depthprune.select.Selection` at the point's granularity; None for the full model). Cheap once the
    analysis is done: the Ray driver computes it for every point and sends it by value. ``context`` is shared by
    every granularity (what a criterion caches is kept per kind)."""
    if point.n == 0:
        return None
    if context.granularity != point.granularity:
        context = dataclasses.replace(context, granularity=point.granularity)
    return choose(point.criterion, point.n, context)


def run_point(model, tokenizer, c: SweepConfig, work: Path, point: Point, selection, total: int,
              progress: SweepProgress, sequences: list[list[int]] | None = None,
              reference: Predictions | None = None) -> dict:
    """Evaluate one point (cut, repair, heal, evaluate) and return its row, the keyword arguments of
    :func:`~depthprune.sweep.store.save_point` (with the seconds it took in ``details``); writes no row.
    Its metrics hold ``wall_s`` and ``cpu_s``: the wall-clock and process CPU seconds (every thread; a Ray
    worker's own process) of its cut, repair, healing and evaluation, the selection and the cost phase apart;
    a healing resumed after a kill counts only the steps of this run.

    ``model`` comes back unchanged, so the next point can use it. Its cost metrics come later, from the cost
    phase. Runs in the sweep's process (serial) or in a Ray worker (:mod:`.executors.ray`), which returns
    the row to the driver. ``sequences``: the calibration token ids a repaired point fits its map on;
    ``reference``: the full model's choices (:func:`stored_predictions`), which add agreement to the metrics.
    ``params_removed``: the fraction of the model's parameters the cut removes (what the report compares
    granularities at).
    """
    start, cpu_start = time.perf_counter(), time.process_time()
    layers = selection.layers if selection else ()
    what = "layers" if point.granularity == "layer" else f"the {point.granularity} of layers"
    progress.say(f"cut: removing {what} {list(layers) if layers else 'none'}"
                 + (f", repaired by {point.repair}" if point.repaired else ""))
    healing, repair = None, None
    unpruned = point.criterion == UNPRUNED
    if not point.healed:
        with point_cut(model, tokenizer, c, point, layers, sequences, progress=progress.bars) as (cut, repair):
            evaluation = _evaluate(cut, tokenizer, c, progress=progress, reference=reference, keep_choices=unpruned)
    else:
        steps = heal_steps(c, point.heal)
        with offloaded(model, c.device):
            with progress.stage(f"healing ({point.heal}, {steps} steps)", detail=heal_status(work, point, steps)):
                healed, healing, repair = heal_point(model, tokenizer, c, work, point, selection, total, sequences)
            progress.say(healed_line(healing))
            evaluation = _evaluate(healed, tokenizer, c, progress=progress, reference=reference)
            del healed
            free_accelerator_cache()
    choices = _predictions_kept(evaluation) if unpruned else None
    seconds = round(time.perf_counter() - start, 1)
    metrics = {**flatten_metrics(evaluation, None, healing), "wall_s": seconds,
               "cpu_s": round(time.process_time() - cpu_start, 1), "params_removed": parameters_removed(model, point, layers)}
    details = {"evaluation": evaluation, "cost": None, "healing": healing, "seconds": seconds}
    details.update({"repair": repair} if repair is not None else {})
    details.update({"predictions": choices} if choices else {})
    return dict(n=point.n, fraction=point.n / total, criterion=point.criterion, heal=point.heal, repair=point.repair,
                granularity=point.granularity, removed_layers=tuple(layers), distance=selection.distance if selection else None, metrics=metrics,
                details=details)


def stored_predictions(db) -> Predictions | None:
    """The full model's choices of the multiple-choice tasks as its row stores them (None: no n = 0 point yet, or
    one stored before issue 19, which kept none)."""
    import json

    row = db.execute("SELECT details FROM points WHERE n = 0 AND heal = 'none'").fetchone()
    try:
        found = json.loads(row[0]).get("predictions") if row else None
    except (TypeError, ValueError, AttributeError):
        return None
    return found if isinstance(found, dict) and found else None


def _predictions_kept(evaluation: dict) -> Predictions:
    """Each multiple-choice task's choices, read from an evaluation run with details, whose per-question details
    are then dropped (the stored evaluation stays as large as it was; the choices are stored once, apart)."""
    from ..evaluate.registry import EVAL_TASKS
    from ..evaluate.suite import predictions

    choices = predictions(evaluation)
    for task, r in evaluation.get("tasks", {}).items():
        if task in EVAL_TASKS:
            for key in EVAL_TASKS.get(task).detail_keys:
                r.pop(key, None)
    return choices


def record_point(c: SweepConfig, work: Path, db, row: dict, progress: SweepProgress) -> None:
    """Save one point's row (one transaction; a failure recorded for it goes), say its numbers, and drop its
    healed model unless kept. Only the process that owns ``results.sqlite`` calls this."""
    save_point(db, **row)
    metrics = row["metrics"]
    progress.say(f"done in {duration(row['details']['seconds'])}: " + ", ".join(
        f"{k}={v:.4g}" for k, v in metrics.items() if isinstance(v, float) and not k.endswith("_chance")))
    point = Point(row["n"], row["criterion"], row["heal"], row["repair"], row["granularity"])
    if point.healed and not c.keep_models:
        shutil.rmtree(point_dir(work, point), ignore_errors=True)


def _evaluate(model, tokenizer, c: SweepConfig, progress: SweepProgress, reference: Predictions | None = None,
              keep_choices: bool = False) -> dict:
    """Every task of ``c`` on ``model``, one after the other, each saying it starts (and drawing its bar).

    ``reference``: the full model's choices, compared on the tasks it has; ``keep_choices``: evaluate with the
    per-question details, so that :func:`~depthprune.evaluate.suite.predictions` reads the choices."""
    from ..evaluate.registry import EVAL_TASKS
    from ..evaluate.suite import evaluate

    runs = [([task], None) for task in c.tasks] + ([([], c.lm_eval)] if c.lm_eval else [])
    result: dict | None = None
    for index, (tasks, lm_eval) in enumerate(runs, 1):
        name = tasks[0] if tasks else "lm-eval " + ",".join(lm_eval)
        with progress.stage(f"evaluating {name} ({index}/{len(runs)})", has_bar=bool(tasks)):
            options = dataclasses.replace(eval_options(c), lm_eval=lm_eval or [])  # lm-eval runs once, last
            compared = {task: reference[task] for task in tasks if reference and task in reference}
            choices = keep_choices and any(EVAL_TASKS.get(task).predictions is not None for task in tasks)
            r = evaluate(model, tasks, tokenizer=tokenizer, options=options, progress=progress.bars,
                         details=choices, reference=compared or None, **{task: c.task_data[task] for task in tasks})
        if result is None:
            result = r
        else:
            result["tasks"].update(r["tasks"])
            if "lm_eval" in r:
                result["lm_eval"] = r["lm_eval"]
    return result
