"""`elmctl demo`: data -> pre-training -> DPO sweep -> report -> answers before/after, on CPU."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from elmctl.cli._common import Format, FormatOpt, console, emit_json


def register(app: typer.Typer) -> None:
    app.command("demo")(demo_cmd)


def demo_cmd(
    out: Annotated[Optional[Path], typer.Option("--out", "-o", help="Folder for everything (default experiments/demo-<timestamp>); must be new or empty.")] = None,
    store: Annotated[Optional[str], typer.Option("--store", help="Store URL (default: an SQLite file inside the demo folder, never your main store).")] = None,
    quick: Annotated[bool, typer.Option("--quick", help="Smaller data, shorter pre-training, one epoch count (about half the time).")] = False,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Show every line the stages print (default: the key lines).")] = False,
    fmt: FormatOpt = Format.table,
) -> None:
    """Run the whole pipeline on CPU in a few minutes: synthetic data, tiny pre-training, a DPO
    learning-rate x epochs sweep (2 trials at a time), a report with plots, and a held-out question
    answered before and after tuning. Each stage is printed as the elmctl command it runs.

    Example: elmctl demo --quick
    """
    from elmctl.demo import demo_config, run_demo

    cfg = demo_config(out, store, quick)
    quiet = fmt == Format.json
    c = console(stderr=quiet)
    if not quiet:
        c.print(f"[bold]elmctl demo[/]{' (quick)' if quick else ''}: everything goes to [bold]{cfg.out_dir}[/] "
                f"(store {cfg.store_url}); stages run as the commands below, with ELMCTL_HOME={cfg.out_dir}")

    def on_stage(stage) -> None:
        if not quiet:
            c.print(f"\n[bold cyan]== {stage.title}[/]")
            c.print(f"[green]$ {stage.command}[/]", markup=True, highlight=False, soft_wrap=True)

    def on_line(stage, line: str) -> None:
        if quiet or not line.strip():
            return
        if verbose or _key_line(stage.key, line):
            c.print("  " + line, markup=False, highlight=False)

    def on_done(result) -> None:
        if not quiet:
            c.print(f"[dim]  ({result.seconds:.0f}s, log {result.log})[/]")

    result = run_demo(cfg, on_stage=on_stage, on_line=on_line, on_done=on_done)
    if quiet:
        emit_json(result)
        return
    _summary(c, result)


def _key_line(stage: str, line: str) -> bool:
    """The lines worth showing live; the full output is in each stage's log file."""
    s = line.strip()
    if stage == "sweep":
        return s.startswith(("study ", "trial ", "best:", "trials:", "reward accuracy by"))
    if stage == "data":
        return s.startswith(("demo data", "pretrain", "preference"))
    if stage == "report":
        return s.startswith(("study ", "wrote", "best:", "recipe")) or s[:1] in "┏┃│┗└"
    return True


def _summary(c, r: dict) -> None:
    from rich.markup import escape

    c.print("\n[bold]== result[/]")
    best, worst = r.get("best_cell"), r.get("worst_cell")
    if best and worst:
        c.print(f"sweep [bold]{r['study']}[/]: best cell lr {best['lr']:g} x {best['epochs']} epoch(s), reward accuracy "
                f"[bold green]{best['reward_accuracy']:.3f}[/]; worst lr {worst['lr']:g} x {worst['epochs']}: "
                f"[red]{worst['reward_accuracy']:.3f}[/] (held-out pairs; 0.5 is chance)")
    c.print(f"question (held out): {r['question']}   right answer: {r['expected']}, wrong: {r['wrong']}", markup=False)
    for when in ("before", "after"):
        pick = r.get(f"{when}_pick")
        verdict = "" if pick is None else (" [green](right)[/]" if pick == r["expected"] else " [red](wrong)[/]")
        ranks = f"; of the two answers it prefers {escape(repr(pick))}{verdict}" if pick is not None else ""
        c.print(f"  {when} tuning:{' ' if when == 'after' else ''} writes {escape(repr(r[when]))}{ranks}", highlight=False)
    before, after = r.get("ranks_right_before"), r.get("ranks_right_after")
    if before is not None and after is not None:
        c.print(f"all held-out questions: the model prefers the right answer on [bold]{before:.0%}[/] before tuning, "
                f"[bold green]{after:.0%}[/] after (best cell)")
    acc_before, acc_after = r.get("eval_acc_before"), r.get("eval_acc_after")
    if acc_before is not None:
        c.print(f"lm-evaluation-harness, local task demo_compare ({r.get('eval_samples')} held-out questions): accuracy "
                f"[bold]{acc_before:.1%}[/] before tuning"
                + (f", [bold green]{acc_after:.1%}[/] after (best cell)" if acc_after is not None else ""))
    c.print("[dim](DPO tunes which answer the model prefers; writing the number itself takes a longer-trained "
            "base than the demo's few CPU minutes)[/]")
    c.print(f"report: [bold]{r['report_html']}[/] ({len(r['plots'])} plots beside it)")
    c.print(f"folder: {r['out_dir']}  (store, run folders, data, logs/)")
    c.print(f"wall time: {r['wall_s']:.0f}s")
    c.print("\n[bold]next[/] (look around, then real data on real GPUs):")
    for cmd in r["next"]:
        c.print(f"  {cmd}", markup=False, highlight=False)
