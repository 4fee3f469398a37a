"""Several processes, one run: every rank follows global rank 0 (the head node's run).

Nodes started by hand (``elmctl pretrain --nnodes 2 --node-rank R --rdzv-endpoint H:P`` on each)
each create a run record and folder in their own store. Global rank 0 (node 0: the static
rendezvous keeps it there) owns *the* run: metrics, checkpoints, final status. The other nodes
take its recipe, batch split, step count and resume point, so a node started with another
``--max-steps`` or without ``--resume`` cannot silently train something else or hang in a
mismatched collective; and the first process of each other node keeps that node's own record
up to date (running, then the final status and step) with a link to the head's run.

With one node, or nodes sharing one run folder (sbatch), there is one record and nothing else.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from elmctl.errors import RuntimeFailure
from elmctl.train import dist as D

__all__ = ["NodeRole", "agree_on_checkpoint", "follow_head"]

# Per-node options: which record and store this node reports to, where its copy of the data is.
_LOCAL_KEYS = frozenset({"run_id", "store_url", "data_dir", "gpus_arg", "nproc", "device", "compile"})


@dataclass(frozen=True)
class NodeRole:
    node_rank: int
    nnodes: int
    head_run_id: str
    records_node_run: bool  # first process of a non-head node with a run record of its own
    node_runs: dict[int, str]  # node rank -> run id, for the nodes with their own record (head: all)


def follow_head(recipe_json: dict[str, Any], options: dict[str, Any], info: D.DistInfo):
    """(recipe dict, options, role, notes): rank 0's recipe and training options on every rank.

    Collective when several processes run. ``notes`` lists what this node had set differently
    (shown on that node's console).
    """
    node = int(os.environ.get("GROUP_RANK", "0"))
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", str(info.world_size)))
    nnodes = max(1, info.world_size // max(1, local_world))
    if info.world_size == 1:
        return recipe_json, options, NodeRole(0, 1, options["run_id"], False, {}), []
    everyone = D.gather_objects((recipe_json, options, node, info.local_rank))
    head_recipe, head_opts, _, _ = everyone[0]
    node_runs = {n: o["run_id"] for _, o, n, local in everyone if local == 0 and o["run_id"] != head_opts["run_id"]}
    notes = []
    if recipe_json != head_recipe:
        notes.append("this node's recipe differs from the head node's; training the head's")
    adopted = dict(options)
    for key, value in head_opts.items():
        if key in _LOCAL_KEYS:
            continue
        if key in options and options[key] != value:
            notes.append(f"{key}: using the head node's {json.dumps(value)} (this node had {json.dumps(options[key])})")
        adopted[key] = value
    records = info.rank != 0 and info.local_rank == 0 and options["run_id"] != head_opts["run_id"]
    role = NodeRole(node, nnodes, head_opts["run_id"], records, node_runs)
    return head_recipe, adopted, role, notes


def agree_on_checkpoint(run_dir: Path, expected: dict[int, str], info: D.DistInfo):
    """(checkpoint info or None, warnings): the checkpoint rank 0 resumes from, on every rank.

    Rank 0 picks it (newest that verifies); the others load the same folder, which must be
    readable at the same path on their node (shared filesystem). Collective when several
    processes run. Raises the same error on every rank when rank 0 finds no usable checkpoint
    or some node cannot read it, so no rank is left waiting in a collective.
    """
    from elmctl.train.checkpoint import CheckpointInfo, find_resumable

    found, warnings, error = None, [], None
    if info.is_main:
        try:
            found, warnings = find_resumable(run_dir, expected)
        except RuntimeFailure as exc:
            error = exc
    if info.world_size == 1:
        if error:
            raise error
        return found, warnings
    head = D.gather_objects((str(found.path) if found else None, error.message if error else None,
                             error.hint if error else None))[0]
    path, message, hint = head
    if message:
        raise error if error else RuntimeFailure(f"the head node could not resume: {message}", hint=hint)
    if path is None:
        return None, warnings
    if not info.is_main:  # rank 0 verified it; hashing it again on every rank buys nothing
        found = CheckpointInfo(int(Path(path).name.split("-", 1)[1]), Path(path), "") \
            if Path(path, "manifest.json").is_file() else None
    missing = D.gather_objects(None if found else os.uname().nodename)
    unreadable = sorted({h for h in missing if h})
    if unreadable:
        raise RuntimeFailure(
            f"the head node resumes from {path}, which {', '.join(unreadable)} cannot read",
            hint="multi-node resume needs the head node's run folder at the same path on every node "
                 "(a shared filesystem); copy it there, or resume on one node",
        )
    return found, warnings
