"""MMLU and BoolQ scoring: the fast path (prefix KV cache, batching, padding, sorting, own LM head) must give
the same log-likelihoods as a naive one-prompt-at-a-time implementation, on tiny random models."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoTokenizer, Gemma3ForCausalLM, Gemma3TextConfig, LlamaConfig, LlamaForCausalLM

from depthprune.errors import DepthpruneError
from depthprune.evaluate import scoring
from depthprune.evaluate.tasks import boolq, mmlu
from depthprune.model.load import convert_gguf, resolve_model_source


@pytest.fixture(scope="session")
def tokenizer():
    # The real SmolLM2 tokenizer from the converted checkpoint in the cache (no download).
    return AutoTokenizer.from_pretrained(convert_gguf(resolve_model_source("smollm2-135m").location))


def _llama(tokenizer, **overrides):
    settings = dict(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096)
    config = LlamaConfig(**{**settings, **overrides})
    torch.manual_seed(0)
    return LlamaForCausalLM(config).eval()


def _gemma3(tokenizer):
    # Sliding-window layers with a window far shorter than the prompts, and logit soft-capping: both must
    # survive the prefix cache and our own LM head.
    config = Gemma3TextConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                              num_attention_heads=2, num_key_value_heads=1, head_dim=16, sliding_window=16,
                              layer_types=["sliding_attention", "sliding_attention", "full_attention"],
                              final_logit_softcapping=5.0, max_position_embeddings=4096)
    torch.manual_seed(0)
    return Gemma3ForCausalLM(config).eval()


@torch.no_grad()
def naive_loglikelihoods(model, tokenizer, prompt: str, choices: list[str]) -> list[float]:
    """One prompt at a time, whole-vocabulary logits at every position, as lm-eval computes them."""
    stripped = prompt.rstrip()
    spaces = prompt[len(stripped):]
    context = tokenizer(stripped)["input_ids"]
    out, seen = [], {}
    for choice in choices:
        whole = tokenizer(stripped + spaces + choice)["input_ids"]
        cont = whole[len(context):]
        ids = (context + cont)[:-1]
        if tuple(ids) not in seen:  # one-token choices share their input: run it once
            seen[tuple(ids)] = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0].float(), dim=-1)
        logprobs = seen[tuple(ids)]
        out.append(sum(logprobs[len(context) - 1 + j, t].item() for j, t in enumerate(cont)))
    return out


MMLU_DEV = {
    "astronomy": [
        ["What is the Sun?", "A star", "A planet", "A moon", "A comet", "A"],
        ["How many planets orbit the Sun?", "7", "8", "9", "10", "B"],
        ["Which planet is red?", "Venus", "Earth", "Mars", "Jupiter", "C"],
        ["What is a light year?", "A time", "A speed", "A mass", "A distance", "D"],
        ["Is Pluto a planet, officially?", "Yes", "No, a dwarf planet", "It is a star", "Unknown", "B"],
        ["Sixth dev question, never a shot with k=5", "a", "b", "c", "d", "A"],
    ],
    "high_school_biology": [
        ["What carries oxygen in blood?", "Platelets", "Plasma", "Hemoglobin", "Insulin", "C"],
        ["DNA is made of?", "Nucleotides", "Amino acids", "Lipids", "Sugars only", "A"],
        ["Mitochondria produce?", "DNA", "ATP", "RNA", "Protein", "B"],
        ["Photosynthesis happens in?", "Nucleus", "Ribosome", "Vacuole", "Chloroplast", "D"],
        ["Cells divide by?", "Mitosis", "Osmosis", "Diffusion", "Fusion", "A"],
    ],
}
MMLU_TEST = {
    "astronomy": [
        ["Which is the largest planet?", "Mercury", "Jupiter", "Earth", "Mars", "B"],
        ["What causes tides, mostly?", "Wind", "The Moon's gravity", "Earthquakes", "Sunspots", "B"],
        ["  Spaces around, \"quotes\", commas, and a\nnewline?  ", "one, two", "\"three\"", "four", "five", "D"],
        ["Short?", "x", "y", "z", "w", "A"],
        ["A much longer question about the cosmic microwave background radiation and what it tells us "
         "about the early universe, its temperature and its uniformity across the sky?",
         "Nothing", "The universe was hot and dense", "Stars are cold", "Galaxies are young", "B"],
    ],
    "high_school_biology": [
        ["Which organelle holds the genome?", "Nucleus", "Golgi", "Lysosome", "Membrane", "A"],
        ["Enzymes are mostly?", "Lipids", "Proteins", "Carbohydrates", "Minerals", "B"],
        ["What do ribosomes make?", "Lipids", "Sugars", "Proteins", "DNA", "C"],
    ],
}


def _write_mmlu(root, dev=MMLU_DEV, test=MMLU_TEST):
    import csv

    for split, data in (("dev", dev), ("test", test)):
        (root / split).mkdir(parents=True, exist_ok=True)
        for subject, rows in data.items():
            with (root / split / f"{subject}_{split}.csv").open("w", newline="", encoding="utf-8") as f:
                csv.writer(f).writerows(rows)
    return root


@pytest.fixture
def mmlu_dir(tmp_path):
    return _write_mmlu(tmp_path / "mmlu")


def test_mmlu_prompt_is_exact():
    dev = [mmlu.Question("college_physics", "What is 1+1?", ["1", "2", "3", "4"], 1),
           mmlu.Question("college_physics", "Speed of light?", ["c", "2c", "0", "c/2"], 0)]
    q = mmlu.Question("college_physics", " Which force binds nuclei? ", ["Strong", "Weak", "Gravity", "None"], 0)
    expected = (
        "The following are multiple choice questions (with answers) about college physics.\n\n"
        "What is 1+1?\nA. 1\nB. 2\nC. 3\nD. 4\nAnswer: B\n\n"
        "Speed of light?\nA. c\nB. 2c\nC. 0\nD. c/2\nAnswer: A\n\n"
        "Which force binds nuclei?\nA. Strong\nB. Weak\nC. Gravity\nD. None\nAnswer:"
    )
    assert mmlu.build_prompt("college_physics", dev, q) == expected


def test_boolq_prompt_is_exact():
    assert boolq.build_prompt("Paris -- capital of France.", "is paris in france") == (
        "Paris -- capital of France.\nQuestion: is paris in france?\nAnswer:"
    )


@pytest.mark.parametrize(("arch", "batch_size"), [("llama", 1), ("llama", 3), ("gemma3", 3)])
def test_mmlu_fast_path_equals_naive(tokenizer, mmlu_dir, arch, batch_size):
    model = _llama(tokenizer) if arch == "llama" else _gemma3(tokenizer)
    result = mmlu.evaluate_mmlu(model, tokenizer, str(mmlu_dir), shots=5, batch_size=batch_size, details=True,
                                progress=False)
    test, dev = mmlu.load_mmlu(str(mmlu_dir))
    questions = [(s, q) for s, qs in test.items() for q in qs]
    assert len(result["questions"]) == len(questions) == 8
    for record, (subject, q) in zip(result["questions"], questions, strict=True):
        prompt = mmlu.build_prompt(subject, dev[subject][:5], q)
        expected = naive_loglikelihoods(model, tokenizer, prompt, [" A", " B", " C", " D"])
        assert record["loglikelihoods"] == pytest.approx(expected, abs=1e-4)
        assert record["prediction"] == "ABCD"[max(range(4), key=expected.__getitem__)]
        assert record["answer"] == "ABCD"[q.answer] and record["shots"] == 5
    per_subject = [result["subjects"][s]["accuracy"] for s in test]
    assert result["accuracy"] == pytest.approx(sum(per_subject) / 2)
    correct = sum(r["prediction"] == r["answer"] for r in result["questions"])
    assert result["accuracy_over_questions"] == pytest.approx(correct / 8)
    assert result["chance"] == 0.25 and result["num_truncated"] == 0


def test_prefix_cache_is_used_and_shared(tokenizer, mmlu_dir, monkeypatch):
    """The shared prefix runs once per subject and covers the k-shot examples."""
    model = _llama(tokenizer)
    lengths = []
    original = scoring._Scorer.prefix_cache
    monkeypatch.setattr(scoring._Scorer, "prefix_cache", lambda self, t: lengths.append(len(t)) or original(self, t))
    mmlu.evaluate_mmlu(model, tokenizer, str(mmlu_dir), shots=5, batch_size=2, progress=False)
    test, dev = mmlu.load_mmlu(str(mmlu_dir))
    assert len(lengths) == 2
    for subject, n in zip(test, lengths, strict=True):
        prefix = tokenizer(mmlu.prompt_prefix(subject, dev[subject][:5]))["input_ids"]
        assert n >= len(prefix) - 1


def test_mmlu_truncation_drops_shots_from_the_front(tokenizer, mmlu_dir):
    model = _llama(tokenizer)
    test, dev = mmlu.load_mmlu(str(mmlu_dir))
    q = test["astronomy"][0]
    two_shots = len(tokenizer(mmlu.build_prompt("astronomy", dev["astronomy"][:2], q))["input_ids"])
    max_length = two_shots + 2  # room for 2 shots, not 3
    result = mmlu.evaluate_mmlu(model, tokenizer, str(mmlu_dir), subjects=["astronomy"], limit=1,
                                max_length=max_length, details=True, progress=False)
    record = result["questions"][0]
    assert record["shots"] == 2 and result["num_truncated"] == 1
    prompt, k = mmlu._fitting_prompt("astronomy", dev["astronomy"], q, 5, tokenizer, max_length)
    assert k == 2 and prompt.endswith("Which is the largest planet?\nA. Mercury\nB. Jupiter\nC. Earth\nD. Mars\nAnswer:")
    assert "What is the Sun?" in prompt and "Which planet is red?" not in prompt  # the first shots stay
    expected = naive_loglikelihoods(model, tokenizer, prompt, [" A", " B", " C", " D"])
    assert record["loglikelihoods"] == pytest.approx(expected, abs=1e-4)


def _write_boolq(path, n=7):
    # Examples 2k and 2k+1 share their passage (as many BoolQ questions do), so some prompts share a prefix.
    rows = [{"passage": f"Passage {i // 2} -- " + "some words about things " * (i // 2 * 5 + 1), "question": f"is it {i}",
             "label": ["true", "false", True, 0, 1, "false", "true"][i % 7], "idx": i} for i in range(n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_boolq_fast_path_equals_naive(tokenizer, tmp_path, arch):
    model = _llama(tokenizer) if arch == "llama" else _gemma3(tokenizer)
    source = _write_boolq(tmp_path / "dev.jsonl")
    result = boolq.evaluate_boolq(model, tokenizer, str(source), batch_size=3, details=True, progress=False)
    examples = boolq.load_boolq(str(source))
    labels = [1, 0, 1, 0, 1, 0, 1]
    assert [y for *_, y in examples] == labels
    correct = 0
    for record, (passage, question, label) in zip(result["examples"], examples, strict=True):
        expected = naive_loglikelihoods(model, tokenizer, boolq.build_prompt(passage, question), [" no", " yes"])
        assert record["loglikelihoods"] == pytest.approx(expected, abs=1e-4)
        prediction = int(expected[1] > expected[0])
        assert record["prediction"] == ("yes" if prediction else "no")
        correct += prediction == label
    assert result["accuracy"] == pytest.approx(correct / 7)
    assert result["majority_baseline"] == pytest.approx(4 / 7)
    limited = boolq.evaluate_boolq(model, tokenizer, str(source), limit=3, progress=False)
    assert limited["num_examples"] == 3


def test_multi_token_choices_and_groups_equal_naive(tokenizer):
    """Choices of several tokens, grouped prompts that share a prefix, and a prompt with trailing space."""
    model = _llama(tokenizer)
    shared = "A shared preamble that every prompt in the group starts with. " * 3
    prompts = [shared + "First question?", shared + "Second, longer question here?", shared + "Third: ", "Alone"]
    choices = [[" yes indeed", " no", " perhaps not at all"]] * 4
    encoded = scoring.encode_choices(tokenizer, prompts, choices)
    requests = [scoring.ChoiceRequest(c, k, "g" if i < 3 else None) for i, (c, k) in enumerate(encoded)]
    fast = scoring.choice_loglikelihoods(model, tokenizer, requests, batch_size=2, progress=False)
    for prompt, options, got in zip(prompts, choices, fast, strict=True):
        assert got == pytest.approx(naive_loglikelihoods(model, tokenizer, prompt, options), abs=1e-4)


def test_unknown_logit_postprocessing_falls_back_to_the_models_head(tokenizer, tmp_path):
    """A model whose forward changes the logits (here a hook) must be scored through its own forward."""
    model = _llama(tokenizer)
    model.register_forward_hook(lambda module, args, output: output.__setitem__("logits", output.logits * 3.0))
    assert not scoring._Scorer(model, 0).own_head
    source = _write_boolq(tmp_path / "dev.jsonl", n=4)
    result = boolq.evaluate_boolq(model, tokenizer, str(source), batch_size=2, details=True, progress=False)
    for record, (passage, question, _) in zip(result["examples"], boolq.load_boolq(str(source)), strict=True):
        expected = naive_loglikelihoods(model, tokenizer, boolq.build_prompt(passage, question), [" no", " yes"])
        assert record["loglikelihoods"] == pytest.approx(expected, abs=1e-4)


def test_own_head_is_used_for_softcapped_gemma(tokenizer):
    assert scoring._Scorer(_gemma3(tokenizer), 0).own_head


@pytest.mark.parametrize(
    ("rows", "message"),
    [
        ([["q", "a", "b", "c", "A"]], "row 1 has 5 columns, expected 6"),
        ([["q", "a", "b", "c", "d", "A"], ["q", "a", "b", "c", "d", "E"]], "row 2 has answer 'E'"),
        ([], "no questions in this file"),
    ],
)
def test_mmlu_bad_data_names_file_and_row(tmp_path, rows, message):
    root = _write_mmlu(tmp_path / "mmlu", test={"astronomy": rows})
    with pytest.raises(DepthpruneError, match=message) as info:
        mmlu.load_mmlu(str(root))
    assert "astronomy_test.csv" in str(info.value)


def test_mmlu_missing_pieces(tmp_path, mmlu_dir):
    with pytest.raises(DepthpruneError, match="not found"):
        mmlu.load_mmlu(str(tmp_path / "nowhere"))
    with pytest.raises(DepthpruneError, match="unknown MMLU subject"):
        mmlu.load_mmlu(str(mmlu_dir), ["astrology"])
    (mmlu_dir / "dev" / "astronomy_dev.csv").unlink()
    with pytest.raises(DepthpruneError, match="astronomy_dev.csv' is missing"):
        mmlu.load_mmlu(str(mmlu_dir))
    (tmp_path / "only_test" / "test").mkdir(parents=True)
    with pytest.raises(DepthpruneError, match="no dev/ folder"):
        mmlu.load_mmlu(str(tmp_path / "only_test"))


def test_boolq_bad_data(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"passage": "p", "question": "q", "label": "true"}\n{"passage": "p", "question": "q", "label": "maybe"}\n')
    with pytest.raises(DepthpruneError, match=r"bad.jsonl:2: label 'maybe'"):
        boolq.load_boolq(str(bad))
    bad.write_text('{"passage": "p", "label": true}\n')
    with pytest.raises(DepthpruneError, match=r"bad.jsonl:1: missing text field\(s\) question"):
        boolq.load_boolq(str(bad))
    with pytest.raises(DepthpruneError, match="not a file"):
        boolq.load_boolq(str(tmp_path))


@pytest.fixture
def tiny_checkpoint(tokenizer, tmp_path):
    """A tiny Llama saved like a pruned checkpoint (3 layers, layer 1 removed), with the real tokenizer."""
    from depthprune.model.record import pruning_record
    from depthprune.model.surgery import remove_layers, save_pruned
    from depthprune.select import explicit_selection

    model = _llama(tokenizer, num_hidden_layers=3)
    remove_layers(model, [1])
    record = pruning_record("tiny", 3, 0, model, explicit_selection("1", 3, None))
    return save_pruned(model, tokenizer, tmp_path / "pruned", record)


def test_cli_eval_writes_results(tiny_checkpoint, mmlu_dir, tmp_path, capsys):
    from depthprune import evaluate_model
    from depthprune.cli.app import main

    boolq_file = _write_boolq(tmp_path / "boolq.jsonl")
    out = tmp_path / "results" / "r.json"
    code = main(["eval", str(tiny_checkpoint), "--tasks", "mmlu,boolq", "--mmlu", str(mmlu_dir), "--boolq",
                 str(boolq_file), "--shots", "2", "--mmlu-limit", "2", "--limit", "2", "--batch-size", "4", "--out", str(out)])
    assert code == 0
    printed = capsys.readouterr().out
    assert "mean over 2 subjects" in printed and "boolq" in printed and "(1 removed from 3)" in printed
    result = json.loads(out.read_text())
    assert result["num_layers"] == 2 and result["removed_layers"] == [1] and result["layers_before"] == 3
    m = result["tasks"]["mmlu"]
    assert (m["shots"], m["num_questions"], m["limit_per_subject"], m["data"]) == (2, 4, 2, str(mmlu_dir))
    assert set(m["subjects"]) == {"astronomy", "high_school_biology"}
    assert result["tasks"]["boolq"]["num_examples"] == 2
    # The API gives the same numbers as the CLI.
    again = evaluate_model(str(tiny_checkpoint), mmlu=str(mmlu_dir), shots=2, mmlu_limit=2, progress=False)
    assert list(again["tasks"]) == ["mmlu"]
    assert again["tasks"]["mmlu"]["accuracy"] == m["accuracy"]


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--tasks", "mmlu"], "task 'mmlu' needs its data: pass --mmlu"),
        (["--tasks", "boolq,c4", "--boolq", "x.jsonl"], "task 'c4' needs its data: pass --c4"),
        (["--tasks", "squad"], "unknown task(s) squad"),
        (["--tasks", "hellaswag"], "task 'hellaswag' needs its data: pass --hellaswag"),
        ([], "nothing to evaluate"),
    ],
)
def test_cli_eval_needs_data_options(argv, message, capsys):
    from depthprune.cli.app import main

    assert main(["eval", "smollm2-135m", *argv]) == 2
    assert message in capsys.readouterr().err


def test_lm_eval_bridge_runs_a_local_task_like_our_scorer(tokenizer, shared_data):
    """lm-eval's accuracy on the bundled local ARC-Easy task equals our own scoring of the same prompts."""
    pytest.importorskip("lm_eval")
    from depthprune.evaluate.lm_eval_bridge import lm_eval_summary, run_lm_eval

    model = _llama(tokenizer)
    output = run_lm_eval(model, tokenizer, ["arc_easy_local"], data_dir=shared_data, limit=6, batch_size=4)
    summary = lm_eval_summary(output)["arc_easy_local"]
    assert summary["num_examples"] == 6
    rows = [json.loads(line) for line in (shared_data / "arc" / "ARC-Easy-Test.jsonl").open()][:6]
    prompts = [f"Question: {r['question']['stem']}\nAnswer:" for r in rows]
    choices = [[" " + c["text"] for c in r["question"]["choices"]] for r in rows]
    requests = [scoring.ChoiceRequest(c, k) for c, k in scoring.encode_choices(tokenizer, prompts, choices)]
    scores = scoring.choice_loglikelihoods(model, tokenizer, requests, batch_size=4, progress=False)
    gold = [[c["label"] for c in r["question"]["choices"]].index(r["answerKey"]) for r in rows]
    correct = sum(max(range(len(s)), key=s.__getitem__) == g for s, g in zip(scores, gold, strict=True))
    assert summary["acc"] == pytest.approx(correct / 6)


def test_lm_eval_bridge_errors(tokenizer, tmp_path, shared_data):
    pytest.importorskip("lm_eval")
    from depthprune.evaluate.lm_eval_bridge import run_lm_eval

    with pytest.raises(DepthpruneError, match="unknown lm-eval task"):
        run_lm_eval(_llama(tokenizer), tokenizer, ["no_such_task_xyz"], data_dir=shared_data)
    with pytest.raises(DepthpruneError, match="not a directory"):
        run_lm_eval(_llama(tokenizer), tokenizer, ["arc_easy_local"], include=tmp_path / "missing")
    import importlib.util

    from depthprune.evaluate.lm_eval_bridge import BUNDLED_TASKS

    spec = importlib.util.spec_from_file_location("arc_local", BUNDLED_TASKS / "arc_local.py")
    arc_local = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(arc_local)
    with pytest.raises(DepthpruneError, match="arc/ARC-Easy-Test.jsonl"):
        arc_local.load_arc(data_dir=str(tmp_path))
    (tmp_path / "arc").mkdir()
    (tmp_path / "arc" / "ARC-Easy-Test.jsonl").write_text('{"id": "x", "question": {"stem": "q"}}\n')
    with pytest.raises(DepthpruneError, match=r"ARC-Easy-Test.jsonl:1: not an ARC record"):
        arc_local.load_arc(data_dir=str(tmp_path))


@pytest.mark.slow
def test_real_model_mmlu_fast_path_equals_naive(shared_data):
    """SmolLM2-135M with real 5-shot MMLU prompts (hundreds of tokens of shared prefix)."""
    from depthprune import load_model

    model, tok = load_model("smollm2-135m")
    source = str(shared_data / "mmlu")
    result = mmlu.evaluate_mmlu(model, tok, source, subjects=["astronomy", "marketing"], limit=2, batch_size=2,
                                details=True, progress=False)
    test, dev = mmlu.load_mmlu(source, ["astronomy", "marketing"])
    questions = [(s, q) for s in test for q in test[s][:2]]
    for record, (subject, q) in zip(result["questions"], questions, strict=True):
        expected = naive_loglikelihoods(model, tok, mmlu.build_prompt(subject, dev[subject][:5], q),
                                        [" A", " B", " C", " D"])
        assert record["loglikelihoods"] == pytest.approx(expected, abs=1e-4)
