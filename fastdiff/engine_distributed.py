"""fastdiff.sample over torch.distributed: every rank cuts the batch into the same chunks, runs chunk j when
``j % world_size`` is its rank, and all-gathers the chunks, so every rank returns the whole batch."""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["dist_info", "min_over_ranks", "seeds_of_rank0", "gather_chunks"]


def dist_info(distributed) -> tuple[int, int]:
    if distributed is False:
        return 0, 1
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    if distributed:
        raise ValueError("distributed=True needs an initialised torch.distributed process group")
    return 0, 1


def _comm_device(device: torch.device) -> torch.device:
    import torch.distributed as dist

    if dist.get_backend() == "nccl":
        return device if device.type == "cuda" else torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def min_over_ranks(value: int, device: torch.device) -> int:
    import torch.distributed as dist

    t = torch.tensor([int(value)], dtype=torch.int64, device=_comm_device(device))
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return int(t.item())


def seeds_of_rank0(seeds: list, device: torch.device) -> list:
    """Fresh seeds drawn on every rank: rank 0's, so that all ranks sample the same batch."""
    import torch.distributed as dist

    t = torch.tensor(seeds, dtype=torch.int64, device=_comm_device(device))
    dist.broadcast(t, src=0)
    return t.tolist()


def gather_chunks(local: Tensor, chunks: list, batch_size: int, world: int, sample_shape,
            device: torch.device) -> Tensor:
    """All-gather the ranks' chunks (rank r holds chunks r, r + world, ...) into the (n, ...) batch."""
    import torch.distributed as dist

    per_rank = -(-len(chunks) // world) * batch_size
    comm_device = _comm_device(device) if dist.get_backend() == "nccl" else device
    buf = torch.zeros((per_rank, *sample_shape), dtype=local.dtype, device=comm_device)
    buf[: local.shape[0]].copy_(local)
    parts = [torch.empty_like(buf) for _ in range(world)]
    dist.all_gather(parts, buf)
    n = chunks[-1][1] if chunks else 0
    out = torch.empty((n, *sample_shape), dtype=local.dtype, device=device)
    for j, (c0, c1) in enumerate(chunks):
        k = (j // world) * batch_size
        out[c0:c1].copy_(parts[j % world][k: k + (c1 - c0)])
    return out
