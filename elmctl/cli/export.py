"""`elmctl export RUN --to DIR`: a run's latest checkpoint in Apple's HF layout (config.json + safetensors).

The folder loads with ``elmctl.load_pretrained``, HF transformers (trust_remote_code) and mlx_lm.
Beside Apple's two files it holds the tokenizer file when the run used one (byte-level runs need
none) and ``elmctl_export.json`` (source run, step, tokenizer, chat template), which `elmctl
generate DIR` reads so an exported tuned model gets its chat template by default.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Annotated, Optional

import typer

from elmctl.cli._common import Format, FormatOpt, StoreOpt, console, emit_json
from elmctl.errors import UsageError


def register(app: typer.Typer) -> None:
    app.command("export")(export_cmd)


def export_run(spec: str, to: Path, *, dtype: str | None = None, store_url: str | None = None) -> dict:
    """Write the run's latest verified checkpoint to ``to`` in Apple's HF format; returns what was written."""
    from elmctl.cli.generate import EXPORT_INFO, load_model, resolve_source
    from elmctl.data.chat import TEMPLATE_NAME
    from elmctl.model.hf import save_pretrained

    src = resolve_source(spec, store_url)
    if src.kind == "hf":
        raise UsageError(f"{spec} is already an HF folder", "export takes a run id/name, run folder or checkpoint folder")
    to = Path(to).expanduser()
    if to.exists() and not to.is_dir():
        raise UsageError(f"--to {to} exists and is not a folder")
    model = load_model(src)
    save_pretrained(model, to, dtype=dtype)
    tok = src.tokenizer
    if tok and tok != "byte":  # ship the tokenizer file so the folder is self-contained
        from elmctl.data.tokenizers import load_tokenizer

        t = Path(load_tokenizer(tok).spec)
        if t.is_file():
            shutil.copy2(t, to / t.name)
            tok = t.name
    info = {"source": src.label, "run_id": src.run_id, "run_kind": src.run_kind, "step": src.step,
            "checkpoint": str(src.path), "tokenizer": tok,
            "chat_template": TEMPLATE_NAME if src.run_kind == "tune" else None}
    (to / EXPORT_INFO).write_text(json.dumps(info, indent=2) + "\n")
    files = {f.name: f.stat().st_size for f in sorted(to.iterdir()) if f.is_file()}
    params = sum(p.numel() for n, p in model.named_parameters())
    return {"to": str(to.resolve()), "files": files, "parameters": params, **info}


def export_cmd(
    run: Annotated[str, typer.Argument(help="Run id/prefix/name, run folder or checkpoint folder (ckpt-N).")],
    to: Annotated[Path, typer.Option("--to", help="Target folder (created; Apple's files in it are replaced).")],
    dtype: Annotated[Optional[str], typer.Option("--dtype", help="float32, bfloat16 or float16 (default: as trained, float32).")] = None,
    store: StoreOpt = None,
    fmt: FormatOpt = Format.table,
) -> None:
    """Export a run's latest checkpoint in Apple's HF format (config.json + model.safetensors).

    Example: elmctl export my-tune --to out/my-tune-hf
    """
    result = export_run(run, to, dtype=dtype, store_url=store)
    if fmt == Format.json:
        emit_json(result)
        return
    out = console()
    out.print(f"exported {result['source']} (step {result['step']}, {result['parameters']:,} parameters) to [bold]{result['to']}[/]")
    for name, size in result["files"].items():
        out.print(f"  {name:<28} {size:>12,} bytes")
    out.print(f"try: elmctl generate {result['to']} --prompt \"...\"   (or mlx_lm / transformers with trust_remote_code)")
