"""Text sources, seeded sampling, padding and packing."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from depthprune.data import collate, load_texts, pack
from depthprune.errors import DepthpruneError

DOCS = [f"document number {i}" for i in range(20)]


@pytest.fixture
def sources(tmp_path):
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps({"body": t}) for t in DOCS) + "\n")
    (tmp_path / "d.json").write_text(json.dumps([{"body": t} for t in DOCS]))
    (tmp_path / "d.txt").write_text("\n\n".join(DOCS) + "\n")
    pq.write_table(pa.table({"body": DOCS}), tmp_path / "d.parquet")
    return tmp_path


@pytest.mark.parametrize("name", ["d.jsonl", "d.json", "d.txt", "d.parquet"])
def test_every_file_format(sources, name):
    assert load_texts(str(sources / name), field="body") == DOCS


def test_directory_reads_all_files(sources):
    assert len(load_texts(str(sources), field="body")) == 4 * len(DOCS)


def test_seeded_sample_is_deterministic_and_in_order(sources):
    a = load_texts(str(sources / "d.jsonl"), count=5, seed=7, field="body")
    assert a == load_texts(str(sources / "d.jsonl"), count=5, seed=7, field="body")
    assert a != load_texts(str(sources / "d.jsonl"), count=5, seed=8, field="body")
    assert a == sorted(a, key=DOCS.index) and len(set(a)) == 5


def test_bad_sources(tmp_path, sources):
    with pytest.raises(DepthpruneError, match="no field 'text'"):
        load_texts(str(sources / "d.jsonl"))
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n{oops\n')
    with pytest.raises(DepthpruneError, match="bad.jsonl:2: not valid JSON"):
        load_texts(str(tmp_path / "bad.jsonl"))
    with pytest.raises(DepthpruneError, match="not found"):
        load_texts(str(tmp_path / "missing.jsonl"))


@pytest.mark.parametrize("side", ["left", "right"])
def test_collate_positions_count_real_tokens(side):
    batch = collate([[5, 6, 7], [8]], pad_token_id=0, padding_side=side)
    assert batch.attention_mask.sum(dim=1).tolist() == [3, 1]
    real_positions = [batch.position_ids[i][batch.attention_mask[i].bool()].tolist() for i in range(2)]
    assert real_positions == [[0, 1, 2], [0]]
    expected_row = [8, 0, 0] if side == "right" else [0, 0, 8]
    assert batch.input_ids[1].tolist() == expected_row


def test_pack_cuts_exact_lengths():
    assert pack([[1, 2, 3], [4, 5], [6, 7, 8, 9]], 4) == [[1, 2, 3, 4], [5, 6, 7, 8]]
    assert torch.tensor(pack([list(range(10))], 3)).shape == (3, 3)
