"""DoRA (Liu et al. 2024): LoRA's direction update plus a trained magnitude per output feature.

The merged weight is ``m * (W + BA) / ||W + BA||`` (column norms), not an additive delta: peft's
``merge_and_unload`` computes it from the magnitude vector.
"""

from __future__ import annotations

from . import HEAL_METHODS, HealMethod
from .adapters import LoraOptions


def prepare(model, options):
    from .adapters import add_lora

    return add_lora(model, options, use_dora=True)


def merge(model, options):
    return model.merge_and_unload()


HEAL_METHODS.register(HealMethod("dora", "weight-decomposed LoRA (DoRA) on a full-precision base", False, prepare,
                                 merge, options=LoraOptions, order=40))
