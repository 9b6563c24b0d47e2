"""The command line: ``depthprune COMMAND ...`` (``python -m depthprune.cli`` works too)."""

from .app import main

__all__ = ["main"]
