"""``depthprune.json`` has one reader (model/record.py): every stage refuses a damaged one the same way."""

from __future__ import annotations

import json

import pytest

from depthprune.errors import DepthpruneError
from depthprune.model.record import RECORD_FILE, read_record, write_record

DAMAGED = {"not JSON": ('{"removed_layers": [1, 2', "depthprune.json:1:"),
           "a list": ("[1, 2]", "is damaged: expected a JSON object, found a list"),
           "layers of the wrong type": ('{"removed_layers": "2-3"}', "is damaged: removed_layers is '2-3'")}


def test_a_record_reads_back_as_written_and_an_ordinary_checkpoint_has_none(tmp_path):
    assert read_record(tmp_path) is None
    record = {"source_model": "org/model", "removed_layers": [3, 4], "healing": {"method": "lora"}}
    write_record(tmp_path, record)
    assert read_record(tmp_path) == record
    assert (tmp_path / RECORD_FILE).read_text(encoding="utf-8") == json.dumps(record, indent=2) + "\n"


@pytest.mark.parametrize("case", DAMAGED)
def test_a_damaged_record_is_refused_with_what_to_do(tmp_path, case):
    text, message = DAMAGED[case]
    (tmp_path / RECORD_FILE).write_text(text)
    with pytest.raises(DepthpruneError, match=message):
        read_record(tmp_path)
    if case != "not JSON":  # (a file that is not JSON is named with its line and column)
        with pytest.raises(DepthpruneError, match="delete it or prune the model again"):
            read_record(tmp_path)
        with pytest.raises(DepthpruneError, match="pass --force"):
            read_record(tmp_path, "pass --force")


@pytest.mark.parametrize("case", DAMAGED)
def test_every_stage_reads_the_record_through_the_one_reader(tmp_path, tiny_checkpoint, case):
    import shutil

    from depthprune.gguf.export import Checkpoint
    from depthprune.heal.inputs import model_identity
    from depthprune.heal.outputs import finished_result

    text, message = DAMAGED[case]
    checkpoint = shutil.copytree(tiny_checkpoint, tmp_path / "model")
    (checkpoint / RECORD_FILE).write_text(text)
    for read in (Checkpoint.open, lambda path: model_identity(str(path), "model"), finished_result):
        with pytest.raises(DepthpruneError, match=message):
            read(checkpoint)
