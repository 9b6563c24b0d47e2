"""C4 validation loss: mean next-token cross-entropy on a fixed, seeded set of packed sequences.

Documents are sampled by seed, tokenized whole (with the tokenizer's BOS), concatenated and cut into
sequences of exactly ``seq_len`` tokens ("packed"), so every scored position has a full left context
within its sequence and no padding is needed. The paper plots the loss divided by log(vocabulary size).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from ...data import check_int, load_texts
from ...model.loss import sample_sequences, sequence_losses
from ...options import option
from ..registry import EVAL_TASKS, EvalTask


def c4_loss(
    model,
    tokenizer,
    source: str,
    *,
    num_sequences: int = 64,
    seq_len: int = 512,
    seed: int = 0,
    batch_size: int = 4,
    text_field: str = "text",
    config: str | None = None,
    split: str = "validation",
    progress: bool = True,
) -> dict:
    """Mean next-token loss on ``num_sequences`` packed sequences of ``seq_len`` tokens from ``source``.

    Documents are drawn by ``seed`` until enough tokens are packed, so the scored set is the same for
    every model that shares the tokenizer. Returns nats/token, perplexity and loss / log(vocab size).
    """
    check_int(num_sequences, "--c4-sequences", 1)
    check_int(seq_len, "--c4-seq-len", 2)  # a 1-token sequence predicts nothing
    check_int(batch_size, "--batch-size", 1)
    from ...model.load import check_length

    check_length(model.config, seq_len, "--c4-seq-len")
    sequences = sample_sequences(tokenizer, source, num_sequences, seq_len, seed, text_field, config, split)
    total, count = sequence_losses(model, sequences, batch_size, progress)
    loss = total / count
    vocab = model.config.vocab_size
    return {
        "task": "c4",
        "loss": loss,
        "perplexity": math.exp(loss),
        "loss_over_log_vocab": loss / math.log(vocab),
        "vocab_size": vocab,
        "num_sequences": num_sequences,
        "num_tokens_scored": count,
        "seq_len": seq_len,
        "packing": "documents concatenated with their BOS and cut into seq_len-token sequences",
        "data": source,
        "seed": seed,
    }


@dataclass
class C4Options:
    """C4's own options (the evaluation's options hold them; the document sample's ``seed`` is shared)."""

    c4_sequences: int = option(64, minimum=1, help="C4: packed sequences to score")
    c4_seq_len: int = option(512, minimum=2, help="C4: tokens per scored sequence")
    c4_config: str | None = option(None, help="C4: Hugging Face dataset config (default: 'en' for allenai/c4)")
    c4_split: str = option("validation", help="C4: Hugging Face dataset split")


def _is_local(source: str) -> bool:
    return Path(source).expanduser().exists()


def data_config(source: str, options) -> str | None:
    """The dataset config of the C4 source: ``--c4-config``, else 'en' for allenai/c4."""
    return options.c4_config if options.c4_config is not None else ("en" if source == "allenai/c4" else None)


def _check(source: str, options) -> None:  # as c4_loss reads it
    load_texts(source, None if _is_local(source) else options.c4_sequences * 8, options.seed,
               config=data_config(source, options), split=options.c4_split)


def _run(model, tokenizer, source: str, options, *, details: bool = False, progress: bool = True) -> dict:
    return c4_loss(model, tokenizer, source, num_sequences=options.c4_sequences, seq_len=options.c4_seq_len,
                   seed=options.seed, batch_size=options.batch_size, config=data_config(source, options),
                   split=options.c4_split, progress=progress)


def _summary(r: dict) -> list:
    return [("c4", "loss (nats/token)", r["loss"], None, r["num_tokens_scored"]),
            ("c4", "loss / log(vocab)", r["loss_over_log_vocab"], 1.0, r["num_tokens_scored"])]


TASK = EVAL_TASKS.register(EvalTask(
    name="c4",
    description="C4 validation loss, next-token loss on seeded packed sequences (Raffel et al. 2020)",
    title="C4 loss",
    flag="--c4",
    metavar="FILE_OR_ID",
    data_help="a .jsonl file or directory of documents, or allenai/c4",
    check=_check,
    run=_run,
    headline="c4_loss",
    higher_is_better=False,
    chance=None,
    baseline_kind="none",
    flatten=lambda r: {"c4_loss": r["loss"], "c4_loss_norm": r["loss_over_log_vocab"], "c4_ppl": r["perplexity"]},
    summary=_summary,
    lengths=lambda options: [("--c4-seq-len", options.c4_seq_len)],
    options=C4Options,
    order=30,
))
