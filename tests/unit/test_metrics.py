"""FLOP accounting behind the logged tflops_per_s / MFU: parameter counts against a hand count of the
architecture, the formulas, the peak lookup; and the console line."""

import pytest
import torch

from distill.model.flops import flop_counts, peak_tflops, teacher_flops_per_token, train_flops_per_token
from distill.testing import tiny_config
from distill.train.metrics import console_line


def _model(tied=False):
    from transformers import AutoModelForCausalLM

    config = tiny_config("llama", vocab_size=1000, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                         intermediate_size=160)
    config.tie_word_embeddings = tied
    return AutoModelForCausalLM.from_config(config)


@pytest.mark.parametrize("tied", [False, True])
def test_counts_match_a_hand_count(tied):
    d, V, L, inter, kv = 64, 1000, 2, 160, 2 * 16  # kv width = kv heads x head dim
    per_layer = d * d + 2 * d * kv + d * d + 3 * d * inter + 2 * d  # q, k, v, o, MLP, two norms
    counts = flop_counts(_model(tied))
    assert counts["N_layers"] == L * per_layer
    assert counts["N"] == L * per_layer + d + V * d  # + final norm + lm_head (a matmul, tied or not)
    assert (counts["L"], counts["d"], counts["V"]) == (L, d, V)


def test_formulas():
    counts = {"L": 2.0, "d": 64.0, "V": 1000.0, "N_layers": 100.0, "N": 100000.0}
    assert train_flops_per_token(counts, 512) == 6 * 100000 + 12 * 2 * 64 * 512
    assert train_flops_per_token(counts, 512, logits=False) == 6 * (100000 - 64 * 1000) + 12 * 2 * 64 * 512
    # a teacher run to 1 of 2 layers without logits: half the layers' matmuls and attention, forward only
    assert teacher_flops_per_token(counts, 256, 1, False) == 2 * 100 / 2 + 4 * 1 * 64 * 256
    assert teacher_flops_per_token(counts, 256, 2, True) == 2 * 100 + 2 * 64 * 1000 + 4 * 2 * 64 * 256


def test_peak_lookup():
    assert peak_tflops("cpu") is None  # no MFU on a CPU unless configured
    assert peak_tflops("cpu", 123) == 123.0
    if torch.cuda.is_available():
        assert peak_tflops("cuda") is None or peak_tflops("cuda") > 0


def test_console_line_shows_mfu_when_known():
    record = {"step": 3, "loss": 1.5, "loss/long/lm": 1.5, "lr": 1e-4, "grad_norm": 0.5,
              "tokens_per_s": 1000.0}
    assert "mfu" not in console_line(record)
    assert console_line({**record, "mfu": 0.4213}).endswith("mfu 42.1%")
