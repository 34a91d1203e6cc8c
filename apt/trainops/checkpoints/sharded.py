"""``ShardedStatePayload``: each rank writes its own shard through torch.distributed.checkpoint.

Under a sharded strategy (FSDP2) no rank holds, or gathers, the full state. Each rank writes the
shards it owns of every module and optimizer part into that part's DCP folder, inside the same
transaction (stage, manifest, rename, LATEST) as every other checkpoint::

    model/.metadata  model/__<rank>_0.distcp ...   the module "model", by parameter name
    optim/.metadata  optim/__<rank>_0.distcp ...   the optimizer "optimizer", by parameter name
    parts/<name>/...                               other parts (the writer writes state parts:
                                                   LR scheduler, scaler; small, replicated)

Each rank writes its shard as a few files in parallel threads, hashes them in parallel (the
model's while the optimizer state is being written) and sends the records to the writer, so
building the manifest reads no shard a second time; the manifest lists every file, and a load
verifies them all before DCP reads one. DCP reshards on load: the checkpoint of FSDP on two
ranks resumes under FSDP on four, under DDP, or in one process, and a gathered checkpoint loads
here too.

"""

from __future__ import annotations

import os
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import torch
import torch.distributed as dist

from apt.trainops.checkpoints.fsio import FileRecord, StageFiles, hash_file
from apt.trainops.checkpoints.manifest import VerifiedCheckpoint
from apt.trainops.checkpoints.parts import Part, module_of
from apt.trainops.checkpoints.payload import snapshot_state_parts, write_state_parts
from apt.trainops.checkpoints.restore import load_parts
from apt.trainops.checkpoints.tensorio import SnapshotBuffers
from apt.trainops.distributed import Strategy, in_process_group
from apt.trainops.distributed.dtensor import is_dtensor

__all__ = ["ShardedStatePayload", "stage_shards"]

#: Files each rank writes per DCP folder, and threads hashing them (sha256 releases the GIL).
_THREADS = max(1, min(4, (os.cpu_count() or 1) // 2))


class ShardedStatePayload:
    """Writes this rank's shards with DCP; loads sharded or gathered checkpoints.

    Args:
        strategy: the run's :class:`~apt.trainops.distributed.Strategy` (its
            ``sharded_state_dict`` and ``load_sharded_state_dict``).
        process_group: the group DCP coordinates over. An async save runs DCP in the writer
            thread, so give it a group of its own (``dist.new_group(backend="gloo")``), as for
            the manager's barrier; None: the default group.
    """

    def __init__(self, strategy: Strategy, process_group: dist.ProcessGroup | None = None) -> None:
        self.strategy = strategy
        self.group = process_group

    @property
    def holds_part(self) -> bool:
        return self.strategy.holds_part

    def snapshot(
        self, parts: list[Part], *, buffers: SnapshotBuffers | None, is_writer: bool
    ) -> Any:
        shards: dict[str, Any] = {}
        for part in parts:
            if part.kind == "module":
                state, _ = self.strategy.sharded_state_dict(part.obj, None)
            elif part.kind == "optimizer":
                _, state = self.strategy.sharded_state_dict(module_of(part, parts), part.obj)
            else:
                continue
            shards[part.folder] = stage_shards(state, part.name, buffers)
        states = snapshot_state_parts(parts, buffers) if is_writer else {}
        return {"shards": shards, "state": states}

    def write(self, files: StageFiles, snap: Any, *, is_writer: bool) -> None:
        from apt.trainops.checkpoints.dcp import write_dcp  # DCP imported on first use

        rank = dist.get_rank(self.group) if in_process_group() else 0
        hashing: dict[str, Future[FileRecord]] = {}
        with ThreadPoolExecutor(_THREADS, thread_name_prefix="apt-shard-sha256") as pool:
            for folder, state in snap["shards"].items():
                write_dcp(
                    state, files.root / folder, process_group=self.group, thread_count=_THREADS
                )
                for path in sorted((files.root / folder).glob(f"__{rank}_*")):  # DCP's names
                    rel = path.relative_to(files.root).as_posix()
                    hashing[rel] = pool.submit(hash_file, path)
            mine = {rel: future.result() for rel, future in hashing.items()}
        everyone = _gather_to_writer(mine, self.group)
        if is_writer:
            files.add_records(everyone)
            write_state_parts(files, snap["state"])

    def load(self, ckpt: VerifiedCheckpoint, parts: list[Part], *, map_location: str) -> None:
        load_parts(
            ckpt,
            parts,
            strategy=self.strategy,
            process_group=self.group,
            map_location=map_location,
        )


def stage_shards(state: Any, what: str, buffers: SnapshotBuffers | None, path: str = "") -> Any:
    """``state`` with every tensor (a DTensor's local shard too) copied into ``buffers``.

    Without buffers (a sync save: training waits while DCP writes) the live tensors are kept.
    A staged DTensor keeps its mesh and placements around a CPU shard, which is all DCP needs.
    """
    if buffers is None:
        return state
    if is_dtensor(state):
        from torch.distributed.tensor import DTensor

        local = buffers.copy(f"{what}/{path}", state.to_local())
        return DTensor.from_local(
            local,
            state.device_mesh,
            state.placements,
            run_check=False,
            shape=state.shape,
            stride=state.stride(),
        )
    if isinstance(state, torch.Tensor):
        return buffers.copy(f"{what}/{path}", state)
    if isinstance(state, dict):
        return {k: stage_shards(v, what, buffers, f"{path}/{k}") for k, v in state.items()}
    if isinstance(state, (list, tuple)):
        return type(state)(
            stage_shards(v, what, buffers, f"{path}/{i}") for i, v in enumerate(state)
        )
    return state


def _gather_to_writer(
    records: dict[str, FileRecord], group: dist.ProcessGroup | None
) -> dict[str, FileRecord]:
    """Every rank's records, on the group's first rank (``{}`` elsewhere)."""
    if not in_process_group() or dist.get_world_size(group) == 1:
        return records
    first = dist.get_global_rank(group, 0) if group is not None else 0
    is_first = dist.get_rank() == first
    out: list[Any] = [None] * dist.get_world_size(group) if is_first else []
    dist.gather_object(records, out if is_first else None, dst=first, group=group)
    merged: dict[str, FileRecord] = {}
    for part in out:
        merged.update(part or {})
    return merged
