"""The planner at cluster scale, through `scripts/plan.py --json` as a user calls it: ZeRO-3 without
autocast's replicated weight copies, hybrid sharding (HSDP: state divided by the shard group,
sequence-parallel groups inside one), checkpoints written by every rank in parallel, host memory per node
against the node's RAM (`--host-ram`, also bounding `--max-context`), and the shipped 70B recipes on 4 nodes
of 8 x H100."""

import functools
import importlib.util
import json
import os

import pytest

from distill.plan import GiB

from .test_plan import LLAMA3_8B
from .test_train import ROOT

LLAMA3_70B = {**LLAMA3_8B, "hidden_size": 8192, "intermediate_size": 28672, "num_attention_heads": 64,
              "num_key_value_heads": 8, "num_hidden_layers": 80}
"""Meta-Llama-3-70B's config.json (the values the planner reads)."""
RECIPE_8B = "recipes/llama3-8b/longred-32k-abf.yaml"
RECIPE_70B = "recipes/llama3-70b/longred-32k-abf.yaml"
RECIPE_70B_128K = "recipes/llama3-70b/longred-128k-abf.yaml"
TIB = 1024**4


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("configs")
    paths = {}
    for name, config in (("8b", LLAMA3_8B), ("70b", LLAMA3_70B)):
        (root / name).mkdir()
        (root / name / "config.json").write_text(json.dumps(config))
        paths[name] = str(root / name)
    return paths


def _plan(*args: str, ok: bool = True) -> dict | tuple[int, str]:
    """scripts/plan.py's `main` on these arguments, in this process (the command a user runs, without a
    new interpreter's ~5 s of imports): its JSON or text; with ok=False, (exit status, stderr)."""
    import contextlib
    import io

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = _script().main(list(args))
    if not ok:
        return code, err.getvalue()
    assert code == 0, err.getvalue()
    return json.loads(out.getvalue()) if "--json" in args else out.getvalue()


@functools.cache
def _script():
    spec = importlib.util.spec_from_file_location("plan_script", os.path.join(ROOT, "scripts", "plan.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_zero3_keeps_no_autocast_copies_and_fits_an_h100(models):
    """The loop turns autocast's cast cache off under ZeRO-3, so no bf16 copy of the whole model is held:
    Llama-3-8B LongReD 32K on ZeRO-3 x 8 fits an H100 (it needed 80.5 GiB with the copies)."""
    zero3 = _plan(RECIPE_8B, "--json", "--accelerate-config", "recipes/accelerate/zero3.yaml",
                  f"model.path={models['8b']}")
    assert zero3["mode"] == "zero3" and zero3["world"] == 8
    assert zero3["breakdown"]["autocast_weight_copies"] == 0
    assert zero3["fits"] and zero3["peak_bytes"] < 75 * GiB, zero3["peak_bytes"] / GiB
    # What a layer's use still casts (the two gathered layers in flight, the lm_head) is counted.
    assert zero3["breakdown"]["gathered_parameters"] > 0
    fsdp2 = _plan(RECIPE_8B, "--json", f"model.path={models['8b']}")
    assert fsdp2["breakdown"]["autocast_weight_copies"] == 0  # bf16 mixed precision: nothing to cast


def test_hsdp_divides_the_state_by_the_shard_group(models):
    """parallel.replicate R on W GPUs shards over W / R ranks: 16 GPUs as 2 replicas of 8 hold what 8 GPUs
    hold; sequence-parallel groups must fit inside one shard group, in one line."""
    flat8 = _plan(RECIPE_8B, "--json", f"model.path={models['8b']}", "--gpus", "8")
    hsdp = _plan(RECIPE_8B, "--json", f"model.path={models['8b']}", "--gpus", "16", "parallel.replicate=2")
    flat16 = _plan(RECIPE_8B, "--json", f"model.path={models['8b']}", "--gpus", "16")
    assert hsdp["shard_group"] == 8 and hsdp["replicate"] == 2 and flat16["shard_group"] == 16
    for key in ("student_weights", "student_gradients", "optimizer_state", "teacher_weights"):
        assert hsdp["breakdown"][key] == flat8["breakdown"][key], key
        assert flat16["breakdown"][key] < hsdp["breakdown"][key], key
    assert hsdp["peak_bytes"] == flat8["peak_bytes"]
    assert hsdp["host_bytes_per_rank"] == flat8["host_bytes_per_rank"]  # a rank loads its shard group's share
    # S = 4 in shard groups of 2 (replicate 4 of 8): refused by the trainer's rule, in one line.
    bad = _plan(RECIPE_8B, "--json", f"model.path={models['8b']}", "parallel.replicate=4",
                "parallel.sequence_parallel=4")
    assert bad["sequence_parallel_problem"] == (
        "4 does not divide the shard group of 2 ranks (8 processes / parallel.replicate 4): "
        "sequence-parallel groups stay inside one")
    text = _plan(RECIPE_8B, f"model.path={models['8b']}", "parallel.replicate=4",
                 "parallel.sequence_parallel=4")
    assert "parallel.sequence_parallel 4: the trainer refuses it: 4 does not divide the shard group" in text
    # R must divide the processes, and only FSDP2 has replicas.
    odd = _plan(RECIPE_8B, "--json", f"model.path={models['8b']}", "parallel.replicate=3")
    assert odd["replicate_problem"] == "parallel.replicate: 3 does not divide the 8 processes"
    zero3 = _plan(RECIPE_8B, "--json", f"model.path={models['8b']}", "parallel.replicate=2",
                  "--accelerate-config", "recipes/accelerate/zero3.yaml")
    assert zero3["replicate_problem"].startswith("parallel.replicate: 2 needs the FSDP2 launch")


def test_checkpoints_are_written_by_every_rank_in_parallel(models):
    """A sharded checkpoint is one file per rank, written at the same time at the per-rank bandwidth
    parallel.checkpoint_write_gb_per_s: 8B LongReD 32K on FSDP2 x 8 spends <= 5% of its training hours."""
    result = _plan(RECIPE_8B, "--json", f"model.path={models['8b']}")
    b = result["budget"]
    assert b["checkpoint_writers"] == 8
    assert b["checkpoint_write_s"] == pytest.approx(b["checkpoint_bytes"] / 8 / 0.2e9)
    assert b["checkpoint_hours"] <= 0.05 * b["train_hours"], (b["checkpoint_hours"], b["train_hours"])
    text = _plan(RECIPE_8B, f"model.path={models['8b']}")
    assert "8 ranks writing in parallel at 0.2 GB/s each" in text
    # One process writes alone.
    one = _plan(RECIPE_8B, "--json", f"model.path={models['8b']}", "--gpus", "1")
    assert one["budget"]["checkpoint_writers"] == 1
    assert one["budget"]["checkpoint_write_s"] == pytest.approx(b["checkpoint_bytes"] / 0.2e9)


def test_host_memory_per_node_is_checked(models):
    """Host memory per rank: the rank's shard of both models at load (not whole models), the pinned offload
    buffers, the checkpoint and export path; per node against --host-ram. 8B LongReD 32K on FSDP2 x 8:
    <= 8 GiB a rank."""
    base = (RECIPE_8B, "--json", f"model.path={models['8b']}")
    result = _plan(*base, "--host-ram", "512GiB")
    host = result["host"]
    assert result["host_bytes_per_rank"] <= 8 * GiB, result["host_bytes_per_rank"] / GiB
    assert result["host_bytes_per_node"] == 8 * result["host_bytes_per_rank"]
    assert host["ram_bytes"] == 512 * GiB and host["fits"]
    params = result["parameters"]
    assert host["per_rank"]["load"] >= 6 * params / 8  # fp32 student + bf16 teacher, this rank's eighth
    assert host["per_rank"]["load"] < 6 * params / 8 + 1 * GiB
    small = _plan(*base, "--host-ram", "40GiB")
    assert not small["host"]["fits"] and small["fits"]  # the GPUs fit, the node's RAM does not
    text = _plan(RECIPE_8B, f"model.path={models['8b']}", "--host-ram", "40GiB")
    assert "host memory" in text and "does NOT fit the node's 40.0 GiB (--host-ram)" in text
    # The default is this machine's RAM.
    ram = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    assert _plan(*base)["host"]["ram_bytes"] == ram
    # Offloaded checkpoints are pinned host memory, per rank.
    offload = _plan(*base, "parallel.offload_activations=true", "--host-ram", "512GiB")
    assert offload["host"]["per_rank"]["offload_buffers"] == offload["offloaded_host_bytes_per_rank"] > 0
    code, stderr = _plan(*base, "--host-ram", "lots", ok=False)
    assert code == 2 and stderr.startswith("error: --host-ram 'lots'") and "Traceback" not in stderr


def test_max_context_respects_host_ram(models):
    """With offloaded checkpoints the host buffers grow with the row: a small node caps --max-context below
    what the GPUs alone allow."""
    base = ("recipes/llama3-8b/longred-1m-abf-sp8.yaml", "--json", "--max-context",
            f"model.path={models['8b']}")
    roomy = _plan(*base, "--host-ram", "4TiB")
    tight = _plan(*base, "--host-ram", "256GiB")
    assert 0 < tight["max_context"] < roomy["max_context"], (tight["max_context"], roomy["max_context"])
    assert tight["max_context_host_bytes_per_node"] <= 256 * GiB


@pytest.mark.parametrize("recipe", [RECIPE_70B, RECIPE_70B_128K])
def test_the_70b_recipes_fit_four_nodes(models, recipe):
    """The shipped 70B LongReD recipes, as their headers say: 32 x H100 (4 nodes of 8), host <= 1 TiB a node,
    checkpointing <= 5% of the training hours; the header carries the planner's figures."""
    args = (recipe, "--json", "--gpus", "32", f"model.path={models['70b']}", "--host-ram", "1TiB")
    result = _plan(*args)
    gpu = "h100-80gb"
    if "128k" in recipe and not result["fits"]:
        gpu = "h200-141gb"
        result = _plan(*args, "--gpu", gpu)
    assert result["fits"] and result["sequence_parallel_problem"] is None
    assert result["replicate_problem"] is None
    assert result["host"]["fits"] and result["host_bytes_per_node"] <= TIB
    b = result["budget"]
    assert b["checkpoint_hours"] <= 0.05 * b["train_hours"]
    header = "".join(line for line in open(os.path.join(ROOT, recipe), encoding="utf-8")
                     if line.startswith("#"))
    figures = (f"~{result['peak_bytes'] / GiB:.0f} GiB per GPU",
               f"{result['host_bytes_per_node'] / GiB:.0f} GiB of host memory per node",
               f"{b['train_hours']:.1f} h of steps",
               f"{b['checkpoint_hours']:.1f} h writing checkpoints", f"32 x {gpu.split('-')[0].upper()}")
    for figure in figures:
        assert figure in " ".join(header.replace("#", " ").split()), (recipe, figure)


def test_start_up_refuses_a_run_the_node_cannot_hold(tmp_path, tiny_llama, built_data, monkeypatch, capsys):
    """Before any model is loaded the trainer compares the planner's host memory per node (LOCAL_WORLD_SIZE
    ranks of the launch) with this node's RAM and stops in one line (exit 2) when it will not fit, on a CPU
    too; parallel.skip_memory_check: true goes on to loading, and so does a node with room."""
    from distill.plan import CPU_PROCESS_BYTES
    from distill.train import loop

    from .test_train import recipe, write

    loaded = []

    def no_load(*args, **kwargs):
        loaded.append(args)
        raise SystemExit(7)

    path = write(recipe(tiny_llama, built_data, tmp_path / "run", "longred", steps=1), tmp_path / "r.yaml")
    ram = {"bytes": CPU_PROCESS_BYTES}  # less than one CPU rank and its tiny model
    monkeypatch.setattr(loop, "node_ram_bytes", lambda: ram["bytes"])
    monkeypatch.setattr(loop, "load_student", no_load)
    capsys.readouterr()
    assert loop.main([path]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert loaded == [] and len(err) == 1, err
    assert err[0].startswith("error: the run needs ~") and "of host memory on this node (1 rank x" in err[0]
    assert "the node has 0.5 GiB" in err[0] and "parallel.skip_memory_check: true" in err[0]
    with pytest.raises(SystemExit):
        loop.main([path, "parallel.skip_memory_check=true"])
    ram["bytes"] = 3 * CPU_PROCESS_BYTES
    with pytest.raises(SystemExit):
        loop.main([path])
    assert len(loaded) == 2


def test_the_host_check_counts_the_ranks_on_the_node(models):
    """The start-up check's line for 8B LongReD 32K on FSDP2 x 16 with 8 ranks a node on nodes of 48 GiB."""
    from transformers import AutoConfig

    from distill.config import load_recipe
    from distill.plan import Shape, host_problem, recipe_seq_lens

    cfg = load_recipe(os.path.join(ROOT, RECIPE_8B), [f"model.path={models['8b']}"])
    shape = Shape.from_config(AutoConfig.from_pretrained(models["8b"]))
    line = host_problem(cfg, shape, None, "fsdp2", 16, 8, 48 * GiB, recipe_seq_lens(cfg))
    assert line.startswith("error") is False and "(8 ranks x" in line and "the node has 48.0 GiB" in line
    assert host_problem(cfg, shape, None, "fsdp2", 16, 8, 64 * GiB, recipe_seq_lens(cfg)) is None


def test_start_up_keeps_sequence_parallel_groups_inside_a_shard_group(tmp_path, tiny_llama, built_data,
                                                                     monkeypatch, capsys):
    """The trainer's own check (check_launch, before loading) refuses S that does not divide the shard group
    under parallel.replicate, in one line naming the key; the planner applies the same rule."""
    from distill.config import ConfigError
    from distill.parallel.ulysses import check_groups
    from distill.train import loop

    from .test_train import recipe, write

    with pytest.raises(ConfigError, match=r"^parallel.sequence_parallel: 4 does not divide the shard group "
                                          r"of 2 ranks \(8 processes / parallel.replicate 4\)"):
        check_groups(8, 4, 4)
    check_groups(8, 2, 4)
    check_groups(8, 4, 2)
    # One process cannot have replicas: refused before any model is loaded.
    monkeypatch.setattr(loop, "load_student", lambda *a, **k: pytest.fail("loaded"))
    path = write(recipe(tiny_llama, built_data, tmp_path / "run", "long_cpt", steps=1), tmp_path / "r.yaml")
    capsys.readouterr()
    assert loop.main([path, "parallel.replicate=2"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: parallel.replicate: 2 needs the FSDP2 launch"), err
