"""GGUF files: cutting layers out of one (tensors byte-copied), pruning a GGUF model, exporting checkpoints, llama.cpp runtime."""
