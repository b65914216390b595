"""FID with pytorch-fid and the standard FID Inception-v3 weights.

pytorch-fid (mseitzer/pytorch-fid, a port of the TTUR TensorFlow code) with
`pt_inception-2015-12-05-6726825d.pth` is the reference implementation the inpainting
literature reports with (MAT, LaMa and this paper's other baselines), so our numbers are
comparable with theirs. We reuse its network classes and `calculate_frechet_distance` and
mirror its `InceptionV3` forward exactly (bilinear resize to 299 x 299, scale to [-1, 1], pool3
features), but build the network ourselves: `pytorch_fid.inception.fid_inception_v3` would
download the weights, and nothing is downloaded at run time here.

Weights (`weights.inception` in params.yaml): None -> the torch hub cache
($TORCH_HOME/hub/checkpoints, where pytorch-fid itself caches the file); a path -> that file;
"stand-in" -> the same architecture with seeded random weights, for offline smoke runs and
tests only: its FIDs mean nothing against published ones and must be labelled stand-in.

Sample counts: the covariance of N feature vectors has rank at most N - 1, so with fewer
images than feature dimensions (2048) it is singular; pytorch-fid then adds 1e-6 to the
diagonals when the matrix square root fails. Such FIDs (the tiny CPU config's dozen images) are
for smoke runs only; the paper's numbers use thousands of images per mask type. With at least as
many images as dimensions, `FID.fid` is pytorch-fid's `calculate_frechet_distance` (one 2048 x
2048 SciPy sqrtm: ~15 s of CPU). With fewer, the covariances have rank < N and the same distance
is exact from an N_a x N_b matrix (`frechet_distance_low_rank`): under a millisecond, and within
1e-5 (relative) of pytorch-fid's regularised sqrtm on 12 and 4 images of 2048 dimensions. That
cut the tiny evaluation's 17 distances (evaluation and ablations) from ~4 min of CPU to nothing.
Inception features: ~0.1 s per image on one free core. `FeatureStats` gathers what the distance
needs batch by batch, in memory flat in the number of images (evaluation streams the test set).
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable

import numpy as np
import torch
import torch.nn.functional as F
import torchvision
from pytorch_fid.fid_score import calculate_frechet_distance
from pytorch_fid.inception import (
    FID_WEIGHTS_URL, FIDInceptionA, FIDInceptionC, FIDInceptionE_1, FIDInceptionE_2, InceptionV3,
)
from torch import nn

from ..weights import STAND_IN_SEED, is_stand_in, weight_file

INCEPTION_FILE = "pt_inception-2015-12-05-6726825d.pth"
INPUT_SIZE = 299


def fid_inception(weights: str | None) -> nn.Module:
    """pytorch-fid's FID Inception-v3 (torchvision's Inception3 with the TensorFlow graph's
    patched blocks, built as `fid_inception_v3` builds it), with the state-dict layout of the
    standard weight file, frozen, in eval mode."""
    path = None
    if not is_stand_in(weights):
        path = weight_file(weights, INCEPTION_FILE, "weights.inception",
                           f"FID needs the standard FID Inception-v3 weights, published at {FID_WEIGHTS_URL}")
    # Built under a fixed seed so a stand-in is the same network on every run, without touching
    # the caller's random stream.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(STAND_IN_SEED)
        net = torchvision.models.inception_v3(num_classes=1008, aux_logits=False, weights=None, init_weights=False)
        net.Mixed_5b = FIDInceptionA(192, pool_features=32)
        net.Mixed_5c = FIDInceptionA(256, pool_features=64)
        net.Mixed_5d = FIDInceptionA(288, pool_features=64)
        net.Mixed_6b = FIDInceptionC(768, channels_7x7=128)
        net.Mixed_6c = FIDInceptionC(768, channels_7x7=160)
        net.Mixed_6d = FIDInceptionC(768, channels_7x7=160)
        net.Mixed_6e = FIDInceptionC(768, channels_7x7=192)
        net.Mixed_7b = FIDInceptionE_1(1280)
        net.Mixed_7c = FIDInceptionE_2(2048)
        if path is None:
            # PyTorch's default init shrinks activations about 3x per layer (pool3 features
            # ~1e-8, every FID ~0); He init keeps them O(1) through the eval-mode BatchNorms.
            for m in net.modules():
                if isinstance(m, nn.Conv2d):
                    nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
    if path is not None:
        net.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    return net.eval().requires_grad_(False)


def _feature_layers(net: nn.Module, dims: int) -> nn.Sequential:
    """pytorch-fid's InceptionV3 blocks 0..k, k the block whose output has `dims` channels."""
    blocks = [
        [net.Conv2d_1a_3x3, net.Conv2d_2a_3x3, net.Conv2d_2b_3x3, nn.MaxPool2d(kernel_size=3, stride=2)],
        [net.Conv2d_3b_1x1, net.Conv2d_4a_3x3, nn.MaxPool2d(kernel_size=3, stride=2)],
        [net.Mixed_5b, net.Mixed_5c, net.Mixed_5d, net.Mixed_6a, net.Mixed_6b, net.Mixed_6c, net.Mixed_6d,
         net.Mixed_6e],
        [net.Mixed_7a, net.Mixed_7b, net.Mixed_7c, nn.AdaptiveAvgPool2d(output_size=(1, 1))],
    ]
    last = InceptionV3.BLOCK_INDEX_BY_DIM[dims]
    return nn.Sequential(*(layer for block in blocks[: last + 1] for layer in block))


class FID:
    """Inception features of uint8 images and the Fréchet distance between two feature sets.

    dims: 2048 (pool3, the standard FID) or pytorch-fid's `--dims` alternatives 64 / 192 / 768
    (earlier blocks, average-pooled): cheaper, for tests; not comparable with published FIDs.
    """

    def __init__(self, weights: str | None, device: str | torch.device = "cpu", batch_size: int = 50,
                 dims: int = 2048):
        if dims not in InceptionV3.BLOCK_INDEX_BY_DIM:
            raise ValueError(f"dims must be one of {sorted(InceptionV3.BLOCK_INDEX_BY_DIM)}, got {dims}")
        if batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        self.device, self.batch_size, self.dims = torch.device(device), batch_size, dims
        self.inception = fid_inception(weights)  # its state_dict() has the weight file's layout
        self.layers = _feature_layers(self.inception, dims).to(self.device)
        self.inception_is_stand_in = is_stand_in(weights)

    def _batches(self, images) -> Iterable:
        if isinstance(images, (np.ndarray, torch.Tensor)):
            return (images[i : i + self.batch_size] for i in range(0, len(images), self.batch_size))
        return images

    @torch.inference_mode()
    def features(self, images: np.ndarray | Iterable) -> np.ndarray:
        """(N, H, W, 3) uint8 images (NumPy or a CPU/GPU tensor), or an iterable of such batches of
        any image size -> (N, dims) float64."""
        out = []
        for batch in self._batches(images):
            if not isinstance(batch, torch.Tensor):
                batch = torch.from_numpy(np.ascontiguousarray(batch))
            if batch.dtype != torch.uint8 or batch.ndim != 4 or batch.shape[-1] != 3:
                raise TypeError(f"FID takes (N, H, W, 3) uint8 images, got {tuple(batch.shape)} {batch.dtype}")
            x = batch.to(self.device).permute(0, 3, 1, 2).float() / 255  # (B, 3, H, W) in [0, 1]
            x = F.interpolate(x, size=(INPUT_SIZE, INPUT_SIZE), mode="bilinear", align_corners=False)
            with torch.autocast(self.device.type, enabled=False):  # fp32 like pytorch-fid, whatever the caller
                x = self.layers(2 * x - 1)
            if x.shape[2:] != (1, 1):
                x = F.adaptive_avg_pool2d(x, output_size=(1, 1))
            out.append(x.flatten(1).cpu().numpy().astype(np.float64))  # (B, dims)
        return np.concatenate(out) if out else np.zeros((0, self.dims))

    @staticmethod
    def fid(features_a: np.ndarray | FeatureStats, features_b: np.ndarray | FeatureStats) -> float:
        """The Fréchet distance between the Gaussians fitted to two (N, D) feature sets (or their
        FeatureStats): pytorch-fid's, or with no more sets than dimensions the same distance from
        their low rank."""
        stats = []
        for name, f in (("features_a", features_a), ("features_b", features_b)):
            if not isinstance(f, FeatureStats):
                f = np.asarray(f, dtype=np.float64)
                if f.ndim != 2:
                    raise ValueError(f"{name} must be (N, D) with N >= 2 for a covariance, got {f.shape}")
                f = FeatureStats(f.shape[1]).add(f)
            if f.count < 2:
                raise ValueError(f"{name} must be (N, D) with N >= 2 for a covariance, got {f.count} set(s)")
            stats.append(f)
        a, b = stats
        if a.features is not None and b.features is not None:
            return frechet_distance_low_rank(a.features, b.features)
        with warnings.catch_warnings():
            # pytorch-fid 0.3.0 passes sqrtm's `disp`, deprecated in SciPy 1.17
            warnings.filterwarnings("ignore", message=".*`disp` argument is deprecated",
                                    category=DeprecationWarning)
            return float(calculate_frechet_distance(*a.mean_cov(), *b.mean_cov()))


class FeatureStats:
    """What the Fréchet distance needs of a stream of (B, D) feature batches, in memory flat in
    their number: the features themselves while there are at most D of them (the low-rank
    distance needs them; at most D x D floats), past that their count, sum and sum of outer
    products (also D x D), taken about the mean of the features held at the switch so that the
    covariance loses no precision to cancellation. Never pixels."""

    def __init__(self, dims: int):
        self.dims, self.count = dims, 0
        self._rows: list[np.ndarray] | None = []
        self._shift = self._sum = self._outer = None

    def add(self, features: np.ndarray) -> FeatureStats:
        f = np.asarray(features, dtype=np.float64)
        if f.ndim != 2 or f.shape[1] != self.dims:
            raise ValueError(f"features must be (B, {self.dims}), got {f.shape}")
        if self._rows is not None:
            if self.count + len(f) <= self.dims:
                self._rows.append(f)
                self.count += len(f)
                return self
            f = np.concatenate([*self._rows, f])  # one batch past D: from now on the sums
            self._rows, self.count = None, 0
            self._shift, self._sum, self._outer = f.mean(axis=0), np.zeros(self.dims), np.zeros((self.dims,) * 2)
        centred = f - self._shift
        self._sum += centred.sum(axis=0)
        self._outer += centred.T @ centred
        self.count += len(f)
        return self

    @property
    def features(self) -> np.ndarray | None:
        """The (N, D) features while N <= D, else None."""
        if self._rows is None:
            return None
        return np.concatenate(self._rows) if self._rows else np.zeros((0, self.dims))

    def mean_cov(self) -> tuple[np.ndarray, np.ndarray]:
        """The mean (D,) and unbiased covariance (D, D), as NumPy's mean and cov give them."""
        if self._rows is not None:
            f = self.features
            return f.mean(axis=0), np.cov(f, rowvar=False)
        m = self._sum / self.count
        return self._shift + m, (self._outer - self.count * np.outer(m, m)) / (self.count - 1)


def frechet_distance_low_rank(features_a: np.ndarray, features_b: np.ndarray) -> float:
    """||mu_a - mu_b||^2 + Tr(S_a) + Tr(S_b) - 2 Tr sqrt(S_a S_b) for (N, D) feature sets, exact,
    without a D x D matrix: with S = C^T C (C the centred features / sqrt(N - 1)), the nonzero
    eigenvalues of S_a S_b are the squared singular values of C_a C_b^T (N_a x N_b), so
    Tr sqrt(S_a S_b) is that matrix's nuclear norm."""
    (mu_a, c_a), (mu_b, c_b) = ((f.mean(axis=0), (f - f.mean(axis=0)) / np.sqrt(len(f) - 1))
                                for f in (features_a, features_b))
    diff = mu_a - mu_b
    trace_sqrt = np.linalg.svd(c_a @ c_b.T, compute_uv=False).sum()
    return float(diff @ diff + np.sum(c_a * c_a) + np.sum(c_b * c_b) - 2 * trace_sqrt)
