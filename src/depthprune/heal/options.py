"""The options of a healing run, declared once: default, help text and range of each in one field.

The CLI's ``heal`` flags are generated from :class:`HealOptions` (:func:`depthprune.options.add_options`),
the sweep's ``heal_options`` are type-checked against it, and :func:`resolve_options` layers the
defaults, a preset and the options given. Light: no torch import.
"""

from __future__ import annotations

import dataclasses
import math
import typing
from dataclasses import dataclass

from ..errors import DepthpruneError
from ..options import check_ranges, flag_name, option
from .methods import HEAL_METHODS

SCHEDULES = {"cosine": "cosine", "linear": "linear", "constant": "constant_with_warmup"}


@dataclass
class HealOptions:
    """Everything that decides a healing run. The defaults are the paper's recipe (Appendix A.1)."""

    method: str = option("qlora", help="healing method", choices=HEAL_METHODS.names)
    steps: int | None = option(5000, help="optimizer steps", minimum=1)
    train_tokens: int | None = option(None, help="training tokens instead of --steps (rounded up to whole steps)",
                                      minimum=1)
    batch_size: int = option(16, help="global batch in sequences per step", minimum=1)
    grad_accum: int = option(1, help="micro-batches per step and process (micro batch = batch / (accum x processes))",
                             minimum=1)
    seq_len: int = option(2048, help="tokens per packed sequence", minimum=2)
    lr: float = option(3e-4, help="peak learning rate", above=0)
    rank: int = option(64, help="LoRA rank", minimum=1)
    alpha: float | None = option(None, help="LoRA alpha (default: = rank, as in the paper)", above=0)
    dropout: float = option(0.05, help="LoRA dropout", minimum=0, below=1)
    target_modules: list[str] | None = option(
        None, help="comma-separated module names for LoRA, or all-linear (default: the MLP projections, e.g. "
                   "gate_proj,up_proj,down_proj)")
    warmup: int = option(100, help="warm-up steps", minimum=0)
    schedule: str = option("cosine", help="learning-rate schedule after warm-up", choices=list(SCHEDULES))
    weight_decay: float = option(0.0, help="AdamW weight decay", minimum=0)
    max_grad_norm: float = option(1.0, help="gradient clipping norm", above=0)
    teacher: str | None = option(None, help="the unpruned model, for logit distillation (KL to its next-token "
                                            "distribution)")
    kd_weight: float = option(0.5, help="weight of the distillation loss: loss = (1 - w) LM + w KL(teacher || "
                                        "student)", minimum=0, maximum=1)
    kd_temperature: float = option(1.0, help="softmax temperature of the distillation", above=0)
    eval_every: int = option(500, help="validation every N steps", minimum=1)
    save_every: int = option(500, help="checkpoint every N steps", minimum=1)
    val_sequences: int = option(64, help="validation sequences of --seq-len tokens", minimum=1)
    seed: int = option(0, help="seed of data order, LoRA init and dropout", minimum=0, below=2**32)
    gradient_checkpointing: bool = option(False, help="trade compute for activation memory")
    fsdp: bool = option(False, help="shard weights, gradients and optimizer state over the torchrun processes "
                                    "(FSDP2), for full/lora/dora healing or distillation of models larger than one "
                                    "GPU; not with qlora")
    loss_chunk: int = option(256, help="positions per chunk of the vocabulary projection and loss: the logits of a "
                                       "whole batch are never held at once (0: all at once, from the model's logits)",
                             minimum=0)
    compile: bool = option(False, help="torch.compile each decoder layer (the first steps pay the compilation)")
    bf16_autocast: bool = option(False, help="compute in bfloat16 under autocast, weights and optimizer in their dtype "
                                             "(faster where the CPU or GPU has bf16 units; results differ at bf16 "
                                             "precision)")
    qlora_cache_dequantized: bool = option(
        False, help="qlora on CPU: de-quantize the 4-bit base once and keep the copy (the dtype's size instead of 4 "
                    "bits per weight) rather than at every forward and backward; the same 4-bit function trains")
    text_field: str = option("text", help="field holding the text")
    data_config: str | None = option(None, help="Hugging Face dataset config (e.g. 'en' for allenai/c4)")
    data_split: str = option("train", help="Hugging Face split of --data")


# Presets replace the defaults; options given explicitly replace the preset.
PRESETS: dict[str, dict] = {
    "paper": {},
    # A few minutes on a laptop CPU for a ~100M-parameter model: 10k training tokens.
    "cpu-small": dict(steps=20, batch_size=4, seq_len=128, rank=8, lr=1e-3, warmup=2, eval_every=10,
                      save_every=5, val_sequences=16),
}

# Each option's default, for runs recorded before the option existed.
OPTION_DEFAULTS = {f.name: f.default for f in dataclasses.fields(HealOptions)}
# Options that may change between a run and its resumption without changing its result.
RESUMABLE_CHANGES = {"eval_every", "save_every", "val_sequences", "gradient_checkpointing"}
_NAMES = ("text_field", "data_split", "teacher", "data_config")  # non-empty when given


def resolve_options(preset: str | None = None, **options) -> HealOptions:
    """The options of a run: the defaults, then ``preset``, then the explicitly given ``options``."""
    if preset is not None and preset not in PRESETS:
        raise DepthpruneError(f"unknown preset '{preset}': choose one of {', '.join(PRESETS)}")
    known = {f.name for f in dataclasses.fields(HealOptions)}
    unknown = sorted(set(options) - known)
    if unknown:
        raise DepthpruneError(f"unknown healing option(s): {', '.join(unknown)}")
    given = {k: v for k, v in options.items() if v is not None}
    merged = {**PRESETS.get(preset or "paper", {}), **given}
    if "train_tokens" in given and "steps" not in given:
        merged["steps"] = None  # --train-tokens decides the length instead of the default number of steps
    opts = HealOptions(**merged)
    check_options(opts)
    return opts


def check_options(o: HealOptions) -> None:
    """Types (strictly: the API gets no string conversion), the method, then the declared ranges."""
    HEAL_METHODS.get(o.method)
    hints = typing.get_type_hints(HealOptions)
    for f in dataclasses.fields(o):
        _check_type(getattr(o, f.name), hints[f.name], flag_name(f))
    if (o.steps is None) == (o.train_tokens is None):
        raise DepthpruneError("give either --steps or --train-tokens, not both")
    check_ranges(o)
    for name in _NAMES:
        if getattr(o, name) == "":
            raise DepthpruneError(f"{flag_name(_field(name))} must be a non-empty name, got ''")


def _field(name: str) -> dataclasses.Field:
    return next(f for f in dataclasses.fields(HealOptions) if f.name == name)


def _check_type(value, hint, flag: str) -> None:
    args = typing.get_args(hint)
    if value is None and type(None) in args:
        return
    kind = next((a for a in args if a is not type(None)), hint) if args else hint
    if typing.get_origin(kind) is list:
        if not isinstance(value, list) or not value or not all(isinstance(v, str) and v.strip() for v in value):
            raise DepthpruneError(f"{flag} must be a list of module names, got {value!r}")
        return
    ok = {bool: lambda v: isinstance(v, bool),
          int: lambda v: isinstance(v, int) and not isinstance(v, bool),
          float: lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v),
          str: lambda v: isinstance(v, str)}[kind](value)
    if not ok:
        rule = {bool: "True or False", int: "a whole number", float: "a finite number", str: "a name"}[kind]
        raise DepthpruneError(f"{flag} must be {rule}, got {value!r}")


def total_steps(o: HealOptions) -> int:
    return o.steps if o.steps is not None else math.ceil(o.train_tokens / (o.batch_size * o.seq_len))
