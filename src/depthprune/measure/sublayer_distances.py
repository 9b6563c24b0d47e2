"""Sub-layer angular distances: how much each layer's attention and MLP turn the residual stream.

For layer ℓ with input x⁽ˡ⁾ (the residual stream before its attention), attention contribution a⁽ˡ⁾ (what it adds
to the stream: the attention's output, or the norm of it for Gemma 2/3) and output x⁽ˡ⁺¹⁾:

    attention[ℓ] = arccos(cos∠(x⁽ˡ⁾, x⁽ˡ⁾ + a⁽ˡ⁾)) / π        mlp[ℓ] = arccos(cos∠(x⁽ˡ⁾ + a⁽ˡ⁾, x⁽ˡ⁺¹⁾)) / π

the paper's measure one sub-layer wide (for GPT-NeoX's parallel residual, mlp[ℓ] is what the MLP adds on top of
the attention). Token modes as for the layer distances: each sample's last real token, or the mean over its real
tokens; then the mean over samples. x⁽ˡ⁾ + a⁽ˡ⁾ is computed as the model computes its residual add, in its dtype;
the angles in float64. The in-memory analysis (:mod:`.distances`) and the streamed one (:mod:`.stream`) both
watch each layer's call through :class:`SublayerWatch`, so they give the same numbers.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from ..model.capture import layer_output
from ..model.granularity import SUBLAYER_KINDS
from ..model.sublayers import SITES

DEFINITION = (
    "sublayer_distances[kind][l] = mean over samples of arccos(cos(before, after))/pi for layer l's attention "
    "(before: the layer's input x_l; after: x_l plus the attention's contribution to the residual stream) and "
    "MLP (before: that sum; after: the layer's output)"
)


def attention_site(config) -> str | None:
    """The attribute of a decoder layer whose output is its attention's contribution, or None where unknown
    (then the sub-layer distances are not measured)."""
    sites = SITES.get(getattr(config, "model_type", None))
    return sites.contributions.get("attention") if sites is not None else None


def _angles(before: torch.Tensor, after: torch.Tensor) -> torch.Tensor:
    cos = torch.nn.functional.cosine_similarity(before.to(torch.float64), after.to(torch.float64), dim=-1)
    return torch.arccos(cos.clamp(-1.0, 1.0)) / math.pi


class SublayerWatch:
    """Sums the two sub-layer distances of every layer over samples, one layer call at a time.

    Around a call of layer ℓ on ``inputs`` (``with watch.layer(module)``) the attention contribution is caught;
    then :meth:`add` takes the layer's input and output with the batch's ``mask`` and the last real positions.
    """

    def __init__(self, num_layers: int, token_mode: str, attribute: str):
        self.token_mode, self.attribute = token_mode, attribute
        self.sums = {kind: torch.zeros(num_layers, dtype=torch.float64) for kind in SUBLAYER_KINDS}
        self.contribution: torch.Tensor | None = None

    @contextmanager
    def layer(self, module: nn.Module) -> Iterator[None]:
        """Catch the attention contribution of ``module`` (a decoder layer) while the block runs it."""
        def catch(_, args, output):
            self.contribution = layer_output(output)

        handle = getattr(module, self.attribute).register_forward_hook(catch)
        try:
            yield
        finally:
            handle.remove()

    def add(self, index: int, inputs: torch.Tensor, output: torch.Tensor, mask: torch.Tensor,
            last: torch.Tensor) -> None:
        """Add layer ``index``'s two distances for one batch (``mask``: its real tokens; ``last``: each row's
        last real position); the contribution caught during that layer's call is used up."""
        middle = inputs + self.contribution.to(inputs.device)
        self.contribution = None
        for kind, (before, after) in {"attention": (inputs, middle), "mlp": (middle, output)}.items():
            if self.token_mode == "last":
                rows = torch.arange(before.shape[0], device=before.device)
                self.sums[kind][index] += float(_angles(before[rows, last], after[rows, last]).sum())
            else:
                per_token = _angles(before, after).masked_fill(~mask, 0.0)
                self.sums[kind][index] += float((per_token.sum(dim=1) / mask.sum(dim=1)).sum())

    def means(self, num_samples: int) -> dict:
        """{kind: (L,) numpy array}: the mean distances over ``num_samples``."""
        return {kind: (values / num_samples).clamp(0.0, 1.0).numpy() for kind, values in self.sums.items()}
