"""Which GPUs this machine has, and which of them a run gets.

Discovery asks ``nvidia-smi`` (a subprocess: no torch import, no CUDA context in elmctl's own
process). Indices are the physical ones nvidia-smi prints (PCI bus order); the launcher passes
them on with ``CUDA_DEVICE_ORDER=PCI_BUS_ID`` so CUDA numbers the devices the same way.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Collection, Sequence
from dataclasses import dataclass

from elmctl.errors import RuntimeFailure, UsageError

__all__ = ["GpuInfo", "discover", "select", "describe", "planned_count", "planned_for"]

_QUERY = ["--query-gpu=index,name,memory.total,uuid", "--format=csv,noheader,nounits"]


@dataclass(frozen=True)
class GpuInfo:
    """One GPU as nvidia-smi reports it: physical index, product name, memory in GiB, UUID."""

    index: int
    name: str
    memory_gib: float
    uuid: str

    def __str__(self) -> str:
        return f"{self.index} ({self.name}, {self.memory_gib:.0f} GiB)"


def _parse(text: str) -> list[GpuInfo]:
    gpus = []
    for line in text.splitlines():
        parts = [p.strip() for p in line.split(",")]
        if len(parts) < 4 or not parts[0].isdigit():
            continue
        try:
            mem_gib = float(parts[2]) / 1024.0  # nounits: MiB
        except ValueError:
            mem_gib = 0.0
        gpus.append(GpuInfo(int(parts[0]), ",".join(parts[1:-2]), mem_gib, parts[-1]))
    return gpus


def _visible(gpus: list[GpuInfo], spec: str) -> list[GpuInfo]:
    """Apply CUDA_VISIBLE_DEVICES like CUDA does: listed order, stop at the first unknown entry."""
    by_index = {g.index: g for g in gpus}
    out: list[GpuInfo] = []
    for entry in (e.strip() for e in spec.split(",")):
        if entry.isdigit() and int(entry) in by_index:
            match = by_index[int(entry)]
        else:
            uuid = entry if entry.startswith("GPU-") else "GPU-" + entry
            hits = [g for g in gpus if entry and g.uuid.startswith(uuid)]
            if len(hits) != 1:
                break
            match = hits[0]
        if match in out:
            break
        out.append(match)
    return out


def discover() -> list[GpuInfo]:
    """GPUs this process may use: nvidia-smi's list filtered by CUDA_VISIBLE_DEVICES.

    Returns an empty list when nvidia-smi is not installed.

    Raises:
        RuntimeFailure: nvidia-smi exists but fails (driver not loaded, GPU fallen off the bus).
    """
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return []
    try:
        proc = subprocess.run([exe, *_QUERY], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise RuntimeFailure(f"nvidia-smi failed: {exc}", hint="check the NVIDIA driver, or use --device cpu") from exc
    if proc.returncode != 0:
        reason = (proc.stderr or proc.stdout).strip().splitlines()
        raise RuntimeFailure(
            f"nvidia-smi failed (exit {proc.returncode}): {reason[0] if reason else 'no output'}",
            hint="check the NVIDIA driver with `nvidia-smi`, or train on the CPU with --device cpu",
        )
    gpus = _parse(proc.stdout)
    spec = os.environ.get("CUDA_VISIBLE_DEVICES")
    return gpus if spec is None else _visible(gpus, spec)


def describe(available: Sequence[GpuInfo] | Sequence[int]) -> str:
    """'2 GPUs: 0 (H100, 80 GiB), 1 (H100, 80 GiB)' for messages."""
    n = len(available)
    if n == 0:
        return "no GPUs"
    return f"{n} GPU{'s' if n != 1 else ''}: " + ", ".join(str(g) for g in available)


def select(
    gpus_arg: str | int | None,
    available: Sequence[GpuInfo] | Sequence[int],
    *,
    device: str | None = None,
    busy: Collection[int] = (),
) -> list[int]:
    """Turn ``--gpus`` into physical GPU indices.

    Args:
        gpus_arg: None or ``"all"`` (every available GPU), a count (``8`` / ``"8"``), or a comma
            list of indices (``"0,3"``; one index is written ``"3,"``).
        available: what :func:`discover` found (GpuInfo objects or bare indices).
        device: ``"cpu"`` trains on the CPU and returns ``[]``.
        busy: indices locked by other runs; a count prefers the free ones.

    Raises:
        UsageError: no GPU (without ``--device cpu``), more GPUs than there are, unknown indices.
    """
    indices = [g.index if isinstance(g, GpuInfo) else int(g) for g in available]
    there = f"this machine has {describe(available)}"
    if device == "cpu":
        if gpus_arg not in (None, "", "0", 0):
            raise UsageError(f"--gpus {gpus_arg} conflicts with --device cpu", hint="drop one of the two options")
        return []
    if not indices:
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        hint = "nvidia-smi lists no GPU" if shutil.which("nvidia-smi") else "nvidia-smi is not installed"
        if visible is not None:
            hint += f"; note CUDA_VISIBLE_DEVICES={visible!r} hides GPUs"
        raise UsageError("no GPU found; use --device cpu to train on the CPU", hint=hint)
    text = "all" if gpus_arg is None else str(gpus_arg).strip().lower()
    if text == "all":
        return indices
    if text.isdigit():
        count = int(text)
        if count < 1:
            raise UsageError(f"--gpus {count}: need at least one GPU", hint="use --device cpu to train on the CPU")
        if count > len(indices):
            raise UsageError(f"--gpus {count} asks for {count} GPUs but {there}",
                             hint=f"use --gpus {len(indices)} or --gpus all")
        free_first = sorted(indices, key=lambda i: i in busy)  # stable: index order within each group
        return sorted(free_first[:count])
    try:
        wanted = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise UsageError(f"--gpus {gpus_arg!r} is not a count, 'all' or a comma list of indices",
                         hint="e.g. --gpus 8, --gpus all, --gpus 0,1,2,3") from None
    missing = [i for i in wanted if i not in indices]
    if missing:
        raise UsageError(f"--gpus {gpus_arg}: no GPU {', '.join(map(str, missing))}; {there}",
                         hint="pick from the indices listed, or use --gpus all")
    if len(set(wanted)) != len(wanted) or not wanted:
        raise UsageError(f"--gpus {gpus_arg}: each GPU index once, at least one", hint="e.g. --gpus 0,1")
    return wanted


def planned_for(count: int, gpu_mem: float | None, found: list) -> str:
    """'8 x H100 80 GB (this machine has none)': what a plan for GPUs this machine lacks is for."""
    what = "H100 80 GB" if gpu_mem is None else f"{gpu_mem:g} GiB GPU"
    has = "none" if not found else f"{len(found)} GPU{'s' if len(found) != 1 else ''}"
    return f"planned for {count} \u00d7 {what} (this machine has {has})"


def planned_count(gpus_arg: str | None) -> int:
    """The GPU count ``--gpus`` asks for, for planning without the GPUs (a count or an index list).

    Raises:
        UsageError: ``all`` (or no --gpus) on a machine without GPUs, or a malformed value.
    """
    text = (gpus_arg or "all").strip().lower()
    if text == "all":
        raise UsageError("no GPU found, so --gpus all plans for nothing",
                         hint="give the count to plan for, e.g. --gpus 8 (with --gpu-mem GIB; default 80, an H100)")
    if text.isdigit():
        if int(text) < 1:
            raise UsageError(f"--gpus {gpus_arg}: need at least one GPU", hint="use --device cpu to train on the CPU")
        return int(text)
    parts = [x.strip() for x in text.split(",") if x.strip()]
    if parts and all(x.isdigit() for x in parts) and len(set(parts)) == len(parts):
        return len(parts)
    raise UsageError(f"--gpus {gpus_arg!r} is not a count, 'all' or a comma list of indices",
                     hint="e.g. --gpus 8, --gpus all, --gpus 0,1,2,3")


def plan_gpus(
    gpus_arg: str | None,
    available: Sequence[GpuInfo],
    *,
    gpu_mem: float | None = None,
    dry_run: bool = False,
    busy: Collection[int] = (),
) -> tuple[list[int], str | None, float | None, str | None]:
    """(indices, GPU name, GiB per GPU to plan for, planned-for note or None) for ``--gpus``.

    A dry run asking for GPUs this machine does not have plans for them (``gpu_mem``, default an
    H100's 80 GiB) and says so in the note; otherwise :func:`select` decides (and refuses).
    ``gpu_mem`` given overrides the memory of the GPUs found.
    """
    try:
        chosen = select(gpus_arg, available, device="cuda", busy=busy)
    except UsageError:
        if not dry_run:
            raise
        count = planned_count(None if gpus_arg is None else str(gpus_arg))
        return (list(range(count)), "H100" if gpu_mem is None else None, 80.0 if gpu_mem is None else gpu_mem,
                planned_for(count, gpu_mem, available))
    info = {g.index: g for g in available if isinstance(g, GpuInfo)}
    first = info.get(chosen[0]) if chosen else None
    mem = gpu_mem if gpu_mem is not None else (first.memory_gib if first else None)
    return chosen, (first.name if first else None), mem, None
