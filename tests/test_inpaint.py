"""`latent-inpaint inpaint`: every output keeps the visible pixels, and every bad input gets a
clear message while the other files of the folder are still processed.

The four parts are seeded, untrained models saved in the layout training writes (a stand-in
for a trained run: the behaviour tested here does not depend on what the weights learned)."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import REPO, params, seeded_runs, venv_bin
from latent_inpaint.config import SampleConfig, section
from latent_inpaint.decoder import VanillaDecoder
from latent_inpaint.encoder import MiracleEncoder
from latent_inpaint.inpaint import Inpainter
from latent_inpaint.stages.inpaint import inpaint_files
from latent_inpaint.sampler import sample, sample_official
from latent_inpaint.stages.evaluate import parse_variant

SIZE = 32


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    return seeded_runs(tmp_path_factory.mktemp("runs"), SIZE)


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
    cfg = SampleConfig(steps=3, temperature=1.0, anneal=0.9, samples=3, seed=0, sampler="ours",
                       batch_size=8, precision="auto")
    out = model.inpaint(image, mask, cfg, samples=3, seed=0)
    assert len(out) == 3 and all(o.shape == image.shape and o.dtype == np.uint8 for o in out)
    for o in out:
        assert np.array_equal(o[mask == 1], image[mask == 1])  # bit-identical outside the hole
    assert not np.array_equal(out[0], out[1])  # a new draw per sample
    again = model.inpaint(image, mask, cfg, samples=3, seed=0)
    assert all(np.array_equal(a, b) for a, b in zip(out, again))  # same seed, same samples
    untouched = model.inpaint(image, np.ones_like(mask), cfg, samples=2, seed=0)
    assert all(np.array_equal(u, image) for u in untouched)


def sample_cfg(**changes) -> SampleConfig:
    return dataclasses.replace(section(params(), "sample"), steps=3, **changes)


def boxes(shape: tuple[int, int], *holes: tuple[slice, slice]) -> np.ndarray:
    mask = np.ones(shape, np.uint8)
    for hole in holes:
        mask[hole] = 0
    return mask


def model_inputs() -> tuple[torch.Tensor, torch.Tensor]:
    """Three images at the model size with three different holes: (3, 3, S, S), (3, 1, S, S)."""
    x = torch.rand(3, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(1)) * 2 - 1
    mask = torch.ones(3, 1, SIZE, SIZE)
    mask[0, :, 4:28, 4:28] = 0
    mask[1, :, :, 16:] = 0
    mask[2, :, 8:24, 0:12] = 0
    return x, mask


def test_many_images_at_once_give_each_image_alones_samples(runs):
    """Every sample of every image in shared transformer and decoder batches (sizes, masks and
    chunks mixed: 3 samples per image, 4 rows per batch) equals the image inpainted alone."""
    model = Inpainter.from_runs(runs, "cpu")
    images = [photo(45, 70, 1), photo(32, 32, 2), photo(40, 28, 3), photo(50, 50, 4)]
    masks = [boxes((45, 70), np.s_[5:42, 8:62]), boxes((32, 32), np.s_[:, 16:]), np.ones((40, 28), np.uint8),
             boxes((50, 50), np.s_[10:30, 0:20], np.s_[35:45, 30:50])]
    cfg = sample_cfg(batch_size=4)
    many = model.inpaint_many(images, masks, cfg, samples=3, seeds=[0, 10, 20, 30])
    assert [len(results) for results in many] == [3, 3, 3, 3]
    for image, mask, seed, results in zip(images, masks, [0, 10, 20, 30], many):
        alone = model.inpaint(image, mask, dataclasses.replace(cfg, batch_size=8), samples=3, seed=seed)
        assert all(np.array_equal(a, b) for a, b in zip(results, alone))
    assert all(np.array_equal(r, images[2]) for r in many[2])  # nothing to fill
    with pytest.raises(ValueError, match="one mask and one seed per image"):
        model.inpaint_many(images, masks, cfg, samples=3, seeds=[0])


def test_batched_tokens_and_pixels_equal_one_sample_at_a_time(runs):
    """`draw` and `decode` over rows of several images (the first sampling step once per image,
    the encoder and E_prt once per image) give the tokens and pixels of each row sampled alone
    through the unshared path: the encoder, the sampler and the whole decoder per sample."""
    model = Inpainter.from_runs(runs, "cpu")
    cfg = sample_cfg()
    x, mask = model_inputs()
    enc = model.encode(x, mask, cfg)
    rows, seeds = torch.tensor([0, 0, 1, 1, 1, 2]), [7, 8, 7, 8, 9, 4]
    tokens = model.draw(enc, rows, seeds, cfg)
    pixels = model.decode(enc, rows, tokens, cfg)
    for r, (image, seed) in enumerate(zip(rows.tolist(), seeds)):
        xi, mi = x[image:image + 1], mask[image:image + 1]
        logits, m_hat = model.encoder(xi, mi)
        alone = sample(model.transformer, logits.argmax(1).flatten(1), m_hat.flatten(1), steps=cfg.steps,
                       temperature=cfg.temperature, anneal=cfg.anneal, seeds=[seed])
        assert torch.equal(tokens[r], alone[0])
        composite, _ = model.decoder(xi * mi, mi, model.vqgan.quantize.lookup(alone.view(1, *m_hat.shape[1:])), m_hat)
        assert torch.equal(pixels[r], (xi * mi + composite * (1 - mi))[0])  # the code before batching
    assert not torch.equal(tokens[0], tokens[1])


def test_the_authors_sampler_when_chosen(runs):
    """sample.sampler official: each image's samples through sampler.sample_official as one batch,
    the global generator seeded with the first sample's seed."""
    model = Inpainter.from_runs(runs, "cpu")
    cfg = sample_cfg(sampler="official")
    x, mask = model_inputs()
    enc = model.encode(x, mask, cfg)
    rows, seeds = torch.tensor([0, 0, 1, 1, 1]), [5, 6, 9, 10, 11]
    tokens = model.draw(enc, rows, seeds, cfg)
    visible = enc.token_mask.flatten(1).bool()
    for image, (start, stop) in zip((0, 1), ((0, 2), (2, 5))):
        torch.manual_seed(seeds[start])
        theirs = sample_official(model.transformer, enc.tokens[rows[start:stop]], visible[rows[start:stop]],
                                 steps=cfg.steps, temperature=cfg.temperature, anneal=cfg.anneal)
        assert torch.equal(tokens[start:stop], theirs)
    assert not torch.equal(tokens, model.draw(enc, rows, seeds, sample_cfg()))
    image, hole = photo(40, 30), boxes((40, 30), np.s_[10:30, 5:25])
    out = model.inpaint(image, hole, cfg, samples=2, seed=0)
    assert all(np.array_equal(o[hole == 1], image[hole == 1]) for o in out)
    with pytest.raises(ValueError, match="sample.sampler"):
        sample_cfg(sampler="theirs")


def test_reduced_precision_keeps_the_visible_pixels(runs):
    model = Inpainter.from_runs(runs, "cpu")
    image, hole = photo(40, 30), boxes((40, 30), np.s_[10:30, 5:25])
    out = model.inpaint(image, hole, sample_cfg(precision="bf16"), samples=2, seed=0)
    assert all(o.dtype == np.uint8 and np.array_equal(o[hole == 1], image[hole == 1]) for o in out)


def test_ablation_variants_load_the_parts_they_name(runs):
    full = Inpainter.from_runs(runs, "cpu")
    assert full.encoder.alpha == section(params(), "encoder").alpha
    options, sample = parse_variant("alpha0.25", section(params(), "sample"))
    assert Inpainter.from_runs(runs, "cpu", **options).encoder.alpha == 0.25  # same weights, another threshold
    assert parse_variant("t0.5", section(params(), "sample"))[1].temperature == 0.5
    miracle = Inpainter.from_runs(runs, "cpu", **parse_variant("miracle_encoder", sample)[0])
    assert isinstance(miracle.encoder, MiracleEncoder) and miracle.encoder.vqgan is miracle.vqgan
    vanilla = Inpainter.from_runs(runs, "cpu", **parse_variant("vanilla_decoder", sample)[0])
    assert isinstance(vanilla.decoder, VanillaDecoder) and vanilla.decoder.vqgan is vanilla.vqgan
    with pytest.raises(ValueError, match="unknown ablation 'tx'"):
        parse_variant("tx", sample)


def test_inpaint_files_writes_samples_grid_and_settings(runs, tmp_path):
    Image.fromarray(photo(36, 30)).save(tmp_path / "a.png")
    cfg = SampleConfig(steps=2, temperature=1.0, anneal=0.9, samples=2, seed=5, sampler="ours",
                       batch_size=8, precision="auto")
    seen = []
    report = inpaint_files(Inpainter.from_runs(runs, "cpu"), tmp_path / "a.png", tmp_path / "out", cfg,
                           section(params(), "masks"), mask="small", on_file=lambda path, outcome: seen.append(path))
    assert seen == [tmp_path / "a.png"] and report["images"][str(tmp_path / "a.png")]["status"] == "2 samples"
    assert report["settings"]["seed"] == 5 and report["settings"]["mask"] == "small"
    assert json.loads((tmp_path / "out" / "settings.json").read_text()) == report
    assert sorted(p.name for p in (tmp_path / "out" / "a.png").iterdir()) == ["grid.png", "sample_00.png", "sample_01.png"]


def run_cli(*args: str, cwd: Path = REPO, project_params: bool = True) -> subprocess.CompletedProcess:
    given = ["--params", str(REPO / "params.yaml"), "--set", f"data.size={SIZE}"] if project_params else []
    cmd = [sys.executable, "-m", "latent_inpaint.cli", "inpaint", *args, *given, "--set", "tracking.enabled=false"]
    return subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PATH": venv_bin()}, check=False,
                          cwd=cwd)


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
    good = np.asarray(Image.open(out / "good.png" / "sample_00.png"))
    original = np.asarray(Image.open(images / "good.png"))
    assert np.array_equal(good[hole == 0], original[hole == 0])
    assert Image.open(out / "good.png" / "grid.png").size[0] > 4 * 40  # input | masked | 2 samples
    unchanged = np.asarray(Image.open(out / "nohole.png" / "sample_00.png"))
    assert np.array_equal(unchanged, np.asarray(Image.open(images / "nohole.png")))


def test_generated_masks_and_missing_runs(runs, tmp_path):
    Image.fromarray(photo(50, 64)).save(tmp_path / "one.png")
    done = run_cli(str(tmp_path / "one.png"), "--mask", "large", "--runs", str(runs), "--samples", "1",
                   "--out", str(tmp_path / "out"))
    assert done.returncode == 0, done.stderr
    assert json.loads((tmp_path / "out/settings.json").read_text())["settings"]["mask"] == "large"
    missing = run_cli(str(tmp_path / "one.png"), "--runs", str(tmp_path / "nowhere"), "--out", str(tmp_path / "o2"))
    assert missing.returncode == 1 and "config.json is missing" in missing.stderr


def test_inpaint_works_outside_the_project_folder(runs, tmp_path):
    """No ./params.yaml and no --params: the sampling defaults come from the package."""
    Image.fromarray(photo(40, 40)).save(tmp_path / "photo.jpg")
    done = run_cli("photo.jpg", "--runs", str(runs), "--out", "out", cwd=tmp_path, project_params=False)
    assert done.returncode == 0, done.stderr
    assert "params.yaml" not in done.stderr  # no note: the outputs do not depend on which defaults served
    settings = json.loads((tmp_path / "out" / "settings.json").read_text())["settings"]
    assert settings["samples"] == section(params(), "sample").samples
    assert len(list((tmp_path / "out" / "photo.jpg").glob("sample_*.png"))) == settings["samples"]
