"""The authors' refinement network, run after the decoder in their released pipeline (not in
the paper): an encoder-bottleneck-decoder over the composite image, without skip connections.

    y (B, 3, S, S) = X⊙M + X'⊙(1-M)     the decoder's composite at the model size S
    r = G_r(post_bottleneck_conv(bottleneck_conv(E_r(y))))   (B, 3, S_out, S_out), S_out = S or 2S
    final = X↑⊙M↑ + r⊙(1-M↑)           X↑, M↑: the image and the (nearest-)upsampled mask at S_out

E_r and G_r are a VQGAN encoder (3 channels) and decoder with their own layouts: the 512 px
refiner's decoder has one level more than its encoder. Parameter names are their checkpoint's.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import nn

from latent_inpaint.vqgan import IMAGE_CHANNELS, Decoder, Encoder, Layout


def _layout(values: dict) -> Layout:
    return Layout(**{k: tuple(v) if isinstance(v, list) else v for k, v in values.items()})


class Refiner(nn.Module):
    """(B, 3, S_in, S_in) composite -> (B, 3, S_out, S_out) refined image (the raw output)."""

    def __init__(self, encoder_layout: Layout, decoder_layout: Layout, embed_dim: int):
        super().__init__()
        self.encoder_layout, self.decoder_layout, self.embed_dim = encoder_layout, decoder_layout, embed_dim
        self.size_in, self.size_out = encoder_layout.resolution, decoder_layout.resolution
        self.encoder = Encoder(IMAGE_CHANNELS, encoder_layout)
        self.bottleneck_conv = nn.Conv2d(encoder_layout.z_channels, embed_dim, 1)
        self.post_bottleneck_conv = nn.Conv2d(embed_dim, decoder_layout.z_channels, 1)
        self.decoder = Decoder(IMAGE_CHANNELS, decoder_layout)

    def spec(self) -> dict:
        """What rebuilds this model (saved.load_model)."""
        return {"model": type(self).__name__, "encoder": dataclasses.asdict(self.encoder_layout),
                "decoder": dataclasses.asdict(self.decoder_layout), "embed_dim": self.embed_dim}

    @classmethod
    def from_spec(cls, spec: dict) -> Refiner:
        return cls(_layout(spec["encoder"]), _layout(spec["decoder"]), spec["embed_dim"])

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        if tuple(y.shape[2:]) != (self.size_in, self.size_in):
            raise ValueError(f"the refiner takes {self.size_in}x{self.size_in} images, got {tuple(y.shape)}")
        h = self.bottleneck_conv(self.encoder(y))  # (B, embed_dim, S_in/f, S_in/f)
        return self.decoder(self.post_bottleneck_conv(h))  # (B, 3, S_out, S_out)

    def refine(self, composite: torch.Tensor, image_out: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """The released pipeline's last step: composite (B, 3, S_in, S_in); image_out (B, 3, S_out,
        S_out), the image at the output size (only its visible pixels are read); mask (B, 1, S_in,
        S_in) 1 = visible -> (B, 3, S_out, S_out), visible pixels exactly image_out's."""
        refined = self(composite)
        mask_out = F.interpolate(mask.float(), size=refined.shape[2:], mode="nearest")
        return torch.where(mask_out > 0.5, image_out, refined)
