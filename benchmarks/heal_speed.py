"""Training throughput of `depthprune heal` against a plain peft + Hugging Face Trainer script.

Same model, LoRA configuration (MLP projections, rank, alpha = rank, dropout), batch, sequence length,
optimizer (AdamW), schedule and packed C4 sequences; both are timed over their optimizer steps only
(model loading and validation excluded), best of ``--repeats`` alternating runs. Prints tokens/s and
the ratio depthprune / Trainer.

    python benchmarks/heal_speed.py /tmp/p30 --data /work/shared/data/c4/train_sample.jsonl
"""

from __future__ import annotations

import argparse
import tempfile
import time

import torch


def depthprune_tokens_per_s(model: str, data: str, args) -> float:
    from depthprune import heal_model

    with tempfile.TemporaryDirectory() as out:
        record = heal_model(model, data, out, force=True, method="lora", steps=args.steps, batch_size=args.batch_size,
                           seq_len=args.seq_len, rank=args.rank, lr=1e-3, warmup=1, eval_every=10**9,
                           save_every=10**9, progress=False)
    return record["tokens"] / record["train_seconds"]


def trainer_tokens_per_s(model: str, data: str, args) -> float:
    from peft import LoraConfig, get_peft_model
    from transformers import (
        AutoModelForCausalLM,
        AutoTokenizer,
        Trainer,
        TrainerCallback,
        TrainingArguments,
        default_data_collator,
    )

    from depthprune.data import load_texts, pack, tokenize

    tokenizer = AutoTokenizer.from_pretrained(model)
    base = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32)
    net = get_peft_model(base, LoraConfig(r=args.rank, lora_alpha=args.rank, lora_dropout=0.05, task_type="CAUSAL_LM",
                                          target_modules=["gate_proj", "up_proj", "down_proj"]))
    needed = args.steps * args.batch_size
    sequences = pack(tokenize(load_texts(data, 200, seed=0), tokenizer, None), args.seq_len)[:needed]
    dataset = [{"input_ids": torch.tensor(s), "labels": torch.tensor(s)} for s in sequences]

    class StepTimer(TrainerCallback):
        seconds = 0.0

        def on_step_begin(self, *a, **k):
            self.start = time.perf_counter()

        def on_step_end(self, *a, **k):
            StepTimer.seconds += time.perf_counter() - self.start

    with tempfile.TemporaryDirectory() as out:
        training = TrainingArguments(output_dir=out, per_device_train_batch_size=args.batch_size, max_steps=args.steps,
                                     learning_rate=1e-3, lr_scheduler_type="cosine", warmup_steps=1,
                                     save_strategy="no", report_to=[], use_cpu=True, logging_steps=1,
                                     dataloader_num_workers=0, disable_tqdm=True, seed=0)
        StepTimer.seconds = 0.0
        Trainer(model=net, args=training, train_dataset=dataset, data_collator=default_data_collator,
                callbacks=[StepTimer()]).train()
    return args.steps * args.batch_size * args.seq_len / StepTimer.seconds


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model", help="checkpoint directory (e.g. a pruned model)")
    p.add_argument("--data", required=True)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--repeats", type=int, default=2)
    args = p.parse_args()
    ours, theirs = [], []
    for _ in range(args.repeats):  # alternate, so a busy machine slows both alike
        ours.append(depthprune_tokens_per_s(args.model, args.data, args))
        theirs.append(trainer_tokens_per_s(args.model, args.data, args))
    best_ours, best_theirs = max(ours), max(theirs)
    print(f"\nLoRA training, {args.model}: batch {args.batch_size} x {args.seq_len} tokens, {args.steps} steps, "
          f"rank {args.rank}, best of {args.repeats}")
    print(f"{'depthprune heal':>20}: {best_ours:10.1f} tokens/s")
    print(f"{'peft + HF Trainer':>20}: {best_theirs:10.1f} tokens/s")
    print(f"{'ratio':>20}: {best_ours / best_theirs:10.2f}x")


if __name__ == "__main__":
    main()
