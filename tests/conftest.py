"""Shared fixtures: where the real data lies, and tiny random models of many architectures."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The project's offline copies of MMLU, BoolQ, C4, ... (``$DEPTHPRUNE_DATA`` or ``../shared/data``)."""
    path = Path(os.environ.get("DEPTHPRUNE_DATA", REPO.parent / "shared" / "data"))
    if not (path / "c4" / "validation.jsonl").is_file():
        pytest.fail(f"real data not found at {path}: set DEPTHPRUNE_DATA to the shared/data directory")
    return path


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


VOCAB = 96


def _tiny_configs() -> dict:
    """Tiny configs of each supported architecture: 6 layers, 32-dim, small enough for milliseconds."""
    import transformers as tf

    common = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=6,
                  num_attention_heads=4, max_position_embeddings=128, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    ids = dict(bos_token_id=1, eos_token_id=2)
    return {
        "llama": tf.LlamaConfig(num_key_value_heads=2, **common),
        "mistral": tf.MistralConfig(num_key_value_heads=2, sliding_window=None, **common),
        "qwen2": tf.Qwen2Config(num_key_value_heads=2, **common),
        "qwen3": tf.Qwen3Config(num_key_value_heads=2, head_dim=8, **common),
        # Sliding windows of 4 tokens, shorter than the test sequences, so layer_types matter.
        "gemma2": tf.Gemma2Config(num_key_value_heads=2, head_dim=8, sliding_window=4, query_pre_attn_scalar=8,
                                  **common),
        "gemma3": tf.Gemma3TextConfig(num_key_value_heads=1, head_dim=8, sliding_window=4, query_pre_attn_scalar=8,
                                      layer_types=["sliding_attention", "sliding_attention", "full_attention"] * 2,
                                      **common),
        "phi3": tf.Phi3Config(num_key_value_heads=2, **common),
        "gpt2": tf.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=6, n_head=4, n_positions=128, **ids),
        "gpt_neox": tf.GPTNeoXConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=6,
                                     num_attention_heads=4, max_position_embeddings=128, **ids),
        "opt": tf.OPTConfig(vocab_size=VOCAB, hidden_size=32, ffn_dim=64, num_hidden_layers=6, num_attention_heads=4,
                            word_embed_proj_dim=32, max_position_embeddings=128, pad_token_id=0, **ids),
    }


ARCHITECTURES = list(_tiny_configs())


def tiny_model(arch: str, attn: str = "eager"):
    """A randomly initialised 6-layer causal LM of ``arch``, in eval mode, float32."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    config = _tiny_configs()[arch]
    config._attn_implementation = attn
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    # Random init puts small weights everywhere; larger ones make layers differ measurably.
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model.eval()


@pytest.fixture(params=ARCHITECTURES)
def arch(request) -> str:
    return request.param


def tiny_tokenizer():
    """A word-level tokenizer over VOCAB ids, built in-process (no download); unknown words map to <unk>."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    words = ["<pad>", "<s>", "</s>", "<unk>"] + [f"w{i}" for i in range(VOCAB - 4)]
    core = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    core.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   pad_token="<pad>")


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    """A saved 6-layer tiny Llama with a tokenizer: a local model directory the CLI can load."""
    path = tmp_path_factory.mktemp("tiny-llama")
    tiny_model("llama").save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_corpus(tmp_path_factory) -> Path:
    """A small .jsonl corpus whose words the tiny tokenizer knows."""
    import json
    import random

    rng = random.Random(0)
    path = tmp_path_factory.mktemp("corpus") / "docs.jsonl"
    lines = [json.dumps({"text": " ".join(f"w{rng.randrange(VOCAB - 4)}" for _ in range(rng.randint(5, 40)))})
             for _ in range(40)]
    path.write_text("\n".join(lines) + "\n")
    return path
