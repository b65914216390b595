"""Inference: the four trained parts turn (image, mask) into pluralistic samples.

    E (restrictive encoder) on X⊙M  -> tokens at visible token positions, token mask M̂
    T (transformer), k sampling steps -> a token for every masked position (a new draw per sample)
    VQGAN codebook                   -> Z, the codebook vectors of the full token map
    decoder (E_prt + coupling + G)   -> X' ; output = X⊙M + X'⊙(1-M)

Images of any size and aspect: the model works at its training size S, so the image and mask
are resized to S x S (aspect not kept), inpainted, the result is resized back to the original
size, and only the hole pixels take it: every visible pixel of the original stays bit-identical.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from .config import SampleConfig
from .sampler import sample
from .train import load_stage_weights


@dataclasses.dataclass
class Inpainter:
    vqgan: torch.nn.Module
    encoder: torch.nn.Module
    transformer: torch.nn.Module
    decoder: torch.nn.Module
    size: int
    device: torch.device

    @classmethod
    def from_runs(cls, runs_dir: Path = Path("runs"), device: str | torch.device = "cpu", encoder: str = "encoder",
                  decoder: str = "decoder", alpha: float | None = None) -> Inpainter:
        """Load runs/{vqgan,<encoder>,transformer,<decoder>}/final (trained, or pulled with DVC).

        encoder: a trained encoder's run folder name ("encoder", "encoder_vanilla") or "miracle"
        (the VQGAN's tokens of the full image under M̂: ablation); decoder: "decoder" or "vanilla"
        (tokens decoded by the VQGAN decoder and pasted: ablation); alpha: another threshold for
        the restrictive encoder at inference (its weights do not depend on alpha)."""
        from .config import EncoderConfig, TransformerConfig, VQGANConfig, build
        from .decoder import InpaintDecoder, VanillaDecoder
        from .encoder import build_encoder
        from .stages.vqgan import load_trained_vqgan
        from .transformer import BidirectionalTransformer

        runs_dir, device = Path(runs_dir), torch.device(device)
        vqgan = load_trained_vqgan(runs_dir / "vqgan" / "final", device)
        trained_encoder = "encoder" if encoder == "miracle" else encoder
        enc_saved = _saved_config(runs_dir / trained_encoder / "final")
        enc_cfg = build(EncoderConfig, enc_saved["encoder"], "encoder")
        if alpha is not None:
            enc_cfg = dataclasses.replace(enc_cfg, alpha=alpha)
        if encoder == "miracle":
            enc = build_encoder("miracle", vqgan.cfg, enc_cfg, vqgan.resolution, vqgan_model=vqgan)
        else:
            enc = build_encoder(enc_saved["kind"], build(VQGANConfig, enc_saved["vqgan"], "encoder vqgan"), enc_cfg,
                                enc_saved["resolution"])
            load_stage_weights(runs_dir / encoder / "final", {"encoder": enc}, device)
        tf_saved = _saved_config(runs_dir / "transformer" / "final")
        tf = BidirectionalTransformer(build(TransformerConfig, tf_saved["transformer"], "transformer"),
                                      vqgan.quantize.embedding.weight.detach(), tf_saved["grid"])
        load_stage_weights(runs_dir / "transformer" / "final", {"transformer": tf}, device)
        if decoder == "vanilla":
            dec = VanillaDecoder(vqgan)
        else:
            dec = InpaintDecoder(vqgan.cfg, vqgan.resolution)
            load_stage_weights(runs_dir / decoder / "final", {"decoder": dec}, device)
        parts = [m.to(device).eval() for m in (vqgan, enc, tf, dec)]
        return cls(*parts, size=vqgan.resolution, device=device)

    @torch.no_grad()
    def inpaint_batch(self, x: torch.Tensor, mask: torch.Tensor, cfg: SampleConfig, seeds: list[int]) -> torch.Tensor:
        """x (B, 3, S, S) in [-1, 1], mask (B, 1, S, S) 1 = visible -> (B, 3, S, S), one sample per
        row drawn with that row's seed."""
        x, mask = x.to(self.device), mask.to(self.device)
        logits, token_mask = self.encoder(x, mask)  # (B, K, h, w), (B, h, w)
        b, _, h, w = logits.shape
        tokens = logits.argmax(1).flatten(1)  # (B, N): the encoder's tokens where visible
        visible = token_mask.flatten(1)
        tokens = sample(self.transformer, tokens, visible, steps=cfg.steps, temperature=cfg.temperature,
                        anneal=cfg.anneal, seeds=seeds)
        z_q = self.vqgan.quantize.lookup(tokens.view(b, h, w))  # (B, embed_dim, h, w)
        composite, _ = self.decoder(x * mask, mask, z_q, token_mask)
        return x * mask + composite * (1 - mask)  # visible pixels exactly the input's

    def inpaint(self, image: np.ndarray, mask: np.ndarray, cfg: SampleConfig, samples: int, seed: int) -> list[np.ndarray]:
        """image (H, W, 3) uint8, mask (H, W) 1 = visible -> `samples` (H, W, 3) uint8 results at
        the original size (visible pixels untouched)."""
        if mask.all():
            return [image.copy() for _ in range(samples)]  # nothing to fill
        h, w = mask.shape
        x = torch.tensor(image, dtype=torch.float32).permute(2, 0, 1)[None] / 127.5 - 1  # (1, 3, H, W)
        m = torch.from_numpy(mask.astype(np.float32))[None, None]
        xs = F.interpolate(x, size=(self.size, self.size), mode="bicubic", align_corners=False).clamp(-1, 1)
        # A model pixel is visible only where all the original pixels it covers are: never invent there.
        ms = (F.interpolate(m, size=(self.size, self.size), mode="area") > 1 - 1e-6).float()
        out = []
        for first in range(0, samples, 8):
            n = min(8, samples - first)
            seeds = [seed + first + i for i in range(n)]
            y = self.inpaint_batch(xs.expand(n, -1, -1, -1), ms.expand(n, -1, -1, -1), cfg, seeds).cpu()
            y = F.interpolate(y, size=(h, w), mode="bicubic", align_corners=False).clamp(-1, 1)
            y = ((y + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy()  # (n, H, W, 3)
            for one in y:
                out.append(np.where(mask[..., None].astype(bool), image, one))
        return out


def _saved_config(final_dir: Path) -> dict:
    path = final_dir / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: train this stage first (or `dvc pull` its artifacts)")
    return json.loads(path.read_text())["config"]


def load_image(path: Path) -> np.ndarray:
    """Any image file as (H, W, 3) uint8 (EXIF orientation applied, alpha on white)."""
    from .data.images import SkipImage, load_rgb

    try:
        return np.asarray(load_rgb(Path(path)))
    except SkipImage as exc:
        raise ValueError(f"cannot use image {path}: {exc}") from None


def save_png(array: np.ndarray, path: Path) -> None:
    Image.fromarray(array).save(path)
