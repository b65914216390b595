"""`latent-inpaint inpaint`: every output keeps the visible pixels, and every bad input gets a
clear message while the other files of the folder are still processed.

The four parts are seeded, untrained models saved in the layout training writes (a stand-in
for a trained run: the behaviour tested here does not depend on what the weights learned)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import REPO, params, venv_bin
from latent_inpaint.config import SampleConfig, section, to_dict
from latent_inpaint.decoder import InpaintDecoder
from latent_inpaint.encoder import build_encoder
from latent_inpaint.pipeline import Inpainter
from latent_inpaint.train import export_final
from latent_inpaint.transformer import BidirectionalTransformer
from latent_inpaint.vqgan import VQModel

SIZE = 32


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("runs")
    p = params(f"data.size={SIZE}")
    vq, enc, tf = section(p, "vqgan"), section(p, "encoder"), section(p, "transformer")
    torch.manual_seed(0)
    vqgan = VQModel(vq, SIZE)
    encoder = build_encoder("restrictive", vq, enc, SIZE)
    grid = SIZE // vqgan.factor
    transformer = BidirectionalTransformer(tf, vqgan.quantize.embedding.weight.detach(), grid)
    decoder = InpaintDecoder(vq, SIZE)
    export_final(root / "vqgan", "vqgan", {"vqgan": to_dict(vq), "resolution": SIZE}, {"vqgan": vqgan}, "test")
    export_final(root / "encoder", "encoder", {"kind": "restrictive", "vqgan": to_dict(vq), "encoder": to_dict(enc),
                                                "resolution": SIZE}, {"encoder": encoder}, "test")
    export_final(root / "transformer", "transformer", {"transformer": to_dict(tf), "n_embed": vq.n_embed, "grid": grid},
                 {"transformer": transformer}, "test")
    export_final(root / "decoder", "decoder", {}, {"decoder": decoder}, "test")
    return root


def photo(h: int, w: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    base = np.stack([xx * 255 / w, yy * 255 / h, (xx + yy) * 127 / (h + w)], -1)
    return np.clip(base + rng.normal(0, 10, (h, w, 3)), 0, 255).astype(np.uint8)


def test_samples_keep_every_visible_pixel_at_any_size_and_differ(runs):
    model = Inpainter.from_runs(runs)
    image = photo(45, 70)  # odd size and aspect
    mask = np.ones((45, 70), np.uint8)
    mask[5:42, 8:62] = 0  # large enough to hide whole tokens at the model size
    cfg = SampleConfig(steps=3, temperature=1.0, anneal=0.9, samples=3, seed=0)
    out = model.inpaint(image, mask, cfg, samples=3, seed=0)
    assert len(out) == 3 and all(o.shape == image.shape and o.dtype == np.uint8 for o in out)
    for o in out:
        assert np.array_equal(o[mask == 1], image[mask == 1])  # bit-identical outside the hole
    assert not np.array_equal(out[0], out[1])  # a new draw per sample
    again = model.inpaint(image, mask, cfg, samples=3, seed=0)
    assert all(np.array_equal(a, b) for a, b in zip(out, again))  # same seed, same samples
    untouched = model.inpaint(image, np.ones_like(mask), cfg, samples=2, seed=0)
    assert all(np.array_equal(u, image) for u in untouched)


def run_cli(*args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "latent_inpaint.cli", "inpaint", *args, "--params", str(REPO / "params.yaml"),
           "--set", "tracking.enabled=false", "--set", f"data.size={SIZE}"]
    return subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PATH": venv_bin()}, check=False)


def test_cli_handles_each_bad_input_and_processes_the_rest(runs, tmp_path):
    images, masks = tmp_path / "images", tmp_path / "masks"
    images.mkdir()
    masks.mkdir()
    for name, (h, w) in {"good": (40, 40), "nohole": (40, 40), "allhole": (40, 40), "grey": (40, 48),
                         "mismatch": (40, 40)}.items():
        Image.fromarray(photo(h, w)).save(images / f"{name}.png")
    (images / "unreadable.jpg").write_text("not an image")
    hole = np.zeros((40, 40), np.uint8)
    hole[10:25, 10:25] = 255  # white = hole (the default convention)
    Image.fromarray(hole).save(masks / "good.png")
    Image.fromarray(np.zeros((40, 40), np.uint8)).save(masks / "nohole.png")
    Image.fromarray(np.full((40, 40), 255, np.uint8)).save(masks / "allhole.png")
    grey = np.zeros((40, 48), np.uint8)
    grey[5:20, 5:20] = 255
    Image.fromarray(grey).save(masks / "grey.jpg", quality=70)  # JPEG: grey values at the edges
    Image.fromarray(np.zeros((30, 30), np.uint8)).save(masks / "mismatch.png")
    Image.fromarray(np.zeros((40, 40), np.uint8)).save(masks / "unreadable.png")

    out = tmp_path / "out"
    done = run_cli(str(images), "--mask", str(masks), "--runs", str(runs), "--samples", "2", "--steps", "2",
                   "--out", str(out))
    assert done.returncode == 1 and "2 of 6 images failed" in done.stderr and "Traceback" not in done.stderr
    report = json.loads((out / "settings.json").read_text())["images"]
    status = {Path(k).stem: v for k, v in report.items()}
    assert status["good"]["status"] == "2 samples"
    assert status["nohole"]["status"].startswith("unchanged")
    assert "unconditional" in " ".join(status["allhole"]["notes"])
    assert "thresholded" in " ".join(status["grey"]["notes"])
    assert "mismatch.png is 30x30" in status["mismatch"]["error"] and "expected 40x40" in status["mismatch"]["error"]
    assert "unreadable.jpg" in status["unreadable"]["error"]
    good = np.asarray(Image.open(out / "good" / "sample_00.png"))
    original = np.asarray(Image.open(images / "good.png"))
    assert np.array_equal(good[hole == 0], original[hole == 0])
    assert Image.open(out / "good" / "grid.png").size[0] > 4 * 40  # input | masked | 2 samples
    unchanged = np.asarray(Image.open(out / "nohole" / "sample_00.png"))
    assert np.array_equal(unchanged, np.asarray(Image.open(images / "nohole.png")))


def test_generated_masks_and_missing_runs(runs, tmp_path):
    Image.fromarray(photo(50, 64)).save(tmp_path / "one.png")
    done = run_cli(str(tmp_path / "one.png"), "--mask", "large", "--runs", str(runs), "--samples", "1",
                   "--out", str(tmp_path / "out"))
    assert done.returncode == 0, done.stderr
    assert json.loads((tmp_path / "out/settings.json").read_text())["settings"]["mask"] == "large"
    missing = run_cli(str(tmp_path / "one.png"), "--runs", str(tmp_path / "nowhere"), "--out", str(tmp_path / "o2"))
    assert missing.returncode == 1 and "config.json is missing" in missing.stderr
