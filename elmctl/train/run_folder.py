"""A run folder: the resolved recipe and the typed options of one job. Written and read here only.

Every run (``elmctl pretrain``, ``elmctl tune``, a ``tune-sweep`` trial) is launched the same way:
its launcher writes the folder, then the worker (in this process, or ``python -m
elmctl.train.worker JOB RUN_DIR`` under torchrun) reads it back and trains::

    <run_dir>/recipe.json    the resolved recipe (``Recipe.model_dump(mode="json")``)
    <run_dir>/options.json   the job's options: :class:`PretrainOptions` or :class:`TuneOptions`
                             as a JSON object, plus ``"job": "pretrain" | "tune"``
    <run_dir>/train.log      progress lines (rank 0)
    <run_dir>/checkpoints/   see :mod:`elmctl.train.checkpoint`

Folders written before the options were typed have no ``job`` key (a tune run's options name its
``base_kind``) and may lack fields added since; both still read. Unknown keys are ignored, so an
older elmctl's extra fields never stop a resume.
"""

from __future__ import annotations

import dataclasses
import json
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ClassVar, Iterator, Union

from elmctl.errors import UsageError

__all__ = ["LaunchRequest", "PretrainOptions", "TuneOptions", "EpochEval", "Options", "write", "write_options", "read", "read_options", "read_recipe",
           "is_run_folder", "RunLog", "recording"]


@dataclass
class LaunchRequest:
    """What every launch asks for (the flags ``pretrain`` and ``tune`` share); each job's request adds
    its own, and its launcher turns the request into the run folder's options."""

    recipe: str | None = None  # id or YAML path
    gpus: str | None = None  # --gpus as typed: a count, 'all' or indices
    device: str | None = None  # cuda (default) or cpu
    nproc: int | None = None  # CPU processes (gloo)
    name: str | None = None
    store: str | None = None  # store URL (default: $ELMCTL_STORE, else the home's SQLite file)
    overrides: list[str] = field(default_factory=list)  # --set KEY=VALUE
    gpu_mem: float | None = None  # GiB per GPU to plan for (default: the GPUs found, else an H100's 80)
    dry_run: bool = False  # plan only: GPUs this machine lacks are planned for, not refused
    track: list[str] | None = None  # trackers to mirror to (None: a resume keeps the run's), see elmctl.track
    track_dir: str | None = None


@dataclass
class PretrainOptions:
    """How a pre-training run trains: what ``elmctl pretrain`` planned (:mod:`elmctl.train.pretrain.launcher`)."""

    job: ClassVar[str] = "pretrain"

    run_id: str
    data_dir: str
    device: str  # "cuda" or "cpu"
    micro_batch: int
    grad_accumulation: int
    seq_len: int
    max_steps: int
    store_url: str | None = None  # None when it holds a password: it then travels in $ELMCTL_STORE only
    gpus_arg: str | None = None  # --gpus as typed (a resume without --gpus reuses it)
    nproc: int = 1  # processes on this node
    world_size: int = 1
    checkpoint_every: int | None = None
    eval_every: int | None = None
    log_every: int = 1
    compile: bool = False
    resume: bool = False  # continue from the newest good checkpoint (always, for an sbatch job)
    eval_sequences: int = 64  # validation sequences per evaluation


@dataclass(frozen=True)
class EpochEval:
    """Benchmarks a tune run (a sweep trial) evaluates after each epoch with lm-evaluation-harness
    (``tune-sweep --eval-tasks``); ``metric`` (TASK/METRIC) is logged with the epoch's DPO metrics,
    so the sweep ranks and prunes by it. See :mod:`elmctl.eval`."""

    tasks: str  # harness tasks and/or suites, comma-separated
    metric: str | None = None  # logged each epoch (elmctl.eval.metric_key's form: "openelm-zero-shot/avg",
    #                            "arc_easy/acc_norm"); None: only recorded in the evaluations table
    include_path: tuple[str, ...] = ()
    limit: int | None = None
    batch_size: int = 16


@dataclass
class TuneOptions:
    """How a tune run (or a sweep trial) trains: what :mod:`elmctl.train.tune.launcher` prepared."""

    job: ClassVar[str] = "tune"

    run_id: str
    device: str  # "cuda" or "cpu"
    base_kind: str  # "checkpoint" or "hf" (:class:`elmctl.train.weights.ModelSource`)
    base_path: str
    base_label: str
    data_dir: str
    lr: float
    epochs: int
    loss: str
    micro_batch: int
    grad_accumulation: int
    store_url: str | None = None
    precompute_ref: bool = False
    study: str | None = None  # a sweep trial: its study and trial number
    trial: int | None = None
    identity: dict[str, Any] | None = None  # :func:`elmctl.train.tune.resume.trial_identity`
    resume_from: list[str] = field(default_factory=list)  # candidate runs to continue from
    resume: dict[str, Any] | None = None  # the chosen :class:`~elmctl.train.tune.resume.ResumePoint`
    resume_notes: list[str] = field(default_factory=list)  # why candidates were passed over
    epoch_eval: EpochEval | None = None  # benchmarks after each epoch (tune-sweep --eval-tasks)


Options = Union[PretrainOptions, TuneOptions]
_JOBS: dict[str, type] = {"pretrain": PretrainOptions, "tune": TuneOptions}


def to_dict(options: Options) -> dict[str, Any]:
    """The options as the JSON object options.json holds (without ``job``)."""
    return dataclasses.asdict(options)


def from_dict(job: str, data: dict[str, Any]) -> Options:
    """Options of ``job`` from an options.json object; unknown keys are ignored, old names read."""
    cls = _JOBS[job]
    data = dict(data)
    if job == "tune":  # before #12: resume_from "r1,r0" or null, resume_notes null
        data["resume_from"] = [r for r in (data.get("resume_from") or "").split(",") if r] \
            if not isinstance(data.get("resume_from"), list) else data["resume_from"]
        data["resume_notes"] = list(data.get("resume_notes") or [])
        ev = data.get("epoch_eval")
        if ev is not None:
            if not isinstance(ev, dict) or not isinstance(ev.get("tasks"), str):
                raise UsageError("options.json of this tune run has a damaged epoch_eval",
                                 hint="the run folder is damaged or was not written by elmctl; it cannot be resumed")
            known_ev = {f.name for f in dataclasses.fields(EpochEval)}
            ev = {k: v for k, v in ev.items() if k in known_ev}
            data["epoch_eval"] = EpochEval(**{**ev, "include_path": tuple(ev.get("include_path") or ())})
    fields = dataclasses.fields(cls)
    missing = [f.name for f in fields if f.name not in data and f.default is dataclasses.MISSING
               and f.default_factory is dataclasses.MISSING]
    if missing:
        raise UsageError(f"options.json of this {job} run lacks {', '.join(missing)}",
                         hint="the run folder is damaged or was not written by elmctl; it cannot be resumed")
    known = {f.name for f in fields}
    return cls(**{k: v for k, v in data.items() if k in known})


def write(run_dir: str | Path, recipe, options: Options) -> None:
    """Write ``recipe.json`` and ``options.json`` (creating the folder)."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "recipe.json").write_text(json.dumps(recipe.model_dump(mode="json"), indent=2))
    write_options(run_dir, options)


def write_options(run_dir: str | Path, options: Options) -> None:
    """Rewrite ``options.json`` only (a resume with other launch options keeps the recipe)."""
    (Path(run_dir) / "options.json").write_text(json.dumps({"job": options.job, **to_dict(options)}, indent=2))


def read_options(run_dir: str | Path) -> Options:
    """The typed options of the run in ``run_dir``.

    Raises:
        UsageError: options.json is not a JSON object, names an unknown job or lacks a field.
    """
    path = Path(run_dir) / "options.json"
    try:
        data = json.loads(path.read_text())
    except ValueError as exc:
        raise UsageError(f"{path}: not valid JSON ({exc})", hint="the run folder is damaged; it cannot be resumed") from None
    if not isinstance(data, dict) or data.get("job", "pretrain") not in _JOBS:
        raise UsageError(f"{path}: not the options of an elmctl run", hint="the run folder is damaged; it cannot be resumed")
    job = data.pop("job", None) or ("tune" if "base_kind" in data else "pretrain")
    try:
        return from_dict(job, data)
    except UsageError as exc:
        raise UsageError(f"{path}: {exc.message}", hint=exc.hint) from None


def read_recipe(run_dir: str | Path):
    """The resolved recipe of the run in ``run_dir``."""
    from elmctl.config.schema import Recipe

    return Recipe.model_validate(json.loads((Path(run_dir) / "recipe.json").read_text()))


def read(run_dir: str | Path):
    """(recipe, options) of the run in ``run_dir``."""
    return read_recipe(run_dir), read_options(run_dir)


def is_run_folder(run_dir: str | Path) -> bool:
    return (Path(run_dir) / "options.json").is_file()


class RunLog:
    """Timestamped lines to the run's log file (rank 0) and to an ``on_event`` callback (the CLI)."""

    def __init__(self, path: Path | None, on_event: Callable[[str], None] | None, is_main: bool):
        self._file = open(path, "a") if (is_main and path is not None) else None
        self._on_event = on_event if is_main else None

    def __call__(self, msg: str) -> None:
        if self._file:
            self._file.write(f"{time.strftime('%H:%M:%S')} {msg}\n")
            self._file.flush()
        if self._on_event:
            self._on_event(msg)

    def close(self) -> None:
        if self._file:
            self._file.close()


@contextmanager
def recording(store, run_id: str, event: RunLog) -> Iterator[None]:
    """The end of every run, pre-training or tuning: whatever escapes the block is recorded once.

    An exception marks the still-active run ``failed`` with its message, KeyboardInterrupt (a second
    Ctrl-C) ``cancelled`` (:meth:`elmctl.store.Store.record_failure`), and logs one ``failed:`` line;
    the log and the store are closed either way. ``store`` is None on ranks that do not record.
    """
    try:
        yield
    except BaseException as exc:
        if store is not None:
            store.record_failure(run_id, exc)  # best effort: a full disk may hold the store too
        try:
            event(f"failed: {type(exc).__name__}: {exc}")
        except OSError:
            pass  # the log is on that disk as well; the exception itself still says what happened
        raise
    finally:
        event.close()
        if store is not None:
            store.close()
