"""Ulysses attention (distill.parallel.ulysses) on 2 CPU processes (gloo) against one process, for
test_sequence.py.

    torchrun --nproc_per_node 2 tests/integration/sequence_worker.py MODEL_DIR OUT.json

One flattened packed row of 64 tokens whose second document crosses the shard edge (documents of 10, 30 and
24 tokens: 10..40 spans token 32): every rank computes the one-process reference (forward, LM loss on the
pre-shifted targets, backward), then its slice with sequence parallelism; the hidden states of its slice, the
loss summed over the ranks and the gradients summed over the ranks must equal the reference. A forward outside
`SequenceParallel.on` (as the teacher's and the short streams' are) must not enter the all-to-all.
"""

from __future__ import annotations

import sys

import torch
import torch.distributed as dist


def main() -> None:
    model_dir, out = sys.argv[1], sys.argv[2]
    from transformers import AutoModelForCausalLM

    from distill.model import attention
    from distill.parallel import ulysses as sequence
    from distill.testing import finish_workers, states_loss_grads

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    attention.register()
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(model_dir, attn_implementation="sdpa_varlen",
                                                 dtype=torch.float32)
    lengths = [10, 30, 24]
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(3, model.config.vocab_size, (1, sum(lengths)), generator=gen)
    positions = torch.cat([torch.arange(n) for n in lengths])[None]  # (1, 64)
    labels = ids.clone()
    start = 0
    for n in lengths:  # no target across a document boundary
        labels[0, start] = -100
        start += n
    targets = torch.full_like(labels, -100)
    targets[:, :-1] = labels[:, 1:]

    def run(inputs, tgt):
        return states_loss_grads(model, inputs, tgt)

    ref_states, ref_loss, ref_grads = run({"input_ids": ids, "position_ids": positions}, targets)
    sp = sequence.SequenceParallel(world, rank, world)
    model.set_attn_implementation(sequence.register("sdpa_varlen"))
    piece = {k: sp.piece(v) for k, v in {"input_ids": ids, "position_ids": positions}.items()}
    with sp.on("long"):
        states, loss, grads = run(piece, sp.piece(targets))
    calls_in = sp.calls["long"]
    with torch.no_grad():  # as the teacher's forward and the short streams': outside `on`
        model(input_ids=ids, position_ids=positions, use_cache=False)
    total = loss.clone()
    dist.all_reduce(total)
    for g in grads.values():
        dist.all_reduce(g)
    result = {
        "world": world,
        "state_diff": max((s - sp.piece(r)).abs().max().item() for s, r in zip(states, ref_states)),
        "loss": [total.item(), ref_loss.item()],
        "grad_diff": max((grads[n] - ref_grads[n]).abs().max().item() for n in ref_grads),
        "grad_scale": max(g.abs().max().item() for g in ref_grads.values()),
        "calls": dict(sp.calls), "calls_inside": calls_in, "layers": model.config.num_hidden_layers,
    }
    finish_workers(out, result)


if __name__ == "__main__":
    main()
