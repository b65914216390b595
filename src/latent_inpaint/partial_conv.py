"""Partial convolutions: the standard one (Eq. 1-2, Liu et al. 2018), which fills holes layer by
layer, and the paper's restrictive one (Eq. 3-4), which refuses windows that are mostly hole.

Masks are (B, 1, H, W) with 1 = visible and 0 = hole, shared by every channel. Both layers see
X⊙M only and return (features, new mask).

Rescaling. The paper prints W^T(X⊙M)·1/sum(M); Liu et al. (the paper's reference [24]) use
W^T(X⊙M)·sum(1)/sum(M). The two differ by the constant sum(1), which the weights can absorb; the
sum(1) form is used here because it keeps a fully visible window an ordinary convolution, so
weights shaped like the VQGAN's behave as they do there.

Borders. Zero padding lies outside the image: it is neither visible nor hole. sum(M) counts the
window's visible positions and sum(1) the window's positions inside the image: n*n away from the
border, fewer at it. Both the rescaling sum(1)/sum(M) and the visible fraction sum(M)/sum(1) use
that count, so a fully visible image is an ordinary zero-padded convolution everywhere, borders
included. Counting padding as hole (sum(1) = n*n always) would make every border window look
partly masked and drop border features at alpha > 6/9. The official code uses the same in-image
count for the threshold, but n*n for the rescaling.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

Padding = tuple[int, int, int, int]  # F.pad order: left, right, top, bottom

# The VQGAN's Downsample: 3x3, stride 2, one row and one column of zeros on the right and bottom.
DOWNSAMPLE_KERNEL = 3
DOWNSAMPLE_PADDING: Padding = (0, 1, 0, 1)

# Window counts are exact small integers; this only absorbs the rounding of alpha * sum(1).
COUNT_TOLERANCE = 1e-6


def _padding4(padding: int | tuple[int, int, int, int]) -> Padding:
    if isinstance(padding, int):
        return (padding,) * 4
    if len(padding) != 4:
        raise ValueError(f"padding must be an int or (left, right, top, bottom), got {padding!r}")
    return tuple(int(p) for p in padding)


def _check_alpha(alpha: float) -> None:
    if not 0.0 < alpha <= 1.0:
        raise ValueError(f"alpha is the visible fraction a window needs: 0 < alpha <= 1, got {alpha}")


@torch.no_grad()
def window_counts(
    mask: torch.Tensor, kernel_size: int, stride: int = 1, padding: int | Padding = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum(M) (B, 1, H', W'), sum(1) (1, 1, H', W')): visible and in-image positions of every
    window, as float32 ones-kernel convolutions."""
    pad = _padding4(padding)
    with torch.autocast(device_type=mask.device.type, enabled=False):
        m = mask.float()
        ones = torch.ones(1, 1, kernel_size, kernel_size, device=mask.device)
        sum_m = F.conv2d(F.pad(m, pad), ones, stride=stride)
        sum_1 = F.conv2d(F.pad(torch.ones_like(m[:1]), pad), ones, stride=stride)
    return sum_m, sum_1


def masked(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """X⊙M with holes set to exactly 0, whatever they hold: x * mask would turn a NaN or Inf in a
    hole into NaN (0 * NaN = NaN) and carry it into visible outputs."""
    return torch.where(mask > 0.5, x, torch.zeros((), dtype=x.dtype, device=x.device))


def visible_enough(sum_m: torch.Tensor, sum_1: torch.Tensor, alpha: float) -> torch.Tensor:
    """sum(M) / sum(1) >= alpha, compared on counts so that e.g. 2 of 4 passes alpha = 0.5."""
    return sum_m >= alpha * sum_1 - COUNT_TOLERANCE


class _MaskedConv2d(nn.Conv2d):
    """W^T(X⊙M)·sum(1)/sum(M) + b where a subclass's rule keeps the window, else 0."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        stride: int = 1,
        padding: int | Padding = 0,
        bias: bool = True,
    ):
        # The padding is applied here, not by nn.Conv2d, so that it may be asymmetric.
        super().__init__(in_channels, out_channels, kernel_size, stride=stride, padding=0, bias=bias)
        self.pad = _padding4(padding)

    def keep(self, sum_m: torch.Tensor, sum_1: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def next_mask(self, keep: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x (B, C, H, W), mask (B, 1, H, W) -> (x' (B, C', H', W'), mask' (B, 1, H', W'))."""
        sum_m, sum_1 = window_counts(mask, self.kernel_size[0], self.stride[0], self.pad)
        keep = self.keep(sum_m, sum_1, mask)
        scale = torch.where(keep, sum_1 / sum_m.clamp(min=1.0), 0.0)
        out = F.conv2d(F.pad(masked(x, mask), self.pad), self.weight, None, self.stride)  # W^T(X⊙M)
        out = out * scale.to(out.dtype)
        if self.bias is not None:
            out = out + self.bias.view(1, -1, 1, 1).to(out.dtype) * keep.to(out.dtype)
        return out, self.next_mask(keep, mask)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", pad={self.pad}"


class PartialConv2d(_MaskedConv2d):
    """The standard partial convolution (Eq. 1-2, Liu et al. 2018):
    x' = W^T(X⊙M)·sum(1)/sum(M) + b where sum(M) > 0, else 0; the mask becomes 1 wherever the
    window saw a visible position, at every layer, so holes shrink layer by layer.
    The paper prints 1/sum(M); sum(1)/sum(M) is Liu et al.'s form (see the module docstring)."""

    def keep(self, sum_m: torch.Tensor, sum_1: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return sum_m > 0

    def next_mask(self, keep: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return keep.to(mask.dtype)


STRIDE1_TESTS = ("window", "centre")


class RestrictiveConv2d(_MaskedConv2d):
    """The restrictive partial convolution (Eq. 3-4):
    x' = W^T(X⊙M)·sum(1)/sum(M) + b where the window passes, else 0.
    At stride 1 the mask is returned unchanged and `stride1` says which windows pass:
    "window" (Eq. 3 as printed): sum(M)/sum(1) >= alpha, so a visible position with too few
    visible neighbours outputs 0; "centre" (the authors' code): every visible position, i.e.
    the window's centre is visible, and only down-sampling applies alpha. A strided (down-sampling) layer applies the
    >= alpha rule to the stride x stride block each output stands for (`block_mask`: 2 of 4
    visible pixels keep a block at alpha = 0.5, as the paper and the official code have it) and
    that block mask is both where it outputs and the new mask, so holes never fill in. Its
    features still come from its whole window's visible pixels (which contain the block's).
    The paper prints 1/sum(M); sum(1)/sum(M) is Liu et al.'s form (see the module docstring,
    which also gives the border rule)."""

    def __init__(self, *args, alpha: float, stride1: str = "window", **kwargs):
        """PartialConv2d's arguments; alpha: the visible fraction a window needs; stride1: the
        test at stride 1 ("window" | "centre", above)."""
        super().__init__(*args, **kwargs)
        _check_alpha(alpha)
        if stride1 not in STRIDE1_TESTS:
            raise ValueError(f"stride1 must be one of {STRIDE1_TESTS}, got {stride1!r}")
        if stride1 == "centre" and (self.kernel_size[0] % 2 == 0 or self.pad != (self.kernel_size[0] // 2,) * 4):
            raise ValueError("the centre test needs an odd kernel with 'same' padding")
        self.alpha, self.stride1 = alpha, stride1

    def keep(self, sum_m: torch.Tensor, sum_1: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        if self.stride[0] == 1:
            if self.stride1 == "centre":
                return mask > 0.5
            return visible_enough(sum_m, sum_1, self.alpha)
        return block_mask(mask, self.alpha, self.stride[0]).bool()

    def next_mask(self, keep: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return mask if self.stride[0] == 1 else keep.to(mask.dtype)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", alpha={self.alpha}, stride1={self.stride1}"


@torch.no_grad()
def block_mask(mask: torch.Tensor, alpha: float, block: int) -> torch.Tensor:
    """Eq. 4 at a down-sampling: (B, 1, H, W) -> (B, 1, H/block, W/block) float, 1 where the
    block's visible fraction is >= alpha (compared on counts: 2 of 4 passes 0.5)."""
    with torch.autocast(device_type=mask.device.type, enabled=False):
        visible = F.avg_pool2d(mask.float(), block) * block * block  # visible pixels per block
    return (visible >= alpha * block * block - COUNT_TOLERANCE).float()


def token_mask(mask: torch.Tensor, alpha: float, factor: int) -> torch.Tensor:
    """M̂: the pixel mask (B, 1, H, W) after log2(factor) restrictive down-samplings (Eq. 4 on
    2x2 blocks at each halving), i.e. the mask the restrictive encoder ends with:
    (B, 1, H/factor, W/factor), same dtype as `mask`, 1 where the token is visible."""
    _check_alpha(alpha)
    halvings = round(math.log2(factor)) if factor >= 1 else -1
    if halvings < 0 or 2**halvings != factor:
        raise ValueError(f"factor must be a power of two, got {factor}")
    m = mask.float()
    for _ in range(halvings):
        m = block_mask(m, alpha, 2)
    return m.to(mask.dtype)


# ---------------------------------------------------------------------------------- released-model layers
#
# The authors' released encoder uses StyleGAN2-style convolutions (as MAT does) inside its
# restrictive layers. They differ from RestrictiveConv2d above in where the rescaling and the mask
# act; these layers reproduce the released weights' computation exactly (the "official" variant).

FIR_TAPS = (1.0, 3.0, 3.0, 1.0)  # the low-pass filter before a stride-2 conv (StyleGAN2's default)


def fir_filter(dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu") -> torch.Tensor:
    """The separable 4x4 low-pass filter, normalised to sum 1. Built where it is used, not held as
    a buffer: the released files' copy (`*.resample_filter`) is checked on import, then dropped."""
    taps = torch.tensor(FIR_TAPS, dtype=torch.float64)
    return (torch.outer(taps, taps) / taps.sum() ** 2).to(dtype=dtype, device=device)


class EqualizedConv2d(nn.Module):
    """A StyleGAN2 conv layer: weight ~ N(0, 1) scaled at run time by 1/sqrt(fan_in), then
    relu(conv + bias)·√2. At stride 2 (3x3 only) the input is first low-pass filtered with
    [1,3,3,1]⊗[1,3,3,1]/64 over two zeros of padding on every side, then convolved without padding."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1):
        super().__init__()
        if stride not in (1, 2) or (stride == 2 and kernel_size != 3):
            raise ValueError(f"stride 1, or stride 2 with a 3x3 kernel; got stride {stride}, kernel {kernel_size}")
        self.stride, self.kernel_size = stride, kernel_size
        self.weight = nn.Parameter(torch.randn(out_channels, in_channels, kernel_size, kernel_size))
        self.bias = nn.Parameter(torch.zeros(out_channels))
        self.gain = 1 / math.sqrt(in_channels * kernel_size * kernel_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight * self.gain
        if self.stride == 1:
            y = F.conv2d(x, w.to(x.dtype), padding=self.kernel_size // 2)
        else:
            c = x.shape[1]
            fir = fir_filter(x.dtype, x.device)[None, None].expand(c, 1, -1, -1)
            x = F.conv2d(F.pad(x, (2, 2, 2, 2)), fir, groups=c)  # (B, C, H+1, W+1)
            y = F.conv2d(x, w.to(x.dtype), stride=2)  # (B, C', H/2, W/2)
        return F.relu(y + self.bias.view(1, -1, 1, 1).to(y.dtype)) * math.sqrt(2)


class StyleRestrictiveConv2d(nn.Module):
    """The released encoder's restrictive layer around an EqualizedConv2d (`conv`):
    out = conv(x)·k²/(sum(M)+1e-8)·M', with sum(M) the window's visible count (zero padding
    counts as hole) and M' the new mask: M itself at stride 1, at stride 2 the 2x2 blocks whose
    visible fraction is >= alpha (`block_mask`; alpha 0.5 is the authors' "mean > 0.25").
    Unlike RestrictiveConv2d, the input is not multiplied by M and bias and activation come
    before the rescaling. (x (B, C, H, W), mask (B, 1, H, W)) -> (out (B, C', H', W'), M')."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1, *, alpha: float):
        super().__init__()
        _check_alpha(alpha)
        self.alpha = alpha
        self.conv = EqualizedConv2d(in_channels, out_channels, kernel_size, stride)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        k, s = self.conv.kernel_size, self.conv.stride
        with torch.no_grad(), torch.autocast(device_type=mask.device.type, enabled=False):
            m = mask.float()
            sum_m = F.conv2d(m, torch.ones(1, 1, k, k, device=m.device), stride=s, padding=k // 2)
            new_mask = m if s == 1 else block_mask(m, self.alpha, s)
            ratio = k * k / (sum_m + 1e-8) * new_mask
        out = self.conv(x)
        return out * ratio.to(out.dtype), new_mask.to(mask.dtype)

    def extra_repr(self) -> str:
        return f"alpha={self.alpha}"
