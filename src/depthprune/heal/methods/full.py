"""Full fine-tuning: every weight trains; the trained model is the result."""

from __future__ import annotations

from . import HEAL_METHODS, HealMethod


def prepare(model, options):
    for p in model.parameters():
        p.requires_grad_(True)
    return model


def merge(model, options):
    return model


HEAL_METHODS.register(HealMethod("full", "all weights (memory: weights, gradients and two AdamW moments)", False,
                                 prepare, merge, order=30))
