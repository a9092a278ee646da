"""Multi-process training with ``torchrun`` and DistributedDataParallel: the DDP part of the runtime.

``torchrun --nproc_per_node=N -m flowkit train ...`` starts N processes and sets ``RANK``,
``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT`` in each.  :func:`setup`
reads them, initialises the default process group (NCCL with one GPU per process,
``torch.cuda.set_device(LOCAL_RANK)``; gloo on the CPU) and returns a
:class:`DistributedContext` that knows its rank and offers the few collectives training
needs (the per-step ones on device tensors, so they never wait for the host).  Without
those variables (or with ``WORLD_SIZE=1``) the context is a no-op: rank 0 of
a world of 1, and every collective returns its input.

Example:
    >>> ctx = setup("cpu")          # not under torchrun: a world of one
    >>> (ctx.rank, ctx.world_size, ctx.is_main, ctx.sum_tensor(torch.tensor([1.5, 2.0])).tolist())
    (0, 1, True, [1.5, 2.0])
    >>> ctx.close()
"""

from __future__ import annotations

import dataclasses
import os

import torch
import torch.distributed as dist
from torch import nn

from flowkit.training.runtime import resolve_device

__all__ = ["DistributedContext", "env_rank", "setup"]

_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK")


def _env_int(name: str, default: int) -> int:
    text = os.environ.get(name)
    if text is None or text == "":
        return default
    try:
        value = int(text)
    except ValueError:
        raise ValueError(
            f"{name}: expected an integer in the environment (as torchrun sets it), got {text!r}"
        ) from None
    if value < 0:
        raise ValueError(f"{name}: expected an integer >= 0 in the environment, got {value}")
    return value


def env_rank() -> int:
    """This process's rank as torchrun's ``RANK`` says (0 when not under torchrun)."""
    return _env_int("RANK", 0)


@dataclasses.dataclass
class DistributedContext:
    """Where this process stands in the job: ``rank`` of ``world_size``, its ``device``.

    Args:
        rank: global rank (0 writes files and prints).
        world_size: number of processes.
        local_rank: rank on this machine (the GPU index with NCCL).
        device: the device this process trains on.
        owns_group: :func:`setup` created the process group, so :meth:`close` destroys it.
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = dataclasses.field(default_factory=lambda: torch.device("cpu"))
    owns_group: bool = False

    @property
    def enabled(self) -> bool:
        """More than one process: collectives really communicate."""
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0, the process that writes checkpoints, metrics and pictures and shows progress."""
        return self.rank == 0

    def _comm_device(self) -> torch.device:
        # NCCL reduces CUDA tensors only; gloo reduces CPU tensors
        return self.device if dist.get_backend() == "nccl" else torch.device("cpu")

    def barrier(self) -> None:
        """Wait until every rank gets here."""
        if not self.enabled:
            return
        if dist.get_backend() == "nccl":
            dist.barrier(device_ids=[self.device.index])
        else:
            dist.barrier()

    def sum_tensor(self, tensor: torch.Tensor) -> torch.Tensor:
        """Elementwise sum of ``tensor`` over all ranks, as a new tensor on ``tensor``'s device
        (no host synchronisation with NCCL)."""
        if not self.enabled:
            return tensor
        t = tensor.to(self._comm_device())
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t.to(tensor.device)

    def all_true(self, flag: torch.Tensor) -> torch.Tensor:
        """``flag`` (a bool tensor) holds on every rank: a logical AND over the ranks, on the device."""
        if not self.enabled:
            return flag
        t = flag.to(device=self._comm_device(), dtype=torch.int32)
        dist.all_reduce(t, op=dist.ReduceOp.MIN)
        return t.to(flag.device).bool()

    def broadcast_module(self, module: nn.Module) -> None:
        """Copy rank 0's parameters and buffers into ``module`` on every rank, in place."""
        if not self.enabled:
            return
        with torch.no_grad():
            for tensor in [*module.parameters(), *module.buffers()]:
                dist.broadcast(tensor.data, src=0)

    def wrap(self, module: nn.Module) -> nn.Module:
        """``module`` in DistributedDataParallel (gradients averaged over ranks in backward);
        ``module`` itself in a world of one."""
        if not self.enabled:
            return module
        from torch.nn.parallel import DistributedDataParallel

        device_ids = [self.device.index] if self.device.type == "cuda" else None
        return DistributedDataParallel(module, device_ids=device_ids)

    def close(self) -> None:
        """Destroy the process group if :func:`setup` created it (idempotent)."""
        if self.owns_group and dist.is_initialized():
            dist.destroy_process_group()
        self.owns_group = False


def setup(device: str | torch.device = "auto") -> DistributedContext:
    """The :class:`DistributedContext` of this process; initialises the process group under torchrun.

    Args:
        device: ``auto``, ``cpu`` or ``cuda`` (as :func:`~flowkit.training.runtime.resolve_device`).
            Under torchrun with a CUDA device each process takes ``cuda:LOCAL_RANK`` and NCCL;
            on the CPU the processes talk over gloo.

    Returns:
        The context; call :meth:`DistributedContext.close` at the end.  A process group that
        already exists (the caller made it) is used as it is and left open.

    Raises:
        ValueError: a malformed ``RANK``/``WORLD_SIZE``/``LOCAL_RANK``, or fewer GPUs than
            processes on this machine.
    """
    base = resolve_device(device)
    if dist.is_available() and dist.is_initialized():
        rank, world, owns = dist.get_rank(), dist.get_world_size(), False
        local_rank = _env_int("LOCAL_RANK", rank)
    else:
        rank, world, local_rank = _env_int("RANK", 0), _env_int("WORLD_SIZE", 1), _env_int("LOCAL_RANK", 0)
        owns = world > 1
        if world < 1 or rank >= world:
            raise ValueError(f"RANK/WORLD_SIZE: expected 0 <= RANK < WORLD_SIZE, got RANK={rank}, WORLD_SIZE={world}")
    if world > 1 and base.type == "cuda":
        count = torch.cuda.device_count()
        if local_rank >= count:
            raise ValueError(
                f"LOCAL_RANK: process {local_rank} needs its own GPU but this machine has {count}; "
                f"use --nproc_per_node <= {count} or --device cpu"
            )
        base = torch.device("cuda", local_rank)
        torch.cuda.set_device(base)
    if owns:
        if not dist.is_available():
            raise ValueError("WORLD_SIZE > 1 but this PyTorch build has no torch.distributed")
        dist.init_process_group("nccl" if base.type == "cuda" else "gloo", rank=rank, world_size=world)
    return DistributedContext(rank=rank, world_size=world, local_rank=local_rank, device=base, owns_group=owns)
