"""A taming-transformers VQGAN checkpoint, loaded strictly into this project's VQModel (whose
parameters carry taming's names)."""

from __future__ import annotations

import logging
import os
import pickle
from pathlib import Path

import torch

from latent_inpaint.config import VQGANConfig
from latent_inpaint.vqgan import VQModel

log = logging.getLogger(__name__)

LOSS_PREFIX = "loss."  # taming stores its LPIPS network and discriminator under this prefix


def _read_state_dict(path: Path, trust_pickle: bool) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        if not trust_pickle:
            raise ValueError(
                f"{path}: the checkpoint holds Python objects beyond tensors, so it cannot be loaded "
                f"safely ({str(exc).splitlines()[0]}). If you trust its source, pass trust_pickle=True "
                "(or convert it once to .safetensors)."
            ) from None
        obj = torch.load(path, map_location="cpu", weights_only=False)
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ValueError(f"{path}: expected a taming checkpoint {{'state_dict': {{name: tensor}}}} or a state dict")
    return obj


def _key_list(keys: list[str], limit: int = 20) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f", ... ({len(keys) - limit} more)" if len(keys) > limit else "")


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
    state = _read_state_dict(path, trust_pickle)
    dropped = [k for k in state if k.startswith(LOSS_PREFIX)]
    state = {k: v for k, v in state.items() if not k.startswith(LOSS_PREFIX)}
    log.info("%s: %d model tensors kept, %d loss.* tensors dropped", path, len(state), len(dropped))

    with torch.device("meta"):
        model = VQModel(cfg, resolution)
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    if missing or unexpected:
        raise ValueError(
            f"{path}: checkpoint does not match the VQGAN config (after dropping {len(dropped)} loss.* keys)\n"
            f"  missing ({len(missing)}): {_key_list(missing)}\n"
            f"  unexpected ({len(unexpected)}): {_key_list(unexpected)}"
        )
    mismatched = [k for k in expected if state[k].shape != expected[k].shape]
    if mismatched:
        k = mismatched[0]
        raise ValueError(
            f"{path}: {len(mismatched)} tensor(s) have the wrong shape for the VQGAN config; first: "
            f"{k} is {tuple(state[k].shape)} in the checkpoint, {tuple(expected[k].shape)} in the model"
        )
    state = {k: v.float() if v.is_floating_point() else v for k, v in state.items()}
    model.load_state_dict(state, strict=True, assign=True)
    return model
