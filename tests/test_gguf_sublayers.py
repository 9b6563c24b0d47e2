"""Attention and MLP sub-layers cut out of a Llama GGUF file (``depthprune.gguf.sublayers``), run in llama.cpp.

The fast tests export conftest's tiny Llama (matrices rounded to float16, so the file holds exactly the
model's weights) and check what the cut writes and computes in llama.cpp: exactly the source file with the
removed sub-layers' output projections zeroed, and, within float16 noise, the transformers model with those
sub-layers' outputs switched off by forward hooks; ``prune --granularity attention --format gguf`` writes the same
file and refuses what it cannot write. The slow test does the same on the embedded SmolLM2.
"""

from __future__ import annotations

import json
import re
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import VOCAB, tiny_model

from depthprune.errors import DepthpruneError
from depthprune.gguf.export import export_gguf
from depthprune.gguf.sublayers import check_sublayer_source, cut_sublayers_gguf
from depthprune.gguf.surgery import field_value, open_gguf

TINY_LAYERS, TINY_KV_HEADS, TINY_HEAD_DIM = 6, 2, 8
_BLOCK_TENSOR = re.compile(r"^blk\.(\d+)\.(\w+)\.weight$")


def _llama_cpp():
    return pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed "
                               "(pip install 'depthprune[gguf-runtime]'): llama.cpp checks skipped")


def _write_tokenizer_gguf(path: Path) -> Path:
    """A GGUF holding only a sentencepiece-style vocabulary of VOCAB tokens, which llama.cpp loads."""
    from gguf import GGUFWriter, TokenType

    writer = GGUFWriter(path, "llama")
    writer.add_tokenizer_model("llama")
    writer.add_token_list(["<pad>", "<s>", "</s>", "<unk>"] + [f"w{i}" for i in range(VOCAB - 4)])
    writer.add_token_scores([0.0] * VOCAB)
    writer.add_token_types([TokenType.CONTROL] * 3 + [TokenType.UNKNOWN] + [TokenType.NORMAL] * (VOCAB - 4))
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict:
    """conftest's 6-layer tiny Llama with float16-exact matrices, exported to an F16 GGUF llama.cpp runs."""
    directory = tmp_path_factory.mktemp("tiny-sublayers")
    model = tiny_model("llama")
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.ndim == 2:  # the exporter stores matrices in float16, vectors in float32
                parameter.copy_(parameter.half().float())
    model.save_pretrained(directory / "checkpoint")
    tokenizer = _write_tokenizer_gguf(directory / "tokenizer.gguf")
    source = export_gguf(directory / "checkpoint", directory / "tiny.gguf", "f16", tokenizer=tokenizer)
    return {"dir": directory, "source": source, "model": model, "ids": [1] + list(range(4, 60))}


def _tensors(source) -> dict[str, tuple[str, bytes]]:
    reader = open_gguf(source) if isinstance(source, Path) else source
    return {t.name: (t.tensor_type.name, bytes(t.data.tobytes())) for t in reader.tensors}


def _expected_tensors(before: dict, count: int, attention: list[int], mlp: list[int]) -> dict:
    """The source's tensors as the cut should write them: removed sub-layers gone, whole layers renumbered."""
    kept = [i for i in range(count) if not (i in attention and i in mlp)]
    expected = {name: value for name, value in before.items() if not name.startswith("blk.")}
    for new, old in enumerate(kept):
        for name, value in before.items():
            match = _BLOCK_TENSOR.match(name)
            if match and int(match[1]) == old and not (match[2].startswith("attn_") and old in attention):
                expected[f"blk.{new}.{match[2]}.weight"] = value
    return expected


def _zeroed_copy(source: Path, out: Path, attention: list[int], mlp: list[int]) -> Path:
    """The source file with the output projections of the removed sub-layers set to zero bytes (= 0.0)."""
    from gguf import GGUFValueType, GGUFWriter

    reader = open_gguf(source)
    writer = GGUFWriter(out, field_value(reader, "general.architecture"))
    for name, field in reader.fields.items():
        if not name.startswith("GGUF.") and name != "general.architecture":
            sub_type = field.types[-1] if field.types[0] == GGUFValueType.ARRAY else None
            writer.add_key_value(name, field.contents(), field.types[0], sub_type=sub_type)
    zeroed = {f"blk.{i}.attn_output.weight" for i in attention} | {f"blk.{i}.ffn_down.weight" for i in mlp}
    for tensor in reader.tensors:
        writer.add_tensor_info(tensor.name, tensor.data.shape, tensor.data.dtype, tensor.data.nbytes,
                               tensor.tensor_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for tensor in reader.tensors:
        writer.write_tensor_data(np.zeros_like(tensor.data) if tensor.name in zeroed else tensor.data)
    writer.close()
    return out


@contextmanager
def sublayers_switched_off(model, attention: list[int], mlp: list[int]):
    """The transformers model with the outputs of those layers' self_attn / mlp replaced by zeros."""
    from depthprune.model.load import decoder_layout

    layers = decoder_layout(model).layers
    handles = [layers[i].self_attn.register_forward_hook(
        lambda _module, _args, output: (torch.zeros_like(output[0]), *output[1:])) for i in attention]
    handles += [layers[i].mlp.register_forward_hook(lambda _module, _args, output: torch.zeros_like(output))
                for i in mlp]
    try:
        yield model
    finally:
        for handle in handles:
            handle.remove()


def _hf_logits(model, ids: list[int]) -> np.ndarray:
    with torch.no_grad():
        return model(input_ids=torch.tensor([ids])).logits[0].float().numpy()


def test_cut_writes_deci_metadata_and_byte_copies_the_kept_tensors(tiny, tmp_path):
    source, out = tiny["source"], tmp_path / "cut.gguf"
    record = cut_sublayers_gguf(source, out, attention=[2, 4], mlp=[4], criterion="similarity")
    before, reader = open_gguf(source), open_gguf(out)
    assert field_value(reader, "general.architecture") == "deci"
    assert field_value(reader, "deci.block_count") == TINY_LAYERS - 1  # layer 4 lost both sub-layers
    assert field_value(reader, "deci.attention.head_count") == [4, 4, 0, 4, 4]
    assert field_value(reader, "deci.attention.head_count_kv") == [2, 2, 0, 2, 2]
    assert field_value(reader, "deci.feed_forward_length") == [64] * 5
    assert not [name for name in reader.fields if name.startswith("llama.")]
    for name, field in before.fields.items():
        if name.startswith("tokenizer.") or name.removeprefix("llama.") in ("context_length", "rope.freq_base"):
            assert field_value(reader, name.replace("llama.", "deci.", 1)) == field.contents(), name
    assert field_value(reader, "depthprune.removed_attention") == [2, 4]
    assert field_value(reader, "depthprune.removed_mlp") == [4]
    assert _tensors(reader) == _expected_tensors(_tensors(before), TINY_LAYERS, [2, 4], [4])
    assert record["removed_sublayers"] == {"attention": [2, 4], "mlp": [4]}
    assert record["removed_layers"] == [4] and record["layers_after"] == 5 and record["attention_layers_after"] == 4
    assert record["bytes_after"] == out.stat().st_size < source.stat().st_size == record["bytes_before"]
    assert record["parameters_after"] == sum(int(t.n_elements) for t in reader.tensors)


@pytest.mark.parametrize("attention, mlp", [([1, 3, 5], []), ([2, 4], [4]), ([5], [])])
def test_llama_cpp_computes_the_model_without_those_sublayers(tiny, tmp_path, attention, mlp):
    """Exactly the source with the sub-layers' outputs zeroed, in llama.cpp; within float16 noise, in transformers."""
    _llama_cpp()
    from depthprune.gguf.runtime import load_llama, next_token_logits

    ids, model = tiny["ids"], tiny["model"]
    cut = cut_sublayers_gguf(tiny["source"], tmp_path / "cut.gguf", attention, mlp)
    ours = next_token_logits(load_llama(tmp_path / "cut.gguf", n_ctx=64), ids)
    zeroed = _zeroed_copy(tiny["source"], tmp_path / "zeroed.gguf", attention, mlp)
    assert np.array_equal(ours, next_token_logits(load_llama(zeroed, n_ctx=64), ids))
    uncut_noise = np.abs(next_token_logits(load_llama(tiny["source"], n_ctx=64), ids) - _hf_logits(model, ids)).max()
    with sublayers_switched_off(model, attention, mlp):
        hf = _hf_logits(model, ids)
    assert np.abs(ours - hf).max() <= max(3 * uncut_noise, 1e-3)
    assert (ours.argmax(1) == hf.argmax(1)).mean() >= 0.95
    assert np.abs(ours - _hf_logits(model, ids)).max() > 10 * np.abs(ours - hf).max()  # the cut changed something
    assert cut["attention_layers_after"] == TINY_LAYERS - len(attention)


def test_llama_cpp_keeps_no_kv_cache_for_layers_without_attention(tiny, tmp_path):
    _llama_cpp()
    from depthprune.gguf.runtime import kv_bytes_per_token, load_llama

    cut_sublayers_gguf(tiny["source"], tmp_path / "cut.gguf", attention=[1, 3, 5])
    full = kv_bytes_per_token(load_llama(tiny["source"], n_ctx=64))
    cut = kv_bytes_per_token(load_llama(tmp_path / "cut.gguf", n_ctx=64))
    per_layer = 2 * TINY_KV_HEADS * TINY_HEAD_DIM * 2  # K and V rows, float16
    assert full - cut == 3 * per_layer


def test_what_llama_cpp_cannot_express_is_what_the_cut_refuses(tiny, tmp_path):
    """The two refusals' reasons, in the bundled llama.cpp: files the planner would refuse, written anyway.

    If a llama.cpp release changes either behaviour, this test fails and the refusal can be revisited.
    """
    _llama_cpp()
    from depthprune.gguf.runtime import load_llama, next_token_logits
    from depthprune.gguf.sublayers import SublayerPlan, write_sublayer_cut

    reader, ids = open_gguf(tiny["source"]), tiny["ids"]
    full = {"attention.head_count": (4,) * 6, "attention.head_count_kv": (2,) * 6, "feed_forward_length": (64,) * 6}
    mlp_alone = SublayerPlan(6, (), (2,), tuple(range(6)), {**full, "feed_forward_length": (64, 64, 0, 64, 64, 64)})
    write_sublayer_cut(reader, mlp_alone, tmp_path / "mlp.gguf", "tiny", "explicit")
    # A layer with feed_forward_length 0 loses its attention output too: the file computes layer 2 removed whole.
    whole = _zeroed_copy(tiny["source"], tmp_path / "whole.gguf", [2], [2])
    assert np.array_equal(next_token_logits(load_llama(tmp_path / "mlp.gguf", n_ctx=64), ids),
                          next_token_logits(load_llama(whole, n_ctx=64), ids))
    first = SublayerPlan(6, (0,), (), tuple(range(6)), {**full, "attention.head_count": (0, 4, 4, 4, 4, 4),
                                                        "attention.head_count_kv": (0, 2, 2, 2, 2, 2)})
    write_sublayer_cut(reader, first, tmp_path / "first.gguf", "tiny", "explicit")
    with pytest.raises(ValueError, match="Failed to load model"):  # the head size is read from layer 0
        load_llama(tmp_path / "first.gguf", n_ctx=64)


def _write_gemma3_gguf(path: Path) -> Path:
    from gguf import GGUFWriter

    writer = GGUFWriter(path, "gemma3")
    writer.add_block_count(1)
    writer.add_tensor("token_embd.weight", np.zeros((VOCAB, 32), dtype=np.float32))
    writer.add_tensor("blk.0.attn_q.weight", np.zeros((32, 32), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.mark.parametrize("source, attention, mlp, match", [
    ("tiny", [6], [], r"cannot remove the attention sub-layers of layers \[6\]: the model has layers 0..5"),
    ("tiny", [-1], [], "the model has layers 0..5"),
    ("tiny", [], [], "no sub-layers to remove"),
    ("tiny", [1], [2], r"cannot remove the MLP of layers \[2\] alone"),
    ("tiny", [0, 2], [], "cannot remove the attention of layer 0, the first kept layer"),
    ("tiny", [0, 1], [0], "cannot remove the attention of layer 1, the first kept layer"),
    ("tiny", list(range(6)), list(range(6)), "cannot remove all 6 layers"),
    ("gemma3", [0], [], "cannot cut sub-layers out of a 'gemma3' GGUF file"),
])
def test_bad_cuts_fail_with_one_line_and_write_nothing(tiny, tmp_path, source, attention, mlp, match):
    path = tiny["source"] if source == "tiny" else _write_gemma3_gguf(tmp_path / "gemma3.gguf")
    before = {p.name for p in tmp_path.iterdir()}
    with pytest.raises(DepthpruneError, match=match) as error:
        cut_sublayers_gguf(path, tmp_path / "out.gguf", attention, mlp)
    assert "\n" not in str(error.value)
    assert {p.name for p in tmp_path.iterdir()} == before


def test_the_source_and_granularity_are_checked_before_anything_is_measured(tiny, tmp_path):
    reader = open_gguf(tiny["source"])
    assert check_sublayer_source(reader, "attention") == TINY_LAYERS
    with pytest.raises(DepthpruneError, match="cannot remove the MLP of any layer alone in a GGUF file"):
        check_sublayer_source(reader, "mlp")
    with pytest.raises(DepthpruneError, match="cannot cut sub-layers out of a 'gemma3' GGUF file"):
        check_sublayer_source(open_gguf(_write_gemma3_gguf(tmp_path / "gemma3.gguf")), "attention")


def test_a_mixture_of_experts_llama_is_refused(tmp_path):
    from gguf import GGUFWriter

    writer = GGUFWriter(tmp_path / "moe.gguf", "llama")
    writer.add_block_count(2)
    writer.add_expert_count(4)
    for i in range(2):
        writer.add_tensor(f"blk.{i}.ffn_gate_inp.weight", np.zeros((4, 32), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(DepthpruneError, match="llama.expert_count"):
        cut_sublayers_gguf(tmp_path / "moe.gguf", tmp_path / "out.gguf", [1])
    assert not (tmp_path / "out.gguf").exists()


# SmolLM2-135M (30 layers): 8 attention sub-layers, and 4 layers whole (an MLP alone cannot go in llama.cpp).
SMOLLM2_ATTENTION, SMOLLM2_WHOLE = list(range(10, 18)), list(range(20, 24))


@pytest.mark.slow
def test_embedded_smollm2_attention_cut_matches_the_hooked_transformers_model(tmp_path, shared_data):
    """llama.cpp on the 4-bit cut vs transformers on the de-quantized model with the same sub-layers off.

    The two never agree exactly (llama.cpp multiplies 4-bit weights with 8-bit activations), so the uncut
    pair's disagreement is the yardstick, as in tests/test_gguf.py.
    """
    _llama_cpp()
    from depthprune.gguf.runtime import kv_cache_allocated, load_llama, next_token_logits
    from depthprune.model.load import load_model, resolve_model_source

    source = Path(resolve_model_source("smollm2-135m").location)
    reader = open_gguf(source)
    out = tmp_path / "cut.gguf"
    with pytest.raises(DepthpruneError, match="alone"):
        cut_sublayers_gguf(source, out, SMOLLM2_ATTENTION, SMOLLM2_WHOLE, reader=reader)
    attention = SMOLLM2_ATTENTION + SMOLLM2_WHOLE
    record = cut_sublayers_gguf(source, out, attention, SMOLLM2_WHOLE, reader=reader)
    assert record["layers_after"] == 26 and record["attention_layers_after"] == 18
    assert record["bytes_after"] < record["bytes_before"]
    model, tokenizer = load_model("smollm2-135m")
    llm, full_llm = load_llama(out), load_llama(source)
    lines = (shared_data / "c4" / "validation.jsonl").read_text().splitlines()[:4]
    for text in [json.loads(line)["text"] for line in lines]:
        ids = tokenizer(text)["input_ids"][:128]
        full_top1 = (next_token_logits(full_llm, ids).argmax(1) == _hf_logits(model, ids).argmax(1)).mean()
        ours = next_token_logits(llm, ids)
        with sublayers_switched_off(model, attention, SMOLLM2_WHOLE):
            hf = _hf_logits(model, ids)
        top1 = (ours.argmax(1) == hf.argmax(1)).mean()
        gap, gap_to_uncut = np.abs(ours - hf).mean(), np.abs(ours - _hf_logits(model, ids)).mean()
        print(f"\nSmolLM2 top-1 llama.cpp vs transformers over {len(ids)} C4 tokens: uncut {full_top1:.3f}, "
              f"cut {top1:.3f}; mean |Δ logit| {gap:.3f} (to the uncut transformers model {gap_to_uncut:.3f})")
        assert top1 >= full_top1 - 0.1
        assert gap_to_uncut > 5 * gap
    full_kv = kv_cache_allocated(source, n_ctx=1024, flash_attn=True)
    cut_kv = kv_cache_allocated(out, n_ctx=1024, flash_attn=True)
    assert cut_kv["mib"] == pytest.approx(full_kv["mib"] * 18 / 30, abs=0.01)


# ------------------------------------------------------------------- through `depthprune prune --format gguf`


@pytest.mark.parametrize("how, attention", [(["--layers", "1,3"], [1, 3]),
                                            (["--n", "2", "--criterion", "deepest"], None)])
def test_prune_writes_the_attention_cut_the_writer_makes(tiny, tmp_path, capsys, how, attention):
    from badinput import run

    from depthprune.select import SelectionContext, choose

    if attention is None:  # the deepest attention sub-layers before the last layer, as the criterion says
        attention = list(choose("deepest", 2, SelectionContext(TINY_LAYERS, granularity="attention")).layers)
    code, out, err = run(capsys, "prune", tiny["source"], "--granularity", "attention", *how,
                         "--out", tmp_path / "cut.gguf")
    assert code == 0, err
    cut_sublayers_gguf(tiny["source"], tmp_path / "direct.gguf", attention)
    assert _tensors(tmp_path / "cut.gguf") == _tensors(tmp_path / "direct.gguf")
    assert "removed the attention of layers" in out and "file size" in out


@pytest.mark.parametrize("how, message", [
    (["--granularity", "attention", "--layers", "0,2"], "--layers names layer 0, whose attention a GGUF file must keep"),
    (["--granularity", "mlp", "--n", "1", "--criterion", "deepest"], "cannot remove the MLP of any layer alone"),
    (["--granularity", "attention", "--n", "1", "--criterion", "deepest", "--repair", "linear"],
     "does not apply to --granularity attention"),
    (["--granularity", "attention", "--n", "1", "--criterion", "perplexity-oneshot"],
     "cannot choose attention sub-layers"),
])
def test_prune_refuses_a_gguf_sublayer_cut_it_cannot_write(tiny, tmp_path, capsys, how, message):
    from badinput import assert_clean_failure

    assert_clean_failure(capsys, ["prune", tiny["source"], *how, "--out", tmp_path / "cut.gguf"], message,
                         watch=[tmp_path, tiny["dir"]])
