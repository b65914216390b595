"""Ground-truth tokens: E_VQ(X) of every image, per split, aligned with the shard keys
(the files are `data.tokens`'s).

The transformer trains from these arrays alone, and the encoder and decoder read their targets
from them, so the VQGAN runs over the data once.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import torch

from ..data.ingest import SPLITS, read_manifest, split_keys
from ..data.loader import image_loader
from ..data.tokens import MAX_CODES, write_tokens
from ..files import atomic_write
from ..saved import load_model
from ..tracking import stage_run, tracking_config
from ..vqgan import VQModel


def run(params: dict, vqgan: Path, shards: Path, out: Path, *, batch_size: int = 32, device: str | None = None) -> str:
    """Tokenize every split of the shards with the VQGAN of `vqgan` (a run or final/ folder)."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model = load_model(vqgan, VQModel, device=device)
    with stage_run("tokens", tracking_config(params), {}) as tracker:
        metrics = tokenize(model, Path(shards), Path(out), batch_size, device)
        usage = metrics["codebook"]
        tracker.log_metrics({"perplexity": usage["perplexity"], "codes_used": usage["codes_used"],
                             "dead_codes": usage["dead_codes"],
                             **{f"{s}_images_per_s": m["images_per_s"] for s, m in metrics["splits"].items()}})
        tracker.log_dict(metrics, "metrics")
    return (f"tokens of {sum(m['images'] for m in metrics['splits'].values())} images written to {out}; "
            f"codebook: {usage['codes_used']} of {usage['n_embed']} codes used, perplexity {usage['perplexity']:.1f}")


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
    if model.quantize.embedding.num_embeddings > MAX_CODES:
        raise ValueError(f"tokens are stored as uint16: a codebook above {MAX_CODES} entries does not fit")
    out_dir.mkdir(parents=True, exist_ok=True)
    model = model.to(device).eval()
    metrics: dict = {"splits": {}}
    for split in SPLITS:
        start = time.perf_counter()
        tokens = tokenize_split(model, shards_dir, split, batch_size, device)
        seconds = time.perf_counter() - start
        write_tokens(out_dir, split, tokens, split_keys(shards_dir, split))
        metrics["splits"][split] = {"images": len(tokens), "images_per_s": len(tokens) / max(seconds, 1e-9)}
    train = np.load(out_dir / "train.npy")
    metrics["codebook"] = codebook_usage(train, model.quantize.embedding.num_embeddings)
    metrics["grid"] = list(train.shape[1:])
    atomic_write(out_dir / "metrics.json", json.dumps(metrics, indent=1).encode())
    return metrics
