"""distill.parallel.memory: the tiled MLP against the whole MLP (Llama, Qwen2, Mistral), and offloaded
checkpoints
against plain ones, through the real decoder layers of tiny random-init models."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from distill.model.load import enable_checkpointing
from distill.parallel import memory
from distill.testing import tiny_config


def _model(arch, seed=0):
    torch.manual_seed(seed)
    config = tiny_config(arch, vocab_size=300, hidden_size=48, num_layers=2, num_heads=4, num_kv_heads=2,
                         intermediate_size=136)
    config.use_cache = False
    return AutoModelForCausalLM.from_config(config).train()


def _loss_and_grads(model, ids, scope):
    model.zero_grad(set_to_none=True)
    with scope:
        out = model(input_ids=ids, use_cache=False)
        # a loss that weights every position differently, so a misplaced chunk cannot cancel out
        loss = (out.logits.float().log_softmax(-1)[..., 7] * torch.linspace(1, 2, ids.shape[1])).sum()
        loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral"])
@pytest.mark.parametrize("autocast", [False, True])
def test_tiled_mlp_gradients_equal_the_whole_mlp(arch, autocast):
    """The tiled MLP (5 uneven chunks of 37 tokens, inside checkpointed layers, and without checkpointing)
    gives the whole MLP's loss and gradients within float tolerance, for every parameter."""
    ids = torch.randint(0, 300, (2, 37))
    for checkpointing in (False, True):
        model = _model(arch)
        if checkpointing:
            enable_checkpointing(model)
        reference = _loss_and_grads(model, ids, torch.autocast("cpu", enabled=autocast))
        assert memory.install(model, offload=False, tiled=True) == 2
        calls = []
        original = memory.TiledMLP.forward

        def counted(ctx, x, run, chunks, *params):
            calls.append((tuple(x.shape), chunks))
            return original(ctx, x, run, chunks, *params)

        memory.TiledMLP.forward = staticmethod(counted)
        try:
            with memory.scope(offload=False, chunks=5):
                tiled = _loss_and_grads(model, ids, torch.autocast("cpu", enabled=autocast))
        finally:
            memory.TiledMLP.forward = staticmethod(original)
        # every layer tiled, in the forward and (checkpointing) again in the recompute
        assert calls == [((2, 37, 48), 5)] * (4 if checkpointing else 2)
        tol = 2e-2 if autocast else 1e-5
        torch.testing.assert_close(tiled[0], reference[0], rtol=tol, atol=tol)
        assert tiled[1].keys() == reference[1].keys() and len(tiled[1]) == len(list(model.parameters()))
        for name, grad in reference[1].items():
            torch.testing.assert_close(tiled[1][name], grad, rtol=tol, atol=tol * grad.abs().max().item(),
                                       msg=name)
        # outside the scope the MLP runs whole again: bit-identical to the reference
        again = _loss_and_grads(model, ids, torch.autocast("cpu", enabled=autocast))
        assert torch.equal(again[0], reference[0])


def test_offloaded_checkpoints_are_bit_identical_and_hold_the_layer_inputs():
    """Offload on vs off: the same loss and gradients bit for bit; the host buffers hold exactly each
    checkpointed layer's input (layers x B x T x H fp32) during the forward and nothing after backward."""
    ids = torch.randint(0, 300, (2, 37))
    model = _model("llama")
    enable_checkpointing(model)
    reference = _loss_and_grads(model, ids, torch.autocast("cpu", enabled=False))
    memory.install(model, offload=True, tiled=False)
    memory.OFFLOAD.peak_host_bytes = 0
    before = memory.OFFLOAD.host_bytes
    offloaded = _loss_and_grads(model, ids, memory.scope(offload=True, chunks=1))
    assert memory.OFFLOAD.peak_host_bytes - before == 2 * 2 * 37 * 48 * 4
    assert memory.OFFLOAD.host_bytes == before
    assert torch.equal(offloaded[0], reference[0])
    assert offloaded[1].keys() == reference[1].keys()
    for name, grad in reference[1].items():
        assert torch.equal(offloaded[1][name], grad), name
    # outside a scope nothing is offloaded
    memory.OFFLOAD.peak_host_bytes = 0
    _loss_and_grads(model, ids, torch.autocast("cpu", enabled=False))
    assert memory.OFFLOAD.peak_host_bytes == 0


def test_install_refuses_an_uncheckpointed_model_for_offload():
    with pytest.raises(ValueError, match="not checkpointed"):
        memory.install(_model("llama"), offload=True, tiled=False)


def test_checkpointing_under_both_transformers_names(monkeypatch):
    """transformers 5.0 to 5.1x (the GPU images ship 5.17) has only `gradient_checkpointing_enable`; 5.2x
    renamed it `activation_checkpointing_enable`. enable_checkpointing turns checkpointing on under either,
    and nothing else in the project calls one of the names itself (gpu_check part 8 and
    benchmarks/long_context_memory.py did, and died on transformers 5.17)."""
    import pathlib
    import re

    from transformers import PreTrainedModel

    model = _model("llama")
    enable_checkpointing(model)
    assert model.is_gradient_checkpointing
    new = getattr(PreTrainedModel, "activation_checkpointing_enable", None)
    if new is not None:  # 5.2x here: give it 5.1x's API (the old name and its keyword, no new name)
        def old(self, gradient_checkpointing_kwargs=None):
            new(self, activation_checkpointing_kwargs=gradient_checkpointing_kwargs)

        monkeypatch.setattr(PreTrainedModel, "gradient_checkpointing_enable", old)
        monkeypatch.delattr(PreTrainedModel, "activation_checkpointing_enable")
    model = _model("llama")
    assert not hasattr(model, "activation_checkpointing_enable")
    enable_checkpointing(model)
    assert model.is_gradient_checkpointing
    root = pathlib.Path(__file__).resolve().parents[2]
    direct = [f"{p.relative_to(root)}:{i}" for folder in ("distill", "benchmarks", "scripts", "tests")
              for p in sorted((root / folder).rglob("*.py")) if p.name != "test_memory.py"
              for i, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1)
              if re.search(r"\.(activation|gradient)_checkpointing_enable\(", line)
              and p.relative_to(root).as_posix() != "distill/model/load.py"]
    assert direct == []
