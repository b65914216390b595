"""Masked images, the data of the stages that see partial images (the encoder and the decoder):
each image of a split with a mask (1 = visible) and the ground-truth tokens of the full image.

Training draws a fresh MAT free-form mask per image (masks.train); evaluation gives image i of
the split its fixed evaluation mask (`masks.eval_mask`), the one the masks stage writes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator, NamedTuple

import numpy as np
import torch

from ..config import FreeFormConfig, MasksConfig
from ..masks import eval_mask, free_form_mask
from .ingest import read_manifest
from .loader import image_loader
from .tokens import load_tokens


class MaskedBatch(NamedTuple):
    image: torch.Tensor  # (B, 3, H, W) in [-1, 1]
    mask: torch.Tensor  # (B, 1, H, W) float, 1 = visible
    tokens: torch.Tensor  # (B, H/f, W/f) long: E_VQ of the full image


class MaskedImages:
    """One split's images with masks and token targets; `factor` is the VQGAN's image side /
    token grid side, checked against the token files."""

    def __init__(self, shards_dir: Path, tokens_dir: Path, split: str, factor: int):
        self.shards_dir, self.split = Path(shards_dir), split
        self.size = read_manifest(self.shards_dir)["params"]["size"]
        tokens, keys = load_tokens(tokens_dir, split)
        side = self.size // factor
        if tokens.shape[1:] != (side, side):
            raise ValueError(f"{tokens_dir}/{split}.npy holds {tokens.shape[1:]} token maps, the VQGAN gives "
                             f"{side}x{side} at {self.size} px: re-run the tokens rule")
        self.targets = dict(zip(keys, tokens))

    def _batch(self, batch: dict, masks: list[np.ndarray]) -> MaskedBatch:
        tokens = np.stack([self.targets[key] for key in batch["key"]]).astype(np.int64)
        mask = torch.from_numpy(np.stack(masks)).float()[:, None]
        return MaskedBatch(batch["image"], mask, torch.from_numpy(tokens))

    def training(self, batch_size: int, masks: FreeFormConfig, *, rank: int, world_size: int, seed: int,
                 workers: int) -> Iterator[MaskedBatch]:
        """Endless shuffled batches of this rank's share of the split, each image with a fresh
        free-form mask drawn from `seed` and the rank."""
        rng = np.random.default_rng([seed, rank])
        loader = image_loader(self.shards_dir, self.split, batch_size, rank=rank, world_size=world_size, seed=seed,
                              workers=workers)
        while True:
            for batch in loader:
                yield self._batch(batch, [free_form_mask(self.size, masks, rng) for _ in batch["key"]])

    def evaluation(self, batch_size: int, kind: str, masks: MasksConfig, limit: int) -> Iterator[MaskedBatch]:
        """The split's first `limit` images in order, each with its fixed evaluation mask of `kind`."""
        loader = image_loader(self.shards_dir, self.split, batch_size, workers=0, shuffle=False, drop_last=False)
        seen = 0
        for batch in loader:
            n = min(len(batch["key"]), limit - seen)
            if n <= 0:
                return
            fixed = [eval_mask(kind, self.size, masks, self.split, seen + i) for i in range(n)]
            yield self._batch({"image": batch["image"][:n], "key": batch["key"][:n]}, fixed)
            seen += n
