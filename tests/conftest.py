"""Shared fixtures: a sentencepiece tokenizer trained on local stdlib text and tiny random-init models,
saved to a temp dir once per session and loaded by path like a user's model."""

import importlib
import os
import sys
import types

import pytest
import torch

from distill.testing import ARCHITECTURES, make_tiny_model, train_tokenizer

torch.set_num_threads(min(2, os.cpu_count() or 1))

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FLASH_STANDIN = os.path.join(ROOT, "tests", "flash_standin")
"""The CPU stand-in for flash-attn 2 (its package, distribution metadata and the sitecustomize that patches
transformers' availability checks at start-up): on PYTHONPATH, a process dispatches flash_attention_2 to
it."""


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


@pytest.fixture(scope="session")
def flash_standin():
    """transformers dispatches `flash_attention_2` to the CPU stand-in (tests/flash_standin) in this process
    from now on (only models that ask for it are affected); `.env` is what a subprocess needs for the same
    (its sitecustomize patches at start-up), `.calls` the in-process record of calls."""
    if FLASH_STANDIN not in sys.path:
        sys.path.insert(0, FLASH_STANDIN)
        importlib.invalidate_caches()
    from flash_attn import standin

    standin.patch_transformers()
    return types.SimpleNamespace(
        path=FLASH_STANDIN, module=standin, calls=standin.CALLS,
        env={"PYTHONPATH": os.pathsep.join([FLASH_STANDIN, ROOT])})
