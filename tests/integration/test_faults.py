"""A dead node: one rank of a 4-process run dies mid-run. The run is launched as scripts/slurm/train.sbatch
launches a multi-node job, one `accelerate launch --num_machines 2 --machine_rank R` per "node" (two on this
host, 2 CPU ranks each, gloo), so the other node's ranks learn of the loss only through their collectives.

- killed (SIGKILL): its sockets close, so gloo's peers fail at once. Every surviving rank exits non-zero
  within `parallel.collective_timeout_s` plus a margin, both launchers exit non-zero, and the same command
  run again resumes from the last complete checkpoint and finishes.
- hung (SIGSTOP: a node that stops answering but keeps its connections open, as a lost host looks to NCCL):
  nothing fails until the collective timeout does. The other node's ranks exit non-zero after about
  `parallel.collective_timeout_s` and its launcher exits non-zero; on SLURM that exit ends the job
  (`srun --kill-on-bad-exit`, scripts/slurm/train.sbatch), here the test ends the hung node's launcher."""

import os
import signal
import subprocess
import sys
import time

import pytest

from distill.train.metrics import read_metrics

from .test_train import ROOT, recipe, write

STEPS = 4
TIMEOUT_S = 30
MARGIN_S = 45  # the launcher's stop of its workers (SIGTERM, then SIGKILL 30 s on) and interpreter exits


def _launch(recipe_path: str, port: int, node: int, log) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": ROOT, "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1",
           "TOKENIZERS_PARALLELISM": "false", "ACCELERATE_USE_CPU": "1"}
    launcher = os.path.join(os.path.dirname(sys.executable), "accelerate")
    cmd = [launcher, "launch", "--config_file", os.path.join(ROOT, "recipes", "accelerate", "cpu2.yaml"),
           "--num_machines", "2", "--machine_rank", str(node), "--num_processes", "4",
           "--main_process_ip", "127.0.0.1", "--main_process_port", str(port),
           "-m", "distill.train", recipe_path]
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)


def _ranks(launchers: list[subprocess.Popen]) -> dict[int, int]:
    """{global rank: pid} of the trainer processes under the launchers (their RANK variable)."""
    parents = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    parents[int(entry)] = int(f.read().rsplit(")", 1)[1].split()[1])
            except OSError:
                continue
    roots, ranks = {p.pid for p in launchers}, {}
    for pid in parents:
        up = pid
        while up in parents and up not in roots:
            up = parents[up]
        if up not in roots or pid in roots:
            continue
        try:
            env = open(f"/proc/{pid}/environ", "rb").read().split(b"\0")
        except OSError:
            continue
        rank = [e[5:] for e in env if e.startswith(b"RANK=")]
        if rank and b"distill.train" in open(f"/proc/{pid}/cmdline", "rb").read():
            ranks[int(rank[0])] = pid
    return ranks


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _run_both(recipe_path, port, logs):
    return [_launch(recipe_path, port, node, logs[node]) for node in (0, 1)]


def _stop(launchers):
    for proc in launchers:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def _start(tmp_path, tiny_llama, built_data, port):
    out = tmp_path / "run"
    cfg = recipe(tiny_llama, built_data, out, "long_cpt", steps=STEPS)
    cfg["train"].update({"save_every": 1, "keep_last": 2, "export": False})
    cfg["parallel"] = {"collective_timeout_s": TIMEOUT_S}
    path = write(cfg, tmp_path / "r.yaml")
    logs = [open(tmp_path / f"node{n}.log", "w") for n in (0, 1)]
    launchers = _run_both(path, port, logs)
    metrics = out / "metrics.jsonl"
    deadline = time.time() + 300
    while not (metrics.exists() and len(read_metrics(metrics)) >= 2):
        assert all(p.poll() is None for p in launchers), (tmp_path / "node0.log").read_text()[-3000:]
        assert time.time() < deadline, "the run never reached step 2"
        time.sleep(0.2)
    ranks = _ranks(launchers)
    assert sorted(ranks) == [0, 1, 2, 3], ranks
    return path, out, logs, launchers, ranks


def _wait_for_exits(peers: dict[int, int], launchers, started: float, limit: float) -> dict[int, float]:
    """Seconds from `started` until each of `peers` ({rank: pid}) and each launcher ended."""
    gone = {}
    while len(gone) < len(peers) or any(p.poll() is None for p in launchers):
        for r, pid in peers.items():
            if r not in gone and not _alive(pid):
                gone[r] = round(time.time() - started, 1)
        assert time.time() - started < limit, (
            f"ranks still alive {limit} s after the fault: {sorted(set(peers) - set(gone))}; "
            f"launchers {[p.poll() for p in launchers]}")
        time.sleep(0.1)
    return gone


@pytest.mark.slow
def test_a_killed_rank_ends_its_peers_and_the_same_command_resumes(tmp_path, tiny_llama, built_data):
    port = 29700 + os.getpid() % 200
    path, out, logs, launchers, ranks = _start(tmp_path, tiny_llama, built_data, port)
    try:
        killed = time.time()
        os.kill(ranks[3], signal.SIGKILL)  # a rank of the second node dies
        gone = _wait_for_exits({r: pid for r, pid in ranks.items() if r != 3}, launchers, killed,
                               TIMEOUT_S + MARGIN_S)
        codes = [p.returncode for p in launchers]
        print(f"SIGKILL of rank 3: peers gone after {gone} s, launchers exited {codes} after "
              f"{time.time() - killed:.1f} s")
        assert all(c != 0 for c in codes), codes
        text = [(tmp_path / f"node{n}.log").read_text() for n in (0, 1)]
        assert "exitcode" in text[0] and "exitcode" in text[1]  # the launchers name their failed ranks
        assert f"collective timeout {TIMEOUT_S} s: parallel.collective_timeout_s" in text[0]
        metrics = out / "metrics.jsonl"
        assert max(r["step"] for r in read_metrics(metrics)) < STEPS

        launchers = _run_both(path, port + 1, logs)  # the same command (a fresh port: the old may linger)
        codes = [p.wait(timeout=300) for p in launchers]
        text = [(tmp_path / f"node{n}.log").read_text() for n in (0, 1)]
        assert codes == [0, 0], text[0][-3000:]
        assert "resumed from" in text[0]
        assert [r["step"] for r in read_metrics(metrics)] == list(range(1, STEPS + 1))
        assert (out / "checkpoints" / f"step-{STEPS}").is_dir()
    finally:
        _stop(launchers)
        for log in logs:
            log.close()


@pytest.mark.slow
def test_a_hung_rank_ends_the_other_node_within_the_timeout(tmp_path, tiny_llama, built_data):
    port = 29900 + os.getpid() % 90
    _, _, logs, launchers, ranks = _start(tmp_path, tiny_llama, built_data, port)
    try:
        hung = time.time()
        os.kill(ranks[3], signal.SIGSTOP)
        # The first node's ranks and launcher: what srun --kill-on-bad-exit acts on.
        gone = _wait_for_exits({0: ranks[0], 1: ranks[1]}, launchers[:1], hung, TIMEOUT_S + MARGIN_S)
        after = time.time() - hung
        print(f"SIGSTOP of rank 3: node 0's ranks gone after {gone} s, its launcher exited "
              f"{launchers[0].returncode} after {after:.1f} s (collective timeout {TIMEOUT_S} s)")
        assert launchers[0].returncode != 0
        assert TIMEOUT_S * 0.8 <= min(gone.values())  # the timeout ended them, not something else
        assert after <= TIMEOUT_S + MARGIN_S
    finally:
        if _alive(ranks[3]):
            os.kill(ranks[3], signal.SIGCONT)
        _stop(launchers)
        for log in logs:
            log.close()


# scripts/slurm/train.sbatch's node launch: srun --kill-on-bad-exit ends the job on any node's non-zero exit,
# so a planned stop must leave every node's launcher at 0, and a failure must not.
SCRIPT = os.path.join(ROOT, "scripts", "slurm", "train.sbatch")
WORKER = """
import os, signal, sys, time
def on_term(signum, frame):  # what the trainer does on SIGTERM: finish the step, checkpoint, exit 0
    time.sleep(1)
    sys.exit(0)
signal.signal(signal.SIGTERM, on_term)
open(sys.argv[1] + "." + os.environ["RANK"], "w").close()
while True:
    time.sleep(0.05)
"""


def _node_launch(tmp_path, *command: str, stop_grace: int = 30) -> subprocess.Popen:
    """The script's node_launch function running `command`, in its own process group (as srun's task)."""
    text = open(SCRIPT, encoding="utf-8").read()
    body = text[text.index("# --- node launch (begin) ---"): text.index("# --- node launch (end) ---")]
    env = {**os.environ, "DISTILL_STOP_FILE": str(tmp_path / "stop"), "STOP_GRACE": str(stop_grace),
           "TORCH_ELASTIC_SHUTDOWN_TIMEOUT": str(stop_grace), "ACCELERATE_USE_CPU": "1",
           "OMP_NUM_THREADS": "1", "SLURM_NODEID": "1"}
    return subprocess.Popen(["bash", "-c", body + '\nnode_launch "$@"', "node", *command], env=env,
                            cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)


def _terminated_launch(tmp_path, note_after: float | None, stop_grace: int) -> tuple[int, str, float]:
    """SIGTERM (as SLURM sends it to a step) a node running a real 2-rank `accelerate launch` whose ranks stop
    cleanly; rank 0 (elsewhere) writes the note `note_after` seconds later (None: never)."""
    (tmp_path / "worker.py").write_text(WORKER)
    launcher = os.path.join(os.path.dirname(sys.executable), "accelerate")
    node = _node_launch(tmp_path, launcher, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines",
                        "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port",
                        str(29300 + os.getpid() % 90), str(tmp_path / "worker.py"), str(tmp_path / "started"),
                        stop_grace=stop_grace)
    try:
        deadline = time.time() + 120
        while not all((tmp_path / f"started.{r}").exists() for r in (0, 1)):
            assert node.poll() is None and time.time() < deadline, node.stdout.read()[-2000:]
            time.sleep(0.1)
        os.killpg(node.pid, signal.SIGTERM)
        sent = time.time()
        if note_after is not None:
            time.sleep(note_after)
            (tmp_path / "stop.checkpointed").write_text("3\n")
        code = node.wait(timeout=120)
        return code, node.stdout.read(), time.time() - sent
    finally:
        if node.poll() is None:
            os.killpg(node.pid, signal.SIGKILL)


def test_a_terminated_node_that_checkpointed_exits_0(tmp_path):
    """torchrun exits 143 after a SIGTERM even when its ranks checkpointed and exited 0; the node reports 0
    once rank 0's note is there (written after this node's ranks ended), so srun kills no other node."""
    code, log, _ = _terminated_launch(tmp_path, note_after=4, stop_grace=30)
    assert code == 0, log[-2000:]
    assert "node 1: launcher exited 143 on the stop; checkpoint written" in log


def test_a_terminated_node_without_a_checkpoint_fails(tmp_path):
    code, log, took = _terminated_launch(tmp_path, note_after=None, stop_grace=3)
    assert code == 143, log[-2000:]
    assert took >= 3  # it waited STOP_GRACE for the note


def test_a_failed_node_fails_at_once_unless_a_stop_is_under_way(tmp_path):
    started = time.time()
    node = _node_launch(tmp_path, "bash", "-c", "exit 7", stop_grace=600)
    assert node.wait(timeout=30) == 7 and time.time() - started < 10  # no stop under way: no wait
    (tmp_path / "stop").write_text("")  # the batch shell's stop file (USR1, or a TERM it alone received)
    node = _node_launch(tmp_path, "bash", "-c", "exit 1", stop_grace=600)
    time.sleep(2)
    assert node.poll() is None  # waiting for rank 0's note
    (tmp_path / "stop.checkpointed").write_text("3\n")
    assert node.wait(timeout=30) == 0
