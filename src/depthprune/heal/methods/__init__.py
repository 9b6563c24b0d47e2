"""Healing methods: one registry entry per module (``qlora.py``, ``lora.py``, ``full.py``, ``dora.py``,
``last_layers.py``).

An entry says how to make the trainable model from the loaded one (``prepare``) and how to turn the
trained model back into an ordinary Hugging Face model (``merge``: merging belongs to the method, since
e.g. DoRA's merge is not an additive delta and QLoRA's de-quantizes first). ``quantized_base``: the base
is loaded 4-bit (NF4) for training. ``options``: the dataclass of the method's own options (LoRA's rank,
alpha, ... declared once in ``adapters.py`` and shared by qlora, lora and dora); they join the healing
options (``heal.options.heal_options_class``), whose instance ``prepare`` and ``merge`` receive. ``describe``,
optional: what trains, in words, for the healing record (``last_layers.py``). The CLI's
``--method`` choices, the sweep's healing methods and the help texts read this registry; every module of
this folder is imported below, so a new method is one new module here, and its test.

Entry modules keep their top level light (no torch): the work happens inside ``prepare`` and ``merge``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ...registry import AFTER_BUILT_INS, Registry, import_plugins


@dataclass(frozen=True)
class HealMethod:
    name: str
    description: str
    quantized_base: bool  # train on a 4-bit NF4 base (loaded so by models.load_model(quantize="nf4"))
    prepare: Callable[[Any, Any], Any]  # (loaded model, healing options) -> the model to train
    merge: Callable[[Any, Any], Any]  # (trained model, healing options) -> a plain transformers model
    options: type | None = None
    order: int = AFTER_BUILT_INS  # the place among the choices (built-ins: 10, 20, ...)
    # (the model being trained, healing options) -> what trains, in words: the healing record's ``trained``
    # (for a method where it depends on the model, e.g. which layers, or whether a tied embedding changes too)
    describe: Callable[[Any, Any], str] | None = None


HEAL_METHODS: Registry[HealMethod] = Registry("healing method")

import_plugins(__name__)  # each registers itself (adapters.py holds what the adapter methods share)
