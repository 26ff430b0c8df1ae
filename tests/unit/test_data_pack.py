"""Packers: no token lost or duplicated, boundaries, positions and labels, minimal padding."""

import numpy as np
import pytest

from distill.data.dataset import IGNORE_INDEX, row_positions_labels
from distill.data.pack import best_fit_bins, pack_best_fit, pack_concat, pack_window

PAD = -1


def _docs(lengths):
    """Documents whose tokens are unique (1..N), so loss or duplication shows up."""
    lengths = np.asarray(lengths, dtype=np.int64)
    return np.arange(1, int(lengths.sum()) + 1, dtype=np.int32), lengths


def _real_tokens(packed):
    out = []
    for r in range(packed.rows):
        n = sum(packed.row_lengths(r))
        out.append(packed.input_ids[r, :n])
        assert (packed.input_ids[r, n:] == PAD).all()
    return np.concatenate(out) if out else np.zeros(0, np.int32)


def test_concat_keeps_every_token_in_order_and_records_pieces():
    tokens, lengths = _docs([5, 3, 10, 1, 7])  # 26 tokens
    packed = pack_concat(tokens, lengths, 8, PAD, last_row="pad")
    assert packed.input_ids.shape == (4, 8)
    np.testing.assert_array_equal(_real_tokens(packed), tokens)
    assert [packed.row_lengths(r) for r in range(4)] == [[5, 3], [8], [2, 1, 5], [2]]
    assert packed.padding_tokens == 6 and packed.real_tokens == 26


def test_concat_drops_the_final_partial_row_by_default():
    tokens, lengths = _docs([5, 3, 10, 1, 7])
    packed = pack_concat(tokens, lengths, 8, PAD)
    assert packed.rows == 3 and packed.padding_tokens == 0
    np.testing.assert_array_equal(_real_tokens(packed), tokens[:24])
    assert packed.skipped_tokens == {"final_partial_row": 2}


def test_concat_exact_fit_has_no_skip():
    tokens, lengths = _docs([4, 4, 8])
    packed = pack_concat(tokens, lengths, 8, PAD)
    assert packed.rows == 2 and not packed.skipped_tokens
    assert [packed.row_lengths(r) for r in range(2)] == [[4, 4], [8]]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_best_fit_places_whole_documents_once(seed):
    rng = np.random.default_rng(seed)
    tokens, lengths = _docs(rng.integers(1, 65, size=300))
    packed = pack_best_fit(tokens, lengths, 64, PAD)
    real = _real_tokens(packed)
    assert len(real) == len(tokens) and len(np.unique(real)) == len(tokens)  # nothing lost or duplicated
    # Every piece is a whole document: contiguous token values matching a document's span.
    starts = set((np.cumsum(lengths) - lengths + 1).tolist())
    spans = {(int(s), int(n)) for s, n in zip(np.cumsum(lengths) - lengths + 1, lengths)}
    for r in range(packed.rows):
        off = 0
        for n in packed.row_lengths(r):
            piece = packed.input_ids[r, off: off + n]
            assert int(piece[0]) in starts and (int(piece[0]), n) in spans
            np.testing.assert_array_equal(piece, np.arange(piece[0], piece[0] + n))
            off += n
    # Padding is minimal up to best-fit-decreasing's guarantees: rows ≤ 11/9·OPT + 6/9 (OPT bounded below
    # by the token count and by the documents over half a row, which cannot share one), and no two rows
    # are both at most half full.
    lower = max(-(-int(lengths.sum()) // 64), int((lengths > 32).sum()))
    assert packed.rows <= 11 / 9 * lower + 6 / 9
    fills = [sum(packed.row_lengths(r)) for r in range(packed.rows)]
    assert sum(f <= 32 for f in fills) <= 1


def test_best_fit_is_optimal_on_a_known_instance():
    sizes = np.array([6, 5, 4, 3, 2, 2, 1, 1])  # total 24 = 3 bins of 8
    bins, order = best_fit_bins(sizes, 8)
    assert bins.max() + 1 == 3
    assert np.bincount(bins, weights=sizes).tolist() == [8, 8, 8]
    assert order.tolist() == [0, 1, 2, 3, 4, 5, 6, 7]


def test_best_fit_long_documents_split_or_drop():
    tokens, lengths = _docs([20, 3, 5])
    split = pack_best_fit(tokens, lengths, 8, PAD, long_docs="split")
    assert split.real_tokens == 28
    np.testing.assert_array_equal(np.sort(_real_tokens(split)), tokens)
    assert sorted(n for r in range(split.rows) for n in split.row_lengths(r)) == [3, 4, 5, 8, 8]
    drop = pack_best_fit(tokens, lengths, 8, PAD, long_docs="drop")
    assert drop.real_tokens == 8 and drop.skipped_docs == {"longer_than_seq_len": 1}
    assert drop.rows == 1 and drop.row_lengths(0) == [5, 3]


def test_window_stays_inside_documents():
    tokens, lengths = _docs([10, 3, 8, 17])
    packed = pack_window(tokens, lengths, 8)
    assert packed.rows == 1 + 1 + 2
    assert packed.skipped_docs == {"shorter_than_seq_len": 1}
    ends = np.cumsum(lengths)
    for r in range(packed.rows):
        row = packed.input_ids[r]
        doc_first = np.searchsorted(ends, row[0] - 1, side="right")
        doc_last = np.searchsorted(ends, row[-1] - 1, side="right")
        assert doc_first == doc_last  # never crosses a boundary
        np.testing.assert_array_equal(row, np.arange(row[0], row[0] + 8))
        assert packed.row_lengths(r) == [8]
    strided = pack_window(tokens, lengths, 8, stride=4)
    assert strided.rows == 1 + 1 + 3  # (10-8)//4+1, 1, (17-8)//4+1


def test_positions_and_labels_restart_per_document():
    ids = np.array([10, 11, 12, 20, 21, 30, PAD, PAD], dtype=np.int32)
    positions, labels = row_positions_labels(ids, np.array([3, 2, 1]))
    assert positions.tolist() == [0, 1, 2, 0, 1, 0, 0, 1]
    assert labels.tolist() == [IGNORE_INDEX, 11, 12, IGNORE_INDEX, 21, IGNORE_INDEX, IGNORE_INDEX,
                               IGNORE_INDEX]
    full, full_labels = row_positions_labels(ids[:5], np.array([5]))
    assert (full.tolist() == [0, 1, 2, 3, 4] and full_labels[0] == IGNORE_INDEX
            and (full_labels[1:] == ids[1:5]).all())


def test_permute_keeps_rows_with_their_lengths():
    tokens, lengths = _docs([5, 3, 10, 1, 7])
    packed = pack_concat(tokens, lengths, 8, PAD, last_row="pad")
    order = np.array([2, 0, 3, 1])
    moved = packed.permute(order)
    for new, old in enumerate(order):
        np.testing.assert_array_equal(moved.input_ids[new], packed.input_ids[old])
        assert moved.row_lengths(new) == packed.row_lengths(old)
