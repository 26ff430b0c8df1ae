"""Training objectives as pure tensor functions returning `(loss_sum, count)`.

Every function returns the *sum* of its per-token loss (a 0-dim fp32 tensor with grad) and the number of
tokens that carry loss; the trainer adds the counts of all micro-batches and ranks of a step and divides
once, so gradient accumulation is exact (torchtitan / TRL convention).

Long sequences never materialise (T, V) logits: `lm_loss` and `kl_loss` run over chunks of tokens in a
custom `torch.autograd.Function` that keeps only its inputs (plus one fp32 number per token) and
recomputes the logits in backward. Forward and all element-wise work go over blocks of at most
`BLOCK_ROWS` rows; backward holds one (chunk_size, V) fp32 gradient buffer so the lm_head weight gradient
is one large matmul per chunk (fewer read-modify-writes of the (V, H) accumulator on a GPU). Peak working
memory is O(chunk_size · V + V · H), independent of the sequence length.
"""

from __future__ import annotations

import importlib.util
import logging
import math
from typing import Literal

import torch
import torch.nn.functional as F

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100
BLOCK_ROWS = 256
"""Rows per block of element-wise work: bounds the temporaries of softmax / divergence math."""
KLKind = Literal["forward", "reverse", "jsd"]
_KL_KINDS = ("forward", "reverse", "jsd")


def liger_available() -> bool:
    """Whether liger-kernel's fused linear cross-entropy can be imported (it is not a dependency)."""
    return importlib.util.find_spec("liger_kernel") is not None


def _chunks(n: int, chunk_size: int):
    for start in range(0, n, chunk_size):
        yield start, min(start + chunk_size, n)


def _compute_dtype(hidden: torch.Tensor) -> torch.dtype:
    """The matmul dtype: autocast's when it is on (bf16 training), else the activations' own dtype.

    The (c, V) logits are always upcast to fp32 right after the matmul: log-sum-exp, softmax and the
    weight-gradient accumulation stay fp32; only the two large matmuls run in the low dtype (as in the
    models' own lm_head under autocast), which halves their cost on CPU and uses tensor cores on GPU.
    """
    device = hidden.device.type
    if torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return hidden.dtype if hidden.dtype in (torch.bfloat16, torch.float16) else torch.float32


def _fp32_logits(hidden: torch.Tensor, weight_c: torch.Tensor, bias32: torch.Tensor | None) -> torch.Tensor:
    """(c, H) activations → (c, V) fp32 logits; the matmul runs in `weight_c`'s (compute) dtype."""
    logits = (hidden.to(weight_c.dtype) @ weight_c.t()).float()  # (c, V)
    if bias32 is not None:
        logits += bias32
    return logits


def _accumulate_weight_grad(acc32: torch.Tensor, grad_logits: torch.Tensor, h: torch.Tensor,
                            dtype: torch.dtype) -> None:
    """acc32 (V, H) fp32 += grad_logitsᵀ @ h, the product in the compute dtype."""
    if dtype == torch.float32:
        acc32.addmm_(grad_logits.t(), h.float())
    else:
        acc32 += (grad_logits.to(dtype).t() @ h.to(dtype)).float()


# ---------------------------------------------------------------------------------------------------
# Causal-LM cross-entropy
# ---------------------------------------------------------------------------------------------------


class _ChunkedLinearCrossEntropy(torch.autograd.Function):
    """Σ_i CE(h_i @ Wᵀ + b, y_i) over rows `index` of `hidden`, chunk by chunk, logits recomputed in backward.

    Only the inputs and the per-token log-sum-exp (N fp32 numbers) are saved for backward.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, index, chunk_size, dtype):
        # hidden (N, H), weight (V, H), bias (V,) or None, targets (n,) long, index (n,) long rows of hidden
        weight32 = weight.to(dtype)  # the compute-dtype weight (no copy when it already is)
        bias32 = bias.float() if bias is not None else None
        n = index.numel()
        lse = torch.empty(n, dtype=torch.float32, device=hidden.device)  # (n,)
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        for s, e in _chunks(n, min(chunk_size, BLOCK_ROWS)):
            logits = _fp32_logits(hidden.index_select(0, index[s:e]), weight32, bias32)  # (b, V)
            chunk_lse = torch.logsumexp(logits, dim=-1)  # (b,)
            target_logit = logits.gather(1, targets[s:e, None]).squeeze(1)  # (b,)
            lse[s:e] = chunk_lse
            total += (chunk_lse - target_logit).sum()
            del logits
        ctx.save_for_backward(hidden, weight, bias, targets, index, lse)
        ctx.chunk_size, ctx.dtype = chunk_size, dtype
        return total

    @staticmethod
    def backward(ctx, grad_output):
        hidden, weight, bias, targets, index, lse = ctx.saved_tensors
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        weight32 = weight.to(ctx.dtype)
        bias32 = bias.float() if bias is not None else None
        grad_hidden = torch.zeros_like(hidden) if need_h else None  # (N, H) input dtype
        # (V, H) fp32 accumulator
        grad_weight = torch.zeros_like(weight, dtype=torch.float32) if need_w else None
        grad_bias = torch.zeros_like(bias32) if (need_b and bias32 is not None) else None
        g = grad_output.float()
        for s, e in _chunks(index.numel(), ctx.chunk_size):
            rows = index[s:e]
            h = hidden.index_select(0, rows)  # (c, H)
            # d CE / d logits = softmax − onehot, built in place in the recomputed logits buffer.
            probs = _fp32_logits(h, weight32, bias32)  # (c, V)
            probs.sub_(lse[s:e, None]).exp_()
            probs.scatter_add_(1, targets[s:e, None], torch.full_like(lse[s:e, None], -1.0))
            probs.mul_(g)
            if need_h:
                grad_hidden.index_copy_(0, rows, (probs.to(ctx.dtype) @ weight32).to(hidden.dtype))  # (c, H)
            if need_w:
                _accumulate_weight_grad(grad_weight, probs, h, ctx.dtype)  # (V, H)
            if grad_bias is not None:
                grad_bias += probs.sum(0)
            del probs
        if grad_weight is not None:
            grad_weight = grad_weight.to(weight.dtype)
        if grad_bias is not None:
            grad_bias = grad_bias.to(bias.dtype)
        return grad_hidden, grad_weight, grad_bias, None, None, None, None


def _shifted_targets(labels: torch.Tensor) -> torch.Tensor:
    """(B, T) labels aligned with input_ids → (B·T,) targets where position t holds labels[t + 1]."""
    shifted = torch.full_like(labels, IGNORE_INDEX)  # (B, T)
    shifted[:, :-1] = labels[:, 1:]
    return shifted.reshape(-1)


def lm_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    chunk_size: int = 4096,
    bias: torch.Tensor | None = None,
    use_liger: bool = False,
    shifted: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed causal-LM cross-entropy from final hidden states, without materialising (B·T, V) logits.

    L_long of LongReD (Eq. 1): Σ_t −log p(x_{t+1} | x_≤t). Hidden state t predicts `labels[:, t + 1]`
    (Hugging Face convention: labels aligned with input_ids, the shift happens here).

    Args:
        hidden: (B, T, H) post-norm hidden states of the last layer (fp32 or bf16).
        weight: (V, H) lm_head weight.
        labels: (B, T) long, aligned with input_ids; -100 marks positions without a target.
        chunk_size: tokens per backward chunk; peak working memory is about chunk_size · V fp32 numbers
            (plus a (V, H) fp32 weight-gradient accumulator).
        bias: optional (V,) lm_head bias.
        use_liger: use liger-kernel's fused linear cross-entropy when it is installed and the tensors
            are on CUDA; otherwise (logged once per call) fall back to the chunked implementation.
        shifted: `labels` are already the targets (position t holds the label of t + 1), as a slice of a
            sequence-parallel row has them: its last target is the next slice's first token.

    Returns:
        (loss_sum, count): 0-dim fp32 sum of the token losses, 0-dim long number of tokens with a target.
    """
    if hidden.dim() != 3 or labels.shape != hidden.shape[:2]:
        raise ValueError(f"expected hidden (B, T, H) and labels (B, T), got {tuple(hidden.shape)} and "
                         f"{tuple(labels.shape)}")
    if chunk_size <= 0:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    targets = labels.reshape(-1) if shifted else _shifted_targets(labels)  # (B·T,)
    hidden2d = hidden.reshape(-1, hidden.shape[-1])  # (B·T, H), a view when hidden is contiguous
    valid = targets != IGNORE_INDEX
    count = valid.sum()
    if use_liger:
        if liger_available() and hidden.is_cuda:
            # optional: only the fused-loss path
            from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

            fused = LigerFusedLinearCrossEntropyLoss(ignore_index=IGNORE_INDEX, reduction="sum")
            out = fused(weight, hidden2d.contiguous(), targets, bias)
            if isinstance(out, tuple):  # newer versions can also return the z-loss
                out = out[0]
            return out.float(), count
        logger.debug("liger-kernel unavailable or tensors not on CUDA: using the chunked cross-entropy")
    # Only rows with a target enter the chunks: padding and document tails cost nothing.
    index = valid.nonzero().squeeze(1)  # (n,)
    dtype = _compute_dtype(hidden)
    with torch.autocast(hidden.device.type, enabled=False):  # dtypes are chosen explicitly inside
        loss = _ChunkedLinearCrossEntropy.apply(hidden2d, weight, bias, targets[index], index, chunk_size,
                                                dtype)
    return loss, count


# ---------------------------------------------------------------------------------------------------
# Logits distillation
# ---------------------------------------------------------------------------------------------------


def _divergence_and_grad(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, kind: str, need_grad: bool
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per-token divergence (b,) and its gradient w.r.t. the (tempered) student logits (b, V), in fp32.

    With p = softmax(student), q = softmax(teacher):
      forward  KL(q‖p) = Σ q (log q − log p);            ∂/∂s = p − q
      reverse  KL(p‖q) = Σ p (log p − log q);            ∂/∂s = p ⊙ (a − Σ p a),  a = log p − log q
      jsd      ½ KL(p‖m) + ½ KL(q‖m), m = ½(p + q);      ∂/∂s = p ⊙ (a − Σ p a),  a = ½ (log p − log m)
    """
    log_p = torch.log_softmax(student_logits, dim=-1)  # (b, V)
    log_q = torch.log_softmax(teacher_logits, dim=-1)  # (b, V)
    if kind == "forward":
        q = log_q.exp()
        div = (q * (log_q - log_p)).sum(-1)  # (b,)
        grad = log_p.exp_().sub_(q) if need_grad else None
        return div, grad
    p = log_p.exp()
    if kind == "reverse":
        a = log_p - log_q  # (b, V)
        div = (p * a).sum(-1)
    else:  # jsd, β = 0.5
        q = log_q.exp()
        log_m = torch.logaddexp(log_p, log_q).sub_(math.log(2.0))  # log ½(p + q)
        div = 0.5 * (p * (log_p - log_m)).sum(-1) + 0.5 * (q * (log_q - log_m)).sum(-1)
        del q
        a = (log_p - log_m).mul_(0.5)
    if not need_grad:
        return div, None
    mean_a = (p * a).sum(-1, keepdim=True)  # (b, 1)
    return div, a.sub_(mean_a).mul_(p)


class _ChunkedLogitsKL(torch.autograd.Function):
    """Σ_i D(teacher_i, student_i) over rows `index`, chunk by chunk; logits of both recomputed in
    backward."""

    @staticmethod
    def forward(ctx, s_hidden, s_weight, t_hidden, t_weight, index, kind, temperature, chunk_size, dtype):
        # s_hidden (N, Hs), s_weight (V, Hs), t_hidden (N, Ht), t_weight (V, Ht), index (n,)
        s_w32 = s_weight.to(dtype)
        with torch.no_grad():
            t_w32 = t_weight.to(dtype)
        total = torch.zeros((), dtype=torch.float32, device=s_hidden.device)
        for s, e in _chunks(index.numel(), min(chunk_size, BLOCK_ROWS)):
            rows = index[s:e]
            s_logits = _fp32_logits(s_hidden.index_select(0, rows), s_w32, None).div_(temperature)  # (b, V)
            with torch.no_grad():
                t_logits = _fp32_logits(t_hidden.index_select(0, rows), t_w32, None).div_(temperature)
            div, _ = _divergence_and_grad(s_logits, t_logits, kind, need_grad=False)
            total += div.sum()
            del s_logits, t_logits
        ctx.save_for_backward(s_hidden, s_weight, t_hidden, t_weight, index)
        ctx.kind, ctx.temperature, ctx.chunk_size, ctx.dtype = kind, temperature, chunk_size, dtype
        return total * temperature**2

    @staticmethod
    def backward(ctx, grad_output):
        s_hidden, s_weight, t_hidden, t_weight, index = ctx.saved_tensors
        need_h, need_w = ctx.needs_input_grad[:2]
        tau = ctx.temperature
        s_w32 = s_weight.to(ctx.dtype)
        t_w32 = t_weight.to(ctx.dtype)
        grad_hidden = torch.zeros_like(s_hidden) if need_h else None  # (N, Hs)
        # (V, Hs) fp32 accumulator
        grad_weight = torch.zeros_like(s_weight, dtype=torch.float32) if need_w else None
        # loss = τ² · D(s / τ): d loss / d s = τ² · (1/τ) · ∂D = τ · ∂D.
        scale = grad_output.float() * tau
        for s, e in _chunks(index.numel(), ctx.chunk_size):
            rows = index[s:e]
            h = s_hidden.index_select(0, rows)  # (c, Hs)
            # One (c, V) buffer: the student's logits, overwritten block by block with their gradient.
            grad_logits = _fp32_logits(h, s_w32, None).div_(tau)  # (c, V)
            for bs, be in _chunks(e - s, BLOCK_ROWS):
                # (b, V)
                t_logits = _fp32_logits(t_hidden.index_select(0, rows[bs:be]), t_w32, None).div_(tau)
                _, block_grad = _divergence_and_grad(grad_logits[bs:be], t_logits, ctx.kind, need_grad=True)
                grad_logits[bs:be] = block_grad
                del t_logits, block_grad
            grad_logits.mul_(scale)  # (c, V)
            if need_h:
                grad_hidden.index_copy_(0, rows, (grad_logits.to(ctx.dtype) @ s_w32).to(s_hidden.dtype))
            if need_w:
                _accumulate_weight_grad(grad_weight, grad_logits, h, ctx.dtype)
            del grad_logits
        if grad_weight is not None:
            grad_weight = grad_weight.to(s_weight.dtype)
        return grad_hidden, grad_weight, None, None, None, None, None, None, None


def kl_loss(
    student_hidden: torch.Tensor,
    student_weight: torch.Tensor,
    teacher_hidden: torch.Tensor,
    teacher_weight: torch.Tensor,
    mask: torch.Tensor,
    kind: KLKind = "forward",
    temperature: float = 1.0,
    chunk_size: int = 2048,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed divergence between the teacher's and the student's next-token distributions.

    Logits distillation (Hinton et al. 2015; GKD, Agarwal et al. 2024 for reverse KL and JSD), beyond
    LongReD's hidden-state terms. Both distributions are compared at the same positions (no shift):
    p = softmax(student_hidden @ student_weightᵀ / τ), q = softmax(teacher_hidden @ teacher_weightᵀ / τ);
    forward = KL(q‖p), reverse = KL(p‖q), jsd = ½ KL(p‖m) + ½ KL(q‖m) with m = ½(p + q). The sum is
    scaled by τ² so gradient magnitudes do not depend on τ. The teacher side carries no gradient.

    Args:
        student_hidden: (B, T, H) student final hidden states (fp32 or bf16).
        student_weight: (V, H) student lm_head weight.
        teacher_hidden: (B, T, H_t) teacher final hidden states (no grad).
        teacher_weight: (V, H_t) teacher lm_head weight (no grad).
        mask: (B, T) bool, True at the positions that carry loss (real tokens).
        kind: "forward", "reverse" or "jsd".
        temperature: τ > 0, divides both logits.
        chunk_size: tokens per backward chunk; peak working memory is about chunk_size · V fp32 numbers
            (plus a (V, H) fp32 weight-gradient accumulator). The teacher's logits are computed block by
            block, in forward and in backward.

    Returns:
        (loss_sum, count): 0-dim fp32 τ²·Σ divergence over masked tokens, 0-dim long mask.sum().
    """
    if kind not in _KL_KINDS:
        raise ValueError(f"kind {kind!r} is not allowed; allowed: {', '.join(_KL_KINDS)}")
    if temperature <= 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    if chunk_size <= 0:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    if student_hidden.shape[:2] != mask.shape or teacher_hidden.shape[:2] != mask.shape:
        raise ValueError(f"student hidden {tuple(student_hidden.shape)}, teacher hidden "
                         f"{tuple(teacher_hidden.shape)} and mask {tuple(mask.shape)} disagree on (B, T)")
    if student_weight.shape[0] != teacher_weight.shape[0]:
        raise ValueError(f"student and teacher vocabularies differ: {student_weight.shape[0]} vs "
                         f"{teacher_weight.shape[0]}")
    mask = mask.bool()
    index = mask.reshape(-1).nonzero().squeeze(1)  # (n,)
    dtype = _compute_dtype(student_hidden)
    with torch.autocast(student_hidden.device.type, enabled=False):  # dtypes are chosen explicitly inside
        loss = _ChunkedLogitsKL.apply(
            student_hidden.reshape(-1, student_hidden.shape[-1]),  # (B·T, H)
            student_weight,
            teacher_hidden.detach().reshape(-1, teacher_hidden.shape[-1]),  # (B·T, H_t)
            teacher_weight.detach(),
            index,
            kind,
            float(temperature),
            chunk_size,
            dtype,
        )
    return loss, mask.sum()


# ---------------------------------------------------------------------------------------------------
# Hidden-state distillation
# ---------------------------------------------------------------------------------------------------


def hidden_cosine_loss(
    student_states: list[torch.Tensor] | tuple[torch.Tensor, ...],
    teacher_states: list[torch.Tensor] | tuple[torch.Tensor, ...],
    mask: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed (1 − cosine) between student and teacher hidden states over layers and masked tokens.

    LongReD Eq. 2 (L_short) and Eq. 3 (L_s2l): L = Σ_l (1 − mean_tokens cos(H_l^student, H_l^teacher)).
    Returning the sum over layers and tokens with count = number of masked tokens gives exactly that
    after the trainer's division. Computed in fp32.

    Args:
        student_states: one (B, T, H) tensor per distilled layer.
        teacher_states: the matching (B, T, H) teacher tensors (no grad).
        mask: (B, T) bool, True at the positions that carry loss.

    Returns:
        (loss_sum, count): 0-dim fp32 Σ_l Σ_tokens (1 − cos), 0-dim long mask.sum().
    """
    if len(student_states) != len(teacher_states) or not student_states:
        raise ValueError(f"need the same non-zero number of student and teacher layers, got "
                         f"{len(student_states)} and {len(teacher_states)}")
    mask = mask.bool()
    total = torch.zeros((), dtype=torch.float32, device=student_states[0].device)
    for h_s, h_t in zip(student_states, teacher_states):
        if h_s.shape != h_t.shape or h_s.shape[:2] != mask.shape:
            raise ValueError(f"student {tuple(h_s.shape)}, teacher {tuple(h_t.shape)} and mask "
                             f"{tuple(mask.shape)} shapes disagree")
        cos = F.cosine_similarity(h_s[mask].float(), h_t.detach()[mask].float(), dim=-1)  # (n,)
        total = total + (1.0 - cos).sum()
    return total, mask.sum()


# ---------------------------------------------------------------------------------------------------
# Hybrid expansion: alignment of the trainable copies with their frozen originals
# ---------------------------------------------------------------------------------------------------


def alignment_loss(
    pairs: list[tuple[torch.Tensor, torch.Tensor]],
    mask: torch.Tensor,
    kind: str = "cosine",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Control LLM's alignment: D(h_p, h_e) per masked token, averaged over the expanded blocks, summed over
    tokens (the trainer divides by the global token count, so the objective is the per-token mean).

    Both branches keep their gradients: h_e pulls its copy, h_p reaches the blocks before it through their
    shared input. Computed in fp32.

    Args:
        pairs: (h_p, h_e) per expanded block, each (B, T, H) (or (1, B·T, H), viewed as the mask's shape).
        mask: (B, T) bool, True at the tokens that carry loss.
        kind: cosine (1 − cos) or mse (mean over the hidden size of the squared difference).

    Returns:
        (loss_sum, count): 0-dim fp32 Σ_tokens mean_blocks D, 0-dim long mask.sum().
    """
    if not pairs:
        raise ValueError("alignment needs at least one expanded block")
    if kind not in ("cosine", "mse"):
        raise ValueError(f"alignment kind {kind!r}; allowed: 'cosine', 'mse'")
    mask = mask.bool()
    B, T = mask.shape
    total = torch.zeros((), dtype=torch.float32, device=pairs[0][0].device)
    for h_p, h_e in pairs:
        h_p, h_e = h_p.reshape(B, T, -1)[mask].float(), h_e.reshape(B, T, -1)[mask].float()  # (n, H)
        if kind == "cosine":
            d = 1.0 - F.cosine_similarity(h_p, h_e, dim=-1)
        else:
            d = (h_p - h_e).pow(2).mean(dim=-1)
        total = total + d.sum()
    return total / len(pairs), mask.sum()
