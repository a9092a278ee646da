"""Where and how a run executes: the device, CPU threads and seeding (DDP: :mod:`.distributed`).

Randomness of a run is a function of integers: :func:`seed_all` mixes a key such as
``(seed, rank, 0, epoch)`` into one seed for torch (CPU and CUDA), numpy and ``random``, so a
resumed run draws exactly the noise an uninterrupted one would.
"""

from __future__ import annotations

import contextlib
import random
from collections.abc import Iterator

import numpy as np
import torch

__all__ = ["DEVICES", "cpu_threads", "default_threads", "resolve_device", "seed_all"]

DEVICES = ("auto", "cpu", "cuda")


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``auto`` -> CUDA when available else CPU; ``cuda`` without a GPU raises ``ValueError``.

    Example:
        >>> resolve_device("cpu")
        device(type='cpu')
    """
    if isinstance(device, torch.device):
        return device
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device not in DEVICES and not str(device).startswith("cuda:"):
        raise ValueError(f"device: expected one of {DEVICES}, got {device!r}")
    if str(device).startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device: {device!r} was asked for but CUDA is not available here; use --device cpu or auto")
    return torch.device(device)


def seed_all(*key: int) -> None:
    """Seed torch (CPU and CUDA), numpy and python from the integers ``key`` (mixed by SeedSequence)."""
    # the trailing constant keeps keys that differ only by trailing zeros apart (SeedSequence pads with zeros)
    seed = int(np.random.SeedSequence([*(int(k) for k in key), 0x5EED]).generate_state(1)[0])
    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)


@contextlib.contextmanager
def cpu_threads(threads: int | None) -> Iterator[None]:
    """Run the block with ``torch.set_num_threads(threads)`` and restore the previous count after.

    ``None`` or 0 leaves torch's setting alone.  Small flows train fastest on one thread: their
    operations are too short to split, and idle threads spin on a busy CPU.
    """
    if not threads:
        yield
        return
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def default_threads(threads: int | None, device: torch.device) -> int | None:
    """The command line's thread count: ``threads`` when given, else 1 on the CPU (small flows
    run fastest on one thread; on a busy 2-core machine two threads made a step 3x-15x slower)
    and torch's default on a GPU."""
    if threads is not None:
        return threads
    return 1 if device.type == "cpu" else None
