"""The end-to-end functions behind the CLI: analyze a model, prune it. Both are importable from ``depthprune``."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path

from .data import check_int, load_texts
from .errors import DepthpruneError
from .models import check_checkpoint, check_length, count_parameters, load_model, num_layers
from .outputs import atomic_output_dir, check_output_dir
from .report import plot_heatmap
from .select import (
    STRATEGIES,
    Selection,
    block_size,
    check_block_request,
    choose_block,
    explicit_selection,
    layer_ranges,
    parse_layers,
)
from .similarity import TOKEN_MODES, AngularDistances, compute_distances, load_distances
from .surgery import layers_removed, pruning_record, read_record, remove_layers, save_pruned


@dataclass
class DataOptions:
    """Calibration text: where from and how much of it (checked when made)."""

    source: str
    samples: int = 128
    seq_len: int = 512
    seed: int = 0
    text_field: str = "text"
    config: str | None = None  # Hugging Face dataset config, e.g. 'en' for allenai/c4
    split: str = "train"

    def __post_init__(self) -> None:
        if not isinstance(self.source, (str, Path)):
            raise DepthpruneError(f"data source must be a path or a dataset id, got {self.source!r}")
        self.source = str(self.source)
        check_int(self.samples, "--samples", 1)
        check_int(self.seq_len, "--seq-len", 2)
        check_int(self.seed, "--seed")


def check_model(model, trust_remote_code: bool = False):
    """Check a model before loading it; returns its config when known now (a local checkpoint, a loaded model).

    Besides :func:`check_checkpoint`'s checks of config and weights, the ``depthprune.json`` of a pruned
    checkpoint must be readable: it is read after the work, and a damaged one must not waste it.
    """
    if not isinstance(model, str):
        return model.config
    config = check_checkpoint(model, trust_remote_code)
    if Path(model).expanduser().is_dir():
        read_record(Path(model).expanduser())
    return config


def _check_measuring(batch_size: int, tokens: str) -> None:
    check_int(batch_size, "--batch-size", 1)
    if tokens not in TOKEN_MODES:
        raise DepthpruneError(f"unknown token mode '{tokens}': choose one of {', '.join(TOKEN_MODES)}")


def _input_paths(*given) -> list:
    """The inputs an output must not overlap: paths given as strings (hub ids never exist on disk)."""
    return [g for g in given if isinstance(g, (str, Path))]


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
    check_length(model.config, data.seq_len, "--seq-len")
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
    Every input is checked before the model loads; a bad one raises :class:`DepthpruneError` and writes nothing.
    """
    if not isinstance(data, DataOptions):
        raise DepthpruneError("data must be DataOptions(source, samples, seq_len, ...)")
    _check_measuring(batch_size, tokens)
    config = check_model(model, trust_remote_code)
    if config is not None:
        check_length(config, data.seq_len, "--seq-len")
    inputs = _input_paths(model, data.source)
    if out is not None:
        check_output_dir(out, force, inputs)  # fail before the slow part
    texts = load_calibration(data)
    model, tokenizer = _loaded(model, tokenizer, device, dtype, trust_remote_code)
    result = measure(model, tokenizer, data, texts, batch_size, tokens, progress)
    if out is not None:
        with atomic_output_dir(out, force, inputs) as tmp:
            result.save(tmp)
            plot_heatmap(result, tmp / "heatmap.png")
    return result


def _check_cut(config, n: int | None, fraction: float | None, layers: str | None,
               distances: AngularDistances | None, data: DataOptions | None) -> None:
    """Everything about a cut that the model's config decides: block size or layers, distances, sequence length."""
    total = num_layers(config)
    if layers is not None:
        parse_layers(layers, total)
    else:
        block_size(total, n=n, fraction=fraction)
    if distances is not None:
        distances.check_model(config)
    if data is not None:
        check_length(config, data.seq_len, "--seq-len")


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
    inplace: bool = False,
    progress: bool = True,
) -> dict:
    """Remove a block of layers and save the pruned checkpoint with its ``depthprune.json``; returns that record.

    Give the block as ``n`` layers, a ``fraction`` of them, or an explicit ``layers`` spec ('20-27',
    '3,7,9'). ``strategy='similarity'`` needs ``distances`` (a directory from :func:`analyze`) or
    ``data`` to measure them now. A loaded ``model`` is cut only while it is saved and then restored,
    unless ``inplace=True`` leaves it cut (its removed layers can then be freed). Every input is checked
    before the model loads.
    """
    if sum(x is not None for x in (n, fraction, layers)) != 1:
        raise DepthpruneError("give exactly one of --n, --fraction or --layers")
    if strategy not in STRATEGIES:
        raise DepthpruneError(f"unknown strategy '{strategy}': choose one of {', '.join(STRATEGIES)}")
    if layers is not None:
        layer_ranges(layers)
    else:
        check_block_request(n, fraction)
    if data is not None:
        _check_measuring(batch_size, tokens)
    config = check_model(model, trust_remote_code)
    check_output_dir(out, force, _input_paths(model, distances, data.source if data else None))
    if isinstance(distances, (str, Path)):
        distances = load_distances(distances)
    measuring = distances is None and strategy == "similarity" and layers is None
    if measuring and data is None:
        raise DepthpruneError("strategy 'similarity' needs --distances DIR (from `depthprune analyze`) or --data SRC")
    if config is not None:
        _check_cut(config, n, fraction, layers, distances, data if measuring else None)
    texts = load_calibration(data) if measuring else None
    source = model if isinstance(model, str) else str(model.config.name_or_path)
    model, tokenizer = _loaded(model, tokenizer, device, dtype, trust_remote_code)
    _check_cut(model.config, n, fraction, layers, distances, data if measuring else None)  # hub ids, GGUF: now
    total = num_layers(model)
    if measuring:
        distances = measure(model, tokenizer, data, texts, batch_size, tokens, progress)
    if layers is not None:
        selection: Selection = explicit_selection(layers, total, distances)
    else:
        selection = choose_block(strategy, block_size(total, n=n, fraction=fraction), total, distances)
    params_before = count_parameters(model)
    cut = contextlib.nullcontext(remove_layers(model, selection.layers)) if inplace else \
        layers_removed(model, selection.layers)
    with cut as pruned:
        record = pruning_record(source, total, params_before, pruned, selection)
        if distances is not None:
            record["distances"] = {
                "data": distances.meta.get("data"), "seq_len": distances.meta.get("seq_len"),
                "seed": distances.meta.get("seed"), "num_samples": distances.num_samples, "tokens": distances.tokens,
            }
        save_pruned(pruned, tokenizer, out, record, force)
    return record
