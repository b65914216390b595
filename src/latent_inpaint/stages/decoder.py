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

from ..config import DecoderConfig, MasksConfig, TrainConfig, WeightsConfig, section, to_dict
from ..data.ingest import shards_fingerprint
from ..data.masked import MaskedImages
from ..data.tokens import tokens_fingerprint
from ..decoder import build_decoder
from ..evaluate.metrics import errors
from ..losses import NLayerDiscriminator, load_lpips, nonsaturating_d_loss, nonsaturating_g_loss, r1_penalty
from ..partial_conv import token_mask
from ..pictures import grid, to_uint8
from ..saved import load_model, start_from
from ..train import loop_settings, param_digest, run as train_stage
from ..vqgan import VQModel
from ..weights import is_stand_in

EVAL_MASKS = "large"


def run(params: dict, vqgan: Path, shards: Path, tokens: Path, run_dir: Path, *, device: str | None = None,
        restart_on_change: bool = False) -> str:
    """Train the decoder of the VQGAN of `vqgan` into `run_dir`; M̂ comes from encoder.alpha."""
    cfg, masks, train_cfg, weights, enc = (
        section(params, name) for name in ("decoder", "masks", "train", "weights", "encoder"))
    model = load_model(vqgan, VQModel)
    sections = {"decoder": to_dict(cfg), "masks": to_dict(masks), "weights": to_dict(weights), "encoder": to_dict(enc)}
    return train_stage(lambda: DecoderStage(cfg, masks, train_cfg, weights, shards, tokens, model, alpha=enc.alpha,
                                            attn_resolutions=enc.attn_resolutions),
                       cfg.steps, params, sections, run_dir, device=device, restart_on_change=restart_on_change)


class DecoderStage:
    name = "decoder"

    def __init__(self, cfg: DecoderConfig, masks: MasksConfig, train: TrainConfig, weights: WeightsConfig,
                 shards_dir: Path, tokens_dir: Path, vqgan: VQModel, alpha: float, attn_resolutions: tuple[int, ...]):
        """`vqgan`: the trained VQGAN (codebook lookup, and G's initial weights when
        cfg.init_from_vqgan); `alpha`: the restrictive encoder's threshold, which gives M̂;
        `attn_resolutions`: E_prt's, the restrictive encoder's (the paper: 32 and 16 for both)."""
        if not 0.0 <= cfg.token_noise <= 1.0:
            raise ValueError(f"decoder.token_noise is a share of the tokens: 0 <= token_noise <= 1, "
                             f"got {cfg.token_noise}")
        self.cfg, self.masks, self.train_cfg, self.alpha = cfg, masks, train, alpha
        self.shards_dir, self.tokens_dir = Path(shards_dir), Path(tokens_dir)
        self.factor, self.n_embed = vqgan.factor, vqgan.cfg.n_embed
        self.data = {split: MaskedImages(shards_dir, tokens_dir, split, vqgan.factor) for split in ("train", "val")}

        decoder = build_decoder(cfg.variant, vqgan.cfg, vqgan.resolution, attn_resolutions)
        if cfg.init_from:
            start_from(cfg.init_from, "decoder", decoder)
        elif cfg.init_from_vqgan:
            decoder.init_from_vqgan(vqgan)
        self.modules = {"decoder": decoder, "disc": NLayerDiscriminator(n_layers=vqgan.cfg.disc_layers)}
        # Used, never trained or saved: the loop keeps them frozen on the device.
        self.frozen = {"vqgan": vqgan, "lpips": load_lpips(weights.vgg16)}
        self.lpips_stand_in = is_stand_in(weights.vgg16)
        self.vqgan_digest = param_digest({"vqgan": vqgan})[:16]

    def config(self) -> dict:
        return {"vqgan_weights": self.vqgan_digest, "decoder": to_dict(self.cfg), "alpha": self.alpha,
                "train_masks": to_dict(self.masks.train), "lpips_stand_in": self.lpips_stand_in,
                "train": loop_settings(self.train_cfg), "data": shards_fingerprint(self.shards_dir),
                "tokens": tokens_fingerprint(self.tokens_dir)}

    def optimizers(self, modules, world_size: int) -> dict[str, torch.optim.Optimizer]:
        return {
            "decoder": torch.optim.Adam(modules["decoder"].parameters(), lr=self.cfg.lr, betas=self.cfg.betas),
            "disc": torch.optim.Adam(modules["disc"].parameters(), lr=self.cfg.lr, betas=self.cfg.betas),
        }

    def batches(self, rank: int, world_size: int, seed: int) -> Iterator[tuple[torch.Tensor, ...]]:
        """(x (B, 3, H, W), mask (B, 1, H, W), tokens (B, h, w) long, M̂ (B, 1, h, w)), a
        token_noise share of the tokens replaced by codes drawn uniformly."""
        rng = np.random.default_rng([seed, rank, 1])  # the masks draw from [seed, rank]
        for x, mask, tokens in self.data["train"].training(self.cfg.batch_size, self.masks.train, rank=rank,
                                                           world_size=world_size, seed=seed,
                                                           workers=self.train_cfg.workers):
            noisy = torch.from_numpy(rng.random(tokens.shape) < self.cfg.token_noise)
            codes = torch.from_numpy(rng.integers(0, self.n_embed, tokens.shape))
            yield x, mask, torch.where(noisy, codes, tokens), token_mask(mask, self.alpha, self.factor)

    @staticmethod
    def _inpaint(modules, x, mask, tokens, m_hat) -> tuple[torch.Tensor, torch.Tensor]:
        z_q = modules["vqgan"].quantize.lookup(tokens)  # (B, embed_dim, h, w)
        return modules["decoder"](x, mask, z_q, m_hat)  # composite, X'

    def loss(self, phase: str, modules, batch, step: int, scratch: dict):
        x, mask, tokens, m_hat = batch
        if phase == "decoder":
            out, _ = self._inpaint(modules, x, mask, tokens, m_hat)
            g_loss = nonsaturating_g_loss(modules["disc"](out))
            perceptual = modules["lpips"](x, out).mean()
            scratch["fake"] = out.detach()
            hole_l1, _ = errors(x.detach(), out.detach(), mask)
            # out is the composite: this L1 is the hole error averaged over all pixels.
            loss = g_loss + self.cfg.perceptual_weight * perceptual + self.cfg.l1_weight * (x - out).abs().mean()
            return loss, {"g_loss": g_loss.detach(), "perceptual": perceptual.detach(), "hole_l1": hole_l1.mean()}
        reals = x.detach().requires_grad_(True)  # R1 differentiates D's output w.r.t. the reals
        # Two calls, as taming and the authors make them: the BatchNorm discriminator normalises
        # reals and fakes each by their own batch statistics. (DDP takes two forwards, one backward.)
        real, fake = modules["disc"](reals), modules["disc"](scratch["fake"])
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
        """Hole-region L1 and PSNR on val images under their fixed large evaluation masks, from
        their ground-truth tokens (no noise)."""
        device = next(modules["decoder"].parameters()).device
        l1s, psnrs = [], []
        for batch in self.data["val"].evaluation(self.cfg.batch_size, EVAL_MASKS, self.masks, self.train_cfg.eval_images):
            x, mask, tokens = (t.to(device) for t in batch)
            out, _ = self._inpaint(modules, x, mask, tokens, token_mask(mask, self.alpha, self.factor))
            l1, psnr = errors(x, out, mask)
            l1s.append(l1)
            psnrs.append(psnr)
        if not l1s:
            return {}
        return {"val_hole_l1": torch.cat(l1s).mean().item(), "val_hole_psnr": torch.cat(psnrs).mean().item()}
