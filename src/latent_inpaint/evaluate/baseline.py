"""The classical reference row: biharmonic inpainting (scikit-image), no learning at all.

Deterministic: one fill per input, so its pluralistic diversity is 0 by construction. (Telea /
Navier-Stokes would need OpenCV, which is not a dependency.)
"""

from __future__ import annotations

import numpy as np
from skimage.restoration import inpaint_biharmonic


def biharmonic_inpaint(image: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """(H, W, 3) uint8 and an (H, W) mask, 1 = visible -> (H, W, 3) uint8 whose hole is the smooth
    biharmonic continuation of its border and whose visible pixels are the input's, bit for bit."""
    image, mask = np.asarray(image), np.asarray(mask)
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] != 3:
        raise TypeError(f"biharmonic_inpaint takes an (H, W, 3) uint8 image, got {image.shape} {image.dtype}")
    if mask.shape != image.shape[:2]:
        raise ValueError(f"mask {mask.shape} does not match image {image.shape[:2]}")
    visible = mask.astype(bool)
    if visible.all():
        return image.copy()
    filled = inpaint_biharmonic(image, ~visible, channel_axis=-1)  # float in [0, 1]
    filled = np.clip(np.rint(filled * 255), 0, 255).astype(np.uint8)
    return np.where(visible[..., None], image, filled)
