"""Last-layers healing: only the last K decoder layers, the final norm and the LM head change (and the tied input
embedding with them, which the record says); ``--train-layers`` is a flag of ``heal`` and a sweep's heal option; a
K the model has not is one line with nothing written; a killed and resumed run ends as an uninterrupted one, also
over two data-parallel (DDP) or sharded (FSDP) processes."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from badinput import assert_clean_failure
from conftest import tiny_model, tiny_tokenizer
from safetensors.torch import load_file

from depthprune import DepthpruneError
from depthprune import heal_model as heal
from depthprune.cli.app import build_parser, main
from depthprune.sweep.settings import resolve_config

SRC = Path(__file__).resolve().parents[1] / "src"
SMALL = dict(method="last-layers", batch_size=2, seq_len=16, lr=1e-2, warmup=1, progress=False)


@pytest.fixture(scope="module")
def tied_checkpoint(tmp_path_factory) -> Path:
    """A saved 6-layer tiny GPT-2, whose LM head is its input embedding (``transformer.wte``); without dropout,
    so two processes (each drawing its own dropout masks) compute what one does."""
    path = tmp_path_factory.mktemp("tiny-gpt2")
    model = tiny_model("gpt2")
    assert model.lm_head.weight is model.transformer.wte.weight
    model.config.update(dict(resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0))
    model.save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return path


def _changed(before: Path, after: Path) -> set[str]:
    a, b = load_file(str(before / "model.safetensors")), load_file(str(after / "model.safetensors"))
    assert {n: t.shape for n, t in a.items()} == {n: t.shape for n, t in b.items()}  # the plain cut's layout
    return {n for n in a if not torch.equal(a[n], b[n])}


def test_only_the_last_layers_the_norm_and_the_head_change(tiny_checkpoint, tiny_corpus, tmp_path):
    out = tmp_path / "out"
    record = heal(str(tiny_checkpoint), str(tiny_corpus), out, steps=2, train_layers=2, **SMALL)
    names = load_file(str(tiny_checkpoint / "model.safetensors"))
    expected = {n for n in names if n.startswith(("model.layers.4.", "model.layers.5."))}
    assert _changed(tiny_checkpoint, out) == expected | {"model.norm.weight", "lm_head.weight"}
    assert record["trained"] == "decoder layers 4-5 (the last 2 of 6), the final norm, lm_head"
    assert json.loads((out / "depthprune.json").read_text())["healing"]["trained"] == record["trained"]


def test_a_tied_head_trains_the_input_embedding_too_and_says_so(tied_checkpoint, tiny_corpus, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["heal", str(tied_checkpoint), "--data", str(tiny_corpus), "--out", str(out), "--method",
                 "last-layers", "--train-layers", "1", "--steps", "2", "--batch-size", "2", "--seq-len", "16",
                 "--lr", "1e-2", "--warmup", "1"]) == 0
    trained = "decoder layer 5 (the last 1 of 6), the final norm, lm_head (tied to the input embeddings: both change)"
    assert f"trained: {trained}" in capsys.readouterr().out
    assert json.loads((out / "depthprune.json").read_text())["healing"]["trained"] == trained
    names = load_file(str(tied_checkpoint / "model.safetensors"))
    assert _changed(tied_checkpoint, out) == {n for n in names if n.startswith(("transformer.h.5.", "transformer.ln_f."))
                                              } | {"transformer.wte.weight"}


def test_train_layers_is_a_heal_flag_and_a_sweep_heal_option():
    commands = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)).choices
    assert "--train-layers" in commands["heal"].format_help()
    args = build_parser().parse_args(["sweep", "m", "--heal", "last-layers", "--heal-option", "train_layers=2"])
    assert args.heal_option == [("train_layers", "2")]
    config = resolve_config(data="x", heal="none,last-layers", heal_data="x", heal_options={"train_layers": "2"})
    assert config.heal_options == {"train_layers": 2}
    with pytest.raises(DepthpruneError, match="train-layers must be at least 1"):
        resolve_config(data="x", heal="last-layers", heal_data="x", heal_options={"train_layers": "0"})


def test_more_layers_than_the_model_has_is_one_line_and_nothing_written(capsys, tmp_path, tiny_checkpoint,
                                                                       tiny_corpus):
    argv = ["heal", str(tiny_checkpoint), "--data", str(tiny_corpus), "--out", str(tmp_path / "new" / "out"),
            "--method", "last-layers", "--train-layers", "7", "--steps", "1"]
    assert_clean_failure(capsys, argv, "--train-layers 7 is more than the 6 decoder layers of the model: choose "
                                       "at most 6", watch=[tiny_checkpoint, tiny_corpus, tmp_path])
    assert_clean_failure(capsys, [*argv[:-3], "0", "--steps", "1"], "--train-layers must be at least 1",
                         watch=[tiny_checkpoint, tiny_corpus, tmp_path])


@pytest.mark.parametrize("checkpoint", ["tiny_checkpoint", "tied_checkpoint"])
def test_killed_and_resumed_equals_uninterrupted(request, checkpoint, tiny_corpus, tmp_path, monkeypatch):
    import depthprune.heal.train as loop

    model = str(request.getfixturevalue(checkpoint))
    options = dict(SMALL, steps=5, save_every=2)
    heal(model, str(tiny_corpus), tmp_path / "straight", **options)
    resumed = tmp_path / "resumed"
    assert heal(model, str(tiny_corpus), resumed, stop_after=1, **options) == {"stopped_at_step": 1, "steps": 5}
    real_loss, calls = loop.compute_loss, []

    def dying_loss(*args, **kwargs):  # steps 2 and 3 pass (a checkpoint at 2), step 4 dies
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real_loss(*args, **kwargs)

    monkeypatch.setattr(loop, "compute_loss", dying_loss)
    with pytest.raises(KeyboardInterrupt):
        heal(model, str(tiny_corpus), resumed, **options)
    monkeypatch.setattr(loop, "compute_loss", real_loss)
    assert json.loads((resumed / "checkpoint" / "state.json").read_text())["progress"]["step"] == 2
    heal(model, str(tiny_corpus), resumed, **options)
    assert _changed(tmp_path / "straight", resumed) == set()
    log = lambda out: [json.loads(line)["loss"] for line in (out / "heal_log.jsonl").read_text().splitlines()]  # noqa: E731
    assert log(resumed) == log(tmp_path / "straight")


@pytest.mark.parametrize("sharding", ["ddp", "fsdp"])
def test_two_processes_match_one(tied_checkpoint, tiny_corpus, tmp_path, sharding):
    # Global batch 4: one process with 2 micro-batches of 2, or two processes with 1 of 2 each; the FSDP run
    # stops after 2 steps and resumes from the checkpoint gathered from its shards.
    common = [str(tied_checkpoint), "--data", str(tiny_corpus), "--method", "last-layers", "--train-layers", "2",
              "--steps", "4", "--batch-size", "4", "--seq-len", "16", "--lr", "1e-2", "--warmup", "1",
              "--save-every", "1"]
    env = {**os.environ, "PYTHONPATH": str(SRC), "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, "-m", "depthprune.cli", "heal", *common, "--grad-accum", "2",
                    "--out", str(tmp_path / "one")], check=True, env=env, capture_output=True, timeout=300)
    two = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "depthprune.cli", "heal", *common, "--out", str(tmp_path / "two"),
           *(["--fsdp"] if sharding == "fsdp" else [])]
    for stop in (["--stop-after", "2"] if sharding == "fsdp" else []), []:
        done = subprocess.run([*two, *stop], env=env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
    records = [json.loads((tmp_path / o / "depthprune.json").read_text())["healing"] for o in ("one", "two")]
    assert records[1]["processes"] == 2 and records[0]["trained"] == records[1]["trained"]
    a, b = (load_file(str(tmp_path / o / "model.safetensors")) for o in ("one", "two"))
    assert a.keys() == b.keys()
    torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5)
