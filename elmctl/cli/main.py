"""The `elmctl` command: assembles the command groups and turns errors into messages.

Each module in ``_GROUPS`` exposes ``register(app)``. Modules import torch/optuna only inside
their commands, so `elmctl --help` and `elmctl recipe show` stay fast.
"""

from __future__ import annotations

import importlib
import os
import sys

import typer

from elmctl.errors import EXIT_RUNTIME, ElmctlError

app = typer.Typer(
    name="elmctl",
    help=(
        "Experiment manager for Apple's OpenELM models: recipes (paper Tables 9/10), pre-training on "
        "local GPUs, DPO learning-rate x epoch sweeps, reports.\n\n"
        "Example: elmctl recipe show 450m --gpus 8"
    ),
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode="markdown",  # docstring paragraphs reflow; single newlines do not break lines
    context_settings={"help_option_names": ["-h", "--help"]},
)

# Command modules, in the order they appear in --help.
_GROUPS = (
    "recipe",
    "data",
    "pretrain",
    "bench",
    "runs",
    "tune",
    "report",
    "generate",
    "export",
    "eval",
    "demo",
)


def _print_version(value: bool) -> None:
    if value:
        from elmctl import __version__

        typer.echo(f"elmctl {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    debug: bool = typer.Option(False, "--debug", help="Show full tracebacks (also ELMCTL_DEBUG=1)."),
    version: bool = typer.Option(False, "--version", help="Print elmctl's version and exit.",
                                 callback=_print_version, is_eager=True),
) -> None:
    if debug:
        os.environ["ELMCTL_DEBUG"] = "1"


# Command names that live in a module of another name.
_ALIASES = {"tune-sweep": "tune"}
_registered: set[str] = set()


def _register(names) -> None:
    for name in names:
        if name in _registered:
            continue
        importlib.import_module(f"elmctl.cli.{name}").register(app)
        _registered.add(name)


def get_app() -> typer.Typer:
    """The app with every command group registered (for help, completion, tests)."""
    _register(_GROUPS)
    return app


def _app_for(argv: list[str]) -> typer.Typer:
    """Register only the group the command line names: `elmctl recipe show` imports no other group.

    Top-level help, shell completion and unknown commands get every group.
    """
    if not os.environ.get("_ELMCTL_COMPLETE"):
        first = next((a for a in argv if not a.startswith("-")), None)
        module = _ALIASES.get(first, first)
        if module in _GROUPS:
            _register([module])
            return app
    return get_app()


def _print_error(exc: ElmctlError) -> None:
    from rich.console import Console

    from elmctl.cli._common import safe_markup  # messages quote user input: no markup, no raw control characters

    console = Console(stderr=True, highlight=False, soft_wrap=True)
    console.print(f"[bold red]error:[/] {safe_markup(exc.message, keep_newlines=True)}", markup=True, emoji=False)
    if exc.hint:
        console.print(f"[dim]hint:[/] {safe_markup(exc.hint, keep_newlines=True)}", markup=True, emoji=False)


def main(argv: list[str] | None = None) -> int:
    """Console entry point. Returns the exit status (2 usage/input, 1 runtime)."""
    debug = os.environ.get("ELMCTL_DEBUG") == "1" or "--debug" in (argv or sys.argv[1:])
    try:
        # With standalone_mode=False click returns typer.Exit(n)'s code and 1 for Ctrl-C (Abort)
        # instead of exiting; pass them on.
        args = sys.argv[1:] if argv is None else argv
        rv = _app_for(args)(args=args, standalone_mode=False)
    except ElmctlError as exc:
        if debug:
            raise
        _print_error(exc)
        return exc.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except SystemExit as exc:  # typer.Exit inside commands
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except Exception as exc:  # click usage errors carry their own exit code
        for mod in _click_exception_modules():
            # typer._click.exceptions has no Abort/Exit (they live in typer.exceptions): look up
            # each name, or a bug's own traceback is buried under an AttributeError from here.
            click_exc, abort, exit_ = (getattr(mod, n, None) for n in ("ClickException", "Abort", "Exit"))
            if click_exc is not None and isinstance(exc, click_exc):
                exc.show()
                return exc.exit_code
            if abort is not None and isinstance(exc, abort):
                print("aborted", file=sys.stderr)
                return EXIT_RUNTIME
            if exit_ is not None and isinstance(exc, exit_):
                return exc.exit_code
        raise
    return rv if isinstance(rv, int) else 0


def _click_exception_modules() -> list:
    """Typer >= 0.2x vendors click as typer._click; older Typer uses click itself."""
    mods = []
    for name in ("typer._click.exceptions", "click.exceptions"):
        try:
            mods.append(importlib.import_module(name))
        except ImportError:
            pass
    return mods


def run() -> None:
    sys.exit(main())


if __name__ == "__main__":  # pragma: no cover
    run()
