"""Instruction tuning (DPO / hinge / SFT) on the shared training loop.

A tune run is a run folder like a pre-training run (``recipe.json``, ``options.json``,
``train.log``, ``checkpoints/``); :func:`run_tune` trains it, in-process for one process or as
the torchrun worker ``python -m elmctl.train.tune <run_dir>`` for several.

- Policy: an OpenELM built from the recipe, loaded from the base (a checkpoint folder or an Apple
  HF folder; see :func:`resolve_base`). Reference: a frozen copy of the base (TRL's default), or,
  with ``precompute_ref``, its log-probs computed once up front and the copy dropped.
- Batch: the recipe's effective batch (per_device_batch x grad_accumulation x num_gpus, e.g.
  8 x 2 x 8 = 128 pairs) is kept on any number of processes; :func:`plan_batch` recomputes the
  accumulation. An epoch is floor(train pairs / effective batch) optimizer steps over a fresh
  permutation (seeded by the recipe seed and the epoch); the data position is the step count.
- Schedule: linear warm-up over ceil(warmup_ratio x total steps), then cosine to 0 (HF); AdamW
  with the recipe's weight decay (0 in Table 10) and default betas.
- Resume: ``opt["resume"]`` (picked and verified by ``elmctl tune --resume-from``, see
  :mod:`elmctl.sweep.resume`) is an earlier attempt's checkpoint with the same identity and batch
  plan. Weights, AdamW state, data position and RNG are restored, the source run's metrics up to that
  step are copied into this run (its curves and per-epoch rows are whole), and training continues at
  the next step: the steps, batches and learning rates of an uninterrupted run.
- After every epoch: evaluation on the held-out (``test``) pairs and a checkpoint. The store gets,
  at step = global optimizer step, ``epoch`` (1-based epochs completed) together with
  ``eval_loss`` (the training loss type on the test pairs; SFT: NLL per answer token),
  ``reward_accuracy``, ``reward_margin``, ``chosen_reward``, ``rejected_reward``. Training steps log
  ``train_loss``, ``train_reward_accuracy``, ``train_reward_margin``, ``lr``, ``grad_norm``.
  The sweep driver reads the ``epoch`` rows.
- Fault injection (tests only, set by the sweep driver, see :mod:`elmctl.sweep.driver`):
  ``ELMCTL_INJECT_FAILURE=1`` fails at start; ``ELMCTL_INJECT_FAILURE=epoch:E`` SIGKILLs the process
  right after epoch E's checkpoint is durable (a crash with no status written, like an OOM kill).
"""

from __future__ import annotations

import json
import math
import os
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from elmctl.errors import RuntimeFailure, UsageError
from elmctl.train import dist as D
from elmctl.train.dpo import dpo_losses, sequence_logps, sft_loss, split_pair_logps
from elmctl.train.loop import to_device

__all__ = ["plan_batch", "PairBatches", "make_objective", "run_tune", "TuneResult", "resolve_base",
           "check_base", "load_base_weights", "check_preference_data"]

EVAL_KEYS = ("eval_loss", "reward_accuracy", "reward_margin", "chosen_reward", "rejected_reward")


@dataclass(frozen=True)
class Base:
    """Where the starting weights come from: ``kind`` "checkpoint" (elmctl) or "hf" (Apple layout)."""

    kind: str
    path: str
    label: str


def resolve_base(spec: str, store=None) -> Base:
    """``--base``: a pretrain run id/name (its newest verified checkpoint), a run folder, a
    checkpoint folder (``ckpt-N``), or an Apple HF folder (config.json + safetensors).

    Raises:
        UsageError: nothing usable at ``spec``.
    """
    from elmctl.train.checkpoint import find_resumable

    p = Path(spec).expanduser()
    if p.is_dir():
        if (p / "config.json").is_file():
            return Base("hf", str(p.resolve()), str(p))
        if (p / "manifest.json").is_file() and (p / "model.safetensors").is_file():
            return Base("checkpoint", str(p.resolve()), str(p))
        if (p / "checkpoints").is_dir():
            info, _ = find_resumable(p)
            if info is not None:
                return Base("checkpoint", str(info.path.resolve()), f"{p} ({info.path.name})")
        raise UsageError(f"--base {spec}: the folder holds no OpenELM weights",
                         "give a pretrain run id, a checkpoint folder (ckpt-N), or an HF folder with config.json")
    if store is None:
        from elmctl.store import Store

        store = Store()
    run = store.get_run(spec)  # UsageError with "did you mean" when unknown
    info, _ = find_resumable(run.run_dir)
    if info is None:
        raise UsageError(f"--base {spec}: run {run.label} has no checkpoint yet",
                         f"wait for its first checkpoint, or check it with: elmctl runs show {run.label}")
    return Base("checkpoint", str(info.path.resolve()), f"run {run.label} ({info.path.name})")


def _arch(cfg) -> tuple:
    from elmctl.config.derived import layer_shapes

    shapes = tuple((s.query_heads, s.kv_heads, s.ffn_dim) for s in layer_shapes(cfg))
    return (cfg.num_layers, cfg.model_dim, cfg.head_dim, cfg.num_gqa_groups, cfg.vocab_size,
            cfg.normalize_qk_projections, cfg.share_input_output_layers, cfg.rope_freq_constant, shapes)


def check_base(base: Base, recipe) -> None:
    """The base's architecture must be the recipe's. Raises UsageError naming the differences."""
    from elmctl.model import OpenELM

    hint = "pick the recipe the base was trained with (elmctl runs show <run>), or another --base"
    if base.kind == "hf":
        from elmctl.model.hf import model_config_from_hf

        cfg = model_config_from_hf(json.loads((Path(base.path) / "config.json").read_text()), base.path)
        if _arch(cfg) != _arch(recipe.model):
            diff = [f"{n}: base {a} vs recipe {b}" for n, a, b in zip(
                ("num_layers", "model_dim", "head_dim", "num_gqa_groups", "vocab_size", "normalize_qk_projections",
                 "share_input_output_layers", "rope_freq_constant", "layer shapes"), _arch(cfg), _arch(recipe.model)) if a != b]
            raise UsageError(f"--base {base.label} does not match recipe {recipe.id}: " + "; ".join(diff[:4]), hint)
        return
    from safetensors import safe_open

    with safe_open(str(Path(base.path) / "model.safetensors"), "pt") as f:
        stored = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
        aliases = json.loads((f.metadata() or {}).get("aliases", "{}"))
    stored.update({a: stored[t] for a, t in aliases.items() if t in stored})
    with torch.device("meta"):
        expected = {k: tuple(v.shape) for k, v in OpenELM(recipe.model).state_dict().items()}
    diff = [f"{k}: base {stored.get(k)} vs recipe {v}" for k, v in expected.items() if stored.get(k) != v]
    diff += [f"{k}: not in recipe {recipe.id}" for k in stored if k not in expected]
    if diff:
        raise UsageError(f"--base {base.label} does not match recipe {recipe.id} "
                         f"({len(diff)} tensors differ, e.g. {'; '.join(diff[:3])})", hint)


def load_base_weights(model: torch.nn.Module, kind: str, path: str) -> None:
    """Copy the base's weights into ``model`` (built from the recipe)."""
    if kind == "hf":
        from elmctl.model.hf import load_pretrained

        src = load_pretrained(path).state_dict()
        own = model.state_dict()
        with torch.no_grad():
            for k, v in own.items():
                w = src[k]
                if w.shape == v.shape:
                    v.copy_(w)
                else:  # embedding rows: HF keeps vocab_size rows, training uses padded_vocab_size
                    n = min(w.shape[0], v.shape[0])
                    v.zero_()
                    v[:n].copy_(w[:n])
        return
    from elmctl.train.checkpoint import load_checkpoint_files, verify_checkpoint

    state, _, _ = load_checkpoint_files(verify_checkpoint(path))
    model.load_state_dict(state)


def check_preference_data(path: str, recipe) -> Path:
    """``--data`` -> the prepared preference folder; no held-out pairs or a foreign vocab -> UsageError."""
    from elmctl.data import resolve_data_dir

    folder = resolve_data_dir(path, "preference")
    m = json.loads((folder / "manifest.json").read_text())
    splits = m.get("splits", {})
    if not splits.get("test", {}).get("pairs"):
        raise UsageError(f"{folder}: no held-out (test) pairs; tuning evaluates on them every epoch",
                         "prepare the data with a test split (records with split: test, or --test-fraction > 0)")
    if not splits.get("train", {}).get("pairs"):
        raise UsageError(f"{folder}: no training pairs")
    if int(m.get("vocab_size", 0)) > recipe.model.vocab_size:
        raise UsageError(f"{folder} was tokenised with a {m.get('vocab_size')}-token vocabulary; recipe "
                         f"{recipe.id} has {recipe.model.vocab_size}", "prepare the data with the recipe's tokenizer")
    return folder


def plan_batch(instruct, world_size: int) -> tuple[int, int]:
    """(micro-batch, grad accumulation) per process keeping the recipe's effective batch.

    Raises:
        UsageError: the effective batch cannot be split evenly over ``world_size`` processes.
    """
    global_batch = instruct.effective_batch
    if global_batch % world_size:
        raise UsageError(
            f"the recipe's effective batch {global_batch} (per_device_batch {instruct.per_device_batch} x "
            f"grad_accumulation {instruct.grad_accumulation} x num_gpus {instruct.num_gpus}) does not split over "
            f"{world_size} processes", "use a process count that divides it")
    per_rank = global_batch // world_size
    micro = min(instruct.per_device_batch, per_rank)
    while per_rank % micro:
        micro -= 1
    return micro, per_rank // micro


class PairBatches:
    """This rank's micro-batches of preference pairs (the loop's BatchSource).

    Step s of epoch e uses pairs perm_e[s*G:(s+1)*G] (G the global batch); rank r takes its
    contiguous share, micro-batch by micro-batch. ``ref`` (optional) holds precomputed reference
    log-probs per pair index: float tensors ``chosen``/``rejected``.
    """

    def __init__(self, pairs, *, micro_batch: int, grad_accumulation: int, pad_id: int, seed: int,
                 rank: int = 0, world_size: int = 1, sft: bool = False, ref: dict | None = None):
        self.pairs, self.micro, self.accum, self.pad_id, self.seed = pairs, micro_batch, grad_accumulation, pad_id, seed
        self.rank, self.world, self.sft, self.ref = rank, world_size, sft, ref
        self.global_batch = micro_batch * grad_accumulation * world_size
        self.steps_per_epoch = len(pairs) // self.global_batch
        if self.steps_per_epoch < 1:
            raise UsageError(f"{len(pairs)} training pairs are fewer than one effective batch of {self.global_batch}",
                             "prepare more pairs, or lower instruct.per_device_batch/grad_accumulation with --set")
        self.step = 0  # optimizer steps handed out
        self.k = 0  # micro-batches of the current step handed out

    def _perm(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, epoch]).permutation(len(self.pairs))

    def next_batch(self) -> dict[str, torch.Tensor]:
        epoch, s = divmod(self.step, self.steps_per_epoch)
        perm = self._perm(epoch)
        first = s * self.global_batch + self.rank * self.micro * self.accum + self.k * self.micro
        idx = perm[first : first + self.micro]
        self.k += 1
        if self.k == self.accum:
            self.step, self.k = self.step + 1, 0
        return collate(self.pairs, idx, self.pad_id, sft=self.sft, ref=self.ref)

    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step, "k": self.k}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step, self.k = int(state["step"]), int(state["k"])


def collate(pairs, idx, pad_id: int, *, sft: bool = False, ref: dict | None = None, eval_mode: bool = False) -> dict:
    """Pairs ``idx`` -> a batch (collate_pairs rows, or collate_sft rows when training SFT)."""
    from elmctl.data.preference import collate_pairs, collate_sft

    chosen = [pairs[int(i)] for i in idx]
    batch = collate_sft(chosen, pad_id) if (sft and not eval_mode) else collate_pairs(chosen, pad_id)
    if ref is not None and not (sft and not eval_mode):
        t = torch.as_tensor(np.asarray(idx, dtype=np.int64))
        batch["ref_chosen"], batch["ref_rejected"] = ref["chosen"][t], ref["rejected"][t]
    if eval_mode:
        batch["_eval"] = True
    return batch


def _ref_logps(ref_model, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    if "ref_chosen" in batch:
        return batch["ref_chosen"], batch["ref_rejected"]
    with torch.no_grad():
        return split_pair_logps(sequence_logps(ref_model(batch["input_ids"]), batch["labels"]))


def make_objective(loss: str, beta: float, ref_model: torch.nn.Module | None) -> Callable:
    """``objective(model, batch) -> (loss, metrics)`` for the loop.

    Training batches are pair batches (DPO, hinge) or chosen-only rows (SFT). Evaluation batches
    (``batch["_eval"]``) are always pair batches: loss = the training loss on them (SFT: NLL of the
    chosen rows), plus the implicit-reward metrics with the recipe's beta.
    """
    pref_loss = "sigmoid" if loss == "sft" else loss

    def objective(model, batch: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        logits = model(batch["input_ids"])  # [N, L, V]
        if loss == "sft" and not batch.get("_eval"):
            return sft_loss(logits, batch["labels"]), {}
        pc, pr = split_pair_logps(sequence_logps(logits, batch["labels"]))
        rc, rr = _ref_logps(ref_model, batch)
        losses, cr, rj = dpo_losses(pc, pr, rc.to(pc), rr.to(pr), beta=beta, loss_type=pref_loss)
        out = losses.mean()
        if loss == "sft":  # eval of an SFT run: its own loss on the chosen rows
            half = batch["labels"].shape[0] // 2
            out = sft_loss(logits[:half], batch["labels"][:half])
        metrics = {"reward_accuracy": (cr > rj).float().mean(), "reward_margin": (cr - rj).mean(),
                   "chosen_reward": cr.mean(), "rejected_reward": rj.mean()}
        return out, {k: v.detach() for k, v in metrics.items()}

    return objective


def _precompute_ref(ref_model, pairs, pad_id: int, batch: int, device) -> dict[str, torch.Tensor]:
    """Reference log-probs of every pair, once (each rank computes all: it is one forward pass)."""
    chosen, rejected = [], []
    with torch.no_grad():
        for i in range(0, len(pairs), batch):
            b = to_device(collate(pairs, np.arange(i, min(i + batch, len(pairs))), pad_id), device)
            c, r = split_pair_logps(sequence_logps(ref_model(b["input_ids"]), b["labels"]))
            chosen.append(c.float().cpu())
            rejected.append(r.float().cpu())
    return {"chosen": torch.cat(chosen), "rejected": torch.cat(rejected)}


def _make_eval(pairs, pad_id: int, micro: int, info: D.DistInfo, ref: dict | None) -> Callable:
    share = np.array_split(np.arange(len(pairs)), info.world_size)[info.rank]

    def eval_fn(forward) -> dict[str, float]:
        sums = torch.zeros(len(EVAL_KEYS) + 1, dtype=torch.float64)
        for i in range(0, len(share), micro):
            idx = share[i : i + micro]
            loss, m = forward(collate(pairs, idx, pad_id, ref=ref, eval_mode=True))
            vals = [loss] + [m[k] for k in EVAL_KEYS[1:]]
            sums[:-1] += torch.stack([v.detach().double().cpu() for v in vals]) * len(idx)
            sums[-1] += len(idx)
        sums = D.all_reduce_mean(sums.to(info.device)).cpu()  # ratios are unchanged by the mean
        n = max(float(sums[-1]), 1.0)
        return {k: float(sums[j]) / n for j, k in enumerate(EVAL_KEYS)}

    return eval_fn


@dataclass
class TuneResult:
    status: str
    step: int
    metrics: dict[str, float]
    error: str | None = None


def run_tune(run_dir: str | os.PathLike, *, should_stop: Callable[[], bool] | None = None,
             on_event: Callable[[str], None] | None = None) -> TuneResult:
    """Train the tune run in ``run_dir`` (see the module docstring). Rank 0 writes the store."""
    from elmctl.data.preference import load_pairs
    from elmctl.model import OpenELM
    from elmctl.store import Store
    from elmctl.train.checkpoint import save_checkpoint
    from elmctl.train.loop import Hooks, LoopConfig, train
    from elmctl.train.optim import build_adamw
    from elmctl.train.pretrain import RunLog, read_run_files
    from elmctl.train.schedule import warmup_decay

    run_dir = Path(run_dir)
    recipe, opt = read_run_files(run_dir)
    it, mcfg = recipe.instruct, recipe.model
    info = D.init_distributed(opt["device"])
    store = Store(opt["store_url"]) if info.is_main else None
    run_id = opt["run_id"]
    event = RunLog(run_dir / "train.log", on_event, info.is_main)

    try:
        if store is not None:
            store.update_run(run_id, status="running", pid=os.getpid(), error=None)
        if os.environ.get("ELMCTL_INJECT_FAILURE") == "1":
            raise RuntimeFailure("injected failure (ELMCTL_INJECT_FAILURE=1, set by ELMCTL_FAIL_TRIAL_CELL)")
        D.seed_everything(it.seed)
        threads = os.environ.get("ELMCTL_NUM_THREADS")
        if threads and opt["device"] == "cpu":
            torch.set_num_threads(int(threads))
        on_gpu = opt["device"] == "cuda"
        model = OpenELM(mcfg, activation_checkpointing=it.gradient_checkpointing and on_gpu)
        load_base_weights(model, opt["base_kind"], opt["base_path"])
        ref_model = OpenELM(mcfg).to(info.device)
        ref_model.load_state_dict(model.state_dict())
        ref_model.eval().requires_grad_(False)
        if on_gpu and it.precision == "bf16":
            ref_model.to(torch.bfloat16)  # inference only: half the memory of the frozen copy
        pad_id, micro, accum = mcfg.pad_token_id, opt["micro_batch"], opt["grad_accumulation"]
        train_pairs, test_pairs = load_pairs(opt["data_dir"], "train"), load_pairs(opt["data_dir"], "test")
        ref_train = ref_test = None
        if opt.get("precompute_ref"):
            t0 = time.time()
            ref_train = _precompute_ref(ref_model, train_pairs, pad_id, micro * 2, info.device)
            ref_test = _precompute_ref(ref_model, test_pairs, pad_id, micro * 2, info.device)
            ref_model = None  # no frozen copy during training
            event(f"reference log-probs of {len(train_pairs)}+{len(test_pairs)} pairs in {time.time() - t0:.1f}s")
        loss_type = opt["loss"]
        batches = PairBatches(train_pairs, micro_batch=micro, grad_accumulation=accum, pad_id=pad_id, seed=it.seed,
                              rank=info.rank, world_size=info.world_size, sft=loss_type == "sft", ref=ref_train)
        spe = batches.steps_per_epoch
        total = spe * int(opt["epochs"])
        warmup = math.ceil(it.warmup_ratio * total)
        runner = D.wrap_model(model, device=info.device)
        optimizer = build_adamw(model, lr=0.0, betas=(0.9, 0.999), eps=1e-8, weight_decay=it.weight_decay)
        objective = make_objective(loss_type, it.beta, ref_model)
        eval_fn = _make_eval(test_pairs, pad_id, micro * 2, info, ref_test)
        start_step = _resume(opt, runner, optimizer, batches, store, run_id, event, info)
        cfg = LoopConfig(max_steps=total, grad_accumulation=accum, grad_clip=1.0,
                         precision=it.precision if on_gpu else "fp32", log_every=max(1, min(10, spe)),
                         eval_every=spe, checkpoint_every=spe, steps_per_epoch=spe)

        def lr_at(step: int) -> float:
            return warmup_decay(step, total_steps=total, warmup_steps=warmup, peak_lr=float(opt["lr"]), kind=it.scheduler)

        def on_log(step: int, m: dict[str, float]) -> None:
            renamed = {("train_" + k if k in ("loss",) + EVAL_KEYS else k): v for k, v in m.items()}
            store.log_metrics(run_id, step, renamed)

        last_eval: dict[str, float] = {}

        def on_eval(step: int, m: dict[str, float]) -> None:
            last_eval.clear()
            last_eval.update(m)
            store.log_metrics(run_id, step, {"epoch": step // spe, **m})  # one transaction: read together
            event(f"epoch {step // spe}/{opt['epochs']} step {step}: eval_loss {m['eval_loss']:.4f} "
                  f"reward_accuracy {m['reward_accuracy']:.3f} reward_margin {m['reward_margin']:.4f}")

        def on_checkpoint(step: int, final: bool) -> None:
            mstate = D.model_state(runner)
            ostate = D.optimizer_state(runner, optimizer)
            rngs = D.gather_objects(D.rng_state())
            if info.is_main:
                # `resume` + the batch plan are what elmctl.sweep.resume.compare checks before a resume
                meta = {"world_size": info.world_size, "global_batch": batches.global_batch, "micro_batch": micro,
                        "grad_accumulation": accum, "recipe_id": recipe.id, "run_id": run_id, "kind": "tune",
                        "epoch": step // spe, "steps_per_epoch": spe, "resume": opt.get("identity")}
                tstate = {"step": step, "epoch": step // spe, "data": batches.state_dict(), "rng": rngs}
                ck = save_checkpoint(run_dir, step, model_state=mstate, optimizer_state=ostate,
                                     train_state=tstate, keep=2, final=final, meta=meta)
                store.add_checkpoint(run_id, step, str(ck.path), meta={**meta, "sha256": ck.sha256, "final": final})
            if info.world_size > 1:
                torch.distributed.barrier()
            inject = os.environ.get("ELMCTL_INJECT_FAILURE", "")
            if inject.startswith("epoch:") and not final and step == int(inject[6:]) * spe:
                event(f"injected crash after epoch {step // spe} (ELMCTL_INJECT_FAILURE={inject}): SIGKILL")
                os.kill(os.getpid(), signal.SIGKILL)

        event(f"{loss_type} tuning: {opt['epochs']} epochs x {spe} steps, {info.world_size} process(es) x {micro} "
              f"x {accum} = {batches.global_batch} pairs/step, lr {opt['lr']:g}, beta {it.beta:g}, warm-up {warmup}; "
              f"training steps {start_step + 1}..{total}")
        result = train(runner, optimizer, objective, batches, cfg, lr_at=lr_at, device=info.device, eval_fn=eval_fn,
                       start_step=start_step,
                       hooks=Hooks(on_log=on_log if info.is_main else None, on_eval=on_eval if info.is_main else None,
                                   on_checkpoint=on_checkpoint, should_stop=should_stop))
        error = f"loss or gradient became NaN/inf by step {result.step}" if result.status == "diverged" else None
        if store is not None:
            store.update_run(run_id, status=result.status, step=result.step, error=error)
        event(f"{result.status} at step {result.step}" + (f": {error}" if error else ""))
        return TuneResult(result.status, result.step, dict(last_eval), error)
    except BaseException as exc:
        if store is not None:
            status = "cancelled" if isinstance(exc, KeyboardInterrupt) else "failed"
            store.update_run(run_id, status=status, error=f"{type(exc).__name__}: {exc}"[:2000])
        event(f"failed: {type(exc).__name__}: {exc}")
        raise
    finally:
        event.close()
        if store is not None:
            store.close()


def _resume(opt: dict, runner, optimizer, batches: PairBatches, store, run_id: str, event: Callable, info) -> int:
    """Load ``opt["resume"]`` into the model, optimizer, data position and RNG; its step (0: none).

    Called after the reference model copied the base, so the reference stays the base.
    """
    from elmctl.sweep.resume import describe
    from elmctl.train.checkpoint import CheckpointInfo, load_checkpoint_files

    point = opt.get("resume")
    for note in opt.get("resume_notes") or []:
        event(f"resume: {note}")
    if not point:
        if opt.get("resume_from"):
            event("not resuming: no compatible checkpoint among the earlier attempts; starting from the base weights")
        return 0
    step = int(point["step"])
    mstate, ostate, tstate = load_checkpoint_files(CheckpointInfo(step, Path(point["checkpoint"]), point["sha256"]))
    if int(tstate["step"]) != step:
        raise RuntimeFailure(f"checkpoint {point['checkpoint']} holds step {tstate['step']}, expected {step}")
    D.load_model_state(runner, mstate)
    D.load_optimizer_state(runner, optimizer, ostate)
    batches.load_state_dict(tstate["data"])
    rngs = tstate.get("rng")
    if rngs:
        D.set_rng_state(rngs[info.rank % len(rngs)])
    if store is not None:
        _copy_history(store, point["run_id"], run_id, step)
    event(f"resumed from {describe(point)}: {point['checkpoint']}")
    return step


def _copy_history(store, src: str, dst: str, upto: int) -> None:
    """Copy run ``src``'s metrics up to step ``upto`` (its times kept) into ``dst``: whole curves, all epochs."""
    rows: dict[int, dict[str, float]] = {}
    times: dict[int, float] = {}
    for m in store.metrics(src):
        if m.step <= upto:
            rows.setdefault(m.step, {})[m.key] = m.value
            times[m.step] = m.time
    for step in sorted(rows):
        store.log_metrics(dst, step, rows[step], time_s=times[step])


def _main(argv: list[str]) -> int:  # torchrun worker: python -m elmctl.train.tune <run_dir>
    stop = {"flag": False}
    signal.signal(signal.SIGTERM, lambda *_: stop.update(flag=True))
    try:
        result = run_tune(argv[0], should_stop=lambda: stop["flag"])
    finally:
        D.destroy_distributed()
    return 0 if result.status == "completed" else 1


if __name__ == "__main__":  # pragma: no cover - exercised through torchrun
    sys.exit(_main(sys.argv[1:]))
