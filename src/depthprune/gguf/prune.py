"""``depthprune prune MODEL.gguf ... --out cut.gguf``: choose the layers as usual, cut the original GGUF file.

The selection is the one :func:`depthprune.prune` makes; criteria that need a measurement (similarity
without ``distances``) measure on the de-quantized copy of the file. The cut itself is applied to the
original file by :func:`depthprune.gguf.surgery.cut_gguf`, so the result keeps its quantization. A repair
(``--repair linear``) is fitted and folded on the de-quantized copy too, and only the one tensor it changes
is re-quantized (``gguf/repair.py``).
"""

from __future__ import annotations

from pathlib import Path

from ..config import AnalysisOptions, DataOptions
from ..data import tokenize
from ..errors import DepthpruneError
from ..measure.analysis import check_measuring, load_calibration, measure_texts
from ..measure.distances import AngularDistances, load_distances
from ..model.load import check_length, load_model, resolve_model_source
from ..outputs import check_output_file
from ..repair.apply import repairable_block
from ..select import (
    CRITERIA,
    Selection,
    SelectionContext,
    block_size,
    check_cut_request,
    choose,
    explicit_selection,
    parse_layers,
)
from .repair import check_fold_site, check_repair_request, repair_gguf_cut, split_options
from .surgery import check_renumberable, cut_gguf, open_gguf, plan_cut


def gguf_source(model: str) -> Path:
    """The GGUF file behind ``model`` (a .gguf path or an embedded alias), or a one-line error."""
    source = resolve_model_source(model)
    if source.kind not in ("alias", "gguf"):
        raise DepthpruneError(f"a GGUF output needs a .gguf file or an embedded alias as the model, not '{model}': "
                              "write a checkpoint directory, then `depthprune export` it to GGUF")
    return Path(source.location)


def _select(loaded, texts: list[str] | None, total: int, n: int | None, fraction: float | None, layers: str | None,
            criterion: str, distances: AngularDistances | None, data: DataOptions | None, analysis: AnalysisOptions,
            progress: bool, options) -> Selection:
    """The layers to cut; ``loaded``: the de-quantized (model, tokenizer) where the criterion or a repair needs it."""
    if layers is not None:
        return explicit_selection(layers, total, distances)
    size = block_size(total, n=n, fraction=fraction)
    needs = CRITERIA.get(criterion).needs
    model, tokenizer = loaded if loaded is not None else (None, None)
    sequences = None
    if needs == "distances" and distances is None:
        distances = measure_texts(model, tokenizer, data, texts, analysis, progress)
    if needs == "calibration":
        sequences = tokenize(texts, tokenizer, data.seq_len)
    return choose(criterion, size, SelectionContext(total, distances, model, tokenizer, sequences, options=options))


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

    Arguments as :func:`depthprune.prune` (the other keywords: the criteria's and the repairs' options);
    ``swa_pattern`` as :func:`depthprune.gguf.surgery.cut_gguf`. ``repair`` (None or 'none': no repair) fits
    on ``data`` with the de-quantized model and writes the one changed tensor re-quantized (see
    ``gguf/repair.py``); the record then has ``repair``, with ``gguf_tensors`` saying which type was written.
    Every input is checked before anything is measured or written.
    """
    repair = None if repair in (None, "none") else repair
    chosen_options, repair_settings = split_options(options, repair)
    needs = check_cut_request(n, fraction, layers, criterion)
    if repair is not None:
        check_repair_request(repair, layers, criterion, data)
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
    if repair is not None and layers is not None:
        repairable_block(parse_layers(layers, total), total)
    if data is None and (needs == "calibration" or (needs == "distances" and distances is None)):
        raise DepthpruneError(f"criterion '{criterion}' needs --data SRC"
                              + (" or --distances DIR (from `depthprune analyze`)" if needs == "distances" else ""))
    loaded = texts = None
    if repair is not None or needs == "calibration" or (needs == "distances" and distances is None):
        texts = load_calibration(data)
        loaded = load_model(model)  # the de-quantized copy; the cut is applied to the file
    if repair is not None:
        check_length(loaded[0].config, data.seq_len, "--seq-len")
        check_fold_site(loaded[0], reader, 0)  # an architecture the repair or the file refuses: before measuring
    selection = _select(loaded, texts, total, n, fraction, layers, criterion, distances, data, analysis, progress,
                        chosen_options)
    replaced = repaired = None
    if repair is not None:
        plan_cut(reader, selection.layers, swa_pattern)  # a cut the file refuses: before fitting
        replaced, repaired = repair_gguf_cut(reader, *loaded, selection.layers, repair, repair_settings, data, texts,
                                             batch_size=batch_size, progress=progress)
    return cut_gguf(source, selection.layers, out, criterion=selection.criterion, distance=selection.distance,
                    swa_pattern=swa_pattern, source_name=model, reader=reader, replaced=replaced, repair=repaired)
