"""Token precompute: aligned with the shard keys, deterministic, and codebook usage as defined."""

from __future__ import annotations

import math
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import data_config, params
from latent_inpaint.config import section
from latent_inpaint.data.ingest import prepare, split_keys
from latent_inpaint.data.loader import image_tensor
from latent_inpaint.data.tokens import load_tokens
from latent_inpaint.stages.tokens import codebook_usage, tokenize
from latent_inpaint.vqgan import VQModel


def test_codebook_usage_on_hand_made_tokens():
    usage = codebook_usage(np.array([[0, 0], [1, 3]], np.uint16), n_embed=4)
    assert usage["histogram"] == [2, 1, 0, 1]
    assert (usage["codes_used"], usage["dead_codes"]) == (3, 1)
    h = -(0.5 * math.log(0.5) + 2 * 0.25 * math.log(0.25))
    assert usage["perplexity"] == pytest.approx(math.exp(h))
    assert codebook_usage(np.arange(8, dtype=np.uint16), 8)["perplexity"] == pytest.approx(8.0)


@pytest.fixture()
def shards(tmp_path):
    rng = np.random.default_rng(0)
    src = tmp_path / "src"
    src.mkdir()
    for i in range(20):
        Image.fromarray(rng.integers(0, 256, (40, 36, 3), dtype=np.uint8)).save(src / f"{i:02d}.png")
    cfg = data_config("data.size=32", "data.min_side=16", "data.shard_size=4", "data.workers=1")
    prepare(cfg, src, tmp_path / "shards", progress=False)
    return tmp_path / "shards"


def test_tokens_align_with_keys_and_are_deterministic(shards, tmp_path):
    torch.manual_seed(0)
    model = VQModel(section(params(), "vqgan"), 32)
    metrics = tokenize(model, shards, tmp_path / "a", batch_size=3, device=torch.device("cpu"))
    tokenize(model, shards, tmp_path / "b", batch_size=5, device=torch.device("cpu"))
    for split in ("train", "val", "test"):
        tokens, keys = load_tokens(tmp_path / "a", split)
        assert keys == split_keys(shards, split) and tokens.shape == (len(keys), 4, 4)
        assert tokens.dtype == np.uint16
        assert np.array_equal(tokens, load_tokens(tmp_path / "b", split)[0])  # batch size plays no part
    # Row i holds the tokens of the image with key i.
    tokens, keys = load_tokens(tmp_path / "a", "val")
    first_tar = next(iter(sorted((shards / "val").glob("*.tar"))))
    with tarfile.open(first_tar) as tar:
        data = tar.extractfile(f"{keys[0]}.png").read()
    expected = model.tokenize(image_tensor(data)[None])[0].numpy()
    assert np.array_equal(tokens[0], expected)
    assert metrics["codebook"]["codes_used"] + metrics["codebook"]["dead_codes"] == 64
    assert metrics["splits"]["train"]["images"] == len(split_keys(shards, "train"))
