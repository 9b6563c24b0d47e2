"""The end-to-end functions behind the CLI: analyze a model, prune it. Both are importable from ``depthprune``."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .data import load_texts
from .errors import DepthpruneError
from .models import count_parameters, load_model, num_layers
from .outputs import atomic_output_dir, check_output_dir
from .report import plot_heatmap
from .select import Selection, block_size, choose_block, explicit_selection
from .similarity import AngularDistances, compute_distances, load_distances
from .surgery import pruning_record, remove_layers, save_pruned


@dataclass
class DataOptions:
    """Calibration text: where from and how much of it."""

    source: str
    samples: int = 128
    seq_len: int = 512
    seed: int = 0
    text_field: str = "text"
    config: str | None = None  # Hugging Face dataset config, e.g. 'en' for allenai/c4
    split: str = "train"


def _loaded(model, tokenizer, device: str, dtype: str, trust_remote_code: bool):
    if isinstance(model, str):
        return load_model(model, device=device, dtype=dtype, trust_remote_code=trust_remote_code)
    if tokenizer is None:
        raise DepthpruneError("pass the tokenizer together with an already loaded model")
    return model, tokenizer


def load_calibration(data: DataOptions) -> list[str]:
    """The calibration documents ``data`` names (checked before any model is loaded)."""
    return load_texts(data.source, data.samples, data.seed, data.text_field, data.config, data.split)


def measure(model, tokenizer, data: DataOptions, texts: list[str] | None = None, batch_size: int = 8,
            tokens: str = "last", progress: bool = True) -> AngularDistances:
    """Measure the angular distances of a loaded model on the calibration texts of ``data``."""
    texts = load_calibration(data) if texts is None else texts
    result = compute_distances(model, tokenizer, texts, seq_len=data.seq_len, batch_size=batch_size,
                               tokens=tokens, progress=progress)
    result.meta.update(data=data.source, seed=data.seed)
    return result


def analyze(
    model,
    data: DataOptions,
    out: str | Path | None = None,
    *,
    tokenizer=None,
    batch_size: int = 8,
    tokens: str = "last",
    device: str = "cpu",
    dtype: str = "float32",
    trust_remote_code: bool = False,
    force: bool = False,
    progress: bool = True,
) -> AngularDistances:
    """Measure D[n][ℓ] for every block size and start; with ``out``, write distances.json/.csv and heatmap.png.

    ``model`` is anything :func:`depthprune.load_model` takes, or a loaded model (then pass ``tokenizer``).
    """
    if out is not None:
        check_output_dir(out, force)  # fail before the slow part
    texts = load_calibration(data)
    model, tokenizer = _loaded(model, tokenizer, device, dtype, trust_remote_code)
    result = measure(model, tokenizer, data, texts, batch_size, tokens, progress)
    if out is not None:
        with atomic_output_dir(out, force) as tmp:
            result.save(tmp)
            plot_heatmap(result, tmp / "heatmap.png")
    return result


def prune(
    model,
    out: str | Path,
    *,
    n: int | None = None,
    fraction: float | None = None,
    layers: str | None = None,
    strategy: str = "similarity",
    distances: str | Path | AngularDistances | None = None,
    data: DataOptions | None = None,
    tokenizer=None,
    batch_size: int = 8,
    tokens: str = "last",
    device: str = "cpu",
    dtype: str = "float32",
    trust_remote_code: bool = False,
    force: bool = False,
    progress: bool = True,
) -> dict:
    """Remove a block of layers and save the pruned checkpoint with its ``depthprune.json``; returns that record.

    Give the block as ``n`` layers, a ``fraction`` of them, or an explicit ``layers`` spec ('20-27',
    '3,7,9'). ``strategy='similarity'`` needs ``distances`` (a directory from :func:`analyze`) or
    ``data`` to measure them now.
    """
    if sum(x is not None for x in (n, fraction, layers)) != 1:
        raise DepthpruneError("give exactly one of --n, --fraction or --layers")
    if n is not None and n < 1 or fraction is not None and not 0 < fraction < 1:
        block_size(2**31, n=n, fraction=fraction)  # raises the range error before the model loads
    check_output_dir(out, force)
    if isinstance(distances, (str, Path)):
        distances = load_distances(distances)
    texts = None
    if distances is None and strategy == "similarity" and layers is None:
        if data is None:
            raise DepthpruneError("strategy 'similarity' needs --distances DIR (from `depthprune analyze`) or --data SRC")
        texts = load_calibration(data)
    source = model if isinstance(model, str) else str(model.config.name_or_path)
    model, tokenizer = _loaded(model, tokenizer, device, dtype, trust_remote_code)
    total = num_layers(model)
    if texts is not None:
        distances = measure(model, tokenizer, data, texts, batch_size, tokens, progress)
    if layers is not None:
        selection: Selection = explicit_selection(layers, total, distances)
    else:
        selection = choose_block(strategy, block_size(total, n=n, fraction=fraction), total, distances)
    params_before = count_parameters(model)
    remove_layers(model, selection.layers)
    record = pruning_record(source, total, params_before, model, selection)
    if distances is not None:
        record["distances"] = {
            "data": distances.meta.get("data"), "seq_len": distances.meta.get("seq_len"),
            "seed": distances.meta.get("seed"), "num_samples": distances.num_samples, "tokens": distances.tokens,
        }
    save_pruned(model, tokenizer, out, record, force)
    return record
