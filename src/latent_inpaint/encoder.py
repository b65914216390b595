"""Stage 1: encoders that turn a partial image into token logits at the visible token positions.

Every encoder here has one interface: forward(x (B, 3, H, W) the image, mask (B, 1, H, W) with
1 = visible) -> (logits (B, K, H/f, W/f), M̂ (B, H/f, W/f) bool). Logits are zero at masked
tokens (positions where M̂ is False); only visible tokens are trained (Eq. 5) and kept.

- RestrictiveEncoder: the paper's encoder. The VQGAN encoder's layout with every convolution a
  restrictive partial convolution (Eq. 3-4), features re-masked before every layer, GroupNorm
  statistics and attention keys from visible positions only. Its principle, "don't look into
  the dark": nothing at a hole position, pixel or feature, reaches a visible token's logits.
- VanillaEncoder: the same layout with ordinary layers on [X⊙M, M] (ablation "vanilla encoder").
- MiracleEncoder: the VQGAN's tokens of the full image, kept where M̂ is visible (ablation
  "miracle encoder", Table 3): not trained, an upper bound on what an encoder could predict.

Restrictive and vanilla encoders share the VQGAN encoder's parameter names and shapes under
`encoder.` (only conv_in differs from a VQGAN: 4 input channels), plus `head`, a 1x1 conv from
z_channels to the K logits.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from latent_inpaint.config import EncoderConfig, VQGANConfig, build, to_dict
from latent_inpaint.partial_conv import DOWNSAMPLE_PADDING, RestrictiveConv2d, token_mask
from latent_inpaint.vqgan import IMAGE_CHANNELS, AttnBlock, Encoder, Layout, Level, VQModel, swish

ENCODER_KINDS = ("restrictive", "vanilla", "miracle")
GROUPS = 32  # as vqgan.group_norm
MIRACLE_LOGIT = 100.0  # softmax puts all but e^-100 of the mass on the VQGAN's token


def _check_inputs(x: torch.Tensor, mask: torch.Tensor) -> None:
    if mask.dim() != 4 or mask.shape[1] != 1 or mask.shape[0] != x.shape[0] or mask.shape[2:] != x.shape[2:]:
        raise ValueError(f"mask must be (B, 1, H, W) matching the image {tuple(x.shape)}, got {tuple(mask.shape)}")


def _masked_logits(logits: torch.Tensor, m_hat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits zeroed at masked tokens, M̂ (B, h, w) bool) from M̂ (B, 1, h, w)."""
    return logits * m_hat.to(logits.dtype), m_hat[:, 0] > 0.5


# ---------------------------------------------------------------------------------- masked layers


class MaskedGroupNorm(nn.GroupNorm):
    """GroupNorm (32 groups, as the VQGAN's) whose mean and variance come from visible positions
    only; the output is re-masked. A sample with no visible position gives zeros."""

    def __init__(self, channels: int):
        super().__init__(num_groups=GROUPS, num_channels=channels, eps=1e-6, affine=True)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        g = self.num_groups
        with torch.autocast(device_type=x.device.type, enabled=False):
            xf = x.float().reshape(b, g, c // g, h * w)
            m = mask.float().reshape(b, 1, 1, h * w)
            count = (m.sum(dim=(2, 3), keepdim=True) * (c // g)).clamp(min=1.0)
            mean = (xf * m).sum(dim=(2, 3), keepdim=True) / count
            var = ((xf - mean) * m).pow(2).sum(dim=(2, 3), keepdim=True) / count
            y = ((xf - mean) * torch.rsqrt(var + self.eps)).reshape(b, c, h, w)
            y = y * self.weight.float().view(1, c, 1, 1) + self.bias.float().view(1, c, 1, 1)
            y = y * mask.float()
        return y.to(x.dtype)


class MaskedAttnBlock(AttnBlock):
    """The VQGAN's single-head self-attention with keys at visible positions only; outputs at hole
    queries are masked out."""

    def __init__(self, channels: int):
        super().__init__(channels)
        self.norm = MaskedGroupNorm(channels)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        b, _, h, w = x.shape
        visible = mask.reshape(b, 1, 1, h * w) > 0.5  # (B, 1, 1 query row, h*w keys)
        # Without a visible key a softmax row is all -inf (NaN); such a sample has only hole
        # queries, whose outputs are masked out below, so let them attend anywhere.
        visible = visible | ~visible.any(dim=-1, keepdim=True)
        return (x + self.attend(self.norm(x, mask), visible)) * mask.to(x.dtype)


class RestrictiveResnetBlock(nn.Module):
    """vqgan.ResnetBlock with restrictive convs and masked norms."""

    def __init__(self, in_channels: int, out_channels: int, alpha: float):
        super().__init__()
        self.in_channels, self.out_channels = in_channels, out_channels
        self.norm1 = MaskedGroupNorm(in_channels)
        self.conv1 = RestrictiveConv2d(in_channels, out_channels, 3, padding=1, alpha=alpha)
        self.norm2 = MaskedGroupNorm(out_channels)
        self.conv2 = RestrictiveConv2d(out_channels, out_channels, 3, padding=1, alpha=alpha)
        if in_channels != out_channels:
            self.nin_shortcut = RestrictiveConv2d(in_channels, out_channels, 1, alpha=alpha)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        h, _ = self.conv1(swish(self.norm1(x, mask)), mask)
        h, _ = self.conv2(swish(self.norm2(h, mask)), mask)
        if self.in_channels != self.out_channels:
            x, _ = self.nin_shortcut(x, mask)
        return (x + h) * mask.to(x.dtype)


class RestrictiveDownsample(nn.Module):
    """vqgan.Downsample as a restrictive conv: the one place the mask changes (Eq. 4)."""

    def __init__(self, channels: int, alpha: float):
        super().__init__()
        self.conv = RestrictiveConv2d(channels, channels, 3, stride=2, padding=DOWNSAMPLE_PADDING, alpha=alpha)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.conv(x, mask)  # (B, C, H/2, W/2), (B, 1, H/2, W/2)


class RestrictiveDownLevel(nn.Module):
    def __init__(self, level: Level, num_res_blocks: int, alpha: float):
        super().__init__()
        widths = [level.in_channels] + [level.channels] * num_res_blocks
        self.block = nn.ModuleList(
            RestrictiveResnetBlock(widths[j], widths[j + 1], alpha) for j in range(num_res_blocks)
        )
        self.attn = nn.ModuleList(MaskedAttnBlock(level.channels) for _ in range(num_res_blocks if level.attn else 0))
        self.downsample = RestrictiveDownsample(level.channels, alpha) if level.downsample else None

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        for j, block in enumerate(self.block):
            x = block(x, mask)
            if len(self.attn):
                x = self.attn[j](x, mask)
        return (x, mask) if self.downsample is None else self.downsample(x, mask)


class RestrictiveMidBlock(nn.Module):
    def __init__(self, channels: int, alpha: float):
        super().__init__()
        self.block_1 = RestrictiveResnetBlock(channels, channels, alpha)
        self.attn_1 = MaskedAttnBlock(channels)
        self.block_2 = RestrictiveResnetBlock(channels, channels, alpha)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.block_2(self.attn_1(self.block_1(x, mask), mask), mask)


class RestrictiveBackbone(nn.Module):
    """vqgan.Encoder, layer for layer and name for name, made restrictive:
    (x (B, in_channels, H, W), mask (B, 1, H, W)) -> (z (B, z_channels, H/f, W/f), M̂ (B, 1, H/f, W/f))."""

    def __init__(self, in_channels: int, layout: Layout, alpha: float):
        super().__init__()
        self.levels = layout.levels()
        top = self.levels[-1].channels
        self.conv_in = RestrictiveConv2d(in_channels, layout.base_channels, 3, padding=1, alpha=alpha)
        self.down = nn.ModuleList(RestrictiveDownLevel(level, layout.num_res_blocks, alpha) for level in self.levels)
        self.mid = RestrictiveMidBlock(top, alpha)
        self.norm_out = MaskedGroupNorm(top)
        self.conv_out = RestrictiveConv2d(top, layout.z_channels, 3, padding=1, alpha=alpha)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h, _ = self.conv_in(x, mask)
        for level in self.down:
            h, mask = level(h, mask)
        h = self.mid(h, mask)  # (B, C_top, H/f, W/f)
        h, _ = self.conv_out(swish(self.norm_out(h, mask)), mask)
        return h, mask


# ---------------------------------------------------------------------------------- encoders


class _TrainedEncoder(nn.Module):
    """What the trained encoders share: a backbone with the VQGAN encoder's widths and stage 1's
    attention resolutions on the input [X⊙M, M], a 1x1 head to the K logits, and a spec."""

    def __init__(self, vq: VQGANConfig, enc: EncoderConfig, resolution: int, backbone: type[nn.Module], **kwargs):
        super().__init__()
        self.vq, self.enc, self.resolution = vq, enc, resolution
        self.alpha = enc.alpha
        self.factor = 2 ** (len(vq.channel_mult) - 1)
        self.encoder = backbone(IMAGE_CHANNELS + 1, Layout.of(vq, resolution, enc.attn_resolutions), **kwargs)
        self.head = nn.Conv2d(vq.z_channels, vq.n_embed, 1)

    def spec(self) -> dict:
        """What rebuilds this model (saved.load_model); `encoder.alpha` may be overridden there."""
        return {"model": type(self).__name__, "vqgan": to_dict(self.vq), "encoder": to_dict(self.enc),
                "resolution": self.resolution}

    @classmethod
    def from_spec(cls, spec: dict) -> _TrainedEncoder:
        return cls(build(VQGANConfig, spec["vqgan"], "vqgan spec"), build(EncoderConfig, spec["encoder"], "encoder spec"),
                   spec["resolution"])


class RestrictiveEncoder(_TrainedEncoder):
    """The paper's restrictive encoder (Sec. 3.1) on the input [X⊙M, M]."""

    def __init__(self, vq: VQGANConfig, enc: EncoderConfig, resolution: int):
        super().__init__(vq, enc, resolution, RestrictiveBackbone, alpha=enc.alpha)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x (B, 3, H, W), mask (B, 1, H, W) -> (logits (B, K, H/f, W/f), M̂ (B, H/f, W/f) bool)."""
        _check_inputs(x, mask)
        mask = mask.to(x.dtype)
        z, m_hat = self.encoder(torch.cat([x * mask, mask], dim=1), mask)
        return _masked_logits(self.head(z), m_hat)


class VanillaEncoder(_TrainedEncoder):
    """Ablation: the same layout with ordinary convolutions, GroupNorm and attention on
    [X⊙M, M]; M̂ from `token_mask`, so its tokens are scored where the restrictive encoder's are."""

    def __init__(self, vq: VQGANConfig, enc: EncoderConfig, resolution: int):
        super().__init__(vq, enc, resolution, Encoder)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x (B, 3, H, W), mask (B, 1, H, W) -> (logits (B, K, H/f, W/f), M̂ (B, H/f, W/f) bool)."""
        _check_inputs(x, mask)
        mask = mask.to(x.dtype)
        logits = self.head(self.encoder(torch.cat([x * mask, mask], dim=1)))  # (B, K, H/f, W/f)
        return _masked_logits(logits, token_mask(mask, self.alpha, self.factor))


class MiracleEncoder(nn.Module):
    """Ablation: the VQGAN's tokens of the FULL image as logits MIRACLE_LOGIT at the token and 0
    elsewhere, kept where M̂ is visible. It looks into the dark by construction; nothing to train."""

    def __init__(self, vqgan_model: VQModel, alpha: float):
        super().__init__()
        self.alpha = alpha
        self.factor = vqgan_model.factor
        self.vqgan = vqgan_model

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x (B, 3, H, W) full image, mask (B, 1, H, W) -> (logits (B, K, H/f, W/f), M̂ (B, H/f, W/f))."""
        _check_inputs(x, mask)
        tokens = self.vqgan.tokenize(x)  # (B, H/f, W/f)
        one_hot = F.one_hot(tokens, self.vqgan.quantize.n_embed).permute(0, 3, 1, 2).to(x.dtype)
        return _masked_logits(one_hot * MIRACLE_LOGIT, token_mask(mask.to(x.dtype), self.alpha, self.factor))


def build_encoder(
    kind: str,
    vq: VQGANConfig,
    enc: EncoderConfig,
    resolution: int,
    vqgan_model: VQModel | None = None,
) -> nn.Module:
    """The stage-1 encoder `kind` (restrictive | vanilla | miracle); miracle needs the VQGAN."""
    if kind == "restrictive":
        return RestrictiveEncoder(vq, enc, resolution)
    if kind == "vanilla":
        return VanillaEncoder(vq, enc, resolution)
    if kind == "miracle":
        if vqgan_model is None:
            raise ValueError("the miracle encoder tokenizes the full image with the VQGAN: pass vqgan_model")
        return MiracleEncoder(vqgan_model, enc.alpha)
    raise ValueError(f"unknown encoder kind {kind!r} (known: {', '.join(ENCODER_KINDS)})")
