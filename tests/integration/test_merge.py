"""scripts/merge.py against the formulas on tiny models: several shards, tied and untied embeddings, GQA,
bf16, each bad input refused in one line; outputs load with AutoModelForCausalLM with the right config and
tokenizer."""

import json
import os
import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from distill.testing import tiny_config, train_tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCRIPT = os.path.join(ROOT, "scripts", "merge.py")


def _save(path, tokenizer_dir, seed: int, tied: bool = False, dtype=torch.float32, rope_theta: float = 1e4,
          shard: str = "60KB", **config_kwargs):
    """A tiny Llama (GQA: 4 heads, 2 KV heads) saved in several safetensors shards, with a tokenizer."""
    config = tiny_config(vocab_size=len(AutoTokenizer.from_pretrained(tokenizer_dir)), hidden_size=32,
                         num_layers=3, num_heads=4, num_kv_heads=2, rope_theta=rope_theta, **config_kwargs)
    config.tie_word_embeddings = tied
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.save_pretrained(path, max_shard_size=shard)
    AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(path)
    return str(path)


def _state(path):
    return {k: v for k, v in AutoModelForCausalLM.from_pretrained(path).state_dict().items()}


def _run(*args):
    return subprocess.run([sys.executable, SCRIPT, *args, "--quiet"], capture_output=True, text=True,
                          cwd=ROOT, env={**os.environ, "PYTHONPATH": ROOT}, timeout=300, check=False)


@pytest.mark.parametrize("tied", [False, True])
def test_interpolate_matches_the_formula(tmp_path, tokenizer_dir, tied):
    original = _save(tmp_path / "original", tokenizer_dir, 0, tied)
    extended = _save(tmp_path / "extended", tokenizer_dir, 1, tied, rope_theta=1.6e5)
    assert len([n for n in os.listdir(extended) if n.endswith(".safetensors")]) > 1  # sharded
    proc = _run("interpolate", "--original", original, "--extended", extended, "--alpha", "0", "0.3", "1",
                "--out", str(tmp_path / "sweep"))
    assert proc.returncode == 0, proc.stderr
    a, b = _state(original), _state(extended)
    for alpha in (0.0, 0.3, 1.0):
        out = tmp_path / "sweep" / f"alpha-{alpha:g}"
        merged = AutoModelForCausalLM.from_pretrained(out)
        assert merged.config.rope_parameters["rope_theta"] == 1.6e5  # the extended RoPE
        assert (merged.lm_head.weight is merged.model.embed_tokens.weight) == tied
        for name, value in merged.state_dict().items():
            torch.testing.assert_close(value, (1 - alpha) * a[name] + alpha * b[name], rtol=1e-6, atol=1e-7)
        assert len(AutoTokenizer.from_pretrained(out)) == len(AutoTokenizer.from_pretrained(extended))
        assert os.path.isfile(out / "model.safetensors.index.json")


def test_residual_matches_the_formula_and_keeps_bf16(tmp_path, tokenizer_dir):
    base = _save(tmp_path / "base", tokenizer_dir, 0, dtype=torch.bfloat16)
    instruct = _save(tmp_path / "instruct", tokenizer_dir, 1, dtype=torch.bfloat16)
    target = _save(tmp_path / "target", tokenizer_dir, 2, dtype=torch.bfloat16, rope_theta=1.6e5)
    (tmp_path / "instruct" / "chat_template.jinja").write_text("{{ messages }}")  # the instruct's own
    proc = _run("residual", "--base", base, "--instruct", instruct, "--target", target, "--scale", "0.5",
                "--out", str(tmp_path / "out"))
    assert proc.returncode == 0, proc.stderr
    out = tmp_path / "out"
    config = json.loads((out / "config.json").read_text())
    assert config["rope_parameters"]["rope_theta"] == 1.6e5 and config["dtype"] == "bfloat16"
    assert (out / "chat_template.jinja").read_text() == "{{ messages }}"
    merged = AutoModelForCausalLM.from_pretrained(out)
    b, i, t = (AutoModelForCausalLM.from_pretrained(p, dtype=torch.float32).state_dict()
               for p in (base, instruct, target))
    for name, value in merged.state_dict().items():
        assert value.dtype == torch.bfloat16
        want = (t[name] + 0.5 * (i[name] - b[name])).to(torch.bfloat16)
        torch.testing.assert_close(value, want, rtol=0, atol=0)


def test_bad_inputs_are_one_line(tmp_path, tokenizer_dir):
    good = _save(tmp_path / "good", tokenizer_dir, 0)
    wider = tmp_path / "wider"
    config = tiny_config(vocab_size=len(AutoTokenizer.from_pretrained(tokenizer_dir)), hidden_size=48,
                         num_layers=3, num_heads=4, num_kv_heads=2)
    AutoModelForCausalLM.from_config(config).save_pretrained(wider)
    AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(wider)
    size = len(AutoTokenizer.from_pretrained(tokenizer_dir))
    other_tok = train_tokenizer(str(tmp_path / "tok2"), vocab_size=size, max_sentences=3000, seed=5)
    retok = _save(tmp_path / "retok", other_tok, 2)
    cases = [
        (["interpolate", "--original", str(wider), "--extended", good, "--alpha", "0.5"],
         "config hidden_size is 48"),
        (["interpolate", "--original", retok, "--extended", good, "--alpha", "0.5"], "tokenizers disagree"),
        (["interpolate", "--original", str(tmp_path / "nope"), "--extended", good, "--alpha", "0.5"],
         "no such directory"),
        (["interpolate", "--original", good, "--extended", good, "--alpha", "1.5"], "--alpha 1.5"),
        (["residual", "--base", good, "--instruct", str(wider), "--target", good], "config hidden_size"),
    ]
    for args, message in cases:
        proc = _run(*args, "--out", str(tmp_path / "out"))
        lines = [line for line in proc.stderr.splitlines() if line.strip()]
        assert proc.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
        assert message in lines[0] and "Traceback" not in proc.stderr
    assert not (tmp_path / "out").exists()  # nothing written for a refused merge
