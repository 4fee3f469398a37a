"""`elmctl export RUN --to DIR`: a run's latest checkpoint in Apple's HF layout (config.json + safetensors).

The folder loads with ``elmctl.load_pretrained``, HF transformers (trust_remote_code) and mlx_lm.
Beside Apple's two files it holds the tokenizer file when the run used one (byte-level runs need
none) and ``elmctl_export.json`` (source run, step, tokenizer, chat template, the files written),
which `elmctl generate DIR` reads so an exported tuned model gets its chat template by default.

The target must be new, empty, or a previous elmctl export holding nothing else: anything else
there (an Apple download, a README, another model's weights) is refused, never overwritten.
``elmctl_export.json`` is written first (listing the files about to be written) and again last, so
an interrupted export is still recognised as elmctl's and can be repeated.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Annotated, Optional

import typer

from elmctl.cli._common import Format, FormatOpt, StoreOpt, console, emit_json, safe_markup
from elmctl.errors import UsageError


def register(app: typer.Typer) -> None:
    app.command("export")(export_cmd)


_WEIGHT_FILES = ("config.json", "model.safetensors")


def _previous_export(to: Path, info_name: str) -> set[str]:
    """Names in ``to`` that an earlier `elmctl export` wrote (empty for a new or empty folder).

    Raises:
        UsageError: ``to`` is not a folder, or holds anything an elmctl export did not write.
    """
    if to.is_symlink() and not to.exists():
        raise UsageError(f"--to {to} is a link to nothing", "export into a new or empty folder")
    if to.exists() and not to.is_dir():
        raise UsageError(f"--to {to} exists and is not a folder", "export into a new or empty folder")
    entries = sorted(to.iterdir()) if to.is_dir() else []
    if not entries:
        return set()
    try:
        info = json.loads((to / info_name).read_text())
    except (OSError, ValueError):
        info = None
    if not isinstance(info, dict) or "source" not in info:
        shown = ", ".join(p.name for p in entries[:5]) + (f" and {len(entries) - 5} more" if len(entries) > 5 else "")
        raise UsageError(f"--to {to} is not empty and is not an elmctl export (no {info_name}); it holds {shown}",
                         "export into a new or empty folder: elmctl replaces only its own previous exports")
    listed = info.get("files")
    if not isinstance(listed, list):  # written before exports listed their files: what they always wrote
        listed = [*_WEIGHT_FILES, info.get("tokenizer")]
    ours = {n for n in listed if isinstance(n, str) and n == Path(n).name and n not in ("", ".", "..")}
    ours |= {info_name, info_name + ".tmp"}
    foreign = [p.name for p in entries if p.name not in ours or p.is_symlink() or not p.is_file()]
    if foreign:
        raise UsageError(f"--to {to} holds files that are not from an elmctl export: {', '.join(foreign[:5])}"
                         + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else ""),
                         "move them out of the folder, or export into a new or empty folder")
    return {p.name for p in entries}


_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def parse_size(text: str | None) -> int | None:
    """``"5GB"``, ``"500MB"``, ``"2GiB"``, ``"123"`` (bytes) -> bytes; ``"none"``/``"0"`` -> never shard.

    Raises:
        UsageError: not a positive size.
    """
    if text is None:
        return None
    t = text.strip().upper().replace(" ", "")
    if t in ("NONE", "0"):
        return None
    units = {"KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "KB": 10**3, "MB": 10**6, "GB": 10**9, "B": 1, "": 1}
    for unit, scale in units.items():
        if t.endswith(unit) and t[: len(t) - len(unit)].replace(".", "", 1).isdigit():
            value = float(t[: len(t) - len(unit)]) * scale
            if 1 <= value <= 2**50:
                return int(value)
    raise UsageError(f"--max-shard-size {text!r} is not a size", "e.g. 5GB, 500MB, 2GiB, or none (one file)")


def export_run(spec: str, to: Path, *, dtype: str | None = None, store_url: str | None = None,
               max_shard_bytes: int | None | str = "default") -> dict:
    """Write the run's latest verified checkpoint to ``to`` as a self-contained HF folder; returns what was written.

    The folder holds Apple's ``config.json`` + weights (``model.safetensors``, or HF shards + index
    above ``max_shard_bytes``), elmctl's own modelling code (``configuration_openelm.py``,
    ``modeling_openelm.py``) for ``trust_remote_code``, the tokenizer in the standard layout
    (``tokenizer.json``, ``tokenizer_config.json`` with the chat template for tuned models,
    ``special_tokens_map.json``, and ``tokenizer.model`` for SentencePiece) and ``elmctl_export.json``.

    Raises:
        UsageError: the source is not a run/checkpoint; ``to`` is a file, or a folder holding
            anything but a previous elmctl export (nothing there is overwritten or deleted).
    """
    from elmctl.train.weights import EXPORT_INFO, load_model, resolve_source
    from elmctl.data.chat import TEMPLATE_NAME
    from elmctl.model.hf import DEFAULT_MAX_SHARD_BYTES, save_pretrained, weight_file_names
    from elmctl.model.hf_code import FILES as CODE_FILES
    from elmctl.model.hf_export import CHAT_TEMPLATE, write_hf_code, write_tokenizer_files

    from elmctl.model.hf import DTYPES

    if dtype is not None and dtype not in DTYPES:
        raise UsageError(f"--dtype {dtype!r} is not a weight type", "use bf16, fp32 or fp16")
    if max_shard_bytes == "default":
        max_shard_bytes = DEFAULT_MAX_SHARD_BYTES
    src = resolve_source(spec, store_url)
    if src.kind == "hf":
        raise UsageError(f"{spec} is already an HF folder", "export takes a run id/name, run folder or checkpoint folder")
    to = Path(to).expanduser()
    previous = _previous_export(to, EXPORT_INFO)
    model = load_model(src)
    tok_spec = src.tokenizer
    tok_names: list[str] = []
    notes: list[str] = []
    tok_vocab = None
    if tok_spec:
        from elmctl.data.tokenizers import ByteTokenizer, SentencePieceTokenizer, load_tokenizer

        tokenizer = load_tokenizer(tok_spec)
        tok_vocab = tokenizer.vocab_size
        tok_names = [*_TOKENIZER_FILES, *(["tokenizer.model"] if isinstance(tokenizer, SentencePieceTokenizer) else [])]
        # what elmctl reloads from the folder: its own byte tokenizer, else the file written here
        tok_ref = "byte" if isinstance(tokenizer, ByteTokenizer) else (
            "tokenizer.model" if isinstance(tokenizer, SentencePieceTokenizer) else "tokenizer.json")
        if tok_vocab != model.config.vocab_size:
            notes.append(f"the tokenizer has {tok_vocab} tokens and the model {model.config.vocab_size} rows: "
                         "tools that sample any row (mlx_lm, transformers) may emit ids the tokenizer lacks")
    else:
        tok_ref = None
        notes.append("the run names no tokenizer: no tokenizer files written (tools need one to turn text into ids)")
    tuned = src.run_kind == "tune"
    writing = [*weight_file_names(model, dtype, max_shard_bytes), "config.json", *CODE_FILES, *tok_names]
    info = {"source": src.label, "run_id": src.run_id, "run_kind": src.run_kind, "step": src.step,
            "checkpoint": str(src.path), "tokenizer": tok_ref,
            "chat_template": TEMPLATE_NAME if tuned else None}

    def write_info(files: list[str]) -> None:
        tmp = to / (EXPORT_INFO + ".tmp")
        tmp.write_text(json.dumps({**info, "files": sorted(files)}, indent=2) + "\n")
        os.replace(tmp, to / EXPORT_INFO)

    created = not to.exists()
    try:
        to.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UsageError(f"--to {to}: cannot create the folder ({exc.strerror})") from None
    write_info(sorted(set(writing) | (previous - {EXPORT_INFO})))  # claim the folder before writing into it
    try:
        save_pretrained(model, to, dtype=dtype, max_shard_bytes=max_shard_bytes)
        write_hf_code(to)
        if tok_spec:
            write_tokenizer_files(tok_spec, to, chat_template=CHAT_TEMPLATE if tuned else None,
                                  model_max_length=model.config.context_length)
    except BaseException:
        if created or not previous:  # a new or empty folder: leave it as it was
            for name in [*writing, EXPORT_INFO]:
                (to / name).unlink(missing_ok=True)
            if created:
                to.rmdir()
        raise
    for name in previous - set(writing) - {EXPORT_INFO}:  # e.g. the tokenizer file of the previous export
        (to / name).unlink(missing_ok=True)
    # the folder held only our files before, so everything in it now is this export's
    write_info([p.name for p in to.iterdir() if p.is_file() and p.name != EXPORT_INFO])
    files = {f.name: f.stat().st_size for f in sorted(to.iterdir()) if f.is_file()}
    params = sum(p.numel() for n, p in model.named_parameters())
    return {"to": str(to.resolve()), "files": files, "parameters": params, "notes": notes, **info}


def export_cmd(
    run: Annotated[str, typer.Argument(help="Run id/prefix/name, run folder or checkpoint folder (ckpt-N).")],
    to: Annotated[Path, typer.Option("--to", help="Target folder: new, empty, or an earlier export (whose files are replaced).")],
    dtype: Annotated[Optional[str], typer.Option("--dtype", help="bf16, fp32 or fp16 (also bfloat16/float32/float16; default: as trained, fp32).")] = None,
    max_shard_size: Annotated[Optional[str], typer.Option("--max-shard-size", help="Above this, weights are written as HF shards + index (default 5GB; 'none': one file).")] = None,
    store: StoreOpt = None,
    fmt: FormatOpt = Format.table,
) -> None:
    """Export a run's latest checkpoint as a self-contained Hugging Face folder.

    Apple's layout (config.json + model.safetensors, sharded above --max-shard-size) plus elmctl's own
    modelling code and the tokenizer files, so it loads in transformers
    (AutoModelForCausalLM.from_pretrained(DIR, trust_remote_code=True)), AutoTokenizer, mlx_lm and
    `elmctl generate DIR`. RUN is a run or sweep-trial run (id, prefix or name), a run folder or a
    checkpoint folder.

    --to must be a new or empty folder, or an earlier export (replaced); a folder holding anything
    else is refused, so nothing of yours is overwritten.

    Example: elmctl export my-tune --to out/my-tune-hf --dtype bf16
    """
    result = export_run(run, to, dtype=dtype, store_url=store,
                        max_shard_bytes="default" if max_shard_size is None else parse_size(max_shard_size))
    if fmt == Format.json:
        emit_json(result)
        return
    out = console()
    out.print(f"exported {safe_markup(result['source'])} (step {result['step']}, {result['parameters']:,} parameters) "
              f"to [bold]{safe_markup(result['to'])}[/]")
    for name, size in result["files"].items():
        out.print(f"  {name:<28} {size:>12,} bytes")
    for note in result["notes"]:
        out.print(f"[yellow]note:[/] {safe_markup(note)}")
    out.print(f"try: elmctl generate {safe_markup(result['to'])} --prompt \"...\"   (or python -m mlx_lm generate --model DIR, "
              "or transformers' AutoModelForCausalLM.from_pretrained(DIR, trust_remote_code=True))")
