"""Ring attention: the second sequence-parallel mode for the long stream (`sequence_parallel_mode: ring`).

Each rank of a group of S (the groups of distill.parallel.ulysses.SequenceParallel) holds a zigzag slice of
the
flattened packed row: the row is cut into 2S equal chunks and rank i holds chunks i and 2S-1-i, so that under
the causal mask every rank has the same work (an early chunk attends to little, its late partner to much).
Queries stay where they are; key/value blocks travel round the ring (rank i sends to i+1 and receives from
i-1, S-1 hops), and each rank accumulates attention block by block with an online softmax: the output and the
log-sum-exp of the scores are kept in fp32 and merged per block (Liu et al. 2023, "Ring Attention with
Blockwise Transformers"; the zigzag layout as in zhuzilin/ring-flash-attention).

Masks: causal by global token index AND within one packed document. Documents come from the WHOLE row's
offsets (`cu_seq_lens_q`, which the step computes once per micro-batch, or the positions all-gathered and read
as distill.model.attention reads them: a document starts where a position does not increase), so a document
that
crosses a shard edge (or a zigzag chunk edge) stays whole. In the zigzag layout a block from a lower rank is
seen only through its early chunk (by all of this rank's queries), a block from a higher rank only by this
rank's late chunk: each foreign step computes half a block, every rank the same amount (the balance).

Backward: a custom `torch.autograd.Function` with its own ring backward. It recomputes each block's
probabilities from the saved log-sum-exp (as flash attention does), sends the key/value blocks round the ring
again, and passes each block's dK/dV accumulator along with it (S hops, the last one bringing every
accumulator home). Communication is torch.distributed point-to-point (`batch_isend_irecv`), which gloo runs
on the CPU; the next block's transfer overlaps the current block's compute.

Ring has no head-divisibility limit (every rank keeps all heads): it reaches degrees Ulysses cannot (more
ranks than key/value or query heads, groups spanning nodes), at the price of S-1 key/value transfers per
layer instead of Ulysses' four all-to-alls of 1/S. Grouped-query attention is computed in groups (query heads
of one key/value head share it): key/value travel unrepeated.

The blocks are computed with plain fp32 matmuls, tiled over query rows (`TILE_ROWS`) and keys (`TILE_COLS`),
each tile only against the keys its documents can reach (packed rows: work near Σ document² rather than
T²): exact and device-independent, not a fused kernel.

`HybridParallel` (`sequence_parallel_mode: hybrid`) runs Ulysses inside subgroups of S / ring_degree
consecutive ranks and this ring across them.
"""

from __future__ import annotations

import bisect
import contextlib
import functools
import math
from collections import Counter

import torch

from distill.model.attention import document_offsets
from distill.parallel import ulysses

PREFIX = "ring_"

TILE_ROWS = 512
"""Query rows per sub-block: each tile meets only the keys from its first query's document start to its last
query, so smaller tiles skip more masked work (packed rows) at more, smaller matmuls."""

TILE_COLS = 4096
"""Key columns per sub-block: the transient fp32 scores of one sub-block are at most query heads x TILE_ROWS x
TILE_COLS (32 heads: 256 MiB), whatever the slice or document length."""


class RingParallel(ulysses.SequenceParallel):
    """SequenceParallel with the zigzag layout and a key/value ring instead of Ulysses' all-to-all."""

    mode = "ring"

    def chunks(self) -> tuple[int, int]:
        """The two of the row's 2S chunks this rank holds, in order."""
        return self.index, 2 * self.size - 1 - self.index

    def piece(self, tensor: torch.Tensor, dim: int = 1) -> torch.Tensor:
        """This rank's zigzag slice of `tensor` along `dim`: chunks i and 2S-1-i of 2S equal chunks."""
        if tensor.shape[dim] % (2 * self.size):
            raise ValueError(f"ring attention: {tensor.shape[dim]} tokens do not cut into 2 x "
                             f"{self.size} equal chunks")
        parts = tensor.chunk(2 * self.size, dim=dim)
        first, second = self.chunks()
        return torch.cat([parts[first], parts[second]], dim=dim)

    def token_index(self, rank: int, n: int, device) -> torch.Tensor:
        """(n,) global positions in the row of the n tokens rank `rank` of the group holds."""
        c = n // 2
        early = torch.arange(rank * c, (rank + 1) * c, device=device)
        late_start = (2 * self.size - 1 - rank) * c
        return torch.cat([early, torch.arange(late_start, late_start + c, device=device)])

    def whole(self, pieces: list[torch.Tensor], dim: int = 1) -> torch.Tensor:
        """The row from every rank's zigzag slice (the inverse of `piece`), ranks in group order."""
        halves = [p.chunk(2, dim=dim) for p in pieces]
        ordered = [h[0] for h in halves] + [h[1] for h in reversed(halves)]
        return torch.cat(ordered, dim=dim)

    def shift(self, tensor: torch.Tensor):
        """Start sending `tensor` to the next rank of the ring and receiving the previous rank's.

        Returns:
            (the tensor being received, the pending works: wait on each before reading it).
        """
        import torch.distributed as dist

        received = torch.empty(tensor.shape, dtype=tensor.dtype, device=tensor.device)
        ops = [dist.P2POp(dist.isend, tensor, group=self.group, group_peer=(self.index + 1) % self.size),
               dist.P2POp(dist.irecv, received, group=self.group, group_peer=(self.index - 1) % self.size)]
        return received, dist.batch_isend_irecv(ops)


def _wait(works: list) -> None:
    """Wait on each pending transfer, then drop it: a finished send's work still holds the tensor it sent,
    which would keep the sent block alive until the list is rebound (three blocks in flight, not two)."""
    for work in works:
        work.wait()
    works.clear()


def _pairs(ring: RingParallel, rank: int, source: int, n: int, cuts: list[int]) -> list[tuple[slice, slice]]:
    """The (query rows, key columns) sub-blocks of this rank's slice against the block `source` holds that
    can hold a visible pair, in local indices: query tiles of at most `TILE_ROWS` rows, each against the key
    columns from the start of its first query's document to its last query (causal and per document; the
    mask inside is exact), cut into pieces of at most `TILE_COLS`. In the zigzag layout this also skips a
    lower rank's late chunk and, from a higher rank, everything but this rank's late chunk."""
    c = n // 2
    size = ring.size
    q_chunks = ((0, rank * c), (c, (2 * size - 1 - rank) * c))  # (local start, global start) of each chunk
    k_chunks = ((0, source * c), (c, (2 * size - 1 - source) * c))
    rows = max(1, min(TILE_ROWS, c))
    pairs = []
    for q_local, q_global in q_chunks:
        for a in range(0, c, rows):
            b = min(c, a + rows)
            first, last = q_global + a, q_global + b - 1
            doc_start = cuts[bisect.bisect_right(cuts, first) - 1]
            for k_local, k_global in k_chunks:
                lo, hi = max(doc_start, k_global), min(last, k_global + c - 1)
                for col in range(lo, hi + 1, TILE_COLS):  # nothing when the range is empty
                    end = min(hi + 1, col + TILE_COLS)
                    pairs.append((slice(q_local + a, q_local + b),
                                  slice(k_local + col - k_global, k_local + end - k_global)))
    return pairs


def _allowed(q_index, k_index, q_doc, k_doc) -> torch.Tensor:
    """(m, c) which key each query may see: causal by row position, and within its own document."""
    return (k_index[None, :] <= q_index[:, None]) & (k_doc[None, :] == q_doc[:, None])


def _block_forward(q, k, v, allowed, scale):
    """One block's attention. q (h, g, m, D), k/v (h, c, D), allowed (m, c) → out (h, g, m, D) and
    lse (h, g, m), fp32; a row seeing no key has out 0 and lse -inf."""
    scores = torch.einsum("hgmd,hcd->hgmc", q, k) * scale
    scores = scores.masked_fill(~allowed, float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)  # (h, g, m)
    probs = torch.exp(scores - torch.where(torch.isfinite(lse), lse, 0.0)[..., None])  # masked: exp(-inf) = 0
    return torch.einsum("hgmc,hcd->hgmd", probs, v), lse


def _merge(out, lse, block_out, block_lse):
    """Online softmax: two partial attentions (out, lse) over disjoint key sets → one over their union."""
    merged = torch.logaddexp(lse, block_lse)
    merged_safe = torch.where(torch.isfinite(merged), merged, 0.0)
    out = (out * torch.exp(lse - merged_safe)[..., None]
           + block_out * torch.exp(block_lse - merged_safe)[..., None])
    return out, merged


def _block_backward(q, k, v, grad_out, lse, delta, allowed, scale):
    """Gradients of one block given the rows' final lse and delta = rowsum(dO · O) (flash attention's
    recomputation). q/grad_out (h, g, m, D), k/v (h, c, D), lse/delta (h, g, m) → dq (h, g, m, D),
    dk, dv (h, c, D)."""
    scores = torch.einsum("hgmd,hcd->hgmc", q, k) * scale
    probs = torch.exp(scores.masked_fill(~allowed, float("-inf")) - lse[..., None])  # (h, g, m, c)
    dv = torch.einsum("hgmc,hgmd->hcd", probs, grad_out)
    dprobs = torch.einsum("hgmd,hcd->hgmc", grad_out, v)
    dscores = probs * (dprobs - delta[..., None])
    dq = torch.einsum("hgmc,hcd->hgmd", dscores, k) * scale
    dk = torch.einsum("hgmc,hgmd->hcd", dscores, q) * scale
    return dq, dk, dv


def _no_autocast(device: torch.device):
    return torch.autocast(device.type, enabled=False) if device.type in ("cpu", "cuda") else \
        contextlib.nullcontext()


class RingAttention(torch.autograd.Function):
    """Ring attention over a RingParallel group, with its own ring backward.

    forward(q (h, g, n, D), k (h, n, D), v (h, n, D), docs (T,) document id of every token of the row,
    cuts (the row's document offsets as a list), scale, ring) → out (h, g, n, D) in q's dtype; h key/value
    heads, g query heads per key/value head, n this rank's tokens (T = S·n).
    """

    @staticmethod
    def forward(ctx, q, k, v, docs, cuts, scale, ring):
        rank, size, n = ring.index, ring.size, q.shape[2]
        q_index = ring.token_index(rank, n, q.device)
        q_doc = docs[q_index]
        with _no_autocast(q.device):
            # fp32 per sub-block (no whole fp32 copy of q); the running output and lse are fp32 throughout.
            out = torch.zeros(q.shape, dtype=torch.float32, device=q.device)  # (h, g, n, D)
            lse = torch.full(q.shape[:3], float("-inf"), dtype=torch.float32, device=q.device)  # (h, g, n)
            kv = torch.stack([k, v]).contiguous()  # (2, h, n, D): one message per hop, in the input dtype
            for step in range(size):
                source = (rank - step) % size
                if step < size - 1:  # the next block's transfer overlaps this block's compute
                    incoming, works = ring.shift(kv)
                k_index = ring.token_index(source, n, q.device)
                k_doc = docs[k_index]
                for rows, cols in _pairs(ring, rank, source, n, cuts):
                    allowed = _allowed(q_index[rows], k_index[cols], q_doc[rows], k_doc[cols])  # (m, c')
                    block_out, block_lse = _block_forward(q[:, :, rows].float(), kv[0, :, cols].float(),
                                                          kv[1, :, cols].float(), allowed, scale)
                    out[:, :, rows], lse[:, :, rows] = _merge(out[:, :, rows], lse[:, :, rows], block_out,
                                                              block_lse)
                if step < size - 1:
                    _wait(works)
                    kv = incoming
        result = out.to(q.dtype)
        ctx.save_for_backward(q, k, v, result, lse)  # docs come back from cuts: no (T,) tensor per layer
        ctx.cuts, ctx.scale, ctx.ring = cuts, scale, ring
        return result

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, out, lse = ctx.saved_tensors
        ring, scale, cuts = ctx.ring, ctx.scale, ctx.cuts
        rank, size, n = ring.index, ring.size, q.shape[2]
        docs = document_ids(torch.tensor(cuts), n * size, q.device)
        q_index = ring.token_index(rank, n, q.device)
        q_doc = docs[q_index]
        with _no_autocast(q.device):
            delta = (grad_out.float() * out.float()).sum(-1)  # (h, g, n)
            dq = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
            kv = torch.stack([k, v]).contiguous()
            # The accumulator of the block this rank holds travels with it: after S hops it is back home.
            dkv = torch.zeros(kv.shape, dtype=torch.float32, device=q.device)  # (2, h, n, D)
            for step in range(size):
                source = (rank - step) % size
                if step < size - 1:
                    incoming, works = ring.shift(kv)
                k_index = ring.token_index(source, n, q.device)
                k_doc = docs[k_index]
                for rows, cols in _pairs(ring, rank, source, n, cuts):
                    allowed = _allowed(q_index[rows], k_index[cols], q_doc[rows], k_doc[cols])
                    dq_t, dk_t, dv_t = _block_backward(q[:, :, rows].float(), kv[0, :, cols].float(),
                                                       kv[1, :, cols].float(), grad_out[:, :, rows].float(),
                                                       lse[:, :, rows], delta[:, :, rows], allowed, scale)
                    dq[:, :, rows] += dq_t
                    dkv[0, :, cols] += dk_t
                    dkv[1, :, cols] += dv_t
                dkv, dkv_works = ring.shift(dkv)  # to the rank that sees this block next (or its owner)
                _wait(dkv_works)
                if step < size - 1:
                    _wait(works)
                    kv = incoming
        return dq.to(q.dtype), dkv[0].to(k.dtype), dkv[1].to(v.dtype), None, None, None, None


def document_ids(offsets: torch.Tensor | None, total: int, device) -> torch.Tensor:
    """(total,) the document each token of the row belongs to, from the row's offsets (D + 1,) (None: one
    document)."""
    if offsets is None:
        return torch.zeros(total, dtype=torch.long, device=device)
    cuts = offsets.to(device=device, dtype=torch.long)
    return torch.searchsorted(cuts, torch.arange(total, device=device), right=True) - 1


def _documents(ring: RingParallel, offsets: torch.Tensor | None, total: int, device):
    """(docs (total,), cuts: the offsets as ints) of a micro-batch's offsets. Every layer, and every
    recompute, of a micro-batch gets the same offsets tensor: computed for the first and kept on `ring` for
    the others, so the host read of the offsets (a device sync on a GPU) happens once per micro-batch."""
    cached = getattr(ring, "_documents", None)
    if cached is not None and cached[0] is offsets and cached[1] == total and cached[2].device == device:
        return cached[2], cached[3]
    docs = document_ids(offsets, total, device)
    cuts = [int(x) for x in offsets.tolist()] if offsets is not None else [0, total]
    ring._documents = (offsets, total, docs, cuts)
    return docs, cuts


def ring_attention(ring: RingParallel, query, key, value, offsets=None, positions=None, scaling=None):
    """Exact causal, per-document attention of this rank's zigzag slice against the whole row.

    Args:
        query: (1, Hq, n, D) this rank's queries; key/value: (1, Hkv, n, D), Hkv dividing Hq.
        offsets: the whole row's document offsets (D + 1,) (`cu_seq_lens_q`), or None to read documents
            from `positions` (1, n) of this slice, all-gathered; neither: one causal document.
        scaling: the softmax scale (default D^-0.5).

    Returns:
        (1, n, Hq, D), transformers' attention layout.
    """
    _, heads, n, d = query.shape
    kv_heads = key.shape[1]
    total = n * ring.size
    if offsets is None and positions is not None:
        offsets = document_offsets(ring.gather_positions(positions))["cu_seq_lens_q"]
    docs, cuts = _documents(ring, offsets, total, query.device)
    scale = scaling if scaling is not None else 1.0 / math.sqrt(d)
    q = query[0].reshape(kv_heads, heads // kv_heads, n, d)  # query heads grouped by their key/value head
    out = RingAttention.apply(q, key[0], value[0], docs, cuts, scale, ring)  # (Hkv, g, n, D)
    return out.reshape(heads, n, d).transpose(0, 1)[None]


def _member(cls, size: int, index: int, group):
    """A SequenceParallel-like view of an existing group (no process group is created)."""
    part = cls.__new__(cls)
    part.size, part.index, part.group, part.group_index = size, index, group, 0
    part.tag, part.calls = None, Counter()
    return part


class HybridParallel(ulysses.SequenceParallel):
    """Ulysses x ring (`sequence_parallel_mode: hybrid`): a group of S = U·R ranks, R = parallel.ring_degree.

    The row is cut into R zigzag ring pieces (2R chunks, ring rank r holding chunks r and 2R-1-r), and each
    ring piece into U contiguous slices, one per rank of a Ulysses subgroup (U consecutive ranks).
    Attention: an all-to-all inside the Ulysses subgroup gives each rank its ring piece whole for H/U of the
    heads, ring attention runs over the R ranks holding the same heads (same Ulysses index, one per
    subgroup), and a second all-to-all brings the output back. U must divide the heads (as for Ulysses); R
    has no such limit: the all-to-all stays inside U consecutive ranks (a node), the ring crosses subgroups.
    """

    mode = "hybrid"

    def __init__(self, size: int, rank: int, world: int, ring_degree: int):
        import torch.distributed as dist

        super().__init__(size, rank, world)
        if ring_degree < 1 or size % ring_degree:
            raise ValueError(f"parallel.ring_degree: {ring_degree} does not divide "
                             f"parallel.sequence_parallel {size}")
        u_size = size // ring_degree
        u_index, r_index = self.index % u_size, self.index // u_size
        u_group = r_group = None
        for g in range(world // size):  # every rank creates every group, in the same order
            base = g * size
            for r in range(ring_degree):
                group = dist.new_group([base + r * u_size + u for u in range(u_size)])
                if g == self.group_index and r == r_index:
                    u_group = group
            for u in range(u_size):
                group = dist.new_group([base + r * u_size + u for r in range(ring_degree)])
                if g == self.group_index and u == u_index:
                    r_group = group
        self.ulysses = _member(ulysses.SequenceParallel, u_size, u_index, u_group)
        self.ring = _member(RingParallel, ring_degree, r_index, r_group)

    def piece(self, tensor: torch.Tensor, dim: int = 1) -> torch.Tensor:
        """This rank's slice: its ring piece (zigzag over R), then its contiguous 1/U of that."""
        return self.ring.piece(tensor, dim).chunk(self.ulysses.size, dim=dim)[self.ulysses.index]

    def whole(self, pieces: list[torch.Tensor], dim: int = 1) -> torch.Tensor:
        """The row from every rank's slice (the inverse of `piece`), ranks in group order."""
        u = self.ulysses.size
        return self.ring.whole([torch.cat(pieces[r * u:(r + 1) * u], dim=dim) for r in range(self.ring.size)],
                               dim=dim)

    def gather_positions(self, positions: torch.Tensor) -> torch.Tensor:
        """(1, n) positions of this rank's slice → (1, S·n) of the whole row, in row order."""
        return self.ring.gather_positions(self.ulysses.gather_positions(positions))

    def attention(self, query, key, value, offsets=None, positions=None, scaling=None):
        """query (1, H, n, D), key/value (1, Hkv, n, D) of this rank's slice → (1, n, H, D)."""
        u = self.ulysses
        key, value = ulysses.repeat_kv(key, value, u.size)
        q, k, v = (u.heads_to_sequence(t) for t in (query, key, value))  # (1, H/U, U·n, D): the ring piece
        if offsets is None and positions is not None:  # the whole row's documents, once, from every slice

            offsets = document_offsets(self.gather_positions(positions))["cu_seq_lens_q"]
        out = ring_attention(self.ring, q, k, v, offsets=offsets, scaling=scaling)  # (1, U·n, H/U, D)
        return u.sequence_to_heads(out)


def _forward(inner):
    def forward(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None, **kwargs):
        ring = ulysses._ACTIVE
        if ring is None:  # the teacher, the short streams, any forward outside `SequenceParallel.on`
            return inner(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                         **kwargs)
        if attention_mask is not None or dropout or kwargs.get("sliding_window") is not None \
                or getattr(module, "sliding_window", None) is not None:
            raise RuntimeError("ring attention takes packed rows only: no attention mask, dropout or "
                               "sliding window")
        ring.calls[ring.tag] += 1
        split = ring.attention if isinstance(ring, HybridParallel) else \
            functools.partial(ring_attention, ring)
        out = split(query, key, value, offsets=kwargs.get("cu_seq_lens_q"),
                    positions=kwargs.get("position_ids"), scaling=scaling)
        return out.to(query.dtype), None

    return forward


def register(inner_name: str) -> str:
    """Register "ring_<alias of inner>" with transformers: ring attention inside `SequenceParallel.on`
    blocks, the inner implementation elsewhere (`distill.parallel.ulysses.register`); returns the name."""
    return ulysses.register(inner_name, PREFIX, _forward)
