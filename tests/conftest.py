"""Shared fixtures: a sentencepiece tokenizer trained on local stdlib text and tiny random-init models,
saved to a temp dir once per session and loaded by path like a user's model."""

import os

import pytest
import torch

from distill.testing import ARCHITECTURES, make_tiny_model, train_tokenizer

torch.set_num_threads(min(2, os.cpu_count() or 1))


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory):
    return train_tokenizer(str(tmp_path_factory.mktemp("tokenizer")), vocab_size=1000)


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory, tokenizer_dir):
    """{arch: directory} for Llama, Mistral and Qwen2 (2 layers, 64 wide, 256-token window)."""
    root = tmp_path_factory.mktemp("models")
    return {arch: make_tiny_model(str(root / arch), arch, tokenizer_dir=tokenizer_dir)
            for arch in ARCHITECTURES}


@pytest.fixture(scope="session")
def tiny_llama(tiny_models):
    return tiny_models["llama"]
