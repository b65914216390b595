"""What a training step needs beside the loop: batches moved to the device and what they hold,
running means of the logged numbers, and the modes a phase or an evaluation runs in."""

from __future__ import annotations

import contextlib
import random
from typing import Iterator, Mapping

import numpy as np
import torch
from torch import nn



class Meter:
    """Sums of logged numbers since the last log. Tensors stay on the device until `means`."""

    def __init__(self):
        self.sums, self.n, self.counts = {}, {}, {}

    def add(self, values: Mapping[str, float | torch.Tensor]) -> None:
        for k, v in values.items():
            self.sums[k] = self.sums.get(k, 0.0) + (v.detach().float() if isinstance(v, torch.Tensor) else float(v))
            self.n[k] = self.n.get(k, 0) + 1

    def count(self, counts: Mapping[str, int]) -> None:
        for k, v in counts.items():
            self.counts[k] = self.counts.get(k, 0) + v

    def means(self) -> dict[str, float]:
        return {k: float(s) / self.n[k] for k, s in self.sums.items()}


def to_device(batch, device: torch.device):
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, Mapping):
        return {k: to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):
        return type(batch)(*(to_device(v, device) for v in batch))
    if isinstance(batch, (list, tuple)):
        return type(batch)(to_device(v, device) for v in batch)
    return batch


def counts(stage, batch) -> dict[str, int]:
    if hasattr(stage, "counts"):
        return stage.counts(batch)
    first = _first_tensor(batch)
    return {"images": first.shape[0]} if first is not None and first.ndim else {}


def _first_tensor(batch):
    if isinstance(batch, torch.Tensor):
        return batch
    items = batch.values() if isinstance(batch, Mapping) else batch if isinstance(batch, (list, tuple)) else ()
    return next((t for t in map(_first_tensor, items) if t is not None), None)


@contextlib.contextmanager
def inference(modules, autocast) -> Iterator[None]:
    """Eval mode, no gradients, and the RNGs put back after, so that logging pictures or
    evaluating does not change what training draws."""
    modes = [(m, m.training) for m in modules]
    np_state, py_state = np.random.get_state(), random.getstate()
    cuda = [torch.cuda.current_device()] if torch.cuda.is_available() and torch.cuda.is_initialized() else []
    with torch.random.fork_rng(devices=cuda), torch.no_grad(), autocast():
        for m, _ in modes:
            m.eval()
        try:
            yield
        finally:
            for m, mode in modes:
                m.train(mode)
            np.random.set_state(np_state)
            random.setstate(py_state)


@contextlib.contextmanager
def only_trainable(params: list[nn.Parameter], ids: set[int]) -> Iterator[None]:
    """Only the current phase's parameters require grad, so its backward fills no other
    phase's gradients."""
    before = [p.requires_grad for p in params]
    for p in params:
        p.requires_grad_(id(p) in ids)
    try:
        yield
    finally:
        for p, flag in zip(params, before):
            p.requires_grad_(flag)
