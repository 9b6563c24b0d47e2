"""Reading a local safetensors checkpoint tensor by tensor, for layer streaming: the headers tell every
tensor's file, dtype, shape and place, so only the tensors (or the rows of one) that are needed are read.
"""

from __future__ import annotations

import json
import re
import struct
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import DepthpruneError
from ..model.load import convert_gguf, resolve_model_source

# safetensors' dtype names, as torch calls them
_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
           "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
           "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}


@dataclass(frozen=True)
class _Entry:
    file: Path
    dtype: str  # safetensors' name, e.g. 'BF16'
    shape: tuple[int, ...]
    start: int  # where its bytes begin in the file

    @property
    def numel(self) -> int:
        return int(torch.Size(self.shape).numel())


def _read_header(path: Path) -> tuple[dict, int]:
    """The JSON header of a safetensors file (a little-endian u64 length, then that many bytes of JSON), and
    where the tensor bytes begin."""
    try:
        with path.open("rb") as f:
            (length,) = struct.unpack("<Q", f.read(8))
            if length > path.stat().st_size - 8:
                raise ValueError("header longer than the file")
            header = json.loads(f.read(length))
        if not isinstance(header, dict):
            raise ValueError("header is not a JSON object")
    except (OSError, struct.error, ValueError) as exc:  # JSON and Unicode errors are ValueErrors
        raise DepthpruneError(f"'{path}' is not a readable safetensors file ({exc})") from None
    header.pop("__metadata__", None)
    return header, 8 + length


class Checkpoint:
    """The tensors of a local safetensors checkpoint (single file or sharded), known from the headers only.

    Whole tensors are read through a memory map that is closed again at once: pages of a mapped file that
    were touched count as resident while it stays open, so a handle kept open would grow to the whole model.
    Rows of a tensor are read with plain reads (:meth:`read_rows`).
    """

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)
        index = self.directory / "model.safetensors.index.json"
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
            files = sorted({self.directory / name for name in weight_map.values()})
        else:
            files = sorted(self.directory.glob("*.safetensors"))
        if not files:
            pickles = sorted(p.name for p in self.directory.glob("*.bin"))
            found = f"only pickle weights ({', '.join(pickles[:2])})" if pickles else "no .safetensors weights"
            raise DepthpruneError(f"model directory '{self.directory}' has {found}: streaming reads safetensors "
                                  "only; re-save it with save_pretrained (safetensors is the default)")
        self.entries: dict[str, _Entry] = {}
        for file in files:
            if not file.is_file():
                raise DepthpruneError(f"'{index}' names '{file.name}', which is missing: is the download complete?")
            header, data_start = _read_header(file)
            for name, info in header.items():
                self.entries[name] = _Entry(file, info["dtype"], tuple(info["shape"]),
                                            data_start + info["data_offsets"][0])

    def __contains__(self, name: str) -> bool:
        return name in self.entries

    def entry(self, name: str) -> _Entry:
        if name not in self.entries:
            raise DepthpruneError(f"checkpoint '{self.directory}' has no tensor '{name}': is it complete, "
                                  "and saved by transformers?")
        return self.entries[name]

    def tensors(self, names: Sequence[str], dtype: torch.dtype, device: torch.device) -> Iterator[tuple[str, torch.Tensor]]:
        """``(name, tensor)`` converted to ``dtype`` on ``device``, one at a time; each file opened once."""
        from safetensors import safe_open

        by_file: dict[Path, list[str]] = {}
        for name in names:
            by_file.setdefault(self.entry(name).file, []).append(name)
        for file, group in by_file.items():
            with safe_open(file, framework="pt") as f:
                for name in group:
                    yield name, f.get_tensor(name).to(device=device, dtype=dtype)

    def read_rows(self, name: str, rows: torch.Tensor, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """Rows ``rows`` (sorted, unique) of a 2-D tensor, reading only those rows' bytes.

        Plain reads, not a memory map: the kernel reads ahead around every page of a mapped file that is
        touched, and for rows spread over a large table (Gemma 3's 262k-token embedding) the pages read
        ahead, which count as the process's resident memory, add up to most of the table.
        """
        entry = self.entry(name)
        if entry.dtype not in _DTYPES:
            raise DepthpruneError(f"tensor '{name}' of '{entry.file}' has dtype {entry.dtype}, which torch cannot read")
        out = torch.empty((len(rows), *entry.shape[1:]), dtype=_DTYPES[entry.dtype])
        buffer = out.view(torch.uint8).numpy().reshape(len(rows), -1)  # the same memory, as bytes per row
        row_bytes = buffer.shape[1]
        # Consecutive ids are read as one run: far fewer calls than one per row.
        breaks = (torch.nonzero(rows[1:] - rows[:-1] != 1).flatten() + 1).tolist()
        with entry.file.open("rb", buffering=0) as f:
            for start, end in zip([0, *breaks], [*breaks, len(rows)], strict=True):
                f.seek(entry.start + int(rows[start]) * row_bytes)
                view = memoryview(buffer[start:end]).cast("B")
                while view:
                    read = f.readinto(view)
                    if not read:
                        raise DepthpruneError(f"'{entry.file}' ends inside tensor '{name}': is it truncated?")
                    view = view[read:]
        return out.to(device=device, dtype=dtype)

    def nbytes(self, names: Sequence[str], dtype: torch.dtype) -> int:
        """Bytes the named tensors take once converted to ``dtype``."""
        return sum(self.entry(n).numel for n in names) * dtype.itemsize

    def layer_groups(self) -> dict[str, list[str]]:
        """Tensor names grouped by decoder layer: the names with a '.<index>.' whose prefix occurs most often."""
        groups: dict[tuple[str, int], list[str]] = {}
        for name in self.entries:
            match = re.match(r"(.*?)\.(\d+)\.", name)
            if match:
                groups.setdefault((match[1], int(match[2])), []).append(name)
        if not groups:
            return {}
        prefixes = [prefix for prefix, _ in groups]
        main = max(set(prefixes), key=prefixes.count)
        return {f"{prefix}.{i}": names for (prefix, i), names in groups.items() if prefix == main}


def local_checkpoint(spec: str) -> Path:
    """The local directory to stream ``spec`` from: a checkpoint directory, a downloaded hub id, or the
    converted safetensors cache of a .gguf file or embedded alias (converted once, as :func:`load_model` does)."""
    source = resolve_model_source(spec)
    if source.kind in ("alias", "gguf"):
        return convert_gguf(source.location)
    if source.kind == "hub":
        from huggingface_hub import snapshot_download

        try:
            return Path(snapshot_download(spec, local_files_only=True))
        except Exception:  # LocalEntryNotFoundError and friends: not (fully) in the local cache
            raise DepthpruneError(f"'{spec}' is not downloaded and streaming reads local files only: run "
                                  f"`hf download {spec}` first, or pass the checkpoint directory") from None
    return Path(source.location)
