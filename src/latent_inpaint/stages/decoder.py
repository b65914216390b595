"""Stage 3 training: the decoder (E_prt + G, Eq. 7-9) learns to fill the hole from the partial
image and the ground-truth tokens of the full image, a fraction of them replaced at random so
that it also copes with sampled tokens. Loss (Eq. 9): non-saturating GAN + perceptual (LPIPS)
for the decoder; non-saturating GAN + R1 on reals for the PatchGAN discriminator. Both act on
the composite, the image a user gets."""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from ..config import DecoderConfig, MasksConfig, TrainConfig, VQGANConfig, WeightsConfig, to_dict
from ..data.ingest import shards_fingerprint
from ..data.loader import image_loader
from ..decoder import InpaintDecoder
from ..losses import STAND_IN, NLayerDiscriminator, load_lpips, nonsaturating_d_loss, nonsaturating_g_loss, r1_penalty
from ..masks import eval_mask, free_form_mask
from ..partial_conv import token_mask
from ..pictures import grid
from ..train import loop_settings, param_digest, unwrap
from ..vqgan import VQModel
from .tokens import load_tokens, tokens_fingerprint
from .vqgan import endless, to_uint8

EVAL_MASKS = "large"
# The VQGAN fields that shape its decoder and codebook; the rest (lr, steps...) only trained it.
ARCHITECTURE = ("base_channels", "channel_mult", "num_res_blocks", "attn_resolutions", "z_channels", "n_embed",
                "embed_dim")


def hole_errors(x: torch.Tensor, out: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-image (L1, PSNR in dB) over the hole pixels of images in [-1, 1]; (B,), (B,). An image
    without a hole scores L1 0 and the PSNR of an MSE floor of 1e-10 (100 dB)."""
    hole = (mask < 0.5).to(x.dtype).expand_as(x)
    count = hole.flatten(1).sum(1).clamp(min=1.0)
    l1 = ((x - out).abs() * hole).flatten(1).sum(1) / count
    mse = (((x - out) / 2).pow(2) * hole).flatten(1).sum(1) / count
    return l1, 10 * torch.log10(1.0 / mse.clamp_min(1e-10))


class DecoderStage:
    name = "decoder"

    def __init__(self, vq: VQGANConfig, cfg: DecoderConfig, masks: MasksConfig, train: TrainConfig,
                 weights: WeightsConfig, shards_dir: Path, tokens_dir: Path, size: int, vqgan_model: VQModel,
                 alpha: float):
        """`vqgan_model`: the trained VQGAN (codebook lookup, and G's initial weights when
        cfg.init_from_vqgan); `alpha`: the restrictive encoder's threshold, which gives M̂."""
        if not 0.0 <= cfg.token_noise <= 1.0:
            raise ValueError(f"decoder.token_noise is a share of the tokens: 0 <= token_noise <= 1, "
                             f"got {cfg.token_noise}")
        differ = [k for k in ARCHITECTURE if getattr(vqgan_model.cfg, k) != getattr(vq, k)]
        if differ or vqgan_model.resolution != size:
            raise ValueError(f"the VQGAN model does not match the vqgan config / size {size}: differing {differ}, "
                             f"resolution {vqgan_model.resolution}")
        self.vq, self.cfg, self.masks, self.train_cfg, self.alpha = vq, cfg, masks, train, alpha
        self.shards_dir, self.tokens_dir, self.size = Path(shards_dir), Path(tokens_dir), size
        self.factor = vqgan_model.factor
        self.targets = {split: self._targets(split) for split in ("train", "val")}

        decoder = InpaintDecoder(vq, size)
        if cfg.init_from_vqgan:
            decoder.init_from_vqgan(vqgan_model)
        self.modules = {"decoder": decoder, "disc": NLayerDiscriminator(n_layers=vq.disc_layers)}
        # Used, never trained or saved: the loop keeps them frozen on the device.
        self.frozen = {"vqgan": vqgan_model, "lpips": load_lpips(weights.vgg16)}
        self.lpips_stand_in = weights.vgg16 == STAND_IN
        self.vqgan_digest = param_digest({"vqgan": vqgan_model})[:16]

    def _targets(self, split: str) -> dict[str, np.ndarray]:
        tokens, keys = load_tokens(self.tokens_dir, split)
        grid_side = self.size // self.factor
        if tokens.shape[1:] != (grid_side, grid_side):
            raise ValueError(f"{self.tokens_dir}/{split}.npy holds {tokens.shape[1:]} token maps, the decoder "
                             f"needs {grid_side}x{grid_side} at {self.size} px: re-run the tokens rule")
        return dict(zip(keys, tokens))

    def config(self) -> dict:
        return {"vqgan": to_dict(self.vq), "vqgan_weights": self.vqgan_digest, "decoder": to_dict(self.cfg),
                "alpha": self.alpha, "resolution": self.size, "train_masks": to_dict(self.masks.train),
                "lpips_stand_in": self.lpips_stand_in, "train": loop_settings(self.train_cfg),
                "data": shards_fingerprint(self.shards_dir), "tokens": tokens_fingerprint(self.tokens_dir)}

    def optimizers(self, modules) -> dict[str, torch.optim.Optimizer]:
        return {
            "decoder": torch.optim.Adam(modules["decoder"].parameters(), lr=self.cfg.lr, betas=self.cfg.betas),
            "disc": torch.optim.Adam(modules["disc"].parameters(), lr=self.cfg.lr, betas=self.cfg.betas),
        }

    def _batch(self, batch: dict, masks: list[np.ndarray], split: str,
               rng: np.random.Generator | None = None) -> tuple[torch.Tensor, ...]:
        """(x (B, 3, H, W), mask (B, 1, H, W), tokens (B, h, w) long, M̂ (B, 1, h, w)); with `rng`,
        a token_noise share of the tokens is replaced by codes drawn uniformly."""
        tokens = np.stack([self.targets[split][key] for key in batch["key"]]).astype(np.int64)
        if rng is not None and self.cfg.token_noise > 0:
            noisy = rng.random(tokens.shape) < self.cfg.token_noise
            tokens = np.where(noisy, rng.integers(0, self.vq.n_embed, tokens.shape), tokens)
        mask = torch.from_numpy(np.stack(masks)).float()[:, None]  # (B, 1, H, W), 1 = visible
        return batch["image"], mask, torch.from_numpy(tokens), token_mask(mask, self.alpha, self.factor)

    def batches(self, rank: int, world_size: int, seed: int) -> Iterator[tuple[torch.Tensor, ...]]:
        rng = np.random.default_rng([seed, rank])
        loader = image_loader(self.shards_dir, "train", self.cfg.batch_size, workers=self.train_cfg.workers, seed=seed)
        for batch in endless(loader):
            masks = [free_form_mask(self.size, self.masks.train, rng) for _ in batch["key"]]
            yield self._batch(batch, masks, "train", rng)

    @staticmethod
    def _inpaint(modules, x, mask, tokens, m_hat) -> tuple[torch.Tensor, torch.Tensor]:
        z_q = unwrap(modules["vqgan"]).quantize.lookup(tokens)  # (B, embed_dim, h, w)
        return modules["decoder"](x, mask, z_q, m_hat)  # composite, X'

    def loss(self, phase: str, modules, batch, step: int, scratch: dict):
        x, mask, tokens, m_hat = batch
        if phase == "decoder":
            out, _ = self._inpaint(modules, x, mask, tokens, m_hat)
            g_loss = nonsaturating_g_loss(modules["disc"](out))
            perceptual = modules["lpips"](x, out).mean()
            scratch["fake"] = out.detach()
            l1, _ = hole_errors(x.detach(), out.detach(), mask)
            # out is the composite: this L1 is the hole error averaged over all pixels.
            loss = g_loss + self.cfg.perceptual_weight * perceptual + self.cfg.l1_weight * (x - out).abs().mean()
            return loss, {
                "g_loss": g_loss.detach(), "perceptual": perceptual.detach(), "hole_l1": l1.mean()}
        reals = x.detach().requires_grad_(True)  # R1 differentiates D's output w.r.t. the reals
        logits = modules["disc"](torch.cat([reals, scratch["fake"]]))  # one forward: DDP sees one pass
        real, fake = logits.chunk(2)
        d_loss = nonsaturating_d_loss(real, fake)
        r1 = r1_penalty(real, reals)
        return d_loss + self.cfg.r1_weight * r1, {
            "d_loss": d_loss.detach(), "r1": r1.detach(),
            "logits_real": real.mean().detach(), "logits_fake": fake.mean().detach()}

    def pictures(self, modules, batch):
        """Originals, masked inputs (hole grey) and composites, one row each."""
        x, mask, tokens, m_hat = (t[:8] for t in batch)
        out, _ = self._inpaint(modules, x, mask, tokens, m_hat)
        masked = torch.where(mask > 0.5, x, torch.zeros_like(x))
        return grid([*to_uint8(x), *to_uint8(masked), *to_uint8(out)], cols=x.shape[0])

    def evaluate(self, modules) -> dict[str, float]:
        """Hole-region L1 and PSNR on val images under the fixed large evaluation masks, from
        their ground-truth tokens (no noise)."""
        device = next(unwrap(modules["decoder"]).parameters()).device
        loader = image_loader(self.shards_dir, "val", self.cfg.batch_size, workers=0, shuffle=False, drop_last=False)
        l1s, psnrs, seen = [], [], 0
        for batch in loader:
            if seen >= self.train_cfg.eval_images:
                break
            n = min(len(batch["key"]), self.train_cfg.eval_images - seen)
            batch = {"image": batch["image"][:n], "key": batch["key"][:n]}
            masks = [eval_mask(EVAL_MASKS, self.size, self.masks, "val", seen + i) for i in range(n)]
            x, mask, tokens, m_hat = (t.to(device) for t in self._batch(batch, masks, "val"))
            out, _ = self._inpaint(modules, x, mask, tokens, m_hat)
            l1, p = hole_errors(x.float(), out.float(), mask)
            l1s.append(l1)
            psnrs.append(p)
            seen += n
        if not l1s:
            return {}
        return {"val_hole_l1": torch.cat(l1s).mean().item(), "val_hole_psnr": torch.cat(psnrs).mean().item()}
