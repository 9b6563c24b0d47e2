"""Loads a local ARC JSONL file (the original nested schema) into the schema of allenai/ai2_arc on the hub,
so lm-eval's ARC prompts apply unchanged."""

from __future__ import annotations

import json
import os
from pathlib import Path

import datasets


def load_arc(data_dir: str | None = None, arc_file: str = "ARC-Easy-Test.jsonl", **_metadata) -> datasets.DatasetDict:
    from depthprune.errors import DepthpruneError

    root = data_dir or os.environ.get("DEPTHPRUNE_DATA")
    if not root:
        raise DepthpruneError("local ARC tasks need the data directory: pass --lm-eval-data DIR or set DEPTHPRUNE_DATA")
    path = Path(root).expanduser() / "arc" / arc_file
    if not path.is_file():
        raise DepthpruneError(f"'{path}' not found: --lm-eval-data must hold arc/{arc_file}")
    rows = []
    with path.open(encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                choices = record["question"]["choices"]
                rows.append({
                    "id": record["id"],
                    "question": record["question"]["stem"],
                    "choices": {"text": [c["text"] for c in choices], "label": [c["label"] for c in choices]},
                    "answerKey": record["answerKey"],
                })
            except (json.JSONDecodeError, KeyError, TypeError) as exc:
                raise DepthpruneError(f"{path}:{number}: not an ARC record ({type(exc).__name__}: {exc})") from None
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(rows)})
