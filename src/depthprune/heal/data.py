"""The training data: read and checked before anything is written, then served as a packed, seeded,
resumable stream of ``seq_len``-token sequences."""

from __future__ import annotations

from pathlib import Path

import torch

from ..data import load_texts, tokenize
from ..errors import DepthpruneError


class PackedStream:
    """An endless, seeded stream of ``seq_len``-token sequences packed from whole documents.

    Each epoch visits the documents in a new seeded order. The position (epoch, next document, tokens
    waiting to be packed) is the whole state, so a resumed run continues with exactly the next sequence.
    """

    def __init__(self, documents, tokenizer, seq_len: int, seed: int):
        # documents: a list of texts, or of token-id lists (already tokenized; no tokenizer needed)
        self.documents, self.tokenizer, self.seq_len, self.seed = documents, tokenizer, seq_len, seed
        self.epoch, self.index, self.buffer = 0, 0, []
        self._order = self._epoch_order()
        self._tokenized: dict[int, list[int]] = {}

    def _epoch_order(self) -> list[int]:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        return torch.randperm(len(self.documents), generator=generator).tolist()

    def _document(self, i: int) -> list[int]:
        doc = self.documents[self._order[i]]
        if not isinstance(doc, str):
            return list(doc)
        if i not in self._tokenized:  # tokenize ahead in chunks: much faster than one text at a time
            chunk = range(i, min(i + 64, len(self._order)))
            encoded = tokenize([self.documents[self._order[j]] for j in chunk], self.tokenizer, None)
            if len(encoded) != len(chunk):  # a document tokenized to nothing: fall back to one at a time
                encoded = [(tokenize([self.documents[self._order[j]]], self.tokenizer, None) or [[]])[0]
                           for j in chunk]
            self._tokenized = dict(zip(chunk, encoded, strict=True))
        return self._tokenized[i]

    def take(self, count: int) -> list[list[int]]:
        out = []
        while len(out) < count:
            while len(self.buffer) < self.seq_len:
                if self.index == len(self._order):
                    self.epoch, self.index, self._tokenized = self.epoch + 1, 0, {}
                    self._order = self._epoch_order()
                self.buffer += self._document(self.index)
                self.index += 1
            out.append(self.buffer[: self.seq_len])
            self.buffer = self.buffer[self.seq_len :]
        return out

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "index": self.index, "buffer": list(self.buffer)}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.index, self.buffer = state["epoch"], state["index"], list(state["buffer"])
        self._order, self._tokenized = self._epoch_order(), {}


def training_documents(data, o, needed_tokens: int) -> list:
    """The training documents (texts, or token-id lists), read and checked."""
    if not isinstance(data, str):
        return token_documents(data)
    local = Path(data).expanduser().exists()
    # A streamed hub dataset is read once, as far as the run needs (C4 documents average some hundred
    # tokens, so one document per 64 needed tokens leaves ample margin); a local source is read whole.
    count = None if local else max(1000, needed_tokens // 64)
    return read_texts(data, "training data", count, o.seed, o.text_field, o.data_config, o.data_split)


def token_documents(data) -> list[list[int]]:
    try:
        documents = [[int(t) for t in document] for document in data]
    except (TypeError, ValueError):
        raise DepthpruneError("training data must be a text source (a path or dataset id) or a list of "
                              "token-id lists") from None
    if any(t < 0 for document in documents for t in document):
        raise DepthpruneError("the training data holds negative token ids")
    if not any(documents):
        raise DepthpruneError("the training data holds no tokens")
    return documents


def check_vocabulary(documents: list, vocab: int) -> None:
    if documents and not isinstance(documents[0], str) and max(max(d, default=0) for d in documents) >= vocab:
        raise DepthpruneError(f"the training data holds token ids beyond the model's vocabulary of {vocab}")


def read_texts(source: str, what: str, count: int | None, seed: int, field: str, config: str | None,
               split: str) -> list[str]:
    # data.load_texts raises DepthpruneError for what it recognises; a file that is not text (or a
    # corrupt .json/.parquet) surfaces as the decoder's error, named here.
    try:
        return load_texts(source, count, seed, field, config, split)
    except UnicodeDecodeError:
        raise DepthpruneError(f"{what} '{source}' is not UTF-8 text: give a .jsonl/.json/.txt/.parquet text file") from None
    except ValueError as exc:  # json.JSONDecodeError, pyarrow.ArrowInvalid
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise DepthpruneError(f"{what} '{source}' cannot be read ({reason}): check the file") from None
