"""Where a repair's map T is folded: the kept layer's MLP output projection, whether folding there is exact,
and the fold itself.

Folding is exact only when the projection's output M reaches the residual stream unchanged: the layer's
output is then Y + M, and with the folded weights Y + M T. Architectures that norm the MLP output before
the residual add (Gemma 2/3's ``post_feedforward_layernorm``) or scale it are refused, by name and, for
any architecture, by a probe: a change δ to M must change the layer's output by exactly δ. GPT-NeoX's
parallel residual passes the probe (its MLP output is added directly, beside the attention output).

The fold: an ``nn.Linear`` computes M = h Wᵀ + b (W is (out, in)), so M T = h (Tᵀ W)ᵀ + Tᵀ b: W' = Tᵀ W,
b' = Tᵀ b. GPT-2's ``Conv1D`` computes M = h W + b (W is (in, out)): W' = W T, b' = b T.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from torch import nn

from ..data import collate
from ..errors import DepthpruneError
from ..model.capture import layer_output
from ..model.load import decoder_layout
from .capture import eval_mode, hooked, run_until_reached, stop_forward

# The MLP output projection of a decoder layer, by architecture (paths inside the layer), first match wins.
PROJECTIONS = ("mlp.down_proj", "mlp.c_proj", "mlp.dense_4h_to_h", "mlp.fc2", "fc2", "mlp.w2", "feed_forward.w2")
# A norm applied to the MLP output before the residual add (Gemma 2/3, OLMo 2: post_feedforward_layernorm).
NORM_AFTER_MLP = re.compile(r"post_(feedforward|feed_forward|ffw|ff|mlp)_?(layer_?)?norm")
PROBE_TOKENS = 32
# Relative change ‖Δoutput − δ‖ / ‖δ‖ the probe allows: rounding of a 16-bit model stays far below it, a
# norm or a scale after the projection far above it.
PROBE_TOLERANCE = 0.05
PROBE_SEED = 0


@dataclass(frozen=True)
class FoldSite:
    """The kept layer ``layer`` (0-based, before the cut) and its MLP output projection, named from the top model."""

    layer: int
    name: str
    projection: nn.Module
    conv1d: bool  # GPT-2's Conv1D: weight (in, out), else nn.Linear: weight (out, in)

    @property
    def hidden_size(self) -> int:
        weight = self.projection.weight
        return weight.shape[1] if self.conv1d else weight.shape[0]


def _is_conv1d(module: nn.Module) -> bool:
    from transformers.pytorch_utils import Conv1D

    return isinstance(module, Conv1D)


def find_site(model: nn.Module, layer: int) -> FoldSite:
    """The MLP output projection of decoder layer ``layer``; a one-line refusal where a fold cannot be exact."""
    layout = decoder_layout(model)
    block, arch = layout.layers[layer], type(model).__name__
    norms = [name for name, _ in block.named_modules() if NORM_AFTER_MLP.fullmatch(name.rpartition(".")[2])]
    if norms:
        raise DepthpruneError(f"{arch}: the MLP output of layer {layer} passes through '{norms[0]}' before it is added "
                              "to the residual stream, so no map folded into its down-projection is exact: --repair "
                              "does not support this architecture; heal the cut instead (depthprune heal)")
    path = next((p for p in PROJECTIONS if _has_submodule(block, p)), None)
    if path is None:
        raise DepthpruneError(f"{arch}: cannot find the MLP output projection of layer {layer} (one of "
                              f"{', '.join(PROJECTIONS)}): --repair does not support this architecture")
    projection = block.get_submodule(path)
    conv1d = _is_conv1d(projection)
    weight = getattr(projection, "weight", None)
    if not (conv1d or isinstance(projection, nn.Linear)) or not isinstance(weight, torch.Tensor) \
            or not weight.dtype.is_floating_point:
        raise DepthpruneError(f"{arch}: layer {layer}'s {path} is a {type(projection).__name__} without plain "
                              "floating-point weights (a quantized model?): load the model unquantized to repair it")
    site = FoldSite(layer, f"{layout.layers_path}.{layer}.{path}", projection, conv1d)
    hidden = model.get_input_embeddings().weight.shape[1]
    if site.hidden_size != hidden:
        raise DepthpruneError(f"{arch}: layer {layer}'s {path} gives {site.hidden_size} features, not the hidden size "
                              f"{hidden}: --repair does not support this architecture")
    return site


def _has_submodule(module: nn.Module, path: str) -> bool:
    try:
        module.get_submodule(path)
    except AttributeError:
        return False
    return True


def _probe_output(model: nn.Module, site: FoldSite, ids: list[int], delta: torch.Tensor | None) -> torch.Tensor:
    """The kept layer's output for ``ids``, with ``delta`` added to its projection's output (None: nothing)."""
    layer = decoder_layout(model).layers[site.layer]
    seen: dict[str, torch.Tensor] = {}

    def perturb(module, args, output):
        return output if delta is None else output + delta.to(output.device, output.dtype).reshape(output.shape)

    def keep(module, args, output):
        seen["out"] = layer_output(output)
        stop_forward()

    with hooked([site.projection.register_forward_hook(perturb), layer.register_forward_hook(keep)]):
        run_until_reached(model, collate([ids], 0))
    return seen["out"].to(torch.float64).reshape(-1, site.hidden_size)


@torch.no_grad()
def check_additive(model: nn.Module, site: FoldSite, ids: list[int]) -> None:
    """Refuse unless a change δ to the projection's output changes the kept layer's output by exactly δ.

    δ is random and four times the layer output's RMS, so rounding in the model's dtype stays relative to δ.
    """
    ids = list(ids[:PROBE_TOKENS])
    with eval_mode(model):
        plain = _probe_output(model, site, ids, None)
        scale = 4 * float(plain.pow(2).mean().sqrt())
        generator = torch.Generator().manual_seed(PROBE_SEED)
        delta = torch.randn(plain.shape, generator=generator, dtype=torch.float64) * scale
        changed = _probe_output(model, site, ids, delta)
    error = float((changed - plain - delta.to(plain.device)).norm() / delta.norm())
    if not error <= PROBE_TOLERANCE:  # also refuses NaN
        raise DepthpruneError(f"{type(model).__name__}: the output of {site.name} does not reach the residual stream "
                              f"unchanged (a change δ to it changes layer {site.layer}'s output by δ plus a relative "
                              f"{error:.2g}), so no map folded into it is exact: --repair does not support this "
                              "architecture; heal the cut instead (depthprune heal)")


@torch.no_grad()
def fold(site: FoldSite, transform: torch.Tensor) -> None:
    """Fold T into the projection in place, so that it outputs M T (see the module text for the algebra)."""
    weight = site.projection.weight
    t = transform.to(weight.device, torch.float64)
    folded = weight.double() @ t if site.conv1d else t.T @ weight.double()
    weight.copy_(folded.to(weight.dtype))
    bias = getattr(site.projection, "bias", None)
    if bias is not None:
        bias.copy_((bias.double() @ t).to(bias.dtype))
