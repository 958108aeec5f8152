"""torch.distributed for training and batch generation: the process group (gloo on CPU, nccl on CUDA), DDP or
FSDP2 wrapping, gradient-sync control during accumulation, and full (unsharded) state dicts for checkpoints.

One process (no ``WORLD_SIZE`` in the environment) needs no process group at all; ``torchrun`` sets
``RANK`` / ``WORLD_SIZE`` / ``LOCAL_RANK`` / ``MASTER_ADDR`` / ``MASTER_PORT``, on one machine or many.
"""

from __future__ import annotations

import contextlib
import datetime
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

STRATEGIES = ("ddp", "fsdp")


@dataclass
class Processes:
    """This process's place among the training processes."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    owns_group: bool = False  # the process group was created by start(), and close() ends it

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """``tensor`` summed over all processes (a copy)."""
        tensor = tensor.detach().clone()
        if self.distributed:
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor

    def close(self) -> None:
        if self.owns_group and dist.is_initialized():
            dist.destroy_process_group()


def start(device: str | None = None) -> Processes:
    """Join the process group that ``torchrun`` describes in the environment (or run alone), unless the caller
    has set one up already. ``device``: ``None`` picks ``cuda:<local rank>`` when CUDA is available, else the CPU."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    if device is None:
        device = f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    owns_group = world_size > 1 and not dist.is_initialized()
    if owns_group:
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend, timeout=datetime.timedelta(minutes=30),
                                **({"device_id": device} if device.type == "cuda" else {}))
    return Processes(rank, world_size, local_rank, device, owns_group)


def wrap(model: nn.Module, strategy: str, processes: Processes, blocks: Sequence[nn.Module]) -> nn.Module:
    """``model`` ready for training across the processes: DistributedDataParallel (``"ddp"``) or FSDP2
    (``"fsdp"``: ``fully_shard`` on every block of ``blocks`` and then the root, so each block's parameters,
    gradients and optimizer states are sharded and gathered only while it runs). One process: unchanged."""
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy: expected one of {list(STRATEGIES)}, got {strategy!r}")
    if not processes.distributed:
        return model
    if strategy == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        ids = [processes.device.index] if processes.device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=ids)
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(processes.device.type, (processes.world_size,))
    for block in blocks:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def unwrapped(model: nn.Module) -> nn.Module:
    """The module inside a DDP wrapper (FSDP2 shards the module in place: it is its own root)."""
    return getattr(model, "module", model) if type(model).__name__ == "DistributedDataParallel" else model


@contextlib.contextmanager
def gradient_sync(model: nn.Module, enabled: bool) -> Iterator[None]:
    """Synchronise gradients in this backward only if ``enabled`` (the last micro-batch of an accumulation)."""
    if type(model).__name__ == "DistributedDataParallel" and not enabled:
        with model.no_sync():
            yield
        return
    if hasattr(model, "set_requires_gradient_sync"):  # FSDP2
        model.set_requires_gradient_sync(enabled)
    yield


def _options(processes: Processes, full: bool = True):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    # cpu_offload also keeps the gathered tensors on rank 0 only
    return StateDictOptions(full_state_dict=full, cpu_offload=processes.distributed)


def full_model_state(model: nn.Module, processes: Processes) -> dict[str, torch.Tensor]:
    """The unsharded state dict (clean names, CPU) on the main process; other processes get ``{}`` when
    distributed. Every process must call it (FSDP gathers)."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    state = get_model_state_dict(model, options=_options(processes))
    return {k: v.detach().cpu() for k, v in state.items()}


def load_model_state(model: nn.Module, state: dict[str, torch.Tensor], processes: Processes) -> None:
    """Load a full (possibly partial: missing keys keep their values) state dict on every process."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    set_model_state_dict(model, state, options=StateDictOptions(full_state_dict=True, strict=False))


def full_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, processes: Processes) -> dict:
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    return get_optimizer_state_dict(model, optimizer, options=_options(processes))


def load_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, state: dict, processes: Processes) -> None:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    set_optimizer_state_dict(model, optimizer, optim_state_dict=state, options=StateDictOptions(full_state_dict=True))


def full_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """A sharded (DTensor) tensor gathered whole; a plain tensor as it is. Every process must call it."""
    return tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor


def like(tensor: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """A full ``tensor`` laid out like ``reference``: sharded the same way if ``reference`` is a DTensor."""
    if hasattr(reference, "device_mesh"):
        from torch.distributed.tensor import distribute_tensor

        return distribute_tensor(tensor.to(reference.device, reference.dtype), reference.device_mesh,
                                 reference.placements)
    return tensor.to(reference.device, reference.dtype)
