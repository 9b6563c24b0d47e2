"""The options of a healing run, declared once: default, help text and range of each in one field.

:class:`SharedHealOptions` holds what every method uses; each method declares its own (LoRA's rank,
alpha, ... in ``methods/adapters.py``; qlora's cache). :func:`heal_options_class` composes them into one
flat dataclass, ``HealOptions``, whose instance the recipe and the method's ``prepare``/``merge`` read
(``o.rank``). The CLI's ``heal`` flags are generated from it (:func:`depthprune.options.add_options`), the
sweep's ``heal_options`` are type-checked against it, and :func:`resolve_options` layers the defaults, a
preset and the options given. ``HealOptions`` read as a module attribute is the class composed with the
methods registered then. Light: no torch import.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from ..errors import DepthpruneError
from ..options import check_ranges, check_types, compose, option
from .methods import HEAL_METHODS

SCHEDULES = {"cosine": "cosine", "linear": "linear", "constant": "constant_with_warmup"}


@dataclass
class SharedHealOptions:
    """What decides a healing run, whatever its method. The defaults are the paper's recipe (Appendix A.1)."""

    method: str = option("qlora", help="healing method", choices=HEAL_METHODS.names)
    steps: int | None = option(5000, help="optimizer steps", minimum=1)
    train_tokens: int | None = option(None, help="training tokens instead of --steps (rounded up to whole steps)",
                                      minimum=1)
    batch_size: int = option(16, help="global batch in sequences per step", minimum=1)
    grad_accum: int = option(1, help="micro-batches per step and process (micro batch = batch / (accum x processes))",
                             minimum=1)
    seq_len: int = option(2048, help="tokens per packed sequence", minimum=2)
    lr: float = option(3e-4, help="peak learning rate", above=0)
    warmup: int = option(100, help="warm-up steps", minimum=0)
    schedule: str = option("cosine", help="learning-rate schedule after warm-up", choices=list(SCHEDULES))
    weight_decay: float = option(0.0, help="AdamW weight decay", minimum=0)
    max_grad_norm: float = option(1.0, help="gradient clipping norm", above=0)
    teacher: str | None = option(None, help="the unpruned model, for logit distillation (KL to its next-token "
                                            "distribution)", nonempty=True)
    kd_weight: float = option(0.5, help="weight of the distillation loss: loss = (1 - w) LM + w KL(teacher || "
                                        "student)", minimum=0, maximum=1)
    kd_temperature: float = option(1.0, help="softmax temperature of the distillation", above=0)
    # resumable: may change between a run and its resumption without changing its result.
    eval_every: int = option(500, help="validation every N steps", minimum=1, resumable=True)
    save_every: int = option(500, help="checkpoint every N steps", minimum=1, resumable=True)
    val_sequences: int = option(64, help="validation sequences of --seq-len tokens", minimum=1, resumable=True)
    seed: int = option(0, help="seed of data order, LoRA init and dropout", minimum=0, below=2**32)
    gradient_checkpointing: bool = option(False, help="trade compute for activation memory", resumable=True)
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
    text_field: str = option("text", help="field holding the text", nonempty=True)
    data_config: str | None = option(None, help="Hugging Face dataset config (e.g. 'en' for allenai/c4)",
                                     nonempty=True)
    data_split: str = option("train", help="Hugging Face split of --data", nonempty=True)


def heal_options_class() -> type:
    """``HealOptions``: the shared options, then those of every registered method (the same class while they are)."""
    return compose("HealOptions", (SharedHealOptions, *HEAL_METHODS.option_classes()), module=__name__,
                   doc="Everything that decides a healing run: the options every method shares, then each "
                       "method's own. The defaults are the paper's recipe (Appendix A.1).")


def __getattr__(name: str):
    if name == "HealOptions":
        return heal_options_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# Presets replace the defaults; options given explicitly replace the preset.
PRESETS: dict[str, dict] = {
    "paper": {},
    # A few minutes on a laptop CPU for a ~100M-parameter model: 10k training tokens.
    "cpu-small": dict(steps=20, batch_size=4, seq_len=128, rank=8, lr=1e-3, warmup=2, eval_every=10,
                      save_every=5, val_sequences=16),
}


def option_defaults() -> dict:
    """Each option's default, for runs recorded before the option existed."""
    return {f.name: f.default for f in dataclasses.fields(heal_options_class())}


def resolve_options(preset: str | None = None, **options):
    """The options of a run: the defaults, then ``preset``, then the explicitly given ``options``."""
    if preset is not None and preset not in PRESETS:
        raise DepthpruneError(f"unknown preset '{preset}': choose one of {', '.join(PRESETS)}")
    options_class = heal_options_class()
    known = {f.name for f in dataclasses.fields(options_class)}
    unknown = sorted(set(options) - known)
    if unknown:
        raise DepthpruneError(f"unknown healing option(s): {', '.join(unknown)}")
    given = {k: v for k, v in options.items() if v is not None}
    merged = {**PRESETS.get(preset or "paper", {}), **given}
    if "train_tokens" in given and "steps" not in given:
        merged["steps"] = None  # --train-tokens decides the length instead of the default number of steps
    opts = options_class(**merged)
    check_options(opts)
    return opts


def check_options(o) -> None:
    """Types (strictly: the API gets no string conversion), the method, then the declared ranges."""
    HEAL_METHODS.get(o.method)
    check_types(o)
    if (o.steps is None) == (o.train_tokens is None):
        raise DepthpruneError("give either --steps or --train-tokens, not both")
    check_ranges(o)


def total_steps(o) -> int:
    return o.steps if o.steps is not None else math.ceil(o.train_tokens / (o.batch_size * o.seq_len))
