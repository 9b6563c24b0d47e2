"""Models: loading (hub ids, checkpoints, GGUF, embedded aliases), the decoder layout, and surgery (cutting layers)."""
