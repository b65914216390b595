"""Stage 0: the VQGAN that turns images into tokens (taming-transformers' "f16" layout).

Every parameter carries the name taming-transformers gives it, so a user's taming VQGAN checkpoint
loads strictly (`taming.import_taming_checkpoint`). Images are (B, 3, H, W) in [-1, 1]; tokens are
(B, H/f, W/f) with f = 2**(len(channel_mult) - 1), i.e. 16 for the paper's configuration.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import nn

from latent_inpaint.config import VQGANConfig, build, to_dict

IMAGE_CHANNELS = 3


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


# ---------------------------------------------------------------------------------- blocks


def group_norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(num_groups=32, num_channels=channels, eps=1e-6, affine=True)


def swish(x: torch.Tensor) -> torch.Tensor:
    return F.silu(x)


class ResnetBlock(nn.Module):
    """norm-swish-conv twice, plus the input (through a 1x1 conv when the width changes)."""

    def __init__(self, in_channels: int, out_channels: int | None = None):
        super().__init__()
        out_channels = in_channels if out_channels is None else out_channels
        self.in_channels, self.out_channels = in_channels, out_channels
        self.norm1 = group_norm(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = group_norm(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        if in_channels != out_channels:
            self.nin_shortcut = nn.Conv2d(in_channels, out_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(swish(self.norm1(x)))
        h = self.conv2(swish(self.norm2(h)))
        if self.in_channels != self.out_channels:
            x = self.nin_shortcut(x)
        return x + h


class AttnBlock(nn.Module):
    """Single-head self-attention over all positions of a feature map, with a residual."""

    def __init__(self, channels: int):
        super().__init__()
        self.norm = group_norm(channels)
        self.q = nn.Conv2d(channels, channels, 1)
        self.k = nn.Conv2d(channels, channels, 1)
        self.v = nn.Conv2d(channels, channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def attend(self, y: torch.Tensor, keys: torch.Tensor | None = None) -> torch.Tensor:
        """proj_out(attention(y)) for normalised features y (B, C, h, w); `keys` (B, 1, 1, h*w)
        bool, where given, says which positions every query may attend to."""
        b, c, h, w = y.shape

        def tokens(t: torch.Tensor) -> torch.Tensor:
            return t.reshape(b, 1, c, h * w).transpose(2, 3)  # (B, 1 head, h*w, C)

        y = F.scaled_dot_product_attention(tokens(self.q(y)), tokens(self.k(y)), tokens(self.v(y)), attn_mask=keys)
        return self.proj_out(y.transpose(2, 3).reshape(b, c, h, w))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.attend(self.norm(x))


class Downsample(nn.Module):
    """Stride-2 3x3 conv. Padding only right and bottom (as taming does) keeps a checkpoint's
    features aligned; symmetric padding would shift them by half a pixel."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class MidBlock(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.block_1 = ResnetBlock(channels)
        self.attn_1 = AttnBlock(channels)
        self.block_2 = ResnetBlock(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block_2(self.attn_1(self.block_1(x)))


# ---------------------------------------------------------------------------------- layout


@dataclasses.dataclass(frozen=True)
class Level:
    """One resolution level of the encoder; the decoder walks the same levels in reverse."""

    index: int
    in_channels: int  # width entering the level's first block
    channels: int  # width of the level's blocks
    resolution: int  # side of the level's feature map: image side / 2**index
    attn: bool  # self-attention after every block of the level
    downsample: bool  # the encoder halves the resolution after this level (all but the last)


def encoder_levels(
    base_channels: int,
    channel_mult: tuple[int, ...],
    resolution: int,
    attn_resolutions: tuple[int, ...],
) -> list[Level]:
    """The encoder's levels from the full-resolution one down; the restrictive encoder (stage 1)
    mirrors this layout with its own convolutions."""
    n = len(channel_mult)
    if resolution % 2 ** (n - 1):
        raise ValueError(f"resolution {resolution} is not divisible by the downsampling factor {2 ** (n - 1)}")
    in_mult = (1, *channel_mult)
    return [
        Level(
            index=i,
            in_channels=base_channels * in_mult[i],
            channels=base_channels * channel_mult[i],
            resolution=resolution // 2**i,
            attn=resolution // 2**i in attn_resolutions,
            downsample=i != n - 1,
        )
        for i in range(n)
    ]


@dataclasses.dataclass(frozen=True)
class Layout:
    """The widths and levels an encoder or a decoder is built with: the VQGAN's, or another
    attention placement on the same widths (the stage-1 encoders)."""

    base_channels: int
    channel_mult: tuple[int, ...]
    num_res_blocks: int
    attn_resolutions: tuple[int, ...]
    z_channels: int
    resolution: int

    @classmethod
    def of(cls, cfg: VQGANConfig, resolution: int, attn_resolutions: tuple[int, ...] | None = None) -> Layout:
        attn = cfg.attn_resolutions if attn_resolutions is None else attn_resolutions
        return cls(cfg.base_channels, tuple(cfg.channel_mult), cfg.num_res_blocks, tuple(attn), cfg.z_channels,
                   resolution)

    def levels(self) -> list[Level]:
        return encoder_levels(self.base_channels, self.channel_mult, self.resolution, self.attn_resolutions)


class _Blocks(nn.Module):
    """A level's residual blocks (`block`), each followed by self-attention where the level has it (`attn`)."""

    def blocks(self, x: torch.Tensor) -> torch.Tensor:
        for j, block in enumerate(self.block):
            x = block(x)
            if len(self.attn):
                x = self.attn[j](x)
        return x


class DownLevel(_Blocks):
    def __init__(self, level: Level, num_res_blocks: int):
        super().__init__()
        widths = [level.in_channels] + [level.channels] * num_res_blocks
        self.block = nn.ModuleList(ResnetBlock(widths[j], widths[j + 1]) for j in range(num_res_blocks))
        self.attn = nn.ModuleList(AttnBlock(level.channels) for _ in range(num_res_blocks if level.attn else 0))
        self.downsample = Downsample(level.channels) if level.downsample else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.blocks(x)
        return x if self.downsample is None else self.downsample(x)


class UpLevel(_Blocks):
    """A decoder level: num_res_blocks + 1 blocks (one more than the encoder, as in taming)."""

    def __init__(self, level: Level, in_channels: int, num_res_blocks: int):
        super().__init__()
        widths = [in_channels] + [level.channels] * (num_res_blocks + 1)
        self.block = nn.ModuleList(ResnetBlock(widths[j], widths[j + 1]) for j in range(num_res_blocks + 1))
        self.attn = nn.ModuleList(AttnBlock(level.channels) for _ in range(num_res_blocks + 1 if level.attn else 0))
        self.upsample = Upsample(level.channels) if level.index != 0 else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.blocks(x)
        return x if self.upsample is None else self.upsample(x)


class Encoder(nn.Module):
    """(B, in_channels, H, W) -> (B, z_channels, H/f, W/f)."""

    def __init__(self, in_channels: int, layout: Layout):
        super().__init__()
        self.levels = layout.levels()
        top = self.levels[-1].channels
        self.conv_in = nn.Conv2d(in_channels, layout.base_channels, 3, padding=1)
        self.down = nn.ModuleList(DownLevel(level, layout.num_res_blocks) for level in self.levels)
        self.mid = MidBlock(top)
        self.norm_out = group_norm(top)
        self.conv_out = nn.Conv2d(top, layout.z_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for level in self.down:
            h = level(h)
        h = self.mid(h)  # (B, C_top, H/f, W/f)
        return self.conv_out(swish(self.norm_out(h)))


class Decoder(nn.Module):
    """(B, z_channels, H/f, W/f) -> (B, out_channels, H, W)."""

    def __init__(self, out_channels: int, layout: Layout):
        super().__init__()
        self.levels = layout.levels()
        top = self.levels[-1].channels
        self.conv_in = nn.Conv2d(layout.z_channels, top, 3, padding=1)
        self.mid = MidBlock(top)
        # Built from the lowest resolution up, but indexed like the encoder (up[0] = full
        # resolution): taming's checkpoint names depend on that order.
        up: dict[int, UpLevel] = {}
        width = top
        for level in reversed(self.levels):
            up[level.index] = UpLevel(level, width, layout.num_res_blocks)
            width = level.channels
        self.up = nn.ModuleList(up[i] for i in range(len(self.levels)))
        self.norm_out = group_norm(width)
        self.conv_out = nn.Conv2d(width, out_channels, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.mid(self.conv_in(z))
        for level in reversed(self.up):
            h = level(h)
        return self.conv_out(swish(self.norm_out(h)))  # (B, out_channels, H, W)


# ---------------------------------------------------------------------------------- quantizer


class VectorQuantizer(nn.Module):
    """Nearest-code quantisation with a straight-through gradient.

    loss = ||sg[z_e] - e||^2 + beta * ||z_e - sg[e]||^2 (means over elements): the codebook moves
    towards the encoder outputs at full weight and beta only scales the commitment of the encoder.
    taming's VectorQuantizer2 with its default legacy=True puts beta on the codebook term
    instead (the bug its own comments describe); this is the corrected form (legacy=False).
    """

    def __init__(self, n_embed: int, embed_dim: int, beta: float):
        super().__init__()
        self.n_embed, self.embed_dim, self.beta = n_embed, embed_dim, beta
        self.embedding = nn.Embedding(n_embed, embed_dim)
        nn.init.uniform_(self.embedding.weight, -1.0 / n_embed, 1.0 / n_embed)

    @torch.no_grad()
    def init_from_data(self, z: torch.Tensor, generator: torch.Generator | None = None) -> None:
        """Codebook := K encoder outputs drawn from z (B, C, h, w). From taming's tiny uniform init,
        codes move only ~lr per Adam step, so most stay dead and a short run never uses them;
        starting where the encoder outputs lie puts every code in play from the first step."""
        flat = z.detach().float().permute(0, 2, 3, 1).reshape(-1, self.embed_dim)  # (B*h*w, C)
        rows = torch.randperm(flat.shape[0], generator=generator, device="cpu")
        if flat.shape[0] < self.n_embed:  # fewer vectors than codes: repeat them
            rows = rows.repeat(-(-self.n_embed // flat.shape[0]))
        self.embedding.weight.copy_(flat[rows[: self.n_embed].to(flat.device)])

    def nearest(self, z: torch.Tensor) -> torch.Tensor:
        """(B, C, h, w) -> indices (B, h, w) of the L2-nearest codes."""
        b, c, h, w = z.shape
        # Under bf16 autocast the distance matmul would round away the differences between codes.
        with torch.autocast(device_type=z.device.type, enabled=False):
            flat = z.detach().float().permute(0, 2, 3, 1).reshape(-1, c)  # (B*h*w, C)
            codes = self.embedding.weight.detach().float()  # (K, C)
            dist = flat.pow(2).sum(1, keepdim=True) - 2 * flat @ codes.T + codes.pow(2).sum(1)
        return dist.argmin(1).reshape(b, h, w)

    def lookup(self, indices: torch.Tensor) -> torch.Tensor:
        """Codebook vectors of indices (B, h, w) -> (B, C, h, w)."""
        return self.embedding(indices).permute(0, 3, 1, 2).contiguous()

    def forward(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """z_e (B, C, h, w) -> (z_q (B, C, h, w), loss, indices (B, h, w) long)."""
        indices = self.nearest(z)
        e = self.lookup(indices).to(z.dtype)
        loss = F.mse_loss(e, z.detach()) + self.beta * F.mse_loss(z, e.detach())
        # Straight-through: the value is exactly the code vector (z - sg[z] is exactly zero), the
        # gradient reaches z_e unchanged, and none reaches the codebook except through the loss.
        z_q = e.detach() + (z - z.detach())
        return z_q, loss, indices


# ---------------------------------------------------------------------------------- model


class VQModel(nn.Module):
    """Encoder, quantizer and decoder under taming's names: encoder, quant_conv, quantize,
    post_quant_conv, decoder."""

    def __init__(self, cfg: VQGANConfig, resolution: int):
        super().__init__()
        self.cfg, self.resolution = cfg, resolution
        self.factor = 2 ** (len(cfg.channel_mult) - 1)  # image side / token grid side
        if resolution % self.factor:
            raise ValueError(
                f"image size {resolution} is not a multiple of the VQGAN's down-sampling factor {self.factor} "
                f"(len(vqgan.channel_mult) - 1 halvings): change data.size or vqgan.channel_mult"
            )
        self.encoder = Encoder(IMAGE_CHANNELS, Layout.of(cfg, resolution))
        self.decoder = Decoder(IMAGE_CHANNELS, Layout.of(cfg, resolution))
        self.quantize = VectorQuantizer(cfg.n_embed, cfg.embed_dim, cfg.beta)
        self.quant_conv = nn.Conv2d(cfg.z_channels, cfg.embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(cfg.embed_dim, cfg.z_channels, 1)

    def spec(self) -> dict:
        """What rebuilds this model (saved.load_model)."""
        return {"model": type(self).__name__, "vqgan": to_dict(self.cfg), "resolution": self.resolution}

    @classmethod
    def from_spec(cls, spec: dict) -> VQModel:
        return cls(build(VQGANConfig, spec["vqgan"], "vqgan spec"), spec["resolution"])

    def last_layer(self) -> torch.Tensor:
        """The weight the adaptive GAN weight balances its gradients on."""
        return self.decoder.conv_out.weight

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Images (B, 3, H, W) -> (z_q (B, embed_dim, H/f, W/f), codebook loss, indices (B, H/f, W/f))."""
        return self.quantize(self.quant_conv(self.encoder(x)))

    def decode(self, z_q: torch.Tensor) -> torch.Tensor:
        """Code vectors (B, embed_dim, h, w) -> images (B, 3, h*f, w*f)."""
        return self.decoder(self.post_quant_conv(z_q))

    def decode_indices(self, indices: torch.Tensor) -> torch.Tensor:
        """Tokens (B, h, w) -> images (B, 3, h*f, w*f)."""
        return self.decode(self.quantize.lookup(indices))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        z_q, qloss, indices = self.encode(x)
        return self.decode(z_q), qloss, indices

    @torch.no_grad()
    def tokenize(self, x: torch.Tensor) -> torch.Tensor:
        """Images (B, 3, H, W) -> tokens (B, H/f, W/f), in eval mode whatever the current mode."""
        was_training = self.training
        self.eval()
        try:
            return self.quantize.nearest(self.quant_conv(self.encoder(x)))
        finally:
            self.train(was_training)
