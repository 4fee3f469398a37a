"""Options and checks shared by `elmctl tune` and `elmctl tune-sweep` (see :mod:`elmctl.cli.tune`)."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from elmctl.config.schema import TUNE_LOSSES
from elmctl.errors import UsageError

RecipeOpt = Annotated[str, typer.Option("--recipe", "-r", help="Recipe id (270m, 450m, 1_1b, 3b, tiny) or YAML path.")]
BaseOpt = Annotated[str, typer.Option("--base", help="Starting model: pretrain run id/name (its latest checkpoint), a checkpoint folder, or an Apple HF folder.")]
DataOpt = Annotated[str, typer.Option("--data", help="Prepared preference folder (elmctl data prepare --kind preference) or an `elmctl data demo` folder; needs a test split.")]
LossOpt = Annotated[Optional[str], typer.Option("--loss", help="sigmoid (DPO), hinge (RSO) or sft; default: the recipe's (Table 10).")]
DeviceOpt = Annotated[Optional[str], typer.Option("--device", help="cpu to train on the CPU (default: GPUs).")]
PrecomputeOpt = Annotated[bool, typer.Option("--precompute-ref", help="Compute the reference log-probs once up front instead of keeping a frozen copy of the base.")]


def check_loss(loss: str | None, recipe) -> str:
    """``--loss``, or the recipe's loss when not given; anything but sigmoid/hinge/sft -> UsageError."""
    loss = loss or recipe.instruct.loss
    if loss not in TUNE_LOSSES:
        raise UsageError(f"--loss {loss!r}: expected sigmoid, hinge or sft", "sigmoid is DPO; hinge is the RSO/SLiC loss")
    return loss


def select_devices(gpus: str | None, device: str | None) -> list[int]:
    """[] for CPU, else the physical GPU indices to use."""
    return plan_devices(gpus, device)[0]


def plan_devices(gpus: str | None, device: str | None, *, gpu_mem: float | None = None,
                 dry_run: bool = False) -> tuple[list[int], float | None, str | None]:
    """(GPU indices ([] for CPU), GiB per GPU to plan for, planned-for note): a dry run plans for
    GPUs this machine lacks (see :func:`elmctl.launch.gpus.plan_gpus`)."""
    if device not in (None, "cpu", "cuda", "gpu"):
        raise UsageError(f"--device {device!r}: expected cpu (GPUs are the default)")
    from elmctl.launch.gpus import discover, plan_gpus, select

    if device == "cpu":
        return select(gpus, [], device="cpu"), None, None
    chosen, _name, mem, note = plan_gpus(gpus, discover(), gpu_mem=gpu_mem, dry_run=dry_run)
    return chosen, mem, note
