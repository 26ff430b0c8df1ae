"""Resumable runs: SIGKILL at random steps, SIGTERM / SIGUSR1 preemption, damaged checkpoints, a 2-process
run resumed on 1 process, and an output directory that cannot be written. The real command line runs in
subprocesses; "bit-identical" means torch.equal on every tensor of the final weights."""

import json
import os
import random
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch
import yaml
from safetensors.torch import load_file

from distill.train import checkpoint as ckpt
from distill.train.metrics import read_metrics

from .test_train import ROOT, recipe, train_cli, write

STEPS = 6


def resume_recipe(model, data, out, **extra):
    cfg = recipe(model, data, out, "longred", steps=STEPS, **extra)
    cfg["train"].update({"save_every": 2, "keep_last": 2})
    return cfg


def weights(out):
    return load_file(os.path.join(out, "checkpoints", f"step-{STEPS}", "model.safetensors"))


def assert_same_run(out_a, out_b):
    wa, wb = weights(out_a), weights(out_b)
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k
    ma = read_metrics(os.path.join(out_a, "metrics.jsonl"))
    mb = read_metrics(os.path.join(out_b, "metrics.jsonl"))
    assert [r["step"] for r in mb] == list(range(1, STEPS + 1))  # each step exactly once
    timed = {"tokens_per_s", "tflops_per_s", "teacher_tflops_per_s", "mfu"}  # wall-clock rates differ
    for ra, rb in zip(ma, mb):
        untimed = {k: v for k, v in ra.items() if k not in timed}
        assert untimed == {k: v for k, v in rb.items() if k not in timed}


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory, tiny_llama, built_data):
    out = tmp_path_factory.mktemp("reference") / "run"
    proc = train_cli(write(resume_recipe(tiny_llama, built_data, out), out.parent / "r.yaml"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    return str(out)


def start(recipe_path):
    env = {**os.environ, "PYTHONPATH": ROOT, "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1",
           "TOKENIZERS_PARALLELISM": "false"}
    return subprocess.Popen([sys.executable, "-m", "distill.train", recipe_path], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for_step(proc, metrics_path, step, timeout=300):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            return False
        if os.path.exists(metrics_path):
            records = [line for line in open(metrics_path).read().splitlines() if line.strip()]
            if records and len(records) >= step:
                return True
        time.sleep(0.05)
    raise TimeoutError(f"step {step} not reached")


@pytest.mark.slow
def test_sigkill_at_random_steps_resumes_bit_identically(tmp_path, tiny_llama, built_data, reference_run):
    out = tmp_path / "run"
    path = write(resume_recipe(tiny_llama, built_data, out), tmp_path / "r.yaml")
    rng = random.Random(1234)
    kills = 0
    for _ in range(3):
        done = len(read_metrics(out / "metrics.jsonl")) if (out / "metrics.jsonl").exists() else 0
        target = min(STEPS - 1, done + rng.randint(1, 3))
        proc = start(path)
        if wait_for_step(proc, out / "metrics.jsonl", target):
            time.sleep(rng.random() * 0.5)  # anywhere inside the next step, or inside a checkpoint write
            proc.send_signal(signal.SIGKILL)
            kills += 1
        proc.communicate(timeout=60)
    assert kills >= 2
    final = train_cli(path)
    assert final.returncode == 0, final.stderr[-2000:]
    assert_same_run(reference_run, out)


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGUSR1])
def test_signal_writes_checkpoint_and_exits_with_documented_code(tmp_path, tiny_llama, built_data,
                                                                reference_run, sig):
    out = tmp_path / "run"
    path = write(resume_recipe(tiny_llama, built_data, out), tmp_path / "r.yaml")
    proc = start(path)
    assert wait_for_step(proc, out / "metrics.jsonl", 3)
    proc.send_signal(sig)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == ckpt.PREEMPT_EXIT_CODE, stderr[-2000:]
    stopped_at = len(read_metrics(out / "metrics.jsonl"))
    assert stopped_at < STEPS
    assert ckpt.verify(str(out / "checkpoints" / f"step-{stopped_at}")) is None  # a checkpoint at the stop
    final = train_cli(path)
    assert final.returncode == 0, final.stderr[-2000:]
    assert f"resumed from {out}/checkpoints/step-{stopped_at}" in final.stderr
    assert_same_run(reference_run, out)


def test_damaged_newest_checkpoint_is_passed_over(tmp_path, tiny_llama, built_data):
    out = tmp_path / "run"
    cfg = resume_recipe(tiny_llama, built_data, out)
    cfg["train"]["max_steps"] = 4
    cfg["train"]["keep_last"] = 3
    path = write(cfg, tmp_path / "r.yaml")
    from distill.train import loop as train

    assert train.main([path]) == 0
    step4 = out / "checkpoints" / "step-4"
    with open(step4 / "model.safetensors", "r+b") as f:  # truncate the newest checkpoint's weights
        f.truncate(100)
    assert "truncated" in ckpt.verify(str(step4))
    assert ckpt.latest(str(out / "checkpoints")) == str(out / "checkpoints" / "step-2")
    os.remove(out / "checkpoints" / "step-2" / ckpt.MARKER)  # and a missing marker on the next one
    assert ckpt.latest(str(out / "checkpoints")) is None
    cfg["train"]["save_every"] = 1
    cfg["train"]["keep_last"] = 2
    (out / "checkpoints" / "step-2").rename(out / "checkpoints" / "step-1")  # marker-less, passed over too
    proc = train_cli(write(cfg, tmp_path / "r2.yaml"), "train.max_steps=5")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "passing over checkpoint" in proc.stderr and "resumed from" not in proc.stderr


def test_unwritable_output_dir_is_one_clear_line(tmp_path, tiny_llama, built_data, capsys):
    from distill.train import loop as train

    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    cfg = resume_recipe(tiny_llama, built_data, blocker / "run")
    capsys.readouterr()
    assert train.main([write(cfg, tmp_path / "r.yaml")]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith("error: run.output_dir: cannot create")
    assert blocker.read_text() == "not a directory"


def test_full_disk_during_checkpoint_keeps_existing_ones(tmp_path, tiny_llama, built_data, monkeypatch):
    """A save that fails mid-way (ENOSPC) raises one clear error; complete checkpoints stay intact."""
    from distill.config import load_recipe
    from distill.train import loop as train

    out = tmp_path / "run"
    cfg = resume_recipe(tiny_llama, built_data, out)
    cfg["train"]["max_steps"] = 4
    path = write(cfg, tmp_path / "r.yaml")
    real_save = ckpt.save_file
    calls = {"n": 0}

    def failing_save(tensors, filename, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:  # the second checkpoint: write part of the file, then the disk is full
            with open(filename, "wb") as f:
                f.write(b"\0" * 1000)
            raise OSError(28, "No space left on device")
        return real_save(tensors, filename, *args, **kwargs)

    monkeypatch.setattr(ckpt, "save_file", failing_save)
    with pytest.raises(ckpt.CheckpointError, match="No space left on device"):
        train.run(load_recipe(path))
    assert ckpt.latest(str(out / "checkpoints")) == str(out / "checkpoints" / "step-2")
    assert not any(p.name.endswith(".tmp") for p in (out / "checkpoints").iterdir())
    monkeypatch.setattr(ckpt, "save_file", real_save)
    assert train.main([path]) == 0  # and the run resumes from the intact checkpoint
    assert [r["step"] for r in read_metrics(out / "metrics.jsonl")] == [1, 2, 3, 4]


def test_init_from_starts_a_new_stage(tmp_path, tiny_llama, built_data, caplog):
    from distill.train import loop as train

    first = tmp_path / "first"
    cfg = resume_recipe(tiny_llama, built_data, first)
    cfg["train"]["max_steps"] = 2
    assert train.main([write(cfg, tmp_path / "a.yaml")]) == 0
    cfg["run"]["output_dir"] = str(tmp_path / "second")
    cfg["train"]["init_from"] = str(first / "checkpoints" / "step-2")
    with caplog.at_level("INFO", logger="distill.train"):
        code, live = train.run(train.load_recipe(write(cfg, tmp_path / "b.yaml")), return_state=True)
    assert code == 0
    assert "initialised the student from" in caplog.text
    saved = load_file(str(first / "checkpoints" / "step-2" / "model.safetensors"))
    assert not all(torch.equal(saved[k], v) for k, v in live["student"].state_dict().items() if k in saved)
    records = read_metrics(tmp_path / "second" / "metrics.jsonl")
    assert [r["step"] for r in records] == [1, 2]  # fresh step counter, optimiser and data state
    assert yaml.safe_load(open(tmp_path / "second" / "config.yaml"))["train"]["init_from"].endswith("step-2")


def test_second_run_into_the_same_output_dir_is_refused(tmp_path, tiny_llama, built_data):
    """Two launches of one recipe into one run.output_dir: the second refuses with one line naming the
    holder (host, pid, since when) and touches nothing; the first runs on."""
    out = tmp_path / "run"
    cfg = resume_recipe(tiny_llama, built_data, out)
    cfg["train"]["max_steps"] = 500  # still running when the second launch looks
    path = write(cfg, tmp_path / "r.yaml")
    first = start(path)
    assert wait_for_step(first, out / "metrics.jsonl", 1)
    second = train_cli(path)
    lines = [line for line in second.stderr.splitlines() if line.startswith("error:")]
    assert second.returncode == 2 and len(lines) == 1, second.stderr[-2000:]
    assert "Traceback" not in second.stderr
    assert f"is in use by another run (host {socket.gethostname()}, pid {first.pid}, since " in lines[0]
    assert first.poll() is None  # the first run is untouched and still going
    first.send_signal(signal.SIGUSR1)
    _, stderr = first.communicate(timeout=300)
    assert first.returncode == ckpt.PREEMPT_EXIT_CODE, stderr[-2000:]
    steps = [r["step"] for r in read_metrics(out / "metrics.jsonl")]
    assert steps == list(range(1, len(steps) + 1))  # one writer: each step once
    assert not (out / ckpt.RunLock.NAME).exists()  # released when the run ends


def test_lock_of_a_killed_run_is_taken_over(tmp_path, tiny_llama, built_data):
    out = tmp_path / "run"
    cfg = resume_recipe(tiny_llama, built_data, out)
    cfg["train"]["max_steps"] = 3
    path = write(cfg, tmp_path / "r.yaml")
    proc = start(path)
    assert wait_for_step(proc, out / "metrics.jsonl", 2)
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=60)
    assert (out / ckpt.RunLock.NAME).exists()  # left behind by the killed run
    again = train_cli(path)
    assert again.returncode == 0, again.stderr[-2000:]
    assert "taking over the lock" in again.stderr and f"its process {proc.pid} is gone" in again.stderr


def test_lock_staleness_rules(tmp_path, monkeypatch):
    """Same host and a dead pid, an earlier incarnation of the same SLURM job (requeued), or no heartbeat for
    STALE_AFTER_S: stale. A live holder elsewhere with a fresh heartbeat, or another job: held."""
    lock = ckpt.RunLock(str(tmp_path))
    (tmp_path / ckpt.RunLock.NAME).write_text("{}")
    elsewhere = {"host": "other-node", "pid": 123, "slurm_job_id": "77", "slurm_restart_count": "0"}
    monkeypatch.setenv("SLURM_JOB_ID", "77")
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    assert "requeued" in lock._stale_reason(elsewhere)
    monkeypatch.setenv("SLURM_RESTART_COUNT", "0")  # the same incarnation: a second launch inside the job
    assert lock._stale_reason(elsewhere) is None
    monkeypatch.setenv("SLURM_JOB_ID", "78")
    assert lock._stale_reason(elsewhere) is None
    old = time.time() - ckpt.RunLock.STALE_AFTER_S - 5
    os.utime(tmp_path / ckpt.RunLock.NAME, (old, old))
    assert "no heartbeat" in lock._stale_reason(elsewhere)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    assert "is gone" in lock._stale_reason({"host": socket.gethostname(), "pid": dead.pid})
    os.utime(tmp_path / ckpt.RunLock.NAME)
    with pytest.raises(ckpt.RunLockError, match=r"in use by another run \(host other-node, pid 123"):
        (tmp_path / ckpt.RunLock.NAME).write_text(json.dumps(elsewhere))
        lock.acquire()


def test_stop_file_checkpoints_and_exits_zero_with_a_note(tmp_path, tiny_llama, built_data, reference_run):
    """The job-script protocol: the stop file asks for a stop; the trainer checkpoints, leaves
    `<stop file>.checkpointed` holding the step and exits 0 (a planned stop, not a failure for the
    launcher)."""
    out = tmp_path / "run"
    stop = tmp_path / "stop"
    path = write(resume_recipe(tiny_llama, built_data, out), tmp_path / "r.yaml")
    env = {**os.environ, "PYTHONPATH": ROOT, "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1",
           "TOKENIZERS_PARALLELISM": "false", "DISTILL_STOP_FILE": str(stop)}
    proc = subprocess.Popen([sys.executable, "-m", "distill.train", path], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert wait_for_step(proc, out / "metrics.jsonl", 2)
    stop.touch()
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 0, stderr[-2000:]
    stopped_at = len(read_metrics(out / "metrics.jsonl"))
    assert stopped_at < STEPS and "Traceback" not in stderr
    assert f"preempted at step {stopped_at} (the stop file): checkpoint written" in stderr
    assert (tmp_path / "stop.checkpointed").read_text().strip() == str(stopped_at) and not stop.exists()
    assert not (out / "final").exists()
    again = subprocess.run([sys.executable, "-m", "distill.train", path], cwd=ROOT, env=env,
                           capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-2000:]
    assert_same_run(reference_run, out)


def test_stop_on_the_last_step_finishes_the_run(tmp_path, tiny_llama, built_data):
    """A stop that arrives on the last step is no preemption: the run completes (export), leaves no note, and
    a job script has nothing to requeue."""
    out = tmp_path / "run"
    stop = tmp_path / "stop"
    stop.touch()  # already there when the first (and last) step ends
    cfg = resume_recipe(tiny_llama, built_data, out)
    cfg["train"]["max_steps"] = 1
    proc = train_cli(write(cfg, tmp_path / "r.yaml"), env_extra={"DISTILL_STOP_FILE": str(stop)})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (out / "final" / "config.json").exists()
    assert not (tmp_path / "stop.checkpointed").exists() and not stop.exists()
    assert "preempted" not in proc.stderr


def test_a_run_killed_during_its_export_exports_on_the_rerun(tmp_path, tiny_llama, built_data, caplog):
    """The last checkpoint is written before the export: a kill in between used to leave a run that had
    "nothing to do" and no final/. The export is also atomic (a temporary directory renamed at the end)."""
    from distill.train import loop as train

    out = tmp_path / "run"
    cfg = resume_recipe(tiny_llama, built_data, out)
    cfg["train"]["max_steps"] = 2
    path = write(cfg, tmp_path / "r.yaml")
    assert train.main([path]) == 0
    exported = load_file(str(out / "final" / "model.safetensors"))
    import shutil

    shutil.rmtree(out / "final")
    with caplog.at_level("INFO", logger="distill.train"):
        assert train.main([path]) == 0
    assert "nothing to do" in caplog.text and "exported" in caplog.text
    again = load_file(str(out / "final" / "model.safetensors"))
    assert exported.keys() == again.keys() and all(torch.equal(exported[k], again[k]) for k in exported)
    assert not [p for p in os.listdir(out) if p.startswith("final.")]  # no temporary left behind
