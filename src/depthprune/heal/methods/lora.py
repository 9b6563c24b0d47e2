"""LoRA on a full-precision base; the merge adds B @ A * alpha / rank to each adapted weight."""

from __future__ import annotations

from . import HEAL_METHODS, HealMethod
from .adapters import LoraOptions


def prepare(model, options):
    from .adapters import add_lora

    return add_lora(model, options)


def merge(model, options):
    return model.merge_and_unload()


HEAL_METHODS.register(HealMethod("lora", "LoRA on a full-precision base", False, prepare, merge, options=LoraOptions,
                                 order=20))
