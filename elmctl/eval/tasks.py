"""Finding and building harness tasks offline, before any model is loaded.

Offline by rule: :func:`offline` sets ``HF_DATASETS_OFFLINE``/``HF_HUB_OFFLINE`` (and the flags of an
already imported ``datasets``/``huggingface_hub``), so a task's data comes from the local Hugging
Face datasets cache or from local files its YAML names; nothing is downloaded.

Indexing every built-in task of lm-eval takes 15-20 s, so only the folders that hold the asked
tasks are indexed: ``--include-path`` folders, the suites' folders (:data:`BUILTIN_FOLDERS`), and for
any other name the built-in folders whose YAML files define it (a text scan, about a second).
"""

from __future__ import annotations

import difflib
import os
import re
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

from elmctl.errors import UsageError
from elmctl.eval.suites import BUILTIN_FOLDERS, TaskRequest

__all__ = ["offline", "PreparedTasks", "prepare_tasks", "DATA_HINT"]

DATA_HINT = ("provide the data locally, one of two ways: (1) put the dataset in the local Hugging Face datasets "
             "cache (HF_HOME / HF_DATASETS_CACHE; e.g. on a machine with internet run "
             "datasets.load_dataset(...) once and copy the cache over), or (2) write a task YAML in a folder "
             "you pass with --include-path, with `dataset_path: json` and `dataset_kwargs: {data_files: "
             "{test: /abs/path/test.jsonl}}` (see README, 'elmctl eval')")
_OFFLINE_ERRORS = ("offline", "couldn't reach", "connectionerror", "not found", "doesn't exist", "no such file",
                   "unable to find", "datasetnotfound", "localentrynotfound", "filenotfound", "couldn't find")


def offline() -> None:
    """Forbid downloads for the harness and ``datasets`` in this process."""
    os.environ["HF_DATASETS_OFFLINE"] = "1"
    os.environ["HF_HUB_OFFLINE"] = "1"
    import sys

    if "datasets" in sys.modules:  # read at import time: set the live flags too
        sys.modules["datasets"].config.HF_DATASETS_OFFLINE = True  # type: ignore[attr-defined]
        sys.modules["datasets"].config.HF_HUB_OFFLINE = True  # type: ignore[attr-defined]
    if "huggingface_hub" in sys.modules:
        import huggingface_hub.constants as hc

        hc.HF_HUB_OFFLINE = True


@lru_cache(maxsize=1)
def _builtin_names() -> dict[str, frozenset[str]]:
    """Task/group/tag name -> built-in folders whose YAML files define it (a text scan, no YAML parsing)."""
    import lm_eval.tasks

    root = Path(lm_eval.tasks.__file__).parent
    single = re.compile(r"^(?:task|group|tag):\s*['\"]?([\w.\-]+)", re.M)
    listed = re.compile(r"^tag:\s*\n((?:[ \t]*-[ \t]*\S+[ \t]*\n)+)", re.M)
    names: dict[str, set[str]] = {}
    for dirpath, _, files in os.walk(root):
        for f in files:
            if not f.endswith(".yaml"):
                continue
            try:
                text = (Path(dirpath) / f).read_text(encoding="utf-8", errors="replace")
            except OSError:
                continue
            found = set(single.findall(text))
            for block in listed.findall(text):
                found.update(x.strip().lstrip("-").strip().strip("'\"") for x in block.splitlines() if x.strip())
            for n in found:
                names.setdefault(n, set()).add(dirpath)
    return {k: frozenset(v) for k, v in names.items()}


@dataclass
class PreparedTasks:
    """Harness task objects per request, built (data loaded) before the model."""

    manager: Any
    built: dict[TaskRequest, list[Any]] = field(default_factory=dict)  # request -> Task/Group objects


def _manager(include: list[Path], folders: set[str], defaults: bool):
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=[str(p) for p in include] + sorted(folders) or None, include_defaults=defaults)


def _classify(name: str, exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}".strip().rstrip(":")
    cause = exc.__cause__ or exc.__context__
    if cause is not None and str(cause).strip():  # datasets wraps the parser's error: that one says what is wrong
        text += f" <- {type(cause).__name__}: {str(cause).strip()}"
    if isinstance(exc, StopIteration):
        text += " (no rows: an empty data file or split?)"
    first = text.splitlines()[0][:400]
    if any(k in text.lower() for k in _OFFLINE_ERRORS) or isinstance(exc, (ConnectionError, FileNotFoundError)):
        return f"task {name}: its dataset is not available locally ({first})"
    return f"task {name}: cannot be built ({first})"


def prepare_tasks(requests: list[TaskRequest], include_path: list[str | os.PathLike] | None = None) -> PreparedTasks:
    """Build every requested harness task offline (loads its data); no model is involved.

    Raises:
        UsageError: an include folder is missing; an unknown task (with close names); a task whose
            data is not local (naming the two ways to provide it); a task YAML that fails to build.
            All problems at once, in one error.
    """
    offline()
    include = []
    for p in include_path or []:
        path = Path(p).expanduser()
        if not path.is_dir():
            raise UsageError(f"--include-path {p}: not a folder", "give a folder holding task YAML files")
        include.append(path.resolve())
    names = sorted({r.task for r in requests})
    local = _manager(include, set(), False) if include else None
    local_names = set(local.all_tasks) if local is not None else set()
    folders: set[str] = set()
    unknown = []
    for n in names:
        if n in local_names:
            continue
        if n in BUILTIN_FOLDERS:
            import lm_eval.tasks

            folders.add(str(Path(lm_eval.tasks.__file__).parent / BUILTIN_FOLDERS[n]))
            continue
        where = _builtin_names().get(n)
        if where is None:
            unknown.append(n)
        else:
            folders.update(where)
    if unknown:
        known = list(local_names) + list(_builtin_names())
        lines = []
        for n in unknown:
            close = difflib.get_close_matches(n, known, n=3, cutoff=0.6)
            lines.append(f"unknown task {n!r}" + (f" (did you mean {' or '.join(map(repr, close))}?)" if close else ""))
        raise UsageError("; ".join(lines), "give harness task names (lm-eval ls tasks), a suite (openelm-zero-shot, "
                         "openelm-openllm, openelm-llm360), or a task defined by a YAML in --include-path")
    manager = local if not folders else _manager(include, folders, False)
    prepared = PreparedTasks(manager)
    problems = []
    for req in requests:
        try:
            loaded = manager.load([req.task])
        except KeyError:  # a group naming tasks of folders not indexed: index everything once
            manager = prepared.manager = _manager(include, set(), True)
            try:
                loaded = manager.load([req.task])
            except Exception as exc:  # noqa: BLE001 - a task is user input: report it, do not crash
                problems.append(_classify(req.task, exc))
                continue
        except Exception as exc:  # noqa: BLE001
            problems.append(_classify(req.task, exc))
            continue
        groups = loaded.get("groups") or {}
        top = [g for g in groups.values() if g.name == req.task]
        prepared.built[req] = top or list(loaded["tasks"].values())
    if problems:
        missing = any("not available locally" in p for p in problems)
        raise UsageError("; ".join(problems), DATA_HINT if missing else
                         "fix the task YAML (lm-eval's task format) or its data files, or pick another task")
    return prepared
