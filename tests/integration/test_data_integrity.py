"""Built data that cannot be silently wrong: checksums verified on demand (`prepare_data.py --verify`), row
counts and file sizes checked against the manifest at start-up, and every batch's token ids range-checked
(a bad row stops the run with a checkpoint and one line naming the stream, the row and the file, or is
skipped and counted)."""

import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from distill.data.dataset import PackedStream
from distill.train.metrics import read_metrics

from .test_train import ROOT, recipe, train_cli, write

SCRIPT = os.path.join(ROOT, "scripts", "prepare_data.py")


@pytest.fixture
def data_copy(tmp_path, built_data):
    """A private copy of the session's built data (these tests damage it)."""
    root = tmp_path / "built"
    shutil.copytree(built_data["root"], root)
    return {name: str(root / name) for name in ("long", "short", "s2l")} | {"root": str(root)}


def _arrow_file(stream_dir: str) -> str:
    names = sorted(n for n in os.listdir(stream_dir) if n.endswith(".arrow"))
    return os.path.join(stream_dir, names[0])


def _poke_token(stream_dir: str, row: int, position: int, value: int) -> None:
    """Overwrite one int32 token id of a row inside the Arrow file, in place (as a flipped disk block would).
    The rows' ids are one contiguous int32 buffer: find row 0 whole, then step to (row, position)."""
    stream = PackedStream(stream_dir)
    path = _arrow_file(stream_dir)
    with open(path, "rb") as f:
        data = f.read()
    base = data.find(np.asarray(stream.input_ids(0), dtype="<i4").tobytes())
    assert base >= 0
    offset = base + 4 * (row * stream.seq_len + position)
    assert (int(np.frombuffer(data[offset: offset + 4], dtype="<i4")[0])
            == int(stream.input_ids(row)[position]))
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(np.asarray([value], dtype="<i4").tobytes())


def _verify(directory):
    return subprocess.run([sys.executable, SCRIPT, "--verify", directory, "--quiet"], capture_output=True,
                          text=True, cwd=ROOT, timeout=120)


def test_verify_passes_intact_data_and_names_each_damaged_file(data_copy):
    ok = _verify(data_copy["root"])
    assert ok.returncode == 0, ok.stderr
    assert "files match the manifest" in ok.stdout
    _poke_token(data_copy["long"], 2, 10, 7)  # a flipped value inside the data: same size, other bytes
    with open(_arrow_file(data_copy["s2l"]), "ab") as f:
        f.write(b"\0" * 8)  # and a file that grew
    bad = _verify(data_copy["root"])
    assert bad.returncode == 1
    lines = [line for line in bad.stderr.splitlines() if line.startswith("bad:")]
    assert len(lines) == 2, bad.stderr
    assert any(_arrow_file(data_copy["long"]) in line and "sha256" in line for line in lines)
    assert any(_arrow_file(data_copy["s2l"]) in line and "bytes" in line for line in lines)
    assert "Traceback" not in bad.stderr
    missing = _verify(os.path.join(data_copy["root"], "long"))  # a stream dir, not the build root
    assert missing.returncode == 2 and missing.stderr.startswith("error: ") and \
        "not a built data directory" in missing.stderr


def test_startup_refuses_a_stream_whose_files_changed_size(tmp_path, tiny_llama, data_copy, capsys):
    from distill.train import loop as train

    with open(_arrow_file(data_copy["short"]), "ab") as f:
        f.write(b"\0" * 64)
    cfg = recipe(tiny_llama, data_copy, tmp_path / "run", "longred", steps=1)
    capsys.readouterr()
    assert train.main([write(cfg, tmp_path / "r.yaml")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: streams.short.data: ") and \
        "bytes, but the build recorded" in err[0] and "--verify" in err[0]
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def _bad_row_recipe(model, data, out, **train):
    cfg = recipe(model, data, out, "long_cpt", steps=3)
    cfg["train"].update({"save_every": 1, **train})
    return cfg


def test_out_of_vocabulary_row_stops_with_a_checkpoint_and_one_line(tmp_path, tiny_llama, data_copy):
    stream = PackedStream(data_copy["long"])
    rows = len(stream)
    for row in range(rows):  # every row: whichever the plan draws first is bad
        _poke_token(data_copy["long"], row, 5 + row, 999_999)
    cfg = _bad_row_recipe(tiny_llama, data_copy, tmp_path / "run")
    proc = train_cli(write(cfg, tmp_path / "r.yaml"))
    assert proc.returncode == 2, proc.stderr[-2000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in proc.stderr
    assert errors[0].startswith("error: streams.long: row ")
    assert "token id 999999" in errors[0] and _arrow_file(data_copy["long"]) in errors[0]
    assert "train.bad_rows: skip" in errors[0]
    # The checkpoint holds the state before the step that met the row: resuming replays that step.
    assert (tmp_path / "run" / "checkpoints" / "step-0" / "COMPLETE").exists()


def test_out_of_vocabulary_row_is_skipped_and_counted(tmp_path, tiny_llama, data_copy):
    from distill.data.mixture import Mixture, StreamPlan

    cfg = _bad_row_recipe(tiny_llama, data_copy, tmp_path / "run", bad_rows="skip")
    cfg["streams"]["long"]["micro_batch"] = 2
    cfg["mix"]["tokens_per_step"] = 4096  # two micro-batches of 2 rows per step
    rows = len(PackedStream(data_copy["long"]))
    plan = Mixture([StreamPlan("long", rows, 1024, 2, 1.0)], 4096, cfg["run"]["seed"])
    first, second = [[r for mb in plan.plan(step) for r in mb.rows] for step in (0, 1)]
    _poke_token(data_copy["long"], first[0], 3, -5)  # two bad rows in step 1, one in step 2
    _poke_token(data_copy["long"], first[3], 3, 999_999)
    _poke_token(data_copy["long"], second[1], 700, 999_999)
    proc = train_cli(write(cfg, tmp_path / "r.yaml"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    records = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert [r.get("skipped_rows", 0) for r in records] == [2, 3, 3]
    assert all(np.isfinite(r["loss"]) for r in records)


def test_damaged_document_lengths_are_a_bad_row_not_a_crash(data_copy):
    """`lengths` that do not fit the row (a damaged Arrow column) are reported like an out-of-range id;
    reading the row no longer raises inside numpy."""
    import torch

    stream = PackedStream(data_copy["short"])
    stream._len_values[0] = stream._len_values[0].copy()
    start = int(stream._len_offsets[0][1])  # row 1's first document length
    stream._len_values[0][start] = -3
    batch = stream.batch([0, 1, 2])  # no ValueError from np.repeat
    lines, mask = stream.bad_rows([0, 1, 2], batch["input_ids"], vocab_size=10**6)
    assert mask.tolist() == [False, True, False] and len(lines) == 1
    assert lines[0].startswith(f"row 1 of {stream.path}") and "do not fit a row of 256 tokens" in lines[0]
    assert isinstance(mask, torch.Tensor)
