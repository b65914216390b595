"""Pictures a person looks at: grids of images, masks and samples."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """Images (B, 3, H, W) in [-1, 1] -> (B, H, W, 3) uint8."""
    return ((x.detach().float().clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).cpu().numpy()


def grid(images: list[np.ndarray], cols: int, pad: int = 2, background: int = 255) -> Image.Image:
    """Tile (H, W, 3) or (H, W) uint8 arrays of one size into rows of `cols`."""
    if not images:
        raise ValueError("grid needs at least one image")
    tiles = [np.repeat(a[..., None], 3, axis=2) if a.ndim == 2 else a for a in images]
    h, w = tiles[0].shape[:2]
    rows = -(-len(tiles) // cols)
    canvas = np.full((rows * (h + pad) + pad, cols * (w + pad) + pad, 3), background, np.uint8)
    for i, tile in enumerate(tiles):
        r, c = divmod(i, cols)
        canvas[pad + r * (h + pad) : pad + r * (h + pad) + h, pad + c * (w + pad) : pad + c * (w + pad) + w] = tile
    return Image.fromarray(canvas)


FIGURE_PANEL = 256  # token_mask_figure scales each panel up by a whole factor towards this side
TOKEN_WHITE = (255, 255, 255)  # every pixel of the cell visible, token visible
TOKEN_RED = (255, 0, 0)  # some pixels of the cell masked, token still visible at this alpha
TOKEN_GREY = (128, 128, 128)  # token masked: left to the transformer
TOKEN_LINE = (200, 200, 200)
FIGURE_PAD, FIGURE_BACKGROUND = 4, 96  # dark gaps, so white panels keep their edges


def token_mask_figure(
    mask: np.ndarray, alphas: tuple[float, ...] = (0.25, 0.5, 0.75, 1.0), *, factor: int
) -> Image.Image:
    """The paper's Figure 3: how the pixel mask (H, W), 1 = visible, becomes a token mask M̂ at
    each alpha. One row per alpha: its label, the pixel mask (white visible, black hole), and the
    token grid: white where the token and all its pixels are visible, red where the token stays
    visible although some of its pixels are masked, grey where the token is masked."""
    import torch

    from .partial_conv import token_mask

    m = np.asarray(mask) > 0.5
    if m.ndim != 2:
        raise ValueError(f"mask must be (H, W), got shape {m.shape}")
    height, width = m.shape
    if height % factor or width % factor:
        raise ValueError(f"mask {height}x{width} is not divisible by the token factor {factor}")
    h, w = height // factor, width // factor
    scale = max(1, FIGURE_PANEL // max(height, width))
    cell = factor * scale
    cell_visible = m.reshape(h, factor, w, factor).all(axis=(1, 3))  # (h, w)
    pixels = np.repeat(np.repeat(np.where(m, 255, 0).astype(np.uint8), scale, 0), scale, 1)

    tiles = []
    for alpha in alphas:
        kept = token_mask(torch.from_numpy(m).float()[None, None], alpha, factor)[0, 0].numpy() > 0.5  # (h, w)
        colours = np.empty((h, w, 3), np.uint8)
        colours[:] = TOKEN_GREY
        colours[kept & cell_visible] = TOKEN_WHITE
        colours[kept & ~cell_visible] = TOKEN_RED
        tokens = np.repeat(np.repeat(colours, cell, 0), cell, 1)
        if cell >= 8:
            tokens[::cell, :] = TOKEN_LINE
            tokens[:, ::cell] = TOKEN_LINE
        label = Image.new("RGB", (width * scale, height * scale), TOKEN_WHITE)
        text = f"alpha = {alpha:g}\n{int(kept.sum())}/{h * w} tokens visible\n{int((kept & ~cell_visible).sum())} red"
        ImageDraw.Draw(label).multiline_text((6, 6), text, fill=(0, 0, 0), font=ImageFont.load_default())
        tiles += [np.asarray(label), pixels, tokens]
    return grid(tiles, cols=3, pad=FIGURE_PAD, background=FIGURE_BACKGROUND)


def inpainting_row(image: np.ndarray, mask: np.ndarray, samples: list[np.ndarray]) -> list[np.ndarray]:
    """One row of a samples grid: the input, the input with its hole grey, then the samples."""
    return [image, np.where(mask[..., None].astype(bool), image, np.uint8(128)), *samples]
