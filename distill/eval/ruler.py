"""RULER-style synthetic long-context tasks, offline (after Hsieh et al. 2024, "RULER: What's the Real Context
Size of Your Long-Context Language Models?"), written here over any local haystack text and scored by greedy
generation, for any Hugging Face causal LM:

- `niah_single`: one "special magic number" for a key hidden in the haystack; asked for it;
- `niah_multikey`: four needles with different keys; asked for one (the others are distractors);
- `niah_multivalue`: four values for the same key; asked for all of them;
- `niah_multiquery`: four needles with different keys; asked for two of them at once;
- `variable_tracking`: a chain `VAR A = 12345`, `VAR B = VAR A`, ... spread over the haystack; asked for every
  variable holding the value;
- `common_words`: a numbered list of words where a few words repeat many times; asked for those.
A task's score is the fraction of its expected strings found in the generated text (RULER's "string match"),
averaged over prompts. Prompts are exactly `length` tokens of context plus the question, deterministic in the
seed. With network access, lm-evaluation-harness's `ruler` tasks are the standard implementation.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

import numpy as np
import torch

from distill.eval.common import autocast_for, eval_mode, model_device

TASKS = ("niah_single", "niah_multikey", "niah_multivalue", "niah_multiquery", "variable_tracking",
         "common_words")

WORDS = ("apple", "river", "candle", "marble", "garden", "violet", "anchor", "falcon", "meadow", "lantern",
         "copper", "harbor", "pepper", "saddle", "timber", "velvet", "walnut", "cobalt", "ember", "glacier",
         "hollow", "island", "jasper", "kettle", "lemon", "mosaic", "nectar", "orchid", "pebble", "quartz",
         "raven", "spruce", "tulip", "umber", "willow", "yonder", "zephyr", "bramble", "cinder", "dune")
"""Keys, variable names and list words: common English words that tokenize the same in any context."""

NEEDLE = "One of the special magic numbers for {key} is: {value}."
QUESTION_ONE = "What is the special magic number for {key} mentioned in the provided text? The special " \
               "magic number for {key} mentioned in the provided text is"
QUESTION_ALL = "What are all the special magic numbers for {key} mentioned in the provided text? The " \
               "special magic numbers for {key} mentioned in the provided text are"
QUESTION_MANY = "What are all the special magic numbers for {keys} mentioned in the provided text? The " \
                "special magic numbers for {keys} mentioned in the provided text are"
VARIABLE_QUESTION = "Find all variables that are assigned the value {value} in the text above. Answer: " \
                    "According to the chain of variable assignments in the text above, {n} variables are " \
                    "assigned the value {value}, they are:"
WORDS_QUESTION = "What are the {n} most common words in the list above? Answer: The top {n} words that " \
                 "appear most often in the list are:"


def _value(rng: random.Random) -> str:
    return str(rng.randint(1_000_000, 9_999_999))


def _encode(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def _insert(tokenizer, filler: np.ndarray, budget: int, pieces: list[str], rng: random.Random) -> list[int]:
    """`budget` tokens of haystack (a random contiguous slice of `filler`, wrapped) with each piece inserted
    on a line of its own at evenly spread depths (10%..90%, in the given order)."""
    encoded = [_encode(tokenizer, "\n" + p + "\n") for p in pieces]
    room = budget - sum(len(e) for e in encoded)
    if room < 0:
        raise ValueError(f"a context of {budget} tokens cannot hold the task's {len(pieces)} statements")
    offset = rng.randrange(filler.size)
    hay = np.take(filler, np.arange(offset, offset + room), mode="wrap").tolist()
    depths = [0.1 + 0.8 * i / max(1, len(pieces) - 1) for i in range(len(pieces))] if len(pieces) > 1 \
        else [rng.uniform(0.1, 0.9)]
    out, last = [], 0
    for depth, piece in zip(depths, encoded):
        at = round(depth * room)
        out += hay[last:at] + piece
        last = at
    return out + hay[last:]


def make_prompt(task: str, tokenizer, filler, length: int, rng: random.Random) -> tuple[list[int], list[str]]:
    """(prompt token ids, expected answer strings) of one `task` prompt with `length` tokens of context.

    Raises:
        ValueError: an unknown task, or a context too short for the task's statements.
    """
    filler = np.asarray(filler, dtype=np.int64).reshape(-1)
    keys = rng.sample(WORDS, 4)
    if task == "common_words":
        return _common_words(tokenizer, length, rng)
    if task == "variable_tracking":
        value = str(rng.randint(10_000, 99_999))
        names = [w.upper() for w in rng.sample(WORDS, 4)]
        chain = [f"VAR {names[0]} = {value}"] + [f"VAR {b} = VAR {a}" for a, b in zip(names, names[1:])]
        question, answers = VARIABLE_QUESTION.format(value=value, n=len(names)), names
        pieces = chain
    elif task == "niah_single":
        value = _value(rng)
        pieces, question, answers = [NEEDLE.format(key=keys[0], value=value)], \
            QUESTION_ONE.format(key=keys[0]), [value]
    elif task == "niah_multikey":
        values = [_value(rng) for _ in keys]
        pieces = [NEEDLE.format(key=k, value=v) for k, v in zip(keys, values)]
        target = rng.randrange(len(keys))
        question, answers = QUESTION_ONE.format(key=keys[target]), [values[target]]
    elif task == "niah_multivalue":
        values = [_value(rng) for _ in range(4)]
        pieces = [NEEDLE.format(key=keys[0], value=v) for v in values]
        question, answers = QUESTION_ALL.format(key=keys[0]), values
    elif task == "niah_multiquery":
        values = [_value(rng) for _ in keys]
        pieces = [NEEDLE.format(key=k, value=v) for k, v in zip(keys, values)]
        asked = sorted(rng.sample(range(len(keys)), 2))
        question = QUESTION_MANY.format(keys=" and ".join(keys[i] for i in asked))
        answers = [values[i] for i in asked]
    else:
        raise ValueError(f"unknown task {task!r}; tasks: {', '.join(TASKS)}")
    question_ids = _encode(tokenizer, "\n" + question)
    context = _insert(tokenizer, filler, length - len(question_ids), pieces, rng)
    return context + question_ids, answers


def _common_words(tokenizer, length: int, rng: random.Random) -> tuple[list[int], list[str]]:
    """A numbered word list of about `length` tokens: 5 common words repeated many times, the rest once or
    twice; the question asks for the 5 common ones."""
    common = rng.sample(WORDS, 5)
    rare = [w for w in WORDS if w not in common]
    question_ids = _encode(tokenizer, "\n" + WORDS_QUESTION.format(n=len(common)))
    budget = length - len(question_ids)
    per_item = len(_encode(tokenizer, "\n99. candle"))
    slots = max(len(common), budget // per_item)
    items = [common[i % len(common)] for i in range(slots // 2)]
    items += [rare[rng.randrange(len(rare))] for _ in range(slots - len(items))]
    rng.shuffle(items)
    ids: list[int] = []
    for i, word in enumerate(items):
        line = _encode(tokenizer, f"\n{i + 1}. {word}")
        if len(ids) + len(line) > budget:
            break
        ids += line
    return ids + question_ids, common


def score(text: str, answers: Sequence[str]) -> float:
    """RULER's string match: the fraction of expected strings found in the generated text."""
    lowered = text.lower()
    return sum(a.lower() in lowered for a in answers) / len(answers)


@torch.no_grad()
def generate(model, prompt: list[int], max_new_tokens: int) -> list[int]:
    """Greedy continuation of `prompt` with a KV cache, in the precision evaluation uses."""
    device = model_device(model)
    ids = torch.tensor([prompt], device=device)
    with eval_mode(model), autocast_for(device, model):
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                             max_new_tokens=max_new_tokens, do_sample=False, use_cache=True,
                             pad_token_id=model.config.eos_token_id or 0)
    return out[0, len(prompt):].tolist()


def ruler_suite(model, tokenizer, filler, lengths: Sequence[int] = (1024,), samples: int = 4,
                tasks: Sequence[str] = TASKS, seed: int = 0, max_new_tokens: int = 48) -> dict:
    """Every task at every length: {"<task>/<length>": score, "<task>": mean over lengths, "ruler_mean"}."""
    figures: dict[str, float] = {}
    for task in tasks:
        per_length = []
        for length in lengths:
            scores = []
            for k in range(samples):
                rng = random.Random(f"ruler/{seed}/{task}/{length}/{k}")
                prompt, answers = make_prompt(task, tokenizer, filler, int(length), rng)
                text = tokenizer.decode(generate(model, prompt, max_new_tokens), skip_special_tokens=True)
                scores.append(score(text, answers))
            figures[f"{task}/{length}"] = float(np.mean(scores))
            per_length.append(figures[f"{task}/{length}"])
        figures[task] = float(np.mean(per_length))
    figures["ruler_mean"] = float(np.mean([figures[t] for t in tasks]))
    return figures
