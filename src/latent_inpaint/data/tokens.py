"""The ground-truth token files: E_VQ(X) of every image of a split, aligned with the shard keys.

    <tokens_dir>/<split>.npy         (N, h, w) uint16, row i the tokens of the image with key i
    <tokens_dir>/<split>.keys.json   the N shard keys, in `split_keys` order
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np

from ..files import atomic_write, sha256_file

MAX_CODES = 2**16  # tokens are stored as uint16


def write_tokens(tokens_dir: Path, split: str, tokens: np.ndarray, keys: list[str]) -> None:
    """Write a split's (N, h, w) tokens and their keys, each file atomically."""
    if len(tokens) != len(keys):
        raise ValueError(f"{len(tokens)} token maps for {len(keys)} keys of split {split!r}")
    buf = io.BytesIO()
    np.save(buf, tokens.astype(np.uint16))
    atomic_write(Path(tokens_dir) / f"{split}.npy", buf.getvalue())
    atomic_write(Path(tokens_dir) / f"{split}.keys.json", json.dumps(keys).encode())


def load_tokens(tokens_dir: Path, split: str) -> tuple[np.ndarray, list[str]]:
    """(N, h, w) uint16 tokens of a split (memory-mapped) and the shard keys of its rows."""
    path = Path(tokens_dir) / f"{split}.npy"
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: run `latent-inpaint tokenize` (the tokens rule) first")
    keys = json.loads((Path(tokens_dir) / f"{split}.keys.json").read_text())
    return np.load(path, mmap_mode="r"), keys


def tokens_fingerprint(tokens_dir: Path) -> str:
    """A digest of the train and val token arrays: a stage trained on other tokens is another run."""
    return "-".join(sha256_file(Path(tokens_dir) / f"{split}.npy")[:16] for split in ("train", "val"))
