"""The rule for names users give to runs (``--name``) and sweep studies (``--study``).

A name is 1 to 64 ASCII characters: letters, digits, ``.``, ``_`` and ``-``, starting with a letter
or a digit. Why so narrow: a name is typed in shells, shown in terminals and tables, used in log
lines, Optuna dashboards and derived names (a sweep's trial runs are ``<study>-t<n>``). Spaces,
brackets, quotes, slashes and control characters each break one of those (Rich markup, shell
quoting, paths, terminal escape sequences), and a leading ``-`` reads as an option. A name shaped
like a run id (8 lowercase hex digits) is refused too: run ids are looked up first, so such a name
could point at another run.

Only new names are checked: an existing run or study is still found by whatever name it has.
Nothing here imports more than ``re``, so the CLI can use it at startup.
"""

from __future__ import annotations

import re

from elmctl.errors import UsageError

__all__ = ["NAME_MAX_CHARS", "NAME_RULE", "check_name"]

#: Longest accepted name (the store's column holds 200, leaving room for derived names).
NAME_MAX_CHARS = 64
#: The rule in words, for help texts and hints.
NAME_RULE = (f"1-{NAME_MAX_CHARS} characters: letters, digits, '.', '_', '-', "
             "starting with a letter or digit")

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
_CHAR = re.compile(r"[A-Za-z0-9._-]")
_RUN_ID = re.compile(r"[0-9a-f]{8}")


def check_name(name: str, option: str = "--name") -> str:
    """Return ``name`` if it follows :data:`NAME_RULE`.

    Args:
        name: the name as the user gave it.
        option: the flag it came from, for the message (``--name``, ``--study``).

    Returns:
        ``name`` unchanged.

    Raises:
        UsageError: empty, too long, a character outside the rule, or shaped like a run id.
    """
    if not name:
        raise UsageError(f"{option} is empty", f"give a name of {NAME_RULE}, or leave {option} out")
    if len(name) > NAME_MAX_CHARS:
        raise UsageError(f"{option} is {len(name)} characters long; at most {NAME_MAX_CHARS} are allowed",
                         f"use a shorter name ({NAME_RULE})")
    if not _NAME.fullmatch(name):
        bad = next((c for c in name if not _CHAR.fullmatch(c)), None)
        what = (f"character {ascii(bad)} is not allowed" if bad is not None
                else f"it must start with a letter or digit, not {name[0]!r}")
        raise UsageError(f"{option} {ascii(name)}: {what}", f"a name is {NAME_RULE}")
    if _RUN_ID.fullmatch(name):
        raise UsageError(f"{option} {name!r} looks like a run id (8 hex digits); ids are looked up first",
                         "add a letter outside a-f, e.g. " + f"'{name}-run'")
    return name
