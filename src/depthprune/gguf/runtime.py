"""Running a GGUF file in llama.cpp (through llama-cpp-python): next-token logits and loss.

Optional: install with ``pip install 'depthprune[gguf-runtime]'``. Used to check cut and exported files
in the runtime their users run, and by ``benchmarks/gguf_speed.py``.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from ..errors import DepthpruneError


def load_llama(path: str | Path, *, n_ctx: int = 512, threads: int = 1, logits_all: bool = True):
    """A ``llama_cpp.Llama`` over ``path`` on the CPU, quiet, with a fixed number of threads."""
    try:
        from llama_cpp import Llama
    except ImportError:
        raise DepthpruneError("llama-cpp-python is not installed: pip install 'depthprune[gguf-runtime]'") from None
    return Llama(model_path=str(path), n_ctx=n_ctx, n_batch=n_ctx, n_ubatch=n_ctx, n_threads=threads,
                 n_threads_batch=threads, logits_all=logits_all, verbose=False)


def next_token_logits(llm, tokens: list[int]) -> np.ndarray:
    """llama.cpp's logits after each of ``tokens`` (one fresh sequence), float32, shape (len(tokens), vocab)."""
    llm.reset()
    llm.eval(tokens)
    return np.array(llm.scores[: len(tokens)], dtype=np.float32)


def mean_nll(logits: np.ndarray, tokens: list[int]) -> float:
    """Mean next-token negative log-likelihood (nats) of ``tokens[1:]`` under ``logits[:-1]``."""
    scores = logits[:-1].astype(np.float64)
    top = scores.max(axis=1, keepdims=True)
    log_norm = top[:, 0] + np.log(np.exp(scores - top).sum(axis=1))
    return float(np.mean(log_norm - scores[np.arange(len(scores)), tokens[1:]]))


def c4_token_stream(llm, data: str | Path, count: int, seed: int = 0) -> list[int]:
    """``count`` tokens of C4 documents (a .jsonl file) in seeded order, tokenized by llama.cpp (with BOS where
    the model adds one)."""
    texts = [json.loads(line)["text"] for line in Path(data).read_text().splitlines() if line.strip()]
    order = np.random.default_rng(seed).permutation(len(texts))
    stream: list[int] = []
    for i in order:
        stream += llm.tokenize(texts[i].encode("utf-8"), add_bos=True, special=False)
        if len(stream) >= count:
            return stream[:count]
    raise DepthpruneError(f"'{data}' holds fewer than {count} tokens: ask for fewer")
