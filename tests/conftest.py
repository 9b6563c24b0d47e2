"""Shared fixtures: where the real data lies, and tiny random models of many architectures."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The project's offline copies of MMLU, BoolQ, C4, ... (``$DEPTHPRUNE_DATA`` or ``../shared/data``)."""
    path = Path(os.environ.get("DEPTHPRUNE_DATA", REPO.parent / "shared" / "data"))
    if not (path / "c4" / "validation.jsonl").is_file():
        pytest.fail(f"real data not found at {path}: set DEPTHPRUNE_DATA to the shared/data directory")
    return path


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
