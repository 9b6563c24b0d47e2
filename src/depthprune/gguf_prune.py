"""``depthprune prune MODEL.gguf ... --out cut.gguf``: choose the layers as usual, cut the original GGUF file.

The selection is the one :func:`depthprune.prune` makes; criteria that need a measurement (similarity
without ``distances``) measure on the de-quantized copy of the file. The cut itself is applied to the
original file by :func:`depthprune.gguf_surgery.cut_gguf`, so the result keeps its quantization.
"""

from __future__ import annotations

from pathlib import Path

from .api import DataOptions, measure
from .errors import DepthpruneError
from .gguf_surgery import check_renumberable, cut_gguf, open_gguf
from .models import load_model, resolve_model_source
from .outputs import check_output_file
from .select import (
    STRATEGIES,
    Selection,
    block_size,
    check_block_request,
    choose_block,
    explicit_selection,
    layer_ranges,
)
from .similarity import AngularDistances, load_distances


def gguf_source(model: str) -> Path:
    """The GGUF file behind ``model`` (a .gguf path or an embedded alias), or a one-line error."""
    source = resolve_model_source(model)
    if source.kind not in ("alias", "gguf"):
        raise DepthpruneError(f"a GGUF output needs a .gguf file or an embedded alias as the model, not '{model}': "
                              "write a checkpoint directory, then `depthprune export` it")
    return Path(source.location)


def _select(model: str, total: int, n: int | None, fraction: float | None, layers: str | None, strategy: str,
            distances: AngularDistances | None, data: DataOptions | None, batch_size: int, tokens: str,
            progress: bool) -> Selection:
    if layers is not None:
        return explicit_selection(layers, total, distances)
    size = block_size(total, n=n, fraction=fraction)
    if distances is None and strategy == "similarity":
        loaded, tokenizer = load_model(model)  # the de-quantized copy; the cut is applied to the file
        distances = measure(loaded, tokenizer, data, batch_size=batch_size, tokens=tokens, progress=progress)
    return choose_block(strategy, size, total, distances)


def prune_gguf(
    model: str,
    out: str | Path,
    *,
    n: int | None = None,
    fraction: float | None = None,
    layers: str | None = None,
    strategy: str = "similarity",
    distances: str | Path | AngularDistances | None = None,
    data: DataOptions | None = None,
    batch_size: int = 8,
    tokens: str = "last",
    swa_pattern: str = "period",
    force: bool = False,
    progress: bool = True,
) -> dict:
    """Remove a block of layers from a GGUF file (or embedded alias) and write a GGUF file; returns the record.

    Arguments as :func:`depthprune.prune`; ``swa_pattern`` as :func:`depthprune.gguf_surgery.cut_gguf`.
    Every input is checked before anything is measured or written.
    """
    if sum(x is not None for x in (n, fraction, layers)) != 1:
        raise DepthpruneError("give exactly one of --n, --fraction or --layers")
    if strategy not in STRATEGIES:
        raise DepthpruneError(f"unknown strategy '{strategy}': choose one of {', '.join(STRATEGIES)}")
    if layers is not None:
        layer_ranges(layers)
    else:
        check_block_request(n, fraction)
    source = gguf_source(model)
    check_output_file(out, [source, distances if isinstance(distances, (str, Path)) else None,
                            data.source if data else None], "output GGUF file")
    if Path(out).exists() and not force:
        raise DepthpruneError(f"output file '{out}' exists: choose another --out or pass --force")
    reader = open_gguf(source)
    total = check_renumberable(reader)
    if isinstance(distances, (str, Path)):
        distances = load_distances(distances)
    if distances is not None and distances.num_layers != total:
        raise DepthpruneError(f"the distances were measured on a {distances.num_layers}-layer model but '{model}' "
                              f"has {total}: analyze this model")
    if distances is None and strategy == "similarity" and layers is None and data is None:
        raise DepthpruneError("strategy 'similarity' needs --distances DIR (from `depthprune analyze`) or --data SRC")
    selection = _select(model, total, n, fraction, layers, strategy, distances, data, batch_size, tokens, progress)
    return cut_gguf(source, selection.layers, out, criterion=selection.strategy, distance=selection.distance,
                    swa_pattern=swa_pattern, source_name=model, reader=reader)
