"""What the README and docs/ tell a user to type exists: every repository path they name, every flag they pass
to one of our scripts, and every dotted recipe or data-spec key they cite. A renamed flag, a moved file or a
dropped key fails here instead of in a user's terminal."""

import dataclasses
import os
import re
import typing

import pytest

from distill.config import RecipeConfig
from distill.data.spec import DataSpec, DataStreamConfig, SourceConfig

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DOCS = [os.path.join("docs", n) for n in os.listdir(os.path.join(ROOT, "docs")) if n.endswith(".md")]
PAGES = sorted(["README.md", "benchmarks/README.md", *DOCS])

# Repository paths: a top-level folder of ours, then path characters, ending in a file name with an extension.
PATH = re.compile(r"(?<![\w./-])((?:distill|scripts|benchmarks|recipes|data|docs|tests)/"
                  r"[\w./{},*<>-]*\.(?:py|yaml|md|sh|sbatch))")
COMMAND = re.compile(r"python3? (?:-m )?((?:scripts|benchmarks)/\w+\.py)([^\n`|]*)")
FLAG = re.compile(r"(?<![\w-])(--[a-z][a-z0-9-]*)")
KEY = re.compile(r"(?<![\w./<-])((?:run|model|rope|teacher|streams|mix|optim|train|parallel|log|eval|sources|"
                 r"holdout)(?:\.[A-Za-z_<>][\w<>]*)+)(?==|`|\s|:|,|\))")
GENERATED = ("data/built/", "runs/", "models/", "demo_out/", "logs/")
FILE_SUFFIXES = ("py", "json", "jsonl", "yaml", "md", "png", "sbatch", "sh", "txt", "safetensors")
# Keys the docs cite on purpose as what NOT to write (the error a typo gets).
EXAMPLES_OF_MISTAKES = {"optim.lrr"}


def _text(page: str) -> str:
    with open(os.path.join(ROOT, page), encoding="utf-8") as f:
        return f.read()


def _expand(path: str) -> list[str]:
    """`recipes/llama3-8b/{long_cpt,mix_cpt}-32k-abf.yaml` → both names (one brace group at a time)."""
    match = re.search(r"\{([^{}]*)\}", path)
    if not match:
        return [path]
    return [p for option in match.group(1).split(",")
            for p in _expand(path[:match.start()] + option + path[match.end():])]


@pytest.mark.parametrize("page", PAGES)
def test_every_named_path_exists(page):
    missing = []
    for raw in PATH.findall(_text(page)):
        if raw.startswith(GENERATED) or any(c in raw for c in "*<>") or "/built/" in raw:
            continue
        for path in _expand(raw):
            if not os.path.exists(os.path.join(ROOT, path)):
                missing.append(path)
    assert not missing, f"{page} names files that do not exist: {sorted(set(missing))}"


def _script_flags(script: str) -> set[str]:
    return set(re.findall(r"[\"'](--[a-z][a-z0-9-]*)[\"']", _text(script)))


@pytest.mark.parametrize("page", PAGES)
def test_every_flag_given_to_a_script_is_one_it_takes(page):
    wrong = []
    for script, rest in COMMAND.findall(_text(page)):
        if not os.path.isfile(os.path.join(ROOT, script)):
            wrong.append(f"{script} (no such script)")
            continue
        known = _script_flags(script) | {"--help"}
        wrong += [f"{script} {flag}" for flag in FLAG.findall(rest) if flag not in known]
    assert not wrong, f"{page} passes flags our scripts do not take: {sorted(set(wrong))}"


def _fields(cls) -> dict:
    return {f.name: f.type for f in dataclasses.fields(cls)}


def _resolve(cls, parts: list[str]) -> bool:
    """Whether `parts` is a path of fields through dataclass `cls` (a dict's key is any name)."""
    tp: typing.Any = cls
    for part in parts:
        origin = typing.get_origin(tp)
        if origin is dict:
            tp = typing.get_args(tp)[1]
            continue
        if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
            options = [a for a in typing.get_args(tp) if dataclasses.is_dataclass(a)]
            if not options:
                return False
            tp = options[0]
        if origin is list:
            args = typing.get_args(tp)
            if args and dataclasses.is_dataclass(args[0]):  # sources.<name>.key: a list item by name
                tp = args[0]
                continue
            return False
        if not dataclasses.is_dataclass(tp):
            return False
        hints = typing.get_type_hints(tp)
        if part not in hints:
            return False
        tp = hints[part]
    return True


def _known_key(key: str) -> bool:
    parts = [p for p in key.split(".")]
    if parts[-1].startswith("<"):  # `sources.<name>.<key>`: any key of that section
        return _known_key(".".join(parts[:-1]) + ".path") if len(parts) > 2 else True
    if parts[0] in ("sources", "holdout"):
        return _resolve(DataSpec, parts)
    if parts[0] == "streams" and len(parts) >= 3:
        return (_resolve(RecipeConfig, parts) or _resolve(DataStreamConfig, parts[2:])
                or parts[2] in _fields(SourceConfig))
    return _resolve(RecipeConfig, parts)


@pytest.mark.parametrize("page", PAGES)
def test_every_cited_key_is_a_recipe_or_spec_key(page):
    text = _text(page)
    keys = {k.rstrip(".") for k in KEY.findall(text)} - EXAMPLES_OF_MISTAKES
    unknown = sorted(k for k in keys if k.rsplit(".", 1)[-1] not in FILE_SUFFIXES and not _known_key(k))
    assert not unknown, f"{page} cites keys that no recipe or data spec has: {unknown}"


def test_the_checks_catch_what_they_should():
    """The three checks are not vacuous: they recognise a real key, flag and path, and refuse made-up ones."""
    assert _known_key("parallel.sequence_parallel") and _known_key("streams.short.objectives.hidden.layers")
    assert _known_key("sources.instruct.path") and _known_key("streams.long.min_doc_tokens")
    assert not _known_key("train.no_such_key") and not _known_key("streams.long.no_such_key")
    assert "--out" in _script_flags("scripts/evaluate.py")
    assert "--nope" not in _script_flags("scripts/plan.py")
    found = PATH.findall("see `recipes/llama3-8b/{long_cpt,mix_cpt}-32k-abf.yaml` and docs/method.md.")
    assert [p for raw in found for p in _expand(raw)] == ["recipes/llama3-8b/long_cpt-32k-abf.yaml",
                                                          "recipes/llama3-8b/mix_cpt-32k-abf.yaml",
                                                          "docs/method.md"]
    assert COMMAND.findall("    python scripts/plan.py R.yaml --gpus 8 --json\n")[0][0] == "scripts/plan.py"
    assert _names_something("distill.parallel.zero3.ds_config") and not _names_something("distill.strategies")


COMMENTED = sorted(os.path.relpath(p, ROOT) for pattern in ("recipes/**/*.yaml", "data/*.yaml")
                   for p in __import__("glob").glob(os.path.join(ROOT, pattern), recursive=True))
MODULE = re.compile(r"(?<![\w/.])(distill(?:\.\w+)+)")


def _names_something(dotted: str) -> bool:
    """`distill.parallel.zero3.ds_config`: a module of ours, or an attribute of one."""
    import importlib

    parts = dotted.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            module = importlib.import_module(".".join(parts[:cut]))
        except ImportError:
            continue
        obj = module
        for attr in parts[cut:]:
            if not hasattr(obj, attr):
                return False
            obj = getattr(obj, attr)
        return True
    return False


@pytest.mark.parametrize("page", PAGES + COMMENTED)
def test_every_named_module_and_test_exists(page):
    """Recipes, data specs and pages name real modules (`distill.parallel.fsdp2`) and real test files."""
    text = _text(page)
    modules = {m.rstrip(".") for m in MODULE.findall(text)}
    wrong = [m for m in modules if m.rsplit(".", 1)[-1] not in FILE_SUFFIXES and not _names_something(m)]
    wrong += [p for p in PATH.findall(text) if p.startswith("tests/") and not any(c in p for c in "*<>{")
              and not os.path.exists(os.path.join(ROOT, p))]
    assert not wrong, f"{page} names modules or tests that do not exist: {sorted(set(wrong))}"


# ----------------------------------------------------------------------------------------------------------
# The map of the wings (docs/development.md) against the tree and the imports
# ----------------------------------------------------------------------------------------------------------
def _wings() -> dict[str, tuple[set[str], set[str]]]:
    """{wing: (its modules as paths under distill/, the wings it may import)} from the table."""
    text = _text("docs/development.md")
    table = text.split("<!-- wings: tests/unit/test_docs.py checks this table -->", 1)[1].strip()
    wings = {}
    for line in table.splitlines()[2:]:
        if not line.startswith("|"):
            break
        wing, modules, _, imports = (cell.strip() for cell in line.strip("|").split("|"))
        wings[wing] = (set(re.findall(r"`distill/([\w/]+\.py)`", modules)),
                       {w.strip() for w in imports.split(",") if w.strip()})
    return wings


def _distill_imports(path: str) -> list[tuple[str, bool, str]]:
    """(the distill module imported, whether inside a function, the source line) for each import in `path`."""
    import ast

    with open(path, encoding="utf-8") as f:
        source = f.read()
    lines = source.splitlines()
    found = []

    def visit(node, in_function):
        for child in ast.iter_child_nodes(node):
            inner = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef))
            if isinstance(child, ast.ImportFrom) and (child.module or "").startswith("distill"):
                for alias in child.names:
                    name = f"{child.module}.{alias.name}"
                    found.append((name if _module_file(name) else child.module, in_function,
                                  lines[child.lineno - 1]))
            elif isinstance(child, ast.Import):
                found.extend((a.name, in_function, lines[child.lineno - 1]) for a in child.names
                             if a.name.startswith("distill"))
            visit(child, inner)

    visit(ast.parse(source), False)
    return found


def _module_file(dotted: str) -> str | None:
    """distill/x/y.py (or the package's __init__.py) for `distill.x.y`, relative to distill/, or None."""
    rel = dotted.split(".", 1)[1].replace(".", "/") if "." in dotted else ""
    for candidate in (f"{rel}.py", f"{rel}/__init__.py"):
        if os.path.isfile(os.path.join(ROOT, "distill", candidate)):
            return candidate
    return None


def test_the_map_of_the_wings_matches_the_tree_and_the_imports():
    """Every module under distill/ is in exactly one wing of the map and every wing's modules exist; each
    module imports only its own wing and the wings the map allows it; no import of distill.* sits inside a
    function without a comment saying why (at most 15); the modules import each other without a cycle."""
    import graphlib

    wings = _wings()
    assert {"base", "data", "model", "parallel", "train", "eval"} <= set(wings)
    listed = [m for modules, _ in wings.values() for m in modules]
    assert len(listed) == len(set(listed)), "a module is in two wings"
    tree = {os.path.relpath(os.path.join(d, n), os.path.join(ROOT, "distill")).replace(os.sep, "/")
            for d, _, names in os.walk(os.path.join(ROOT, "distill")) for n in names
            if n.endswith(".py") and n != "__init__.py"}
    assert set(listed) == tree, (sorted(set(listed) - tree), sorted(tree - set(listed)))
    assert sum(1 for m in tree if "/" not in m) <= 11  # with __init__.py, at most 12 directly in distill/
    wing_of = {m: w for w, (modules, _) in wings.items() for m in modules}
    graph, inner, wrong = {}, [], []
    for module in sorted(tree):
        graph[module] = set()
        for dotted, in_function, line in _distill_imports(os.path.join(ROOT, "distill", module)):
            target = _module_file(dotted)
            assert target is not None, f"{module} imports {dotted}, which is no module of ours"
            if target.endswith("__init__.py"):  # a wing's package: its wing is its folder's
                wing = next(w for w, (ms, _) in wings.items() if any(m.startswith(target[:-11]) for m in ms))
            else:
                wing = wing_of[target]
                graph[module].add(target)
            if wing != wing_of[module] and wing not in wings[wing_of[module]][1]:
                wrong.append(f"{module} ({wing_of[module]}) imports {dotted} ({wing})")
            if in_function:
                inner.append((module, line))
    assert not wrong, wrong
    assert len(inner) <= 15 and all("#" in line for _, line in inner), inner
    graphlib.TopologicalSorter(graph).prepare()  # raises CycleError on an import cycle


def test_the_wing_check_catches_a_forbidden_import(tmp_path):
    """The map check is not vacuous: the base may not import the data wing, and a table row names modules."""
    wings = _wings()
    assert "data" not in wings["base"][1] and "config.py" in wings["base"][0]
    assert "eval" in wings["train"][1] and "train" not in wings["eval"][1]
    assert _module_file("distill.parallel.memory") == "parallel/memory.py"
    assert _module_file("distill.nope") is None
    probe = tmp_path / "probe.py"
    probe.write_text("def f():\n    from distill.train.step import train_step  # why\n")
    assert _distill_imports(str(probe)) == [("distill.train.step", True,
                                             "    from distill.train.step import train_step  # why")]
