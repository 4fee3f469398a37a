"""Apple's Hugging Face checkpoint layout for OpenELM: ``config.json`` + ``model.safetensors``.

Tensor names (facts §3): ``transformer.token_embeddings.weight`` [vocab_size, D] and, per layer,
``transformer.layers.{i}.{attn_norm,attn.qkv_proj,attn.q_norm,attn.k_norm,attn.out_proj,ffn_norm,
ffn.proj_1,ffn.proj_2}.weight``, then ``transformer.norm.weight``; no ``lm_head`` when tied.
The same folder loads in HF transformers (trust_remote_code) and in ``mlx_lm``.

Vocabulary rows. Training uses ``padded_vocab_size`` rows (pad token + padding); the HF files keep
only the first ``vocab_size`` rows. ``load_pretrained`` pads the embedding back with **zero rows**
(deterministic, so save -> load -> save is lossless; those rows are never real tokens and
:func:`elmctl.model.generate` never samples them). The padded size and pad id come from
``elmctl_padded_vocab_size`` / ``elmctl_pad_token_id`` in config.json when elmctl wrote the folder;
for Apple's released folders (without those keys) they follow the CoreNet recipe: 32128 rows with pad
id 32000 when vocab_size is 32000, otherwise the smallest multiple of 128 above vocab_size, pad id =
vocab_size.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from elmctl.config.derived import layer_shapes
from elmctl.errors import UsageError
from elmctl.model.openelm import OpenELM

__all__ = ["save_pretrained", "load_pretrained", "hf_config", "model_config_from_hf", "padded_vocab_for"]

PREFIX = "transformer."
WEIGHTS = "model.safetensors"
INDEX = "model.safetensors.index.json"
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def padded_vocab_for(vocab_size: int) -> tuple[int, int]:
    """(padded_vocab_size, pad_token_id) for a released config without elmctl's keys."""
    if vocab_size == 32000:
        return 32128, 32000  # CoreNet OpenELM recipe: LLaMA 32000 + pad, padded to 32128
    return (vocab_size + 1 + 127) // 128 * 128, vocab_size


def hf_config(model: OpenELM, vocab_size: int, dtype: torch.dtype) -> dict[str, Any]:
    """The config.json of Apple's release (facts §7) plus elmctl's keys for a lossless reload."""
    cfg = model.config
    shapes = layer_shapes(cfg)
    return {
        "architectures": ["OpenELMForCausalLM"],
        "auto_map": {
            "AutoConfig": "configuration_openelm.OpenELMConfig",
            "AutoModelForCausalLM": "modeling_openelm.OpenELMForCausalLM",
        },
        "model_type": "openelm",
        "num_transformer_layers": cfg.num_layers,
        "model_dim": cfg.model_dim,
        "head_dim": cfg.head_dim,
        "num_gqa_groups": cfg.num_gqa_groups,
        "num_query_heads": [s.query_heads for s in shapes],
        "num_kv_heads": [s.kv_heads for s in shapes],
        "ffn_multipliers": [s.ffn_multiplier for s in shapes],
        "qkv_multipliers": list(cfg.qkv_multipliers),
        "ffn_dim_divisor": cfg.ffn_dim_divisor,
        "ffn_with_glu": True,
        "activation_fn_name": "swish",
        "normalization_layer_name": "rms_norm",
        "normalize_qk_projections": cfg.normalize_qk_projections,
        "share_input_output_layers": cfg.share_input_output_layers,
        "rope_freq_constant": int(cfg.rope_freq_constant) if float(cfg.rope_freq_constant).is_integer() else cfg.rope_freq_constant,
        "rope_max_length": cfg.rope_max_length,
        "max_context_length": cfg.context_length,
        "vocab_size": vocab_size,
        "bos_token_id": cfg.bos_token_id,
        "eos_token_id": cfg.eos_token_id,
        "initializer_range": 0.02,
        "use_cache": True,
        "torch_dtype": str(dtype).removeprefix("torch."),
        "rms_norm_eps": cfg.norm_eps,  # not in Apple's file (fixed 1e-6 there); mlx_lm reads it
        "elmctl_padded_vocab_size": cfg.padded_vocab_size,
        "elmctl_pad_token_id": cfg.pad_token_id,
    }


def save_pretrained(model: OpenELM, path: str | os.PathLike, vocab_size: int | None = None,
                    dtype: torch.dtype | str | None = None) -> Path:
    """Write ``config.json`` and ``model.safetensors`` (Apple's names) into ``path``.

    Args:
        model: the OpenELM to export.
        path: target folder. Files are written to a temporary folder beside it first, then moved in
            with atomic renames; other files already there (a tokenizer, say) are kept, stale
            weight files are removed.
        vocab_size: embedding rows to keep (default ``config.vocab_size``, the HF vocabulary).
        dtype: stored dtype (default: the model's); e.g. ``torch.bfloat16`` or ``"bfloat16"``.

    Returns:
        The folder path.
    """
    from safetensors.torch import save_file

    cfg = model.config
    rows = cfg.vocab_size if vocab_size is None else int(vocab_size)
    if not (max(cfg.bos_token_id, cfg.eos_token_id) < rows <= cfg.padded_vocab_size):
        raise UsageError(f"vocab_size {rows} must lie in ({max(cfg.bos_token_id, cfg.eos_token_id)}, "
                         f"{cfg.padded_vocab_size}]")
    if isinstance(dtype, str):
        if dtype not in _DTYPES:
            raise UsageError(f"unknown dtype {dtype!r}", f"use one of {', '.join(_DTYPES)}")
        dtype = _DTYPES[dtype]
    dtype = dtype or model.token_embeddings.weight.dtype
    tensors = {}
    for name, tensor in model.state_dict().items():
        if name == "token_embeddings.weight":
            tensor = tensor[:rows]
        key = name if name == "lm_head.weight" else PREFIX + name
        if name == "lm_head.weight":
            tensor = tensor[:rows]
        tensors[key] = tensor.detach().to("cpu", dtype).contiguous()
    config = hf_config(model, rows, dtype)

    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        save_file(tensors, str(tmp / WEIGHTS), metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        if not target.exists():
            os.replace(tmp, target)
        else:
            if not target.is_dir():
                raise UsageError(f"{target} exists and is not a folder")
            for stale in [*target.glob("model*.safetensors"), target / INDEX]:
                stale.unlink(missing_ok=True)  # mlx_lm would load every model*.safetensors it finds
            for f in (WEIGHTS, "config.json"):
                os.replace(tmp / f, target / f)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _multipliers(value: Any, num_layers: int, name: str) -> tuple[float, float]:
    """Config multipliers -> (min, max): a number, [min, max], or the per-layer list."""
    if isinstance(value, (int, float)):
        return float(value), float(value)
    if isinstance(value, list) and value and len(value) in (2, num_layers):
        return float(value[0]), float(value[-1])
    raise UsageError(f"config.json: {name} must be a number, [min, max] or {num_layers} per-layer values, got {value!r}")


def model_config_from_hf(config: dict[str, Any], source: str = "config.json"):
    """Build a ModelConfig from an OpenELM config.json; checks the per-layer lists it states."""
    from pydantic import ValidationError

    from elmctl.config.schema import ModelConfig

    if config.get("model_type") != "openelm":
        raise UsageError(f"{source}: model_type is {config.get('model_type')!r}, expected 'openelm'")
    try:
        n = int(config["num_transformer_layers"])
        vocab = int(config["vocab_size"])
        default_padded, default_pad = padded_vocab_for(vocab)
        fields = dict(
            num_layers=n,
            model_dim=config["model_dim"],
            head_dim=config["head_dim"],
            num_gqa_groups=config["num_gqa_groups"],
            qkv_multipliers=_multipliers(config.get("qkv_multipliers", [0.5, 1.0]), n, "qkv_multipliers"),
            ffn_multipliers=_multipliers(config["ffn_multipliers"], n, "ffn_multipliers"),
            ffn_dim_divisor=config.get("ffn_dim_divisor", 256),
            norm_eps=config.get("rms_norm_eps", 1e-6),
            normalize_qk_projections=config.get("normalize_qk_projections", True),
            rope_freq_constant=config.get("rope_freq_constant", 10000),
            rope_max_length=config.get("rope_max_length", 4096),
            context_length=config.get("max_context_length", 2048),
            vocab_size=vocab,
            padded_vocab_size=config.get("elmctl_padded_vocab_size", default_padded),
            pad_token_id=config.get("elmctl_pad_token_id", default_pad),
            bos_token_id=config.get("bos_token_id", 1),
            eos_token_id=config.get("eos_token_id", 2),
            share_input_output_layers=config.get("share_input_output_layers", True),
        )
    except KeyError as exc:
        raise UsageError(f"{source}: missing field {exc.args[0]!r}") from None
    except (TypeError, ValueError) as exc:
        raise UsageError(f"{source}: {exc}") from None
    if config.get("ffn_with_glu", True) is not True or config.get("activation_fn_name", "swish") not in ("swish", "silu"):
        raise UsageError(f"{source}: only the SwiGLU FFN (ffn_with_glu true, swish) is supported")
    try:
        cfg = ModelConfig.model_validate(fields)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'model'}: {e['msg']}" for e in exc.errors())
        raise UsageError(f"{source}: not a valid OpenELM config: {problems}") from None
    shapes = layer_shapes(cfg)
    derived = {
        "num_query_heads": [s.query_heads for s in shapes],
        "num_kv_heads": [s.kv_heads for s in shapes],
    }
    if isinstance(config["ffn_multipliers"], list) and len(config["ffn_multipliers"]) == n:
        derived["ffn_multipliers"] = [s.ffn_multiplier for s in shapes]
    for key, want in derived.items():
        got = config.get(key)
        if got is not None and isinstance(got, list) and [float(x) for x in got] != [float(x) for x in want]:
            raise UsageError(
                f"{source}: {key} {got} differs from the layer-wise scaling rule, which gives {want}",
                "elmctl builds layers from (min, max) multipliers; hand-edited per-layer lists are not supported",
            )
    return cfg


def _read_tensors(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    single, index = folder / WEIGHTS, folder / INDEX
    try:
        if single.is_file():
            return load_file(str(single))
        if index.is_file():
            weight_map = json.loads(index.read_text()).get("weight_map")
            if not isinstance(weight_map, dict):
                raise UsageError(f"{index}: no 'weight_map' object")
            tensors: dict[str, torch.Tensor] = {}
            for shard in sorted(set(weight_map.values())):
                if not (folder / shard).is_file():
                    raise UsageError(f"{index} names shard {shard}, which is missing")
                tensors.update(load_file(str(folder / shard)))
            missing = sorted(set(weight_map) - set(tensors))
            if missing:
                raise UsageError(f"{index}: tensors listed but not found in the shards: {missing[:5]}")
            return tensors
    except (SafetensorError, OSError, json.JSONDecodeError) as exc:
        raise UsageError(f"cannot read the weights in {folder}: {exc}") from None
    raise UsageError(f"{folder} holds neither {WEIGHTS} nor {INDEX}",
                     "point at a folder written by `elmctl export` or downloaded from apple/OpenELM-*")


def load_pretrained(path: str | os.PathLike, *, dtype: torch.dtype | None = torch.float32,
                    device: str | torch.device = "cpu", activation_checkpointing: bool = False) -> OpenELM:
    """Load an OpenELM from an HF folder (Apple's release or :func:`save_pretrained` output).

    Accepts ``model.safetensors`` or a sharded ``model.safetensors.index.json``, keys with or without
    the ``transformer.`` prefix (CoreNet names), and embeddings with vocab_size or padded_vocab_size
    rows (missing rows become zeros). ``dtype`` None keeps the stored dtype.

    Raises:
        UsageError: missing folder/files, invalid config, missing/unexpected tensors, shape mismatches.
    """
    folder = Path(path)
    if not folder.is_dir():
        raise UsageError(f"model folder {folder} does not exist")
    cfg_file = folder / "config.json"
    if not cfg_file.is_file():
        raise UsageError(f"{folder} has no config.json", "an OpenELM HF folder holds config.json and model.safetensors")
    try:
        raw = json.loads(cfg_file.read_text())
    except json.JSONDecodeError as exc:
        raise UsageError(f"{cfg_file} is not valid JSON: {exc}") from None
    cfg = model_config_from_hf(raw, str(cfg_file))
    stored = {(k[len(PREFIX):] if k.startswith(PREFIX) else k): v for k, v in _read_tensors(folder).items()}

    with torch.device("meta"):
        model = OpenELM(cfg, activation_checkpointing=activation_checkpointing)
    expected = {k: v.shape for k, v in model.state_dict().items()}
    missing = sorted(set(expected) - set(stored))
    unexpected = sorted(set(stored) - set(expected))
    if missing or unexpected:
        parts = ([f"missing {missing[:6]}{' ...' if len(missing) > 6 else ''}"] if missing else []) + (
            [f"unexpected {unexpected[:6]}{' ...' if len(unexpected) > 6 else ''}"] if unexpected else [])
        raise UsageError(f"{folder}: tensors do not match an OpenELM with this config: " + "; ".join(parts))
    for name in ("token_embeddings.weight", "lm_head.weight"):
        if name in stored and stored[name].dim() == 2 and stored[name].shape[0] < cfg.padded_vocab_size \
                and stored[name].shape[1] == cfg.model_dim:
            t = stored[name]
            stored[name] = torch.cat([t, t.new_zeros(cfg.padded_vocab_size - t.shape[0], t.shape[1])])
    for name, shape in expected.items():
        if stored[name].shape != shape:
            raise UsageError(f"{folder}: tensor {PREFIX if name != 'lm_head.weight' else ''}{name} has shape "
                             f"{list(stored[name].shape)}, the config needs {list(shape)}")
    target_dtype = dtype
    state = {k: v.to(device=device, dtype=target_dtype or v.dtype) for k, v in stored.items()}
    model.load_state_dict(state, assign=True)
    model.rope.to_empty(device=device)  # the meta tables get storage, then real fp32 values
    model.rope.reset_cache()
    return model
