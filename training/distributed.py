"""Process-group setup and the parallel wrappers (FSDP2 / DDP), applied from outside the model.

`torchrun` sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT; without them the
same code runs as a single process with no process group. CUDA uses NCCL, CPU uses gloo.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn


@dataclass
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def init_distributed(system) -> DistInfo:
    """Read the torchrun environment, pick the device and start the process group if needed."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    want = system.device
    if want == "auto":
        want = "cuda" if torch.cuda.is_available() else "cpu"
    if want == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError("system.device is 'cuda' but no CUDA device is available; use --system.device cpu")
        if local_rank >= torch.cuda.device_count():
            raise RuntimeError(f"LOCAL_RANK {local_rank} but only {torch.cuda.device_count()} CUDA devices; "
                               f"use torchrun --nproc-per-node <= {torch.cuda.device_count()}")
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    elif want == "cpu":
        device = torch.device("cpu")
    else:
        raise ValueError(f"system.device must be auto, cpu or cuda, not {system.device!r}")
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=system.dist_timeout_s),
                                device_id=device if device.type == "cuda" else None)
    return DistInfo(rank, world, local_rank, device)


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()


def all_reduce_max(value: float, info: DistInfo) -> float:
    if not info.enabled:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=info.device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t.item())


def all_reduce_sum(values: list[float], info: DistInfo) -> list[float]:
    if not info.enabled:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=info.device)
    dist.all_reduce(t)
    return t.tolist()


def destroy(info: DistInfo) -> None:
    if info.enabled and dist.is_initialized():
        dist.destroy_process_group()


def resolve_strategy(parallel: str, info: DistInfo) -> str:
    if parallel not in ("auto", "fsdp", "ddp", "none"):
        raise ValueError(f"system.parallel must be auto, fsdp, ddp or none, not {parallel!r}")
    if not info.enabled:
        return "none"
    if parallel == "none":
        raise ValueError("system.parallel is 'none' but WORLD_SIZE > 1; use fsdp or ddp")
    return "fsdp" if parallel == "auto" else parallel


def apply_fsdp(model: nn.Module, compute_dtype: torch.dtype) -> nn.Module:
    """FSDP2: shard each block, then the root (embeddings, final norm, tied head).

    bf16 compute params with fp32 gradient reduction on GPU; fp32 everywhere on CPU.
    """
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mp = MixedPrecisionPolicy(param_dtype=compute_dtype, reduce_dtype=torch.float32)
    for i, block in enumerate(model.blocks):
        # The last block's params are needed again right away by the root: keep them unsharded.
        fully_shard(block, mp_policy=mp, reshard_after_forward=i < len(model.blocks) - 1)
    fully_shard(model, mp_policy=mp)
    return model


def apply_ddp(model: nn.Module, info: DistInfo) -> nn.Module:
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(model, device_ids=[info.local_rank] if info.device.type == "cuda" else None)
