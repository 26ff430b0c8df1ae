"""Peak working memory of cross-entropy + forward KL (forward and backward): chunked vs full logits.

Prints one JSON line:
    {"naive_mb": {"8k": .., "16k": ..}, "ours_mb": {..}, "ratio_16k": ours/naive, "growth_8k_to_16k": ..,
     "profile": {case: {"forward_s": .., "backward_s": .., ...}}}

Each case runs in a fresh subprocess on the CPU in fp32 (V = 32000, H = 256, one row of T tokens). torch's
allocations are invisible to tracemalloc, so the figure is resident memory: the process's peak RSS
(ru_maxrss, exact, kernel-tracked) minus its RSS once the inputs exist, i.e. the loss's own working memory
including the gradients it returns. A sampling thread reading /proc/self/statm cross-checks the peak.
The children run with MALLOC_MMAP_THRESHOLD_ fixed at 4 MiB so freed tensors leave RSS at once.

    python benchmarks/loss_memory.py            # all cases
    python benchmarks/loss_memory.py --case ours --tokens 8192   # one case (used by the parent)
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import threading
import time

V, H = 32000, 256
TOKENS = {"8k": 8192, "16k": 16384}
MMAP_THRESHOLD = 4 * 1024**2
PAGE = os.sysconf("SC_PAGE_SIZE")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)  # run from a checkout without installing the package


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE


def _maxrss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


class _Sampler(threading.Thread):
    """Polls RSS every millisecond and keeps the maximum (a cross-check of ru_maxrss)."""

    def __init__(self):
        super().__init__(daemon=True)
        self.peak = _rss_bytes()
        self._halt = threading.Event()

    def run(self):
        while not self._halt.is_set():
            self.peak = max(self.peak, _rss_bytes())
            time.sleep(0.001)

    def stop(self):
        self._halt.set()
        self.join()
        self.peak = max(self.peak, _rss_bytes())


def _inputs(tokens: int, seed: int = 0):
    import torch

    g = torch.Generator().manual_seed(seed)
    s_hidden = torch.randn(1, tokens, H, generator=g).requires_grad_()  # (1, T, H)
    s_weight = (torch.randn(V, H, generator=g) * 0.05).requires_grad_()  # (V, H)
    t_hidden = torch.randn(1, tokens, H, generator=g)
    t_weight = torch.randn(V, H, generator=g) * 0.05
    labels = torch.randint(0, V, (1, tokens), generator=g)  # (1, T)
    mask = torch.ones(1, tokens, dtype=torch.bool)
    return s_hidden, s_weight, t_hidden, t_weight, labels, mask


def _ours(s_hidden, s_weight, t_hidden, t_weight, labels, mask):
    from distill.model.objectives import kl_loss, lm_loss

    ce, _ = lm_loss(s_hidden, s_weight, labels)  # default chunk_size 4096
    kl, _ = kl_loss(s_hidden, s_weight, t_hidden, t_weight, mask, kind="forward")  # default chunk_size 2048
    return ce + kl


def _naive(s_hidden, s_weight, t_hidden, t_weight, labels, mask):
    """The usual full-logits version (as in torchtune's ForwardKLLoss): (T, V) logits for both models."""
    import torch
    import torch.nn.functional as F

    logits = s_hidden[0] @ s_weight.t()  # (T, V)
    ce = F.cross_entropy(logits[:-1], labels[0, 1:], reduction="sum")
    with torch.no_grad():
        t_probs = torch.softmax(t_hidden[0] @ t_weight.t(), dim=-1)  # (T, V)
    log_p = torch.log_softmax(logits, dim=-1)  # (T, V)
    # Σ q log q does not depend on the student; the cross term carries the gradient.
    t_entropy = torch.special.entr(t_probs).sum(-1)  # (T,)
    kl = (-(t_probs * log_p).sum(-1) - t_entropy)[mask[0]].sum()
    return ce + kl


def run_case(impl: str, tokens: int) -> dict:
    import torch

    torch.set_num_threads(min(2, os.cpu_count() or 1))
    fn = _ours if impl == "ours" else _naive
    fn(*_inputs(64, seed=1)).backward()  # load kernels and libraries before the baseline
    inputs = _inputs(tokens)
    base_rss = _rss_bytes()
    maxrss_before = _maxrss_bytes()
    sampler = _Sampler()
    sampler.start()
    t0 = time.perf_counter()
    loss = fn(*inputs)
    t1 = time.perf_counter()
    loss.backward()
    t2 = time.perf_counter()
    sampler.stop()
    peak = _maxrss_bytes()
    assert inputs[0].grad is not None and inputs[1].grad is not None
    mb = 1024**2
    return {
        "impl": impl,
        "tokens": tokens,
        "peak_mb": round((peak - base_rss) / mb, 1),
        "sampled_peak_mb": round((sampler.peak - base_rss) / mb, 1),
        "maxrss_before_exceeds_baseline_mb": round(max(0, maxrss_before - base_rss) / mb, 1),
        "forward_s": round(t1 - t0, 3),
        "backward_s": round(t2 - t1, 3),
        "loss": round(loss.item(), 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--case", choices=["ours", "naive"])
    parser.add_argument("--tokens", type=int)
    args = parser.parse_args()
    if args.case:
        print(json.dumps(run_case(args.case, args.tokens)))
        return

    # A fixed mmap threshold makes glibc return every freed block above 4 MiB to the OS at once, so RSS
    # tracks live tensors (what torch.cuda.max_memory_allocated would report on a GPU). With glibc's
    # default dynamic threshold, freed ~32 MB blocks may stay resident in the heap and the figure
    # becomes bimodal from run to run (e.g. 657 or 907 MB for ours at 8k).
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_=str(MMAP_THRESHOLD))
    results: dict[str, dict[str, dict]] = {"naive": {}, "ours": {}}
    for impl in ("ours", "naive"):
        for key, tokens in TOKENS.items():
            out = subprocess.run(
                [sys.executable, os.path.abspath(__file__), "--case", impl, "--tokens", str(tokens)],
                check=True, capture_output=True, text=True, env=env,
            )
            results[impl][key] = json.loads(out.stdout.strip().splitlines()[-1])
    naive_mb = {k: r["peak_mb"] for k, r in results["naive"].items()}
    ours_mb = {k: r["peak_mb"] for k, r in results["ours"].items()}
    profile = {
        f"{impl}_{key}": {k: v for k, v in r.items() if k not in ("impl", "tokens", "peak_mb")}
        for impl, by_len in results.items()
        for key, r in by_len.items()
    }
    print(json.dumps({
        "naive_mb": naive_mb,
        "ours_mb": ours_mb,
        "ratio_16k": round(ours_mb["16k"] / naive_mb["16k"], 4),
        "growth_8k_to_16k": round(ours_mb["16k"] / ours_mb["8k"], 4),
        "profile": profile,
        "malloc_mmap_threshold": MMAP_THRESHOLD,
    }))


if __name__ == "__main__":
    main()
