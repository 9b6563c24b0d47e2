"""Measuring: angular distances between layer inputs (in memory and streamed layer by layer) and the cost of a model."""
