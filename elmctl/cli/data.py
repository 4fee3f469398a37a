"""`elmctl data prepare|demo|info`: token shards, preference pairs, synthetic demo data."""

from __future__ import annotations

import time
from enum import Enum
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from elmctl.cli._common import MAX_WORKERS, Format, FormatOpt, console, emit_json, emit_yaml

data_app = typer.Typer(
    help="Prepare training data: pre-training token shards, preference/SFT pairs, synthetic demo data.",
    no_args_is_help=True,
)


def register(app: typer.Typer) -> None:
    app.add_typer(data_app, name="data")


class Kind(str, Enum):
    pretrain = "pretrain"
    preference = "preference"
    sft = "sft"


class TxtSplit(str, Enum):
    file = "file"
    lines = "lines"


class _Progress:
    """Rich progress bar over input bytes with a tokens/s readout (stderr, terminals only)."""

    def __init__(self, enabled: bool):
        from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeElapsedColumn

        self.t0 = time.perf_counter()
        self.bar = Progress(
            TextColumn("tokenising"), BarColumn(), DownloadColumn(), TextColumn("{task.fields[rate]}"),
            TimeElapsedColumn(), console=console(stderr=True), transient=True, disable=not enabled,
        )  # fmt: skip
        self.task = self.bar.add_task("prepare", total=None, rate="")

    def __enter__(self) -> "_Progress":
        self.bar.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self.bar.__exit__(*exc)

    def __call__(self, done: int, total: int, tokens: int) -> None:
        rate = tokens / max(time.perf_counter() - self.t0, 1e-9)
        self.bar.update(self.task, completed=done or None, total=total, rate=f"{tokens:,} tok {rate:,.0f} tok/s")


def _summary(result, kind: str) -> dict[str, Any]:
    m = result.manifest
    s = {"status": "up_to_date" if result.up_to_date else "built", "out_dir": str(result.out_dir), "kind": m["kind"]}
    keys = ("tokenizer", "vocab_size", "dtype", "splits", "dropped", "unigram_entropy_nats", "seconds",
            "truncated", "dropped_identical", "options")  # fmt: skip
    s.update({k: m[k] for k in keys if k in m})
    return s


def _render(summary: dict[str, Any], fmt: Format) -> None:
    if fmt is Format.json:
        return emit_json(summary)
    if fmt is Format.yaml:
        return emit_yaml(summary)
    c = console()
    where = summary["out_dir"]
    if summary["status"] == "up_to_date":
        c.print(f"up to date: {where} (inputs and options unchanged; use --force to rebuild)")
    else:
        c.print(f"wrote {summary['kind']} data to {where}")
    c.print(f"  tokenizer {summary['tokenizer']} (vocab {summary['vocab_size']}, {summary['dtype']})")
    for split, v in summary["splits"].items():
        items = f"{v['documents']:,} documents" if "documents" in v else f"{v['pairs']:,} pairs"
        c.print(f"  {split:5s} {v['tokens']:>14,} tokens  {items}")
    if "dropped" in summary:
        d = summary["dropped"]
        o = summary["options"]
        c.print(
            f"  dropped {d['too_few_chars']:,} under {o['min_chars']} chars, "
            f"{d['too_few_tokens']:,} under {o['min_tokens']} tokens"
        )
        c.print(f"  unigram entropy {summary['unigram_entropy_nats']:.3f} nats/token (train)")
    if "truncated" in summary:
        c.print(f"  truncated {summary['truncated']:,} pairs, dropped {summary['dropped_identical']:,} identical")


@data_app.command("prepare")
def prepare_cmd(
    inputs: Annotated[list[Path], typer.Argument(help=".txt, .jsonl, .jsonl.gz or .parquet files.")],
    tokenizer: Annotated[str, typer.Option("--tokenizer", "-t", help="byte, tokenizer.model, tokenizer.json or a folder.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Output folder.")],
    kind: Annotated[Kind, typer.Option("--kind", help="pretrain shards, or preference/sft pairs.")] = Kind.pretrain,
    recipe: Annotated[Optional[str], typer.Option("--recipe", "-r", help="Check vocab; default filters/lengths.")] = None,
    text_key: Annotated[str, typer.Option("--text-key", help="JSON/parquet field with the text (CoreNet: content).")] = "text",
    txt_split: Annotated[TxtSplit, typer.Option("--txt-split", help=".txt: one document per file, or per line.")] = TxtSplit.file,
    min_chars: Annotated[Optional[int], typer.Option("--min-chars", help="Drop shorter texts (default recipe's, else 200).")] = None,
    min_tokens: Annotated[Optional[int], typer.Option("--min-tokens", help="Drop shorter texts (default recipe's, else 256).")] = None,
    val_fraction: Annotated[float, typer.Option("--val-fraction", help="Documents held out as val (by hash).")] = 0.01,
    shard_tokens: Annotated[int, typer.Option("--shard-tokens", help="Tokens per shard file.")] = 100_000_000,
    workers: Annotated[Optional[int], typer.Option("--workers", "-j", min=1, max=MAX_WORKERS, help="Tokeniser processes (default: all cores).")] = None,
    max_length: Annotated[Optional[int], typer.Option("--max-length", help="Pairs: prompt+answer tokens (default recipe's, else 1024).")] = None,
    max_prompt_length: Annotated[Optional[int], typer.Option("--max-prompt-length", help="Pairs: prompt tokens (default recipe's, else 512).")] = None,
    test_fraction: Annotated[float, typer.Option("--test-fraction", help="Pairs without a split field held out as test.")] = 0.05,
    force: Annotated[bool, typer.Option("--force", help="Rebuild even if up to date; write into a non-empty folder that has no elmctl manifest (its files are left alone), or over another kind of prepared data.")] = False,
    fmt: FormatOpt = Format.table,
) -> None:
    """Tokenise text into pre-training shards (or preference/SFT pairs) with a manifest.

    Re-running with the same inputs and options does nothing ("up to date"). A rebuild deletes only
    the files the folder's previous elmctl manifest lists (or an interrupted build's journal); other
    files in --out are never touched. A non-empty --out without an elmctl manifest is refused unless
    --force, and a file elmctl did not write that has an output's name is always refused.

    Example: elmctl data prepare corpus.jsonl --tokenizer tokenizer.model --out data/pile --recipe 270m
    """
    enabled = fmt is Format.table and console(stderr=True).is_terminal
    with _Progress(enabled) as bar:
        if kind is Kind.pretrain:
            from elmctl.data.prepare import prepare_pretrain

            result = prepare_pretrain(
                inputs, out, tokenizer, recipe=recipe, text_key=text_key, min_chars=min_chars,
                min_tokens=min_tokens, val_fraction=val_fraction, shard_tokens=shard_tokens,
                workers=workers, txt_split=txt_split.value, force=force, progress=bar,
            )  # fmt: skip
        else:
            from elmctl.data.preference import prepare_preference

            result = prepare_preference(
                inputs, out, tokenizer, recipe=recipe, kind=kind.value, max_length=max_length,
                max_prompt_length=max_prompt_length, test_fraction=test_fraction, force=force, progress=bar,
            )  # fmt: skip
    _render(_summary(result, kind.value), fmt)


@data_app.command("demo")
def demo_cmd(
    out: Annotated[Path, typer.Option("--out", "-o", help="Output folder.")] = Path("data/demo"),
    seed: Annotated[int, typer.Option("--seed", help="Random seed (same seed, same bytes).")] = 0,
    docs: Annotated[int, typer.Option("--docs", help="Corpus documents (one chat-formatted question and answer each, ~45 bytes).")] = 8000,
    pairs: Annotated[int, typer.Option("--pairs", help="Training preference pairs.")] = 2000,
    test_pairs: Annotated[int, typer.Option("--test-pairs", help="Held-out preference pairs.")] = 200,
    fmt: FormatOpt = Format.table,
) -> None:
    """Make synthetic data: a chat-formatted number-comparison corpus and preference pairs (byte tokenizer).

    Pairs ask for the larger or smaller of two numbers; the chosen answer is right, the rejected one
    is the other number, so a DPO sweep on them measures something real.

    Writes OUT/raw/{corpus,prefs}.jsonl, OUT/pretrain/ and OUT/preference/; sized for the tiny recipe.

    Example: elmctl data demo --out data/demo --seed 0
    """
    from elmctl.data.demo import make_demo
    from elmctl.errors import UsageError

    if docs < 1 or pairs < 1 or test_pairs < 0 or pairs + test_pairs > 10_000:
        raise UsageError("need --docs >= 1, --pairs >= 1 and --pairs + --test-pairs <= 10000")
    r = make_demo(out, seed=seed, num_docs=docs, num_pairs=pairs, num_test_pairs=test_pairs)
    pre, pref = r["pretrain"], r["preference"]
    summary = {
        "status": "up_to_date" if r["up_to_date"] else "built",
        "out_dir": r["out_dir"],
        "pretrain": {"dir": str(Path(r["out_dir"]) / "pretrain"), "splits": pre["splits"],
                     "unigram_entropy_nats": pre["unigram_entropy_nats"]},
        "preference": {"dir": str(Path(r["out_dir"]) / "preference"), "splits": pref["splits"]},
    }  # fmt: skip
    if fmt is Format.json:
        return emit_json(summary)
    if fmt is Format.yaml:
        return emit_yaml(summary)
    c = console()
    c.print(f"demo data in {r['out_dir']}" + (" (up to date)" if r["up_to_date"] else ""))
    c.print(
        f"  pretrain   train {pre['splits']['train']['tokens']:,} tokens, val {pre['splits']['val']['tokens']:,}; "
        f"unigram entropy {pre['unigram_entropy_nats']:.3f} nats/token"
    )
    c.print(f"  preference train {pref['splits']['train']['pairs']:,} pairs, test {pref['splits']['test']['pairs']:,}")
    c.print(f"  next: elmctl pretrain --recipe tiny --device cpu --data {r['out_dir']}")


@data_app.command("info")
def info_cmd(
    path: Annotated[Path, typer.Argument(help="A prepared folder (or one holding pretrain/ and preference/).")],
    fmt: FormatOpt = Format.table,
) -> None:
    """Show what a prepared data folder holds (from its manifest).

    Example: elmctl data info data/demo/pretrain
    """
    from elmctl.data._manifest import load_manifest
    from elmctl.errors import UsageError

    found = []
    for folder in (path, path / "pretrain", path / "preference", path / "sft"):
        m = load_manifest(folder)  # UsageError naming the problem when one is malformed
        if m is not None:
            found.append({"dir": str(folder), **{k: v for k, v in m.items() if k not in ("files", "inputs")}})
    if not found:
        raise UsageError(f"{path}: no manifest.json (not prepared, or an unfinished prepare)",
                         "run `elmctl data prepare` or `elmctl data demo`")  # fmt: skip
    if fmt is Format.json:
        return emit_json(found)
    if fmt is Format.yaml:
        return emit_yaml(found)
    c = console()
    for m in found:
        c.print(f"{m['dir']}: {m['kind']}, tokenizer {m['tokenizer']} (vocab {m['vocab_size']}, {m['dtype']})")
        for split, v in m["splits"].items():
            c.print(f"  {split:5s} " + ", ".join(f"{k} {x:,}" for k, x in v.items()))
