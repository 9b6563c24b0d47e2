"""What several commands' parsers share: the model argument and its options, the calibration-data and
analysis flags (from the stage options of ``depthprune.config``), ``--swa-pattern``, and reading them back.

Nothing heavy is imported here: ``depthprune --help`` builds every parser.
"""

from __future__ import annotations

import argparse
import dataclasses

from ..config import AnalysisOptions, DataOptions, MemoryOptions, ModelOptions
from ..options import add_options, given_options

MODEL_HELP = (
    "Hugging Face id, checkpoint directory, .gguf file, or embedded alias (smollm2-135m, gemma3-270m)"
)


def add_model_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help=MODEL_HELP)
    add_options(p, ModelOptions, title="model")


def model_kwargs(args) -> dict:
    return dataclasses.asdict(ModelOptions(**given_options(args, ModelOptions)))


def add_data_options(p: argparse.ArgumentParser, required: bool) -> None:
    add_options(p, DataOptions, title="calibration data", required=["source"] if required else ())
    add_options(p, AnalysisOptions, title="analysis")
    add_options(p, MemoryOptions, title="memory")


def data_options(args) -> DataOptions | None:
    if args.source is None:
        return None
    return DataOptions(**given_options(args, DataOptions))


def analysis_kwargs(args) -> dict:
    return dataclasses.asdict(AnalysisOptions(**given_options(args, AnalysisOptions)))


def memory_kwargs(args) -> dict:
    return dataclasses.asdict(MemoryOptions(**given_options(args, MemoryOptions)))


def add_swa_pattern(p: argparse.ArgumentParser) -> None:
    """``--swa-pattern`` of the commands that write GGUF files (prune, export)."""
    p.add_argument("--swa-pattern", default="period", choices=["period", "array"],
                   help="GGUF sliding-window models: period refuses a cut that changes a layer's attention type "
                        "under llama.cpp's fixed period; array writes a per-layer pattern (newer llama.cpp only)")
