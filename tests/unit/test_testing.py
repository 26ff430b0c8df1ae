"""The offline building blocks the demo, the tests and the benchmarks start from are deterministic."""

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TRAIN = """
import sys
from transformers import AutoTokenizer
from distill.data.dataset import tokenizer_fingerprint
from distill.testing import stdlib_files, train_tokenizer
out = train_tokenizer(sys.argv[1], vocab_size=600, files=stdlib_files(limit=200), max_sentences=8000,
                      seed=int(sys.argv[2]))
print(tokenizer_fingerprint(AutoTokenizer.from_pretrained(out)))
"""


def _fingerprint(tmp_path, name: str, seed: int = 0) -> str:
    proc = subprocess.run([sys.executable, "-c", TRAIN, str(tmp_path / name), str(seed)], capture_output=True,
                          text=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": ROOT}, timeout=300,
                          check=True)
    return proc.stdout.strip().splitlines()[-1]


def test_tokenizer_training_is_deterministic_across_processes(tmp_path):
    """The demo's first step: sentencepiece sampled its input lines with a generator seeded afresh in each
    process, so three runs of the demo trained three tokenizers (and every number after them differed).
    Within one process repeated trainings agreed, which is why this runs each training in its own process."""
    a, b = _fingerprint(tmp_path, "a"), _fingerprint(tmp_path, "b")
    assert a == b
    assert _fingerprint(tmp_path, "c", seed=1) != a  # the sample is the seed's: another seed, another one
