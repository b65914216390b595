"""Ground-truth tokens: E_VQ(X) of every image, per split, aligned with the shard keys.

The transformer trains from these arrays alone, and the encoder and decoder read their targets
from them, so the VQGAN runs over the data once.
"""

from __future__ import annotations

import io
import json
import time
from pathlib import Path

import numpy as np
import torch

from ..data.ingest import SPLITS, read_manifest, split_keys
from ..data.loader import image_loader
from ..files import atomic_write, sha256_file
from ..vqgan import VQModel


def codebook_usage(tokens: np.ndarray, n_embed: int) -> dict:
    """Histogram, perplexity exp(H) (n_embed when every code is used equally) and dead codes."""
    counts = np.bincount(tokens.ravel().astype(np.int64), minlength=n_embed)
    p = counts / max(counts.sum(), 1)
    nz = p[p > 0]
    return {
        "perplexity": float(np.exp(-(nz * np.log(nz)).sum())) if nz.size else 0.0,
        "codes_used": int((counts > 0).sum()),
        "dead_codes": int((counts == 0).sum()),
        "n_embed": n_embed,
        "histogram": counts.tolist(),
    }


@torch.no_grad()
def tokenize_split(model: VQModel, shards_dir: Path, split: str, batch_size: int, device: torch.device) -> np.ndarray:
    """(N, h, w) uint16 tokens in `split_keys` order."""
    keys = split_keys(shards_dir, split)
    if not keys:
        h = w = read_manifest(shards_dir)["params"]["size"] // model.factor
        return np.zeros((0, h, w), np.uint16)
    loader = image_loader(shards_dir, split, batch_size, workers=0, shuffle=False, drop_last=False)
    out, order = [], []
    for batch in loader:
        out.append(model.tokenize(batch["image"].to(device)).cpu().numpy().astype(np.uint16))
        order += batch["key"]
    if order != keys:  # the arrays are indexed by position: any reordering would be silent corruption
        raise RuntimeError(f"{shards_dir}: loader order of split {split!r} differs from its keys")
    return np.concatenate(out)


def tokenize(model: VQModel, shards_dir: Path, out_dir: Path, batch_size: int, device: torch.device) -> dict:
    """Write `<split>.npy` (N, h, w) uint16 and `<split>.keys.json` for every split, and
    `metrics.json` (codebook usage on the train split, images/s); return the metrics."""
    if model.quantize.embedding.num_embeddings > 65536:
        raise ValueError("tokens are stored as uint16: a codebook above 65536 entries does not fit")
    out_dir.mkdir(parents=True, exist_ok=True)
    model = model.to(device).eval()
    metrics: dict = {"splits": {}}
    for split in SPLITS:
        start = time.perf_counter()
        tokens = tokenize_split(model, shards_dir, split, batch_size, device)
        seconds = time.perf_counter() - start
        buf = _npy_bytes(tokens)
        atomic_write(out_dir / f"{split}.npy", buf)
        atomic_write(out_dir / f"{split}.keys.json", json.dumps(split_keys(shards_dir, split)).encode())
        metrics["splits"][split] = {"images": len(tokens), "images_per_s": len(tokens) / max(seconds, 1e-9)}
    train = np.load(out_dir / "train.npy")
    metrics["codebook"] = codebook_usage(train, model.quantize.embedding.num_embeddings)
    metrics["grid"] = list(train.shape[1:])
    atomic_write(out_dir / "metrics.json", json.dumps(metrics, indent=1).encode())
    return metrics


def _npy_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array)
    return buf.getvalue()


def tokens_fingerprint(tokens_dir: Path) -> str:
    """A digest of the train and val token arrays: a stage trained on other tokens is another run."""
    return "-".join(sha256_file(Path(tokens_dir) / f"{split}.npy")[:16] for split in ("train", "val"))


def load_tokens(tokens_dir: Path, split: str) -> tuple[np.ndarray, list[str]]:
    """(N, h, w) uint16 tokens of a split (memory-mapped) and the shard keys of its rows."""
    path = Path(tokens_dir) / f"{split}.npy"
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: run `latent-inpaint tokenize` (the tokens rule) first")
    keys = json.loads((Path(tokens_dir) / f"{split}.keys.json").read_text())
    return np.load(path, mmap_mode="r"), keys
