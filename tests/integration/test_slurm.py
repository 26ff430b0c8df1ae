"""scripts/slurm/train.sbatch on a real one-node SLURM (munge, slurmctld and slurmd on this machine, started
by scripts/slurm/local_cluster.sh; .ci/run's environment is root with Debian's packages).

Two jobs of the same recipe, each `accelerate launch` with 2 CPU ranks: one uninterrupted, one sent SIGUSR1 by
SLURM (`scancel --batch --signal=USR1`, what `--signal=B:USR1@1200` does before the time limit). The second
checkpoints, exits cleanly, requeues itself, resumes, and ends with weights bit-identical to the first; its
log says what happened in one line and carries no traceback.
"""

import os
import re
import shutil
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from distill.train.metrics import read_metrics

from .test_train import ROOT, recipe, write

SCRIPT = os.path.join(ROOT, "scripts", "slurm", "train.sbatch")
CLUSTER = os.path.join(ROOT, "scripts", "slurm", "local_cluster.sh")
STEPS = 6


@pytest.fixture(scope="module")
def slurm():
    """The environment for SLURM commands against the local cluster (started here if needed)."""
    reason = None
    if os.geteuid() != 0:
        reason = "the local SLURM cluster needs root (apt-get, munge, the daemons)"
    else:
        proc = subprocess.run(["bash", CLUSTER, "start"], capture_output=True, text=True, timeout=600)
        if proc.returncode != 0:
            reason = f"scripts/slurm/local_cluster.sh failed: {(proc.stderr or proc.stdout).strip()[-500:]}"
    if reason is not None:
        if os.environ.get("CI"):
            pytest.fail(reason)  # CI runs as root on a machine that installs slurm-wlm: this must work there
        pytest.skip(reason)
    env = {**os.environ, "SLURM_CONF": "/tmp/distill-slurm/slurm.conf"}
    yield env


def _job(env, job_id: str) -> dict:
    out = subprocess.run(["scontrol", "show", "job", job_id], capture_output=True, text=True, env=env).stdout
    return dict(re.findall(r"(\w+)=(\S+)", out))


def _wait(predicate, timeout: float, what: str):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.5)
    raise TimeoutError(what)


def _submit(env, tmp_path, name: str, recipe_path: str, *overrides: str) -> str:
    job_env = {**env, "PYTHONPATH": ROOT, "PATH": f"{os.path.dirname(sys.executable)}:{env['PATH']}",
               "ACCELERATE_CONFIG": "recipes/accelerate/cpu2.yaml", "RANKS_PER_NODE": "2",
               "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled",
               "TOKENIZERS_PARALLELISM": "false",
               "DISTILL_STOP_FILE": str(tmp_path / f"stop-{name}"), "MASTER_PORT": str(29600 + len(name))}
    proc = subprocess.run(["sbatch", "--parsable", f"--job-name={name}", f"--output={tmp_path}/{name}-%j.out",
                           f"--chdir={ROOT}", "--export=ALL", SCRIPT, recipe_path, *overrides],
                          capture_output=True, text=True, env=job_env, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip().split(";")[0]


def _finished(env, job_id):
    state = _job(env, job_id).get("JobState")
    return state if state in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL") else None


@pytest.mark.slow
def test_sbatch_preemption_requeues_and_resumes_bit_identically(slurm, tmp_path, tiny_llama, built_data):
    recipes = {}
    for name in ("whole", "preempted"):
        cfg = recipe(tiny_llama, built_data, tmp_path / name, "longred", steps=STEPS)
        cfg["train"].update({"save_every": 2, "keep_last": 2})
        recipes[name] = write(cfg, tmp_path / f"{name}.yaml")
    spaced = "streams.short.objectives.hidden.layers=[1, last]"  # an override with a space stays one argument
    whole = _submit(slurm, tmp_path, "whole", recipes["whole"], spaced)
    job = _submit(slurm, tmp_path, "preempted", recipes["preempted"], spaced)
    try:
        _preempt_and_compare(slurm, tmp_path, whole, job)
    finally:  # a failed check must not leave its jobs holding the node for the next run
        subprocess.run(["scancel", whole, job], env=slurm, capture_output=True)


def _preempt_and_compare(slurm, tmp_path, whole: str, job: str):
    metrics = tmp_path / "preempted" / "metrics.jsonl"
    _wait(lambda: metrics.exists() and len(read_metrics(metrics)) >= 2, 300, "the job never reached step 2")
    subprocess.run(["scancel", "--batch", "--signal=USR1", job], check=True, env=slurm)
    # The job checkpoints, exits 0 and requeues itself; SLURM holds a requeued job ~2 minutes before it is
    # eligible again: release it sooner.
    def requeued():
        info = _job(slurm, job)
        return info.get("Restarts") == "1" and info.get("JobState") == "PENDING"

    _wait(requeued, 300, "the job did not requeue itself")
    # Not at once: slurmd refuses a launch in the same second as the requeue revoked the job's credential
    # ("Job credential revoked"); a few seconds on, as SLURM's own delay would, it starts.
    subprocess.run(["scontrol", "update", f"JobId={job}", "StartTime=now+5"], check=True, env=slurm)
    assert _wait(lambda: _finished(slurm, job), 600, "the requeued job did not finish") == "COMPLETED"
    assert _wait(lambda: _finished(slurm, whole), 600, "the uninterrupted job did not finish") == "COMPLETED"
    info = _job(slurm, job)
    assert info["ExitCode"] == "0:0" and info["Restarts"] == "1"

    log = (tmp_path / f"preempted-{job}.out").read_text()
    assert "1 node(s) x 2 rank(s)" in log
    stopped = re.search(r"preempted at step (\d+), checkpoint written, requeued", log)
    assert stopped, log[-3000:]
    assert 2 <= int(stopped.group(1)) < STEPS
    assert "Traceback" not in log and "ChildFailedError" not in log and "finished with exit code 0" in log
    assert "resumed from" in log and "taking over the lock" not in log  # released on the clean stop

    steps = [r["step"] for r in read_metrics(metrics)]
    assert steps == list(range(1, STEPS + 1))
    a = load_file(str(tmp_path / "whole" / "checkpoints" / f"step-{STEPS}" / "model.safetensors"))
    b = load_file(str(tmp_path / "preempted" / "checkpoints" / f"step-{STEPS}" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert (tmp_path / "preempted" / "final" / "config.json").exists()
    assert not (tmp_path / "preempted" / ".lock").exists()
    assert not (tmp_path / "stop-preempted").exists()
    assert not (tmp_path / "stop-preempted.checkpointed").exists()


def _ranks(env: dict) -> str:
    """The sbatch script's own ranks_per_node function, run with `env`."""
    text = open(SCRIPT, encoding="utf-8").read()
    body = text[text.index("# --- ranks per node (begin) ---"): text.index("# --- ranks per node (end) ---")]
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "RANKS_", "GPUS_", "CUDA_"))}
    proc = subprocess.run(["bash", "-c", body + "\nranks_per_node"], capture_output=True, text=True,
                          env={**clean, **env}, check=True)
    return proc.stdout.strip()


def test_sbatch_derives_ranks_from_the_allocation_and_hard_codes_no_node_shape():
    assert _ranks({}) == "1"  # no GPUs allocated: one CPU process
    assert _ranks({"SLURM_GPUS_ON_NODE": "4"}) == "4"
    assert _ranks({"SLURM_GPUS_PER_NODE": "h100:8"}) == "8"
    assert _ranks({"SLURM_GPUS_PER_NODE": "8"}) == "8"
    assert _ranks({"CUDA_VISIBLE_DEVICES": "0,1,2"}) == "3"
    assert _ranks({"SLURM_GPUS_ON_NODE": "4", "RANKS_PER_NODE": "2"}) == "2"  # the override wins
    directives = [line for line in open(SCRIPT, encoding="utf-8") if line.startswith("#SBATCH")]
    assert not [d for d in directives if re.search(r"--(nodes|gpus|gres|cpus-per-task|ntasks=|partition)", d)]
    output = next(d for d in directives if "--output" in d)
    assert "/" not in output.split("=", 1)[1]  # no directory SLURM would have to find before the script runs


def test_a_restarted_cluster_starts_empty(slurm):
    """Jobs a killed run left behind (their processes gone with an old slurmd) must not hold the node."""
    proc = subprocess.run(["sbatch", "--parsable", "--hold", "--output=/dev/null", "--wrap", "sleep 600"],
                          capture_output=True, text=True, env=slurm, timeout=60)
    assert proc.returncode == 0, proc.stderr
    subprocess.run(["bash", CLUSTER, "start"], check=True, capture_output=True, timeout=600)
    queue = subprocess.run(["squeue", "-h", "-o", "%i"], capture_output=True, text=True, env=slurm,
                           check=True)
    assert queue.stdout.strip() == ""


def test_local_cluster_script_is_valid_bash():
    assert shutil.which("bash")
    assert subprocess.run(["bash", "-n", CLUSTER], capture_output=True).returncode == 0
    assert subprocess.run(["bash", "-n", SCRIPT], capture_output=True).returncode == 0
