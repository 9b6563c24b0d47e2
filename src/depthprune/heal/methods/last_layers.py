"""Last-layers healing (Lu et al., "Reassessing Layer Pruning in LLMs", ICLR 2026): fine-tune only the last K
decoder layers, the final norm and the LM head of the cut model, every other weight frozen.

Their finding: at the same budget this heals a layer-pruned model better than LoRA. Their code
(``partial_fine-tuning.py`` of yaolu-zjut/Navigation-LLM-layer-pruning) trains the final norm together with
the LM head and the last layers, and so does this method: the norm sits between the trained layers and the
trained head and scales exactly what the head reads, it has one vector of weights, and freezing it would only
make the method differ from the one measured.

The full weights train in place, so ``merge`` is the identity and the result has the plain cut's tensors. The
recipe's checkpoint holds the trained weights (and their AdamW moments), so a run resumes as ``full`` does.
Untied, the backward pass stops at the first trained layer; with tied embeddings (SmolLM2, Gemma, GPT-2: the
LM head's matrix is the input embedding) the one matrix trains with its whole gradient, as head and as
embedding, so the input embedding changes too, and the backward pass runs through every layer to reach it.
The healing record's ``trained`` says which of the two it was. Under DDP only the trained weights are
reduced (all of them take part in every step); ``--fsdp`` shards it as it shards ``full``.
"""

from __future__ import annotations

from dataclasses import dataclass

from ...errors import DepthpruneError
from ...options import option
from . import HEAL_METHODS, HealMethod


@dataclass
class LastLayersOptions:
    train_layers: int = option(3, minimum=1, help="last-layers: how many of the last decoder layers train (with "
                                                  "the final norm and the LM head)")


def _trained_modules(model, train_layers: int) -> list:
    """The last ``train_layers`` decoder layers, the final norm (where the model has one) and the LM head."""
    from ...model.load import decoder_layout

    layout = decoder_layout(model)
    total = len(layout.layers)
    if train_layers > total:
        raise DepthpruneError(f"--train-layers {train_layers} is more than the {total} decoder layers of the model: "
                              f"choose at most {total}")
    return [*layout.layers[total - train_layers:], *filter(None, [layout.final_norm]), layout.lm_head]


def prepare(model, options):
    trained = _trained_modules(model, options.train_layers)  # refuses a K the model has not, before any step
    model.requires_grad_(False)
    for module in trained:
        module.requires_grad_(True)
    return model


def merge(model, options):
    return model


def _tied(model) -> bool:
    head = model.get_output_embeddings()
    embedding = model.get_input_embeddings()
    return any(p is q for p in head.parameters() for q in embedding.parameters())


def describe(model, options) -> str:
    """What trains, in words: the healing record's ``trained`` (layers counted from 0, as ``depthprune.json``
    counts them)."""
    from ...model.load import decoder_layout

    layout = decoder_layout(model)
    total, k = len(layout.layers), options.train_layers
    layers = f"decoder layer {total - 1}" if k == 1 else f"decoder layers {total - k}-{total - 1}"
    parts = [f"{layers} (the last {k} of {total})"]
    if layout.final_norm is not None:
        parts.append("the final norm")
    parts.append("lm_head (tied to the input embeddings: both change)" if _tied(model) else "lm_head")
    return ", ".join(parts)


HEAL_METHODS.register(HealMethod(
    "last-layers", "the last --train-layers decoder layers, the final norm and the LM head (Lu et al. 2026)", False,
    prepare, merge, options=LastLayersOptions, order=50, describe=describe))
