"""Export: a trained model written as a Hugging Face directory (safetensors in the chosen dtype, config.json
with the extended RoPE in both the transformers 5 and 4.x spellings, the tokenizer)."""

from __future__ import annotations

import json
import math
import os

import torch

from distill.model.zero_checkpoint import is_zero_checkpoint, zero_weights


def legacy_rope_fields(rope_parameters: dict) -> dict:
    """The pre-5.0 spelling of a `rope_parameters` dict: {"rope_theta", "rope_scaling"}.

    transformers 4.x (and the serving and conversion tools pinned to it) read only `rope_theta` and
    `rope_scaling`; without them an exported model loads SILENTLY with the architecture's default θ and no
    scaling. `rope_scaling` is None for a plain (ABF) RoPE, else every key but rope_theta ("rope_type"
    included, which 4.x reads before its older name "type"; transformers 5 merges rope_scaling into
    rope_parameters on load, so an extra "type" key would change the reloaded dict)."""
    params = dict(rope_parameters)
    theta = params.pop("rope_theta")
    kind = params.get("rope_type", "default")
    scaling = None if kind == "default" and len(params) <= 1 else params
    return {"rope_theta": theta, "rope_scaling": scaling}


def _cast_state(model, state: dict, dtype: torch.dtype) -> dict:
    """`state` in `dtype`, tensors that shared storage still shared (a tied lm_head stays the embedding's
    tensor, so save_pretrained writes it once), and a tied model's head tied even when a gathered (sharded)
    state dict holds two copies."""
    out, cast = {}, {}
    for key, value in state.items():
        if not value.is_floating_point():
            out[key] = value
            continue
        ident = (value.data_ptr(), value.storage_offset(), tuple(value.shape), value.device)
        if ident not in cast:
            cast[ident] = value.detach().to(dtype)
        out[key] = cast[ident]
    if getattr(model.config, "tie_word_embeddings", False):
        names = {id(m): n for n, m in model.named_modules()}
        embed = names.get(id(model.get_input_embeddings()))
        head = names.get(id(model.get_output_embeddings()))
        if embed is not None and head is not None and f"{embed}.weight" in out and f"{head}.weight" in out:
            out[f"{head}.weight"] = out[f"{embed}.weight"]
    return out


def export(model, tokenizer, out_dir: str, state_dict: dict | None = None,
           dtype: torch.dtype | None = None, original_length: int | None = None) -> str:
    """Save a Hugging Face model directory (safetensors, config with the extended RoPE, tokenizer).

    The exported config has use_cache True (for generation); training code loads it with use_cache False.
    It records the weights' dtype (a bf16 export loads as bf16 by default, not as fp32 at twice the memory)
    and carries the legacy `rope_theta` / `rope_scaling` fields beside `rope_parameters`
    (`legacy_rope_fields`), so readers that predate `rope_parameters` get the extended RoPE too.

    Args:
        state_dict: a full state dict gathered from a sharded model (FSDP2/ZeRO-3); None uses `model`'s own.
        dtype: the dtype the weights are written in (cast here, tied weights kept one tensor); None keeps the
            tensors' own.
        original_length: the window the model was extended from, written as the config's top-level
            `original_max_position_embeddings` (an abf extension's `rope_parameters` cannot say it), read by
            scripts/evaluate.py.
    """
    os.makedirs(out_dir, exist_ok=True)
    source = state_dict if state_dict is not None else model.state_dict()
    if dtype is not None:
        source = _cast_state(model, source, dtype)
    floating = [v.dtype for v in source.values() if v.is_floating_point()]
    saved_dtype = floating[0] if floating else torch.float32
    _write(model, tokenizer, out_dir, saved_dtype, original_length,
           lambda: model.save_pretrained(out_dir, state_dict=source))
    return out_dir


def _write(model, tokenizer, out_dir: str, dtype: torch.dtype, original_length: int | None, save) -> None:
    """`save()` with the config as an export records it (use_cache on, the weights' dtype; restored after),
    then the completed config.json and the tokenizer files."""
    previous = model.config.use_cache, model.config.dtype
    model.config.use_cache, model.config.dtype = True, dtype
    try:
        save()
    finally:
        model.config.use_cache, model.config.dtype = previous
    _complete_config(os.path.join(out_dir, "config.json"), dtype, original_length)
    if tokenizer is not None:
        tokenizer.save_pretrained(out_dir)


def _complete_config(config_path: str, dtype: torch.dtype, original_length: int | None) -> None:
    """Add to a saved config.json what `export` promises: legacy RoPE fields, the weights' dtype (under both
    names), the original length."""
    with open(config_path, encoding="utf-8") as f:
        config = json.load(f)
    if config.get("rope_parameters"):
        config.update(legacy_rope_fields(config["rope_parameters"]))
    config["torch_dtype"] = config["dtype"] = str(dtype).removeprefix("torch.")  # 4.x read torch_dtype
    if original_length is not None:
        config["original_max_position_embeddings"] = int(original_length)
    with open(config_path, "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2, sort_keys=True)
        f.write("\n")


def write_model_files(model, tokenizer, out_dir: str, dtype: torch.dtype = torch.float32,
                      original_length: int | None = None) -> None:
    """The config.json (as `export` writes it) and the tokenizer files beside weights saved elsewhere (a
    training checkpoint's model.safetensors), so the directory loads with `from_pretrained` and
    scripts/evaluate.py like an export."""
    _write(model, tokenizer, out_dir, dtype, original_length, lambda: model.config.save_pretrained(out_dir))


# ----------------------------------------------------------------------------------------------------------
# Writing safetensors shard by shard
# ----------------------------------------------------------------------------------------------------------
SHARD_BYTES = 5 * 2**30
"""The largest safetensors file an export or a consolidation writes (Hugging Face's own default size)."""
INDEX = "model.safetensors.index.json"


def shard_groups(sizes: dict[str, int], shard_bytes: int = SHARD_BYTES) -> list[list[str]]:
    """Tensor names in order, cut into consecutive groups of at most `shard_bytes` (a larger tensor alone)."""
    groups: list[list[str]] = [[]]
    total = 0
    for name, size in sizes.items():
        if groups[-1] and total + size > shard_bytes:
            groups.append([])
            total = 0
        groups[-1].append(name)
        total += size
    return [g for g in groups if g]


def shard_name(index: int, count: int) -> str:
    return "model.safetensors" if count == 1 else f"model-{index + 1:05d}-of-{count:05d}.safetensors"


def write_index(out_dir: str, weight_map: dict[str, str], total_bytes: int) -> None:
    """The index of a sharded safetensors directory (written last: a directory with it is complete)."""
    tmp = os.path.join(out_dir, INDEX + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump({"metadata": {"total_size": total_bytes}, "weight_map": weight_map}, f, indent=2)
    os.replace(tmp, os.path.join(out_dir, INDEX))


def consolidate(path: str, shard_bytes: int = SHARD_BYTES) -> str:
    """A sharded training checkpoint (DCP `model/`, `distill.parallel.state`, or ZeRO-3's `zero/`) made a
    Hugging Face model directory: its weights written once, as they were trained (fp32), into safetensors
    shards beside it, one shard in memory at a time; its config.json and tokenizer are already there.
    Returns `path`; a directory that already has safetensors weights (a full checkpoint, an export, a
    consolidated one) is left as it is. One process, no process group needed (scripts/evaluate.py,
    scripts/merge.py)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    model_dir = os.path.join(path, "model")
    has_weights = any(os.path.isfile(os.path.join(path, n)) for n in ("model.safetensors", INDEX))
    if not has_weights and is_zero_checkpoint(path):
        return _consolidate_zero(path, shard_bytes)
    if has_weights or not os.path.isfile(os.path.join(model_dir, ".metadata")):
        return path
    metadata = FileSystemReader(model_dir).read_metadata().state_dict_metadata
    tensors = {k: v for k, v in metadata.items() if isinstance(v, TensorStorageMetadata)}
    sizes = {k: v.size.numel() * v.properties.dtype.itemsize for k, v in tensors.items()}

    def materialise(names):
        state = {k: torch.empty(tensors[k].size, dtype=tensors[k].properties.dtype) for k in names}
        dcp.load(state, storage_reader=FileSystemReader(model_dir), no_dist=True)
        return state

    _save_shards(path, sizes, materialise, shard_bytes)
    return path


def _save_shards(path: str, names: dict, materialise, shard_bytes: int) -> None:
    """`names` ({tensor name: bytes}) written as safetensors shards into `path`, each shard's tensors
    `materialise(names)` in memory only while it is written (a temporary file renamed: two readers at once
    each write their own)."""
    from safetensors.torch import save_file

    groups = shard_groups(names, shard_bytes)
    weight_map = {}
    for i, group in enumerate(groups):
        name = shard_name(i, len(groups))
        tmp = os.path.join(path, f"{name}.{os.getpid()}.tmp")
        save_file(materialise(group), tmp, metadata={"format": "pt"})
        os.replace(tmp, os.path.join(path, name))
        weight_map.update(dict.fromkeys(group, name))
    if len(groups) > 1:
        write_index(path, weight_map, sum(names.values()))


def _consolidate_zero(path: str, shard_bytes: int) -> str:
    """`consolidate` for a ZeRO-3 checkpoint: DeepSpeed's lazy fp32 state dict, each tensor merged from the
    ranks' partitions only when its shard is written. A tied weight is written once, as its first name."""
    state = zero_weights(path, lazy=True)
    first: dict[int, str] = {}
    for key, value in state.items():
        first.setdefault(id(value), key)
    keys = [k for k, v in state.items() if first[id(v)] == k]
    sizes = {k: math.prod(state[k].shape) * state[k].dtype.itemsize for k in keys}
    _save_shards(path, sizes, lambda group: {k: state[k].contiguous().clone() for k in group}, shard_bytes)
    return path


def export_streamed(model, tokenizer, out_dir: str, shapes: dict[str, tuple[torch.Size, torch.dtype]],
                    tensors, dtype: torch.dtype, original_length: int | None = None, main: bool = True,
                    shard_bytes: int = SHARD_BYTES) -> None:
    """`export` for a sharded model, shard by shard: `tensors` yields (name, full tensor) in the order of
    `shapes` ({name: (shape, dtype)} of every tensor to write, a tied head left out), gathered one at a time
    on every rank (collectives: every rank iterates it; the tensors matter on the main rank alone). The main
    rank casts each to `dtype` and writes a safetensors shard as soon as it is complete, so it never holds
    more than one output shard; then the index, config.json (as `export` completes it) and the tokenizer."""
    from safetensors.torch import save_file

    def out_bytes(shape, kind):
        return shape.numel() * (dtype.itemsize if kind.is_floating_point else kind.itemsize)

    groups = shard_groups({n: out_bytes(*shapes[n]) for n in shapes}, shard_bytes)
    owner = {name: i for i, group in enumerate(groups) for name in group}
    if main:
        os.makedirs(out_dir, exist_ok=True)
    pending: dict[str, torch.Tensor] = {}
    weight_map: dict[str, str] = {}
    for name, tensor in tensors:
        if not main:
            continue
        pending[name] = tensor.detach().to("cpu", dtype if tensor.is_floating_point() else tensor.dtype)
        index = owner[name]
        if len(pending) == len(groups[index]):
            file = shard_name(index, len(groups))
            save_file({k: v.contiguous() for k, v in pending.items()}, os.path.join(out_dir, file),
                      metadata={"format": "pt"})
            weight_map.update(dict.fromkeys(pending, file))
            pending = {}
    if not main:
        return
    if len(groups) > 1:
        write_index(out_dir, weight_map, sum(out_bytes(*shapes[n]) for n in shapes))

    def save_config() -> None:
        model.config.save_pretrained(out_dir)
        if getattr(model, "generation_config", None) is not None:
            model.generation_config.save_pretrained(out_dir)

    _write(model, tokenizer, out_dir, dtype, original_length, save_config)
