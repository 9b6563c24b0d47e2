"""Evaluation tasks, one module each: C4 validation loss (``c4``)."""

from .c4 import c4_loss, sequence_losses

__all__ = ["c4_loss", "sequence_losses"]
