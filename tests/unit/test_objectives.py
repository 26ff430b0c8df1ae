"""Chunked objectives vs naive full-logits references: values and gradients, masks, dtypes."""

import pytest
import torch
import torch.nn.functional as F

from distill.model.objectives import hidden_cosine_loss, kl_loss, liger_available, lm_loss

B, T, H, V = 2, 37, 16, 97


def _inputs(seed=0, dtype=torch.float32, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    hidden = (torch.randn(B, T, H, generator=g) * scale).to(dtype).requires_grad_()
    weight = (torch.randn(V, H, generator=g) * 0.5).to(dtype).requires_grad_()
    return hidden, weight


def _labels(seed=0, ignore_frac=0.2):
    g = torch.Generator().manual_seed(seed + 100)
    labels = torch.randint(0, V, (B, T), generator=g)
    labels[torch.rand(B, T, generator=g) < ignore_frac] = -100
    labels[1, -5:] = -100  # a padded tail
    return labels


def _mask(seed=0):
    g = torch.Generator().manual_seed(seed + 200)
    mask = torch.rand(B, T, generator=g) > 0.25
    mask[0, :3] = False
    return mask


def _naive_lm(hidden, weight, labels, bias=None):
    logits = hidden.double() @ weight.double().t()  # (B, T, V)
    if bias is not None:
        logits = logits + bias.double()
    logits = logits[:, :-1].reshape(-1, V)
    targets = labels[:, 1:].reshape(-1)
    return F.cross_entropy(logits, targets, ignore_index=-100, reduction="sum")


def _naive_kl(s_h, s_w, t_h, t_w, mask, kind, temperature):
    s = (s_h.double() @ s_w.double().t())[mask] / temperature  # (n, V)
    t = (t_h.double() @ t_w.double().t())[mask] / temperature
    log_p, log_q = s.log_softmax(-1), t.log_softmax(-1)
    if kind == "forward":
        div = (log_q.exp() * (log_q - log_p)).sum(-1)
    elif kind == "reverse":
        div = (log_p.exp() * (log_p - log_q)).sum(-1)
    else:
        log_m = torch.log(0.5 * log_p.exp() + 0.5 * log_q.exp())
        div = 0.5 * (log_p.exp() * (log_p - log_m)).sum(-1) + 0.5 * (log_q.exp() * (log_q - log_m)).sum(-1)
    return div.sum() * temperature**2


def _grads(loss, tensors):
    return torch.autograd.grad(loss, tensors)


def _assert_close(ours, ref, rtol=1e-5):
    ref = ref.to(ours.dtype)
    atol = rtol * ref.abs().max().item()
    torch.testing.assert_close(ours, ref, rtol=rtol, atol=atol)


# ---------------------------------------------------------------------------------------------------
# lm_loss
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("chunk_size", [1, 7, 32, 4096])  # 7 and 32 do not divide B·T
def test_lm_loss_matches_naive_values_and_grads(chunk_size):
    hidden, weight = _inputs()
    labels = _labels()
    loss, count = lm_loss(hidden, weight, labels, chunk_size=chunk_size)
    ref = _naive_lm(hidden, weight, labels)
    assert loss.dtype == torch.float32 and loss.dim() == 0
    assert int(count) == int((labels[:, 1:] != -100).sum())
    _assert_close(loss.detach(), ref.detach())
    ours_g = _grads(loss, (hidden, weight))
    ref_g = _grads(ref, (hidden, weight))
    for a, b in zip(ours_g, ref_g):
        _assert_close(a, b)


def test_lm_loss_with_bias():
    hidden, weight = _inputs(1)
    bias = torch.randn(V).requires_grad_()
    labels = _labels(1)
    loss, _ = lm_loss(hidden, weight, labels, chunk_size=5, bias=bias)
    ref = _naive_lm(hidden, weight, labels, bias)
    _assert_close(loss.detach(), ref.detach())
    for a, b in zip(_grads(loss, (hidden, weight, bias)), _grads(ref, (hidden, weight, bias))):
        _assert_close(a, b)


def test_lm_loss_shift_uses_next_label():
    # One-hot weights: hidden t points at token k, so the loss is low only if label[t + 1] == k.
    hidden = torch.zeros(1, 3, V)
    hidden[0, 0, 5] = 50.0
    hidden[0, 1, 9] = 50.0
    weight = torch.eye(V)
    good, _ = lm_loss(hidden, weight, torch.tensor([[0, 5, 9]]))
    bad, _ = lm_loss(hidden, weight, torch.tensor([[5, 9, 0]]))
    assert good.item() < 1e-6
    assert bad.item() > 40


def test_lm_loss_ignored_tokens_get_no_gradient_and_all_ignored_is_zero():
    hidden, weight = _inputs(2)
    labels = _labels(2)
    loss, _ = lm_loss(hidden, weight, labels, chunk_size=8)
    (g_h,) = _grads(loss, (hidden,))
    no_target = torch.ones(B, T, dtype=torch.bool)
    no_target[:, :-1] = labels[:, 1:] == -100
    assert no_target.any() and (~no_target).any()
    assert g_h[no_target].abs().max() == 0
    assert g_h[~no_target].abs().sum(-1).min() > 0

    empty, count = lm_loss(hidden, weight, torch.full((B, T), -100), chunk_size=8)
    assert int(count) == 0 and empty.item() == 0.0
    empty.backward()  # still differentiable
    assert hidden.grad.abs().max() == 0


def test_lm_loss_bf16_matmul_fp32_reductions_and_input_dtype_grads():
    hidden, weight = _inputs(3, dtype=torch.bfloat16)
    labels = _labels(3)
    loss, _ = lm_loss(hidden, weight, labels, chunk_size=16)
    assert loss.dtype == torch.float32
    loss.backward()
    assert hidden.grad.dtype == torch.bfloat16 and weight.grad.dtype == torch.bfloat16
    # bf16 inputs: the matmul runs in bf16 (like the model's own lm_head), the log-sum-exp in fp32 —
    # the same value as the usual `cross_entropy((h @ Wᵀ).float())`, and close to the all-fp32 one.
    logits = (hidden.detach() @ weight.detach().t()).float()[:, :-1].reshape(-1, V)
    ref = F.cross_entropy(logits, labels[:, 1:].reshape(-1), ignore_index=-100, reduction="sum")
    _assert_close(loss.detach(), ref)
    fp32 = _naive_lm(hidden.detach().float(), weight.detach().float(), labels)
    assert abs(loss.item() - fp32.item()) / fp32.item() < 1e-3


def test_lm_loss_under_autocast_matches_fp32_closely():
    hidden, weight = _inputs(5)
    labels = _labels(5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, _ = lm_loss(hidden, weight, labels, chunk_size=16)
    loss.backward()
    assert hidden.grad.dtype == torch.float32 and weight.grad.dtype == torch.float32
    ref = _naive_lm(hidden.detach(), weight.detach(), labels)
    assert abs(loss.item() - ref.item()) / ref.item() < 1e-3


def test_lm_loss_rejects_bad_shapes():
    hidden, weight = _inputs()
    with pytest.raises(ValueError):
        lm_loss(hidden, weight, torch.zeros(B, T + 1, dtype=torch.long))
    with pytest.raises(ValueError):
        lm_loss(hidden, weight, _labels(), chunk_size=0)


def test_lm_loss_liger_option_falls_back_on_cpu():
    hidden, weight = _inputs(4)
    labels = _labels(4)
    ours, _ = lm_loss(hidden, weight, labels, use_liger=True)
    _assert_close(ours.detach(), _naive_lm(hidden, weight, labels).detach())


@pytest.mark.gpu
@pytest.mark.skipif(not liger_available(), reason="liger-kernel not installed")
def test_lm_loss_liger_matches_chunked_on_cuda():
    hidden, weight = _inputs(5)
    hidden = hidden.detach().cuda().requires_grad_()
    weight = weight.detach().cuda().requires_grad_()
    labels = _labels(5).cuda()
    ours, _ = lm_loss(hidden, weight, labels)
    fused, _ = lm_loss(hidden, weight, labels, use_liger=True)
    torch.testing.assert_close(fused, ours, rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------------------------------------------
# kl_loss
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["forward", "reverse", "jsd"])
@pytest.mark.parametrize("chunk_size,temperature", [(1, 1.0), (9, 2.0), (2048, 0.7)])
def test_kl_loss_matches_naive_values_and_grads(kind, chunk_size, temperature):
    s_h, s_w = _inputs(10)
    t_h, t_w = _inputs(11)
    t_h, t_w = t_h.detach(), t_w.detach()
    mask = _mask()
    loss, count = kl_loss(s_h, s_w, t_h, t_w, mask, kind=kind, temperature=temperature, chunk_size=chunk_size)
    ref = _naive_kl(s_h, s_w, t_h, t_w, mask, kind, temperature)
    assert int(count) == int(mask.sum())
    assert loss.item() > 0
    _assert_close(loss.detach(), ref.detach())
    for a, b in zip(_grads(loss, (s_h, s_w)), _grads(ref, (s_h, s_w))):
        _assert_close(a, b)


@pytest.mark.parametrize("kind", ["forward", "reverse", "jsd"])
def test_kl_loss_is_zero_for_identical_models(kind):
    s_h, s_w = _inputs(12)
    loss, _ = kl_loss(s_h, s_w, s_h.detach(), s_w.detach(), _mask(), kind=kind, chunk_size=10)
    assert abs(loss.item()) < 1e-5
    g_h, g_w = _grads(loss, (s_h, s_w))
    assert g_h.abs().max() < 1e-5 and g_w.abs().max() < 1e-5


def test_kl_loss_masked_positions_get_no_gradient_and_teacher_gets_none():
    s_h, s_w = _inputs(13)
    t_h, t_w = _inputs(14)  # teacher tensors that require grad: kl_loss must not touch them
    mask = _mask(1)
    loss, _ = kl_loss(s_h, s_w, t_h, t_w, mask, chunk_size=6)
    loss.backward()
    assert s_h.grad[~mask].abs().max() == 0
    assert s_h.grad[mask].abs().sum(-1).min() > 0
    assert t_h.grad is None and t_w.grad is None


def test_kl_loss_bf16_runs():
    s_h, s_w = _inputs(15, dtype=torch.bfloat16)
    t_h, t_w = _inputs(16, dtype=torch.bfloat16)
    mask = _mask(2)
    loss, _ = kl_loss(s_h, s_w, t_h.detach(), t_w.detach(), mask, kind="jsd", chunk_size=16)
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    loss.backward()
    assert s_h.grad.dtype == torch.bfloat16 and s_w.grad.dtype == torch.bfloat16
    # Matmuls in bf16, divergences in fp32: within bf16 rounding of the all-fp32 value.
    ref = _naive_kl(s_h.detach().float(), s_w.detach().float(), t_h.detach().float(), t_w.detach().float(),
                    mask, "jsd", 1.0)
    assert abs(loss.item() - ref.item()) / ref.item() < 2e-3


def test_kl_loss_rejects_bad_arguments():
    s_h, s_w = _inputs()
    with pytest.raises(ValueError, match="kind"):
        kl_loss(s_h, s_w, s_h.detach(), s_w.detach(), _mask(), kind="tvd")
    with pytest.raises(ValueError, match="temperature"):
        kl_loss(s_h, s_w, s_h.detach(), s_w.detach(), _mask(), temperature=0.0)
    with pytest.raises(ValueError, match="vocabularies"):
        kl_loss(s_h, s_w, s_h.detach(), s_w.detach()[:-1], _mask())


# ---------------------------------------------------------------------------------------------------
# hidden_cosine_loss
# ---------------------------------------------------------------------------------------------------


def test_hidden_cosine_loss_matches_formula():
    g = torch.Generator().manual_seed(20)
    students = [torch.randn(B, T, H, generator=g).requires_grad_() for _ in range(3)]
    teachers = [torch.randn(B, T, H, generator=g) for _ in range(3)]
    mask = _mask(3)
    loss, count = hidden_cosine_loss(students, teachers, mask)
    assert int(count) == int(mask.sum())
    # LongReD: Σ_l (1 − mean_tokens cos).
    expected = sum(1 - F.cosine_similarity(s[mask], t[mask], dim=-1).mean()
                   for s, t in zip(students, teachers))
    torch.testing.assert_close(loss / count, expected)
    loss.backward()
    assert students[0].grad[~mask].abs().max() == 0
    assert students[0].grad[mask].abs().sum(-1).min() > 0


def test_hidden_cosine_loss_zero_for_identical_and_scale_invariant():
    g = torch.Generator().manual_seed(21)
    states = [torch.randn(B, T, H, generator=g) for _ in range(2)]
    mask = _mask(4)
    same, _ = hidden_cosine_loss(states, [s.clone() for s in states], mask)
    scaled, _ = hidden_cosine_loss(states, [3.0 * s for s in states], mask)
    assert abs(same.item()) < 1e-5 and abs(scaled.item()) < 1e-5
    opposite, count = hidden_cosine_loss(states, [-s for s in states], mask)
    torch.testing.assert_close(opposite, 2.0 * 2 * count.float())


def test_hidden_cosine_loss_bf16_is_fp32():
    g = torch.Generator().manual_seed(22)
    s = torch.randn(B, T, H, generator=g).bfloat16().requires_grad_()
    t = torch.randn(B, T, H, generator=g).bfloat16()
    loss, _ = hidden_cosine_loss([s], [t], _mask())
    assert loss.dtype == torch.float32
    loss.backward()
    assert s.grad.dtype == torch.bfloat16


def test_hidden_cosine_loss_rejects_mismatched_layers():
    x = torch.randn(B, T, H)
    with pytest.raises(ValueError):
        hidden_cosine_loss([x, x], [x], _mask())
    with pytest.raises(ValueError):
        hidden_cosine_loss([x], [x[:, :-1]], _mask())
