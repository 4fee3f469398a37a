"""Pre-training: build model, data, objective and optimizer from a run folder, then run the loop.

The same function serves the in-process path (one process, called by ``elmctl pretrain``) and the
torchrun worker (``elmctl.train.worker``). Everything it needs is in the run folder:

    <run_dir>/recipe.json    the resolved recipe (``Recipe.model_dump(mode="json")``)
    <run_dir>/options.json   :class:`~elmctl.train.run_folder.PretrainOptions`, incl. run id and store URL
    <run_dir>/train.log      progress lines (rank 0)
    <run_dir>/checkpoints/   see :mod:`elmctl.train.checkpoint`

Data order is deterministic (:class:`~elmctl.train.pretrain.batches.PretrainBatches`): the data
position is the step count, and a resumed run reads exactly what an uninterrupted one would.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from elmctl.train import dist as D
from elmctl.train import run_folder
from elmctl.train.checkpoint import restore_training_state, save_checkpoint
from elmctl.train.loop import Hooks, LoopConfig, LoopResult, train
from elmctl.train.objectives import lm_objective
from elmctl.train.optim import build_adamw
from elmctl.train.pretrain.batches import PretrainBatches
from elmctl.train.schedule import pretrain_schedule

__all__ = ["run_pretrain", "PretrainResult"]


@dataclass
class PretrainResult:
    status: str
    step: int
    metrics: dict[str, float]
    warnings: list[str]
    error: str | None = None


def _make_eval(objective, dataset, options, info: D.DistInfo, pad_id) -> Callable:
    mb = options.micro_batch
    n_batches = max(1, options.eval_sequences // (mb * info.world_size))
    source = PretrainBatches(dataset, seq_len=options.seq_len, micro_batch=mb, grad_accumulation=n_batches,
                             rank=info.rank, world_size=info.world_size, pad_id=pad_id)

    def eval_fn(forward) -> dict[str, float]:
        source.next_sequence, source.micro = 0, 0  # the same validation sequences every time
        sums = None
        for _ in range(n_batches):
            loss, metrics = forward(source.next_batch())
            vec = torch.stack([loss.float(), metrics["ce"].float()])
            sums = vec if sums is None else sums + vec
        sums = D.all_reduce_mean(sums / n_batches).tolist()
        return {"val_loss": sums[0], "val_ce": sums[1]}

    return eval_fn


def run_pretrain(
    run_dir: str | os.PathLike,
    *,
    should_stop: Callable[[], bool] | None = None,
    on_log: Callable[[int, dict[str, float]], None] | None = None,
    on_event: Callable[[str], None] | None = None,
    log_path: str | os.PathLike | None = "train.log",
    store_url: str | None = None,
) -> PretrainResult:
    """Train the run in ``run_dir`` (fresh or resumed from its newest good checkpoint).

    Rank 0 records metrics, checkpoints and the final status in the store named in options.json.
    ``on_log``/``on_event`` are for the CLI's progress display (rank 0 only). ``log_path`` (relative
    to the run folder) receives the event lines; None when a supervisor already tees stdout there.
    """
    from elmctl.config.schema import Recipe
    from elmctl.data.shards import TokenDataset
    from elmctl.store import Store
    from elmctl.train.nodes import agree_on_checkpoint, follow_head

    run_dir = Path(run_dir)
    recipe, opt = run_folder.read(run_dir)
    device_type = opt.device
    info = D.init_distributed(device_type)
    # Several nodes started by hand each have their own run record: all train global rank 0's run.
    own_recipe = recipe.model_dump(mode="json")
    head_recipe, head_opt, role, notes = follow_head(own_recipe, run_folder.to_dict(opt), info)
    opt = run_folder.from_dict("pretrain", head_opt)
    if head_recipe != own_recipe:
        recipe = Recipe.model_validate(head_recipe)
    pt, mcfg = recipe.pretrain, recipe.model
    records = info.is_main or role.records_node_run  # rank 0: the run; a node's first process: its record
    store = Store(store_url or os.environ.get("ELMCTL_STORE") or opt.store_url) if records else None
    run_id = opt.run_id
    event = run_folder.RunLog(run_dir / log_path if log_path else None, on_event, records)
    warnings: list[str] = []
    for note in notes:
        event("note: " + note)
    if role.records_node_run:
        event(f"node {role.node_rank} of {role.nnodes}: metrics and checkpoints go to the head node's run "
              f"{role.head_run_id}")

    with run_folder.recording(store, run_id, event):
        D.seed_everything(pt.seed)
        from elmctl.model import OpenELM

        model = OpenELM(mcfg, activation_checkpointing=pt.activation_checkpointing)
        on_gpu = device_type == "cuda"
        runner = D.wrap_model(model, device=info.device, compile_model=bool(opt.compile),
                              fsdp=pt.fsdp and info.world_size > 1, fsdp_bf16=pt.precision == "bf16" and on_gpu,
                              attention_backend=pt.attention_backend)
        if pt.fsdp and info.world_size > 1:
            event(f"FSDP2: parameters, gradients and optimizer state sharded over {info.world_size} processes")
        optimizer = build_adamw(model, lr=pt.warmup_init_lr, betas=pt.adam_betas, eps=pt.adam_eps,
                                weight_decay=pt.weight_decay)
        objective = lm_objective(z_loss_coef=pt.z_loss_coef if pt.z_loss else 0.0)
        pad_id = mcfg.pad_token_id
        train_data = TokenDataset(opt.data_dir, "train")
        batches = PretrainBatches(train_data, seq_len=opt.seq_len, micro_batch=opt.micro_batch,
                                  grad_accumulation=opt.grad_accumulation, rank=info.rank,
                                  world_size=info.world_size, pad_id=pad_id, pin=on_gpu)
        try:
            eval_fn = _make_eval(objective, TokenDataset(opt.data_dir, "val"), opt, info, pad_id)
        except Exception as exc:  # no validation split: train without evaluation
            eval_fn = None
            event(f"no validation data ({exc}); evaluation off")

        start_step = 0
        if opt.resume:
            expected = {}
            if info.is_main:
                expected = {c.step: c.meta.get("sha256") for c in store.checkpoints(run_id) if c.meta.get("sha256")}
            ckpt, warns = agree_on_checkpoint(run_dir, expected, info)  # rank 0's pick, on every rank
            for w in warns:
                event("warning: " + w)
            warnings += warns
            if ckpt is not None:
                start_step = restore_training_state(ckpt, runner, optimizer, batches, info.rank)
                if info.is_main:
                    store.discard_metrics_after(run_id, start_step)
                event(f"resumed from {ckpt.path.name} (step {start_step})")

        from elmctl.config.derived import flops_per_token

        G = batches.global_batch
        flops = flops_per_token(mcfg, opt.seq_len)
        cfg = LoopConfig(
            max_steps=opt.max_steps, grad_accumulation=opt.grad_accumulation, grad_clip=pt.grad_clip,
            precision=pt.precision if on_gpu else "fp32", log_every=opt.log_every,
            eval_every=opt.eval_every, checkpoint_every=opt.checkpoint_every,
            tokens_per_step=G * opt.seq_len, flops_per_token=flops,
            peak_flops_per_device=D.gpu_peak_flops(info.device),
        )

        def on_checkpoint(step: int, final: bool) -> None:
            mstate = D.model_state(runner)
            ostate = D.optimizer_state(runner, optimizer)
            rngs = D.gather_objects(D.rng_state())
            if info.is_main:
                tstate = {"step": step, "data": batches.state_dict(), "rng": rngs,
                          "schedule": {"kind": "corenet_cosine", "step": step}}
                meta = {"world_size": info.world_size, "global_batch": G, "micro_batch": opt.micro_batch,
                        "grad_accumulation": opt.grad_accumulation, "recipe_id": recipe.id, "run_id": run_id}
                ckpt = save_checkpoint(run_dir, step, model_state=mstate, optimizer_state=ostate,
                                       train_state=tstate, keep=pt.keep_checkpoints, final=final, meta=meta)
                store.add_checkpoint(run_id, step, str(ckpt.path), meta={**meta, "sha256": ckpt.sha256, "final": final})
                event(f"checkpoint {ckpt.path.name}")
            if info.world_size > 1:
                torch.distributed.barrier()

        def log(step: int, m: dict[str, float]) -> None:
            if store is not None:
                store.log_metrics(run_id, step, m)
            if "tokens_per_s" in m:
                event(f"step {step}/{cfg.max_steps} loss {m['loss']:.4f} lr {m['lr']:.3g} "
                      f"grad_norm {m['grad_norm']:.3g} tok/s {m['tokens_per_s']:.0f}")
            if on_log:
                on_log(step, m)

        def on_eval(step: int, m: dict[str, float]) -> None:
            if store is not None:
                store.log_metrics(run_id, step, m)
            event(f"eval step {step}: val_loss {m['val_loss']:.4f}")
            if on_log:
                on_log(step, m)

        if store is not None:
            store.update_run(run_id, status="running", pid=os.getpid(), error=None)
            if role.nnodes > 1:  # link the records of a job whose nodes were started by hand
                link = {"node_runs": role.node_runs} if info.is_main else {"head_run": role.head_run_id}
                config = {**store.get_run(run_id).config, **{k: v for k, v in head_opt.items() if k != "store_url"}}
                store.update_run(run_id, config={**config, "nnodes": role.nnodes, "node_rank": role.node_rank, **link})
        event(f"training steps {start_step + 1}..{cfg.max_steps}: {info.world_size} process(es) x "
              f"{opt.micro_batch} x {opt.grad_accumulation} = {G} sequences of {opt.seq_len} tokens")
        result: LoopResult = train(
            runner, optimizer, objective, batches, cfg, lr_at=pretrain_schedule(pt), device=info.device,
            start_step=start_step, eval_fn=eval_fn,
            hooks=Hooks(on_log=log if info.is_main else None, on_eval=on_eval if info.is_main else None,
                        on_checkpoint=on_checkpoint, should_stop=should_stop),
        )
        error = None
        if result.status == "diverged":
            from elmctl.train.checkpoint import list_checkpoints

            ck = list_checkpoints(run_dir)
            keep = f"; last good checkpoint {ck[-1][1].name}" if ck else "; no checkpoint was written"
            error = f"loss or gradient became NaN/inf by step {result.step}{keep}"
        if store is not None:
            store.update_run(run_id, status=result.status, step=result.step, error=error)
        event(f"{result.status} at step {result.step}" + (f": {error}" if error else ""))
        return PretrainResult(result.status, result.step, result.metrics, warnings, error)
