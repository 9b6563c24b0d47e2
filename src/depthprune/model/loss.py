"""A model's next-token loss on packed text: the held-out loss both evaluation (C4) and healing's validation score.

Documents are drawn by seed, tokenized whole (with the tokenizer's BOS), concatenated and cut into
sequences of exactly ``seq_len`` tokens ("packed", :func:`sample_sequences`), so every scored position has
a full left context within its sequence and no padding is needed; :func:`sequence_losses` sums the
model's negative log-likelihoods over them. Light: torch is imported on first use.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from ..data import load_texts, pack, tokenize
from ..errors import DepthpruneError


def sample_sequences(tokenizer, source: str, count: int, seq_len: int, seed: int, text_field: str = "text",
                     config: str | None = None, split: str = "validation") -> list[list[int]]:
    """``count`` packed sequences of ``seq_len`` tokens from ``source``: the same for every model that
    shares the tokenizer. Documents are drawn in ``seed``'s order until there are enough tokens."""
    import torch

    local = Path(source).expanduser().exists()
    texts = load_texts(source, None if local else count * 8, seed, text_field, config, split)
    order = torch.randperm(len(texts), generator=torch.Generator().manual_seed(seed)).tolist()
    # Tokenize documents in seeded order, a chunk at a time, until there are enough tokens to pack.
    documents: list[list[int]] = []
    for start in range(0, len(order), 64):
        documents += tokenize([texts[i] for i in order[start : start + 64]], tokenizer, None)
        if sum(map(len, documents)) >= count * seq_len:
            break
    sequences = pack(documents, seq_len)
    if len(sequences) < count:
        raise DepthpruneError(
            f"'{source}' holds only {len(sequences)} packed sequences of {seq_len} tokens; "
            f"ask for fewer sequences or shorter ones"
        )
    return sequences[:count]


def sequence_losses(model, sequences: Sequence[Sequence[int]], batch_size: int = 4,
                    progress: bool = True) -> tuple[float, int]:
    """Sum of next-token negative log-likelihoods (nats) over equal-length ``sequences``, and the token count.

    Each sequence of T tokens scores T-1 predictions. Sums are kept in float64 so thousands of
    sequences add up without rounding drift.
    """
    import torch
    import torch.nn.functional as F
    from tqdm.auto import tqdm

    if not sequences:
        raise DepthpruneError("no sequences to score")
    device = model.get_input_embeddings().weight.device
    total, count = 0.0, 0
    bar = tqdm(total=len(sequences), unit="seq", desc="loss", disable=not progress)
    for start in range(0, len(sequences), batch_size):
        ids = torch.tensor(sequences[start : start + batch_size], dtype=torch.long, device=device)
        with torch.no_grad():
            logits = model(input_ids=ids, use_cache=False).logits[:, :-1].float()
        targets = ids[:, 1:].to(logits.device)
        total += F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="sum").item()
        count += targets.numel()
        bar.update(len(ids))
    bar.close()
    return total, count
