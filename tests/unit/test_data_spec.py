"""Data spec loading: shipped specs parse and validate; mistakes are one-line ConfigErrors with the key."""

import glob
import os

import pytest

from distill.config import ConfigError
from distill.data.spec import load_spec, spec_from_dict

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _spec(**changes):
    data = {
        "tokenizer": "tok",
        "output_dir": "out",
        "sources": [{"name": "a", "kind": "jsonl", "path": "/x/*.jsonl"},
                    {"name": "b", "kind": "files", "path": "/repo", "include": ["*.py"]}],
        "streams": {"long": {"sources": ["a", "b"], "seq_len": 64, "pack": "concat"},
                    "short": {"sources": ["a"], "seq_len": 16, "pack": "best_fit", "max_doc_tokens": 16}},
    }
    for key, value in changes.items():
        node = data
        parts = key.split(".")
        for p in parts[:-1]:
            node = node[int(p)] if isinstance(node, list) else node[p]
        node[parts[-1]] = value
    return data


@pytest.mark.parametrize("path", sorted(glob.glob(os.path.join(ROOT, "data", "*.yaml"))))
def test_shipped_specs_load(path):
    spec = load_spec(path)
    assert spec.streams and spec.sources
    for stream in spec.streams.values():
        assert stream.seq_len > 0


def test_llama2_domain_proportions_in_the_slimpajama_spec():
    spec = load_spec(os.path.join(ROOT, "data", "slimpajama-llama3.yaml"))
    weights = {s.name: s.weight for s in spec.sources}
    assert abs(sum(weights.values()) - 1.0) < 1e-6
    assert weights["cc"] == pytest.approx(0.534) and weights["stackexchange"] == pytest.approx(0.032)
    assert spec.streams["long"].seq_len == 32768 and spec.streams["s2l"].seq_len == 8192


def test_valid_spec_defaults():
    spec = spec_from_dict(_spec())
    assert spec.eos is True and spec.strict is False and spec.holdout.fraction == 0.0
    assert spec.streams["long"].last_row == "drop" and spec.streams["short"].long_docs == "split"


@pytest.mark.parametrize("key,value,expected", [
    ("streams.long.seq_len", 0, "streams.long.seq_len: must be a positive number of tokens, got 0"),
    ("streams.long.seq_len", -5, "streams.long.seq_len"),
    ("streams.long.sources", [], "streams.long.sources: a stream needs at least one source"),
    ("streams.long.sources", ["a", "nope"],
     "streams.long.sources[1]: unknown source 'nope'; defined sources: a, b"),
    ("streams.long.pack", "greedy",
     "streams.long.pack: 'greedy' is not allowed; allowed: 'concat', 'best_fit', 'window'"),
    ("streams.long.stride", 8, "streams.long.stride: only for pack window"),
    ("streams.short.min_doc_tokens", 32, "streams.short.max_doc_tokens: 16 is below min_doc_tokens 32"),
    ("sources.0.kind", "csv", "sources[0].kind: 'csv' is not allowed"),
    ("sources.0.path", None, "sources[0].path: kind jsonl needs a path"),
    ("sources.0.weight", 0, "sources[0].weight: must be positive"),
    ("sources.1.name", "a", "sources[1].name: duplicate source name 'a'"),
    ("holdout", {"fraction": 1.5}, "holdout.fraction: must be in [0, 1)"),
    ("holdout", {"streams": ["long", "nope"]}, "holdout.streams[1]: unknown stream 'nope'"),
    ("holdout", {"min_tokens": 100, "max_tokens": 50}, "holdout.max_tokens: 50 is below min_tokens 100"),
])
def test_bad_values_name_the_key(key, value, expected):
    with pytest.raises(ConfigError) as err:
        spec_from_dict(_spec(**{key: value}))
    assert expected in str(err.value)
    assert "\n" not in str(err.value)


def test_unknown_key_suggests_the_closest():
    data = _spec()
    data["streams"]["long"]["seq_length"] = 64
    with pytest.raises(ConfigError,
                       match=r"streams\.long\.seq_length: unknown key; did you mean 'seq_len'\?"):
        spec_from_dict(data)


def test_hf_source_needs_a_dataset():
    data = _spec()
    data["sources"].append({"name": "web", "kind": "hf"})
    with pytest.raises(ConfigError, match=r"sources\[2\]\.dataset: kind hf needs a dataset"):
        spec_from_dict(data)


def test_overrides_apply_to_the_spec(tmp_path):
    import yaml

    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump(_spec()))
    spec = load_spec(str(path), ["tokenizer=/my/tok", "streams.long.seq_len=128"])
    assert spec.tokenizer == "/my/tok" and spec.streams["long"].seq_len == 128


def test_overrides_reach_a_source_by_its_name(tmp_path):
    """`sources.<name>.<key>=`: on main only a list index (sources.0.path=) reached a source."""
    import yaml

    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump(_spec()))
    spec = load_spec(str(path), ["sources.b.path=/elsewhere", "sources.a.weight=3",
                                 "sources.0.text_field=body"])
    assert spec.source("b").path == "/elsewhere" and spec.source("a").weight == 3.0
    assert spec.source("a").text_field == "body"
    with pytest.raises(ConfigError, match=r"^override sources\.c\.path: sources\.c is not an index of a list "
                                          r"of 2 items \(0\.\.1\) or a name \(a, b\)$"):
        load_spec(str(path), ["sources.c.path=/x"])


def test_data_dir_is_for_hf_sources_only():
    with pytest.raises(ConfigError, match=r"sources\[0\]\.data_dir: only for kind hf, not jsonl"):
        spec_from_dict(_spec(**{"sources.0.data_dir": "python"}))
    data = _spec()
    data["sources"].append({"name": "code", "kind": "hf", "dataset": "bigcode/starcoderdata",
                            "data_dir": "python"})
    assert spec_from_dict(data).source("code").data_dir == "python"
