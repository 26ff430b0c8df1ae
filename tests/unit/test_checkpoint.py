"""Checkpoints through a strategy: the training state in one object, tied embeddings, the round trip."""

import os

import pytest
import torch
from transformers import AutoModelForCausalLM

from distill.config import OptimConfig
from distill.data.mixture import Mixture, StreamPlan
from distill.parallel.replicated import Replicated
from distill.testing import tiny_config
from distill.train import checkpoint as ckpt


class _OneProcess:
    rank, world, is_main = 0, 1, True
    device = torch.device("cpu")

    def barrier(self):
        pass

    def any(self, flag: bool) -> bool:
        return bool(flag)


def _model(tied: bool):
    torch.manual_seed(0)
    config = tiny_config(vocab_size=97, hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=1)
    config.tie_word_embeddings = tied
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32)


def _state():
    return ckpt.TrainState(Mixture([StreamPlan("long", 10, 8, 1, 1.0)], 16, seed=3))


@pytest.mark.parametrize("tied", [False, True])
def test_save_and_restore_round_trip(tmp_path, tied):
    """Weights (tied ones included: safetensors refuses shared memory), AdamW state and the training state
    come back exactly; the state is one object with state_dict / load_state_dict."""
    model = _model(tied)
    assert (model.lm_head.weight is model.model.embed_tokens.weight) == tied
    strategy = Replicated(_OneProcess())
    strategy.setup(model, None, OptimConfig(lr=1e-2), torch.float32)
    model(input_ids=torch.randint(0, 97, (2, 8)), labels=torch.randint(0, 97, (2, 8))).loss.backward()
    strategy.step()
    state = _state()
    state.mixture.plan(0)  # advance the data cursor
    state.step, state.tokens, state.nonfinite_total, state.skipped_rows = 1, 16, 2, 5
    state.wandb_id, state.lr = "abc123", 0.01
    path = ckpt.save(str(tmp_path / "checkpoints"), 1, strategy, state, _OneProcess())
    assert ckpt.verify(path) is None and os.path.basename(path) == "step-1"

    again = _model(tied)
    assert not torch.equal(again.model.layers[0].mlp.up_proj.weight, model.model.layers[0].mlp.up_proj.weight)
    ckpt.load_weights(path, again)
    for key, value in model.state_dict().items():
        assert torch.equal(again.state_dict()[key], value), key
    assert (again.lm_head.weight is again.model.embed_tokens.weight) == tied  # the tie survives
    resumed, restored = Replicated(_OneProcess()), _state()
    resumed.setup(again, None, OptimConfig(lr=1e-2), torch.float32)
    ckpt.restore(path, resumed, restored, rank=0)
    assert restored.state_dict() == state.state_dict()
    a, b = strategy.optimizer.state_dict(), resumed.optimizer.state_dict()
    assert a["state"].keys() == b["state"].keys() and len(a["state"]) > 0
    assert all(torch.equal(a["state"][i][k], b["state"][i][k]) for i in a["state"] for k in a["state"][i])


def test_weights_of_another_model_are_one_line(tmp_path):
    model = _model(False)
    strategy = Replicated(_OneProcess())
    strategy.setup(model, None, OptimConfig(), torch.float32)
    path = ckpt.save(str(tmp_path / "checkpoints"), 1, strategy, _state(), _OneProcess())
    config = tiny_config(vocab_size=97, hidden_size=32, num_layers=2, num_heads=2, num_kv_heads=1)
    deeper = AutoModelForCausalLM.from_config(config)
    with pytest.raises(ckpt.CheckpointError, match=r"step-1: the weights of another model \(.*layers\.1"):
        ckpt.load_weights(path, deeper)
