"""A taming-transformers VQGAN checkpoint, loaded strictly into this project's VQModel (whose
parameters carry taming's names). Lightning .ckpt files are read safely by official.read_checkpoint."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch

from latent_inpaint.config import VQGANConfig
from latent_inpaint.official import read_checkpoint, take
from latent_inpaint.vqgan import VQModel

log = logging.getLogger(__name__)

LOSS_PREFIX = "loss."  # taming stores its LPIPS network and discriminator under this prefix


def expected_state(model: torch.nn.Module) -> dict[str, torch.Size]:
    """The key -> shape list a checkpoint must match to fill `model` (built on any device)."""
    return {k: v.shape for k, v in model.state_dict().items()}


def load_taken(model: torch.nn.Module, weights: dict[str, torch.Tensor]) -> None:
    """Fill a (meta-device) model with checked weights, in fp32 like the model; tensors already
    fp32 and contiguous are used as they are (a memory-mapped file stays on disk until read)."""
    weights = {k: v.float() if v.is_floating_point() and v.dtype != torch.float32 else v for k, v in weights.items()}
    model.load_state_dict(weights, strict=True, assign=True)


def import_taming_checkpoint(
    path: str | os.PathLike,
    cfg: VQGANConfig,
    resolution: int,
    *,
    trust_pickle: bool = False,
) -> VQModel:
    """A VQModel with the weights of a taming-transformers VQGAN checkpoint (.ckpt with
    {"state_dict": ...}, or .safetensors), loaded strictly. taming's `loss.*` entries (its LPIPS
    network and discriminator) are dropped; anything else that does not match `cfg` is an error."""
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(path))
    else:
        state, _ = read_checkpoint(path, trust_pickle=trust_pickle)
    with torch.device("meta"):
        model = VQModel(cfg, resolution)
    taken = take(path, state, expected_state(model), drop={"loss/discriminator weights": (LOSS_PREFIX,)})
    log.info("%s: %d model tensors kept, %d loss.* tensors dropped", path, len(taken.weights),
             len(taken.dropped["loss/discriminator weights"]))
    load_taken(model, taken.weights)
    return model
