"""A repaired cut written as GGUF (``prune X.gguf --format gguf --repair linear``), and repaired checkpoints exported.

The fast tests build a tiny Llama GGUF that transformers and llama.cpp both load: a random 6-layer model
exported by depthprune with a byte-level BPE vocabulary of 262 tokens, its MLP down-projections re-typed to
Q4_1 (the embedded SmolLM2's type) and the other matrices in Q8_0. The slow test repairs the embedded SmolLM2.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from badinput import assert_clean_failure, run

import depthprune
from depthprune.gguf.repair import written_type
from depthprune.gguf.surgery import field_value, open_gguf

CUT = "2-3"  # removes layers 2 and 3 of 6: the map is folded into layer 1
FOLDED = "blk.1.ffn_down.weight"
MERGES = ["Ġ t", "h e", "Ġt he", "Ġ a", "i n"]


def _byte_symbols() -> list[str]:
    """GPT-2's printable stand-ins for the 256 bytes, in byte order (the vocabulary of byte-level BPE)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    extra = iter(range(256, 512))
    return [chr(b) if b in printable else chr(next(extra)) for b in range(256)]


def _tokenizer_gguf(path: Path) -> Path:
    from gguf import GGUFWriter

    tokens = [*_byte_symbols(), *(m.replace(" ", "") for m in MERGES), "<|endoftext|>"]
    writer = GGUFWriter(path, "llama")
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types([1] * (len(tokens) - 1) + [3])  # normal, and one control token
    writer.add_token_merges(MERGES)
    writer.add_bos_token_id(len(tokens) - 1)
    writer.add_eos_token_id(len(tokens) - 1)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def _checkpoint(path: Path, tokenizer: Path, arch: str = "llama") -> Path:
    """A random 6-layer model saved with a record naming ``tokenizer`` as its source (what export reads)."""
    import transformers as tf

    vocab = 262
    common = dict(vocab_size=vocab, hidden_size=64, intermediate_size=256, num_hidden_layers=6,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                  bos_token_id=vocab - 1, eos_token_id=vocab - 1, tie_word_embeddings=True)
    config = tf.LlamaConfig(**common) if arch == "llama" else tf.Gemma3TextConfig(
        head_dim=16, sliding_window=512, query_pre_attn_scalar=16,
        layer_types=["sliding_attention"] * 5 + ["full_attention"], **common)  # llama.cpp's period of 6
    torch.manual_seed(0)
    model = tf.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():  # larger weights than the random init, so that layers differ measurably
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    model.save_pretrained(path)
    (path / "depthprune.json").write_text(json.dumps({"source_model": str(tokenizer)}))
    return path


def _retyped(source: Path, out: Path, tail: str, type_name: str) -> Path:
    """``source`` with every tensor whose name ends in ``tail`` re-quantized to ``type_name``, the rest as it was."""
    from gguf import GGMLQuantizationType, GGUFValueType, GGUFWriter, dequantize, quants

    reader = open_gguf(source)
    writer = GGUFWriter(out, field_value(reader, "general.architecture"))
    for name, field in reader.fields.items():
        if not name.startswith("GGUF.") and name != "general.architecture":
            sub_type = field.types[-1] if field.types[0] == GGUFValueType.ARRAY else None
            writer.add_key_value(name, field.contents(), field.types[0], sub_type=sub_type)
    for tensor in reader.tensors:
        data, qtype = tensor.data, tensor.tensor_type
        if tensor.name.endswith(tail):
            qtype = GGMLQuantizationType[type_name]
            data = quants.quantize(dequantize(tensor.data, tensor.tensor_type), qtype)
        writer.add_tensor(tensor.name, data, raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return out


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, shared_data):
    """The tiny source GGUF (Q4_1 down-projections), its plain and repaired cuts, and the repaired checkpoint
    made from the same source by the checkpoint path (the reference)."""
    from depthprune.gguf.export import export_gguf
    from depthprune.gguf.prune import prune_gguf

    root = tmp_path_factory.mktemp("gguf-repair")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("DEPTHPRUNE_CACHE", str(root / "cache"))  # the de-quantized copies, out of the home
        tokenizer = _tokenizer_gguf(root / "tokenizer.gguf")
        exported = export_gguf(_checkpoint(root / "random", tokenizer), root / "q8.gguf", "q8_0")
        source = _retyped(exported, root / "source.gguf", "ffn_down.weight", "Q4_1")
        data = depthprune.DataOptions(str(shared_data / "c4" / "validation.jsonl"), samples=16, seq_len=64)
        plain = root / "plain.gguf"
        prune_gguf(str(source), plain, layers=CUT, progress=False)
        repaired = root / "repaired.gguf"
        record = prune_gguf(str(source), repaired, layers=CUT, data=data, repair="linear", progress=False)
        checkpoint = root / "repaired-checkpoint"
        depthprune.prune(str(source), checkpoint, layers=CUT, data=data, repair="linear", progress=False)
        yield {"root": root, "tokenizer": tokenizer, "source": source, "plain": plain, "repaired": repaired,
               "record": record, "checkpoint": checkpoint, "data": data}


def _tensors(path: Path) -> dict[str, tuple[str, tuple, bytes]]:
    return {t.name: (t.tensor_type.name, tuple(t.shape.tolist()), bytes(t.data.tobytes())) for t in open_gguf(path).tensors}


def _weights(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_the_repaired_gguf_is_the_plain_cut_with_one_tensor_requantized_in_its_own_type(tiny):
    plain, repaired = _tensors(tiny["plain"]), _tensors(tiny["repaired"])
    assert list(plain) == list(repaired)  # names, in order
    assert {k: v[:2] for k, v in plain.items()} == {k: v[:2] for k, v in repaired.items()}  # types and shapes
    assert [name for name in plain if plain[name] != repaired[name]] == [FOLDED]
    assert repaired[FOLDED][0] == "Q4_1"
    record = tiny["record"]["repair"]
    assert record["method"] == "linear" and record["layer"] == 1
    assert record["gguf_tensors"] == {FOLDED: {"source_type": "Q4_1", "written_type": "Q4_1",
                                               "requantization_error": pytest.approx(0.09, abs=0.05)}}
    assert record["fit"]["after"]["residual_error"] < record["fit"]["before"]["residual_error"]
    plain_reader, reader = open_gguf(tiny["plain"]), open_gguf(tiny["repaired"])
    assert json.loads(field_value(reader, "depthprune.repair")) == json.loads(json.dumps(record))
    assert field_value(plain_reader, "depthprune.repair") is None
    skip = {"depthprune.repair", "GGUF.kv_count"}  # the one added key, and the header's count of keys
    assert {k: field_value(plain_reader, k) for k in plain_reader.fields if k not in skip} == \
        {k: field_value(reader, k) for k in reader.fields if k not in skip}


def test_the_folded_weight_is_the_checkpoint_repairs_within_one_requantization(tiny):
    """The GGUF path and the checkpoint path fit the same map on the same de-quantized model: the file's
    folded tensor is the checkpoint's up to Q4_1 rounding (half a step of its block, plus float16 scales)."""
    from gguf import dequantize
    from safetensors.torch import load_file

    tensor = next(t for t in open_gguf(tiny["repaired"]).tensors if t.name == FOLDED)
    stored = dequantize(tensor.data, tensor.tensor_type)
    folded = load_file(str(tiny["checkpoint"] / "model.safetensors"))["model.layers.1.mlp.down_proj.weight"].numpy()
    blocks = folded.reshape(folded.shape[0], -1, 32)
    half_step = ((blocks.max(-1) - blocks.min(-1)) / 15 / 2).repeat(32, axis=1)
    assert np.all(np.abs(stored - folded) <= half_step * 1.01 + 1e-3 * np.abs(folded).max())
    error = np.linalg.norm(stored - folded) / np.linalg.norm(folded)
    assert error == pytest.approx(tiny["record"]["repair"]["gguf_tensors"][FOLDED]["requantization_error"], rel=1e-3)


def test_reading_the_repaired_gguf_back_gives_the_repaired_model(tiny, monkeypatch):
    monkeypatch.setenv("DEPTHPRUNE_CACHE", str(tiny["root"] / "cache"))
    read_back, tokenizer = depthprune.load_model(str(tiny["repaired"]))
    reference, _ = depthprune.load_model(str(tiny["checkpoint"]))
    plain, _ = depthprune.load_model(str(tiny["plain"]))
    ours, theirs = _weights(read_back), _weights(reference)
    assert ours.keys() == theirs.keys()
    different = [k for k in ours if not torch.equal(ours[k], theirs[k])]
    assert different == ["model.layers.1.mlp.down_proj.weight"]
    ids = torch.tensor([tokenizer("The quick brown fox jumps over the lazy dog, then the cat sat.")["input_ids"]])
    with torch.no_grad():
        logits = [m(input_ids=ids).logits[0] for m in (read_back, reference, plain)]
    # The re-quantization moves the logits far less than the repair itself does.
    assert (logits[0] - logits[1]).norm() < 0.2 * (logits[1] - logits[2]).norm()


def _prompts(tokenizer, data: Path, count: int = 3, length: int = 48) -> list[list[int]]:
    texts = [json.loads(line)["text"] for line in (data / "c4" / "validation.jsonl").open()][100:100 + count]
    return [tokenizer(text)["input_ids"][:length] for text in texts]


def test_llama_cpp_runs_the_repaired_gguf_and_agrees_with_transformers(tiny, shared_data, monkeypatch):
    """Top-1 next tokens of llama.cpp on the repaired file against transformers on the same file de-quantized."""
    pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed: llama.cpp checks skipped")
    from depthprune.gguf.runtime import load_llama, next_token_logits

    monkeypatch.setenv("DEPTHPRUNE_CACHE", str(tiny["root"] / "cache"))
    reference, tokenizer = depthprune.load_model(str(tiny["repaired"]))  # de-quantized: the file's own numbers
    plain, _ = depthprune.load_model(str(tiny["plain"]))
    llm = load_llama(tiny["repaired"])
    agree = {"repaired": [], "plain": []}
    for ids in _prompts(tokenizer, shared_data):
        ours = next_token_logits(llm, ids).argmax(1)
        with torch.no_grad():
            for name, model in (("repaired", reference), ("plain", plain)):
                agree[name].append(float((model(input_ids=torch.tensor([ids])).logits[0].argmax(1).numpy()
                                          == ours).mean()))
    del llm
    # Measured: 1.0, 1.0, 0.98 against the file's de-quantized model, 0.12-0.40 against the plain cut (llama.cpp
    # also rounds the activations to 8 bits).
    assert min(agree["repaired"]) >= 0.9, agree
    assert np.mean(agree["plain"]) < np.mean(agree["repaired"]) - 0.1, agree  # it runs the repaired model


@pytest.mark.parametrize("type_name, tolerance", [("F32", 1e-6), ("F16", 1e-3), ("BF16", 1e-2), ("Q8_0", 1e-2),
                                                   ("Q5_1", 5e-2)])
def test_each_type_gguf_py_writes_is_kept_for_the_folded_tensor(tiny, tmp_path, monkeypatch, type_name, tolerance):
    from gguf import dequantize
    from safetensors.torch import load_file

    from depthprune.gguf.prune import prune_gguf

    monkeypatch.setenv("DEPTHPRUNE_CACHE", str(tiny["root"] / "cache"))
    source = _retyped(tiny["source"], tmp_path / "source.gguf", "ffn_down.weight", type_name)
    out = tmp_path / "repaired.gguf"
    record = prune_gguf(str(source), out, layers=CUT, data=tiny["data"], repair="linear", progress=False)
    assert record["repair"]["gguf_tensors"][FOLDED]["written_type"] == type_name
    tensor = next(t for t in open_gguf(out).tensors if t.name == FOLDED)
    assert tensor.tensor_type.name == type_name
    # The checkpoint's map was fitted on the Q4_1 source: another source type is another model, another map;
    # against a refit of this source's model, only the re-quantization differs.
    reference = tmp_path / "reference"
    depthprune.prune(str(source), reference, layers=CUT, data=tiny["data"], repair="linear", progress=False)
    folded = load_file(str(reference / "model.safetensors"))["model.layers.1.mlp.down_proj.weight"].numpy()
    stored = dequantize(tensor.data, tensor.tensor_type)
    assert np.abs(stored - folded).max() <= tolerance * np.abs(folded).max()


def test_a_replacement_the_cut_cannot_hold_is_refused_before_writing(tiny, tmp_path):
    from gguf import GGMLQuantizationType

    from depthprune.errors import DepthpruneError
    from depthprune.gguf.surgery import ReplacedTensor, cut_gguf

    right = ReplacedTensor(np.zeros((64, 256), dtype=np.float32), GGMLQuantizationType.F32)
    cases = [({"blk.2.ffn_down.weight": right}, "the cut does not keep"),  # a removed layer's
             ({FOLDED: ReplacedTensor(np.zeros((64, 128), dtype=np.float32), GGMLQuantizationType.F32)},
              "has shape \\(64, 128\\), the source.s \\(64, 256\\)")]
    for replaced, message in cases:
        with pytest.raises(DepthpruneError, match=message):
            cut_gguf(tiny["source"], [2, 3], tmp_path / "out.gguf", replaced=replaced)
        assert list(tmp_path.iterdir()) == []


def test_types_gguf_py_cannot_write_become_q8_0_or_f16():
    assert written_type("Q4_1", 256) == "Q4_1" and written_type("Q8_0", 64) == "Q8_0"
    assert written_type("F32", 7) == "F32" and written_type("BF16", 64) == "BF16"
    assert written_type("Q6_K", 256) == "Q8_0" and written_type("Q4_K", 512) == "Q8_0"
    assert written_type("IQ4_XS", 48) == "F16"


def test_a_k_quant_source_gets_its_folded_tensor_as_q8_0_and_runs_in_llama_cpp(tiny, monkeypatch):
    """llama.cpp's own quantizer makes a Q4_K_M file (gguf-py cannot write K-quants)."""
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed: llama.cpp checks skipped")
    from depthprune.gguf.export import export_gguf
    from depthprune.gguf.prune import prune_gguf
    from depthprune.gguf.runtime import load_llama, next_token_logits

    monkeypatch.setenv("DEPTHPRUNE_CACHE", str(tiny["root"] / "cache"))
    root = tiny["root"]
    f16 = export_gguf(_checkpoint(root / "random-k", tiny["tokenizer"]), root / "f16.gguf", "f16")
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_K_M
    assert llama_cpp.llama_model_quantize(str(f16).encode(), str(root / "k.gguf").encode(), params) == 0
    source_type = _tensors(root / "k.gguf")[FOLDED][0]
    assert source_type in ("Q4_K", "Q6_K")
    record = prune_gguf(str(root / "k.gguf"), root / "k-repaired.gguf", layers=CUT, data=tiny["data"],
                        repair="linear", progress=False)
    assert record["repair"]["gguf_tensors"][FOLDED]["written_type"] == "Q8_0"
    plain, repaired = _tensors(root / "k.gguf"), _tensors(root / "k-repaired.gguf")
    assert repaired[FOLDED][0] == "Q8_0"
    assert repaired["blk.2.ffn_down.weight"] == plain["blk.4.ffn_down.weight"]  # renumbered, byte-copied
    llm = load_llama(root / "k-repaired.gguf")
    logits = next_token_logits(llm, list(range(10, 40)))
    del llm
    assert np.isfinite(logits).all()


def test_bad_repair_requests_are_one_line_and_write_nothing(tiny, capsys, monkeypatch, tmp_path):
    monkeypatch.setenv("DEPTHPRUNE_CACHE", str(tiny["root"] / "cache"))
    data = ["--data", tiny["data"].source, "--samples", "8", "--seq-len", "32"]
    gemma = tmp_path / "gemma3.gguf"
    from depthprune.gguf.export import export_gguf

    export_gguf(_checkpoint(tmp_path / "gemma3", tiny["tokenizer"], "gemma3"), gemma, "q8_0")
    cases = [
        (tiny["source"], ["--layers", CUT, "--repair", "linear"], "fits its map on calibration text: pass --data"),
        (tiny["source"], ["--layers", "1,3", "--repair", "linear", *data], "one contiguous block of layers"),
        (tiny["source"], ["--layers", "0-1", "--repair", "linear", *data], "cannot repair a cut starting at layer 0"),
        (tiny["source"], ["--n", "2", "--criterion", "perplexity-greedy", "--repair", "linear", *data],
         "one contiguous block"),
        (tiny["source"], ["--layers", CUT, "--repair-ridge", "0.1", *data], "a repair option without --repair"),
        (gemma, ["--layers", CUT, "--repair", "linear", *data], "post_feedforward_layernorm"),
    ]
    out = tmp_path / "out.gguf"
    for model, extra, message in cases:
        assert_clean_failure(capsys, ["prune", str(model), *extra, "--out", str(out)], message,
                             watch=[tmp_path, tiny["source"]])


def test_cli_writes_a_repaired_gguf_and_says_what_it_requantized(tiny, capsys, monkeypatch, tmp_path):
    monkeypatch.setenv("DEPTHPRUNE_CACHE", str(tiny["root"] / "cache"))
    out = tmp_path / "cut.gguf"
    status, printed, err = run(capsys, "prune", tiny["source"], "--layers", CUT, "--repair", "linear",
                               "--repair-ridge", "0.01", "--data", tiny["data"].source, "--samples", "8",
                               "--seq-len", "32", "--out", out)
    assert status == 0, err
    assert "repair:     linear folded into model.layers.1.mlp.down_proj" in printed
    assert f"{FOLDED} re-quantized Q4_1 -> Q4_1" in printed
    assert json.loads(field_value(open_gguf(out), "depthprune.repair"))["options"]["repair_ridge"] == 0.01


# --- export of a repaired checkpoint ----------------------------------------------------------------------

@pytest.mark.parametrize("outtype, tolerance", [("f16", 2e-3), ("q8_0", 2e-2)])
def test_a_repaired_checkpoint_exports_and_reads_back_equal(tiny, monkeypatch, outtype, tolerance):
    from depthprune.gguf.export import export

    monkeypatch.setenv("DEPTHPRUNE_CACHE", str(tiny["root"] / "cache"))
    out = export(tiny["checkpoint"], tiny["root"] / f"exported-{outtype}.gguf", "gguf", outtype)
    reader = open_gguf(out)
    record = json.loads((tiny["checkpoint"] / "depthprune.json").read_text())
    assert json.loads(field_value(reader, "depthprune.repair")) == record["repair"]
    assert field_value(reader, "depthprune.removed_layers") == [2, 3]
    read_back, _ = depthprune.load_model(str(out))
    reference, _ = depthprune.load_model(str(tiny["checkpoint"]))
    ours, theirs = _weights(read_back), _weights(reference)
    assert ours.keys() == theirs.keys()
    for name, value in theirs.items():  # relative to each tensor's largest weight: the export's rounding
        assert (ours[name] - value).abs().max() <= tolerance * value.abs().max(), name


# --- the embedded SmolLM2 (slow) --------------------------------------------------------------------------

@pytest.mark.slow
def test_embedded_smollm2_repaired_gguf_runs_in_llama_cpp_like_its_transformers_copy(tmp_path, shared_data):
    """SmolLM2-135M (Q4_1) without layers 11-18, repaired: one Q4_1 tensor re-written, the rest the plain cut's
    bytes; llama.cpp agrees with transformers on the file as closely as on the uncut file (0.965 there, see
    test_gguf.py), and its C4 loss is far below the plain cut's."""
    pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed: llama.cpp checks skipped")
    from gguf import dequantize

    from depthprune.gguf.prune import prune_gguf
    from depthprune.gguf.runtime import c4_token_stream, load_llama, mean_nll, next_token_logits

    data = depthprune.DataOptions(str(shared_data / "c4" / "train_sample.jsonl"), samples=32, seq_len=256)
    plain, repaired = tmp_path / "plain.gguf", tmp_path / "repaired.gguf"
    prune_gguf("smollm2-135m", plain, layers="11-18", progress=False)
    record = prune_gguf("smollm2-135m", repaired, layers="11-18", data=data, repair="linear", progress=False)
    assert record["repair"]["gguf_tensors"]["blk.10.ffn_down.weight"]["written_type"] == "Q4_1"
    before, after = _tensors(plain), _tensors(repaired)
    assert {k: v[:2] for k, v in before.items()} == {k: v[:2] for k, v in after.items()}
    assert [name for name in before if before[name] != after[name]] == ["blk.10.ffn_down.weight"]
    llm = load_llama(repaired)
    ids = c4_token_stream(llm, shared_data / "c4" / "validation.jsonl", 256)
    ours = next_token_logits(llm, ids)
    del llm
    plain_llm = load_llama(plain)
    plain_loss = mean_nll(next_token_logits(plain_llm, ids), ids)
    del plain_llm
    # The file's de-quantized model, built from the cached copy of the source (not a converted copy of each file).
    model, _ = depthprune.load_model("smollm2-135m")
    depthprune.remove_layers(model, list(range(11, 19)))
    tensor = next(t for t in open_gguf(repaired).tensors if t.name == "blk.10.ffn_down.weight")
    with torch.no_grad():
        model.model.layers[10].mlp.down_proj.weight.copy_(torch.from_numpy(dequantize(tensor.data, tensor.tensor_type)))
    with torch.no_grad():
        theirs = model(input_ids=torch.tensor([ids])).logits[0].numpy()
    agreement = float((ours.argmax(1) == theirs.argmax(1)).mean())
    print(f"\nllama.cpp vs transformers on the repaired file: top-1 {agreement:.3f}; llama.cpp C4 loss "
          f"{mean_nll(ours, ids):.3f} repaired, {plain_loss:.3f} plain")
    assert agreement >= 0.9
    assert mean_nll(ours, ids) < plain_loss - 0.5
