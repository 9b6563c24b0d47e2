"""GPU throughput at a named shape, in one run: depthprune's analysis against a plain forward pass, and LoRA
/ QLoRA training steps at several micro-batch sizes with and without gradient checkpointing.

    python benchmarks/gpu_bench.py                                    # Llama-2-7B shape (vocab 49k), bf16, cuda
    python benchmarks/gpu_bench.py --shape llama3-8b --train 1x4096:ckpt,2x4096:ckpt
    python benchmarks/gpu_bench.py --shape smollm2-135m --layers 2 --seq-len 64 --steps 2 --device cpu  # a test

The model is built in memory with random weights (benchmarks/make_checkpoint.py's shapes: no hub, no
checkpoint on disk), or loaded with ``--model`` (anything ``depthprune.load_model`` takes). The tokens are
random ids: throughput does not depend on which tokens they are.

- analysis: ``depthprune.measure_distances`` (the angular-distance pass of ``depthprune analyze``: the backbone
  without the LM head, each layer's input at the last token kept) over ``--samples`` sequences of
  ``--seq-len`` tokens, ``--batch-size`` at a time; forward: ``model(...)`` over the same batches, logits
  included (what scoring a text costs). Tokens/s each, and their ratio.
- training: peft's LoRA (rank ``--rank``, alpha = rank, on q,k,v,o,gate,up,down), AdamW on the adapters,
  bf16 autocast; QLoRA the same over an NF4 base (bitsandbytes, no double quantization, bf16 compute; only
  where bitsandbytes imports). A step is ``--global-batch`` sequences as micro-batches of the configured
  size (gradient accumulation) and one optimizer step; ``--warmup`` untimed steps, then ``--steps`` timed.

Each row gives tokens/s, the peak GPU memory (torch.cuda.max_memory_allocated over the timed passes or steps,
weights and optimizer state included) and the model-FLOPs utilisation against ``--peak-tflops`` (default 989: the H100/H200 SXM dense
bf16 peak). The FLOP counts are printed with the table.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import logging
import math
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # make_checkpoint, beside this file

import make_checkpoint  # noqa: E402

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
PEAK_TFLOPS = 989.0  # H100/H200 SXM, dense bf16 (the sparse figure is twice this)
DEFAULT_TRAIN = "1:ckpt,4:ckpt,4"
FORMULAS = """\
FLOPs per token, N = the matmul weights (decoder layers N_layers + LM head N_head; embedding lookups are not
matmuls), N_lora = the adapters' parameters, L layers, T tokens per sequence, d_attn = heads x head_dim;
attention as in PaLM (Chowdhery et al. 2022, app. B): 4 L T d_attn forward, no discount for the causal mask:
  analysis             2 N_layers + 4 L T d_attn                   (the backbone; no LM head)
  forward              2 N + 4 L T d_attn
  LoRA/QLoRA training  4 N + 6 N_lora + 12 L T d_attn              model FLOPs (MFU)
                       forward 2N; the backward computes activation gradients through every frozen matmul (2N)
                       but weight gradients only for the adapters (2 N_lora, + 2 N_lora for their inputs); full
                       fine-tuning would be the usual 6 N
  + checkpointing      + 2 N + 2 N_lora + 4 L T d_attn             the recomputed forward: hardware FLOPs
                       (HFU) only; MFU does not count recomputation
MFU = model FLOPs per second / peak; HFU = hardware FLOPs per second / peak."""


class UsageError(Exception):
    """Bad input: one line, exit status 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        raise UsageError(message)


@dataclass(frozen=True)
class TrainConfig:
    micro_batch: int
    seq_len: int
    checkpointing: bool

    @property
    def label(self) -> str:
        return f"{self.micro_batch}x{self.seq_len}" + (":ckpt" if self.checkpointing else "")


def parse_train(text: str, seq_len: int, global_batch: int) -> list[TrainConfig]:
    """'MB[xSEQ][:ckpt],...' (SEQ defaults to --seq-len) -> configs; each MB must divide the global batch."""
    configs = []
    for item in (part.strip() for part in text.split(",")):
        if not item:
            continue
        size, _, flag = item.partition(":")
        if flag not in ("", "ckpt", "nockpt"):
            raise UsageError(f"--train '{item}': the suffix is :ckpt (gradient checkpointing) or nothing")
        mb, _, seq = size.partition("x")
        try:
            micro, length = int(mb), int(seq) if seq else seq_len
        except ValueError:
            raise UsageError(f"--train '{item}': expected MICRO_BATCH[xSEQ_LEN][:ckpt], e.g. 4x2048:ckpt") from None
        if micro < 1 or length < 2:
            raise UsageError(f"--train '{item}': micro-batch at least 1 and sequence length at least 2")
        if global_batch % micro:
            raise UsageError(f"--train '{item}': micro-batch {micro} does not divide --global-batch {global_batch}")
        configs.append(TrainConfig(micro, length, flag == "ckpt"))
    return configs


def matmul_params(config) -> tuple[int, int]:
    """(N_layers, N_head): the weights of every decoder layer's linear maps, and of the LM head."""
    d, heads, kv = config.hidden_size, config.num_attention_heads, config.num_key_value_heads
    head_dim = getattr(config, "head_dim", None) or d // heads
    attention = d * heads * head_dim * 2 + d * kv * head_dim * 2  # q, o; k, v
    mlp = 3 * d * config.intermediate_size  # gate, up, down
    return config.num_hidden_layers * (attention + mlp), config.vocab_size * d


def attention_width(config) -> int:
    return config.num_attention_heads * (getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads)


def flops_per_token(kind: str, config, seq_len: int, n_lora: int = 0, checkpointing: bool = False) -> tuple[float, float]:
    """(model FLOPs, hardware FLOPs) per token for ``kind`` (see FORMULAS)."""
    n_layers, n_head = matmul_params(config)
    n = n_layers + n_head
    attention = 4 * config.num_hidden_layers * seq_len * attention_width(config)  # one forward
    if kind == "analysis":
        model = 2 * n_layers + attention
        return model, model
    if kind == "forward":
        model = 2 * n + attention
        return model, model
    model = 4 * n + 6 * n_lora + 3 * attention
    recompute = (2 * n + 2 * n_lora + attention) if checkpointing else 0
    return model, model + recompute


# ------------------------------------------------------------------------------------------------ the model


def build(args):
    """The model (eval mode) on ``args.device`` in ``args.dtype`` and a description of it."""
    import torch

    if args.model:
        import depthprune

        try:
            model, _ = depthprune.load_model(args.model, device=args.device, dtype=args.dtype)
        except depthprune.DepthpruneError as exc:
            raise UsageError(str(exc)) from None
        return model, f"{args.model} ({model.config.num_hidden_layers} layers)"
    config = make_checkpoint.llama_config(args.shape, args.layers)
    model = make_checkpoint.build_model(config, args.device, args.dtype, args.seed)
    torch.manual_seed(args.seed)
    return model, (f"{args.shape} ({make_checkpoint.SHAPE_HELP[args.shape]}), {config.num_hidden_layers} layers, "
                   "random weights")


def quantize_nf4(model, compute_dtype):
    """Replace every linear layer but the LM head by bitsandbytes' NF4 Linear4bit, in place, one at a time.

    What QLoRA trains on (as transformers' BitsAndBytesConfig(load_in_4bit, nf4, no double quantization)
    loads it), made from the model in memory instead of from a checkpoint on disk: each layer's 16-bit
    weight is freed as soon as its 4-bit copy exists, so the peak stays at the 16-bit model.
    """
    import bitsandbytes as bnb
    import torch

    device = next(model.parameters()).device
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if not isinstance(child, torch.nn.Linear) or name == "lm_head":
                continue
            layer = bnb.nn.Linear4bit(child.in_features, child.out_features, bias=child.bias is not None,
                                      compute_dtype=compute_dtype, compress_statistics=False, quant_type="nf4",
                                      device="meta")
            # Params4bit quantizes when moved to a real device (also when the data already is there).
            layer.weight = bnb.nn.Params4bit(child.weight.data, requires_grad=False, compress_statistics=False,
                                             quant_type="nf4", module=layer).to(device)
            if child.bias is not None:
                layer.bias = torch.nn.Parameter(child.bias.data, requires_grad=False)
            setattr(parent, name, layer)
            del child
    return model


def set_checkpointing(model, on: bool) -> None:
    """Gradient checkpointing of every decoder layer (transformers 5.2x names it activation checkpointing)."""
    if on:
        enable = getattr(model, "activation_checkpointing_enable", None)
        if enable is not None:
            enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:  # reentrant checkpoints would need inputs that require grad; the base is frozen
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    else:
        disable = getattr(model, "activation_checkpointing_disable", None) or model.gradient_checkpointing_disable
        disable()


# ---------------------------------------------------------------------------------------------- measuring


class Meter:
    """Wall time and peak GPU memory of a region (synchronized: CUDA work is asynchronous)."""

    def __init__(self, device: str):
        import torch

        self.torch, self.cuda = torch, device.startswith("cuda")

    def sync(self) -> None:
        if self.cuda:
            self.torch.cuda.synchronize()

    @contextlib.contextmanager
    def measure(self, into: dict):
        self.sync()
        if self.cuda:
            self.torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        yield
        self.sync()
        into["seconds"] = time.perf_counter() - start
        into["peak_gib"] = self.torch.cuda.max_memory_allocated() / 2**30 if self.cuda else None


def free(device: str) -> None:
    import torch

    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()


def random_ids(count: int, seq_len: int, vocab: int, seed: int) -> list[list[int]]:
    import torch

    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (count, seq_len), generator=generator).tolist()


def bench_inference(model, args, meter: Meter) -> list[dict]:
    """The analysis pass and a plain forward pass over the same sequences, batches and attention masks."""
    import torch

    import depthprune

    sequences = random_ids(args.samples, args.seq_len, model.config.vocab_size, args.seed)
    device = next(model.parameters()).device
    tokens = args.samples * args.seq_len

    def analysis(seqs):
        depthprune.measure_distances(model, seqs, batch_size=args.batch_size, progress=False)

    @torch.no_grad()
    def forward(seqs):
        for start in range(0, len(seqs), args.batch_size):
            ids = torch.tensor(seqs[start : start + args.batch_size], device=device)
            positions = torch.arange(ids.shape[1], device=device).expand_as(ids)
            model(input_ids=ids, attention_mask=torch.ones_like(ids), position_ids=positions, use_cache=False)

    rows = []
    for name, run in (("analysis", analysis), ("forward", forward)):
        run(sequences[: args.batch_size])  # warm-up: kernels chosen, allocator grown
        row = {"kind": name, "seq_len": args.seq_len, "tokens": tokens}
        with meter.measure(row):
            run(sequences)
        rows.append(row)
        free(args.device)
    return rows


def bench_training(model, method: str, configs: list[TrainConfig], args, meter: Meter) -> list[dict]:
    """LoRA steps on ``model`` (NF4 for qlora: quantized first), every configuration in turn."""
    import torch
    from peft import LoraConfig, get_peft_model

    device = next(model.parameters()).device
    dtype = getattr(torch, args.dtype)
    if method == "qlora":
        quantize_nf4(model, dtype)
        free(args.device)
    model.config.use_cache = False
    net = get_peft_model(model, LoraConfig(r=args.rank, lora_alpha=args.rank, lora_dropout=args.dropout,
                                           target_modules=TARGETS, bias="none", task_type="CAUSAL_LM"))
    trainable = [p for p in net.parameters() if p.requires_grad]
    n_lora = sum(p.numel() for p in trainable)
    optimizer = torch.optim.AdamW(trainable, lr=1e-4)

    def autocast():  # bf16 compute for the adapters too (peft keeps their weights in float32)
        return torch.autocast(device.type, dtype=dtype) if dtype != torch.float32 else contextlib.nullcontext()

    net.train()
    rows = []
    for config in configs:
        row = {"kind": method, "config": config.label, "micro_batch": config.micro_batch, "seq_len": config.seq_len,
               "accumulation": args.global_batch // config.micro_batch, "checkpointing": config.checkpointing,
               "n_lora": n_lora, "tokens": args.steps * args.global_batch * config.seq_len}
        set_checkpointing(model, config.checkpointing)
        batches = [torch.tensor(ids, device=device) for ids in
                   (random_ids(config.micro_batch, config.seq_len, model.config.vocab_size, args.seed + i)
                    for i in range(2))]

        def step(batches=batches, accumulation=row["accumulation"]):
            for i in range(accumulation):
                ids = batches[i % len(batches)]
                with autocast():
                    loss = net(input_ids=ids, labels=ids).loss / accumulation
                loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            return loss.detach() * accumulation

        try:
            for _ in range(args.warmup):
                step()
            with meter.measure(row):
                for _ in range(args.steps):
                    loss = step()
            row["loss"] = float(loss)  # the last micro-batch's: finite, near log(vocab) for random weights
        except torch.cuda.OutOfMemoryError:
            row.update(seconds=None, peak_gib=None, error="out of memory")
            optimizer.zero_grad(set_to_none=True)
        loss = None
        free(args.device)
        rows.append(row)
    set_checkpointing(model, False)
    return rows


# ---------------------------------------------------------------------------------------------- reporting


def finish_row(row: dict, config, peak_tflops: float) -> dict:
    seconds = row.get("seconds")
    row["tokens_per_s"] = row["tokens"] / seconds if seconds else None
    model_flops, hardware_flops = flops_per_token(row["kind"] if row["kind"] in ("analysis", "forward") else "train",
                                                  config, row["seq_len"],
                                                  row.get("n_lora", 0), row.get("checkpointing", False))
    rate = row["tokens_per_s"]
    row["mfu"] = model_flops * rate / (peak_tflops * 1e12) if rate else None
    row["hfu"] = hardware_flops * rate / (peak_tflops * 1e12) if rate else None
    row["model_tflops_per_s"] = model_flops * rate / 1e12 if rate else None
    return row


def _fmt(value, spec: str, missing: str = "-") -> str:
    return missing if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, spec)


def table(rows: list[dict], args, config, title: str, device_name: str) -> str:
    n_layers, n_head = matmul_params(config)
    lines = [f"gpu_bench: {title}; {args.dtype} on {device_name}",
             f"  N_layers {n_layers / 1e9:.3f}B + N_head {n_head / 1e9:.3f}B matmul weights; peak {args.peak_tflops:g} "
             f"TFLOP/s{' (H100/H200 SXM dense bf16)' if args.peak_tflops == PEAK_TFLOPS else ''}", ""]
    inference = {r["kind"]: r for r in rows if r["kind"] in ("analysis", "forward")}
    if inference:
        lines.append(f"inference: {args.samples} sequences x {args.seq_len} random tokens, batch {args.batch_size}")
        lines.append(f"  {'pass':<34} {'tokens/s':>10} {'peak GiB':>9} {'TFLOP/s':>8} {'MFU':>6}")
        names = {"analysis": "analysis (measure_distances)", "forward": "plain forward (logits included)"}
        for kind in ("analysis", "forward"):
            r = inference[kind]
            lines.append(f"  {names[kind]:<34} {_fmt(r['tokens_per_s'], ',.0f'):>10} {_fmt(r['peak_gib'], '.1f'):>9} "
                         f"{_fmt(r['model_tflops_per_s'], '.1f'):>8} {_fmt(r['mfu'], '.1%'):>6}")
        a, f = inference["analysis"]["tokens_per_s"], inference["forward"]["tokens_per_s"]
        lines += [f"  analysis / forward: {a / f:.2f}x the tokens per second", ""]
    training = [r for r in rows if r["kind"] not in ("analysis", "forward")]
    if training:
        lines.append(f"training: steps of {args.global_batch} sequences (micro-batches x accumulation), LoRA rank "
                     f"{args.rank} on {','.join(t.split('_')[0] for t in TARGETS)}, AdamW, {args.warmup} warm-up + "
                     f"{args.steps} timed steps")
        lines.append(f"  {'method':<7} {'micro x seq':>11} {'accum':>5} {'ckpt':>4} {'tokens/s':>10} {'peak GiB':>9} "
                     f"{'MFU':>6} {'HFU':>6}  note")
        for r in training:
            if r.get("skipped"):
                lines.append(f"  {r['kind']:<7} {'':>11} {'':>5} {'':>4} {'-':>10} {'-':>9} {'-':>6} {'-':>6}  "
                             f"skipped: {r['skipped']}")
                continue
            lines.append(f"  {r['kind']:<7} {r['micro_batch']:>4} x {r['seq_len']:<4} {r['accumulation']:>5} "
                         f"{'on' if r['checkpointing'] else 'off':>4} {_fmt(r['tokens_per_s'], ',.0f'):>10} "
                         f"{_fmt(r['peak_gib'], '.1f'):>9} {_fmt(r['mfu'], '.1%'):>6} {_fmt(r['hfu'], '.1%'):>6}  "
                         f"{r.get('error') or ''}")
        lines.append("")
    lines.append(FORMULAS)
    return "\n".join(lines)


def run(args) -> dict:
    # Bad input fails first, in a second, before torch is imported or anything is built.
    configs = parse_train(args.train, args.seq_len, args.global_batch)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = sorted(set(methods) - {"lora", "qlora"})
    if unknown or not methods:
        raise UsageError(f"--methods {args.methods}: choose from lora, qlora")
    if not args.model:
        make_checkpoint.llama_config(args.shape, args.layers)  # an unknown shape, or --layers 0
    import torch

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError(f"--device {args.device}: torch sees no CUDA GPU (use --device cpu for a small test)")
    if args.device != "cpu" and not re.fullmatch(r"cuda(:\d+)?", args.device):
        raise UsageError(f"unknown device '{args.device}': choose cuda, cuda:N or cpu")
    # bitsandbytes warns at import that an optional CPU kernel (for a repacked 4-bit layout) is missing: noise here.
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
    meter = Meter(args.device)
    device_name = torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu"
    device_name += f" (torch {torch.__version__})"

    model, title = build(args)
    config = model.config
    longest = max([args.seq_len] + [c.seq_len for c in configs])
    limit = getattr(config, "max_position_embeddings", None)
    if limit and longest > limit:
        raise UsageError(f"sequence length {longest} is longer than the model's {limit} positions")
    rows = []
    if not args.no_inference:
        rows += bench_inference(model, args, meter)
    wrapped = False
    for method in methods:
        if method == "qlora":
            try:
                import bitsandbytes  # noqa: F401
            except ImportError as exc:
                rows.append({"kind": "qlora", "skipped": f"bitsandbytes does not import ({exc})"})
                continue
        if wrapped:  # a fresh base: the previous method put adapters into (or quantized) this one
            del model
            free(args.device)
            model, _ = build(args)
        rows += bench_training(model, method, configs, args, meter)
        wrapped = True
    for row in rows:
        if not row.get("skipped"):
            finish_row(row, config, args.peak_tflops)
    return {"title": title, "device": device_name, "dtype": args.dtype, "peak_tflops": args.peak_tflops,
            "shape": args.shape if not args.model else None, "model": args.model, "num_layers": config.num_hidden_layers,
            "matmul_params": dict(zip(("layers", "head"), matmul_params(config), strict=True)),
            "settings": {k: v for k, v in vars(args).items() if k != "json"}, "rows": rows,
            "table": table(rows, args, config, title, device_name)}


def main(argv: list[str] | None = None) -> int:
    shapes = ", ".join(f"{n} ({make_checkpoint.SHAPE_HELP[n]})" for n in make_checkpoint.SHAPES)
    p = _Parser(description="Analysis vs forward, and LoRA/QLoRA training throughput, at a named shape.")
    p.add_argument("--shape", default="llama2-7b", help=f"random-weight shape: {shapes} (default: llama2-7b)")
    p.add_argument("--model", help="instead of --shape: a model depthprune.load_model takes (checkpoint dir, ...)")
    p.add_argument("--layers", type=int, help="decoder layers of --shape (default: the shape's)")
    p.add_argument("--device", default="cuda", help="cuda, cuda:N or cpu (default: cuda)")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--samples", type=int, default=64, help="inference: sequences (default: 64)")
    p.add_argument("--seq-len", type=int, default=2048, help="tokens per sequence (default: 2048)")
    p.add_argument("--batch-size", type=int, default=8, help="inference: sequences per pass (default: 8)")
    p.add_argument("--train", default=DEFAULT_TRAIN,
                   help="training configurations, comma-separated MICRO_BATCH[xSEQ_LEN][:ckpt]; SEQ_LEN defaults to "
                        f"--seq-len, :ckpt turns gradient checkpointing on (default: {DEFAULT_TRAIN})")
    p.add_argument("--global-batch", type=int, default=16, help="sequences per optimizer step (default: 16)")
    p.add_argument("--methods", default="lora,qlora", help="lora, qlora (qlora needs bitsandbytes; default: both)")
    p.add_argument("--rank", type=int, default=64, help="LoRA rank, alpha = rank (default: 64)")
    p.add_argument("--dropout", type=float, default=0.05, help="LoRA dropout (default: 0.05, the healing default)")
    p.add_argument("--steps", type=int, default=3, help="timed optimizer steps per configuration (default: 3)")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps first (default: 1)")
    p.add_argument("--peak-tflops", type=float, default=PEAK_TFLOPS,
                   help=f"the accelerator's peak for MFU (default: {PEAK_TFLOPS:g}, H100/H200 SXM dense bf16)")
    p.add_argument("--no-inference", action="store_true", help="skip the analysis and forward rows")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", help="also write the results to this JSON file")
    try:
        args = p.parse_args(argv)
        for name in ("samples", "seq_len", "batch_size", "global_batch", "rank", "steps"):
            if getattr(args, name) < 1:
                raise UsageError(f"--{name.replace('_', '-')} must be at least 1")
        if args.warmup < 0 or args.peak_tflops <= 0:
            raise UsageError("--warmup must be at least 0 and --peak-tflops above 0")
        result = run(args)
    except (UsageError, make_checkpoint.UsageError) as exc:
        print(f"gpu_bench: error: {exc}", file=sys.stderr)
        return 2
    print(result["table"])
    if args.json:
        Path(args.json).write_text(json.dumps({k: v for k, v in result.items() if k != "table"}, indent=1) + "\n",
                                   encoding="utf-8")
        print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
