"""Where the loop runs, and what every rank must agree on.

One process on CPU or a GPU, or one of several under torchrun: torchrun sets RANK, WORLD_SIZE and
LOCAL_RANK; with WORLD_SIZE > 1 the loop joins a process group (nccl on CUDA, gloo on CPU) and
wraps its trained modules in DDP. Small decisions that all ranks must share (stop after this
step? do the weights agree?) travel over a gloo group on the CPU, so they never wait on, or
synchronise with, the GPU stream. Also here: seeding, the parameter digest the ranks compare,
and the stop requests (SIGTERM, Ctrl-C) the loop answers with a checkpoint.
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import os
import random
import signal
import threading
from typing import Mapping

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

# Rank 0 alone evaluates and writes checkpoints while the others wait at a barrier.
TIMEOUT = datetime.timedelta(minutes=30)


class DDP(DistributedDataParallel):
    """DDP whose wrapped module's attributes read through it, so a stage calls
    `modules["vqgan"].last_layer()` whether the loop wrapped the module or not."""

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "module":  # not set yet: DDP's own __init__ is asking
                raise
            return getattr(self.module, name)


@dataclasses.dataclass
class Distributed:
    rank: int
    local_rank: int
    world_size: int
    device: torch.device
    owns_group: bool  # this object started the process group, so it ends it
    control: object | None  # gloo group for CPU-side agreement; None: the default group is gloo

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def ddp(self) -> bool:
        return self.world_size > 1

    @classmethod
    def start(cls, device: str | torch.device | None = None) -> Distributed:
        """Join torchrun's process group if there is one. `device` None: the local GPU if any,
        else the CPU; "cpu" forces the CPU (and gloo) even where GPUs exist."""
        size = int(os.environ.get("WORLD_SIZE", "1"))
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        if device is None:
            device = f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu"
        device = torch.device(device)
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", local_rank)
        if device.type == "cuda":
            torch.cuda.set_device(device)
        if size == 1:
            return cls(0, 0, 1, device, False, None)
        owns = not dist.is_initialized()
        if owns:
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=TIMEOUT)
        control = dist.new_group(backend="gloo", timeout=TIMEOUT) if dist.get_backend() != "gloo" else None
        return cls(dist.get_rank(), local_rank, dist.get_world_size(), device, owns, control)

    def close(self) -> None:
        if self.owns_group and dist.is_initialized():
            dist.destroy_process_group()

    def wrap(self, module: nn.Module, find_unused_parameters: bool = False) -> nn.Module:
        """DDP around a module with trainable parameters when there are several ranks."""
        if not self.ddp or not any(p.requires_grad for p in module.parameters()):
            return module
        ids = [self.device.index] if self.device.type == "cuda" else None
        return DDP(module, device_ids=ids, find_unused_parameters=find_unused_parameters)

    def barrier(self) -> None:
        if self.ddp:
            dist.barrier(group=self.control)

    def gather(self, obj) -> list:
        """Every rank's `obj` (picklable), in rank order, on every rank."""
        if not self.ddp:
            return [obj]
        out = [None] * self.world_size
        dist.all_gather_object(out, obj, group=self.control)
        return out

    def broadcast(self, obj):
        """Rank 0's `obj` on every rank."""
        if not self.ddp:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0, group=self.control)
        return box[0]

    def any(self, flag: bool) -> bool:
        """True on every rank if `flag` is true on at least one."""
        if not self.ddp:
            return flag
        t = torch.tensor([int(flag)])
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self.control)
        return bool(t.item())


def seed_everything(seed: int) -> None:
    """Seed torch, numpy and random. Also called before a stage builds its modules, so that the
    same train.seed gives the same initial weights (DDP then broadcasts rank 0's anyway)."""
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)


def param_digest(modules: Mapping[str, nn.Module]) -> str:
    """sha256 over every parameter's name, dtype, shape and bytes. Buffers are left out: DDP
    keeps those in step only at the start of each forward (BatchNorm statistics drift)."""
    h = hashlib.sha256()
    for name in sorted(modules):
        for pname, p in modules[name].named_parameters():
            t = p.detach().cpu().contiguous()
            h.update(f"{name}.{pname}:{t.dtype}:{tuple(t.shape)}".encode())
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


class StopRequests:
    """SIGINT and SIGTERM (SLURM's preemption notice) ask for a checkpoint and a stop after the
    current step; a second Ctrl-C stops at once. torchrun forwards the SIGTERM it gets; SLURM and
    torchrun send SIGKILL about 30 s later, so the checkpoint must be written within that (on
    SLURM `--signal=TERM@120` gives earlier notice). SIGKILL itself cannot be caught: the
    periodic checkpoints bound what it loses."""

    def __enter__(self):
        self.signum = None
        self._previous = {}
        if threading.current_thread() is threading.main_thread():
            for s in (signal.SIGINT, signal.SIGTERM):
                self._previous[s] = signal.signal(s, self._handle)
        return self

    def _handle(self, signum, frame):
        if signum == signal.SIGINT and self.signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signum = self.signum or signum

    def __exit__(self, *exc):
        for s, handler in self._previous.items():
            signal.signal(s, handler)
