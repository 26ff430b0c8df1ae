"""Passkey retrieval (needle in a haystack): prompts built from held-out filler, scored by the answer's
likelihood or greedy decoding, accuracy by length and depth, and the heat-map plot."""

from __future__ import annotations

import os
import random
from collections.abc import Sequence

import numpy as np
import torch

from distill.data.dataset import DataError
from distill.eval import common

PASSKEY_DIGITS = 5


# The retrieval statements, as one line each inside code: the needle states a key, the look-up repeats the
# needle's own words so the answer follows the same tokens in both (scripts/demo.py writes its training
# corpus with these templates, so the evaluation asks in the form the model has seen).
PASSKEY_NEEDLE = "PASSKEY = {key}"


PASSKEY_LOOKUP = "assert PASSKEY == {key}"


PASSKEY_TEMPLATES = {
    "code": (PASSKEY_NEEDLE, PASSKEY_LOOKUP, "PASSKEY"),
    # The classic passkey task (Mohtashami & Jaggi 2023), for pretrained language models (docs/real_model.md).
    "text": ("The pass key is {key}. Remember it. {key} is the pass key.",
             "What is the pass key? The pass key is {key}", "pass key"),
}
"""(needle, look-up, the key's name) per passkey template: "code" (the demo's corpus states and looks up
keys in this form), "text" (natural language)."""


def random_key(rng: random.Random) -> str:
    """A passkey: `PASSKEY_DIGITS` random digits."""
    return str(rng.randint(10 ** (PASSKEY_DIGITS - 1), 10 ** PASSKEY_DIGITS - 1))


def _encode(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def _encode_inline(tokenizer, text: str) -> list[int]:
    """Token ids of `text` ("\n..."), as it tokenizes in the middle of a document: without the leading
    piece a sentencepiece tokenizer puts before text it encodes on its own (its "dummy prefix")."""
    if not text.startswith("\n"):
        raise ValueError(f"inline text must start with a newline, got {text!r}")
    ids = _encode(tokenizer, text)
    newline = _encode(tokenizer, "\n")  # [newline] or [dummy prefix, newline]
    lead = newline[:-1]
    if lead and ids[: len(lead)] == lead:
        ids = ids[len(lead):]
    return ids


PASSKEY_MARK = PASSKEY_NEEDLE.split(" ")[0]
"""The key's name, in both the statement and the look-up."""


def _without_key_lines(tokenizer, ids: np.ndarray, mark: str = PASSKEY_MARK) -> np.ndarray:
    """A document's ids with the lines mentioning `mark` dropped (unchanged when there is none); a
    special token closing the document (its separator) is kept."""
    special = set(tokenizer.all_special_ids)
    tail = [int(ids[-1])] if len(ids) and int(ids[-1]) in special else []
    body = ids[: len(ids) - len(tail)].tolist()
    text = tokenizer.decode(body, skip_special_tokens=True)
    if mark not in text:
        return ids
    kept = "\n".join(line for line in text.split("\n") if mark not in line)
    return np.asarray(_encode(tokenizer, kept) + tail, dtype=np.int64)  # as the builder encodes a document


def filler_from_stream(stream, max_rows: int = 16, max_tokens: int = 1 << 20, tokenizer=None,
                       mark: str = PASSKEY_MARK) -> np.ndarray:
    """Filler text for passkey prompts: the real (non-padding) tokens of the first rows of a held-out stream,
    joined (documents keep the separators the builder put between them).

    With `tokenizer`, every line of a document that mentions the key's name (`PASSKEY_MARK`: the key
    statements and look-ups of a corpus like the demo's) is dropped, the rest of that document re-encoded:
    such lines would put other keys in a prompt beside its needle (the demo's held-out long rows hold about
    one per 900 tokens).
    """
    stream = common.open_stream(stream)
    parts, total = [], 0
    for i in range(min(max_rows, len(stream))):
        for doc in stream.documents(i):
            ids = np.asarray(doc, dtype=np.int64)
            if tokenizer is not None:
                ids = _without_key_lines(tokenizer, ids, mark)
            parts.append(ids)
            total += len(ids)
        if total >= max_tokens:
            break
    if total == 0:
        raise DataError(f"{stream.path}: no tokens to use as passkey filler")
    return np.concatenate(parts)[:max_tokens]


def passkey_prompts(tokenizer, filler_ids, context_length: int, depth: float,
                    rng: random.Random | int, template: str = "code") -> tuple[list[int], list[int]]:
    """One passkey prompt: a key statement at a relative depth inside filler, then the question.

    Layout (code-like, since the demo models are trained on Python code):
        <filler ...> \\nPASSKEY = 48213\\n <filler ...> \\nassert PASSKEY ==   → answer " 48213"
    The filler is a contiguous slice of `filler_ids` (wrapped around when too short) starting at a random
    offset; the key is `PASSKEY_DIGITS` random digits. The needle's first token sits at filler index
    round(depth · filler_budget), so depth 0 puts it at the very start, 1 right before the question.

    Args:
        filler_ids: 1-D token ids of held-out text.
        context_length: exact prompt length in tokens (the answer follows it).
        depth: relative position of the needle in [0, 1].
        rng: a `random.Random` (or an int seed): the same state gives the same prompt.
        template: a key of `PASSKEY_TEMPLATES` (the needle and the look-up).

    Returns:
        (prompt_ids, answer_ids): len(prompt_ids) == context_length.
    """
    if not 0.0 <= float(depth) <= 1.0:
        raise ValueError(f"depth {depth} must be in [0, 1]")
    if not isinstance(rng, random.Random):
        rng = random.Random(rng)
    filler = np.asarray(filler_ids, dtype=np.int64).reshape(-1)
    if filler.size == 0:
        raise ValueError("filler_ids is empty")
    key = random_key(rng)
    needle_text, lookup_text, _ = PASSKEY_TEMPLATES[template]
    needle = _encode_inline(tokenizer, "\n" + needle_text.format(key=key) + "\n")
    question_text = "\n" + lookup_text.split("{key}")[0].rstrip(" ")
    question = _encode_inline(tokenizer, question_text)
    full = _encode_inline(tokenizer, "\n" + lookup_text.format(key=key))
    # Tokenizers may merge the space with the first digit: split where the question's own encoding stops
    # agreeing with the encoding of question + answer, so the answer is exactly what the model should emit.
    common = 0
    while common < min(len(question), len(full)) and question[common] == full[common]:
        common += 1
    question, answer = full[:common], full[common:]
    if not answer:
        raise ValueError(f"tokenizer produced no answer tokens for key {key}")
    budget = int(context_length) - len(needle) - len(question)
    if budget < 0:
        raise ValueError(f"context_length {context_length} is shorter than the needle and question "
                         f"({len(needle) + len(question)} tokens)")
    offset = rng.randrange(filler.size)
    take = np.take(filler, np.arange(offset, offset + budget), mode="wrap").tolist()
    at = round(float(depth) * budget)
    prompt = take[:at] + needle + take[at:] + question
    assert len(prompt) == context_length
    return prompt, answer


def _prompt_rng(seed: int, length: int, depth: float, sample: int) -> random.Random:
    # A string seed is hashed deterministically (sha512), independent of PYTHONHASHSEED and of the grid.
    return random.Random(f"passkey/{seed}/{length}/{float(depth)!r}/{sample}")


@torch.no_grad()
def _score_answers(model, prompts: list[list[int]],
                   answers: list[list[int]]) -> tuple[list[bool], list[float]]:
    """Exact greedy match and mean answer log-prob for same-length prompts (one forward per batch)."""
    device = common.model_device(model)
    weight, bias = common.lm_head_of(model)
    seqs = [p + a for p, a in zip(prompts, answers)]
    width = max(len(s) for s in seqs)
    ids = torch.zeros((len(seqs), width), dtype=torch.long)
    for r, s in enumerate(seqs):
        ids[r, : len(s)] = torch.tensor(s)
    ids = ids.to(device)
    pos = torch.arange(width, device=device)[None].expand(len(seqs), -1)  # (B, T): one document per row
    final = common.final_hidden(model, ids, pos)  # (B, T, H)
    hits, logps = [], []
    with common.exact_fp32(device):
        for r, (p, a) in enumerate(zip(prompts, answers)):
            h, l_ = _score_one(final[r], p, a, weight, bias)
            hits.append(h)
            logps.append(l_)
    return hits, logps


def _score_one(final: torch.Tensor, prompt: list[int], answer: list[int], weight, bias) -> tuple[bool, float]:
    """(exact match, mean log-prob) of `answer` from one row's final hidden states (T, H)."""
    # (n, H): the states predicting the answer
    h = final[len(prompt) - 1: len(prompt) - 1 + len(answer)].float()
    logits = h @ weight.float().t()  # (n, V)
    if bias is not None:
        logits += bias.float()
    target = torch.tensor(answer, device=final.device)  # (n,)
    logp = torch.log_softmax(logits, dim=-1).gather(1, target[:, None]).squeeze(1)  # (n,)
    return bool((logits.argmax(-1) == target).all().item()), logp.mean().item()


@torch.no_grad()
def greedy_decode(model, prompt_ids: list[int], max_new_tokens: int) -> list[int]:
    """Plain greedy decoding with full forwards (no KV cache): the reference for `passkey_accuracy`."""
    device = common.model_device(model)
    weight, bias = common.lm_head_of(model)
    seq = list(prompt_ids)
    with common.eval_mode(model), common.autocast_for(device, model):
        for _ in range(max_new_tokens):
            ids = torch.tensor([seq], device=device)
            pos = torch.arange(len(seq), device=device)[None]
            h = common.final_hidden(model, ids, pos)[0, -1].float()  # (H,)
            logits = h @ weight.float().t() + (bias.float() if bias is not None else 0.0)  # (V,)
            seq.append(int(logits.argmax().item()))
    return seq[len(prompt_ids):]


def passkey_accuracy(model, tokenizer, filler_ids, lengths: Sequence[int] = (256,),
                     depths: Sequence[float] = (0.0, 0.5, 1.0), samples: int = 4, seed: int = 0,
                     batch_size: int = 4, template: str = "code") -> dict:
    """Passkey retrieval accuracy per (context length, depth) and overall.

    Exact match under greedy decoding is scored with one teacher-forced forward over prompt + answer: greedy
    decoding reproduces the answer exactly iff, at every answer step, the argmax given the correct prefix is
    the correct token — which is what is checked (identical to a decode loop, `greedy_decode`, and one forward
    instead of len(answer)). The mean per-token log-prob of the answer is the softer signal.

    Returns:
        {"lengths", "depths", "samples", "accuracy" (overall), "logprob" (overall mean),
         "grid_accuracy" / "grid_logprob" (len(lengths) × len(depths) lists),
         "by_length": {str(length): accuracy}}.
    """
    lengths, depths = [int(n) for n in lengths], [float(d) for d in depths]
    device = common.model_device(model)
    acc = np.zeros((len(lengths), len(depths)))
    lp = np.zeros((len(lengths), len(depths)))
    with common.eval_mode(model), common.autocast_for(device, model):
        for i, length in enumerate(lengths):
            for j, depth in enumerate(depths):
                cases = [passkey_prompts(tokenizer, filler_ids, length, depth,
                                         _prompt_rng(seed, length, depth, k), template)
                         for k in range(samples)]
                hits, logps = [], []
                for start in range(0, len(cases), batch_size):
                    part = cases[start: start + batch_size]
                    h, l_ = _score_answers(model, [c[0] for c in part], [c[1] for c in part])
                    hits += h
                    logps += l_
                acc[i, j] = float(np.mean(hits)) if hits else float("nan")
                lp[i, j] = float(np.mean(logps)) if logps else float("nan")
    return {"lengths": lengths, "depths": depths, "samples": int(samples),
            "accuracy": float(acc.mean()), "logprob": float(lp.mean()),
            "grid_accuracy": acc.tolist(), "grid_logprob": lp.tolist(),
            "by_length": {str(n): float(acc[i].mean()) for i, n in enumerate(lengths)}}


def needle_grid(model, tokenizer, filler_ids, lengths: Sequence[int], depths: Sequence[float],
                samples: int = 4, seed: int = 0, path: str | None = None, title: str = "passkey retrieval",
                batch_size: int = 4, template: str = "code") -> dict:
    """`passkey_accuracy` over context length × depth, plus a heatmap PNG at `path` when given."""
    grid = passkey_accuracy(model, tokenizer, filler_ids, lengths, depths, samples, seed, batch_size,
                            template)
    if path is not None:
        plot_needle_heatmap(grid, path, title=title)
    return grid


def plot_needle_heatmap(grid: dict, path: str, title: str = "passkey retrieval") -> str:
    """Accuracy heatmap: depth (rows) × context length (columns), values annotated."""
    plt = common.pyplot()
    acc = np.asarray(grid["grid_accuracy"], dtype=float).T  # (depths, lengths)
    fig, ax = plt.subplots(figsize=(1.2 + 0.9 * acc.shape[1], 1.2 + 0.6 * acc.shape[0]))
    im = ax.imshow(acc, vmin=0.0, vmax=1.0, cmap="RdYlGn", aspect="auto")
    ax.set_xticks(range(len(grid["lengths"])), [str(n) for n in grid["lengths"]])
    ax.set_yticks(range(len(grid["depths"])), [f"{d:g}" for d in grid["depths"]])
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel("needle depth")
    for (r, c), v in np.ndenumerate(acc):
        ax.text(c, r, f"{v:.2f}", ha="center", va="center", fontsize=8)
    ax.set_title(f"{title} (n={grid.get('samples', '?')})")
    fig.colorbar(im, ax=ax, label="accuracy")
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
