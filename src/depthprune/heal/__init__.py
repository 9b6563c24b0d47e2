"""Healing a pruned model: a short fine-tune on C4 that repairs the damage at the cut (paper, App. A.1).

Methods (``methods/``, one module each, listed by ``HEAL_METHODS``): ``qlora`` (LoRA on a 4-bit NF4
base, the paper's recipe), ``lora`` (LoRA on a full-precision base), ``full`` (all weights), ``dora``
(weight-decomposed LoRA), ``last-layers`` (the last K layers, the final norm and the LM head). With a ``teacher`` (the unpruned model) the loss mixes the LM loss with the KL
divergence between the teacher's and the student's next-token distributions (logit distillation, as in
Minitron). A plain PyTorch loop in the style of torchtune's recipes (``recipe.py``: setup in ``state.py``, the step in
``train.py``, the result in ``result.py``):

- documents are tokenized whole and packed into ``seq_len``-token sequences, in a seeded order (``data.py``);
- every ``save_every`` steps (and after the last one) the trainable weights, optimizer, scheduler, RNG
  states and data position go to ``checkpoint/`` of the run's work folder (atomically, ``checkpoint.py``),
  so rerunning the same command continues where it stopped and ends with the same weights as an
  uninterrupted run;
- under ``torchrun``/``accelerate launch`` it trains data-parallel (DDP, ``distributed.py``): the global
  batch is split over the processes and only rank 0 writes;
- the result is an ordinary Hugging Face checkpoint with the adapter merged by its method (for QLoRA into
  the de-quantized base, in full precision) and ``depthprune.json`` extended by the healing record.

Where things live (``outputs.py``; nothing is lost, nothing half-written is ever taken for a result):

- every input and option is checked, and the training data read, before anything is written; a run
  that fails to start leaves nothing behind;
- OUT holds either a finished result (the merged model, ``heal_config.json``, ``heal_log.jsonl`` and
  ``depthprune.json`` with a ``healing`` record) or the state of an unfinished run (``heal_config.json``,
  ``heal_log.jsonl``, ``checkpoint/``), never a mix. Rerunning a finished command reports the result;
- a run works in OUT itself when OUT is new, empty, or holds an unfinished run of the same settings
  (or one without a checkpoint: nothing to keep). With ``force`` over anything else (an older result, a
  run of other settings, other files) it works in the visible sibling folder ``OUT.unfinished``, and
  OUT stays untouched until the new result is complete;
- the merged model is assembled in a temporary folder beside OUT, with the log and settings, and swapped
  in by :func:`~depthprune.outputs.replace_dir`; the work folder goes last. Temporaries are never inside
  a result, and those of a killed run are removed by the next run. One run at a time holds OUT's lock;
- checkpoints are safetensors (weights, optimizer moments, RNG states) plus JSON (everything else):
  resuming unpickles nothing. A checkpoint that does not parse asks for ``restart``, which discards an
  unfinished run (never a finished result: replacing one takes ``force``).

This package's top level is light (no torch): the options, presets and method registry serve the CLI's
flags and the sweep's checks; :func:`heal` and the rest load on first use. ``HealOptions`` is composed
with the methods registered when it is read (``options.heal_options_class``).
"""

from __future__ import annotations

import importlib

from .methods import HEAL_METHODS, HealMethod
from .options import PRESETS, SCHEDULES, heal_options_class, resolve_options, total_steps

_LAZY = {"heal": "recipe", "heal_loaded": "recipe", "Healed": "state", "CONFIG_FILE": "outputs",
         "LOG_FILE": "outputs", "WORK_SUFFIX": "outputs", "CHECKPOINT_DIR": "checkpoint"}


def __getattr__(name: str):
    if name == "HealOptions":
        return heal_options_class()
    if name in _LAZY:
        value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["HEAL_METHODS", "PRESETS", "SCHEDULES", "HealMethod", "HealOptions", "heal_options_class",
           "resolve_options", "total_steps", *_LAZY]
