"""Runs a list of the user's commands in ONE Python process, each through the same `main(argv)` its command
line calls (scripts/prepare_data.py, python -m distill.train, scripts/plan.py), so that the journey test pays
the imports once instead of once per recipe. The environment (the Hugging Face cache, offline) is set by the
caller before this process starts, as it would be on a user's machine.

    python journey_worker.py COMMANDS.json RESULTS.json      # cwd: the user's working directory

COMMANDS.json: [{"name": ..., "command": "prepare_data" | "train" | "plan", "argv": [...]}]. RESULTS.json:
{name: {"code": exit code, "seconds": wall time, "stdout": what it printed (plan)}}, rewritten after each.
"""

import contextlib
import importlib.util
import io
import json
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)


def _script(name: str):
    path = os.path.join(ROOT, "scripts", f"{name}.py")
    spec = importlib.util.spec_from_file_location(f"journey_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main() -> None:
    commands_path, results_path = sys.argv[1:3]
    with open(commands_path, encoding="utf-8") as f:
        commands = json.load(f)
    import distill.train.loop

    entry = {"prepare_data": _script("prepare_data").main, "plan": _script("plan").main,
             "train": distill.train.loop.main}
    results = {}
    for item in commands:
        t0 = time.perf_counter()
        out = io.StringIO()
        try:
            with contextlib.redirect_stdout(out):
                code = entry[item["command"]](item["argv"])
        except SystemExit as stop:  # argparse's own exits
            code = stop.code if isinstance(stop.code, int) else 2
        results[item["name"]] = {"code": code, "seconds": round(time.perf_counter() - t0, 2),
                                 "stdout": out.getvalue()[-20000:]}
        seconds = results[item["name"]]["seconds"]
        print(f"[journey] {item['name']}: exit {code} in {seconds} s", file=sys.stderr, flush=True)
        with open(results_path, "w", encoding="utf-8") as f:
            json.dump(results, f)


if __name__ == "__main__":
    main()
