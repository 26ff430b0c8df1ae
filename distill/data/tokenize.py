"""Tokenizing documents in batches into one flat int32 array (no per-document Python objects kept).

The fast tokenizer's Rust batch encoder does the work; we hold each source as `tokens` (all documents
end to end, EOS appended per document when asked), `lengths` and a content-hash key per document that
decides the held-out split and the fractional part of upsampling.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import logging
import os
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import numpy as np

from distill.data.dataset import DataError
from distill.hub import GATED_HINT, hub_reason

log = logging.getLogger(__name__)

_TWO64 = float(2**64)


def load_tokenizer(name: str) -> Any:
    """AutoTokenizer from a hub id or a directory; DataError (one line) when it does not load."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "true")
    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        tokenizer = AutoTokenizer.from_pretrained(name)
    except Exception as err:  # noqa: BLE001 - OSError, ValueError, hub errors: all mean "does not load"
        text = " ".join(str(err).split())
        if len(text) > 300:
            text = text[:300] + "…"
        where = "directory" if os.path.isdir(name) else "hub id or directory"

        if hub_reason(err) is GATED_HINT:  # Llama: the hub wants a login with access to the repository
            text = GATED_HINT
        else:
            text = f"{type(err).__name__}: {text}"
        raise DataError(f"tokenizer {name!r} ({where}) does not load: {text}") from None
    finally:
        hf_logging.set_verbosity(verbosity)
    if not getattr(tokenizer, "is_fast", False) and getattr(tokenizer, "_tokenizer", None) is None:
        log.warning("tokenizer %s is not a fast tokenizer: tokenization will be slow", name)
    return tokenizer


def hash_keys(texts: list[str]) -> np.ndarray:
    """(N, 2) float64 in [0, 1): two independent uniform keys per document from sha1 of its text."""
    keys = np.empty((len(texts), 2), dtype=np.float64)
    for i, text in enumerate(texts):
        digest = hashlib.sha1(text.encode("utf-8", "surrogatepass")).digest()
        keys[i, 0] = int.from_bytes(digest[:8], "big") / _TWO64
        keys[i, 1] = int.from_bytes(digest[8:16], "big") / _TWO64
    return keys


class BatchEncoder:
    """`encode(texts) -> list[list[int]]` without special tokens, through the Rust backend when it gives
    the same ids as `tokenizer(texts, add_special_tokens=False)` (checked once on a sample)."""

    def __init__(self, tokenizer: Any):
        self.tokenizer = tokenizer
        backend = getattr(tokenizer, "_tokenizer", None)
        self._fast = getattr(backend, "encode_batch_fast", None) or getattr(backend, "encode_batch", None)
        self._checked = False

    def _slow(self, texts: list[str]) -> list[list[int]]:
        return self.tokenizer(texts, add_special_tokens=False)["input_ids"]

    def encode(self, texts: list[str]) -> list[list[int]]:
        if self._fast is None:
            return self._slow(texts)
        if not self._checked:
            self._checked = True
            # A cheap sample (a few documents, cut short): a whole batch twice would cost seconds.
            sample = [t[:4096] for t in texts[:16]]
            if [e.ids for e in self._fast(sample, add_special_tokens=False)] != self._slow(sample):
                log.info("backend batch encoding differs from the tokenizer's call; using the call")
                self._fast = None
                return self._slow(texts)
        return [e.ids for e in self._fast(texts, add_special_tokens=False)]


@dataclasses.dataclass
class TokenizedSource:
    """All documents of one source, end to end."""

    tokens: np.ndarray
    """(N,) int32: every document's tokens (with EOS when asked), in reading order."""
    lengths: np.ndarray
    """(D,) int64: tokens per document (EOS included)."""
    keys: np.ndarray
    """(D, 2) float64: content-hash keys (column 0: held-out choice; column 1: upsampling draw)."""
    no_tokens: int = 0
    """Documents that tokenized to nothing (skipped)."""

    @property
    def starts(self) -> np.ndarray:
        return np.cumsum(self.lengths) - self.lengths


def _batches(docs: Iterable[str], size: int) -> Iterator[list[str]]:
    it = iter(docs)
    while True:
        batch = list(itertools.islice(it, size))
        if not batch:
            return
        yield batch


def tokenize_documents(docs: Iterable[str], tokenizer: Any, *, batch_size: int = 1000,
                       eos_id: int | None = None,
                       on_empty: Callable[[int], None] | None = None,
                       stop: Callable[[np.ndarray, np.ndarray], bool] | None = None,
                       progress: Any = None) -> TokenizedSource:
    """Tokenize `docs` in batches into a `TokenizedSource`.

    Args:
        docs: document texts.
        eos_id: appended to every document when not None.
        on_empty: called with the batch-local index of a document that tokenizes to nothing (may raise).
        stop: called after each batch with (lengths, keys) of that batch; True stops reading.
        progress: a tqdm bar updated with the tokens of each batch.
    """
    encoder = BatchEncoder(tokenizer)
    token_parts: list[np.ndarray] = []
    length_parts: list[np.ndarray] = []
    key_parts: list[np.ndarray] = []
    no_tokens = 0
    extra = 0 if eos_id is None else 1
    for texts in _batches(docs, batch_size):
        ids = encoder.encode(texts)
        raw = np.fromiter(map(len, ids), dtype=np.int64, count=len(ids))
        if (raw == 0).any():
            empty = np.flatnonzero(raw == 0)
            for i in empty.tolist():
                if on_empty is not None:
                    on_empty(i)
            no_tokens += len(empty)
            keep = raw > 0
            ids = [x for x, k in zip(ids, keep.tolist()) if k]
            texts = [t for t, k in zip(texts, keep.tolist()) if k]
            raw = raw[keep]
            if not ids:
                continue
        lengths = raw + extra
        total = int(lengths.sum())
        if eos_id is None:
            flat = np.fromiter(itertools.chain.from_iterable(ids), dtype=np.int32, count=total)
        else:
            flat = np.fromiter(itertools.chain.from_iterable(ids), dtype=np.int32, count=total - len(ids))
            # Insert EOS after each document: shift each document right by its index.
            out = np.empty(total, dtype=np.int32)
            ends = np.cumsum(lengths) - 1  # EOS slots
            mask = np.ones(total, dtype=bool)
            mask[ends] = False
            out[mask] = flat
            out[ends] = eos_id
            flat = out
        keys = hash_keys(texts)
        token_parts.append(flat)
        length_parts.append(lengths)
        key_parts.append(keys)
        if progress is not None:
            progress.update(total)
        if stop is not None and stop(lengths, keys):
            break
    if not token_parts:
        return TokenizedSource(np.zeros(0, np.int32), np.zeros(0, np.int64), np.zeros((0, 2)), no_tokens)
    return TokenizedSource(np.concatenate(token_parts), np.concatenate(length_parts),
                           np.concatenate(key_parts), no_tokens)
