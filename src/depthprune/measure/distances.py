"""Angular distances between the residual-stream inputs of every pair of layers (Gromov et al. 2024, eq. 7).

x⁽ˡ⁾ is the input of layer ℓ (ℓ = 0 … L-1) and x⁽ᴸ⁾ the output of the last layer *before* the final
norm. For every sample we take x⁽ˡ⁾ at the chosen token(s), and

    d(x⁽ˡ⁾, x⁽ˡ⁺ⁿ⁾) = arccos(cos∠(x⁽ˡ⁾, x⁽ˡ⁺ⁿ⁾)) / π.

One forward pass per batch gives all L+1 states, so we average the full (L+1)×(L+1) matrix of pairwise
distances at once; D[n][ℓ] is its entry (ℓ, ℓ+n). The LM head is never run (we call the backbone), and
only the selected token vectors are kept, so memory does not grow with the number of samples.

The same pass also accumulates ShortGPT's block influence (Men et al. 2024), BI(ℓ) = 1 − the mean over all
real tokens of cos(x⁽ˡ⁾, x⁽ˡ⁺¹⁾), whatever token mode the distances use, and each layer's attention and MLP
distances (:mod:`.sublayer_distances`, on the architectures whose sub-layers are known); both are saved beside them.
"""

from __future__ import annotations

import contextlib
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from ..config import TOKEN_MODES
from ..data import batches, read_json
from ..errors import DepthpruneError
from ..model.capture import accepts, watch_layers
from ..model.load import FINGERPRINT_KEYS, decoder_layout, model_fingerprint, num_layers
from ..outputs import atomic_write_text
from .sublayer_distances import DEFINITION as SUBLAYER_DEFINITION
from .sublayer_distances import SublayerWatch, attention_site

FORMAT = "depthprune.distances/1"
DEFINITION = (
    "distance[n][l] = mean over samples of arccos(cos(x_l, x_{l+n}))/pi, where x_l is the input of "
    "layer l (0-based) and x_L the output of the last layer before the final norm; a block (n, l) "
    "covers layers l..l+n-1 inclusive"
)


BLOCK_INFLUENCE_DEFINITION = (
    "block_influence[l] = 1 - mean over all real tokens of all samples of cos(x_l, x_{l+1}), the input and "
    "output of layer l at the same token (ShortGPT, Men et al. 2024)"
)


@dataclass
class AngularDistances:
    """Mean pairwise angular distances between layer inputs, with how they were measured.

    ``block_influence``: BI(ℓ) for each layer (None in files written before it was measured).
    ``sublayer_distances``: {'attention': (L,), 'mlp': (L,)}, each layer's sub-layer distances (None when not
    measured: files written before them, architectures whose sub-layers are unknown).
    """

    pairwise: np.ndarray  # (L+1, L+1): mean of arccos(cos)/pi between x_i and x_j
    num_samples: int
    token_mode: str  # 'last' or 'all': which tokens of each sample are compared (TOKEN_MODES)
    meta: dict = field(default_factory=dict)  # model, data, seq_len, seed, ...
    block_influence: np.ndarray | None = None  # (L,): 1 - mean cos(x_l, x_{l+1}) over all real tokens
    sublayer_distances: dict[str, np.ndarray] | None = None

    @property
    def num_layers(self) -> int:
        return self.pairwise.shape[0] - 1

    def block(self, n: int) -> np.ndarray:
        """D[n][ℓ] for ℓ = 0 … L-n: the distance across the block of layers ℓ … ℓ+n-1."""
        if not 1 <= n <= self.num_layers:
            raise DepthpruneError(f"block size n={n} out of range 1..{self.num_layers}")
        starts = np.arange(self.num_layers - n + 1)
        return self.pairwise[starts, starts + n]

    def best(self, n: int) -> tuple[int, float]:
        """ℓ*(n) = argmin_ℓ D[n][ℓ] and its distance (the shallowest start on ties)."""
        values = self.block(n)
        start = int(np.argmin(values))
        return start, float(values[start])

    def check_model(self, config) -> None:
        """Refuse distances measured on another model: the layer count always, the fingerprint when recorded."""
        layers = num_layers(config)
        if self.num_layers != layers:
            raise DepthpruneError(f"the distances were measured on a {self.num_layers}-layer model but this one has "
                                  f"{layers}: analyze this model")
        recorded = self.meta.get("model_fingerprint") or {}
        actual = model_fingerprint(config)
        differing = [f"{key} {recorded[key]!r} there, {actual[key]!r} here" for key in FINGERPRINT_KEYS
                     if recorded.get(key) is not None and recorded[key] != actual[key]]
        if differing:
            raise DepthpruneError(f"the distances were measured on another model ({'; '.join(differing)}): "
                                  "run `depthprune analyze` on this model")

    def to_json(self) -> dict:
        L = self.num_layers
        return {
            "format": FORMAT,
            "definition": DEFINITION,
            **self.meta,
            "num_layers": L,
            "token_mode": self.token_mode,
            "num_samples": self.num_samples,
            "best": [
                {"n": n, "start": s, "end": s + n - 1, "distance": d}
                for n in range(1, L + 1)
                for s, d in [self.best(n)]
            ],
            "by_block_size": {str(n): self.block(n).tolist() for n in range(1, L + 1)},
            "pairwise": self.pairwise.tolist(),
            **({} if self.block_influence is None else {
                "block_influence_definition": BLOCK_INFLUENCE_DEFINITION,
                "block_influence": self.block_influence.tolist()}),
            **({} if self.sublayer_distances is None else {
                "sublayer_distances_definition": SUBLAYER_DEFINITION,
                "sublayer_distances": {kind: v.tolist() for kind, v in self.sublayer_distances.items()}}),
        }

    def to_csv_rows(self) -> list[list]:
        rows = [["n", "start_layer", "end_layer", "distance"]]
        for n in range(1, self.num_layers + 1):
            rows += [[n, s, s + n - 1, f"{d:.8f}"] for s, d in enumerate(self.block(n))]
        return rows

    def save(self, directory: str | Path) -> None:
        """Write ``distances.json`` and ``distances.csv`` (long format: n, start_layer, end_layer, distance)."""
        directory = Path(directory)
        atomic_write_text(directory / "distances.json", json.dumps(self.to_json(), indent=1) + "\n")
        lines = [",".join(str(v) for v in row) for row in self.to_csv_rows()]
        atomic_write_text(directory / "distances.csv", "\n".join(lines) + "\n")


_STRUCTURE_KEYS = ("format", "definition", "num_layers", "token_mode", "tokens", "num_samples", "best", "by_block_size",
                   "pairwise", "block_influence_definition", "block_influence", "sublayer_distances_definition",
                   "sublayer_distances")


def load_distances(path: str | Path) -> AngularDistances:
    """Read distances written by :meth:`AngularDistances.save` (a directory or its distances.json).

    The file is checked whole (format, a square matrix of finite distances in [0, 1], sample count, token
    mode), so a damaged or hand-edited file fails here rather than as a wrong cut.
    """
    path = Path(path)
    if path.is_dir():
        path = path / "distances.json"
    if not path.is_file():
        raise DepthpruneError(f"no distances at '{path}': run `depthprune analyze` first and pass its --out")
    raw = read_json(path)
    if not isinstance(raw, dict) or raw.get("format") != FORMAT:
        found = raw.get("format") if isinstance(raw, dict) else type(raw).__name__
        raise DepthpruneError(f"'{path}' is not a depthprune distances file (format {found!r}, expected {FORMAT!r})")
    pairwise = _pairwise(raw, path)
    return AngularDistances(pairwise, _num_samples(raw, path), _token_mode(raw, path), _meta(raw, path),
                            _block_influence(raw, path, len(pairwise) - 1),
                            _sublayer_distances(raw, path, len(pairwise) - 1))


def _damaged(path: Path, problem: str) -> DepthpruneError:
    return DepthpruneError(f"'{path}' is damaged: {problem}; run `depthprune analyze` again")


def _pairwise(raw: dict, path: Path) -> np.ndarray:
    try:
        pairwise = np.array(raw.get("pairwise"), dtype=np.float64)
    except (TypeError, ValueError):
        raise _damaged(path, "'pairwise' is not a matrix of numbers") from None
    if pairwise.ndim != 2 or pairwise.shape[0] != pairwise.shape[1] or pairwise.shape[0] < 2:
        raise _damaged(path, f"'pairwise' must be a square matrix of at least 2 x 2, found shape {pairwise.shape}")
    if not np.isfinite(pairwise).all():
        raise _damaged(path, "'pairwise' holds NaN or infinite values")
    if (pairwise < 0).any() or (pairwise > 1).any():
        raise _damaged(path, "angular distances must lie between 0 and 1")
    layers = raw.get("num_layers")
    if layers is not None and layers != pairwise.shape[0] - 1:
        raise _damaged(path, f"num_layers {layers!r} does not match the {len(pairwise)} x {len(pairwise)} matrix")
    return pairwise


def _block_influence(raw: dict, path: Path, layers: int) -> np.ndarray | None:
    if raw.get("block_influence") is None:
        return None  # written before block influence was measured
    try:
        values = np.array(raw["block_influence"], dtype=np.float64)
    except (TypeError, ValueError):
        raise _damaged(path, "'block_influence' is not a list of numbers") from None
    if values.shape != (layers,) or not np.isfinite(values).all() or (values < -1e-9).any() or (values > 2).any():
        raise _damaged(path, f"'block_influence' must hold {layers} finite values in [0, 2]")
    return values


def _sublayer_distances(raw: dict, path: Path, layers: int) -> dict[str, np.ndarray] | None:
    found = raw.get("sublayer_distances")
    if found is None:
        return None  # written before they were measured, or an architecture whose sub-layers are unknown
    problem = f"'sublayer_distances' must map attention and mlp to {layers} angular distances in [0, 1] each"
    if not isinstance(found, dict) or set(found) != {"attention", "mlp"}:
        raise _damaged(path, problem)
    try:
        values = {kind: np.array(found[kind], dtype=np.float64) for kind in ("attention", "mlp")}
    except (TypeError, ValueError):
        raise _damaged(path, problem) from None
    if any(v.shape != (layers,) or not np.isfinite(v).all() or (v < 0).any() or (v > 1).any() for v in values.values()):
        raise _damaged(path, problem)
    return values


def _num_samples(raw: dict, path: Path) -> int:
    samples = raw.get("num_samples")
    if not isinstance(samples, int) or isinstance(samples, bool) or samples < 1:
        raise _damaged(path, f"num_samples is {samples!r}, expected a positive whole number")
    return samples


def _token_mode(raw: dict, path: Path) -> str:
    key = "token_mode" if "token_mode" in raw else "tokens"  # its name in files written before issue 18
    mode = raw.get(key)
    if mode not in TOKEN_MODES:
        raise _damaged(path, f"{key} is {mode!r}, expected one of {', '.join(TOKEN_MODES)}")
    return mode


def _meta(raw: dict, path: Path) -> dict:
    fingerprint = raw.get("model_fingerprint")
    if fingerprint is not None and not isinstance(fingerprint, dict):
        raise _damaged(path, "model_fingerprint is not a JSON object")
    return {k: v for k, v in raw.items() if k not in _STRUCTURE_KEYS}


def pairwise_angles(unit: torch.Tensor) -> torch.Tensor:
    """arccos(cos)/π between every pair of the L+1 unit vectors on the last-but-one axis."""
    cos = unit @ unit.transpose(-1, -2)
    return torch.arccos(cos.clamp(-1.0, 1.0)) / math.pi


def token_mean_angles(real: torch.Tensor, token_chunk: int) -> torch.Tensor:
    """The (L+1)×(L+1) angles of one sample averaged over its real tokens ``real`` (T_real, L+1, H unit
    vectors), ``token_chunk`` tokens at a time."""
    per_token = sum(pairwise_angles(real[s : s + token_chunk]).sum(dim=0) for s in range(0, len(real), token_chunk))
    return per_token / len(real)


def check_measurable(sequences: Sequence[Sequence[int]], token_mode: str) -> None:
    if token_mode not in TOKEN_MODES:
        raise DepthpruneError(f"unknown token mode '{token_mode}': choose one of {', '.join(TOKEN_MODES)}")
    if not sequences:
        raise DepthpruneError("no calibration sequences to measure")


class _BatchStates:
    """The layer inputs x⁽⁰⁾ … x⁽ᴸ⁾ of one batch as the forward pass produces them, kept at the chosen tokens,
    and the block-influence sums over every real token.

    Every state is gathered onto one device (the first layer's: with device_map they differ). Block influence
    is summed from the full states before any token is selected; only the previous layer's input is held.
    """

    def __init__(self, num_layers: int, token_mode: str, device: torch.device, sublayers: SublayerWatch | None):
        self.token_mode, self.device, self.sublayers = token_mode, device, sublayers
        self.current: torch.Tensor | None = None  # the last layer input seen, whole: the sub-layers' "before"
        self.states: list[torch.Tensor | None] = [None] * (num_layers + 1)
        self.cos_sums = torch.zeros(num_layers, dtype=torch.float64, device=device)
        self.previous: torch.Tensor | None = None
        self.mask = self.last = None

    def start(self, mask: torch.Tensor) -> None:
        """A new batch with attention mask ``mask``."""
        positions = torch.arange(mask.shape[1], device=self.device)
        self.last = torch.where(mask, positions, -1).max(dim=1).values
        self.mask = mask
        self.states[:] = [None] * len(self.states)
        self.previous = self.current = None

    def keep(self, index: int, hidden: torch.Tensor) -> None:
        hidden = hidden.to(self.device)
        if self.sublayers is not None and index > 0:
            self.sublayers.add(index - 1, self.current, hidden, self.mask, self.last)
        self.current = hidden
        real = hidden[self.mask].to(torch.float64)  # (real tokens of the batch, H)
        if index > 0:
            self.cos_sums[index - 1] += torch.nn.functional.cosine_similarity(self.previous, real, dim=-1).sum()
        self.previous = real
        if self.token_mode == "last":
            hidden = hidden[torch.arange(hidden.shape[0], device=self.device), self.last]
        self.states[index] = hidden.to(torch.float64)

    def add_angles(self, total: torch.Tensor, token_chunk: int) -> None:
        """Add each of the batch's samples' (L+1)×(L+1) mean angles to ``total``."""
        stacked = torch.stack(self.states, dim=-2)  # last: (B, L+1, H); all: (B, T, L+1, H)
        unit = torch.nn.functional.normalize(stacked, dim=-1)
        if self.token_mode == "last":
            total += pairwise_angles(unit).sum(dim=0)
            return
        for row in range(unit.shape[0]):
            total += token_mean_angles(unit[row][self.mask[row]], token_chunk)


@torch.no_grad()
def measure_distances(
    model,
    sequences: Sequence[Sequence[int]],
    *,
    batch_size: int = 8,
    token_mode: str = "last",
    pad_token_id: int = 0,
    padding_side: str = "right",
    token_chunk: int = 1024,
    progress: bool = True,
) -> AngularDistances:
    """Average pairwise angular distances between all layer inputs over ``sequences`` (token id lists).

    The core of the analysis (:func:`depthprune.analyze` tokenizes text and calls it). ``token_mode='last'``
    uses each sequence's last real token (the paper's default); ``'all'`` averages over its real tokens
    first, then over sequences. Padding side does not change the result.
    """
    check_measurable(sequences, token_mode)
    layout = decoder_layout(model)
    L = len(layout.layers)
    device = layout.layers[0].parameters().__next__().device
    attribute = attention_site(model.config)
    sublayers = SublayerWatch(L, token_mode, attribute) if attribute is not None else None
    kept = _BatchStates(L, token_mode, device, sublayers)
    # Longest first: less padding per batch, and an out-of-memory error shows up at once.
    ordered = sorted(sequences, key=len, reverse=True)
    total = torch.zeros((L + 1, L + 1), dtype=torch.float64, device=device)
    pass_positions = accepts(layout.backbone, "position_ids")
    bar = tqdm(total=len(ordered), unit="sample", desc="angular distances", disable=not progress)
    real_tokens = 0
    watching = watch_layers(layout.layers, lambda index, hidden, call: kept.keep(index, hidden),
                            lambda output: kept.keep(L, output))
    catching = contextlib.ExitStack()
    for layer in layout.layers if sublayers is not None else ():
        catching.enter_context(sublayers.layer(layer))
    with bar, watching, catching:
        for batch in batches(ordered, batch_size, pad_token_id, padding_side):
            batch = batch.to(device)
            kept.start(batch.attention_mask.bool())
            kwargs = {"position_ids": batch.position_ids} if pass_positions else {}
            layout.backbone(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False, **kwargs)
            kept.add_angles(total, token_chunk)
            real_tokens += int(kept.mask.sum())
            bar.update(len(kept.mask))
    influence = (1.0 - kept.cos_sums / real_tokens).cpu().numpy()
    return AngularDistances((total / len(ordered)).cpu().numpy(), len(ordered), token_mode,
                            block_influence=np.clip(influence, 0.0, 2.0),
                            sublayer_distances=sublayers.means(len(ordered)) if sublayers is not None else None)
