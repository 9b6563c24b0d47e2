"""Calibration statistics of a cut, gathered from the uncut model in one (shortened) forward pass per batch.

For the kept layer ℓ−1 before a removed block ℓ..ℓ+n−1, per real (unpadded) calibration token:
M, the layer's MLP output (its output projection's output); Y, the residual stream it is added to (the
layer's output minus M); L, the target: the input of layer ℓ+n, or the last layer's output (the final
norm's input) when the block ends the model. The least-squares map needs only Σ w MᵀM, Σ w Mᵀ(L − Y) and
Σ w ‖L − Y‖², accumulated in float64 batch by batch, so no activations are held. Each token's weight is
w = ‖L‖^-p (``norm_power`` p; p = 0: every token alike, as ReplaceMe). A bounded random
subsample of token rows (M, Y, L) is kept for the cosine distance. The forward stops
(:class:`depthprune.model.capture.StopForward`, raised from a hook) once the target is seen: the layers after it and the LM head never run.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from ..data import Batch, batches
from ..model.capture import StopForward, accepts, layer_output
from ..model.load import decoder_layout

SAMPLE_SEED = 0


@dataclass
class TokenSample:
    """Rows (tokens, hidden) of a subsample of calibration tokens, float32: M, Y and L as in the module text."""

    mlp: torch.Tensor
    rest: torch.Tensor
    target: torch.Tensor

    def __len__(self) -> int:
        return self.mlp.shape[0]


@dataclass
class Calibration:
    """Sufficient statistics of the weighted least-squares fit over all real calibration tokens (float64)."""

    gram: torch.Tensor  # Σ w MᵀM, (d, d)
    cross: torch.Tensor  # Σ w Mᵀ(L − Y), (d, d)
    target_energy: float  # Σ w ‖L − Y‖²: the residual error of T = 0
    tokens: int
    sample: TokenSample
    norm_power: float  # the tokens' weights w = ‖L‖^-norm_power

    @property
    def hidden_size(self) -> int:
        return self.gram.shape[0]


@contextmanager
def hooked(handles: list) -> Iterator[None]:
    """Remove the given hook handles on leaving, whatever happens inside."""
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """Eval mode (no dropout) inside, the model's own mode restored after."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def stop_forward() -> None:
    """Called from a hook: the activation needed is seen, the rest of the forward is skipped."""
    raise StopForward


def run_until_reached(model: nn.Module, batch: Batch) -> None:
    """Forward ``batch`` through the backbone until a hook calls :func:`stop_forward` (an error if none does)."""
    layout = decoder_layout(model)
    device = model.get_input_embeddings().weight.device
    batch = batch.to(device)
    kwargs = {"position_ids": batch.position_ids} if accepts(layout.backbone, "position_ids") else {}
    try:
        layout.backbone(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False, **kwargs)
    except StopForward:
        return
    raise RuntimeError("the forward pass ended before the hooked layer was reached")


def target_hook(model: nn.Module, stop: int, keep: Callable[[torch.Tensor], None]):
    """A hook handle that passes the target hidden state to ``keep``, then stops the forward.

    ``stop``: the first layer after the removed block; the number of layers when the block ends the model
    (the target is then the last layer's output, the final norm's input).
    """
    layers = decoder_layout(model).layers
    if stop < len(layers):
        def before(module, args, kwargs):
            keep(args[0] if args else kwargs["hidden_states"])
            stop_forward()

        return layers[stop].register_forward_pre_hook(before, with_kwargs=True)

    def after(module, args, output):
        keep(layer_output(output))
        stop_forward()

    return layers[-1].register_forward_hook(after)


class _Accumulator:
    """Σ w MᵀM, Σ w Mᵀ(L − Y), Σ w ‖L − Y‖² in float64, and a bounded random subsample of (M, Y, L) rows."""

    def __init__(self, hidden: int, device: torch.device, sample_tokens: int, expected_tokens: int,
                 norm_power: float):
        self.norm_power = norm_power
        self.gram = torch.zeros(hidden, hidden, dtype=torch.float64, device=device)
        self.cross = torch.zeros_like(self.gram)
        self.energy = 0.0
        self.tokens = 0
        # The sample: a uniform random choice of token positions over the whole calibration set, fixed ahead.
        generator = torch.Generator().manual_seed(SAMPLE_SEED)
        self.chosen = torch.randperm(expected_tokens, generator=generator)[:sample_tokens].sort().values
        self.rows: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []

    def add(self, mask: torch.Tensor, mlp: torch.Tensor, layer_output: torch.Tensor, target: torch.Tensor) -> None:
        """Add one batch; ``mask`` (batch, tokens) marks the real tokens, the others are (…, hidden) tensors."""
        real = mask.reshape(-1).bool()
        m = self._rows(mlp, real)
        rest = self._rows(layer_output, real) - m
        wanted = self._rows(target, real)
        residual = wanted - rest
        weight = wanted.norm(dim=1).clamp_min(1e-12) ** -self.norm_power
        weighted = m * weight[:, None]
        self.gram += weighted.T @ m
        self.cross += weighted.T @ residual
        self.energy += float((weight * (residual * residual).sum(dim=1)).sum())
        self.tokens += m.shape[0]
        self._keep_sample(m, rest, wanted)

    def _keep_sample(self, m: torch.Tensor, rest: torch.Tensor, wanted: torch.Tensor) -> None:
        """Keep the rows of this batch's chosen tokens (float32); ``self.tokens`` already counts the batch."""
        start = self.tokens - m.shape[0]
        local = self.chosen[(self.chosen >= start) & (self.chosen < self.tokens)] - start
        local = local.to(m.device)
        self.rows.append((m[local].float(), rest[local].float(), wanted[local].float()))

    def _rows(self, hidden: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
        """The real tokens' rows of a (…, hidden) activation, float64 on the accumulation device."""
        rows = hidden.reshape(-1, self.gram.shape[0])[real.to(hidden.device)]
        return rows.to(self.gram.device, torch.float64)

    def result(self) -> Calibration:
        mlp, rest, target = (torch.cat(parts) for parts in zip(*self.rows, strict=True))
        return Calibration(self.gram, self.cross, self.energy, self.tokens, TokenSample(mlp, rest, target),
                           self.norm_power)


@torch.no_grad()
def capture(model: nn.Module, projection: nn.Module, kept_layer: int, stop: int, sequences: Sequence[Sequence[int]],
            *, hidden_size: int, pad_token_id: int, batch_size: int, sample_tokens: int, norm_power: float = 0.0,
            progress: bool = True) -> Calibration:
    """The calibration statistics of removing layers ``kept_layer + 1 .. stop − 1`` of the uncut ``model``.

    ``projection``: the output projection of ``kept_layer``'s MLP (its output is M); ``sequences``: token
    id lists (every id a real token); ``sample_tokens``: the most token rows kept for the cosine distance;
    ``norm_power``: p of the tokens' weights ‖L‖^-p.
    """
    layers = decoder_layout(model).layers
    seen: dict[str, torch.Tensor] = {}
    handles = [
        projection.register_forward_hook(lambda module, args, output: seen.__setitem__("mlp", output)),
        layers[kept_layer].register_forward_hook(
            lambda module, args, output: seen.__setitem__("out", layer_output(output))),
        target_hook(model, stop, lambda hidden: seen.__setitem__("target", hidden)),
    ]
    device = projection.weight.device
    totals = _Accumulator(hidden_size, device, sample_tokens, sum(len(s) for s in sequences), norm_power)
    bar = tqdm(total=len(sequences), unit="sample", desc="repair calibration", disable=not progress)
    with hooked(handles), eval_mode(model), bar:
        for batch in batches(sequences, batch_size, pad_token_id):
            run_until_reached(model, batch)
            totals.add(batch.attention_mask, seen.pop("mlp"), seen.pop("out"), seen.pop("target"))
            bar.update(len(batch.input_ids))
    return totals.result()
