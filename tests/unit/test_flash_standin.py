"""The CPU stand-in for flash-attn 2 (tests/flash_standin) keeps flash-attn's contracts, computes exact
attention, and makes transformers take its real flash_attention_2 code path on the CPU."""

import copy
import math

import pytest
import torch

from distill.testing import tiny_config


@pytest.fixture(scope="module")
def fa(flash_standin):
    import flash_attn

    return flash_attn


def _reference(q, k, v, causal=True, offset=0, left=-1):
    """Plain softmax attention in fp64: q (Sq, Hq, D), k/v (Sk, Hk, D); query i sits at key i + offset."""
    q, k, v = q.double(), k.double(), v.double()
    groups = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1)
    scores = torch.einsum("qhd,khd->hqk", q, k) / math.sqrt(q.shape[-1])
    at = torch.arange(q.shape[0])[:, None] + offset
    keys = torch.arange(k.shape[0])[None]
    ok = torch.ones_like(scores[0], dtype=torch.bool)
    if causal:
        ok &= keys <= at
    if left >= 0:
        ok &= keys >= at - left
    scores = scores.masked_fill(~ok, float("-inf"))
    return torch.einsum("hqk,khd->qhd", scores.softmax(-1), v)


def _qkv(total_q, total_k, hq=4, hk=2, d=16, seed=0, dtype=torch.bfloat16):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(total_q, hq, d, generator=g).to(dtype)
    k = torch.randn(total_k, hk, d, generator=g).to(dtype)
    return q, k, torch.randn(total_k, hk, d, generator=g).to(dtype)


def test_varlen_is_exact_attention_per_document_with_gqa(fa):
    lengths = [5, 17, 1, 9]
    q, k, v = _qkv(sum(lengths), sum(lengths))
    cu = torch.tensor([0, 5, 22, 23, 32], dtype=torch.int32)
    fa.standin.reset()
    out = fa.flash_attn_varlen_func(q, k, v, cu, cu, 17, 17, causal=True)
    assert out.shape == q.shape and out.dtype == torch.bfloat16
    start = 0
    for n in lengths:
        want = _reference(q[start:start + n], k[start:start + n], v[start:start + n])
        torch.testing.assert_close(out[start:start + n].double(), want, atol=2e-2, rtol=2e-2)
        start += n
    assert fa.standin.CALLS == [{"entry": "flash_attn_varlen_func", "dtype": "bfloat16", "causal": True,
                                 "window": [-1, -1], "heads": 4, "autocast_cache": True,
                                 "cu_seqlens": [0, 5, 22, 23, 32], "documents": 4}]


def test_causal_is_bottom_right_aligned_and_windows_hold(fa):
    q, k, v = _qkv(3, 8)
    out = fa.flash_attn_func(q[None], k[None], v[None], causal=True)[0]  # query i sits at key i + 5
    torch.testing.assert_close(out.double(), _reference(q, k, v, offset=5), atol=2e-2, rtol=2e-2)
    q, k, v = _qkv(12, 12, seed=1)
    out = fa.flash_attn_func(q[None], k[None], v[None], causal=True, window_size=(3, 0))[0]
    torch.testing.assert_close(out.double(), _reference(q, k, v, left=3), atol=2e-2, rtol=2e-2)
    # Gradients flow to q, k and v in their own dtype.
    q.requires_grad_(), k.requires_grad_(), v.requires_grad_()
    fa.flash_attn_func(q[None], k[None], v[None], causal=True).float().sum().backward()
    assert q.grad.dtype == torch.bfloat16 and k.grad.shape == k.shape and v.grad.abs().sum() > 0


def test_contracts_are_flash_attn_s(fa):
    q, k, v = _qkv(8, 8, dtype=torch.float32)
    cu = torch.tensor([0, 8], dtype=torch.int32)
    with pytest.raises(RuntimeError, match="FlashAttention only support fp16 and bf16 data type"):
        fa.flash_attn_varlen_func(q, k, v, cu, cu, 8, 8, causal=True)
    q, k, v = _qkv(8, 8)
    with pytest.raises(RuntimeError, match="cu_seqlens_q must have dtype int32"):
        fa.flash_attn_varlen_func(q, k, v, cu.long(), cu, 8, 8, causal=True)
    with pytest.raises(RuntimeError, match="must rise from 0 to the 8 tokens"):
        bad = torch.tensor([0, 4], dtype=torch.int32)
        fa.flash_attn_varlen_func(q, k, v, bad, bad, 8, 8, causal=True)
    q3, k3, v3 = _qkv(8, 8, hq=3, hk=2)
    with pytest.raises(RuntimeError, match="must divide number of heads in query"):
        fa.flash_attn_func(q3[None], k3[None], v3[None], causal=True)


def test_padding_helpers_round_trip(fa):
    from flash_attn.bert_padding import pad_input, unpad_input

    x = torch.randn(2, 5, 3)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    flat, indices, cu, max_len, used = unpad_input(x, mask)
    assert flat.shape == (8, 3) and cu.tolist() == [0, 3, 8] and cu.dtype == torch.int32 and max_len == 5
    assert used.tolist() == [3, 5]
    back = pad_input(flat, indices, 2, 5)
    assert torch.equal(back[mask.bool()], x[mask.bool()]) and back[0, 3:].abs().sum() == 0


def _models(*implementations):
    from transformers import AutoModelForCausalLM

    from distill.model.load import resolve_attention

    config = tiny_config("llama", vocab_size=500, num_heads=4, num_kv_heads=2)
    torch.manual_seed(0)
    state = AutoModelForCausalLM.from_config(copy.deepcopy(config)).state_dict()
    out = []
    for name in implementations:
        model = AutoModelForCausalLM.from_config(copy.deepcopy(config),
                                                 attn_implementation=resolve_attention(name))
        model.load_state_dict(state)
        out.append(model)
    return out


def test_transformers_takes_its_flash_path_on_the_cpu(fa):
    """A packed row through transformers' flash_attention_2 (the stand-in underneath) equals sdpa_varlen in
    bf16; the varlen entry point receives the documents' boundaries; fp32 outside autocast fails exactly as
    flash-attn does; and rows of a (B > 1, T) batch are NOT separated (transformers reads packed documents
    from position_ids only when B == 1)."""
    flash, varlen = _models("flash_attention_2", "sdpa_varlen")
    assert flash.config._attn_implementation == "flash_attention_2"
    lengths = [10, 30, 24]
    ids = torch.randint(3, 500, (1, 64), generator=torch.Generator().manual_seed(1))
    pos = torch.cat([torch.arange(n) for n in lengths])[None]
    fa.standin.reset()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        got = flash(input_ids=ids, position_ids=pos, use_cache=False).logits.float()
        want = varlen(input_ids=ids, position_ids=pos, use_cache=False).logits.float()
    assert (got - want).abs().max() <= 0.02 * want.abs().max()
    assert [c["cu_seqlens"] for c in fa.standin.CALLS] == [[0, 10, 40, 64]] * 2  # one call per layer
    with pytest.raises(RuntimeError, match="FlashAttention only support fp16 and bf16 data type"):
        with torch.no_grad():
            flash(input_ids=ids, position_ids=pos, use_cache=False)
    # Two packed rows in a (2, 32) batch: flash runs plain causal attention over each whole row.
    rows = torch.stack([torch.cat([torch.arange(12), torch.arange(20)]), torch.arange(32)])
    fa.standin.reset()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        batched = flash(input_ids=ids.view(2, 32), position_ids=rows, use_cache=False).logits.float()
        separated = varlen(input_ids=ids.view(2, 32), position_ids=rows, use_cache=False).logits.float()
    assert fa.standin.CALLS[0]["entry"] == "flash_attn_func"
    assert (batched[0, 12:] - separated[0, 12:]).abs().max() > 0.1 * separated.abs().max()
