"""The sweep's settings: resolved from defaults, YAML and flags, checked before any work, and compared with
the ``sweep.yaml`` of the sweep being resumed.

The settings are :class:`depthprune.sweep.config.SweepConfig`: the stage options plus the sweep's own keys, one
flag each. Criteria, tasks and their data come from the registries (``select.CRITERIA``,
``evaluate.registry.EVAL_TASKS``), so a new criterion or task needs no change here. Also here: the options of
each stage built from the settings, and the checks that everything the settings name exists and parses.
"""

from __future__ import annotations

import dataclasses
import typing
from pathlib import Path

import yaml

from ..config import AnalysisOptions, CostOptions, DataOptions
from ..data import load_texts
from ..errors import DepthpruneError
from ..evaluate.registry import EVAL_TASKS, EvalOptions, eval_options_class
from ..model.load import EMBEDDED_MODELS, resolve_model_source
from ..options import check_ranges, coerce, convert, fields_with
from ..repair import repair_choices, repair_options_class
from ..select import CRITERIA, criterion_options_class
from .config import SweepConfig, heal_choices, sweep_config_class

# What a setting means to a resumed sweep is its metadata (depthprune.sweep.config): `path` settings (local
# files or folders, or hub ids, besides the tasks' data) are compared and recorded resolved, so that the
# spelling of a path never decides whether a sweep resumes; `resumable` ones change no result, and `point`
# ones choose only which points run, so a rerun with more criteria, fractions or healings keeps its
# finished points and runs the new ones.
# Keys renamed since: an old config names the new key in its error; an old sweep.yaml is read as renamed.
RENAMED = {"strategies": "criteria", "tokens": "token_mode"}

# ------------------------------------------------------------------------------------------ settings


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
    config_class = sweep_config_class()
    config = config_class(**coerce(config_class, settings, "sweep setting"))
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


def _check_choices(values: list[str], choices, what: str, hint: str = "") -> None:
    """Refuse in one line a value of a sweep axis that is not one of ``choices``, or an empty axis."""
    wrong = [v for v in values if v not in choices]
    if wrong:
        raise DepthpruneError(f"unknown {what} '{wrong[0]}': choose from {', '.join(choices)}")
    if not values:
        raise DepthpruneError(f"the sweep needs at least one {what}{hint}: choose from {', '.join(choices)}")


def _check_points(c: SweepConfig) -> None:
    CRITERIA.check(c.criteria)
    if not c.criteria:
        raise DepthpruneError(f"the sweep needs at least one criterion: choose from {', '.join(CRITERIA.names())}")
    _check_choices(c.heal, heal_choices(), "healing method")
    bad = [f for f in c.fractions + (c.heal_fractions or []) if not 0 <= f < 1]
    if bad:
        raise DepthpruneError(f"fraction {bad[0]} out of range: fractions must be in [0, 1)")
    if c.n is not None and any(n < 0 for n in c.n):
        raise DepthpruneError(f"sweep setting 'n' must hold 0 or more layers, got {min(c.n)}")
    if not (c.n if c.n is not None else c.fractions):
        raise DepthpruneError("the sweep has no points: give fractions (e.g. 0:0.5:0.1) or n (e.g. 0,2,4)")
    _check_repairs(c)
    _check_granularities(c)


def _check_granularities(c: SweepConfig) -> None:
    """Known granularities, each one every criterion can choose at, and repairs only of whole-layer cuts."""
    from ..model.granularity import GRANULARITIES, unit_name

    _check_choices(c.granularity, GRANULARITIES, "granularity")
    for granularity in c.granularity:
        unable = [name for name in c.criteria if granularity not in CRITERIA.get(name).granularities]
        if unable:
            able = [name for name in CRITERIA.names() if granularity in CRITERIA.get(name).granularities]
            raise DepthpruneError(f"criterion '{unable[0]}' cannot choose {unit_name(granularity)}: sweep granularity "
                                  f"{granularity} with {', '.join(able)}, or '{unable[0]}' in a sweep without it")
    repaired = [r for r in c.repair if r != "none"]
    finer = [g for g in c.granularity if g != "layer"]
    if repaired and finer:
        raise DepthpruneError(f"repair '{repaired[0]}' refits a removed block of whole layers, and granularity "
                              f"'{finer[0]}' removes sub-layers: sweep repairs at granularity layer only, or the "
                              "sub-layer cuts in a sweep without repair")


def _check_repairs(c: SweepConfig) -> None:
    """Known repairs, and criteria that can have them: a repair folds one map after one removed block."""
    _check_choices(c.repair, repair_choices(), "repair", " (none: cut without)")
    repaired = [r for r in c.repair if r != "none"]
    apart = [name for name in c.criteria if not CRITERIA.get(name).contiguous]
    if repaired and apart:
        blocks = ", ".join(name for name in CRITERIA.names() if CRITERIA.get(name).contiguous)
        raise DepthpruneError(f"repair '{repaired[0]}' needs one contiguous block of layers, and criterion '{apart[0]}' "
                              f"may remove layers apart: sweep repairs with criteria that remove a block ({blocks}), "
                              "or the others in a sweep without repair")


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
                               **{k: _resolved_path(getattr(c, k)) for k in fields_with(c, "path")})


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
    return {**settings_record(sweep_config_class()()), **saved}


def _changed_settings(saved: dict, c: SweepConfig) -> list[str]:
    new = settings_record(c)
    saved = _as_now(saved)
    paths = (*fields_with(c, "path"), *EVAL_TASKS.names())
    saved = {**saved, **{k: _resolved_path(saved[k]) for k in paths if isinstance(saved.get(k), str)}}
    unchecked = fields_with(c, "resumable", "point")
    return sorted(k for k in set(saved) | set(new) if k not in unchecked and saved.get(k) != new.get(k))


# ------------------------------------------------------------------------------------------ stage options


def _stage(cls, c: SweepConfig, **renamed):
    """The options of one stage (``cls``) from the sweep's settings (``renamed``: field -> sweep key)."""
    return cls(**{f.name: getattr(c, renamed.get(f.name, f.name)) for f in dataclasses.fields(cls)})


def _data_options(c: SweepConfig) -> DataOptions:
    return _stage(DataOptions, c, source="data", config="data_config", split="data_split")


def _analysis_options(c: SweepConfig) -> AnalysisOptions:
    return _stage(AnalysisOptions, c)


def eval_options(c: SweepConfig) -> EvalOptions:
    return _stage(eval_options_class(), c)


def criterion_options(c: SweepConfig):
    """The criteria's options (every registered criterion's, one flat object) as this sweep sets them."""
    return _stage(criterion_options_class(), c)


def repair_settings(c: SweepConfig):
    """The repairs' options (every registered repair's, one flat object) as this sweep sets them."""
    return _stage(repair_options_class(), c)


def _cost_options(c: SweepConfig) -> CostOptions:
    return _stage(CostOptions, c, **{f.name: f"cost_{f.name}" for f in dataclasses.fields(CostOptions)})


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
    return [getattr(c, k) for k in fields_with(c, "path")] + list(c.task_data.values()) + [c.heal_options.get("teacher")]
