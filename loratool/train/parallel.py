"""Data parallel training under torch.distributed (``torchrun`` or ``accelerate launch``).

The engine is PyTorch's DistributedDataParallel: each process holds the whole model, trains on its share
of every batch, and DDP all-reduces (averages) the adapter gradients during the backward pass, so every
process takes the same optimizer step.

How a step is shared: with ``W`` processes and ``--batch-size B`` the step's batch is ``W·B`` instance
examples (and as many class ones with prior preservation). Every process draws the randomness of the
whole batch from the same seeded generator (image choice, VAE sampling, noise, timesteps) and keeps its
own rows, so a run on ``W`` processes takes the steps a single process would take with ``--batch-size W·B``
(up to float rounding). The loss is a mean per process over equal shares, so the average of the
processes' losses and gradients is the whole batch's. The learning rate is not rescaled: the run is the
``W·B`` run, so use the rate that suits that batch. Process 0 alone writes files and samples.

Launching sets ``WORLD_SIZE``, ``RANK`` and ``LOCAL_RANK``; on CUDA each process uses ``cuda:LOCAL_RANK``
and NCCL, on the CPU gloo.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Parallel:
    """This process's place among the training processes (one process: rank 0 of 1)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world > 1

    def rows(self, size: int, prior: bool) -> torch.Tensor:
        """This process's rows of the global batch: its share of the ``world·size`` instance rows and,
        with prior preservation, the same share of the class rows that follow them."""
        mine = torch.arange(self.rank * size, (self.rank + 1) * size)
        return torch.cat([mine, mine + self.world * size]) if prior else mine

    def barrier(self) -> None:
        if self.active:
            torch.distributed.barrier()

    def finish(self) -> None:
        """Leave the process group once every process got here (call after dropping the DDP wrappers:
        one destroyed after its group can hang)."""
        if self.active and torch.distributed.is_initialized():
            torch.distributed.barrier()
            torch.distributed.destroy_process_group()

    def mean(self, value: torch.Tensor) -> torch.Tensor:
        """The average of ``value`` over the processes (without waiting on the host)."""
        if not self.active:
            return value
        total = value.detach().clone()
        torch.distributed.all_reduce(total)  # SUM: gloo has no AVG
        return total / self.world


def from_environment(device: torch.device) -> tuple[Parallel, torch.device]:
    """The process group a launcher described in the environment (joined here), and this process's device."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Parallel(), device
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    if not torch.distributed.is_initialized():
        torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return Parallel(rank, world, local), device


def wrap(module: torch.nn.Module, par: Parallel, device: torch.device) -> torch.nn.Module:
    """``module`` under DistributedDataParallel when several processes train (gradients averaged)."""
    if not par.active:
        return module
    from torch.nn.parallel import DistributedDataParallel

    ids = [device.index] if device.type == "cuda" else None
    return DistributedDataParallel(module, device_ids=ids)
