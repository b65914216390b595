"""Stage 1: encoders that turn a partial image into token logits at the visible token positions.

Every encoder here has one interface: forward(x (B, 3, H, W) the image, mask (B, 1, H, W) with
1 = visible) -> (logits (B, K, H/f, W/f), M̂ (B, H/f, W/f) bool). Logits are zero at masked
tokens (positions where M̂ is False); only visible tokens are trained (Eq. 5) and kept.

- RestrictiveEncoder: the paper's encoder. The VQGAN encoder's layout with every convolution a
  restrictive partial convolution (Eq. 3-4), features re-masked before every layer, GroupNorm
  statistics and attention keys from visible positions only. Its principle, "don't look into
  the dark": nothing at a hole position, pixel or feature, reaches a visible token's logits.
- VanillaEncoder: the same layout with ordinary layers on [X⊙M, M] (ablation "vanilla encoder").
- OfficialRestrictiveEncoder: the authors' released encoder (encoder.variant "official"): the
  same layout with StyleGAN2-style restrictive layers (partial_conv.StyleRestrictiveConv2d),
  plain GroupNorm and attention, and the input [M - 0.5, X⊙M]. Hole pixels still never reach a
  token, but hole features do enter the norms' statistics; it exists to run their weights.
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

from .config import STRIDE1_RULES, EncoderConfig, VQGANConfig, build, to_dict
from .partial_conv import (DOWNSAMPLE_PADDING, RestrictiveConv2d, StyleRestrictiveConv2d, masked,
                                         token_mask)
from .vqgan import IMAGE_CHANNELS, AttnBlock, Encoder, Layout, Level, VQModel, group_norm, swish

ENCODER_KINDS = ("restrictive", "vanilla", "miracle")
# Which stride-1 restrictive convs apply Eq. 3's window test (partial_conv.RestrictiveConv2d):
# "window": all of them, as printed; "centre": none, every visible position is kept (the
# authors' code); "window_with_skip": the ResNet blocks' convs, whose skip path keeps a refused
# position's features, while conv_in and conv_out, which have none, keep every visible position.
# Under "window", conv_out zeroes a visible token with fewer than half of its 3x3 token
# neighbours visible, so its logits are the head's bias: it always predicts the same code.


def _stride1_tests(rule: str) -> tuple[str, str]:
    """(the test of the ResNet blocks' convs, the test of conv_in and conv_out) under `rule`."""
    if rule not in STRIDE1_RULES:
        raise ValueError(f"encoder.stride1_rule must be one of {STRIDE1_RULES}, got {rule!r}")
    return {"window": ("window", "window"), "centre": ("centre", "centre"),
            "window_with_skip": ("window", "centre")}[rule]
GROUPS = 32  # as vqgan.group_norm
MIRACLE_LOGIT = 100.0  # softmax puts all but e^-100 of the mass on the VQGAN's token


def _check_inputs(x: torch.Tensor, mask: torch.Tensor) -> None:
    if mask.dim() != 4 or mask.shape[1] != 1 or mask.shape[0] != x.shape[0] or mask.shape[2:] != x.shape[2:]:
        raise ValueError(f"mask must be (B, 1, H, W) matching the image {tuple(x.shape)}, got {tuple(mask.shape)}")


def partially_masked(mask: torch.Tensor, token_mask: torch.Tensor, factor: int) -> torch.Tensor:
    """(B, h, w) bool: tokens kept visible (token_mask (B, h, w) bool) although some pixels of
    their f x f block are hole (mask (B, 1, H, W)): the tokens in small holes and on hole
    boundaries, which the paper's 23% (restrictive) vs 9% (vanilla) accuracy comparison is about."""
    hole_in_block = F.max_pool2d(1 - mask, factor).squeeze(1) > 0  # (B, h, w)
    return token_mask & hole_in_block


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

    def __init__(self, in_channels: int, out_channels: int, alpha: float, stride1: str = "window"):
        super().__init__()
        self.in_channels, self.out_channels = in_channels, out_channels
        self.norm1 = MaskedGroupNorm(in_channels)
        self.conv1 = RestrictiveConv2d(in_channels, out_channels, 3, padding=1, alpha=alpha, stride1=stride1)
        self.norm2 = MaskedGroupNorm(out_channels)
        self.conv2 = RestrictiveConv2d(out_channels, out_channels, 3, padding=1, alpha=alpha, stride1=stride1)
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
    def __init__(self, level: Level, num_res_blocks: int, alpha: float, stride1: str = "window"):
        super().__init__()
        widths = [level.in_channels] + [level.channels] * num_res_blocks
        self.block = nn.ModuleList(
            RestrictiveResnetBlock(widths[j], widths[j + 1], alpha, stride1) for j in range(num_res_blocks)
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
    def __init__(self, channels: int, alpha: float, stride1: str = "window"):
        super().__init__()
        self.block_1 = RestrictiveResnetBlock(channels, channels, alpha, stride1)
        self.attn_1 = MaskedAttnBlock(channels)
        self.block_2 = RestrictiveResnetBlock(channels, channels, alpha, stride1)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.block_2(self.attn_1(self.block_1(x, mask), mask), mask)


class RestrictiveBackbone(nn.Module):
    """vqgan.Encoder, layer for layer and name for name, made restrictive:
    (x (B, in_channels, H, W), mask (B, 1, H, W)) -> (z (B, z_channels, H/f, W/f), M̂ (B, 1, H/f, W/f))."""

    def __init__(self, in_channels: int, layout: Layout, alpha: float, stride1_rule: str = "window"):
        """stride1_rule: which stride-1 convs apply the window test (STRIDE1_RULES)."""
        super().__init__()
        blocks, ends = _stride1_tests(stride1_rule)
        self.levels = layout.levels()
        top = self.levels[-1].channels
        self.conv_in = RestrictiveConv2d(in_channels, layout.base_channels, 3, padding=1, alpha=alpha, stride1=ends)
        self.down = nn.ModuleList(
            RestrictiveDownLevel(level, layout.num_res_blocks, alpha, blocks) for level in self.levels
        )
        self.mid = RestrictiveMidBlock(top, alpha, blocks)
        self.norm_out = MaskedGroupNorm(top)
        self.conv_out = RestrictiveConv2d(top, layout.z_channels, 3, padding=1, alpha=alpha, stride1=ends)

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
        super().__init__(vq, enc, resolution, RestrictiveBackbone, alpha=enc.alpha, stride1_rule=enc.stride1_rule)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x (B, 3, H, W), mask (B, 1, H, W) -> (logits (B, K, H/f, W/f), M̂ (B, H/f, W/f) bool)."""
        _check_inputs(x, mask)
        mask = mask.to(x.dtype)
        z, m_hat = self.encoder(torch.cat([masked(x, mask), mask], dim=1), mask)
        return _masked_logits(self.head(z), m_hat)


# ---------------------------------------------------------------------------------- released layout


class StyleResnetBlock(nn.Module):
    """vqgan.ResnetBlock as the released encoder has it: plain norms, StyleRestrictiveConv2d convs,
    an unmasked residual."""

    def __init__(self, in_channels: int, out_channels: int, alpha: float):
        super().__init__()
        self.in_channels, self.out_channels = in_channels, out_channels
        self.norm1 = group_norm(in_channels)
        self.conv1 = StyleRestrictiveConv2d(in_channels, out_channels, 3, alpha=alpha)
        self.norm2 = group_norm(out_channels)
        self.conv2 = StyleRestrictiveConv2d(out_channels, out_channels, 3, alpha=alpha)
        if in_channels != out_channels:
            self.nin_shortcut = StyleRestrictiveConv2d(in_channels, out_channels, 1, alpha=alpha)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        h, _ = self.conv1(swish(self.norm1(x)), mask)
        h, _ = self.conv2(swish(self.norm2(h)), mask)
        if self.in_channels != self.out_channels:
            x, _ = self.nin_shortcut(x, mask)
        return x + h


class StyleDownLevel(nn.Module):
    def __init__(self, level: Level, num_res_blocks: int, alpha: float):
        super().__init__()
        widths = [level.in_channels] + [level.channels] * num_res_blocks
        self.block = nn.ModuleList(StyleResnetBlock(widths[j], widths[j + 1], alpha) for j in range(num_res_blocks))
        self.attn = nn.ModuleList(AttnBlock(level.channels) for _ in range(num_res_blocks if level.attn else 0))
        self.downsample = (StyleRestrictiveConv2d(level.channels, level.channels, 3, 2, alpha=alpha)
                           if level.downsample else None)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        for j, block in enumerate(self.block):
            x = block(x, mask)
            if len(self.attn):
                x = self.attn[j](x)
        return (x, mask) if self.downsample is None else self.downsample(x, mask)


class StyleMidBlock(nn.Module):
    def __init__(self, channels: int, alpha: float):
        super().__init__()
        self.block_1 = StyleResnetBlock(channels, channels, alpha)
        self.attn_1 = AttnBlock(channels)
        self.block_2 = StyleResnetBlock(channels, channels, alpha)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.block_2(self.attn_1(self.block_1(x, mask)), mask)


class StyleBackbone(nn.Module):
    """The released encoder's backbone (their PartialEncoder, names kept):
    (x (B, in_channels, H, W), mask (B, 1, H, W)) -> (z (B, z_channels, H/f, W/f), M̂ (B, 1, H/f, W/f))."""

    def __init__(self, in_channels: int, layout: Layout, alpha: float):
        super().__init__()
        self.levels = layout.levels()
        top = self.levels[-1].channels
        self.conv_in = StyleRestrictiveConv2d(in_channels, layout.base_channels, 3, alpha=alpha)
        self.down = nn.ModuleList(StyleDownLevel(level, layout.num_res_blocks, alpha) for level in self.levels)
        self.mid = StyleMidBlock(top, alpha)
        self.norm_out = group_norm(top)
        self.conv_out = StyleRestrictiveConv2d(top, layout.z_channels, 3, alpha=alpha)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h, _ = self.conv_in(x, mask)
        for level in self.down:
            h, mask = level(h, mask)
        h = self.mid(h, mask)  # (B, C_top, H/f, W/f)
        return self.conv_out(swish(self.norm_out(h)), mask)


class OfficialRestrictiveEncoder(_TrainedEncoder):
    """The authors' released encoder (encoder.variant "official") on the input [M - 0.5, X⊙M];
    its head is a 1x1 StyleRestrictiveConv2d, so logits are >= 0 (ReLU) and 0 at masked tokens.
    Their checkpoint's `encoder.*` keys are this model's; their `cls_head.*` are `head.*`."""

    def __init__(self, vq: VQGANConfig, enc: EncoderConfig, resolution: int):
        super().__init__(vq, enc, resolution, StyleBackbone, alpha=enc.alpha)
        self.head = StyleRestrictiveConv2d(vq.z_channels, vq.n_embed, 1, alpha=enc.alpha)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x (B, 3, H, W), mask (B, 1, H, W) -> (logits (B, K, H/f, W/f), M̂ (B, H/f, W/f) bool)."""
        _check_inputs(x, mask)
        mask = mask.to(x.dtype)
        # A select rather than x * mask: hole content (even inf or NaN) must not reach the input.
        visible = torch.where(mask > 0.5, x, torch.zeros((), dtype=x.dtype, device=x.device))
        z, m_hat = self.encoder(torch.cat([mask - 0.5, visible], dim=1), mask)
        logits, m_hat = self.head(z, m_hat)
        return _masked_logits(logits, m_hat)


class VanillaEncoder(_TrainedEncoder):
    """Ablation: the same layout with ordinary convolutions, GroupNorm and attention on
    [X⊙M, M]; M̂ from `token_mask`, so its tokens are scored where the restrictive encoder's are."""

    def __init__(self, vq: VQGANConfig, enc: EncoderConfig, resolution: int):
        super().__init__(vq, enc, resolution, Encoder)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x (B, 3, H, W), mask (B, 1, H, W) -> (logits (B, K, H/f, W/f), M̂ (B, H/f, W/f) bool)."""
        _check_inputs(x, mask)
        mask = mask.to(x.dtype)
        logits = self.head(self.encoder(torch.cat([masked(x, mask), mask], dim=1)))  # (B, K, H/f, W/f)
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
    """The stage-1 encoder `kind` (restrictive | vanilla | miracle); miracle needs the VQGAN. A
    restrictive encoder with encoder.variant "official" has the released model's layers."""
    if kind == "restrictive":
        return OfficialRestrictiveEncoder(vq, enc, resolution) if enc.variant == "official" else \
            RestrictiveEncoder(vq, enc, resolution)
    if kind == "vanilla":
        return VanillaEncoder(vq, enc, resolution)
    if kind == "miracle":
        if vqgan_model is None:
            raise ValueError("the miracle encoder tokenizes the full image with the VQGAN: pass vqgan_model")
        return MiracleEncoder(vqgan_model, enc.alpha)
    raise ValueError(f"unknown encoder kind {kind!r} (known: {', '.join(ENCODER_KINDS)})")

