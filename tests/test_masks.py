import dataclasses
import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from latent_inpaint.config import ConfigError, FreeFormConfig, section
from latent_inpaint.params import load_params
from latent_inpaint.masks import (
    GRID_LABEL,
    GRID_SEP,
    box_mask,
    eval_mask,
    free_form_mask,
    hole_ratio,
    load_mask,
    read_eval_mask,
    user_mask,
    write_eval_masks,
)
from latent_inpaint.stages import masks as masks_stage

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def cfg():
    return section(load_params([REPO / "params.yaml"]), "masks")


# ---------------------------------------------------------------------------------- free-form


@pytest.mark.parametrize("size", [256, 64])
def test_hole_ratios_lie_in_the_configured_ranges(cfg, size):
    means = {}
    for kind in ("small", "large"):
        lo, hi = getattr(cfg, kind).hole_range
        ratios = np.array([hole_ratio(eval_mask(kind, size, cfg, "val", i)) for i in range(200)])
        assert np.all((ratios > lo) & (ratios < hi)), kind
        means[kind] = ratios.mean()
    assert means["large"] > means["small"] + 0.15


def test_masks_use_only_zero_and_one(cfg):
    mask = eval_mask("large", 64, cfg, "val", 0)
    assert mask.dtype == np.uint8 and set(np.unique(mask)) == {0, 1}


def test_free_form_is_deterministic_given_the_rng(cfg):
    a = free_form_mask(64, cfg.train, np.random.default_rng(7))
    b = free_form_mask(64, cfg.train, np.random.default_rng(7))
    c = free_form_mask(64, cfg.train, np.random.default_rng(8))
    assert np.array_equal(a, b) and not np.array_equal(a, c)


def test_eval_masks_are_fixed_per_seed_split_kind_and_index(cfg):
    fifth = eval_mask("small", 64, cfg, "val", 5)
    for i in range(5):
        eval_mask("small", 64, cfg, "val", i)
    assert np.array_equal(eval_mask("small", 64, cfg, "val", 5), fifth)
    others = [
        eval_mask("small", 64, cfg, "val", 6),
        eval_mask("small", 64, cfg, "test", 5),
        eval_mask("large", 64, cfg, "val", 5),
        eval_mask("small", 64, dataclasses.replace(cfg, seed=cfg.seed + 1), "val", 5),
    ]
    assert not any(np.array_equal(fifth, m) for m in others)


def test_strokes_alone_paint_non_rectangular_holes():
    strokes_only = FreeFormConfig(rects_half=0, rects_full=0, strokes=4, hole_range=(0.0, 1.0))
    rng = np.random.default_rng(0)
    for _ in range(20):
        hole = free_form_mask(64, strokes_only, rng) == 0
        rows, cols = np.flatnonzero(hole.any(1)), np.flatnonzero(hole.any(0))
        bbox_area = (rows[-1] - rows[0] + 1) * (cols[-1] - cols[0] + 1)
        assert 0 < hole.sum() < bbox_area  # a stroke, not a filled rectangle


def test_impossible_hole_range_raises_naming_it():
    nothing = FreeFormConfig(rects_half=0, rects_full=0, strokes=0, hole_range=(0.99, 1.0))
    with pytest.raises(ValueError, match=r"\(0\.99, 1\.0\) at size 32"):
        free_form_mask(32, nothing, np.random.default_rng(0))


def test_unknown_kind_is_an_error(cfg):
    with pytest.raises(ValueError, match="medium"):
        eval_mask("medium", 64, cfg, "val", 0)


# ---------------------------------------------------------------------------------- box


def _hole_box(mask):
    hole = mask == 0
    rows, cols = np.flatnonzero(hole.any(1)), np.flatnonzero(hole.any(0))
    return rows[0], rows[-1] + 1, cols[0], cols[-1] + 1, int(hole.sum())


def test_box_is_the_papers_204_square_at_256():
    assert _hole_box(box_mask(256, 0.8)) == (26, 230, 26, 230, 204 * 204)  # 26 px margins


@pytest.mark.parametrize(
    "size, fraction, side",
    [(64, 0.8, 51), (512, 0.8, 409), (100, 0.29, 29), (33, 0.5, 16), (32, 0.5, 16)],
)
def test_box_side_is_floored_and_the_odd_margin_pixel_goes_bottom_right(size, fraction, side):
    top = (size - side) // 2
    assert _hole_box(box_mask(size, fraction)) == (top, top + side, top, top + side, side * side)


# ---------------------------------------------------------------------------------- files


def _fake_shards(root: Path, keys_per_shard: dict[str, list[list[str]]], size: int = 32) -> Path:
    """The manifest and sidecars of ingest.prepare, without the tars (split_keys reads only these)."""
    splits = {}
    for split, shards in keys_per_shard.items():
        (root / split).mkdir(parents=True, exist_ok=True)
        entries = []
        for i, keys in enumerate(shards):
            stem = f"{split}-{i:06d}"
            (root / split / f"{stem}.json").write_text(json.dumps({"keys": keys}))
            entries.append({"path": f"{split}/{stem}.tar", "images": len(keys), "sha256": ""})
        splits[split] = {"images": sum(len(k) for k in shards), "shards": entries}
    (root / "manifest.json").write_text(json.dumps({"version": 1, "params": {"size": size}, "splits": splits}))
    return root


def _files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_write_eval_masks(cfg, tmp_path):
    keys = ["val-000000-00000", "val-000000-00001", "val-000000-00002", "val-000001-00000"]
    cfg = dataclasses.replace(cfg, splits=("val", "test"), grid_count=3)
    size, out = 32, tmp_path / "masks"
    split_keys = {"train": ["train-000000-00000"], "val": keys, "test": []}

    manifest = write_eval_masks(cfg, size, split_keys, out)

    for kind in ("small", "large", "box"):
        pngs = [out / "val" / kind / f"{k}.png" for k in keys]
        assert sorted(p.name for p in (out / "val" / kind).iterdir()) == sorted(p.name for p in pngs)
        arrays = [np.asarray(Image.open(p)) for p in pngs]
        assert all(set(np.unique(a)) <= {0, 255} for a in arrays)
        for i, a in enumerate(arrays):
            assert np.array_equal(a // 255, eval_mask(kind, size, cfg, "val", i))
            assert np.array_equal(read_eval_mask(out, "val", kind, keys[i]), a // 255)
        stats = manifest["splits"]["val"][kind]
        assert stats["count"] == len(keys)
        assert stats["sha256"] == hashlib.sha256(b"".join(p.read_bytes() for p in pngs)).hexdigest()
        lo, hi = (stats["hole_ratio"][k] for k in ("min", "max"))
        assert lo == pytest.approx(min(hole_ratio(a // 255) for a in arrays))
        assert hi == pytest.approx(max(hole_ratio(a // 255) for a in arrays))
        assert manifest["splits"]["test"][kind] == {
            "count": 0, "hole_ratio": None, "sha256": hashlib.sha256().hexdigest()
        }
    assert "train" not in manifest["splits"]
    assert json.loads((out / "manifest.json").read_text()) == manifest

    grid = np.asarray(Image.open(out / "masks.png"))
    assert grid.shape == (GRID_SEP + 3 * (size + GRID_SEP), GRID_LABEL + GRID_SEP + 3 * (size + GRID_SEP))
    top, left = GRID_SEP + (size + GRID_SEP), GRID_LABEL + GRID_SEP  # "large" row, first mask
    cell = grid[top : top + size, left : left + size] // 255
    assert np.array_equal(cell, eval_mask("large", size, cfg, "val", 0))

    first = _files(out)
    (out / "val" / "small" / "stale-key.png").write_bytes(b"old")
    write_eval_masks(cfg, size, split_keys, out)
    assert _files(out) == first


def test_masks_stage_masks_every_key_of_the_shards_and_rejects_an_unknown_split(tmp_path):
    val_keys = [["val-000000-00000", "val-000000-00001"], ["val-000001-00000"]]
    shards = _fake_shards(tmp_path / "shards", {"train": [["train-000000-00000"]], "val": val_keys}, size=32)
    params = load_params([REPO / "params.yaml"], ["tracking.enabled=false", "masks.splits=[val]"])
    summary = masks_stage.run(params, shards, tmp_path / "masks")
    assert str(tmp_path / "masks" / "masks.png") in summary
    manifest = json.loads((tmp_path / "masks" / "manifest.json").read_text())
    assert manifest["size"] == 32 and list(manifest["splits"]) == ["val"]
    assert sorted(p.stem for p in (tmp_path / "masks" / "val" / "box").iterdir()) == [k for s in val_keys for k in s]
    params = load_params([REPO / "params.yaml"], ["tracking.enabled=false", "masks.splits=[valid]"])
    with pytest.raises(ConfigError, match="masks.splits: unknown split 'valid'"):  # before any file is read
        masks_stage.run(params, shards, tmp_path / "masks2")
    assert not (tmp_path / "masks2").exists()


# ---------------------------------------------------------------------------------- user files


def test_user_mask_generates_centred_crops_or_reads_the_file_named_like_the_image(cfg, tmp_path):
    box = user_mask("box", Path("photo.jpg"), (40, 60), cfg, seed=0, index=0)
    expected_box = np.ones((40, 60), np.uint8)
    expected_box[4:36, 6:54] = 0  # 0.8 of the height by 0.8 of the width: a visible margin on every side
    assert cfg.box_fraction == 0.8 and np.array_equal(box, expected_box)
    assert np.array_equal(box_mask(60, cfg.box_fraction), user_mask("box", Path("sq.png"), (60, 60), cfg, seed=0,
                                                                    index=0))  # square: the evaluation box
    large = user_mask("large", Path("photo.jpg"), (60, 40), cfg, seed=3, index=1)
    assert large.shape == (60, 40) and np.array_equal(large, user_mask("large", Path("x"), (60, 40), cfg, seed=3, index=1))
    assert not np.array_equal(large, user_mask("large", Path("x"), (60, 40), cfg, seed=3, index=2))
    hole = np.zeros((8, 12), np.uint8)
    hole[2:6, 3:9] = 255  # white = hole
    Image.fromarray(hole).save(tmp_path / "photo.png")
    expected = (hole == 0).astype(np.uint8)
    assert np.array_equal(user_mask(str(tmp_path), Path("in/photo.jpg"), (8, 12), cfg, seed=0, index=0), expected)
    assert np.array_equal(user_mask(str(tmp_path / "photo.png"), Path("any.jpg"), (8, 12), cfg, seed=0, index=0,
                                    hole_is_white=False), 1 - expected)
    with pytest.raises(ValueError, match="no mask named other"):
        user_mask(str(tmp_path), Path("other.jpg"), (8, 12), cfg, seed=0, index=0)


@pytest.fixture
def square():
    """(16, 16) with 1 = visible: a hole in the top-left quarter."""
    mask = np.ones((16, 16), np.uint8)
    mask[:8, :8] = 0
    return mask


def test_load_mask_polarity(square, tmp_path):
    white_hole, white_visible = tmp_path / "lama.png", tmp_path / "mat.png"
    Image.fromarray((1 - square) * 255).save(white_hole)
    Image.fromarray(square * 255).save(white_visible)
    assert np.array_equal(load_mask(white_hole), square)
    assert np.array_equal(load_mask(white_hole, hole_is_white=True), square)
    assert np.array_equal(load_mask(white_visible, hole_is_white=False), square)
    assert np.array_equal(load_mask(white_visible), 1 - square)


@pytest.mark.parametrize("mode", ["RGB", "RGBA", "P", "1"])
def test_load_mask_accepts_other_modes(square, tmp_path, mode):
    path = tmp_path / f"mask-{mode}.png"
    Image.fromarray((1 - square) * 255).convert(mode).save(path)
    assert np.array_equal(load_mask(path, size=(16, 16)), square)


def test_load_mask_thresholds_grey_values_with_a_warning(square, tmp_path):
    grey = np.where(square == 1, 10, 230).astype(np.uint8)  # white-ish hole, as a JPEG would blur it
    grey[0, 0], grey[-1, -1] = 129, 127  # either side of the threshold
    path = tmp_path / "blurred.png"
    Image.fromarray(grey).save(path)
    with pytest.warns(UserWarning, match="blurred.png"):
        mask = load_mask(path)
    assert np.array_equal(mask, square)


def test_load_mask_errors_name_the_file(square, tmp_path):
    path = tmp_path / "small.png"
    Image.fromarray(square * 255).save(path)
    with pytest.raises(ValueError, match="small.png.*16x16.*32x32"):
        load_mask(path, size=(32, 32))
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not an image")
    with pytest.raises(ValueError, match="broken.png"):
        load_mask(broken)
    with pytest.raises(ValueError, match="missing.png"):
        load_mask(tmp_path / "missing.png")
