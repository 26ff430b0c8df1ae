"""Student / teacher loading, RoPE checks on the live modules, packed-row isolation, causal attention across
skipped positions, the truncated teacher and the export round trip, on tiny Llama / Mistral / Qwen2."""

import os

import pytest
import torch

from distill.config import ConfigError, ModelConfig, RopeConfig
from distill.model.decoder import TruncatedTeacher, causal_mask_kwargs, forward_hidden
from distill.model.export import export, export_streamed
from distill.model.load import (
    check_extension,
    check_packing_isolation,
    check_teacher_frozen,
    load_student,
    load_teacher,
    refresh_inv_freq,
    resolve_attention,
    resolve_dtype,
    rotary_embedding,
)
from distill.model.rope import head_dim, our_inv_freq, skipped_positions
from distill.testing import ARCHITECTURES, make_tiny_model

RECIPES = {
    "abf": RopeConfig(method="abf", theta=1.0e6, target_length=1024),
    "pi": RopeConfig(method="pi", target_length=1024),
    "yarn": RopeConfig(method="yarn", target_length=1024),
    "llama3": RopeConfig(method="llama3", target_length=1024),
    "none": RopeConfig(method="none", target_length=256),
}


def _cfg(path, **kwargs):
    kwargs.setdefault("dtype", "float32")
    kwargs.setdefault("attention", "sdpa")
    return ModelConfig(path=path, **kwargs)


@pytest.fixture(scope="module")
def teachers(tiny_models):
    return {arch: load_teacher(None, _cfg(path)) for arch, path in tiny_models.items()}


def test_resolve_attention_and_dtype():
    assert resolve_attention("auto", "cpu") == "sdpa_varlen"
    assert resolve_attention("sdpa", "cpu") == "sdpa"
    assert resolve_attention("eager", "cpu") == "eager"
    assert resolve_dtype("bfloat16") is torch.bfloat16 and resolve_dtype("float32") is torch.float32
    with pytest.raises(ConfigError, match="model.dtype"):
        resolve_dtype("float8")


@pytest.mark.parametrize("method", list(RECIPES))
def test_student_rotary_buffer_matches_our_math(tiny_llama, teachers, method):
    rope_cfg = RECIPES[method]
    student = load_student(_cfg(tiny_llama), rope_cfg)
    rotary = rotary_embedding(student)
    ours, scale = our_inv_freq(dict(student.config.rope_parameters), head_dim(student.config))
    assert rotary.inv_freq.dtype == torch.float32
    torch.testing.assert_close(rotary.inv_freq, ours, rtol=1e-6, atol=0.0)
    assert rotary.attention_scaling == pytest.approx(scale)
    assert student.config.max_position_embeddings == (1024 if method != "none" else 256)
    assert student.config.use_cache is False
    lines = check_extension(student, teachers["llama"], rope_cfg)
    assert any("student" in line for line in lines)


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_check_extension_all_archs_and_detects_mismatch(tiny_models, teachers, arch):
    student = load_student(_cfg(tiny_models[arch]), RECIPES["abf"])
    check_extension(student, teachers[arch], RECIPES["abf"])
    with pytest.raises(RuntimeError, match="rope_theta"):
        check_extension(student, teachers[arch], RopeConfig(method="abf", theta=2.0e6, target_length=1024))
    with pytest.raises(RuntimeError, match="differ"):
        check_extension(student, teachers[arch], RECIPES["none"])
    # A student whose buffer was silently left at the native RoPE is caught.
    rotary_embedding(student).inv_freq = rotary_embedding(teachers[arch]).inv_freq.clone()
    with pytest.raises(RuntimeError, match="inv_freq"):
        check_extension(student, teachers[arch], RECIPES["abf"])


def test_bf16_student_keeps_fp32_inv_freq(tiny_llama):
    student = load_student(_cfg(tiny_llama, dtype="bfloat16"), RECIPES["abf"])
    assert next(student.parameters()).dtype == torch.bfloat16
    assert rotary_embedding(student).inv_freq.dtype == torch.float32
    rotary_embedding(student).inv_freq = rotary_embedding(student).inv_freq.bfloat16()  # e.g. a blanket .to()
    assert refresh_inv_freq(student)  # reported
    assert rotary_embedding(student).inv_freq.dtype == torch.float32


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_method_none_student_equals_teacher(tiny_models, teachers, arch):
    student = load_student(_cfg(tiny_models[arch]), RECIPES["none"])
    ids = torch.randint(3, 1000, (2, 24), generator=torch.Generator().manual_seed(0))
    pos = torch.arange(24)[None].expand(2, -1)
    with torch.no_grad():
        s_hidden, s_last = forward_hidden(student, ids, pos)
        t_hidden, t_last = forward_hidden(teachers[arch], ids, pos)
    assert len(s_hidden) == student.config.num_hidden_layers + 1
    for a, b in zip(s_hidden, t_hidden):
        assert torch.equal(a, b)
    assert torch.equal(s_last, s_hidden[-1]) and torch.equal(s_last, t_last)


@pytest.mark.parametrize("attention", ["sdpa_varlen", "sdpa", "eager"])
@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_packed_documents_are_isolated(tiny_models, arch, attention):
    student = load_student(_cfg(tiny_models[arch], attention=attention), RECIPES["abf"])
    assert student.config._attn_implementation == attention
    assert check_packing_isolation(student) < 1e-5
    assert check_packing_isolation(student, "eager" if attention == "sdpa" else "sdpa") < 1e-5
    assert student.config._attn_implementation == attention  # restored


def test_packing_leaks_with_an_explicit_mask(tiny_llama):
    """The trap the check guards against: an all-ones mask on a packed row lets documents see each other."""
    model = load_student(_cfg(tiny_llama), RECIPES["abf"]).eval()
    gen = torch.Generator().manual_seed(0)
    a, b = torch.randint(3, 1000, (8,), generator=gen), torch.randint(3, 1000, (8,), generator=gen)
    ids = torch.cat([a, b])[None]
    pos = torch.cat([torch.arange(8), torch.arange(8)])[None]
    with torch.no_grad():
        isolated = model(input_ids=ids, position_ids=pos, use_cache=False).logits[:, 8:]
        leaked = model(
            input_ids=ids, position_ids=pos, use_cache=False, attention_mask=torch.ones_like(ids)
        ).logits[:, 8:]
        alone = model(input_ids=b[None], position_ids=torch.arange(8)[None], use_cache=False).logits
    assert (isolated - alone).abs().max() < 1e-5
    assert (leaked - alone).abs().max() > 1e-3


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_skipped_positions_stay_causal_with_all_ones_mask(tiny_models, arch, attention):
    model = load_student(_cfg(tiny_models[arch], attention=attention), RECIPES["abf"]).eval()
    n = 48
    pos = skipped_positions(n, 1024, "uniform", torch.Generator().manual_seed(3))[None]  # (1, 48)
    jumps = (pos[0].diff() != 1).nonzero().flatten()
    assert len(jumps) >= 1
    after = int(jumps[0]) + 1  # first token after the first jump
    ids = torch.randint(3, 1000, (1, n), generator=torch.Generator().manual_seed(4))
    mask = causal_mask_kwargs(pos)["attention_mask"]
    assert mask.shape == (1, n) and bool((mask == 1).all())

    def hidden(x, attention_mask):
        with torch.no_grad():
            return forward_hidden(model, x, pos, attention_mask=attention_mask)[1]

    base = hidden(ids, mask)
    # Changing the last token leaves every earlier output unchanged (causal).
    later = ids.clone()
    later[0, -1] = (later[0, -1] + 1) % 1000 + 3 if later[0, -1] < 990 else 5
    assert torch.equal(hidden(later, mask)[:, :-1], base[:, :-1])
    # Changing the first token changes outputs after the jump (attention crosses it).
    earlier = ids.clone()
    earlier[0, 0] = 7 if ids[0, 0] != 7 else 8
    changed = hidden(earlier, mask)
    assert (changed[:, after:] - base[:, after:]).abs().max() > 1e-4
    # Without the mask transformers reads the jump as a document boundary: the same change does not reach it.
    no_mask, no_mask_changed = hidden(ids, None), hidden(earlier, None)
    assert torch.equal(no_mask[:, after:], no_mask_changed[:, after:])
    # And the masked single-document run equals an explicit causal reference: the prefix run on its own.
    prefix = forward_hidden(
        model,
        ids[:, : after + 3],
        pos[:, : after + 3],
        attention_mask=torch.ones(1, after + 3, dtype=torch.long),
    )[1]
    torch.testing.assert_close(prefix, base[:, : after + 3], rtol=1e-5, atol=1e-5)
    assert causal_mask_kwargs(pos, packed=True) == {"attention_mask": None}


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_truncated_teacher_equals_full_hidden_states(tiny_models, arch):
    path = make_tiny_model(
        os.path.join(os.path.dirname(tiny_models[arch]), f"{arch}-4layers"),
        arch,
        num_layers=4,
        vocab_size=1000,
    )
    teacher = load_teacher(path, _cfg(path))
    ids = torch.randint(3, 1000, (2, 32), generator=torch.Generator().manual_seed(0))
    pos = torch.arange(32)[None].expand(2, -1)
    with torch.no_grad():
        full, _ = forward_hidden(teacher, ids, pos)
    truncated = TruncatedTeacher(teacher)
    for layers, need_final in [
        ([1], False),
        ([2], False),
        ([1, 3], False),
        (["last"], False),
        ([0], False),
        ([2], True),
        ([-1, 1], False),
    ]:
        got = truncated(ids, pos, None, layers, need_final=need_final)
        want = {4 if (i == "last" or i == -1) else i for i in layers} | ({4} if need_final else set())
        assert set(got) == want
        for i, tensor in got.items():
            torch.testing.assert_close(tensor, full[i], rtol=1e-6, atol=1e-6)
            assert not tensor.requires_grad
    # Only the requested states are kept: the decoder runs without output_hidden_states (which would hold
    # every layer's state until the forward ends), and no hook is left behind.
    seen = []
    hook = teacher.get_decoder().register_forward_pre_hook(
        lambda module, args, kwargs: seen.append(kwargs.get("output_hidden_states")), with_kwargs=True)
    truncated(ids, pos, None, [1, 3])
    hook.remove()
    assert seen == [None]  # the truncated copy (depth 3, sharing the hooks) ran, never asking for every state
    assert all(not layer._forward_pre_hooks for layer in teacher.get_decoder().layers)
    one_off = TruncatedTeacher(teacher)(ids, pos, None, [2])  # a fresh runner: its own copies
    torch.testing.assert_close(one_off[2], full[2], rtol=1e-6, atol=1e-6)
    # The full teacher is untouched: still 4 layers, the final norm, the same hidden states.
    decoder = teacher.get_decoder()
    assert len(decoder.layers) == 4 and decoder.config.num_hidden_layers == 4
    assert not isinstance(decoder.norm, torch.nn.Identity)
    with torch.no_grad():
        again, _ = forward_hidden(teacher, ids, pos)
    assert len(again) == 5 and all(torch.equal(a, b) for a, b in zip(again, full))


def test_teacher_is_frozen_and_separate(tiny_llama, teachers):
    student = load_student(_cfg(tiny_llama), RECIPES["abf"])
    teacher = teachers["llama"]
    assert all(not p.requires_grad for p in teacher.parameters())
    assert all(p.requires_grad for p in student.parameters())
    assert not teacher.training and student.training
    assert teacher.config.use_cache is False
    assert all(m is not teacher for m in student.modules())
    assert not ({id(p) for p in student.parameters()} & {id(p) for p in teacher.parameters()})
    assert check_teacher_frozen(student, teacher)
    with torch.no_grad():
        student.model.embed_tokens.weight.add_(1.0)  # training the student never moves the teacher
    assert not torch.equal(student.model.embed_tokens.weight, teacher.model.embed_tokens.weight)


def test_gradient_checkpointing_student_trains(tiny_llama):
    student = load_student(_cfg(tiny_llama, gradient_checkpointing=True), RECIPES["abf"])
    assert getattr(student, "is_activation_checkpointing", None) or student.is_gradient_checkpointing
    ids = torch.randint(3, 1000, (1, 16))
    hidden, last = forward_hidden(student, ids, torch.arange(16)[None], layers=[1, "last"])
    (hidden[0].pow(2).mean() + student.lm_head(last).logsumexp(-1).mean()).backward()
    assert student.model.layers[0].self_attn.q_proj.weight.grad is not None


@pytest.mark.parametrize("method", ["abf", "yarn"])
def test_export_round_trip(tiny_llama, tmp_path, method):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    rope_cfg = RECIPES[method]
    student = load_student(_cfg(tiny_llama), rope_cfg).eval()
    out = export(student, AutoTokenizer.from_pretrained(tiny_llama), str(tmp_path / "final"))
    assert os.path.exists(os.path.join(out, "model.safetensors"))
    assert student.config.use_cache is False  # the training model keeps its setting
    reloaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert reloaded.config.rope_parameters == student.config.rope_parameters
    assert reloaded.config.max_position_embeddings == 1024
    torch.testing.assert_close(rotary_embedding(reloaded).inv_freq, rotary_embedding(student).inv_freq)
    ids = torch.randint(3, 1000, (1, 40))
    pos = torch.arange(600, 640)[None]  # beyond the original window
    with torch.no_grad():
        a = student(input_ids=ids, position_ids=pos, use_cache=False).logits
        b = reloaded(input_ids=ids, position_ids=pos, use_cache=False).logits
    torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    assert len(AutoTokenizer.from_pretrained(out)) == len(AutoTokenizer.from_pretrained(tiny_llama))


def _rope_as_transformers_4_reads_it(config_json: dict) -> dict:
    """The RoPE a transformers 4.x reader builds from config.json: it knows only `rope_theta` (LlamaConfig's
    default 10000.0 when absent) and `rope_scaling` (None when absent; its type under "rope_type" or
    "type")."""
    scaling = dict(config_json.get("rope_scaling") or {})
    kind = scaling.pop("rope_type", None) or scaling.pop("type", None) or "default"
    scaling.pop("type", None)
    return {**scaling, "rope_type": kind, "rope_theta": float(config_json.get("rope_theta", 10000.0))}


@pytest.mark.parametrize("method", ["abf", "pi", "yarn", "llama3"])
def test_export_is_read_with_the_extended_rope_by_legacy_readers(tiny_llama, tmp_path, method):
    """A 4.x reader (serving and conversion tools pinned to it) sees the extended RoPE, not the default
    one."""
    import json

    from transformers import AutoModelForCausalLM

    student = load_student(_cfg(tiny_llama), RECIPES[method])
    out = export(student, None, str(tmp_path / "final"))
    with open(os.path.join(out, "config.json"), encoding="utf-8") as f:
        config = json.load(f)
    legacy = _rope_as_transformers_4_reads_it(config)
    dim = head_dim(student.config)
    want, want_scale = our_inv_freq(dict(student.config.rope_parameters), dim)
    got, got_scale = our_inv_freq(legacy, dim)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=0)
    assert got_scale == pytest.approx(want_scale)
    torch.testing.assert_close(got, rotary_embedding(student).inv_freq, rtol=1e-6, atol=0)
    # transformers 5 still reads rope_parameters, unchanged by the legacy fields beside it.
    reloaded = AutoModelForCausalLM.from_pretrained(out)
    assert reloaded.config.rope_parameters == student.config.rope_parameters
    torch.testing.assert_close(rotary_embedding(reloaded).inv_freq, rotary_embedding(student).inv_freq)


def test_export_records_its_dtype(tiny_llama, tmp_path):
    """fp32 master weights exported in bf16 load as bf16 by default (not fp32, twice the memory)."""
    import json

    from transformers import AutoModelForCausalLM

    student = load_student(_cfg(tiny_llama), RECIPES["abf"])
    out = export(student, None, str(tmp_path / "final"), dtype=torch.bfloat16)
    with open(os.path.join(out, "config.json"), encoding="utf-8") as f:
        config = json.load(f)
    assert config["dtype"] == config["torch_dtype"] == "bfloat16"
    reloaded = AutoModelForCausalLM.from_pretrained(out)
    assert {p.dtype for p in reloaded.parameters()} == {torch.bfloat16}
    assert student.config.dtype == torch.float32  # the training model keeps its own
    assert next(student.parameters()).dtype == torch.float32


def test_streamed_export_writes_shard_by_shard_what_export_writes(tiny_llama, tmp_path):
    """export_streamed (the sharded modes' export) cut into several bf16 shards with an index: the same model
    as `export` from the whole state dict, the same config."""
    import json

    from transformers import AutoModelForCausalLM, AutoTokenizer

    student = load_student(_cfg(tiny_llama), RECIPES["abf"])
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama)
    whole = export(student, tokenizer, str(tmp_path / "whole"), dtype=torch.bfloat16, original_length=256)
    state = student.state_dict()
    shapes = {k: (v.shape, v.dtype) for k, v in state.items()}
    out = str(tmp_path / "streamed")
    export_streamed(student, tokenizer, out, shapes, iter(state.items()), torch.bfloat16, 256,
                    shard_bytes=100_000)
    files = sorted(f for f in os.listdir(out) if f.endswith(".safetensors"))
    assert len(files) > 2 and os.path.exists(os.path.join(out, "model.safetensors.index.json"))
    assert max(os.path.getsize(os.path.join(out, f)) for f in files) < 300_000  # one shard at a time
    a, b = (AutoModelForCausalLM.from_pretrained(d) for d in (whole, out))
    assert {p.dtype for p in b.parameters()} == {torch.bfloat16}
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    configs = [json.load(open(os.path.join(d, "config.json"), encoding="utf-8")) for d in (whole, out)]
    assert configs[0] == configs[1]
    assert len(AutoTokenizer.from_pretrained(out)) == len(tokenizer)


def test_bad_model_path_is_a_config_error(tmp_path):
    with pytest.raises(
        ConfigError, match=r"^model\.path: cannot load '/nonexistent/model': no such directory"
    ):
        load_student(_cfg("/nonexistent/model"), RECIPES["abf"])
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ConfigError, match=r"^model\.path: cannot load"):
        load_student(_cfg(str(empty)), RECIPES["abf"])
    with pytest.raises(ConfigError, match=r"^teacher\.path: cannot load"):
        load_teacher(str(empty), _cfg("/elsewhere/model"))


def test_target_not_above_original_is_a_config_error(tiny_llama):
    with pytest.raises(ConfigError, match=r"^rope\.target_length: 256 must be greater"):
        load_student(_cfg(tiny_llama), RopeConfig(method="abf", theta=1e6, target_length=256))
    with pytest.raises(ConfigError, match=r"^rope\.target_length"):
        load_student(_cfg(tiny_llama), RopeConfig(method="pi", target_length=128))
