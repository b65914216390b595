"""A tiny but real two-phase stage: a test fixture for the training loop, not part of the method.

A "generator" MLP regresses a fixed synthetic dataset, y = tanh(x A) B, plus a small adversarial
term from a "critic" that it calls without training it (as a VQGAN calls its discriminator).
The critic, in a second phase, learns to predict the generator's per-sample error from the
detached output the generator phase left in `scratch`; it starts at `critic_start`, so its
phase is skipped at first. Every loss is mean-reduced, so accumulating micro-batches equals one
larger batch.

Run as a script it trains into a run folder (tracking off, CPU): the tests start it as a
subprocess to kill and resume it, to stop it with SIGTERM, and under torchrun.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from latent_inpaint.config import TrackingConfig, TrainConfig
from latent_inpaint.train import train

IN, OUT, N_TRAIN, N_VAL = 4, 2, 64, 16


class Mlp(nn.Sequential):
    """Linear-tanh-linear, with the spec() every saved module has."""

    def __init__(self, n_in: int, hidden: int, n_out: int):
        super().__init__(nn.Linear(n_in, hidden), nn.Tanh(), nn.Linear(hidden, n_out))

    def spec(self) -> dict:
        return {"model": "Mlp", "n_in": self[0].in_features, "hidden": self[0].out_features,
                "n_out": self[2].out_features}


def dataset(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1234)  # the same target function for every split
    a, b = torch.randn(IN, 8, generator=g), torch.randn(8, OUT, generator=g) / 2
    x = torch.randn(n, IN, generator=torch.Generator().manual_seed(seed))
    return x, torch.tanh(x @ a) @ b


class TinyStage:
    name = "tiny"

    def __init__(
        self,
        hidden: int = 32,
        batch_size: int = 8,
        critic_start: int = 2,
        lr: float = 3e-2,
        adversarial: float = 0.01,
        step_delay: float = 0.0,
        progress: Path | None = None,
        seed: int = 0,
    ):
        self.hidden, self.batch_size, self.critic_start = hidden, batch_size, critic_start
        self.lr, self.adversarial = lr, adversarial
        self.step_delay, self.progress = step_delay, progress
        self.x, self.y = dataset(N_TRAIN, seed=1)
        self.val_x, self.val_y = dataset(N_VAL, seed=2)
        torch.manual_seed(seed)
        self.modules = {"gen": Mlp(IN, hidden, OUT), "critic": Mlp(IN + OUT, hidden, 1)}
        self.dtypes: set[torch.dtype] = set()  # what the generator computed in (autocast checks)
        self.leaks: list[str] = []  # gradients that reached another phase's parameters
        self._critic_step = -1

    def optimizers(self, modules, world_size):
        return {
            "gen": torch.optim.Adam(modules["gen"].parameters(), lr=self.lr),
            "critic": torch.optim.SGD(modules["critic"].parameters(), lr=self.lr * 5, momentum=0.9),
        }

    def batches(self, rank: int, world_size: int, seed: int):
        """Epochs of a seeded permutation, cut into global batches of batch_size x world_size;
        each rank takes its slice. The cut does not depend on the batch size."""
        g = torch.Generator().manual_seed(seed)
        order = torch.empty(0, dtype=torch.long)
        size = self.batch_size * world_size
        while True:
            while len(order) < size:
                order = torch.cat([order, torch.randperm(N_TRAIN, generator=g)])
            take, order = order[:size], order[size:]
            mine = take[rank * self.batch_size : (rank + 1) * self.batch_size]
            yield {"x": self.x[mine], "y": self.y[mine]}

    def loss(self, phase, modules, batch, step, scratch):
        x, y = batch["x"], batch["y"]
        if phase == "gen":
            if self.step_delay:
                time.sleep(self.step_delay)
            if self.progress is not None:
                self.progress.write_text(str(step))
            if any(p.requires_grad for p in modules["critic"].parameters()):
                self.leaks.append(f"step {step}: the critic is trainable in the generator phase")
            pred = modules["gen"](x)  # (B, OUT)
            self.dtypes.add(pred.dtype)
            mse = F.mse_loss(pred.float(), y)
            fooled = modules["critic"](torch.cat([x, pred], 1)).float().mean()
            scratch["pred"] = pred.detach()
            return mse + self.adversarial * fooled, {"mse": mse.detach()}
        if step < self.critic_start:
            return None, {}
        if self._critic_step != step:  # the step's first micro-batch: no gradient yet
            self._critic_step = step
            if any(p.grad is not None for p in modules["critic"].parameters()):
                self.leaks.append(f"step {step}: the critic holds gradients before its phase")
        pred = scratch["pred"]
        err = (pred.float() - y).pow(2).mean(1, keepdim=True)  # (B, 1)
        loss = F.mse_loss(modules["critic"](torch.cat([x, pred], 1)).float(), err)
        return loss, {"critic_err": err.mean()}

    def pictures(self, modules, batch):
        pred = modules["gen"](self.val_x).float()  # (N_VAL, OUT)
        gray = ((pred.clamp(-1, 1) + 1) * 127.5).to(torch.uint8).numpy()
        return np.repeat(np.repeat(gray, 8, axis=0), 8, axis=1)[..., None].repeat(3, axis=2)

    def evaluate(self, modules):
        return {"val_mse": F.mse_loss(modules["gen"](self.val_x).float(), self.val_y).item()}

    def config(self):
        return {"hidden": self.hidden, "dims": {"in": IN, "out": OUT}}


def train_config(**overrides) -> TrainConfig:
    values = dict(
        seed=0, grad_accum=1, workers=0, precision="fp32", log_every=2,
        checkpoint_every=1000, image_every=1000, eval_images=N_VAL,
    )  # fmt: skip
    values.update(overrides)
    return TrainConfig(**values)


NO_TRACKING = TrackingConfig(enabled=False, uri=None, experiment="test", log_images=False, log_models=False)


def main(argv: list[str]) -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--run-dir", type=Path, required=True)
    p.add_argument("--steps", type=int, required=True)
    p.add_argument("--checkpoint-every", type=int, default=1000)
    p.add_argument("--step-delay", type=float, default=0.0)
    p.add_argument("--progress", type=Path)
    p.add_argument("--hidden", type=int, default=32)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    stage = TinyStage(hidden=args.hidden, step_delay=args.step_delay, progress=args.progress)
    cfg = train_config(checkpoint_every=args.checkpoint_every)
    train(stage, cfg, args.steps, args.run_dir, NO_TRACKING, {"tiny": {"hidden": args.hidden}}, device="cpu")


if __name__ == "__main__":
    main(sys.argv[1:])
