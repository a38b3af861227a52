"""One rank of a data-parallel group (a rung with [[profiles]] nproc_per_node = K > 1; issue 19).

torchrun (worker/group.py) starts K copies of the worker; this module is what each needs to act as one trainer:
- the sample cursor stays global: micro-batch j of every optimizer step is split K ways, rank r taking
  positions r*B .. r*B+B-1 of it (`share`), so an effective batch is the same images whatever K is;
- gradients are summed over the ranks by DDP (a SUM hook, not DDP's mean) at the step's last micro-batch, the
  losses' sums and valid counts by one all-reduce, and the trainer divides by the global count as with one
  process: a bad image changes nothing across K;
- decisions that end a step or the run (stop, a failing data source) are taken on reduced numbers, so every
  rank takes them at the same step; rank 0 alone writes checkpoints, metrics and the heartbeat.
With K = 1 (`Group()`) nothing here touches torch.distributed: the single worker is what it always was.
"""
from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from trainctl.contract.config import ConfigError

# A collective waits this long for a peer before failing. A hang in one rank is the supervisor's to see (its
# watchdog, then SIGABRT to every rank for the stacks), so this only bounds what nobody is watching.
COLLECTIVE_TIMEOUT = datetime.timedelta(minutes=30)


@dataclass(frozen=True)
class Group:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @classmethod
    def from_env(cls) -> Group:
        """This process's place in the group, from the variables torchrun sets (none: a group of one)."""
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world == 1:
            return cls()
        return cls(int(os.environ["RANK"]), world, int(os.environ.get("LOCAL_RANK", os.environ["RANK"])))

    @property
    def main(self) -> bool:
        """Rank 0: the one that writes checkpoints, metrics, the heartbeat and the model."""
        return self.rank == 0

    def start(self, profile, device: torch.device) -> None:
        """Join the group (NCCL on CUDA, Gloo on the CPU) once the rung's device is known."""
        if self.world == 1:
            return
        if profile.nproc_per_node != self.world:
            raise ConfigError(f"this rung has nproc_per_node = {profile.nproc_per_node}, but {self.world} processes "
                              f"were started. Fix: start the run with trainctl, which launches the rung's group")
        check_group(profile, device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=COLLECTIVE_TIMEOUT)

    # ---- collectives (each a no-op for a group of one) ------------------------------------------------------
    def sum(self, values: list[float], device: torch.device) -> list[float]:
        """Element-wise sums over the ranks, in float64 (exact for counts; losses as summed by the backend)."""
        if self.world == 1:
            return list(values)
        t = torch.tensor(values, dtype=torch.float64, device=self._comm_device(device))
        dist.all_reduce(t)
        return t.tolist()

    def broadcast(self, obj):
        """Rank 0's `obj` on every rank."""
        if self.world == 1:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def gather(self, obj) -> list:
        """Every rank's `obj`, in rank order, on every rank."""
        if self.world == 1:
            return [obj]
        out = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()

    def _comm_device(self, device: torch.device) -> torch.device:
        return device if device.type == "cuda" else torch.device("cpu")   # Gloo reduces CPU tensors

    # ---- the model -------------------------------------------------------------------------------------------
    def wrap(self, model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
        """The module the training step calls: DDP summing gradients over the ranks; the model itself alone."""
        if self.world == 1:
            return model
        ids = [device.index] if device.type == "cuda" else None
        ddp = torch.nn.parallel.DistributedDataParallel(model, device_ids=ids)
        ddp.register_comm_hook(None, _sum_hook)   # DDP's own hook divides by K: the trainer divides by the valid count
        return ddp

    # ---- the data ----------------------------------------------------------------------------------------------
    def share(self, batch: int) -> tuple[int, int]:
        """(offset, stride) of this rank's micro-batch starts in the sample order."""
        return self.rank * batch, batch * self.world


def check_group(profile, device: torch.device) -> None:
    """A rung of nproc_per_node > 1 processes can run on `device` here (the worker's pre-flight and each rank)."""
    k = profile.nproc_per_node
    if k == 1:
        return
    if device.type == "mps":
        raise ConfigError(f"nproc_per_node = {k} resolved to device \"mps\", which has no multi-process backend. "
                          f"Fix: use nproc_per_node = 1 on the Mac")
    if device.type == "cuda" and torch.cuda.device_count() < k:
        raise ConfigError(f"nproc_per_node = {k} on CUDA, but {torch.cuda.device_count()} GPU(s) are visible "
                          f"(one process per GPU). Fix: use nproc_per_node <= {torch.cuda.device_count()}")


def _sum_hook(_state, bucket):
    """DDP communication hook: the bucket's gradients summed over the ranks (DDP's default divides by K)."""
    return dist.all_reduce(bucket.buffer(), async_op=True).get_future().then(lambda fut: fut.value()[0])


def broken_collective(exc: BaseException) -> bool:
    """An error that says a peer went away (its connection closed, a collective timed out): evidence of another
    rank's failure, not a failure of this one."""
    if isinstance(exc, getattr(dist, "DistError", ())):
        return True
    text = str(exc)
    return any(s in text for s in ("Connection closed by peer", "Connection reset by peer", "Broken pipe",
                                   "Gloo", "gloo", "NCCL", "ProcessGroup", "Timed out waiting"))
