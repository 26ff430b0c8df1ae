"""The decoder inside a causal LM: its layers, hidden-state forwards that stop at the deepest layer needed,
the packed layout a forward reads, and the truncated frozen teacher (`TruncatedTeacher`)."""

from __future__ import annotations

import copy

import torch
from torch import nn

from distill.model.attention import document_offsets, flattens


def decoder_of(model: nn.Module) -> nn.Module:
    """The decoder stack (embeddings, layers, final norm; no lm_head) of a causal LM."""
    if hasattr(model, "get_decoder"):
        decoder = model.get_decoder()
        if decoder is not None and decoder is not model:
            return decoder
    if hasattr(model, "model"):
        return model.model
    return model


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder layers of a causal LM (Llama / Mistral / Qwen2: `model.model.layers`): what FSDP2 wraps
    one by one, what the FLOP count sums, what a truncated teacher cuts."""
    layers = getattr(decoder_of(model), "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise ValueError(f"{type(model).__name__}: no decoder with a `layers` list")
    return layers


def _num_layers(decoder: nn.Module) -> int:
    return int(decoder.config.num_hidden_layers)


def _resolve_indices(layers, n_layers: int) -> list[int]:
    out = []
    for i in layers:
        if i == "last":
            i = n_layers
        i = int(i)
        if i < 0:
            i += n_layers + 1
        if not 0 <= i <= n_layers:
            raise ValueError(f"hidden-state index {i} out of range 0..{n_layers}")
        out.append(i)
    return out


def _decoder_states(decoder, input_ids, position_ids, attention_mask, depth: int, **attention_kwargs):
    """The decoder's forward with every hidden state (no cache, no lm_head): `depth` + 1 entries checked."""
    out = decoder(
        input_ids=input_ids,
        position_ids=position_ids,
        attention_mask=attention_mask,
        use_cache=False,
        output_hidden_states=True,
        **attention_kwargs,
    )
    if len(out.hidden_states) != depth + 1:
        raise RuntimeError(f"expected {depth + 1} hidden states, got {len(out.hidden_states)}")
    return out


def forward_hidden(
    model,
    input_ids: torch.Tensor,
    position_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    layers=None,
):
    """Run the decoder (no lm_head) and return hidden states.

    Args:
        input_ids: (B, T).
        position_ids: (B, T).
        attention_mask: None for packed rows; all ones for single-document rows (see `causal_mask_kwargs`).
        layers: None for the whole `hidden_states` tuple, else indices into it (0 = embeddings, L = after the
            final norm; negative and "last" allowed).

    Returns:
        (hidden_states, last_hidden): the tuple of L+1 tensors (B, T, H) ([-1] after the final norm) or the
        list of selected ones, and the final-norm output (B, T, H) (feed it to lm_head for the LM loss).
    """
    decoder = decoder_of(model)
    n_layers = _num_layers(decoder)
    wanted = None if layers is None else _resolve_indices(layers, n_layers)
    ids, pos, extra, unflatten = packed_layout(model, input_ids, position_ids, attention_mask)
    out = _decoder_states(decoder, ids, pos, attention_mask, n_layers, **extra)
    hidden = tuple(unflatten(h) for h in out.hidden_states)
    if wanted is None:
        return hidden, unflatten(out.last_hidden_state)
    return [hidden[i] for i in wanted], unflatten(out.last_hidden_state)


def packed_layout(model, input_ids: torch.Tensor, position_ids: torch.Tensor, attention_mask=None,
                  flatten: bool | None = None):
    """Packed rows (B, T) laid out for the model's attention, as the trainer's step lays them out: flattened
    to (1, B·T) with the documents' offsets for flash_attention_2 (which separates packed documents only in a
    one-row batch), else unchanged. `flatten` overrides what the model's attention name says (a
    sequence-parallel wrapper's name hides the flash implementation under it).

    Returns:
        (input_ids, position_ids, attention kwargs, unflatten: (1, B·T, H) → (B, T, H)).
    """
    B, T = input_ids.shape
    if flatten is None:
        flatten = flattens(model.config._attn_implementation)
    if attention_mask is not None or B == 1 or not flatten:
        return input_ids, position_ids, {}, lambda h: h
    offsets = {k: v.to(input_ids.device) if torch.is_tensor(v) else v
               for k, v in document_offsets(position_ids.cpu()).items()}
    return (input_ids.reshape(1, B * T), position_ids.reshape(1, B * T), offsets,
            lambda h: h.view(B, T, *h.shape[2:]))


def truncated_decoder(decoder: nn.Module, depth: int) -> nn.Module:
    """A shallow copy of `decoder` that runs only its first `depth` layers (weights shared) and returns the
    raw output of layer `depth` (final norm swapped for identity). depth == L returns `decoder` itself.

    `LlamaModel.forward` (and Mistral's, Qwen2's) runs `layers[:config.num_hidden_layers]`, so a shorter list
    with a config copy stops early; its hidden_states[k] equals the full model's hidden_states[k], k ≤ depth.
    """
    from transformers.utils.output_capturing import maybe_install_capturing_hooks

    n_layers = _num_layers(decoder)
    if not 0 <= depth <= n_layers:
        raise ValueError(f"depth {depth} out of range 0..{n_layers}")
    if depth == n_layers:
        return decoder
    # Hidden-state capture hooks live on the (shared) layers: install them once on the full decoder, so the
    # copy # (which inherits the "installed" flag) does not install a second set on the same layers.
    maybe_install_capturing_hooks(decoder)
    sub = copy.copy(decoder)
    sub._modules = dict(decoder._modules)  # own module table: assignments below must not touch the original
    sub.config = copy.copy(decoder.config)
    sub.config.num_hidden_layers = depth
    if isinstance(getattr(sub.config, "layer_types", None), list):
        sub.config.layer_types = sub.config.layer_types[:depth]
    sub.layers = nn.ModuleList(list(decoder.layers[:depth]))
    sub.norm = nn.Identity()
    return sub


class TruncatedTeacher:
    """The frozen teacher run only as deep as the deepest hidden state a loss needs.

    Holds shallow copies of the teacher's decoder per depth (weights shared, nothing copied), so half the
    layers cost about half the time. Not an nn.Module: it never enters a module tree or an optimiser.
    """

    def __init__(self, teacher: nn.Module):
        self.teacher = teacher
        self.decoder = decoder_of(teacher)
        self.n_layers = _num_layers(self.decoder)
        self._by_depth: dict[int, nn.Module] = {}

    def _decoder(self, depth: int) -> nn.Module:
        if depth not in self._by_depth:
            self._by_depth[depth] = truncated_decoder(self.decoder, depth)
        return self._by_depth[depth]

    @torch.no_grad()
    def __call__(
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor,
        attention_mask: torch.Tensor | None,
        layers,
        need_final: bool = False,
        **attention_kwargs,
    ) -> dict[int, torch.Tensor]:
        """Teacher hidden states {index: (B, T, H)} for indices into the full `hidden_states` tuple; only
        those are kept during the forward.

        Args:
            layers: indices (0..L, negative or "last" allowed); index L is the final-norm output.
            need_final: also return index L (e.g. for a logits KL), which runs the full depth.
            attention_kwargs: passed to every attention layer (the step's document offsets of a flattened
                row: cu_seq_lens_q/k, max_length_q/k).
        """
        wanted = _resolve_indices(layers, self.n_layers)
        if need_final:
            wanted.append(self.n_layers)
        wanted = sorted(set(wanted))
        if not wanted:
            return {}
        depth = max(wanted)
        if depth == 0:  # only the embeddings
            return {0: self.decoder.embed_tokens(input_ids)}
        return _selected_states(self._decoder(depth), input_ids, position_ids, attention_mask, wanted,
                                **attention_kwargs)


def _selected_states(decoder, input_ids, position_ids, attention_mask, wanted: list[int],
                     **attention_kwargs) -> dict[int, torch.Tensor]:
    """hidden_states[i] for i in `wanted` (sorted, the last one the decoder's depth), keeping only those:
    output_hidden_states would hold every layer's state until the forward ends (depth + 1 of them, where a
    recipe reads 3 or 4). hidden_states[i] < depth is the input of layer i (what transformers records),
    taken by a pre-hook; the last one is the decoder's own output."""
    depth = wanted[-1]
    kept: dict[int, torch.Tensor] = {}
    handles = []
    for i in wanted[:-1]:
        def grab(module, args, kwargs, i=i):
            kept[i] = args[0] if args else kwargs["hidden_states"]
        handles.append(decoder.layers[i].register_forward_pre_hook(grab, with_kwargs=True))
    try:
        out = decoder(input_ids=input_ids, position_ids=position_ids, attention_mask=attention_mask,
                      use_cache=False, **attention_kwargs)
    finally:
        for handle in handles:
            handle.remove()
    if len(decoder.layers[: decoder.config.num_hidden_layers]) != depth:
        raise RuntimeError(f"expected a decoder of {depth} layers, got {len(decoder.layers)}")
    kept[depth] = out.last_hidden_state
    return kept


def causal_mask_kwargs(position_ids: torch.Tensor, packed: bool = False) -> dict:
    """The `attention_mask` argument for a batch of rows.

    Args:
        position_ids: (B, T).
        packed: True for rows of several documents whose positions restart at 0: transformers builds the
            per-document causal mask itself when attention_mask is None (and there is no cache).
            False for rows that are ONE document, possibly with skipped positions (short-to-long rows):
            an explicit all-ones mask disables packed detection, which would otherwise read every jump
            in `position_ids` as a document boundary and cut attention into blocks.

    Returns:
        {"attention_mask": None} or {"attention_mask": ones (B, T) long}.
    """
    if packed:
        return {"attention_mask": None}
    return {"attention_mask": torch.ones(position_ids.shape, dtype=torch.long, device=position_ids.device)}
