"""Building the packed streams of a data spec: read → tokenize → select per stream → pack → write.

Output (all inside `spec.output_dir`, built in a temp dir next to it and renamed at the end):
    <stream>/            datasets.save_to_disk dir (input_ids int32 × seq_len, lengths list<int32>)
                         + stream.json
    holdout/<stream>/    the held-out documents of that stream, same format
    manifest.json        resolved spec, tokenizer fingerprint, counts per stream and source, skips, checksums
The same spec and inputs give byte-identical Arrow files (no clocks, no unseeded randomness).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
import zlib
from typing import Any

import numpy as np

from distill.config import to_dict
from distill.data.dataset import MANIFEST, STREAM_INFO, DataError, tokenizer_identity
from distill.data.pack import Packed, gather_pieces, pack
from distill.data.sources import SourceReader, check_sources
from distill.data.spec import DataSpec, DataStreamConfig, SourceConfig, load_spec
from distill.data.tokenize import TokenizedSource, load_tokenizer, tokenize_documents
from distill.files import replace_dir

log = logging.getLogger(__name__)


def _crc(name: str) -> int:
    return zlib.crc32(name.encode("utf-8"))


def _shares(spec: DataSpec, stream: DataStreamConfig, budget: int | None) -> dict[str, float | None]:
    """Token budget of each source inside a stream, split by source weight."""
    if budget is None:
        return {name: None for name in stream.sources}
    total = sum(spec.source(n).weight for n in stream.sources)
    return {n: budget * spec.source(n).weight / total for n in stream.sources}


def _length_mask(lengths: np.ndarray, stream: DataStreamConfig) -> np.ndarray:
    mask = lengths >= stream.min_doc_tokens
    if stream.max_doc_tokens is not None:
        mask &= lengths <= stream.max_doc_tokens
    return mask


def separator_id(tokenizer: Any, spec: DataSpec) -> int:
    """The id of the spec's `separator` token; DataError unless it is exactly one token of the vocabulary."""
    token = spec.separator
    vocab = tokenizer.get_vocab()
    if token not in vocab:
        near = sorted(t for t in getattr(tokenizer, "all_special_tokens", []) if t in vocab)
        raise DataError(f"separator: {token!r} is not a token of {spec.tokenizer!r}; special tokens: "
                        f"{', '.join(near) or 'none'}")
    return int(vocab[token])


def _read_source(spec: DataSpec, index: int, source: SourceConfig, tokenizer: Any, eos_id: int | None,
                 progress: bool) -> tuple[TokenizedSource, SourceReader]:
    """Tokenize one source; stop early once every stream using it has its budget of usable documents."""
    reader = SourceReader(source, index, strict=spec.strict)
    users = [(name, s) for name, s in spec.streams.items() if source.name in s.sources]
    needs = []
    for name, stream in users:
        share = _shares(spec, stream, stream.max_tokens)[source.name]
        needs.append(None if share is None else share)
    # Minimum held-out sizes decide the held-out share only once every document is read.
    budgeted = all(n is not None for n in needs) and not spec.holdout.minimums
    have = [0.0] * len(users)
    fraction = spec.holdout.fraction

    def stop(lengths: np.ndarray, keys: np.ndarray) -> bool:
        if not budgeted:
            return False
        train = keys[:, 0] >= fraction
        for k, (_, stream) in enumerate(users):
            have[k] += float(lengths[train & _length_mask(lengths, stream)].sum())
        return all(h >= n for h, n in zip(have, needs))

    def on_empty(i: int) -> None:
        reader.skip("no_tokens", f"{reader.where}", "a document tokenizes to nothing")

    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(desc=f"tokenize {source.name}", unit="tok", unit_scale=True, dynamic_ncols=True,
                   leave=True,
                   disable=None)  # None: no bar when stderr is not a terminal (logs, CI)
    try:
        tokenized = tokenize_documents(reader, tokenizer, batch_size=spec.batch_size, eos_id=eos_id,
                                       on_empty=on_empty, stop=stop, progress=bar)
    finally:
        if bar is not None:
            bar.close()
    if len(tokenized.lengths) == 0:
        if reader.records == 0 and reader.filtered:
            raise DataError(f"{reader.where}: none of {reader.filtered} records matches {dict(source.match)}")
        if reader.records == 0:
            raise DataError(f"{reader.where}: empty source, no documents in "
                            f"{source.path or source.dataset!r}")
        examples = "; ".join(f"e.g. {v}" for v in list(reader.examples.values())[:2])
        raise DataError(f"{reader.where}: all {reader.records} records were skipped ({reader.summary()}); "
                        f"{examples}")
    return tokenized, reader


def _select(spec: DataSpec, stream_name: str, stream: DataStreamConfig, source_index: int,
            source: SourceConfig, data: TokenizedSource, held_out: bool, share: float | None,
            report: dict, fraction: float) -> np.ndarray:
    """Indices of the documents of one source that go into one split of a stream (repeats for upsampling);
    a document is held out when its hash key is below `fraction`."""
    lengths = data.lengths
    length_ok = _length_mask(lengths, stream)
    in_split = data.keys[:, 0] < fraction
    if not held_out:
        in_split = ~in_split
    candidates = np.flatnonzero(in_split & length_ok)
    skipped = report.setdefault("skipped", {})
    short = in_split & (lengths < stream.min_doc_tokens)
    if short.any():
        skipped["shorter_than_min_doc_tokens"] = int(short.sum())
    if stream.max_doc_tokens is not None:
        long_ = in_split & (lengths > stream.max_doc_tokens)
        if long_.any():
            skipped["longer_than_max_doc_tokens"] = int(long_.sum())
    rng = np.random.default_rng([spec.seed, _crc(stream_name), _crc(source.name), int(held_out)])
    order = candidates[rng.permutation(len(candidates))]
    up = source.upsample_long
    if up is not None and not held_out:
        budget = share if share is not None else float(lengths[order].sum())
        is_long = lengths[order] >= up.min_tokens
        whole, frac = divmod(up.factor, 1.0)
        copies = np.where(is_long, int(whole) + (data.keys[order, 1] < frac), 1)
        longs = np.repeat(order[is_long], copies[is_long])
        shorts = order[~is_long]
        # Long copies first (within the budget), then short documents until the budget is spent.
        order = np.concatenate((longs, shorts))
        report["upsampled_long_docs"] = int(is_long.sum())
        share = budget
    if share is not None and len(order):
        before = np.cumsum(lengths[order]) - lengths[order]
        take = before < share
        over = int((~take).sum())
        if over:
            skipped["over_max_tokens"] = over
        order = order[take]
    report["docs"] = len(order)
    report["tokens"] = int(lengths[order].sum())
    return order


def holdout_fraction(spec: DataSpec, data: dict[int, TokenizedSource]) -> float:
    """The hash threshold below which documents are held out: `holdout.fraction`, raised until each of
    `holdout.streams` has `min_documents` documents and `min_tokens` tokens that fit it (DataError when a
    stream has too few in all)."""
    fraction = spec.holdout.fraction
    if not spec.holdout.minimums:
        return fraction
    index_of = {s.name: i for i, s in enumerate(spec.sources)}

    def kept(source: TokenizedSource, stream: DataStreamConfig) -> np.ndarray:
        mask = _length_mask(source.lengths, stream)
        if stream.pack == "best_fit" and stream.long_docs == "drop":  # packing drops them
            mask &= source.lengths <= stream.seq_len
        return mask

    for name in spec.holdout.streams or list(spec.streams):
        stream = spec.streams[name]
        sources = [data[index_of[s]] for s in stream.sources]
        keys = np.concatenate([d.keys[:, 0][kept(d, stream)] for d in sources])
        lengths = np.concatenate([d.lengths[kept(d, stream)] for d in sources])
        order = np.argsort(keys, kind="stable")
        enough = ((np.arange(1, len(order) + 1) >= spec.holdout.min_documents)
                  & (np.cumsum(lengths[order]) >= spec.holdout.min_tokens))
        if not enough.any():
            raise DataError(f"holdout: stream {name} has {len(order)} documents and {int(lengths.sum())} "
                            f"tokens that fit it, fewer than min_documents {spec.holdout.min_documents} "
                            f"and min_tokens {spec.holdout.min_tokens}")
        k = int(np.argmax(enough))  # the first prefix of the key order that is enough
        fraction = max(fraction, float(np.nextafter(keys[order[k]], np.inf)))
    if fraction >= 1.0:
        raise DataError("holdout: the minimums hold out every document; lower min_documents / min_tokens")
    return fraction


def _assemble(parts: list[tuple[int, np.ndarray]], data: list[TokenizedSource], seed: int,
              stream_name: str, split: str) -> tuple[np.ndarray, np.ndarray]:
    """Interleave the selected documents of all sources in a seeded order: (flat tokens, lengths)."""
    src = (np.concatenate([np.full(len(idx), s, dtype=np.int64) for s, idx in parts]) if parts
           else np.zeros(0, np.int64))
    doc = np.concatenate([idx for _, idx in parts]) if parts else np.zeros(0, np.int64)
    rng = np.random.default_rng([seed, _crc(stream_name), _crc(split)])
    perm = rng.permutation(len(doc))
    src, doc = src[perm], doc[perm]
    lengths = np.zeros(len(doc), dtype=np.int64)
    for s, _ in parts:
        sel = src == s
        lengths[sel] = data[s].lengths[doc[sel]]
    dst = np.cumsum(lengths) - lengths
    tokens = np.empty(int(lengths.sum()), dtype=np.int32)
    for s, _ in parts:
        sel = src == s
        gather_pieces(data[s].tokens, data[s].starts[doc[sel]], dst[sel], lengths[sel], tokens)
    return tokens, lengths


def _write_stream(packed: Packed, path: str, info: dict) -> None:
    import datasets  # heavy (pyarrow, fsspec): only reading or building data
    import pyarrow as pa  # heavy: only reading or building data
    from datasets.table import InMemoryTable  # heavy (pyarrow, fsspec): only reading or building data

    seq_len = info["seq_len"]
    ids = pa.FixedSizeListArray.from_arrays(pa.array(packed.input_ids.reshape(-1), type=pa.int32()), seq_len)
    lengths = pa.ListArray.from_arrays(pa.array(packed.row_offsets.astype(np.int32), type=pa.int32()),
                                       pa.array(packed.lengths, type=pa.int32()))
    table = pa.table({"input_ids": ids, "lengths": lengths})
    features = datasets.Features({"input_ids": datasets.List(datasets.Value("int32"), length=seq_len),
                                  "lengths": datasets.List(datasets.Value("int32"))})
    fingerprint = hashlib.sha256(json.dumps(info, sort_keys=True).encode()).hexdigest()[:16]
    ds = datasets.Dataset(InMemoryTable(table), info=datasets.DatasetInfo(features=features),
                          fingerprint=fingerprint)
    ds.save_to_disk(path, max_shard_size="1GB")
    with open(os.path.join(path, STREAM_INFO), "w", encoding="utf-8") as f:
        json.dump(info, f, indent=2, sort_keys=False)
        f.write("\n")


def file_sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def _special_ids(spec: DataSpec, tokenizer) -> tuple[int | None, int]:
    """(the separator between documents, the padding id): the spec's separator or the tokenizer's EOS."""
    eos_id = separator_id(tokenizer, spec) if spec.separator is not None else tokenizer.eos_token_id
    if spec.eos and eos_id is None:
        raise DataError(f"tokenizer {spec.tokenizer!r} has no EOS token; name a separator token (separator: "
                        f"...) or set eos: false in the spec")
    pad_id = tokenizer.pad_token_id
    if pad_id is None:
        pad_id = eos_id if eos_id is not None else 0
    return eos_id, pad_id


def _read_sources(spec: DataSpec, tokenizer, eos_id, progress: bool) -> tuple[dict, dict]:
    """Every source a stream uses, read and tokenized: ({index: TokenizedSource}, the per-source report)."""
    used = [(i, s) for i, s in enumerate(spec.sources)
            if any(s.name in st.sources for st in spec.streams.values())]
    check_sources(used)  # every source's paths and datasets, before the first is streamed
    data: dict[int, TokenizedSource] = {}
    source_report: dict[str, dict] = {}
    for i, source in used:
        tokenized, reader = _read_source(spec, i, source, tokenizer, eos_id if spec.eos else None, progress)
        data[i] = tokenized
        source_report[source.name] = {
            "kind": source.kind, "files": len(reader.files), "records": reader.records,
            "filtered_out": reader.filtered,
            "documents": len(tokenized.lengths), "tokens": int(tokenized.lengths.sum()),
            "skipped": dict(sorted(reader.skipped.items())),
        }
        log.info("source %s: %d documents, %d tokens, skipped: %s", source.name, len(tokenized.lengths),
                 int(tokenized.lengths.sum()), reader.summary())
    return data, source_report


def _pack_split(spec: DataSpec, stream_name: str, stream, split: str, data: dict, fraction: float,
                pad_id: int):
    """One stream's rows for one split (train or holdout), shuffled and cut to its token budget:
    (packed rows, the per-source selection report)."""
    held_out = split == "holdout"
    index_of = {s.name: i for i, s in enumerate(spec.sources)}
    budget = spec.holdout.max_tokens if held_out else stream.max_tokens
    shares = _shares(spec, stream, budget)
    per_source: dict[str, dict] = {}
    parts = []
    for name in stream.sources:
        i = index_of[name]
        per_source[name] = {}
        idx = _select(spec, stream_name, stream, i, spec.sources[i], data[i], held_out, shares[name],
                      per_source[name], fraction)
        parts.append((i, idx))
    tokens, lengths = _assemble(parts, data, spec.seed, stream_name, split)
    packed = pack(stream.pack, tokens, lengths, stream.seq_len, pad_id,
                  long_docs=stream.long_docs, stride=stream.stride, last_row=stream.last_row)
    if packed.rows == 0 and not held_out:
        reasons = {k: v for r in per_source.values() for k, v in r.get("skipped", {}).items()}
        reasons.update(packed.skipped_docs)
        detail = ", ".join(f"{k}: {v}" for k, v in sorted(reasons.items())) or "no documents"
        raise DataError(f"streams.{stream_name}: no rows of seq_len {stream.seq_len} "
                        f"from sources {', '.join(stream.sources)} ({len(lengths)} documents, "
                        f"{int(lengths.sum())} tokens; skipped: {detail})")
    order = np.random.default_rng([spec.seed, _crc(stream_name), _crc(split), 1]).permutation(packed.rows)
    packed = packed.permute(order)
    if budget is not None and packed.real_tokens > budget:
        # Whole documents overshoot the budget by up to one document per source: keep rows up to it.
        per_row = np.add.reduceat(packed.lengths, packed.row_offsets[:-1]) if packed.rows else []
        keep = int(np.searchsorted(np.cumsum(per_row), budget, side="right"))
        dropped = packed.real_tokens
        packed = packed.permute(np.arange(keep))
        packed.skipped_tokens = {**packed.skipped_tokens, "over_max_tokens": dropped - packed.real_tokens}
    return packed, per_source


def _write_split(tmp: str, stream_name: str, stream, split: str, packed, per_source: dict,
                 stream_info: dict) -> dict:
    """Write one packed split under `tmp`; its report for the manifest."""
    info = {"stream": stream_name, "split": split, "seq_len": stream.seq_len, "pack": stream.pack,
            "rows": packed.rows, "real_tokens": packed.real_tokens, "padding_tokens": packed.padding_tokens,
            **stream_info}
    rel = stream_name if split == "train" else os.path.join("holdout", stream_name)
    _write_stream(packed, os.path.join(tmp, rel), info)
    fill = packed.real_tokens / max(1, packed.rows * stream.seq_len)
    log.info("stream %s/%s: %d rows × %d, %d real tokens, fill %.4f", stream_name, split,
             packed.rows, stream.seq_len, packed.real_tokens, fill)
    return {**{k: info[k] for k in ("seq_len", "pack", "rows", "real_tokens", "padding_tokens")},
            "fill": round(fill, 6), "path": rel, "sources": per_source,
            "pack_skipped_docs": packed.skipped_docs, "pack_skipped_tokens": packed.skipped_tokens}


def _arrow_files(tmp: str) -> tuple[dict, dict]:
    """({relative path: sha256}, {relative path: bytes}) of every Arrow file under `tmp`."""
    checksums, sizes = {}, {}
    for root, _, names in sorted(os.walk(tmp)):
        for name in sorted(names):
            if name.endswith(".arrow"):
                full = os.path.join(root, name)
                rel = os.path.relpath(full, tmp).replace(os.sep, "/")
                checksums[rel], sizes[rel] = file_sha256(full), os.path.getsize(full)
    return dict(sorted(checksums.items())), dict(sorted(sizes.items()))


def build(spec: DataSpec, overwrite: bool = False, progress: bool = True) -> dict:
    """Build every stream of `spec`; returns the manifest. DataError on bad input (nothing destroyed)."""
    import datasets  # heavy (pyarrow, fsspec): only a build needs it

    out = os.path.abspath(spec.output_dir)
    if os.path.exists(out) and not overwrite:
        raise DataError(f"{spec.output_dir}: output directory already exists; pass --overwrite to replace it")
    if os.path.exists(out) and not os.path.isfile(os.path.join(out, MANIFEST)) and os.listdir(out):
        raise DataError(f"{spec.output_dir}: exists and is not a built data directory (no {MANIFEST}); "
                        "refusing to replace it")
    start = time.perf_counter()
    tokenizer = load_tokenizer(spec.tokenizer)
    identity = tokenizer_identity(tokenizer)
    eos_id, pad_id = _special_ids(spec, tokenizer)
    data, source_report = _read_sources(spec, tokenizer, eos_id, progress)
    fraction = holdout_fraction(spec, data)
    if fraction != spec.holdout.fraction:
        log.info("holdout: %.4f of the documents held out to meet min_documents %d / min_tokens %d",
                 fraction, spec.holdout.min_documents, spec.holdout.min_tokens)
    stream_info = {"tokenizer_fingerprint": identity["sha256"], "eos_token_id": eos_id,
                   "pad_token_id": pad_id,
                   "separator": spec.separator if spec.separator is not None else tokenizer.eos_token}

    os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
    tmp = f"{out}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    progress_bars = datasets.utils.logging.is_progress_bar_enabled()
    datasets.utils.logging.disable_progress_bar()
    try:
        os.makedirs(tmp)
        stream_report: dict[str, dict] = {}
        for stream_name, stream in spec.streams.items():
            stream_report[stream_name] = {}
            for split in ["train"] + (["holdout"] if fraction > 0 else []):
                packed, per_source = _pack_split(spec, stream_name, stream, split, data, fraction, pad_id)
                stream_report[stream_name][split] = _write_split(tmp, stream_name, stream, split, packed,
                                                                 per_source, stream_info)
        checksums, sizes = _arrow_files(tmp)
        manifest = {"format": 1, "spec": to_dict(spec), "holdout_fraction": fraction,
                    "tokenizer": {"name": spec.tokenizer, **identity}, "streams": stream_report,
                    "sources": source_report, "checksums": checksums, "sizes": sizes}
        with open(os.path.join(tmp, MANIFEST), "w", encoding="utf-8") as f:
            json.dump(manifest, f, indent=2, ensure_ascii=False)
            f.write("\n")
        # Swap in only now: an interrupted build leaves a *.tmp-* dir, never a complete-looking output.
        replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        if progress_bars:
            datasets.utils.logging.enable_progress_bar()
    log.info("built %s in %.1f s", spec.output_dir, time.perf_counter() - start)
    return manifest


def verify(output_dir: str, progress: bool = True) -> tuple[int, list[str]]:
    """Check every file the manifest of a built directory lists against its sha256 (and size).

    Returns:
        (files checked, one line per bad file: missing, wrong size or wrong checksum).

    Raises:
        DataError: `output_dir` is not a built data directory (no readable manifest with checksums).
    """
    path = os.path.join(output_dir, MANIFEST)
    try:
        with open(path, encoding="utf-8") as f:
            manifest = json.load(f)
        checksums = dict(manifest["checksums"])
    except (OSError, ValueError, KeyError, TypeError):
        raise DataError(f"{output_dir}: not a built data directory (no readable {MANIFEST} with checksums); "
                        f"build it with scripts/prepare_data.py") from None
    sizes = manifest.get("sizes", {})
    problems = []
    total = sum(os.path.getsize(os.path.join(output_dir, rel)) for rel in checksums
                if os.path.isfile(os.path.join(output_dir, rel)))
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=total, unit="B", unit_scale=True, desc=f"verify {output_dir}")
    for rel, want in checksums.items():
        full = os.path.join(output_dir, rel)
        if not os.path.isfile(full):
            problems.append(f"{full}: missing (listed in {MANIFEST})")
            continue
        size = os.path.getsize(full)
        got = file_sha256(full)
        if bar is not None:
            bar.update(size)
        if rel in sizes and size != sizes[rel]:
            problems.append(f"{full}: {size} bytes, the manifest says {sizes[rel]}")
        elif got != want:
            problems.append(f"{full}: sha256 {got[:16]}… differs from the manifest's {want[:16]}… (damaged)")
    if bar is not None:
        bar.close()
    return len(checksums), problems


def build_from_yaml(path: str, overrides: list[str] | tuple[str, ...] = (), overwrite: bool = False,
                    progress: bool = True) -> dict:
    return build(load_spec(path, overrides), overwrite=overwrite, progress=progress)
