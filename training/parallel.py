"""A sweep over several processes (torchrun): which members each rank trains, its checkpoints,
and the gradient all-reduce of data-parallel training.

    torchrun --nproc_per_node 4 train_sweep.py …                    # 4 member groups
    torchrun --nproc_per_node 8 train_sweep.py … --data_parallel 2  # 4 member groups × 2 data slices

Ranks form `groups = world / data_parallel` member groups of `data_parallel` consecutive ranks.
Member group g trains the g-th contiguous share of the sweep's members (10 members on 4 groups:
3, 3, 2, 2). Every rank streams the same batches in the same order:

  * ensemble-parallel (data_parallel 1, the default): a rank steps its members on the whole batch;
    there is no gradient traffic, and each member's weights are those of a single-process run
    (bit for bit on CPU at the same thread count: members never interact);
  * data-parallel: rank s of a group steps its members on slice s of each batch, then the group
    all-reduces every gradient weighted by its slice's rows (so the sum is the gradient of the
    whole batch's mean loss) and the latents that fired, before each member's clip and Adam step.
    The result equals a single-process run up to float summation order. A loss that is not a
    mean over rows sees its slice only: AuxK's normaliser (the residual's variance) is the
    slice's, and BatchTopK's batch-wide top-k is refused.

Checkpoints: the first rank of each group writes `checkpoint.group-g-of-G.step-S.pt` for its
members at the same steps as the others; once every rank has written step S, older ones are
deleted. A resume starts from the newest step every group has. A single process keeps its one
`checkpoint.pt`. A rerun with another layout is refused while checkpoints remain.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import torch

from runtime.distributed import Processes, share

SINGLE_CHECKPOINT = "checkpoint.pt"
_GROUP_CHECKPOINT = re.compile(r"checkpoint\.group-(\d+)-of-(\d+)\.step-(\d+)\.pt$")


@dataclass(frozen=True)
class Layout:
    """How a job's ranks split a sweep."""

    processes: Processes
    data_parallel: int = 1

    def __post_init__(self):
        if self.data_parallel < 1:
            raise ValueError(f"--data_parallel must be at least 1, got {self.data_parallel}")
        if self.processes.world % self.data_parallel:
            raise ValueError(f"--data_parallel {self.data_parallel} does not divide the job's {self.processes.world} "
                             "processes: give torchrun a multiple of it (--nproc_per_node × --nnodes)")

    @property
    def groups(self) -> int:
        return self.processes.world // self.data_parallel

    @property
    def group(self) -> int:
        return self.processes.rank // self.data_parallel

    @property
    def data_slice(self) -> int:
        return self.processes.rank % self.data_parallel

    @property
    def writes(self) -> bool:
        """Whether this rank writes its group's checkpoints and exports."""
        return self.data_slice == 0

    def members(self, n_members: int) -> range:
        """Indices of the sweep's members this rank trains."""
        if self.groups > n_members:
            raise ValueError(f"{self.processes.world} processes make {self.groups} member groups for {n_members} members: "
                             f"run at most {n_members} groups (fewer processes, or --data_parallel to split each batch)")
        return share(n_members, self.groups, self.group)

    def rows(self, batch_rows: int) -> range:
        """The rows of a batch this rank steps on: its slice; the whole batch when the batch has
        fewer rows than the group has ranks (an epoch's last batch may)."""
        if batch_rows < self.data_parallel:
            return range(batch_rows)
        return share(batch_rows, self.data_parallel, self.data_slice)

    def describe(self, names: list[str], n_members: int) -> str:
        """One line naming this rank's share: `rank 1/2: members 02_l1_0.01, 03_l1_0.1 (2 of 4)`."""
        where = f"; member group {self.group + 1}/{self.groups}, batch slice {self.data_slice + 1}/{self.data_parallel}" \
            if self.data_parallel > 1 else ""
        return f"{self.processes.name}: members {', '.join(names)} ({len(names)} of {n_members}{where})"

    # ------------------------------------------------------------ checkpoints
    def checkpoint_path(self, out: Path, step: int) -> Path:
        if self.groups == 1:
            return out / SINGLE_CHECKPOINT
        return out / f"checkpoint.group-{self.group}-of-{self.groups}.step-{step:09d}.pt"

    def resume_path(self, out: Path) -> Path | None:
        """The checkpoint to resume from: the newest step every member group wrote (None: start
        afresh). Checkpoints of another layout are refused."""
        single = (out / SINGLE_CHECKPOINT).exists()
        groups = {(int(g), int(n), int(s)) for g, n, s in _checkpoints(out)}
        layouts = {n for _, n, _ in groups} | ({1} if single else set())
        if layouts - {self.groups}:
            raise ValueError(f"{out} holds checkpoints of a run split into {sorted(layouts)} member group(s), and this "
                             f"one has {self.groups} ({self.processes.world} processes, --data_parallel "
                             f"{self.data_parallel}): rerun with the layout that wrote them, or delete {out}/checkpoint* "
                             "to start over")
        if self.groups == 1:
            return out / SINGLE_CHECKPOINT if single else None
        steps = [{s for g, _, s in groups if g == group} for group in range(self.groups)]
        common = set.intersection(*steps)
        return self.checkpoint_path(out, max(common)) if common else None

    def agreed_resume_path(self, out: Path) -> Path | None:
        """`resume_path`, checked to be the same step on every rank (a node that does not see the
        shared output directory would otherwise start afresh beside resuming peers)."""
        path = self.resume_path(out)
        seen = self.processes.all_gather(None if path is None else path.name.split("step-")[-1],
                                         "agreeing on the checkpoint to resume from")
        if len(set(seen)) > 1:
            raise ValueError(f"the ranks see different checkpoints in {out} ({seen}): every node must share the output "
                             "directory (a network filesystem), as torchrun jobs do")
        return path

    def prune_checkpoints(self, out: Path, keep_step: int) -> None:
        """Delete this group's checkpoints older than `keep_step` (called once every rank wrote it)."""
        if self.groups == 1 or not self.writes:
            return
        for group, groups, step in _checkpoints(out):
            if int(group) == self.group and int(groups) == self.groups and int(step) < keep_step:
                self.checkpoint_path(out, int(step)).unlink(missing_ok=True)

    def remove_checkpoints(self, out: Path) -> None:
        if not self.writes:
            return
        if self.groups == 1:
            (out / SINGLE_CHECKPOINT).unlink(missing_ok=True)
            return
        for group, groups, step in _checkpoints(out):
            if int(group) == self.group and int(groups) == self.groups:
                self.checkpoint_path(out, int(step)).unlink(missing_ok=True)


def _checkpoints(out: Path) -> list[tuple[str, str, str]]:
    if not out.is_dir():
        return []
    return [m.groups() for p in out.iterdir() if (m := _GROUP_CHECKPOINT.match(p.name))]


class GradientSync:
    """Data-parallel: sums a member group's gradients and observations over its ranks."""

    def __init__(self, layout: Layout):
        import torch.distributed as dist

        self.ranks = layout.data_parallel
        # every rank takes part in creating every group (torch.distributed requires it)
        groups = [dist.new_group(list(range(g * layout.data_parallel, (g + 1) * layout.data_parallel)))
                  for g in range(layout.groups)]
        self.group = groups[layout.group]
        self.processes = layout.processes

    @torch.no_grad()
    def reduce_(self, grads: list[torch.Tensor], fired_EF: torch.Tensor, rows: int, batch_rows: int) -> torch.Tensor:
        """Weight this rank's gradients (of the mean loss over its `rows` of a batch of
        `batch_rows`, see Layout.rows) by its share of the rows the group stepped on, and sum them
        over the group in place; → the latents that fired on any rank [E, F]."""
        import torch.distributed as dist

        stepped = batch_rows if batch_rows >= self.ranks else batch_rows * self.ranks
        try:
            for g in grads:
                g.mul_(rows / stepped)
                dist.all_reduce(g, group=self.group)
            fired = fired_EF.to(torch.uint8)
            dist.all_reduce(fired, op=dist.ReduceOp.MAX, group=self.group)
        except RuntimeError as err:
            raise self.processes.peer_error("reducing gradients", err) from None
        return fired.bool()
