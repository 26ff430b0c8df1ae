"""`base:` in a recipe or a data spec: the file it extends, merged before the command line's overrides."""

import os
import subprocess
import sys

import pytest
import yaml

from distill.config import ConfigError, load_recipe, merge, to_dict

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(__file__)))
BASE = {"model": {"path": "m", "gradient_checkpointing": True},
        "rope": {"method": "abf", "theta": 1.0e6, "target_length": 1024},
        "streams": {"long": {"data": "d/long", "share": 4, "objectives": {"lm": 1.0}},
                    "short": {"data": "d/short", "share": 3, "micro_batch": 32,
                              "objectives": {"hidden": {"weight": 3.75, "layers": [1, 9, "last"]}}}},
        "optim": {"lr": 2.0e-5, "betas": [0.9, 0.95]},
        "train": {"max_steps": 512, "save_every": 32}}


def _write(path, data) -> str:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        yaml.safe_dump(data, f)
    return str(path)


def test_merge_semantics():
    """Mappings merge key by key; lists, scalars and null replace (never append)."""
    got = merge({"a": {"x": 1, "y": [1, 2], "z": {"k": 1}}, "b": 2, "c": 3},
                {"a": {"y": [3], "z": {"j": 2}}, "b": None, "d": 4})
    assert got == {"a": {"x": 1, "y": [3], "z": {"k": 1, "j": 2}}, "b": None, "c": 3, "d": 4}
    # A mapping replaces a scalar and a scalar a mapping (a share may be a number or a schedule).
    assert merge({"share": 3}, {"share": {"name": "linear"}}) == {"share": {"name": "linear"}}
    assert merge({"share": {"name": "linear"}}, {"share": 3}) == {"share": 3}


def test_recipe_on_a_base_resolves_like_the_whole_file(tmp_path):
    """A recipe holding only what differs (a path relative to its own file, in another directory) resolves to
    the same config as the whole recipe written out; command-line overrides apply after the merge."""
    base = _write(tmp_path / "recipes" / "base" / "common.yaml", BASE)
    child = {"base": "base/common.yaml",
             "rope": {"theta": 1.0e8},
             "streams": {"short": {"objectives": {"hidden": {"layers": [1, "last"]}}}},
             "train": {"keep_last": 2}}
    path = _write(tmp_path / "recipes" / "child.yaml", child)
    whole = yaml.safe_load(open(base))
    whole["rope"]["theta"] = 1.0e8
    whole["streams"]["short"]["objectives"]["hidden"]["layers"] = [1, "last"]
    whole["train"]["keep_last"] = 2
    expected = to_dict(load_recipe(_write(tmp_path / "whole.yaml", whole)))
    cwd = os.getcwd()
    os.chdir(tmp_path)  # the base path is relative to the recipe's file, not to the working directory
    try:
        assert to_dict(load_recipe(path)) == expected
    finally:
        os.chdir(cwd)
    cfg = load_recipe(path, ["streams.short.share=1", "rope.theta=5e7"])
    assert cfg.streams["short"].share == 1.0 and cfg.rope.theta == 5e7
    assert cfg.streams["short"].micro_batch == 32 and cfg.streams["long"].share == 4.0  # from the base
    assert cfg.streams["short"].objectives.hidden.layers == [1, "last"]  # replaced, not appended


def test_chains_merge_in_order(tmp_path):
    _write(tmp_path / "a.yaml", BASE)
    _write(tmp_path / "sub" / "b.yaml",
           {"base": "../a.yaml", "optim": {"lr": 1.0e-5}, "train": {"max_steps": 8}})
    path = _write(tmp_path / "c.yaml", {"base": "sub/b.yaml", "train": {"max_steps": 4}})
    cfg = load_recipe(path)
    assert cfg.optim.lr == 1.0e-5 and cfg.train.max_steps == 4 and cfg.train.save_every == 32
    assert cfg.optim.betas == [0.9, 0.95]


def test_saved_config_is_the_merged_recipe_without_base(tmp_path):
    """What a run saves as config.yaml (`save_yaml` of the loaded recipe) is the merged recipe, with no
    `base`, and loads again to the same config on its own."""
    from distill.config import save_yaml

    _write(tmp_path / "a.yaml", BASE)
    cfg = load_recipe(_write(tmp_path / "c.yaml", {"base": "a.yaml", "train": {"max_steps": 4}}))
    save_yaml(cfg, tmp_path / "config.yaml")
    saved = yaml.safe_load(open(tmp_path / "config.yaml"))
    assert "base" not in saved and saved["train"]["max_steps"] == 4 and saved["optim"]["lr"] == 2.0e-5
    assert to_dict(load_recipe(str(tmp_path / "config.yaml"))) == to_dict(cfg)


@pytest.mark.parametrize("case, message", [
    ("missing", "child.yaml: base: nope/base.yaml: file not found (looked for "),
    ("cycle", "a.yaml: base: child.yaml: a cycle of bases (child.yaml -> b.yaml -> a.yaml -> child.yaml)"),
    ("self", "child.yaml: base: child.yaml: a cycle of bases (child.yaml -> child.yaml)"),
    ("not a path", "child.yaml: base: expected a file path relative to this file, got 3"),
    ("unknown key in base", "streams.long.shar: unknown key; did you mean 'share'?"),
    ("bad value in base", "optim.lr: must be positive"),
])
def test_bad_bases_are_one_line(tmp_path, case, message):
    child = {"train": {"max_steps": 4}}
    if case == "missing":
        child["base"] = "nope/base.yaml"
    elif case == "cycle":
        _write(tmp_path / "b.yaml", {"base": "a.yaml"})
        _write(tmp_path / "a.yaml", {"base": "child.yaml", **BASE})
        child["base"] = "b.yaml"
    elif case == "self":
        child["base"] = "child.yaml"
    elif case == "not a path":
        child["base"] = 3
    else:
        bad = yaml.safe_load(yaml.safe_dump(BASE))
        if case == "unknown key in base":
            bad["streams"]["long"]["shar"] = 1
        else:
            bad["optim"]["lr"] = -1
        _write(tmp_path / "a.yaml", bad)
        child["base"] = "a.yaml"
    path = _write(tmp_path / "child.yaml", child)
    with pytest.raises(ConfigError) as err:
        load_recipe(path)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_trainer_refuses_a_bad_base_in_one_line(tmp_path):
    """The command line prints the base's problem as one `error:` line, exit 2, no traceback."""
    path = _write(tmp_path / "child.yaml", {"base": "missing.yaml", "train": {"max_steps": 4}})
    proc = subprocess.run([sys.executable, "-m", "distill.train", path], capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": ROOT}, timeout=120, check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: {path}: base: missing.yaml: file not found")


def test_data_specs_take_a_base_too(tmp_path):
    """The data specs load through the same path: a spec on a base changes only what it names."""
    from distill.data.spec import load_spec

    spec = {"tokenizer": "t", "output_dir": "data/built/x",
            "sources": [{"name": "a", "kind": "jsonl", "path": "a.jsonl"}],
            "streams": {"long": {"sources": ["a"], "seq_len": 32768, "max_tokens": 5.5e8},
                        "s2l": {"sources": ["a"], "seq_len": 8192, "pack": "window"}}}
    _write(tmp_path / "x.yaml", spec)
    longer = load_spec(_write(tmp_path / "y.yaml", {"base": "x.yaml", "output_dir": "data/built/x-128k",
                                                    "streams": {"long": {"seq_len": 131072}}}))
    assert longer.output_dir == "data/built/x-128k" and longer.streams["long"].seq_len == 131072
    assert longer.streams["long"].max_tokens == 550_000_000 and longer.streams["s2l"].pack == "window"
    assert [s.name for s in longer.sources] == ["a"]
