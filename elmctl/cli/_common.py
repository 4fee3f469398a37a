"""Shared CLI pieces: option aliases, output formats, the console, safe rendering of user text."""

from __future__ import annotations

import json
import re
import sys
from enum import Enum
from typing import Annotated, Any

import typer

from elmctl.store import NAME_RULE

# Upper bounds of numeric options: past them a value is a typo, not a plan (2**40 steps is what
# the recipe schema allows for max_iterations; 256 processes per run, or trials at a time, is more
# than one machine runs).
MAX_STEPS = 1 << 40
MAX_PROCS = 256
MAX_MICRO_BATCH = 1 << 20
MAX_WORKERS = 1024  # data-preparation processes (-j)


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
    typer.Option("--set", "-s", metavar="KEY=VALUE", help="Override a recipe field, e.g. --set pretrain.max_lr=1e-3 (repeatable). Values are YAML 1.2: 010 is ten, 1:30 and no are text."),
]
FormatOpt = Annotated[Format, typer.Option("--format", "-f", help="Output format; json is a stable interface.")]
StoreOpt = Annotated[
    str | None,
    typer.Option("--store", envvar="ELMCTL_STORE", help="SQLAlchemy URL of the store (default experiments/elmctl.db)."),
]


def name_option(flag: str, help: str) -> Any:
    """A ``--name``/``--study`` option that refuses names outside :data:`elmctl.store.NAME_RULE`.

    The check runs while the command line is parsed: a bad name is a usage error (exit 2) before
    anything is loaded, planned or written.
    """

    def check(ctx: typer.Context, value: str | None) -> str | None:
        if value is None or ctx.resilient_parsing:  # (shell completion parses without checking)
            return value
        from elmctl.store import check_name

        return check_name(value, flag)  # UsageError: main() prints it, exit 2

    return typer.Option(flag, callback=check, help=f"{help} Names: {NAME_RULE}.")


# C0/C1 control characters and the invisible format characters that reorder or hide text (bidi
# overrides, zero-width, line separators): a name or prompt must not move the cursor, recolour or
# clear the terminal, or make a table lie about what it shows.
_INVISIBLE = r"\x7f-\x9f\u200b-\u200f\u2028-\u202e\u2060-\u2069\ufeff"
_CONTROL = re.compile(rf"[\x00-\x1f{_INVISIBLE}]")
_CONTROL_BUT_LINES = re.compile(rf"[\x00-\x08\x0b-\x1f{_INVISIBLE}]")  # keeps \t and \n


def _show_control(m: re.Match) -> str:
    o = ord(m.group())
    return f"\\x{o:02x}" if o < 0x100 else f"\\u{o:04x}"


def plain_text(text: Any, keep_newlines: bool = False) -> str:
    """``text`` with control characters shown as ``\\xNN`` escapes (tabs and newlines kept if asked)."""
    return (_CONTROL_BUT_LINES if keep_newlines else _CONTROL).sub(_show_control, str(text))


def safe_markup(text: Any, keep_newlines: bool = False) -> str:
    """User-given text (a run or study name, a prompt) to put inside Rich markup: shown as typed.

    Rich markup in it is escaped (``[bold]`` stays literal, ``[/]`` cannot raise MarkupError) and
    control characters are shown as escapes (see :func:`plain_text`).
    """
    from rich.markup import escape

    return escape(plain_text(text, keep_newlines))


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
