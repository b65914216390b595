"""The encoder-claim measurement: its token set, its statistics, and the whole command on a
handful of generated pictures (the real run is benchmarks/encoder_claim.py)."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import REPO, params
from latent_inpaint.config import section
from latent_inpaint.encoder import STRIDE1_RULES
from latent_inpaint.evaluate.encoder_claim import (
    VQGAN_ON_MASKED, ClaimSettings, hits, markdown, measure, methods, pooled, summarise,
)


def test_claim_tokens_are_visible_tokens_with_a_hole_pixel_in_their_block():
    """f = 4, a 8x8 image: token (0, 0) has one hole pixel (kept at alpha 0.5), token (0, 1) is
    all hole, tokens (1, 0) and (1, 1) are untouched."""
    mask = torch.ones(1, 1, 8, 8)
    mask[..., 0, 0] = 0
    mask[..., 0:4, 4:8] = 0
    tokens = torch.zeros(1, 2, 2, dtype=torch.long)
    out = hits(lambda x, m: torch.zeros(1, 2, 2, dtype=torch.long), torch.zeros(1, 3, 8, 8), mask, tokens, 0.5, 4, 8)
    assert out["claim_count"].tolist() == [1] and out["claim_right"].tolist() == [1]
    assert out["visible_count"].tolist() == [3]
    wrong = hits(lambda x, m: torch.ones(1, 2, 2, dtype=torch.long), torch.zeros(1, 3, 8, 8), mask, tokens, 0.5, 4, 8)
    assert wrong["claim_right"].tolist() == [0] and wrong["visible_right"].tolist() == [0]


def test_summary_pools_tokens_averages_seeds_and_pairs_the_difference():
    rng = np.random.default_rng(0)
    count = rng.integers(1, 20, size=(2, 50))  # (seeds, images)
    good = {"claim_right": count.copy(), "claim_count": count}  # always right
    half = {"claim_right": count // 2, "claim_count": count}
    table = summarise({"good": good, "half": half}, "claim", ("good", "half"), n_boot=200)
    assert table["good"]["accuracy"] == 1.0 and table["good"]["ci95"] == [1.0, 1.0]
    assert table["good"]["minus_good"] == 0.0 and table["good"]["minus_good_ci95"] == [0.0, 0.0]
    expected = pooled(half["claim_right"], count).mean()
    assert table["half"]["accuracy"] == pytest.approx(expected)
    lo, hi = table["half"]["ci95"]
    assert lo <= expected <= hi and hi - lo > 0
    dlo, dhi = table["half"]["minus_good_ci95"]
    assert dlo <= table["half"]["minus_good"] <= dhi < 0
    assert table["half"]["tokens_per_seed"] == int(count[0].sum())
    assert table["good"]["minus_half"] == pytest.approx(-table["half"]["minus_good"])


def test_methods_are_every_rule_the_vanilla_encoder_and_the_vqgan_on_the_masked_image():
    assert methods(STRIDE1_RULES) == [f"restrictive_{r}" for r in STRIDE1_RULES] + ["vanilla", VQGAN_ON_MASKED]


@pytest.fixture(scope="module")
def pictures(tmp_path_factory):
    folder = tmp_path_factory.mktemp("pictures")
    rng = np.random.default_rng(0)
    for i in range(10):
        yy, xx = np.mgrid[0:40, 0:40] / 39
        image = np.stack([xx * rng.random(), yy * rng.random(), (xx + yy) / 2], -1) * 255
        Image.fromarray(image.round().astype(np.uint8)).save(folder / f"{i}.png")
    return folder


def test_measure_scores_every_method_for_every_seed(pictures):
    p = params()
    settings = ClaimSettings(size=32, images=10, eval_images=4, vqgan_steps=2, encoder_steps=2, batch_size=2,
                             lr=1e-3, seeds=(0, 1), bootstrap=50, threads=1)
    result = measure(pictures, section(p, "vqgan"), section(p, "encoder"), section(p, "masks"), settings,
                     log=lambda line: None)
    for tokens in ("claim_tokens", "visible_tokens"):
        table = result[tokens]
        assert list(table) == methods(STRIDE1_RULES)
        for row in table.values():
            assert len(row["per_seed"]) == 2 and 0 <= row["accuracy"] <= 1
            assert row["ci95"][0] <= row["accuracy"] <= row["ci95"][1]
    assert result["claim_tokens"][VQGAN_ON_MASKED]["per_seed"][0] == result["claim_tokens"][VQGAN_ON_MASKED]["per_seed"][1]
    assert result["seconds"] > 0
    text = markdown(result)
    assert all(f"| {m} |" in text for m in methods(STRIDE1_RULES))


def test_benchmark_command_writes_json_and_markdown(pictures, tmp_path):
    out = tmp_path / "claim"
    run = subprocess.run(
        [sys.executable, str(REPO / "benchmarks/encoder_claim.py"), "--folder", str(pictures), "--size", "32",
         "--images", "6", "--eval-images", "2", "--vqgan-steps", "1", "--encoder-steps", "1", "--batch-size", "2",
         "--seeds", "0", "--rules", "centre", "--threads", "1", "--out", str(out)],
        capture_output=True, text=True, check=False, cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    result = json.loads(out.with_suffix(".json").read_text())
    assert list(result["claim_tokens"]) == ["restrictive_centre", "vanilla", VQGAN_ON_MASKED]
    assert "| restrictive_centre |" in out.with_suffix(".md").read_text()
