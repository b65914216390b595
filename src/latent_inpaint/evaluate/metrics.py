"""Metrics against the ground truth (hole L1 and PSNR, SSIM) and pluralistic diversity.

Images are (H, W, 3) or (H, W) arrays, uint8 or float in [-1, 1]; every metric works on the
[0, 1] scale (uint8 / 255, (x + 1) / 2), so both kinds give the same numbers. Masks are (H, W)
with 1 = visible, 0 = hole (the masks.py convention). These need no pretrained network, so they
are the numbers comparable across machines without the standard weights (method.md).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from skimage.metrics import structural_similarity
from torch import nn

# An exact fill has infinite PSNR; floor the MSE at 1e-10 (a 100 dB cap) so
# averages and metrics JSON stay finite.
MSE_FLOOR = 1e-10
PSNR_CAP = 10 * np.log10(1 / MSE_FLOOR)


def _unit(image) -> np.ndarray:
    """uint8, or float in [-1, 1] -> float64 in [0, 1]."""
    a = np.asarray(image)
    if a.dtype == np.uint8:
        return a.astype(np.float64) / 255
    if np.issubdtype(a.dtype, np.floating):
        return np.clip((a.astype(np.float64) + 1) / 2, 0, 1)
    raise TypeError(f"images must be uint8 or float in [-1, 1], got {a.dtype}")


def errors(x: torch.Tensor, y: torch.Tensor, mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-image (L1, PSNR in dB) of images in [-1, 1], on the [0, 1] scale (peak 1); (B,), (B,).

    The one PSNR of the project. With `mask` (B, 1, H, W), 1 = visible, only the hole pixels
    count; an image without a hole then scores L1 0 and the PSNR of the MSE floor (100 dB)."""
    dtype = torch.float64 if torch.float64 in (x.dtype, y.dtype) else torch.float32  # never bf16 sums
    diff = (x.to(dtype) - y.to(dtype)) / 2  # (B, C, H, W) on the [0, 1] scale
    weight = torch.ones_like(diff) if mask is None else (mask < 0.5).to(diff.dtype).expand_as(diff)
    count = weight.flatten(1).sum(1).clamp(min=1.0)
    l1 = (diff.abs() * weight).flatten(1).sum(1) / count
    mse = (diff.pow(2) * weight).flatten(1).sum(1) / count
    return l1, 10 * torch.log10(1.0 / mse.clamp_min(MSE_FLOOR))


def _hole_tensors(pred, target, mask) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(H, W[, 3]) arrays -> (1, C, H, W) tensors in [-1, 1] and the (1, 1, H, W) mask, checked."""
    p, t, m = _unit(pred), _unit(target), np.asarray(mask)
    if p.shape != t.shape or m.shape != p.shape[:2]:
        raise ValueError(f"shapes differ: pred {p.shape}, target {t.shape}, mask {m.shape}")
    if not np.isin(m, (0, 1)).all():
        raise ValueError("mask must hold 0 (hole) and 1 (visible) only; mask PNGs use 255: read them with "
                         "masks.load_mask")
    if m.all():
        raise ValueError("mask has no hole pixels: nothing to measure")

    def image(a: np.ndarray) -> torch.Tensor:
        a = a if a.ndim == 3 else a[..., None]
        return torch.from_numpy(a * 2 - 1).permute(2, 0, 1)[None]  # (1, C, H, W), float64

    return image(p), image(t), torch.from_numpy(m.astype(np.float64))[None, None]


def hole_l1(pred, target, mask) -> float:
    """Mean absolute error over the hole pixels and channels, on the [0, 1] scale."""
    return float(errors(*_hole_tensors(pred, target, mask))[0])


def hole_psnr(pred, target, mask) -> float:
    """PSNR in dB (peak 1 on the [0, 1] scale) of the hole pixels only; capped at PSNR_CAP (100 dB)."""
    return float(errors(*_hole_tensors(pred, target, mask))[1])


def ssim(pred, target) -> float:
    """scikit-image's SSIM on the full image (default 7x7 uniform window), data range 1."""
    p, t = _unit(pred), _unit(target)
    return float(structural_similarity(p, t, data_range=1.0, channel_axis=-1 if p.ndim == 3 else None))


def _lpips_input(image) -> torch.Tensor:
    a = _unit(image)
    if a.ndim != 3 or a.shape[-1] != 3:
        raise ValueError(f"diversity takes (H, W, 3) images, got {a.shape}")
    return torch.from_numpy(a * 2 - 1).float().permute(2, 0, 1)  # (3, H, W) in [-1, 1]


@torch.inference_mode()
def diversity(samples: Sequence, lpips_model: nn.Module, batch_size: int = 32) -> float:
    """Mean LPIPS over all unordered pairs i < j of the samples drawn for one input image.

    `lpips_model` is an lpips.LPIPS (losses.load_lpips). LPIPS of a pair is, per VGG layer, the
    spatial mean of sum_c w_c (f_ic - f_jc)^2 over normalised features f; summed over the pairs,
    sum_{i<j} (a_i - a_j)^2 = S sum_i a_i^2 - (sum_i a_i)^2. So each sample goes through VGG once
    and the pairs are never formed: O(S) work and memory, not O(S^2) (4,950 pairs a paper image).
    The sums are in float64, so the difference loses nothing to cancellation.
    """
    import lpips

    if len(samples) < 2:
        raise ValueError(f"diversity needs at least 2 samples, got {len(samples)}")
    device = next(lpips_model.parameters()).device
    x = torch.stack([_lpips_input(s) for s in samples]).to(device)  # (S, 3, H, W)
    per_layer = zip(*(lpips_model.net(lpips_model.scaling_layer(chunk)) for chunk in x.split(batch_size)))
    n, total = len(samples), 0.0
    for lin, layer in zip(lpips_model.lins, per_layer):
        f = lpips.normalize_tensor(torch.cat(layer)).double()  # (S, C, h, w)
        spread = n * f.pow(2).sum(0) - f.sum(0).pow(2)  # (C, h, w): sum over pairs of (f_i - f_j)^2
        weight = lin.model[-1].weight.double()  # (1, C, 1, 1): the layer's 1x1 head, no bias
        total += (weight[0] * spread).sum(0).mean().item()
    return total / (n * (n - 1) / 2)


def diversity_summary(per_image_scores: Sequence[float]) -> tuple[float, float]:
    """(mean, std) over images, as the paper's "0.29±0.06"; population std (ddof 0)."""
    scores = np.asarray(per_image_scores, dtype=np.float64)
    if scores.size == 0:
        raise ValueError("no diversity scores to summarise")
    return float(scores.mean()), float(scores.std())
