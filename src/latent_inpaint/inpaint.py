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
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from .config import MasksConfig, SampleConfig, to_dict
from .data.images import IMAGE_EXTENSIONS, SkipImage, load_rgb
from .decoder import InpaintDecoder, VanillaDecoder
from .encoder import MiracleEncoder, RestrictiveEncoder, VanillaEncoder
from .masks import user_mask
from .pictures import grid, inpainting_row
from .sampler import sample
from .saved import load_model, saved_spec
from .transformer import BidirectionalTransformer
from .vqgan import VQModel

BATCH = 8  # samples drawn in one forward pass
FAILED = "failed"  # the status of a file that could not be inpainted


def pick_device(name: str | torch.device | None = None) -> torch.device:
    """The device named, else the local GPU if there is one."""
    return torch.device(name or ("cuda" if torch.cuda.is_available() else "cpu"))


@dataclasses.dataclass
class Inpainter:
    vqgan: torch.nn.Module
    encoder: torch.nn.Module
    transformer: torch.nn.Module
    decoder: torch.nn.Module
    size: int
    device: torch.device

    @classmethod
    def from_runs(cls, runs_dir: Path = Path("runs"), device: str | torch.device | None = None,
                  encoder: str = "encoder", decoder: str = "decoder", alpha: float | None = None) -> Inpainter:
        """Load runs/{vqgan,<encoder>,transformer,<decoder>} (trained, or pulled with DVC); each
        saved model rebuilds itself from the config saved beside its weights.

        encoder: a trained encoder's run folder name ("encoder", "encoder_vanilla") or "miracle"
        (the VQGAN's tokens of the full image under M̂: ablation); decoder: "decoder" or "vanilla"
        (tokens decoded by the VQGAN decoder and pasted: ablation); alpha: another threshold for
        the restrictive encoder at inference (its weights do not depend on alpha)."""
        runs_dir, device = Path(runs_dir), pick_device(device)
        vqgan = load_model(runs_dir / "vqgan", VQModel, device=device)
        if encoder == "miracle":
            trained_alpha = saved_spec(runs_dir / "encoder")["encoder"]["alpha"]
            enc = MiracleEncoder(vqgan, trained_alpha if alpha is None else alpha)
        else:
            overrides = None if alpha is None else {"encoder": {"alpha": alpha}}
            enc = load_model(runs_dir / encoder, (RestrictiveEncoder, VanillaEncoder), device=device,
                             overrides=overrides)
        tf = load_model(runs_dir / "transformer", BidirectionalTransformer, device=device)
        dec = VanillaDecoder(vqgan) if decoder == "vanilla" else load_model(runs_dir / decoder, InpaintDecoder,
                                                                           device=device)
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
        for first in range(0, samples, BATCH):
            n = min(BATCH, samples - first)
            seeds = [seed + first + i for i in range(n)]
            y = self.inpaint_batch(xs.expand(n, -1, -1, -1), ms.expand(n, -1, -1, -1), cfg, seeds).cpu()
            y = F.interpolate(y, size=(h, w), mode="bicubic", align_corners=False).clamp(-1, 1)
            y = ((y + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy()  # (n, H, W, 3)
            for one in y:
                out.append(np.where(mask[..., None].astype(bool), image, one))
        return out


# ---------------------------------------------------------------------------------- user files


def load_image(path: Path) -> np.ndarray:
    """Any image file as (H, W, 3) uint8 (EXIF orientation applied, alpha on white)."""
    try:
        return np.asarray(load_rgb(Path(path)))
    except SkipImage as exc:
        raise ValueError(f"cannot use image {path}: {exc}") from None


def image_files(path: Path) -> list[Path]:
    """The image itself, or the images of a folder in name order (hidden files left out)."""
    path = Path(path)
    if path.is_dir():
        return sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS and not p.name.startswith("."))
    if path.is_file():
        return [path]
    raise FileNotFoundError(f"input {path} does not exist")


def inpaint_files(model: Inpainter, source: Path, out: Path, cfg: SampleConfig, masks: MasksConfig, *,
                  mask: str = "box", mask_white_is_visible: bool = False, runs: Path | None = None,
                  on_file: Callable[[Path, dict], None] = lambda path, outcome: None) -> dict:
    """Inpaint an image or every image of a folder into `out/<stem>/` (sample_XX.png and grid.png:
    input | masked | samples) with `mask` (see masks.user_mask); one file's failure does not stop
    the others. Writes and returns `out/settings.json`: every setting and each file's outcome (also
    handed to `on_file` as it comes)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    report = {"settings": {**to_dict(cfg), "mask": mask,
                           "mask_convention": "white = visible" if mask_white_is_visible else "white = hole",
                           "runs": str(runs), "size_policy": f"resized to {model.size}x{model.size} for the model; "
                           "hole pixels pasted back at full resolution"}, "images": {}}
    for index, path in enumerate(image_files(source)):
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                image = load_image(path)
                hole = user_mask(mask, path, image.shape[:2], masks, seed=cfg.seed, index=index,
                                 hole_is_white=not mask_white_is_visible)
            notes = [str(w.message) for w in caught]
            if not hole.any():
                notes.append("the mask has no visible pixel: the samples are unconditional")
            results = model.inpaint(image, hole, cfg, cfg.samples, cfg.seed)
            folder = out / path.stem
            folder.mkdir(exist_ok=True)
            for i, result in enumerate(results):
                Image.fromarray(result).save(folder / f"sample_{i:02d}.png")
            grid(inpainting_row(image, hole, results), cols=2 + len(results)).save(folder / "grid.png")
            status = "unchanged: the mask has no hole" if hole.all() else f"{len(results)} samples"
            outcome = {"status": status, "notes": notes, "hole_ratio": float(1 - hole.mean()), "folder": str(folder)}
        except (ValueError, OSError) as exc:
            outcome = {"status": FAILED, "error": str(exc)}
        report["images"][str(path)] = outcome
        on_file(path, outcome)
    (out / "settings.json").write_text(json.dumps(report, indent=1))
    return report
