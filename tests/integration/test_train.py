"""The trainer through its real entry points: tiny Llama/Mistral/Qwen2 models saved to disk, built data,
`python -m distill.train` and `accelerate launch` in subprocesses."""

import json
import os
import subprocess
import sys

import pytest
import torch
import yaml
from safetensors.torch import load_file

from distill.config import load_recipe
from distill.train.metrics import read_metrics

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def recipe(model, data, out, method="longred", steps=3, **extra):
    """A small recipe: 4096 token slots per step, every stream in every step (expected ≥ 1 micro-batch)."""
    long = {"data": data["long"], "share": 1, "micro_batch": 1, "objectives": {"lm": 1.0}}
    short = {"data": data["short"], "share": 1, "micro_batch": 4}
    s2l = {"data": data["s2l"], "share": 1, "micro_batch": 4}
    if method == "long_cpt":
        streams = {"long": long}
    elif method == "mix_cpt":
        streams = {"long": long, "short": {**short, "objectives": {"lm": 1.0}},
                   "s2l": {**s2l, "objectives": {"lm": 1.0}}}
    else:
        streams = {"long": long,
                   "short": {**short,
                             "objectives": {"hidden": {"weight": 3.75, "layers": [1, "last"]}, "kl": 1.0}},
                   "s2l": {**s2l, "positions": "cream",
                           "objectives": {"hidden": {"weight": 2.5, "layers": ["last"]}}}}
    cfg = {
        "run": {"name": f"test-{method}", "output_dir": str(out), "seed": 0},
        "model": {"path": model, "dtype": "float32", "attention": "auto"},
        "rope": {"method": "abf", "theta": 160000.0, "target_length": 1024},
        "streams": streams,
        "mix": {"tokens_per_step": 4096},
        "optim": {"lr": 1.0e-3, "schedule": {"name": "constant"}},
        "train": {"max_steps": steps, "log_every": 1},
        "log": {"wandb": {"mode": "disabled"}, "progress_bar": False},
    }
    for key, value in extra.items():
        section, name = key.split("__")
        cfg[section][name] = value
    return cfg


def write(cfg, path):
    with open(path, "w") as f:
        yaml.safe_dump(cfg, f)
    return str(path)


def train_cli(recipe_path, *overrides, launcher=None, env_extra=None, timeout=600):
    env = {**os.environ, "PYTHONPATH": ROOT, "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1",
           "TOKENIZERS_PARALLELISM": "false", **(env_extra or {})}
    cmd = (launcher or [sys.executable]) + ["-m", "distill.train", recipe_path, *overrides]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout, cwd=ROOT)


@pytest.mark.parametrize("method", ["long_cpt", "mix_cpt", "longred"])
def test_methods_run_through_the_command_line(tmp_path, tiny_llama, built_data, method):
    out = tmp_path / "run"
    proc = train_cli(write(recipe(tiny_llama, built_data, out, method, train__eval_every=3,
                                  log__peak_tflops=0.5), tmp_path / "r.yaml"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    records = read_metrics(out / "metrics.jsonl")
    # The start-up checks ran and were logged, with or without a teacher.
    assert "inv_freq matches our formulas" in proc.stderr and "packed documents isolated" in proc.stderr
    # The evaluation suite ran at step 3 on the held-out splits and logged under eval/.
    assert "eval/long_nll" in records[-1] and "eval/long_nll" not in records[0]
    if method == "longred":
        assert records[-1]["eval/kl_teacher_student"] >= 0 and "eval/short_nll_gap" in records[-1]
    assert [r["step"] for r in records] == [1, 2, 3]
    for key in ("step", "tokens", "lr", "grad_norm", "tokens_per_s", "loss"):
        assert all(key in r for r in records)
    expected = {"long_cpt": {"loss/long/lm"}, "mix_cpt": {"loss/long/lm", "loss/short/lm", "loss/s2l/lm"},
                "longred": {"loss/long/lm", "loss/short/hidden", "loss/short/kl", "loss/s2l/hidden"}}[method]
    assert expected <= set(records[0])
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in records)
    # Model FLOPs: tflops_per_s / tokens_per_s is the step's FLOPs per token slot, whatever the timing.
    from transformers import AutoModelForCausalLM

    from distill.data.dataset import PackedStream
    from distill.model.flops import flop_counts, train_flops_per_token

    counts = flop_counts(AutoModelForCausalLM.from_pretrained(tiny_llama))
    for r in records:
        assert r["mfu"] == pytest.approx(r["tflops_per_s"] / 0.5) and ("teacher_tflops_per_s" in r) == (
            method == "longred")
    if method == "long_cpt":
        per_token = train_flops_per_token(counts, PackedStream(built_data["long"]).seq_len)
        assert records[-1]["tflops_per_s"] * 1e12 / records[-1]["tokens_per_s"] == pytest.approx(per_token)
    assert (out / "config.yaml").exists() and (out / "checkpoints" / "step-3" / "COMPLETE").exists()
    # The export loads with AutoModelForCausalLM and carries the extended RoPE.
    model = AutoModelForCausalLM.from_pretrained(out / "final")
    assert model.config.max_position_embeddings == 1024
    assert model.config.rope_parameters["rope_theta"] == 160000.0


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2"])
def test_no_extension_means_zero_short_distillation_loss(tmp_path, tiny_models, built_data_for, arch):
    """rope.method none: student == teacher, so the short hidden/kl losses are 0; the s2l loss is not
    (the student sees skipped positions, the teacher 0..T-1)."""
    from distill.train.loop import run

    cfg = recipe(tiny_models[arch], built_data_for(tiny_models[arch]), tmp_path / "run", "longred", steps=1)
    cfg["rope"] = {"method": "none", "target_length": 1024}
    code = run(load_recipe(write(cfg, tmp_path / "r.yaml")))
    assert code == 0
    first = read_metrics(tmp_path / "run" / "metrics.jsonl")[0]
    assert first["loss/short/hidden"] <= 1e-6
    assert first["loss/short/kl"] <= 1e-6
    # Random-init tiny models barely depend on position, so "not zero" is relative to the exact zero above.
    assert first["loss/s2l/hidden"] > max(1e-6, 100 * first["loss/short/hidden"])


def test_teacher_is_frozen_and_outside_optimiser_and_export(tmp_path, tiny_llama, built_data):
    from distill.train.loop import run

    cfg = load_recipe(write(recipe(tiny_llama, built_data, tmp_path / "run", "longred", steps=2),
                            tmp_path / "r.yaml"))
    before = load_file(os.path.join(tiny_llama, "model.safetensors"))
    code, live = run(cfg, return_state=True)
    assert code == 0
    teacher, student, optimizer = live["teacher"], live["student"], live["optimizer"]
    for name, tensor in teacher.state_dict().items():
        if name in before:
            assert torch.equal(tensor, before[name]), name
    assert all(not p.requires_grad for p in teacher.parameters())
    teacher_ids = {id(p) for p in teacher.parameters()}
    optimised = [p for g in optimizer.param_groups for p in g["params"]]
    assert not teacher_ids & {id(p) for p in optimised}
    assert len(optimised) == len(list(student.parameters()))
    assert not any(m is teacher for m in student.modules())
    # The student did move, and its export / checkpoint hold exactly the student's tensors.
    exported = load_file(str(tmp_path / "run" / "final" / "model.safetensors"))
    assert set(exported) <= set(student.state_dict())
    assert any(not torch.equal(exported[k], before[k]) for k in exported if k in before)
    ckpt = load_file(str(tmp_path / "run" / "checkpoints" / "step-2" / "model.safetensors"))
    assert len(ckpt) <= len(student.state_dict()) and not any(k.startswith("teacher") for k in ckpt)


BAD = [
    ({"model__dtyp": "float32"}, "model.dtyp: unknown key; did you mean 'dtype'?"),
    ({"optim__lr": -1.0}, "optim.lr: must be positive"),
    ({"train__max_steps": "many"}, "train.max_steps: expected an integer"),
]


@pytest.mark.parametrize("extra, message", BAD)
def test_bad_recipe_values_fail_with_one_line(tmp_path, tiny_llama, built_data, extra, message, capsys):
    cfg = recipe(tiny_llama, built_data, tmp_path / "run", "longred", **extra)
    _assert_refused(tmp_path, cfg, message, capsys if "dtyp" not in str(extra) else None)


def _assert_refused(tmp_path, cfg, message, capsys=None):
    """Exit code 2, one `error:` line naming the problem, nothing in the output dir touched.

    Through the real command line in a subprocess, or in-process through the same `main` when `capsys`
    is given (the CLI is `sys.exit(main())`; in-process saves the interpreter start-up per case).
    """
    from distill.train import loop as train

    out = tmp_path / "run"
    out.mkdir(exist_ok=True)
    (out / "metrics.jsonl").write_text('{"step": 1, "loss": 1.0}\n')
    path = write(cfg, tmp_path / "bad.yaml")
    if capsys is None:
        proc = train_cli(path)
        code, stderr = proc.returncode, proc.stderr
    else:
        capsys.readouterr()
        code = train.main([path])
        stderr = capsys.readouterr().err
    assert code == 2, stderr[-2000:]
    lines = [line for line in stderr.strip().splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and message in lines[0], stderr[-2000:]
    assert "Traceback" not in stderr
    assert (out / "metrics.jsonl").read_text() == '{"step": 1, "loss": 1.0}\n'  # nothing destroyed


def test_bad_recipes_structural(tmp_path, tiny_llama, tiny_models, built_data, tokenizer_dir, capsys):
    base = lambda: recipe(tiny_llama, built_data, tmp_path / "run", "longred")  # noqa: E731
    cfg = base()
    for s in cfg["streams"].values():
        s["share"] = 0
    _assert_refused(tmp_path, cfg, "stream shares sum to 0", capsys)
    cfg = base()
    cfg["streams"]["long"]["data"] = str(tmp_path / "missing")
    _assert_refused(tmp_path, cfg, "streams.long.data", capsys)
    cfg = base()
    cfg["streams"]["short"]["objectives"]["hidden"]["layers"] = [1, 40]
    _assert_refused(tmp_path, cfg, "streams.short.objectives.hidden.layers[1]: 40 is out of range", capsys)
    cfg = base()
    cfg["rope"]["target_length"] = 256
    _assert_refused(tmp_path, cfg, "rope.target_length", capsys)
    # Data built with another tokenizer: a model whose tokenizer has a different vocabulary.
    from distill.testing import make_tiny_model, train_tokenizer

    other_tok = train_tokenizer(str(tmp_path / "tok2"), vocab_size=600)
    other = make_tiny_model(str(tmp_path / "other"), "llama", tokenizer_dir=other_tok)
    cfg = base()
    cfg["model"]["path"] = other
    _assert_refused(tmp_path, cfg, "different tokenizer", capsys)


def test_non_finite_steps_are_skipped_then_stop_the_run(tmp_path, tiny_llama, built_data, monkeypatch):
    """A NaN loss skips the optimiser step (weights unchanged) and is counted; N in a row stop the run."""
    from distill.model import objectives
    from distill.train import loop as train
    from distill.train import step

    real = objectives.lm_loss
    calls = {"n": 0}

    def poisoned(hidden, weight, labels, chunk_size=4096, **kw):
        total, count = real(hidden, weight, labels, chunk_size=chunk_size, **kw)
        calls["n"] += 1
        # step 1 (4 micro-batches) fine, then NaN
        return (total * float("nan") if calls["n"] > 4 else total), count

    monkeypatch.setattr(step, "lm_loss", poisoned)
    cfg = recipe(tiny_llama, built_data, tmp_path / "run", "long_cpt", steps=10)
    cfg["train"]["max_nonfinite_steps"] = 3
    cfg["train"]["save_every"] = 1
    with pytest.raises(train.TrainingError, match="3 non-finite steps in a row"):
        train.run(load_recipe(write(cfg, tmp_path / "r.yaml")))
    records = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert [r["skipped_steps"] for r in records] == [0, 1, 2, 3]
    w2 = load_file(str(tmp_path / "run" / "checkpoints" / "step-2" / "model.safetensors"))
    w3 = load_file(str(tmp_path / "run" / "checkpoints" / "step-3" / "model.safetensors"))
    assert all(torch.equal(w2[k], w3[k]) for k in w2)  # skipped steps leave the weights untouched
    assert train.main([write(cfg, tmp_path / "r2.yaml"), "train.resume=never",
                       f"run.output_dir={tmp_path}/x"]) == 3


def test_wandb_offline_run_resumes_the_same_run_id(tmp_path, tiny_llama, built_data, monkeypatch):
    from distill.train.loop import run
    from distill.train.metrics import wandb_mode

    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    monkeypatch.setenv("HOME", str(tmp_path))
    assert wandb_mode("auto") == "offline"
    cfg = recipe(tiny_llama, built_data, tmp_path / "run", "long_cpt", steps=2)
    cfg["log"]["wandb"] = {"project": "test", "mode": "auto"}
    assert run(load_recipe(write(cfg, tmp_path / "r.yaml"))) == 0
    state = json.load(open(tmp_path / "run" / "checkpoints" / "step-2" / "state.json"))
    run_id = state["wandb_id"]
    assert run_id
    assert run(load_recipe(write(cfg, tmp_path / "r.yaml"), ["train.max_steps=3"])) == 0
    dirs = [d for d in os.listdir(tmp_path / "run" / "wandb") if d.startswith("offline-run-")]
    assert len(dirs) == 2 and all(d.endswith(run_id) for d in dirs)
    assert [r["step"] for r in read_metrics(tmp_path / "run" / "metrics.jsonl")] == [1, 2, 3]


def test_short_to_long_streams_are_checked_at_start_up(tmp_path, tiny_llama, built_data, capsys):
    """positions cream/uniform need one-document rows (pack: window) no longer than the teacher's window, and
    a target beyond it; each mistake is one line before anything runs (rows of the target length used to
    crash with a traceback at the first micro-batch)."""
    base = lambda: recipe(tiny_llama, built_data, tmp_path / "run", "longred")  # noqa: E731
    cfg = base()
    cfg["streams"]["s2l"]["data"] = built_data["short"]  # best_fit rows: several documents each
    _assert_refused(tmp_path, cfg, "streams.s2l.positions: cream needs rows of one document each, built with "
                                   "pack: window", capsys)
    cfg = base()
    cfg["streams"]["s2l"]["data"] = built_data["long"]  # concat rows of 1024 = the target length
    _assert_refused(tmp_path, cfg, "streams.s2l.positions: cream needs rows of one document each", capsys)
    cfg = base()
    cfg["rope"]["original_length"] = 128  # the teacher's window below the s2l rows of 256
    _assert_refused(tmp_path, cfg, "streams.s2l.data: rows of 256 tokens exceed the teacher's window 128",
                    capsys)
    cfg = base()
    cfg["rope"] = {"method": "none", "target_length": 256}
    cfg["streams"].pop("long")
    _assert_refused(tmp_path, cfg, "streams.s2l.positions: cream spreads rows over rope.target_length 256, "
                                   "which must exceed the teacher's window 256", capsys)


def test_sparse_streams_are_announced_and_keep_their_weight(tmp_path, tiny_llama, built_data, caplog):
    """4096 token slots at 4 : 1 : 1 with micro-batches of 4 × 256: short and s2l expect 0.67 micro-batches
    per step. The start-up says so with the numbers, and their losses carry 1 / 0.67 where present."""
    from distill.train import step as step_module
    from distill.train.loop import run

    cfg = recipe(tiny_llama, built_data, tmp_path / "run", "longred", steps=2)
    cfg["streams"]["long"]["share"] = 4
    seen = []
    real = step_module.StepContext.__post_init__

    def keep(ctx):
        real(ctx)
        seen.append(ctx)

    caplog.set_level("WARNING", logger="distill.train")
    step_module.StepContext.__post_init__ = keep
    try:
        assert run(load_recipe(write(cfg, tmp_path / "r.yaml"))) == 0
    finally:
        step_module.StepContext.__post_init__ = real
    warnings = [r.getMessage() for r in caplog.records if "micro-batches of" in r.getMessage()]
    assert len(warnings) == 2 and any(
        w.startswith("streams.short: its share gives 683 of mix.tokens_per_step "
                     "4096 token slots, 0.67 micro-batches of 4 × 256") for w in warnings)
    assert "weighted ×1.50" in warnings[0]
    presence = seen[0].mixture.presence(0)
    assert presence == pytest.approx({"long": 1.0, "short": 1.5, "s2l": 1.5})


def test_auto_layers_are_ranked_on_single_documents(tmp_path, tiny_llama, built_data, monkeypatch):
    """layers: auto compares attention on documents run alone (positions 0..T-1), not on packed rows whose
    documents would attend to each other."""
    from distill.data.dataset import PackedStream
    from distill.model import layers as layers_module
    from distill.train.loop import run

    seen = []
    real = layers_module.attention_kl

    def spy(student, teacher, input_ids, batch_size=1, **kwargs):
        seen.append(input_ids.cpu())
        return real(student, teacher, input_ids, batch_size, **kwargs)

    monkeypatch.setattr(layers_module, "attention_kl", spy)
    cfg = recipe(tiny_llama, built_data, tmp_path / "run", "longred", steps=1)
    cfg["streams"]["short"]["objectives"]["hidden"]["layers"] = "auto"
    cfg["streams"]["short"]["objectives"]["hidden"]["top_k"] = 1
    assert run(load_recipe(write(cfg, tmp_path / "r.yaml"))) == 0
    assert len(seen) == 1
    stream = PackedStream(built_data["short"])
    documents = set()
    for i in range(min(64, len(stream))):
        ids, start = stream.input_ids(i), 0
        for n in stream.lengths(i):
            documents.add(tuple(ids[start: start + n].tolist()))
            start += n
    rows = seen[0]
    assert rows.shape[0] == 4
    for row in rows.tolist():  # every row is the start of ONE document: no second document, no padding
        assert any(doc[: len(row)] == tuple(row) for doc in documents if len(doc) >= len(row))


def test_flash_attention_in_float32_is_refused_before_loading(tmp_path, tiny_llama, built_data, capsys):
    """flash-attn computes in fp16/bf16 only: a float32 recipe with flash_attention_2 stops with one line
    (exit 2) before any model is loaded, instead of dying in the first forward."""
    from distill.train import loop as train

    cfg = recipe(tiny_llama, built_data, tmp_path / "run", "long_cpt", steps=1)
    cfg["model"]["attention"] = "flash_attention_2"
    assert train.main([write(cfg, tmp_path / "r.yaml")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: model.dtype: float32 cannot run flash_attention_2")


def test_flash_attention_run_with_auto_layers_and_evaluation(tmp_path, tiny_llama, built_data, flash_standin):
    """One process on flash_attention_2 (the CPU stand-in) in bf16: `layers: auto` ranks layers through the
    laid-out models (eager attention, then flash again) and picks what sdpa_varlen picks; in-training
    evaluation runs under the same precision; the losses are sdpa_varlen's within bf16 noise."""
    from distill.train.loop import run

    picked, records = {}, {}
    for attention in ("sdpa_varlen", "flash_attention_2"):
        cfg = recipe(tiny_llama, built_data, tmp_path / attention, "longred", steps=2, train__eval_every=2)
        cfg["model"].update({"attention": attention, "dtype": "bfloat16"})
        cfg["streams"]["short"]["objectives"]["hidden"].update({"layers": "auto", "top_k": 1})
        flash_standin.module.reset()
        code, live = run(load_recipe(write(cfg, tmp_path / f"{attention}.yaml")), return_state=True)
        assert code == 0
        assert live["student"].config._attn_implementation == attention  # restored after the eager ranking
        picked[attention] = live["layers"]["short"]
        records[attention] = read_metrics(tmp_path / attention / "metrics.jsonl")
        if attention == "flash_attention_2":
            assert flash_standin.calls and {c["dtype"] for c in flash_standin.calls} == {"bfloat16"}
    assert picked["flash_attention_2"] == picked["sdpa_varlen"] and 2 in picked["sdpa_varlen"]
    want, got = records["sdpa_varlen"], records["flash_attention_2"]
    assert "eval/short_nll" in got[-1]
    for key in ("loss", "loss/long/lm", "loss/short/hidden", "eval/short_nll", "eval/long_nll"):
        assert got[-1][key] == pytest.approx(want[-1][key], rel=3e-2), key
