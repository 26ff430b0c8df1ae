"""The data spec (data/<name>.yaml): which corpora to read, how to tokenize them and how to pack the
long / short / s2l streams. Loaded through `distill.config`, so unknown keys and wrong types are one-line
`ConfigError`s with the dotted key; `validate` adds the cross-field checks.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Literal

from distill.config import ConfigError, check, from_dict, join, load

SourceKind = Literal["jsonl", "json", "parquet", "text", "files", "hf"]
PackMode = Literal["concat", "best_fit", "window"]


@dataclasses.dataclass
class UpsampleConfig:
    min_tokens: int
    """Documents with at least this many tokens (EOS included) count as long."""
    factor: float = 2.0
    """Long documents appear `factor` times (a fractional part is drawn per document from its hash);
    short documents are then dropped, in seeded order, until the source is back at its token budget —
    per-source length upsampling that keeps the domain mixture (Fu et al. 2024, "Data Engineering for
    Scaling Language Models to 128K Context")."""

    def validate(self, path: str) -> None:
        check(self.min_tokens > 0, join(path, "min_tokens"), f"must be positive, got {self.min_tokens}")
        check(self.factor >= 1.0, join(path, "factor"), f"must be >= 1, got {self.factor}")


@dataclasses.dataclass
class SourceConfig:
    name: str
    """Name that streams refer to (also the key of per-source counts in manifest.json)."""
    kind: SourceKind
    """jsonl | json (a list of records) | parquet | text | files (one file = one document) | hf."""
    path: str | None = None
    """A file, a directory or a glob (`**` allowed; `~`, `$VAR` and `{stdlib}` expand); required except for
    hf. On an hf source: a local copy of the dataset (the same records), read instead of the hub, its format
    told by the extension (jsonl, json, parquet, text). A value in angle brackets (`<your instruction data>`)
    is a placeholder a shipped spec leaves for the user: building refuses it in one line naming the override
    (`sources.<name>.path=...`)."""
    text_field: str = "text"
    """Field holding the document text (jsonl, json, parquet, hf)."""
    weight: float = 1.0
    """Relative token share of this source inside a stream with `max_tokens` (e.g. the SlimPajama
    domain proportions). Without `max_tokens` every document is used once and weights do not matter."""
    include: list[str] = dataclasses.field(default_factory=list)
    """files: glob patterns a file must match (relative path or base name); empty = every file."""
    exclude: list[str] = dataclasses.field(default_factory=list)
    """files: glob patterns of files to leave out."""
    text_split: Literal["file", "blank_line"] = "file"
    """text: one document per file, or one per block separated by blank lines."""
    document: Literal["file", "directory"] = "file"
    """files: one document per file, or one per top-level directory under `path` (a package's source tree,
    its wanted files joined in sorted order, each after a `# file: <relative path>` line): an honest long
    document for long-context data. Files directly under `path` stay one document each."""
    dataset: str | None = None
    """hf: a Hugging Face dataset id, a local dataset script/dir, or a `save_to_disk` directory."""
    config: str | None = None
    """hf: dataset configuration name (e.g. sample-10BT)."""
    data_dir: str | None = None
    """hf: a directory inside the dataset repository to read (`load_dataset(..., data_dir=...)`), for
    datasets laid out by directory rather than by configuration (bigcode/starcoderdata: `python`)."""
    split: str = "train"
    """hf: split to read."""
    streaming: bool = False
    """hf: stream the dataset instead of downloading it whole (reading stops at the token budget)."""
    match: dict[str, str] = dataclasses.field(default_factory=dict)
    """jsonl, json, hf: keep only records whose (dotted) field equals the value, e.g.
    {meta.redpajama_set_name: RedPajamaBook} to take one domain out of SlimPajama. Others are not skips."""
    upsample_long: UpsampleConfig | None = None
    """Length upsampling inside this source while keeping its token budget."""

    def validate(self, path: str) -> None:
        check(bool(self.name.strip()), join(path, "name"), "must not be empty")
        check(self.weight > 0, join(path, "weight"), f"must be positive, got {self.weight}")
        if self.kind == "hf":
            check(self.dataset is not None, join(path, "dataset"),
                  "kind hf needs a dataset (id or directory)")
        else:
            check(self.path is not None and self.path != "", join(path, "path"),
                  f"kind {self.kind} needs a path (a file, a directory or a glob)")
            check(self.dataset is None, join(path, "dataset"), f"only for kind hf, not {self.kind}")
            check(self.data_dir is None, join(path, "data_dir"), f"only for kind hf, not {self.kind}")
        if self.kind != "files":
            check(not self.include and not self.exclude, join(path, "include"),
                  f"include/exclude are for kind files, not {self.kind}")
            check(self.document == "file", join(path, "document"),
                  f"directory documents are for kind files, not {self.kind}")
        check(self.text_field != "", join(path, "text_field"), "must not be empty")
        if self.match:
            check(self.kind in ("jsonl", "json", "hf"), join(path, "match"),
                  f"only for kinds jsonl, json and hf, not {self.kind}")


@dataclasses.dataclass
class DataStreamConfig:
    sources: list[str]
    """Names of the sources feeding this stream."""
    seq_len: int
    """Tokens per packed row."""
    pack: PackMode = "concat"
    """concat: join documents (EOS between) and cut rows; best_fit: whole documents into rows with the
    least padding (best-fit decreasing); window: seq_len windows from inside single documents."""
    min_doc_tokens: int = 1
    """Documents shorter than this (EOS included) are skipped for this stream."""
    max_doc_tokens: int | None = None
    """Documents longer than this (EOS included) are skipped for this stream."""
    max_tokens: float | None = None
    """Token budget of the train split (whole documents, shared by source weight; the last document of a
    source may overshoot). null: every document."""
    long_docs: Literal["split", "drop"] = "split"
    """best_fit: documents longer than seq_len are cut into seq_len pieces (split) or skipped (drop)."""
    stride: int | None = None
    """window: step between window starts (default seq_len: no overlap)."""
    last_row: Literal["drop", "pad"] = "drop"
    """concat: the final partial row is dropped (counted as skipped) or padded."""

    def validate(self, path: str) -> None:
        check(self.seq_len > 0, join(path, "seq_len"),
              f"must be a positive number of tokens, got {self.seq_len}")
        check(len(self.sources) > 0, join(path, "sources"), "a stream needs at least one source")
        check(len(set(self.sources)) == len(self.sources), join(path, "sources"),
              f"lists a source twice: {self.sources}")
        check(self.min_doc_tokens >= 1, join(path, "min_doc_tokens"),
              f"must be >= 1, got {self.min_doc_tokens}")
        if self.max_doc_tokens is not None:
            check(self.max_doc_tokens >= self.min_doc_tokens, join(path, "max_doc_tokens"),
                  f"{self.max_doc_tokens} is below min_doc_tokens {self.min_doc_tokens}")
        if self.max_tokens is not None:  # a float so that 1.0e9 (a string to PyYAML) is accepted
            check(self.max_tokens >= 1, join(path, "max_tokens"), f"must be positive, got {self.max_tokens}")
            self.max_tokens = int(self.max_tokens)
        if self.stride is not None:
            check(self.pack == "window", join(path, "stride"), f"only for pack window, not {self.pack}")
            check(self.stride > 0, join(path, "stride"), f"must be positive, got {self.stride}")
        if self.pack == "window":
            check(self.max_doc_tokens is None or self.max_doc_tokens >= self.seq_len,
                  join(path, "max_doc_tokens"),
                  f"window needs documents of at least seq_len {self.seq_len} tokens")


@dataclasses.dataclass
class HoldoutConfig:
    fraction: float = 0.0
    """Share of documents held out per stream, chosen by a hash of their text (never trained on)."""
    max_tokens: float | None = None
    """Cap on the held-out tokens per stream (whole documents); null: no cap."""
    min_documents: int = 0
    """At least this many held-out documents in each of `streams`: the hash threshold is raised until every
    one of them has that many (documents held out of one stream are held out of all). 0: `fraction` only."""
    min_tokens: float = 0
    """At least this many held-out tokens in each of `streams` (same rule)."""
    streams: list[str] | None = None
    """The streams the minimums apply to (the evaluated ones); null: all of them."""

    def validate(self, path: str) -> None:
        check(0.0 <= self.fraction < 1.0, join(path, "fraction"), f"must be in [0, 1), got {self.fraction}")
        if self.max_tokens is not None:
            check(self.max_tokens >= 1, join(path, "max_tokens"), f"must be positive, got {self.max_tokens}")
            self.max_tokens = int(self.max_tokens)
        check(self.min_documents >= 0, join(path, "min_documents"), f"must be ≥ 0, got {self.min_documents}")
        check(self.min_tokens >= 0, join(path, "min_tokens"), f"must be ≥ 0, got {self.min_tokens}")
        self.min_tokens = int(self.min_tokens)
        if self.max_tokens is not None:
            check(self.max_tokens >= self.min_tokens, join(path, "max_tokens"),
                  f"{self.max_tokens} is below min_tokens {self.min_tokens}")

    @property
    def minimums(self) -> bool:
        return self.min_documents > 0 or self.min_tokens > 0


@dataclasses.dataclass
class DataSpec:
    tokenizer: str
    """Any AutoTokenizer id or directory (the model's own tokenizer)."""
    output_dir: str
    """Built streams go to <output_dir>/<stream>/ and <output_dir>/holdout/<stream>/."""
    sources: list[SourceConfig]
    """The raw corpora."""
    streams: dict[str, DataStreamConfig]
    """Stream name (long, short, s2l, ...) → how it is built."""
    seed: int = 0
    """Seed of document order, budget selection and row order."""
    strict: bool = False
    """Turn every skipped record (malformed JSON, missing field, non-UTF-8, empty) into an error."""
    eos: bool = True
    """Append a separator token to every document (`separator`, else the tokenizer's EOS)."""
    separator: str | None = None
    """The token that ends every document, when it is not the tokenizer's EOS: an instruct tokenizer's EOS
    is often its chat-turn terminator (SmolLM2, Qwen2.5: `<|im_end|>`), while pre-training separated
    documents with another token (`<|endoftext|>`). Must be one token of the tokenizer's vocabulary;
    null: the tokenizer's EOS."""
    batch_size: int = 1000
    """Documents per tokenizer call."""
    holdout: HoldoutConfig = dataclasses.field(default_factory=HoldoutConfig)
    """Held-out documents per stream, written to <output_dir>/holdout/<stream>/."""

    def validate(self, path: str) -> None:
        check(bool(self.tokenizer), "tokenizer", "must name a tokenizer (hub id or directory)")
        check(bool(self.output_dir), "output_dir", "must not be empty")
        check(len(self.sources) > 0, "sources", "a spec needs at least one source")
        check(len(self.streams) > 0, "streams", "a spec needs at least one stream")
        check(self.batch_size > 0, "batch_size", f"must be positive, got {self.batch_size}")
        names = [s.name for s in self.sources]
        for i, name in enumerate(names):
            check(name not in names[:i], f"sources[{i}].name", f"duplicate source name {name!r}")
        for stream_name, stream in self.streams.items():
            check(stream_name != "holdout" and "/" not in stream_name and stream_name not in (".", ".."),
                  f"streams.{stream_name}", "is not a valid stream name (reserved or a path)")
            for i, ref in enumerate(stream.sources):
                check(ref in names, f"streams.{stream_name}.sources[{i}]",
                      f"unknown source {ref!r}; defined sources: {', '.join(names)}")
        for i, name in enumerate(self.holdout.streams or []):
            check(name in self.streams, f"holdout.streams[{i}]",
                  f"unknown stream {name!r}; defined streams: {', '.join(self.streams)}")

    def source(self, name: str) -> SourceConfig:
        return next(s for s in self.sources if s.name == name)


def load_spec(path: str | os.PathLike | None, overrides: list[str] | tuple[str, ...] = ()) -> DataSpec:
    """Load a data spec from YAML plus `a.b=value` overrides; ConfigError on any mistake."""
    return load(DataSpec, path, overrides)


def spec_from_dict(data: dict) -> DataSpec:
    return from_dict(DataSpec, data)


__all__ = ["ConfigError", "DataSpec", "DataStreamConfig", "HoldoutConfig", "SourceConfig", "UpsampleConfig",
           "load_spec", "spec_from_dict"]
