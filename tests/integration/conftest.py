"""Built streams for the trainer's integration tests: a small spec over stdlib files, tokenized with the
session's sentencepiece tokenizer, built through the real data builder."""

import os
import shutil

import pytest

from distill.testing import stdlib_files


@pytest.fixture(scope="session")
def corpus_dir(tmp_path_factory):
    """A few large and many small stdlib modules copied into one tree."""
    root = tmp_path_factory.mktemp("corpus")
    for i, path in enumerate(stdlib_files(min_bytes=30_000, max_bytes=80_000, limit=12)):
        shutil.copy(path, root / f"big_{i:02d}.py")
    for i, path in enumerate(stdlib_files(min_bytes=200, max_bytes=1500, limit=150)):
        shutil.copy(path, root / f"small_{i:03d}.py")
    return str(root)


def build_small(out, corpus_dir, tokenizer):
    """{stream: directory} plus the output root under key 'root': long 1024 concat, short 256 best_fit,
    s2l 256 window, with a held-out split."""
    from distill.data.build import build
    from distill.data.spec import spec_from_dict

    spec = spec_from_dict({
        "tokenizer": tokenizer,
        "output_dir": out,
        "seed": 0,
        "sources": [
            {"name": "big", "kind": "files", "path": corpus_dir, "include": ["big_*.py"]},
            {"name": "small", "kind": "files", "path": corpus_dir, "include": ["small_*.py"]},
        ],
        "streams": {
            "long": {"sources": ["big"], "seq_len": 1024, "min_doc_tokens": 1024, "pack": "concat",
                     "last_row": "pad"},
            "short": {"sources": ["small"], "seq_len": 256, "max_doc_tokens": 256, "pack": "best_fit"},
            "s2l": {"sources": ["big"], "seq_len": 256, "min_doc_tokens": 256, "pack": "window"},
        },
        "holdout": {"fraction": 0.25},
    })
    build(spec, progress=False)
    dirs = {name: os.path.join(out, name) for name in ("long", "short", "s2l")}
    dirs["root"] = out
    return dirs


@pytest.fixture(scope="session")
def built_data(tmp_path_factory, corpus_dir, tokenizer_dir):
    return build_small(str(tmp_path_factory.mktemp("built") / "demo"), corpus_dir, tokenizer_dir)


@pytest.fixture(scope="session")
def built_data_for(tmp_path_factory, corpus_dir, tokenizer_dir, built_data):
    """built_data_for(model_dir): the same streams tokenized with the tokenizer a model dir loads."""
    from transformers import AutoTokenizer

    from distill.data.dataset import tokenizer_fingerprint

    reference = tokenizer_fingerprint(AutoTokenizer.from_pretrained(tokenizer_dir))
    cache = {}

    def get(model_dir):
        fingerprint = tokenizer_fingerprint(AutoTokenizer.from_pretrained(model_dir))
        if fingerprint == reference:
            return built_data
        if fingerprint not in cache:
            cache[fingerprint] = build_small(str(tmp_path_factory.mktemp("built") / "own"), corpus_dir,
                                             model_dir)
        return cache[fingerprint]

    return get
