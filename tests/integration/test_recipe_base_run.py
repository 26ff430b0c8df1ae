"""A run launched from a recipe on a base: it trains, and its config.yaml is the merged recipe, without
`base`, that reruns on its own."""

import copy
import os

import yaml

from distill.config import load_recipe, to_dict
from distill.train.metrics import read_metrics

from .test_train import recipe, train_cli, write


def test_a_run_from_a_recipe_on_a_base_saves_the_merged_recipe(tmp_path, tiny_llama, built_data):
    whole = recipe(tiny_llama, built_data, tmp_path / "run", "longred", steps=2)
    base = copy.deepcopy({k: v for k, v in whole.items() if k != "run"})
    base["streams"]["short"]["objectives"]["hidden"]["weight"] = 99.0  # the child sets it back
    (tmp_path / "base").mkdir()
    write(base, tmp_path / "base" / "common.yaml")
    child = {"base": "base/common.yaml", "run": whole["run"],
             "streams": {"short": {"objectives": {"hidden": {"weight": 3.75}}}}}
    path = write(child, tmp_path / "child.yaml")
    proc = train_cli(path, "train.max_steps=1")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert [r["step"] for r in read_metrics(tmp_path / "run" / "metrics.jsonl")] == [1]
    saved = yaml.safe_load(open(tmp_path / "run" / "config.yaml"))
    assert "base" not in saved
    assert saved["streams"]["short"]["objectives"]["hidden"]["weight"] == 3.75  # the child's
    assert saved["streams"]["s2l"]["positions"] == "cream"  # from the base
    assert saved["train"]["max_steps"] == 1  # the command line's override
    expected = to_dict(load_recipe(write({**whole, "train": {**whole["train"], "max_steps": 1}},
                                         tmp_path / "whole.yaml")))
    assert saved == expected
    assert to_dict(load_recipe(os.path.join(tmp_path, "run", "config.yaml"))) == expected
