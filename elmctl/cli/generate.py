"""`elmctl generate`: sample from a trained run (its latest checkpoint) or an exported HF folder.

The plain functions (:func:`resolve_source`, :func:`load_model`, :func:`load_source_tokenizer`,
:func:`generate_text`) never print; `elmctl export` and `elmctl demo` reuse them.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from elmctl.cli._common import Format, FormatOpt, StoreOpt, console, emit_json, plain_text, safe_markup
from elmctl.errors import UsageError

EXPORT_INFO = "elmctl_export.json"  # written by `elmctl export` next to config.json


def register(app: typer.Typer) -> None:
    app.command("generate")(generate_cmd)


@dataclass(frozen=True)
class ModelSource:
    """Where weights come from: an elmctl checkpoint (with its run folder) or an Apple HF folder."""

    kind: str  # "checkpoint" | "hf"
    path: Path  # checkpoint folder (ckpt-N) or HF folder
    label: str
    run_kind: str | None  # "pretrain" | "tune" | None (unknown)
    run_dir: Path | None = None
    run_id: str | None = None
    step: int | None = None
    tokenizer: str | None = None  # tokenizer spec, when the source records one


def _data_tokenizer(data_dir: str | None) -> str | None:
    """The tokenizer spec in a prepared data folder's manifest.json (None when unknown)."""
    from elmctl.data._manifest import read_manifest

    if not isinstance(data_dir, str) or not data_dir:
        return None
    tok = (read_manifest(Path(data_dir)) or {}).get("tokenizer")
    return tok if isinstance(tok, str) else None


def _json_object(path: Path) -> dict[str, Any]:
    """A small JSON object elmctl wrote (run options, export info); {} when absent or malformed."""
    from elmctl._files import MAX_SMALL_JSON_BYTES, read_json_bounded

    try:
        return read_json_bounded(path, MAX_SMALL_JSON_BYTES)
    except UsageError:
        return {}


def _from_run_dir(run_dir: Path, label: str, run_kind: str | None, run_id: str | None) -> ModelSource:
    from elmctl.train.checkpoint import find_resumable

    info, _ = find_resumable(run_dir)  # newest checkpoint that verifies against its manifest
    if info is None:
        raise UsageError(f"{label} has no checkpoint yet",
                         f"wait for its first checkpoint (elmctl runs show {run_id or run_dir})")
    return _from_checkpoint(info.path, label, run_kind, run_id, info.step)


def _from_checkpoint(ckpt: Path, label: str, run_kind: str | None, run_id: str | None, step: int | None) -> ModelSource:
    run_dir = ckpt.parent.parent
    if not (run_dir / "recipe.json").is_file():
        raise UsageError(f"{ckpt}: no recipe.json in its run folder {run_dir}", "point at the run (id or folder) instead")
    opts = _json_object(run_dir / "options.json")
    if run_kind is None:
        meta = _json_object(ckpt / "manifest.json")
        run_kind = "tune" if ("base_kind" in opts or meta.get("kind") == "tune") else "pretrain"
    if step is None:
        step = int(ckpt.name.split("-", 1)[1]) if ckpt.name.startswith("ckpt-") else None
    return ModelSource("checkpoint", ckpt, f"{label} ({ckpt.name})", run_kind, run_dir, run_id or opts.get("run_id"),
                       step, _data_tokenizer(opts.get("data_dir")))


def resolve_source(spec: str, store_url: str | None = None) -> ModelSource:
    """RUN|DIR -> a :class:`ModelSource`: a run id/prefix/name (latest verified checkpoint), a run
    folder, a checkpoint folder (``ckpt-N``) or an HF folder (``config.json``).

    Raises:
        UsageError: nothing usable there; the run has no checkpoint; no store to look the run up in.
    """
    p = Path(spec).expanduser()
    if p.is_dir():
        if (p / "config.json").is_file():
            from elmctl._files import MAX_CONFIG_JSON_BYTES, read_json_bounded

            config = read_json_bounded(p / "config.json", MAX_CONFIG_JSON_BYTES, what="config.json")
            info = _json_object(p / EXPORT_INFO)  # written by `elmctl export`: keep only well-typed values
            info = {k: v for k, v in info.items() if (k == "step" and type(v) is int)
                    or (k in ("tokenizer", "run_kind", "run_id") and isinstance(v, str))}
            tok = None
            if info.get("tokenizer") == "byte":
                tok = "byte"  # an elmctl export of a byte-level run: its tokenizer.json is for other tools
            elif (p / "tokenizer.model").is_file() or (p / "tokenizer.json").is_file():
                tok = str(p)
            elif info.get("tokenizer"):
                tok = info["tokenizer"]
            elif config.get("vocab_size") == 259:
                tok = "byte"  # elmctl's byte-level vocabulary (tiny recipe)
            return ModelSource("hf", p, str(p), info.get("run_kind"), tokenizer=tok, run_id=info.get("run_id"),
                               step=info.get("step"))
        if (p / "manifest.json").is_file() and (p / "model.safetensors").is_file():
            return _from_checkpoint(p, str(p), None, None, None)
        if (p / "checkpoints").is_dir() or (p / "recipe.json").is_file():
            return _from_run_dir(p, f"run folder {p}", None, None)
        raise UsageError(f"{p} holds no model", "give a run id, a run folder, a checkpoint folder (ckpt-N) or an HF folder")
    from elmctl.report.summary import open_source

    try:
        src = open_source(store_url)
    except UsageError as exc:
        raise UsageError(f"{spec!r} is not a folder, and there is no run store to look it up in ({exc.message})",
                         "give a run folder / HF folder, or the store with --store URL") from None
    try:
        if src.store is None:
            raise UsageError(f"{spec!r} is not a folder, and store {src.display_url} holds no runs")
        run = src.store.get_run(spec)
    finally:
        src.close()
    return _from_run_dir(Path(run.run_dir), f"run {run.label}", run.kind, run.id)


def load_model(source: ModelSource, device: str = "cpu"):
    """The OpenELM of a source, in eval mode, on ``device``."""
    if source.kind == "hf":
        from elmctl.model.hf import load_pretrained

        model = load_pretrained(source.path, device=device)
    else:
        from elmctl.model import OpenELM
        from elmctl.train.checkpoint import load_checkpoint_files, verify_checkpoint
        from elmctl.train.pretrain import read_run_files

        recipe, _ = read_run_files(source.run_dir)
        model = OpenELM(recipe.model)
        state, _, _ = load_checkpoint_files(verify_checkpoint(source.path))
        model.load_state_dict(state)
        model.to(device)
    return model.eval()


def load_source_tokenizer(source: ModelSource, spec: str | None, vocab_size: int):
    """``--tokenizer`` if given, else the one the source's data (or export) recorded."""
    from elmctl.data.tokenizers import load_tokenizer

    spec = spec or source.tokenizer
    if not spec:
        raise UsageError(f"{source.label}: no tokenizer recorded with the model",
                         "pass --tokenizer byte | path/to/tokenizer.model | path/to/tokenizer.json")
    tok = load_tokenizer(spec)
    if tok.vocab_size > vocab_size:
        raise UsageError(f"tokenizer {tok.spec} has {tok.vocab_size} tokens; the model has {vocab_size}",
                         "pass the tokenizer the model was trained with (--tokenizer)")
    return tok


def generate_text(model, tok, prompt: str, *, chat: bool, max_new_tokens: int = 64, temperature: float = 0.0,
                  top_k: int | None = None, seed: int | None = None) -> dict[str, Any]:
    """Encode ``prompt`` (chat template or plain), decode up to ``max_new_tokens`` with a KV cache."""
    import torch

    from elmctl.data.chat import encode_chat
    from elmctl.model.generate import generate

    if chat:
        ids = encode_chat(tok, [{"role": "user", "content": prompt}])
    else:  # BOS + the prompt's tokens: pre-training saw every document as [BOS] tokens [EOS], and
        # transformers/mlx_lm add BOS too (the exported tokenizer does), so all give the same tokens
        if not tok.encode(prompt):
            raise UsageError("--prompt is empty", "give some text to continue")
        ids = tok.encode(prompt, add_bos=True)
    limit = model.config.context_length
    if len(ids) + max_new_tokens > limit:
        raise UsageError(f"prompt ({len(ids)} tokens) + --max-new-tokens {max_new_tokens} exceed the model's "
                         f"context of {limit} tokens", "shorten the prompt or lower --max-new-tokens")
    gen = torch.Generator(device=model.token_embeddings.weight.device).manual_seed(seed) if seed is not None else None
    t0 = time.perf_counter()
    # only ids the tokenizer has a piece for: a tiny model trained on a small tokenizer's data still
    # has its recipe's output rows, and an id past the tokenizer's pieces cannot be decoded
    out = generate(model, torch.tensor(ids, dtype=torch.long), max_new_tokens, temperature=temperature, top_k=top_k,
                   eos_id=tok.eos_id, generator=gen, vocab_size=min(tok.vocab_size, model.config.vocab_size))
    seconds = time.perf_counter() - t0
    new = out[len(ids):].tolist()
    stopped = tok.eos_id in new
    if stopped:
        new = new[:new.index(tok.eos_id)]
    return {"prompt": prompt, "chat": chat, "completion": tok.decode(new), "prompt_tokens": len(ids),
            "new_tokens": len(new), "stopped_at_eos": stopped, "seconds": round(seconds, 4),
            "tokens_per_s": round(len(new) / seconds, 1) if seconds > 0 else None,
            "temperature": temperature, "top_k": top_k, "seed": seed}


def score_choices(model, tok, prompt: str, choices: list[str], *, chat: bool) -> dict[str, Any]:
    """log p(choice | prompt) for each choice, as DPO scores an answer (its tokens, then EOS with --chat).

    Returns ``{"choices": [{"text", "logprob", "tokens"}], "pick": text}``; the pick has the highest
    summed log-prob (the model's preference between the answers, what a preference sweep trains).
    """
    import torch

    from elmctl.data.chat import encode_chat, encode_completion
    from elmctl.train.dpo import sequence_logps
    from elmctl.data import IGNORE_INDEX

    prompt_ids = encode_chat(tok, [{"role": "user", "content": prompt}]) if chat else tok.encode(prompt, add_bos=True)
    rows = []
    for text in choices:
        if not text:
            raise UsageError("--choice is empty", "give each answer some text")
        ans = encode_completion(tok, text) if chat else tok.encode(text)
        ids = prompt_ids + ans
        if len(ids) > model.config.context_length + 1:
            raise UsageError(f"prompt + choice {text!r} ({len(ids)} tokens) exceed the model's context of "
                             f"{model.config.context_length} tokens", "shorten the prompt or the choice")
        x = torch.tensor(ids[:-1], device=model.token_embeddings.weight.device)[None]
        labels = torch.tensor([IGNORE_INDEX] * (len(prompt_ids) - 1) + ans, device=x.device)[None]
        with torch.no_grad():
            lp = float(sequence_logps(model(x), labels)[0])
        rows.append({"text": text, "logprob": round(lp, 4), "tokens": len(ans)})
    return {"choices": rows, "pick": max(rows, key=lambda r: r["logprob"])["text"]}


def generate_cmd(
    source: Annotated[str, typer.Argument(help="Run id/prefix/name (latest checkpoint), run folder, checkpoint folder, or HF folder (elmctl export).")],
    prompt: Annotated[str, typer.Option("--prompt", "-p", help="The prompt (the user turn, with --chat).")],
    max_new_tokens: Annotated[int, typer.Option("--max-new-tokens", "-n", help="Tokens to generate at most (stops at EOS).")] = 64,
    temperature: Annotated[float, typer.Option("--temperature", "-t", help="0 = greedy; otherwise sample at this temperature.")] = 0.0,
    top_k: Annotated[Optional[int], typer.Option("--top-k", help="Sample among the k most likely tokens.")] = None,
    seed: Annotated[Optional[int], typer.Option("--seed", min=-(1 << 63), max=(1 << 64) - 1, help="Seed for sampling (same seed, same text).")] = None,
    chat: Annotated[Optional[bool], typer.Option("--chat/--no-chat", help="Wrap the prompt in the OpenELM-Instruct chat template (default: on for tuned runs).")] = None,
    tokenizer: Annotated[Optional[str], typer.Option("--tokenizer", help="byte, tokenizer.model or tokenizer.json (default: the one the run's data used).")] = None,
    device: Annotated[str, typer.Option("--device", help="cpu or cuda.")] = "cpu",
    choice: Annotated[Optional[list[str]], typer.Option("--choice", help="Also score this answer: log p(answer | prompt); repeat for each candidate, the most likely is the model's pick.")] = None,
    store: StoreOpt = None,
    fmt: FormatOpt = Format.table,
) -> None:
    """Generate text from a trained run or an exported model (KV-cache decoding).

    With `--choice A --choice B`, each answer is also scored the way DPO scores it, and the model's
    pick (the most likely answer) is shown: a preference-tuned model is trained to rank answers.

    Example: elmctl generate my-tune --prompt "What is 12 + 30?" --max-new-tokens 8 --choice 42 --choice 18
    """
    if max_new_tokens < 1:
        raise UsageError(f"--max-new-tokens {max_new_tokens}: must be >= 1")
    if not math.isfinite(temperature) or temperature < 0:
        raise UsageError(f"--temperature {temperature}: must be a finite number >= 0 (0 is greedy)")
    if top_k is not None and top_k < 1:
        raise UsageError(f"--top-k {top_k}: must be >= 1")
    if device not in ("cpu", "cuda"):
        raise UsageError(f"--device {device!r}: expected cpu or cuda")
    if device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise UsageError("--device cuda: no CUDA GPU is visible to torch", "use --device cpu (the default)")
    if choice and not all(choice):
        raise UsageError("--choice is empty", "give each answer some text")
    src = resolve_source(source, store)
    model = load_model(src, device)
    tok = load_source_tokenizer(src, tokenizer, model.config.vocab_size)
    use_chat = (src.run_kind == "tune") if chat is None else chat
    result = generate_text(model, tok, prompt, chat=use_chat, max_new_tokens=max_new_tokens, temperature=temperature,
                           top_k=top_k, seed=seed)
    result = {"source": src.label, "run_id": src.run_id, "run_kind": src.run_kind, "step": src.step,
              "tokenizer": tok.spec, **result}
    if choice:
        result.update(score_choices(model, tok, prompt, list(choice), chat=use_chat))
    if fmt == Format.json:
        emit_json(result)
        return
    out = console()
    # user and model text is shown as it is: no markup, control characters as \xNN escapes
    out.print(f"[dim]{safe_markup(src.label)}, {src.run_kind or 'model'}, step {src.step}; "
              f"{'chat template' if use_chat else 'plain prompt'}; tokenizer {safe_markup(tok.spec)}[/]", markup=True)
    out.print(f"[bold]prompt:[/] {safe_markup(prompt, keep_newlines=True)}", markup=True, highlight=False)
    out.print("[bold]output:[/] ", end="", markup=True)
    out.print(plain_text(result["completion"], keep_newlines=True), markup=False, highlight=False)
    out.print(f"[dim]{result['new_tokens']} tokens in {result['seconds']:.2f}s"
              + (" (stopped at EOS)" if result["stopped_at_eos"] else "") + "[/]", markup=True)
    for row in result.get("choices", []):
        mark = "[bold green]<- pick[/]" if row["text"] == result["pick"] else ""
        out.print(f"[bold]choice[/] {safe_markup(repr(row['text']))}: log p {row['logprob']:.3f} ({row['tokens']} tokens) {mark}",
                  markup=True, highlight=False)
