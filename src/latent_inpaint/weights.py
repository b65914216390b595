"""Standard pretrained weight files (LPIPS's VGG16, FID's Inception), never downloaded.

A `weights.*` param is None (the torch hub cache), a path, or "stand-in": random weights built
under a fixed seed, for offline smoke runs and tests; numbers computed with them are labelled.
"""

from __future__ import annotations

from pathlib import Path

STAND_IN = "stand-in"
STAND_IN_SEED = 0  # stand-in networks are built under this seed: the same random weights every run


def is_stand_in(setting: str | None) -> bool:
    """Whether a `weights.*` setting asks for random stand-in weights."""
    return setting == STAND_IN


def stand_ins(weights) -> list[str]:
    """The names of a WeightsConfig's networks that are stand-ins, e.g. ["inception", "vgg16"]."""
    return [name for name in ("inception", "vgg16") if is_stand_in(getattr(weights, name))]


def hub_checkpoint(filename: str) -> Path:
    """Where torch.hub caches a downloaded weight file ($TORCH_HOME/hub/checkpoints)."""
    import torch

    return Path(torch.hub.get_dir()) / "checkpoints" / filename


def weight_file(setting: str | None, filename: str, param: str, needed: str) -> Path:
    """A standard pretrained file, never downloaded: the path `setting` names, or with None the
    torch hub cache; an absent file is an error saying where to put it and which param to set."""
    path = Path(setting) if setting else hub_checkpoint(filename)
    if not path.is_file():
        raise FileNotFoundError(
            f"{needed} ({filename}) and {path} does not exist. Copy the file to {hub_checkpoint(filename)} "
            f"(the torch hub cache), or set {param} in params.yaml to its path (or to '{STAND_IN}' for an "
            "offline smoke run)."
        )
    return path
