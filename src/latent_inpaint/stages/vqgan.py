"""Stage 0: the VQGAN on full images (L1 + LPIPS + hinge PatchGAN, taming's recipe), or a
taming-transformers VQGAN imported in its place."""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import torch

from ..config import TrainConfig, VQGANConfig, WeightsConfig, section, to_dict
from ..data.ingest import read_manifest, shards_fingerprint
from ..data.loader import image_loader
from ..evaluate.metrics import errors
from ..losses import NLayerDiscriminator, adaptive_weight, hinge_d_loss, load_lpips
from ..pictures import grid, to_uint8
from ..saved import export_final
from ..train import loop_settings, scaled_lr, run as train_stage
from ..taming import import_taming_checkpoint
from ..vqgan import VQModel
from ..weights import is_stand_in


def run(params: dict, shards: Path, run_dir: Path, *, device: str | None = None, restart_on_change: bool = False,
        trust_pickle: bool = False) -> str:
    """Train the VQGAN on the shards' train split into `run_dir` (or import vqgan.pretrained)."""
    cfg, train_cfg, weights = (section(params, name) for name in ("vqgan", "train", "weights"))
    size = read_manifest(Path(shards))["params"]["size"]
    if cfg.pretrained:
        return import_vqgan(cfg.pretrained, params, run_dir, size=size, trust_pickle=trust_pickle)
    return train_stage(lambda: VQGANStage(cfg, train_cfg, weights, shards, size), cfg.steps, params,
                       {"vqgan": to_dict(cfg), "weights": to_dict(weights)}, run_dir, device=device,
                       restart_on_change=restart_on_change)


def import_vqgan(checkpoint: str | Path, params: dict, run_dir: Path, *, size: int | None = None,
                 trust_pickle: bool = False) -> str:
    """A taming-transformers VQGAN checkpoint, loaded strictly into the architecture of the vqgan
    section, as this stage's final/ (`size`: the image side it serves, default data.size)."""
    size = size or section(params, "data").size
    model = import_taming_checkpoint(checkpoint, section(params, "vqgan"), size, trust_pickle=trust_pickle)
    final = export_final(run_dir, "vqgan", {"vqgan": model}, source=str(checkpoint))
    return f"imported {checkpoint} into {final}: tokenize with `latent-inpaint tokenize --vqgan {final}`"


class VQGANStage:
    name = "vqgan"

    def __init__(self, cfg: VQGANConfig, train: TrainConfig, weights: WeightsConfig, shards_dir: Path, size: int):
        self.cfg, self.train_cfg, self.shards_dir, self.size = cfg, train, Path(shards_dir), size
        self.modules = {"vqgan": VQModel(cfg, size), "disc": NLayerDiscriminator(n_layers=cfg.disc_layers)}
        # LPIPS measures, it is not trained or saved: the loop keeps it frozen on the device.
        self.frozen = {"lpips": load_lpips(weights.vgg16)}
        self.lpips_stand_in = is_stand_in(weights.vgg16)

    def config(self) -> dict:
        return {"train": loop_settings(self.train_cfg), "data": shards_fingerprint(self.shards_dir)}

    def optimizers(self, modules, world_size: int) -> dict[str, torch.optim.Optimizer]:
        lr = scaled_lr(self.cfg.base_lr, self.cfg.batch_size, world_size, self.train_cfg.grad_accum)
        return {
            "vqgan": torch.optim.Adam(modules["vqgan"].parameters(), lr=lr, betas=(0.5, 0.9)),
            "disc": torch.optim.Adam(modules["disc"].parameters(), lr=lr, betas=(0.5, 0.9)),
        }

    def batches(self, rank: int, world_size: int, seed: int) -> Iterator[torch.Tensor]:
        loader = image_loader(self.shards_dir, "train", self.cfg.batch_size, rank=rank, world_size=world_size,
                              seed=seed, workers=self.train_cfg.workers)
        while True:
            for batch in loader:
                yield batch["image"]

    def initialize(self, modules, x: torch.Tensor) -> None:
        """codebook_init=data: the codes are K encoder outputs of the first batch (rank 0's, which
        DDP copies to every rank); a resumed run keeps its trained codes."""
        if self.cfg.codebook_init == "data":
            model = modules["vqgan"]
            model.quantize.init_from_data(model.quant_conv(model.encoder(x)),
                                          torch.Generator().manual_seed(self.train_cfg.seed))

    def _rec(self, modules, x: torch.Tensor, xrec: torch.Tensor) -> torch.Tensor:
        rec = (x - xrec).abs().mean(dim=(1, 2, 3))  # (B,)
        if self.cfg.perceptual_weight > 0:
            rec = rec + self.cfg.perceptual_weight * modules["lpips"](x, xrec).flatten()
        return rec.mean()

    def loss(self, phase: str, modules, x: torch.Tensor, step: int, scratch: dict):
        gan_on = step >= self.cfg.disc_start
        if phase == "vqgan":
            xrec, qloss, _ = modules["vqgan"](x)
            nll = self._rec(modules, x, xrec)
            loss = nll + self.cfg.codebook_weight * qloss
            # Tensors, not floats: the loop reads them only when it logs, sparing a GPU sync per step.
            logs = {"rec_loss": nll.detach(), "codebook_loss": qloss.detach(), "l1": (x - xrec).abs().mean().detach()}
            if gan_on:
                g_loss = -modules["disc"](xrec).mean()
                weight = adaptive_weight(nll, g_loss, modules["vqgan"].last_layer(), self.cfg.disc_weight)
                loss = loss + weight * g_loss
                logs |= {"g_loss": g_loss.detach(), "d_weight": weight}
            scratch["fake"] = xrec.detach()
            return loss, logs
        if not gan_on:  # taming keeps the discriminator off until disc_start
            return None, {}
        # Two calls, as taming's loss makes them: the BatchNorm discriminator normalises reals and
        # fakes each by their own batch statistics. (DDP takes two forwards before one backward.)
        real, fake = modules["disc"](x), modules["disc"](scratch["fake"])
        d_loss = hinge_d_loss(real, fake)
        return d_loss, {"d_loss": d_loss.detach(), "logits_real": real.mean().detach(), "logits_fake": fake.mean().detach()}

    def pictures(self, modules, x: torch.Tensor):
        xrec, _, _ = modules["vqgan"](x[:8])
        return grid([*to_uint8(x[:8]), *to_uint8(xrec)], cols=min(8, x.shape[0]))  # originals over reconstructions

    def evaluate(self, modules) -> dict[str, float]:
        """Reconstruction PSNR, L1 and LPIPS on the val split (LPIPS labelled when a stand-in)."""
        model = modules["vqgan"]
        device = next(model.parameters()).device
        loader = image_loader(self.shards_dir, "val", self.cfg.batch_size, workers=0, shuffle=False, drop_last=False)
        psnrs, l1s, lpips_values, tokens, seen = [], [], [], [], 0
        for batch in loader:
            x = batch["image"].to(device)[: self.train_cfg.eval_images - seen]
            xrec, _, idx = model(x)
            l1, psnr = errors(x, xrec)
            l1s.append(l1)
            psnrs.append(psnr)
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
