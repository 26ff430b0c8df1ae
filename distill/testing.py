"""Offline building blocks for tests, benchmarks and the demo: a tokenizer trained on local text and tiny
random-init models saved to disk, loaded afterwards exactly as a user's model would be (by path)."""

from __future__ import annotations

import glob
import os
import sysconfig

import torch

from distill.model.objectives import lm_loss
from distill.model.zero_checkpoint import is_zero_checkpoint, zero_optimizer, zero_weights

STDLIB = sysconfig.get_paths()["stdlib"]

ARCHITECTURES = ("llama", "mistral", "qwen2")


def stdlib_files(min_bytes: int = 0, max_bytes: int | None = None, limit: int | None = None) -> list[str]:
    """Sorted paths of the Python standard library's own .py sources (present on every machine)."""
    files = []
    for path in sorted(glob.glob(os.path.join(STDLIB, "**", "*.py"), recursive=True)):
        if "site-packages" in path or "/test/" in path or "/tests/" in path:
            continue
        size = os.path.getsize(path)
        if size < min_bytes or (max_bytes is not None and size > max_bytes):
            continue
        files.append(path)
        if limit is not None and len(files) >= limit:
            break
    return files


def train_tokenizer(out_dir: str, vocab_size: int = 1000, files: list[str] | None = None,
                    max_sentences: int = 50000, seed: int = 0) -> str:
    """Train a byte-fallback BPE sentencepiece model on local text and save it as a HF tokenizer dir.

    Deterministic: the same files give the same tokenizer in every process. sentencepiece's own sampling of
    `input_sentence_size` lines draws from a generator seeded afresh in each process (its
    set_random_generator_seed does not fix it), so two demo runs trained different tokenizers and every
    number after them differed; the sample of at most `max_sentences` lines is drawn here instead, with a
    seeded generator, in file order, and sentencepiece reads all of it on one thread.
    """
    import random

    import sentencepiece as spm  # only training a tokenizer
    from transformers import AutoTokenizer

    os.makedirs(out_dir, exist_ok=True)
    files = files if files is not None else stdlib_files(limit=200)
    lines = []
    for path in files:
        with open(path, encoding="utf-8", errors="replace") as f:
            lines.extend(line.rstrip("\n") for line in f if line.strip())
    if len(lines) > max_sentences:
        keep = sorted(random.Random(seed).sample(range(len(lines)), max_sentences))
        lines = [lines[i] for i in keep]

    raw_dir = os.path.join(out_dir, "spm")
    os.makedirs(raw_dir, exist_ok=True)
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_prefix=os.path.join(raw_dir, "tokenizer"), vocab_size=vocab_size,
        model_type="bpe", byte_fallback=True, unk_id=0, bos_id=1, eos_id=2, pad_id=-1, num_threads=1,
        minloglevel=2, input_sentence_size=0, shuffle_input_sentence=False,
        normalization_rule_name="identity", remove_extra_whitespaces=False, split_digits=True,
    )
    tokenizer = AutoTokenizer.from_pretrained(raw_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir


def tiny_config(arch: str = "llama", vocab_size: int = 1000, hidden_size: int = 64, num_layers: int = 2,
                num_heads: int = 4, num_kv_heads: int = 2, max_position_embeddings: int = 256,
                rope_theta: float = 10000.0, intermediate_size: int | None = None):
    """A small config of a real architecture (Llama, Mistral or Qwen2) with the cache off."""
    from transformers import AutoConfig

    if arch not in ARCHITECTURES:
        raise ValueError(f"arch {arch!r}; allowed: {ARCHITECTURES}")
    kwargs = dict(
        vocab_size=vocab_size, hidden_size=hidden_size,
        intermediate_size=intermediate_size or 4 * hidden_size,
        num_hidden_layers=num_layers, num_attention_heads=num_heads, num_key_value_heads=num_kv_heads,
        max_position_embeddings=max_position_embeddings, rope_theta=rope_theta, use_cache=False,
        bos_token_id=1, eos_token_id=2, tie_word_embeddings=False,
    )
    if arch == "mistral":
        kwargs["sliding_window"] = None
    if arch == "qwen2":
        kwargs["use_sliding_window"] = False
    return AutoConfig.for_model(arch, **kwargs)


def make_tiny_model(out_dir: str, arch: str = "llama", tokenizer_dir: str | None = None, seed: int = 0,
                    **config_kwargs) -> str:
    """Random-init a tiny model, save it (safetensors) with the tokenizer, return the directory."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if tokenizer_dir is not None:
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
        config_kwargs.setdefault("vocab_size", len(tokenizer))
    os.makedirs(out_dir, exist_ok=True)
    for _ in range(2):
        config = tiny_config(arch, **config_kwargs)
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        model.save_pretrained(out_dir)
        if tokenizer_dir is None:
            break
        tokenizer.save_pretrained(out_dir)
        # AutoTokenizer picks the class from the model type (Qwen2 adds a pad token): size the vocab to
        # the tokenizer a user would load from this directory.
        loaded = len(AutoTokenizer.from_pretrained(out_dir))
        if loaded <= config.vocab_size:
            break
        config_kwargs["vocab_size"] = loaded
    return out_dir


def fill_hub_cache(cache_dir: str, repo_id: str, model_dir: str, commit: str | None = None) -> str:
    """Put the files of `model_dir` into a Hugging Face hub cache as the hub would have downloaded repo
    `repo_id` (org/name): `models--org--name/blobs/<hash>`, `snapshots/<commit>/<file>` linking to its blob,
    `refs/main` holding the commit. With HF_HUB_CACHE=cache_dir (or HF_HOME=<dir> and cache_dir=<dir>/hub)
    and HF_HUB_OFFLINE=1, `from_pretrained(repo_id)` and `snapshot_download(repo_id)` read these files:
    a hub id resolves offline, as on a machine whose cache already holds the model.

    Returns the snapshot directory.
    """
    import hashlib
    import shutil

    org_name = repo_id.split("/")
    if len(org_name) != 2 or not all(org_name):
        raise ValueError(f"repo_id {repo_id!r}: expected org/name")
    repo = os.path.join(cache_dir, "models--" + "--".join(org_name))
    commit = commit or hashlib.sha1(repo_id.encode()).hexdigest()  # a fixed 40-hex "commit" per repo id
    snapshot = os.path.join(repo, "snapshots", commit)
    os.makedirs(os.path.join(repo, "blobs"), exist_ok=True)
    for root, _, names in os.walk(model_dir):
        for name in names:
            source = os.path.join(root, name)
            rel = os.path.relpath(source, model_dir)
            with open(source, "rb") as f:
                digest = hashlib.sha256(f.read()).hexdigest()
            blob = os.path.join(repo, "blobs", digest)
            if not os.path.exists(blob):
                shutil.copyfile(source, blob)
            link = os.path.join(snapshot, rel)
            os.makedirs(os.path.dirname(link), exist_ok=True)
            if os.path.lexists(link):
                os.remove(link)
            os.symlink(os.path.relpath(blob, os.path.dirname(link)), link)  # as the hub cache links them
    os.makedirs(os.path.join(repo, "refs"), exist_ok=True)
    with open(os.path.join(repo, "refs", "main"), "w", encoding="utf-8") as f:
        f.write(commit)
    return snapshot


def states_loss_grads(model, inputs: dict, targets: torch.Tensor):
    """One forward and backward of `model` on `inputs` with the chunked LM loss on already shifted `targets`:
    (every hidden state, the summed loss, every parameter's gradient), detached: what the sequence-parallel
    workers compare between one process and a split row."""
    model.zero_grad(set_to_none=True)
    out = model(**inputs, output_hidden_states=True, use_cache=False, logits_to_keep=1)
    loss = lm_loss(out.hidden_states[-1], model.get_output_embeddings().weight, targets, chunk_size=16,
                   shifted=True)[0]
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters()}
    return [h.detach() for h in out.hidden_states], loss.detach(), grads


def run_workers(script: str, world: int, port: int | str, args: list[str], out: str,
                timeout: float | None = None) -> dict:
    """`python -m torch.distributed.run` of `script` on `world` CPU processes (the repository on PYTHONPATH,
    one thread each, wandb off), then the JSON its rank 0 wrote to `out` (`finish_workers`). A failed run
    raises RuntimeError with the tail of its output."""
    import json
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "PYTHONPATH": root, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(world), "--master_port",
           str(port), script, *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout, cwd=root,
                          check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"the {world}-process run of {os.path.basename(script)} failed (exit "
                           f"{proc.returncode}):\n{proc.stdout[-2000:]}{proc.stderr[-4000:]}")
    with open(out, encoding="utf-8") as f:
        return json.load(f)


def finish_workers(out: str, result: dict) -> None:
    """The end of a `run_workers` script: rank 0 writes `result` to `out`; every rank leaves the group."""
    import json

    import torch.distributed as dist

    if dist.get_rank() == 0:
        with open(out, "w", encoding="utf-8") as f:
            json.dump(result, f)
    dist.destroy_process_group()


def checkpoint_weights(path: str) -> dict[str, torch.Tensor]:
    """The full weights of a training checkpoint of any format (model.safetensors, a sharded one's DCP
    `model/`, or ZeRO-3's `zero/`, converted), read in this process."""
    from safetensors.torch import load_file

    if is_zero_checkpoint(path):
        return zero_weights(path)
    if not os.path.isfile(os.path.join(path, "model", ".metadata")):
        return load_file(os.path.join(path, "model.safetensors"))
    return _dcp_file(os.path.join(path, "model"))


def checkpoint_optimizer(path: str) -> dict:
    """A training checkpoint's optimiser state in the unsharded format (`optimizer.state_dict()`: state keyed
    by parameter number in param_groups order), whichever format it was written in."""
    if is_zero_checkpoint(path):
        return zero_optimizer(path)
    if os.path.isfile(os.path.join(path, "model", ".metadata")) and not os.path.isdir(os.path.join(path,
                                                                                                  "optimizer")):
        return {"state": {}, "param_groups": []}  # a sharded checkpoint before the optimiser's first step
    if not os.path.isfile(os.path.join(path, "optimizer", ".metadata")):
        return torch.load(os.path.join(path, "optimizer.pt"), weights_only=True)
    sharded = _dcp_file(os.path.join(path, "optimizer"))  # {"state": {fqn: ...}, "param_groups": [fqns]}
    names = [n for group in sharded["param_groups"] for n in group["params"]]
    order = {name: i for i, name in enumerate(names)}
    groups = [{**group, "params": [order[n] for n in group["params"]]} for group in sharded["param_groups"]]
    return {"state": {order[name]: entry for name, entry in sharded["state"].items()}, "param_groups": groups}


def _dcp_file(directory: str) -> dict:
    """A DCP directory's whole state as one nested dict (through the engine's own dcp_to_torch_save)."""
    import tempfile

    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    with tempfile.TemporaryDirectory() as tmp:
        dcp_to_torch_save(directory, os.path.join(tmp, "state.pt"))
        return torch.load(os.path.join(tmp, "state.pt"), weights_only=True)
