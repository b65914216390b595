"""Evaluation pieces on hand-made images. FID and LPIPS here run with stand-in (random) weights:
the tests check the arithmetic and the plumbing, not published numbers."""

from __future__ import annotations

import json
import math
from unittest import mock

import numpy as np
import pytest
import torch
from PIL import Image
from pytorch_fid.inception import InceptionV3

from conftest import params, seeded_runs
from latent_inpaint.config import section
from latent_inpaint.data.ingest import prepare, shard_images
from latent_inpaint.evaluate.baseline import biharmonic_inpaint
from latent_inpaint.evaluate.fid import FID, INCEPTION_FILE, FeatureStats
from latent_inpaint.weights import is_stand_in
from latent_inpaint.evaluate.metrics import (
    PSNR_CAP, diversity, diversity_summary, hole_l1, hole_psnr, ssim,
)
from latent_inpaint.evaluate.report import table_markdown, write_metrics_json
from latent_inpaint.losses import load_lpips
from latent_inpaint.masks import read_eval_mask
from latent_inpaint.stages import evaluate, masks


def gradients(n: int, size: int = 32) -> np.ndarray:
    """n smooth colour ramps, (n, size, size, 3) uint8."""
    yy, xx = np.mgrid[0:size, 0:size] / (size - 1)
    ramps = [np.stack([xx * a, yy * (1 - a), (xx + yy) / 2], -1) for a in np.linspace(0.2, 1.0, n)]
    return (np.stack(ramps) * 255).round().astype(np.uint8)


def noise(n: int, size: int = 32, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


@pytest.fixture(scope="module", autouse=True)
def _one_torch_thread():
    """On a shared 2-core machine torch's intra-op threads wait on each other: Inception and VGG
    forwards ran ~30x faster on one thread here. Restored for the other test modules."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def lpips_stand_in():
    return load_lpips("stand-in")


# ---------------------------------------------------------------------------------- FID


@pytest.mark.filterwarnings("ignore::scipy.linalg.LinAlgWarning")  # 8 samples < 64 dims: singular by design
def test_stand_in_fid_is_zero_for_a_set_against_itself_and_positive_between_different_sets():
    # Stand-in weights; dims=64 (pytorch-fid's first-block features) keeps the matrix square root
    # small: a 2048-dim one takes seconds to tens of seconds on a shared CPU.
    fid = FID("stand-in", batch_size=4, dims=64)
    smooth = fid.features(gradients(8))
    assert smooth.shape == (8, 64) and smooth.dtype == np.float64
    rough = fid.features(noise(8))
    assert fid.fid(smooth, smooth) == pytest.approx(0.0, abs=1e-3)
    assert fid.fid(smooth, rough) > 1.0
    assert np.array_equal(FID("stand-in", dims=64).features(gradients(8)), smooth)  # seeded: the same network
    # batches from an iterable give the features of the whole array
    assert np.allclose(fid.features([gradients(8)[:3], gradients(8)[3:]]), smooth, atol=1e-6)
    with pytest.raises(TypeError, match="uint8"):
        fid.features(gradients(2).astype(np.float32))
    with pytest.raises(ValueError, match="N >= 2"):
        fid.fid(smooth[:1], smooth)


@pytest.mark.filterwarnings("ignore::scipy.linalg.LinAlgWarning")  # pytorch-fid's sqrtm of a singular product
def test_fid_from_fewer_sets_than_dimensions_is_pytorch_fids_distance_without_the_large_square_root():
    from pytorch_fid.fid_score import calculate_frechet_distance

    from latent_inpaint.evaluate.fid import frechet_distance_low_rank

    rng = np.random.default_rng(0)
    a = np.abs(rng.normal(size=(6, 40)))
    for b in (a + 0.3 * rng.normal(size=(6, 40)), np.abs(rng.normal(size=(5, 40))) * 1.1 + 0.05):
        stats = [s for f in (a, b) for s in (f.mean(axis=0), np.cov(f, rowvar=False))]
        reference = calculate_frechet_distance(*stats)
        assert frechet_distance_low_rank(a, b) == pytest.approx(reference, rel=1e-4)
        assert FID.fid(a, b) == pytest.approx(reference, rel=1e-4)
    assert frechet_distance_low_rank(a, a) == pytest.approx(0.0, abs=1e-9)
    many = np.abs(rng.normal(size=(50, 8)))  # more sets than dimensions: pytorch-fid's own route
    stats = [s for f in (many, many[::-1] * 2) for s in (f.mean(axis=0), np.cov(f, rowvar=False))]
    assert FID.fid(many, many[::-1] * 2) == pytest.approx(calculate_frechet_distance(*stats), rel=1e-9)


@pytest.mark.filterwarnings("ignore::scipy.linalg.LinAlgWarning")  # 12 sets < 16 dims: singular by design
def test_feature_stats_from_batches_give_the_distance_of_the_whole_sets_in_memory_flat_in_their_number():
    rng = np.random.default_rng(1)
    dims = 16
    for n in (12, 16, 200):  # the low-rank regime, its edge (N = D), and the sums past it
        a, b = rng.normal(size=(n, dims)) + 3, rng.normal(size=(n, dims)) * 1.3 + 3.2
        stats = [FeatureStats(dims), FeatureStats(dims)]
        for start in range(0, n, 5):  # batches of 5
            for s, f in zip(stats, (a, b)):
                s.add(f[start : start + 5])
        assert stats[0].count == n
        assert FID.fid(*stats) == pytest.approx(FID.fid(a, b), rel=1e-9)
        mean, cov = stats[0].mean_cov()
        assert np.allclose(mean, a.mean(axis=0), rtol=1e-12) and np.allclose(cov, np.cov(a, rowvar=False), rtol=1e-9)
        # kept: the features while N <= D (the low-rank distance needs them), else a shift, a sum
        # and the sum of outer products: never more than D x (D + 2) numbers, whatever N
        held = [v.size for v in vars(stats[0]).values() if isinstance(v, np.ndarray)]
        held += [v.size for v in (stats[0]._rows or [])]
        assert sum(held) <= dims * (dims + 2)
        assert (stats[0].features is None) == (n > dims)
    with pytest.raises(ValueError, match="\\(B, 16\\)"):
        FeatureStats(dims).add(np.zeros((2, 8)))
    with pytest.raises(ValueError, match="N >= 2"):
        FID.fid(FeatureStats(dims).add(a[:1]), a)


def test_fid_loads_inception_weights_from_a_file_and_explains_a_missing_one(tmp_path, monkeypatch):
    before = torch.random.get_rng_state()
    stand_in = FID("stand-in", batch_size=2)
    assert torch.equal(torch.random.get_rng_state(), before)  # the seeded build leaves the caller's stream alone
    assert stand_in.inception_is_stand_in and is_stand_in("stand-in") and not is_stand_in(None)
    path = tmp_path / INCEPTION_FILE
    torch.save(stand_in.inception.state_dict(), path)  # the standard file's layout
    loaded = FID(str(path), batch_size=2)
    assert not loaded.inception_is_stand_in
    image = gradients(1)
    features = stand_in.features(image)
    assert features.shape == (1, 2048) and features.dtype == np.float64 and features.std() > 0
    assert np.array_equal(loaded.features(image), features)
    # the same numbers as pytorch-fid's own InceptionV3 wrapped around this network
    with mock.patch("pytorch_fid.inception.fid_inception_v3", lambda: stand_in.inception):
        reference = InceptionV3([InceptionV3.BLOCK_INDEX_BY_DIM[2048]]).eval()
    x = torch.from_numpy(image).permute(0, 3, 1, 2).float() / 255
    with torch.no_grad():
        assert np.array_equal(reference(x)[0].flatten(1).double().numpy(), features)

    with pytest.raises(FileNotFoundError, match=f"{INCEPTION_FILE}.*weights.inception"):
        FID(str(tmp_path / "absent.pth"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty-torch-home"))
    with pytest.raises(FileNotFoundError, match=f"empty-torch-home/hub/checkpoints/{INCEPTION_FILE}"):
        FID(None)  # the torch hub cache, never a download


# ---------------------------------------------------------------------------------- diversity


def test_diversity_is_zero_for_identical_samples_and_positive_for_different_ones(lpips_stand_in):
    # Stand-in LPIPS (random VGG features, the wheel's linear heads).
    same = [gradients(1)[0]] * 4
    assert diversity(same, lpips_stand_in) == pytest.approx(0.0, abs=1e-6)
    different = list(noise(4))
    score = diversity(different, lpips_stand_in)
    assert score > 0
    # the mean of LPIPS itself over the 6 unordered pairs, however they are batched
    x = torch.from_numpy(np.stack(different)).permute(0, 3, 1, 2).float() / 127.5 - 1
    with torch.no_grad():
        pairwise = [lpips_stand_in(x[i : i + 1], x[j : j + 1]).item() for i in range(4) for j in range(i + 1, 4)]
    assert score == pytest.approx(np.mean(pairwise), rel=1e-5)
    assert diversity(different, lpips_stand_in, batch_size=4) == pytest.approx(score, rel=1e-5)
    # float [-1, 1] input scores the same as uint8
    as_float = [x.astype(np.float32) / 127.5 - 1 for x in different]
    assert diversity(as_float, lpips_stand_in) == pytest.approx(score, rel=1e-5)
    with pytest.raises(ValueError, match="at least 2"):
        diversity(same[:1], lpips_stand_in)


def test_diversity_summary_is_mean_and_population_std():
    assert diversity_summary([0.2, 0.4]) == pytest.approx((0.3, 0.1))


# ---------------------------------------------------------------------------------- hole metrics


def test_hole_metrics_on_hand_made_images():
    target = np.full((8, 8, 3), 100, np.uint8)
    mask = np.ones((8, 8), np.uint8)
    mask[2:4, 2:6] = 0  # an 8-pixel hole
    assert hole_l1(target, target, mask) == 0.0
    assert hole_psnr(target, target, mask) == PSNR_CAP == pytest.approx(100.0)
    assert ssim(target, target) == pytest.approx(1.0)

    pred = target.copy()
    pred[2:4, 2:4] += 51  # half the hole off by 51/255 = 0.2
    pred[6:, 6:] = 0  # errors in the visible region do not count
    assert hole_l1(pred, target, mask) == pytest.approx(0.1)  # (4 px * 0.2 + 4 px * 0) / 8 px
    assert hole_psnr(pred, target, mask) == pytest.approx(10 * math.log10(1 / 0.02))  # MSE = 0.04 / 2
    # float images in [-1, 1] give the same numbers
    as_float = [x.astype(np.float64) / 127.5 - 1 for x in (pred, target)]
    assert hole_l1(*as_float, mask) == pytest.approx(0.1)
    assert ssim(pred, target) < 1.0

    with pytest.raises(ValueError, match="no hole"):
        hole_l1(pred, target, np.ones((8, 8), np.uint8))
    with pytest.raises(ValueError, match="0 \\(hole\\) and 1"):
        hole_l1(pred, target, mask * 255)


# ---------------------------------------------------------------------------------- baseline


def test_biharmonic_keeps_visible_pixels_and_fills_a_smooth_hole_closely():
    image = gradients(1, size=48)[0]
    mask = np.ones((48, 48), np.uint8)
    mask[12:36, 16:32] = 0
    filled = biharmonic_inpaint(image, mask)
    assert filled.dtype == np.uint8 and filled.shape == image.shape
    visible = mask.astype(bool)
    assert np.array_equal(filled[visible], image[visible])
    assert hole_l1(filled, image, mask) * 255 < 2.0  # a linear ramp is biharmonic: near-exact fill
    assert np.array_equal(biharmonic_inpaint(image, mask), filled)  # deterministic


# ---------------------------------------------------------------------------------- report


def test_table_markdown_has_a_header_and_a_row_per_method(tmp_path):
    rows = {
        "ours": {"FID box": 13.3, "diversity box": (0.2912, 0.0551), "hole PSNR box": 20.0},
        "biharmonic": {"FID box": 40.126, "diversity box": 0.0},
    }
    columns = ["FID box", "diversity box", "hole PSNR box"]
    text = table_markdown(rows, columns, "Places test, 64 px", stand_in=["inception", "vgg16"])
    lines = text.splitlines()
    assert lines[0] == "### Places test, 64 px"
    assert "| method | FID box | diversity box | hole PSNR box |" in lines
    assert "| ours | 13.30 | 0.29±0.06 | 20.00 |" in lines
    assert "| biharmonic | 40.13 | 0.00 | – |" in lines
    assert "stand-in" in lines[-1].lower() and "inception, vgg16" in lines[-1]
    assert "stand-in" not in table_markdown(rows, columns, "t").lower()

    path = tmp_path / "metrics" / "evaluate.json"
    write_metrics_json(path, {"fid_box": np.float64(13.3), "n": np.int64(4)})
    assert json.loads(path.read_text()) == {"fid_box": 13.3, "n": 4}
    assert [p.name for p in path.parent.iterdir()] == ["evaluate.json"]  # no temporary left behind


# ---------------------------------------------------------------------------------- the stage


def evaluation_set(tmp_path, count: int = 8, *overrides: str) -> dict:
    """Shards and evaluation masks of `count` smooth ramps (half of them the test split) in
    tmp_path/shards and tmp_path/masks; the params that made them."""
    folder = tmp_path / "photos"
    folder.mkdir()
    for i, image in enumerate(gradients(count)):
        Image.fromarray(image).save(folder / f"{i}.png")
    p = params("data.size=32", "data.min_side=16", "data.val_fraction=0.25", "data.test_fraction=0.5",
               "masks.splits=[test]", "evaluate.fid_images=3", "evaluate.fid_dims=64", "weights.inception=stand-in",
               "tracking.enabled=false", *overrides)
    prepare(section(p, "data"), folder, tmp_path / "shards", progress=False)
    masks.run(p, tmp_path / "shards", tmp_path / "masks")
    return p


@pytest.mark.filterwarnings("ignore::scipy.linalg.LinAlgWarning")  # 3 images < 64 dims: singular by design
def test_evaluate_stage_scores_the_classical_reference_and_writes_metrics_and_table(tmp_path):
    """The whole evaluate command below the CLI, on smooth ramps the biharmonic fill nearly restores."""
    p = evaluation_set(tmp_path)
    out, table = tmp_path / "results" / "metrics.json", tmp_path / "table.md"
    summary = evaluate.run(p, "biharmonic", tmp_path / "no-runs", tmp_path / "shards", tmp_path / "masks", out,
                           table=table, kinds=("box",), diversity=False)
    results = json.loads(out.read_text())
    assert results["variant"] == "biharmonic" and "inception" in results["stand_in"]
    assert set(results[evaluate.BASELINE]) == {"box"} and results["images"]["fid"] == 3
    assert results[evaluate.BASELINE]["box"]["hole_psnr"] > 30  # a linear ramp is biharmonic
    text = table.read_text()
    assert text.startswith("### Inpainting on the test split (3 images)") and "| biharmonic (classical) |" in text
    assert text in summary and summary.endswith(f"metrics written to {out}")

    # An ablation is scored on the first evaluate.ablation_images test images (Table 2's subset).
    p["evaluate"]["ablation_images"] = 2
    evaluate.run(p, "biharmonic", tmp_path / "no-runs", tmp_path / "shards", tmp_path / "masks", out,
                 kinds=("box",), diversity=False, ablation=True)
    assert json.loads(out.read_text())["images"]["fid"] == 2


    # The baseline scores its subset, evaluate.baseline_images, and the results and table say so.
    p["evaluate"]["baseline_images"] = 2
    evaluate.run(p, "biharmonic", tmp_path / "no-runs", tmp_path / "shards", tmp_path / "masks", out,
                 table=table, kinds=("box",), diversity=False)
    assert json.loads(out.read_text())["images"] == {"fid": 3, "diversity": 4, "samples": 4, "baseline": 2}
    assert table.read_text().startswith(f"### Inpainting on the test split (3 images; {evaluate.BASELINE} on the "
                                        "first 2)")


class Killed(Exception):
    pass


def counting(method, fail_on_call: int | None = None):
    """`method`, counting its calls (`.calls`) and the most images one call saw (`.most`); raising
    Killed at call `fail_on_call`, as if the job were killed there."""
    def wrapped(images, masks, samples, seeds):
        wrapped.calls += 1
        wrapped.most = max(wrapped.most, len(images))
        if wrapped.calls == fail_on_call:
            raise Killed
        return method(images, masks, samples, seeds)
    wrapped.calls, wrapped.most = 0, 0
    return wrapped


@pytest.mark.filterwarnings("ignore::scipy.linalg.LinAlgWarning")  # 4 images < 64 dims: singular by design
def test_a_killed_evaluation_resumes_without_recomputing_finished_mask_types(tmp_path, monkeypatch):
    p = evaluation_set(tmp_path, 8, "evaluate.fid_images=4", "evaluate.batch_size=4", "evaluate.diversity_images=2",
                 "evaluate.diversity_samples=2")
    args = (tmp_path / "no-runs", tmp_path / "shards", tmp_path / "masks")
    # One call per mask type (4 images, batches of 4), then one for the diversity (2 images x 2 samples).
    original = evaluate.biharmonic
    reference = counting(original)
    monkeypatch.setattr(evaluate, "biharmonic", reference)
    evaluate.run(p, "biharmonic", *args, tmp_path / "whole.json")
    assert reference.calls == 4 and not evaluate.partial_path(tmp_path / "whole.json").exists()

    out = tmp_path / "results" / "metrics.json"
    killed = counting(original, fail_on_call=2)
    monkeypatch.setattr(evaluate, "biharmonic", killed)
    with pytest.raises(Killed):  # during the second mask type
        evaluate.run(p, "biharmonic", *args, out)
    assert not out.exists()
    partial = json.loads(evaluate.partial_path(out).read_text())
    assert list(partial["done"][evaluate.BASELINE]) == ["small"]

    rerun = counting(original)
    monkeypatch.setattr(evaluate, "biharmonic", rerun)
    summary = evaluate.run(p, "biharmonic", *args, out)
    assert rerun.calls == 3  # large, box and the diversity: small is not recomputed
    assert "resumed 1 finished part(s)" in summary
    assert out.read_text() == (tmp_path / "whole.json").read_text()  # as if never killed
    assert not evaluate.partial_path(out).exists()

    # A partial file of other inputs is never trusted: here another sampling temperature.
    evaluate.partial_path(out).write_text(json.dumps(partial))
    p["sample"]["temperature"] = 0.5
    stale = counting(original)
    monkeypatch.setattr(evaluate, "biharmonic", stale)
    evaluate.run(p, "biharmonic", *args, out)
    assert stale.calls == 4


@pytest.mark.filterwarnings("ignore::scipy.linalg.LinAlgWarning")  # 3 images < 64 dims: singular by design
def test_the_ablations_in_one_process_score_what_one_process_per_variant_scored(tmp_path, monkeypatch):
    """`run_ablations` writes, per variant, the JSON that `run(..., ablation=True)` writes alone, while
    loading the Inception network once and each distinct model once; killed in the last variant,
    its rerun recomputes none of the variants before it. (Seeded untrained models: the numbers
    need not be good, only the same.)"""
    p = evaluation_set(tmp_path, 8, "evaluate.ablation_images=3", "sample.steps=2")
    args = (seeded_runs(tmp_path / "runs", 32), tmp_path / "shards", tmp_path / "masks")
    variants = ["full", "t0.5", "alpha0.25", "biharmonic"]
    for v in variants:
        evaluate.run(p, v, *args, tmp_path / "alone" / f"{v}.json", kinds=("box",), diversity=False, ablation=True)
    alone = {v: json.loads((tmp_path / "alone" / f"{v}.json").read_text()) for v in variants}
    assert len({json.dumps(r, sort_keys=True) for r in alone.values()}) == 4  # four different results

    built, loads = [], []
    monkeypatch.setattr(evaluate, "FID", lambda *a, **k: built.append(1) or FID(*a, **k))
    from_runs = evaluate.Inpainter.from_runs
    monkeypatch.setattr(evaluate.Inpainter, "from_runs", lambda *a, **k: loads.append(k) or from_runs(*a, **k))
    out = tmp_path / "results" / "ablations"
    summary = evaluate.run_ablations(p, variants, *args, out)
    assert {v: json.loads((out / f"{v}.json").read_text()) for v in variants} == alone
    assert len(built) == 1 and loads == [{}, {"alpha": 0.25}]  # t0.5 samples the model "full" loaded
    assert summary.startswith("full: FID ") and summary.endswith(f"4 ablation(s) written to {out}")
    assert not list(out.glob("*.partial"))

    # Killed in the classical reference, the last: Snakemake deletes the job's outputs, and the
    # rerun finds the three finished variants in their .partial files.
    original = evaluate.biharmonic
    monkeypatch.setattr(evaluate, "biharmonic", counting(original, fail_on_call=1))
    with pytest.raises(Killed):
        evaluate.run_ablations(p, variants, *args, tmp_path / "killed")
    assert sorted(f.name for f in (tmp_path / "killed").iterdir()) == sorted(
        [*(f"{v}.json" for v in variants[:3]), *(f"{v}.json.partial" for v in variants[:3])])
    for f in (tmp_path / "killed").glob("*.json"):
        f.unlink()
    sampled, ours = [], evaluate.ours
    monkeypatch.setattr(evaluate, "ours", lambda *a: sampled.append(counting(ours(*a))) or sampled[-1])
    monkeypatch.setattr(evaluate, "biharmonic", counting(original))
    summary = evaluate.run_ablations(p, variants, *args, tmp_path / "killed")
    assert {v: json.loads((tmp_path / "killed" / f"{v}.json").read_text()) for v in variants} == alone
    assert len(sampled) == 3 and not any(m.calls for m in sampled) and evaluate.biharmonic.calls == 1
    assert summary.count("(resumed)") == 3 and not list((tmp_path / "killed").glob("*.partial"))


@pytest.mark.filterwarnings("ignore::scipy.linalg.LinAlgWarning")  # 7 images < 64 dims: singular by design
def test_evaluation_streams_one_batch_at_a_time(tmp_path, monkeypatch):
    """Neither the method nor the Inception network ever sees more than evaluate.batch_size images,
    and FID's stats past the batch are what the images' features give."""
    p = evaluation_set(tmp_path, 14, "evaluate.fid_images=7", "evaluate.batch_size=3")
    seen = []
    features = FID.features
    monkeypatch.setattr(FID, "features", lambda self, images: seen.append(len(images)) or features(self, images))
    method = counting(evaluate.biharmonic)
    cfg = section(p, "evaluate")
    results = evaluate.evaluate_methods({"m": method}, tmp_path / "shards", tmp_path / "masks", cfg,
                                        section(p, "weights"), kinds=("box",), with_diversity=False)
    assert method.calls == 3 and method.most == 3 and max(seen) == 3  # 7 images: 3 + 3 + 1
    # the same FID as the whole sets at once
    keys, images = zip(*shard_images(tmp_path / "shards", "test", 7))
    box = [read_eval_mask(tmp_path / "masks", "test", "box", key) for key in keys]
    images = np.stack(images)
    outputs = np.stack([biharmonic_inpaint(i, m) for i, m in zip(images, box)])
    fid = FID("stand-in", dims=64)
    assert results["m"]["box"]["fid"] == pytest.approx(fid.fid(fid.features(images), fid.features(outputs)), rel=1e-6)
