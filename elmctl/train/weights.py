"""Finding a model's weights: one resolver for `generate`, `export` and `tune --base`.

A spec is a run id/prefix/name (its newest verified checkpoint, looked up in the store), a run
folder, a checkpoint folder (``ckpt-N``) or an HF folder (``config.json``: an `elmctl export` or an
Apple download). :func:`resolve_source` turns it into a :class:`ModelSource`; :func:`load_model`
builds the OpenELM from it; :func:`load_source_tokenizer` loads the tokenizer it recorded.

Checkpoints are verified (every file against its manifest) when resolved, so a corrupted one is an
input error (UsageError) before anything starts. Nothing here prints.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from elmctl.errors import UsageError

__all__ = ["EXPORT_INFO", "ModelSource", "resolve_source", "load_model", "load_source_tokenizer", "data_tokenizer"]

EXPORT_INFO = "elmctl_export.json"  # written by `elmctl export` next to config.json

_KINDS_HINT = "give a run id, a run folder, a checkpoint folder (ckpt-N) or an HF folder"


@dataclass(frozen=True)
class ModelSource:
    """Where weights come from: an elmctl checkpoint (with its run folder) or an Apple HF folder."""

    kind: str  # "checkpoint" | "hf"
    path: Path  # checkpoint folder (ckpt-N) or HF folder
    label: str
    run_kind: str | None = None  # "pretrain" | "tune" | None (unknown)
    run_dir: Path | None = None  # the checkpoint's run folder, when it holds the run's recipe.json
    run_id: str | None = None
    step: int | None = None
    tokenizer: str | None = None  # tokenizer spec, when the source records one


def data_tokenizer(data_dir: str | None) -> str | None:
    """The tokenizer spec in a prepared data folder's manifest.json (None when unknown)."""
    from elmctl.data._manifest import read_manifest

    if not isinstance(data_dir, str) or not data_dir:
        return None
    tok = (read_manifest(Path(data_dir)) or {}).get("tokenizer")
    return tok if isinstance(tok, str) else None


def _json_object(path: Path) -> dict[str, Any]:
    """A small JSON object elmctl wrote (run options, export info); {} when absent or malformed."""
    from elmctl._files import MAX_SMALL_JSON_BYTES, read_json_bounded

    try:
        return read_json_bounded(path, MAX_SMALL_JSON_BYTES)
    except UsageError:
        return {}


class _Resolver:
    """One spec being resolved; ``prefix`` starts every error (e.g. ``"--base X: "``)."""

    def __init__(self, spec: str, prefix: str) -> None:
        self.spec, self.prefix = spec, prefix

    def error(self, message: str, hint: str | None = None) -> UsageError:
        return UsageError(self.prefix + message, hint)

    def corrupt(self, exc) -> UsageError:
        return self.error(exc.message, "give another one (an older ckpt-N folder of that run, another run, or an "
                                       "HF folder); the corrupted files are left in place")

    def from_run_dir(self, run_dir: Path, label: str, run_kind: str | None, run_id: str | None) -> ModelSource:
        from elmctl.train.checkpoint import CheckpointCorrupt, find_resumable

        try:
            info, _ = find_resumable(run_dir)  # newest checkpoint that verifies against its manifest
        except CheckpointCorrupt as exc:
            raise self.corrupt(exc) from None
        if info is None:
            raise self.error(f"{label} has no checkpoint yet",
                             f"wait for its first checkpoint (elmctl runs show {run_id or run_dir})")
        return self.from_checkpoint(info.path, label, run_kind, run_id, info.step)

    def from_checkpoint(self, ckpt: Path, label: str, run_kind: str | None, run_id: str | None,
                        step: int | None, verify: bool = False) -> ModelSource:
        from elmctl.train.checkpoint import CheckpointCorrupt, verify_checkpoint

        if verify:
            try:
                verify_checkpoint(ckpt)
            except CheckpointCorrupt as exc:
                raise self.corrupt(exc) from None
        run_dir = ckpt.parent.parent
        opts = _json_object(run_dir / "options.json")
        if run_kind is None:
            meta = _json_object(ckpt / "manifest.json")
            run_kind = "tune" if ("base_kind" in opts or meta.get("kind") == "tune") else "pretrain"
        if step is None:
            step = int(ckpt.name.split("-", 1)[1]) if ckpt.name.startswith("ckpt-") and \
                ckpt.name.split("-", 1)[1].isdigit() else None
        return ModelSource("checkpoint", ckpt, f"{label} ({ckpt.name})", run_kind,
                           run_dir if (run_dir / "recipe.json").is_file() else None, run_id or opts.get("run_id"),
                           step, data_tokenizer(opts.get("data_dir")))

    def from_hf(self, p: Path) -> ModelSource:
        from elmctl._files import MAX_CONFIG_JSON_BYTES, read_json_bounded

        try:
            config = read_json_bounded(p / "config.json", MAX_CONFIG_JSON_BYTES, what="config.json")
        except UsageError as exc:
            raise self.error(exc.message, exc.hint) from None
        info = _json_object(p / EXPORT_INFO)  # written by `elmctl export`: keep only well-typed values
        info = {k: v for k, v in info.items() if (k == "step" and type(v) is int)
                or (k in ("tokenizer", "run_kind", "run_id") and isinstance(v, str))}
        tok = None
        if info.get("tokenizer") == "byte":
            tok = "byte"  # an elmctl export of a byte-level run: its tokenizer.json is for other tools
        elif (p / "tokenizer.model").is_file() or (p / "tokenizer.json").is_file():
            tok = str(p)
        elif info.get("tokenizer"):
            tok = info["tokenizer"]
        elif config.get("vocab_size") == 259:
            tok = "byte"  # elmctl's byte-level vocabulary (tiny recipe)
        return ModelSource("hf", p, str(p), info.get("run_kind"), tokenizer=tok, run_id=info.get("run_id"),
                           step=info.get("step"))


def resolve_source(spec: str, store_url: str | None = None, *, store=None, prefix: str = "") -> ModelSource:
    """RUN|DIR -> a :class:`ModelSource`: a run id/prefix/name (latest verified checkpoint), a run
    folder, a checkpoint folder (``ckpt-N``) or an HF folder (``config.json``).

    Args:
        spec: what the user typed.
        store_url: the store to look a run up in (``--store``; default: the one read-only commands read).
        store: an open :class:`elmctl.store.Store` to look runs up in instead.
        prefix: starts every error message (``"--base X: "`` for `tune`).

    Raises:
        UsageError: nothing usable there; the run has no checkpoint; only corrupted checkpoints;
            no store to look the run up in.
    """
    r = _Resolver(spec, prefix)
    p = Path(spec).expanduser()
    if p.is_dir():
        if (p / "config.json").is_file():
            return r.from_hf(p)
        if (p / "manifest.json").is_file() and (p / "model.safetensors").is_file():
            return r.from_checkpoint(p, str(p), None, None, None, verify=True)
        if (p / "checkpoints").is_dir() or (p / "recipe.json").is_file():
            return r.from_run_dir(p, f"run folder {p}", None, None)
        raise r.error(f"{p} holds no model", _KINDS_HINT)
    if store is not None:
        run = store.get_run(spec)  # UsageError with "did you mean" when unknown
    else:
        from elmctl.store import Store, display_url, has_runs_table, nothing_recorded, store_to_read

        full, _ = store_to_read(store_url)  # the default store, else the newest demo's (read-only commands)
        where = nothing_recorded(full)
        if where is not None:
            raise r.error(f"{spec!r} is not a folder, and there is no run store to look it up in "
                          f"(no store at {where}: nothing has been recorded there yet)",
                          "give a run folder / HF folder, or the store with --store URL")
        if not has_runs_table(full):
            raise r.error(f"{spec!r} is not a folder, and store {display_url(full)} holds no runs")
        with Store(full) as st:  # its tables exist, so opening it writes nothing
            run = st.get_run(spec)
    return r.from_run_dir(Path(run.run_dir), f"run {run.label}", run.kind, run.id)


def load_model(source: ModelSource, device: str = "cpu"):
    """The OpenELM of a source, in eval mode, on ``device``.

    Raises:
        UsageError: a checkpoint whose run folder has no recipe.json (the architecture is unknown).
    """
    if source.kind == "hf":
        from elmctl.model.hf import load_pretrained

        model = load_pretrained(source.path, device=device)
    else:
        from elmctl.model import OpenELM
        from elmctl.train.checkpoint import load_checkpoint_files, verify_checkpoint
        from elmctl.train import run_folder

        if source.run_dir is None:
            raise UsageError(f"{source.path}: no recipe.json in its run folder {Path(source.path).parent.parent}",
                             "point at the run (id or folder) instead")
        recipe = run_folder.read_recipe(source.run_dir)
        model = OpenELM(recipe.model)
        state, _, _ = load_checkpoint_files(verify_checkpoint(source.path))
        model.load_state_dict(state)
        model.to(device)
    return model.eval()


def load_source_tokenizer(source: ModelSource, spec: str | None, vocab_size: int):
    """``--tokenizer`` if given, else the one the source's data (or export) recorded."""
    from elmctl.data.tokenizers import load_tokenizer

    spec = spec or source.tokenizer
    if not spec:
        raise UsageError(f"{source.label}: no tokenizer recorded with the model",
                         "pass --tokenizer byte | path/to/tokenizer.model | path/to/tokenizer.json")
    tok = load_tokenizer(spec)
    if tok.vocab_size > vocab_size:
        raise UsageError(f"tokenizer {tok.spec} has {tok.vocab_size} tokens; the model has {vocab_size}",
                         "pass the tokenizer the model was trained with (--tokenizer)")
    return tok
