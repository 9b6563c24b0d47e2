"""GGUF in, GGUF out: cutting GGUF files, exporting checkpoints, and checking both in llama.cpp.

The fast tests build tiny GGUF files with gguf-py's writer. The slow ones run the embedded models in
llama.cpp (llama-cpp-python) and compare with the Hugging Face model cut from the same de-quantized file.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from badinput import assert_clean_failure
from conftest import VOCAB, tiny_model, tiny_tokenizer

from depthprune.errors import DepthpruneError
from depthprune.gguf.export import export, export_gguf, kept_ranges, mergekit_yaml
from depthprune.gguf.surgery import cut_gguf, field_value, open_gguf, swa_period_pattern
from depthprune.model.record import RECORD_FILE
from depthprune.model.surgery import remove_layers

HIDDEN = 32


def _write_tiny_gguf(path: Path, arch: str = "llama", blocks: int = 4, sliding_window: int | None = None,
                     extra_tensors: tuple[str, ...] = (), swa_period: int | None = None) -> Path:
    """A GGUF with ``blocks`` layers of random tensors in three storage types, tokenizer keys and a per-layer array."""
    from gguf import GGMLQuantizationType, GGUFWriter, quants

    rng = np.random.default_rng(0)
    writer = GGUFWriter(path, arch)
    writer.add_block_count(blocks)
    writer.add_embedding_length(HIDDEN)
    writer.add_head_count(4)
    writer.add_array(f"{arch}.attention.head_count_kv", [10 + i for i in range(blocks)])  # per layer
    writer.add_array(f"{arch}.rope.dimension_sections", [1, 2, 3])  # not per layer: left alone
    if sliding_window:
        writer.add_sliding_window(sliding_window)
    if swa_period:
        writer.add_sliding_window_pattern(swa_period)
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list([f"t{i}" for i in range(VOCAB)])
    writer.add_chat_template("{{ messages }}")
    writer.add_size_label("as named by its maker")
    writer.add_tensor("token_embd.weight", rng.standard_normal((VOCAB, HIDDEN), dtype=np.float32))
    for i in range(blocks):
        writer.add_tensor(f"blk.{i}.attn_norm.weight", rng.standard_normal(HIDDEN, dtype=np.float32))
        q8 = quants.quantize(rng.standard_normal((HIDDEN, HIDDEN), dtype=np.float32), GGMLQuantizationType.Q8_0)
        writer.add_tensor(f"blk.{i}.attn_q.weight", q8, raw_dtype=GGMLQuantizationType.Q8_0)
        writer.add_tensor(f"blk.{i}.ffn_down.weight", rng.standard_normal((HIDDEN, 64)).astype(np.float16))
    for name in extra_tensors:
        writer.add_tensor(name, np.zeros(HIDDEN, dtype=np.float32))
    writer.add_tensor("output_norm.weight", np.ones(HIDDEN, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def _tensor_bytes(source) -> dict[str, tuple[str, bytes]]:
    """Type and bytes of every tensor of a GGUF path or reader (gguf-py parses a 262k vocabulary slowly: reuse)."""
    reader = open_gguf(source) if isinstance(source, Path) else source
    return {t.name: (t.tensor_type.name, bytes(t.data.tobytes())) for t in reader.tensors}


def _nothing_written(directory: Path, keep: set[str]) -> bool:
    return {p.name for p in directory.iterdir()} == keep


@pytest.fixture
def tiny_gguf(tmp_path) -> Path:
    return _write_tiny_gguf(tmp_path / "tiny.gguf")


def test_cut_copies_kept_tensors_byte_for_byte_and_renumbers(tiny_gguf, tmp_path):
    out = tmp_path / "cut.gguf"
    record = cut_gguf(tiny_gguf, [1, 2], out, criterion="similarity", distance=0.25)
    before, after = _tensor_bytes(tiny_gguf), _tensor_bytes(out)
    for new, old in ((0, 0), (1, 3)):
        for kind in ("attn_norm.weight", "attn_q.weight", "ffn_down.weight"):
            assert after[f"blk.{new}.{kind}"] == before[f"blk.{old}.{kind}"]
    assert not any(name.startswith("blk.2.") for name in after)
    assert after["token_embd.weight"] == before["token_embd.weight"]
    reader = open_gguf(out)
    assert field_value(reader, "llama.block_count") == 2
    assert field_value(reader, "llama.attention.head_count_kv") == [10, 13]  # layers 0 and 3
    assert field_value(reader, "llama.rope.dimension_sections") == [1, 2, 3]
    assert field_value(reader, "tokenizer.ggml.tokens") == [f"t{i}" for i in range(VOCAB)]
    assert field_value(reader, "tokenizer.chat_template") == "{{ messages }}"
    assert field_value(reader, "depthprune.removed_layers") == [1, 2]
    assert field_value(reader, "depthprune.criterion") == "similarity"
    assert field_value(reader, "depthprune.source") == "tiny.gguf"
    assert field_value(reader, "depthprune.layers_before") == 4
    from gguf.utility import size_label

    assert field_value(reader, "general.size_label") == size_label(sum(int(t.n_elements) for t in reader.tensors), 0, 0, 0)
    assert record["layers_after"] == 2 and record["bytes_after"] == out.stat().st_size
    assert _nothing_written(tmp_path, {"tiny.gguf", "cut.gguf"})  # no temporaries left


def test_a_cut_of_a_cut_records_the_latest_cut(tiny_gguf, tmp_path):
    cut_gguf(tiny_gguf, [0], tmp_path / "a.gguf")
    cut_gguf(tmp_path / "a.gguf", [2], tmp_path / "b.gguf")
    reader = open_gguf(tmp_path / "b.gguf")
    assert field_value(reader, "llama.block_count") == 2
    assert field_value(reader, "depthprune.removed_layers") == [2]
    assert field_value(reader, "depthprune.source") == "a.gguf"


def test_gemma3_cut_keeping_the_period_writes_no_pattern(tmp_path):
    source = _write_tiny_gguf(tmp_path / "g.gguf", "gemma3", blocks=12, sliding_window=4)
    cut_gguf(source, range(8, 12), tmp_path / "cut.gguf")  # layers 0-7: global at 5, as period 6 says
    reader = open_gguf(tmp_path / "cut.gguf")
    assert field_value(reader, "gemma3.block_count") == 8
    assert field_value(reader, "gemma3.attention.sliding_window_pattern") is None


def test_gemma3_cut_breaking_the_period_is_refused_or_written_as_array(tmp_path):
    source = _write_tiny_gguf(tmp_path / "g.gguf", "gemma3", blocks=12, sliding_window=4)
    with pytest.raises(DepthpruneError, match=r"global attention at layers \[4, 10\].*--swa-pattern array"):
        cut_gguf(source, [2], tmp_path / "cut.gguf")
    assert _nothing_written(tmp_path, {"g.gguf"})
    cut_gguf(source, [2], tmp_path / "cut.gguf", swa_pattern="array")
    pattern = field_value(open_gguf(tmp_path / "cut.gguf"), "gemma3.attention.sliding_window_pattern")
    expected = swa_period_pattern(6, 12)
    del expected[2]
    assert [bool(x) for x in pattern] == expected


def test_a_stored_period_wins_and_is_replaced_by_an_array_when_needed(tmp_path):
    source = _write_tiny_gguf(tmp_path / "g.gguf", "gemma3", blocks=6, sliding_window=4, swa_period=3)
    cut_gguf(source, [3, 4, 5], tmp_path / "a.gguf")  # layers 0-2: global at 2, as the stored period 3 says
    assert field_value(open_gguf(tmp_path / "a.gguf"), "gemma3.attention.sliding_window_pattern") == 3
    with pytest.raises(DepthpruneError, match="period of 3"):
        cut_gguf(source, [0], tmp_path / "b.gguf")
    cut_gguf(source, [0], tmp_path / "b.gguf", swa_pattern="array")
    pattern = field_value(open_gguf(tmp_path / "b.gguf"), "gemma3.attention.sliding_window_pattern")
    assert [bool(x) for x in pattern] == [True, False, True, True, False]


def test_per_layer_pattern_array_is_cut_like_any_per_layer_array(tmp_path):
    source = _write_tiny_gguf(tmp_path / "g.gguf", "gemma3", blocks=12, sliding_window=4)
    cut_gguf(source, [2], tmp_path / "a.gguf", swa_pattern="array")
    cut_gguf(tmp_path / "a.gguf", [0], tmp_path / "b.gguf")  # the array travels; no period check needed
    pattern = field_value(open_gguf(tmp_path / "b.gguf"), "gemma3.attention.sliding_window_pattern")
    assert [bool(x) for x in pattern] == [i % 6 != 5 for i in range(12) if i not in (0, 2)]


@pytest.mark.parametrize("case, match", [
    ("truncated", "not a readable GGUF file"),
    ("unknown arch", "cannot cut 'gemma3n' GGUF files"),
    ("tensor outside blocks", "'per_layer_token_embd.weight' lies outside the layers"),
    ("unknown layer tensor", "'blk.1.mystery.weight' is not a known llama layer tensor"),
    ("out of range", r"the model has layers 0\.\.3"),
    ("all layers", "cannot remove all 4 layers"),
    ("output is input", "overlaps the input"),
])
def test_bad_cuts_fail_with_one_line_and_write_nothing(tmp_path, case, match):
    layers = [1]
    if case == "truncated":
        source = _write_tiny_gguf(tmp_path / "in.gguf")
        source.write_bytes(source.read_bytes()[:3000])
    elif case == "unknown arch":
        source = _write_tiny_gguf(tmp_path / "in.gguf", "gemma3n")
    elif case == "tensor outside blocks":
        source = _write_tiny_gguf(tmp_path / "in.gguf", extra_tensors=("per_layer_token_embd.weight",))
    elif case == "unknown layer tensor":
        source = _write_tiny_gguf(tmp_path / "in.gguf", extra_tensors=("blk.1.mystery.weight",))
    else:
        source = _write_tiny_gguf(tmp_path / "in.gguf")
        layers = {"out of range": [4], "all layers": [0, 1, 2, 3], "output is input": [1]}[case]
    out = source if case == "output is input" else tmp_path / "out.gguf"
    before = source.read_bytes()
    with pytest.raises(DepthpruneError, match=match) as error:
        cut_gguf(source, layers, out)
    assert "\n" not in str(error.value)
    assert _nothing_written(tmp_path, {"in.gguf"}) and source.read_bytes() == before


# --- command line ----------------------------------------------------------------------------------------


def test_cli_prunes_a_gguf_into_a_gguf(tiny_gguf, tmp_path, capsys):
    from depthprune.cli.app import main

    out = tmp_path / "cut.gguf"
    assert main(["prune", str(tiny_gguf), "--layers", "1-2", "--out", str(out)]) == 0
    assert "removed layers 1-2" in capsys.readouterr().out
    assert field_value(open_gguf(out), "llama.block_count") == 2
    assert main(["prune", str(tiny_gguf), "--n", "1", "--criterion", "deepest", "--out", str(out)]) == 2
    assert "exists" in capsys.readouterr().err
    assert main(["prune", str(tiny_gguf), "--n", "1", "--criterion", "deepest", "--out", str(out), "--force"]) == 0
    assert field_value(open_gguf(out), "depthprune.removed_layers") == [2]  # deepest: before the last layer


def test_a_gguf_transformers_cannot_load_is_one_line_with_its_cause(tmp_path, monkeypatch, capsys, shared_data):
    """The tiny file's per-layer head_count_kv is a list transformers refuses; its multi-line validation
    error becomes one line that still says which field."""
    source = _write_tiny_gguf(tmp_path / "tiny.gguf")
    monkeypatch.setenv("DEPTHPRUNE_CACHE", str(tmp_path / "cache"))
    line = assert_clean_failure(capsys, ["analyze", str(source), "--data", str(shared_data / "c4" / "validation.jsonl"),
                                         "--out", str(tmp_path / "out")],
                                "transformers could not load GGUF file", watch=[tmp_path])
    assert "num_key_value_heads" in line


def test_cli_refuses_a_gguf_output_from_a_checkpoint(tiny_checkpoint, tmp_path, capsys):
    from depthprune.cli.app import main

    assert main(["prune", str(tiny_checkpoint), "--layers", "1", "--out", str(tmp_path / "cut.gguf")]) == 2
    assert "needs a .gguf file or an embedded alias" in capsys.readouterr().err
    assert not (tmp_path / "cut.gguf").exists()


def test_cli_exports(tiny_gguf, tiny_checkpoint, tmp_path, capsys):
    from depthprune.cli.app import main

    ckpt = _pruned_checkpoint(tmp_path / "ckpt", "llama", [1], str(tiny_gguf))
    assert main(["export", str(ckpt), "--outtype", "q8_0", "--out", str(tmp_path / "m.gguf")]) == 0
    assert field_value(open_gguf(tmp_path / "m.gguf"), "general.file_type") == 7  # MOSTLY_Q8_0
    ckpt = _pruned_checkpoint(tmp_path / "ckpt2", "llama", [1], str(tiny_checkpoint))
    assert main(["export", str(ckpt), "--format", "mergekit", "--out", str(tmp_path / "m.yml")]) == 0
    assert yaml.safe_load((tmp_path / "m.yml").read_text())["merge_method"] == "passthrough"
    assert main(["export", str(tmp_path / "nowhere"), "--out", str(tmp_path / "x.gguf")]) == 2
    assert "not a checkpoint directory" in capsys.readouterr().err


# --- export ----------------------------------------------------------------------------------------------


def _pruned_checkpoint(path: Path, arch: str, removed: list[int], source: str) -> Path:
    model = tiny_model(arch)
    remove_layers(model, removed)
    model.save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    record = {"source_model": source, "removed_layers": removed, "layers_before": 6, "criterion": "explicit"}
    (path / RECORD_FILE).write_text(json.dumps(record))
    return path


@pytest.mark.parametrize("outtype, stored, tolerance", [("f16", "F16", 1e-3), ("bf16", "BF16", 1e-2),
                                                        ("q8_0", "Q8_0", 2e-2)])
def test_export_llama_maps_names_permutes_qk_and_copies_the_tokenizer(tmp_path, tiny_gguf, outtype, stored, tolerance):
    from gguf import dequantize

    ckpt = _pruned_checkpoint(tmp_path / "ckpt", "llama", [2, 3], str(tiny_gguf))
    out = export(ckpt, tmp_path / "out.gguf", "gguf", outtype)
    reader = open_gguf(out)
    tensors = {t.name: t for t in reader.tensors}
    assert field_value(reader, "llama.block_count") == 4
    assert field_value(reader, "tokenizer.ggml.tokens") == [f"t{i}" for i in range(VOCAB)]
    assert field_value(reader, "depthprune.removed_layers") == [2, 3]
    assert tensors["blk.0.attn_q.weight"].tensor_type.name == stored
    assert tensors["blk.0.attn_norm.weight"].tensor_type.name == "F32"
    assert "blk.4.attn_q.weight" not in tensors
    model = tiny_model("llama")
    remove_layers(model, [2, 3])
    hf_k = model.model.layers[1].self_attn.k_proj.weight.detach().numpy()
    stored_k = dequantize(tensors["blk.1.attn_k.weight"].data, tensors["blk.1.attn_k.weight"].tensor_type)
    # llama.cpp rotates adjacent rows (2i, 2i+1) of a head; HF rotates row i with row i + head_dim/2.
    head_dim, half = 8, 4
    for head in range(2):
        for i in range(half):
            row = head * head_dim
            assert np.abs(stored_k[row + 2 * i] - hf_k[row + i]).max() < tolerance
            assert np.abs(stored_k[row + 2 * i + 1] - hf_k[row + half + i]).max() < tolerance


def test_export_gemma3_adds_one_to_norms(tmp_path):
    source = _write_tiny_gguf(tmp_path / "g.gguf", "gemma3", blocks=6, sliding_window=4)
    # conftest's tiny Gemma 3 is global at layers 2 and 5; layers 0-1 match period 6 (no global yet).
    ckpt = _pruned_checkpoint(tmp_path / "ckpt", "gemma3", [2, 3, 4, 5], str(source))
    reader = open_gguf(export_gguf(ckpt, tmp_path / "out.gguf", "f16"))
    tensors = {t.name: t for t in reader.tensors}
    model = tiny_model("gemma3")
    norm = model.model.layers[0].post_feedforward_layernorm.weight.detach().numpy()
    assert np.allclose(tensors["blk.0.post_ffw_norm.weight"].data, norm + 1)
    assert field_value(reader, "gemma3.attention.sliding_window") == 4
    assert field_value(reader, "gemma3.block_count") == 2
    assert field_value(reader, "gemma3.attention.sliding_window_pattern") is None


def test_export_gemma3_refuses_a_layer_pattern_the_period_cannot_express(tmp_path):
    source = _write_tiny_gguf(tmp_path / "g.gguf", "gemma3", blocks=6, sliding_window=4)
    # conftest's tiny Gemma 3 has a global layer every 3rd layer, not every 6th.
    ckpt = _pruned_checkpoint(tmp_path / "ckpt", "gemma3", [5], str(source))
    with pytest.raises(DepthpruneError, match="global attention at layers \\[2\\]"):
        export_gguf(ckpt, tmp_path / "out.gguf", "f16")
    assert not (tmp_path / "out.gguf").exists()
    reader = open_gguf(export_gguf(ckpt, tmp_path / "out.gguf", "f16", swa_pattern="array"))
    assert [bool(x) for x in field_value(reader, "gemma3.attention.sliding_window_pattern")] == [True, True, False,
                                                                                              True, True]


@pytest.mark.parametrize("case, match", [
    ("no mapping", "no GGUF mapping for model type 'gpt2'"),
    ("no source", "does not say which GGUF it came from"),
    ("hub source", "not from a GGUF file"),
    ("bad outtype", "unknown outtype 'q4_0'"),
    ("not a checkpoint", "not a checkpoint directory"),
])
def test_bad_exports_fail_with_one_line_and_write_nothing(tmp_path, tiny_gguf, case, match):
    arch = "gpt2" if case == "no mapping" else "llama"
    ckpt = _pruned_checkpoint(tmp_path / "ckpt", arch, [1], str(tiny_gguf))
    if case == "no source":
        (ckpt / RECORD_FILE).unlink()
    elif case == "hub source":
        (ckpt / RECORD_FILE).write_text(json.dumps({"source_model": "org/model"}))
    elif case == "not a checkpoint":
        ckpt = tmp_path
    with pytest.raises(DepthpruneError, match=match) as error:
        export(ckpt, tmp_path / "out.gguf", "gguf", "q4_0" if case == "bad outtype" else "f16")
    assert "\n" not in str(error.value)
    assert not (tmp_path / "out.gguf").exists()
    assert not [p for p in tmp_path.iterdir() if "depthprune-tmp" in p.name]


# --- mergekit --------------------------------------------------------------------------------------------


def test_kept_ranges_are_half_open_runs():
    assert kept_ranges([2, 3, 7], 10) == [(0, 2), (4, 7), (8, 10)]
    assert kept_ranges([0], 3) == [(1, 3)]


def test_mergekit_recipe_rebuilds_the_cut(tmp_path, tiny_checkpoint):
    """The recipe follows mergekit's documented passthrough schema, and its slices select exactly the kept layers."""
    ckpt = _pruned_checkpoint(tmp_path / "ckpt", "llama", [1, 2, 4], str(tiny_checkpoint))
    export(ckpt, tmp_path / "recipe.yml", "mergekit")
    recipe = yaml.safe_load((tmp_path / "recipe.yml").read_text())
    assert recipe["merge_method"] == "passthrough"
    assert set(recipe) == {"merge_method", "dtype", "slices"}
    layers = []
    for piece in recipe["slices"]:
        (source,) = piece["sources"]
        assert source["model"] == str(tiny_checkpoint)
        start, end = source["layer_range"]
        layers.extend(range(start, end))
    assert layers == [0, 3, 5]


def test_mergekit_recipe_refuses_sources_with_per_layer_config_lists(tmp_path):
    source = tmp_path / "gemma3"
    tiny_model("gemma3").save_pretrained(source)
    ckpt = _pruned_checkpoint(tmp_path / "ckpt", "gemma3", [1], str(source))
    with pytest.raises(DepthpruneError, match=r"per-layer lists \(layer_types\)"):
        export(ckpt, tmp_path / "recipe.yml", "mergekit")
    assert not (tmp_path / "recipe.yml").exists()


def _mergekit_yaml_command() -> str:
    """mergekit-yaml beside this Python or on PATH (mergekit may live in its own virtual environment)."""
    path = shutil.which("mergekit-yaml", path=os.pathsep.join([str(Path(sys.executable).parent),
                                                               os.environ.get("PATH", "")]))
    if path is None:
        pytest.skip("mergekit is not installed (pip install mergekit, here or in a venv on PATH)")
    return path


@pytest.mark.slow
def test_mergekit_builds_the_same_model_from_the_recipe(tmp_path, tiny_checkpoint):
    from safetensors.numpy import load_file

    command = _mergekit_yaml_command()
    ckpt = _pruned_checkpoint(tmp_path / "ckpt", "llama", [1, 2, 4], str(tiny_checkpoint))
    export(ckpt, tmp_path / "recipe.yml", "mergekit")
    subprocess.run([command, str(tmp_path / "recipe.yml"), str(tmp_path / "merged")], check=True,
                   capture_output=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    merged, ours = load_file(tmp_path / "merged" / "model.safetensors"), load_file(ckpt / "model.safetensors")
    assert sorted(merged) == sorted(ours)
    assert all(np.array_equal(merged[name], ours[name]) for name in ours)
    assert json.loads((tmp_path / "merged" / "config.json").read_text())["num_hidden_layers"] == 3


def test_mergekit_recipe_needs_a_pruning_record(tmp_path, tiny_checkpoint):
    copy = tmp_path / "plain"
    shutil.copytree(tiny_checkpoint, copy)
    with pytest.raises(DepthpruneError, match="no depthprune.json with removed layers"):
        mergekit_yaml(copy)


# --- the embedded models in llama.cpp (slow) ---------------------------------------------------------------

# The 25 % similarity cuts of examples/*/analysis: ℓ*(n) for n = round(0.25 L). Gemma 3 keeps its period.
EMBEDDED_CUTS = {"smollm2-135m": list(range(11, 19)), "gemma3-270m": list(range(14, 18))}
COMPARED_TOKENS = 256


def _llama_cpp():
    return pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed "
                               "(pip install 'depthprune[gguf-runtime]'): llama.cpp checks skipped")


def _c4_ids(tokenizer, data: Path, count: int) -> list[int]:
    stream: list[int] = []
    for line in (data / "c4" / "validation.jsonl").open():
        stream += tokenizer(json.loads(line)["text"])["input_ids"]
        if len(stream) >= count:
            return stream[:count]
    raise AssertionError("not enough C4 text")


def _hf_logits(model, ids: list[int]) -> np.ndarray:
    import torch

    with torch.no_grad():
        return model(input_ids=torch.tensor([ids])).logits[0].float().numpy()


def _agreement(llama_logits: np.ndarray, hf_logits: np.ndarray) -> dict:
    return {"top1": float((llama_logits.argmax(1) == hf_logits.argmax(1)).mean()),
            "max_abs": float(np.abs(llama_logits - hf_logits).max()),
            "mean_abs": float(np.abs(llama_logits - hf_logits).mean())}


@pytest.fixture(scope="module", params=list(EMBEDDED_CUTS))
def embedded(request, tmp_path_factory, shared_data):
    """An embedded model's GGUF, its 25 % cut written by cut_gguf, the HF model and C4 token ids."""
    from depthprune.model.load import load_model, resolve_model_source

    _llama_cpp()
    alias = request.param
    directory = tmp_path_factory.mktemp(alias)
    source = Path(resolve_model_source(alias).location)
    reader = open_gguf(source)
    cut = directory / "cut.gguf"
    cut_gguf(source, EMBEDDED_CUTS[alias], cut, criterion="similarity", reader=reader)
    model, tokenizer = load_model(alias)
    ids = _c4_ids(tokenizer, shared_data, COMPARED_TOKENS)
    return {"alias": alias, "source": source, "reader": reader, "cut": cut, "dir": directory, "model": model, "tokenizer": tokenizer,
            "ids": ids, "layers": EMBEDDED_CUTS[alias]}


@pytest.mark.slow
def test_embedded_cut_keeps_every_tensor_byte_identical(embedded):
    before, after = _tensor_bytes(embedded["reader"]), _tensor_bytes(embedded["cut"])
    kept = [i for i in range(len({n.split(".")[1] for n in before if n.startswith("blk.")}))
            if i not in embedded["layers"]]
    expected = {name: value for name, value in before.items() if not name.startswith("blk.")}
    for new, old in enumerate(kept):
        expected.update({name.replace(f"blk.{old}.", f"blk.{new}.", 1): value for name, value in before.items()
                         if name.startswith(f"blk.{old}.")})
    assert after == expected


@pytest.mark.slow
def test_embedded_cut_generates_and_matches_the_hf_cut_in_llama_cpp(embedded):
    """llama.cpp on the cut GGUF vs HF on the same cut of the de-quantized GGUF, against the same pair uncut.

    The two never agree exactly: llama.cpp multiplies the 4-bit weights with activations quantized to 8
    bits, in its own kernels; HF uses the de-quantized float32 weights. The uncut pair measures that noise
    (measured top-1 0.965 / 0.941, mean |Δ logit| 0.16 / 0.19 for SmolLM2 / Gemma 3). A cut model amplifies
    it (SmolLM2's 25 % cut: top-1 0.906, mean |Δ| 0.30), hence the margins below; a cut that is off by one
    layer lands far outside them (top-1 0.34 / 0.05, mean |Δ| 3.1 / 5.1), and so would a renumbering error
    or a wrong attention type (Gemma 3's global layers use another RoPE base than its sliding ones).
    """
    from depthprune.gguf.runtime import load_llama, next_token_logits
    from depthprune.model.surgery import layers_removed

    model, ids, layers = embedded["model"], embedded["ids"], embedded["layers"]
    full = _agreement(next_token_logits(load_llama(embedded["source"]), ids), _hf_logits(model, ids))
    llm = load_llama(embedded["cut"])
    ours = next_token_logits(llm, ids)
    with layers_removed(model, layers):
        cut = _agreement(ours, _hf_logits(model, ids))
    with layers_removed(model, [i - 1 for i in layers]):
        off_by_one = _agreement(ours, _hf_logits(model, ids))
    print(f"\n{embedded['alias']} llama.cpp vs HF over {len(ids)} C4 tokens: uncut {full}; cut {cut}; "
          f"cut vs the HF cut one layer earlier {off_by_one}")
    assert full["top1"] > 0.9
    assert cut["top1"] >= full["top1"] - 0.1
    assert cut["mean_abs"] <= 3 * full["mean_abs"] and cut["max_abs"] <= 2 * full["max_abs"]
    assert off_by_one["mean_abs"] > 5 * cut["mean_abs"]
    arch = llm.metadata["general.architecture"]
    assert int(llm.metadata[f"{arch}.block_count"]) == model.config.num_hidden_layers - len(layers)
    text = llm.create_completion("The capital of France is", max_tokens=8, temperature=0)["choices"][0]["text"]
    assert text.strip(), "the cut model generated nothing"


# Loss tolerance per outtype (nats). float16 keeps 11 significant bits of each weight, bfloat16 8 (measured
# gaps on SmolLM2's 25 % cut: 0.001 and 0.009). With q8_0 weights llama.cpp also quantizes the activations to
# 8 bits per block of 32; the unhealed 25 % cuts amplify that noise (measured 0.075 nats for SmolLM2, 0.003 for
# Gemma 3, and 0.003 for the uncut SmolLM2 exported to q8_0).
EXPORT_TOLERANCE = {"f16": 0.01, "bf16": 0.03, "q8_0": 0.15}
EXPORTED = {"smollm2-135m": ("f16", "bf16", "q8_0"), "gemma3-270m": ("q8_0",)}


@pytest.mark.slow
def test_exported_checkpoint_matches_hf_loss_and_tokenizes_identically_in_llama_cpp(embedded, shared_data):
    """A cut float checkpoint (a healed one has the same form) exported to GGUF: same C4 loss in llama.cpp as in HF."""
    from depthprune.api import prune
    from depthprune.gguf.runtime import load_llama, mean_nll, next_token_logits
    from depthprune.model.load import load_model
    from depthprune.select import format_layers

    ckpt = embedded["dir"] / "checkpoint"
    prune(embedded["alias"], ckpt, layers=format_layers(embedded["layers"]), progress=False)
    model, _ = load_model(str(ckpt))
    ids = embedded["ids"]
    hf_loss = mean_nll(_hf_logits(model, ids), ids)
    lines = (shared_data / "c4" / "validation.jsonl").read_text().splitlines()[:20]
    texts = [json.loads(line)["text"] for line in lines]
    source_vocab = load_llama(embedded["source"], logits_all=False)
    for outtype in EXPORTED[embedded["alias"]]:
        out = export(ckpt, embedded["dir"] / f"export-{outtype}.gguf", "gguf", outtype)
        llm = load_llama(out)
        gap = abs(mean_nll(next_token_logits(llm, ids), ids) - hf_loss)
        print(f"\n{embedded['alias']} exported {outtype}: HF loss {hf_loss:.4f}, llama.cpp - HF {gap:.5f} nats")
        assert gap < EXPORT_TOLERANCE[outtype]
        for text in texts:
            data = text.encode("utf-8")
            assert llm.tokenize(data, add_bos=True) == source_vocab.tokenize(data, add_bos=True)
        del llm
        out.unlink()


@pytest.mark.slow
def test_cli_prunes_an_embedded_model_by_measured_similarity_into_a_gguf(tmp_path, shared_data, capsys):
    """The selection is measured on the de-quantized copy; the cut is applied to the 4-bit file."""
    from depthprune.cli.app import main
    from depthprune.model.load import resolve_model_source

    out = tmp_path / "cut.gguf"
    assert main(["prune", "smollm2-135m", "--fraction", "0.1", "--data", str(shared_data / "c4" / "validation.jsonl"),
                 "--samples", "8", "--seq-len", "64", "--out", str(out)]) == 0
    assert "quantization kept" in capsys.readouterr().out
    reader = open_gguf(out)
    assert field_value(reader, "depthprune.criterion") == "similarity"
    assert field_value(reader, "depthprune.source") == "smollm2-135m"
    assert len(field_value(reader, "depthprune.removed_layers")) == 3
    source_types = {t.tensor_type.name for t in open_gguf(resolve_model_source("smollm2-135m").location).tensors}
    assert {t.tensor_type.name for t in reader.tensors} == source_types  # still Q4_1 (and Q8_0, F32)
