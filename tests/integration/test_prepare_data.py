"""End to end: build a small spec from stdlib files with the sentencepiece tokenizer, read rows back
through PackedStream; determinism, held-out split, tokenizer refusal, overwrite safety and the CLI."""

import json
import os
import subprocess
import sys

import pytest
import torch
import yaml
from transformers import AutoTokenizer

from distill.data import DataError, PackedStream, build, tokenizer_fingerprint
from distill.data.dataset import IGNORE_INDEX
from distill.data.spec import spec_from_dict
from distill.testing import train_tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCRIPT = os.path.join(ROOT, "scripts", "prepare_data.py")


def _spec_dict(tokenizer_dir, out):
    return {
        "tokenizer": tokenizer_dir,
        "output_dir": str(out),
        "seed": 3,
        "sources": [
            {"name": "json_pkg", "kind": "files", "path": "{stdlib}/json", "include": ["*.py"]},
            {"name": "email_pkg", "kind": "files", "path": "{stdlib}/email/*.py", "weight": 2.0},
        ],
        "streams": {
            "long": {"sources": ["json_pkg", "email_pkg"], "seq_len": 512, "pack": "concat",
                     "min_doc_tokens": 64},
            "short": {"sources": ["json_pkg", "email_pkg"], "seq_len": 128, "pack": "best_fit"},
            "s2l": {"sources": ["email_pkg"], "seq_len": 128, "pack": "window", "min_doc_tokens": 128,
                    "max_tokens": 20000},
        },
        "holdout": {"fraction": 0.15},
    }


@pytest.fixture(scope="module")
def built(tmp_path_factory, tokenizer_dir):
    out = tmp_path_factory.mktemp("built") / "demo"
    manifest = build(spec_from_dict(_spec_dict(tokenizer_dir, out)), progress=False)
    return out, manifest


def _segments(row, lengths):
    off, out = 0, []
    for n in lengths:
        out.append(tuple(row["input_ids"][off: off + n].tolist()))
        off += n
    return out


def test_layout_and_stream_info(built, tokenizer_dir):
    out, manifest = built
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    for name, seq_len, mode in [("long", 512, "concat"), ("short", 128, "best_fit"), ("s2l", 128, "window")]:
        for split, path in [("train", out / name), ("holdout", out / "holdout" / name)]:
            info = json.loads((path / "stream.json").read_text())
            assert info["stream"] == name and info["split"] == split and info["seq_len"] == seq_len
            assert info["pack"] == mode and info["eos_token_id"] == tok.eos_token_id
            assert info["tokenizer_fingerprint"] == tokenizer_fingerprint(tok)
            stream = PackedStream(path, tokenizer=tok)
            assert len(stream) == info["rows"] == manifest["streams"][name][split]["rows"]
            real = sum(sum(stream.lengths(i)) for i in range(len(stream)))
            assert real == info["real_tokens"] and info["padding_tokens"] == len(stream) * seq_len - real
            assert (path / "dataset_info.json").exists()
    assert manifest["tokenizer"]["vocab_size"] == len(tok.get_vocab())
    assert set(manifest["checksums"]) >= {"long/data-00000-of-00001.arrow",
                                          "holdout/s2l/data-00000-of-00001.arrow"}
    assert manifest["spec"]["streams"]["long"]["seq_len"] == 512
    assert manifest["streams"]["long"]["train"]["fill"] == 1.0  # concat drops only the final partial row
    assert manifest["streams"]["short"]["train"]["fill"] > 0.95


def test_rows_positions_labels(built, tokenizer_dir):
    out, _ = built
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    short = PackedStream(out / "short", tokenizer=tok)
    batch = short.batch([0, 1, len(short) - 1])
    assert set(batch) == {"input_ids", "position_ids", "labels", "num_docs"}
    assert batch["input_ids"].shape == (3, 128) and batch["input_ids"].dtype == torch.int64
    for b, i in enumerate([0, 1, len(short) - 1]):
        row, lengths = short.row(i), short.lengths(i)
        assert torch.equal(batch["input_ids"][b], row["input_ids"])
        assert batch["num_docs"][b] == len(lengths)
        start = 0
        for n in lengths:
            assert row["position_ids"][start: start + n].tolist() == list(range(n))
            assert row["labels"][start] == IGNORE_INDEX
            assert torch.equal(row["labels"][start + 1: start + n], row["input_ids"][start + 1: start + n])
            if n < 128:  # whole documents and the tails of split ones end with EOS
                assert row["input_ids"][start + n - 1] == tok.eos_token_id
            start += n
        assert (row["labels"][start:] == IGNORE_INDEX).all()
        assert row["position_ids"][start:].tolist() == list(range(128 - start))
    # A long row decodes back to stdlib source text.
    long = PackedStream(out / "long")
    text = tok.decode(long.row(0)["input_ids"][: long.lengths(0)[0]].tolist())
    assert len(text) > 100
    s2l = PackedStream(out / "s2l")
    assert all(s2l.lengths(i) == [128] for i in range(len(s2l)))
    assert 20000 - 128 < s2l.info["real_tokens"] <= 20000  # max_tokens


def test_holdout_documents_never_in_train(tokenizer_dir, tmp_path):
    # long_docs: drop, so every segment of a best_fit row is a whole document (split pieces of different
    # documents, such as a lone EOS, can coincide by chance and would say nothing about the split).
    spec = _spec_dict(tokenizer_dir, tmp_path / "whole")
    spec["streams"]["short"].update(long_docs="drop", seq_len=8192)
    out = tmp_path / "whole"
    build(spec_from_dict(spec), progress=False)
    train = PackedStream(out / "short")
    held = PackedStream(out / "holdout" / "short")
    assert len(held) > 0
    train_docs = {seg for i in range(len(train)) for seg in _segments(train.row(i), train.lengths(i))}
    held_docs = {seg for i in range(len(held)) for seg in _segments(held.row(i), held.lengths(i))}
    assert held_docs and not (train_docs & held_docs)


def test_holdout_minimums_raise_the_held_out_share(tokenizer_dir, tmp_path):
    """min_documents / min_tokens for the named streams: each gets at least that many whole documents held
    out (never in any stream's training split); a minimum no stream can meet is one line."""
    spec = _spec_dict(tokenizer_dir, tmp_path / "min")
    spec["streams"]["short"].update(long_docs="drop", seq_len=8192)
    spec["holdout"] = {"fraction": 0.01, "min_documents": 12, "min_tokens": 20000,
                       "streams": ["short", "long"]}
    out = tmp_path / "min"
    manifest = build(spec_from_dict(spec), progress=False)
    assert manifest["holdout_fraction"] > 0.01
    for name in ("short", "long"):
        held = PackedStream(out / "holdout" / name)
        docs = sum(len(held.lengths(i)) for i in range(len(held)))
        assert docs >= 12 and held.info["real_tokens"] >= 20000, name
    train = PackedStream(out / "short")
    held = PackedStream(out / "holdout" / "short")
    train_docs = {seg for i in range(len(train)) for seg in _segments(train.row(i), train.lengths(i))}
    held_docs = {seg for i in range(len(held)) for seg in _segments(held.row(i), held.lengths(i))}
    assert not (train_docs & held_docs)
    spec["holdout"]["min_documents"] = 10_000
    with pytest.raises(DataError, match=r"holdout: stream short has \d+ documents .* fewer than min_doc"):
        build(spec_from_dict(spec), progress=False, overwrite=True)
    assert (out / "manifest.json").is_file()  # the earlier build is kept


def test_build_is_deterministic(built, tokenizer_dir, tmp_path):
    out, manifest = built
    again = build(spec_from_dict(_spec_dict(tokenizer_dir, out)), overwrite=True, progress=False)
    assert again["checksums"] == manifest["checksums"]
    other = build(spec_from_dict(_spec_dict(tokenizer_dir, tmp_path / "other")), progress=False)
    assert other["checksums"] == manifest["checksums"]
    for rel in manifest["checksums"]:
        assert (out / rel).read_bytes() == (tmp_path / "other" / rel).read_bytes()


def test_refuses_another_tokenizer(built, tmp_path):
    out, _ = built
    small = AutoTokenizer.from_pretrained(train_tokenizer(str(tmp_path / "tok500"), vocab_size=500,
                                                          max_sentences=5000))
    with pytest.raises(DataError, match=r"built with a different tokenizer "
                                        r"\(fingerprint [0-9a-f]{12}… vs [0-9a-f]{12}…\); "
                                        r"rebuild with scripts/prepare_data.py"):
        PackedStream(out / "long", tokenizer=small)


def test_missing_stream_dir(tmp_path):
    with pytest.raises(DataError, match="no such built stream directory"):
        PackedStream(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=r"not a built stream \(no stream.json\)"):
        PackedStream(tmp_path / "empty")


def test_existing_output_is_refused_and_kept_on_error(built, tokenizer_dir):
    out, manifest = built
    spec = _spec_dict(tokenizer_dir, out)
    with pytest.raises(DataError, match="output directory already exists; pass --overwrite"):
        build(spec_from_dict(spec), progress=False)
    spec["sources"][0]["path"] = "/no/such/dir"
    with pytest.raises(DataError, match="no such file or directory"):
        build(spec_from_dict(spec), overwrite=True, progress=False)
    assert json.loads((out / "manifest.json").read_text())["checksums"] == manifest["checksums"]
    assert not [p for p in os.listdir(out.parent) if p.startswith(out.name + ".")]  # no .tmp-* or .old left


def _cli(*args):
    return subprocess.run([sys.executable, SCRIPT, *args, "--quiet"], check=False, capture_output=True,
                          text=True, cwd=ROOT, timeout=300)


def test_cli_errors_are_one_line_with_exit_2(tmp_path, tokenizer_dir):
    spec = _spec_dict(tokenizer_dir, tmp_path / "out")
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    cases = [
        (["streams.long.seq_len=0"],
         "error: streams.long.seq_len: must be a positive number of tokens, got 0"),
        (["streams.short.sources=[]"], "error: streams.short.sources: a stream needs at least one source"),
        (["streams.long.seq_lenn=5"], "error: streams.long.seq_lenn: unknown key; did you mean 'seq_len'?"),
        ([f"tokenizer={tmp_path}"], f"error: tokenizer '{tmp_path}' (directory) does not load"),
    ]
    for overrides, expected in cases:
        result = _cli(str(path), *overrides)
        assert result.returncode == 2, result.stderr
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith(expected), result.stderr
        assert "Traceback" not in result.stderr
    spec["sources"][1]["path"] = "/no/such/*.py"
    path.write_text(yaml.safe_dump(spec))
    result = _cli(str(path))
    assert result.returncode == 2
    assert result.stderr == "error: source 'email_pkg' (sources[1]): no files match '/no/such/*.py'\n"
    missing = _cli(str(tmp_path / "nope.yaml"))
    assert (missing.returncode == 2
            and missing.stderr.strip() == f"error: {tmp_path / 'nope.yaml'}: file not found")


def test_cli_builds(tmp_path, tokenizer_dir):
    spec = _spec_dict(tokenizer_dir, tmp_path / "out")
    spec["streams"] = {"short": spec["streams"]["short"]}
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    result = _cli(str(path))
    assert result.returncode == 0, result.stderr
    assert "short: " in result.stdout and (tmp_path / "out" / "short" / "stream.json").exists()
    assert _cli(str(path)).returncode == 2
    assert _cli(str(path), "--overwrite").returncode == 0
    loaded = PackedStream(tmp_path / "out" / "short")
    assert len(loaded) == loaded.info["rows"] > 0
    assert all(0 < sum(loaded.lengths(i)) <= 128 for i in range(len(loaded)))


def test_export_text_decodes_every_held_out_document(built, tokenizer_dir, tmp_path):
    out, _ = built
    stream = PackedStream(out / "holdout" / "short")
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    target = tmp_path / "holdout.jsonl"
    result = _cli("--export-text", str(out / "holdout" / "short"), str(target))  # the build's tokenizer
    assert result.returncode == 0, result.stderr
    texts = [json.loads(line)["text"] for line in target.read_text().splitlines()]
    expected = []
    for i in range(len(stream)):
        ids, at = stream.input_ids(i), 0
        for n in stream.lengths(i):
            doc = [int(t) for t in ids[at: at + n]]
            at += n
            if doc[-1] == tokenizer.eos_token_id:  # the builder's EOS (not on a split piece's end) is dropped
                doc = doc[:-1]
            expected.append(tokenizer.decode(doc))
    assert texts == expected and len(texts) > 1
    assert "wrote" in result.stdout
    bad = _cli("--export-text", str(tmp_path), str(tmp_path / "x.jsonl"))
    assert bad.returncode == 2 and bad.stderr.startswith("error: ") and len(bad.stderr.splitlines()) == 1
    assert not (tmp_path / "x.jsonl").exists()


def _local_copies(root) -> dict[str, str]:
    """{source name of data/fineweb-edu-short.yaml: a local JSON-lines copy with that dataset's fields}:
    stdlib modules as documents (`content` for starcoderdata, SlimPajama's meta for the arXiv filter)."""
    from distill.testing import stdlib_files

    texts = []
    for path in stdlib_files(min_bytes=500, max_bytes=4000, limit=70):
        with open(path, encoding="utf-8") as f:
            texts.append(f.read())
    names = ["fineweb_edu", "math", "code", "books", "wikipedia", "arxiv", "instruct"]
    paths = {}
    for i, name in enumerate(names):
        field = "content" if name == "code" else "text"
        records = [{field: t, "meta": {"redpajama_set_name": "RedPajamaArXiv" if j % 2 else "RedPajamaC4"}}
                   for j, t in enumerate(texts[i * 10: (i + 1) * 10])]
        paths[name] = str(root / f"{name}.jsonl")
        with open(paths[name], "w", encoding="utf-8") as f:
            f.writelines(json.dumps(r) + "\n" for r in records)
    return paths


def test_shipped_short_spec_builds_offline_with_one_override_per_source(tmp_path, tokenizer_dir):
    """data/fineweb-edu-short.yaml as shipped, every source swapped for local files by its name
    (`sources.<name>.path=`): the placeholder `instruct` left alone is one line naming the override; with it
    the spec builds, each source read from its copy (the arXiv one through its SlimPajama filter)."""
    local = _local_copies(tmp_path)
    spec = os.path.join(ROOT, "data", "fineweb-edu-short.yaml")
    common = [f"tokenizer={tokenizer_dir}", f"output_dir={tmp_path / 'out'}", "holdout.fraction=0.1"]
    swaps = [f"sources.{name}.path={path}" for name, path in local.items() if name != "instruct"]
    result = _cli(spec, *common, *swaps)
    assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr
    assert result.stderr.startswith("error: source 'instruct' (sources[6]): path <your instruction data")
    assert "sources.instruct.path=PATH" in result.stderr and "tokenize" not in result.stdout
    result = _cli(spec, *common, *swaps, f"sources.instruct.path={local['instruct']}")
    assert result.returncode == 0, result.stderr
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    counts = {name: report["documents"] for name, report in manifest["sources"].items()}
    assert counts == {**dict.fromkeys(local, 10), "arxiv": 5}, counts
    assert manifest["streams"]["short"]["train"]["rows"] > 0
