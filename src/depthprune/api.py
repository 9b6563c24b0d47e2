"""The end-to-end functions behind the CLI: analyze a model, prune it. Both are importable from ``depthprune``."""

from __future__ import annotations

import contextlib
import dataclasses
from pathlib import Path

from .config import AnalysisOptions, DataOptions
from .data import tokenize
from .errors import DepthpruneError
from .measure.analysis import check_measuring, load_calibration, measure_texts
from .measure.distances import AngularDistances, load_distances
from .measure.memory import StreamPlan, plan_streaming
from .measure.stream import compute_distances_streamed
from .model.check import check_model
from .model.load import check_length, count_parameters, load_model, num_layers
from .model.record import pruning_record
from .model.sublayers import check_sublayer_cut, remove_sublayers, sites_of, sublayers_removed
from .model.surgery import layers_removed, remove_layers, save_pruned
from .outputs import atomic_output_dir, check_output_dir
from .repair.request import check_repair_request, split_options
from .select import (
    Selection,
    SelectionContext,
    block_size,
    check_cut_request,
    check_distances_serve,
    choose,
    explicit_selection,
    parse_layers,
)

__all__ = ["DataOptions", "analyze", "prune"]


def _input_paths(*given) -> list:
    """The inputs an output must not overlap: paths given as strings (hub ids never exist on disk)."""
    return [g for g in given if isinstance(g, (str, Path))]


def _loaded(model, tokenizer, device: str, dtype: str, trust_remote_code: bool):
    if isinstance(model, str):
        return load_model(model, device=device, dtype=dtype, trust_remote_code=trust_remote_code)
    if tokenizer is None:
        raise DepthpruneError("pass the tokenizer together with an already loaded model")
    return model, tokenizer


def _measure_streamed(plan: StreamPlan, data: DataOptions, texts: list[str], analysis: AnalysisOptions, dtype: str,
                      trust_remote_code: bool, progress: bool = True) -> AngularDistances:
    """:func:`~depthprune.measure.analysis.measure_texts` with one decoder layer in memory at a time."""
    result = compute_distances_streamed(plan.spec, texts, seq_len=data.seq_len, batch_size=analysis.batch_size,
                                        token_mode=analysis.token_mode, dtype=dtype, device=plan.device,
                                        offload=plan.offload, trust_remote_code=trust_remote_code, progress=progress)
    result.meta.update(data=data.source, seed=data.seed)
    return result


def _plan(model, data: DataOptions, analysis: AnalysisOptions, stream: bool, max_memory, device: str, dtype: str,
          trust_remote_code: bool) -> StreamPlan | None:
    return plan_streaming(model, data.samples, data.seq_len, stream=stream, max_memory=max_memory,
                          batch_size=analysis.batch_size, token_mode=analysis.token_mode, device=device, dtype=dtype,
                          trust_remote_code=trust_remote_code)


def analyze(
    model,
    data: DataOptions,
    out: str | Path | None = None,
    *,
    tokenizer=None,
    batch_size: int = 8,
    token_mode: str = "last",
    device: str = "cpu",
    dtype: str = "float32",
    trust_remote_code: bool = False,
    stream: bool = False,
    max_memory: int | str | None = None,
    force: bool = False,
    progress: bool = True,
) -> AngularDistances:
    """Measure D[n][ℓ] for every block size and start; with ``out``, write distances.json/.csv and heatmap.png
    (``out=None`` writes nothing and only returns the distances).

    ``model`` is anything :func:`depthprune.load_model` takes, or a loaded model (then pass ``tokenizer``).
    ``token_mode``: 'last' (each sample's last real token, the paper's) or 'all' (the mean over its tokens).
    ``stream`` reads one decoder layer at a time instead of loading the model; ``max_memory`` ('2GiB', '24GB'
    or bytes) streams only when the model would not fit it. Every input is checked before the model loads;
    a bad one raises :class:`DepthpruneError` and writes nothing.
    """
    if not isinstance(data, DataOptions):
        raise DepthpruneError("data must be DataOptions(source, samples, seq_len, ...)")
    analysis = check_measuring(batch_size, token_mode)
    config = check_model(model, trust_remote_code)
    if config is not None:
        check_length(config, data.seq_len, "--seq-len")
    inputs = _input_paths(model, data.source)
    if out is not None:
        check_output_dir(out, force, inputs)  # fail before the slow part
    plan = _plan(model, data, analysis, stream, max_memory, device, dtype, trust_remote_code)
    texts = load_calibration(data)
    if plan is not None:
        result = _measure_streamed(plan, data, texts, analysis, dtype, trust_remote_code, progress)
    else:
        model, tokenizer = _loaded(model, tokenizer, device, dtype, trust_remote_code)
        result = measure_texts(model, tokenizer, data, texts, analysis, progress)
    if out is not None:
        from .measure.heatmap import plot_heatmap

        with atomic_output_dir(out, force, inputs) as tmp:
            result.save(tmp)
            plot_heatmap(result, tmp / "heatmap.png")
    return result


def _check_cut(config, n: int | None, fraction: float | None, layers: str | None,
               distances: AngularDistances | None, data: DataOptions | None, granularity: str = "layer") -> None:
    """Everything about a cut that the model's config decides: whether the architecture can lose that sub-layer
    exactly, block size or layers, distances, sequence length."""
    total = num_layers(config)
    if granularity != "layer":
        sites_of(config, granularity)
    if layers is not None:
        listed = parse_layers(layers, total, granularity)
        if granularity != "layer":
            check_sublayer_cut(config, {granularity: listed})
    else:
        block_size(total, n=n, fraction=fraction, granularity=granularity)
    if distances is not None:
        distances.check_model(config)
    if data is not None:
        check_length(config, data.seq_len, "--seq-len")


def _repaired(model, tokenizer, selection: Selection, repair: _RepairRequest, inplace: bool, progress: bool):
    """(the cut, repaired model, its ``repair`` record): the map fitted on the uncut model, then folded. A model
    the caller passed in is copied first unless ``inplace``: the repair changes a kept layer's weights."""
    import copy

    from .data import pad_id
    from .repair.apply import repair_cut

    if not inplace:
        model = copy.deepcopy(model)
    data = repair.data
    sequences = tokenize(repair.texts, tokenizer, data.seq_len)
    record = repair_cut(model, selection.layers, sequences, repair.method, repair.settings,
                        pad_token_id=pad_id(tokenizer), batch_size=repair.batch_size, progress=progress)
    record["calibration"] = {"data": data.source, "samples": data.samples, "seq_len": data.seq_len,
                             "seed": data.seed, "tokens": sum(map(len, sequences))}
    return model, record


def prune(
    model,
    out: str | Path,
    *,
    n: int | None = None,
    fraction: float | None = None,
    layers: str | None = None,
    criterion: str = "similarity",
    distances: str | Path | AngularDistances | None = None,
    data: DataOptions | None = None,
    tokenizer=None,
    batch_size: int = 8,
    token_mode: str = "last",
    device: str = "cpu",
    dtype: str = "float32",
    trust_remote_code: bool = False,
    stream: bool = False,
    max_memory: int | str | None = None,
    force: bool = False,
    inplace: bool = False,
    progress: bool = True,
    repair: str | None = None,
    granularity: str = "layer",
    **options,
) -> dict:
    """Remove a block of layers and save the pruned checkpoint with its ``depthprune.json``; returns that record.

    Give the block as ``n`` layers, a ``fraction`` of them, or an explicit ``layers`` spec ('20-27',
    '3,7,9'). ``criterion`` is a name of the criteria registry (``depthprune.CRITERIA``): 'similarity' and
    'block-influence' need ``distances`` (a directory from :func:`analyze`) or ``data`` to measure them now;
    a criterion that needs calibration text (iterative-similarity, perplexity-greedy, perplexity-oneshot,
    taylor) needs ``data`` and measures on it (``batch_size`` sequences at a time). A loaded ``model`` is cut
    only while it is saved and then restored, unless ``inplace=True`` leaves it cut (its removed layers can
    then be freed). ``stream`` and ``max_memory`` choose how the distances are measured, as in :func:`analyze`
    (the cut itself loads the model). ``repair`` (a name of ``depthprune.repair.REPAIRS``, e.g. 'linear'; None
    or 'none': no repair) fits a linear map on ``data``'s calibration text and folds it into the last kept layer
    (ReplaceMe), recorded under ``repair`` in ``depthprune.json``; a loaded ``model`` is then copied first unless
    ``inplace``. Other keywords: the criteria's and the repairs' own options (``window=5`` for a criterion
    declaring it, ``repair_ridge=0.01``). ``granularity`` 'attention' or 'mlp' removes only that sub-layer of the
    layers ``n``/``fraction``/``layers`` count and name (exact, standard: :mod:`depthprune.model.sublayers`).
    Every input is checked before the model loads.
    """
    needs = check_cut_request(n, fraction, layers, criterion, granularity)
    repair = None if repair in (None, "none") else repair
    chosen_options, repair_settings = split_options(options, repair)
    check_repair_request(repair, layers, criterion, data, granularity)
    analysis = check_measuring(batch_size, token_mode) if data is not None else None
    config = check_model(model, trust_remote_code)
    check_output_dir(out, force, _input_paths(model, distances, data.source if data else None))
    if isinstance(distances, (str, Path)):
        distances = load_distances(distances)
    check_distances_serve(criterion if layers is None else None, distances, granularity)
    measuring = distances is None and needs == "distances"
    if measuring and data is None:
        raise DepthpruneError(f"criterion '{criterion}' needs --distances DIR (from `depthprune analyze`) or --data SRC")
    if needs == "calibration" and data is None:
        raise DepthpruneError(f"criterion '{criterion}' needs calibration text: pass --data SRC")
    reads_data = measuring or needs == "calibration" or repair is not None
    if config is not None:
        _check_cut(config, n, fraction, layers, distances, data if reads_data else None, granularity)
    plan = _plan(model, data, analysis, stream, max_memory, device, dtype, trust_remote_code) if measuring else None
    texts = load_calibration(data) if reads_data else None
    if plan is not None:  # before the model loads, so the two peaks do not add up
        distances = _measure_streamed(plan, data, texts, analysis, dtype, trust_remote_code, progress)
    source = model if isinstance(model, str) else str(model.config.name_or_path)
    model, tokenizer = _loaded(model, tokenizer, device, dtype, trust_remote_code)
    _check_cut(model.config, n, fraction, layers, distances, data if reads_data else None, granularity)  # hub, GGUF
    total = num_layers(model)
    if measuring and plan is None:
        distances = measure_texts(model, tokenizer, data, texts, analysis, progress)
    if layers is not None:
        selection: Selection = explicit_selection(layers, total, distances, granularity)
    else:
        sequences = tokenize(texts, tokenizer, data.seq_len) if needs == "calibration" else None
        context = SelectionContext(total, distances, model, tokenizer, sequences, batch_size=batch_size,
                                   token_mode=token_mode, progress=progress, options=chosen_options,
                                   granularity=granularity)
        selection = choose(criterion, block_size(total, n=n, fraction=fraction, granularity=granularity), context)
    request = _RepairRequest(repair, repair_settings, texts, data, batch_size) if repair is not None else None
    return _save_cut(model, tokenizer, source, selection, distances, out, force, inplace, progress, request)


@dataclasses.dataclass(frozen=True)
class _RepairRequest:
    """A repair asked of :func:`prune`: the method, its options and the calibration text to fit it on."""

    method: str
    settings: object
    texts: list[str]
    data: DataOptions
    batch_size: int


def _save_cut(model, tokenizer, source: str, selection: Selection, distances: AngularDistances | None, out, force: bool,
              inplace: bool, progress: bool, repair: _RepairRequest | None) -> dict:
    """Cut (and repair) the loaded ``model``, save it with its record, and return the record."""
    total, params_before = num_layers(model), count_parameters(model)
    repaired = None
    if repair is not None:
        model, repaired = _repaired(model, tokenizer, selection, repair, inplace, progress)
        cut = contextlib.nullcontext(model)
    elif selection.granularity != "layer":
        removed = {selection.granularity: selection.layers}
        cut = contextlib.nullcontext(remove_sublayers(model, removed)) if inplace else sublayers_removed(model, removed)
    else:
        cut = contextlib.nullcontext(remove_layers(model, selection.layers)) if inplace else \
            layers_removed(model, selection.layers)
    with cut as pruned:
        record = pruning_record(source, total, params_before, pruned, selection)
        if repaired is not None:
            record["repair"] = repaired
        if distances is not None:
            record["distances"] = {
                "data": distances.meta.get("data"), "seq_len": distances.meta.get("seq_len"),
                "seed": distances.meta.get("seed"), "num_samples": distances.num_samples,
                "token_mode": distances.token_mode,
            }
        save_pruned(pruned, tokenizer, out, record, force)
    return record
