"""Ulysses sequence parallelism for the long stream: one long row split along the sequence over S ranks.

Each rank of a group of S holds T/S tokens of the (flattened) micro-batch; everything but attention is
token-local, so only attention communicates. Around the model's own attention kernel (sdpa_varlen or
flash-attn varlen), an all-to-all trades the sequence split for a head split: each rank then attends over the
WHOLE sequence with H/S of the heads, and a second all-to-all trades back (DeepSpeed-Ulysses, Jacobs et al.
2023; written here on torch.distributed's differentiable `all_to_all_single`, so FSDP2 plus sequence
parallelism needs no DeepSpeed).
- Positions are all-gathered, so the kernel finds every packed document, also those that cross a shard edge.
- Key/value heads are repeated when S exceeds their number (grouped-query attention with few KV heads).
- Labels are shifted before the row is sliced: the target of a slice's last token lives on the next rank.
- Only student forwards of the sequence-parallel stream enter the all-to-all (`SequenceParallel.on`):
  the teacher and the short streams run as they always do. `calls` counts entries per stream.
The loss rule is unchanged: each rank counts the loss-bearing tokens of its slice, so the global counts and
the summed gradients are exactly those of the unsplit row.
The other mode, ring attention over zigzag slices (`parallel.sequence_parallel_mode: ring`), is
distill.parallel.ring.
"""

from __future__ import annotations

import contextlib
from collections import Counter

import torch

from distill.config import ConfigError

PREFIX = "ulysses_"
_ACTIVE: SequenceParallel | None = None


class SequenceParallel:
    """The groups of S consecutive ranks and this rank's place in its group.

    Args:
        size: S; `world` must be a multiple of it.
        rank / world: this process and the number of processes.
    """

    def __init__(self, size: int, rank: int, world: int):
        import torch.distributed as dist

        if world % size:
            raise ValueError(f"parallel.sequence_parallel: {size} does not divide the {world} processes")
        self.size, self.index, self.group_index = size, rank % size, rank // size
        self.group = None
        for g in range(world // size):  # every rank creates every group, in the same order
            group = dist.new_group(list(range(g * size, (g + 1) * size)))
            if g == self.group_index:
                self.group = group
        self.tag: str | None = None
        self.calls: Counter = Counter()

    @contextlib.contextmanager
    def on(self, tag: str):
        """Student forwards of stream `tag` inside this block split attention over the group."""
        global _ACTIVE
        previous, self.tag = _ACTIVE, tag
        _ACTIVE = self
        try:
            yield self
        finally:
            _ACTIVE, self.tag = previous, None

    def piece(self, tensor: torch.Tensor, dim: int = 1) -> torch.Tensor:
        """This rank's contiguous 1/S of `tensor` along `dim`."""
        return tensor.chunk(self.size, dim=dim)[self.index]

    def whole(self, pieces: list[torch.Tensor], dim: int = 1) -> torch.Tensor:
        """The row from every rank's slice (the inverse of `piece`), ranks in group order."""
        return torch.cat(pieces, dim=dim)

    def gather_positions(self, positions: torch.Tensor) -> torch.Tensor:
        """(1, n) positions of this rank's slice → (1, S·n) of the whole row, in row order (no gradient)."""
        import torch.distributed as dist

        pieces = [torch.empty_like(positions) for _ in range(self.size)]
        dist.all_gather(pieces, positions.contiguous(), group=self.group)
        return self.whole(pieces)

    def _all_to_all(self, tensor: torch.Tensor) -> torch.Tensor:
        """Differentiable all-to-all over the group along dim 0 (one slice per rank)."""
        from torch.distributed.nn.functional import all_to_all_single

        tensor = tensor.contiguous()
        # Not empty_like: it keeps a non-contiguous input's strides, while the collective writes row-major.
        out = torch.empty(tensor.shape, dtype=tensor.dtype, device=tensor.device)
        return all_to_all_single(out, tensor, group=self.group)

    def heads_to_sequence(self, x: torch.Tensor) -> torch.Tensor:
        """(1, H, n, D) with this rank's n tokens → (1, H/S, S·n, D) with all tokens of this rank's heads."""
        _, h, n, d = x.shape
        s = self.size
        received = self._all_to_all(x.reshape(s, h // s, n, d))  # [j] = rank j's tokens of my heads
        return received.permute(1, 0, 2, 3).reshape(1, h // s, s * n, d)

    def sequence_to_heads(self, out: torch.Tensor) -> torch.Tensor:
        """(1, S·n, H/S, D) attention output of my heads → (1, n, H, D) for my tokens, all heads."""
        _, total, hs, d = out.shape
        s = self.size
        n = total // s
        received = self._all_to_all(out.reshape(s, n, hs, d))  # [j] = head group j for my tokens
        return received.permute(1, 0, 2, 3).reshape(1, n, s * hs, d)


def split_streams(cfg, seq_lens: dict[str, int]) -> dict[str, int]:
    """{stream: S} for the streams split along the sequence: with `parallel.sequence_parallel` S > 1, the
    native-position streams of the longest rows. Each must train on the LM loss only (the teacher never sees
    a slice) with micro-batches whose tokens divide by S.

    Raises:
        ConfigError: one line naming the stream and what does not fit.
    """
    size = cfg.parallel.sequence_parallel
    if size == 1:
        return {}
    native = {n: seq_lens[n] for n, s in cfg.streams.items() if s.positions == "native"}
    if not native:
        raise ConfigError("parallel.sequence_parallel: no stream with native positions to split")
    longest = max(native.values())
    split = {}
    for name in (n for n, t in native.items() if t == longest):
        stream = cfg.streams[name]
        if set(stream.objectives.active()) != {"lm"}:
            raise ConfigError(f"streams.{name}.objectives: a sequence-parallel stream trains on lm only (the "
                              f"teacher never sees a slice); got {', '.join(stream.objectives.active())}")
        tokens = stream.micro_batch * longest
        if tokens % size:
            raise ConfigError(f"streams.{name}: a micro-batch of {tokens} tokens does not split into "
                              f"parallel.sequence_parallel {size} equal slices")
        if cfg.parallel.sequence_parallel_mode != "ulysses" and tokens % (2 * size):
            raise ConfigError(f"streams.{name}: a micro-batch of {tokens} tokens does not cut into the "
                              f"2 x {size} equal chunks of ring's zigzag layout")
        split[name] = size
    return split


def heads_problem(heads: int, kv_heads: int, size: int, mode: str = "ulysses",
                  ring_degree: int = 1) -> str | None:
    """Why the attention heads do not suit sequence parallelism of degree `size`, or None (the one rule the
    trainer and the planner apply). Ulysses: S must divide the attention heads, and the key/value heads
    divide S or S them. Ring keeps every head on every rank: any S. Hybrid: the Ulysses degree is
    S / ring_degree."""
    if mode == "ring":
        return None
    if mode == "hybrid":
        size //= ring_degree
    kv_heads = kv_heads or heads
    if heads % size or (kv_heads % size and size % kv_heads):
        return (f"{size} must divide the {heads} attention heads and divide or be divided by the {kv_heads} "
                f"key/value heads (Ulysses; parallel.sequence_parallel_mode: ring takes any degree)")
    return None


def group_problem(world: int, size: int, replicate: int = 1) -> str | None:
    """Why sequence-parallel groups of `size` ranks do not tile the launch, or None (the trainer's and the
    planner's rule): S divides the processes and, under HSDP (`parallel.replicate` R), one shard group of
    world / R ranks, so that a row's ranks hold the same shards and stay inside one node."""
    if world % size:
        return f"{size} does not divide the {world} processes"
    if replicate > 1 and world % replicate == 0 and (world // replicate) % size:
        return (f"{size} does not divide the shard group of {world // replicate} ranks ({world} processes / "
                f"parallel.replicate {replicate}): sequence-parallel groups stay inside one")
    return None


def check_groups(world: int, size: int, replicate: int = 1) -> None:
    """`group_problem` as a one-line ConfigError naming the key."""
    problem = group_problem(world, size, replicate) if size > 1 else None
    if problem is not None:
        raise ConfigError(f"parallel.sequence_parallel: {problem}")


def check_heads(config, size: int, mode: str = "ulysses", ring_degree: int = 1) -> None:
    """`heads_problem` for a model config, as a one-line ConfigError naming the key."""
    heads = config.num_attention_heads
    problem = heads_problem(heads, getattr(config, "num_key_value_heads", None) or heads, size, mode,
                            ring_degree)
    if problem is not None:
        key = ("parallel.sequence_parallel / parallel.ring_degree" if mode == "hybrid"
               else "parallel.sequence_parallel")
        raise ConfigError(f"{key}: {problem}")


INNER = ("sdpa_varlen", "flash_attention_2")
"""The attention implementations Ulysses wraps: they take the whole row after the all-to-all and find its
documents from cu_seq_lens or the gathered positions. transformers' sdpa and eager build their mask from the
local slice's length, which disagrees with the whole row the kernel sees."""

ALIASES = {"sdpa_varlen": "sdpa_varlen", "flash_attention_2": "fa2"}
"""The names Ulysses registers are `ulysses_<alias>`: never containing "flash", which transformers would
route to its hub-kernel loader (it maps only the exact name flash_attention_2 to the flash-attn package)."""


def check_attention(implementation: str, size: int) -> None:
    """Ulysses wraps only `INNER` implementations: one line otherwise (before any model is loaded)."""
    if size > 1 and implementation not in INNER:
        raise ConfigError(f"parallel.sequence_parallel: {size} needs model.attention auto, sdpa_varlen or "
                          f"flash_attention_2 (the attention sees the whole row, while '{implementation}' "
                          f"builds its mask for this rank's slice)")


def flash_attention_2(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None,
                      sliding_window=None, softcap=None, is_causal=None, **kwargs):
    """transformers' flash-attn 2 path (`_flash_attention_forward`), named flash_attention_2 explicitly: its
    own `flash_attention_forward` passes the module config's implementation name on, which under Ulysses is
    ours. query (B, H, T, D) → ((B, T, H, D), None)."""
    from transformers.integrations.flash_attention import get_target_dtype
    from transformers.modeling_flash_attention_utils import _flash_attention_forward

    seq_len = query.shape[2]
    query, key, value = (t.transpose(1, 2) for t in (query, key, value))  # (B, T, H, D): flash-attn's layout
    out = _flash_attention_forward(
        query, key, value, attention_mask, query_length=seq_len,
        is_causal=module.is_causal if is_causal is None else is_causal, dropout=dropout,
        softmax_scale=scaling,
        sliding_window=sliding_window, softcap=softcap, target_dtype=get_target_dtype(query, module),
        attn_implementation="flash_attention_2", layer_idx=getattr(module, "layer_idx", None), **kwargs)
    return out, None


def repeat_kv(key: torch.Tensor, value: torch.Tensor, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(1, Hkv, n, D) keys and values with each head repeated when there are fewer than `size` of them, so
    that the all-to-all gives each rank's query heads their key/value head."""
    kv_heads = key.shape[1]
    if kv_heads % size == 0:
        return key, value
    return key.repeat_interleave(size // kv_heads, dim=1), value.repeat_interleave(size // kv_heads, dim=1)


def _forward(inner):
    def forward(module, query, key, value, attention_mask, **kwargs):
        sp = _ACTIVE
        if sp is None:
            return inner(module, query, key, value, attention_mask, **kwargs)
        sp.calls[sp.tag] += 1
        key, value = repeat_kv(key, value, sp.size)
        q, k, v = (sp.heads_to_sequence(t) for t in (query, key, value))  # (1, H/S, T, D)
        kwargs = dict(kwargs)
        # The step passes the whole row's document offsets (cu_seq_lens_q/k, computed once per micro-batch):
        # then no layer gathers positions; without them the kernel finds the documents in gathered positions.
        if kwargs.get("cu_seq_lens_q") is None and kwargs.get("position_ids") is not None:
            kwargs["position_ids"] = sp.gather_positions(kwargs["position_ids"])
        out, _ = inner(module, q, k, v, attention_mask, **kwargs)  # (1, T, H/S, D)
        return sp.sequence_to_heads(out), None

    return forward


def register(inner_name: str, prefix: str = PREFIX, wrap=None) -> str:
    """Register "<prefix><alias of inner>" with transformers (attention and mask functions): `wrap(inner)`
    (default: the inner implementation with the all-to-all around it inside `SequenceParallel.on` blocks,
    the inner one alone elsewhere), and the inner implementation's mask function; returns the name (never
    containing "flash", see `ALIASES`)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    check_attention(inner_name, 2)
    name = prefix + ALIASES[inner_name]
    inner = flash_attention_2 if inner_name == "flash_attention_2" else AttentionInterface()[inner_name]
    AttentionInterface.register(name, (wrap or _forward)(inner))
    AttentionMaskInterface.register(name, AttentionMaskInterface()[inner_name])
    return name