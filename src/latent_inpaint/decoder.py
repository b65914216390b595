"""Stage 3: decoders that turn a full token map and the partial image into the inpainted image.

Both decoders here have one interface: forward(x (B, 3, H, W) the image, whose hole content is
never read; mask (B, 1, H, W) with 1 = visible; z_q (B, embed_dim, H/f, W/f) codebook vectors of
the full token map; M̂ (B, 1, H/f, W/f) or (B, H/f, W/f) with 1 = visible token) ->
(composite (B, 3, H, W), raw X' (B, 3, H, W)). The composite is X⊙M + X'⊙(1-M), formed with a
select so that every visible pixel is the input's, bit for bit, whatever X' holds.
forward is split in two for inference: `prior(x, mask)`, the part that reads the partial image
alone (E_prt), and `decode(prior, z_q, M̂)` -> X', the part that reads the tokens; pluralistic
sampling runs the prior once per image and `decode` once per sample.

- InpaintDecoder: the paper's decoder (Sec. 3.3, Eq. 7-8). E_prt, standard partial convolutions
  on [X⊙M, M] down to the token grid, is coupled with Z by `couple` and decoded by G, a decoder
  with the VQGAN decoder's layout and parameter names (so it can start from the trained VQGAN's
  decoder and post_quant_conv).
- OfficialDecoder: the authors' released decoder (decoder.variant "official"): a plain-conv mask
  encoder on [M - 0.5, X⊙M] instead of E_prt, coupled (Eq. 7-8) with the codebook vectors
  themselves before a 1x1 `post_bottleneck_conv`, then G. Its names are their checkpoint's.
- VanillaDecoder: the ablation "vanilla decoder" (Table 2, Fig. 4.B): the VQGAN decodes the
  tokens and the result is pasted into the hole. Nothing to train.
"""

from __future__ import annotations

import torch
from torch import nn

from latent_inpaint.config import VQGANConfig, build, to_dict
from latent_inpaint.partial_conv import DOWNSAMPLE_KERNEL, DOWNSAMPLE_PADDING, PartialConv2d
from latent_inpaint.encoder import MaskedAttnBlock
from latent_inpaint.vqgan import IMAGE_CHANNELS, Decoder, Encoder, Layout, Level, VQModel, group_norm, swish


def couple(z: torch.Tensor, e_prt: torch.Tensor, token_mask: torch.Tensor) -> torch.Tensor:
    """Eq. 7-8: the input of G, h1 + M̂·E_prt with h1 = (1-M̂)·(Z + E_prt)/2.

    Visible tokens take the partial image's features alone; masked tokens the average of the
    token features and whatever E_prt propagated into the hole. z, e_prt (B, C, h, w);
    token_mask (B, 1, h, w) or (B, h, w), bool or float, 1 = visible -> (B, C, h, w)."""
    m = _token_mask4(token_mask, z)
    h1 = (1 - m) * (z + e_prt) / 2
    return h1 + m * e_prt


def _token_mask4(token_mask: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """M̂ as (B, 1, h, w) in `like`'s dtype, checked against like (B, C, h, w)."""
    m = token_mask[:, None] if token_mask.dim() == 3 else token_mask
    if m.dim() != 4 or m.shape[1] != 1 or m.shape[0] != like.shape[0] or m.shape[2:] != like.shape[2:]:
        raise ValueError(
            f"token mask must be (B, 1, h, w) or (B, h, w) matching the token features {tuple(like.shape)}, "
            f"got {tuple(token_mask.shape)}"
        )
    return m.to(like.dtype)


def composite(x: torch.Tensor, mask: torch.Tensor, x_raw: torch.Tensor) -> torch.Tensor:
    """X⊙M + X'⊙(1-M) for a binary mask, as a select: visible pixels are x's exactly, and
    nothing in x's hole (not even inf or NaN) reaches the result."""
    return torch.where(mask > 0.5, x, x_raw)


def _check_inputs(x: torch.Tensor, mask: torch.Tensor, z_q: torch.Tensor, factor: int) -> None:
    if mask.dim() != 4 or mask.shape[1] != 1 or mask.shape[0] != x.shape[0] or mask.shape[2:] != x.shape[2:]:
        raise ValueError(f"mask must be (B, 1, H, W) matching the image {tuple(x.shape)}, got {tuple(mask.shape)}")
    grid = (x.shape[2] // factor, x.shape[3] // factor)
    if z_q.dim() != 4 or z_q.shape[0] != x.shape[0] or tuple(z_q.shape[2:]) != grid:
        raise ValueError(f"z_q must be (B, embed_dim, {grid[0]}, {grid[1]}) for the image {tuple(x.shape)}, "
                         f"got {tuple(z_q.shape)}")


# ---------------------------------------------------------------------------------- E_prt


class PartialResnetBlock(nn.Module):
    """vqgan.ResnetBlock with standard partial convs: the mask grows at each conv, features are
    zero where it is 0, so GroupNorm's statistics and the next conv never see hole content."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.in_channels, self.out_channels = in_channels, out_channels
        self.norm1 = group_norm(in_channels)
        self.conv1 = PartialConv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = group_norm(out_channels)
        self.conv2 = PartialConv2d(out_channels, out_channels, 3, padding=1)
        if in_channels != out_channels:
            self.nin_shortcut = PartialConv2d(in_channels, out_channels, 1)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h, m1 = self.conv1(swish(self.norm1(x)), mask)
        h, m2 = self.conv2(swish(self.norm2(h)), m1)
        if self.in_channels != self.out_channels:
            x, _ = self.nin_shortcut(x, mask)
        # The shortcut is defined where the input mask is, the block's output where m2 (a superset) is.
        return (x * mask.to(x.dtype) + h) * m2.to(h.dtype), m2


class PartialDownsample(nn.Module):
    """vqgan.Downsample (3x3, stride 2, zeros on the right and bottom only) as a partial conv."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = PartialConv2d(channels, channels, DOWNSAMPLE_KERNEL, stride=2, padding=DOWNSAMPLE_PADDING)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.conv(x, mask)  # (B, C, H/2, W/2), (B, 1, H/2, W/2)


class PartialDownLevel(nn.Module):
    """One level of the VQGAN encoder (num_res_blocks blocks, attention after each at the
    attention resolutions, then the down-sampling) with standard partial convolutions."""

    def __init__(self, level: Level, num_res_blocks: int):
        super().__init__()
        widths = [level.in_channels] + [level.channels] * num_res_blocks
        self.block = nn.ModuleList(PartialResnetBlock(widths[j], widths[j + 1]) for j in range(num_res_blocks))
        self.attn = nn.ModuleList(MaskedAttnBlock(level.channels) for _ in range(num_res_blocks if level.attn else 0))
        self.downsample = PartialDownsample(level.channels) if level.downsample else None

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        for j, block in enumerate(self.block):
            x, mask = block(x, mask)
            if len(self.attn):
                x = self.attn[j](x, mask)
        return (x, mask) if self.downsample is None else self.downsample(x, mask)


class PartialMidBlock(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.block_1 = PartialResnetBlock(channels, channels)
        self.attn_1 = MaskedAttnBlock(channels)
        self.block_2 = PartialResnetBlock(channels, channels)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x, mask = self.block_1(x, mask)
        return self.block_2(self.attn_1(x, mask), mask)


class PartialEncoder(nn.Module):
    """E_prt (Sec. 3.3 and the supplement): the VQGAN encoder's full layout, layer for layer and
    name for name (num_res_blocks partial-conv residual blocks per level, attention at
    `attn_resolutions`, the middle block with its attention), with standard partial convolutions
    (Eq. 1-2, mask updated at every layer) on [X⊙M, M]. Attention and its GroupNorm read the
    positions the mask has reached so far only. (x (B, 3, H, W), mask (B, 1, H, W)) ->
    (E_prt (B, z_channels, H/f, W/f), its mask (B, 1, H/f, W/f)); features are zero where the
    hole was too deep to be reached."""

    def __init__(self, vq: VQGANConfig, resolution: int, attn_resolutions: tuple[int, ...]):
        super().__init__()
        layout = Layout.of(vq, resolution, attn_resolutions)
        self.levels = layout.levels()
        self.factor = 2 ** (len(self.levels) - 1)
        top = self.levels[-1].channels
        self.conv_in = PartialConv2d(IMAGE_CHANNELS + 1, vq.base_channels, 3, padding=1)
        self.down = nn.ModuleList(PartialDownLevel(level, layout.num_res_blocks) for level in self.levels)
        self.mid = PartialMidBlock(top)
        self.norm_out = group_norm(top)
        self.conv_out = PartialConv2d(top, vq.z_channels, 3, padding=1)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mask = mask.to(x.dtype)
        # A select rather than x * mask: a hole holding inf or NaN must still give X⊙M = 0 there.
        visible = torch.where(mask > 0.5, x, torch.zeros((), dtype=x.dtype, device=x.device))
        h, m = self.conv_in(torch.cat([visible, mask], dim=1), mask)
        for level in self.down:
            h, m = level(h, m)
        h, m = self.mid(h, m)
        return self.conv_out(swish(self.norm_out(h)), m)  # (B, z_channels, H/f, W/f), (B, 1, H/f, W/f)


# ---------------------------------------------------------------------------------- decoders


class InpaintDecoder(nn.Module):
    """The paper's decoder (Eq. 7-8): composite of X' = G(couple(post_quant_conv(Z), E_prt(X⊙M), M̂)).

    `post_quant_conv` and `decoder` (G) carry the VQModel's names and shapes, so
    `init_from_vqgan` copies a trained VQGAN's into them; `partial_encoder` is E_prt, with
    attention at `attn_resolutions` (the paper: 32 and 16, as its restrictive encoder)."""

    def __init__(self, vq: VQGANConfig, resolution: int, attn_resolutions: tuple[int, ...]):
        super().__init__()
        self.vq, self.resolution, self.attn_resolutions = vq, resolution, tuple(attn_resolutions)
        self.factor = 2 ** (len(vq.channel_mult) - 1)
        self.partial_encoder = PartialEncoder(vq, resolution, self.attn_resolutions)
        self.post_quant_conv = nn.Conv2d(vq.embed_dim, vq.z_channels, 1)
        self.decoder = Decoder(IMAGE_CHANNELS, Layout.of(vq, resolution))

    def spec(self) -> dict:
        """What rebuilds this model (saved.load_model)."""
        return {"model": type(self).__name__, "vqgan": to_dict(self.vq), "resolution": self.resolution,
                "attn_resolutions": list(self.attn_resolutions)}

    @classmethod
    def from_spec(cls, spec: dict) -> InpaintDecoder:
        return cls(build(VQGANConfig, spec["vqgan"], "vqgan spec"), spec["resolution"], tuple(spec["attn_resolutions"]))

    @torch.no_grad()
    def init_from_vqgan(self, vqgan_model: VQModel) -> None:
        """G and post_quant_conv := the VQGAN's decoder and post_quant_conv (strict: same layout)."""
        self.decoder.load_state_dict(vqgan_model.decoder.state_dict(), strict=True)
        self.post_quant_conv.load_state_dict(vqgan_model.post_quant_conv.state_dict(), strict=True)

    def forward(
        self, x: torch.Tensor, mask: torch.Tensor, z_q: torch.Tensor, token_mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(x (B, 3, H, W), mask (B, 1, H, W), z_q (B, embed_dim, h, w), M̂ (B, 1, h, w) or (B, h, w))
        -> (composite (B, 3, H, W), X' (B, 3, H, W))."""
        _check_inputs(x, mask, z_q, self.factor)
        x_raw = self.decode(self.prior(x, mask), z_q, token_mask)
        return composite(x, mask, x_raw), x_raw

    def prior(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """E_prt(X⊙M): (x (B, 3, H, W), mask (B, 1, H, W)) -> (B, z_channels, h, w)."""
        return self.partial_encoder(x, mask)[0]

    def decode(self, prior: torch.Tensor, z_q: torch.Tensor, token_mask: torch.Tensor) -> torch.Tensor:
        """X' = G(couple(post_quant_conv(Z), E_prt, M̂)) (B, 3, H, W), `prior` from `prior`."""
        return self.decoder(couple(self.post_quant_conv(z_q), prior, token_mask))


class VanillaDecoder(nn.Module):
    """Ablation "vanilla decoder": X' = VQGAN.decode(Z), pasted into the hole. The token mask and
    the partial image play no part beyond the paste; the VQGAN is held, not trained."""

    def __init__(self, vqgan_model: VQModel):
        super().__init__()
        self.factor = vqgan_model.factor
        self.vqgan = vqgan_model

    def forward(
        self, x: torch.Tensor, mask: torch.Tensor, z_q: torch.Tensor, token_mask: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """As InpaintDecoder.forward; token_mask is accepted for the common interface and unused."""
        _check_inputs(x, mask, z_q, self.factor)
        x_raw = self.decode(self.prior(x, mask), z_q, token_mask)
        return composite(x, mask, x_raw), x_raw

    def prior(self, x: torch.Tensor, mask: torch.Tensor) -> None:
        """Nothing: the VQGAN decodes the tokens alone."""
        return None

    def decode(self, prior: None, z_q: torch.Tensor, token_mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.vqgan.decode(z_q)  # (B, 3, H, W)


class OfficialDecoder(nn.Module):
    """The authors' released decoder (their PartialDecoder, names kept):
    X' = G(post_bottleneck_conv(couple(Z, bottleneck_conv(encoder([M - 0.5, X⊙M])), M̂))), with Z the
    codebook vectors (no post_quant_conv) and `encoder` a VQGAN encoder on 4 channels whose hole
    features are ordinary convolutions of zeros. Same interface as InpaintDecoder."""

    def __init__(self, vq: VQGANConfig, resolution: int):
        super().__init__()
        self.vq, self.resolution = vq, resolution
        self.factor = 2 ** (len(vq.channel_mult) - 1)
        self.encoder = Encoder(IMAGE_CHANNELS + 1, Layout.of(vq, resolution))
        self.bottleneck_conv = nn.Conv2d(vq.z_channels, vq.embed_dim, 1)
        self.post_bottleneck_conv = nn.Conv2d(vq.embed_dim, vq.z_channels, 1)
        self.decoder = Decoder(IMAGE_CHANNELS, Layout.of(vq, resolution))

    def spec(self) -> dict:
        """What rebuilds this model (saved.load_model)."""
        return {"model": type(self).__name__, "vqgan": to_dict(self.vq), "resolution": self.resolution}

    @classmethod
    def from_spec(cls, spec: dict) -> OfficialDecoder:
        return cls(build(VQGANConfig, spec["vqgan"], "vqgan spec"), spec["resolution"])

    @torch.no_grad()
    def init_from_vqgan(self, vqgan_model: VQModel) -> None:
        """G and post_bottleneck_conv := the VQGAN's decoder and post_quant_conv (as their training starts)."""
        self.decoder.load_state_dict(vqgan_model.decoder.state_dict(), strict=True)
        self.post_bottleneck_conv.load_state_dict(vqgan_model.post_quant_conv.state_dict(), strict=True)

    def forward(
        self, x: torch.Tensor, mask: torch.Tensor, z_q: torch.Tensor, token_mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """As InpaintDecoder.forward."""
        _check_inputs(x, mask, z_q, self.factor)
        x_raw = self.decode(self.prior(x, mask), z_q, token_mask)
        return composite(x, mask, x_raw), x_raw

    def prior(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """The mask encoder's features: (x (B, 3, H, W), mask (B, 1, H, W)) -> (B, embed_dim, h, w)."""
        mask = mask.to(x.dtype)
        visible = torch.where(mask > 0.5, x, torch.zeros((), dtype=x.dtype, device=x.device))
        return self.bottleneck_conv(self.encoder(torch.cat([mask - 0.5, visible], dim=1)))

    def decode(self, prior: torch.Tensor, z_q: torch.Tensor, token_mask: torch.Tensor) -> torch.Tensor:
        """X' (B, 3, H, W), `prior` from `prior`."""
        return self.decoder(self.post_bottleneck_conv(couple(z_q, prior, token_mask)))


def build_decoder(variant: str, vq: VQGANConfig, resolution: int, attn_resolutions: tuple[int, ...]) -> nn.Module:
    """The stage-3 decoder decoder.variant names: the paper's (E_prt, attention at
    `attn_resolutions`) or the released one (which has its VQGAN encoder's)."""
    if variant == "official":
        return OfficialDecoder(vq, resolution)
    return InpaintDecoder(vq, resolution, attn_resolutions)
