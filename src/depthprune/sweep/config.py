"""The settings of a sweep: every stage's options, every registered plug-in's, and the sweep's own keys.

:func:`sweep_config_class` composes them into one flat dataclass, ``SweepConfig``, when asked, so that
criteria and tasks registered after import count: the model and calibration data, the analysis, the
sweep's points (fractions, criteria, granularities, repairs, healings, tasks), the options of every criterion
(``SelectionContext`` gets them) and every repair (``repair_cut`` gets them), the evaluation's (shared and each task's), the healing inputs and the cost. A YAML file with
these keys, and the flags (one per key), fill it. Healing options are one dict, ``heal_options``, checked
against :class:`depthprune.heal.HealOptions`.

What each setting means to a resumed sweep is its metadata (``option(path=, point=, resumable=)``, read
with :func:`depthprune.options.fields_with`). Stage options that name the same setting (``batch_size``,
``seed``) are one setting for every stage; a plug-in option must have a name of its own.

``SweepConfig`` read as a module attribute is the class composed at that moment (for annotations and
pickling); code that runs later calls :func:`sweep_config_class`.
"""

from __future__ import annotations

import dataclasses
import functools
import typing

from ..config import AnalysisOptions, CostOptions, DataOptions, ModelOptions, SharedEvalOptions
from ..errors import DepthpruneError
from ..evaluate.registry import EVAL_TASKS, eval_options_class
from ..heal.methods import HEAL_METHODS
from ..model.granularity import GRANULARITIES
from ..options import copied_field, option
from ..repair import repair_choices, repair_options_class
from ..select import CRITERIA, criterion_options_class


def parse_fractions(text: str):
    """'start:stop:step' (stop included) as a list; other text is converted as a comma-separated list."""
    if ":" not in text:
        return NotImplemented
    try:
        start, stop, step = (float(part) for part in text.split(":"))
    except ValueError:
        raise DepthpruneError(f"bad fractions '{text}': use start:stop:step with numbers, e.g. 0:0.6:0.1") from None
    if step <= 0 or start > stop:
        raise DepthpruneError(f"bad fractions '{text}': the step must be positive and start not above stop")
    count = int(round((stop - start) / step)) + 1
    return [round(start + i * step, 10) for i in range(count) if start + i * step <= stop + 1e-9]


def heal_choices() -> tuple[str, ...]:
    return ("none", *HEAL_METHODS.names())


@dataclasses.dataclass
class _SweepOwn:
    """The sweep's own keys (the rest come from the stage options)."""

    model: str = option("smollm2-135m", help="the model to sweep (an alias, checkpoint, .gguf or hub id)", cli=False,
                        path=True)
    out: str = option("runs/sweep", help="output directory; rerun with the same settings to resume (also after "
                                         "moving it)", resumable=True)
    fractions: list[float] = option(help="fractions of the layers to remove: start:stop:step (stop included) or a "
                                         "list", parse=parse_fractions, point=True,
                                    default_factory=lambda: [0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6])
    n: list[int] | None = option(None, help="numbers of layers to remove instead of fractions, e.g. 0,2,4,8",
                                 point=True)
    criteria: list[str] = option(help="selection criteria, comma-separated: {choices}", choices=CRITERIA.names,
                                 point=True, default_factory=lambda: ["similarity", "deepest"])
    granularity: list[str] = option(help="what each cut removes, comma-separated: {choices} (attention / mlp: that "
                                         "sub-layer of n layers; fractions stay fractions of the layers)",
                                    choices=lambda: GRANULARITIES, point=True, default_factory=lambda: ["layer"])
    repair: list[str] = option(help="training-free repair of each cut, comma-separated: {choices} (a repair needs "
                                    "criteria that remove one block; fitted on --data)", choices=repair_choices,
                               point=True, default_factory=lambda: ["none"])
    heal: list[str] = option(help="healing of each cut, comma-separated: {choices}", choices=heal_choices,
                             point=True, default_factory=lambda: ["none"])
    heal_fractions: list[float] | None = option(None, help="heal only the cuts of these fractions (default: every "
                                                           "cut)", parse=parse_fractions, point=True)
    tasks: list[str] = option(help="evaluation tasks, comma-separated: {choices}", choices=EVAL_TASKS.names,
                              default_factory=lambda: ["mmlu", "boolq", "c4"])
    heal_data: str | None = option(None, metavar="SRC", help="training text for healing", path=True)
    heal_val_data: str | None = option(None, metavar="SRC", help="validation text scored during healing", path=True)
    heal_preset: str | None = option(None, help="healing preset (paper, cpu-small); heal options win over it")
    heal_options: dict = option(help="options of `depthprune heal` (steps, rank, lr, ...): --heal-option KEY=VALUE",
                                cli=False, default_factory=dict)
    cost: bool = option(True, help="measure the cost of every point (parameters, memory, prefill and decode time)",
                        resumable=True)
    keep_models: bool = option(False, help="keep the healed checkpoints under OUT/points", resumable=True)
    task_data: dict = option(help="data source of each task, by task name (YAML: `mmlu: DIR`, CLI: --mmlu DIR)",
                             cli=False, default_factory=dict)
    # Resources each point's Ray task reserves (sweep --ray); they change no result.
    ray_cpus: float = option(1.0, above=0, help="with --ray: CPUs each point's task reserves", resumable=True)
    ray_eval_gpus: float = option(1.0, minimum=0, help="with --ray and device cuda/auto: GPUs an unhealed point's task "
                                                       "reserves (a fraction lets evaluations share a GPU)",
                                  resumable=True)
    ray_heal_gpus: float = option(1.0, minimum=0, help="with --ray and device cuda/auto: GPUs a healed point's task "
                                                       "reserves", resumable=True)


Spec = tuple[str, typing.Any, dataclasses.Field]  # (name, type, field) for make_dataclass


def _fields(cls, rename: dict[str, str] | None = None, prefix: str = "", exclude=(), defaults=None) -> list[Spec]:
    """(name, type, field) of each field of ``cls``: renamed, re-defaulted, metadata kept."""
    rename, defaults = rename or {}, defaults or {}
    hints = typing.get_type_hints(cls)
    found = []
    for f in dataclasses.fields(cls):
        if f.name in exclude:
            continue
        name, tp = rename.get(f.name, prefix + f.name), hints[f.name]
        if name in defaults:
            found.append((name, tp | None if defaults[name] is None else tp, copied_field(f, defaults[name])))
        else:
            found.append((name, tp, copied_field(f)))
    return found


def sweep_config_class() -> type:
    """``SweepConfig`` with the options of the criteria, repairs and tasks registered now (the same class while
    they are)."""
    return _compose(criterion_options_class(), eval_options_class(), repair_options_class())


@functools.cache
def _compose(criterion_options: type, eval_options: type, repair_options: type) -> type:
    own = {name: (name, *spec) for name, *spec in _fields(_SweepOwn)}
    first = [
        own["model"], own["out"],
        *_fields(ModelOptions, exclude=("trust_remote_code",)),
        *_fields(DataOptions, rename={"source": "data", "config": "data_config", "split": "data_split"},
                 defaults={"data": None}),
        *_fields(AnalysisOptions),
        *[own[name] for name in ("fractions", "n", "criteria", "granularity", "repair", "heal", "heal_fractions", "tasks")],
    ]
    shared_eval = _fields(SharedEvalOptions)
    last = [
        *[own[name] for name in ("heal_data", "heal_val_data", "heal_preset", "heal_options", "cost")],
        *_fields(CostOptions, prefix="cost_"),
        *[own[name] for name in ("keep_models", "task_data", "ray_cpus", "ray_eval_gpus", "ray_heal_gpus")],
    ]
    taken = {name for name, *_ in [*first, *shared_eval, *last]}
    plugins = [spec for spec in [*_fields(criterion_options), *_fields(repair_options), *_fields(eval_options)]
               if spec[0] not in {name for name, *_ in shared_eval}]
    names = [name for name, *_ in plugins]
    clash = [name for i, name in enumerate(names) if name in taken or name in names[:i]]
    if clash:
        raise ValueError(f"option '{clash[0]}' of a plug-in is already a sweep setting: rename it")
    fields: dict[str, Spec] = {}
    for spec in [*first, *plugins, *shared_eval, *last]:
        fields.setdefault(spec[0], spec)  # batch_size and seed: one setting for every stage
    cls = dataclasses.make_dataclass("SweepConfig", list(fields.values()), namespace={"__module__": __name__})
    cls.__doc__ = ("Every setting of a sweep: the stage options (model, calibration data, analysis, evaluation, "
                   "cost), the options of the registered criteria, repairs and tasks, and the sweep's own keys; a YAML "
                   "file with these keys, and the flags, fill it.")
    return cls


def __getattr__(name: str):
    if name == "SweepConfig":
        return sweep_config_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
