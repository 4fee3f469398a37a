"""Manifests of prepared data: fingerprints, atomic writes, the "up to date" check.

A prepared folder is complete only when its ``manifest.json`` exists: data files are written as
``*.tmp`` and renamed, and the manifest is written last (tmp + ``os.replace``). A rebuild deletes
the old manifest first, so a folder caught mid-rebuild reads as incomplete, never as stale-but-valid.

The build fingerprint hashes the format version, the tokenizer fingerprint, every option that
changes the output, and each input's sha256. Input hashes are reused from the old manifest when a
file's size and mtime are unchanged, so the no-op check does not re-read large corpora.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from elmctl._files import sha256_file, sha256_json

__all__ = [
    "FORMAT_VERSION",
    "sha256_file",
    "describe_inputs",
    "build_fingerprint",
    "read_manifest",
    "write_json_atomic",
    "is_up_to_date",
    "resolve_data_dir",
]

FORMAT_VERSION = 1


def describe_inputs(paths: list[Path], previous: dict | None = None) -> list[dict[str, Any]]:
    """``[{path, size, mtime_ns, sha256}]`` for the inputs, reusing hashes of unchanged files."""
    known = {}
    for item in (previous or {}).get("inputs", []):
        known[item["path"]] = item
    out = []
    for p in paths:
        st = p.stat()
        key = str(p.resolve())
        old = known.get(key)
        if old and old.get("size") == st.st_size and old.get("mtime_ns") == st.st_mtime_ns:
            digest = old["sha256"]
        else:
            digest = sha256_file(p)
        out.append({"path": key, "size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": digest})
    return out


def build_fingerprint(kind: str, tokenizer_fp: str, options: dict[str, Any], inputs: list[dict]) -> str:
    """Hash of everything that determines the output (not paths or mtimes: only content)."""
    payload = {
        "version": FORMAT_VERSION,
        "kind": kind,
        "tokenizer": tokenizer_fp,
        "options": options,
        "inputs": [i["sha256"] for i in inputs],
    }
    return sha256_json(payload)


def read_manifest(folder: Path) -> dict | None:
    """The folder's manifest, or None when absent or unreadable (treated as incomplete)."""
    path = folder / "manifest.json"
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def write_json_atomic(path: Path, data: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        json.dump(data, f, indent=2)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def is_up_to_date(folder: Path, manifest: dict | None, fingerprint: str) -> bool:
    """True when the manifest matches the fingerprint and every listed file has its recorded size."""
    if not manifest or manifest.get("fingerprint") != fingerprint:
        return False
    for f in manifest.get("files", []):
        p = folder / f["name"]
        if not p.is_file() or p.stat().st_size != f["bytes"]:
            return False
    return True


def resolve_data_dir(path: str | os.PathLike, kind: str) -> Path:
    """The folder holding a prepared ``kind`` dataset: ``path`` itself or its ``kind/`` subfolder.

    Raises:
        UsageError: neither holds a complete ``manifest.json`` of that kind.
    """
    from elmctl.errors import UsageError

    if kind not in ("pretrain", "preference", "sft"):
        raise UsageError(f"unknown data kind {kind!r}", "use pretrain, preference or sft")
    root = Path(path).expanduser()
    if not root.exists():
        raise UsageError(f"data folder not found: {root}", "prepare it with `elmctl data prepare` or `elmctl data demo`")
    for folder in (root, root / kind):
        m = read_manifest(folder)
        if m is not None and m.get("kind") == kind:
            return folder
    found = read_manifest(root)
    what = f"holds {found.get('kind')!r} data" if found else "has no complete manifest.json (unfinished prepare?)"
    raise UsageError(
        f"{root}: no prepared {kind} data ({root.name} {what}, and {kind}/ has none either)",
        f"run `elmctl data prepare --kind {kind} ... --out {root}` (or `elmctl data demo --out {root}`)",
    )
