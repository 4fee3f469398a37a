"""A tune run's inputs: the base weights and the preference data, resolved and checked.

Part of the tune job (:mod:`elmctl.train.tune`). ``elmctl tune`` and ``elmctl tune-sweep`` call these before a run
(or any trial) exists, so a wrong ``--base`` or ``--data`` fails at once with a hint;
:func:`elmctl.train.tune.run.run_tune` then loads the weights with :func:`load_base_weights`.

- Base: a pretrain run id/name (its newest verified checkpoint), a run folder, a checkpoint folder,
  or an Apple HF folder (:func:`resolve_base`); its architecture must be the recipe's
  (:func:`check_base`).
- Data: a prepared preference folder with training and held-out (``test``) pairs, tokenised with
  a vocabulary the recipe covers (:func:`check_preference_data`).
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import torch

from elmctl.errors import UsageError
from elmctl.train.weights import ModelSource, resolve_source

__all__ = ["Base", "resolve_base", "check_base", "load_base_weights", "check_preference_data"]


#: the base of a tune run: a :class:`~elmctl.train.weights.ModelSource` (kind "checkpoint" or "hf")
Base = ModelSource


def resolve_base(spec: str, store=None) -> ModelSource:
    """``--base``: a pretrain run id/name (its newest verified checkpoint), a run folder, a
    checkpoint folder (``ckpt-N``), or an Apple HF folder (config.json + safetensors); see
    :func:`elmctl.train.weights.resolve_source`, whose errors here start with ``--base SPEC:``.

    A checkpoint is verified there (every file against its manifest), so a corrupted base is an
    input error before any run is recorded, not a failed run. The path is made absolute (the run
    records it in its options).

    Raises:
        UsageError: nothing usable at ``spec`` (missing, no checkpoint, or only corrupted ones).
    """
    src = resolve_source(spec, store=store, prefix=f"--base {spec}: ")
    return replace(src, path=Path(src.path).resolve())


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
        from elmctl.model.hf import model_config_from_hf, read_hf_config

        cfg = model_config_from_hf(read_hf_config(base.path), base.path)
        if _arch(cfg) != _arch(recipe.model):
            diff = [f"{n}: base {a} vs recipe {b}" for n, a, b in zip(
                ("num_layers", "model_dim", "head_dim", "num_gqa_groups", "vocab_size", "normalize_qk_projections",
                 "share_input_output_layers", "rope_freq_constant", "layer shapes"), _arch(cfg), _arch(recipe.model)) if a != b]
            raise UsageError(f"--base {base.label} does not match recipe {recipe.id}: " + "; ".join(diff[:4]), hint)
        with torch.device("meta"):
            expected_names = set(OpenELM(cfg).state_dict())
        names = _hf_tensor_names(Path(base.path), base.label)
        missing, unexpected = sorted(expected_names - names), sorted(names - expected_names)
        if missing or unexpected:
            raise UsageError(f"--base {base.label}: its weights do not match its config.json ("
                             + "; ".join(([f"missing {missing[:4]}"] if missing else [])
                                         + ([f"unexpected {unexpected[:4]}"] if unexpected else [])) + ")",
                             "point at a folder written by `elmctl export` or downloaded from apple/OpenELM-*")
        return
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(Path(base.path) / "model.safetensors"), "pt") as f:
            stored = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
            aliases = json.loads((f.metadata() or {}).get("aliases", "{}"))
    except (SafetensorError, OSError, ValueError) as exc:
        raise UsageError(f"--base {base.label}: cannot read its weights ({exc})", "give another --base") from None
    stored.update({a: stored[t] for a, t in aliases.items() if t in stored})
    with torch.device("meta"):
        expected = {k: tuple(v.shape) for k, v in OpenELM(recipe.model).state_dict().items()}
    diff = [f"{k}: base {stored.get(k)} vs recipe {v}" for k, v in expected.items() if stored.get(k) != v]
    diff += [f"{k}: not in recipe {recipe.id}" for k in stored if k not in expected]
    if diff:
        raise UsageError(f"--base {base.label} does not match recipe {recipe.id} "
                         f"({len(diff)} tensors differ, e.g. {'; '.join(diff[:3])})", hint)


def _hf_tensor_names(folder: Path, label: str) -> set[str]:
    """Tensor names (``transformer.`` prefix dropped) in an HF folder's weights, from the safetensors
    headers only: missing or unreadable weight files are found before a run starts, without reading them.
    """
    from safetensors import SafetensorError, safe_open

    from elmctl.model.hf import INDEX, PREFIX, WEIGHTS

    hint = "point at a folder written by `elmctl export` or downloaded from apple/OpenELM-*"
    single, index = folder / WEIGHTS, folder / INDEX
    try:
        if single.is_file():
            files = [single]
        elif index.is_file():
            weight_map = json.loads(index.read_text()).get("weight_map")
            if not isinstance(weight_map, dict):
                raise UsageError(f"--base {label}: {index} has no 'weight_map' object", hint)
            files = [folder / str(s) for s in sorted(set(map(str, weight_map.values())))]
            absent = [f.name for f in files if not f.is_file()]
            if absent:
                raise UsageError(f"--base {label}: {index.name} names shard(s) {absent[:3]}, which are missing", hint)
        else:
            raise UsageError(f"--base {label}: {folder} holds neither {WEIGHTS} nor {INDEX}", hint)
        names: set[str] = set()
        for f in files:
            with safe_open(str(f), "pt") as h:
                names.update(h.keys())
    except (SafetensorError, OSError, ValueError) as exc:
        raise UsageError(f"--base {label}: cannot read the weights in {folder}: {exc}", hint) from None
    return {k[len(PREFIX):] if k.startswith(PREFIX) else k for k in names}


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
