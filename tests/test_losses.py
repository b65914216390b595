"""Loss pieces on hand-made inputs."""

from __future__ import annotations

import pytest
import torch
import torchvision

from latent_inpaint.losses import (
    STAND_IN_NARROWING, NLayerDiscriminator, adaptive_weight, hinge_d_loss, load_lpips, nonsaturating_d_loss,
    nonsaturating_g_loss, r1_penalty,
)
from latent_inpaint.evaluate.metrics import errors


def test_lpips_loads_vgg16_weights_from_a_file_and_explains_a_missing_one(tmp_path):
    torch.manual_seed(0)
    features = torchvision.models.vgg16().features.state_dict()
    path = tmp_path / "vgg16.pth"
    torch.save({f"features.{k}": v for k, v in features.items()}, path)
    model = load_lpips(str(path))
    assert torch.equal(model.net.slice3.state_dict()["10.weight"], features["10.weight"])
    assert not model.stand_in and not any(p.requires_grad for p in model.parameters())
    x = torch.rand(1, 3, 32, 32) * 2 - 1
    assert model(x, x).item() == pytest.approx(0.0, abs=1e-6)
    assert model(x, -x).item() > 0.01
    with pytest.raises(FileNotFoundError, match="vgg16-397923af.pth.*weights.vgg16"):
        load_lpips(str(tmp_path / "absent.pth"))
    assert load_lpips("stand-in").stand_in  # random VGG features, labelled


def test_the_lpips_stand_in_is_the_same_network_every_time_and_leaves_the_rng_alone():
    torch.manual_seed(5)
    expected = torch.rand(3)
    torch.manual_seed(5)
    a, b = load_lpips("stand-in"), load_lpips("stand-in")
    assert torch.equal(torch.rand(3), expected)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters(), strict=True))


def test_the_lpips_stand_in_is_a_narrow_vgg16_in_the_same_layout_and_measures_like_lpips():
    """Random features at any width measure nothing real; the stand-in is narrow to be cheap."""
    model = load_lpips("stand-in")
    widths = [c // STAND_IN_NARROWING for c in (64, 128, 256, 512, 512)]
    assert model.chns == widths and [lin.model[-1].weight.shape[1] for lin in model.lins] == widths
    assert model.net.slice3.state_dict()["10.weight"].shape == (256 // STAND_IN_NARROWING, 128 // STAND_IN_NARROWING, 3, 3)
    assert all(lin.model[-1].weight.min() >= 0 for lin in model.lins)  # the wheel's heads, subsampled
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    assert model(x, x).abs().max().item() == pytest.approx(0.0, abs=1e-6)
    near, far = model(x, x + 0.05 * torch.randn_like(x)).mean(), model(x, -x).mean()
    assert 0 < near < far


def test_gan_terms_on_hand_made_logits():
    real, fake = torch.tensor([2.0, 0.5]), torch.tensor([-2.0, 0.0])
    # hinge: 0.5 * (mean(relu(1 - [2, .5])) + mean(relu(1 + [-2, 0]))) = 0.5 * (0.25 + 0.5)
    assert hinge_d_loss(real, fake).item() == pytest.approx(0.375)
    sp = torch.nn.functional.softplus
    assert nonsaturating_g_loss(fake).item() == pytest.approx(sp(-fake).mean().item())
    assert nonsaturating_d_loss(real, fake).item() == pytest.approx((sp(-real).mean() + sp(fake).mean()).item())


def test_r1_is_the_squared_input_gradient():
    x = torch.randn(4, 3, requires_grad=True)
    w = torch.tensor([1.0, -2.0, 3.0])
    assert r1_penalty(x @ w, x).item() == pytest.approx(14.0)  # ||w||^2 for every sample


def test_adaptive_weight_balances_gradient_norms():
    layer = torch.nn.Parameter(torch.ones(3))
    nll = (layer * torch.tensor([3.0, 0.0, 4.0])).sum()  # gradient norm 5
    g = (layer * torch.tensor([0.0, 1.0, 0.0])).sum()  # gradient norm 1
    assert adaptive_weight(nll, g, layer, scale=0.8).item() == pytest.approx(0.8 * 5 / (1 + 1e-4))


def test_patchgan_has_tamings_layout_and_psnr_is_exact():
    d = NLayerDiscriminator(n_layers=3)
    assert [k for k in d.state_dict() if k.endswith("weight")] == [
        "main.0.weight", "main.2.weight", "main.3.weight", "main.5.weight", "main.6.weight",
        "main.8.weight", "main.9.weight", "main.11.weight",
    ]
    assert d(torch.zeros(2, 3, 64, 64)).shape == (2, 1, 6, 6)
    x = torch.zeros(2, 3, 4, 4)
    y = x.clone()
    y[1] += 0.2  # error 0.1 in [0, 1] units: 20 dB
    l1, psnr = errors(x, y)
    assert psnr[1].item() == pytest.approx(20.0, abs=1e-4) and l1[1].item() == pytest.approx(0.1)
    hole = torch.ones(2, 1, 4, 4)
    hole[1, :, :2] = 0  # only the hole counts: the same error there, none elsewhere
    y[1, :, 2:] = x[1, :, 2:]
    assert errors(x, y, hole)[1][1].item() == pytest.approx(20.0, abs=1e-4)
    assert errors(x, y, hole)[1][0].item() == pytest.approx(100.0)  # no hole: the MSE floor
