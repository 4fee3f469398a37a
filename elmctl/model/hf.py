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
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from elmctl._files import MAX_CONFIG_JSON_BYTES, MAX_INDEX_JSON_BYTES, json_kind, read_json_bounded
from elmctl.config.derived import layer_shapes
from elmctl.errors import UsageError
from elmctl.model.openelm import OpenELM

__all__ = ["save_pretrained", "load_pretrained", "hf_config", "model_config_from_hf", "padded_vocab_for",
           "weight_file_names",
           "read_hf_config", "read_safetensors_index"]

PREFIX = "transformer."
WEIGHTS = "model.safetensors"
INDEX = "model.safetensors.index.json"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
           "fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# Above this many bytes of weights, save_pretrained writes HF shards + an index (transformers' default
# max_shard_size is 5 GB; OpenELM-3B in bf16 is ~6 GB).
DEFAULT_MAX_SHARD_BYTES = 5 * 10**9
_SHARD = re.compile(r"model-\d{5}-of-\d{5}\.safetensors")


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
                    dtype: torch.dtype | str | None = None,
                    max_shard_bytes: int | None = DEFAULT_MAX_SHARD_BYTES) -> Path:
    """Write ``config.json`` and ``model.safetensors`` (Apple's names; HF shards when large) into ``path``.

    Args:
        model: the OpenELM to export.
        path: target folder. Files are written to a temporary folder beside it first, then moved in
            with atomic renames; other files already there (a tokenizer, say) are kept. Stale
            weights of an HF sharded save (``model-00001-of-00002.safetensors``..., the index) are
            removed; any other ``model*.safetensors`` is refused, not deleted (mlx_lm would load it).
        vocab_size: embedding rows to keep (default ``config.vocab_size``, the HF vocabulary).
        dtype: stored dtype (default: the model's); e.g. ``torch.bfloat16``, ``"bfloat16"`` or ``"bf16"``.
        max_shard_bytes: above this many bytes of weights, write ``model-0000i-of-0000n.safetensors``
            shards and ``model.safetensors.index.json`` (HF's sharded layout) instead of one
            ``model.safetensors``; ``None``: never shard.

    Returns:
        The folder path.

    Raises:
        UsageError: bad vocab_size/dtype; ``path`` is a file; it holds weights this function
            would have to delete or overwrite that are not an HF sharded save's.
    """
    from safetensors.torch import save_file

    target = Path(path)
    if target.exists() and not target.is_dir():
        raise UsageError(f"{target} exists and is not a folder")
    stale = []
    if target.is_dir():
        for f in (WEIGHTS, "config.json"):
            if (target / f).is_dir():
                raise UsageError(f"{target / f} is a folder; it is in the way of the exported {f}")
        for p in sorted(target.glob("model*.safetensors")):
            if p.name == WEIGHTS:
                stale.append(p)  # replaced below, or removed when this save is sharded
                continue
            if not _SHARD.fullmatch(p.name) or not p.is_file():
                raise UsageError(f"{p} is in the way: mlx_lm loads every model*.safetensors in a folder, and this "
                                 "one is neither model.safetensors nor an HF weight shard", "move it out of the folder")
            stale.append(p)  # mlx_lm would load every model*.safetensors it finds
        if (target / INDEX).is_file():
            stale.append(target / INDEX)

    cfg = model.config
    rows = cfg.vocab_size if vocab_size is None else int(vocab_size)
    if not (max(cfg.bos_token_id, cfg.eos_token_id) < rows <= cfg.padded_vocab_size):
        raise UsageError(f"vocab_size {rows} must lie in ({max(cfg.bos_token_id, cfg.eos_token_id)}, "
                         f"{cfg.padded_vocab_size}]")
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise UsageError(f"unknown dtype {dtype!r}", f"use one of {', '.join(DTYPES)}")
        dtype = DTYPES[dtype]
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

    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        written = _write_weights(tensors, tmp, max_shard_bytes, save_file)
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        written.append("config.json")
        umask = os.umask(0)
        os.umask(umask)
        for f in written:  # safetensors writes 0600: others (users, containers) must read an export
            (tmp / f).chmod(0o666 & ~umask)
        if not target.exists():
            tmp.chmod(0o777 & ~umask)  # mkdtemp makes it owner-only; a new folder gets the usual mode
            os.replace(tmp, target)
        else:
            for f in written:
                os.replace(tmp / f, target / f)
            for p in stale:  # the previous save's weights that this one did not replace
                if p.name not in written:
                    p.unlink(missing_ok=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _write_weights(tensors: dict[str, torch.Tensor], folder: Path, max_shard_bytes: int | None,
                   save_file) -> list[str]:
    """One ``model.safetensors``, or HF shards + index when the weights exceed ``max_shard_bytes``."""
    sizes = {k: t.numel() * t.element_size() for k, t in tensors.items()}
    shards = _shard_plan(sizes, max_shard_bytes)
    if shards is None:
        save_file(tensors, str(folder / WEIGHTS), metadata={"format": "pt"})
        return [WEIGHTS]
    weight_map = {}
    for name, keys in shards.items():
        save_file({k: tensors[k] for k in keys}, str(folder / name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(keys, name))
    index = {"metadata": {"total_size": sum(sizes.values())}, "weight_map": weight_map}
    (folder / INDEX).write_text(json.dumps(index, indent=2) + "\n")
    return [*shards, INDEX]


def _shard_plan(sizes: dict[str, int], max_shard_bytes: int | None) -> dict[str, list[str]] | None:
    """Shard file name -> tensor names, or None when one file holds everything."""
    if max_shard_bytes is None or sum(sizes.values()) <= max_shard_bytes:
        return None
    groups: list[list[str]] = [[]]
    used = 0
    for key, size in sizes.items():  # in state-dict order, so each shard holds whole consecutive layers
        if groups[-1] and used + size > max_shard_bytes:
            groups.append([])
            used = 0
        groups[-1].append(key)
        used += size
    return {f"model-{i:05d}-of-{len(groups):05d}.safetensors": keys for i, keys in enumerate(groups, 1)}


def weight_file_names(model: OpenELM, dtype: torch.dtype | str | None = None,
                      max_shard_bytes: int | None = DEFAULT_MAX_SHARD_BYTES) -> list[str]:
    """The weight files :func:`save_pretrained` will write for ``model`` (without writing them)."""
    dtype = DTYPES.get(dtype, torch.float32) if isinstance(dtype, str) else dtype
    itemsize = torch.empty((), dtype=dtype or model.token_embeddings.weight.dtype).element_size()
    rows = model.config.vocab_size
    sizes = {}
    for name, t in model.state_dict().items():
        n = t.numel() if name not in ("token_embeddings.weight", "lm_head.weight") else rows * t.shape[1]
        sizes[name] = n * itemsize
    shards = _shard_plan(sizes, max_shard_bytes)
    return [WEIGHTS] if shards is None else [*shards, INDEX]


def read_hf_config(folder: str | os.PathLike) -> dict[str, Any]:
    """``folder/config.json`` as a dict: at most 1 MiB of UTF-8, strict finite JSON, an object.

    Raises:
        UsageError: missing, too large, not UTF-8, not JSON, not an object, nested too deeply.
    """
    return read_json_bounded(Path(folder) / "config.json", MAX_CONFIG_JSON_BYTES, what="config.json")


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _multipliers(value: Any, num_layers: int, name: str, source: str = "config.json") -> tuple[float, float]:
    """Config multipliers -> (min, max): a number, [min, max], or the per-layer list."""
    if _is_number(value):
        return float(value), float(value)
    if isinstance(value, list) and value and len(value) in (2, num_layers) and all(_is_number(x) for x in value):
        return float(value[0]), float(value[-1])
    raise UsageError(f"{source}: {name} must be a number, [min, max] or {num_layers} per-layer numbers, "
                     f"got {_short(value)}")


def _int_field(config: dict[str, Any], key: str, source: str) -> int:
    value = config[key]
    if isinstance(value, bool) or not isinstance(value, int):
        raise UsageError(f"{source}: {key} must be an integer, got {_short(value)}")
    return value


def model_config_from_hf(config: dict[str, Any], source: str = "config.json"):
    """Build a ModelConfig from an OpenELM config.json; checks the per-layer lists it states.

    Raises:
        UsageError: not an object, not an OpenELM config, a missing or wrongly typed field.
    """
    from pydantic import ValidationError

    from elmctl.config.schema import ModelConfig

    if not isinstance(config, dict):
        raise UsageError(f"{source}: config.json must be a JSON object {{...}}, not {json_kind(type(config))}")
    if config.get("model_type") != "openelm":
        raise UsageError(f"{source}: model_type is {_short(config.get('model_type'))}, expected 'openelm'")
    try:
        n = _int_field(config, "num_transformer_layers", source)
        vocab = _int_field(config, "vocab_size", source)
        if not (1 <= n <= 256 and 2 <= vocab <= 1 << 24):  # the ModelConfig bounds, checked before use
            raise UsageError(f"{source}: num_transformer_layers {n} or vocab_size {vocab} is out of range "
                             "(1..256 layers, 2..16777216 tokens)")
        default_padded, default_pad = padded_vocab_for(vocab)
        fields = dict(
            num_layers=n,
            model_dim=config["model_dim"],
            head_dim=config["head_dim"],
            num_gqa_groups=config["num_gqa_groups"],
            qkv_multipliers=_multipliers(config.get("qkv_multipliers", [0.5, 1.0]), n, "qkv_multipliers", source),
            ffn_multipliers=_multipliers(config["ffn_multipliers"], n, "ffn_multipliers", source),
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
    # load_pretrained fills the rows past vocab_size with zeros: at most as many as the file's own
    # embedding holds (CoreNet pads 32000 -> 32128), so a one-line edit cannot ask for gigabytes
    if cfg.padded_vocab_size - cfg.vocab_size > max(cfg.vocab_size, 1024):
        raise UsageError(f"{source}: elmctl_padded_vocab_size {cfg.padded_vocab_size} adds more padding rows than "
                         f"vocab_size {cfg.vocab_size} has rows (at most {cfg.vocab_size + max(cfg.vocab_size, 1024)})",
                         "remove elmctl_padded_vocab_size to use the CoreNet padding rule")
    shapes = layer_shapes(cfg)
    derived = {
        "num_query_heads": [s.query_heads for s in shapes],
        "num_kv_heads": [s.kv_heads for s in shapes],
    }
    if isinstance(config["ffn_multipliers"], list) and len(config["ffn_multipliers"]) == n:
        derived["ffn_multipliers"] = [s.ffn_multiplier for s in shapes]
    for key, want in derived.items():
        got = config.get(key)
        if got is not None and not (isinstance(got, list) and all(_is_number(x) for x in got)):
            raise UsageError(f"{source}: {key} must be a list of {n} numbers, got {_short(got)}")
        if got is not None and [float(x) for x in got] != [float(x) for x in want]:
            raise UsageError(
                f"{source}: {key} {got} differs from the layer-wise scaling rule, which gives {want}",
                "elmctl builds layers from (min, max) multipliers; hand-edited per-layer lists are not supported",
            )
    return cfg


def read_safetensors_index(index: Path) -> tuple[dict[str, str], list[str]]:
    """A ``model.safetensors.index.json``: (weight_map, sorted shard file names).

    Read as untrusted input: at most 16 MiB of strict JSON; every shard must be a plain file name
    (no ``/``, ``..`` or absolute path), so an index never makes elmctl read a file outside its folder.

    Raises:
        UsageError: too large, not JSON, no weight_map object, a non-string entry, a path outside.
    """
    data = read_json_bounded(index, MAX_INDEX_JSON_BYTES, what="safetensors index")
    weight_map = data.get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise UsageError(f"{index}: no 'weight_map' object (tensor name -> shard file)",
                         "the index of a sharded checkpoint maps each tensor to a model-*.safetensors file")
    for tensor, shard in weight_map.items():
        if not isinstance(shard, str):
            raise UsageError(f"{index}: weight_map[{_short(tensor)}] must be a file name, got {_short(shard)}")
        if shard in ("", ".", "..") or Path(shard).name != shard or "\\" in shard or not shard.isprintable():
            raise UsageError(f"{index}: weight_map[{_short(tensor)}] names {_short(shard)}, which is not a file in "
                             f"{index.parent}", "shards must sit next to the index (a plain file name); refusing "
                             "to read files elsewhere")
    return weight_map, sorted(set(weight_map.values()))


def _load_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except (SafetensorError, OSError) as exc:
        raise UsageError(f"cannot read {path}: not a safetensors file ({exc})",
                         "re-download or re-export the model; only safetensors weights are read") from None


def _read_tensors(folder: Path) -> dict[str, torch.Tensor]:
    single, index = folder / WEIGHTS, folder / INDEX
    if single.is_file():
        return _load_safetensors(single)
    if index.is_file():
        weight_map, shards = read_safetensors_index(index)
        tensors: dict[str, torch.Tensor] = {}
        for shard in shards:
            if not (folder / shard).is_file():
                raise UsageError(f"{index} names shard {shard}, which is missing")
            tensors.update(_load_safetensors(folder / shard))
        missing = sorted(set(weight_map) - set(tensors))
        if missing:
            raise UsageError(f"{index}: tensors listed but not found in the shards: {missing[:5]}")
        return tensors
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
    cfg = model_config_from_hf(read_hf_config(folder), str(cfg_file))
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
