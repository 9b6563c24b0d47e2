"""``depthprune prune MODEL.gguf ... --out cut.gguf``: choose the layers as usual, cut the original GGUF file.

The selection is the one :func:`depthprune.prune` makes; criteria that need a measurement (similarity
without ``distances``) measure on the de-quantized copy of the file. The cut itself is applied to the
original file by :func:`depthprune.gguf.surgery.cut_gguf`, so the result keeps its quantization.
"""

from __future__ import annotations

from pathlib import Path

from ..config import AnalysisOptions, DataOptions
from ..data import tokenize
from ..errors import DepthpruneError
from ..measure.analysis import check_measuring, load_calibration, measure_texts
from ..measure.distances import AngularDistances, load_distances
from ..model.load import load_model, resolve_model_source
from ..outputs import check_output_file
from ..select import (
    CRITERIA,
    Selection,
    SelectionContext,
    block_size,
    check_cut_request,
    choose,
    criterion_options,
    explicit_selection,
)
from .surgery import check_renumberable, cut_gguf, open_gguf


def gguf_source(model: str) -> Path:
    """The GGUF file behind ``model`` (a .gguf path or an embedded alias), or a one-line error."""
    source = resolve_model_source(model)
    if source.kind not in ("alias", "gguf"):
        raise DepthpruneError(f"a GGUF output needs a .gguf file or an embedded alias as the model, not '{model}': "
                              "write a checkpoint directory, then `depthprune export` it")
    return Path(source.location)


def _select(model: str, total: int, n: int | None, fraction: float | None, layers: str | None, criterion: str,
            distances: AngularDistances | None, data: DataOptions | None, analysis: AnalysisOptions,
            progress: bool, options) -> Selection:
    if layers is not None:
        return explicit_selection(layers, total, distances)
    size = block_size(total, n=n, fraction=fraction)
    needs = CRITERIA.get(criterion).needs
    loaded = tokenizer = sequences = None
    if needs == "calibration" or (needs == "distances" and distances is None):
        loaded, tokenizer = load_model(model)  # the de-quantized copy; the cut is applied to the file
        texts = load_calibration(data)
        if needs == "distances" and distances is None:
            distances = measure_texts(loaded, tokenizer, data, texts, analysis, progress)
        if needs == "calibration":
            sequences = tokenize(texts, tokenizer, data.seq_len)
    return choose(criterion, size, SelectionContext(total, distances, loaded, tokenizer, sequences, options=options))


def prune_gguf(
    model: str,
    out: str | Path,
    *,
    n: int | None = None,
    fraction: float | None = None,
    layers: str | None = None,
    criterion: str = "similarity",
    distances: str | Path | AngularDistances | None = None,
    data: DataOptions | None = None,
    batch_size: int = 8,
    token_mode: str = "last",
    swa_pattern: str = "period",
    force: bool = False,
    progress: bool = True,
    repair: str | None = None,
    **options,
) -> dict:
    """Remove layers from a GGUF file (or embedded alias) and write a GGUF file; returns the record.

    Arguments as :func:`depthprune.prune` (the other keywords: the criteria's options); ``swa_pattern`` as
    :func:`depthprune.gguf.surgery.cut_gguf`. Every input is checked before anything is measured or written.
    ``repair`` is refused: the cut copies the kept tensors' bytes, and a repair changes one of them.
    """
    if repair not in (None, "none"):
        raise DepthpruneError(f"--repair {repair} changes a kept layer's weights, which a GGUF cut (kept tensors "
                              "byte-copied) cannot write: prune to a checkpoint directory with --repair, then "
                              "`depthprune export` it to GGUF")
    needs = check_cut_request(n, fraction, layers, criterion)
    chosen_options = criterion_options(**options)
    analysis = check_measuring(batch_size, token_mode)
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
    if data is None and (needs == "calibration" or (needs == "distances" and distances is None)):
        raise DepthpruneError(f"criterion '{criterion}' needs --data SRC"
                              + (" or --distances DIR (from `depthprune analyze`)" if needs == "distances" else ""))
    selection = _select(model, total, n, fraction, layers, criterion, distances, data, analysis, progress,
                        chosen_options)
    return cut_gguf(source, selection.layers, out, criterion=selection.criterion, distance=selection.distance,
                    swa_pattern=swa_pattern, source_name=model, reader=reader)
