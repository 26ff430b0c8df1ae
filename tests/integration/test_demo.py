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
    proc = subprocess.run([sys.executable, "scripts/demo.py", "--out", str(out), "--quick"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    report = json.loads((out / "report.json").read_text())
    assert set(report["methods"]) == {"long_cpt", "mix_cpt", "longred"}
    for m in report["methods"].values():
        for key in ("short_nll", "short_nll_gap", "recovered_fraction", "long_nll", "passkey_accuracy"):
            assert key in m
        assert m["short_nll"] > 0 and m["long_nll"] > 0 and 0 <= m["passkey_accuracy"] <= 1
    assert report["methods"]["long_cpt"]["recovered_fraction"] == 0.0
    assert report["teacher"]["short_nll"] > 0
    text = (out / "report.md").read_text()
    assert "| LongReD |" in text and "recovered fraction" in text
    assert (out / "nll_by_position.png").stat().st_size > 1000
    for name in ("teacher", "long_cpt", "mix_cpt", "longred"):
        assert (out / "eval" / name / "eval.json").exists()
    assert (out / "eval" / "longred" / "nll_by_position.png").stat().st_size > 1000
    # Built data, runs and exports exist where the pipeline put them.
    assert (out / "data" / "manifest.json").exists()
    assert (out / "runs" / "longred" / "final" / "config.json").exists()
    # A second invocation reuses every finished step and rewrites the same report.
    again = subprocess.run([sys.executable, "scripts/demo.py", "--out", str(out), "--quick"], cwd=ROOT, env=env,
                           capture_output=True, text=True, timeout=600)
    assert again.returncode == 0 and "$ " not in again.stdout
