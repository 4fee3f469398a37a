"""Instruction tuning (DPO / hinge / SFT) on the shared training loop.

A tune run is a run folder like a pre-training run (``recipe.json``, ``options.json`` holding
:class:`~elmctl.train.run_folder.TuneOptions`, ``train.log``, ``checkpoints/``), prepared and
recorded by :mod:`elmctl.train.tune.launcher`; :func:`run_tune` trains it, in-process for one
process or in ``python -m elmctl.train.worker tune <run_dir>`` (alone, or under torchrun).

- Policy: an OpenELM built from the recipe, loaded from the base (a checkpoint folder or an Apple
  HF folder; see :func:`~elmctl.train.tune.inputs.resolve_base`). Reference: a frozen copy of the
  base (TRL's default), or, with ``precompute_ref``, its log-probs computed once up front and the
  copy dropped.
- Sharding: ``instruct.sharding`` zero3/fsdp on several processes shards the policy (parameters,
  gradients, AdamW state; bf16 compute with fp32 reduction on GPU) and the frozen reference with
  FSDP2 (:func:`~elmctl.train.dist.shard_model`, pre-training's wrapping); checkpoints hold full
  state dicts under OpenELM's names, as unsharded ones do. ``none``, or one process: DDP / plain.
- Batch: the recipe's effective batch (per_device_batch x grad_accumulation x num_gpus, e.g.
  8 x 2 x 8 = 128 pairs) is kept on any number of processes;
  :func:`~elmctl.config.plan.tune_plan` recomputes the accumulation. An epoch is
  floor(train pairs / effective batch) optimizer steps over a fresh permutation (seeded by the
  recipe seed and the epoch); the data position is the step count.
- Schedule: linear warm-up over ceil(warmup_ratio x total steps), then cosine to 0 (HF); AdamW
  with the recipe's weight decay (0 in Table 10) and default betas.
- Resume: ``opt.resume`` (picked and verified by :func:`elmctl.train.tune.launcher.record`, see
  :mod:`elmctl.train.tune.resume`) is an earlier attempt's checkpoint with the same identity and batch
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

The pieces: :mod:`elmctl.train.tune.inputs` (base weights and preference data, resolved and
checked), :mod:`elmctl.train.tune.batches` (pair batches, collation),
:mod:`elmctl.train.tune.resume` (restoring a resume point); this module holds the objective, the
evaluation and the run itself.
"""

from __future__ import annotations

import math
import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from elmctl.errors import RuntimeFailure, UsageError
from elmctl.train import dist as D
from elmctl.train.dpo import dpo_losses, preference_metrics, sequence_logps, sft_loss, split_pair_logps
from elmctl.train.loop import to_device
from elmctl.train.metric_keys import EVAL_KEYS
from elmctl.train.tune.batches import PairBatches, collate
from elmctl.train.tune.inputs import load_base_weights
from elmctl.train.tune.resume import load_resume_point

__all__ = ["make_objective", "run_tune", "TuneResult"]


def _ref_logps(ref_model, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    if "ref_chosen" in batch:
        return batch["ref_chosen"], batch["ref_rejected"]
    with torch.no_grad():
        return split_pair_logps(sequence_logps(ref_model(batch["input_ids"]), batch["labels"]))


def make_objective(loss: str, beta: float, ref_model: torch.nn.Module | None) -> Callable:
    """``objective(model, batch) -> (loss, metrics)`` for the loop.

    Training batches are pair batches (DPO, hinge) or chosen-only rows (SFT). Evaluation batches
    (``batch["_eval"]``) are always pair batches: loss = the training loss on them (SFT: NLL of the
    chosen rows), plus the implicit-reward metrics with the recipe's beta, and how often the model
    alone (and the frozen base) gives the chosen answer the higher log-probability.
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
        metrics = {**preference_metrics(cr, rj),
                   "preference_accuracy": (pc > pr).float().mean(), "base_preference_accuracy": (rc > rr).float().mean()}
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


def _epoch_benchmark(opt, model, info: D.DistInfo, event: Callable[[str], None]) -> Callable:
    """``tune-sweep --eval-tasks``: after each epoch, lm-evaluation-harness on the policy (rank 0, the
    full model: the sweep refuses sharded trials with it); records the evaluation and returns
    ``{metric: value}`` to log with the epoch. Tasks are built (data checked) before training starts."""
    from elmctl.data.tokenizers import load_tokenizer
    from elmctl.eval import evaluate_model, expand_tasks, metric_value, prepare_tasks, record_evaluation
    from elmctl.train.weights import data_tokenizer

    ev = opt.epoch_eval
    requests = expand_tasks(ev.tasks)
    prepared = prepare_tasks(requests[0], list(ev.include_path))
    spec = data_tokenizer(opt.data_dir)
    if spec is None:
        raise UsageError(f"{opt.data_dir}: its manifest records no tokenizer, which --eval-tasks needs")
    tok = load_tokenizer(spec)

    def bench(store, run_id: str, step: int, epoch: int) -> dict[str, float]:
        r = evaluate_model(model, tok, ev.tasks, limit=ev.limit, batch_size=ev.batch_size, devices=[str(info.device)],
                           label=f"run {run_id} epoch {epoch}", prepared=prepared, requests=requests)
        record_evaluation(store, r, run_id=run_id, step=step, name=f"epoch-{epoch}")
        if ev.metric is None:
            event(f"epoch {epoch}: lm-eval {ev.tasks} recorded ({sum(r.n.values())} samples, {r.seconds:.1f}s)")
            return {}
        value = metric_value(r, ev.metric)
        event(f"epoch {epoch}: {ev.metric} {value:.4f} (lm-eval, {sum(r.n.values())} samples, {r.seconds:.1f}s)")
        return {ev.metric: value}

    return bench


def run_tune(run_dir: str | os.PathLike, *, should_stop: Callable[[], bool] | None = None,
             on_event: Callable[[str], None] | None = None, store_url: str | None = None) -> TuneResult:
    """Train the tune run in ``run_dir`` (see the module docstring). Rank 0 writes the store:
    ``store_url``, else ``$ELMCTL_STORE``, else the one in the run's options."""
    from elmctl.data.preference import load_pairs
    from elmctl.model import OpenELM
    from elmctl.store import Store
    from elmctl.train.checkpoint import save_checkpoint
    from elmctl.train.loop import Hooks, LoopConfig, train
    from elmctl.train.optim import build_adamw
    from elmctl.train import run_folder
    from elmctl.train.schedule import warmup_decay

    run_dir = Path(run_dir)
    recipe, opt = run_folder.read(run_dir)
    it, mcfg = recipe.instruct, recipe.model
    info = D.init_distributed(opt.device)
    store = Store(store_url or os.environ.get("ELMCTL_STORE") or opt.store_url) if info.is_main else None
    run_id = opt.run_id
    event = run_folder.RunLog(run_dir / "train.log", on_event, info.is_main)

    with run_folder.recording(store, run_id, event):
        if store is not None:
            store.update_run(run_id, status="running", pid=os.getpid(), error=None)
        if os.environ.get("ELMCTL_INJECT_FAILURE") == "1":
            raise RuntimeFailure("injected failure (ELMCTL_INJECT_FAILURE=1, set by ELMCTL_FAIL_TRIAL_CELL)")
        D.seed_everything(it.seed)
        threads = os.environ.get("ELMCTL_NUM_THREADS")
        if threads and opt.device == "cpu":
            torch.set_num_threads(int(threads))
        on_gpu = opt.device == "cuda"
        model = OpenELM(mcfg, activation_checkpointing=it.gradient_checkpointing and on_gpu)
        load_base_weights(model, opt.base_kind, opt.base_path)
        ref_model = OpenELM(mcfg).to(info.device)
        ref_model.load_state_dict(model.state_dict())
        ref_model.eval().requires_grad_(False)
        if on_gpu and it.precision == "bf16":
            ref_model.to(torch.bfloat16)  # inference only: half the memory of the frozen copy
        # instruct.sharding (zero3/fsdp): FSDP2 full sharding of the policy and of the frozen
        # reference, so each process holds 1/world of both (a 3B policy's fp32 AdamW state plus a
        # reference does not fit one 80 GB GPU). The reference stays in its own dtype: no mp policy.
        sharded = it.sharding != "none" and info.world_size > 1
        if sharded:
            D.shard_model(ref_model)
        pad_id, micro, accum = mcfg.pad_token_id, opt.micro_batch, opt.grad_accumulation
        train_pairs, test_pairs = load_pairs(opt.data_dir, "train"), load_pairs(opt.data_dir, "test")
        ref_train = ref_test = None
        if opt.precompute_ref:
            t0 = time.time()
            ref_train = _precompute_ref(ref_model, train_pairs, pad_id, micro * 2, info.device)
            ref_test = _precompute_ref(ref_model, test_pairs, pad_id, micro * 2, info.device)
            ref_model = None  # no frozen copy during training
            event(f"reference log-probs of {len(train_pairs)}+{len(test_pairs)} pairs in {time.time() - t0:.1f}s")
        loss_type = opt.loss
        batches = PairBatches(train_pairs, micro_batch=micro, grad_accumulation=accum, pad_id=pad_id, seed=it.seed,
                              rank=info.rank, world_size=info.world_size, sft=loss_type == "sft", ref=ref_train)
        spe = batches.steps_per_epoch
        total = spe * int(opt.epochs)
        warmup = math.ceil(it.warmup_ratio * total)
        runner = D.wrap_model(model, device=info.device, fsdp=sharded,
                              fsdp_bf16=sharded and on_gpu and it.precision == "bf16")
        if sharded:
            event(f"FSDP2 (instruct.sharding {it.sharding}): policy parameters, gradients and AdamW state"
                  f"{'' if ref_model is None else ' and the reference model'} sharded over {info.world_size} processes")
        optimizer = build_adamw(model, lr=0.0, betas=(0.9, 0.999), eps=1e-8, weight_decay=it.weight_decay)
        objective = make_objective(loss_type, it.beta, ref_model)
        eval_fn = _make_eval(test_pairs, pad_id, micro * 2, info, ref_test)
        start_step = load_resume_point(opt, runner, optimizer, batches, store, run_id, event, info)
        cfg = LoopConfig(max_steps=total, grad_accumulation=accum, grad_clip=1.0,
                         precision=it.precision if on_gpu else "fp32", log_every=max(1, min(10, spe)),
                         eval_every=spe, checkpoint_every=spe, steps_per_epoch=spe)

        def lr_at(step: int) -> float:
            return warmup_decay(step, total_steps=total, warmup_steps=warmup, peak_lr=float(opt.lr), kind=it.scheduler)

        def on_log(step: int, m: dict[str, float]) -> None:
            renamed = {("train_" + k if k in ("loss",) + EVAL_KEYS else k): v for k, v in m.items()}
            store.log_metrics(run_id, step, renamed)

        last_eval: dict[str, float] = {}

        bench = _epoch_benchmark(opt, model, info, event) if opt.epoch_eval is not None and info.is_main else None

        def on_eval(step: int, m: dict[str, float]) -> None:
            if bench is not None:  # tune-sweep --eval-tasks: the metric the sweep ranks and prunes by
                m = {**m, **bench(store, run_id, step, step // spe)}
            last_eval.clear()
            last_eval.update(m)
            store.log_metrics(run_id, step, {"epoch": step // spe, **m})  # one transaction: read together
            event(f"epoch {step // spe}/{opt.epochs} step {step}: eval_loss {m['eval_loss']:.4f} "
                  f"reward_accuracy {m['reward_accuracy']:.3f} reward_margin {m['reward_margin']:.4f}")

        def on_checkpoint(step: int, final: bool) -> None:
            mstate = D.model_state(runner)
            ostate = D.optimizer_state(runner, optimizer)
            rngs = D.gather_objects(D.rng_state())
            if info.is_main:
                # `resume` + the batch plan are what elmctl.train.tune.resume.compare checks before a resume
                meta = {"world_size": info.world_size, "global_batch": batches.global_batch, "micro_batch": micro,
                        "grad_accumulation": accum, "recipe_id": recipe.id, "run_id": run_id, "kind": "tune",
                        "epoch": step // spe, "steps_per_epoch": spe, "resume": opt.identity}
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

        event(f"{loss_type} tuning: {opt.epochs} epochs x {spe} steps, {info.world_size} process(es) x {micro} "
              f"x {accum} = {batches.global_batch} pairs/step, lr {opt.lr:g}, beta {it.beta:g}, warm-up {warmup}; "
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
