"""Packing tokenized documents into fixed-length rows, with numpy.

Every packer takes the documents of a stream as one flat token array plus their lengths (in stream
order) and returns a `Packed`: rows of exactly seq_len tokens, the lengths of the real documents or
pieces in each row (in order; padding follows their sum), and what was skipped and why.
"""

from __future__ import annotations

import bisect
import dataclasses

import numpy as np


@dataclasses.dataclass
class Packed:
    input_ids: np.ndarray
    """(R, T) int32."""
    lengths: np.ndarray
    """(P,) int32: lengths of all pieces, row after row."""
    row_offsets: np.ndarray
    """(R + 1,) int64: row r holds pieces lengths[row_offsets[r]:row_offsets[r + 1]]."""
    skipped_docs: dict[str, int] = dataclasses.field(default_factory=dict)
    """Reason → documents left out (or, for a dropped final row, 1)."""
    skipped_tokens: dict[str, int] = dataclasses.field(default_factory=dict)
    """Reason → tokens left out."""

    @property
    def rows(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def real_tokens(self) -> int:
        return int(self.lengths.sum())

    @property
    def padding_tokens(self) -> int:
        return self.rows * int(self.input_ids.shape[1]) - self.real_tokens

    def row_lengths(self, r: int) -> list[int]:
        return self.lengths[self.row_offsets[r]: self.row_offsets[r + 1]].tolist()

    def permute(self, order: np.ndarray) -> Packed:
        """The same rows in another order (e.g. a seeded shuffle)."""
        counts = np.diff(self.row_offsets)[order]
        starts = self.row_offsets[:-1][order]
        offsets = np.zeros(len(order) + 1, dtype=np.int64)
        np.cumsum(counts, out=offsets[1:])
        gather = (np.arange(int(offsets[-1]), dtype=np.int64) - np.repeat(offsets[:-1], counts)
                  + np.repeat(starts, counts))
        return Packed(self.input_ids[order], self.lengths[gather], offsets, self.skipped_docs,
                      self.skipped_tokens)


def _doc_starts(lengths: np.ndarray) -> np.ndarray:
    return np.cumsum(lengths, dtype=np.int64) - lengths


def gather_pieces(tokens: np.ndarray, src_starts: np.ndarray, dst_starts: np.ndarray, lens: np.ndarray,
                  out: np.ndarray) -> None:
    """Copy pieces tokens[src:src+len] to out.flat[dst:dst+len] (vectorised over pieces)."""
    lens = lens.astype(np.int64)
    total = int(lens.sum())
    if total == 0:
        return
    within = np.arange(total, dtype=np.int64) - np.repeat(np.cumsum(lens) - lens, lens)
    out.reshape(-1)[np.repeat(dst_starts, lens) + within] = tokens[np.repeat(src_starts, lens) + within]


def _empty(seq_len: int) -> Packed:
    return Packed(np.zeros((0, seq_len), np.int32), np.zeros(0, np.int32), np.zeros(1, np.int64))


def pack_concat(tokens: np.ndarray, lengths: np.ndarray, seq_len: int, pad_id: int,
                last_row: str = "drop") -> Packed:
    """Join documents end to end and cut rows of seq_len; a document crossing a row boundary is split
    into pieces (each piece gets its own entry in the row's lengths). The final partial row is dropped
    (counted) or padded."""
    lengths = np.asarray(lengths, dtype=np.int64)
    total = int(lengths.sum())
    full_rows, rest = divmod(total, seq_len)
    skipped_docs, skipped_tokens = {}, {}
    if rest and last_row == "drop":
        used = full_rows * seq_len
        skipped_docs["final_partial_row"] = 1
        skipped_tokens["final_partial_row"] = rest
    else:
        used = total
    rows = -(-used // seq_len)
    if rows == 0:
        packed = _empty(seq_len)
        packed.skipped_docs, packed.skipped_tokens = skipped_docs, skipped_tokens
        return packed
    ids = np.full(rows * seq_len, pad_id, dtype=np.int32)
    ids[:used] = tokens[:used]
    doc_ends = np.cumsum(lengths)
    doc_ends = doc_ends[doc_ends < used]
    row_ends = np.arange(seq_len, used, seq_len, dtype=np.int64)
    cuts = np.union1d(doc_ends, row_ends)
    cuts = np.append(cuts, used)
    starts = np.concatenate(([0], cuts[:-1]))
    piece_lens = (cuts - starts).astype(np.int32)
    piece_rows = starts // seq_len
    offsets = np.zeros(rows + 1, dtype=np.int64)
    np.cumsum(np.bincount(piece_rows, minlength=rows), out=offsets[1:])
    return Packed(ids.reshape(rows, seq_len), piece_lens, offsets, skipped_docs, skipped_tokens)


def best_fit_bins(sizes: np.ndarray, capacity: int) -> tuple[np.ndarray, np.ndarray]:
    """Best-fit decreasing: place items (each ≤ capacity) into bins, each into the open bin with the least
    room that still fits it. Returns (bin index per item, placement order) where placement order lists
    item indices by decreasing size (ties by index), which is also their order inside each bin."""
    order = np.argsort(-np.asarray(sizes, dtype=np.int64), kind="stable")
    bin_of = np.empty(len(order), dtype=np.int64)
    free_sizes: list[int] = []  # sorted distinct room values of open bins with room > 0
    by_room: dict[int, list[int]] = {}  # room → bins with exactly that room (a stack)
    rooms: list[int] = []
    for item in order.tolist():
        size = int(sizes[item])
        k = bisect.bisect_left(free_sizes, size)
        if k < len(free_sizes):
            room = free_sizes[k]
            stack = by_room[room]
            b = stack.pop()
            if not stack:
                del by_room[room]
                free_sizes.pop(k)
        else:
            b = len(rooms)
            rooms.append(capacity)
            room = capacity
        left = room - size
        rooms[b] = left
        bin_of[item] = b
        if left > 0:
            stack = by_room.get(left)
            if stack is None:
                by_room[left] = [b]
                bisect.insort(free_sizes, left)
            else:
                stack.append(b)
    return bin_of, order


def pack_best_fit(tokens: np.ndarray, lengths: np.ndarray, seq_len: int, pad_id: int,
                  long_docs: str = "split") -> Packed:
    """Whole documents into rows with the least padding (best-fit decreasing). A document longer than
    seq_len is cut into full seq_len rows plus a remainder piece that is packed like a document (split),
    or skipped (drop)."""
    lengths = np.asarray(lengths, dtype=np.int64)
    starts = _doc_starts(lengths)
    skipped_docs, skipped_tokens = {}, {}
    long_mask = lengths > seq_len
    full_src = np.zeros(0, dtype=np.int64)
    if long_mask.any():
        if long_docs == "drop":
            skipped_docs["longer_than_seq_len"] = int(long_mask.sum())
            skipped_tokens["longer_than_seq_len"] = int(lengths[long_mask].sum())
            starts, lengths = starts[~long_mask], lengths[~long_mask]
        else:
            n_full = lengths // seq_len
            n_full[~long_mask] = 0
            # Full-length pieces: whole rows of their own.
            doc_idx = np.repeat(np.arange(len(lengths)), n_full)
            within = np.arange(int(n_full.sum())) - np.repeat(np.cumsum(n_full) - n_full, n_full)
            full_src = starts[doc_idx] + within * seq_len
            rem = lengths - n_full * seq_len
            starts = np.where(long_mask, starts + n_full * seq_len, starts)
            lengths = np.where(long_mask, rem, lengths)
            keep = lengths > 0
            starts, lengths = starts[keep], lengths[keep]
    bin_of, order = best_fit_bins(lengths, seq_len)
    n_bins = int(bin_of.max()) + 1 if len(bin_of) else 0
    # Pieces grouped by bin, keeping placement order inside a bin.
    placed_bins = bin_of[order]
    by_bin = order[np.argsort(placed_bins, kind="stable")]
    piece_lens = lengths[by_bin]
    counts = np.bincount(bin_of, minlength=n_bins)
    rows = len(full_src) + n_bins
    if rows == 0:
        packed = _empty(seq_len)
        packed.skipped_docs, packed.skipped_tokens = skipped_docs, skipped_tokens
        return packed
    ids = np.full((rows, seq_len), pad_id, dtype=np.int32)
    # Full pieces first, then the bins.
    n_full_rows = len(full_src)
    full_rows_dst = np.arange(n_full_rows, dtype=np.int64) * seq_len
    gather_pieces(tokens, full_src, full_rows_dst, np.full(n_full_rows, seq_len, dtype=np.int64), ids)
    excl = np.cumsum(piece_lens) - piece_lens
    first_piece = np.cumsum(counts) - counts
    offset_in_bin = excl - np.repeat(excl[first_piece], counts)
    dst = (n_full_rows + np.repeat(np.arange(n_bins, dtype=np.int64), counts)) * seq_len + offset_in_bin
    gather_pieces(tokens, starts[by_bin], dst, piece_lens, ids)
    all_lens = np.concatenate((np.full(n_full_rows, seq_len, dtype=np.int64), piece_lens)).astype(np.int32)
    all_counts = np.concatenate((np.ones(n_full_rows, dtype=np.int64), counts))
    offsets = np.zeros(rows + 1, dtype=np.int64)
    np.cumsum(all_counts, out=offsets[1:])
    return Packed(ids, all_lens, offsets, skipped_docs, skipped_tokens)


def pack_window(tokens: np.ndarray, lengths: np.ndarray, seq_len: int, stride: int | None = None) -> Packed:
    """Contiguous seq_len windows from inside single documents (never across a boundary), starting every
    `stride` tokens (default seq_len). Documents shorter than seq_len are skipped and counted."""
    stride = stride or seq_len
    lengths = np.asarray(lengths, dtype=np.int64)
    starts = _doc_starts(lengths)
    short = lengths < seq_len
    skipped_docs, skipped_tokens = {}, {}
    if short.any():
        skipped_docs["shorter_than_seq_len"] = int(short.sum())
        skipped_tokens["shorter_than_seq_len"] = int(lengths[short].sum())
    n_win = np.where(short, 0, (lengths - seq_len) // stride + 1)
    rows = int(n_win.sum())
    if rows == 0:
        packed = _empty(seq_len)
        packed.skipped_docs, packed.skipped_tokens = skipped_docs, skipped_tokens
        return packed
    doc_idx = np.repeat(np.arange(len(lengths)), n_win)
    k = np.arange(rows, dtype=np.int64) - np.repeat(np.cumsum(n_win) - n_win, n_win)
    src = starts[doc_idx] + k * stride
    covered = np.where(short, 0, (n_win - 1) * stride + seq_len)
    tail = int((lengths - covered)[~short].sum()) if stride >= seq_len else 0
    if tail:
        skipped_tokens["window_tail"] = tail
    ids = np.empty((rows, seq_len), dtype=np.int32)
    for lo in range(0, rows, 4096):  # bounded index memory
        hi = min(rows, lo + 4096)
        ids[lo:hi] = tokens[src[lo:hi, None] + np.arange(seq_len, dtype=np.int64)]
    return Packed(ids, np.full(rows, seq_len, dtype=np.int32), np.arange(rows + 1, dtype=np.int64),
                  skipped_docs, skipped_tokens)


def pack(mode: str, tokens: np.ndarray, lengths: np.ndarray, seq_len: int, pad_id: int, *,
         long_docs: str = "split", stride: int | None = None, last_row: str = "drop") -> Packed:
    if mode == "concat":
        return pack_concat(tokens, lengths, seq_len, pad_id, last_row=last_row)
    if mode == "best_fit":
        return pack_best_fit(tokens, lengths, seq_len, pad_id, long_docs=long_docs)
    if mode == "window":
        return pack_window(tokens, lengths, seq_len, stride=stride)
    raise ValueError(f"pack mode {mode!r}; allowed: concat, best_fit, window")
