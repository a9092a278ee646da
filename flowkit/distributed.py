"""Multi-process training with ``torchrun``: an alias of :mod:`flowkit.training.distributed`
(where the DDP context now lives, as part of the training runtime)."""

from flowkit.training.distributed import DistributedContext, env_rank, setup

__all__ = ["DistributedContext", "env_rank", "setup"]
