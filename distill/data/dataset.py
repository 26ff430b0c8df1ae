"""Reading built streams: `PackedStream` opens `<output_dir>/<stream>/` (memory-mapped Arrow) and turns a
packed row into model inputs — positions restarting at every document, labels masked at each document's
first token and on padding. Also the tokenizer fingerprint that ties built data to its tokenizer.
"""

from __future__ import annotations

import bisect
import hashlib
import json
import os
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import torch

IGNORE_INDEX = -100
STREAM_INFO = "stream.json"


class DataError(ValueError):
    """A user mistake in data or a built directory (missing file, bad record, wrong tokenizer): one line."""


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """sha256 hex of the tokenizer's sorted vocabulary and its special tokens with their ids."""
    return tokenizer_identity(tokenizer)["sha256"]


def tokenizer_identity(tokenizer: Any) -> dict:
    """{"sha256", "vocab_size", "special_tokens"} — what manifest.json records about the tokenizer."""
    vocab = tokenizer.get_vocab()
    special = {}
    for attr in ("bos_token", "eos_token", "unk_token", "pad_token", "sep_token", "cls_token", "mask_token"):
        token = getattr(tokenizer, attr, None)
        if token is not None:
            special[attr] = [str(token), tokenizer.convert_tokens_to_ids(str(token))]
    extra = sorted((str(t), vocab.get(str(t), -1)) for t in getattr(tokenizer, "all_special_tokens", []))
    h = hashlib.sha256()
    h.update(json.dumps(sorted(vocab.items()), ensure_ascii=False, separators=(",", ":")).encode("utf-8"))
    h.update(b"\0")
    h.update(json.dumps([sorted(special.items()), extra], ensure_ascii=False, separators=(",", ":")).encode())
    return {"sha256": h.hexdigest(), "vocab_size": len(vocab), "special_tokens": special}


def row_positions_labels(input_ids: np.ndarray, lengths: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Position ids restarting at 0 per document (padding counts up from 0 too) and labels (-100 at each
    document's first token and on padding) for one row. Shapes: (T,) int64 each."""
    seq_len = input_ids.shape[0]
    lengths = lengths.astype(np.int64)
    real = int(lengths.sum())
    segments = lengths if real == seq_len else np.append(lengths, seq_len - real)
    starts = np.cumsum(segments) - segments  # (S,)
    positions = np.arange(seq_len, dtype=np.int64) - np.repeat(starts, segments)  # (T,)
    labels = input_ids.astype(np.int64)  # a copy
    labels[starts[: len(lengths)]] = IGNORE_INDEX
    labels[real:] = IGNORE_INDEX
    return positions, labels


MANIFEST = "manifest.json"


def find_manifest(path: str) -> tuple[str | None, dict | None]:
    """(build root, manifest) of a built stream `<root>/<stream>` or `<root>/holdout/<stream>`; (None, None)
    when no manifest is found above it."""
    here = os.path.abspath(path)
    for root in (os.path.dirname(here), os.path.dirname(os.path.dirname(here))):
        candidate = os.path.join(root, MANIFEST)
        if os.path.isfile(candidate):
            try:
                with open(candidate, encoding="utf-8") as f:
                    return root, json.load(f)
            except (OSError, ValueError):
                return root, None
    return None, None


def holdout_of(stream_dir: str) -> str | None:
    """`<built>/<stream>` → `<built>/holdout/<stream>` when it exists and has rows."""
    root, name = os.path.split(os.path.normpath(stream_dir))
    path = os.path.join(root, "holdout", name)
    try:
        with open(os.path.join(path, STREAM_INFO), encoding="utf-8") as f:
            rows = json.load(f).get("rows", 0)
    except (OSError, ValueError):
        return None
    return path if rows > 0 else None  # an empty held-out split evaluates nothing


class PackedStream:
    """One built stream directory (train or holdout split), read row by row without decoding the rest.

    Args:
        path: `<output_dir>/<stream>` or `<output_dir>/holdout/<stream>`.
        tokenizer: when given, refuse data built with a tokenizer of another fingerprint.
    """

    def __init__(self, path: str | os.PathLike, tokenizer: Any = None):
        import datasets  # heavy (pyarrow, fsspec): only reading or building data

        self.path = os.fspath(path)
        info_path = os.path.join(self.path, STREAM_INFO)
        if not os.path.isdir(self.path):
            raise DataError(f"{self.path}: no such built stream directory; "
                            f"build it with scripts/prepare_data.py")
        if not os.path.isfile(info_path):
            raise DataError(f"{self.path}: not a built stream (no {STREAM_INFO}); "
                            f"build it with scripts/prepare_data.py")
        try:
            with open(info_path, encoding="utf-8") as f:
                self.info: dict = json.load(f)
            self.seq_len = int(self.info["seq_len"])
        except (OSError, ValueError, KeyError) as err:
            raise DataError(f"{info_path}: unreadable stream info ({err})") from None
        if tokenizer is not None:
            ours = tokenizer_fingerprint(tokenizer)
            theirs = str(self.info.get("tokenizer_fingerprint", ""))
            if ours != theirs:
                raise DataError(f"{self.path}: built with a different tokenizer "
                                f"(fingerprint {theirs[:12]}… vs {ours[:12]}…); "
                                f"rebuild with scripts/prepare_data.py")
        if int(self.info.get("rows", 1)) == 0:
            raise DataError(f"{self.path}: the stream has no rows "
                            f"(too little data for seq_len {self.seq_len}, or "
                            f"a held-out fraction too small); rebuild with more data or a smaller seq_len")
        try:
            self.dataset = datasets.load_from_disk(self.path)  # memory-mapped
        except Exception as err:  # noqa: BLE001 - any failure here means a broken directory
            raise DataError(
                f"{self.path}: cannot open the built dataset ({type(err).__name__}: {err})") from None
        if not isinstance(self.dataset, datasets.Dataset) or "input_ids" not in self.dataset.column_names:
            raise DataError(f"{self.path}: not a built stream (no input_ids column)")
        table = self.dataset.data.table
        ids_chunks = table.column("input_ids").chunks
        len_chunks = table.column("lengths").chunks
        self._chunk_starts = []
        self._ids: list[np.ndarray] = []
        self._len_offsets: list[np.ndarray] = []
        self._len_values: list[np.ndarray] = []
        start = 0
        for ids, lens in zip(ids_chunks, len_chunks):
            if len(ids) == 0:
                continue
            self._chunk_starts.append(start)
            # Zero-copy views into the memory-mapped Arrow buffers.
            self._ids.append(ids.flatten().to_numpy(zero_copy_only=False).reshape(len(ids), self.seq_len))
            self._len_offsets.append(lens.offsets.to_numpy(zero_copy_only=False))
            self._len_values.append(lens.values.to_numpy(zero_copy_only=False))
            start += len(ids)
        self._rows = start
        # The Arrow file each row lives in (a bad row is reported with its file).
        self.files: list[tuple[str, int, int]] = []  # (path, first row, rows)
        first = 0
        for block in getattr(self.dataset.data, "blocks", [[self.dataset.data]]):
            for table in block:
                path = getattr(table, "path", None) or self.path
                self.files.append((path, first, len(table)))
                first += len(table)

    def __len__(self) -> int:
        return self._rows

    def _locate(self, i: int) -> tuple[int, int]:
        if not -self._rows <= i < self._rows:
            raise IndexError(f"row {i} out of range for {self.path} ({self._rows} rows)")
        i = i % self._rows
        k = bisect.bisect_right(self._chunk_starts, i) - 1
        return k, i - self._chunk_starts[k]

    def input_ids(self, i: int) -> np.ndarray:
        k, j = self._locate(int(i))
        return self._ids[k][j]

    def lengths(self, i: int) -> list[int]:
        k, j = self._locate(int(i))
        offsets = self._len_offsets[k]
        return self._len_values[k][offsets[j]: offsets[j + 1]].tolist()

    def documents(self, i: int) -> list[np.ndarray]:
        """The documents of row i, each its token ids (no padding)."""
        ids, out, at = self.input_ids(i), [], 0
        for n in self.lengths(i):
            out.append(ids[at: at + n])
            at += n
        return out

    def file_of(self, i: int) -> str:
        """The Arrow file holding row i."""
        i = int(i) % self._rows
        for path, first, rows in self.files:
            if first <= i < first + rows:
                return path
        return self.path

    def real_mask(self, indices) -> torch.Tensor:
        """(B, T) bool: True on document tokens, False on the padding at the end of each row."""
        import torch

        totals = torch.tensor([sum(self.lengths(int(i))) for i in indices])  # (B,)
        return torch.arange(self.seq_len)[None, :] < totals[:, None]

    def check_manifest(self) -> None:
        """The cheap start-up check: this stream's row count and Arrow file sizes against what the build
        recorded (stream.json and the build's manifest.json). Checksums are `scripts/prepare_data.py
        --verify`'s job (they read every byte).

        Raises:
            DataError: one line naming the file, what it has and what was recorded.
        """
        recorded = int(self.info.get("rows", self._rows))
        if recorded != self._rows:
            raise DataError(f"{self.path}: {self._rows} rows, but the build recorded {recorded} (damaged or "
                            f"replaced?); rebuild it, or check it with scripts/prepare_data.py --verify")
        root, manifest = find_manifest(self.path)
        sizes = (manifest or {}).get("sizes", {})
        for path, _, _ in self.files:
            rel = os.path.relpath(path, root).replace(os.sep, "/") if root else None
            if rel in sizes and os.path.getsize(path) != sizes[rel]:
                raise DataError(f"{path}: {os.path.getsize(path)} bytes, but the build recorded {sizes[rel]} "
                                f"(damaged or replaced?); run scripts/prepare_data.py --verify {root}")

    def bad_rows(self, indices, input_ids: torch.Tensor, vocab_size: int) -> tuple[list[str], torch.Tensor]:
        """The rows of a batch that cannot be trained on: a token id outside [0, vocab_size) (one vectorised
        check per batch), or document lengths that do not fit the row (damaged `lengths`).

        Args:
            indices: the rows of the batch (B,).
            input_ids: their (B, T) token ids.

        Returns:
            (one line per bad row naming the row, the problem and its file; a (B,) bool mask of them).
        """
        bad = (input_ids < 0) | (input_ids >= vocab_size)  # (B, T)
        rows = bad.any(dim=1)  # (B,)
        lines = []
        for b, i in enumerate(indices):
            where = f"row {int(i)} of {self.path} (file {self.file_of(i)})"
            if bool(rows[b]):
                t = int(bad[b].nonzero()[0])
                lines.append(f"{where} has token id {int(input_ids[b, t])} at position {t}, outside the "
                             f"vocabulary [0, {vocab_size})")
            elif not self._lengths_fit(self.lengths(int(i))):
                rows[b] = True
                lines.append(f"{where} has document lengths {self.lengths(int(i))[:8]} that do not fit a row "
                             f"of {self.seq_len} tokens")
        return lines, rows

    def _lengths_fit(self, lengths) -> bool:
        return all(n > 0 for n in lengths) and sum(lengths) <= self.seq_len

    def _row_arrays(self, i: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
        k, j = self._locate(int(i))
        ids = self._ids[k][j]
        offsets = self._len_offsets[k]
        lens = self._len_values[k][offsets[j]: offsets[j + 1]]
        if not self._lengths_fit(lens.tolist()):  # damaged: read as one document; `bad_rows` reports it
            lens = np.array([self.seq_len], dtype=lens.dtype)
        positions, labels = row_positions_labels(ids, lens)
        return ids.astype(np.int64), positions, labels, len(lens)

    def row(self, i: int) -> dict[str, torch.Tensor]:
        """{"input_ids", "position_ids", "labels"}: int64 tensors of shape (T,)."""
        import torch

        ids, positions, labels, _ = self._row_arrays(i)
        return {"input_ids": torch.from_numpy(ids), "position_ids": torch.from_numpy(positions),
                "labels": torch.from_numpy(labels)}

    __getitem__ = row

    def batch(self, indices) -> dict[str, torch.Tensor]:
        """Stacked rows: input_ids, position_ids, labels (B, T) int64 and num_docs (B,) int64."""
        import torch

        rows = [self._row_arrays(int(i)) for i in indices]
        if not rows:
            empty = torch.zeros((0, self.seq_len), dtype=torch.int64)
            return {"input_ids": empty, "position_ids": empty.clone(), "labels": empty.clone(),
                    "num_docs": torch.zeros((0,), dtype=torch.int64)}
        return {
            "input_ids": torch.from_numpy(np.stack([r[0] for r in rows])),  # (B, T)
            "position_ids": torch.from_numpy(np.stack([r[1] for r in rows])),  # (B, T)
            "labels": torch.from_numpy(np.stack([r[2] for r in rows])),  # (B, T)
            "num_docs": torch.tensor([r[3] for r in rows], dtype=torch.int64),  # (B,)
        }

    def __repr__(self) -> str:
        return f"PackedStream({self.path!r}, rows={self._rows}, seq_len={self.seq_len})"


def export_text(stream: PackedStream, tokenizer: Any, path: str) -> int:
    """Write every document of a built stream as one JSON line {"text": ...} (decoded, without the separator
    the builder appended): the held-out data as a text dataset, e.g. for an lm-evaluation-harness local task.
    Returns the number of documents written."""
    eos = stream.info.get("eos_token_id", tokenizer.eos_token_id)
    written = 0
    tmp = f"{path}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        for i in range(len(stream)):
            for piece in stream.documents(i):
                doc = [int(t) for t in piece]
                if doc and eos is not None and doc[-1] == eos:
                    doc = doc[:-1]
                f.write(json.dumps({"text": tokenizer.decode(doc)}) + "\n")
                written += 1
    os.replace(tmp, path)
    return written
