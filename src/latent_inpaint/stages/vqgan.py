"""Stage 0 training: the VQGAN on full images (L1 + LPIPS + hinge PatchGAN, taming's recipe)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from ..config import TrainConfig, VQGANConfig, WeightsConfig, build, to_dict
from ..data.ingest import shards_fingerprint
from ..data.loader import image_loader
from ..losses import NLayerDiscriminator, adaptive_weight, hinge_d_loss, load_lpips, psnr
from ..pictures import grid
from ..train import load_stage_weights, loop_settings, scaled_lr, unwrap
from ..vqgan import VQModel


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """(B, 3, H, W) in [-1, 1] -> (B, H, W, 3) uint8."""
    return ((x.detach().float().clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).cpu().numpy()


def _saved(final_dir: Path) -> tuple[VQGANConfig, int]:
    path = Path(final_dir) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: train the VQGAN first (`latent-inpaint train-vqgan`)")
    saved = json.loads(path.read_text())["config"]
    return build(VQGANConfig, saved["vqgan"], f"{path}: vqgan"), saved["resolution"]


def saved_vqgan_config(final_dir: Path) -> VQGANConfig:
    """The configuration the VQGAN of a final/ folder was built with (later stages mirror it)."""
    return _saved(final_dir)[0]


def load_trained_vqgan(final_dir: Path, device: torch.device) -> VQModel:
    """The VQGAN of a stage's final/ folder (trained or imported), built from the config saved with it."""
    model = VQModel(*_saved(final_dir))
    load_stage_weights(final_dir, {"vqgan": model}, device=device)
    return model.to(device).eval()


def endless(loader) -> Iterator:
    while True:
        yield from loader


class VQGANStage:
    name = "vqgan"

    def __init__(self, cfg: VQGANConfig, train: TrainConfig, weights: WeightsConfig, shards_dir: Path, size: int):
        self.cfg, self.train_cfg, self.shards_dir, self.size = cfg, train, Path(shards_dir), size
        self.modules = {"vqgan": VQModel(cfg, size), "disc": NLayerDiscriminator(n_layers=cfg.disc_layers)}
        # LPIPS measures, it is not trained or saved: the loop keeps it frozen on the device.
        self.frozen = {"lpips": load_lpips(weights.vgg16)}
        self.lpips_stand_in = weights.vgg16 == "stand-in"
        self._codebook_ready = False

    def config(self) -> dict:
        return {"vqgan": to_dict(self.cfg), "resolution": self.size, "train": loop_settings(self.train_cfg),
                "data": shards_fingerprint(self.shards_dir)}

    def optimizers(self, modules) -> dict[str, torch.optim.Optimizer]:
        world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
        lr = scaled_lr(self.cfg.base_lr, self.cfg.batch_size, world, self.train_cfg.grad_accum)
        return {
            "vqgan": torch.optim.Adam(modules["vqgan"].parameters(), lr=lr, betas=(0.5, 0.9)),
            "disc": torch.optim.Adam(modules["disc"].parameters(), lr=lr, betas=(0.5, 0.9)),
        }

    def batches(self, rank: int, world_size: int, seed: int) -> Iterator[torch.Tensor]:
        loader = image_loader(self.shards_dir, "train", self.cfg.batch_size, workers=self.train_cfg.workers, seed=seed)
        for batch in endless(loader):
            yield batch["image"]

    def _rec(self, modules, x: torch.Tensor, xrec: torch.Tensor) -> torch.Tensor:
        rec = (x - xrec).abs().mean(dim=(1, 2, 3))  # (B,)
        if self.cfg.perceptual_weight > 0:
            rec = rec + self.cfg.perceptual_weight * modules["lpips"](x, xrec).flatten()
        return rec.mean()

    def _init_codebook(self, model: VQModel, x: torch.Tensor) -> None:
        """codebook_init=data: codes from the first batch's encoder outputs, the same on every rank."""
        with torch.no_grad():
            model.quantize.init_from_data(model.quant_conv(model.encoder(x)),
                                          torch.Generator().manual_seed(self.train_cfg.seed))
        if torch.distributed.is_initialized():  # DDP syncs gradients, not weights: rank 0's codes win
            torch.distributed.broadcast(model.quantize.embedding.weight.data, src=0)

    def loss(self, phase: str, modules, x: torch.Tensor, step: int, scratch: dict):
        gan_on = step >= self.cfg.disc_start
        if phase == "vqgan" and step == 0 and self.cfg.codebook_init == "data" and not self._codebook_ready:
            self._init_codebook(unwrap(modules["vqgan"]), x)
        self._codebook_ready = True  # a resumed run (step > 0) keeps its trained codes
        if phase == "vqgan":
            xrec, qloss, _ = modules["vqgan"](x)
            nll = self._rec(modules, x, xrec)
            loss = nll + self.cfg.codebook_weight * qloss
            # Tensors, not floats: the loop reads them only when it logs, sparing a GPU sync per step.
            logs = {"rec_loss": nll.detach(), "codebook_loss": qloss.detach(), "l1": (x - xrec).abs().mean().detach()}
            if gan_on:
                g_loss = -modules["disc"](xrec).mean()
                weight = adaptive_weight(nll, g_loss, unwrap(modules["vqgan"]).last_layer(), self.cfg.disc_weight)
                loss = loss + weight * g_loss
                logs |= {"g_loss": g_loss.detach(), "d_weight": weight}
            scratch["fake"] = xrec.detach()
            return loss, logs
        if not gan_on:  # taming keeps the discriminator off until disc_start
            return None, {}
        logits = modules["disc"](torch.cat([x, scratch["fake"]]))  # one forward: DDP sees one pass
        real, fake = logits.chunk(2)
        d_loss = hinge_d_loss(real, fake)
        return d_loss, {"d_loss": d_loss.detach(), "logits_real": real.mean().detach(), "logits_fake": fake.mean().detach()}

    def pictures(self, modules, x: torch.Tensor):
        xrec, _, _ = unwrap(modules["vqgan"])(x[:8])
        return grid([*to_uint8(x[:8]), *to_uint8(xrec)], cols=min(8, x.shape[0]))  # originals over reconstructions

    def evaluate(self, modules) -> dict[str, float]:
        """Reconstruction PSNR and LPIPS on the val split (LPIPS labelled when it is a stand-in)."""
        model = unwrap(modules["vqgan"])
        device = next(model.parameters()).device
        loader = image_loader(self.shards_dir, "val", self.cfg.batch_size, workers=0, shuffle=False,
                              drop_last=False)
        psnrs, l1s, lpips_values, tokens, seen = [], [], [], [], 0
        for batch in loader:
            x = batch["image"].to(device)[: self.train_cfg.eval_images - seen]
            xrec, _, idx = model(x)
            psnrs.append(psnr(x, xrec))
            l1s.append((x - xrec).abs().flatten(1).mean(1))
            lpips_values.append(modules["lpips"](x, xrec).flatten())
            tokens.append(idx.flatten())
            seen += x.shape[0]
            if seen >= self.train_cfg.eval_images:
                break
        metrics = {"val_psnr": torch.cat(psnrs).mean().item(), "val_l1": torch.cat(l1s).mean().item()}
        key = "val_lpips_stand_in" if self.lpips_stand_in else "val_lpips"
        metrics[key] = torch.cat(lpips_values).mean().item()
        metrics["val_codes_used"] = float(torch.cat(tokens).unique().numel())
        return metrics

