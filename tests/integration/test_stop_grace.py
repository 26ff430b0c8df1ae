"""scripts/slurm/train.sbatch's stop grace: after a SIGTERM the launcher waits STOP_GRACE seconds for the
ranks to finish their step and checkpoint before it kills them (torchrun's own default is 30 s, shorter
than one 8B step plus a checkpoint), and the default covers what the planner says a shipped recipe needs."""

import os
import re
import signal
import subprocess
import sys
import time

from .test_train import ROOT

SCRIPT = os.path.join(ROOT, "scripts", "slurm", "train.sbatch")
WORKER = """
import os, signal, sys, time
out = sys.argv[1] + "." + os.environ.get("RANK", "0")

def on_term(signum, frame):  # what the trainer does on SIGTERM: finish the step, write a checkpoint
    open(out, "a").write("term\\n")
    time.sleep(float(sys.argv[2]))
    open(out, "a").write("saved\\n")
    sys.exit(0)

signal.signal(signal.SIGTERM, on_term)
open(out, "a").write("started\\n")
while True:
    time.sleep(0.05)
"""


def _stop_grace_env(**env) -> dict:
    """The environment the sbatch script's stop-grace section exports, given `env`."""
    text = open(SCRIPT, encoding="utf-8").read()
    body = text[text.index("# --- stop grace (begin) ---"): text.index("# --- stop grace (end) ---")]
    clean = {k: v for k, v in os.environ.items() if k not in ("STOP_GRACE", "TORCH_ELASTIC_SHUTDOWN_TIMEOUT")}
    proc = subprocess.run(["bash", "-c", body + "\nenv -0"], capture_output=True, env={**clean, **env},
                          check=True)
    return dict(item.split("=", 1) for item in proc.stdout.decode().split("\0") if "=" in item)


def _launch_and_terminate(tmp_path, env: dict, work_s: float) -> list[str]:
    """`accelerate launch` 2 CPU ranks that take `work_s` seconds to stop after SIGTERM; SIGTERM the launcher
    and return what rank 0 wrote."""
    tmp_path.mkdir()
    (tmp_path / "worker.py").write_text(WORKER)
    log = tmp_path / "log"
    env = {**env, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT}
    launcher = os.path.join(os.path.dirname(sys.executable), "accelerate")
    proc = subprocess.Popen([launcher, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
                             "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port",
                             str(29400 + os.getpid() % 500), str(tmp_path / "worker.py"), str(log),
                             str(work_s)],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, cwd=tmp_path)
    try:
        deadline = time.time() + 120
        while not all(os.path.exists(f"{log}.{r}") for r in (0, 1)):
            assert proc.poll() is None and time.time() < deadline, proc.stdout.read().decode()[-2000:]
            time.sleep(0.1)
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    return open(f"{log}.0").read().split()


def test_stop_grace_reaches_the_launcher(tmp_path):
    """The launcher kills ranks after STOP_GRACE seconds, not torchrun's 30: a rank needing 4 s to save is
    killed under STOP_GRACE=1 and saves under STOP_GRACE=20."""
    assert _stop_grace_env()["TORCH_ELASTIC_SHUTDOWN_TIMEOUT"] == "1200"
    assert _stop_grace_env(STOP_GRACE="20")["TORCH_ELASTIC_SHUTDOWN_TIMEOUT"] == "20"
    assert _launch_and_terminate(tmp_path / "a", _stop_grace_env(STOP_GRACE="1"), 4) == ["started", "term"]
    assert _launch_and_terminate(tmp_path / "b", _stop_grace_env(STOP_GRACE="20"), 4) == [
        "started", "term", "saved"]


def test_default_stop_grace_covers_the_shipped_recipes():
    """The script's defaults (the USR1 lead and STOP_GRACE) cover the stop grace the planner gives for the
    shipped recipes up to 1M on 8 x H100 at MFU 0.4 (docs/recipes.md's catalogue; sharded checkpoints are
    written by all 8 ranks at once); a recipe whose step is longer (2M) names the values to submit with in its
    header."""
    from tests.unit.test_recipes import ROOT, planner_budgets

    text = open(SCRIPT, encoding="utf-8").read()
    lead = int(re.search(r"^#SBATCH --signal=B:USR1@(\d+)$", text, re.M).group(1))
    default = int(re.search(r"STOP_GRACE=\$\{STOP_GRACE:-(\d+)\}", text).group(1))
    longer = []
    for recipe, budget in planner_budgets().items():
        needed = budget["stop_grace_s"]
        if needed > min(lead, default):
            header = open(os.path.join(ROOT, recipe), encoding="utf-8").read()
            assert f"--signal=B:USR1@{needed}" in header and f"STOP_GRACE={needed}" in header, recipe
            longer.append(recipe)
    assert sorted(longer) == ["recipes/llama3-8b/longred-2m-abf-sp8.yaml"]
