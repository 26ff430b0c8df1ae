"""The shipped recipes as a user meets them: each resolves (through its `base:` chain) to what it resolved to
before the bases (tests/unit/snapshots/recipes_3691eb9.json) except for the fixes named in CHANGED, reads
data that a shipped spec writes (same row length, same tokenizer, enough tokens for the whole run), keeps
its checkpoints within the stated disk budget and cites only files a user has."""

import functools
import glob
import json
import os
import re

import pytest
from transformers import AutoConfig

from distill.config import load_recipe, read_with_bases, to_dict
from distill.data.spec import load_spec
from distill.plan import Shape, checkpoints_on_disk, recipe_seq_lens, run_budget

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(__file__)))
SNAPSHOT = os.path.join(os.path.dirname(__file__), "snapshots", "recipes_3691eb9.json")
MODELS = {
    "meta-llama/Meta-Llama-3-8B": {
        "model_type": "llama", "hidden_size": 4096, "intermediate_size": 14336, "num_attention_heads": 32,
        "num_key_value_heads": 8, "num_hidden_layers": 32, "vocab_size": 128256,
        "max_position_embeddings": 8192, "rope_theta": 500000.0, "tie_word_embeddings": False},
    "mistralai/Mistral-7B-v0.3": {
        "model_type": "mistral", "hidden_size": 4096, "intermediate_size": 14336, "num_attention_heads": 32,
        "num_key_value_heads": 8, "num_hidden_layers": 32, "vocab_size": 32768,
        "max_position_embeddings": 32768, "rope_theta": 1000000.0, "tie_word_embeddings": False,
        "head_dim": 128},
}
"""The config.json values the planner reads, of the two models the 8B recipes extend."""
DISK_BUDGET_BYTES = 0.3e12
"""recipes/base/longred-paper.yaml: a run's checkpoints stay within ~0.3 TB (3 x 96 GB for 8B)."""
BUDGETED_STREAMS = ("long", "s2l")
"""Streams whose spec's max_tokens must cover a run (data/fineweb-edu-short.yaml's short cap, 3.75e8, is below
the 403M a run reads: add "short" here once it is raised)."""

# What the rewrite on bases changed on purpose, per recipe (dotted key → new value); everything else resolves
# exactly as before.
_SHORT_LLAMA = {"streams.short.data": "data/built/fineweb-edu-short/short"}
_SHORT_MISTRAL = {"streams.short.data": "data/built/fineweb-edu-short-mistral/short"}
_DISK = {"train.keep_last": 2, "train.keep_every": 0}  # ~0.6 TB of checkpoints per run → ~0.3 TB
CHANGED = {
    "recipes/llama3-8b/long_cpt-128k-abf.yaml": _DISK,
    "recipes/llama3-8b/long_cpt-32k-abf.yaml": _DISK,
    "recipes/llama3-8b/long_cpt-32k-pi.yaml": _DISK,
    "recipes/llama3-8b/longred-128k-abf-sp2.yaml": {
        **_DISK, **_SHORT_LLAMA, "run.output_dir": "runs/llama3-8b-longred-128k-abf-sp2"},  # was ...-sp2-sp2
    "recipes/llama3-8b/longred-128k-abf.yaml": {**_DISK, **_SHORT_LLAMA},
    "recipes/llama3-8b/longred-256k-abf-sp4.yaml": {  # its own build's s2l, not the 128K build's
        **_DISK, **_SHORT_LLAMA, "streams.s2l.data": "data/built/slimpajama-llama3-256k/s2l"},
    "recipes/llama3-8b/longred-32k-abf.yaml": {**_DISK, **_SHORT_LLAMA},
    "recipes/llama3-8b/longred-32k-pi.yaml": {**_DISK, **_SHORT_LLAMA},
    "recipes/llama3-8b/longred-512k-abf-sp8.yaml": {
        **_DISK, **_SHORT_LLAMA, "streams.s2l.data": "data/built/slimpajama-llama3-512k/s2l"},
    "recipes/llama3-8b/mix_cpt-128k-abf.yaml": {**_DISK, **_SHORT_LLAMA},
    "recipes/llama3-8b/mix_cpt-32k-abf.yaml": {**_DISK, **_SHORT_LLAMA},
    "recipes/llama3-8b/mix_cpt-32k-pi.yaml": {**_DISK, **_SHORT_LLAMA},
    "recipes/mistral-7b-v0.3/long_cpt-128k-abf.yaml": _DISK,
    "recipes/mistral-7b-v0.3/longred-128k-abf.yaml": {**_DISK, **_SHORT_MISTRAL},
    "recipes/mistral-7b-v0.3/mix_cpt-128k-abf.yaml": {**_DISK, **_SHORT_MISTRAL},
}
# Keys added to the recipe schema since the snapshot, at their defaults where a recipe does not set them.
NEW_KEYS = {"parallel.offload_activations": False, "parallel.tiled_mlp": 1,
            "parallel.sequence_parallel_mode": "ulysses", "parallel.ring_degree": 1, "parallel.replicate": 1}
# Recipes newer than the snapshot: (the recipe they extend, what they change).
_LONG = "data/built/slimpajama-llama3-{}/{}"
NEW_RECIPES = {
    "recipes/llama3-8b/longred-1m-abf-sp8.yaml": ("recipes/llama3-8b/longred-512k-abf-sp8.yaml", {
        "run.name": "llama3-8b-longred-1m-abf-sp8", "run.output_dir": "runs/llama3-8b-longred-1m-abf-sp8",
        "rope.theta": 5.0e8, "rope.target_length": 1048576, "streams.long.seq_len": 1048576,
        "streams.long.data": _LONG.format("1m", "long"), "streams.s2l.data": _LONG.format("1m", "s2l"),
        "parallel.offload_activations": True}),
    "recipes/llama3-8b/longred-2m-abf-sp8.yaml": ("recipes/llama3-8b/longred-1m-abf-sp8.yaml", {
        "run.name": "llama3-8b-longred-2m-abf-sp8", "run.output_dir": "runs/llama3-8b-longred-2m-abf-sp8",
        "rope.theta": 1.0e9, "rope.target_length": 2097152, "streams.long.seq_len": 2097152,
        "streams.long.data": _LONG.format("2m", "long"), "streams.s2l.data": _LONG.format("2m", "s2l"),
        "parallel.tiled_mlp": "auto", "mix.tokens_per_step": 4194304, "train.max_steps": 256,
        "train.save_every": 16}),
}


def shipped_recipes(under: str = "") -> list[str]:
    """Every launchable recipe (relative to the repository): recipes/**/*.yaml except the launcher configs
    (recipes/accelerate/) and partial recipes other recipes extend (any `base/` directory)."""
    paths = glob.glob(os.path.join(ROOT, "recipes", under, "**", "*.yaml"), recursive=True)
    return sorted(os.path.relpath(p, ROOT) for p in paths
                  if not {"accelerate", "base"} & set(os.path.relpath(p, ROOT).split(os.sep)[:-1]))


EIGHT_B = shipped_recipes("llama3-8b") + shipped_recipes("mistral-7b-v0.3")


def _load(path: str, *overrides: str):
    return load_recipe(os.path.join(ROOT, path), list(overrides))


def _flat(tree: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in tree.items():
        dotted = f"{prefix}.{key}" if prefix else key
        out.update(_flat(value, dotted) if isinstance(value, dict) else {dotted: value})
    return out


@functools.cache
def _specs() -> dict[str, object]:
    """The shipped data specs by output_dir."""
    specs = {}
    for path in sorted(glob.glob(os.path.join(ROOT, "data", "*.yaml"))):
        spec = load_spec(path)
        assert spec.output_dir not in specs, f"{path} and {specs[spec.output_dir][0]} write the same dir"
        specs[spec.output_dir] = (os.path.relpath(path, ROOT), spec)
    return specs


def _shape(model_path: str) -> Shape:
    return Shape.from_config(AutoConfig.for_model(**MODELS[model_path]))


def planner_budgets(world: int = 8, mfu: float = 0.4, peak_tflops: float = 989.0) -> dict[str, dict]:
    """scripts/plan.py's budget for every shipped 8B recipe (8 x H100 at MFU 0.4 by default)."""
    out = {}
    for path in EIGHT_B:
        cfg = _load(path)
        seq_lens = recipe_seq_lens(cfg)
        out[path] = run_budget(cfg, _shape(cfg.model.path), None, world, seq_lens, mfu, peak_tflops)
    return out


def test_the_shipped_recipes_are_found():
    assert len(EIGHT_B) == 15 + len(NEW_RECIPES) and set(NEW_RECIPES) <= set(EIGHT_B)
    assert not [p for p in shipped_recipes() if "/base/" in p or p.startswith("recipes/accelerate")]


@pytest.mark.parametrize("path", EIGHT_B)
def test_recipes_on_bases_resolve_as_before(path):
    """Each 8B recipe, rewritten on bases, resolves to the same config as before, but for the named fixes (a
    recipe newer than the snapshot: to the recipe it extends, but for what it changes)."""
    got = _flat(to_dict(_load(path)))
    if path in NEW_RECIPES:
        parent, changes = NEW_RECIPES[path]
        assert got == {**_flat(to_dict(_load(parent))), **changes}
        return
    before = {**NEW_KEYS, **_flat(json.load(open(SNAPSHOT))[path])}
    expected = {**before, **CHANGED[path]}
    assert got == expected
    assert set(CHANGED[path]) <= set(before)  # a fix changes a key that existed, it adds none


@pytest.mark.parametrize("path", EIGHT_B)
def test_recipe_data_is_what_a_shipped_spec_writes(path):
    """Every stream reads <output_dir>/<stream> of a shipped data spec, with the recipe's row length and the
    model's tokenizer (training refuses data built with another)."""
    cfg = _load(path)
    for name, stream in cfg.streams.items():
        out_dir, built = os.path.split(stream.data)
        assert out_dir in _specs(), f"{path}: streams.{name}.data {stream.data}: no spec writes {out_dir}"
        spec_path, spec = _specs()[out_dir]
        assert built in spec.streams, f"{path}: streams.{name}: {spec_path} builds no stream {built}"
        assert spec.streams[built].seq_len == stream.seq_len, (path, name, spec_path)
        assert spec.tokenizer == cfg.model.path, (path, name, spec_path)


@pytest.mark.parametrize("path", EIGHT_B)
def test_spec_budgets_cover_what_a_run_reads(path):
    """A run reads max_steps × its share of tokens_per_step from each stream (scripts/plan.py's "per run");
    the spec's cap on that stream must be at least as large, or training silently starts a second epoch."""
    cfg = _load(path)
    seq_lens = recipe_seq_lens(cfg)
    per_run = run_budget(cfg, _shape(cfg.model.path), None, 8, seq_lens, 0.4, None)["tokens_per_run"]
    for name, stream in cfg.streams.items():
        if name not in BUDGETED_STREAMS:
            continue
        spec_path, spec = _specs()[os.path.dirname(stream.data)]
        cap = spec.streams[os.path.basename(stream.data)].max_tokens
        assert cap is not None and cap >= per_run[name], (
            f"{path}: streams.{name} reads {per_run[name]} tokens; {spec_path} caps it at {cap}")


def test_budget_arithmetic_for_the_32k_longred_recipe():
    """The planner's tokens per run for the paper's set-up: 512 steps × 2^21 split 4 : 3 : 1."""
    cfg = _load("recipes/llama3-8b/longred-32k-abf.yaml")
    got = run_budget(cfg, _shape(cfg.model.path), None, 8, recipe_seq_lens(cfg), 0.4, None)["tokens_per_run"]
    assert got == {"long": 512 * 2**20, "short": 512 * 3 * 2**18, "s2l": 512 * 2**18}  # 537M, 403M, 134M


@pytest.mark.parametrize("path", EIGHT_B)
def test_checkpoints_stay_within_the_disk_budget(path):
    cfg = _load(path)
    train = cfg.train
    most, _ = checkpoints_on_disk(train.max_steps, train.save_every, train.keep_last, train.keep_every)
    size = 12 * _shape(cfg.model.path).params
    assert most * size <= DISK_BUDGET_BYTES, (path, most, size)


@pytest.mark.parametrize("path", EIGHT_B)
def test_runs_write_where_their_name_says(path):
    cfg = _load(path)
    assert cfg.run.output_dir == f"runs/{cfg.run.name}"
    assert os.path.splitext(os.path.basename(path))[0].replace("_", "-") in cfg.run.name


def _chain_text(path: str) -> str:
    """The text of a recipe and every file of its base chain."""
    text, current = "", os.path.join(ROOT, path)
    while current:
        raw = open(current, encoding="utf-8").read()
        text += raw
        base = re.search(r"^base:\s*(\S+)", raw, re.M)
        current = os.path.normpath(os.path.join(os.path.dirname(current), base.group(1))) if base else None
    return text


@pytest.mark.parametrize("path", EIGHT_B)
def test_headers_name_the_specs_that_build_the_data(path):
    """The `prepare_data.py data/<spec>.yaml` commands in a recipe's comments (its own, or its base's for a
    variant) build every directory the recipe reads."""
    cfg = _load(path)
    text = _chain_text(path)
    named = set(re.findall(r"prepare_data\.py (data/[\w.-]+\.yaml)", text))
    assert named, f"{path}: no prepare_data.py command in its comments"
    written = {load_spec(os.path.join(ROOT, s)).output_dir for s in named}
    for name, stream in cfg.streams.items():
        assert os.path.dirname(stream.data) in written, (path, name, stream.data, named)


def test_recipes_and_specs_cite_only_files_a_user_has():
    """No recipe or spec cites shared/ (not in the repository); every repository path they cite exists."""
    files = glob.glob(os.path.join(ROOT, "recipes", "**", "*.yaml"), recursive=True) + \
        glob.glob(os.path.join(ROOT, "data", "*.yaml"))
    for path in files:
        text = open(path, encoding="utf-8").read()
        assert "shared/" not in text and "METHOD.md" not in text, path
        for cited in re.findall(r"\b((?:docs|recipes|data|scripts)/[\w./-]+\.(?:md|yaml|py|sbatch))", text):
            assert os.path.exists(os.path.join(ROOT, cited)), f"{path} cites {cited}"


def test_longred_headers_say_how_32k_and_128k_differ():
    """The four settings in which the paper's 32K and 128K LongReD differ are explained in both headers."""
    for path in ("recipes/llama3-8b/longred-32k-abf.yaml", "recipes/llama3-8b/longred-128k-abf.yaml"):
        header = "".join(line for line in open(os.path.join(ROOT, path)) if line.startswith("#"))
        for what in ("short weight", "s2l weight", "3.75", "1.5", "2.5", "layers", "[1, 9, 12, 14, 15, 32]",
                     "auto", "positions", "cream", "uniform", "docs/method.md", "α1 = 5", "α1 = 2"):
            assert what in header, (path, what)


def test_base_files_resolve_without_a_base_key():
    """Every file under a base/ directory resolves its own chain; the merged mapping never carries `base`."""
    paths = glob.glob(os.path.join(ROOT, "recipes", "**", "base", "*.yaml"), recursive=True)
    assert len(paths) >= 4
    for path in paths:
        assert "base" not in read_with_bases(path)


def _recipe_keys(cls=None, prefix: str = "") -> list[str]:
    """Every dotted key of a recipe (`<name>` for a stream), from the dataclasses."""
    import dataclasses
    import typing

    from distill.config import RecipeConfig

    cls = cls or RecipeConfig
    keys = []
    for field in dataclasses.fields(cls):
        key = f"{prefix}{field.name}"
        keys.append(key)
        hint = typing.get_type_hints(cls)[field.name]
        args = typing.get_args(hint)
        nested = [hint, *args, *(x for a in args for x in typing.get_args(a))]
        for sub in {a for a in nested if dataclasses.is_dataclass(a)}:
            keys += _recipe_keys(sub, key + (".<name>." if field.name == "streams" else "."))
    return keys


def test_docs_recipes_explain_every_key():
    """docs/recipes.md names every recipe key: in full, or as `.leaf` under its parent's entry."""
    text = open(os.path.join(ROOT, "docs", "recipes.md"), encoding="utf-8").read()
    keys = _recipe_keys()
    assert len(keys) > 100
    missing = [k for k in keys if f"`{k}`" not in text and f"### {k}" not in text and not (
        "." in k and f"`{k.rsplit('.', 1)[0]}" in text and f"`.{k.rsplit('.', 1)[1]}`" in text)]
    assert not missing, missing


def _expand(pattern: str) -> list[str]:
    """`recipes/a-{x,y}.yaml` -> both paths (the tables' shorthand; one brace group at a time)."""
    group = re.search(r"\{([^}]+)\}", pattern)
    if not group:
        return [pattern]
    return [p for a in group.group(1).split(",") for p in _expand(pattern.replace(group.group(0), a, 1))]


def _table(path: str) -> list[list[str]]:
    text = open(os.path.join(ROOT, path), encoding="utf-8").read()
    return [[c.strip() for c in line.strip().strip("|").split("|")] for line in text.splitlines()
            if line.startswith("| ") and "`recipes/" in line]


def test_readme_recipe_table_and_quickstart_are_the_catalogue():
    """The README's recipe table and quickstart repeat docs/recipes.md's catalogue (which the test below
    checks against the planner): every 8B row's GiB, fit and hours are the catalogue's for its recipes."""
    catalogue = {}
    for cells in _table("docs/recipes.md"):
        for path in _expand(re.search(r"`(recipes/[^`]+)`", cells[2]).group(1)):
            catalogue[path] = cells
    checked = set()
    for cells in _table("README.md"):
        paths = _expand(re.search(r"`(recipes/[^`]+)`", cells[2]).group(1))
        if not all(p in catalogue for p in paths):  # SmolLM2: one GPU, not in the 8-GPU catalogue
            continue
        rows = [catalogue[p] for p in paths]
        h100 = {r[3].split(",")[0] for r in rows if r[3].endswith("fits") and "not" not in r[3]}
        if h100:
            assert set(re.findall(r"\d+", cells[3])) == h100, (cells[2], cells[3])
        else:
            assert cells[3] in ("does not fit", "S = 2 needed"), (cells[2], cells[3])
        h200 = {r[4].split(",")[0] for r in rows if r[4] != "fits"}
        assert set(re.findall(r"\d+", cells[4])) == h200, (cells[2], cells[4])
        assert set(re.findall(r"[\d.]+", cells[5])) == {r[6] for r in rows}, (cells[2], cells[5])
        checked.update(paths)
    assert checked == set(EIGHT_B)
    sp2 = catalogue["recipes/llama3-8b/longred-128k-abf-sp2.yaml"]
    text = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
    quickstart = (f"**~{sp2[3].split(',')[0]} GiB per GPU**", f"**~{sp2[5]} s per step, ~{sp2[6]} h**",
                  f"**{sp2[7]}**", f"stop grace of {sp2[8]}")
    assert all(figure in " ".join(text.split()) for figure in quickstart), quickstart


def test_docs_catalogue_is_what_the_planner_says():
    """Each row of docs/recipes.md's catalogue carries scripts/plan.py's figures for its recipes (8 x H100 and
    8 x H200, FSDP2, MFU 0.4): GiB per GPU, the fit, the sequence-parallel fallback, step time, hours, disk
    and the stop grace. No number there is typed by hand."""
    from distill.plan import GPUS, plan_with_sequence_parallel

    budgets = planner_budgets()
    seen = set()
    for cells in _table("docs/recipes.md"):
        for path in _expand(re.search(r"`(recipes/[^`]+)`", cells[2]).group(1)):
            cfg = _load(path)
            shape, seq_lens = _shape(cfg.model.path), recipe_seq_lens(cfg)
            h100 = plan_with_sequence_parallel(cfg, shape, "fsdp2", 8, GPUS["h100-80gb"], seq_lens)
            h200 = plan_with_sequence_parallel(cfg, shape, "fsdp2", 8, GPUS["h200-141gb"], seq_lens)
            gib = 1024**3
            expected = f"{h100['peak_bytes'] / gib:.0f}, " + ("fits" if h100["fits"] else
                                                             "does not fit (S = {}: {:.0f})".format(
                h100["min_sequence_parallel"], h100["peak_bytes_at_min_sequence_parallel"] / gib))
            assert cells[3] == expected, (path, cells[3], expected)
            assert cells[4] == ("fits" if h100["fits"] else f"{h200['peak_bytes'] / gib:.0f}, fits"), path
            assert h200["fits"]
            b = budgets[path]
            disk = f"{b['checkpoint_disk_bytes_max'] / 1e12:.2f} TB"
            assert cells[5:] == [f"{b['step_s']:.0f}", f"{b['total_hours']:.1f}", disk,
                                 f"{b['stop_grace_s']} s"], path
            seen.add(path)
    assert seen == set(EIGHT_B)
