"""Healing throughput: depthprune's training step against a forward pass and a peft + Hugging Face Trainer step.

For each shape (batch x tokens) and method (lora, full) it builds, in one process: depthprune's training
state through the recipe's own ``setup`` (one per variant: the default, ``loss_chunk=0`` = the loss as it
was computed before, ``bf16_autocast``, ``compile``, ...), the same model under a plain peft + Trainer
script (same LoRA configuration, AdamW, cosine schedule, gradient clipping), and times, step by step and
interleaved (round r: every contender's step r, on the same batch of packed C4 sequences):

- ``forward``: the model's forward pass alone (inference mode, full logits): the unit of arithmetic;
- ``depthprune[VARIANT]``: ``heal.train.train_step`` (data, forward, loss, backward, clipping, AdamW);
- ``peft+Trainer``: the Trainer's own step (``on_step_begin`` .. ``on_step_end``: forward, loss, backward,
  clipping, optimizer; its data loading is not counted). The Trainer runs in a thread that waits for its turn.

Reported per contender: the median over the timed rounds of the wall time and of the process CPU time
(all threads) per step, tokens/s by each, and the ratios step / forward and depthprune / Trainer. On a
shared machine the CPU time is the steadier measure (with one thread it is the work done); the wall
time says what a user waits. ``--profile`` adds a torch.profiler breakdown of one depthprune step.

    OMP_NUM_THREADS=1 python benchmarks/heal_speed.py /tmp/smol-cut30 \\
        --data /work/shared/data/c4/train_sample.jsonl --shapes 4x128,8x512 --methods lora,full --profile
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import tempfile
import threading
import time
from pathlib import Path

import torch

VARIANTS = {  # name -> healing options on top of the run's (options a version does not know are left out)
    "default": {},
    "before": {"loss_chunk": 0},  # the full-logits loss, as before the fused loss
    "bf16": {"bf16_autocast": True},
    "compile": {"compile": True},
    "bf16+compile": {"bf16_autocast": True, "compile": True},
    "cache": {"qlora_cache_dequantized": True},
}


class Batches:
    """Stands in for the recipe's packed stream: hands out the benchmark's batches in order."""

    def __init__(self, batches: list[list[list[int]]]):
        self.batches, self.i = batches, 0

    def take(self, count: int) -> list[list[int]]:
        batch = self.batches[self.i % len(self.batches)]
        self.i += 1
        return batch


def packed_batches(model: str, data: str, batch: int, seq_len: int, count: int) -> list[list[list[int]]]:
    from transformers import AutoTokenizer

    from depthprune.data import load_texts, pack, tokenize

    tokenizer = AutoTokenizer.from_pretrained(model)
    sequences = pack(tokenize(load_texts(data, max(200, count * batch * seq_len // 100), seed=0), tokenizer, None),
                     seq_len)
    if len(sequences) < count * batch:
        raise SystemExit(f"{data} holds only {len(sequences)} sequences of {seq_len} tokens; {count * batch} needed")
    return [sequences[i * batch : (i + 1) * batch] for i in range(count)]


def heal_options(method: str, batch: int, seq_len: int, rank: int, steps: int, extra: dict):
    from depthprune.heal import HealOptions, resolve_options

    known = set(HealOptions.__dataclass_fields__)
    missing = sorted(set(extra) - known)
    if missing:
        raise SystemExit(f"this version has no option(s) {', '.join(missing)}")
    return resolve_options(method=method, steps=steps, batch_size=batch, seq_len=seq_len, rank=rank, lr=1e-3,
                           warmup=1, eval_every=10**9, save_every=10**9, **extra)


class Depthprune:
    """depthprune's recipe, set up as ``heal`` sets it up, stepped by ``heal.train.train_step``."""

    def __init__(self, model: str, method: str, o, batches, work: Path):
        from depthprune.heal import state, train
        from depthprune.heal.distributed import Processes
        from depthprune.heal.methods import HEAL_METHODS

        self.train_step = train.train_step
        self.run = state.Run(o=o, method=HEAL_METHODS.get(method), steps=o.steps, out=work, work=work, val_data=None,
                              processes=Processes(), device="cpu", dtype="float32", stop_after=None)
        self.state = state.setup(self.run, model, None, [[0, 1]], False)
        self.state.stream = Batches(batches)
        self.state.net.train()
        self.losses: list[float] = []
        self.rng = torch.get_rng_state()

    def step(self) -> None:
        # Each variant draws its dropout masks from its own RNG stream, as if it ran alone.
        outside, _ = torch.get_rng_state(), torch.set_rng_state(self.rng)
        self.losses.append(self.train_step(self.run, self.state)["loss"])
        self.rng, _ = torch.get_rng_state(), torch.set_rng_state(outside)


class Forward:
    """The forward pass alone, in inference mode, on the same batches."""

    def __init__(self, net, batches):
        self.net, self.batches, self.i = net, batches, 0

    def step(self) -> None:
        ids = torch.tensor(self.batches[self.i % len(self.batches)])
        self.i += 1
        was_training = self.net.training
        self.net.eval()
        with torch.inference_mode():
            self.net(input_ids=ids, use_cache=False)
        self.net.train(was_training)


class Trainer:
    """peft + transformers.Trainer in a thread; each ``step`` lets it run exactly one optimizer step."""

    def __init__(self, model: str, method: str, batches, rank: int, steps: int, out: str):
        from transformers import (
            AutoModelForCausalLM,
            TrainerCallback,
            TrainingArguments,
            default_data_collator,
        )
        from transformers import Trainer as HFTrainer

        net = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32)
        net.config.use_cache = False
        if method == "lora":
            from peft import LoraConfig, get_peft_model

            net = get_peft_model(net, LoraConfig(r=rank, lora_alpha=rank, lora_dropout=0.05, task_type="CAUSAL_LM",
                                                 target_modules=["gate_proj", "up_proj", "down_proj"]))
        dataset = [{"input_ids": torch.tensor(s), "labels": torch.tensor(s)} for b in batches for s in b]
        self.go, self.done = threading.Semaphore(0), threading.Semaphore(0)
        self.error: BaseException | None = None
        self.closing = False
        outer = self

        class Turns(TrainerCallback):
            def on_step_begin(self, *a, **k):
                outer.go.acquire()

            def on_step_end(self, args, state, control, **k):
                if outer.closing:
                    control.should_training_stop = True
                outer.done.release()

        args = TrainingArguments(output_dir=out, per_device_train_batch_size=len(batches[0]), max_steps=steps,
                                 learning_rate=1e-3, lr_scheduler_type="cosine", warmup_steps=1, save_strategy="no",
                                 report_to=[], use_cpu=True, logging_steps=10**9, dataloader_num_workers=0,
                                 disable_tqdm=True, seed=0, max_grad_norm=1.0)
        self.trainer = HFTrainer(model=net, args=args, train_dataset=dataset, data_collator=default_data_collator,
                                 callbacks=[Turns()])
        # The same batches in the same order as depthprune's.
        self.trainer._get_train_sampler = lambda *a, **k: torch.utils.data.SequentialSampler(dataset)
        self.thread = threading.Thread(target=self._train, daemon=True)
        self.thread.start()

    def _train(self) -> None:
        try:
            self.trainer.train()
        except BaseException as exc:  # handed to the main thread
            self.error = exc
            self.done.release()

    def step(self) -> None:
        self.go.release()
        self.done.acquire()
        if self.error is not None:
            raise self.error

    def close(self) -> None:
        self.closing = True  # one last step, then the Trainer stops
        self.go.release()
        self.thread.join()


def measure(contenders: dict, rounds: int, warmup: int) -> dict[str, list[tuple[float, float]]]:
    """(wall, CPU) seconds of each contender's step in each timed round; the order rotates every round."""
    times: dict[str, list[tuple[float, float]]] = {name: [] for name in contenders}
    names = list(contenders)
    for r in range(warmup + rounds):
        order = names[r % len(names):] + names[: r % len(names)]
        for name in order:
            wall, cpu = time.perf_counter(), time.process_time()
            contenders[name].step()
            wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
            if r >= warmup:
                times[name].append((wall, cpu))
            print(f"  round {r}{' (warm-up)' if r < warmup else ''} {name}: wall {wall:.2f} s, cpu {cpu:.2f} s",
                  flush=True)
    return times


def report(title: str, times: dict, tokens: int) -> list[str]:
    median = {name: (statistics.median(w for w, _ in t), statistics.median(c for _, c in t)) for name, t in times.items()}
    fwd, trainer = median.get("forward"), median.get("peft+Trainer")
    lines = [f"\n{title}", "| step | wall s | CPU s | tokens/s (wall) | tokens/s (CPU) | × forward (wall, CPU) | "
             "vs Trainer tokens/s (wall, CPU) |", "|---|---:|---:|---:|---:|---:|---:|"]
    for name, (wall, cpu) in median.items():
        vs_fwd = f"{wall / fwd[0]:.2f}, {cpu / fwd[1]:.2f}" if fwd and name != "forward" else ""
        vs_tr = f"{trainer[0] / wall:.2f}×, {trainer[1] / cpu:.2f}×" if trainer and name.startswith("depthprune") else ""
        lines.append(f"| {name} | {wall:.2f} | {cpu:.2f} | {tokens / wall:.0f} | {tokens / cpu:.0f} | {vs_fwd} | {vs_tr} |")
    return lines


# --------------------------------------------------------------------------------------------- profile

CATEGORIES = ("matmuls (backbone, forward + backward)", "vocabulary projection + loss (fused, with its gradients)",
              "attention (SDPA, forward + backward)", "LoRA dropout (bernoulli)", "elementwise, norms, RoPE, copies",
              "optimizer (AdamW + clipping)", "data (batch to tensor)", "Python and framework overhead")


def profile_step(dp: Depthprune) -> list[str]:
    """One depthprune step under torch.profiler, its CPU time split into CATEGORIES."""
    from torch.profiler import ProfilerActivity, profile, record_function

    from depthprune.heal import loss as loss_module

    real_losses, real_take = loss_module.linear_losses, dp.state.stream.take
    real_clip = torch.nn.utils.clip_grad_norm_

    def labelled(label, fn):
        def wrapper(*args, **kwargs):
            with record_function(label):
                return fn(*args, **kwargs)
        return wrapper

    loss_module.linear_losses = labelled("heal:loss", real_losses)
    dp.state.stream.take = labelled("heal:data", real_take)
    torch.nn.utils.clip_grad_norm_ = labelled("heal:optimizer", real_clip)
    try:
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            cpu, wall = time.process_time(), time.perf_counter()
            dp.step()
            cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    finally:
        loss_module.linear_losses, dp.state.stream.take = real_losses, real_take
        torch.nn.utils.clip_grad_norm_ = real_clip
    seconds = dict.fromkeys(CATEGORIES, 0.0)
    for event in prof.events():
        ancestors, parent = [], event
        while parent is not None:
            ancestors.append(parent.name)
            parent = parent.cpu_parent
        if event.name.startswith(("heal:", "Optimizer.", "autograd::engine", "torch::autograd")):
            continue  # ranges: their ops are counted
        own = event.self_cpu_time_total / 1e6
        if any(a == "heal:loss" for a in ancestors):
            seconds[CATEGORIES[1]] += own
        elif any(a.startswith(("Optimizer.", "heal:optimizer")) for a in ancestors):
            seconds[CATEGORIES[5]] += own
        elif any(a == "heal:data" for a in ancestors):
            seconds[CATEGORIES[6]] += own
        elif event.name in ("aten::mm", "aten::addmm", "aten::bmm", "aten::_weight_int4pack_mm") or "gemm" in event.name:
            seconds[CATEGORIES[0]] += own
        elif "scaled_dot_product" in event.name or "attention" in event.name:
            seconds[CATEGORIES[2]] += own
        elif event.name in ("aten::bernoulli_", "aten::bernoulli"):
            seconds[CATEGORIES[3]] += own
        else:
            seconds[CATEGORIES[4]] += own
    counted = sum(seconds.values())
    scale = cpu / max(counted, 1e-9)
    lines = [f"profile of one depthprune step: wall {wall:.2f} s, CPU {cpu:.2f} s; the ops' self times add up to "
             f"{counted:.2f} s", "| where | CPU s | share |", "|---|---:|---:|"]
    if scale > 1:  # ops account for less than the CPU time: the rest is Python and framework code
        seconds[CATEGORIES[7]] = cpu - counted
        scale = 1.0
    else:  # the profiler's own cost inflates the ops' times: scale them to the step's CPU time
        lines[0] += " (scaled to the step's CPU time; the Python overhead is below what the profiler resolves)"
    for name, s in seconds.items():
        lines.append(f"| {name} | {s * scale:.2f} | {100 * s * scale / cpu:.0f} % |")
    return lines


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model", help="checkpoint directory (e.g. a pruned model)")
    p.add_argument("--data", required=True)
    p.add_argument("--shapes", default="4x128,8x512", help="comma-separated BATCHxTOKENS")
    p.add_argument("--methods", default="lora,full")
    p.add_argument("--variants", default="default,before", help=f"depthprune variants: {', '.join(VARIANTS)}")
    p.add_argument("--steps", type=int, default=3, help="timed rounds")
    p.add_argument("--warmup", type=int, default=1, help="untimed rounds first (compile variants: more)")
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    p.add_argument("--no-trainer", action="store_true")
    p.add_argument("--profile", action="store_true", help="torch.profiler breakdown of one default step")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    out: list[str] = []
    for shape in args.shapes.split(","):
        batch, seq_len = (int(x) for x in shape.lower().split("x"))
        batches = packed_batches(args.model, args.data, batch, seq_len, args.warmup + args.steps)
        for method in args.methods.split(","):
            print(f"\n{method}, batch {batch} x {seq_len}", flush=True)
            rounds = args.warmup + args.steps
            with tempfile.TemporaryDirectory() as work, contextlib.ExitStack() as stack:
                contenders: dict = {}
                dps = {}
                for variant in args.variants.split(","):
                    o = heal_options(method, batch, seq_len, args.rank, rounds + 2, VARIANTS[variant])
                    dps[variant] = Depthprune(args.model, method, o, batches, Path(work) / variant)
                contenders["forward"] = Forward(next(iter(dps.values())).state.net, batches)
                contenders.update({f"depthprune[{v}]": dp for v, dp in dps.items()})
                if not args.no_trainer and method in ("lora", "full"):  # the Trainer script knows these two
                    trainer = Trainer(args.model, method, batches, args.rank, rounds + 2, str(Path(work) / "trainer"))
                    stack.callback(trainer.close)
                    contenders["peft+Trainer"] = trainer
                times = measure(contenders, args.steps, args.warmup)
                tokens = batch * seq_len
                lines = report(f"{method}, {Path(args.model).name}, batch {batch} x {seq_len} ({tokens} tokens/step), "
                               f"{torch.get_num_threads()} thread(s), median of {args.steps} interleaved rounds",
                               times, tokens)
                for v, dp in dps.items():
                    lines.append(f"losses depthprune[{v}]: " + ", ".join(f"{x:.5f}" for x in dp.losses))
                if args.profile:
                    lines += profile_step(next(iter(dps.values())))
                print("\n".join(lines), flush=True)
                out += lines
    print("\n" + "\n".join(out))


if __name__ == "__main__":
    main()
