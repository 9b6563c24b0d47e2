"""The options of every stage that are no plug-in's, declared once: default, help text and range of each.

One dataclass per stage — :class:`ModelOptions`, :class:`DataOptions` (calibration text),
:class:`AnalysisOptions`, :class:`MemoryOptions`, :class:`SharedEvalOptions` (what every evaluation task
shares), :class:`CostOptions` — and the device and dtype names. The CLI's flags (``add_options``), the
sweep's YAML keys (``coerce``/``check_ranges``) and the Python API's checks all read these declarations.
The options of a plug-in (a criterion, a task, a healing method) are declared by its own module and join
its stage's options there (``select.criterion_options_class``, ``evaluate.registry.eval_options_class``,
``heal.options.heal_options_class``); the sweep's settings are composed of all of them in
``depthprune.sweep.config``. This module imports no stage, registry or plug-in.

This module stays light (no torch): ``depthprune --help`` builds its parsers from it.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from .errors import DepthpruneError
from .options import Checked, option

DEVICES = ("cpu", "cuda", "auto")
DTYPE_NAMES = ("float32", "bfloat16", "float16")
TOKEN_MODES = ("last", "all")


@dataclasses.dataclass
class ModelOptions(Checked):
    """How a model is loaded (every command that loads one)."""

    device: str = option("cpu", choices=DEVICES, help="cpu, cuda (one GPU) or auto (spread over all GPUs with "
                                                      "accelerate)")
    dtype: str = option("float32", choices=DTYPE_NAMES, help="weights and compute")
    trust_remote_code: bool = option(False, help="allow the model repo's own Python code")


@dataclasses.dataclass
class DataOptions(Checked):
    """Calibration text: where from and how much of it (checked when made).

    ``seq_len`` defaults to 256 tokens: the committed sweeps and the README's findings were measured with it,
    it halves the analysis time of 512 on a CPU, and the paper's statistic is read at one (the last) token.
    """

    source: str = option(flag="--data", metavar="SRC", path=True,
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
class AnalysisOptions(Checked):
    """How the angular distances are measured."""

    batch_size: int = option(8, minimum=1, help="sequences per forward pass")
    token_mode: str = option("last", choices=TOKEN_MODES,
                             help="last: compare each sample's last real token (the paper's); all: average over "
                                  "all its tokens")


@dataclasses.dataclass
class MemoryOptions(Checked):
    """Whether the analysis loads the model or streams it one decoder layer at a time (``depthprune.measure.stream``)."""

    stream: bool = option(False, help="measure one decoder layer at a time, read from the safetensors files, instead "
                                      "of loading the whole model (the same distances, a fraction of the memory)")
    max_memory: str | None = option(None, metavar="SIZE",
                                    help="memory the measurement may use on its device, e.g. 24GiB or 2GB; streams "
                                         "when the whole model would not fit (units: KB/MB/GB/TB in 1000s, "
                                         "KiB/MiB/GiB/TiB in 1024s, or bytes)")


@dataclasses.dataclass
class SharedEvalOptions(Checked):
    """How every evaluation task runs. Each task's own options (MMLU's shots, C4's sequences, ...) and its data
    source are declared by the task (``depthprune.evaluate.tasks``)."""

    limit: int | None = option(None, minimum=1, metavar="N",
                               help="every other task (BoolQ, ARC-Easy, HellaSwag, lm-eval tasks): its first N "
                                    "examples (default: all; MMLU has --mmlu-limit)")
    batch_size: int = option(8, minimum=1, help="sequences per forward pass")
    max_length: int | None = option(None, minimum=2, help="context limit in tokens (default: the model's)")
    seed: int = option(0, help="C4: seed of the document sample")
    lm_eval: list[str] = option(help="lm-evaluation-harness tasks to run too, comma-separated (e.g. hellaswag; "
                                     "arc_easy_local: ARC-Easy through lm-evaluation-harness, from a local copy)",
                                default_factory=list)
    lm_eval_include: str | None = option(None, metavar="DIR", path=True,
                                         help="directory of your own lm-eval task YAMLs")
    lm_eval_data: str | None = option(None, metavar="DIR", path=True,
                                      help="data directory of the bundled local lm-eval tasks (default: "
                                           "$DEPTHPRUNE_DATA)")
    lm_eval_fewshot: int | None = option(None, minimum=0, help="override the lm-eval tasks' number of shots")


@dataclasses.dataclass
class CostOptions(Checked):
    """How the cost of a model is measured (the sweep measures every point). A sweep times the cost again,
    with the settings of the run, every time it finishes, so each may change when it resumes."""

    prefill_len: int = option(256, minimum=1, resumable=True, help="prompt tokens timed for prefill")
    decode_tokens: int = option(32, minimum=1, resumable=True, help="tokens timed for decoding")
    repeats: int = option(3, minimum=1, resumable=True, help="timings per point; the best is kept")
    rounds: int = option(3, minimum=1, resumable=True,
                         help="sweep: interleaved rounds over every layer count in the final cost phase (median "
                              "and spread over the rounds)")
