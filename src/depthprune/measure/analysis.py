"""The analysis from calibration text: the documents read, checked settings, a loaded model measured on them.

What :func:`depthprune.analyze`, :func:`depthprune.prune`, ``prune_gguf`` and the sweep share.
"""

from __future__ import annotations

from ..config import AnalysisOptions, DataOptions
from ..data import load_texts, pad_id, tokenize
from ..model.load import check_length, model_fingerprint
from .distances import AngularDistances, measure_distances


def check_measuring(batch_size: int, token_mode: str) -> AnalysisOptions:
    """The analysis settings, checked (one-line errors naming the flags)."""
    return AnalysisOptions(batch_size, token_mode)


def load_calibration(data: DataOptions) -> list[str]:
    """The calibration documents ``data`` names (checked before any model is loaded)."""
    return load_texts(data.source, data.samples, data.seed, data.text_field, data.config, data.split)


def measure_texts(model, tokenizer, data: DataOptions, texts: list[str], analysis: AnalysisOptions,
                  progress: bool = True) -> AngularDistances:
    """The angular distances of a loaded model on calibration ``texts`` (tokenized here), with how they were measured.

    The core shared by :func:`depthprune.analyze`, :func:`depthprune.prune` and the sweep; users call
    :func:`depthprune.analyze` (from text) or :func:`depthprune.measure.distances.measure_distances` (from token ids).
    """
    check_length(model.config, data.seq_len, "--seq-len")
    sequences = tokenize(texts, tokenizer, data.seq_len)
    result = measure_distances(model, sequences, batch_size=analysis.batch_size, token_mode=analysis.token_mode,
                               pad_token_id=pad_id(tokenizer), progress=progress)
    result.meta.update(model=str(model.config.name_or_path), model_fingerprint=model_fingerprint(model.config),
                       seq_len=data.seq_len, num_tokens=int(sum(len(s) for s in sequences)), data=data.source,
                       seed=data.seed)
    return result
