"""Hybrid expansion (distill.model.expansion) on tiny random-init models of every supported architecture:
identity at step 0, the hidden states transformers records, the interpolations, folding, the alignment loss,
and per-part gradient grouping (distill.optim.localise)."""

import copy

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM

from distill.config import AlignmentConfig, ConfigError, ExpansionConfig
from distill.model import expansion
from distill.model.objectives import alignment_loss
from distill.optim.localise import grad_groups, layer_norms, layer_plan, part_of
from distill.testing import ARCHITECTURES, tiny_config


def _model(arch="llama", layers=4, seed=0):
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(tiny_config(arch, num_layers=layers)).eval()


def _perturb_copies(model, scale=0.05, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, block in expansion.blocks(model):
            for p in block.expanded.parameters():
                p.add_(scale * torch.randn(p.shape, generator=g))


def test_expanded_indices():
    assert expansion.expanded_indices(8, 32) == [3, 7, 11, 15, 19, 23, 27, 31]
    assert expansion.expanded_indices(2, 4) == [1, 3]
    assert expansion.expanded_indices(4, 4) == [0, 1, 2, 3]
    assert expansion.expanded_indices([2, 0], 4) == [0, 2]
    with pytest.raises(ConfigError, match="allowed: 1..4"):
        expansion.expanded_indices(5, 4)
    with pytest.raises(ConfigError, match="block 4 does not exist"):
        expansion.expanded_indices([4], 4)


@pytest.mark.parametrize("arch", ARCHITECTURES)
@pytest.mark.parametrize("kind", expansion.KINDS)
def test_step_zero_is_the_original_model(arch, kind):
    """Logits and every hidden state equal the unexpanded model's exactly, in training mode with gradients."""
    model = _model(arch)
    reference = copy.deepcopy(model)
    ids = torch.randint(3, model.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = reference(ids, output_hidden_states=True)
    assert expansion.expand(model, ExpansionConfig(layers=2, interpolation=kind)) == [1, 3]
    model.train()
    got = model(ids, output_hidden_states=True)
    assert torch.equal(got.logits, want.logits)
    assert len(got.hidden_states) == len(want.hidden_states) == 5
    for a, b in zip(got.hidden_states, want.hidden_states):
        assert torch.equal(a, b)


def test_only_copies_and_interpolation_train():
    model = _model()
    expansion.expand(model, ExpansionConfig(layers=[2], interpolation="progressive"))
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(n.startswith("model.layers.2.") for n in trainable)
    assert "model.layers.2.gate" in trainable and "model.layers.2.lateral" in trainable
    assert not any(".original." in n for n in trainable)
    interpolation = ("model.layers.2.gate", "model.layers.2.lateral")
    assert all(".expanded." in n for n in trainable if n not in interpolation)


def test_hidden_states_are_the_blocks_outputs():
    """Once the copies differ, transformers' hidden states record each expanded block's interpolated output
    (not a branch's), exactly as a hand-run of the layers gives."""
    model = _model()
    expansion.expand(model, ExpansionConfig(layers=2, interpolation="dlerp_in"))
    _perturb_copies(model)
    with torch.no_grad():
        for _, block in expansion.blocks(model):
            block.gate.weight.normal_(0, 0.3)
    ids = torch.randint(3, 1000, (1, 16), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        out = model(ids, output_hidden_states=True)
        decoder = model.model
        h = decoder.embed_tokens(ids)
        positions = torch.arange(16)[None]
        cos_sin = decoder.rotary_emb(h, positions)
        mask = torch.full((16, 16), float("-inf")).triu(1)[None, None]
        for i, layer in enumerate(decoder.layers):
            h = layer(h, attention_mask=mask, position_ids=positions, position_embeddings=cos_sin)
            if i < 3:
                torch.testing.assert_close(out.hidden_states[i + 1], h, rtol=1e-5, atol=1e-5)
    block = decoder.layers[1]
    assert isinstance(block, expansion.ExpandedBlock)


@pytest.mark.parametrize("kind", ["lerp", "dlerp", "dlerp_in", "progressive"])
def test_interpolation_formula(kind):
    """out = g(h_p) + α (h_e − g(h_p)) with each kind's α, recomputed from the branches by hand."""
    model = _model(layers=2)
    expansion.expand(model, ExpansionConfig(layers=[1], interpolation=kind))
    _perturb_copies(model)
    block = model.model.layers[1]
    with torch.no_grad():
        if kind in ("lerp", "progressive"):
            block.gate.fill_(0.7)
        else:
            block.gate.weight.normal_(0, 0.2)
            block.gate.bias.fill_(-0.3)
        if kind == "progressive":
            block.lateral.add_(0.01 * torch.randn_like(block.lateral))
    x = torch.randn(2, 8, 64)
    positions = torch.arange(8)[None].expand(2, -1)
    kwargs = {"attention_mask": torch.full((8, 8), float("-inf")).triu(1)[None, None],
              "position_ids": positions, "position_embeddings": model.model.rotary_emb(x, positions)}
    with torch.no_grad():
        got = block(x, **kwargs)
        h_p, h_e = block.original(x, **kwargs), block.expanded(x, **kwargs)
        base = h_p @ block.lateral.T if kind == "progressive" else h_p
        if kind in ("lerp", "progressive"):
            a = torch.sigmoid(torch.tensor(0.7))
        elif kind == "dlerp":
            a = torch.sigmoid(torch.cat([h_p, h_e], -1) @ block.gate.weight.T + block.gate.bias)
        else:
            a = torch.sigmoid(x @ block.gate.weight.T + block.gate.bias)
        torch.testing.assert_close(got, (1 - a) * base + a * h_e, rtol=1e-5, atol=1e-5)


def test_moe_gate_is_a_hard_choice_with_a_gradient():
    block_model = _model(layers=2)
    expansion.expand(block_model, ExpansionConfig(layers=[0], interpolation="moe"))
    block = block_model.model.layers[0]
    with torch.no_grad():
        block.gate.weight.normal_(0, 1.0)
    x = torch.randn(1, 6, 64)
    h_p, h_e = torch.randn(1, 6, 64), torch.randn(1, 6, 64)
    a = block.alpha(x, h_p, h_e)
    p = torch.softmax(block.gate(x), -1)[..., 1:]
    assert torch.equal(a.detach(), (p > 0.5).float())  # forward: one branch per token
    a.sum().backward()
    torch.testing.assert_close(block.gate.weight.grad.abs().sum() > 0, torch.tensor(True))
    # The straight-through gradient is the softmax's.
    block.gate.weight.grad = None
    p2 = torch.softmax(block.gate(x), -1)[..., 1:]
    (g_w,) = torch.autograd.grad(p2.sum(), block.gate.weight)
    a2 = block.alpha(x, h_p, h_e)
    (g_a,) = torch.autograd.grad(a2.sum(), block.gate.weight)
    torch.testing.assert_close(g_a, g_w)


def test_fold_state_formula_and_limits():
    """fold_state is (1−ᾱ)θ_p + ᾱθ_e per tensor; ᾱ = 0 gives the original model, ᾱ = 1 the copy (and the
    folded logits then equal the unfolded model's, whose blocks output h_e)."""
    model = _model()
    reference = copy.deepcopy(model)
    expansion.expand(model, ExpansionConfig(layers=2))
    _perturb_copies(model)
    state = model.state_dict()
    folded = expansion.fold_state(state, {1: 0.3, 3: 0.8})
    assert set(folded) == set(reference.state_dict())
    key = "model.layers.1.mlp.up_proj.weight"
    torch.testing.assert_close(folded[key], 0.7 * state["model.layers.1.original.mlp.up_proj.weight"]
                               + 0.3 * state["model.layers.1.expanded.mlp.up_proj.weight"])
    torch.testing.assert_close(folded["model.layers.0.mlp.up_proj.weight"],
                               state["model.layers.0.mlp.up_proj.weight"])
    original = expansion.fold_state(state, {1: 0.0, 3: 0.0})
    for k, v in reference.state_dict().items():
        assert torch.equal(original[k], v)
    ids = torch.randint(3, 1000, (2, 20), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        for _, block in expansion.blocks(model):
            block.gate.fill_(60.0)  # σ = 1 in fp32: the blocks output h_e
        alphas = expansion.fold_alphas(model, model.state_dict())
        assert alphas == {1: 1.0, 3: 1.0}
        folded_model = expansion.folded_model(model, alphas)
        torch.testing.assert_close(folded_model(ids).logits, model(ids).logits, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="no α"):
        expansion.fold_state(state, {1: 0.5})


def test_fold_alphas_measures_dynamic_kinds():
    """The dynamic kinds' ᾱ is the mean α over the tokens of the batches (dlerp_in: σ(w·x + b) per token)."""
    model = _model()
    expansion.expand(model, ExpansionConfig(layers=[1], interpolation="dlerp_in"))
    block = model.model.layers[1]
    with torch.no_grad():
        block.gate.weight.normal_(0, 0.5)
    ids = torch.randint(3, 1000, (1, 12), generator=torch.Generator().manual_seed(4))
    seen = []
    block.register_forward_hook(lambda m, args, out: seen.append(
        torch.sigmoid(m.gate(args[0])).mean().item()))
    alphas = expansion.fold_alphas(model, {}, [{"input_ids": ids}])
    assert alphas[1] == pytest.approx(seen[0], rel=1e-6)
    with pytest.raises(ValueError, match="need data"):
        expansion.fold_alphas(model, {})


def test_alignment_loss_formula():
    g = torch.Generator().manual_seed(5)
    pairs = [(torch.randn(2, 5, 8, generator=g), torch.randn(2, 5, 8, generator=g)) for _ in range(3)]
    mask = torch.ones(2, 5, dtype=torch.bool)
    mask[1, 3:] = False
    total, count = alignment_loss(pairs, mask, "cosine")
    want = sum((1 - F.cosine_similarity(p[mask], e[mask], dim=-1)).sum() for p, e in pairs) / 3
    torch.testing.assert_close(total, want)
    assert int(count) == 8
    total, _ = alignment_loss([(p.reshape(1, 10, 8), e.reshape(1, 10, 8)) for p, e in pairs], mask, "mse")
    want = sum((p[mask] - e[mask]).pow(2).mean(-1).sum() for p, e in pairs) / 3
    torch.testing.assert_close(total, want)
    same = alignment_loss([(pairs[0][0], pairs[0][0].clone())], mask)[0]
    assert float(same) == pytest.approx(0.0, abs=1e-6)


def test_alignment_pairs_are_kept_only_when_asked():
    model = _model()
    expansion.expand(model, ExpansionConfig(layers=2, alignment=AlignmentConfig(kind="mse", weight=0.5)))
    model.train()
    ids = torch.randint(3, 1000, (1, 10))
    model(ids)
    pairs = expansion.take_pairs(model)
    assert len(pairs) == 2 and all(p.shape == (1, 10, 64) for pair in pairs for p in pair)
    assert all(b.pair is None for _, b in expansion.blocks(model))
    with torch.no_grad():
        model(ids)
    with pytest.raises(RuntimeError, match="recorded no branch outputs"):
        expansion.take_pairs(model)
    plain = _model()
    expansion.expand(plain, ExpansionConfig(layers=2))
    plain.train()
    plain(ids)
    assert all(b.pair is None for _, b in expansion.blocks(plain))


def test_grad_groups_and_plan():
    model = _model()
    expansion.expand(model, ExpansionConfig(layers=[1], interpolation="lerp"))
    assert part_of("model.layers.1.expanded.self_attn.q_proj.weight") == "layers.1.attn"
    assert part_of("model.layers.1.expanded.input_layernorm.weight") == "layers.1.attn"
    assert part_of("model.layers.0.mlp.down_proj.weight") == "layers.0.mlp"
    assert part_of("model.layers.0.post_attention_layernorm.weight") == "layers.0.mlp"
    assert part_of("model.layers.1.gate") == "layers.1.interp"
    assert part_of("model.embed_tokens.weight") == "embed"
    assert part_of("lm_head.weight") == part_of("model.norm.weight") == "head"
    assert list(grad_groups(model)) == ["layers.1.attn", "layers.1.interp", "layers.1.mlp"]
    assert layer_norms({"layers.0.attn": 3.0, "layers.0.mlp": 4.0, "embed": 9.0}) == {0: 5.0}
    plan = layer_plan({0: 1.0, 1: 3.0, 2: 2.0}, "above_mean", 4.0)
    assert plan["trained"] == [1] and plan["relative"]["1"] == pytest.approx(1.5)
    plan = layer_plan({0: 1.0, 1: 7.0}, "lr_scale", 1.5)
    assert plan["scales"] == {"0": 0.25, "1": 1.5}
