"""`sdpa_varlen` (distill.model.attention) against transformers' own sdpa with its dense document mask: values
and gradients on packed rows (several documents, GQA, a batch of rows with different boundaries), padding
and cache paths handed over unchanged, skipped positions kept as one document, bf16 autocast."""

import copy

import pytest
import torch

from distill.config import ConfigError
from distill.model import attention
from distill.model.load import check_packing_isolation, resolve_attention
from distill.testing import ARCHITECTURES, tiny_config


def _pair(arch="llama", **kwargs):
    """The same random-init weights loaded twice: transformers' sdpa, and sdpa_varlen."""
    from transformers import AutoModelForCausalLM

    name = resolve_attention("sdpa_varlen")
    config = tiny_config(arch, **kwargs)
    torch.manual_seed(0)
    ref = AutoModelForCausalLM.from_config(copy.deepcopy(config), attn_implementation="sdpa")
    ours = AutoModelForCausalLM.from_config(copy.deepcopy(config), attn_implementation=name)
    ours.load_state_dict(ref.state_dict())
    assert ref.config._attn_implementation == "sdpa" and ours.config._attn_implementation == name
    return ref, ours


def _positions(*rows):
    return torch.stack([torch.cat([torch.arange(n) for n in lengths]) for lengths in rows])  # (B, T)


def _count_calls(monkeypatch):
    calls = []
    real = attention.F.scaled_dot_product_attention

    def spy(q, k, v, **kwargs):
        calls.append((tuple(q.shape), kwargs.get("attn_mask") is None, kwargs.get("is_causal")))
        return real(q, k, v, **kwargs)

    monkeypatch.setattr(attention.F, "scaled_dot_product_attention", spy)
    return calls


def test_document_segments():
    pos = _positions([3, 1, 4], [8])
    assert attention.document_segments(pos) == [[(0, 3), (3, 4), (4, 8)], [(0, 8)]]
    assert attention.document_segments(torch.arange(8)[None]) is None
    # skipped positions (short-to-long rows) only increase: one document, however large the jumps
    assert attention.document_segments(torch.tensor([[0, 5, 9, 40, 41, 100]])) is None
    # a restart that does not go back to 0 still starts a document
    assert attention.document_segments(torch.tensor([[0, 1, 2, 2, 3]])) == [[(0, 3), (3, 5)]]


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_packed_rows_equal_the_dense_mask_values_and_gradients(arch, monkeypatch):
    ref, ours = _pair(arch, num_heads=4, num_kv_heads=2)  # GQA
    pos = _positions([5, 17, 1, 9], [32], [20, 12])  # (3, 32): different boundaries per row
    ids = torch.randint(3, 1000, pos.shape, generator=torch.Generator().manual_seed(1))
    labels = ids.clone()
    out_ref = ref(input_ids=ids, position_ids=pos, labels=labels, use_cache=False)
    calls = _count_calls(monkeypatch)
    out = ours(input_ids=ids, position_ids=pos, labels=labels, use_cache=False)
    # one causal, unmasked call per document and layer: 4 + 1 + 2 documents x 2 layers
    assert len(calls) == 7 * 2 and all(unmasked and causal for _, unmasked, causal in calls)
    torch.testing.assert_close(out.logits, out_ref.logits, rtol=1e-5, atol=1e-5)
    out_ref.loss.backward()
    out.loss.backward()
    for (name, a), b in zip(ref.named_parameters(), ours.parameters()):
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-5, atol=1e-6, msg=name)


def test_isolation_check_and_a_document_alone():
    _, ours = _pair()
    assert check_packing_isolation(ours) < 1e-5
    pos = _positions([6, 10])
    ids = torch.randint(3, 1000, (1, 16), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        packed = ours(input_ids=ids, position_ids=pos, use_cache=False).logits
        alone = ours(input_ids=ids[:, 6:], position_ids=pos[:, 6:], use_cache=False).logits
    torch.testing.assert_close(packed[:, 6:], alone, rtol=1e-5, atol=1e-5)


def test_other_calls_go_to_transformers_sdpa(monkeypatch):
    ref, ours = _pair()
    gen = torch.Generator().manual_seed(3)
    ids = torch.randint(3, 1000, (2, 12), generator=gen)
    mask = torch.ones_like(ids)
    mask[1, 8:] = 0
    with torch.no_grad():
        # padding: transformers' mask, unchanged
        torch.testing.assert_close(ours(input_ids=ids, attention_mask=mask).logits[mask.bool()],
                                   ref(input_ids=ids, attention_mask=mask).logits[mask.bool()])
        # skipped positions with mask None: one causal document (no cut at the jumps)
        skipped = torch.tensor([[0, 3, 4, 9, 15, 16, 30, 31, 50, 51, 52, 90]]).expand(2, -1)
        calls = _count_calls(monkeypatch)
        got = ours(input_ids=ids, position_ids=skipped, use_cache=False).logits
        assert [c[0][2] for c in calls] == [12, 12]  # whole rows, one call per layer
        ones = torch.ones_like(ids)
        torch.testing.assert_close(got, ref(input_ids=ids, position_ids=skipped, attention_mask=ones,
                                            use_cache=False).logits)
        # generation with a KV cache (prefill, then one token at a time)
        prompt = ids[:1, :6]
        a = ours.generate(prompt, max_new_tokens=5, do_sample=False, use_cache=True, pad_token_id=0)
        b = ref.generate(prompt, max_new_tokens=5, do_sample=False, use_cache=True, pad_token_id=0)
    assert torch.equal(a, b)


def test_bf16_autocast_close_to_dense_mask():
    ref, ours = _pair()
    pos = _positions([40, 24])
    ids = torch.randint(3, 1000, (1, 64), generator=torch.Generator().manual_seed(4))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        a = ours(input_ids=ids, position_ids=pos, use_cache=False).logits.float()
        b = ref(input_ids=ids, position_ids=pos, use_cache=False).logits.float()
    assert (a - b).abs().max().item() < 5e-2 * b.abs().max().item()


def test_bf16_weights_without_autocast():
    """A bf16 model (e.g. the teacher) run without autocast: the segments' output comes back in bf16."""
    ref, ours = _pair()
    ref, ours = ref.bfloat16(), ours.bfloat16()
    pos = _positions([40, 24])
    ids = torch.randint(3, 1000, (1, 64), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        a = ours(input_ids=ids, position_ids=pos, use_cache=False).logits.float()
        b = ref(input_ids=ids, position_ids=pos, use_cache=False).logits.float()
    assert (a - b).abs().max().item() < 5e-2 * b.abs().max().item()


def test_explicit_mask_never_splits_whatever_the_other_rows_hold():
    """transformers' sdpa never isolates documents when a mask is given; an all-ones row must not split
    either, whether or not another row of the batch has padding."""
    ref, ours = _pair()
    pos = _positions([10, 14], [24])
    ids = torch.randint(3, 1000, (2, 24), generator=torch.Generator().manual_seed(6))
    for padded in (0, 1):
        mask = torch.ones_like(ids)
        if padded:
            mask[1, -1] = 0
        with torch.no_grad():
            a = ours(input_ids=ids, position_ids=pos, attention_mask=mask, use_cache=False).logits
            b = ref(input_ids=ids, position_ids=pos, attention_mask=mask, use_cache=False).logits
        torch.testing.assert_close(a[mask.bool()], b[mask.bool()], rtol=1e-5, atol=1e-5)


def test_inference_mode_and_a_position_buffer_refilled_in_place():
    ref, ours = _pair()
    ids = torch.randint(3, 1000, (1, 24), generator=torch.Generator().manual_seed(7))
    buffer = _positions([10, 14]).numpy().copy()
    positions = torch.from_numpy(buffer)  # shares memory with `buffer`: refilling it bumps no version
    with torch.inference_mode():
        for lengths in ([10, 14], [24], [5, 5, 14]):
            buffer[:] = _positions(lengths).numpy()
            torch.testing.assert_close(ours(input_ids=ids, position_ids=positions, use_cache=False).logits,
                                       ref(input_ids=ids, position_ids=positions, use_cache=False).logits,
                                       rtol=1e-5, atol=1e-5)
        out = ours.generate(ids[:, :6], max_new_tokens=3, do_sample=False, pad_token_id=0)
    assert out.shape == (1, 9)


def test_only_supported_model_types():
    assert resolve_attention("auto", "cpu", "llama") == attention.NAME
    assert resolve_attention("auto", "cpu", "gemma3") == "sdpa"  # masks we do not rebuild: transformers' sdpa
    with pytest.raises(ConfigError, match="model.attention: 'sdpa_varlen' supports model types"):
        resolve_attention("sdpa_varlen", "cpu", "gemma3")
