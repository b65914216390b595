"""Stage 1 training: the restrictive encoder predicts E_VQ(X)'s tokens at visible token positions
(Eq. 5), from the masked image alone, under MAT free-form training masks."""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import torch
import torch.nn.functional as F

from ..config import EncoderConfig, MasksConfig, TrainConfig, section, to_dict
from ..data.ingest import shards_fingerprint
from ..data.masked import MaskedBatch, MaskedImages
from ..data.tokens import tokens_fingerprint
from ..encoder import build_encoder, partially_masked
from ..saved import load_model, start_from
from ..train import loop_settings, run as train_stage
from ..vqgan import VQModel

EVAL_MASKS = "large"


def run(params: dict, vqgan: Path, shards: Path, tokens: Path, run_dir: Path, *, kind: str = "restrictive",
        device: str | None = None, restart_on_change: bool = False) -> str:
    """Train the `kind` (restrictive | vanilla) encoder of the VQGAN of `vqgan` into `run_dir`."""
    cfg, masks, train_cfg = (section(params, name) for name in ("encoder", "masks", "train"))
    model = load_model(vqgan, VQModel)
    return train_stage(lambda: EncoderStage(kind, model, cfg, masks, train_cfg, shards, tokens), cfg.steps, params,
                       {"encoder": to_dict(cfg), "masks": to_dict(masks)}, run_dir, device=device,
                       restart_on_change=restart_on_change)


def token_metrics(logits: torch.Tensor, target: torch.Tensor, token_mask: torch.Tensor, mask: torch.Tensor,
                  factor: int) -> dict[str, torch.Tensor]:
    """Cross-entropy and accuracy at visible tokens, and accuracy at the partially masked ones
    (left out when the batch has none, rather than logged as a NaN)."""
    right = logits.argmax(1) == target  # (B, h, w)
    partial = partially_masked(mask, token_mask, factor)
    ce = F.cross_entropy(logits, target, reduction="none")  # (B, h, w)
    # A mask may hide every token: the loss is then a zero that still reaches every parameter.
    metrics = {
        "ce": ce[token_mask].mean() if token_mask.any() else logits.sum() * 0,
        "accuracy": right[token_mask].float().mean() if token_mask.any() else torch.zeros((), device=logits.device),
        "visible_tokens": token_mask.float().mean(),
    }
    if partial.any():
        metrics["partial_accuracy"] = right[partial].float().mean()
    return metrics


class EncoderStage:
    def __init__(self, kind: str, vqgan: VQModel, cfg: EncoderConfig, masks: MasksConfig, train: TrainConfig,
                 shards_dir: Path, tokens_dir: Path):
        """`vqgan`: the trained VQGAN, whose layout and codebook size the encoder takes."""
        self.name = "encoder" if kind == "restrictive" else f"encoder_{kind}"
        self.cfg, self.masks, self.train_cfg = cfg, masks, train
        self.factor, self.n_embed = vqgan.factor, vqgan.cfg.n_embed
        self.shards_dir, self.tokens_dir = Path(shards_dir), Path(tokens_dir)
        encoder = build_encoder(kind, vqgan.cfg, cfg, vqgan.resolution)
        if cfg.init_from:
            start_from(cfg.init_from, "encoder", encoder)
        self.modules = {"encoder": encoder}
        self.data = {split: MaskedImages(shards_dir, tokens_dir, split, vqgan.factor) for split in ("train", "val")}

    def config(self) -> dict:
        return {"train_masks": to_dict(self.masks.train), "train": loop_settings(self.train_cfg),
                "data": shards_fingerprint(self.shards_dir), "tokens": tokens_fingerprint(self.tokens_dir)}

    def optimizers(self, modules, world_size: int) -> dict[str, torch.optim.Optimizer]:
        return {"encoder": torch.optim.Adam(modules["encoder"].parameters(), lr=self.cfg.lr, betas=self.cfg.betas)}

    def batches(self, rank: int, world_size: int, seed: int) -> Iterator[MaskedBatch]:
        return self.data["train"].training(self.cfg.batch_size, self.masks.train, rank=rank, world_size=world_size,
                                           seed=seed, workers=self.train_cfg.workers)

    def loss(self, phase: str, modules, batch: MaskedBatch, step: int, scratch: dict):
        x, mask, target = batch
        logits, token_mask = modules["encoder"](x, mask)  # (B, K, h, w), (B, h, w)
        m = token_metrics(logits, target, token_mask, mask, self.factor)
        return m["ce"], {k: v.detach() for k, v in m.items() if k != "ce"}

    def pictures(self, modules, batch):
        return None

    def evaluate(self, modules) -> dict[str, float]:
        """Token accuracy on val images under their fixed large evaluation masks."""
        encoder = modules["encoder"]
        device = next(encoder.parameters()).device
        right, partial, ce = [], [], []
        for batch in self.data["val"].evaluation(self.cfg.batch_size, EVAL_MASKS, self.masks, self.train_cfg.eval_images):
            x, mask, target = (t.to(device) for t in batch)
            logits, token_mask = encoder(x, mask)
            hit = logits.argmax(1) == target
            right.append(hit[token_mask])
            partial.append(hit[partially_masked(mask, token_mask, self.factor)])
            ce.append(F.cross_entropy(logits.float(), target, reduction="none")[token_mask])
        right, partial = torch.cat(right).float(), torch.cat(partial).float()
        return {
            "val_accuracy": right.mean().item() if right.numel() else float("nan"),
            "val_partial_accuracy": partial.mean().item() if partial.numel() else float("nan"),
            "val_ce": torch.cat(ce).mean().item() if right.numel() else float("nan"),
            "chance_accuracy": 1.0 / self.n_embed,
        }
