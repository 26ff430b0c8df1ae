"""Reading raw documents from a source (jsonl, json, parquet, text, a tree of files, a HF dataset).

A `SourceReader` yields document texts in a deterministic order (sorted paths, file order). A bad record
inside a good file (malformed JSON line, missing or non-text field, non-UTF-8 bytes, an empty document)
is skipped and counted by reason; with `strict` it is a `DataError` naming the file and line. Problems
with the source as a whole (no files, unreadable files, no usable document at all) are `DataError`s.
"""

from __future__ import annotations

import collections
import fnmatch
import glob
import json
import logging
import os
import re
import sysconfig
from collections.abc import Iterator

from distill.data.dataset import DataError
from distill.data.spec import SourceConfig
from distill.hub import hub_reason

log = logging.getLogger(__name__)

_EXTENSIONS = {"jsonl": (".jsonl", ".json", ".jsonl.gz", ".jsonl.zst"), "json": (".json",),
               "parquet": (".parquet",), "text": (".txt", ".md")}
_BLANK_LINE = re.compile(r"\n(?:[ \t\r\f\v]*\n)+")


def expand_path(path: str) -> str:
    """`~`, `$VARS` and `{stdlib}` (this Python's standard library directory, for the offline demo)."""
    if "{stdlib}" in path:
        path = path.replace("{stdlib}", sysconfig.get_paths()["stdlib"])
    return os.path.expandvars(os.path.expanduser(path))


LOCAL_KINDS = ("jsonl", "json", "parquet", "text")


def local_kind(path: str) -> str | None:
    """The format of local files by extension (a file, a glob's pattern, or the first such file under a
    directory): jsonl, json, parquet or text; None when none is recognised."""
    def by_name(name: str) -> str | None:
        return next((k for k in LOCAL_KINDS if name.endswith(_EXTENSIONS[k])), None)

    if os.path.isdir(path):
        for root, dirs, names in os.walk(path):
            dirs.sort()
            for name in sorted(names):
                if by_name(name) is not None and not name.startswith("."):
                    return by_name(name)
        return None
    return by_name(path)


def is_placeholder(path: str | None) -> bool:
    """A path in angle brackets (`<your instruction data>`): what a shipped spec leaves for the user's own
    data."""
    return path is not None and path.strip().startswith("<") and path.strip().endswith(">")


def check_sources(sources: list[tuple[int, SourceConfig]]) -> None:
    """`SourceReader.check` of every (index, source) before any of them is read, so the last source's
    mistake is reported at once, not after the others have streamed. DataError: the first problem, and how
    many other sources have one."""
    problems = []
    for index, source in sources:
        try:
            SourceReader(source, index).check()
        except DataError as err:
            problems.append((source.name, str(err)))
    if problems:
        more = problems[1:]
        tail = f" (and {len(more)} more: {', '.join(n for n, _ in more)})" if more else ""
        raise DataError(problems[0][1] + tail)


def _has_glob(path: str) -> bool:
    return any(c in path for c in "*?[")


def _saved_to_disk(name: str) -> bool:
    """Whether `name` is a directory `datasets.save_to_disk` wrote (a Dataset or a DatasetDict)."""
    return os.path.isdir(name) and (os.path.isfile(os.path.join(name, "state.json"))
                                    or os.path.isfile(os.path.join(name, "dataset_dict.json")))


class SourceReader:
    """Documents of one source, with counts of skipped records per reason.

    Args:
        source: the source's spec entry.
        index: its position in the spec's `sources` list (for error messages).
        strict: raise DataError at the first bad record instead of skipping it.
    """

    def __init__(self, source: SourceConfig, index: int = 0, strict: bool = False):
        self.source = source
        self.kind = source.kind
        """What is read: the source's kind, or for an hf source given a `path`, the local copy's format."""
        self.where = f"source {source.name!r} (sources[{index}])"
        self.strict = strict
        self.skipped: collections.Counter[str] = collections.Counter()
        self.examples: dict[str, str] = {}
        self.records = 0
        self.files: list[str] = []
        self.filtered = 0
        self._match = [(k.split("."), v) for k, v in sorted(source.match.items())]

    # -- bookkeeping -------------------------------------------------------------------------------------
    def skip(self, reason: str, location: str, detail: str) -> None:
        if self.strict:
            raise DataError(f"{location}: {detail} ({self.where}; strict: true turns skips into errors)")
        self.skipped[reason] += 1
        self.examples.setdefault(reason, f"{location}: {detail}")

    def _matches(self, record: dict) -> bool:
        """True when every `match` field of the record equals its value (counted in `filtered` otherwise)."""
        for keys, want in self._match:
            node = record
            for k in keys:
                node = node.get(k) if isinstance(node, dict) else None
            if node != want:
                self.filtered += 1
                return False
        return True

    def _text(self, value, location: str) -> str | None:
        self.records += 1
        if value is None:
            self.skip("missing_field", location, f"no field {self.source.text_field!r}")
            return None
        if not isinstance(value, str):
            self.skip("field_not_text", location,
                      f"field {self.source.text_field!r} is {type(value).__name__}, not a string")
            return None
        if not value.strip():
            self.skip("empty", location, "empty document")
            return None
        return value

    # -- paths -------------------------------------------------------------------------------------------
    def paths(self) -> list[str]:
        """The source's files in sorted order; DataError when there are none."""
        src = self.source
        path = expand_path(src.path or "")
        if _has_glob(path):
            found = sorted(p for p in glob.glob(path, recursive=True) if os.path.isfile(p))
            if not found:
                raise DataError(f"{self.where}: no files match {src.path!r}")
        elif os.path.isdir(path):
            found = []
            for root, dirs, names in os.walk(path):
                dirs[:] = sorted(d for d in dirs if not d.startswith("."))
                for name in sorted(names):
                    if name.startswith("."):
                        continue
                    full = os.path.join(root, name)
                    if self.kind == "files" or name.endswith(_EXTENSIONS.get(self.kind, ())):
                        found.append(full)
            found.sort()
            if self.kind == "files":
                found = [p for p in found if self._wanted(os.path.relpath(p, path))]
            if not found:
                allowed = ("" if self.kind == "files"
                           else f" with extension {' or '.join(_EXTENSIONS[self.kind])}")
                raise DataError(f"{self.where}: directory {src.path!r} has no files{allowed}"
                                + (" matching include/exclude" if self.kind == "files" else ""))
        elif os.path.isfile(path):
            found = [path]
        else:
            raise DataError(f"{self.where}: no such file or directory: {src.path!r}")
        if self.kind == "files" and _has_glob(path):
            found = [p for p in found if self._wanted(p)]
            if not found:
                raise DataError(f"{self.where}: no files under {src.path!r} match include/exclude")
        return found

    def _wanted(self, rel: str) -> bool:
        base = os.path.basename(rel)
        inc = self.source.include
        if inc and not any(fnmatch.fnmatch(rel, p) or fnmatch.fnmatch(base, p) for p in inc):
            return False
        return not any(fnmatch.fnmatch(rel, p) or fnmatch.fnmatch(base, p) for p in self.source.exclude)

    # -- documents ---------------------------------------------------------------------------------------
    def _resolve_kind(self) -> None:
        """An hf source given a `path` reads a local copy of the dataset: its format from the extension."""
        src = self.source
        if src.kind != "hf" or not src.path or is_placeholder(src.path):
            return
        self.kind = local_kind(expand_path(src.path))
        if self.kind is None:
            known = sorted({e for k in LOCAL_KINDS for e in _EXTENSIONS[k]})
            raise DataError(f"{self.where}: cannot tell the format of {src.path!r} (a local copy of "
                            f"{src.dataset}); name its files {', '.join(known)}")
        if src.match and self.kind not in ("jsonl", "json"):
            raise DataError(f"{self.where}: match needs jsonl or json records; {src.path!r} is {self.kind}")

    def __iter__(self) -> Iterator[str]:
        self._resolve_kind()
        kind = self.kind
        if kind == "hf":
            yield from self._hf()
            return
        self.files = self.paths()
        if kind == "files" and self.source.document == "directory":
            yield from self._directories()
            return
        reader = {"jsonl": self._jsonl, "json": self._json, "parquet": self._parquet,
                  "text": self._text_file, "files": self._file}[kind]
        for path in self.files:
            yield from reader(path)

    def _open(self, path: str):
        try:
            if path.endswith(".gz"):
                import gzip

                return gzip.open(path, "rb")
            if path.endswith(".zst"):
                try:
                    import zstandard  # optional: only .zst sources
                except ImportError:
                    raise DataError(
                        f"{path}: reading .zst needs the zstandard package (pip install zstandard)") from None
                return zstandard.ZstdDecompressor().stream_reader(open(path, "rb"), closefd=True,
                                                                  read_across_frames=True)
            return open(path, "rb")
        except OSError as err:
            raise DataError(f"{path}: cannot read ({err.strerror}; {self.where})") from None

    def _jsonl(self, path: str) -> Iterator[str]:
        field = self.source.text_field
        with self._open(path) as f:
            if path.endswith(".zst"):
                import io

                f = io.BufferedReader(f)
            for lineno, raw in enumerate(f, 1):
                if not raw.strip():
                    continue
                location = f"{path}:{lineno}"
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError as err:
                    self.records += 1
                    self.skip("not_utf8", location, f"invalid UTF-8 at byte {err.start}")
                    continue
                try:
                    record = json.loads(line)
                except ValueError as err:
                    self.records += 1
                    self.skip("malformed_json", location, f"malformed JSON ({str(err).split(':')[0]})")
                    continue
                if not isinstance(record, dict):
                    self.records += 1
                    self.skip("not_an_object", location,
                              f"expected a JSON object, got {type(record).__name__}")
                    continue
                if self._match and not self._matches(record):
                    continue
                text = self._text(record.get(field), location)
                if text is not None:
                    yield text

    def _json(self, path: str) -> Iterator[str]:
        with self._open(path) as f:
            raw = f.read()
        try:
            data = json.loads(raw.decode("utf-8"))
        except UnicodeDecodeError as err:
            self.records += 1
            self.skip("not_utf8", path, f"invalid UTF-8 at byte {err.start}")
            return
        except ValueError as err:
            self.records += 1
            self.skip("malformed_json", path, f"malformed JSON ({err})")
            return
        if isinstance(data, dict) and isinstance(data.get("data"), list):
            data = data["data"]
        if not isinstance(data, list):
            raise DataError(f"{path}: expected a JSON list of records (or {{\"data\": [...]}}), "
                            f"got {type(data).__name__} ({self.where})")
        field = self.source.text_field
        for i, record in enumerate(data):
            location = f"{path}[{i}]"
            if isinstance(record, str):
                if self._match:  # a bare string has no fields to match
                    self.filtered += 1
                    continue
                text = self._text(record, location)
            elif isinstance(record, dict):
                if self._match and not self._matches(record):
                    continue
                text = self._text(record.get(field), location)
            else:
                self.records += 1
                self.skip("not_an_object", location,
                          f"expected an object or a string, got {type(record).__name__}")
                continue
            if text is not None:
                yield text

    def _parquet(self, path: str) -> Iterator[str]:
        import pyarrow.parquet as pq  # heavy: only reading or building data

        field = self.source.text_field
        try:
            pf = pq.ParquetFile(path)
        except Exception as err:  # noqa: BLE001 - pyarrow raises several types for a bad file
            raise DataError(f"{path}: not a readable parquet file ({err}; {self.where})") from None
        names = pf.schema_arrow.names
        if field not in names:
            raise DataError(f"{path}: no column {field!r} (text_field of {self.where}); "
                            f"columns: {', '.join(names)}")
        row = 0
        for batch in pf.iter_batches(columns=[field], batch_size=4096):
            for value in batch.column(0).to_pylist():
                text = self._text(value, f"{path} row {row}")
                row += 1
                if text is not None:
                    yield text

    def _decode_file(self, path: str) -> str | None:
        with self._open(path) as f:
            raw = f.read()
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError as err:
            self.records += 1
            self.skip("not_utf8", path, f"invalid UTF-8 at byte {err.start}")
            return None

    def _text_file(self, path: str) -> Iterator[str]:
        content = self._decode_file(path)
        if content is None:
            return
        if self.source.text_split == "file":
            text = self._text(content, path)
            if text is not None:
                yield text
            return
        for i, block in enumerate(_BLANK_LINE.split(content)):
            if block.strip():
                self.records += 1
                yield block.strip("\n")

    def _file(self, path: str) -> Iterator[str]:
        content = self._decode_file(path)
        if content is not None:
            text = self._text(content, path)
            if text is not None:
                yield text

    def _directories(self) -> Iterator[str]:
        """One document per top-level directory of the source (its files in sorted order, each introduced by
        its relative path); files directly under the root, one document each."""
        root = expand_path(self.source.path or "")
        if not os.path.isdir(root):
            raise DataError(f"{self.where}: document: directory needs a directory path, got "
                            f"{self.source.path!r}")
        groups: dict[str, list[str]] = {}
        for path in self.files:
            rel = os.path.relpath(path, root)
            top = rel.split(os.sep, 1)[0] if os.sep in rel else rel
            groups.setdefault(top, []).append(path)
        for top in sorted(groups):
            parts = []
            for path in groups[top]:
                content = self._decode_file(path)
                if content is not None and content.strip():
                    parts.append(f"# file: {os.path.relpath(path, root)}\n{content}")
            text = self._text("\n".join(parts) if parts else "", os.path.join(root, top))
            if text is not None:
                yield text

    def _hf(self) -> Iterator[str]:
        import datasets  # heavy (pyarrow, fsspec): only reading or building data

        src = self.source
        name = src.dataset
        try:
            if _saved_to_disk(name):
                ds = datasets.load_from_disk(name)
                if isinstance(ds, datasets.DatasetDict):
                    if src.split not in ds:
                        raise DataError(f"{self.where}: {name} has no split {src.split!r}; "
                                        f"splits: {', '.join(ds)}")
                    ds = ds[src.split]
            else:
                ds = datasets.load_dataset(name, src.config, data_dir=src.data_dir, split=src.split,
                                           streaming=src.streaming)
        except DataError:
            raise
        except Exception as err:  # noqa: BLE001 - hub, network and format errors all end here
            raise DataError(f"{self._dataset_where()}: {hub_reason(err)}") from None
        columns = getattr(ds, "column_names", None)
        if columns is not None and src.text_field not in columns:
            raise DataError(f"{self.where}: dataset {name!r} has no column {src.text_field!r}; "
                            f"columns: {', '.join(columns)}")
        self.files = [name]
        if not src.streaming and not src.match and hasattr(ds, "select_columns"):
            ds = ds.select_columns([src.text_field])
        for i, record in enumerate(ds):
            if self._match and not self._matches(record):
                continue
            text = self._text(record.get(src.text_field), f"{name}[{i}]")
            if text is not None:
                yield text

    def _dataset_where(self) -> str:
        src = self.source
        data_dir = f", data_dir {src.data_dir!r}" if src.data_dir is not None else ""
        return (f"{self.where}: cannot load dataset {src.dataset!r} (config {src.config!r}{data_dir}, split "
                f"{src.split!r})")

    # -- the up-front check ------------------------------------------------------------------------------
    def check(self) -> None:
        """A cheap probe that the source can be read, before any source is streamed: a placeholder path is
        refused, local paths must match files, a hub dataset must resolve (its configuration, data_dir and
        split: `datasets.load_dataset_builder` reads the repository's file list, not its data). DataError
        otherwise."""
        src = self.source
        self._resolve_kind()
        if self.kind != "hf":
            if is_placeholder(src.path):
                raise DataError(f"{self.where}: path {src.path} is a placeholder for your own data: pass "
                                f"sources.{src.name}.path=PATH (a {self.kind} file, directory or glob) to "
                                f"scripts/prepare_data.py, or leave the source out of every stream")
            self.paths()
            return
        import datasets  # heavy (pyarrow, fsspec): only reading or building data

        name = src.dataset
        try:
            if _saved_to_disk(name):
                splits = None
                if os.path.isfile(os.path.join(name, "dataset_dict.json")):
                    with open(os.path.join(name, "dataset_dict.json"), encoding="utf-8") as f:
                        splits = json.load(f).get("splits")
            else:
                builder = datasets.load_dataset_builder(name, src.config, data_dir=src.data_dir)
                files = getattr(builder.config, "data_files", None)
                splits = [str(k) for k in files] if files else None
        except Exception as err:  # noqa: BLE001 - not found, offline and not cached, gated, a loading script
            hint = ""
            if "scripts are no longer supported" in str(err):
                hint = (f" (datasets >= 4 refuses loading scripts: use a parquet or jsonl copy of the data, "
                        f"e.g. sources.{src.name}.path=PATH)")
            raise DataError(f"{self._dataset_where()}: {hub_reason(err)}{hint}") from None
        split = src.split.split("[")[0]  # "train[:10%]" reads split train
        if splits is not None and split not in splits:
            raise DataError(f"{self._dataset_where()}: no split {split!r}; splits: {', '.join(splits)}")

    def summary(self) -> str:
        return ", ".join(f"{k}: {v}" for k, v in sorted(self.skipped.items())) or "none"
