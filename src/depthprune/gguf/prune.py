"""``depthprune prune MODEL.gguf ... --out cut.gguf``: choose the layers as usual, cut the original GGUF file.

The selection is the one :func:`depthprune.prune` makes; criteria that need a measurement (similarity
without ``distances``) measure on the de-quantized copy of the file. The cut itself is applied to the
original file by :func:`depthprune.gguf.surgery.cut_gguf`, so the result keeps its quantization. A repair
(``--repair linear``) is fitted and folded on the de-quantized copy too, and only the one tensor it changes
is re-quantized (``gguf/repair.py``). At ``--granularity attention`` the chosen layers' attention goes and the
file is written in llama.cpp's ``deci`` architecture (``gguf/sublayers.py``), its tensors byte-copied too.
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
from ..repair.request import check_repair_request, split_options
from ..select import (
    CRITERIA,
    Selection,
    SelectionContext,
    block_size,
    check_cut_request,
    check_distances_serve,
    choose,
    explicit_selection,
    parse_layers,
)
from .repair import check_fold_site, repair_gguf_cut
from .sublayers import check_sublayer_source, cut_sublayers_gguf
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
            progress: bool, options, granularity: str) -> Selection:
    """The layers to cut (or whose sub-layer of kind ``granularity`` goes); ``loaded``: the de-quantized (model,
    tokenizer) where the criterion or a repair needs it."""
    if layers is not None:
        return explicit_selection(layers, total, distances, granularity)
    size = block_size(total, n=n, fraction=fraction, granularity=granularity)
    needs = CRITERIA.get(criterion).needs
    model, tokenizer = loaded if loaded is not None else (None, None)
    sequences = None
    if needs == "distances" and distances is None:
        distances = measure_texts(model, tokenizer, data, texts, analysis, progress)
    if needs == "calibration":
        sequences = tokenize(texts, tokenizer, data.seq_len)
    context = SelectionContext(total, distances, model, tokenizer, sequences, options=options, granularity=granularity)
    return choose(criterion, size, context)


def _checked_request(repair: str | None, granularity: str, n, fraction, layers: str | None, criterion: str,
                     data: DataOptions | None) -> str:
    """What is wrong with the request before any file is read; returns what the criterion needs."""
    needs = check_cut_request(n, fraction, layers, criterion, granularity)
    check_repair_request(repair, layers, criterion, data, granularity)
    return needs


def _checked_source(reader, granularity: str, layers: str | None) -> int:
    """The file's layer count, after refusing what its cut cannot express; for an attention cut also a listed
    first layer, which llama.cpp's deci loader needs (a criterion's choice is checked when the cut is planned)."""
    if granularity == "layer":
        return check_renumberable(reader)
    total = check_sublayer_source(reader, granularity)
    if layers is not None and 0 in parse_layers(layers, total, granularity):
        raise DepthpruneError("--layers names layer 0, whose attention a GGUF file must keep (llama.cpp's deci "
                              "loader reads the head size there): list later layers, or write a checkpoint")
    return total


def _sublayer_cut(source: Path, out, selection: Selection, model: str, reader) -> dict:
    record = cut_sublayers_gguf(source, out, attention=selection.layers, criterion=selection.criterion,
                                source_name=model, reader=reader)
    return {**record, "granularity": selection.granularity, "angular_distance": None}


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
    granularity: str = "layer",
    **options,
) -> dict:
    """Remove layers from a GGUF file (or embedded alias) and write a GGUF file; returns the record.

    Arguments as :func:`depthprune.prune` (the other keywords: the criteria's and the repairs' options);
    ``swa_pattern`` as :func:`depthprune.gguf.surgery.cut_gguf`. ``repair`` (None or 'none': no repair) fits
    on ``data`` with the de-quantized model and writes the one changed tensor re-quantized (see
    ``gguf/repair.py``); the record then has ``repair``, with ``gguf_tensors`` saying which type was written.
    ``granularity`` 'attention' removes the chosen layers' attention and writes llama.cpp's ``deci`` architecture
    (Llama sources only; 'mlp' cannot be expressed there and is refused: see ``gguf/sublayers.py``).
    Every input is checked before anything is measured or written.
    """
    repair = None if repair in (None, "none") else repair
    chosen_options, repair_settings = split_options(options, repair)
    needs = _checked_request(repair, granularity, n, fraction, layers, criterion, data)
    analysis = check_measuring(batch_size, token_mode)
    source = gguf_source(model)
    check_output_file(out, [source, distances if isinstance(distances, (str, Path)) else None,
                            data.source if data else None], "output GGUF file")
    if Path(out).exists() and not force:
        raise DepthpruneError(f"output file '{out}' exists: choose another --out or pass --force")
    reader = open_gguf(source)
    total = _checked_source(reader, granularity, layers)
    if isinstance(distances, (str, Path)):
        distances = load_distances(distances)
    if distances is not None and distances.num_layers != total:
        raise DepthpruneError(f"the distances were measured on a {distances.num_layers}-layer model but '{model}' "
                              f"has {total}: analyze this model")
    check_distances_serve(None if layers is not None else criterion, distances, granularity)
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
                        chosen_options, granularity)
    if granularity != "layer":
        return _sublayer_cut(source, out, selection, model, reader)
    replaced = repaired = None
    if repair is not None:
        plan_cut(reader, selection.layers, swa_pattern)  # a cut the file refuses: before fitting
        replaced, repaired = repair_gguf_cut(reader, *loaded, selection.layers, repair, repair_settings, data, texts,
                                             batch_size=batch_size, progress=progress)
    return cut_gguf(source, selection.layers, out, criterion=selection.criterion, distance=selection.distance,
                    swa_pattern=swa_pattern, source_name=model, reader=reader, replaced=replaced, repair=repaired)
