"""The one batch planner (elmctl.config.plan): every entry point gives the same plan (#12)."""

from __future__ import annotations

import pytest

from elmctl.config import load_recipe
from elmctl.config.derived import GIB
from elmctl.config.plan import HEADROOM, batch_plan, dpo_memory_estimate, pretrain_plan, split_batch, tune_plan
from elmctl.errors import UsageError
from elmctl.train.pretrain.plan import make_plan


def _launch_plan(recipe, gpus: int, gpu_mem: float):
    return make_plan(recipe, device="cuda", gpus=list(range(gpus)), gpu_name="H100", gpu_mem_gib=gpu_mem,
                     nproc=gpus, nnodes=1, micro_batch=None, max_steps=None, compile_model=False,
                     run_dir="r", data_dir="d", worker_args=["x"])


@pytest.mark.parametrize("rid,gpus,mem", [("1_1b", 8, 25.5), ("1_1b", 8, 80), ("270m", 1, 80), ("3b", 8, 80),
                                          ("450m", 16, 24), ("3b", 1, 8)])
def test_recipe_show_and_launch_agree(rid, gpus, mem):
    r = load_recipe(rid)
    core = pretrain_plan(r, gpus, gpu_mem_gib=mem)
    show = batch_plan(r, gpus, gpu_mem_gib=mem)
    launch = _launch_plan(r, gpus, mem)
    split = (core.micro_batch, core.grad_accumulation)
    assert (show["micro_batch"], show["grad_accumulation"]) == split
    assert (launch.micro_batch, launch.grad_accumulation) == split
    assert show["fits"] == launch.fits == core.fits
    assert show["memory_gib"] == launch.memory_gib == core.memory_gib_per_gpu
    assert core.micro_batch * core.grad_accumulation * gpus == 2048


def test_issue_example_1_1b_on_8_gpus_of_25_5_gib():
    # recipe show used to pick 16 x 16 (24.9 GiB, no headroom) and pretrain --dry-run 8 x 32.
    p = pretrain_plan(load_recipe("1_1b"), 8, gpu_mem_gib=25.5)
    assert (p.micro_batch, p.grad_accumulation) == (8, 32)
    assert p.fits and p.memory_gib_per_gpu <= HEADROOM * 25.5


@pytest.mark.parametrize("entry", ["show", "core", "launch", "tune"])
def test_three_gpus_is_one_error_everywhere(entry):
    r = load_recipe("1_1b")
    call = {"show": lambda: batch_plan(r, 3, gpu_mem_gib=80), "core": lambda: pretrain_plan(r, 3),
            "launch": lambda: _launch_plan(r, 3, 80), "tune": lambda: tune_plan(r, 3)}[entry]
    with pytest.raises(UsageError, match="does not split over 3 processes") as exc:
        call()
    assert "use a process count that divides" in exc.value.hint


def test_split_batch_checks_a_given_micro_batch():
    assert split_batch(64, 4, max_micro=16) == (16, 1)
    assert split_batch(64, 4, max_micro=16, micro_batch=4) == (4, 4)
    with pytest.raises(UsageError, match="--micro-batch 5 does not divide the 16 sequences"):
        split_batch(64, 4, max_micro=16, micro_batch=5)
    assert split_batch(64, 4, max_micro=16, fits=lambda m: m <= 3) == (2, 8)
    assert split_batch(64, 4, max_micro=16, fits=lambda m: False) == (1, 16)


def test_3b_dpo_on_8_h100_sharding():
    sharded = tune_plan(load_recipe("3b"), 8, gpu_mem_gib=80)  # instruct.sharding: zero3
    unsharded = tune_plan(load_recipe("3b", ["instruct.sharding=none"]), 8, gpu_mem_gib=80)
    assert sharded.sharding == "zero3" and sharded.shards == 8 and unsharded.shards == 1
    assert (sharded.micro_batch, sharded.grad_accumulation, sharded.global_batch) == (8, 2, 128)
    assert sharded.fits and sharded.memory_gib_per_gpu < 30
    # states (16 B/param) and the bf16 reference are divided by the 8 processes
    assert sharded.memory_parts_gib["states"] == pytest.approx(unsharded.memory_parts_gib["states"] / 8)
    assert sharded.memory_parts_gib["reference"] == pytest.approx(unsharded.memory_parts_gib["reference"] / 8)
    assert unsharded.memory_parts_gib["states"] > 45 and unsharded.memory_gib_per_gpu > 2.5 * sharded.memory_gib_per_gpu
    # on 8 x 40 GiB (A100 40GB) sharding is what makes it fit: unsharded the states alone exceed it
    assert tune_plan(load_recipe("3b"), 8, gpu_mem_gib=40).fits
    small = tune_plan(load_recipe("3b", ["instruct.sharding=none"]), 8, gpu_mem_gib=40)
    assert small.fits is False and small.micro_batch == 1 and "instruct.sharding=zero3" in small.notes[0]


def test_dpo_estimate_reference_and_sft():
    m = load_recipe("450m").model
    full = dpo_memory_estimate(m, 4, 1024, checkpointing=True)
    pre = dpo_memory_estimate(m, 4, 1024, checkpointing=True, reference_bytes=0)
    sft = dpo_memory_estimate(m, 4, 1024, checkpointing=True, sft=True)
    assert full["reference"] > 0 and pre["reference"] == 0 and sft["reference"] == 0
    assert pre["total"] < full["total"] and sft["activations"] == pytest.approx(full["activations"] / 2)
    assert full["total"] == pytest.approx(sum(v for k, v in full.items() if k != "total"))
    # precompute_ref drops the frozen copy from the plan
    r = load_recipe("3b")
    assert tune_plan(r, 8, gpu_mem_gib=80, precompute_ref=True).memory_parts_gib["reference"] == 0


def test_tune_plan_on_cpu_has_no_memory_and_keeps_recipe_micro():
    p = tune_plan(load_recipe("tiny"), 1, on_gpu=False)
    assert p.memory_gib_per_gpu is None and p.fits is None
    assert p.micro_batch * p.grad_accumulation == load_recipe("tiny").instruct.effective_batch
    assert GIB == 1024**3
