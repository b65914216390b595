"""Ingest: every kind of input file is either sharded correctly or skipped with its reason."""

from __future__ import annotations

import io
import json
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import skimage.data
from PIL import Image

from conftest import REPO, data_config, shared_data, venv_bin
from latent_inpaint.data.images import decode, load_rgb, resize_center_crop
from latent_inpaint.data import ingest
from latent_inpaint.data.ingest import DataError, prepare, split_keys

SIZE = 32


def shard_images(out: Path, split: str) -> dict[str, np.ndarray]:
    """source name -> decoded image, read back from the shards of a split."""
    images = {}
    for tar_path in sorted((out / split).glob("*.tar")):
        with tarfile.open(tar_path) as tar:
            members = {m.name: tar.extractfile(m).read() for m in tar}
        for name, data in members.items():
            if name.endswith(".png"):
                meta = json.loads(members[name[:-4] + ".json"])
                images[meta["source"]] = decode(data)
    return images


def all_images(out: Path) -> dict[str, np.ndarray]:
    return {k: v for split in ("train", "val", "test") for k, v in shard_images(out, split).items()}


def expected(im: Image.Image) -> np.ndarray:
    return np.asarray(resize_center_crop(im.convert("RGB"), SIZE))


@pytest.fixture()
def odd_folder(tmp_path) -> Path:
    """A folder with one of every awkward input a user's photo collection holds."""
    root = tmp_path / "photos"
    (root / "nested" / "deeper").mkdir(parents=True)
    astronaut = Image.fromarray(skimage.data.astronaut())
    astronaut.save(root / "good.jpg", quality=95)
    buf = io.BytesIO()
    astronaut.save(buf, format="JPEG", quality=95)
    (root / "truncated.jpg").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    (root / "notes.jpg").write_text("this is a text file with an image extension\n")
    Image.new("RGB", (1, 1), (10, 20, 30)).save(root / "tiny.png")
    astronaut.convert("CMYK").save(root / "cmyk.jpg", quality=95)
    camera16 = skimage.data.camera().astype(np.uint16) * 257  # full 16-bit range
    Image.fromarray(camera16).save(root / "nested" / "gray16.png")
    rgba = np.dstack([skimage.data.coffee(), np.full(skimage.data.coffee().shape[:2], 255, np.uint8)])
    rgba[:, :300, 3] = 0  # transparent left half
    Image.fromarray(rgba, "RGBA").save(root / "nested" / "alpha.png")
    chelsea = Image.fromarray(skimage.data.chelsea())
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to display
    chelsea.save(root / "nested" / "deeper" / "rotated.jpg", quality=95, exif=exif.tobytes())
    chelsea.convert("P", palette=Image.Palette.ADAPTIVE).save(root / "nested" / "palette.png")
    chelsea.save(root / "nested" / "cat.webp", quality=95)
    chelsea.save(root / "nested" / "cat.bmp")
    chelsea.save(root / "nested" / "cat.tiff")
    (root / "README.txt").write_text("not an image extension: ignored, not skipped\n")
    return root


def run(folder: Path, out: Path, *overrides: str) -> dict:
    cfg = data_config(f"data.size={SIZE}", "data.min_side=16", "data.shard_size=3", "data.workers=2", *overrides)
    return prepare(cfg, folder, out, progress=False)


def test_awkward_files_are_sharded_or_skipped_with_reason(odd_folder, tmp_path):
    manifest = run(odd_folder, tmp_path / "shards")
    skipped = {Path(s["path"]).name: s["reason"] for s in manifest["skipped"]}
    assert set(skipped) == {"truncated.jpg", "notes.jpg", "tiny.png"}
    assert "truncated" in skipped["truncated.jpg"]
    assert "not an image" in skipped["notes.jpg"]
    assert "too small: 1x1" in skipped["tiny.png"]
    assert manifest["found"] == 12 and manifest["written"] == 9
    assert sum(s["images"] for s in manifest["splits"].values()) == 9

    images = all_images(tmp_path / "shards")
    assert set(images) == {
        "good.jpg", "cmyk.jpg", "nested/gray16.png", "nested/alpha.png", "nested/deeper/rotated.jpg",
        "nested/palette.png", "nested/cat.webp", "nested/cat.bmp", "nested/cat.tiff",
    }
    for img in images.values():
        assert img.shape == (SIZE, SIZE, 3) and img.dtype == np.uint8

    def close(a, b, tol=6.0):
        return np.abs(a.astype(float) - b.astype(float)).mean() < tol

    reference = expected(Image.open(odd_folder / "good.jpg"))
    assert close(images["good.jpg"], reference)
    assert close(images["cmyk.jpg"], reference, tol=10.0)  # CMYK round trip, not inverted colours
    camera = expected(Image.fromarray(skimage.data.camera()))
    assert close(images["nested/gray16.png"], camera, tol=2.0)  # 16-bit scaled down, not clipped white
    alpha = images["nested/alpha.png"]
    assert alpha[:, :4].min() >= 250  # transparent pixels become white, not black
    upright = expected(Image.fromarray(skimage.data.chelsea()).transpose(Image.Transpose.ROTATE_270))
    assert close(images["nested/deeper/rotated.jpg"], upright)  # EXIF orientation applied
    assert not close(images["nested/deeper/rotated.jpg"], expected(Image.fromarray(skimage.data.chelsea())))


def test_split_is_deterministic_and_shards_are_byte_identical(odd_folder, tmp_path):
    first = run(odd_folder, tmp_path / "a")
    second = run(odd_folder, tmp_path / "b")
    assert first["splits"] == second["splits"]
    assert all(first["splits"][s]["images"] >= 1 for s in ("train", "val", "test"))
    for split in ("train", "val", "test"):
        for shard in first["splits"][split]["shards"]:
            assert (tmp_path / "a" / shard["path"]).read_bytes() == (tmp_path / "b" / shard["path"]).read_bytes()
    keys = split_keys(tmp_path / "a", "train")
    assert len(keys) == first["splits"]["train"]["images"] and len(set(keys)) == len(keys)
    assert all("." not in k for k in keys)  # WebDataset cuts keys at the first dot
    read = ingest.shard_images(tmp_path / "a", "train", limit=len(keys) + 5)
    assert [k for k, _ in read] == keys  # every image once, in split_keys order
    assert sorted(im.tobytes() for _, im in read) == sorted(
        im.tobytes() for im in shard_images(tmp_path / "a", "train").values())
    assert [k for k, _ in ingest.shard_images(tmp_path / "a", "train", limit=2)] == keys[:2]


def test_interrupted_run_resumes_without_redoing_finished_shards(odd_folder, tmp_path):
    out = tmp_path / "shards"
    full = run(odd_folder, out)
    shards = [s["path"] for split in full["splits"].values() for s in split["shards"]]
    before = {p: (out / p).read_bytes() for p in shards}
    # A run killed part-way: one shard never written, another left as a partial temp file.
    (out / "manifest.json").unlink()
    (out / shards[0]).unlink()
    partial = (out / shards[1]).with_name(f".{Path(shards[1]).name}.tmp123")
    partial.write_bytes(b"partial")
    mtimes = {p: (out / p).stat().st_mtime_ns for p in shards[1:]}
    resumed = run(odd_folder, out)
    assert resumed["resumed_shards"] == len(shards) - 1
    assert {p: (out / p).stat().st_mtime_ns for p in shards[1:]} == mtimes
    assert {p: (out / p).read_bytes() for p in shards} == before
    assert not partial.exists()
    # A changed image setting invalidates every shard; a new layout removes the old shards.
    assert run(odd_folder, out, "data.size=48")["resumed_shards"] == 0
    run(odd_folder, out, "data.size=48", "data.shard_size=100")
    assert sorted(p.name for p in (out / "train").glob("*.tar")) == ["train-000000.tar"]


def test_nothing_usable_is_an_error_naming_the_folder(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError, match="no image files .* found under .*empty"):
        run(empty, tmp_path / "out")
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "a.jpg").write_text("text")
    (bad / "b.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    Image.new("RGB", (4, 4)).save(bad / "c.png")
    with pytest.raises(DataError, match=r"no usable image under .*bad: all 3 files skipped"):
        run(bad, tmp_path / "out")
    assert not (tmp_path / "out" / "manifest.json").exists()


def test_user_train_val_test_folders_are_the_split(tmp_path):
    root = tmp_path / "ds"
    for split, n in (("train", 4), ("val", 2), ("test", 3)):
        (root / split).mkdir(parents=True)
        for i in range(n):
            Image.new("RGB", (40, 48), (i * 40, 0, 0)).save(root / split / f"{i}.png")
    manifest = run(root, tmp_path / "out")
    assert {s: v["images"] for s, v in manifest["splits"].items()} == {"train": 4, "val": 2, "test": 3}


def test_places365_layout_uses_the_official_lists(tmp_path):
    root = tmp_path / "places"
    lists = root / "filelist_places365-standard"
    lists.mkdir(parents=True)
    train_names = [f"/a/airfield/{i:08d}.jpg" for i in range(1, 11)]
    for name in train_names:
        path = root / "data_256" / name.lstrip("/")
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (40, 40), (100, 0, 0)).save(path)
    (root / "val_256").mkdir()
    for i in (1, 2, 3):
        Image.new("RGB", (40, 40), (0, 100, 0)).save(root / "val_256" / f"Places365_val_{i:08d}.jpg")
    (lists / "places365_train_standard.txt").write_text("".join(f"{n} 0\n" for n in train_names))
    (lists / "places365_val.txt").write_text(
        "".join(f"Places365_val_{i:08d}.jpg 165\n" for i in (1, 2, 3, 4))  # 4 is listed but absent
    )
    # val holds data.val_images images of the training list; val_fraction plays no part.
    manifest = run(root, tmp_path / "out", "data.layout=places365", "data.val_images=2", "data.val_fraction=0.5")
    assert {s: v["images"] for s, v in manifest["splits"].items()} == {"train": 8, "val": 2, "test": 3}
    assert [Path(s["path"]).name for s in manifest["skipped"]] == ["Places365_val_00000004.jpg"]
    assert "listed in places365_val.txt but missing" in manifest["skipped"][0]["reason"]
    assert set(shard_images(tmp_path / "out", "test")) == {f"Places365_val_{i:08d}.jpg" for i in (1, 2, 3)}


def test_celebahq_split_file_with_and_without_mapping(tmp_path):
    root = tmp_path / "celebahq" / "CelebA-HQ-img"
    root.mkdir(parents=True)
    for i in range(6):
        Image.new("RGB", (64, 64), (0, 0, 40 * i)).save(root / f"{i}.jpg")
    split_file = tmp_path / "split.txt"
    split_file.write_text("0.jpg train\n1.jpg train\n2.jpg train\n3.jpg val\n4.jpg test\n5.jpg test\n")
    manifest = run(root.parent, tmp_path / "a", "data.layout=celebahq", f"data.lists={split_file}")
    assert {s: v["images"] for s, v in manifest["splits"].items()} == {"train": 3, "val": 1, "test": 2}

    # CelebAMask-HQ: CelebA's partition file plus the HQ-to-CelebA index mapping. The paper's
    # evaluation set (2,993 images) is CelebA's validation partition (1): it is our test split.
    partition = tmp_path / "list_eval_partition.txt"
    partition.write_text("".join(f"{100 + i:06d}.jpg {s}\n" for i, s in enumerate([0, 0, 1, 2, 2, 2])))
    mapping = tmp_path / "CelebA-HQ-to-CelebA-mapping.txt"
    mapping.write_text("idx orig_idx orig_file\n" + "".join(f"{i} {99 + i} {100 + i:06d}.jpg\n" for i in range(6)))
    manifest = run(root.parent, tmp_path / "b", "data.layout=celebahq", f"data.lists={partition}",
                   f"data.celebahq_mapping={mapping}")
    assert {s: v["images"] for s, v in manifest["splits"].items()} == {"train": 2, "val": 3, "test": 1}
    assert set(shard_images(tmp_path / "b", "test")) == {"2.jpg"}  # CelebA partition 1

    split_file.write_text("0.jpg somewhere\n")
    with pytest.raises(DataError, match="split.txt: line '0.jpg somewhere'"):
        run(root.parent, tmp_path / "c", "data.layout=celebahq", f"data.lists={split_file}")


def test_load_rgb_reports_the_reason():
    from latent_inpaint.data.images import SkipImage

    with pytest.raises(SkipImage, match="cannot decode"):
        load_rgb(Path("/nonexistent/file.png"))


def test_cli_prepare_and_its_errors(odd_folder, tmp_path):
    env = {"PATH": venv_bin(), "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'm.db'}"}
    cmd = [sys.executable, "-m", "latent_inpaint.cli", "prepare", "--quiet", "--out", str(tmp_path / "s"),
           "--params", str(REPO / "params.yaml"), "--set", f"data.size={SIZE}", "--set", "data.min_side=16"]
    ok = subprocess.run(cmd + ["--source", str(odd_folder)], capture_output=True, text=True, env=env, cwd=tmp_path,
                        check=False)
    assert ok.returncode == 0, ok.stderr
    assert "9 images sharded" in ok.stdout and "3 skipped" in ok.stdout and "truncated.jpg" in ok.stdout
    missing = subprocess.run(cmd + ["--source", str(tmp_path / "nope")], capture_output=True, text=True, env=env,
                             cwd=tmp_path, check=False)
    assert missing.returncode == 1 and "nope is not a folder" in missing.stderr
    assert "Traceback" not in missing.stderr
    typo = subprocess.run(cmd + ["--set", "data.sise=3"], capture_output=True, text=True, env=env, cwd=tmp_path,
                          check=False)
    assert typo.returncode == 2 and "unknown key 'sise'" in typo.stderr
    # Outside a project folder the package's defaults serve, and a command that writes data says so.
    packaged = subprocess.run(cmd[:7] + ["--source", str(odd_folder)], capture_output=True, text=True, env=env,
                              cwd=tmp_path, check=False)
    assert packaged.returncode == 0, packaged.stderr
    assert f"no params.yaml in {tmp_path}: using the package's defaults" in packaged.stderr


def test_real_photographs_from_shared_data(tmp_path):
    """../shared/data/scenes: RGB, L, RGBA and a 16-bit RGBA PNG among real photographs."""
    scenes = shared_data("scenes")
    manifest = run(scenes, tmp_path / "out", "data.min_side=64")
    images = all_images(tmp_path / "out")
    assert manifest["written"] == len(images) >= 30
    sixteen = images["Real-ESRGAN_inputs/tree_alpha_16bit.png"]
    assert 20 < sixteen.mean() < 250 and sixteen.std() > 10  # a picture, not a blank
