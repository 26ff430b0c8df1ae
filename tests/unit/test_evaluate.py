"""Evaluation suite: NLL against a known distribution, zero drift for identical models, the passkey generator,
NLL-by-position buckets, plots, the suite's train/eval mode, and the two command-line tools on a tiny
model."""

import importlib.util
import json
import math
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import torch

from distill.config import ModelConfig, RopeConfig
from distill.data.dataset import STREAM_INFO, PackedStream, tokenizer_fingerprint
from distill.eval.common import DocTotals, mean_se, token_nll
from distill.eval.passkey import (
    PASSKEY_LOOKUP,
    PASSKEY_NEEDLE,
    _score_answers,
    filler_from_stream,
    greedy_decode,
    needle_grid,
    passkey_accuracy,
    passkey_prompts,
)
from distill.eval.position import bucket_edges, nll_by_position, plot_nll_by_position
from distill.eval.retention import short_retention
from distill.eval.suite import evaluate_suite
from distill.model.load import load_student, load_teacher
from distill.model.objectives import lm_loss
from distill.testing import stdlib_files

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def write_stream(path, tokenizer, docs, seq_len, split="holdout"):
    """A built stream directory as PackedStream reads it: best-effort sequential packing of whole documents
    (each cut to seq_len), padding with 0, plus stream.json."""
    import datasets

    rows, lengths, cur, cur_lens = [], [], [], []
    for doc in docs:
        doc = list(doc[:seq_len])
        if len(cur) + len(doc) > seq_len:
            rows.append(cur + [0] * (seq_len - len(cur)))
            lengths.append(cur_lens)
            cur, cur_lens = [], []
        cur, cur_lens = cur + doc, cur_lens + [len(doc)]
    if cur:
        rows.append(cur + [0] * (seq_len - len(cur)))
        lengths.append(cur_lens)
    datasets.Dataset.from_dict({"input_ids": rows, "lengths": lengths}).save_to_disk(str(path))
    info = {"seq_len": seq_len, "split": split, "tokenizer_fingerprint": tokenizer_fingerprint(tokenizer)}
    with open(os.path.join(path, STREAM_INFO), "w") as f:
        json.dump(info, f)
    return str(path)


@pytest.fixture(scope="module")
def tokenizer(tokenizer_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tokenizer_dir)


@pytest.fixture(scope="module")
def built(tmp_path_factory, tokenizer):
    """{"short": 64-token rows of several documents, "long": 256-token rows of one or two documents}."""
    root = tmp_path_factory.mktemp("built")
    texts = []
    for path in stdlib_files(min_bytes=4000, limit=12):
        with open(path, encoding="utf-8", errors="replace") as f:
            texts.append(f.read())
    docs = [tokenizer(t, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id] for t in texts]
    short_docs = [d[: 10 + 7 * i] for i, d in enumerate(docs)]  # 10..87 tokens: several per 64-token row
    long_docs = [d[: (100, 120, 256)[i % 3]] for i, d in enumerate(docs)]  # rows [100, 120], [256], ...
    return {"root": str(root),
            "short": write_stream(root / "holdout" / "short", tokenizer, short_docs, 64),
            "long": write_stream(root / "holdout" / "long", tokenizer, long_docs, 256)}


@pytest.fixture(scope="module")
def teacher(tiny_llama):
    return load_teacher(None, ModelConfig(path=tiny_llama, dtype="float32", attention="sdpa"))


@pytest.fixture(scope="module")
def student(tiny_llama):
    rope = RopeConfig(method="abf", theta=1.0e6, target_length=1024)
    return load_student(ModelConfig(path=tiny_llama, dtype="float32", attention="sdpa"), rope)


def _uniform_model(path):
    """The tiny model with lm_head zeroed: every next-token distribution is uniform over V."""
    model = load_teacher(None, ModelConfig(path=path, dtype="float32", attention="sdpa"))
    model.get_output_embeddings().weight.data.zero_()
    return model


# ------------------------------------------------------------------------------------------------------------
# NLL and drift
# ------------------------------------------------------------------------------------------------------------

def test_uniform_model_nll_is_log_vocab(tiny_llama, built):
    model = _uniform_model(tiny_llama)
    vocab = model.get_output_embeddings().weight.shape[0]
    short = short_retention(model, None, built["short"], max_rows=4, batch_size=3)
    assert short["short_nll"] == pytest.approx(math.log(vocab), abs=1e-5)
    assert short["short_ppl"] == pytest.approx(vocab, rel=1e-4)
    stream = PackedStream(built["short"])
    # Tokens with a target: every document token but each document's first (labels convention).
    expected = sum(sum(stream.lengths(i)) - len(stream.lengths(i)) for i in range(4))
    assert short["short_tokens"] == expected
    long = nll_by_position(model, built["long"], max_rows=3, buckets=4, original_length=128)
    assert all(v == pytest.approx(math.log(vocab), abs=1e-5) for v in long["nll"])
    assert long["long_nll_beyond"] == pytest.approx(math.log(vocab), abs=1e-5)


def test_token_nll_matches_chunked_lm_loss(teacher, built):
    batch = PackedStream(built["short"]).batch([0, 1, 2])
    final = teacher.model(input_ids=batch["input_ids"], position_ids=batch["position_ids"],
                          attention_mask=None, use_cache=False).last_hidden_state
    weight = teacher.get_output_embeddings().weight
    nll, has_target = token_nll(final, weight, batch["labels"], chunk_size=37)  # odd chunk: several chunks
    with torch.no_grad():
        ref_sum, ref_count = lm_loss(final, weight, batch["labels"])
    assert int(has_target.sum()) == int(ref_count)
    assert nll.sum().item() == pytest.approx(ref_sum.item(), rel=1e-5)
    assert bool((nll[~has_target] == 0).all())
    # Entry t is the loss of predicting token t: position 0 of every row never has a target.
    assert not has_target[:, 0].any()


def test_identical_teacher_has_no_drift(teacher, tiny_llama, built):
    same = load_teacher(None, ModelConfig(path=tiny_llama, dtype="float32", attention="sdpa"))
    out = short_retention(same, teacher, built["short"], max_rows=4, batch_size=2, attention_rows=2)
    assert out["kl_teacher_student"] == pytest.approx(0.0, abs=1e-10)
    assert out["teacher_short_nll"] == pytest.approx(out["short_nll"], abs=1e-6)
    n_layers = teacher.config.num_hidden_layers
    assert len(out["hidden_cosine"]) == n_layers + 1
    assert all(c == pytest.approx(1.0, abs=1e-5) for c in out["hidden_cosine"])
    assert len(out["attention_kl"]) == n_layers
    assert all(abs(v) < 1e-6 for v in out["attention_kl"])


def test_extended_student_drifts_and_modes_are_restored(student, teacher, built):
    student.train()
    out = short_retention(student, teacher, built["short"], max_rows=4, batch_size=4, attention_rows=2)
    assert student.training and all(m.training for m in student.modules())
    assert not teacher.training
    # A random-init model is close to uniform, so its drift is small but far from the identical case's 0.
    assert out["kl_teacher_student"] > 1e-8
    assert out["hidden_cosine"][0] == pytest.approx(1.0, abs=1e-6)  # embeddings: RoPE plays no part yet
    assert min(out["hidden_cosine"][1:]) < 1.0 - 1e-7
    assert max(out["attention_kl"]) > 1e-6


# ------------------------------------------------------------------------------------------------------------
# NLL by position
# ------------------------------------------------------------------------------------------------------------

def test_bucket_edges():
    assert bucket_edges(256, 4) == [0, 64, 128, 192, 256]
    assert bucket_edges(100, 3) == [0, 34, 68, 100]
    assert bucket_edges(256, "log2") == [0, 1, 2, 4, 8, 16, 32, 64, 128, 256]
    assert bucket_edges(256, [128, 0, 256]) == [0, 128, 256]
    with pytest.raises(ValueError):
        bucket_edges(256, 0)


def test_nll_by_position_buckets_follow_document_positions(teacher, built):
    stream = PackedStream(built["long"])
    rows = 4
    res = nll_by_position(teacher, stream, max_rows=rows, buckets=[0, 64, 128, 256], original_length=128)
    # Expected counts from the documents' lengths: a document of n tokens has targets at positions 1..n-1.
    positions = np.concatenate([np.arange(1, n) for i in range(rows) for n in stream.lengths(i)])
    assert res["count"] == [int(((positions >= lo) & (positions < hi)).sum())
                            for lo, hi in [(0, 64), (64, 128), (128, 256)]]
    assert sum(res["count"]) == res["long_tokens"] == positions.size
    n_within = int((positions < 128).sum())
    n_beyond = positions.size - n_within
    assert n_beyond > 0 and n_within > 0
    mixed = (res["long_nll_within"] * n_within + res["long_nll_beyond"] * n_beyond) / positions.size
    assert mixed == pytest.approx(res["long_nll"], rel=1e-9)
    weighted = sum(v * c for v, c in zip(res["nll"], res["count"])) / sum(res["count"])
    assert weighted == pytest.approx(res["long_nll"], rel=1e-9)


def test_packed_documents_are_scored_alone(teacher, built):
    """A row with two documents gives the second one the same NLL as running it on its own (no leakage)."""
    stream = PackedStream(built["long"])
    i = next(i for i in range(len(stream)) if len(stream.lengths(i)) >= 2)
    row = stream.row(i)
    first = stream.lengths(i)[0]
    second = stream.lengths(i)[1]
    batch = {k: v[None] for k, v in row.items()}
    final = teacher.model(input_ids=batch["input_ids"], position_ids=batch["position_ids"],
                          attention_mask=None, use_cache=False).last_hidden_state
    nll, _ = token_nll(final, teacher.lm_head.weight, batch["labels"])
    doc = row["input_ids"][first: first + second][None]
    alone = teacher.model(input_ids=doc, position_ids=torch.arange(second)[None], attention_mask=None,
                          use_cache=False).last_hidden_state
    labels = doc.clone()
    labels[:, 0] = -100
    nll_alone, _ = token_nll(alone, teacher.lm_head.weight, labels)
    torch.testing.assert_close(nll[0, first: first + second], nll_alone[0], atol=1e-4, rtol=1e-4)


def _documents(stream, rows):
    """[(row, token ids of one document)] of the first rows of a packed stream."""
    out = []
    for i in range(rows):
        ids, at = stream.input_ids(i), 0
        for n in stream.lengths(i):
            out.append(torch.tensor(np.asarray(ids[at: at + n]), dtype=torch.long))
            at += n
    return out


def _plain_nll(model, doc):
    """(n - 1,) NLL of tokens 1.. of one document, from AutoModelForCausalLM's own logits."""
    logits = model(input_ids=doc[None]).logits[0, :-1].float()  # (n - 1, V)
    return torch.nn.functional.cross_entropy(logits, doc[1:], reduction="none")


def test_mean_se_is_the_ratio_estimators_standard_error():
    rng = np.random.default_rng(0)
    counts = rng.integers(5, 50, size=30)
    sums = np.array([rng.normal(2.0, 0.5, size=n).sum() for n in counts])
    m = sums.sum() / counts.sum()
    by_hand = math.sqrt(30 / 29 * sum((s - m * n) ** 2 for s, n in zip(sums, counts))) / counts.sum()
    assert mean_se(sums, counts) == pytest.approx(by_hand, rel=1e-12)
    assert mean_se(list(sums) + [0.0], list(counts) + [0]) == pytest.approx(by_hand, rel=1e-12)  # no tokens
    assert math.isnan(mean_se([3.0], [2]))  # one document: no spread to measure
    # Documents with the same mean NLL per token: no spread between them, whatever their lengths.
    assert mean_se([2.0, 6.0, 10.0], [1, 3, 5]) == pytest.approx(0.0, abs=1e-12)
    totals = DocTotals()  # accumulated over batches, a document split across them adds up
    nll = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    doc = torch.tensor([[0, 0, 1], [1, 2, 2]])
    totals.add(nll[:1], torch.ones(1, 3, dtype=torch.bool), doc[:1])
    totals.add(nll[1:], torch.tensor([[True, True, False]]), doc[1:])
    assert totals.sums == {0: 3.0, 1: 7.0, 2: 5.0} and totals.counts == {0: 2, 1: 2, 2: 1}
    assert totals.mean() == pytest.approx(15.0 / 5)


def test_long_nll_and_its_se_equal_a_plain_transformers_recomputation(teacher, built):
    """Our packed, chunked NLL equals AutoModelForCausalLM's logits run on each document alone, and the
    standard error is the one of those per-document sums."""
    stream = PackedStream(built["long"])
    res = nll_by_position(teacher, stream, max_rows=4, original_length=128)
    with torch.no_grad():
        per_doc = [_plain_nll(teacher, d) for d in _documents(stream, 4)]
    sums = [float(x.sum()) for x in per_doc]
    counts = [len(x) for x in per_doc]
    assert res["long_documents"] == len(per_doc) > 2
    assert res["long_nll"] == pytest.approx(sum(sums) / sum(counts), rel=1e-5)
    assert res["long_nll_se"] == pytest.approx(mean_se(sums, counts), rel=1e-4)
    beyond = [x[127:] for x in per_doc]  # entry t-1 is token t: tokens at positions ≥ 128
    assert res["long_nll_beyond"] == pytest.approx(
        sum(float(x.sum()) for x in beyond) / sum(len(x) for x in beyond), rel=1e-5)


def test_rolling_window_equals_a_sliding_reference(teacher, built):
    """Stride 1: every token after the first window is predicted from exactly the window − 1 tokens before
    it, at positions 0..window−1, as a plain loop over AutoModelForCausalLM computes it."""
    stream = PackedStream(built["long"])
    window = 24
    res = nll_by_position(teacher, stream, max_rows=2, buckets=[0, window, 256], window=window, stride=1)
    total, count = 0.0, 0
    with torch.no_grad():
        for doc in _documents(stream, 2):
            for t in range(1, len(doc)):
                context = doc[max(0, t - window + 1): t + 1]
                total += float(_plain_nll(teacher, context)[-1])
                count += 1
    assert res["long_tokens"] == count
    assert res["long_nll"] == pytest.approx(total / count, rel=1e-5)
    # Half-window stride (the default): each token scored once; the first window is the whole document's.
    whole = nll_by_position(teacher, stream, max_rows=2, buckets=[0, window, 256])
    half = nll_by_position(teacher, stream, max_rows=2, buckets=[0, window, 256], window=window)
    assert half["count"] == whole["count"] == res["count"]
    assert half["nll"][0] == pytest.approx(whole["nll"][0], rel=1e-5)
    assert half["nll"][1] != pytest.approx(whole["nll"][1], rel=1e-4)  # beyond it, the context is cut
    long_enough = nll_by_position(teacher, stream, max_rows=2, buckets=[0, window, 256], window=256)
    assert long_enough["long_nll"] == pytest.approx(whole["long_nll"], rel=1e-5)
    with pytest.raises(ValueError, match="stride"):
        nll_by_position(teacher, stream, max_rows=1, window=8, stride=8)


# ------------------------------------------------------------------------------------------------------------
# Passkey
# ------------------------------------------------------------------------------------------------------------

def _find(seq, sub):
    return [i for i in range(len(seq) - len(sub) + 1) if seq[i: i + len(sub)] == sub]


def test_filler_drops_the_corpus_own_passkey_lines(tmp_path, tokenizer):
    """Held-out text of a corpus with key statements and look-ups (the demo's) must not bring other keys into
    a passkey prompt: with a tokenizer, the filler drops every line that mentions the key, keeps the rest."""
    text = ("def first():\n    return 1\n" + PASSKEY_NEEDLE.format(key="11111") + "\nx = [1, 2]\n"
            + PASSKEY_LOOKUP.format(key="11111") + "\nclass Later:\n    pass\n")
    doc = tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    plain = tokenizer("y = 2\n", add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    stream = write_stream(tmp_path / "holdout" / "long", tokenizer, [doc, plain], 256)
    filler = filler_from_stream(stream, tokenizer=tokenizer)
    decoded = tokenizer.decode(filler.tolist())
    assert "PASSKEY" not in decoded and "11111" not in decoded
    for kept in ("def first():", "return 1", "x = [1, 2]", "class Later:", "y = 2"):
        assert kept in decoded, kept
    assert int((filler == tokenizer.eos_token_id).sum()) == 2  # document separators kept
    assert "PASSKEY" in tokenizer.decode(filler_from_stream(stream).tolist())  # without one: as it is


@pytest.mark.parametrize("depth", [0.0, 0.3, 1.0])
def test_passkey_prompt_shape_depth_and_determinism(tokenizer, built, depth):
    filler = filler_from_stream(built["long"])
    prompt, answer = passkey_prompts(tokenizer, filler, 200, depth, 7)
    assert len(prompt) == 200
    key = tokenizer.decode(answer).strip()
    assert key.isdigit() and len(key) == 5
    # The statements are tokenized as inside a document (no piece the tokenizer puts before text of its
    # own): exactly the tokens the demo corpus trains on.
    def inline(text):
        lead = len(tokenizer("x", add_special_tokens=False)["input_ids"])
        return tokenizer("x" + text, add_special_tokens=False)["input_ids"][lead:]

    needle = inline(f"\n{PASSKEY_NEEDLE.format(key=key)}\n")
    hits = _find(prompt, needle)
    assert len(hits) == 1
    lookup = inline(f"\n{PASSKEY_LOOKUP.format(key=key)}")
    assert prompt[-(len(lookup) - len(answer)):] + answer == lookup
    budget = 200 - len(needle) - (len(lookup) - len(answer))
    assert hits[0] == round(depth * budget)
    assert passkey_prompts(tokenizer, filler, 200, depth, 7) == (prompt, answer)  # same seed, same prompt
    other = passkey_prompts(tokenizer, filler, 200, depth, 8)
    assert other != (prompt, answer)


def test_passkey_prompt_errors_and_short_filler(tokenizer):
    prompt, _ = passkey_prompts(tokenizer, [5, 6, 7], 100, 0.5, 0)  # filler wraps around
    assert len(prompt) == 100
    with pytest.raises(ValueError, match="depth"):
        passkey_prompts(tokenizer, [5, 6, 7], 100, 1.5, 0)
    with pytest.raises(ValueError, match="shorter"):
        passkey_prompts(tokenizer, [5, 6, 7], 5, 0.5, 0)


def test_passkey_scoring_equals_greedy_decoding(teacher, tokenizer, built):
    filler = filler_from_stream(built["long"])
    prompts = [passkey_prompts(tokenizer, filler, 96, d, s)[0] for d, s in ((0.0, 1), (0.5, 2), (1.0, 3))]
    greedy = [greedy_decode(teacher, p, 4) for p in prompts]
    hits, logps = _score_answers(teacher, prompts, greedy)
    assert hits == [True, True, True]
    wrong = [g[:-1] + [(g[-1] + 1) % teacher.config.vocab_size] for g in greedy]
    hits, wrong_logps = _score_answers(teacher, prompts, wrong)
    assert hits == [False, False, False]
    assert all(a > b for a, b in zip(logps, wrong_logps))  # greedy tokens are the most likely ones


def test_passkey_accuracy_grid_and_heatmap(teacher, tokenizer, built, tmp_path):
    filler = filler_from_stream(built["long"])
    path = str(tmp_path / "needle.png")
    grid = needle_grid(teacher, tokenizer, filler, [64, 128], [0.0, 1.0], samples=2, seed=3, path=path)
    assert np.asarray(grid["grid_accuracy"]).shape == (2, 2)
    assert 0.0 <= grid["accuracy"] <= 1.0 and grid["logprob"] < 0
    assert set(grid["by_length"]) == {"64", "128"}
    with open(path, "rb") as f:
        assert f.read(8) == PNG_MAGIC and os.path.getsize(path) > 1000
    again = passkey_accuracy(teacher, tokenizer, filler, [64, 128], [0.0, 1.0], samples=2, seed=3)
    assert again["grid_logprob"] == grid["grid_logprob"]


# ------------------------------------------------------------------------------------------------------------
# Plots and the suite
# ------------------------------------------------------------------------------------------------------------

def test_plot_nll_by_position(tmp_path):
    res = {"centers": [31.5, 95.5, 159.5], "nll": [3.0, 2.5, float("nan")], "original_length": 128}
    path = plot_nll_by_position({"a": res, "b": {**res, "nll": [3.1, 2.7, 2.9]}},
                                str(tmp_path / "p" / "n.png"))
    with open(path, "rb") as f:
        assert f.read(8) == PNG_MAGIC and os.path.getsize(path) > 1000


def test_evaluate_suite_flat_figures_files_and_mode(student, teacher, tokenizer, built, tmp_path):
    student.train()
    out = str(tmp_path / "eval")
    figures = evaluate_suite(student, teacher, built["short"], built["long"], 128, 1024, out_dir=out,
                             max_rows=4, passkey_samples=1, tokenizer=tokenizer, passkey_lengths=[64, 192],
                             passkey_depths=[0.5], short_whole_stream=built["long"],
                             teacher_baselines=True)
    assert student.training and not teacher.training
    for key in ("short_nll", "short_nll_se", "teacher_short_nll", "teacher_short_nll_se", "short_nll_gap",
                "short_nll_gap_se", "kl_teacher_student", "hidden_cosine_mean", "hidden_cosine/0",
                "attention_kl/1", "long_nll", "long_nll_se", "long_nll_beyond", "long_nll_beyond_se",
                "teacher_rolling_long_nll", "teacher_rolling_long_nll_beyond", "short_whole_nll",
                "short_whole_nll_se", "teacher_short_whole_nll", "passkey_accuracy", "passkey_logprob",
                "passkey_accuracy/64", "passkey_accuracy_within_window", "passkey_accuracy_beyond_window",
                "teacher_passkey_accuracy_within_window"):
        assert key in figures, key
    assert figures["passkey_accuracy_within_window"] == figures["passkey_accuracy/64"]
    assert figures["passkey_accuracy_beyond_window"] == figures["passkey_accuracy/192"]
    # The teacher through its own 128-token window: the same as whole documents up to 128, then cut.
    assert figures["teacher_rolling_long_nll_within"] == pytest.approx(figures["teacher_long_nll_within"],
                                                                       rel=1e-5)
    assert figures["teacher_rolling_long_nll_beyond"] != pytest.approx(figures["teacher_long_nll_beyond"])
    assert figures["short_whole_nll"] == pytest.approx(figures["long_nll"])  # the same stream, scored whole
    assert all(figures[k] > 0 for k in figures if k.endswith("_se"))
    assert all(isinstance(v, (int, float)) for v in figures.values())
    assert figures["short_nll_gap"] == pytest.approx(figures["short_nll"] - figures["teacher_short_nll"])
    with open(os.path.join(out, "eval.json")) as f:
        record = json.load(f)
    assert record["figures"]["short_nll"] == pytest.approx(figures["short_nll"])
    nothing_beyond = evaluate_suite(student, None, None, built["long"], 256, 1024)
    assert math.isnan(nothing_beyond["long_nll_beyond"])  # 256-token rows never pass a 256-token window
    for name in ("nll_by_position.png", "needle_student.png"):
        assert os.path.getsize(os.path.join(out, name)) > 1000
    cheap = evaluate_suite(student, None, built["short"], None, 256, 1024)  # no teacher, no long data
    assert set(cheap) == {"short_nll", "short_nll_se", "short_ppl"}
    with pytest.raises(ValueError, match="tokenizer"):
        evaluate_suite(student, None, None, built["long"], 128, 256, passkey_samples=1)


# ------------------------------------------------------------------------------------------------------------
# Command-line tools
# ------------------------------------------------------------------------------------------------------------

def _script(name):
    spec = importlib.util.spec_from_file_location(f"_script_{name}",
                                                  os.path.join(ROOT, "scripts", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _run(name, *args):
    env = {**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "2"}
    return subprocess.run([sys.executable, os.path.join(ROOT, "scripts", f"{name}.py"), *args], check=False,
                          capture_output=True, text=True, env=env, timeout=120)


def test_evaluate_cli_writes_json_and_plots(tiny_llama, built, tmp_path, capsys):
    # In-process (the script's main): a subprocess would spend most of its time importing torch again.
    out = tmp_path / "cli"
    code = _script("evaluate").main([
        "--model", tiny_llama, "--teacher", tiny_llama, "--short-data", built["root"],
        "--long-data", built["long"],
        "--original-length", "128", "--out", str(out), "--max-rows", "2", "--passkey-samples", "1",
        "--lengths", "64,128", "--depths", "0,1", "--extra-data", f"again={built['short']}"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    record = json.loads((out / "eval.json").read_text())
    assert record["details"]["original_length"] == 128 and record["details"]["target_length"] == 256
    assert record["short_data"].endswith(os.path.join("holdout", "short"))  # a built root resolves
    figures = record["figures"]
    assert figures["kl_teacher_student"] == pytest.approx(0.0, abs=1e-6)
    assert figures["long_nll_beyond"] is not None and figures["teacher_long_nll"] == figures["long_nll"]
    # Another held-out stream is scored as the short one: the short stream again gives its figures exactly.
    assert figures["again_nll"] == figures["short_nll"] and figures["again_nll_se"] == figures["short_nll_se"]
    assert record["extra_data"] == {"again": os.path.abspath(built["short"])}
    assert record["details"]["passkey"]["student"]["lengths"] == [64, 128]
    for name in ("nll_by_position.png", "needle_student.png", "needle_teacher.png"):
        assert (out / name).read_bytes()[:8] == PNG_MAGIC
    assert "short_nll" in captured.out


def test_evaluate_cli_with_flash_attention_equals_sdpa_varlen(tiny_llama, built, tmp_path, capsys,
                                                             flash_standin):
    """scripts/evaluate.py --attention flash_attention_2 (transformers' flash path, the CPU stand-in
    underneath, bf16 autocast as on a GPU) gives the figures of sdpa_varlen within bf16 noise; packed rows
    reach the varlen entry point with their documents separated."""
    figures = {}
    for name in ("sdpa_varlen", "flash_attention_2"):
        flash_standin.module.reset()
        code = _script("evaluate").main([
            "--model", tiny_llama, "--teacher", tiny_llama, "--short-data", built["short"],
            "--long-data", built["long"], "--original-length", "128", "--out", str(tmp_path / name),
            "--max-rows", "4", "--passkey-samples", "1", "--lengths", "64,128", "--depths", "0,1",
            "--attention", name, "--no-teacher-baselines"])
        assert code == 0, capsys.readouterr().err
        figures[name] = json.loads((tmp_path / name / "eval.json").read_text())["figures"]
    calls = flash_standin.calls
    assert {c["dtype"] for c in calls} == {"bfloat16"}
    assert max(c.get("documents", 0) for c in calls) > 2  # a flattened batch of packed short rows
    want, got = figures["sdpa_varlen"], figures["flash_attention_2"]
    for key in ("short_nll", "long_nll", "short_whole_nll"):
        if key in want:
            assert got[key] == pytest.approx(want[key], rel=2e-2), key


@pytest.mark.parametrize("argv, message", [
    (["--model", "{missing}", "--short-data", "{short}", "--long-data", "{long}"],
     "--model .*no such directory"),
    (["--model", "{model}", "--short-data", "{missing}", "--long-data", "{long}"],
     "--short-data .*no such directory"),
    (["--model", "{model}", "--short-data", "{short}", "--long-data", "{model}"],
     "--long-data .*not a built stream"),
    (["--model", "{model}", "--short-data", "{short}", "--long-data", "{long}", "--frobnicate"],
     "unrecognized"),
    (["--model", "{model}", "--short-data", "{short}", "--long-data", "{long}"], "--original-length"),
    (["--model", "{model}", "--short-data", "{short}", "--long-data", "{long}", "--depths", "0,2"], "depths"),
    (["--model", "{model}", "--short-data", "{short}", "--extra-data", "a b={short}"],
     "--extra-data .*NAME=STREAM"),
    (["--model", "{model}", "--short-data", "{short}", "--extra-data", "x={missing}"],
     "--extra-data .*no such directory"),
    (["--model", "{model}", "--short-data", "{short}", "--extra-data", "short={short}"],
     "--extra-data .*suite's own figures"),
])
def test_evaluate_cli_errors_are_one_line(tiny_llama, built, tmp_path, capsys, argv, message):
    values = {"model": tiny_llama, "short": built["short"], "long": built["long"],
              "missing": str(tmp_path / "nope")}
    code = _script("evaluate").main([a.format(**values) for a in argv])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert len(err) == 1 and err[0].startswith("error: ")
    assert re.search(message, err[0]), err[0]
    assert not (tmp_path / "nope").exists()


def test_select_layers_cli(tiny_llama, built, tmp_path):
    out = tmp_path / "layers.yaml"
    proc = _run("select_layers", "--model", tiny_llama, "--rope-method", "abf", "--rope-theta", "1e6",
                "--target-length", "1024", "--data", built["short"], "--top-k", "1", "--rows", "2",
                "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    ranking = [line.split() for line in lines if line.strip() and line.split()[0].isdigit()]
    assert len(ranking) == 2  # two decoder layers ranked
    top_index = int(ranking[0][2])
    expected = sorted({top_index, 2})  # top-1 plus the last layer (hidden_states index 2)
    snippet = f"layers: [{', '.join(map(str, expected))}]"
    assert snippet in lines
    assert snippet in out.read_text()
    kls = [float(r[3]) for r in ranking]
    assert kls == sorted(kls, reverse=True) and kls[0] > 0


def test_select_layers_cli_errors(tiny_llama, built, capsys):
    main = _script("select_layers").main
    assert main(["--model", tiny_llama, "--rope-method", "abf", "--target-length", "1024", "--data",
                 built["short"], "--top-k", "1"]) == 2
    assert (capsys.readouterr().err.strip()
            == "error: rope.theta: abf needs a positive rope theta (e.g. 2.0e7)")
    assert main(["--model", tiny_llama, "--rope-method", "rope2", "--target-length", "1024", "--data",
                 built["short"], "--top-k", "1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--rope-method" in err[0]


# ------------------------------------------------------------------------------------------------------------
# The α sweep
# ------------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def extended_dir(student, tokenizer_dir, tmp_path_factory):
    """The extended student (ABF θ 1e6, 1024 window) with weights moved away from the original's, saved as a
    Hugging Face model directory."""
    from transformers import AutoTokenizer

    path = tmp_path_factory.mktemp("extended")
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in student.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=generator))
    student.save_pretrained(path)
    AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(path)
    return str(path)


def test_sweep_interpolates_in_memory_as_merge_writes_to_disk(tiny_llama, extended_dir, built, tmp_path):
    """θ(α) in memory equals `scripts/merge.py interpolate`'s output; α = 1 evaluates as the extended model
    itself, which is left as it was; the RoPE buffers stay the extended model's."""
    from transformers import AutoModelForCausalLM

    from distill.eval.sweep import interpolate_into, run_sweep, weights_of

    original = load_teacher(tiny_llama, ModelConfig(path=tiny_llama, dtype="float32", attention="sdpa"))
    extended = load_teacher(extended_dir, ModelConfig(path=extended_dir, dtype="float32", attention="sdpa"))
    a, b = weights_of(original), weights_of(extended)
    inv_freq = extended.model.rotary_emb.inv_freq.clone()
    assert _script("merge").main(["interpolate", "--original", tiny_llama, "--extended", extended_dir,
                                  "--alpha", "0.25", "--out", str(tmp_path / "merged"), "--quiet"]) == 0
    on_disk = AutoModelForCausalLM.from_pretrained(tmp_path / "merged" / "alpha-0.25").state_dict()
    interpolate_into(extended, a, b, 0.25)
    for name, value in extended.named_parameters():
        torch.testing.assert_close(value, on_disk[name], rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(extended.model.rotary_emb.inv_freq, inv_freq, rtol=0, atol=0)
    interpolate_into(extended, a, b, 1.0)

    stream = PackedStream(built["short"])
    direct = evaluate_suite(extended, original, stream, None, 256, 1024)
    record = run_sweep(original, extended, [0.0, 1.0], stream, None, 256, 1024, str(tmp_path / "sweep"),
                       points={"other": {"short_nll_gap": 0.1, "long_nll_beyond": 5.0}}, progress=False)
    assert [r["alpha"] for r in record["rows"]] == [0.0, 1.0]
    assert record["rows"][1]["short_nll"] == pytest.approx(direct["short_nll"], rel=1e-6)
    assert record["rows"][0]["short_nll"] != pytest.approx(direct["short_nll"], rel=1e-3)
    for name, value in extended.named_parameters():
        torch.testing.assert_close(value, b[name], rtol=0, atol=0)
    with open(tmp_path / "sweep" / "sweep.json") as f:
        assert json.load(f)["rows"][0]["alpha"] == 0.0
    assert (tmp_path / "sweep" / "pareto.png").read_bytes()[:8] == PNG_MAGIC
    assert "| α = 0 |" in (tmp_path / "sweep" / "sweep.md").read_text()


def test_sweep_cli_writes_table_plot_and_points(tiny_llama, extended_dir, built, tmp_path, capsys):
    main = _script("evaluate").main
    point = tmp_path / "point.json"
    point.write_text(json.dumps({"figures": {"short_nll_gap": 0.2, "long_nll_beyond": 6.0}}))
    out = tmp_path / "sweep"
    code = main(["--sweep", tiny_llama, extended_dir, "--alphas", "0,0.5,1", "--short-data", built["root"],
                 "--long-data", built["root"], "--original-length", "128", "--max-rows", "2",
                 "--passkey-samples", "1", "--lengths", "64,192", "--depths", "0.5",
                 "--point", f"Long CPT={point}", "--out", str(out)])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    record = json.loads((out / "sweep.json").read_text())
    assert [r["alpha"] for r in record["rows"]] == [0.0, 0.5, 1.0]
    assert record["points"]["Long CPT"]["short_nll_gap"] == 0.2
    assert record["teacher"]["short_nll_gap"] == 0.0 and record["teacher"]["long_nll_beyond"] > 0
    assert all(r["long_nll_beyond"] > 0 and r["short_nll_gap_se"] > 0 for r in record["rows"])
    assert (out / "alpha_0.5" / "eval.json").is_file() and (out / "pareto.png").stat().st_size > 1000
    assert "| Long CPT |" in (out / "sweep.md").read_text()
    assert "alpha_0.5/short_nll" in captured.out


@pytest.mark.parametrize("extra, message", [
    (["--model", "{model}"], "replaces --model"),
    (["--alphas", "0,1.5"], "--alphas.*\\[0, 1\\]"),
    (["--point", "nothing"], "--point 'nothing': expected NAME="),
])
def test_sweep_cli_errors_are_one_line(tiny_llama, extended_dir, built, capsys, extra, message):
    code = _script("evaluate").main(["--sweep", tiny_llama, extended_dir, "--short-data", built["root"],
                                     "--long-data", built["root"], "--original-length", "128",
                                     *[a.format(model=tiny_llama) for a in extra]])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and re.search(message, err[0]), err


def test_sweep_refuses_another_architecture(tiny_llama, tiny_models, built, capsys):
    code = _script("evaluate").main(["--sweep", tiny_llama, tiny_models["qwen2"], "--short-data",
                                     built["root"], "--long-data", built["root"], "--original-length", "128",
                                     "--tokenizer", tiny_llama])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("error: "), err


@pytest.mark.parametrize("task", ["niah_single", "niah_multikey", "niah_multivalue", "niah_multiquery",
                                  "variable_tracking", "common_words"])
def test_ruler_prompts_hold_their_answers(tokenizer, built, task):
    """Every RULER-style prompt is `length` tokens (common_words: at most), deterministic in its seed, and
    holds what it asks for; scoring is the fraction of expected strings generated."""
    import random

    from distill.eval.ruler import make_prompt, score

    filler = filler_from_stream(built["long"])
    prompt, answers = make_prompt(task, tokenizer, filler, 400, random.Random(3))
    assert len(prompt) == 400 or (task == "common_words" and 380 <= len(prompt) <= 400)
    assert make_prompt(task, tokenizer, filler, 400, random.Random(3)) == (prompt, answers)
    text = tokenizer.decode(prompt)
    assert answers and all(a in text for a in answers)
    assert score(" ".join(answers), answers) == 1.0 and score("nothing", answers) == 0.0
    with pytest.raises(ValueError, match="cannot hold"):
        make_prompt(task if task != "common_words" else "niah_multivalue", tokenizer, filler, 20,
                    random.Random(0))


def test_ruler_tasks_are_checked_in_one_line(tiny_llama, built, capsys):
    code = _script("evaluate").main(["--model", tiny_llama, "--short-data", built["short"],
                                     "--original-length", "128", "--ruler-tasks", "niah_single,nope"])
    assert code == 2 and "--ruler-tasks nope: unknown" in capsys.readouterr().err
