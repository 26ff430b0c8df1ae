"""The optimiser the trainer builds: the kernel `optim.implementation` picks, kept across a resume from a
checkpoint written with another kernel (load_state_dict would copy the saved flags)."""

import copy

import pytest
import torch

from distill.config import OptimConfig
from distill.optim.optimizer import keep_kernel, make_optimizer, param_groups


def _model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.LayerNorm(16), torch.nn.Linear(16, 4))


def _step(model, optimizer, seed):
    x = torch.randn(5, 8, generator=torch.Generator().manual_seed(seed))
    model(x).square().mean().backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


@pytest.mark.parametrize("kind, sharded, flags", [
    ("auto", False, {"fused": True}), ("auto", True, {"fused": None}), ("foreach", False, {"foreach": True}),
    ("for_loop", False, {"foreach": False}), ("fused", True, {"fused": True})])
def test_kernel_choice(kind, sharded, flags):
    optimizer = make_optimizer(_model(), OptimConfig(implementation=kind), sharded)
    for key, value in flags.items():
        assert all(g[key] == value for g in optimizer.param_groups)
    assert [g["weight_decay"] for g in optimizer.param_groups] == [0.1, 0.0]  # norms and biases not decayed


def test_resume_from_another_kernel_keeps_ours_and_the_state():
    model = _model()
    old = torch.optim.AdamW(param_groups(model, 0.1), lr=1e-2, foreach=False)  # a checkpoint of the old loop
    for seed in range(3):
        _step(model, old, seed)
    saved = copy.deepcopy(old.state_dict())

    # Reference: carry on with the old kernel.
    ref_model = copy.deepcopy(model)
    ref = torch.optim.AdamW(param_groups(ref_model, 0.1), lr=1e-2, foreach=False)
    ref.load_state_dict(copy.deepcopy(saved))
    _step(ref_model, ref, 3)

    resumed = make_optimizer(model, OptimConfig(lr=1e-2, weight_decay=0.1), sharded=False)
    resumed.load_state_dict(saved)
    assert resumed.param_groups[0]["fused"] is None  # what load_state_dict alone leaves
    keep_kernel(resumed)
    assert all(g["fused"] is True for g in resumed.param_groups)
    assert all(s["step"].dtype == torch.float32 and float(s["step"]) == 3 for s in resumed.state.values())
    _step(model, resumed, 3)
    for a, b in zip(model.parameters(), ref_model.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
