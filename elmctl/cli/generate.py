"""`elmctl generate`: sample from a trained run (its latest checkpoint) or an exported HF folder.

The weights come from :mod:`elmctl.train.weights` (the resolver `export` and `tune --base` use too);
:func:`generate_text` and :func:`score_choices` never print.
"""

from __future__ import annotations

import math
import time
from typing import Annotated, Any, Optional

import typer

from elmctl.cli._common import Format, FormatOpt, StoreOpt, console, emit_json, plain_text, safe_markup
from elmctl.errors import UsageError
from elmctl.train.weights import load_model, load_source_tokenizer, resolve_source



def register(app: typer.Typer) -> None:
    app.command("generate")(generate_cmd)


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
    choice: Annotated[Optional[list[str]], typer.Option("--choice", metavar="TEXT", help="Also score this answer: log p(answer | prompt); repeat for each candidate, the most likely is the model's pick.")] = None,
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
