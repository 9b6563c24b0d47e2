"""The options of every stage, declared once: default, help text and range of each in one place.

One dataclass per stage — :class:`ModelOptions`, :class:`DataOptions` (calibration text),
:class:`AnalysisOptions`, :class:`EvalOptions`, :class:`CostOptions` — and :class:`SweepConfig`, which is
composed of their fields plus the sweep's own keys. The CLI's flags (``add_options``), the sweep's YAML
keys (``coerce``/``check_ranges``) and the Python API's checks all read these declarations. The data
sources of the evaluation tasks are not here: each task declares its own flag in the task registry
(``depthprune.evaluate.registry``).

This module stays light (no torch): ``depthprune --help`` builds its parsers from it.
"""

from __future__ import annotations

import dataclasses
import typing
from pathlib import Path
from typing import Any

from .errors import DepthpruneError
from .options import check_ranges, check_types, option

DEVICES = ("cpu", "cuda", "auto")
DTYPE_NAMES = ("float32", "bfloat16", "float16")
TOKEN_MODES = ("last", "all")


class _Checked:
    """Options check themselves when made (from the API too): types, then ranges, one-line errors naming the flag."""

    def __post_init__(self) -> None:
        check_types(self)
        check_ranges(self)


@dataclasses.dataclass
class ModelOptions(_Checked):
    """How a model is loaded (every command that loads one)."""

    device: str = option("cpu", choices=DEVICES, help="cpu, cuda (one GPU) or auto (spread over all GPUs with "
                                                      "accelerate)")
    dtype: str = option("float32", choices=DTYPE_NAMES, help="weights and compute")
    trust_remote_code: bool = option(False, help="allow the model repo's own Python code")


@dataclasses.dataclass
class DataOptions(_Checked):
    """Calibration text: where from and how much of it (checked when made).

    ``seq_len`` defaults to 256 tokens: the committed sweeps and the README's findings were measured with it,
    it halves the analysis time of 512 on a CPU, and the paper's statistic is read at one (the last) token.
    """

    source: str = option(flag="--data", metavar="SRC",
                         help="calibration text: .jsonl/.json/.txt/.parquet file, a directory of them, or a Hugging "
                              "Face dataset id")
    samples: int = option(128, minimum=1, help="number of calibration documents")
    seq_len: int = option(256, minimum=2, help="calibration tokens per document (longer ones are truncated)")
    seed: int = option(0, help="seed of the document sample (and of the C4 evaluation sample)")
    text_field: str = option("text", help="field holding the text")
    config: str | None = option(None, flag="--data-config", help="Hugging Face dataset config (e.g. 'en' for "
                                                                 "allenai/c4)")
    split: str = option("train", flag="--data-split", help="Hugging Face dataset split")

    def __post_init__(self) -> None:
        if isinstance(self.source, Path):
            self.source = str(self.source)
        if not isinstance(self.source, str):
            raise DepthpruneError(f"data source must be a path or a dataset id, got {self.source!r}")
        super().__post_init__()


@dataclasses.dataclass
class AnalysisOptions(_Checked):
    """How the angular distances are measured."""

    batch_size: int = option(8, minimum=1, help="sequences per forward pass")
    token_mode: str = option("last", choices=TOKEN_MODES,
                             help="last: compare each sample's last real token (the paper's); all: average over "
                                  "all its tokens")


@dataclasses.dataclass
class MemoryOptions(_Checked):
    """Whether the analysis loads the model or streams it one decoder layer at a time (``depthprune.measure.stream``)."""

    stream: bool = option(False, help="measure one decoder layer at a time, read from the safetensors files, instead "
                                      "of loading the whole model (the same distances, a fraction of the memory)")
    max_memory: str | None = option(None, metavar="SIZE",
                                    help="memory the measurement may use on its device, e.g. 24GiB or 2GB; streams "
                                         "when the whole model would not fit (units: KB/MB/GB/TB in 1000s, "
                                         "KiB/MiB/GiB/TiB in 1024s, or bytes)")


@dataclasses.dataclass
class EvalOptions(_Checked):
    """How the evaluation tasks run. Each task's data source is its own flag (the task registry)."""

    shots: int = option(5, minimum=0, help="MMLU: worked examples in each prompt")
    subjects: list[str] | None = option(None, help="MMLU: comma-separated subjects (default: all 57)")
    mmlu_limit: int | None = option(None, minimum=1, metavar="N",
                                    help="MMLU: the first N questions of each subject (57 subjects: 57 x N questions; "
                                         "default: all)")
    limit: int | None = option(None, minimum=1, metavar="N",
                               help="every other task (BoolQ, ARC-Easy, HellaSwag, lm-eval tasks): its first N "
                                    "examples (default: all; MMLU has --mmlu-limit)")
    boolq_limit: int | None = option(None, minimum=1, metavar="N", help="BoolQ: the first N examples (default: "
                                                                         "--limit)")
    batch_size: int = option(8, minimum=1, help="sequences per forward pass")
    max_length: int | None = option(None, minimum=2, help="context limit in tokens (default: the model's)")
    c4_sequences: int = option(64, minimum=1, help="C4: packed sequences to score")
    c4_seq_len: int = option(512, minimum=2, help="C4: tokens per scored sequence")
    c4_config: str | None = option(None, help="C4: Hugging Face dataset config (default: 'en' for allenai/c4)")
    c4_split: str = option("validation", help="C4: Hugging Face dataset split")
    seed: int = option(0, help="C4: seed of the document sample")
    lm_eval: list[str] = option(help="lm-evaluation-harness tasks to run too, comma-separated (e.g. hellaswag; "
                                     "arc_easy_local reads a local copy)", default_factory=list)
    lm_eval_include: str | None = option(None, metavar="DIR", help="directory of your own lm-eval task YAMLs")
    lm_eval_data: str | None = option(None, metavar="DIR", help="data directory of the bundled local lm-eval tasks "
                                                                "(default: $DEPTHPRUNE_DATA)")
    lm_eval_fewshot: int | None = option(None, minimum=0, help="override the lm-eval tasks' number of shots")


@dataclasses.dataclass
class CostOptions(_Checked):
    """How the cost of a model is measured (the sweep measures every point)."""

    prefill_len: int = option(256, minimum=1, help="prompt tokens timed for prefill")
    decode_tokens: int = option(32, minimum=1, help="tokens timed for decoding")
    repeats: int = option(3, minimum=1, help="timings per point; the best is kept")
    rounds: int = option(3, minimum=1, help="sweep: interleaved rounds over every layer count in the final cost phase "
                                            "(median and spread over the rounds)")


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


def _criterion_names() -> tuple[str, ...]:
    from .select import CRITERIA

    return CRITERIA.names()


def _task_names() -> tuple[str, ...]:
    from .evaluate.registry import EVAL_TASKS

    return EVAL_TASKS.names()


def _healing_names() -> tuple[str, ...]:
    from .heal.methods import HEAL_METHODS

    return ("none", *HEAL_METHODS.names())


@dataclasses.dataclass
class _SweepOwn:
    """The sweep's own keys (the rest come from the stage options)."""

    model: str = option("smollm2-135m", help="the model to sweep (an alias, checkpoint, .gguf or hub id)", cli=False)
    out: str = option("runs/sweep", help="output directory; rerun with the same settings to resume (also after "
                                         "moving it)")
    fractions: list[float] = option(help="fractions of the layers to remove: start:stop:step (stop included) or a "
                                         "list", parse=parse_fractions,
                                    default_factory=lambda: [0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6])
    n: list[int] | None = option(None, help="numbers of layers to remove instead of fractions, e.g. 0,2,4,8")
    criteria: list[str] = option(help="selection criteria, comma-separated: {choices}", choices=_criterion_names,
                                 default_factory=lambda: ["similarity", "deepest"])
    heal: list[str] = option(help="healing of each cut, comma-separated: {choices}", choices=_healing_names,
                             default_factory=lambda: ["none"])
    heal_fractions: list[float] | None = option(None, help="heal only the cuts of these fractions (default: every "
                                                           "cut)", parse=parse_fractions)
    tasks: list[str] = option(help="evaluation tasks, comma-separated: {choices}", choices=_task_names,
                              default_factory=lambda: ["mmlu", "boolq", "c4"])
    heal_data: str | None = option(None, metavar="SRC", help="training text for healing")
    heal_val_data: str | None = option(None, metavar="SRC", help="validation text scored during healing")
    heal_preset: str | None = option(None, help="healing preset (paper, cpu-small); heal options win over it")
    heal_options: dict = option(help="options of `depthprune heal` (steps, rank, lr, ...): --heal-option KEY=VALUE",
                                cli=False, default_factory=dict)
    cost: bool = option(True, help="measure the cost of every point (parameters, memory, prefill and decode time)")
    keep_models: bool = option(False, help="keep the healed checkpoints under OUT/points")
    task_data: dict = option(help="data source of each task, by task name (YAML: `mmlu: DIR`, CLI: --mmlu DIR)",
                             cli=False, default_factory=dict)
    # Resources each point's Ray task reserves (sweep --ray); they change no result.
    ray_cpus: float = option(1.0, above=0, help="with --ray: CPUs each point's task reserves")
    ray_eval_gpus: float = option(1.0, minimum=0, help="with --ray and device cuda/auto: GPUs an unhealed point's task "
                                                       "reserves (a fraction lets evaluations share a GPU)")
    ray_heal_gpus: float = option(1.0, minimum=0, help="with --ray and device cuda/auto: GPUs a healed point's task "
                                                       "reserves")


def _fields(cls, rename: dict[str, str] | None = None, prefix: str = "", exclude=(), defaults=None) -> list[tuple]:
    """(name, type, field) of each field of ``cls`` for ``make_dataclass``: renamed, re-defaulted, metadata kept."""
    rename, defaults = rename or {}, defaults or {}
    hints = typing.get_type_hints(cls)
    found = []
    for f in dataclasses.fields(cls):
        if f.name in exclude:
            continue
        name, tp = rename.get(f.name, prefix + f.name), hints[f.name]
        if name in defaults:
            if defaults[name] is None:
                tp = tp | None
            made = dataclasses.field(default=defaults[name], metadata=f.metadata)
        elif f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
            made = dataclasses.field(default_factory=f.default_factory, metadata=f.metadata)  # type: ignore[misc]
        else:
            made = dataclasses.field(default=f.default, metadata=f.metadata)
        found.append((name, tp, made))
    return found


def _compose() -> type:
    own = {name: spec for name, *spec in _fields(_SweepOwn)}
    order = ["model", "out"]
    parts = [
        *_fields(ModelOptions, exclude=("trust_remote_code",)),
        *_fields(DataOptions, rename={"source": "data", "config": "data_config", "split": "data_split"},
                 defaults={"data": None}),
        *_fields(AnalysisOptions),
        *[(name, *own[name]) for name in ("fractions", "n", "criteria", "heal", "heal_fractions", "tasks")],
        *_fields(EvalOptions),
        *[(name, *own[name]) for name in ("heal_data", "heal_val_data", "heal_preset", "heal_options", "cost")],
        *_fields(CostOptions, prefix="cost_"),
        *[(name, *own[name]) for name in ("keep_models", "task_data", "ray_cpus", "ray_eval_gpus", "ray_heal_gpus")],
    ]
    seen: set[str] = set(order)
    fields = [(name, *own[name]) for name in order]
    for name, *spec in parts:
        if name not in seen:  # batch_size and seed: one setting for every stage
            seen.add(name)
            fields.append((name, *spec))
    cls = dataclasses.make_dataclass("SweepConfig", fields, namespace={"__module__": __name__})
    cls.__doc__ = ("Every setting of a sweep: the stage options (model, calibration data, analysis, evaluation, "
                   "cost) and the sweep's own keys; a YAML file with these keys, and the flags, fill it.")
    return cls


SweepConfig: Any = _compose()
