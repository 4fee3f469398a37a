"""Atomic, verified training checkpoints.

Layout inside a run folder::

    checkpoints/
      ckpt-200/            model.safetensors  optimizer.pt  state.pt  manifest.json
      ckpt-300/
      latest               one line: "ckpt-300" (replaced via temp file + rename)

A checkpoint is written to ``ckpt-<step>.tmp``, every file fsync'd, its sha256 recorded in
``manifest.json``, the folder renamed to ``ckpt-<step>``, and only then ``latest`` is moved. A crash
at any point leaves ``latest`` on the previous complete checkpoint. ``.pt`` files hold plain
tensors/dicts/lists/numbers/strings only, so they load with ``torch.load(weights_only=True)``.
Retention keeps the newest ``keep`` checkpoints plus every one marked final; never the one
``latest`` names.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from elmctl._files import sha256_file, sha256_json
from elmctl.errors import RuntimeFailure

__all__ = [
    "CheckpointInfo",
    "CheckpointCorrupt",
    "save_checkpoint",
    "verify_checkpoint",
    "find_resumable",
    "load_checkpoint_files",
    "restore_training_state",
    "list_checkpoints",
    "checkpoint_dir",
]

MANIFEST = "manifest.json"
LATEST = "latest"
FORMAT_VERSION = 1


class CheckpointCorrupt(RuntimeFailure):
    """A checkpoint whose files do not match its manifest (or that has no manifest)."""


@dataclass(frozen=True)
class CheckpointInfo:
    step: int
    path: Path
    sha256: str  # digest over the manifest's (file, sha256) list
    files: dict[str, str] = field(default_factory=dict)
    final: bool = False
    meta: dict[str, Any] = field(default_factory=dict)


def checkpoint_dir(run_dir: str | os.PathLike) -> Path:
    return Path(run_dir) / "checkpoints"


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _digest(files: dict[str, str]) -> str:
    return sha256_json(sorted(files.items()))


def _dedupe_tied(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """safetensors refuses shared storage: keep the first name of each tied tensor, record aliases."""
    out: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    seen: dict[tuple, str] = {}
    for name, t in state.items():
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.dtype)
        if t.numel() and key in seen:
            aliases[name] = seen[key]
            continue
        seen[key] = name
        out[name] = t.detach().contiguous()
    return out, aliases


def _write_model(path: Path, state: dict[str, torch.Tensor]) -> dict[str, str]:
    from safetensors.torch import save_file

    tensors, aliases = _dedupe_tied(state)
    save_file({k: v.cpu() for k, v in tensors.items()}, str(path), metadata={"aliases": json.dumps(aliases)})
    return aliases


def _write_pt(path: Path, obj: Any) -> None:
    torch.save(obj, path)


def save_checkpoint(
    run_dir: str | os.PathLike,
    step: int,
    *,
    model_state: dict[str, torch.Tensor],
    optimizer_state: dict[str, Any],
    train_state: dict[str, Any],
    keep: int,
    final: bool = False,
    meta: dict[str, Any] | None = None,
) -> CheckpointInfo:
    """Write ``ckpt-<step>`` atomically, move ``latest`` to it, then apply retention.

    Args:
        run_dir: the run folder; checkpoints go to ``run_dir/checkpoints``.
        step: optimizer steps completed (the data position).
        model_state: full (unsharded) model state dict.
        optimizer_state: optimizer state dict (plain tensors/numbers only).
        train_state: step, schedule, data position, RNG states, topology (plain types only).
        keep: how many recent checkpoints to keep (final ones are always kept).
        final: mark this checkpoint as the run's final one.
        meta: extra manifest fields (world size, global batch, recipe id...).

    Returns:
        The written checkpoint's info (path, per-file sha256, overall digest).
    """
    root = checkpoint_dir(run_dir)
    root.mkdir(parents=True, exist_ok=True)
    name = f"ckpt-{step}"
    tmp = root / f"{name}.tmp"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    aliases = _write_model(tmp / "model.safetensors", model_state)
    _write_pt(tmp / "optimizer.pt", optimizer_state)
    _write_pt(tmp / "state.pt", train_state)
    files = {}
    for f in ("model.safetensors", "optimizer.pt", "state.pt"):
        _fsync_file(tmp / f)
        files[f] = sha256_file(tmp / f)
    manifest = {
        "format": FORMAT_VERSION,
        "step": step,
        "final": final,
        "time": time.time(),
        "files": files,
        "sha256": _digest(files),
        "tied": aliases,
        **(meta or {}),
    }
    (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2))
    _fsync_file(tmp / MANIFEST)
    _fsync_dir(tmp)
    final_dir = root / name
    if final_dir.exists():
        # Left over from a run that crashed after the rename but before `latest` moved: `latest`
        # still names an older checkpoint, so this folder is not anyone's resume point.
        shutil.rmtree(final_dir)
    os.replace(tmp, final_dir)
    _fsync_dir(root)
    _point_latest(root, name)
    _retain(root, keep, protect=name)
    return CheckpointInfo(step, final_dir, manifest["sha256"], files, final, meta or {})


def _point_latest(root: Path, name: str) -> None:
    tmp = root / f"{LATEST}.tmp"
    with open(tmp, "w") as f:
        f.write(name + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, root / LATEST)
    _fsync_dir(root)


def _read_manifest(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads((path / MANIFEST).read_text())
    except (OSError, ValueError):
        return None


def list_checkpoints(run_dir: str | os.PathLike) -> list[tuple[int, Path]]:
    """Complete checkpoint folders (no ``.tmp``), oldest first."""
    root = checkpoint_dir(run_dir)
    found = []
    if root.is_dir():
        for p in root.iterdir():
            if p.is_dir() and p.name.startswith("ckpt-") and not p.name.endswith(".tmp"):
                try:
                    found.append((int(p.name.split("-", 1)[1]), p))
                except ValueError:
                    continue
    return sorted(found)


def _retain(root: Path, keep: int, protect: str) -> None:
    ckpts = list_checkpoints(root.parent)
    recent = {p.name for _, p in ckpts[-keep:]}
    for _, p in ckpts:
        if p.name in recent or p.name == protect:
            continue
        m = _read_manifest(p)
        if m and m.get("final"):
            continue
        shutil.rmtree(p, ignore_errors=True)


def verify_checkpoint(path: str | os.PathLike, expected_sha256: str | None = None) -> CheckpointInfo:
    """Check every file against the manifest. Raises :class:`CheckpointCorrupt` with the reason."""
    path = Path(path)
    manifest = _read_manifest(path)
    if manifest is None:
        raise CheckpointCorrupt(f"checkpoint {path} has no readable {MANIFEST}")
    files = manifest.get("files", {})
    for fname, digest in files.items():
        fpath = path / fname
        if not fpath.is_file():
            raise CheckpointCorrupt(f"checkpoint {path} is missing {fname}")
        if sha256_file(fpath) != digest:
            raise CheckpointCorrupt(f"checkpoint {path}: sha256 of {fname} does not match its manifest (corrupted)")
    digest = _digest(files)
    if digest != manifest.get("sha256") or (expected_sha256 and digest != expected_sha256):
        raise CheckpointCorrupt(f"checkpoint {path}: manifest checksum does not match the recorded one")
    meta = {k: v for k, v in manifest.items() if k not in ("files", "sha256", "step", "final")}
    return CheckpointInfo(int(manifest["step"]), path, digest, files, bool(manifest.get("final")), meta)


def find_resumable(
    run_dir: str | os.PathLike, expected: dict[int, str] | None = None
) -> tuple[CheckpointInfo | None, list[str]]:
    """The newest verified checkpoint, starting from ``latest``, falling back to older ones.

    Args:
        run_dir: the run folder.
        expected: step -> sha256 recorded in the store, checked when present.

    Returns:
        (info or None if the run has no checkpoint, warnings to show the user). Raises
        :class:`CheckpointCorrupt` if checkpoints exist but none verifies.
    """
    root = checkpoint_dir(run_dir)
    warnings: list[str] = []
    candidates = [p for _, p in reversed(list_checkpoints(run_dir))]
    latest = root / LATEST
    if latest.is_file():
        name = latest.read_text().strip()
        head = root / name
        if head in candidates:
            candidates.remove(head)
            candidates.insert(0, head)
        else:
            warnings.append(f"`latest` names {name}, which does not exist")
    errors = []
    for path in candidates:
        try:
            step = int(path.name.split("-", 1)[1])
            info = verify_checkpoint(path, (expected or {}).get(step))
        except CheckpointCorrupt as exc:
            errors.append(exc.message)
            warnings.append(f"{exc.message}; trying an older checkpoint")
            continue
        if errors:
            warnings.append(f"resuming from {info.path.name} (step {info.step}) instead")
        return info, warnings
    if errors:
        raise CheckpointCorrupt(
            "no usable checkpoint:\n  " + "\n  ".join(errors),
            hint="the run cannot be resumed; start a new run (the corrupted files are left in place)",
        )
    return None, warnings


def load_checkpoint_files(info: CheckpointInfo) -> tuple[dict[str, torch.Tensor], dict, dict]:
    """(model_state with tied names restored, optimizer_state, train_state), loaded on CPU."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    model_path = str(info.path / "model.safetensors")
    model_state = load_file(model_path)
    with safe_open(model_path, "pt") as f:
        aliases = json.loads((f.metadata() or {}).get("aliases", "{}"))
    for alias, target in aliases.items():
        model_state[alias] = model_state[target]
    optim_state = torch.load(info.path / "optimizer.pt", map_location="cpu", weights_only=True)
    train_state = torch.load(info.path / "state.pt", map_location="cpu", weights_only=True)
    return model_state, optim_state, train_state


def restore_training_state(info: CheckpointInfo, runner, optimizer, batches, rank: int) -> int:
    """Load a checkpoint into the model (DDP/FSDP runner), AdamW, the data position and this
    rank's RNG; returns the step it was taken at. Shared by pre-training and tuning resumes."""
    from elmctl.train import dist as D

    model_state, optim_state, train_state = load_checkpoint_files(info)
    D.load_model_state(runner, model_state)
    D.load_optimizer_state(runner, optimizer, optim_state)
    batches.load_state_dict(train_state["data"])
    rngs = train_state.get("rng")
    if rngs:
        D.set_rng_state(rngs[rank % len(rngs)])
    return int(train_state["step"])
