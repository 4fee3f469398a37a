"""Shared CLI pieces: option aliases, output formats, the console."""

from __future__ import annotations

import json
import sys
from enum import Enum
from typing import Annotated, Any

import typer


class Format(str, Enum):
    table = "table"
    json = "json"
    yaml = "yaml"


def complete_recipe(incomplete: str) -> list[str]:
    """Shell completion for recipe arguments: the shipped recipe ids."""
    from elmctl.config.loader import available_recipes

    return [rid for rid in available_recipes() if rid.startswith(incomplete)]


RecipeArg = Annotated[
    str,
    typer.Argument(
        help="Recipe id (270m, 450m, 1_1b, 3b, tiny) or path to a YAML file.", autocompletion=complete_recipe
    ),
]
SetOpt = Annotated[
    list[str] | None,
    typer.Option("--set", "-s", help="Override a recipe field, e.g. --set pretrain.max_lr=1e-3 (repeatable)."),
]
FormatOpt = Annotated[Format, typer.Option("--format", "-f", help="Output format; json is a stable interface.")]
StoreOpt = Annotated[
    str | None,
    typer.Option("--store", envvar="ELMCTL_STORE", help="SQLAlchemy URL of the store (default experiments/elmctl.db)."),
]


def console(stderr: bool = False):
    from rich.console import Console

    c = Console(stderr=stderr, highlight=False, soft_wrap=False)
    if not c.is_terminal:  # pipes and CI logs: do not squeeze tables into 80 columns
        c = Console(stderr=stderr, highlight=False, soft_wrap=False, width=160)
    return c


def emit_json(data: Any) -> None:
    sys.stdout.write(json.dumps(data, indent=2, default=_default) + "\n")


def emit_yaml(data: Any) -> None:
    import yaml

    sys.stdout.write(yaml.safe_dump(json.loads(json.dumps(data, default=_default)), sort_keys=False))


def _default(o: Any) -> Any:
    if hasattr(o, "model_dump"):
        return o.model_dump(mode="json")
    if isinstance(o, (set, tuple)):
        return list(o)
    return str(o)
