"""Loads a local ARC JSONL file (the original nested schema) into the schema of allenai/ai2_arc on the hub,
so lm-eval's ARC prompts apply unchanged."""

from __future__ import annotations

import os
from pathlib import Path

import datasets


def load_arc(data_dir: str | None = None, arc_file: str = "ARC-Easy-Test.jsonl", **_metadata) -> datasets.DatasetDict:
    from depthprune.errors import DepthpruneError
    from depthprune.evaluate.tasks.arc_easy import read_arc_jsonl

    root = data_dir or os.environ.get("DEPTHPRUNE_DATA")
    if not root:
        raise DepthpruneError("local ARC tasks need the data directory: pass --lm-eval-data DIR or set DEPTHPRUNE_DATA")
    path = Path(root).expanduser() / "arc" / arc_file
    if not path.is_file():
        raise DepthpruneError(f"'{path}' not found: --lm-eval-data must hold arc/{arc_file}")
    rows = [{k: v for k, v in row.items() if k != "where"} for row in read_arc_jsonl(path)]
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(rows)})
