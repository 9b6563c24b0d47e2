"""Data-parallel healing under ``torchrun`` / ``accelerate launch``: the process group and its collectives.

The backend follows the device: gloo for CPU processes, NCCL for GPU processes, each of which first
selects its own GPU (``torch.cuda.set_device(local_rank)``). Every collective runs on a tensor of the
group's device (NCCL reduces only CUDA tensors), and the object collectives (``all_gather_object``,
``broadcast_object_list``) pick the current CUDA device set above. A single process needs none of it.
"""

from __future__ import annotations

import os
import random
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Processes:
    """Which process this is, of how many, and where its collectives run."""

    rank: int = 0
    local_rank: int = 0
    world: int = 1
    collective_device: str = "cpu"  # 'cpu' (gloo) or 'cuda:<local rank>' (nccl)

    @property
    def main(self) -> bool:
        return self.rank == 0

    def all_mean(self, values: torch.Tensor) -> torch.Tensor:
        """The mean of ``values`` over the processes (returned on the CPU)."""
        if self.world == 1:
            return values
        import torch.distributed as dist

        values = values.to(self.collective_device)
        dist.all_reduce(values)
        return (values / self.world).cpu()

    def barrier(self) -> None:
        if self.world > 1:
            import torch.distributed as dist

            dist.barrier()

    def broadcast(self, value):
        """Rank 0's ``value`` on every process."""
        if self.world == 1:
            return value
        import torch.distributed as dist

        shared = [value]
        dist.broadcast_object_list(shared, src=0)
        return shared[0]

    def gather_rng(self) -> list[dict]:
        """Every process's RNG state (each keeps its own stream: LoRA dropout differs per process)."""
        if self.world == 1:
            return [rng_state()]
        import torch.distributed as dist

        states: list = [None] * self.world
        dist.all_gather_object(states, rng_state())
        return states


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def start(device: str) -> Processes:
    """This process's place in the run, starting the process group under torchrun (``device``: 'cpu' or
    'cuda'; 'auto' is one process and never gets here with several)."""
    world = world_size()
    if world == 1:
        return Processes()
    import torch.distributed as dist

    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    collective_device = "cpu"
    if device == "cuda":
        torch.cuda.set_device(local_rank)
        collective_device = f"cuda:{local_rank}"
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device == "cuda" else "gloo")
    return Processes(dist.get_rank(), local_rank, world, collective_device)


def rng_state() -> dict:
    import numpy as np

    state = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    import numpy as np

    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
