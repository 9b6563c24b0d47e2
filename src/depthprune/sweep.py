"""The paper's experiment in one call: evaluate the model with more and more of its layers removed.

One analysis feeds every point. A point is (n layers removed, strategy, healing). Unhealed points are
cut from the one loaded model in memory (``layers_removed``: no copy, no reload); healed points save the
cut checkpoint, heal it (resumable) and evaluate the merged result. Every finished point is one row of
``results.sqlite``; a rerun of the same command skips finished points and resumes an interrupted healing.

A run first checks everything it will read (settings, model, data of every task, healing options, the
state of ``OUT``), then loads the model, and only then writes: a bad input never leaves a folder behind.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import time
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from .api import DataOptions, load_calibration, measure
from .data import load_texts
from .errors import DepthpruneError
from .models import (
    DEVICES,
    DTYPES,
    EMBEDDED_MODELS,
    count_parameters,
    load_model,
    num_layers,
    resolve_model_source,
)
from .outputs import (
    TEMP_MARK,
    atomic_output_dir,
    atomic_write_text,
    check_output_dir,
    output_lock,
    remove_stale_temporaries,
    replace_dir,
)
from .select import STRATEGIES, choose_block
from .similarity import AngularDistances, load_distances
from .store import connect, point_key, read_finished, save_point
from .surgery import layers_removed, pruning_record, read_record, save_pruned

HEAL_METHODS = ("none", "qlora", "lora", "full")
NATIVE_TASKS = ("mmlu", "boolq", "c4", "arc_easy", "hellaswag")
SETTINGS_FILE = "sweep.yaml"
ANALYSIS_DIR = "analysis"


@dataclass
class SweepConfig:
    """Every setting of a sweep; a YAML file with these keys (and CLI flags) fills it."""

    model: str = "smollm2-135m"
    out: str = "runs/sweep"
    device: str = "cpu"
    dtype: str = "float32"
    # calibration data for the angular distances
    data: str = ""
    data_config: str | None = None
    data_split: str = "train"
    text_field: str = "text"
    samples: int = 128
    seq_len: int = 256
    tokens: str = "last"
    seed: int = 0
    # points: fractions of the layers to remove (or explicit counts n), strategies, healing methods
    fractions: list[float] = field(default_factory=lambda: [0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6])
    n: list[int] | None = None
    strategies: list[str] = field(default_factory=lambda: ["similarity", "deepest"])
    heal: list[str] = field(default_factory=lambda: ["none"])
    heal_fractions: list[float] | None = None  # heal only the cuts of these fractions (None: every cut)
    # evaluation: native tasks (mmlu, boolq, c4, arc_easy, hellaswag) and lm-evaluation-harness tasks
    tasks: list[str] = field(default_factory=lambda: ["mmlu", "boolq", "c4"])
    lm_eval: list[str] = field(default_factory=list)
    lm_eval_include: str | None = None
    lm_eval_data: str | None = None
    mmlu: str | None = None
    boolq: str | None = None
    c4: str | None = None
    arc_easy: str | None = None
    hellaswag: str | None = None
    shots: int = 5
    subjects: list[str] | None = None
    limit: int | None = None
    boolq_limit: int | None = None
    c4_sequences: int = 64
    c4_seq_len: int = 512
    batch_size: int = 8
    # healing: the data and any option of depthprune.heal (method comes from `heal` above)
    heal_data: str | None = None
    heal_val_data: str | None = None
    heal_preset: str | None = None
    heal_options: dict = field(default_factory=dict)
    # cost measurement
    cost: bool = True
    cost_prefill_len: int = 256
    cost_decode_tokens: int = 32
    cost_repeats: int = 3
    keep_models: bool = False


# Settings naming local files or folders (or hub ids): compared and recorded resolved, so that the
# spelling of a path (relative, trailing slash) never decides whether a sweep resumes.
PATH_SETTINGS = ("model", "data", "mmlu", "boolq", "c4", "arc_easy", "hellaswag", "lm_eval_include", "lm_eval_data",
                 "heal_data", "heal_val_data")
# Settings that may change between a run and its resumption: they do not change any result.
RESUMABLE_SETTINGS = {"out", "keep_models"}
# Lower bounds of the whole-number settings.
MINIMUM = {"samples": 1, "seq_len": 2, "shots": 0, "limit": 1, "boolq_limit": 1, "c4_sequences": 1, "c4_seq_len": 2,
           "batch_size": 1, "cost_prefill_len": 1, "cost_decode_tokens": 1, "cost_repeats": 1}
CHOICES = {"tokens": ("last", "all"), "device": DEVICES, "dtype": tuple(DTYPES)}

# ------------------------------------------------------------------------------------------ settings

_KINDS = {bool: ("true or false", "true/false values"), int: ("a whole number", "whole numbers"),
          float: ("a number", "numbers"), str: ("a string", "strings")}


def _bad_type(name: str, value, kind: type, plural: bool = False) -> DepthpruneError:
    single, many = _KINDS[kind]
    return DepthpruneError(f"sweep setting '{name}' must be {'a list of ' + many if plural else single}, got {value!r}")


def _scalar(name: str, value, kind: type, plural: bool = False):
    """``value`` as ``kind``; flags arrive as text, so numbers may be given as strings."""
    if kind is bool:
        if isinstance(value, bool):
            return value
        raise _bad_type(name, value, kind, plural)
    if kind is str:
        if isinstance(value, str):
            return value
        raise _bad_type(name, value, kind, plural)
    if isinstance(value, str):
        try:
            return kind(value.strip())
        except ValueError:
            raise _bad_type(name, value, kind, plural) from None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (kind is int and not isinstance(value, int)):
        raise _bad_type(name, value, kind, plural)
    return kind(value)


def _fraction_range(name: str, text: str) -> list[float]:
    """'start:stop:step', stop included."""
    try:
        start, stop, step = (float(part) for part in text.split(":"))
    except ValueError:
        raise DepthpruneError(f"bad {name} '{text}': use start:stop:step with numbers, e.g. 0:0.6:0.1") from None
    if step <= 0 or start > stop:
        raise DepthpruneError(f"bad {name} '{text}': the step must be positive and start not above stop")
    count = int(round((stop - start) / step)) + 1
    return [round(start + i * step, 10) for i in range(count) if start + i * step <= stop + 1e-9]


def _coerce(name: str, value, hint):
    """Check ``value`` against the type ``hint`` of setting ``name``; lists may be given as 'a,b,c'."""
    args = typing.get_args(hint)
    if type(None) in args:
        if value is None:
            return None
        hint = next(a for a in args if a is not type(None))
    if typing.get_origin(hint) is list:
        (kind,) = typing.get_args(hint)
        if kind is float and isinstance(value, str) and ":" in value:
            return _fraction_range(name, value)
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        elif not isinstance(value, list):
            value = [value]  # one value where a list is expected: a list of one
        return [_scalar(name, v, kind, plural=True) for v in value]
    if hint is dict:
        if not isinstance(value, dict):
            raise DepthpruneError(f"sweep setting '{name}' must be a mapping of options, got {value!r}")
        return value
    return _scalar(name, value, hint)


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


def resolve_config(config_file: str | Path | None = None, **overrides) -> SweepConfig:
    """Defaults, then the YAML file, then ``overrides`` (None values ignored); every value type- and range-checked."""
    settings = _read_settings_file(Path(config_file)) if config_file is not None else {}
    settings.update({k: v for k, v in overrides.items() if v is not None})
    hints = typing.get_type_hints(SweepConfig)
    unknown = sorted(set(settings) - set(hints), key=str)
    if unknown:
        raise DepthpruneError(f"unknown sweep setting(s) {', '.join(map(str, unknown))}: valid keys are "
                              f"{', '.join(sorted(hints))}")
    config = SweepConfig(**{key: _coerce(key, value, hints[key]) for key, value in settings.items()})
    config.heal_options = _checked_heal_options(config.heal_options)
    _check(config)
    return config


def _checked_heal_options(options: dict) -> dict:
    """Type-check ``heal_options`` against :class:`depthprune.heal.HealOptions` (values are checked in _check)."""
    from .heal import HealOptions

    hints = typing.get_type_hints(HealOptions)
    if "method" in options:
        raise DepthpruneError("heal_options cannot set 'method': list the healing methods under `heal` (or --heal)")
    unknown = sorted(set(options) - set(hints), key=str)
    if unknown:
        raise DepthpruneError(f"unknown healing option(s) {', '.join(map(str, unknown))} in heal_options: valid keys "
                              f"are {', '.join(sorted(set(hints) - {'method'}))}")
    return {key: _coerce(f"heal_options.{key}", value, hints[key]) for key, value in options.items()}


def _check(c: SweepConfig) -> None:
    """Values each setting allows, and settings that only make sense together."""
    if not c.data:
        raise DepthpruneError("the sweep needs calibration data: pass --data SRC (or `data:` in the config)")
    _check_points(c)
    for name, low in MINIMUM.items():
        value = getattr(c, name)
        if value is not None and value < low:
            raise DepthpruneError(f"sweep setting '{name}' must be at least {low}, got {value}")
    for name, allowed in CHOICES.items():
        if getattr(c, name) not in allowed:
            raise DepthpruneError(f"unknown {name} '{getattr(c, name)}': choose from {', '.join(allowed)}")
    _check_tasks(c)
    _check_healing(c)


def _check_points(c: SweepConfig) -> None:
    for value, allowed, name in [(c.strategies, STRATEGIES, "strategy"), (c.heal, HEAL_METHODS, "healing method")]:
        wrong = [v for v in value if v not in allowed]
        if wrong:
            raise DepthpruneError(f"unknown {name} '{wrong[0]}': choose from {', '.join(allowed)}")
        if not value:
            raise DepthpruneError(f"the sweep needs at least one {name}: choose from {', '.join(allowed)}")
    bad = [f for f in c.fractions + (c.heal_fractions or []) if not 0 <= f < 1]
    if bad:
        raise DepthpruneError(f"fraction {bad[0]} out of range: fractions must be in [0, 1)")
    if c.n is not None and any(n < 0 for n in c.n):
        raise DepthpruneError(f"sweep setting 'n' must hold 0 or more layers, got {min(c.n)}")
    if not (c.n if c.n is not None else c.fractions):
        raise DepthpruneError("the sweep has no points: give fractions (e.g. 0:0.5:0.1) or n (e.g. 0,2,4)")


def _check_tasks(c: SweepConfig) -> None:
    wrong = [t for t in c.tasks if t not in NATIVE_TASKS]
    if wrong:
        raise DepthpruneError(f"unknown task '{wrong[0]}': choose from {', '.join(NATIVE_TASKS)} "
                              "(or name lm-evaluation-harness tasks under lm_eval)")
    if not c.tasks and not c.lm_eval:
        raise DepthpruneError("the sweep has nothing to evaluate: give tasks (e.g. mmlu,boolq,c4) or lm_eval tasks")
    # One metric name per task and measure: the same task from both routes would overwrite its numbers.
    twice = [t for t in c.lm_eval if t.removesuffix("_local") in c.tasks]
    if twice:
        raise DepthpruneError(f"task '{twice[0]}' is both a native task and an lm_eval task: run it once "
                              f"(drop it from tasks or from lm_eval)")


def _check_healing(c: SweepConfig) -> None:
    from .heal import resolve_options

    methods = [h for h in c.heal if h != "none"]
    if methods and not c.heal_data:
        raise DepthpruneError("healing needs training text: pass --heal-data SRC (or `heal_data:` in the config)")
    for method in methods or [None]:
        resolve_options(c.heal_preset, **{**c.heal_options, "method": method})


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
    return dataclasses.replace(c, heal_options=options, **{k: _resolved_path(getattr(c, k)) for k in PATH_SETTINGS})


def settings_record(c: SweepConfig) -> dict:
    """What ``sweep.yaml`` holds: every setting with local paths resolved, without ``out`` (the folder may move)."""
    record = dataclasses.asdict(with_resolved_paths(c))
    del record["out"]
    return record


def _changed_settings(saved: dict, c: SweepConfig) -> list[str]:
    new = settings_record(c)
    saved = {**saved, **{k: _resolved_path(saved[k]) for k in PATH_SETTINGS if isinstance(saved.get(k), str)}}
    return sorted(k for k in set(saved) | set(new) if k not in RESUMABLE_SETTINGS and saved.get(k) != new.get(k))


# ------------------------------------------------------------------------------------------ metrics


def flatten_metrics(evaluation: dict, cost: dict | None, healing: dict | None) -> dict:
    """One flat name -> number mapping per point: what the results table and the report plot.

    Accuracy names say which measure they are, whichever route computed them: ``{task}_acc`` is the plain
    accuracy, ``{task}_acc_norm`` the length-normalized one (lm-eval's ``acc_norm``; ARC and HellaSwag).
    """
    m: dict = {}
    for task, r in evaluation.get("tasks", {}).items():
        if task == "c4":
            m.update(c4_loss=r["loss"], c4_loss_norm=r["loss_over_log_vocab"], c4_ppl=r["perplexity"])
        elif task == "hellaswag":  # the native HellaSwag reports acc_norm as its headline `accuracy`
            m.update(hellaswag_acc=r["accuracy_unnormalized"], hellaswag_acc_norm=r["accuracy"])
        else:
            m[f"{task}_acc"] = r["accuracy"]
            if "accuracy_norm" in r:
                m[f"{task}_acc_norm"] = r["accuracy_norm"]
        if task != "c4":
            m[f"{task}_chance"] = r.get("chance", r.get("majority_baseline"))
    for task, r in evaluation.get("lm_eval", {}).get("tasks", {}).items():
        name = task.removesuffix("_local")
        found = {f"{name}_{k}": r[k] for k in ("acc", "acc_norm") if r.get(k) is not None}
        if found:
            m.update(found)
            m[f"{name}_chance"] = CHANCE.get(name)
    if cost:
        m.update({k: cost[k] for k in ("parameters", "weight_bytes", "peak_memory_bytes", "prefill_tokens_per_s",
                                       "decode_tokens_per_s", "prefill_ms_per_token", "decode_ms_per_token",
                                       "layer_prefill_ms_per_token", "layer_decode_ms_per_token", "layer_weight_bytes")})
    if healing:
        m.update(heal_train_loss=healing.get("final_train_loss"), heal_val_loss_before=healing.get("val_loss_before"),
                 heal_val_loss=healing.get("val_loss_after"))
    return m


# Chance level of lm-eval multiple-choice tasks the report draws (4 choices each).
CHANCE = {"arc_easy": 0.25, "arc_challenge": 0.25, "hellaswag": 0.25}


# ------------------------------------------------------------------------------------------ checks before work


def _readable(what: str, source: str, load, *args):
    """``load(*args)``; a file that is not UTF-8 text (a binary file given by mistake) is a bad input, not a crash."""
    try:
        return load(*args)
    except UnicodeDecodeError as exc:
        raise DepthpruneError(f"{what} '{source}' is not UTF-8 text ({exc.reason}): check the path") from None


def _data_options(c: SweepConfig) -> DataOptions:
    return DataOptions(c.data, c.samples, c.seq_len, c.seed, c.text_field, c.data_config, c.data_split)


def _check_task_data(c: SweepConfig) -> None:
    """Read every task's data once with the loaders the evaluation uses, so a bad source fails before any work."""
    from .evaluate.arc import load_arc
    from .evaluate.boolq import load_boolq
    from .evaluate.hellaswag import load_hellaswag
    from .evaluate.mmlu import load_mmlu

    def c4_texts(source: str) -> list[str]:  # as evaluate.c4_loss reads it
        local = Path(source).expanduser().exists()
        return load_texts(source, None if local else c.c4_sequences * 8, c.seed,
                          config="en" if source == "allenai/c4" else None, split="validation")

    loaders = {"mmlu": lambda source: load_mmlu(source, c.subjects), "boolq": load_boolq, "arc_easy": load_arc,
               "hellaswag": load_hellaswag, "c4": c4_texts}
    for task in c.tasks:
        source = getattr(c, task)
        if source is None:
            raise DepthpruneError(f"task '{task}' needs its data: pass --{task.replace('_', '-')} SRC "
                                  f"(or `{task}:` in the config)")
        _readable(f"{task} data", source, loaders[task], source)
    for name in ("lm_eval_include", "lm_eval_data"):
        folder = getattr(c, name)
        if folder is not None and not Path(folder).expanduser().is_dir():
            raise DepthpruneError(f"sweep setting '{name}' must be a directory: '{folder}' is not one")


def _check_heal_data(c: SweepConfig) -> None:
    from .heal import resolve_options

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
    return [getattr(c, k) for k in PATH_SETTINGS] + [c.heal_options.get("teacher")]


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


def run_sweep(c: SweepConfig, log=print, force: bool = False) -> Path:
    """Run every point of ``c`` not yet in ``results.sqlite``; returns the output directory.

    Everything is checked before the model is loaded and anything is written; the run holds a lock on
    ``c.out``. ``force``: start over in :func:`force_dir`, which replaces ``c.out`` only once complete
    (the old sweep stays intact until then; an interrupted --force run continues when rerun with --force).
    """
    c = with_resolved_paths(c)
    out = check_output_dir(Path(c.out), force=True, inputs=_inputs(c))
    work = force_dir(out) if force else out
    if not force and _holds_anything(force_dir(out)):
        log(f"note: '{force_dir(out)}' holds an interrupted --force sweep; rerun with --force to continue it")
    _check_inputs(c)
    state = _read_state(c, work, force)
    texts = None if state.distances else _readable("calibration data", c.data, load_calibration, _data_options(c))
    with output_lock(out):
        model, tokenizer = load_model(c.model, device=c.device, dtype=c.dtype)
        total = num_layers(model)
        points = _points(c, block_sizes(c, total), total)
        _check_analysis_fits(state.distances, total, work)
        db = _setup(c, work, state)
        try:
            distances = state.distances or _analyse(model, tokenizer, c, work, texts, log)
            todo = [p for p in points if point_key(*p) not in state.done]
            log(f"{len(points)} points, {len(points) - len(todo)} already finished")
            _run_points(model, tokenizer, c, work, db, todo, total, distances, log)
        finally:
            db.close()
        _finish(c, out, work, len(points), total)
    return out


def _run_points(model, tokenizer, c: SweepConfig, work: Path, db, todo: list[tuple[int, str, str]], total: int,
                distances: AngularDistances, log) -> None:
    for index, point in enumerate(todo, 1):
        prefix = f"[{index}/{len(todo)}]"
        metrics = _run_point(model, tokenizer, c, work, db, point, total, distances,
                             lambda text, prefix=prefix: log(f"{prefix} {text}"))
        log("    " + ", ".join(f"{k}={v:.4g}" for k, v in metrics.items()
                                if isinstance(v, float) and not k.endswith("_chance")))


def _points(c: SweepConfig, sizes: list[int], total: int) -> list[tuple[int, str, str]]:
    healed_sizes = set(sizes) if c.heal_fractions is None else {round(f * total) for f in c.heal_fractions}
    points = [(0, "full", "none")] if 0 in sizes else []
    return points + [(n, s, h) for n in sizes if n > 0 for s in c.strategies for h in c.heal
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


def _analyse(model, tokenizer, c: SweepConfig, work: Path, texts: list[str], log) -> AngularDistances:
    """Measure the distances and write ``analysis/`` whole (a kill leaves none, never half of one)."""
    from .report import plot_heatmap

    log(f"measuring angular distances on {len(texts)} samples of {c.data}")
    distances = measure(model, tokenizer, _data_options(c), texts=texts, batch_size=c.batch_size, tokens=c.tokens)
    with atomic_output_dir(work / ANALYSIS_DIR, force=True) as tmp:
        distances.save(tmp)
        plot_heatmap(distances, tmp / "heatmap.png")
    return distances


def _evaluate(model, tokenizer, c: SweepConfig) -> dict:
    from .evaluate import evaluate

    return evaluate(model, c.tasks or None, tokenizer=tokenizer, mmlu=c.mmlu, boolq=c.boolq, c4=c.c4, arc_easy=c.arc_easy,
                    hellaswag=c.hellaswag, shots=c.shots,
                    subjects=c.subjects, limit=c.limit, boolq_limit=c.boolq_limit, batch_size=c.batch_size, c4_sequences=c.c4_sequences,
                    c4_seq_len=c.c4_seq_len, seed=c.seed, lm_eval=c.lm_eval or None,
                    lm_eval_include=c.lm_eval_include, lm_eval_data=c.lm_eval_data, progress=False)


def _cost(model, c: SweepConfig) -> dict | None:
    from .cost import measure_cost

    if not c.cost:
        return None
    return measure_cost(model, prefill_len=c.cost_prefill_len, decode_tokens=c.cost_decode_tokens,
                        repeats=c.cost_repeats, seed=c.seed)


def _point_dir(work: Path, n: int, strategy: str, heal: str) -> Path:
    return work / "points" / f"n{n:03d}-{strategy}-{heal}"


def _run_point(model, tokenizer, c: SweepConfig, work: Path, db, point: tuple[int, str, str], total: int,
               distances: AngularDistances, log) -> dict:
    """Evaluate one point and record it in one transaction; returns its metrics."""
    n, strategy, method = point
    start = time.perf_counter()
    selection = choose_block(strategy, n, total, distances) if n > 0 else None
    layers = selection.layers if selection else ()
    log(f"{point_key(*point)}: removing layers {list(layers) if layers else 'none'}")
    healing = None
    if method == "none":
        with layers_removed(model, layers) as cut:
            evaluation, cost = _evaluate(cut, tokenizer, c), _cost(cut, c)
    else:
        healed, healing = _heal_point(model, tokenizer, c, work, point, selection, total)
        evaluation, cost = _evaluate(healed, tokenizer, c), _cost(healed, c)
        del healed
    metrics = flatten_metrics(evaluation, cost, healing)
    save_point(db, n=n, fraction=n / total, strategy=strategy, heal=method, removed_layers=layers,
               distance=selection.distance if selection else None, metrics=metrics,
               details={"evaluation": evaluation, "cost": cost, "healing": healing,
                        "seconds": round(time.perf_counter() - start, 1)})
    if method != "none" and not c.keep_models:
        shutil.rmtree(_point_dir(work, *point), ignore_errors=True)
    return metrics


def _heal_point(model, tokenizer, c: SweepConfig, work: Path, point: tuple[int, str, str], selection, total: int):
    """Save the cut (atomically), heal it (resuming a killed healing) and load the merged result."""
    from .heal import heal

    folder = _point_dir(work, *point)
    pruned, healed = folder / "pruned", folder / "healed"
    if not (pruned / "config.json").is_file():
        params_before = count_parameters(model)
        with layers_removed(model, selection.layers) as cut:
            record = pruning_record(c.model, total, params_before, cut, selection)
            save_pruned(cut, tokenizer, pruned, record, force=True)
    if _started_elsewhere(healed, pruned):
        shutil.rmtree(healed)
    record = read_record(healed) if healed.is_dir() else None
    if record is not None and "healing" in record:
        healing = record["healing"]  # healed before the sweep was stopped, not yet evaluated
    else:
        options = {**c.heal_options, "method": point[2]}
        healing = heal(str(pruned), c.heal_data, str(healed), val_data=c.heal_val_data, preset=c.heal_preset,
                       device=c.device, dtype=c.dtype, progress=False, **options)
    healed_model, _ = load_model(str(healed), device=c.device, dtype=c.dtype)
    return healed_model, healing


def _started_elsewhere(healed: Path, pruned: Path) -> bool:
    """A healing begun before the sweep folder moved names its input by the old path, and heal would
    refuse to resume it as 'other settings': such a healing starts over."""
    from .heal import CONFIG_FILE

    try:
        started = json.loads((healed / CONFIG_FILE).read_text(encoding="utf-8")).get("model")
    except (OSError, ValueError, AttributeError):
        return False
    return started is not None and started != str(pruned)


def _finish(c: SweepConfig, out: Path, work: Path, points: int, total: int) -> None:
    """Drop the healed models (unless kept), write the summary and, for --force, put the new sweep in place."""
    if not c.keep_models:
        shutil.rmtree(work / "points", ignore_errors=True)  # also what a kill left while deleting one
    atomic_write_text(work / "summary.json", json.dumps({"model": c.model, "num_layers": total, "points": points},
                                                        indent=2) + "\n")
    if work != out:
        replace_dir(work, out)
