"""Stage 2 training: the bidirectional transformer on ground-truth token maps alone (Eq. 6).

Tokens of full images are masked i.i.d. with a ratio drawn from U(lo, hi) per map, and the loss
is the cross-entropy at the masked positions. No image is decoded: the token arrays are the data.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import numpy as np
import torch
import torch.nn.functional as F

from ..config import TrainConfig, TransformerConfig, section, to_dict
from ..data.tokens import load_tokens, tokens_fingerprint
from ..saved import load_model, start_from
from ..train import loop_settings, run as train_stage
from ..transformer import build_transformer
from ..vqgan import VQModel

EVAL_MASK_RATIO = 0.5  # validation masks half of each map, with a fixed seed


def run(params: dict, vqgan: Path, tokens: Path, run_dir: Path, *, device: str | None = None,
        restart_on_change: bool = False) -> str:
    """Train the transformer on the token maps of `tokens`, over the codebook of the VQGAN of `vqgan`."""
    cfg, train_cfg = section(params, "transformer"), section(params, "train")
    model = load_model(vqgan, VQModel)
    return train_stage(lambda: TransformerStage(cfg, train_cfg, model, tokens), cfg.steps, params,
                       {"transformer": to_dict(cfg)}, run_dir, device=device, restart_on_change=restart_on_change)


def random_visible(shape: tuple[int, int], ratio_range: tuple[float, float], rng: torch.Generator) -> torch.Tensor:
    """(B, N) bool: each row keeps a random subset, its masked share drawn from U(lo, hi); at least
    one position of every row is masked and one kept."""
    b, n = shape
    lo, hi = ratio_range
    ratio = lo + (hi - lo) * torch.rand(b, 1, generator=rng)
    n_masked = (ratio * n).round().clamp(1, n - 1)  # (B, 1)
    rank = torch.rand(b, n, generator=rng).argsort(1).argsort(1)  # a random permutation per row
    return rank >= n_masked


class TransformerStage:
    name = "transformer"

    def __init__(self, cfg: TransformerConfig, train: TrainConfig, vqgan: VQModel, tokens_dir: Path):
        """`vqgan`: the trained VQGAN, whose codebook the transformer embeds visible tokens with."""
        self.cfg, self.train_cfg, self.tokens_dir = cfg, train, Path(tokens_dir)
        self.train_tokens, _ = load_tokens(tokens_dir, "train")
        codebook = vqgan.quantize.embedding.weight.detach().cpu()
        transformer = build_transformer(cfg, codebook, self.train_tokens.shape[1])
        if cfg.init_from:
            start_from(cfg.init_from, "transformer", transformer)
        self.modules = {"transformer": transformer}

    def config(self) -> dict:
        return {"train": loop_settings(self.train_cfg), "tokens": tokens_fingerprint(self.tokens_dir)}

    def optimizers(self, modules, world_size: int) -> dict[str, torch.optim.Optimizer]:
        groups = modules["transformer"].param_groups(self.cfg.weight_decay)
        return {"transformer": torch.optim.AdamW(groups, lr=self.cfg.lr, betas=self.cfg.betas)}

    def batches(self, rank: int, world_size: int, seed: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        rng = torch.Generator().manual_seed(seed * 1000 + rank)
        rows = np.arange(len(self.train_tokens))[rank::world_size]  # each rank its own share
        if len(rows) == 0:
            raise ValueError(f"{self.tokens_dir}/train.npy has {len(self.train_tokens)} maps, fewer than {world_size} ranks")
        while True:
            pick = rows[torch.randint(len(rows), (self.cfg.batch_size,), generator=rng).numpy()]
            tokens = torch.from_numpy(self.train_tokens[np.sort(pick)].astype(np.int64)).flatten(1)  # (B, N)
            yield tokens, random_visible(tokens.shape, self.cfg.mask_ratio, rng)

    def counts(self, batch) -> dict[str, int]:
        tokens, _ = batch
        return {"images": tokens.shape[0], "tokens": tokens.numel()}

    def loss(self, phase: str, modules, batch, step: int, scratch: dict):
        tokens, visible = batch
        logits = modules["transformer"](tokens, visible)  # (B, N, K)
        masked = ~visible
        loss = F.cross_entropy(logits[masked], tokens[masked])
        accuracy = (logits[masked].argmax(-1) == tokens[masked]).float().mean()
        return loss, {"masked_accuracy": accuracy.detach()}

    def evaluate(self, modules) -> dict[str, float]:
        """Masked-token loss and accuracy on val maps, half of each masked with a fixed seed."""
        tokens_np, _ = load_tokens(self.tokens_dir, "val")
        if len(tokens_np) == 0:
            return {}
        model = modules["transformer"]
        device = next(model.parameters()).device
        rng = torch.Generator().manual_seed(self.train_cfg.seed)
        tokens = torch.from_numpy(tokens_np[: self.train_cfg.eval_images].astype(np.int64)).flatten(1)
        visible = random_visible(tokens.shape, (EVAL_MASK_RATIO, EVAL_MASK_RATIO), rng)
        logits = model(tokens.to(device), visible.to(device)).cpu()
        masked = ~visible
        return {
            "val_masked_loss": F.cross_entropy(logits[masked], tokens[masked]).item(),
            "val_masked_accuracy": (logits[masked].argmax(-1) == tokens[masked]).float().mean().item(),
            "chance_accuracy": 1.0 / logits.shape[-1],
        }

    def pictures(self, modules, batch):
        return None  # token maps are pictured once the decoder exists (sampling stage)
