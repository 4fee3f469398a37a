"""`elmctl recipe list|show|validate|diff|schema`."""

from __future__ import annotations

from typing import Annotated, Any

import typer

from elmctl.cli._common import Format, FormatOpt, RecipeArg, SetOpt, console, emit_json, emit_yaml
from elmctl.errors import UsageError

recipe_app = typer.Typer(
    help="OpenELM recipes (paper Tables 9 and 10): list, show with derived numbers, validate, diff.",
    no_args_is_help=True,
)


def register(app: typer.Typer) -> None:
    app.add_typer(recipe_app, name="recipe")


def _fmt_num(x: float) -> str:
    from elmctl.config.derived import human

    return human(x)


def _recipe_json(recipe, derived: dict) -> dict[str, Any]:
    data = recipe.model_dump(mode="json")
    return {
        "id": data["id"],
        "description": data["description"],
        "model": data["model"],
        "pretrain": data["pretrain"],
        "instruct": data["instruct"],
        "provenance": data["provenance"],
        "derived": derived,
    }


@recipe_app.command("list")
def list_cmd(fmt: FormatOpt = Format.table) -> None:
    """One row per shipped recipe: size, shape, learning rates, tokens, the paper's GPUs.

    Example: elmctl recipe list
    """
    from elmctl.config.derived import derive
    from elmctl.config.loader import available_recipes, load_recipe

    rows = []
    for rid in available_recipes():
        r = load_recipe(rid)
        d = derive(r)
        rows.append(
            {
                "id": r.id,
                "params": d["params_total"],
                "layers": r.model.num_layers,
                "model_dim": r.model.model_dim,
                "head_dim": r.model.head_dim,
                "max_lr": r.pretrain.max_lr,
                "pretrain_tokens": d["pretrain_tokens"],
                "instruct_lr": r.instruct.lr,
                "instruct_epochs": r.instruct.epochs,
                "instruct_loss": r.instruct.loss,
                "paper_gpus": f"{r.pretrain.num_gpus}x {r.provenance.pretrain_gpu}",
            }
        )
    if fmt is Format.json:
        return emit_json(rows)
    if fmt is Format.yaml:
        return emit_yaml(rows)
    from rich import box
    from rich.measure import Measurement
    from rich.table import Table

    cols = ("id", "params", "layers", "d_model", "d_head", "max LR", "PT tokens", "DPO LR", "epochs", "loss", "paper GPUs")
    cells = [
        [
            r["id"], _fmt_num(r["params"]), str(r["layers"]), str(r["model_dim"]), str(r["head_dim"]),
            f"{r['max_lr']:g}", _fmt_num(r["pretrain_tokens"]), f"{r['instruct_lr']:g}",
            str(r["instruct_epochs"]), r["instruct_loss"], r["paper_gpus"],
        ]
        for r in rows
    ]
    c = console()
    t = Table(title="OpenELM recipes", title_justify="left", box=box.SIMPLE_HEAD, pad_edge=False)
    for col in cols:
        t.add_column(col, justify="left" if col in ("id", "loss", "paper GPUs") else "right", no_wrap=True)
    for row in cells:
        t.add_row(*row)
    if Measurement.get(c, c.options.update_width(10_000), t).maximum > c.width:
        # Narrow terminal: one column per recipe instead of squeezing 11 columns into "…".
        t = Table(title="OpenELM recipes", title_justify="left", box=box.SIMPLE_HEAD, pad_edge=False)
        t.add_column("", style="cyan", no_wrap=True)
        for row in cells:
            t.add_column(row[0], justify="right", no_wrap=True)
        for i, col in enumerate(cols[1:], start=1):
            t.add_row(col, *(row[i] for row in cells))
    c.print(t)


@recipe_app.command("show")
def show_cmd(
    recipe: RecipeArg,
    gpus: Annotated[int | None, typer.Option("--gpus", min=1, help="Plan for this many local GPUs.")] = None,
    gpu_mem: Annotated[float, typer.Option("--gpu-mem", min=1, help="Memory of one GPU in GiB.")] = 80.0,
    gpu: Annotated[str, typer.Option("--gpu", help="GPU type for the time estimate: H100, H200, A100.")] = "H100",
    mfu: Annotated[float, typer.Option("--mfu", min=0.01, max=1.0, help="Assumed model FLOPs utilisation.")] = 0.5,
    layers: Annotated[bool, typer.Option("--layers", help="Show the per-layer table.")] = False,
    fmt: FormatOpt = Format.table,
    overrides: SetOpt = None,
) -> None:
    """Everything about one recipe: Table 9, Table 10, provenance and derived numbers.

    Example: elmctl recipe show 1_1b --gpus 8 --layers
    """
    from elmctl.config.derived import GPU_PEAK_BF16_FLOPS, derive
    from elmctl.config.loader import load_recipe
    from elmctl.config.plan import batch_plan

    if gpu.upper() not in GPU_PEAK_BF16_FLOPS:
        raise UsageError(f"unknown --gpu '{gpu}'", f"choose one of {', '.join(GPU_PEAK_BF16_FLOPS)}")
    r = load_recipe(recipe, overrides or [])
    plan = None if gpus is None else batch_plan(r, gpus, gpu_mem_gib=gpu_mem, gpu=gpu, mfu=mfu)
    d = derive(r, plan=plan)
    if fmt is Format.json:
        return emit_json(_recipe_json(r, d))
    if fmt is Format.yaml:
        return emit_yaml(_recipe_json(r, d))
    _render_show(r, d, layers)


def _kv_table(title: str, rows: list[tuple[str, str]]):
    from rich.table import Table

    t = Table(title=title, title_justify="left", show_header=False, box=None, pad_edge=False)
    t.add_column(style="cyan", no_wrap=True)
    t.add_column()
    for k, v in rows:
        t.add_row(k, v)
    return t


def _side_by_side(left, right):
    """Two tables next to each other (a grid; rich.columns costs 30 ms of start-up to import)."""
    from rich.table import Table

    grid = Table.grid(padding=(0, 4))
    grid.add_row(left, right)
    return grid


def _render_show(r, d: dict, show_layers: bool) -> None:
    from rich.table import Table

    c = console()
    m, pt, it, pv = r.model, r.pretrain, r.instruct, r.provenance
    p_hf, p_tr = d["params"]["hf_vocab"], d["params"]["training_vocab"]
    heads = [L["query_heads"] for L in d["layers"]]
    ffns = [L["ffn_dim"] for L in d["layers"]]
    c.print(f"[bold]{r.id}[/]  {r.description}")
    arch = _kv_table(
        "Architecture",
        [
            ("layers x d_model", f"{m.num_layers} x {m.model_dim}"),
            ("head dim", str(m.head_dim)),
            ("query heads/layer", f"{min(heads)}..{max(heads)} (GQA: {m.num_gqa_groups} q per kv)"),
            ("FFN width/layer", f"{min(ffns)}..{max(ffns)} (SwiGLU)"),
            ("alpha (qkv)", f"{m.qkv_multipliers[0]}..{m.qkv_multipliers[1]}"),
            ("beta (ffn)", f"{m.ffn_multipliers[0]}..{m.ffn_multipliers[1]}"),
            ("norm / pos", f"RMSNorm eps {m.norm_eps:g}, q/k norm; RoPE {m.rope_freq_constant:g}"),
            ("context", str(m.context_length)),
            ("vocab", f"{m.vocab_size} (train {m.padded_vocab_size}, pad {m.pad_token_id})"),
            ("tied head", "yes" if m.share_input_output_layers else "no"),
        ],
    )
    params = _kv_table(
        "Parameters",
        [
            ("total (HF vocab)", f"{p_hf['total']:,}"),
            ("total (train vocab)", f"{p_tr['total']:,}"),
            ("attention", f"{p_hf['attention']:,}"),
            ("FFN", f"{p_hf['ffn']:,}"),
            ("embedding", f"{p_hf['embedding']:,}"),
            ("norms", f"{p_hf['norms']:,}"),
            ("FLOPs/token (train)", _fmt_num(d["flops_per_token"])),
            ("  of which attention", _fmt_num(d["flops_per_token_attention"])),
        ],
    )
    mem = d["memory_per_gpu_gib"]
    t9 = _kv_table(
        "Pre-training (Table 9)",
        [
            ("batch", f"{pt.sequences_per_gpu} seq/GPU x {pt.num_gpus} GPUs x {m.context_length} = {d['tokens_per_step']:,} tok"),
            ("iterations", f"{pt.max_iterations:,} (warm-up {pt.warmup_iterations:,})"),
            ("tokens / FLOPs", f"{_fmt_num(d['pretrain_tokens'])} / {d['pretrain_flops']:.3g}"),
            ("LR", f"{pt.warmup_init_lr:g} -> {pt.max_lr:g} -> cosine {pt.min_lr:g}"),
            ("AdamW", f"betas {list(pt.adam_betas)}, eps {pt.adam_eps:g}, wd {pt.weight_decay:g} (no decay on 1-D)"),
            ("clip / z-loss", f"{pt.grad_clip:g} / {'%g' % pt.z_loss_coef if pt.z_loss else 'off'}"),
            ("precision", f"{pt.precision}; act. ckpt {'on' if pt.activation_checkpointing else 'off'}; FSDP {'on' if pt.fsdp else 'off'}"),
            ("data filters", f">= {pt.data_filters.min_chars} chars, >= {pt.data_filters.min_tokens} tokens"),
            ("memory/GPU (est.)", f"{mem['total']:.1f} GiB ({mem['total_without_checkpointing']:.1f} without ckpt)"),
        ],
    )
    t10 = _kv_table(
        "Instruction tuning (Table 10)",
        [
            ("method", f"DPO, loss {it.loss}, beta {it.beta:g}"),
            ("chosen cell", f"LR {it.lr:g}, {it.epochs} epochs"),
            ("grid", f"LR {[float(x) for x in it.lr_grid]} x epochs {list(it.epoch_grid)}"),
            ("batch", f"{it.per_device_batch}/device x accum {it.grad_accumulation} x {it.num_gpus} GPUs = {it.effective_batch}"),
            ("lengths", f"max {it.max_length}, prompt {it.max_prompt_length}"),
            ("schedule", f"{it.scheduler}, warm-up ratio {it.warmup_ratio:g}, wd {it.weight_decay:g}"),
            ("sharding", f"{it.sharding}; grad ckpt {'on' if it.gradient_checkpointing else 'off'}"),
        ],
    )
    prov = _kv_table(
        "Provenance",
        [
            ("tables", f"{pv.pretrain_table} / {pv.instruct_table}"),
            ("CoreNet", pv.corenet_config or "-"),
            ("HF", pv.hf_config or "-"),
            ("paper hardware", f"PT {pt.num_gpus}x {pv.pretrain_gpu} {pv.pretrain_gpu_memory_gb}GB"
             + (f", {pv.pretrain_days:g} days" if pv.pretrain_days else "")
             + f"; IT {it.num_gpus}x {pv.instruct_gpu} {pv.instruct_gpu_memory_gb}GB"
             + (f", {pv.instruct_hours:g} h" if pv.instruct_hours else "")),
        ]
        + [("note", n) for n in pv.notes],
    )
    c.print(_side_by_side(arch, params))
    c.print(_side_by_side(t9, t10))
    c.print(prov)
    if "plan" in d:
        pl = d["plan"]
        status = "[green]fits[/]" if pl["fits"] else "[red]does not fit[/]"
        rows = [
            ("micro-batch x accum x GPUs", f"{pl['micro_batch']} x {pl['grad_accumulation']} x {pl['gpus']} = "
             f"{pl['global_batch_sequences']} seq (recipe {pl['recipe_global_batch_sequences']})"),
            ("memory/GPU (est.)", f"{pl['memory_gib']:.1f} GiB of {pl['gpu_mem_gib']:g} GiB: {status}"
             f" (act. ckpt {'on' if pl['activation_checkpointing'] else 'off'}; "
             f"{pl['memory_gib_without_checkpointing']:.1f} GiB without)"),
            ("time", f"{pl['days']:.1f} days on {pl['gpus']}x {pl['gpu']} at {pl['mfu']:.0%} MFU"),
        ] + [("note", n) for n in pl["notes"]]
        c.print(_kv_table(f"Plan for {pl['gpus']} local GPU(s)", rows))
    if show_layers:
        t = Table(title="Per-layer shapes", title_justify="left")
        for col in ("layer", "alpha", "beta", "q heads", "kv heads", "FFN width"):
            t.add_column(col, justify="right")
        for L in d["layers"]:
            t.add_row(str(L["index"]), f"{L['qkv_multiplier']:g}", f"{L['ffn_multiplier']:g}",
                      str(L["query_heads"]), str(L["kv_heads"]), str(L["ffn_dim"]))
        c.print(t)
    else:
        c.print("[dim]--layers for the per-layer table, --gpus N for a batch plan, --format json for scripts[/]")


@recipe_app.command("validate")
def validate_cmd(
    paths: Annotated[list[str], typer.Argument(help="Recipe files (or ids) to check.")],
) -> None:
    """Check recipe files; report every problem at once (file:line, field, allowed values). Exit 2 on any.

    Example: elmctl recipe validate my-recipe.yaml recipes/*.yaml
    """
    from elmctl.config.loader import RecipeError, validate_files

    recipes, problems = validate_files(paths)
    c = console()
    for r in recipes:
        c.print(f"[green]ok[/]  {r.id}")
    if problems:
        raise RecipeError(problems)


@recipe_app.command("diff")
def diff_cmd(
    a: RecipeArg,
    b: Annotated[str, typer.Argument(help="Second recipe id or path.")],
    fmt: FormatOpt = Format.table,
) -> None:
    """Field-by-field differences between two recipes, derived numbers included.

    Example: elmctl recipe diff 270m 450m
    """
    from elmctl.config.derived import derive
    from elmctl.config.loader import load_recipe

    ra, rb = load_recipe(a), load_recipe(b)
    fa = _flatten(_recipe_json(ra, _diffable(derive(ra))))
    fb = _flatten(_recipe_json(rb, _diffable(derive(rb))))
    rows = [(k, fa.get(k), fb.get(k)) for k in sorted(set(fa) | set(fb), key=_order_key) if fa.get(k) != fb.get(k)]
    if fmt is not Format.table:
        data = [{"field": k, "a": x, "b": y} for k, x, y in rows]
        return emit_json(data) if fmt is Format.json else emit_yaml(data)
    from rich.table import Table

    t = Table(title=f"{ra.id} vs {rb.id}: {len(rows)} differences", title_justify="left")
    # Field paths are what users grep for: never truncate them; let long values wrap instead.
    c = console()
    field_w = min(max((len(k) for k, _, _ in rows), default=5), 34)
    room = max(12, min(60, (c.width - field_w - 10) // 2))  # long values are cut to fit, never the fields
    t.add_column("field", style="cyan", overflow="fold", min_width=field_w)
    t.add_column(ra.id, justify="right", overflow="fold")
    t.add_column(rb.id, justify="right", overflow="fold")
    for k, x, y in rows:
        t.add_row(k, _cell(x, room), _cell(y, room))
    c.print(t)


def _diffable(derived: dict) -> dict:
    out = dict(derived)
    layers = out.pop("layers")
    out["query_heads"] = [L["query_heads"] for L in layers]
    out["kv_heads"] = [L["kv_heads"] for L in layers]
    out["ffn_dims"] = [L["ffn_dim"] for L in layers]
    return out


def _order_key(k: str) -> tuple:
    sections = ["id", "description", "model", "pretrain", "instruct", "provenance", "derived"]
    head = k.split(".")[0]
    return (sections.index(head) if head in sections else 99, k)


def _flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    if isinstance(d, dict):
        for k, v in d.items():
            out.update(_flatten(v, f"{prefix}.{k}" if prefix else str(k)))
    else:
        out[prefix] = d
    return out


def _cell(v: Any, width: int = 60) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.6g}"
    if isinstance(v, int) and not isinstance(v, bool) and abs(v) >= 10000:
        return f"{v:,}"
    s = str(v)
    return s if len(s) <= width else s[: width - 3] + "..."


@recipe_app.command("schema")
def schema_cmd() -> None:
    """Print the JSON Schema of a recipe (for editors: yaml-language-server, VS Code).

    Example: elmctl recipe schema > recipe.schema.json
    """
    from elmctl.config.schema import Recipe

    emit_json(Recipe.model_json_schema())
