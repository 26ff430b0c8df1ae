"""Ring attention (distill.parallel.ring) on S CPU processes (gloo) against one process, for test_ring.py.

    torchrun --nproc_per_node S tests/integration/ring_worker.py OUT.json [MODEL_DIR]

1. The attention alone: one packed row whose documents cross shard and zigzag-chunk edges; every rank computes
   the exact one-process reference (dense SDPA with a causal, per-document mask over the whole row, key/value
   heads repeated for GQA) and its own zigzag slice with ring attention; outputs and the gradients of q, k and
   v (gathered back into row order) must equal the reference. Documents from the row's offsets, from the
   all-gathered positions alone, and in tiles of 3 query rows x 5 keys (cut across chunk and document edges).
   Cases: 4 query heads with 4, 2 and 1 key/value heads.
With 4 processes, the same checks again for Ulysses x ring (HybridParallel, 2 x 2).
2. With MODEL_DIR: a tiny Llama's hidden states, LM loss (targets shifted before slicing) and gradients with
   ring attention over the S ranks against one process, as sequence_worker.py checks Ulysses; a forward
   outside `SequenceParallel.on` (the teacher's, the short streams') must not enter the ring.
"""

from __future__ import annotations

import sys

import torch
import torch.distributed as dist
import torch.nn.functional as F


def reference(q, k, v, lengths):
    """Dense exact attention over the whole row: q (1, H, T, D), k/v (1, Hkv, T, D) → (1, T, H, D)."""
    doc = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))
    pos = torch.arange(q.shape[2])
    mask = (pos[None, :] <= pos[:, None]) & (doc[None, :] == doc[:, None])  # (T, T)
    groups = q.shape[1] // k.shape[1]
    k, v = (t.repeat_interleave(groups, dim=1) for t in (k, v))
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask).transpose(1, 2)


def attention_checks(ring, world) -> dict:
    import functools

    from distill.model.attention import document_offsets
    from distill.parallel import ring as ring_module
    from distill.parallel.ring import HybridParallel, ring_attention

    attend = ring.attention if isinstance(ring, HybridParallel) else functools.partial(ring_attention, ring)

    T = 16 * world  # 2S chunks of 8 tokens
    lengths = [5, 3 * world + 4, 16 * world - 3 * world - 9]  # the second crosses chunk and shard edges
    positions = torch.cat([torch.arange(n) for n in lengths])[None]  # (1, T)
    offsets = document_offsets(positions)["cu_seq_lens_q"]
    result = {}
    for kv_heads in (4, 2, 1):
        gen = torch.Generator().manual_seed(kv_heads)
        q = torch.randn(1, 4, T, 8, generator=gen, requires_grad=True)
        k = torch.randn(1, kv_heads, T, 8, generator=gen, requires_grad=True)
        v = torch.randn(1, kv_heads, T, 8, generator=gen, requires_grad=True)
        grad = torch.randn(1, T, 4, 8, generator=gen)
        ref = reference(q, k, v, lengths)
        ref_grads = torch.autograd.grad(ref, (q, k, v), grad)
        for source in ("offsets", "positions", "tiled"):
            # tiled: query tiles of 3 rows and key pieces of 5 columns, cut across chunk and document edges,
            # each tile meeting only the keys from its first query's document start on.
            ring_module.TILE_ROWS, ring_module.TILE_COLS = (3, 5) if source == "tiled" else (512, 4096)
            local = [ring.piece(t.detach(), dim=2).requires_grad_(True) for t in (q, k, v)]
            out = attend(*local, offsets=None if source == "positions" else offsets,
                         positions=ring.piece(positions))  # (1, n, H, D)
            out.backward(ring.piece(grad))
            diffs = [(out.detach() - ring.piece(ref.detach())).abs().max().item()]
            for t, r in zip(local, ref_grads):
                pieces = [torch.empty_like(t.grad) for _ in range(world)]
                dist.all_gather(pieces, t.grad, group=ring.group)
                diffs.append((ring.whole(pieces, dim=2) - r).abs().max().item())
            result[f"kv{kv_heads}_{source}"] = diffs  # [out, dq, dk, dv]
    return result


def model_checks(model_dir, ring, rank, world) -> dict:
    from transformers import AutoModelForCausalLM

    from distill.model import attention
    from distill.parallel import ring as ring_module
    from distill.testing import states_loss_grads

    attention.register()
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(model_dir, attn_implementation="sdpa_varlen",
                                                 dtype=torch.float32)
    lengths = [10, 30, 24]  # 64 tokens; 10..40 crosses the middle (and, with S = 4, three chunk edges)
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(3, model.config.vocab_size, (1, sum(lengths)), generator=gen)
    positions = torch.cat([torch.arange(n) for n in lengths])[None]  # (1, 64)
    labels = ids.clone()
    start = 0
    for n in lengths:
        labels[0, start] = -100
        start += n
    targets = torch.full_like(labels, -100)
    targets[:, :-1] = labels[:, 1:]  # shifted before slicing

    def run(inputs, tgt):
        return states_loss_grads(model, inputs, tgt)

    ref_states, ref_loss, ref_grads = run({"input_ids": ids, "position_ids": positions}, targets)
    model.set_attn_implementation(ring_module.register("sdpa_varlen"))
    piece = {k: ring.piece(v) for k, v in {"input_ids": ids, "position_ids": positions}.items()}
    with ring.on("long"):  # positions of the zigzag slice: RoPE sees each token's own position
        states, loss, grads = run(piece, ring.piece(targets))
    calls_in = ring.calls["long"]
    with torch.no_grad():  # as the teacher's forward and the short streams': outside `on`
        model(input_ids=ids, position_ids=positions, use_cache=False)
    total = loss.clone()
    dist.all_reduce(total, group=ring.group)
    for g in grads.values():
        dist.all_reduce(g, group=ring.group)
    return {
        "state_diff": max((s - ring.piece(r)).abs().max().item() for s, r in zip(states, ref_states)),
        "loss": [total.item(), ref_loss.item()],
        "grad_diff": max((grads[n] - ref_grads[n]).abs().max().item() for n in ref_grads),
        "grad_scale": max(g.abs().max().item() for g in ref_grads.values()),
        "calls": dict(ring.calls), "calls_inside": calls_in, "layers": model.config.num_hidden_layers,
        "heads": model.config.num_attention_heads,
    }


def main() -> None:
    from distill.parallel.ring import HybridParallel, RingParallel
    from distill.testing import finish_workers

    out = sys.argv[1]
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    ring = RingParallel(world, rank, world)
    result = {"world": world, "attention": attention_checks(ring, world)}
    if len(sys.argv) > 2:
        ring.calls.clear()
        result["model"] = model_checks(sys.argv[2], ring, rank, world)
    if world == 4:  # Ulysses x ring: 2 x 2
        hybrid = HybridParallel(world, rank, world, ring_degree=2)
        result["hybrid_attention"] = attention_checks(hybrid, world)
        if len(sys.argv) > 2:
            result["hybrid_model"] = model_checks(sys.argv[2], hybrid, rank, world)
    finish_workers(out, result)


if __name__ == "__main__":
    main()
