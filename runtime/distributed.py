"""The processes of one job under `torchrun`: which one this is, and the few collectives the two
stages use. Networking is torch.distributed's (gloo on CPU, NCCL for CUDA tensors); nothing here
opens a socket of its own.

    torchrun --nproc_per_node 2 generate_activations.py …     # ranks write disjoint blocks
    torchrun --nproc_per_node 2 train_sweep.py …              # ranks train disjoint members

Started without torchrun (no WORLD_SIZE in the environment) a stage is rank 0 of 1 and no
process group is made. Collectives wait at most `timeout` seconds (--dist_timeout): a rank that
died makes its peers' next collective fail at once; one that is alive but stuck is given up on
after the timeout. Either way every surviving rank stops with one line naming what it waited
for (a monitored barrier names the ranks that did not arrive), and torchrun's summary names the
rank that failed first. SIGTERM keeps its default action, so torchrun can end a stuck rank.
"""
from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from typing import Any

DEFAULT_TIMEOUT = 300.0  # seconds; torch's own default is 30 minutes


class PeerError(RuntimeError):
    """Another rank of the job failed, left, or did not arrive in time."""


@dataclass(frozen=True)
class Processes:
    """This process's place in the job."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    timeout: float = DEFAULT_TIMEOUT

    @property
    def distributed(self) -> bool:
        return self.world > 1

    @property
    def name(self) -> str:
        return f"rank {self.rank}/{self.world}"

    def device_for(self, device: str) -> str:
        """Under torchrun a bare "cuda" means this rank's own GPU, cuda:LOCAL_RANK."""
        return f"cuda:{self.local_rank}" if self.distributed and device == "cuda" else device

    def barrier(self, what: str) -> None:
        """Wait until every rank reaches this point (`what`: for messages)."""
        if not self.distributed:
            return
        import torch.distributed as dist

        try:
            dist.monitored_barrier(timeout=datetime.timedelta(seconds=self.timeout), wait_all_ranks=True)
        except RuntimeError as err:
            raise self.peer_error(what, err) from None

    def all_gather(self, value: Any, what: str) -> list[Any]:
        """Every rank's `value` (picklable), in rank order."""
        if not self.distributed:
            return [value]
        import torch.distributed as dist

        values: list[Any] = [None] * self.world
        try:
            dist.all_gather_object(values, value)
        except RuntimeError as err:
            raise self.peer_error(what, err) from None
        return values

    def peer_error(self, what: str, err: RuntimeError) -> PeerError:
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        return PeerError(f"{self.name}: lost the other ranks while {what} ({first_line}); a rank died, left or is "
                         "stuck (torchrun's summary names it). Rerun the same torchrun command to resume from the "
                         "last step every rank completed")


def join(timeout: float = DEFAULT_TIMEOUT) -> Processes:
    """This process's place; under torchrun, also join the job's process group (once)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return Processes(timeout=timeout)
    if timeout <= 0:
        raise ValueError(f"--dist_timeout must be positive, got {timeout}")
    import torch.distributed as dist

    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        # gloo carries CPU tensors and the monitored barrier; NCCL, if available, CUDA tensors
        import torch

        backend = "cpu:gloo,cuda:nccl" if torch.cuda.is_available() and dist.is_nccl_available() else "gloo"
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout))
    return Processes(rank, world, local_rank, timeout)


def leave(processes: Processes) -> None:
    """Leave the process group (at the end of a stage, so the process exits cleanly)."""
    if processes.distributed:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()


def share(n_items: int, n_parts: int, part: int) -> range:
    """Part `part` of `n_items` split into `n_parts` contiguous, near-equal parts (earlier parts
    take the remainder: 10 on 4 → 3, 3, 2, 2)."""
    base, extra = divmod(n_items, n_parts)
    start = part * base + min(part, extra)
    return range(start, start + base + (part < extra))
