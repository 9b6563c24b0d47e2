"""Data-parallel healing under ``torchrun`` / ``accelerate launch``: the process group and its collectives,
and the FSDP option.

The backend follows the device: gloo for CPU processes, NCCL for GPU processes, each of which first
selects its own GPU (``torch.cuda.set_device(local_rank)``) and binds the group to it. Every collective
runs on a tensor of the group's device (NCCL reduces only CUDA tensors), the barrier names the process's
GPU, and the object collectives (``all_gather_object``, ``broadcast_object_list``) pick the current CUDA
device set above. A single process needs none of it.

Without ``fsdp`` every process holds the whole model and DDP averages the gradients. With ``fsdp``
(torch's FSDP2, ``fully_shard``: each decoder layer, then the whole model; the teacher too) each process
holds 1/N of the weights, gradients and AdamW moments, and gathers one layer at a time to compute, so a
model larger than one GPU trains on several. The processes read the model into CPU memory and shard it
from there (host memory: one copy per process while loading). Checkpoints hold the full, gathered tensors
in the same layout as without FSDP; validation runs on every process (the forward needs all of them), and
the merged result is assembled on rank 0 from the gathered weights. FSDP shards full-precision weights:
qlora's 4-bit base is refused, as is a single process.
"""

from __future__ import annotations

import contextlib
import copy
import os
import random
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from ..errors import DepthpruneError


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

            if self.collective_device.startswith("cuda"):
                dist.barrier(device_ids=[self.local_rank])  # NCCL: on this process's GPU, not a guessed one
            else:
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


@contextlib.contextmanager
def joined(device: str) -> Iterator[Processes]:
    """This process's place in the run for the block (see :func:`start`). A process group started here is
    destroyed when the block ends: left to the interpreter's exit, gloo's worker threads can outlive it and
    abort the process ("terminate called without an active exception") after the work succeeded. A group
    the caller started stays theirs."""
    import torch.distributed as dist

    started_here = world_size() > 1 and not dist.is_initialized()
    try:
        yield start(device)
    finally:
        if started_here and dist.is_initialized():
            dist.destroy_process_group()


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
        if device == "cuda":
            dist.init_process_group("nccl", device_id=torch.device(collective_device))
        else:
            dist.init_process_group("gloo")
    return Processes(dist.get_rank(), local_rank, world, collective_device)


# ------------------------------------------------------------------------------------------------ FSDP


def check_fsdp(o, quantized_base: bool, device: str, world: int) -> None:
    """Where ``fsdp`` cannot apply: a 4-bit base, or one process (nothing to shard over)."""
    if not getattr(o, "fsdp", False):
        return
    if quantized_base:
        raise DepthpruneError(f"--fsdp shards full-precision weights and cannot shard {o.method}'s 4-bit base: use "
                              "--method full (or lora, dora) with --fsdp, or qlora without it")
    if world < 2:
        raise DepthpruneError("--fsdp shards the model over several processes, and this is one: launch it with "
                              "torchrun --nproc_per_node N (N of 2 or more; one per GPU), or drop --fsdp")
    if device == "auto":
        raise DepthpruneError("--fsdp places one shard per process: use --device cuda (or cpu), not auto")


def skeleton(net: torch.nn.Module) -> torch.nn.Module:
    """A copy of ``net``'s modules whose parameters are on the meta device (no memory) and whose buffers are
    copied: rank 0 fills it with the gathered weights once training ends (:func:`gathered`)."""
    memo: dict = {}
    for p in net.parameters():
        memo.setdefault(id(p), torch.nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=p.requires_grad))
    for b in net.buffers():
        memo.setdefault(id(b), b.detach().clone())
    return copy.deepcopy(net, memo)


def _layers(model: torch.nn.Module):
    from ..model.load import decoder_layout

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return decoder_layout(base).layers


def shard(net: torch.nn.Module, processes: Processes, device: str, teacher: torch.nn.Module | None = None) -> None:
    """Shard ``net`` (and the teacher) in place over the processes: each decoder layer, then the rest."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cuda" if device == "cuda" else "cpu", (processes.world,))
    for model in filter(None, (teacher, net)):
        for layer in _layers(model):
            fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)

    @contextlib.contextmanager
    def no_sync():  # what DDP's no_sync does: accumulate micro-batch gradients without reducing them
        net.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            net.set_requires_gradient_sync(True)

    net.no_sync = no_sync


def is_sharded(model: torch.nn.Module) -> bool:
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) for p in model.parameters())


def _full_options(**extra):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, **extra)


def full_training_state(net: torch.nn.Module, optimizer, names: list[str]) -> tuple[dict, dict]:
    """Gather (all processes take part) the trainable weights and the optimizer state, whole, onto rank 0's
    CPU, in the layout of one process's ``optimizer.state_dict()`` (parameters by index in ``names``);
    other ranks get empty dicts."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    weights = get_model_state_dict(net, options=_full_options(cpu_offload=True))
    state = get_optimizer_state_dict(net, optimizer, options=_full_options(cpu_offload=True))
    if not weights:
        return {}, {}
    index = {name: i for i, name in enumerate(names)}
    return ({name: weights[name] for name in names},
            {"state": {index[name]: value for name, value in state["state"].items()},
             "param_groups": [{**g, "params": [index[n] for n in g["params"]]} for g in state["param_groups"]]})


def load_full_training_state(net: torch.nn.Module, optimizer, names: list[str], weights: dict, state: dict) -> None:
    """Every process loads the whole checkpoint (``full_training_state``'s layout) and keeps its shards."""
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

    set_model_state_dict(net, weights, options=_full_options(strict=False))
    by_name = {"state": {names[int(i)]: value for i, value in state["state"].items()},
               "param_groups": [{**g, "params": [names[i] for i in g["params"]]} for g in state["param_groups"]]}
    set_optimizer_state_dict(net, optimizer, by_name, options=_full_options())


def gathered(net: torch.nn.Module, skeleton_net: torch.nn.Module, processes: Processes) -> torch.nn.Module | None:
    """The trained model, whole, on rank 0's CPU (its :func:`skeleton` filled with the gathered weights);
    None on the other ranks. Every process takes part."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    weights = get_model_state_dict(net, options=_full_options(cpu_offload=True))
    processes.barrier()
    if not processes.main:
        return None
    skeleton_net.load_state_dict(weights, strict=False, assign=True)
    left = [n for n, p in skeleton_net.named_parameters() if p.is_meta]
    if hasattr(skeleton_net, "tie_weights"):
        skeleton_net.tie_weights()
        left = [n for n, p in skeleton_net.named_parameters() if p.is_meta]
    if left:
        raise RuntimeError(f"FSDP: no gathered weight for {left[0]}")
    return skeleton_net


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
