"""Healing methods: one registry entry per module (``qlora.py``, ``lora.py``, ``full.py``, ``dora.py``).

An entry says how to make the trainable model from the loaded one (``prepare``) and how to turn the
trained model back into an ordinary Hugging Face model (``merge``: merging belongs to the method, since
e.g. DoRA's merge is not an additive delta and QLoRA's de-quantizes first). ``quantized_base``: the base
is loaded 4-bit (NF4) for training. The CLI's ``--method`` choices, the sweep's healing methods and the
help texts read this registry, so a new method is one module here, imported below, and its test.

Entry modules keep their top level light (no torch): the work happens inside ``prepare`` and ``merge``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ...registry import Registry

if TYPE_CHECKING:
    from ..options import HealOptions


@dataclass(frozen=True)
class HealMethod:
    name: str
    description: str
    quantized_base: bool  # train on a 4-bit NF4 base (loaded so by models.load_model(quantize="nf4"))
    prepare: Callable[[Any, HealOptions], Any]  # (loaded model, options) -> the model to train
    merge: Callable[[Any, HealOptions], Any]  # (trained model, options) -> a plain transformers model


HEAL_METHODS: Registry[HealMethod] = Registry("healing method")

from . import qlora, lora, full, dora  # noqa: E402,F401,I001  (registration order = the order of the choices)
