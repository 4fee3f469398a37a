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

A write that fails removes what it made (``.tmp`` folder, an un-pointed folder) before raising, so
the space goes back to the run and its store; a full disk (ENOSPC/EDQUOT, also when torch's
serializer or safetensors hide it) is :class:`DiskFull`: "disk full writing ckpt-8 ...; ckpt-6 is
the resume point". A manifest must be a JSON object with an integer ``step`` (matching the folder
name), a ``files`` mapping of plain file names to sha256 that lists every file in
``REQUIRED_FILES``; any other shape is :class:`CheckpointCorrupt`, like garbage, and
:func:`find_resumable` falls back to the previous checkpoint. A ``.pt`` that holds anything but
plain data is refused with one message (never torch's advice to load it with ``weights_only=False``).
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from elmctl._files import sha256_file, sha256_json
from elmctl.errors import RuntimeFailure

__all__ = [
    "CheckpointInfo",
    "CheckpointCorrupt",
    "DiskFull",
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
#: the files every checkpoint holds; a manifest must list (and so checksum) each of them
REQUIRED_FILES = ("model.safetensors", "optimizer.pt", "state.pt")
_HEX_SHA256 = re.compile(r"[0-9a-f]{64}")


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


def _open_for_write(path: Path):
    """The file a ``.pt`` is written through (a seam for tests that simulate a full disk)."""
    return open(path, "wb")


class _RecordingWriter:
    """A file wrapper that remembers the OSError of a failed write.

    torch's serializer turns a failed write (ENOSPC, EDQUOT) into "unexpected pos N vs M" and drops
    the errno; writing through Python keeps it, so a full disk can be named as such.
    """

    def __init__(self, f) -> None:
        self._f = f
        self.error: OSError | None = None

    def write(self, data) -> int:
        try:
            return self._f.write(data)
        except OSError as exc:
            self.error = self.error or exc
            raise

    def flush(self) -> None:
        try:
            self._f.flush()
        except OSError as exc:
            self.error = self.error or exc
            raise


def _write_pt(path: Path, obj: Any) -> None:
    with _open_for_write(path) as f:
        out = _RecordingWriter(f)
        try:
            torch.save(obj, out)
        except RuntimeError as exc:
            if out.error is not None:
                raise out.error from exc
            raise


class DiskFull(RuntimeFailure):
    """The disk (or quota) ran out while a checkpoint was written; the partial one was removed."""


_FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})
# safetensors (Rust) reports the OS error only in its message
_FULL_TEXT = re.compile(r"No space left on device|Disk quota exceeded|os error (%d|%d)\b" % (errno.ENOSPC, errno.EDQUOT))


def _is_disk_full(exc: BaseException) -> bool:
    seen = 0
    e: BaseException | None = exc
    while e is not None and seen < 8:
        if isinstance(e, OSError) and e.errno in _FULL_ERRNOS:
            return True
        if not isinstance(e, OSError) and _FULL_TEXT.search(str(e)):
            return True
        e, seen = e.__cause__ or e.__context__, seen + 1
    return False


def _size_mb(folder: Path) -> float:
    try:
        return sum(f.stat().st_size for f in folder.iterdir() if f.is_file()) / 1e6
    except OSError:
        return 0.0


def _disk_full(root: Path, name: str, exc: BaseException) -> DiskFull:
    """The message for a checkpoint write that ran out of space (called after the cleanup)."""
    try:
        free = f"{shutil.disk_usage(root).free / 1e6:.0f} MB free"
    except OSError:
        free = "free space unknown"
    head = _latest_name(root)
    if head and (root / head).is_dir():
        resume = f"{head} is the resume point"
        need = _size_mb(root / head)
        size = f" (a checkpoint of this run takes about {need:.0f} MB)" if need else ""
    else:
        resume, size = "no earlier checkpoint: a resume starts from step 0", ""
    quota = isinstance(exc, OSError) and exc.errno == errno.EDQUOT or "quota" in str(exc).lower()
    what = "disk quota exceeded" if quota else "disk full"
    return DiskFull(f"{what} writing {name} in {root} ({free}); {resume}",
                    hint=f"free space on that disk{size}, then resume the run; the partial {name} was removed")


def _latest_name(root: Path) -> str | None:
    try:
        return (root / LATEST).read_text().strip() or None
    except OSError:
        return None


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
    name = f"ckpt-{step}"
    tmp = root / f"{name}.tmp"
    final_dir = root / name
    for p in (final_dir, tmp):  # replaced below: only when it is a checkpoint folder of ours
        if (p.exists() or p.is_symlink()) and not _is_own_folder(p):
            raise RuntimeFailure(f"{p} exists and is not an elmctl checkpoint folder; elmctl will not replace it",
                                 hint=f"move it out of {root}, then resume the run")
    try:
        root.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
        aliases = _write_model(tmp / "model.safetensors", model_state)
        _write_pt(tmp / "optimizer.pt", optimizer_state)
        _write_pt(tmp / "state.pt", train_state)
        files = {}
        for f in REQUIRED_FILES:
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
        if final_dir.exists():
            # Left over from a run that crashed after the rename but before `latest` moved: `latest`
            # still names an older checkpoint, so this folder is not anyone's resume point.
            shutil.rmtree(final_dir)
        os.replace(tmp, final_dir)
        _fsync_dir(root)
        _point_latest(root, name)
    except BaseException as exc:
        # A failed write leaves nothing half-made: the partial folder would only hold the space
        # the run (and the store, often on the same disk) needs to record why it stopped.
        shutil.rmtree(tmp, ignore_errors=True)
        if _latest_name(root) != name:
            shutil.rmtree(final_dir, ignore_errors=True)
        try:
            (root / f"{LATEST}.tmp").unlink()
        except OSError:
            pass
        if isinstance(exc, Exception) and _is_disk_full(exc):
            raise _disk_full(root, name, exc) from exc
        raise
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
    """The manifest as a JSON object; None if missing, unreadable or not an object."""
    try:
        manifest = json.loads((path / MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    return manifest if isinstance(manifest, dict) else None


def _manifest_problem(path: Path, manifest: dict[str, Any]) -> str | None:
    """Why a manifest (a JSON object) cannot describe checkpoint ``path``; None if its shape is right.

    Valid JSON of the wrong shape is as corrupt as garbage: checking it here keeps every reader
    (resume, tune base, generate) from failing later on a KeyError or on an unverified file.
    """
    step = manifest.get("step")
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        return f"{MANIFEST} has no valid step (found {step!r})"
    m = re.fullmatch(r"ckpt-(\d+)", path.name)
    if m and int(m.group(1)) != step:
        return f"{MANIFEST} says step {step}, but the folder is {path.name}"
    files = manifest.get("files")
    if not isinstance(files, dict):
        return f"{MANIFEST} 'files' is not a mapping of file name to sha256"
    for fname, digest in files.items():
        if fname in ("", ".", "..") or Path(fname).name != fname:
            return f"{MANIFEST} lists {fname!r}, which is not a file of the checkpoint folder"
        if not isinstance(digest, str) or not _HEX_SHA256.fullmatch(digest):
            return f"{MANIFEST} has no valid sha256 for {fname}"
    missing = [f for f in REQUIRED_FILES if f not in files]
    if missing:
        return f"{MANIFEST} does not list {', '.join(missing)} (every checkpoint file must be checksummed)"
    if not isinstance(manifest.get("sha256"), str):
        return f"{MANIFEST} has no overall sha256"
    return None


_CKPT_NAME = re.compile(r"ckpt-(0|[1-9][0-9]*)")
# Everything a checkpoint folder of ours can hold (a crash can leave a subset).
_OWN_FILES = frozenset({*REQUIRED_FILES, MANIFEST})


def list_checkpoints(run_dir: str | os.PathLike) -> list[tuple[int, Path]]:
    """Checkpoint folders (``ckpt-<step>``, no ``.tmp``, no links, only checkpoint files in them), oldest first.

    A folder elmctl did not write (``ckpt-0007``, ``ckpt-1_000``, a link, one holding other files)
    is not a checkpoint: never resumed from, never deleted by retention.
    """
    root = checkpoint_dir(run_dir)
    found = []
    if root.is_dir():
        for p in root.iterdir():
            m = _CKPT_NAME.fullmatch(p.name)
            if m and _is_own_folder(p):
                found.append((int(m.group(1)), p))
    return sorted(found)


def _is_own_folder(p: Path) -> bool:
    """A real folder (not a link) holding nothing but checkpoint files: one elmctl may replace or delete."""
    try:
        return p.is_dir() and not p.is_symlink() and all(c.name in _OWN_FILES and c.is_file() and not c.is_symlink()
                                                         for c in p.iterdir())
    except OSError:
        return False


def _retain(root: Path, keep: int, protect: str) -> None:
    ckpts = list_checkpoints(root.parent)
    recent = {p.name for _, p in ckpts[-keep:]}
    for _, p in ckpts:
        if p.name in recent or p.name == protect:
            continue
        m = _read_manifest(p)
        if m is not None and m.get("final") is True:
            continue
        shutil.rmtree(p, ignore_errors=True)


def verify_checkpoint(path: str | os.PathLike, expected_sha256: str | None = None) -> CheckpointInfo:
    """Check every file against the manifest. Raises :class:`CheckpointCorrupt` with the reason."""
    path = Path(path)
    manifest = _read_manifest(path)
    if manifest is None:
        raise CheckpointCorrupt(f"checkpoint {path} has no readable {MANIFEST}")
    problem = _manifest_problem(path, manifest)
    if problem:
        raise CheckpointCorrupt(f"checkpoint {path}: {problem}")
    files = manifest["files"]
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
    return CheckpointInfo(manifest["step"], path, digest, files, manifest.get("final") is True, meta)


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
    from safetensors import SafetensorError, safe_open
    from safetensors.torch import load_file

    model_path = str(info.path / "model.safetensors")
    try:
        model_state = load_file(model_path)
        with safe_open(model_path, "pt") as f:
            aliases = json.loads((f.metadata() or {}).get("aliases", "{}"))
        for alias, target in aliases.items():
            model_state[alias] = model_state[target]
    except (SafetensorError, OSError, ValueError, KeyError, AttributeError) as exc:
        raise CheckpointCorrupt(f"checkpoint {info.path}: model.safetensors is not a readable safetensors file "
                                f"({_first_line(exc)})", hint=_FOREIGN_HINT) from exc
    optim_state = _load_plain(info.path, "optimizer.pt")
    train_state = _load_plain(info.path, "state.pt")
    plain_state = isinstance(train_state, dict) and isinstance(train_state.get("step"), int) \
        and isinstance(train_state.get("data"), dict)
    if not isinstance(optim_state, dict) or not plain_state:
        raise CheckpointCorrupt(f"checkpoint {info.path}: optimizer.pt/state.pt do not hold an optimizer state and a "
                                "training state (step, data position)", hint=_FOREIGN_HINT)
    return model_state, optim_state, train_state


_FOREIGN_HINT = "use a checkpoint written by elmctl (its files hold plain tensors and numbers only)"


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:300] if text else type(exc).__name__


def _load_plain(folder: Path, fname: str) -> Any:
    """``torch.load(weights_only=True)`` with one clear refusal for anything but plain data.

    torch's own message for a refused pickle suggests ``weights_only=False`` (running the file's
    code); elmctl never does that, so the message names the offending global instead.
    """
    import pickle

    try:
        with warnings.catch_warnings():  # torch warns about the pickle protocol of foreign files
            warnings.simplefilter("ignore")
            return torch.load(folder / fname, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        found = re.search(r"GLOBAL ([\w.]+)", str(exc))
        what = f" (it pickles {found.group(1)})" if found else ""
        raise CheckpointCorrupt(
            f"checkpoint {folder}: {fname} is not a plain-tensor file{what}; elmctl loads only tensors, numbers, "
            "strings and lists/dicts of them, and never runs code from a checkpoint",
            hint=_FOREIGN_HINT) from None
    except (RuntimeError, EOFError, OSError, ValueError) as exc:
        reason = _first_line(exc)
        reason = "" if "weights_only" in reason else f" ({reason})"
        raise CheckpointCorrupt(f"checkpoint {folder}: {fname} is not a readable torch file{reason}",
                                hint=_FOREIGN_HINT) from None


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
