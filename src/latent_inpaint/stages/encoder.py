"""Stage 1 training: the restrictive encoder predicts E_VQ(X)'s tokens at visible token positions
(Eq. 5), from the masked image alone, under MAT free-form training masks."""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import numpy as np
import torch
import torch.nn.functional as F

from ..config import EncoderConfig, MasksConfig, TrainConfig, VQGANConfig, to_dict
from ..data.ingest import shards_fingerprint
from ..data.loader import image_loader
from ..encoder import build_encoder
from ..masks import eval_mask, free_form_mask
from ..train import loop_settings
from .tokens import load_tokens, tokens_fingerprint
from .vqgan import endless


def partially_masked(mask: torch.Tensor, token_mask: torch.Tensor, factor: int) -> torch.Tensor:
    """(B, h, w) bool: tokens kept visible although some pixels of their f x f block are hole, the
    tokens the paper's 23% (restrictive) vs 9% (vanilla) accuracy comparison is about."""
    hole_in_block = F.max_pool2d(1 - mask, factor).squeeze(1) > 0  # (B, h, w)
    return token_mask & hole_in_block


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
    def __init__(self, kind: str, vq: VQGANConfig, cfg: EncoderConfig, masks: MasksConfig, train: TrainConfig,
                 shards_dir: Path, tokens_dir: Path, size: int):
        self.name = "encoder" if kind == "restrictive" else f"encoder_{kind}"
        self.kind, self.vq, self.cfg, self.masks, self.train_cfg = kind, vq, cfg, masks, train
        self.shards_dir, self.tokens_dir, self.size = Path(shards_dir), Path(tokens_dir), size
        self.factor = 2 ** (len(vq.channel_mult) - 1)
        self.modules = {"encoder": build_encoder(kind, vq, cfg, size)}
        self.targets = {split: self._targets(split) for split in ("train", "val")}

    def _targets(self, split: str) -> dict[str, np.ndarray]:
        tokens, keys = load_tokens(self.tokens_dir, split)
        return dict(zip(keys, tokens))

    def config(self) -> dict:
        return {"kind": self.kind, "vqgan": to_dict(self.vq), "encoder": to_dict(self.cfg), "resolution": self.size,
                "train_masks": to_dict(self.masks.train), "train": loop_settings(self.train_cfg),
                "data": shards_fingerprint(self.shards_dir), "tokens": tokens_fingerprint(self.tokens_dir)}

    def optimizers(self, modules) -> dict[str, torch.optim.Optimizer]:
        return {"encoder": torch.optim.Adam(modules["encoder"].parameters(), lr=self.cfg.lr, betas=self.cfg.betas)}

    def _batch(self, batch: dict, masks: list[np.ndarray], split: str) -> tuple[torch.Tensor, ...]:
        target = np.stack([self.targets[split][key] for key in batch["key"]]).astype(np.int64)
        mask = torch.from_numpy(np.stack(masks)).float()[:, None]  # (B, 1, H, W), 1 = visible
        return batch["image"], mask, torch.from_numpy(target)

    def batches(self, rank: int, world_size: int, seed: int) -> Iterator[tuple[torch.Tensor, ...]]:
        rng = np.random.default_rng([seed, rank])
        loader = image_loader(self.shards_dir, "train", self.cfg.batch_size, workers=self.train_cfg.workers, seed=seed)
        for batch in endless(loader):
            masks = [free_form_mask(self.size, self.masks.train, rng) for _ in batch["key"]]
            yield self._batch(batch, masks, "train")

    def loss(self, phase: str, modules, batch, step: int, scratch: dict):
        x, mask, target = batch
        logits, token_mask = modules["encoder"](x, mask)  # (B, K, h, w), (B, h, w)
        m = token_metrics(logits, target, token_mask, mask, self.factor)
        return m["ce"], {k: v.detach() for k, v in m.items() if k != "ce"}

    def pictures(self, modules, batch):
        return None

    def evaluate(self, modules) -> dict[str, float]:
        """Token accuracy on val images under the fixed large evaluation masks."""
        encoder = modules["encoder"]
        device = next(encoder.parameters()).device
        loader = image_loader(self.shards_dir, "val", self.cfg.batch_size, workers=0, shuffle=False, drop_last=False)
        totals: dict[str, list[torch.Tensor]] = {"right": [], "partial_right": [], "ce": []}
        index = 0
        for batch in loader:
            masks = [eval_mask("large", self.size, self.masks, "val", index + i) for i in range(len(batch["key"]))]
            index += len(masks)
            x, mask, target = (t.to(device) for t in self._batch(batch, masks, "val"))
            logits, token_mask = encoder(x, mask)
            right = logits.argmax(1) == target
            totals["right"].append(right[token_mask])
            totals["partial_right"].append(right[partially_masked(mask, token_mask, self.factor)])
            totals["ce"].append(F.cross_entropy(logits, target, reduction="none")[token_mask])
            if index >= self.train_cfg.eval_images:
                break
        right, partial = torch.cat(totals["right"]).float(), torch.cat(totals["partial_right"]).float()
        return {
            "val_accuracy": right.mean().item() if right.numel() else float("nan"),
            "val_partial_accuracy": partial.mean().item() if partial.numel() else float("nan"),
            "val_ce": torch.cat(totals["ce"]).mean().item() if right.numel() else float("nan"),
            "chance_accuracy": 1.0 / self.vq.n_embed,
        }
