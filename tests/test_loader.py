"""The shard loader: every image once per epoch, exact pixels, seeded shuffles, balanced ranks."""

from __future__ import annotations

import io
import re
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from latent_inpaint.config import section
from latent_inpaint.params import load_params
from latent_inpaint.data.ingest import DataError, prepare, split_keys
from latent_inpaint.data.loader import image_loader

PARAMS = Path(__file__).resolve().parents[1] / "params.yaml"
TINY = ["data.size=32", "data.min_side=16", "data.shard_size=8", "data.workers=1"]


def _prepare(source: Path, out: Path, *overrides: str) -> Path:
    cfg = section(load_params([PARAMS], [*TINY, *overrides]), "data")
    prepare(cfg, source, out, progress=False)
    return out


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for i in range(44):
        Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(root / f"img{i:03d}.png")
    return root


@pytest.fixture(scope="module")
def shards(source, tmp_path_factory) -> Path:
    # 44 images: 4 val, 4 test, 36 train in shards of 8, 8, 8, 8 and 4.
    return _prepare(source, tmp_path_factory.mktemp("shards"))


def _keys(loader) -> list[str]:
    return [key for batch in loader for key in batch["key"]]


def _shard(key: str) -> str:
    return key.rsplit("-", 1)[0]  # "train-000003-00005" -> "train-000003"


def test_unshuffled_epoch_is_split_keys_with_exact_pixels(shards):
    loader = image_loader(shards, "train", 5, workers=0, shuffle=False, drop_last=False)
    batches = list(loader)
    assert [k for b in batches for k in b["key"]] == split_keys(shards, "train")
    assert [len(b["key"]) for b in batches] == [5] * 7 + [1]
    assert _keys(loader) == split_keys(shards, "train")  # the same order again next epoch

    images = {k: img for b in batches for k, img in zip(b["key"], b["image"])}
    for tar_path in sorted((shards / "train").glob("*.tar")):
        with tarfile.open(tar_path) as tar:
            for member in tar.getmembers():
                if member.name.endswith(".png"):
                    with Image.open(io.BytesIO(tar.extractfile(member).read())) as im:
                        pixels = np.asarray(im.convert("RGB"), dtype=np.float32)  # (H, W, 3)
                    got = images[member.name[: -len(".png")]]
                    assert got.dtype == torch.float32 and got.shape == (3, 32, 32)
                    assert got.min() >= -1 and got.max() <= 1
                    np.testing.assert_allclose(got.permute(1, 2, 0).numpy(), pixels / 127.5 - 1, atol=1e-6)


def test_shuffle_is_seeded_and_changes_each_epoch(shards):
    ordered = split_keys(shards, "train")
    first = image_loader(shards, "train", 4, workers=0, seed=3)
    again = image_loader(shards, "train", 4, workers=0, seed=3)
    epoch1, epoch2 = _keys(first), _keys(first)
    assert epoch1 == _keys(again)
    assert sorted(epoch1) == sorted(ordered) and epoch1 != ordered
    assert epoch2 != epoch1 and sorted(epoch2) == sorted(ordered)
    assert _keys(image_loader(shards, "train", 4, workers=0, seed=4)) != epoch1


@pytest.mark.parametrize("shuffle", [False, True])
def test_two_workers_yield_every_image_once(shards, shuffle):
    keys = _keys(image_loader(shards, "train", 3, workers=2, shuffle=shuffle, drop_last=False))
    assert sorted(keys) == sorted(split_keys(shards, "train"))


def test_fewer_shards_than_workers(shards):
    keys = _keys(image_loader(shards, "val", 2, workers=4, shuffle=False, drop_last=False))
    assert keys == split_keys(shards, "val")


def test_ranks_get_disjoint_shards_and_equal_steps(shards, monkeypatch):
    monkeypatch.setenv("RANK", "1")  # the ranks given decide, not the environment
    monkeypatch.setenv("WORLD_SIZE", "3")
    seen = []
    for rank in range(2):
        batches = list(image_loader(shards, "train", 3, rank=rank, world_size=2, workers=2, seed=1))
        assert all(len(b["key"]) == 3 for b in batches)
        seen.append(batches)
    # Nominal epoch 36 // 2 = 18 images = 6 batches; rank 1 holds 16 images and must repeat some.
    assert [len(b) for b in seen] == [6, 6]
    shard_sets = [{_shard(k) for b in batches for k in b["key"]} for batches in seen]
    assert shard_sets[0].isdisjoint(shard_sets[1])
    assert shard_sets[0] | shard_sets[1] == {_shard(k) for k in split_keys(shards, "train")}


def test_empty_split_is_a_clear_error(source, tmp_path):
    out = _prepare(source, tmp_path / "shards", "data.val_fraction=0.0")
    with pytest.raises(DataError, match=rf"{re.escape(str(out))}.*'val'.*no images"):
        image_loader(out, "val", 2)


def test_batch_larger_than_split_is_an_error(shards):
    with pytest.raises(DataError, match="batch_size=8"):
        image_loader(shards, "val", 8, workers=0)
