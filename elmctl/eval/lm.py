"""elmctl's OpenELM behind lm-evaluation-harness's model interface (``lm_eval.api.model.TemplateLM``).

Imported only when an evaluation runs (it imports lm_eval at module level). Nothing here prints.

Tokenization follows the harness's ``hf`` backend with ``add_bos_token=True`` (how the OpenELM card
ran it): a context is encoded with BOS, the continuation is ``tokens(context + continuation)`` minus
``tokens(context)`` (``TemplateLM._encode_pair``), an empty context becomes the BOS token, and a
sequence longer than the context window loses tokens on the left. So an ``elmctl export`` scored by
the ``hf`` backend gets the same per-request log-likelihoods (``tests/integration/test_eval.py``).

Speed (why it is at least as fast as the ``hf`` backend on the same model):
- requests are sorted by length, longest first, and batched (right padding: causal attention never
  looks right, so padding changes nothing before it);
- on CPU (compute-bound), requests sharing a context (multiple choice) run the context once and
  their continuations together from its KV cache; elsewhere requests whose inputs are equal
  (one-token answers: BoolQ, MMLU) share one forward;
- logits are computed only at the continuation positions, not over the whole sequence x vocabulary;
- several devices: one model replica per device, batches dealt round-robin to one thread per device
  (CUDA kernels release the GIL), results put back in request order.
Precision: bf16 autocast on CUDA, fp32 on CPU; log-softmax always in fp32 over the real vocabulary
(``config.vocab_size`` rows, what an HF export keeps).

``loglikelihood_rolling`` (perplexity tasks) scores every token of the text given BOS and the tokens
before it, in disjoint windows of the context length (the harness's rolling windows). Unlike the
``hf`` backend with ``add_bos_token=True`` it does not put a second BOS in front of the text.

``generate_until`` decodes with the KV cache, greedy unless the task asks ``do_sample``; prompts of
equal length with equal settings decode together; a row stops at EOS, at any of the task's ``until``
strings (cut off from the answer, as the harness expects) or after ``max_gen_toks`` tokens.
"""

from __future__ import annotations

import contextlib
import copy
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch
import torch.nn.functional as F
from lm_eval.api.model import TemplateLM
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

from elmctl.model.openelm import KVCache

__all__ = ["ElmctlLM"]

DEFAULT_MAX_GEN_TOKS = 256


class ElmctlLM(TemplateLM):
    """An OpenELM and its tokenizer as a harness ``LM``.

    Args:
        model: an :class:`elmctl.model.OpenELM` in eval mode, on ``devices[0]``.
        tokenizer: an elmctl tokenizer (``encode``/``decode``, ``bos_id``, ``eos_id``, ``vocab_size``).
        batch_size: sequences per forward pass.
        devices: torch devices to spread batches over (default: the model's device).
        add_bos: put BOS in front of every encoded context (the OpenELM card's setting).
    """

    def __init__(self, model, tokenizer, *, batch_size: int = 16, devices: list[str] | None = None,
                 add_bos: bool = True) -> None:
        super().__init__()
        self.tok = tokenizer
        self.batch_size = int(batch_size)
        self.add_bos = add_bos
        self.max_length = int(model.config.context_length)
        self.vocab = int(model.config.vocab_size)
        first = model.token_embeddings.weight.device
        devs = [torch.device(d) for d in (devices or [str(first)])]
        self.replicas = [model] + [copy.deepcopy(model).to(d).eval() for d in devs[1:]]
        self.num_forward_rows = 0  # sequences run through the model (tests and benchmarks read it)
        #: run a shared context once (None: on CPU only, where compute, not batch size, sets the pace)
        self.share_contexts: bool | None = None

    # -- what TemplateLM needs --------------------------------------------------------------
    @property
    def eot_token_id(self) -> int:
        return int(self.tok.eos_id)

    @property
    def prefix_token_id(self) -> int:
        return int(self.tok.bos_id if self.tok.bos_id is not None else self.tok.eos_id)

    @property
    def device(self) -> torch.device:
        return self.replicas[0].token_embeddings.weight.device

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs: Any) -> list[int]:
        bos = self.add_bos if add_special_tokens is None else bool(add_special_tokens)
        return self.tok.encode(string, add_bos=bos)

    def tok_decode(self, tokens, **kwargs: Any) -> str:
        return self.tok.decode(tokens)

    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        return super().loglikelihood(requests, disable_tqdm=True)  # core never draws progress bars

    # -- scoring -------------------------------------------------------------------------------
    def _autocast(self, device: torch.device):
        if device.type == "cuda":
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    @torch.inference_mode()
    def _score_batch(self, model, inputs: list[tuple[int, ...]], needs: list[int]) -> list[torch.Tensor]:
        """Log-probs [need, V] (fp32, on CPU) at the last ``need`` positions of each input."""
        device = model.token_embeddings.weight.device
        T = max(len(x) for x in inputs)
        ids = torch.zeros(len(inputs), T, dtype=torch.long)
        for i, x in enumerate(inputs):
            ids[i, :len(x)] = torch.tensor(x, dtype=torch.long)
        rows = torch.cat([torch.full((n,), i) for i, n in enumerate(needs)])
        cols = torch.cat([torch.arange(len(x) - n, len(x)) for x, n in zip(inputs, needs)])
        with self._autocast(device):
            h = model.hidden_states(ids.to(device))  # [B, T, D]
        picked = h[rows.to(device), cols.to(device)].float()  # [sum(needs), D]: continuation positions only
        logits = F.linear(picked, model.output_weight[:self.vocab].float())  # [N, V]
        lp = F.log_softmax(logits, dim=-1).cpu()
        self.num_forward_rows += len(inputs)
        return list(lp.split(needs))

    @torch.inference_mode()
    def _score_shared(self, model, context: tuple[int, ...], conts: list[list[int]]) -> list[torch.Tensor]:
        """Log-probs [len(cont), V] for each continuation of one context: the context runs once (KV cache),
        then all continuations together, one cache row each."""
        device = model.token_embeddings.weight.device
        k, longest = len(conts), max(len(c) for c in conts)
        cache = KVCache(model, 1, len(context) + longest - 1)
        with self._autocast(device):
            first = model.hidden_states(torch.tensor([context], device=device), cache)[0, -1:]  # [1, D]: predicts cont[0]
            rest = None
            if longest > 1:
                cache.k = [t.expand(k, -1, -1, -1).contiguous() for t in cache.k]  # [k, K, S, E]
                cache.v = [t.expand(k, -1, -1, -1).contiguous() for t in cache.v]
                x = torch.zeros(k, longest - 1, dtype=torch.long)  # right padding: never seen by earlier positions
                for j, c in enumerate(conts):
                    x[j, :len(c) - 1] = torch.tensor(c[:-1], dtype=torch.long)
                rest = model.hidden_states(x.to(device), cache)  # [k, longest-1, D]
        picked = torch.cat([torch.cat([first, rest[j, :len(c) - 1]]) if rest is not None else first
                            for j, c in enumerate(conts)]).float()  # [sum(len(c)), D]
        logits = F.linear(picked, model.output_weight[:self.vocab].float())
        self.num_forward_rows += 1 + (k if longest > 1 else 0)
        return list(F.log_softmax(logits, dim=-1).cpu().split([len(c) for c in conts]))

    def _run(self, items: list, do) -> None:
        """Run work items, dealt round-robin to one thread per replica (in order when there is one)."""
        def work(r: int) -> None:
            for item in items[r::len(self.replicas)]:
                do(self.replicas[r], item)

        if len(self.replicas) == 1:
            work(0)
        else:
            with ThreadPoolExecutor(len(self.replicas)) as pool:
                list(pool.map(work, range(len(self.replicas))))  # list(): re-raise a worker's error

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs: Any) -> list[tuple[float, bool]]:
        """(sum log p(continuation | context), continuation is the greedy decode) per request.

        On CPU (compute-bound) requests sharing a context (multiple choice) run the context once
        (:meth:`_score_shared`); everything else, and everything on GPU, goes in length-sorted batches
        of equal inputs scored once (:meth:`_score_batch`).
        """
        share = self.share_contexts
        if share is None:
            share = all(m.token_embeddings.weight.device.type == "cpu" for m in self.replicas)
        conts, by_context, plain = [], {}, []
        for i, (_, context_enc, continuation_enc) in enumerate(requests):
            if not continuation_enc:
                raise ValueError("a loglikelihood request with an empty continuation")
            conts.append(list(continuation_enc))
            if share and context_enc and len(context_enc) + len(continuation_enc) <= self.max_length + 1:
                by_context.setdefault(tuple(context_enc), []).append(i)
            else:
                plain.append(i)
        shared = [(ctx, idx) for ctx, idx in by_context.items() if len(idx) > 1]
        plain += [idx[0] for idx in by_context.values() if len(idx) == 1]
        rows: list[torch.Tensor | None] = [None] * len(requests)  # per request: log-probs [len(cont), V]

        unique: dict[tuple[int, ...], int] = {}
        need: list[int] = []
        owner = []  # per plain request: (its index, the unique input it reads)
        for i in plain:
            _, context_enc, continuation_enc = requests[i]
            toks = (list(context_enc) + list(continuation_enc))[-(self.max_length + 1):]
            inp = tuple(toks[:-1])
            if len(conts[i]) > len(inp):  # a continuation longer than the window: score what fits
                conts[i] = conts[i][-len(inp):]
            k = unique.setdefault(inp, len(unique))
            if k == len(need):
                need.append(len(conts[i]))
            else:
                need[k] = max(need[k], len(conts[i]))
            owner.append((i, k))
        inputs = list(unique)
        order = sorted(range(len(inputs)), key=lambda u: -len(inputs[u]))  # longest first: padding stays small
        batches = [order[b:b + self.batch_size] for b in range(0, len(order), self.batch_size)]
        per_input: list[torch.Tensor | None] = [None] * len(inputs)

        def do(model, item) -> None:
            if item[0] == "batch":
                for u, lp in zip(item[1], self._score_batch(model, [inputs[u] for u in item[1]], [need[u] for u in item[1]])):
                    per_input[u] = lp
            else:
                _, ctx, idx = item
                for i, lp in zip(idx, self._score_shared(model, ctx, [conts[i] for i in idx])):
                    rows[i] = lp

        self._run([("batch", b) for b in batches] + [("shared", ctx, idx) for ctx, idx in shared], do)
        for i, k in owner:
            rows[i] = per_input[k][-len(conts[i]):]  # type: ignore[index]
        res = []
        for lp, cont in zip(rows, conts):
            target = torch.tensor(cont, dtype=torch.long)
            logp = float(lp.gather(1, target[:, None]).sum())  # type: ignore[union-attr]
            res.append((logp, bool((lp.argmax(-1) == target).all())))  # type: ignore[union-attr]
        return res

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Sum of log p(token | BOS, earlier tokens) over each text's tokens (no BOS scored)."""
        windows, owner = [], []
        for i, req in enumerate(requests):
            (text,) = req.args
            tokens = self.tok_encode(text, add_special_tokens=False)
            for ctx, cont in map(make_disjoint_window, get_rolling_token_windows(
                    token_list=tokens, prefix_token=self.prefix_token_id, max_seq_len=self.max_length, context_len=1)):
                windows.append((None, ctx, cont))
                owner.append(i)
        totals = [0.0] * len(requests)
        for i, (logp, _) in zip(owner, self._loglikelihood_tokens(windows) if windows else []):
            totals[i] += logp
        return totals

    # -- generation ------------------------------------------------------------------------------
    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        groups: dict[tuple, list[int]] = {}
        prepared = []
        for i, req in enumerate(requests):
            context, gen_kwargs = req.args
            kw = dict(gen_kwargs or {})
            until = kw.get("until") or []
            until = [until] if isinstance(until, str) else [u for u in until if u]
            max_gen = int(kw.get("max_gen_toks", DEFAULT_MAX_GEN_TOKS))
            sample = bool(kw.get("do_sample", False)) and float(kw.get("temperature", 1.0) or 0.0) > 0
            temperature = float(kw.get("temperature", 1.0) or 0.0) if sample else 0.0
            ids = self.tok_encode(context)[-max(1, self.max_length - max_gen):]
            prepared.append((ids, until, max_gen, temperature))
            groups.setdefault((len(ids), tuple(until), max_gen, temperature), []).append(i)
        out: list[str] = [""] * len(requests)
        for key in sorted(groups, key=lambda k: -k[0]):
            members = groups[key]
            for s in range(0, len(members), self.batch_size):
                chunk = members[s:s + self.batch_size]
                _, until, max_gen, temperature = key
                texts = self._generate([prepared[i][0] for i in chunk], list(until), max_gen, temperature)
                for i, t in zip(chunk, texts):
                    out[i] = t
        return out

    @torch.inference_mode()
    def _generate(self, prompts: list[list[int]], until: list[str], max_gen: int, temperature: float) -> list[str]:
        """Decode equal-length prompts together with the KV cache; stop per row at EOS or a stop string."""
        model = self.replicas[0]
        device = model.token_embeddings.weight.device
        vocab = min(self.vocab, int(self.tok.vocab_size))
        ids = torch.tensor(prompts, dtype=torch.long, device=device)  # [B, T]
        B = ids.shape[0]
        cache = KVCache(model, B, ids.shape[1] + max_gen)
        new: list[list[int]] = [[] for _ in range(B)]
        done = [False] * B
        step_input = ids
        for _ in range(max_gen):
            with self._autocast(device):
                h = model.hidden_states(step_input, cache)[:, -1]  # [B, D]
            logits = F.linear(h.float(), model.output_weight[:vocab].float())  # [B, V]
            if temperature > 0:
                token = torch.multinomial(torch.softmax(logits / temperature, dim=-1), 1).squeeze(-1)
            else:
                token = logits.argmax(dim=-1)
            for b, t in enumerate(token.tolist()):
                if done[b]:
                    continue
                if t == self.tok.eos_id:
                    done[b] = True
                    continue
                new[b].append(t)
                if until and any(u in self.tok.decode(new[b]) for u in until):
                    done[b] = True
            if all(done):
                break
            step_input = token[:, None]
        texts = []
        for row in new:
            text = self.tok.decode(row)
            for u in until:  # the answer ends before the first stop string, as the hf backend cuts it
                text = text.split(u)[0]
            texts.append(text)
        return texts
