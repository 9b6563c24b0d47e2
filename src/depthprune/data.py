"""Text sources, deterministic sampling, tokenizing and padded batching.

A source is a local file (.jsonl, .json, .txt, .parquet), a directory of such files, or a Hugging Face
dataset id (streamed, so a huge corpus such as C4 is never downloaded whole).
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import DepthpruneError

TEXT_SUFFIXES = (".jsonl", ".json", ".txt", ".parquet")


def check_int(value, option: str, minimum: int | None = None) -> None:
    """Refuse an option that is not a whole number (of at least ``minimum``), from the CLI or the Python API."""
    if not isinstance(value, int) or isinstance(value, bool):
        raise DepthpruneError(f"{option} must be a whole number, got {value!r}")
    if minimum is not None and value < minimum:
        raise DepthpruneError(f"{option} must be at least {minimum}, got {value}")


def read_bytes(path: Path) -> bytes:
    """The bytes of ``path``; an unreadable file is an error naming it."""
    try:
        return path.read_bytes()
    except OSError as exc:
        raise DepthpruneError(f"cannot read '{path}': {exc.strerror or exc}") from None


def _decode(data: bytes, path: Path, line_offset: int = 0) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = line_offset + data[: exc.start].count(b"\n") + 1
        raise DepthpruneError(f"{path}:{line}: not UTF-8 text (byte 0x{data[exc.start]:02x}): is it a binary "
                              "file? Save it as UTF-8 text") from None


def read_text(path: Path) -> str:
    """The UTF-8 text of ``path``; a binary or otherwise non-UTF-8 file is an error naming file and line."""
    return _decode(read_bytes(path), path)


def _json_error(path: Path, exc: json.JSONDecodeError) -> DepthpruneError:
    # A truncated file (an interrupted copy, a full disk) fails at its end or in an unclosed string: say so.
    ends_early = exc.pos >= len(exc.doc.rstrip()) or exc.msg.startswith("Unterminated string")
    hint = "; the file ends early: is it truncated?" if ends_early else ""
    return DepthpruneError(f"{path}:{exc.lineno}:{exc.colno}: not valid JSON ({exc.msg}){hint}")


def read_json(path: Path) -> object:
    """The JSON document in ``path``; an error names the file, line and column of the problem."""
    text = read_text(path)
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise _json_error(path, exc) from None


def read_jsonl(path: Path) -> Iterator[tuple[int, object]]:
    """``(line number, record)`` for each non-empty line; a line that is not JSON is an error naming it."""
    try:
        f = path.open("rb")  # decoded line by line, so an error names the line
    except OSError as exc:
        raise DepthpruneError(f"cannot read '{path}': {exc.strerror or exc}") from None
    with f:
        for number, raw in enumerate(f, 1):
            line = _decode(raw, path, number - 1)
            if line.strip():
                try:
                    yield number, json.loads(line)
                except json.JSONDecodeError as exc:
                    raise DepthpruneError(f"{path}:{number}: not valid JSON ({exc.msg})") from None


def _read_parquet(path: Path, field: str) -> list[str]:
    import pyarrow
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except (pyarrow.ArrowException, OSError) as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise DepthpruneError(f"'{path}' is not a readable parquet file ({reason})") from None
    if field not in table.column_names:
        raise DepthpruneError(f"{path}: no column '{field}' (columns: {', '.join(table.column_names)}); use --text-field")
    return [t for t in table.column(field).to_pylist() if isinstance(t, str)]


def _read_file(path: Path, field: str) -> list[str]:
    suffix = path.suffix.lower()
    if suffix == ".txt":
        # One document per non-empty line, as in WikiText-style dumps.
        return [line.strip() for line in read_text(path).splitlines() if line.strip()]
    if suffix == ".parquet":
        return _read_parquet(path, field)
    if suffix == ".json":
        rows = read_json(path)
        if not isinstance(rows, list):
            raise DepthpruneError(f"{path}: expected a JSON list of records")
    else:
        rows = [row for _, row in read_jsonl(path)]
    texts = []
    for number, row in enumerate(rows, 1):
        if not isinstance(row, dict) or field not in row:
            raise DepthpruneError(f"{path}: record {number} has no field '{field}'; use --text-field to name it")
        if isinstance(row[field], str):
            texts.append(row[field])
    return texts


def _local_texts(path: Path, field: str) -> list[str]:
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in TEXT_SUFFIXES)
        if not files:
            raise DepthpruneError(f"data directory '{path}' holds no {'/'.join(TEXT_SUFFIXES)} files")
    else:
        if path.suffix.lower() not in TEXT_SUFFIXES:
            raise DepthpruneError(f"data file '{path}' must end in one of {', '.join(TEXT_SUFFIXES)}")
        files = [path]
    return [t for f in files for t in _read_file(f, field)]


def _hub_texts(dataset_id: str, config: str | None, split: str, field: str, count: int | None, seed: int) -> list[str]:
    import datasets

    try:
        stream = datasets.load_dataset(dataset_id, config, split=split, streaming=True)
    except Exception as exc:
        raise DepthpruneError(f"could not open dataset '{dataset_id}' (config {config}, split {split}): {exc}") from None
    # A shuffle buffer gives a seeded sample without reading the whole (possibly huge) split.
    stream = stream.shuffle(seed=seed, buffer_size=10_000)
    texts = []
    for row in stream:
        if field not in row:
            raise DepthpruneError(f"dataset '{dataset_id}' has no field '{field}'; use --text-field")
        if isinstance(row[field], str) and row[field].strip():
            texts.append(row[field])
        if count is not None and len(texts) >= count:
            break
    return texts


def load_texts(
    source: str,
    count: int | None = None,
    seed: int = 0,
    field: str = "text",
    config: str | None = None,
    split: str = "train",
) -> list[str]:
    """Return ``count`` non-empty documents from ``source`` (all if None), chosen deterministically by ``seed``.

    ``config`` and ``split`` apply to Hugging Face dataset ids only. Local documents are sampled without
    replacement and returned in file order, so the same seed always gives the same texts.
    """
    if count is not None:
        check_int(count, "the number of documents", 1)
    path = Path(source).expanduser()
    if path.exists():
        texts = [t for t in _local_texts(path, field) if t.strip()]
        if count is not None and count < len(texts):
            keep = sorted(random.Random(seed).sample(range(len(texts)), count))
            texts = [texts[i] for i in keep]
    elif source.startswith((".", "/", "~")) or path.suffix.lower() in TEXT_SUFFIXES:
        raise DepthpruneError(f"data source '{source}' not found: give a file, a directory or a Hugging Face dataset id")
    else:
        texts = _hub_texts(source, config, split, field, count, seed)
    if not texts:
        raise DepthpruneError(f"data source '{source}' holds no non-empty '{field}' texts")
    return texts


def tokenize(texts: Sequence[str], tokenizer, max_length: int | None) -> list[list[int]]:
    """Token ids of each text, with the tokenizer's special tokens (e.g. BOS), truncated to ``max_length``
    (None: whole documents, e.g. for :func:`pack`)."""
    if max_length is not None and max_length < 2:
        raise DepthpruneError(f"sequence length must be at least 2 tokens, got {max_length}")
    truncate = {"truncation": True, "max_length": max_length} if max_length is not None else {}
    encoded = tokenizer(list(texts), add_special_tokens=True, **truncate)["input_ids"]
    return [ids for ids in encoded if ids]


def pack(sequences: Sequence[Sequence[int]], seq_len: int) -> list[list[int]]:
    """Concatenate tokenized documents (each keeps its own BOS/EOS) and cut into ``seq_len``-token pieces.

    The incomplete tail is dropped, so every piece is exactly ``seq_len`` tokens and no padding is needed.
    """
    stream = [token for seq in sequences for token in seq]
    return [stream[i : i + seq_len] for i in range(0, len(stream) - seq_len + 1, seq_len)]


def pad_id(tokenizer) -> int:
    """A token id to pad with; its value never matters because padded positions are masked out."""
    for candidate in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if candidate is not None:
            return int(candidate)
    return 0


@dataclass
class Batch:
    input_ids: torch.Tensor  # (B, T)
    attention_mask: torch.Tensor  # (B, T), 1 on real tokens
    position_ids: torch.Tensor  # (B, T), 0.. on real tokens whatever the padding side

    def to(self, device) -> Batch:
        return Batch(self.input_ids.to(device), self.attention_mask.to(device), self.position_ids.to(device))


def collate(sequences: Sequence[Sequence[int]], pad_token_id: int, padding_side: str = "right") -> Batch:
    """Pad token lists to one (B, T) batch.

    Position ids count real tokens only, so a left-padded sequence gets the same positions as it would
    alone: models with absolute position embeddings (GPT-2, OPT) then give the same hidden states.
    """
    if padding_side not in ("left", "right"):
        raise ValueError(f"padding_side must be 'left' or 'right', not {padding_side!r}")
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, seq in enumerate(sequences):
        span = slice(width - len(seq), width) if padding_side == "left" else slice(0, len(seq))
        ids[row, span] = torch.tensor(seq, dtype=torch.long)
        mask[row, span] = 1
    positions = (mask.cumsum(dim=1) - 1).clamp(min=0)
    return Batch(ids, mask, positions)


def batches(
    sequences: Sequence[Sequence[int]], batch_size: int, pad_token_id: int, padding_side: str = "right"
) -> Iterator[Batch]:
    """Padded batches of ``batch_size`` sequences, in the given order."""
    if batch_size < 1:
        raise DepthpruneError(f"batch size must be at least 1, got {batch_size}")
    for start in range(0, len(sequences), batch_size):
        yield collate(sequences[start : start + batch_size], pad_token_id, padding_side)
