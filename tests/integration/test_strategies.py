"""Every parallel mode through the shipped loop: 2 CPU processes (gloo) launched with `accelerate launch` and
the repository's launcher configs, against 1 process on the same recipe and data.

One launch per mode runs tests/integration/strategy_worker.py: `distill.train.loop.main` (the real set-up,
step
and checkpoints) several times. For each mode (replicated data parallel, FSDP2, ZeRO-3):
- 2 processes equal 1 process per step (losses, grad norms) and in the final weights;
- a run stopped after step 2 and resumed is bit-identical to the uninterrupted run (weights, optimiser);
- a skipped non-finite step leaves no trace: weights and AdamW state untouched, and the run that follows
  equals the 1-process run with the same skipped step;
- a 2-process checkpoint resumes on 1 process.
FSDP2 also: activation checkpointing and once-per-step gradient reduction give the same steps; the sharded
teacher's truncated hidden states are exact (FSDP2 and ZeRO-3).
"""

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoConfig

from distill.testing import checkpoint_optimizer, checkpoint_weights
from distill.train.metrics import read_metrics

from ..conftest import FLASH_STANDIN
from .test_train import ROOT, recipe, write

STEPS = 3
LAUNCH = {"ddp": "cpu2.yaml", "fsdp2": "fsdp2.yaml", "zero3": "zero3.yaml"}
PORTS = {"ddp": "29553", "fsdp2": "29554", "zero3": "29555"}


def strategy_recipe(model, data, out):
    cfg = recipe(model, data, out, "longred", steps=STEPS)
    cfg["optim"]["max_grad_norm"] = 0.5  # small enough that the tiny model's gradients are clipped
    cfg["train"].update({"save_every": 1, "keep_last": 5, "export": False})
    cfg["parallel"] = {"collective_timeout_s": 1234}
    return cfg


def launch(mode: str, recipe_path: str, out: str, teacher: str) -> subprocess.CompletedProcess:
    """The worker under `accelerate launch` with the mode's launcher config; once more if a worker died of
    SIGABRT inside gloo (seen at start-up once in a dozen CI runs here, and once mid-run in a collective on a
    machine loaded by other work; unrelated to the code under test, which a second failure would show)."""
    # The flash-attn stand-in on the path (its sitecustomize patches transformers at start-up): the flash/
    # runs dispatch flash_attention_2 to it; the others ask for sdpa_varlen (auto on a CPU), never use it.
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([FLASH_STANDIN, ROOT]), "OMP_NUM_THREADS": "1",
           "TOKENIZERS_PARALLELISM": "false", "WANDB_MODE": "disabled", "ACCELERATE_USE_CPU": "1",
           "DS_BUILD_OPS": "0"}
    worker = os.path.join(ROOT, "tests", "integration", "strategy_worker.py")
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
           os.path.join(ROOT, "recipes", "accelerate", LAUNCH[mode]), "--num_processes", "2",
           "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", PORTS[mode],
           worker, recipe_path, out, "--teacher", teacher]
    proc = subprocess.run(cmd, check=False, capture_output=True, text=True, env=env, timeout=900, cwd=ROOT)
    if proc.returncode != 0 and "SIGABRT" in proc.stderr:
        for name in os.listdir(out):  # what the failed run wrote; the recipe may live in `out` too
            full = os.path.join(out, name)
            if os.path.abspath(full) != os.path.abspath(recipe_path):
                shutil.rmtree(full) if os.path.isdir(full) else os.remove(full)
        proc = subprocess.run(cmd, check=False, capture_output=True, text=True, env=env, timeout=900,
                              cwd=ROOT)
    return proc


@pytest.fixture(scope="module")
def single(tmp_path_factory, tiny_llama, built_data, flash_standin):
    """1-process references in this process: full (3 steps), poisoned (step 1 NaN), bf16 with sdpa_varlen,
    and flash_attention_2 through the stand-in (its calls in flash/flash_calls.json, with how often
    transformers derived document offsets itself: flash/derived.json)."""
    import transformers.modeling_flash_attention_utils as fa_utils

    from distill.train import loop as train
    from tests.integration.strategy_worker import BF16, EXPANDED, LOCALISED, SPARSE, flash_run, poisoned_run

    root = tmp_path_factory.mktemp("single")
    path = write(strategy_recipe(tiny_llama, built_data, root / "full"), root / "r.yaml")
    assert train.main([path]) == 0
    assert poisoned_run(path, str(root / "poisoned")) == 0
    assert train.main([path, f"run.output_dir={root / 'sparse'}", *SPARSE]) == 0
    assert train.main([path, f"run.output_dir={root / 'expanded'}", *EXPANDED]) == 0
    assert train.main([path, f"run.output_dir={root / 'localised'}", *LOCALISED]) == 0
    assert train.main([path, f"run.output_dir={root / 'bf16'}", *BF16]) == 0
    derived, real = [], fa_utils.prepare_fa_kwargs_from_position_ids

    def spy(position_ids):  # transformers' own derivation of cu_seqlens, in every layer, when not given them
        derived.append(int(position_ids.numel()))
        return real(position_ids)

    fa_utils.prepare_fa_kwargs_from_position_ids = spy
    try:
        assert flash_run(path, str(root / "flash")) == 0
    finally:
        fa_utils.prepare_fa_kwargs_from_position_ids = real
    with open(root / "flash" / "derived.json", "w", encoding="utf-8") as f:
        json.dump(derived, f)
    return {"root": root, "recipe": path, "full": root / "full", "poisoned": root / "poisoned",
            "sparse": root / "sparse", "expanded": root / "expanded", "localised": root / "localised",
            "bf16": root / "bf16", "flash": root / "flash"}


@pytest.fixture(scope="module", params=["ddp", "fsdp2", "zero3"])
def two(request, tmp_path_factory, tiny_llama, built_data):
    mode = request.param
    if mode == "zero3":
        pytest.importorskip("deepspeed", reason="ZeRO-3 needs deepspeed (pip install --no-build-isolation "
                                                "deepspeed)")
    root = tmp_path_factory.mktemp(mode)
    path = write(strategy_recipe(tiny_llama, built_data, root / "unused"), root / "r.yaml")
    proc = launch(mode, path, str(root), tiny_llama)
    first = [line for line in proc.stderr.splitlines() if "[rank0]" in line or "terminate" in line][:30]
    assert proc.returncode == 0, proc.stdout[-3000:] + "\n".join(first) + proc.stderr[-6000:]
    with open(root / "codes.json", encoding="utf-8") as f:
        codes = json.load(f)
    startup, refused = codes["codes"].pop("startup", None), codes["codes"].pop("sequence_sdpa", None)
    assert codes["world"] == 2 and set(codes["codes"].values()) == {0}, codes
    assert startup == (3 if mode == "ddp" else None), codes
    assert refused == (2 if mode == "fsdp2" else None), codes
    assert codes["timeout_s"] == 1234  # parallel.collective_timeout_s reached the process group
    assert codes["mode"] == {"ddp": "replicated", "fsdp2": "fsdp2", "zero3": "zero3"}[mode]
    return {"mode": mode, "root": root, "recipe": path, "stderr": proc.stderr}


def _weights(run, step):  # either format: FSDP2 writes sharded checkpoints
    return checkpoint_weights(os.path.join(run, "checkpoints", f"step-{step}"))


def _optim(run, step):
    return checkpoint_optimizer(os.path.join(run, "checkpoints", f"step-{step}"))


def _max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k].double() - b[k].double()).abs().max().item() for k in a)


def _assert_steps_close(got: list[dict], want: list[dict], rel=1e-4):
    assert [r["step"] for r in got] == [r["step"] for r in want]
    for rg, rw in zip(got, want):
        assert rg["tokens"] == rw["tokens"] and rg["skipped_steps"] == rw["skipped_steps"]
        keys = {k for k in rw if k.startswith("loss")}
        assert keys == {k for k in rg if k.startswith("loss")}
        for key in sorted(keys) + ["grad_norm"]:
            if isinstance(rw[key], str):  # "nan" / "inf": non-finite on both sides
                assert rg[key] == rw[key], (rw["step"], key)
            else:
                assert rg[key] == pytest.approx(rw[key], rel=rel, abs=1e-6), (rw["step"], key)


def _assert_optimizer_close(got: dict, want: dict) -> None:
    """Same param ids, order and hyper-parameters (the kernel flags aside: sharded runs use torch's default
    AdamW kernel, one process the fused one), same steps; moments within 1e-4 of their scale (the summation
    order of a sharded run differs)."""
    def hyper(groups):
        return [{k: v for k, v in g.items() if k not in ("fused", "foreach")} for g in groups]

    assert hyper(got["param_groups"]) == hyper(want["param_groups"])
    assert got["state"].keys() == want["state"].keys() and len(want["state"]) > 0
    for pid, entry in want["state"].items():
        assert float(got["state"][pid]["step"]) == float(entry["step"])
    _assert_moments_close(got, want)


def _assert_moments_close(got: dict, want: dict) -> None:
    """AdamW's moments of every parameter in `want` within 1e-4 of their scale."""
    for pid, entry in want["state"].items():
        for key in ("exp_avg", "exp_avg_sq"):
            scale = entry[key].abs().max().item()
            torch.testing.assert_close(got["state"][pid][key], entry[key], rtol=1e-4, atol=1e-4 * scale)


@pytest.mark.slow
def test_two_processes_match_one(two, single, tiny_llama):
    full = two["root"] / "full"
    _assert_steps_close(read_metrics(full / "metrics.jsonl"), read_metrics(single["full"] / "metrics.jsonl"))
    assert max(r["grad_norm"] for r in read_metrics(full / "metrics.jsonl")) > 0.5  # clipping was exercised
    want = _weights(single["full"], STEPS)
    assert _max_diff(_weights(full, STEPS), want) < 1e-5
    init = load_file(os.path.join(tiny_llama, "model.safetensors"))
    assert max((want[k] - init[k]).abs().max().item() for k in init) > 1e-4  # training moved the weights
    _assert_optimizer_close(_optim(full, STEPS), _optim(single["full"], STEPS))


@pytest.mark.slow
def test_resume_is_bit_identical(two):
    full, resumed = two["root"] / "full", two["root"] / "resumed"
    a, b = _weights(full, STEPS), _weights(resumed, STEPS)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    oa, ob = _optim(full, STEPS), _optim(resumed, STEPS)
    assert oa["param_groups"] == ob["param_groups"] and len(oa["state"]) > 0
    assert all(torch.equal(oa["state"][i][k], ob["state"][i][k]) for i in oa["state"] for k in oa["state"][i])
    ma, mb = read_metrics(full / "metrics.jsonl"), read_metrics(resumed / "metrics.jsonl")
    timed = {"tokens_per_s", "tflops_per_s", "teacher_tflops_per_s", "mfu"}
    assert [{k: v for k, v in r.items() if k not in timed} for r in ma] == \
        [{k: v for k, v in r.items() if k not in timed} for r in mb]


@pytest.mark.slow
def test_skipped_step_leaves_no_trace(two, single, tiny_llama):
    poisoned = two["root"] / "poisoned"
    records = read_metrics(poisoned / "metrics.jsonl")
    assert [r["skipped_steps"] for r in records] == [1, 1, 1]
    assert records[0]["loss"] == "nan"  # metrics.jsonl spells a non-finite value as a string
    init = load_file(os.path.join(tiny_llama, "model.safetensors"))
    after_skip = _weights(poisoned, 1)
    assert all(torch.equal(after_skip[k], init[k]) for k in init)  # the skipped step changed nothing
    assert _optim(poisoned, 1)["state"] == {}  # and AdamW never stepped
    assert all(float(e["step"]) == 2.0 for e in _optim(poisoned, STEPS)["state"].values())
    # The steps after the skip are those of 1 process with the same skip: no gradient left over.
    _assert_steps_close(records, read_metrics(single["poisoned"] / "metrics.jsonl"))
    assert _max_diff(_weights(poisoned, STEPS), _weights(single["poisoned"], STEPS)) < 1e-5


@pytest.mark.slow
def test_two_process_checkpoint_resumes_on_one_process(two, single, tmp_path, caplog):
    from distill.train import loop as train

    out = tmp_path / "run"
    shutil.copytree(two["root"] / "full", out)
    shutil.rmtree(out / "checkpoints" / f"step-{STEPS}")
    with caplog.at_level("INFO", logger="distill.train"):
        assert train.main([two["recipe"], f"run.output_dir={out}"]) == 0
    assert "saved on 2 processes, now 1" in caplog.text
    full = two["root"] / "full"
    _assert_steps_close(read_metrics(out / "metrics.jsonl"), read_metrics(full / "metrics.jsonl"))
    assert _max_diff(_weights(out, STEPS), _weights(two["root"] / "full", STEPS)) < 1e-5


@pytest.mark.slow
def test_fsdp2_with_sequence_parallelism_matches_one_process(two, single, tmp_path, tiny_llama):
    """FSDP2 + Ulysses, and + ring, over 2 ranks (the long stream's rows split in two) with checkpointing: the
    same steps as one process, the all-to-all entered by the long stream's student only, and its checkpoint
    resumes on one process."""
    if two["mode"] != "fsdp2":
        return
    from distill.train import loop as train

    run = two["root"] / "sequence"
    _assert_steps_close(read_metrics(run / "metrics.jsonl"), read_metrics(single["full"] / "metrics.jsonl"))
    assert _max_diff(_weights(run, STEPS), _weights(single["full"], STEPS)) < 1e-5
    with open(two["root"] / "sequence.json", encoding="utf-8") as f:
        calls = json.load(f)
    layers = AutoConfig.from_pretrained(tiny_llama).num_hidden_layers
    long_forwards = sum(r["tokens/long"] // 1024 for r in read_metrics(run / "metrics.jsonl"))
    # Each long micro-batch: every layer's attention in the forward and again in the checkpointed recompute;
    # never the teacher's or the short streams' forwards.
    assert calls == {"long": 2 * layers * long_forwards}
    # Ring attention instead of Ulysses (zigzag slices, K/V round the ring, its own backward): the same steps.
    ring = two["root"] / "sequence_ring"
    _assert_steps_close(read_metrics(ring / "metrics.jsonl"), read_metrics(single["full"] / "metrics.jsonl"))
    assert _max_diff(_weights(ring, STEPS), _weights(single["full"], STEPS)) < 1e-5
    with open(two["root"] / "sequence_ring.json", encoding="utf-8") as f:
        assert json.load(f) == {"long": 2 * layers * long_forwards}
    resumed = tmp_path / "resumed"
    shutil.copytree(run, resumed)
    shutil.rmtree(resumed / "checkpoints" / f"step-{STEPS}")
    assert train.main([two["recipe"], f"run.output_dir={resumed}"]) == 0
    _assert_steps_close(read_metrics(resumed / "metrics.jsonl"), read_metrics(run / "metrics.jsonl"))


@pytest.mark.slow
def test_parameters_no_loss_reached_are_not_stepped(two, single):
    """Data parallel: a parameter no rank's loss reached in a step (lm_head while the only LM stream is
    absent) keeps no gradient, as on one process, so AdamW leaves it (and its moments) alone."""
    if two["mode"] != "ddp":
        return
    records = read_metrics(two["root"] / "sparse" / "metrics.jsonl")
    assert [("tokens/long" in r) for r in records] == [False, True, False]
    _assert_steps_close(records, read_metrics(single["sparse"] / "metrics.jsonl"))
    assert _max_diff(_weights(two["root"] / "sparse", STEPS), _weights(single["sparse"], STEPS)) < 1e-5
    a, b = _optim(two["root"] / "sparse", STEPS), _optim(single["sparse"], STEPS)
    assert a["state"].keys() == b["state"].keys()
    assert sorted(float(e["step"]) for e in a["state"].values()) == sorted(float(e["step"]) for e in
                                                                          b["state"].values())


@pytest.mark.slow
def test_zero3_builds_each_rank_its_partitions_alone(two, tiny_llama):
    """Under ZeRO-3 from_pretrained runs inside zero.Init (the strategy's HfDeepSpeedConfig alive): the
    student (fp32 masters) and the teacher (the recipe's dtype) reach `setup` already partitioned, each rank
    holding about half of every model, never a whole one."""
    if two["mode"] != "zero3":
        return
    with open(two["root"] / "partitions.json", encoding="utf-8") as f:
        ranks = json.load(f)
    whole = sum(t.numel() for t in load_file(os.path.join(tiny_llama, "model.safetensors")).values())
    assert len(ranks) == 2
    for seen in ranks:
        for name in ("student", "teacher"):
            assert seen[name]["built_partitioned"], (name, seen)
            assert seen[name]["whole"] == whole
            assert seen[name]["local"] <= 0.55 * whole, (name, seen)
        assert seen["student"]["dtype"] == "torch.float32" and seen["teacher"]["dtype"] == "torch.float32"
    assert sum(s["student"]["local"] for s in ranks) >= whole  # together they hold all of it


@pytest.mark.slow
def test_zero3_checkpoints_are_written_per_rank_and_consolidate(two, tmp_path):
    """ZeRO-3 writes the engine's own checkpoint: one partition file a rank under zero/state/, none near the
    whole state (12 bytes a parameter: fp32 weights and AdamW's two moments), no file gathered on rank 0;
    `consolidate` (scripts/evaluate.py, merge.py) turns it into model.safetensors with the trained weights."""
    if two["mode"] != "zero3":
        return
    from distill.model.export import consolidate

    path = two["root"] / "full" / "checkpoints" / f"step-{STEPS}"
    assert not (path / "model.safetensors").exists() and not (path / "optimizer.pt").exists()
    parts = sorted((path / "zero" / "state").glob("*_optim_states.pt"))
    assert [p.name for p in parts] == [f"zero_pp_rank_{r}_mp_rank_00_optim_states.pt" for r in range(2)]
    weights = _weights(two["root"] / "full", STEPS)
    whole = 12 * sum(t.numel() for t in weights.values())
    largest = max(f.stat().st_size for f in path.rglob("*") if f.is_file())
    assert largest < 0.6 * whole, (largest, whole)
    with open(path / "COMPLETE", encoding="utf-8") as f:  # the marker covers every rank's files
        assert {f"zero/state/{p.name}" for p in parts} <= set(json.load(f)["files"])
    copy = tmp_path / "ckpt"
    shutil.copytree(path, copy)
    consolidate(str(copy))
    got = load_file(str(copy / "model.safetensors"))
    assert got.keys() == weights.keys() and all(torch.equal(got[k], weights[k]) for k in got)


def _assert_part_norms_close(got: list[dict], want: list[dict], per_stream: bool = True) -> int:
    """The per-part gradient norms of every step agree (the step's, and each stream's when `per_stream`);
    returns how many were compared."""
    compared = 0
    for rg, rw in zip(got, want):
        keys = {k for k in rw if k.startswith("grad_norm/") and (per_stream or k.count("/") == 1)}
        assert keys == {k for k in rg if k.startswith("grad_norm/")}, rw["step"]
        for key in keys:
            assert rg[key] == pytest.approx(rw[key], rel=1e-4, abs=1e-7), (rw["step"], key)
            compared += 1
    return compared


@pytest.mark.slow
def test_expansion_and_gradient_norms_match_one_process(two, single, tiny_llama):
    """Hybrid expansion with optim.layers traced (lr_scale) on 2 processes (data parallel, FSDP2) equals 1
    process: losses with the alignment objective, grad norms, every per-part and per-stream gradient norm
    (FSDP2's reduced over shards), the per-layer LR factors, the final weights and the optimiser (no state for
    frozen parameters). ZeRO-3, which refuses expansion, runs traced alone and logs the step's per-part norms
    (its gradients live in DeepSpeed's partitions)."""
    name = "localised" if two["mode"] == "zero3" else "expanded"
    run, ref = two["root"] / name, single[name]
    got, want = read_metrics(run / "metrics.jsonl"), read_metrics(ref / "metrics.jsonl")
    _assert_steps_close(got, want)
    compared = _assert_part_norms_close(got, want, per_stream=two["mode"] != "zero3")
    assert _max_diff(_weights(run, STEPS), _weights(ref, STEPS)) < 1e-5
    opt_got, opt_want = _optim(run, STEPS), _optim(ref, STEPS)
    assert [g.get("lr_scale") for g in opt_got["param_groups"]] == \
        pytest.approx([g.get("lr_scale") for g in opt_want["param_groups"]], rel=1e-4)
    assert len({g["lr_scale"] for g in opt_want["param_groups"]}) > 1  # layers got different LRs
    if name == "expanded":
        assert "loss/short/alignment" in want[-1] and "grad_norm/short/layers.1.interp" in want[-1]
        assert compared == STEPS * 6 * 4  # 2 layers x 3 parts, the step and 3 streams
        trainable = [k for k in _weights(ref, STEPS)
                     if k.startswith("model.layers.") and ".original." not in k]
        assert len(opt_want["state"]) == len(trainable)
        _assert_moments_close(opt_got, opt_want)
    else:
        assert compared > 0


@pytest.mark.slow
def test_fsdp2_options_and_sharded_teachers(two):
    if two["mode"] == "ddp":
        assert not (two["root"] / "teacher.json").exists()
        return
    with open(two["root"] / "teacher.json", encoding="utf-8") as f:
        teacher = json.load(f)
    assert teacher["partitioned"] == (two["mode"] == "zero3")  # ZeRO-3 layers are empty outside forward
    assert set(teacher["diffs"]) == {"[0]", "[1]", "[1, 2]", "[2]"}  # embeddings, truncated, full depth
    assert all(d <= 1e-6 for d in teacher["diffs"].values()), teacher["diffs"]
    if two["mode"] == "fsdp2":
        assert "FSDP2: student and teacher sharded over 2 processes" in two["stderr"]
        full = read_metrics(two["root"] / "full" / "metrics.jsonl")
        for variant in ("checkpointing", "deferred"):
            _assert_steps_close(read_metrics(two["root"] / variant / "metrics.jsonl"), full, rel=1e-5)
            variant_weights = _weights(two["root"] / variant, STEPS)
            assert _max_diff(variant_weights, _weights(two["root"] / "full", STEPS)) < 1e-5
    else:
        described = "DeepSpeed ZeRO-3: student (with optimiser) and teacher partitioned over 2 processes"
        assert described in two["stderr"]


def _varlen_offsets(calls: list[dict]) -> set[tuple[int, ...]]:
    """The document offsets the varlen entry point received, over all calls."""
    return {tuple(c["cu_seqlens"]) for c in calls if c["entry"] == "flash_attn_varlen_func"}


def _flash_calls(run) -> list[list[dict]]:
    with open(run / "flash_calls.json", encoding="utf-8") as f:
        return json.load(f)


@pytest.mark.slow
def test_flash_attention_runs_match_sdpa_varlen(two, single, tiny_llama):
    """flash_attention_2 (transformers' own flash path, the CPU stand-in underneath) in bf16 with gradient
    checkpointing: 1 process and 2 processes in every mode (FSDP2 also with sequence parallelism over both
    ranks, GQA) train the same steps as sdpa_varlen in bf16, within bf16 noise. Every packed micro-batch
    reached the varlen entry point with its documents separated by the offsets the step computed (the
    1-process run's set of offsets, which the layout tests tie to the data); transformers derived none
    itself in training; nothing reached flash-attn in fp32."""
    want = read_metrics(single["bf16"] / "metrics.jsonl")
    runs = [single["flash"], two["root"] / "flash"]
    if two["mode"] == "fsdp2":
        runs.append(two["root"] / "flash_sequence")
    for run in runs:
        _assert_steps_close(read_metrics(run / "metrics.jsonl"), want, rel=3e-2)
    reference = _flash_calls(single["flash"])[0]
    offsets = _varlen_offsets(reference)
    total = {1024}  # every training micro-batch here flattens to 1024 tokens (1 x 1024 long, 4 x 256 short)
    assert {o[-1] for o in offsets} >= total and any(len(o) > 3 for o in offsets), offsets
    layers = AutoConfig.from_pretrained(tiny_llama).num_hidden_layers
    with open(single["flash"] / "derived.json", encoding="utf-8") as f:
        derived = json.load(f)
    assert derived == [18] * layers  # only the start-up check's packed row (7 + 11 tokens) was left to derive
    for run in runs[1:]:
        per_rank = _flash_calls(run)
        assert len(per_rank) == 2 and all(per_rank)
        assert set().union(*(_varlen_offsets(c) for c in per_rank)) == offsets, run
    for calls in [reference, *_flash_calls(runs[1])]:
        assert {c["dtype"] for c in calls} == {"bfloat16"} and all(c["causal"] for c in calls)
    # ZeRO-3 computes with autocast's cast cache off (a cached cast of a gathered weight stays on every rank
    # until the step's autocast region ends: a whole bf16 model per GPU); the other modes keep it.
    assert {c["autocast_cache"] for c in reference} == {True}
    assert {c["autocast_cache"] for calls in _flash_calls(runs[1]) for c in calls} == {two["mode"] != "zero3"}


@pytest.mark.slow
def test_a_failing_start_up_check_stops_every_rank_with_one_line(two):
    """Rank 0's start-up check raises (the fp32 flash-attn failure of old): both ranks stop with the same
    one-line error and exit code 3, neither waits in a collective, and no traceback is printed."""
    if two["mode"] != "ddp":
        return
    line = "error: start-up check failed: RuntimeError: FlashAttention only support fp16 and bf16 data type"
    assert two["stderr"].count(line) == 2, two["stderr"][-3000:]
    assert "Traceback" not in two["stderr"]


@pytest.mark.slow
def test_sequence_parallelism_with_sdpa_is_refused_in_one_line(two):
    if two["mode"] != "fsdp2":
        return
    line = ("error: parallel.sequence_parallel: 2 needs model.attention auto, sdpa_varlen or "
            "flash_attention_2 (the attention sees the whole row, while 'sdpa' builds its mask for this "
            "rank's slice)")
    assert two["stderr"].count(line) == 2, two["stderr"][-3000:]
    assert not (two["root"] / "sequence_sdpa" / "config.yaml").exists()  # nothing loaded, nothing written
