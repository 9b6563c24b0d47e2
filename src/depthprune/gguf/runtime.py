"""Running a GGUF file in llama.cpp (through llama-cpp-python): next-token logits and loss.

Optional: install with ``pip install 'depthprune[gguf-runtime]'``. Used to check cut and exported files
in the runtime their users run, and by ``benchmarks/gguf_speed.py``.
"""

from __future__ import annotations

import contextlib
import io
import json
import re
from pathlib import Path

import numpy as np

from ..errors import DepthpruneError


def load_llama(path: str | Path, *, n_ctx: int = 512, threads: int = 1, logits_all: bool = True,
               flash_attn: bool = False, verbose: bool = False):
    """A ``llama_cpp.Llama`` over ``path`` on the CPU, quiet, with a fixed number of threads."""
    try:
        from llama_cpp import Llama
    except ImportError:
        raise DepthpruneError("llama-cpp-python is not installed: pip install 'depthprune[gguf-runtime]'") from None
    return Llama(model_path=str(path), n_ctx=n_ctx, n_batch=n_ctx, n_ubatch=n_ctx, n_threads=threads,
                 n_threads_batch=threads, logits_all=logits_all, flash_attn=flash_attn, verbose=verbose)


_KV_CACHE_LINE = re.compile(r"llama_kv_cache: size =\s*([\d.]+) MiB \(\s*(\d+) cells,\s*(\d+) layers")


def kv_cache_allocated(path: str | Path, *, n_ctx: int = 512, flash_attn: bool = False) -> dict:
    """The KV cache llama.cpp allocates for ``path`` at ``n_ctx`` cells, as its load log states it:
    ``{"mib": ..., "cells": ..., "layers": ...}`` (MiB to two decimals; layers counts zero-width ones too)."""
    log = io.StringIO()
    with contextlib.redirect_stderr(log):  # llama-cpp-python prints llama.cpp's log to sys.stderr when verbose
        load_llama(path, n_ctx=n_ctx, logits_all=False, flash_attn=flash_attn, verbose=True)
    match = _KV_CACHE_LINE.search(log.getvalue())
    if match is None:
        raise DepthpruneError(f"llama.cpp did not report a KV cache size for '{path}': is it a decoder model?")
    return {"mib": float(match[1]), "cells": int(match[2]), "layers": int(match[3])}


def kv_bytes_per_token(llm) -> float:
    """The bytes llama.cpp stores per token of a sequence: how much its sequence state grows per evaluated token
    (the K and V rows of every layer that has them, and the cell's position)."""
    import llama_cpp

    sizes = []
    for count in (8, 16):
        llm.reset()
        llm.eval([0] * count)
        sizes.append(llama_cpp.llama_state_seq_get_size(llm.ctx, 0))
    return (sizes[1] - sizes[0]) / 8


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


def timed_prefill_decode(llm, tokens: list[int], prefill: int) -> dict:
    """Wall and CPU seconds of evaluating ``tokens[:prefill]`` at once (prefill), then each later token alone
    (decode), from an empty context. The weights are touched once before, so page faults are not timed."""
    import time

    llm.eval(tokens[:8])
    llm.reset()
    wall, cpu = time.perf_counter(), time.process_time()
    llm.eval(tokens[:prefill])
    prefill_wall, prefill_cpu = time.perf_counter() - wall, time.process_time() - cpu
    wall, cpu = time.perf_counter(), time.process_time()
    for token in tokens[prefill:]:
        llm.eval([token])
    return {"prefill_wall_s": prefill_wall, "prefill_cpu_s": prefill_cpu,
            "decode_wall_s": time.perf_counter() - wall, "decode_cpu_s": time.process_time() - cpu}
