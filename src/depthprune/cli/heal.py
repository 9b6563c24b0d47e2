"""``depthprune heal``: fine-tune a pruned model (the shared healing options and each method's own); resumable."""

from __future__ import annotations

import argparse
import os

from ..config import DEVICES, DTYPE_NAMES
from ..heal import HEAL_METHODS, PRESETS, heal_options_class
from ..options import add_options, given_options
from .parser import MODEL_HELP


def add_parser(commands) -> argparse.ArgumentParser:
    p = commands.add_parser("heal", help="fine-tune a pruned model on C4 (" + ", ".join(HEAL_METHODS.names())
                            + ", distillation); resumable")
    p.add_argument("model", help="the pruned checkpoint directory (or any model: " + MODEL_HELP + ")")
    p.add_argument("--data", required=True, help="training text: .jsonl/.json/.txt/.parquet file, directory, or "
                                                 "Hugging Face dataset id (e.g. allenai/c4 --data-config en)")
    p.add_argument("--val-data", help="held-out text scored with the C4-loss evaluator (default: the validation "
                                      "split of a Hugging Face --data)")
    p.add_argument("--out", required=True, help="output directory: checkpoints and log while running, the merged "
                                                "model at the end; rerun the same command to resume")
    p.add_argument("--force", action="store_true", help="replace what --out holds (an older result, other files) "
                                                        "once the new model is complete; meanwhile the run works "
                                                        "in OUT.unfinished")
    p.add_argument("--restart", action="store_true", help="discard an unfinished run in --out (its checkpoint and "
                                                          "log) and start over")
    p.add_argument("--preset", choices=list(PRESETS), help="paper: the paper's recipe (default); cpu-small: a run "
                                                           "that finishes in minutes on a CPU. Options below win.")
    p.add_argument("--method", choices=HEAL_METHODS.names(), help=HEAL_METHODS.help() + " (default: qlora)")
    p.add_argument("--stop-after", type=int, help="stop this invocation after N steps, with a checkpoint")
    p.add_argument("--save-adapter", action="store_true", help="also save the LoRA adapter alone in OUT/adapter")
    p.add_argument("--device", default="cpu", choices=DEVICES,
                   help="cpu, cuda (one GPU per process, also under torchrun) or auto (one process over all GPUs)")
    p.add_argument("--dtype", choices=DTYPE_NAMES,
                   help="weights and compute (default: float32 on CPU, bfloat16 on GPU)")
    p.add_argument("--trust-remote-code", action="store_true", help="allow the model repo's own Python code")
    add_options(p, heal_options_class(), exclude=["method"], title="healing options (--steps or --train-tokens)")
    return p


def run(args) -> None:
    from ..heal import heal

    options = given_options(args, heal_options_class())
    result = heal(args.model, args.data, args.out, val_data=args.val_data, preset=args.preset, device=args.device,
                  dtype=args.dtype, save_adapter=args.save_adapter, force=args.force, restart=args.restart,
                  stop_after=args.stop_after, trust_remote_code=args.trust_remote_code, **options)
    if int(os.environ.get("RANK", "0")) != 0:
        return  # a data-parallel run: rank 0 reports
    if "stopped_at_step" in result:
        print(f"stopped after step {result['stopped_at_step']} of {result['steps']}; rerun the same command to continue")
        return
    if result.get("already_healed"):
        print(f"{args.out} already holds the healed model of this command ({result['method']}, {result['steps']} "
              "steps); pass --force to heal again and replace it")
        return
    fmt = lambda x: "-" if x is None else f"{x:.4f}"  # noqa: E731
    print(f"healed with {result['method']}: {result['steps']} steps, {result['tokens']:,} tokens")
    if result.get("trained"):
        print(f"trained: {result['trained']}")
    print(f"train loss (last steps) {fmt(result['final_train_loss'])}; validation loss "
          f"{fmt(result['val_loss_before'])} -> {fmt(result['val_loss_after'])}")
    print(f"saved the merged model to {args.out}")
