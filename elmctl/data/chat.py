"""OpenELM-Instruct chat template (zephyr style, as alignment-handbook applied it for the DPO runs).

Exactly what elmctl produces, with ``</s>`` standing for the tokenizer's EOS **id** (never the
text "</s>", which a byte or SentencePiece tokenizer would split into pieces)::

    [BOS] "<|system|>\\n{system}" EOS "\\n<|user|>\\n{user}" EOS "\\n<|assistant|>\\n"    <- prompt
          "{answer}" EOS                                                                 <- completion

- Roles: ``system``, ``user``, ``assistant``; each turn is its header, a newline, the content, EOS.
  Turns are joined by a newline; the generation prompt is ``"<|assistant|>\\n"`` after the last turn.
- Each text run between EOS ids is encoded with one ``tokenizer.encode`` call (no BOS/EOS added);
  the prompt starts with BOS when the tokenizer has one. Completions are encoded on their own, as
  TRL does, and end with EOS, so generation stops on EOS.
- No system turn is added when the messages have none. (alignment-handbook inserts an empty one;
  with a byte tokenizer that is 12 tokens of noise per example, so elmctl leaves it to the data.)

``elmctl generate`` reuses :func:`encode_chat` for prompts and stops at ``tokenizer.eos_id``.
"""

from __future__ import annotations

from typing import Any, Iterable, Mapping

from elmctl.errors import UsageError

__all__ = ["ROLES", "format_prompt", "encode_chat", "encode_completion", "chat_segments"]

ROLES = ("system", "user", "assistant")
GENERATION_HEADER = "<|assistant|>\n"
TEMPLATE_NAME = "openelm-zephyr-v1"


def _check(messages: Iterable[Mapping[str, Any]]) -> list[tuple[str, str]]:
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, Mapping) or "role" not in m or "content" not in m:
            raise UsageError(f"message {i}: expected {{'role': ..., 'content': ...}}, got {m!r:.80}")
        role, content = m["role"], m["content"]
        if role not in ROLES:
            raise UsageError(f"message {i}: unknown role {role!r}", f"use one of {', '.join(ROLES)}")
        if not isinstance(content, str):
            raise UsageError(f"message {i}: content is {type(content).__name__}, not a string")
        out.append((role, content))
    return out


def chat_segments(messages: Iterable[Mapping[str, Any]], add_generation_prompt: bool = True) -> list[str]:
    """Text runs of the prompt; an EOS id goes between consecutive runs (after each turn)."""
    turns = _check(messages)
    segments = [("\n" if i else "") + f"<|{role}|>\n{content}" for i, (role, content) in enumerate(turns)]
    if add_generation_prompt:
        segments.append(("\n" if turns else "") + GENERATION_HEADER)
    return segments


def format_prompt(
    messages: Iterable[Mapping[str, Any]], add_generation_prompt: bool = True, eos_text: str = "</s>"
) -> str:
    """The prompt as readable text, with ``eos_text`` where the EOS id goes (for display/logs)."""
    segments = chat_segments(messages, add_generation_prompt)
    n_turns = len(segments) - (1 if add_generation_prompt else 0)
    return "".join(s + (eos_text if i < n_turns else "") for i, s in enumerate(segments))


def encode_chat(
    tokenizer, messages: Iterable[Mapping[str, Any]], add_generation_prompt: bool = True, add_bos: bool = True
) -> list[int]:
    """Token ids of a chat prompt: ``[BOS] turn EOS "\\n" turn EOS ... "\\n<|assistant|>\\n"``."""
    segments = chat_segments(messages, add_generation_prompt)
    n_turns = len(segments) - (1 if add_generation_prompt else 0)
    ids: list[int] = [tokenizer.bos_id] if add_bos and tokenizer.bos_id is not None else []
    for i, s in enumerate(segments):
        ids += tokenizer.encode(s)
        if i < n_turns:
            ids.append(tokenizer.eos_id)
    return ids


def encode_completion(tokenizer, text: str) -> list[int]:
    """An assistant answer: its tokens then EOS (what DPO/SFT score and what generation stops on)."""
    return tokenizer.encode(text) + [tokenizer.eos_id]
