"""Reading sources: every kind, bad rows skipped and counted (or errors under strict), bad sources as
one-line DataErrors naming the file and what is allowed."""

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from distill.config import ConfigError
from distill.data.build import build
from distill.data.dataset import DataError
from distill.data.sources import SourceReader
from distill.data.spec import SourceConfig, spec_from_dict


def _read(strict=False, **kw):
    reader = SourceReader(SourceConfig(name="s", **kw), 0, strict=strict)
    return list(reader), reader


def _write_jsonl(path, lines):
    with open(path, "wb") as f:
        for line in lines:
            f.write(line if isinstance(line, bytes) else line.encode())
            f.write(b"\n")


def test_jsonl_skips_and_counts_bad_rows(tmp_path):
    path = tmp_path / "a.jsonl"
    _write_jsonl(path, [json.dumps({"text": "good one"}), "{not json", json.dumps({"body": "x"}),
                        b'{"text": "bad \xff byte"}', json.dumps({"text": "   "}), json.dumps({"text": 3}),
                        "", json.dumps([1, 2]), json.dumps({"text": "good two"})])
    docs, reader = _read(kind="jsonl", path=str(path))
    assert docs == ["good one", "good two"]
    assert dict(reader.skipped) == {"malformed_json": 1, "missing_field": 1, "not_utf8": 1, "empty": 1,
                                    "field_not_text": 1, "not_an_object": 1}
    assert reader.records == 8
    assert reader.examples["malformed_json"].startswith(f"{path}:2: malformed JSON")


def test_strict_turns_a_skip_into_an_error_naming_file_and_line(tmp_path):
    path = tmp_path / "a.jsonl"
    _write_jsonl(path, [json.dumps({"text": "ok"}), json.dumps({"txt": "x"})])
    with pytest.raises(DataError, match=rf"^{path}:2: no field 'text' \(source 's' \(sources\[0\]\); strict"):
        _read(strict=True, kind="jsonl", path=str(path))


def test_json_parquet_text_and_match(tmp_path):
    (tmp_path / "a.json").write_text(json.dumps([{"text": "one", "meta": {"set": "x"}},
                                                 {"text": "two", "meta": {"set": "y"}}, "three"]))
    docs, reader = _read(kind="json", path=str(tmp_path / "a.json"), match={"meta.set": "y"})
    assert docs == ["two"] and reader.filtered == 2
    pq.write_table(pa.table({"content": ["p1", None, "p2"]}), tmp_path / "a.parquet")
    docs, reader = _read(kind="parquet", path=str(tmp_path / "*.parquet"), text_field="content")
    assert docs == ["p1", "p2"] and reader.skipped["missing_field"] == 1
    (tmp_path / "t.txt").write_text("para one\nline\n\n  \npara two\n\n\n")
    assert (_read(kind="text", path=str(tmp_path / "t.txt"), text_split="blank_line")[0]
            == ["para one\nline", "para two"])
    assert _read(kind="text", path=str(tmp_path / "t.txt"))[0] == ["para one\nline\n\n  \npara two\n\n\n"]


def test_parquet_without_the_text_column_is_an_error(tmp_path):
    pq.write_table(pa.table({"body": ["x"]}), tmp_path / "a.parquet")
    with pytest.raises(DataError, match=r"a\.parquet: no column 'text' .*columns: body"):
        _read(kind="parquet", path=str(tmp_path / "a.parquet"))


def test_files_tree_include_exclude_and_non_utf8(tmp_path):
    repo = tmp_path / "repo"
    (repo / "pkg" / "tests").mkdir(parents=True)
    (repo / ".git").mkdir()
    (repo / "pkg" / "a.py").write_text("print('a')\n")
    (repo / "pkg" / "b.py").write_bytes(b"x = '\xff\xfe'\n")
    (repo / "pkg" / "tests" / "t.py").write_text("assert 1\n")
    (repo / "README.md").write_text("# readme\n")
    (repo / "data.bin").write_bytes(b"\x00\x01")
    (repo / ".git" / "config").write_text("[core]\n")
    docs, reader = _read(kind="files", path=str(repo), include=["*.py", "*.md"], exclude=["*/tests/*"])
    assert docs == ["# readme\n", "print('a')\n"]
    assert dict(reader.skipped) == {"not_utf8": 1}
    assert [p.split("repo/")[1] for p in reader.files] == ["README.md", "pkg/a.py", "pkg/b.py"]


def test_a_directory_document_joins_a_package_tree(tmp_path):
    """document: directory makes each top-level directory one document (its wanted files in sorted order,
    each after its relative path); files directly under the root stay one document each."""
    for rel, text in {"pkg_b/z.py": "zed\n", "pkg_a/x.py": "ex\n", "pkg_a/sub/y.py": "why\n",
                      "pkg_a/notes.txt": "left out\n", "top.py": "top\n"}.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(text)
    docs, reader = _read(kind="files", path=str(tmp_path), include=["*.py"], document="directory")
    assert docs == ["# file: pkg_a/sub/y.py\nwhy\n\n# file: pkg_a/x.py\nex\n",
                    "# file: pkg_b/z.py\nzed\n", "# file: top.py\ntop\n"]
    assert reader.records == 3
    with pytest.raises(ConfigError, match=r"sources\[0\]\.document: directory documents are for kind files"):
        spec_from_dict({"tokenizer": "t", "output_dir": "o",
                        "sources": [{"name": "s", "kind": "jsonl", "path": "x", "document": "directory"}],
                        "streams": {"long": {"sources": ["s"], "seq_len": 8}}})


@pytest.mark.parametrize("kind,path,message", [
    ("jsonl", "{tmp}/nothing/*.jsonl", "source 's' (sources[0]): no files match"),
    ("jsonl", "{tmp}/missing.jsonl", "source 's' (sources[0]): no such file or directory"),
    ("files", "{tmp}", "has no files matching include/exclude"),
])
def test_missing_files_are_errors(tmp_path, kind, path, message):
    kw = {"include": ["*.nothing"]} if kind == "files" else {}
    with pytest.raises(DataError) as err:
        _read(kind=kind, path=path.format(tmp=tmp_path), **kw)
    assert message in str(err.value) and "\n" not in str(err.value)


# -- bad sources caught by the build (needs the tokenizer) --------------------------------------------------

def _spec(tmp_path, tokenizer, source, **stream):
    return spec_from_dict({
        "tokenizer": tokenizer, "output_dir": str(tmp_path / "out"), "sources": [{"name": "s", **source}],
        "streams": {"short": {"sources": ["s"], "seq_len": 16, "pack": "best_fit", **stream}},
    })


def test_empty_source_is_an_error(tmp_path, tokenizer_dir):
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(DataError, match=r"source 's' \(sources\[0\]\): empty source, no documents in"):
        build(_spec(tmp_path, tokenizer_dir, {"kind": "jsonl", "path": str(tmp_path / "empty.jsonl")}),
              progress=False)
    assert not (tmp_path / "out").exists()


def test_missing_text_field_everywhere_is_an_error(tmp_path, tokenizer_dir):
    _write_jsonl(tmp_path / "a.jsonl", [json.dumps({"body": "x"})] * 3)
    with pytest.raises(DataError,
                       match=r"all 3 records were skipped \(missing_field: 3\); e\.g\. .*no field 'text'"):
        build(_spec(tmp_path, tokenizer_dir, {"kind": "jsonl", "path": str(tmp_path / "a.jsonl")}),
              progress=False)


def test_all_non_utf8_is_an_error(tmp_path, tokenizer_dir):
    (tmp_path / "a.txt").write_bytes(b"\xff\xfe\x00bad")
    with pytest.raises(DataError,
                       match=r"all 1 records were skipped \(not_utf8: 1\).*invalid UTF-8 at byte 0"):
        build(_spec(tmp_path, tokenizer_dir, {"kind": "text", "path": str(tmp_path / "a.txt")}),
              progress=False)


def test_documents_that_tokenize_to_nothing(tmp_path, tokenizer_dir, monkeypatch):
    # Our sentencepiece tokenizer maps any non-empty text to tokens; make one document encode to nothing.
    from distill.data import tokenize

    real = tokenize.BatchEncoder.encode
    monkeypatch.setattr(tokenize.BatchEncoder, "encode",
                        lambda self, texts: [[] if t == "VOID" else ids
                                             for t, ids in zip(texts, real(self, texts))])
    _write_jsonl(tmp_path / "a.jsonl", [json.dumps({"text": "VOID"})] * 2)
    source = {"kind": "jsonl", "path": str(tmp_path / "a.jsonl")}
    with pytest.raises(DataError, match=r"all 2 records were skipped \(no_tokens: 2\)"):
        build(_spec(tmp_path, tokenizer_dir, source), progress=False)
    _write_jsonl(tmp_path / "a.jsonl", [json.dumps({"text": "VOID"}), json.dumps({"text": "def f(): pass"})])
    manifest = build(_spec(tmp_path, tokenizer_dir, source), progress=False)
    assert manifest["sources"]["s"]["skipped"] == {"no_tokens": 1}
    assert manifest["sources"]["s"]["documents"] == 1


def test_tokenizer_that_does_not_load(tmp_path):
    _write_jsonl(tmp_path / "a.jsonl", [json.dumps({"text": "x"})])
    (tmp_path / "tok").mkdir()
    spec = _spec(tmp_path, str(tmp_path / "tok"), {"kind": "jsonl", "path": str(tmp_path / "a.jsonl")})
    with pytest.raises(DataError) as err:
        build(spec, progress=False)
    assert str(err.value).startswith(f"tokenizer '{tmp_path / 'tok'}' (directory) does not load: ")
    assert "\n" not in str(err.value)


def test_no_rows_is_an_error_with_the_reasons(tmp_path, tokenizer_dir):
    _write_jsonl(tmp_path / "a.jsonl", [json.dumps({"text": "short"})])
    spec = _spec(tmp_path, tokenizer_dir, {"kind": "jsonl", "path": str(tmp_path / "a.jsonl")}, pack="window")
    with pytest.raises(DataError, match=r"streams\.short: no rows of seq_len 16 .*shorter_than_seq_len: 1"):
        build(spec, progress=False)


def test_upsampling_long_documents_keeps_the_budget(tmp_path, tokenizer_dir):
    long_text = "def long_function(x):\n" + "    x = x + 1\n" * 60
    docs = [json.dumps({"text": f"# short {i}\nprint({i})\n"}) for i in range(200)]
    docs += [json.dumps({"text": long_text})]  # ~610 tokens against ~3000 of short ones
    _write_jsonl(tmp_path / "a.jsonl", docs)
    source = {"kind": "jsonl", "path": str(tmp_path / "a.jsonl")}
    plain = build(_spec(tmp_path, tokenizer_dir, source, pack="concat", seq_len=16), progress=False)
    source["upsample_long"] = {"min_tokens": 100, "factor": 2.0}
    up = build(_spec(tmp_path, tokenizer_dir, source, pack="concat", seq_len=16), overwrite=True,
               progress=False)
    before, after = plain["streams"]["short"]["train"], up["streams"]["short"]["train"]
    assert after["sources"]["s"]["upsampled_long_docs"] == 1
    # The same token budget (the source's own size, within one short document), long documents twice.
    assert 0 <= after["sources"]["s"]["tokens"] - before["sources"]["s"]["tokens"] < 20
    assert after["sources"]["s"]["docs"] < before["sources"]["s"]["docs"]
    assert after["sources"]["s"]["skipped"]["over_max_tokens"] > 0


def test_hf_kind_reads_local_datasets_offline(tmp_path):
    """kind hf through the real `datasets` loaders, offline: a save_to_disk directory (Dataset and
    DatasetDict with a split), and a local data directory by name through load_dataset (also streaming)."""
    import datasets

    ds = datasets.Dataset.from_dict({"text": ["first doc", "", "second doc"], "meta": ["a", "b", "c"]})
    ds.save_to_disk(str(tmp_path / "saved"))
    docs, reader = _read(kind="hf", dataset=str(tmp_path / "saved"))
    assert docs == ["first doc", "second doc"] and reader.skipped["empty"] == 1
    datasets.DatasetDict({"train": ds, "validation": ds.select([0])}).save_to_disk(str(tmp_path / "dd"))
    assert _read(kind="hf", dataset=str(tmp_path / "dd"), split="validation")[0] == ["first doc"]
    with pytest.raises(DataError, match="has no split 'test'; splits: train, validation"):
        _read(kind="hf", dataset=str(tmp_path / "dd"), split="test")
    (tmp_path / "hub_like").mkdir()
    pq.write_table(pa.table({"text": ["x one", "x two"]}), tmp_path / "hub_like" / "train.parquet")
    for streaming in (False, True):
        docs, _ = _read(kind="hf", dataset=str(tmp_path / "hub_like"), split="train", streaming=streaming)
        assert docs == ["x one", "x two"]
    with pytest.raises(DataError, match="has no column 'body'"):
        _read(kind="hf", dataset=str(tmp_path / "saved"), text_field="body")


# -- hub-style sources: data_dir, the up-front check, local copies -------------------------------------------

def test_hf_data_dir_reads_one_directory_of_the_dataset(tmp_path):
    """bigcode/starcoderdata is laid out by directory (python/, java/, ...): `data_dir` picks one, passed to
    load_dataset as data_dir (on main the spec had no such key and the spec named it as a config)."""
    for lang in ("python", "java"):
        (tmp_path / "repo" / lang).mkdir(parents=True)
        pq.write_table(pa.table({"content": [f"{lang} one", f"{lang} two"]}),
                       tmp_path / "repo" / lang / "train-00000.parquet")
    for streaming in (False, True):
        docs, _ = _read(kind="hf", dataset=str(tmp_path / "repo"), data_dir="python", split="train",
                        text_field="content", streaming=streaming)
        assert docs == ["python one", "python two"]
    with pytest.raises(DataError, match=r"data_dir 'rust', split 'train'\): .*rust doesn't contain any data"):
        SourceReader(SourceConfig(name="s", kind="hf", dataset=str(tmp_path / "repo"), data_dir="rust"),
                     0).check()


def _loading_script_dataset(root):
    """A dataset repository that is only a loading script (RedPajama-Data-1T's form), which datasets >= 4
    refuses."""
    root.mkdir()
    (root / f"{root.name}.py").write_text("import datasets\n\nclass Arxiv(datasets.GeneratorBasedBuilder):\n"
                                          "    pass\n")
    return str(root)


def test_every_source_is_checked_before_any_is_read(tmp_path, tokenizer_dir, monkeypatch):
    """The fifth source's mistake is reported at once: on main, four sources were read and tokenized first.
    Every broken source is named, the first one's reason in full."""
    sources = []
    for i in range(4):
        _write_jsonl(tmp_path / f"s{i}.jsonl", [json.dumps({"text": f"document {i} " * 20})])
        sources.append({"name": f"s{i}", "kind": "jsonl", "path": str(tmp_path / f"s{i}.jsonl")})
    sources.append({"name": "arxiv", "kind": "hf", "dataset": _loading_script_dataset(tmp_path / "arxiv")})
    sources.append({"name": "instruct", "kind": "jsonl", "path": "<your instruction data>"})
    spec = spec_from_dict({
        "tokenizer": tokenizer_dir, "output_dir": str(tmp_path / "out"), "sources": sources,
        "streams": {"short": {"sources": [s["name"] for s in sources], "seq_len": 16, "pack": "best_fit"}}})
    read = []
    original = SourceReader.__iter__
    monkeypatch.setattr(SourceReader, "__iter__", lambda self: (read.append(self.source.name),
                                                                original(self))[1])
    with pytest.raises(DataError) as err:
        build(spec, progress=False)
    message = str(err.value)
    assert read == []  # nothing was streamed
    assert message.startswith(f"source 'arxiv' (sources[4]): cannot load dataset '{tmp_path / 'arxiv'}'")
    assert "refuses loading scripts" in message and "sources.arxiv.path=PATH" in message
    assert message.endswith("(and 1 more: instruct)") and "\n" not in message
    assert not (tmp_path / "out").exists()


def test_placeholder_path_is_one_line_naming_the_override(tmp_path):
    with pytest.raises(DataError) as err:
        SourceReader(SourceConfig(name="instruct", kind="jsonl", path="<your instruction data>"), 6).check()
    assert str(err.value) == (
        "source 'instruct' (sources[6]): path <your instruction data> is a placeholder for your own data: "
        "pass sources.instruct.path=PATH (a jsonl file, directory or glob) to scripts/prepare_data.py, or "
        "leave the source out of every stream")


def test_hf_source_with_a_path_reads_a_local_copy(tmp_path):
    """`sources.<name>.path=` swaps a hub dataset for local files of the same records (format by extension;
    text_field and match apply), so one override per source builds a shipped spec offline."""
    _write_jsonl(tmp_path / "slim.jsonl", [
        json.dumps({"text": "paper", "meta": {"redpajama_set_name": "RedPajamaArXiv"}}),
        json.dumps({"text": "web page", "meta": {"redpajama_set_name": "RedPajamaC4"}})])
    reader = SourceReader(SourceConfig(name="arxiv", kind="hf", dataset="cerebras/SlimPajama-627B",
                                       streaming=True, path=str(tmp_path / "*.jsonl"),
                                       match={"meta.redpajama_set_name": "RedPajamaArXiv"}), 0)
    reader.check()  # no hub lookup: the local files are what is read
    assert list(reader) == ["paper"] and reader.kind == "jsonl" and reader.filtered == 1
    pq.write_table(pa.table({"content": ["def f(): pass"]}), tmp_path / "code.parquet")
    docs, reader = _read(kind="hf", dataset="bigcode/starcoderdata", data_dir="python", text_field="content",
                         path=str(tmp_path))  # a directory: its parquet files
    assert docs == ["def f(): pass"] and reader.kind == "parquet"


def test_a_missing_split_is_caught_by_the_check(tmp_path):
    (tmp_path / "repo").mkdir()
    pq.write_table(pa.table({"text": ["x"]}), tmp_path / "repo" / "train.parquet")
    with pytest.raises(DataError, match=r"no split 'validation'; splits: train$"):
        SourceReader(SourceConfig(name="s", kind="hf", dataset=str(tmp_path / "repo"), split="validation"),
                     0).check()


def test_gated_refusals_say_how_to_log_in():
    import httpx
    from huggingface_hub.errors import GatedRepoError

    from distill.hub import GATED_HINT, hub_reason

    refused = httpx.Response(403, request=httpx.Request("GET", "https://huggingface.co/meta-llama/x"))
    assert hub_reason(GatedRepoError("403 Client Error.", response=refused)) == GATED_HINT
    # transformers' wording (an OSError) and datasets' (DatasetNotFoundError) say "gated" too.
    assert hub_reason(OSError("You are trying to access a gated repo.\nMake sure ...")) == GATED_HINT
    assert "hf auth login" in GATED_HINT and "HF_TOKEN" in GATED_HINT
    assert hub_reason(OSError("no such file")) == "no such file"
