"""Every micro-batch reaches attention in a layout that isolates its documents with every backend.

flash_attention_2 (GPU only) separates packed documents by `position_ids` only when the batch has one row
(transformers' `_is_packed_sequence`), then derives the document boundaries with
`prepare_fa_kwargs_from_position_ids`. These tests feed the exact tensors the trainer builds
(`StreamObjectives.model_inputs`) into those two functions, and check on CPU that the flattened forward
equals the row-by-row one with sdpa_varlen.
"""

import dataclasses

import pytest
import torch
from transformers.modeling_flash_attention_utils import (
    _is_packed_sequence,
    prepare_fa_kwargs_from_position_ids,
)

from distill.config import ModelConfig, RopeConfig, load_recipe
from distill.data.dataset import PackedStream
from distill.model.load import load_student, load_teacher
from distill.train.step import StreamObjectives

from .test_train import recipe, write


def _objectives(cfg, name: str, data: str, attention: str = "flash_attention_2") -> StreamObjectives:
    """The stream's objectives as the trainer builds them for models running `attention`."""
    from distill.train.step import build_objectives

    one = dataclasses.replace(cfg, streams={name: cfg.streams[name]})
    return build_objectives(one, {name: PackedStream(data)}, {name: [1]}, 2, attention=attention)[name]


def _boundaries(stream: PackedStream, rows: list[int]) -> list[int]:
    """Where each document (and each row's trailing padding) starts in the flattened micro-batch, then its
    end."""
    starts, offset = [], 0
    for row in rows:
        lengths = stream.lengths(row)
        at = offset
        for n in lengths:
            starts.append(at)
            at += n
        if sum(lengths) < stream.seq_len:  # padding counts up from 0: a segment of its own
            starts.append(at)
        offset += stream.seq_len
    return starts + [offset]


@pytest.fixture(scope="module")
def packed(tmp_path_factory, corpus_dir, tokenizer_dir):
    """Small files packed best-fit into 1024-token rows: several documents per row."""
    from distill.data.build import build
    from distill.data.spec import spec_from_dict

    out = tmp_path_factory.mktemp("packed") / "built"
    build(spec_from_dict({
        "tokenizer": tokenizer_dir, "output_dir": str(out), "seed": 0,
        "sources": [{"name": "small", "kind": "files", "path": corpus_dir, "include": ["small_*.py"]}],
        "streams": {"short": {"sources": ["small"], "seq_len": 1024, "max_doc_tokens": 1024,
                              "pack": "best_fit"}},
    }), progress=False)
    return str(out / "short")


@pytest.fixture
def cfg(tmp_path, tiny_llama, built_data):
    path = write(recipe(tiny_llama, built_data, tmp_path / "run", "longred"), tmp_path / "r.yaml")
    return load_recipe(path)


def test_packed_micro_batches_reach_flash_attention_with_their_documents(cfg, packed):
    stream = _objectives(cfg, "short", packed)
    rows = [i for i in range(len(stream.data)) if len(stream.data.lengths(i)) > 1][:4]  # several documents
    assert len(rows) == 4
    batch, _ = stream.fetch(rows, "cpu", vocab_size=10**6)
    student, teacher = stream.model_inputs(batch, positions_seed=0)
    want = _boundaries(stream.data, rows)
    for inputs in (student, teacher):
        ids, positions = inputs["input_ids"], inputs["position_ids"]
        assert ids.shape == (1, 4 * stream.data.seq_len) and inputs["attention_mask"] is None
        assert _is_packed_sequence(positions, batch_size=ids.shape[0])  # flash takes the varlen path
        (cu_q, cu_k), (max_q, _) = prepare_fa_kwargs_from_position_ids(positions)
        assert cu_q.tolist() == cu_k.tolist() == want
        assert int(max_q) == max(b - a for a, b in zip(want, want[1:]))
        assert torch.equal(ids.view(4, -1), batch["input_ids"])  # the same tokens, row after row
    # The (B, T) layout that was fed before: flash would run plain batched causal attention over each row.
    assert not _is_packed_sequence(batch["position_ids"], batch_size=4)


def test_short_to_long_rows_stay_one_document_each(cfg, built_data):
    stream = _objectives(cfg, "s2l", built_data["s2l"])
    batch, _ = stream.fetch([0, 1, 2], "cpu", vocab_size=10**6)
    student, teacher = stream.model_inputs(batch, positions_seed=5)
    T = stream.data.seq_len
    # Student: each row its own document at skipped positions, with an explicit mask (flash's unpadding path
    # or plain batched attention, never position-based splitting).
    assert student["input_ids"].shape == (3, T)
    assert torch.equal(student["attention_mask"], torch.ones(3, T, dtype=torch.long))
    assert bool((student["position_ids"].diff(dim=1) > 0).all()) and int(student["position_ids"].max()) > T
    # Teacher: native positions, flattened: one document per row.
    (cu, _), _ = prepare_fa_kwargs_from_position_ids(teacher["position_ids"])
    assert cu.tolist() == [0, T, 2 * T, 3 * T]


def test_flattened_forward_equals_row_by_row(cfg, packed, tiny_llama):
    """sdpa_varlen on the flattened micro-batch gives each document's hidden states as its own row does."""
    stream = _objectives(cfg, "short", packed)
    rows = [i for i in range(len(stream.data)) if len(stream.data.lengths(i)) > 1][:4]
    batch, _ = stream.fetch(rows, "cpu", vocab_size=10**6)
    student_inputs, teacher_inputs = stream.model_inputs(batch, positions_seed=0)
    model_cfg = ModelConfig(path=tiny_llama, dtype="float32", attention="sdpa_varlen")
    student = load_student(model_cfg, RopeConfig(method="abf", theta=40000.0, target_length=1024)).eval()
    teacher = load_teacher(None, model_cfg)
    for model, inputs in ((student, student_inputs), (teacher, teacher_inputs)):
        with torch.no_grad():
            flat = model(**inputs, output_hidden_states=True, use_cache=False).hidden_states
            each = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"],
                         attention_mask=None, output_hidden_states=True, use_cache=False).hidden_states
        for a, b in zip(flat, each):
            torch.testing.assert_close(a.view(b.shape), b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("attention", ["sdpa", "sdpa_varlen", "eager"])
def test_other_backends_keep_their_rows(cfg, packed, attention):
    """Only flash needs one row: transformers' sdpa would build one (B·T)² mask instead of B masks of T²
    (2.3x slower at 4 x 1024), so the other backends get the B rows, with no offsets."""
    stream = _objectives(cfg, "short", packed, attention)
    assert not stream.flatten
    rows = list(range(4))
    batch, _ = stream.fetch(rows, "cpu", vocab_size=10**6)
    assert "offsets" not in batch
    student, teacher = stream.model_inputs(batch, positions_seed=0)
    for inputs in (student, teacher):
        assert inputs["input_ids"].shape == (4, stream.data.seq_len) and inputs["attention_mask"] is None
        assert set(inputs) == {"input_ids", "position_ids", "attention_mask"}
