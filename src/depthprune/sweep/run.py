"""The paper's experiment in one call: evaluate the model with more and more of its layers removed.

One analysis feeds every point (:mod:`.plan`: n layers removed, selection criterion, healing; :mod:`.point`
runs one). Every finished point is one row of ``results.sqlite``; a rerun of the same command skips finished
points and resumes an interrupted healing. The cost of every layer count is timed in one phase at the end of
each run that finishes (:mod:`.cost_phase`) and copied into the points.

Each point says its stages as they start (cut, heal, each task, with tqdm bars unless ``quiet``), counts
``[k/N]`` over all points of the sweep, finished ones of earlier runs included, and estimates the time left
from the stored time of the finished points.

A run first checks everything it will read (settings, model, data of every task, healing options, the
state of ``OUT``: :mod:`.settings`, :mod:`.state`), then loads the model, and only then writes: a bad input
never leaves a folder behind. The points then run one after the other (:mod:`.executors.serial`) or as Ray
tasks (:mod:`.executors.ray`).
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import yaml

from ..data import tokenize
from ..errors import DepthpruneError
from ..measure.analysis import load_calibration, measure_texts
from ..measure.distances import AngularDistances
from ..model.load import load_model, num_layers
from ..outputs import atomic_output_dir, atomic_write_text, check_output_dir, output_lock, replace_dir
from ..select import SelectionContext, needs_of
from .config import SweepConfig
from .cost_phase import cost_phase, last_cost_seconds
from .cut import calibration_sequences, check_repairable
from .executors import ray as ray_executor
from .executors import serial
from .heal_point import offloaded
from .plan import POINTS_DIR, Point, sweep_points
from .point import select_point, stored_predictions
from .progress import SweepProgress, kind, library_bars_off
from .settings import (
    _analysis_options,
    _check_inputs,
    _data_options,
    _inputs,
    _readable,
    criterion_options,
    settings_record,
    with_resolved_paths,
)
from .state import (
    ANALYSIS_DIR,
    SETTINGS_FILE,
    State,
    check_analysis_fits,
    force_dir,
    holds_anything,
    read_state,
    remove_temporaries_under,
)
from .store import connect, point_seconds, read_failed


def run_sweep(c: SweepConfig, log=print, force: bool = False, quiet: bool = False, ray: str | None = None) -> Path:
    """Run every point of ``c`` not yet in ``results.sqlite``, then time the cost; returns the output directory.

    Everything is checked before the model is loaded and anything is written; the run holds a lock on
    ``c.out``. ``force``: start over in :func:`~.state.force_dir`, which replaces ``c.out`` only once complete
    (the old sweep stays intact until then; an interrupted --force run continues when rerun with --force).
    ``log`` receives every progress line; ``quiet``: no tqdm bars (on standard error), only the lines.
    ``ray``: run the points as Ray tasks (:mod:`depthprune.sweep.executors.ray`) on a local instance ('local'), the
    cluster of this machine ('auto') or the cluster at an address; points that fail there are recorded, the
    others finish, and the sweep then raises one :class:`DepthpruneError` naming them (a rerun retries them).
    """
    run = _check_before_work(c, log, force)
    c = run.c
    cluster = ray_executor.open_cluster(ray, c, log) if ray is not None else None
    try:
        with output_lock(run.out), library_bars_off(quiet):
            log(f"loading {c.model}")
            model, tokenizer = load_model(c.model, device=c.device, dtype=c.dtype)
            total = num_layers(model)
            points = sweep_points(c, total)
            check_analysis_fits(run.state.distances, total, run.work)
            db = _setup(c, run.work, run.state)
            try:
                context = _selection_context(model, tokenizer, run, total, log, quiet)
                _check_sublayer_cuts(c, model, context)
                todo = [p for p in points if p.key not in run.state.done]
                sequences = _repair_sequences(model, tokenizer, run, todo, context)
                progress = SweepProgress(log, [(p.key, kind(p.heal)) for p in points], point_seconds(db),
                                         run.state.done, quiet=quiet, cost_phase=c.cost,
                                         cost_seconds=last_cost_seconds(db))
                progress.begin()
                _say_agreement(c, points, db, progress.log)
                failures = _run_points(model, tokenizer, run, db, todo, total, context, progress, cluster, sequences)
                if c.cost and not failures:
                    cost_phase(model, c, db, points, total, context, progress)
            finally:
                db.close()
            if failures:
                raise DepthpruneError(ray_executor.summary(failures, len(points), run.work))
            _finish(c, run.out, run.work, len(points), total)
    finally:
        if cluster is not None:
            cluster.close()
    log(f"sweep finished: {len(points)} points in {run.out}")
    return run.out


@dataclass
class _Checked:
    """What the checks before any work found; nothing is loaded or written yet."""

    c: SweepConfig  # with its local paths resolved
    out: Path
    work: Path  # where the sweep is written: ``out``, or beside it for --force
    state: State
    calibrating: bool  # a criterion reads the calibration text itself
    texts: list[str] | None  # the calibration text, unless the analysis is read back and nothing else reads it


def _check_before_work(c: SweepConfig, log, force: bool) -> _Checked:
    """Check the settings, OUT, every input and the state of the folder; read the calibration text."""
    c = with_resolved_paths(c)
    out = check_output_dir(Path(c.out), force=True, inputs=_inputs(c))
    work = force_dir(out) if force else out
    if not force and holds_anything(force_dir(out)):
        log(f"note: '{force_dir(out)}' holds an interrupted --force sweep; rerun with --force to continue it")
    _check_inputs(c)
    state = read_state(c, work, force)
    calibrating = "calibration" in needs_of(c.criteria)
    repairing = any(r != "none" for r in c.repair)
    texts = None if state.distances and not calibrating and not repairing else \
        _readable("calibration data", c.data, load_calibration, _data_options(c))
    return _Checked(c, out, work, state, calibrating, texts)


def _setup(c: SweepConfig, work: Path, state: State):
    """Create the folder (only now that every check passed), record the settings, open the results."""
    if state.discard:
        shutil.rmtree(work)
    work.mkdir(parents=True, exist_ok=True)
    remove_temporaries_under(work)
    atomic_write_text(work / SETTINGS_FILE, yaml.safe_dump(settings_record(c), sort_keys=False))
    return connect(work)


def _selection_context(model, tokenizer, run: _Checked, total: int, log, quiet: bool) -> SelectionContext:
    """What every criterion chooses from: the one analysis (read back, or measured now) and, for criteria
    that read it, the tokenized calibration text."""
    distances = run.state.distances or _analyse(model, tokenizer, run.c, run.work, run.texts, log, progress=not quiet)
    return SelectionContext(total, distances, model, tokenizer,
                            tokenize(run.texts, tokenizer, run.c.seq_len) if run.calibrating else None,
                            options=criterion_options(run.c))


def _check_sublayer_cuts(c: SweepConfig, model, context: SelectionContext) -> None:
    """Refuse, before any point runs, a sub-layer granularity the architecture cannot cut exactly, or whose
    distances the analysis lacks (one read back from before sub-layer distances were measured)."""
    from ..model.sublayers import sites_of
    from ..select import check_distances_serve

    for granularity in [g for g in c.granularity if g != "layer"]:
        sites_of(model.config, granularity)
        for criterion in c.criteria:
            check_distances_serve(criterion, context.distances, granularity)


def _repair_sequences(model, tokenizer, run: _Checked, todo: list[Point], context: SelectionContext):
    """The calibration token ids the repaired points of ``todo`` fit on (None without any), every such cut
    checked repairable first, before any point runs."""
    repaired = [p for p in todo if p.repaired]
    if not repaired:
        return None
    sequences = calibration_sequences(run.c, tokenizer, run.texts)
    check_repairable(run.c, repaired, {p.key: select_point(p, context) for p in repaired}, model, sequences)
    return sequences


def _say_agreement(c: SweepConfig, points: list[Point], db, log) -> None:
    """Say when agreement cannot be measured although a multiple-choice task is evaluated: no full model among
    the points, or its row predates agreement."""
    from ..evaluate.registry import EVAL_TASKS

    if not any(p.n > 0 for p in points) or all(EVAL_TASKS.get(t).predictions is None for t in c.tasks):
        return
    if not any(p.n == 0 for p in points):
        log("note: no agreement with the full model: the sweep has no n = 0 point (add 0 to its fractions or n)")
    elif stored_predictions(db) is None and db.execute("SELECT 1 FROM points WHERE n = 0").fetchone():
        log("note: no agreement for the points run now: the stored full-model point predates it (kept no choices)")


def _analyse(model, tokenizer, c: SweepConfig, work: Path, texts: list[str], log, progress: bool = True
             ) -> AngularDistances:
    """Measure the distances and write ``analysis/`` whole (a kill leaves none, never half of one)."""
    from ..measure.heatmap import plot_heatmap

    log(f"measuring angular distances on {len(texts)} samples of {c.data}")
    distances = measure_texts(model, tokenizer, _data_options(c), texts, _analysis_options(c), progress=progress)
    with atomic_output_dir(work / ANALYSIS_DIR, force=True) as tmp:
        distances.save(tmp)
        plot_heatmap(distances, tmp / "heatmap.png")
    return distances


def _run_points(model, tokenizer, run: _Checked, db, todo: list[Point], total: int, context: SelectionContext,
                progress: SweepProgress, cluster, sequences) -> list[tuple[str, str]]:
    """Run the points not yet finished, one after the other or on the Ray ``cluster``; returns the (key, error)
    of the points that failed (on Ray only: a serial point that raises stops the sweep)."""
    retried = [key for key in read_failed(db) if key in {p.key for p in todo}]
    if retried:
        progress.log(f"retrying {len(retried)} point(s) that failed before: {', '.join(retried)}")
    if cluster is None:
        serial.run_points(model, tokenizer, run.c, run.work, db, todo, total, context, progress, sequences)
        return []
    with offloaded(model, run.c.device):  # the GPUs are the workers' while the points run
        return ray_executor.run_points(cluster, run.c, run.work, db, todo, total, context, progress)


def _finish(c: SweepConfig, out: Path, work: Path, points: int, total: int) -> None:
    """Drop the healed models (unless kept), write the summary and, for --force, put the new sweep in place."""
    if not c.keep_models:
        shutil.rmtree(work / POINTS_DIR, ignore_errors=True)  # also what a kill left while deleting one
    atomic_write_text(work / "summary.json", json.dumps({"model": c.model, "num_layers": total, "points": points},
                                                        indent=2) + "\n")
    if work != out:
        replace_dir(work, out)
