"""The paper's experiment in one call: evaluate the model with more and more of its layers removed.

One analysis feeds every point. A point is (n layers removed, selection criterion, healing). Unhealed points
are cut from the one loaded model in memory (``layers_removed``: no copy, no reload); healed points heal the
cut in memory (a copy of it; resumable) and evaluate the merged result. Every finished point is one row of
``results.sqlite``; a rerun of the same command skips finished points and resumes an interrupted healing.
The cost of every layer count is timed in one phase at the end of each run that finishes (interleaved
rounds, all under the same conditions) and copied into the points.

Each point says its stages as they start (cut, heal, each task, with tqdm bars unless ``quiet``), counts
``[k/N]`` over all points of the sweep, finished ones of earlier runs included, and estimates the time left
from the stored time of the finished points.

The settings are :class:`depthprune.config.SweepConfig`: the stage options plus the sweep's own keys, one
flag each. Criteria, tasks and their data come from the registries (``select.CRITERIA``,
``evaluate.registry.EVAL_TASKS``), so a new criterion or task is a new point or column with no change here.

A run first checks everything it will read (settings, model, data of every task, healing options, the
state of ``OUT``), then loads the model, and only then writes: a bad input never leaves a folder behind.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import shutil
import time
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from ..config import AnalysisOptions, CostOptions, DataOptions, EvalOptions, SweepConfig
from ..data import load_texts, tokenize
from ..errors import DepthpruneError
from ..evaluate.registry import EVAL_TASKS
from ..heal import HEAL_METHODS as HEALING
from ..measure.analysis import load_calibration, measure_texts
from ..measure.distances import AngularDistances, load_distances
from ..model.load import (
    DTYPES,
    EMBEDDED_MODELS,
    count_parameters,
    load_model,
    num_layers,
    resolve_model_source,
)
from ..model.surgery import layers_removed, pruning_record, read_record
from ..options import check_ranges, coerce, convert
from ..outputs import (
    TEMP_MARK,
    atomic_output_dir,
    atomic_write_text,
    check_output_dir,
    output_lock,
    remove_stale_temporaries,
    replace_dir,
)
from ..progress import SweepProgress, duration, kind, library_bars_off
from ..select import CRITERIA, SelectionContext, choose, needs_of
from .store import (
    connect,
    point_key,
    point_seconds,
    read_cost,
    read_failed,
    read_finished,
    read_points,
    save_cost,
    save_point,
)

__all__ = ["SweepConfig", "block_sizes", "flatten_metrics", "resolve_config", "run_sweep", "settings_record"]

SETTINGS_FILE = "sweep.yaml"
ANALYSIS_DIR = "analysis"

# Settings naming local files or folders (or hub ids), besides the tasks' data: compared and recorded
# resolved, so that the spelling of a path (relative, trailing slash) never decides whether a sweep resumes.
PATH_SETTINGS = ("model", "data", "lm_eval_include", "lm_eval_data", "heal_data", "heal_val_data")
# Settings that may change between a run and its resumption: they do not change any result. (The cost is
# timed again, with the settings of the run, every time a sweep finishes.)
# Settings that choose only which points run: a point's result does not depend on them, so a sweep rerun
# with more criteria, fractions or healings keeps its finished points and runs the new ones.
POINT_SETTINGS = {"fractions", "n", "criteria", "heal", "heal_fractions"}
RESUMABLE_SETTINGS = {"out", "keep_models", "cost", "cost_prefill_len", "cost_decode_tokens", "cost_repeats",
                      "cost_rounds", "ray_cpus", "ray_eval_gpus", "ray_heal_gpus", *POINT_SETTINGS}
# Keys renamed since: an old config names the new key in its error; an old sweep.yaml is read as renamed.
RENAMED = {"strategies": "criteria", "tokens": "token_mode"}

# ------------------------------------------------------------------------------------------ settings


def heal_methods() -> tuple[str, ...]:
    """'none' and every registered healing method (read when asked, so plug-ins registered later count)."""
    return ("none", *HEALING.names())


def _read_settings_file(path: Path) -> dict:
    if not path.is_file():
        raise DepthpruneError(f"sweep config '{path}' not found")
    try:
        loaded = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise DepthpruneError(f"sweep config '{path}' is not valid YAML: {str(exc).splitlines()[0]}") from None
    if not isinstance(loaded, dict):
        raise DepthpruneError(f"sweep config '{path}' must be a mapping of settings")
    return loaded


def _task_keys(settings: dict) -> dict:
    """Move the tasks' data (``mmlu: DIR`` in YAML, ``--mmlu DIR``) into ``task_data``."""
    task_data = dict(settings.pop("task_data", None) or {})
    for name in EVAL_TASKS.names():
        if name in settings:
            value = settings.pop(name)
            if value is not None:
                task_data[name] = convert(value, str, name, "sweep setting")
    if task_data:
        settings["task_data"] = task_data
    return settings


def resolve_config(config_file: str | Path | None = None, **overrides) -> SweepConfig:
    """Defaults, then the YAML file, then ``overrides`` (None values ignored); every value type- and range-checked.

    Keys are the fields of :class:`SweepConfig`, plus one per registered task for its data (``mmlu: DIR``).
    ``heal_options`` given in both places are merged key by key (the overrides win).
    """
    settings = _read_settings_file(Path(config_file)) if config_file is not None else {}
    given = {k: v for k, v in overrides.items() if v is not None}
    renamed = [k for k in [*settings, *given] if k in RENAMED]
    if renamed:
        raise DepthpruneError(f"sweep setting '{renamed[0]}' was renamed '{RENAMED[renamed[0]]}': use "
                              f"`{RENAMED[renamed[0]]}:` in the config (--{RENAMED[renamed[0]].replace('_', '-')})")
    if isinstance(settings.get("heal_options"), dict) and isinstance(given.get("heal_options"), dict):
        given["heal_options"] = {**settings["heal_options"], **given["heal_options"]}
    settings = _task_keys(settings)
    settings = {**settings, **_task_keys(given), "task_data": {**settings.get("task_data", {}),
                                                                **_task_keys(given).get("task_data", {})}}
    config = SweepConfig(**coerce(SweepConfig, settings, "sweep setting"))
    config.heal_options = _checked_heal_options(config.heal_options)
    _check(config)
    return config


def _checked_heal_options(options: dict) -> dict:
    """Type-check ``heal_options`` against :class:`depthprune.heal.HealOptions` (values are checked in _check)."""
    from ..heal import HealOptions

    hints = typing.get_type_hints(HealOptions)
    if "method" in options:
        raise DepthpruneError("heal_options cannot set 'method': list the healing methods under `heal` (or --heal)")
    unknown = sorted(set(options) - set(hints), key=str)
    if unknown:
        raise DepthpruneError(f"unknown healing option(s) {', '.join(map(str, unknown))} in heal_options: valid keys "
                              f"are {', '.join(sorted(set(hints) - {'method'}))}")
    return {key: convert(value, hints[key], f"heal_options.{key}", "sweep setting") for key, value in options.items()}


def _check(c: SweepConfig) -> None:
    """Values each setting allows, and settings that only make sense together."""
    if not c.data:
        raise DepthpruneError("the sweep needs calibration data: pass --data SRC (or `data:` in the config)")
    _check_points(c)
    _check_tasks(c)
    check_ranges(c, "sweep setting")
    _check_healing(c)


def _check_points(c: SweepConfig) -> None:
    CRITERIA.check(c.criteria)
    if not c.criteria:
        raise DepthpruneError(f"the sweep needs at least one criterion: choose from {', '.join(CRITERIA.names())}")
    methods = heal_methods()
    wrong = [h for h in c.heal if h not in methods]
    if wrong:
        raise DepthpruneError(f"unknown healing method '{wrong[0]}': choose from {', '.join(methods)}")
    if not c.heal:
        raise DepthpruneError(f"the sweep needs at least one healing method: choose from {', '.join(methods)}")
    bad = [f for f in c.fractions + (c.heal_fractions or []) if not 0 <= f < 1]
    if bad:
        raise DepthpruneError(f"fraction {bad[0]} out of range: fractions must be in [0, 1)")
    if c.n is not None and any(n < 0 for n in c.n):
        raise DepthpruneError(f"sweep setting 'n' must hold 0 or more layers, got {min(c.n)}")
    if not (c.n if c.n is not None else c.fractions):
        raise DepthpruneError("the sweep has no points: give fractions (e.g. 0:0.5:0.1) or n (e.g. 0,2,4)")


def _check_tasks(c: SweepConfig) -> None:
    wrong = [t for t in c.tasks if t not in EVAL_TASKS]
    if wrong:
        raise DepthpruneError(f"unknown task '{wrong[0]}': choose from {', '.join(EVAL_TASKS.names())} "
                              "(or name lm-evaluation-harness tasks under lm_eval)")
    if not c.tasks and not c.lm_eval:
        raise DepthpruneError("the sweep has nothing to evaluate: give tasks (e.g. mmlu,boolq,c4) or lm_eval tasks")
    # One metric name per task and measure: the same task from both routes would overwrite its numbers.
    twice = [t for t in c.lm_eval if t.removesuffix("_local") in c.tasks]
    if twice:
        raise DepthpruneError(f"task '{twice[0]}' is both a native task and an lm_eval task: run it once "
                              f"(drop it from tasks or from lm_eval)")


def _check_healing(c: SweepConfig) -> None:
    from ..heal import resolve_options

    methods = [h for h in c.heal if h != "none"]
    if methods and not c.heal_data:
        raise DepthpruneError("healing needs training text: pass --heal-data SRC (or `heal_data:` in the config)")
    for method in methods or [None]:
        resolve_options(c.heal_preset, **{**c.heal_options, "method": method})
    if c.heal_options.get("fsdp"):
        raise DepthpruneError("heal_options.fsdp: a sweep heals each point in one process, and FSDP shards over "
                              "several; heal a model that large with `torchrun ... depthprune heal --fsdp`")


def block_sizes(c: SweepConfig, total_layers: int) -> list[int]:
    """The distinct n of the sweep, from explicit counts or fractions of the layers (0 = the full model)."""
    sizes = c.n if c.n is not None else [round(f * total_layers) for f in c.fractions]
    too_many = [n for n in sizes if n >= total_layers]
    if too_many:
        raise DepthpruneError(f"n={too_many[0]} out of range: the model has {total_layers} layers")
    return sorted(set(sizes))


def _resolved_path(value: str | None) -> str | None:
    """An existing local path as an absolute one; anything else (a hub id, an alias) unchanged."""
    if not value or value in EMBEDDED_MODELS:
        return value
    path = Path(value).expanduser()
    return str(path.resolve()) if path.exists() else value


def with_resolved_paths(c: SweepConfig) -> SweepConfig:
    """``c`` with its local input paths made absolute: the same sweep whatever the working directory."""
    options = dict(c.heal_options)
    if options.get("teacher"):
        options["teacher"] = _resolved_path(options["teacher"])
    task_data = {task: _resolved_path(source) for task, source in c.task_data.items()}
    return dataclasses.replace(c, heal_options=options, task_data=task_data,
                               **{k: _resolved_path(getattr(c, k)) for k in PATH_SETTINGS})


def settings_record(c: SweepConfig) -> dict:
    """What ``sweep.yaml`` holds: every setting with local paths resolved, each task's data under its own key
    (``mmlu: DIR``), without ``out`` (the folder may move)."""
    record = {}
    for key, value in dataclasses.asdict(with_resolved_paths(c)).items():
        if key == "task_data":
            continue
        record[key] = value
        if key == "tasks":
            record.update({task: _resolved_path(c.task_data.get(task)) for task in EVAL_TASKS.names()})
    del record["out"]
    return record


def _as_now(saved: dict) -> dict:
    """A ``sweep.yaml`` written by an older version, in today's keys and meanings: renamed keys, and settings
    added since at their defaults."""
    saved = {RENAMED.get(k, k): v for k, v in saved.items()}
    if "mmlu_limit" not in saved and "mmlu" in (saved.get("tasks") or []):
        saved["mmlu_limit"] = saved.get("limit")  # `limit` also capped each MMLU subject before issue 9
    return {**settings_record(SweepConfig()), **saved}


def _changed_settings(saved: dict, c: SweepConfig) -> list[str]:
    new = settings_record(c)
    saved = _as_now(saved)
    paths = (*PATH_SETTINGS, *EVAL_TASKS.names())
    saved = {**saved, **{k: _resolved_path(saved[k]) for k in paths if isinstance(saved.get(k), str)}}
    return sorted(k for k in set(saved) | set(new) if k not in RESUMABLE_SETTINGS and saved.get(k) != new.get(k))


# ------------------------------------------------------------------------------------------ stage options


def _stage(cls, c: SweepConfig, **renamed):
    """The options of one stage (``cls``) from the sweep's settings (``renamed``: field -> sweep key)."""
    return cls(**{f.name: getattr(c, renamed.get(f.name, f.name)) for f in dataclasses.fields(cls)})


def _data_options(c: SweepConfig) -> DataOptions:
    return _stage(DataOptions, c, source="data", config="data_config", split="data_split")


def _analysis_options(c: SweepConfig) -> AnalysisOptions:
    return _stage(AnalysisOptions, c)


def eval_options(c: SweepConfig) -> EvalOptions:
    return _stage(EvalOptions, c)


def _cost_options(c: SweepConfig) -> CostOptions:
    return _stage(CostOptions, c, **{f.name: f"cost_{f.name}" for f in dataclasses.fields(CostOptions)})


# ------------------------------------------------------------------------------------------ metrics


def flatten_metrics(evaluation: dict, cost: dict | None, healing: dict | None) -> dict:
    """One flat name -> number mapping per point: what the results table and the report plot.

    Each registered task flattens its own result (``EvalTask.flatten``). Accuracy names say which measure
    they are, whichever route computed them: ``{task}_acc`` is the plain accuracy, ``{task}_acc_norm`` the
    length-normalized one (lm-eval's ``acc_norm``; ARC and HellaSwag).
    """
    m: dict = {}
    for task, r in evaluation.get("tasks", {}).items():
        if task in EVAL_TASKS:
            m.update(EVAL_TASKS.get(task).flatten(r))
    for task, r in evaluation.get("lm_eval", {}).get("tasks", {}).items():
        name = task.removesuffix("_local")
        found = {f"{name}_{k}": r[k] for k in ("acc", "acc_norm") if r.get(k) is not None}
        if found:
            m.update(found)
            m[f"{name}_chance"] = EVAL_TASKS.get(name).chance if name in EVAL_TASKS else LM_EVAL_CHANCE.get(name)
    if cost:
        from ..measure.cost import COST_METRICS

        m.update({k: cost[k] for k in COST_METRICS})
    if healing:
        m.update(heal_train_loss=healing.get("final_train_loss"), heal_val_loss_before=healing.get("val_loss_before"),
                 heal_val_loss=healing.get("val_loss_after"))
    return m


# Chance level of lm-eval multiple-choice tasks that are not registered tasks (4 choices each).
LM_EVAL_CHANCE = {"arc_challenge": 0.25}


# ------------------------------------------------------------------------------------------ checks before work


def _readable(what: str, source: str, load, *args):
    """``load(*args)``; a file that is not UTF-8 text (a binary file given by mistake) is a bad input, not a crash."""
    try:
        return load(*args)
    except UnicodeDecodeError as exc:
        raise DepthpruneError(f"{what} '{source}' is not UTF-8 text ({exc.reason}): check the path") from None


def _check_task_data(c: SweepConfig) -> None:
    """Read every task's data once with the loaders the evaluation uses, so a bad source fails before any work."""
    options = eval_options(c)
    for name in c.tasks:
        task, source = EVAL_TASKS.get(name), c.task_data.get(name)
        if source is None:
            raise DepthpruneError(f"task '{name}' needs its data: pass {task.flag} {task.metavar} "
                                  f"(or `{name}:` in the config)")
        _readable(f"{name} data", source, task.check, source, options)
    for name in ("lm_eval_include", "lm_eval_data"):
        folder = getattr(c, name)
        if folder is not None and not Path(folder).expanduser().is_dir():
            raise DepthpruneError(f"sweep setting '{name}' must be a directory: '{folder}' is not one")


def _check_heal_data(c: SweepConfig) -> None:
    from ..heal import resolve_options

    if all(h == "none" for h in c.heal):
        return
    o = resolve_options(c.heal_preset, **c.heal_options)
    _readable("heal data", c.heal_data, load_texts, c.heal_data, 1, o.seed, o.text_field, o.data_config,
              o.data_split)
    if c.heal_val_data is not None:
        _readable("heal validation data", c.heal_val_data, load_texts, c.heal_val_data, 1, o.seed, "text",
                  o.data_config, "validation")
    if o.teacher is not None:
        resolve_model_source(o.teacher)


def _check_inputs(c: SweepConfig) -> None:
    """Everything the sweep will read exists and parses; nothing heavy is loaded, nothing written."""
    import torch

    resolve_model_source(c.model)
    if c.device != "cpu" and not torch.cuda.is_available():
        raise DepthpruneError(f"device '{c.device}' needs a CUDA GPU and none is visible: use device cpu")
    _check_task_data(c)
    _check_heal_data(c)


def _inputs(c: SweepConfig) -> list[str | None]:
    return [getattr(c, k) for k in PATH_SETTINGS] + list(c.task_data.values()) + [c.heal_options.get("teacher")]


def force_dir(out: Path) -> Path:
    """Where ``sweep --force`` builds the new sweep: beside OUT, resumable, renamed to OUT once complete."""
    return out.parent / f".{out.name}.depthprune-force"


@dataclass
class _State:
    """What a run finds in its folder, read before anything is written."""

    done: set[str] = field(default_factory=set)
    distances: AngularDistances | None = None
    discard: bool = False  # an earlier --force folder that cannot be resumed: start it over


def _holds_anything(folder: Path) -> bool:
    # Temporaries of a killed run do not count: setup removes them.
    return folder.is_dir() and any(TEMP_MARK not in entry.name for entry in folder.iterdir())


def _check_settings(c: SweepConfig, work: Path) -> None:
    path = work / SETTINGS_FILE
    if not path.is_file():
        raise DepthpruneError(f"output directory '{work}' exists and does not hold a sweep: choose another --out, "
                              "or pass --force to replace it")
    try:
        saved = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        saved = exc
    if not isinstance(saved, dict):
        raise DepthpruneError(f"'{path}' is not a readable sweep record: pass --force to start the sweep over, "
                              f"or delete '{work}'")
    changed = _changed_settings(saved, c)
    if changed:
        raise DepthpruneError(f"'{work}' holds a sweep with other settings ({', '.join(changed)}): rerun with the "
                              "same settings to resume, choose another --out, or pass --force to start over")


def _read_analysis(work: Path) -> AngularDistances | None:
    folder = work / ANALYSIS_DIR
    if not (folder / "distances.json").is_file():
        return None
    hint = f"delete '{folder}' to measure the distances again, or pass --force to start the sweep over"
    try:
        distances = load_distances(folder)
    except DepthpruneError as exc:
        raise DepthpruneError(f"{exc}: {hint}") from None
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise DepthpruneError(f"'{folder / 'distances.json'}' is not a readable distances file "
                              f"({type(exc).__name__}): {hint}") from None
    shape = distances.pairwise.shape
    if len(shape) != 2 or shape[0] != shape[1] or shape[0] < 2:
        raise DepthpruneError(f"'{folder / 'distances.json'}' holds no square matrix of distances: {hint}")
    return distances


def _read_state(c: SweepConfig, work: Path, force: bool) -> _State:
    """Check what ``work`` holds (settings, results, analysis) belongs to this sweep; read only."""
    if not _holds_anything(work):
        return _State()
    try:
        _check_settings(c, work)
        return _State(done=read_finished(work), distances=_read_analysis(work))
    except DepthpruneError:
        if force:  # the folder of an interrupted --force run with other settings, or damaged: it is ours
            return _State(discard=True)
        raise


def _check_analysis_fits(distances: AngularDistances | None, total: int, work: Path) -> None:
    if distances is not None and distances.num_layers != total:
        raise DepthpruneError(f"'{work / ANALYSIS_DIR}' holds the distances of a {distances.num_layers}-layer model, "
                              f"but the model has {total} layers: delete '{work / ANALYSIS_DIR}' to measure them "
                              "again, or pass --force to start the sweep over")


# ------------------------------------------------------------------------------------------ the run


def run_sweep(c: SweepConfig, log=print, force: bool = False, quiet: bool = False, ray: str | None = None) -> Path:
    """Run every point of ``c`` not yet in ``results.sqlite``, then time the cost; returns the output directory.

    Everything is checked before the model is loaded and anything is written; the run holds a lock on
    ``c.out``. ``force``: start over in :func:`force_dir`, which replaces ``c.out`` only once complete
    (the old sweep stays intact until then; an interrupted --force run continues when rerun with --force).
    ``log`` receives every progress line; ``quiet``: no tqdm bars (on standard error), only the lines.
    ``ray``: run the points as Ray tasks (:mod:`depthprune.sweep.ray_executor`) on a local instance ('local'), the
    cluster of this machine ('auto') or the cluster at an address; points that fail there are recorded, the
    others finish, and the sweep then raises one :class:`DepthpruneError` naming them (a rerun retries them).
    """
    c = with_resolved_paths(c)
    out = check_output_dir(Path(c.out), force=True, inputs=_inputs(c))
    work = force_dir(out) if force else out
    if not force and _holds_anything(force_dir(out)):
        log(f"note: '{force_dir(out)}' holds an interrupted --force sweep; rerun with --force to continue it")
    _check_inputs(c)
    state = _read_state(c, work, force)
    calibrating = "calibration" in needs_of(c.criteria)  # a criterion that reads the calibration text itself
    texts = None if state.distances and not calibrating else \
        _readable("calibration data", c.data, load_calibration, _data_options(c))
    cluster = _connect_ray(ray, c, log) if ray is not None else None
    failures: list[tuple[str, str]] = []
    try:
        with output_lock(out), library_bars_off(quiet):
            log(f"loading {c.model}")
            model, tokenizer = load_model(c.model, device=c.device, dtype=c.dtype)
            total = num_layers(model)
            points = _points(c, block_sizes(c, total), total)
            _check_analysis_fits(state.distances, total, work)
            db = _setup(c, work, state)
            try:
                distances = state.distances or _analyse(model, tokenizer, c, work, texts, log, progress=not quiet)
                context = SelectionContext(total, distances, model, tokenizer,
                                           tokenize(texts, tokenizer, c.seq_len) if calibrating else None)
                progress = SweepProgress(log, [(point_key(*p), kind(p[2])) for p in points], point_seconds(db),
                                         state.done, quiet=quiet, cost_phase=c.cost,
                                         cost_seconds=_last_cost_seconds(db))
                progress.begin()
                todo = [p for p in points if point_key(*p) not in state.done]
                retried = [key for key in read_failed(db) if key in {point_key(*p) for p in todo}]
                if retried:
                    log(f"retrying {len(retried)} point(s) that failed before: {', '.join(retried)}")
                if cluster is None:
                    _run_points(model, tokenizer, c, work, db, todo, total, context, progress)
                else:
                    from .ray_executor import run_points

                    with offloaded(model, c.device):  # the GPUs are the workers' while the points run
                        failures = run_points(cluster, c, work, db, todo, total, context, progress)
                if c.cost and not failures:
                    _cost_phase(model, c, db, points, total, context, progress)
            finally:
                db.close()
            if failures:
                from .ray_executor import summary

                raise DepthpruneError(summary(failures, len(points), work))
            _finish(c, out, work, len(points), total)
    finally:
        if cluster is not None:
            cluster.close()
    log(f"sweep finished: {len(points)} points in {out}")
    return out


def _connect_ray(address: str, c: SweepConfig, log):
    """Connect to Ray before anything is loaded or written (a bad address fails fast), and check that a
    point's task fits in the cluster at all."""
    from .ray_executor import check_resources, connect

    cluster = connect(address)
    try:
        check_resources(cluster, c, healing=any(h != "none" for h in c.heal))
    except BaseException:
        cluster.close()
        raise
    log(f"points run as tasks on {cluster.describe()}")
    return cluster


def _run_points(model, tokenizer, c: SweepConfig, work: Path, db, todo: list[tuple[int, str, str]], total: int,
                context: SelectionContext, progress: SweepProgress) -> None:
    """The serial executor: each point in turn, in this process, on the loaded model (the seam that
    :mod:`depthprune.sweep.ray_executor` replaces by Ray tasks); a point that raises stops the sweep."""
    for point in todo:
        key = point_key(*point)
        with progress.point(key):
            row = run_point(model, tokenizer, c, work, point, select_point(point, context), total, progress)
            record_point(c, work, db, row, progress)
        progress.finished(key, row["details"]["seconds"])


def select_point(point: tuple[int, str, str], context: SelectionContext):
    """The layers a point removes (its criterion's :class:`~depthprune.select.Selection`; None for the full model).
    Cheap once the analysis is done: the Ray driver computes it for every point and sends it by value."""
    n, criterion, _ = point
    return choose(criterion, n, context) if n > 0 else None


def record_point(c: SweepConfig, work: Path, db, row: dict, progress: SweepProgress) -> None:
    """Save one point's row (one transaction; a failure recorded for it goes), say its numbers, and drop its
    healed model unless kept. Only the process that owns ``results.sqlite`` calls this."""
    save_point(db, **row)
    metrics = row["metrics"]
    progress.say(f"done in {duration(row['details']['seconds'])}: " + ", ".join(
        f"{k}={v:.4g}" for k, v in metrics.items() if isinstance(v, float) and not k.endswith("_chance")))
    if row["heal"] != "none" and not c.keep_models:
        shutil.rmtree(_point_dir(work, row["n"], row["criterion"], row["heal"]), ignore_errors=True)


def _points(c: SweepConfig, sizes: list[int], total: int) -> list[tuple[int, str, str]]:
    healed_sizes = set(sizes) if c.heal_fractions is None else {round(f * total) for f in c.heal_fractions}
    points = [(0, "full", "none")] if 0 in sizes else []
    return points + [(n, s, h) for n in sizes if n > 0 for s in c.criteria for h in c.heal
                     if h == "none" or n in healed_sizes]


def _remove_temporaries_under(root: Path) -> None:
    """Remove what killed runs left under ``root``: every temporary of a process that no longer runs."""
    targets = {p.parent / p.name[1:p.name.index(TEMP_MARK)] for p in root.rglob(f".*{TEMP_MARK}*")}
    for target in sorted(targets):
        remove_stale_temporaries(target)


def _setup(c: SweepConfig, work: Path, state: _State):
    """Create the folder (only now that every check passed), record the settings, open the results."""
    if state.discard:
        shutil.rmtree(work)
    work.mkdir(parents=True, exist_ok=True)
    _remove_temporaries_under(work)
    atomic_write_text(work / SETTINGS_FILE, yaml.safe_dump(settings_record(c), sort_keys=False))
    return connect(work)


def _analyse(model, tokenizer, c: SweepConfig, work: Path, texts: list[str], log, progress: bool = True
             ) -> AngularDistances:
    """Measure the distances and write ``analysis/`` whole (a kill leaves none, never half of one)."""
    from ..report.html import plot_heatmap

    log(f"measuring angular distances on {len(texts)} samples of {c.data}")
    distances = measure_texts(model, tokenizer, _data_options(c), texts, _analysis_options(c), progress=progress)
    with atomic_output_dir(work / ANALYSIS_DIR, force=True) as tmp:
        distances.save(tmp)
        plot_heatmap(distances, tmp / "heatmap.png")
    return distances


def _silent() -> SweepProgress:
    return SweepProgress(lambda _: None, [], {}, set(), quiet=True)


def _evaluate(model, tokenizer, c: SweepConfig, progress: SweepProgress | None = None) -> dict:
    """Every task of ``c`` on ``model``, one after the other, each saying it starts (and drawing its bar)."""
    from ..evaluate.suite import evaluate

    progress = progress or _silent()
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


def _last_cost_seconds(db) -> float | None:
    """How long the last cost phase of this sweep took (None before the first)."""
    try:
        record = next(iter(read_cost(db).values()), None)
    except DepthpruneError:  # a damaged cost table: the phase rewrites it
        return None
    seconds = ((record or {}).get("phase") or {}).get("seconds")
    return seconds if isinstance(seconds, (int, float)) else None


def _cost_phase(model, c: SweepConfig, db, points: list[tuple[int, str, str]], total: int,
                context: SelectionContext, progress: SweepProgress) -> dict[int, dict]:
    """Time every distinct layer count of the sweep, in interleaved rounds, and record it (one transaction).

    A model's cost depends only on its layer count, so each count is cut once per round from the one loaded
    model (healed points have the same shapes); every point's cost metrics are then the median of its count.
    Runs at the end of every run that finishes, so all counts are timed under the same conditions, now.
    """
    from tqdm.auto import tqdm

    from ..measure.cost import interleaved_costs, round_order

    removals: dict[int, tuple[int, ...]] = {}
    for n, criterion, _ in points:
        if n not in removals:
            removals[n] = tuple(choose(criterion, n, context).layers) if n else ()
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


def _point_dir(work: Path, n: int, criterion: str, heal: str) -> Path:
    return work / "points" / f"n{n:03d}-{criterion}-{heal}"


def run_point(model, tokenizer, c: SweepConfig, work: Path, point: tuple[int, str, str], selection, total: int,
              progress: SweepProgress) -> dict:
    """Evaluate one point (cut, heal, evaluate) and return its row, the keyword arguments of
    :func:`~depthprune.sweep.store.save_point` (with the seconds it took in ``details``); writes no row.

    ``model`` comes back unchanged, so the next point can use it. Its cost metrics come later, from the cost
    phase. Runs in the sweep's process (serial) or in a Ray worker (``ray_sweep``), which returns the row
    to the driver.
    """
    n, criterion, method = point
    start = time.perf_counter()
    layers = selection.layers if selection else ()
    progress.say(f"cut: removing layers {list(layers) if layers else 'none'}")
    healing = None
    if method == "none":
        with layers_removed(model, layers) as cut:
            evaluation = _evaluate(cut, tokenizer, c, progress=progress)
    else:
        steps = _heal_steps(c, method)
        with offloaded(model, c.device):
            with progress.stage(f"healing ({method}, {steps} steps)", detail=_heal_status(work, point, steps)):
                healed, healing = _heal_point(model, tokenizer, c, work, point, selection, total)
            progress.say(_healed_line(healing))
            evaluation = _evaluate(healed, tokenizer, c, progress=progress)
            del healed
            _free_accelerator_cache()
    metrics = flatten_metrics(evaluation, None, healing)
    seconds = round(time.perf_counter() - start, 1)
    return dict(n=n, fraction=n / total, criterion=criterion, heal=method, removed_layers=tuple(layers),
                distance=selection.distance if selection else None, metrics=metrics,
                details={"evaluation": evaluation, "cost": None, "healing": healing, "seconds": seconds})


@contextlib.contextmanager
def offloaded(model, device: str):
    """While a healed point trains and is evaluated on the GPU, the sweep's loaded base model waits in CPU
    memory (``device`` 'cuda'), and comes back after: the GPU holds one model at a time (see the paper
    config's memory per step). A no-op on CPU, and for 'auto' (a model dispatched over several GPUs by
    accelerate stays where its hooks put it)."""
    if device != "cuda":
        yield model
        return
    home = next(model.parameters()).device
    model.to("cpu")
    _free_accelerator_cache()
    try:
        yield model
    finally:
        model.to(home)


def _free_accelerator_cache() -> None:
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _heal_steps(c: SweepConfig, method: str) -> int | str:
    from ..heal import resolve_options

    return getattr(resolve_options(c.heal_preset, **{**c.heal_options, "method": method}), "steps", "?")


def _heal_status(work: Path, point: tuple[int, str, str], steps) -> typing.Callable[[], str | None]:
    """What the healing's own log says last (step k/N, loss, tokens/s), for the lines said while it runs."""
    import importlib

    heal_module = importlib.import_module("depthprune.heal")  # the attribute `heal` is the function
    healed = _point_dir(work, *point) / "healed"
    suffix = getattr(heal_module, "WORK_SUFFIX", None)
    log_name = getattr(heal_module, "LOG_FILE", None)

    def status() -> str | None:
        if log_name is None:
            return None
        for folder in [healed.with_name(healed.name + suffix)] * bool(suffix) + [healed]:
            try:
                last = (folder / log_name).read_text(encoding="utf-8").splitlines()[-1]
                record = json.loads(last)
            except (OSError, IndexError, ValueError):
                continue
            parts = [f"step {record.get('step', '?')}/{steps}"]
            if isinstance(record.get("loss"), (int, float)):
                parts.append(f"loss {record['loss']:.4f}")
            if isinstance(record.get("tokens_per_s"), (int, float)):
                parts.append(f"{record['tokens_per_s']:,.0f} tokens/s")
            return ", ".join(parts)
        return None

    return status


def _healed_line(healing: dict | None) -> str:
    healing = healing or {}
    before, after = healing.get("val_loss_before"), healing.get("val_loss_after")
    loss = f": validation loss {before:.4f} -> {after:.4f}" if isinstance(before, float) and isinstance(after, float) \
        else ""
    return f"healed{loss}"


def _heal_point(model, tokenizer, c: SweepConfig, work: Path, point: tuple[int, str, str], selection, total: int):
    """Heal the cut in memory (resuming a killed healing from its checkpoint); returns the merged model.

    lora, dora and full train and merge into the model they are given: they get a copy of the cut
    (``copy.deepcopy``: memory for the kept layers once more, as much as the saved-and-reloaded cut of
    earlier versions took, without the disk round trip), so the loaded model comes back unchanged for
    the next points. qlora only reads the cut, into a 4-bit copy. The healing is named by the base model
    and the layers removed (in ``heal_config.json``): a rerun recreates the same cut and resumes.

    Called with the base model offloaded to the CPU (:func:`offloaded`): the copy is made there and moved
    to the GPU alone, and qlora's merge writes each layer straight in the sweep's dtype (``merge_dtype``), so
    the GPU never holds the base beside the trainee, nor a float32 copy of the merged model.
    """
    from ..heal import heal_loaded

    healed = _point_dir(work, *point) / "healed"
    model_id = f"{c.model} without layers {list(selection.layers)}"
    if _started_elsewhere(healed, model_id):
        shutil.rmtree(healed)
    record = read_record(healed) if healed.is_dir() else None
    if record is not None and "healing" in record:  # healed before the sweep was stopped, not yet evaluated
        healed_model, _ = load_model(str(healed), device=c.device, dtype=c.dtype)
        # Named like the in-memory result of an uninterrupted run, so the recorded evaluation is the same.
        healed_model.config.name_or_path = model.config.name_or_path
        return healed_model, record["healing"]
    options = {**c.heal_options, "method": point[2]}
    params_before = count_parameters(model)
    with layers_removed(model, selection.layers) as cut:
        record = pruning_record(c.model, total, params_before, cut, selection)
        trainee = cut if HEALING.get(point[2]).quantized_base else copy.deepcopy(cut).to(_train_device(c, cut))
        result = heal_loaded(trainee, c.heal_data, str(healed), tokenizer=tokenizer, model_id=model_id, record=record,
                             val_data=c.heal_val_data, preset=c.heal_preset, device=c.device, dtype=c.dtype,
                             merge_dtype=c.dtype, progress=True, **options)
    del trainee
    return result.model.to(DTYPES[c.dtype]), result.record


def _train_device(c: SweepConfig, cut):
    """Where a copied cut trains: the GPU for device 'cuda' (the base waits on the CPU meanwhile), else where it is."""
    return "cuda" if c.device == "cuda" else next(cut.parameters()).device


def _started_elsewhere(healed: Path, model_id: str) -> bool:
    """A healing recorded for another model (an older sweep named its input by the path of a saved cut,
    which heal would refuse to resume as 'other settings'): such a healing starts over."""
    from ..heal import CONFIG_FILE

    try:
        started = json.loads((healed / CONFIG_FILE).read_text(encoding="utf-8")).get("model")
    except (OSError, ValueError, AttributeError):
        return False
    return started is not None and started != model_id


def _finish(c: SweepConfig, out: Path, work: Path, points: int, total: int) -> None:
    """Drop the healed models (unless kept), write the summary and, for --force, put the new sweep in place."""
    if not c.keep_models:
        shutil.rmtree(work / "points", ignore_errors=True)  # also what a kill left while deleting one
    atomic_write_text(work / "summary.json", json.dumps({"model": c.model, "num_layers": total, "points": points},
                                                        indent=2) + "\n")
    if work != out:
        replace_dir(work, out)
