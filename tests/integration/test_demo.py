"""A smoke run of the README's main command at a reduced size: every public command of the pipeline."""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.mark.slow
def test_demo_pipeline_quick(tmp_path):
    out = tmp_path / "demo"
    env = {**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "2"}
    proc = subprocess.run([sys.executable, "scripts/demo.py", "--out", str(out), "--quick", "--seeds", "2",
                           "--compare"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    report = json.loads((out / "report.json").read_text())
    assert set(report["methods"]) == {"long_cpt", "mix_cpt", "longred"}
    for m in report["methods"].values():
        for key in ("short_nll", "short_nll_se", "short_nll_gap", "recovered_fraction", "long_nll",
                    "long_nll_se", "short_whole_nll", "passkey_accuracy", "passkey_accuracy_within_window",
                    "passkey_accuracy_beyond_window", "recovered_fraction_mean", "recovered_fraction_sd"):
            assert key in m, key
        assert m["short_nll"] > 0 and m["long_nll"] > 0 and 0 <= m["passkey_accuracy"] <= 1
        assert m["short_nll_se"] > 0 and m["long_nll_se"] > 0
    teacher = report["teacher"]
    assert teacher["long_nll_rolling"] > 0 and teacher["short_whole_nll_rolling"] > 0
    assert 0 <= teacher["passkey_accuracy_within_window"] <= 1
    # The α sweep of LongReD and Long CPT (α 0 and 1 in the quick run): α = 1 is the extended model itself.
    for method in ("longred", "long_cpt"):
        rows = report["sweep"][method]["rows"]
        assert [r["alpha"] for r in rows] == [0.0, 1.0]
        assert rows[1]["short_nll"] == pytest.approx(report["methods"][method]["short_nll"], rel=1e-4)
    assert (out / "pareto.png").stat().st_size > 1000
    # The instruction residual: format loss of the instruct teacher, the extended models with and without it.
    loss = report["instruction_format_loss"]
    assert set(loss) == {"teacher", "instruct", "long_cpt", "longred", "long_cpt+residual",
                         "longred+residual"}
    assert all(v["nll"] > 0 and v["se"] > 0 for v in loss.values())
    assert set(report["residual"]) == {"instruct", "long_cpt+residual", "longred+residual"}
    assert report["methods"]["long_cpt"]["recovered_fraction"] == 0.0
    assert report["teacher"]["short_nll"] > 0
    # Two extension seeds: per-seed figures, their mean and spread.
    assert report["seeds"] == 2 and report["environment"]["torch_threads"] >= 1
    longred = report["methods"]["longred"]
    assert len(longred["per_seed"]["recovered_fraction"]) == 2
    per_seed = longred["per_seed"]["recovered_fraction"]
    assert longred["recovered_fraction_mean"] == pytest.approx(sum(per_seed) / 2)
    assert longred["short_nll_sd"] > 0  # the seeds trained differently
    assert (out / "runs" / "longred-seed1" / "final" / "config.json").exists()
    # The other ways to keep what the model knew: hybrid expansion (folded, with the fold measured against the
    # unfolded model) and traced layers, against Long CPT (per seed in a full run; once in the quick one).
    others = report["others"]
    assert set(others) == {"expand_lerp", "expand_dlerp", "traced"}
    for name, m in others.items():
        assert m["short_nll"] > 0 and m["long_nll"] > 0 and len(m["per_seed"]["recovered_fraction"]) == 1
        assert ("fold" in m) == name.startswith("expand")
    assert others["expand_dlerp"]["fold"]["fold_kl"] >= 0
    assert (out / "runs" / "expand_lerp" / "expanded" / "expansion.json").exists()
    figures = json.loads((out / "eval" / "traced" / "eval.json").read_text())["figures"]
    assert "short_nll_gap_se" in figures and "teacher_rolling_long_nll_beyond" not in figures  # no baselines
    text = (out / "report.md").read_text()
    assert "| LongReD |" in text and "recovered fraction" in text and "instruction-format NLL" in text
    assert "| Hybrid expansion (Dlerp) |" in text and "| Traced layers (above mean) |" in text
    assert (out / "nll_by_position.png").stat().st_size > 1000
    for name in ("teacher", "long_cpt", "mix_cpt", "longred"):
        assert (out / "eval" / name / "eval.json").exists()
    assert (out / "eval" / "longred" / "nll_by_position.png").stat().st_size > 1000
    # Built data, runs and exports exist where the pipeline put them.
    assert (out / "data" / "manifest.json").exists()
    assert (out / "runs" / "longred" / "final" / "config.json").exists()
    # A second invocation reuses every finished step and rewrites the same report.
    again = subprocess.run([sys.executable, "scripts/demo.py", "--out", str(out), "--quick", "--seeds", "2",
                            "--compare"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0 and "$ " not in again.stdout


def _demo_module():
    import importlib.util

    spec = importlib.util.spec_from_file_location("demo_script", os.path.join(ROOT, "scripts", "demo.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_demo_shows_each_stage_live():
    """A stage's lines and its progress bar reach the console while it runs, not when it ends (the teacher's
    ten minutes used to pass in silence)."""
    import time

    demo = _demo_module()
    child = ("import sys, time\n"
             "print('step 1 | loss 2.0', flush=True)\n"
             "sys.stderr.write('teacher:  50%|#####     | 1/2 [00:01<00:01]\\r'); sys.stderr.flush()\n"
             "time.sleep(3)\n"
             "print('step 2 | loss 1.0', flush=True)\n")
    seen = []
    start = time.time()
    code, tail = demo.stream([sys.executable, "-c", child], dict(os.environ),
                             lambda line: seen.append(("line", line, time.time() - start)),
                             lambda line: seen.append(("bar", line, time.time() - start)))
    ended = time.time() - start
    assert code == 0 and tail == ["step 1 | loss 2.0", "step 2 | loss 1.0"]
    assert [kind for kind, _, _ in seen] == ["line", "bar", "line"]
    assert seen[0][2] < ended - 2 and seen[1][2] < ended - 2  # shown before the stage finished


def test_demo_corpus_look_ups_answer_their_statement(tmp_path):
    """Every look-up the demo corpus writes asks for the key its statement set, later in the same module, in
    the evaluation's own templates; the instruction corpus wraps code in the fixed prompt."""
    import re

    from distill.eval import passkey
    from distill.testing import stdlib_files

    demo = _demo_module()
    files = stdlib_files(min_bytes=4000, limit=6)
    path = tmp_path / "corpus.jsonl"
    assert demo.write_passkey_documents(str(path), files) == 6
    needle = re.compile("^" + re.escape(passkey.PASSKEY_NEEDLE).replace(r"PASSKEY", "(?P<name>[A-Z]+)")
                        .replace(r"\{key\}", "(?P<key>.+)") + "$")
    lookup = re.compile("^" + re.escape(passkey.PASSKEY_LOOKUP).replace(r"PASSKEY", "(?P<name>[A-Z]+)")
                        .replace(r"\{key\}", "(?P<key>.+)") + "$")
    asked = 0
    for line in path.read_text().splitlines():
        current = {}
        for text in json.loads(line)["text"].splitlines():
            if m := lookup.match(text):
                assert current.pop(m["name"]) == m["key"]
                asked += 1
            elif m := needle.match(text):
                current[m["name"]] = m["key"]
    assert asked > 20
    instruct = tmp_path / "instruct.jsonl"
    n = demo.write_instruct_documents(str(instruct), files[:2], lines_per_doc=5)
    docs = [json.loads(line)["text"] for line in instruct.read_text().splitlines()]
    assert len(docs) == n > 2
    assert all(d.startswith(demo.INSTRUCT_PROMPT) and d.endswith("### End\n") for d in docs)
    bodies = [d[len(demo.INSTRUCT_PROMPT):].splitlines()[:-1] for d in docs]
    assert all(line.startswith("> ") for body in bodies for line in body)
