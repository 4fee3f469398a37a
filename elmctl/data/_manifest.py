"""Manifests of prepared data: fingerprints, atomic writes, the "up to date" check.

A prepared folder is complete only when its ``manifest.json`` exists: data files are written as
``*.tmp`` and renamed, and the manifest is written last (tmp + ``os.replace``). A rebuild deletes
the old manifest first, so a folder caught mid-rebuild reads as incomplete, never as stale-but-valid.

Ownership (:class:`OutputFolder`): ``--out`` may hold the user's own files, so elmctl deletes or
replaces only names its own records list: the previous ``manifest.json``, or, while a build runs
(and after a crash), ``manifest.partial.json``, a journal of every name the build may create,
written before the name is. A non-empty folder with neither is refused unless ``force``; even then
its files are left alone, and a foreign file named like an output (``train-00000.bin``, a
``manifest.json`` that is not ours) is always refused, never overwritten.

The build fingerprint hashes the format version, the tokenizer fingerprint, every option that
changes the output, and each input's sha256. Input hashes are reused from the old manifest when a
file's size and mtime are unchanged, so the no-op check does not re-read large corpora.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any, Sequence

from elmctl._files import MAX_MANIFEST_BYTES, UnreadableFile, read_json_bounded, sha256_file, sha256_json

__all__ = [
    "FORMAT_VERSION",
    "sha256_file",
    "describe_inputs",
    "build_fingerprint",
    "read_manifest",
    "load_manifest",
    "write_json_atomic",
    "is_up_to_date",
    "resolve_data_dir",
    "check_out_dir",
    "is_elmctl_manifest",
    "OutputFolder",
]

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
JOURNAL = "manifest.partial.json"
KINDS = ("pretrain", "preference", "sft")
# every name a prepare of any kind writes (the only names a manifest or journal can hand over for deletion)
_DATA_NAME = re.compile(r"^(?:(?:train|val|test)-(?:\d{5}\.bin|index\.npy)|manifest\.json|manifest\.partial\.json)(?:\.tmp)?$")


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
    """The folder's manifest, or None when absent, unreadable or malformed (treated as incomplete)."""
    from elmctl.errors import UsageError

    try:
        return load_manifest(folder)
    except UsageError:
        return None


def load_manifest(folder: Path) -> dict | None:
    """The folder's manifest; None when there is none.

    A manifest is read as untrusted input: at most 64 MiB of strict JSON, and every field a reader
    uses has its type checked here (file names must be plain names inside the folder), so no
    reader meets a KeyError, a list where a dict belongs, or a ``../`` path.

    Raises:
        UsageError: ``manifest.json`` is there but unreadable or malformed, naming the first problem.
    """
    path = folder / MANIFEST
    if not path.is_file():
        return None
    data = read_json_bounded(path, MAX_MANIFEST_BYTES, what="data manifest")
    problem = _manifest_problem(data)
    if problem:
        raise UnreadableFile(path, f"not a valid data manifest: {problem}",
                             "prepare the data again into a new folder (`elmctl data prepare ... --out NEW`)")
    return data


def _count(x: Any) -> bool:
    return type(x) is int and 0 <= x < 1 << 63


def _plain_name(x: Any) -> bool:
    return isinstance(x, str) and x not in ("", ".", "..") and Path(x).name == x and "\\" not in x and x.isprintable()


def _file_entry(f: Any) -> bool:
    return (isinstance(f, dict) and _plain_name(f.get("name")) and isinstance(f.get("split"), str)
            and _count(f.get("bytes")) and all(_count(f[k]) for k in ("tokens", "pairs") if k in f))


def _input_entry(i: Any) -> bool:
    return (isinstance(i, dict) and isinstance(i.get("path"), str) and _count(i.get("size"))
            and type(i.get("mtime_ns")) is int and isinstance(i.get("sha256"), str))


def _counts(x: Any) -> bool:
    return isinstance(x, dict) and all(isinstance(v, dict) and all(_count(n) for n in v.values()) for v in x.values())


# key -> (check of the value, or of each entry for a list, what it must be); every key a reader uses
_MANIFEST_FIELDS: dict[str, tuple[Any, str]] = {
    "kind": (lambda x: x in KINDS, f"one of {', '.join(KINDS)}"),
    "fingerprint": (lambda x: isinstance(x, str), "a string"),
    "tokenizer": (lambda x: isinstance(x, str), "a string"),
    "vocab_size": (lambda x: _count(x) and x > 0, "a positive integer"),
    "dtype": (lambda x: x in ("uint16", "uint32"), "uint16 or uint32"),
    "eos_id": (_count, "a token id"),
    "bos_id": (lambda x: x is None or _count(x), "a token id or null"),
    "splits": (_counts, "{split: {name: count}}"),
    "files": (_file_entry, "a list of {name: a file name in the folder, split, bytes, tokens or pairs}"),
    "inputs": (_input_entry, "a list of {path, size, mtime_ns, sha256}"),
}
_LISTS = {"files", "inputs"}
_OPTIONAL = {"bos_id", "inputs"}


def _manifest_problem(m: Any) -> str | None:
    """The first field of a manifest that is missing or mistyped, or None."""
    import reprlib

    for key, (ok, want) in _MANIFEST_FIELDS.items():
        if key not in m:
            if key not in _OPTIONAL:
                return f"no {key!r} field"
            continue
        value = m[key]
        if key in _LISTS and isinstance(value, list):
            bad = next((i for i, entry in enumerate(value) if not ok(entry)), None)
            if bad is not None:
                return f"{key!r} must be {want}; entry {bad} is {reprlib.repr(value[bad])}"
        elif key in _LISTS or not ok(value):
            return f"{key!r} must be {want}, got {reprlib.repr(value)}"
    if m["kind"] == "pretrain":  # shards are memory-mapped with the token count: it must match the bytes
        width = 2 if m["dtype"] == "uint16" else 4
        for f in m["files"]:
            if f.get("tokens") is None or f["tokens"] * width != f["bytes"]:
                return f"shard {f['name']!r}: {f.get('tokens')} {m['dtype']} tokens do not fill its {f['bytes']} bytes"
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
    for folder in (root, root / kind):
        load_manifest(folder)  # one that is there but malformed: say what is wrong with it
    found = read_manifest(root)
    what = f"holds {found.get('kind')!r} data" if found else "has no complete manifest.json (unfinished prepare?)"
    raise UsageError(
        f"{root}: no prepared {kind} data ({root.name} {what}, and {kind}/ has none either)",
        f"run `elmctl data prepare --kind {kind} ... --out {root}` (or `elmctl data demo --out {root}`)",
    )


def check_out_dir(out: Path) -> None:
    """Refuse an ``--out`` that exists but is not a folder (a file, a dangling link).

    Raises:
        UsageError: naming the path.
    """
    from elmctl.errors import UsageError

    if out.is_symlink() and not out.exists():
        raise UsageError(f"--out {out} is a link to nothing ({os.readlink(out)})", "pass a folder (it is created if missing)")
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} exists and is not a folder", "pass a folder (it is created if missing)")


def is_elmctl_manifest(data: Any) -> bool:
    """True for a manifest ``data prepare`` (or ``data demo``) wrote, not some other ``manifest.json``."""
    return (
        isinstance(data, dict)
        and data.get("kind") in KINDS
        and isinstance(data.get("fingerprint"), str)
        and isinstance(data.get("files"), list)
    )


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _regular_file(path: Path) -> bool:
    return path.is_file() and not path.is_symlink()


class OutputFolder:
    """The ``--out`` folder of one prepare run: claims it, journals what it creates, deletes only its own.

    Use: ``folder = OutputFolder.claim(out, kind, splits, force=...)`` (checks the folder, writes the
    journal, removes the previous build's files); ``folder.add(name)`` before creating each file;
    ``folder.commit(manifest)`` at the end, or ``folder.release()`` when the build fails.

    Raises (from :meth:`claim`):
        UsageError: ``out`` is not a folder; it holds files named like outputs that elmctl did not
            write (even with ``force``); it is not empty and has no elmctl manifest (unless
            ``force``); it holds another kind of prepared data (unless ``force``).
    """

    def __init__(self, out: Path, kind: str, names: set[str], claimed_before: bool):
        self.out, self.kind, self._names, self._claimed_before = out, kind, names, claimed_before

    @classmethod
    def claim(cls, out: Path, kind: str, splits: Sequence[str], *, force: bool) -> "OutputFolder":
        from elmctl.errors import UsageError

        check_out_dir(out)
        try:
            out.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise UsageError(f"--out {out}: cannot create the folder ({exc.strerror})") from None
        manifest = _read_json(out / MANIFEST)
        journal = _read_json(out / JOURNAL)
        ours_manifest = is_elmctl_manifest(manifest)
        ours_journal = isinstance(journal, dict) and isinstance(journal.get("names"), list)
        listed: set[str] = set()
        if ours_manifest:
            listed |= {MANIFEST} | {f.get("name") for f in manifest["files"] if isinstance(f, dict)}
        if ours_journal:
            listed |= {JOURNAL, JOURNAL + ".tmp"} | set(journal["names"])
        listed = {n for n in listed if isinstance(n, str) and _DATA_NAME.match(n)}
        outputs = re.compile(rf"^(?:(?:{'|'.join(splits)})-(?:\d{{5}}\.bin|index\.npy)|{re.escape(MANIFEST)}"
                             rf"|{re.escape(JOURNAL)})(?:\.tmp)?$")
        owned, foreign = set(), []
        for p in sorted(out.iterdir()):
            if p.name in listed and _regular_file(p):
                owned.add(p.name)
            else:
                foreign.append(p.name)
        in_the_way = [n for n in foreign if outputs.match(n)]
        if in_the_way:
            raise UsageError(
                f"--out {out} holds {_names(in_the_way)}, which elmctl did not write (no elmctl manifest lists "
                f"{'it' if len(in_the_way) == 1 else 'them'}); it will not overwrite or delete "
                f"{'it' if len(in_the_way) == 1 else 'them'}",
                f"move {'it' if len(in_the_way) == 1 else 'them'} out of the folder, or choose another --out",
            )
        if foreign and not (ours_manifest or ours_journal) and not force:
            raise UsageError(
                f"--out {out} is not empty and has no elmctl manifest.json (it holds {_names(foreign)})",
                "choose a new or empty folder, or pass --force to write beside these files (they are left alone)",
            )
        if ours_manifest and manifest["kind"] != kind and not force:
            raise UsageError(
                f"--out {out} holds prepared {manifest['kind']} data",
                f"choose another --out, or pass --force to replace it with {kind} data",
            )
        journal_names = {JOURNAL, JOURNAL + ".tmp"}
        folder = cls(out, kind, (owned - journal_names) | {MANIFEST, MANIFEST + ".tmp"}, ours_manifest or ours_journal)
        folder._write_journal()
        # the manifest first, so a crash from here on leaves a folder that reads as incomplete
        for name in [MANIFEST] + sorted(owned - journal_names - {MANIFEST}):
            (out / name).unlink(missing_ok=True)
        return folder

    def _write_journal(self) -> None:
        write_json_atomic(self.out / JOURNAL, {"about": "elmctl data prepare: names this build may have created",
                                               "kind": self.kind, "names": sorted(self._names)})

    def add(self, name: str) -> None:
        """Record ``name`` (and ``name.tmp``) as this build's before the file is created."""
        if not {name, name + ".tmp"} <= self._names:
            self._names |= {name, name + ".tmp"}
            self._write_journal()

    def commit(self, manifest: dict[str, Any]) -> None:
        """Write ``manifest.json`` (the folder is complete from here on) and drop the journal."""
        write_json_atomic(self.out / MANIFEST, manifest)
        (self.out / JOURNAL).unlink(missing_ok=True)

    def release(self) -> None:
        """After a failed build: delete what it created; unclaim a folder that was not elmctl's before."""
        for name in sorted(self._names):
            p = self.out / name
            if _regular_file(p):
                p.unlink()
        if not self._claimed_before:
            (self.out / JOURNAL).unlink(missing_ok=True)
            (self.out / (JOURNAL + ".tmp")).unlink(missing_ok=True)


def _names(names: list[str], limit: int = 5) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")
