"""Options shared by `elmctl tune` and `elmctl tune-sweep` (see :mod:`elmctl.cli.tune`); their checks are
:mod:`elmctl.train.tune.launcher`'s."""

from __future__ import annotations

from typing import Annotated, Optional

import typer


RecipeOpt = Annotated[str, typer.Option("--recipe", "-r", help="Recipe id (270m, 450m, 1_1b, 3b, tiny) or YAML path.")]
BaseOpt = Annotated[str, typer.Option("--base", help="Starting model: pretrain run id/name (its latest checkpoint), a checkpoint folder, or an Apple HF folder.")]
DataOpt = Annotated[str, typer.Option("--data", help="Prepared preference folder (elmctl data prepare --kind preference) or an `elmctl data demo` folder; needs a test split.")]
LossOpt = Annotated[Optional[str], typer.Option("--loss", help="sigmoid (DPO), hinge (RSO) or sft; default: the recipe's (Table 10).")]
DeviceOpt = Annotated[Optional[str], typer.Option("--device", help="cpu to train on the CPU (default: GPUs).")]
PrecomputeOpt = Annotated[bool, typer.Option("--precompute-ref", help="Compute the reference log-probs once up front instead of keeping a frozen copy of the base.")]
