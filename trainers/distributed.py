"""Small helpers over ``torch.distributed`` (started by someone else: Ray Train or torchrun)."""

from __future__ import annotations

import torch.distributed as dist


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def is_main_process() -> bool:
    return rank() == 0


def gather_to_main(items: list) -> list | None:
    """Concatenate every rank's list on rank 0 (``None`` elsewhere)."""
    if not is_distributed():
        return items
    gathered = [None] * world_size() if is_main_process() else None
    dist.gather_object(items, gathered, dst=0)
    if not is_main_process():
        return None
    return [item for part in gathered for item in part]
