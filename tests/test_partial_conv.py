import pytest
import torch
import torch.nn.functional as F

from latent_inpaint.partial_conv import DOWNSAMPLE_PADDING, PartialConv2d, RestrictiveConv2d, token_mask

# A hand-made 4x4 image and mask; F.conv2d is a correlation: out(i, j) = sum_ab W[a, b] X[i+a-1, j+b-1].
X = torch.arange(1.0, 17.0).reshape(1, 1, 4, 4)  # 1..16 row by row
M = torch.tensor([[1.0, 1, 0, 0], [1, 0, 0, 0], [1, 1, 1, 0], [0, 0, 0, 0]]).reshape(1, 1, 4, 4)
W = torch.tensor([[1.0, 0, 2], [0, 1, 0], [0, 0, -1]])
B = 0.5


def conv(cls, **kw):
    layer = cls(1, 1, 3, padding=1, **kw)
    with torch.no_grad():
        layer.weight.copy_(W.reshape(1, 1, 3, 3))
        layer.bias.fill_(B)
    return layer


# Each window by hand: W^T(X⊙M), sum(M), sum(1) (positions inside the image).
WINDOWS = {
    (1, 1): (1 * 1 + 2 * 0 + 1 * 0 - 1 * 11, 6, 9),  # interior: rows 0-2, cols 0-2
    (1, 2): (1 * 2 + 2 * 0 + 1 * 0 - 1 * 0, 3, 9),  # interior: 3 of 9 visible
    (0, 0): (1 * 1 + 0 * 2 + 0 * 5 - 1 * 0, 3, 4),  # corner: 2x2 of the window inside the image
    (3, 0): (2 * 10 + 1 * 0, 2, 4),  # bottom-left corner: rows 2-3, cols 0-1, 2 of 4 visible
    (3, 2): (1 * 10 + 2 * 0, 2, 6),  # bottom edge: rows 2-3, cols 1-3
    (3, 3): (1 * 11, 1, 4),  # bottom-right corner: only X(2,2) visible
}


def test_partial_conv_is_eq_1_2_by_hand():
    out, new_mask = conv(PartialConv2d)(X, M)
    for (i, j), (wx, sum_m, sum_1) in WINDOWS.items():
        assert out[0, 0, i, j].item() == pytest.approx(wx * sum_1 / sum_m + B, abs=1e-5), (i, j)
    assert out[0, 0, 1, 1].item() == pytest.approx(-10 * 9 / 6 + 0.5)  # written out once: -14.5
    # Eq. 2: 1 wherever the window saw a visible pixel; only (0, 3) (rows 0-1, cols 2-3) saw none
    expected_mask = torch.ones_like(M)
    expected_mask[0, 0, 0, 3] = 0
    assert torch.equal(new_mask, expected_mask)
    assert out[0, 0, 0, 3].item() == 0.0  # Eq. 1 "otherwise 0": no bias either
    out, new_mask = conv(PartialConv2d)(X, torch.zeros_like(M))
    assert torch.equal(out, torch.zeros_like(out)) and torch.equal(new_mask, torch.zeros_like(M))  # Eq. 1 "else 0"


@pytest.mark.parametrize("alpha", [0.25, 0.5, 0.75])
def test_restrictive_conv_is_eq_3_4_by_hand(alpha):
    out, new_mask = conv(RestrictiveConv2d, alpha=alpha)(X, M)
    for (i, j), (wx, sum_m, sum_1) in WINDOWS.items():
        expected = wx * sum_1 / sum_m + B if sum_m / sum_1 >= alpha else 0.0
        assert out[0, 0, i, j].item() == pytest.approx(expected, abs=1e-5), (i, j, alpha)
    assert new_mask is M  # stride 1: the mask is not updated


def test_restrictive_conv_thresholds_by_hand_at_alpha_half():
    out, _ = conv(RestrictiveConv2d, alpha=0.5)(X, M)
    assert out[0, 0, 1, 1].item() == pytest.approx(-14.5)  # 6/9 visible: kept
    assert out[0, 0, 1, 2].item() == 0.0  # 3/9: dropped, though the standard conv keeps it
    assert out[0, 0, 3, 0].item() == pytest.approx(20 * 4 / 2 + 0.5)  # 2/4 exactly alpha: kept
    assert out[0, 0, 3, 3].item() == 0.0  # 1/4: dropped


# Four 2x2 blocks holding 4, 2, 1 and 0 visible pixels (row-major).
BLOCKS_4_2_1_0 = [[1, 1, 1, 0], [1, 1, 0, 1], [1, 0, 0, 0], [0, 0, 0, 0]]
TOKENS_4_2_1_0 = [[1, 1], [0, 0]]  # alpha = 0.5: 2 of 4 is enough, 1 of 4 is not
# The strided conv's 3x3 windows (rows/cols 2i..2i+2) hold 9, 6, 6, 4 in-image positions, of
# which 6, 3, 1, 0 are visible here: its kept outputs are W^T(X⊙M)·sum(1)/sum(M).
WINDOW_VISIBLE = [[6, 3], [1, 0]]
IN_IMAGE = [[9, 6], [6, 4]]


def test_alpha_half_keeps_a_block_with_2_of_4_visible_and_drops_one_with_1():
    mask = torch.tensor(BLOCKS_4_2_1_0, dtype=torch.float32)[None, None]  # (1, 1, 4, 4)
    expected = torch.tensor(TOKENS_4_2_1_0, dtype=torch.float32)[None, None]  # (1, 1, 2, 2)
    assert torch.equal(token_mask(mask, 0.5, 2), expected)
    assert torch.equal(token_mask(mask.bool(), 0.5, 2), expected.bool())
    assert torch.equal(token_mask(mask, 0.25, 2), torch.tensor([[[[1.0, 1.0], [1.0, 0.0]]]]))

    down = RestrictiveConv2d(1, 1, 3, stride=2, padding=DOWNSAMPLE_PADDING, alpha=0.5)
    with torch.no_grad():
        down.weight.fill_(1.0)
        down.bias.zero_()
    x = torch.full_like(mask, 2.0)
    out, new_mask = down(x, mask)
    assert torch.equal(new_mask, expected)  # a strided layer updates the mask by Eq. 4 on its blocks
    visible, in_image = torch.tensor(WINDOW_VISIBLE, dtype=torch.float32), torch.tensor(IN_IMAGE, dtype=torch.float32)
    want = expected * (2.0 * visible) * in_image / visible.clamp(min=1)  # Eq. 3 where the block is kept
    assert torch.allclose(out, want, atol=1e-6)


def test_standard_mask_grows_layer_by_layer_and_restrictive_does_not():
    mask = torch.ones(1, 1, 12, 12)
    mask[..., 2:10, 2:10] = 0  # an 8x8 hole
    x = torch.randn(1, 2, 12, 12, generator=torch.Generator().manual_seed(0))
    standard = [PartialConv2d(2, 2, 3, padding=1) for _ in range(4)]
    restrictive = [RestrictiveConv2d(2, 2, 3, padding=1, alpha=0.5) for _ in range(4)]
    holes, h, m = [], x, mask
    for layer in standard:
        h, m = layer(h, m)
        holes.append(int((m == 0).sum()))
    assert holes == [6 * 6, 4 * 4, 2 * 2, 0]  # one ring filled per 3x3 layer
    h, m = x, mask
    for layer in restrictive:
        h, m = layer(h, m)
        assert torch.equal(m, mask)
        assert torch.equal(h[..., 4:8, 4:8], torch.zeros_like(h[..., 4:8, 4:8]))  # deep in the hole: 0


def test_fully_visible_windows_are_ordinary_convolutions_at_the_border_too():
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    ones = torch.ones(2, 1, 8, 8)
    for kernel, stride, padding in [(3, 1, 1), (1, 1, 0), (3, 2, DOWNSAMPLE_PADDING)]:
        for layer in (
            PartialConv2d(3, 4, kernel, stride, padding),
            RestrictiveConv2d(3, 4, kernel, stride, padding, alpha=1.0),
        ):
            pad = (padding,) * 4 if isinstance(padding, int) else padding
            expected = F.conv2d(F.pad(x, pad), layer.weight, layer.bias, stride)
            out, new_mask = layer(x, ones)
            assert torch.allclose(out, expected, atol=1e-5), (type(layer).__name__, kernel, stride)
            assert torch.equal(new_mask, torch.ones_like(new_mask))


def test_token_mask_extremes_and_monotone_in_alpha():
    for factor in (1, 2, 8, 16):
        assert token_mask(torch.ones(1, 1, 32, 32), 1.0, factor).all()
        assert not token_mask(torch.zeros(1, 1, 32, 32), 0.01, factor).any()
        assert token_mask(torch.ones(1, 1, 32, 32), 0.5, factor).shape == (1, 1, 32 // factor, 32 // factor)
    g = torch.Generator().manual_seed(2)
    mask = (torch.rand(3, 1, 64, 64, generator=g) > 0.3).float()
    mask[0, :, 10:40, 5:30] = 0
    kept = [token_mask(mask, alpha, 8) for alpha in (0.1, 0.25, 0.5, 0.75, 1.0)]
    for looser, stricter in zip(kept, kept[1:]):
        assert (looser >= stricter).all()
    assert kept[0].sum() > kept[-1].sum()


def test_bad_arguments_are_errors():
    with pytest.raises(ValueError, match="power of two"):
        token_mask(torch.ones(1, 1, 12, 12), 0.5, 3)
    with pytest.raises(ValueError, match="alpha"):
        token_mask(torch.ones(1, 1, 8, 8), 0.0, 2)
    with pytest.raises(ValueError, match="alpha"):
        RestrictiveConv2d(1, 1, 3, alpha=1.5)


def test_centre_test_keeps_every_visible_position_at_stride_1_and_window_test_does_not():
    """(2, 2) is visible with 2 of its 9 window positions visible: the window test (Eq. 3 as
    printed) refuses it, the centre test (the authors' code) keeps it. The centre test keeps
    every visible position as W^T(X⊙M)·sum(1)/sum(M) + b, holes stay 0, the mask is unchanged."""
    window = conv(RestrictiveConv2d, alpha=0.5)(X, M)
    centre = conv(RestrictiveConv2d, alpha=0.5, stride1="centre")(X, M)
    assert torch.equal(centre[1], M) and torch.equal(window[1], M)
    assert torch.equal(centre[0][M == 0], torch.zeros(int((M == 0).sum())))
    for (i, j), (wx, sum_m, sum_1) in WINDOWS.items():
        if M[0, 0, i, j] == 1:
            assert centre[0][0, 0, i, j].item() == pytest.approx(wx * sum_1 / sum_m + B)
    assert window[0][0, 0, 2, 2] == 0 and centre[0][0, 0, 2, 2] != 0
    with pytest.raises(ValueError, match="stride1"):
        RestrictiveConv2d(1, 1, 3, padding=1, alpha=0.5, stride1="corner")


@pytest.mark.parametrize("cls", [PartialConv2d, RestrictiveConv2d])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_nan_or_inf_in_the_hole_changes_nothing(cls, bad):
    """0 * NaN = NaN: masking by multiplication would carry a bad hole value everywhere."""
    kw = {"alpha": 0.5} if cls is RestrictiveConv2d else {}
    layer = conv(cls, **kw)
    dirty = torch.where(M > 0, X, torch.full_like(X, bad))
    (clean_out, clean_mask), (out, mask) = layer(X, M), layer(dirty, M)
    assert torch.isfinite(out).all()
    assert torch.equal(out, clean_out) and torch.equal(mask, clean_mask)
