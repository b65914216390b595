import dataclasses
import logging
from pathlib import Path

import numpy as np
import pytest
import torch

from latent_inpaint.config import section
from latent_inpaint.params import load_params
from latent_inpaint.encoder import (
    MIRACLE_LOGIT,
    MaskedGroupNorm,
    MiracleEncoder,
    RestrictiveEncoder,
    VanillaEncoder,
    build_encoder,
)
from latent_inpaint.partial_conv import token_mask
from latent_inpaint.pictures import FIGURE_BACKGROUND, FIGURE_PAD, FIGURE_PANEL, TOKEN_RED, token_mask_figure
from latent_inpaint.vqgan import VQModel, count_parameters

REPO = Path(__file__).resolve().parents[1]
SIZE = 64  # params.yaml data.size
# taming's f16 encoder (29,298,176, see test_vqgan.py) + the mask's input channel (128 x 3 x 3)
# + attention at 32 px (two blocks of 263,680 at width 256) + the head (256 x 1024 + 1024).
PAPER_ENCODER_PARAMS = 29_298_176 + 1_152 + 2 * 263_680 + 263_168

log = logging.getLogger(__name__)


@pytest.fixture(scope="module")
def tiny():
    p = load_params([REPO / "params.yaml"])
    return section(p, "vqgan"), section(p, "encoder")


def encoder(cls, cfgs, seed=0):
    torch.manual_seed(seed)
    return cls(*cfgs, SIZE)


def images(n=2, seed=1) -> torch.Tensor:
    return torch.rand(n, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def masks() -> torch.Tensor:
    """(2, 1, 64, 64): a box with a small hole beside it; a right half with a small square."""
    m = torch.ones(2, 1, SIZE, SIZE)
    m[0, :, 16:40, 8:36] = 0
    m[0, :, 50:53, 44:47] = 0
    m[1, :, :, 40:] = 0
    m[1, :, 5:9, 5:9] = 0
    return m


def fill_hole(x: torch.Tensor, mask: torch.Tensor, seed: int) -> torch.Tensor:
    noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(seed)) * 5
    return torch.where(mask > 0, x, noise)


def visible_diff(a, b, m_hat) -> float:
    return ((a - b).abs() * m_hat[:, None]).max().item()


def perturb_the_dark(model, mask, alpha, seed):
    """Forward pre-hooks on every submodule: random values added to its feature input at the hole
    positions of the mask at that resolution (the token_mask chain). Returns the hook handles."""
    levels = {SIZE >> i: token_mask(mask, alpha, 2**i) for i in range(model.factor.bit_length())}
    g = torch.Generator().manual_seed(seed)

    def hook(module, args):
        x = args[0]
        if not (torch.is_tensor(x) and x.dim() == 4 and x.shape[-1] in levels):
            return None  # e.g. a Downsample conv's padded input: padding is no hole
        hole = 1 - levels[x.shape[-1]].to(x.dtype)
        return (x + 10 * torch.randn(x.shape, generator=g) * hole, *args[1:])

    return [m.register_forward_pre_hook(hook) for name, m in model.named_modules() if name]


# ---------------------------------------------------------------------------------- the principle


@pytest.mark.parametrize("cls", [RestrictiveEncoder, VanillaEncoder])
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_hole_pixels_do_not_reach_visible_logits(tiny, cls, mode):
    """Both encoders read [X⊙M, M], so pixel values in the hole reach neither: this alone does not
    tell them apart (the next test does)."""
    model = encoder(cls, tiny).train(mode == "train")
    x, m = images(), masks()
    logits, m_hat = model(x, m)
    for seed in (0, 1):
        logits2, m_hat2 = model(fill_hole(x, m, seed), m)
        assert torch.equal(m_hat, m_hat2)
        assert visible_diff(logits, logits2, m_hat) < 1e-5


@pytest.mark.parametrize("rule", ["window", "centre", "window_with_skip"])
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_restrictive_encoder_never_looks_into_the_dark_and_vanilla_does(tiny, mode, rule):
    """Random content in the hole of every layer's input (pixels and features alike): the
    restrictive encoder's visible-token logits stay the same under every stride-1 rule, the
    vanilla encoder's do not."""
    x, m = images(), masks()
    diffs = {}
    for cls in (RestrictiveEncoder, VanillaEncoder):
        model = encoder(cls, (tiny[0], dataclasses.replace(tiny[1], stride1_rule=rule))).train(mode == "train")
        logits, m_hat = model(x, m)
        handles = perturb_the_dark(model, m, tiny[1].alpha, seed=3)
        try:
            dark_logits, _ = model(x, m)
        finally:
            for h in handles:
                h.remove()
        assert m_hat.any() and (~m_hat).any()
        diffs[cls.__name__] = visible_diff(logits, dark_logits, m_hat)
    assert diffs["RestrictiveEncoder"] < 1e-5, diffs
    assert diffs["VanillaEncoder"] > 1e-2, diffs


def test_restrictive_encoder_passes_no_gradient_to_hole_pixels(tiny):
    model = encoder(RestrictiveEncoder, tiny)
    x, m = images().requires_grad_(), masks()
    logits, m_hat = model(x, m)
    logits.logsumexp(1)[m_hat].sum().backward()
    assert x.grad[(m == 0).expand_as(x)].abs().max().item() == 0.0
    assert x.grad.abs().max() > 0
    assert all(p.grad is None or torch.isfinite(p.grad).all() for p in model.parameters())


# ---------------------------------------------------------------------------------- layout


def test_token_mask_is_the_encoders_mask_chain_and_logits_vanish_at_masked_tokens(tiny):
    m = masks()
    expected = token_mask(m, tiny[1].alpha, 8)[:, 0] > 0.5  # (2, 8, 8)
    for cls in (RestrictiveEncoder, VanillaEncoder):
        logits, m_hat = encoder(cls, tiny)(images(), m)
        assert logits.shape == (2, tiny[0].n_embed, SIZE // 8, SIZE // 8)
        assert m_hat.dtype == torch.bool and torch.equal(m_hat, expected)
        assert torch.equal(logits.permute(0, 2, 3, 1)[~m_hat], torch.zeros(int((~m_hat).sum()), tiny[0].n_embed))


def test_fully_visible_restrictive_encoder_is_the_vanilla_encoder_with_its_weights(tiny):
    """Same parameter names and shapes; with nothing masked every layer is the ordinary one,
    borders included (sum(1) counts in-image positions)."""
    vanilla = encoder(VanillaEncoder, tiny, seed=4)
    restrictive = encoder(RestrictiveEncoder, tiny, seed=5)
    restrictive.load_state_dict(vanilla.state_dict(), strict=True)
    x, full = images(), torch.ones(2, 1, SIZE, SIZE)
    (a, m_a), (b, m_b) = restrictive(x, full), vanilla(x, full)
    assert m_a.all() and m_b.all()
    assert torch.allclose(a, b, atol=1e-4), (a - b).abs().max()


def test_an_image_with_no_visible_pixel_gives_no_token_and_no_nan(tiny):
    m = masks()
    m[1] = 0
    logits, m_hat = encoder(RestrictiveEncoder, tiny)(images(), m)
    assert torch.isfinite(logits).all()
    assert not m_hat[1].any() and m_hat[0].any()


def test_masked_group_norm_uses_visible_positions_only():
    norm = MaskedGroupNorm(32)
    x = torch.randn(1, 32, 4, 4, generator=torch.Generator().manual_seed(6))
    m = torch.zeros(1, 1, 4, 4)
    m[..., :2, :] = 1
    y = norm(x, m)
    expected = torch.nn.functional.group_norm(x[..., :2, :], 32, eps=1e-6)  # the visible half alone
    assert torch.allclose(y[..., :2, :], expected, atol=1e-5)
    assert torch.equal(y[..., 2:, :], torch.zeros_like(y[..., 2:, :]))


def test_paper_encoder_builds_on_the_meta_device():
    p = load_params([REPO / "params.yaml", REPO / "workflow" / "configs" / "paper.yaml"])
    vq, enc = section(p, "vqgan"), section(p, "encoder")
    with torch.device("meta"):
        restrictive = RestrictiveEncoder(vq, enc, 256)
        vanilla = VanillaEncoder(vq, enc, 256)
    assert all(p.is_meta for p in restrictive.parameters())
    assert [lv.resolution for lv in restrictive.encoder.levels if lv.attn] == [32, 16]
    assert count_parameters(restrictive) == count_parameters(vanilla) == PAPER_ENCODER_PARAMS
    log.info("paper restrictive encoder: %d parameters", count_parameters(restrictive))


# ---------------------------------------------------------------------------------- miracle, build


def test_miracle_encoder_predicts_the_vqgan_tokens_of_the_full_image(tiny):
    torch.manual_seed(7)
    vqgan = VQModel(tiny[0], SIZE)
    miracle = build_encoder("miracle", *tiny, SIZE, vqgan_model=vqgan)
    assert isinstance(miracle, MiracleEncoder)
    x, m = images(), masks()
    logits, m_hat = miracle(x, m)
    tokens = vqgan.tokenize(x)
    assert torch.equal(logits.argmax(1)[m_hat], tokens[m_hat])
    assert torch.equal(logits.amax(1)[m_hat], torch.full((int(m_hat.sum()),), MIRACLE_LOGIT))
    assert torch.equal(m_hat, token_mask(m, tiny[1].alpha, 8)[:, 0] > 0.5)


def test_build_encoder_kinds(tiny):
    assert isinstance(build_encoder("restrictive", *tiny, SIZE), RestrictiveEncoder)
    assert isinstance(build_encoder("vanilla", *tiny, SIZE), VanillaEncoder)
    with pytest.raises(ValueError, match="vqgan_model"):
        build_encoder("miracle", *tiny, SIZE)
    with pytest.raises(ValueError, match="restrictive, vanilla, miracle"):
        build_encoder("oracle", *tiny, SIZE)


# ---------------------------------------------------------------------------------- figure 3


def test_token_mask_figure_marks_partly_masked_visible_tokens_red():
    mask = np.ones((32, 32))
    mask[8:24, 8:24] = 0  # a hole of 4x4 cells: grey at alpha 1
    mask[1:3, 28:30] = 0  # small holes: their cells stay visible at alpha 0.25, red
    mask[29:31, 1:3] = 0
    image = token_mask_figure(mask, factor=4)
    panel = FIGURE_PANEL  # 32 px scaled by 8
    rows = 4  # one per default alpha
    assert image.size == (3 * (panel + FIGURE_PAD) + FIGURE_PAD, rows * (panel + FIGURE_PAD) + FIGURE_PAD)
    pixels = np.asarray(image)
    first_token_panel = pixels[FIGURE_PAD : FIGURE_PAD + panel, 2 * (panel + FIGURE_PAD) + FIGURE_PAD :][:, :panel]
    assert (first_token_panel == TOKEN_RED).all(axis=-1).any()
    assert (pixels == FIGURE_BACKGROUND).all(axis=-1).any()
    full = np.asarray(token_mask_figure(np.ones((32, 32)), alphas=(0.25,), factor=4))
    assert not (full == TOKEN_RED).all(axis=-1).any()


# ---------------------------------------------------------------------------------- stride-1 rule


def lone_token_mask() -> torch.Tensor:
    """(1, 1, 64, 64): one visible 8x8 token block (token (3, 3)) amid holes."""
    m = torch.zeros(1, 1, SIZE, SIZE)
    m[..., 24:32, 24:32] = 1
    return m


def lone_token_logits(model, x):
    logits, m_hat = model(x, lone_token_mask())
    assert m_hat[0, 3, 3] and int(m_hat.sum()) == 1
    return logits[0, :, 3, 3]


@pytest.mark.parametrize("rule", ["default", "window", "centre", "window_with_skip"])
def test_a_visible_token_amid_holes_is_dead_only_under_the_window_rule(tiny, rule):
    """Under Eq. 3 as printed, conv_out (no skip path) refuses a token with 1 of 9 visible token
    neighbours: its logits are the head's bias whatever it shows. The chosen rule (params.yaml)
    must keep it alive: its logits follow its own pixels."""
    vq, enc = tiny
    if rule != "default":
        enc = dataclasses.replace(enc, stride1_rule=rule)
    model = encoder(RestrictiveEncoder, (vq, enc))
    a, b = lone_token_logits(model, images(1, seed=1)), lone_token_logits(model, images(1, seed=2))
    dead = torch.allclose(a, model.head.bias) and torch.allclose(b, model.head.bias)
    assert dead == (enc.stride1_rule == "window"), (enc.stride1_rule, (a - b).abs().max())
    if rule == "default":
        assert not dead
    if not dead:
        assert (a - b).abs().max() > 1e-3


@pytest.mark.parametrize("rule", ["window", "centre", "window_with_skip"])
@pytest.mark.parametrize("cls", [RestrictiveEncoder, VanillaEncoder])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nan_or_inf_in_the_hole_leaves_visible_logits_finite_and_unchanged(tiny, rule, cls, bad):
    model = encoder(cls, (tiny[0], dataclasses.replace(tiny[1], stride1_rule=rule)))
    x, m = images(), masks()
    logits, m_hat = model(x, m)
    dirty_logits, dirty_m_hat = model(torch.where(m > 0, x, torch.full_like(x, bad)), m)
    assert torch.isfinite(dirty_logits).all()
    assert torch.equal(m_hat, dirty_m_hat)
    assert torch.equal(dirty_logits, logits)


def test_unknown_stride1_rule_is_an_error(tiny):
    with pytest.raises(ValueError, match="stride1_rule"):
        encoder(RestrictiveEncoder, (tiny[0], dataclasses.replace(tiny[1], stride1_rule="corner")))
