"""Losses shared by the stages: LPIPS, the PatchGAN discriminator, hinge and non-saturating GAN
terms, taming's adaptive GAN weight, and R1."""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch import nn

from .weights import STAND_IN_SEED, is_stand_in, weight_file

VGG16_FILE = "vgg16-397923af.pth"  # torchvision's ImageNet VGG16, which LPIPS builds on
# The stand-in's VGG16 has 1/STAND_IN_NARROWING of the channels (16-128, not 64-512): random
# features measure nothing real at any width, and the full width made LPIPS most of a tiny
# training step (at 64 px, batch 8: ~1.1 s of CPU for a forward, 16x less at a quarter width).
STAND_IN_NARROWING = 4


def load_lpips(vgg16: str | None) -> nn.Module:
    """LPIPS (VGG variant, v0.1 linear heads from the lpips wheel), frozen, in eval mode.

    vgg16: None looks in the torch hub cache; a path names the file; "stand-in", for offline
    smoke runs, keeps random VGG features at 1/STAND_IN_NARROWING of the width (`narrow_stand_in`).
    """
    import lpips

    # Under a fixed seed, without touching the caller's random stream: a stand-in must give the
    # same numbers on every run (evaluation, the pipeline on SLURM against the local one).
    with warnings.catch_warnings(), torch.random.fork_rng(devices=[]):
        warnings.simplefilter("ignore")  # torchvision's deprecated `pretrained=` inside lpips
        torch.manual_seed(STAND_IN_SEED)
        model = lpips.LPIPS(net="vgg", pnet_rand=True, verbose=False)
        if is_stand_in(vgg16):
            narrow_stand_in(model, STAND_IN_NARROWING)
    if not is_stand_in(vgg16):
        path = weight_file(vgg16, VGG16_FILE, "weights.vgg16", "LPIPS needs torchvision's ImageNet VGG16 weights")
        state = torch.load(path, map_location="cpu", weights_only=True)
        # lpips keeps torchvision's layer indices inside five slices: net.slice<k>.<index>.<param>
        with torch.no_grad():
            for name, param in model.net.named_parameters():
                _, index, kind = name.split(".")
                param.copy_(state[f"features.{index}.{kind}"])
    model.stand_in = is_stand_in(vgg16)
    return model.eval().requires_grad_(False)


def narrow_stand_in(model: nn.Module, narrowing: int) -> None:
    """Make an lpips.LPIPS (VGG) `narrowing` times narrower in place: every VGG16 conv keeps its
    place and name (net.slice<k>.<index>) with channels // narrowing, under torchvision's VGG
    initialisation; each linear head keeps every narrowing-th weight of the wheel's real head
    (features are unit vectors over channels, so with fewer channels each squared difference is
    larger by about the same factor and a layer's distance keeps its scale)."""
    from torchvision.models.vgg import VGG, cfgs, make_layers

    layout = [c if c == "M" else c // narrowing for c in cfgs["D"]]  # VGG16's conv layout
    features = VGG(make_layers(layout), init_weights=True).features  # random, as torchvision inits VGG16
    for slice_ in (model.net.slice1, model.net.slice2, model.net.slice3, model.net.slice4, model.net.slice5):
        for index in list(slice_._modules):
            slice_._modules[index] = features[int(index)]
    for lin in model.lins:
        real = lin.model[-1].weight  # (1, C, 1, 1)
        head = nn.Conv2d(real.shape[1] // narrowing, 1, 1, bias=False)
        with torch.no_grad():
            head.weight.copy_(real[:, ::narrowing])
        lin.model[-1] = head
    model.chns = [c // narrowing for c in model.chns]


class NLayerDiscriminator(nn.Module):
    """PatchGAN discriminator (pix2pix), with taming-transformers' parameter names (`main.*`)."""

    def __init__(self, in_channels: int = 3, channels: int = 64, n_layers: int = 3):
        super().__init__()
        self.in_channels, self.channels, self.n_layers = in_channels, channels, n_layers
        layers: list[nn.Module] = [nn.Conv2d(in_channels, channels, 4, 2, 1), nn.LeakyReLU(0.2, True)]
        mult = 1
        for n in range(1, n_layers + 1):
            prev, mult = mult, min(2**n, 8)
            stride = 2 if n < n_layers else 1
            layers += [
                nn.Conv2d(channels * prev, channels * mult, 4, stride, 1, bias=False),
                nn.BatchNorm2d(channels * mult),
                nn.LeakyReLU(0.2, True),
            ]
        layers.append(nn.Conv2d(channels * mult, 1, 4, 1, 1))  # one logit per patch
        self.main = nn.Sequential(*layers)
        for m in self.modules():  # the DCGAN initialisation taming uses
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, 0.0, 0.02)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.normal_(m.weight, 1.0, 0.02)
                nn.init.zeros_(m.bias)

    def spec(self) -> dict:
        """What rebuilds this model (saved.load_model)."""
        return {"model": type(self).__name__, "in_channels": self.in_channels, "channels": self.channels,
                "n_layers": self.n_layers}

    @classmethod
    def from_spec(cls, spec: dict) -> NLayerDiscriminator:
        return cls(spec["in_channels"], spec["channels"], spec["n_layers"])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.main(x)  # (B, 1, h, w) patch logits


def hinge_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())


def nonsaturating_g_loss(logits_fake: torch.Tensor) -> torch.Tensor:
    return F.softplus(-logits_fake).mean()


def nonsaturating_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    return F.softplus(-logits_real).mean() + F.softplus(logits_fake).mean()


def r1_penalty(logits_real: torch.Tensor, reals: torch.Tensor) -> torch.Tensor:
    """R1 = E ||d D(x) / d x||^2 on real images (`reals` must require grad)."""
    (grad,) = torch.autograd.grad(logits_real.sum(), reals, create_graph=True)
    return grad.pow(2).flatten(1).sum(1).mean()


def adaptive_weight(nll: torch.Tensor, g_loss: torch.Tensor, last_layer: torch.Tensor, scale: float) -> torch.Tensor:
    """taming's balance of reconstruction and GAN terms: the ratio of their gradient norms at the
    decoder's last layer, so neither swamps the other whatever their scales."""
    nll_grad = torch.autograd.grad(nll, last_layer, retain_graph=True)[0]
    g_grad = torch.autograd.grad(g_loss, last_layer, retain_graph=True)[0]
    weight = nll_grad.norm() / (g_grad.norm() + 1e-4)
    return torch.clamp(weight, 0.0, 1e4).detach() * scale
