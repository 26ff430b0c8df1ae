"""The offline building blocks the demo, the tests and the benchmarks start from are deterministic."""

from transformers import AutoTokenizer

from distill.data.dataset import tokenizer_fingerprint
from distill.testing import stdlib_files, train_tokenizer


def test_tokenizer_training_is_deterministic(tmp_path):
    """Two trainings on the same files give the same vocabulary (the demo's first step: a tokenizer that
    changed between runs would change every number after it)."""
    files = stdlib_files(limit=120)
    a = train_tokenizer(str(tmp_path / "a"), vocab_size=600, files=files, max_sentences=5000)
    b = train_tokenizer(str(tmp_path / "b"), vocab_size=600, files=files, max_sentences=5000)
    assert (tokenizer_fingerprint(AutoTokenizer.from_pretrained(a))
            == tokenizer_fingerprint(AutoTokenizer.from_pretrained(b)))
