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


NATIVE_BF16 = torch.cuda.is_available() or torch.ops.mkldnn._is_mkldnn_bf16_supported()
"""Whether bf16 matmuls run natively here (a GPU, or a CPU with AVX512-BF16 / AMX that oneDNN uses). On an
AVX2-only CPU torch emulates them 10-60x slower than fp32 (a 1024 x 576 x 1536 matmul: 1.2 GFLOP/s in bf16
against 74 in fp32 on an AMD EPYC with AVX2), which puts a real-size bf16 model beyond the suite's budget."""


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    skip_bf16 = pytest.mark.skip(reason="needs native bf16 matmuls (AMX / AVX512-BF16 or a GPU); this CPU "
                                        f"({torch.backends.cpu.get_cpu_capability()}) emulates them")
    for item in items:
        if "gpu" in item.keywords and not torch.cuda.is_available():
            item.add_marker(skip_gpu)
        if "bf16" in item.keywords and not NATIVE_BF16:
            item.add_marker(skip_bf16)


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
