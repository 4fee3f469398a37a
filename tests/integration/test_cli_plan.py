"""Dry runs plan for GPUs this machine does not have, and agree with `recipe show` (#12)."""

from __future__ import annotations

import json

import pytest

FIELDS = {"processes", "sharding", "micro_batch", "grad_accumulation", "global_batch", "memory_gib_per_gpu",
          "gpu_mem_gib", "fits"}


@pytest.fixture(autouse=True)
def no_gpus(tmp_path, monkeypatch):
    """A laptop: no GPU visible, and an ELMCTL_HOME that must stay uncreated."""
    from elmctl.launch import gpus

    monkeypatch.setattr(gpus, "discover", lambda: [])
    monkeypatch.setenv("ELMCTL_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("ELMCTL_STORE", raising=False)
    yield
    assert not (tmp_path / "home").exists()  # a dry run writes nothing


def test_pretrain_dry_run_without_gpus_or_data(cli):
    res = cli("pretrain", "--recipe", "1_1b", "--gpus", "8", "--dry-run")
    assert res.code == 0, res.err
    assert "planned for 8 × H100 80 GB (this machine has none)" in res.out
    plan = json.loads(cli("pretrain", "--recipe", "1_1b", "--gpus", "8", "--dry-run", "-f", "json").out)["plan"]
    assert FIELDS <= set(plan)
    assert plan["processes"] == 8 and plan["gpu_mem_gib"] == 80 and plan["fits"] is True and plan["planned_only"]
    assert plan["micro_batch"] * plan["grad_accumulation"] * 8 == plan["global_batch"] == 2048


@pytest.mark.parametrize("gpus,mem", [("8", "25.5"), ("8", "80"), ("16", "24"), ("2", "40")])
def test_recipe_show_and_pretrain_dry_run_agree(cli, gpus, mem):
    show = json.loads(cli("recipe", "show", "1_1b", "--gpus", gpus, "--gpu-mem", mem, "-f", "json").out)["derived"]["plan"]
    dry = json.loads(cli("pretrain", "--recipe", "1_1b", "--gpus", gpus, "--gpu-mem", mem, "--dry-run",
                         "-f", "json").out)["plan"]
    for key in ("micro_batch", "grad_accumulation", "global_batch", "fits", "memory_gib_per_gpu", "processes"):
        assert show[key] == dry[key], key
    assert dry["notes"][0] == f"planned for {gpus} × {float(mem):g} GiB GPU (this machine has none)"


def test_issue_example_8_x_25_5(cli):
    dry = json.loads(cli("pretrain", "--recipe", "1_1b", "--gpus", "8", "--gpu-mem", "25.5", "--dry-run",
                         "-f", "json").out)["plan"]
    assert (dry["micro_batch"], dry["grad_accumulation"]) == (8, 32)
    assert "8 x 32 x 8 = 2048 seq" in cli("recipe", "show", "1_1b", "--gpus", "8", "--gpu-mem", "25.5").out


@pytest.mark.parametrize("args", [
    ("recipe", "show", "1_1b", "--gpus", "3"),
    ("pretrain", "--recipe", "1_1b", "--gpus", "3", "--dry-run"),
    ("tune", "--recipe", "1_1b", "--gpus", "3", "--dry-run"),
])
def test_three_gpus_is_the_same_error(cli, args):
    res = cli(*args)
    assert res.code == 2
    assert "does not split over 3 processes" in res.err and "use a process count that divides" in res.err


def test_tune_dry_run_3b_needs_no_base_data_or_gpus(cli):
    res = cli("tune", "--recipe", "3b", "--gpus", "8", "--dry-run", "--format", "json")
    assert res.code == 0, res.err
    plan = json.loads(res.out)["plan"]
    assert FIELDS <= set(plan)
    assert plan["sharding"] == "zero3" and plan["processes"] == 8 and plan["gpu_mem_gib"] == 80
    assert plan["fits"] is True and plan["global_batch"] == 128
    assert plan["micro_batch"] * plan["grad_accumulation"] * 8 == 128
    assert "planned for 8 × H100 80 GB (this machine has none)" in plan["notes"]
    table = cli("tune", "--recipe", "3b", "--gpus", "8", "--dry-run").out
    assert "sharding: zero3" in table and "(fits)" in table and "this machine has none" in table


def test_tune_without_dry_run_still_needs_base_and_data(cli):
    res = cli("tune", "--recipe", "tiny", "--device", "cpu")
    assert res.code == 2 and "--base and --data are required" in res.err


def test_all_gpus_without_gpus_asks_for_a_count(cli):
    res = cli("pretrain", "--recipe", "1_1b", "--dry-run")
    assert res.code == 2 and "--gpus 8" in res.err
    from elmctl.errors import UsageError
    from elmctl.launch.gpus import GpuInfo, plan_gpus

    with pytest.raises(UsageError, match="no GPU found"):  # not a dry run: refused as before
        plan_gpus("8", [], dry_run=False)
    one = [GpuInfo(0, "NVIDIA H100 80GB HBM3", 79.6, "GPU-0")]
    assert plan_gpus("1", one) == ([0], "NVIDIA H100 80GB HBM3", 79.6, None)
    assert plan_gpus("8", one, dry_run=True)[3] == "planned for 8 × H100 80 GB (this machine has 1 GPU)"
