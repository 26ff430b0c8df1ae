"""Hybrid expansion and gradient localisation through the shipped trainer (one process; the 2-process and
FSDP2 runs are in test_strategies.py): the alignment objective, what stays frozen and holds no optimiser
state, exact resume, the folded and unfolded exports and scripts/evaluate.py's fold figures, per-part
gradient norms and their heatmap, and optim.layers: traced."""

import json
import os

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from distill.train import loop as train
from distill.train.metrics import read_metrics

from .test_train import recipe, write

EXPANSION = {"layers": [1], "interpolation": "lerp", "alignment": {"kind": "cosine", "weight": 0.5}}


def _run(tmp_path, name, cfg, *overrides):
    path = write(cfg, tmp_path / f"{name}.yaml")
    assert train.main([path, *overrides]) == 0
    return cfg["run"]["output_dir"]


def _expanded_recipe(model, data, out, steps=3, **expansion):
    cfg = recipe(model, data, out, "longred", steps=steps)
    cfg["model"]["expansion"] = {**EXPANSION, **expansion}
    cfg["train"].update({"save_every": 1, "keep_last": 5})
    cfg["log"]["layer_grad_every"] = 1
    return cfg


@pytest.fixture(scope="module")
def expanded_run(tmp_path_factory, tiny_llama, built_data):
    root = tmp_path_factory.mktemp("expanded")
    out = _run(root, "full", _expanded_recipe(tiny_llama, built_data, root / "full"))
    return {"root": root, "out": out}


def test_alignment_is_an_objective_of_every_stream(expanded_run):
    records = read_metrics(os.path.join(expanded_run["out"], "metrics.jsonl"))
    assert len(records) == 3
    for stream in ("long", "short", "s2l"):
        values = [r[f"loss/{stream}/alignment"] for r in records]
        assert values[0] == pytest.approx(0.0, abs=1e-6)  # the copy equals its original at step 0
        assert values[-1] > 0  # and has moved away since
    # The step's loss counts the alignment with its weight, like any other objective.
    r = records[-1]
    parts = (r["loss/long/lm"] + 0.5 * r["loss/long/alignment"] + 3.75 * r["loss/short/hidden"]
             + r["loss/short/kl"] + 0.5 * r["loss/short/alignment"] + 2.5 * r["loss/s2l/hidden"]
             + 0.5 * r["loss/s2l/alignment"])
    assert r["loss"] == pytest.approx(parts, rel=1e-6)


def test_frozen_parameters_stay_and_hold_no_optimiser_state(expanded_run, tiny_llama):
    step = os.path.join(expanded_run["out"], "checkpoints", "step-3")
    weights = load_file(os.path.join(step, "model.safetensors"))
    initial = load_file(os.path.join(tiny_llama, "model.safetensors"))
    trainable = sorted(k for k in weights if k.startswith("model.layers.1.") and ".original." not in k)
    for key, value in weights.items():
        if key in trainable:
            continue
        plain = key.replace("layers.1.original.", "layers.1.")
        assert torch.equal(value, initial[plain]), key  # frozen: the original block, other layers, embeddings
    moved = [k for k in trainable if ".expanded." in k and not torch.equal(
        weights[k], initial[k.replace("layers.1.expanded.", "layers.1.")])]
    assert moved
    optim = torch.load(os.path.join(step, "optimizer.pt"), weights_only=True)
    n_params = sum(len(g["params"]) for g in optim["param_groups"])
    assert n_params == len(trainable) == len(optim["state"])


def test_resume_is_exact(expanded_run, tiny_llama, built_data):
    root = expanded_run["root"]
    cfg = _expanded_recipe(tiny_llama, built_data, root / "resumed")
    _run(root, "resumed", cfg, "train.max_steps=2")
    _run(root, "resumed", cfg)
    for name in ("model.safetensors",):
        a = load_file(os.path.join(expanded_run["out"], "checkpoints", "step-3", name))
        b = load_file(os.path.join(root / "resumed", "checkpoints", "step-3", name))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    full = read_metrics(os.path.join(expanded_run["out"], "metrics.jsonl"))
    resumed = read_metrics(os.path.join(root / "resumed", "metrics.jsonl"))
    assert [r["loss"] for r in full] == [r["loss"] for r in resumed]


def test_exports_folded_and_unfolded(expanded_run):
    """final/ is a plain model holding the fold of the last checkpoint; expanded/ reloads into the unfolded
    model, whose logits equal the trained one's."""
    from distill.model import expansion

    out = expanded_run["out"]
    weights = load_file(os.path.join(out, "checkpoints", "step-3", "model.safetensors"))
    alpha = float(torch.sigmoid(weights["model.layers.1.gate"]))
    with open(os.path.join(out, "final", "expansion_fold.json"), encoding="utf-8") as f:
        assert json.load(f)["fold_alphas"] == {"1": pytest.approx(alpha)}
    final = AutoModelForCausalLM.from_pretrained(os.path.join(out, "final"))
    folded = expansion.fold_state(weights, {1: alpha})
    for key, value in final.state_dict().items():
        torch.testing.assert_close(value, folded[key], rtol=0, atol=0)
    unfolded, alphas = expansion.load_unfolded(os.path.join(out, "expanded"))
    assert alphas == {1: pytest.approx(alpha)}
    for key, value in unfolded.state_dict().items():
        assert torch.equal(value, weights[key]), key


def test_evaluate_reports_the_fold(expanded_run, built_data):
    """scripts/evaluate.py on expanded/: the unfolded model's figures plus how far the folded model's logits
    are, checked against a recomputation with the plain export."""
    from distill.data.dataset import PackedStream
    from distill.model import expansion
    from scripts import evaluate as evaluate_script

    out = expanded_run["out"]
    eval_dir = os.path.join(expanded_run["root"], "eval")
    assert evaluate_script.main(["--model", os.path.join(out, "expanded"), "--short-data", built_data["root"],
                                 "--max-rows", "2", "--passkey-samples", "0", "--original-length", "256",
                                 "--out", eval_dir]) == 0
    with open(os.path.join(eval_dir, "eval.json"), encoding="utf-8") as f:
        record = json.load(f)
    fig = record["figures"]
    assert fig["fold_logit_max_abs_diff"] > 0
    unfolded, alphas = expansion.load_unfolded(os.path.join(out, "expanded"))
    final = AutoModelForCausalLM.from_pretrained(os.path.join(out, "final")).eval()
    from transformers import AutoTokenizer

    short = PackedStream(os.path.join(built_data["root"], "holdout", "short"),
                         AutoTokenizer.from_pretrained(os.path.join(out, "final")))
    worst = 0.0
    for i in (0, 1):
        row = short.batch([i])
        with torch.no_grad():
            a = unfolded(input_ids=row["input_ids"], position_ids=row["position_ids"]).logits[:, :-1]
            b = final(input_ids=row["input_ids"], position_ids=row["position_ids"]).logits[:, :-1]
        keep = row["labels"][:, 1:] != -100
        worst = max(worst, float((a - b)[keep].abs().max()))
    assert fig["fold_logit_max_abs_diff"] == pytest.approx(worst, rel=1e-4)
    assert record["fold"]["alphas"] == {"1": pytest.approx(alphas[1])}


def test_layer_gradient_norms(expanded_run):
    """Per-part norms compose the step's grad_norm exactly (Σ parts² = norm²); each stream has its own; the
    heatmap is drawn."""
    out = expanded_run["out"]
    records = read_metrics(os.path.join(out, "metrics.jsonl"))
    for r in records:
        parts = {k: v for k, v in r.items() if k.startswith("grad_norm/layers.")}
        assert set(parts) == {f"grad_norm/layers.1.{p}" for p in ("attn", "mlp", "interp")}
        assert sum(v * v for v in parts.values()) ** 0.5 == pytest.approx(r["grad_norm"], rel=1e-5)
        for part, value in parts.items():
            per_stream = [r[part.replace("grad_norm/", f"grad_norm/{s}/")] for s in ("long", "short", "s2l")]
            # At step 1 the copy equals its original: dL/dα ∝ h_e − h_p = 0.
            assert all(v > 0 for v in per_stream) or (part.endswith("interp") and r["step"] == 1)
            assert value <= sum(per_stream) * (1 + 1e-6)  # the step's gradient is the streams' sum
    assert os.path.getsize(os.path.join(out, "layer_grad_norms.png")) > 1000


@pytest.mark.parametrize("select", ["above_mean", "lr_scale"])
def test_traced_layers(tmp_path, tiny_llama, built_data, select):
    """optim.layers: traced measures the layers on a diagnostic batch at start-up: above_mean trains only the
    layers above the mean (the others unchanged, without optimiser state, absent from the per-part norms,
    which for one stream are the step's); lr_scale scales each layer's LR (measured again every step here) and
    a resumed run equals the uninterrupted one."""
    from distill.optim.localise import diagnostic_norms, layer_plan

    cfg = recipe(tiny_llama, built_data, tmp_path / "traced", "long_cpt", steps=3)
    cfg["optim"]["layers"] = {"mode": "traced", "select": select, "rows": 2}
    if select == "lr_scale":
        cfg["optim"]["layers"]["every"] = 1
    else:
        cfg["log"]["layer_grad_every"] = 2
    cfg["train"].update({"save_every": 1, "keep_last": 5})
    out = _run(tmp_path, "traced", cfg)
    with open(os.path.join(out, "checkpoints", "step-3", "state.json"), encoding="utf-8") as f:
        trace = json.load(f)["layer_trace"]
    weights = load_file(os.path.join(out, "checkpoints", "step-3", "model.safetensors"))
    initial = load_file(os.path.join(tiny_llama, "model.safetensors"))
    optim = torch.load(os.path.join(out, "checkpoints", "step-3", "optimizer.pt"), weights_only=True)
    if select == "above_mean":
        # The start-up measurement, recomputed here on the same diagnostic rows, decides.
        from distill.config import ModelConfig, RopeConfig
        from distill.data.dataset import PackedStream
        from distill.model.load import load_student

        student = load_student(ModelConfig(path=tiny_llama, dtype="float32"),
                               RopeConfig(method="abf", theta=160000.0, target_length=1024))
        b = PackedStream(built_data["long"]).batch([0, 1])
        norms = diagnostic_norms(student, {k: b[k].reshape(1, -1) for k in ("input_ids", "position_ids",
                                                                          "labels")})
        assert trace["trained"] == layer_plan(norms, "above_mean", 4.0)["trained"]
        assert len(trace["trained"]) == 1
        frozen = 1 - trace["trained"][0]
        for key, value in weights.items():
            if key.startswith(f"model.layers.{frozen}."):
                assert torch.equal(value, initial[key]), key
        n_trainable = sum(1 for n, _ in student.named_parameters()
                          if not n.startswith(f"model.layers.{frozen}."))
        assert len(optim["state"]) == sum(len(g["params"]) for g in optim["param_groups"]) == n_trainable
        records = read_metrics(os.path.join(out, "metrics.jsonl"))
        assert not any(k.startswith("grad_norm/") for k in records[0])  # every 2 steps
        r = records[1]
        parts = {k[len("grad_norm/"):]: v for k, v in r.items() if k.startswith("grad_norm/") and
                 not k.startswith("grad_norm/long/")}
        trained = trace["trained"][0]
        assert set(parts) == {"embed", "head", f"layers.{trained}.attn", f"layers.{trained}.mlp"}
        for k, v in parts.items():  # one stream: its norms are the step's
            assert r[f"grad_norm/long/{k}"] == pytest.approx(v, rel=1e-6)
        assert sum(v * v for v in parts.values()) ** 0.5 == pytest.approx(r["grad_norm"], rel=1e-5)
        assert os.path.isfile(os.path.join(out, "layer_grad_norms.png"))
    else:
        scales = {g["layer"]: g["lr_scale"] for g in optim["param_groups"] if g["layer"] is not None}
        assert scales == {int(i): pytest.approx(s) for i, s in trace["scales"].items()}
        records = read_metrics(os.path.join(out, "metrics.jsonl"))
        cfg2 = {**cfg, "run": {**cfg["run"], "output_dir": str(tmp_path / "resumed")}}
        _run(tmp_path, "resumed", cfg2, "train.max_steps=2")
        _run(tmp_path, "resumed", cfg2)
        resumed = load_file(os.path.join(tmp_path / "resumed", "checkpoints", "step-3",
                                         "model.safetensors"))
        assert all(torch.equal(weights[k], resumed[k]) for k in weights)
        again = read_metrics(os.path.join(tmp_path / "resumed", "metrics.jsonl"))
        assert [r["loss"] for r in records] == [r["loss"] for r in again]


def test_expansion_is_refused_where_unsupported(tmp_path, tiny_llama, built_data, capsys):
    cfg = _expanded_recipe(tiny_llama, built_data, tmp_path / "bad")
    cfg["model"]["expansion"]["layers"] = [7]
    path = write(cfg, tmp_path / "bad.yaml")
    assert train.main([path]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == "error: model.expansion.layers: block 7 does not exist; allowed: 0..1"
    cfg["model"]["expansion"]["layers"] = [1]
    cfg["model"]["expansion"]["interpolation"] = "slerp"
    path = write(cfg, tmp_path / "bad.yaml")
    assert train.main([path]) == 2
    assert "model.expansion.interpolation: 'slerp' is not allowed" in capsys.readouterr().err
