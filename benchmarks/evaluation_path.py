"""The evaluation path before and after streaming (issue 13), on the same images, masks and
random-weight models, on this CPU, in one run; and both paths' peak memory at two test-set sizes.

    python benchmarks/evaluation_path.py            # the run in benchmarks/results/evaluation_path.json

"before": HEAD's code, from a temporary git worktree under /tmp (removed after), whose
evaluate_methods calls the model image by image and keeps every image and output until the
end; "after": this checkout's (batches of evaluate.batch_size through Inpainter.inpaint_many,
FID features reduced per batch). Each path runs in its own process (PYTHONPATH=<tree>/src) on
one torch thread and is timed around `evaluate_methods` for our model only (the biharmonic
reference is left out: the new path scores it on a subset, which would be no like-for-like
comparison), model loading excluded; peak RSS is the process's ru_maxrss. Models: seeded
random weights in the layout training writes, made with this checkout's code: the tiny params
at 64 px, and the paper overlay's widths at 256 px (the transformer cut to --paper-layers of its
40 layers so a CPU run takes minutes; stated in the JSON). Data: synthetic smooth images made
into shards with the project's own shard writer (`prepare`), fixed masks by the `masks` stage.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from latent_inpaint.config import section
from latent_inpaint.data.ingest import prepare
from latent_inpaint.decoder import InpaintDecoder
from latent_inpaint.encoder import build_encoder
from latent_inpaint.params import load_params
from latent_inpaint.saved import export_final
from latent_inpaint.stages import masks as masks_stage
from latent_inpaint.transformer import BidirectionalTransformer
from latent_inpaint.vqgan import VQModel

ROOT = Path(__file__).resolve().parents[1]
PAPER = ROOT / "workflow/configs/paper.yaml"

# Runs in a fresh process with one tree's code; prints one JSON line.
CHILD = r"""
import json, resource, sys, time
from pathlib import Path
import torch
job = json.loads(sys.argv[1])
torch.set_num_threads(1)
import latent_inpaint
from latent_inpaint.config import section
from latent_inpaint.inpaint import Inpainter
from latent_inpaint.params import load_params
from latent_inpaint.stages import evaluate
assert Path(latent_inpaint.__file__).is_relative_to(job["src"]), latent_inpaint.__file__
params = load_params([Path(job["src"]) / "latent_inpaint/params.yaml"], job["overrides"])
model = Inpainter.from_runs(Path(job["runs"]), "cpu")
cfg, weights = section(params, "evaluate"), section(params, "weights")
start = time.perf_counter()
results = evaluate.evaluate_methods({"ours": evaluate.ours(model, section(params, "sample"))}, Path(job["shards"]),
                                    Path(job["masks"]), cfg, weights, "cpu", kinds=tuple(job["kinds"]),
                                    with_diversity=job["diversity"])
seconds = time.perf_counter() - start
print(json.dumps({"seconds": seconds, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "metrics": results["ours"]}))
"""


def synthetic_set(folder: Path, params: dict, count: int, seed: int = 0) -> tuple[Path, Path]:
    """`count` smooth random colour fields as the test split of shards (the project's writer) and
    their fixed evaluation masks; returns (shards, masks)."""
    size = params["data"]["size"]
    rng = np.random.default_rng(seed)
    photos = folder / "photos" / "test"
    photos.mkdir(parents=True)
    for i in range(count):
        coarse = rng.integers(0, 256, (6, 6, 3), dtype=np.uint8)
        image = Image.fromarray(coarse).resize((size, size), Image.Resampling.BICUBIC)
        image.save(photos / f"{i:05d}.png")
    p = {**params, "masks": {**params["masks"], "splits": ["test"]},
         "tracking": {**params["tracking"], "enabled": False}}
    prepare(section(p, "data"), photos.parent, folder / "shards", progress=False)
    masks_stage.run(p, folder / "shards", folder / "masks")
    return folder / "shards", folder / "masks"


def random_runs(root: Path, params: dict) -> int:
    """Seeded untrained parts saved as trained ones are; returns their parameter count."""
    size = params["data"]["size"]
    vq, enc, tf = section(params, "vqgan"), section(params, "encoder"), section(params, "transformer")
    torch.manual_seed(0)
    vqgan = VQModel(vq, size)
    codebook = vqgan.quantize.embedding.weight.detach()
    parts = {"vqgan": vqgan, "encoder": build_encoder("restrictive", vq, enc, size),
             "transformer": BidirectionalTransformer(tf, codebook, size // vqgan.factor),
             "decoder": InpaintDecoder(vq, size, enc.attn_resolutions)}
    for stage, model in parts.items():
        export_final(root / stage, stage, {stage: model}, "benchmark: random weights")
    return sum(p.numel() for m in parts.values() for p in m.parameters())


def evaluate_in(src: Path, runs: Path, shards: Path, masks: Path, overrides: list[str], kinds: list[str],
                diversity: bool) -> dict:
    job = {"src": str(src), "runs": str(runs), "shards": str(shards), "masks": str(masks),
           "overrides": ["tracking.enabled=false", *overrides], "kinds": kinds, "diversity": diversity}
    env = {**os.environ, "PYTHONPATH": str(src), "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", CHILD, json.dumps(job)], env=env, capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"evaluation with {src} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def differences(a: dict, b: dict) -> dict:
    """The largest absolute and relative differences between two results' numbers (0: the same)."""
    pairs = [(a[k][m], b[k][m]) for k in a if isinstance(a[k], dict) for m in a[k]]
    pairs += [(x, y) for k in a if isinstance(a[k], list) for x, y in zip(a[k], b[k])]
    return {"absolute": max(abs(x - y) for x, y in pairs),
            "relative": max(abs(x - y) / max(abs(x), abs(y), 1e-12) for x, y in pairs)}


def compare(name: str, work: Path, head_src: Path, params: dict, images: int, evaluate: list[str],
            kinds: list[str], diversity: bool) -> dict:
    shards, masks = synthetic_set(work / name, params, images)
    parameters = random_runs(work / name / "runs", params)
    runs = {}
    for path, src in (("before", head_src), ("after", ROOT / "src")):
        runs[path] = evaluate_in(src, work / name / "runs", shards, masks, evaluate, kinds, diversity)
        print(f"{name}, {path}: {images} images, {runs[path]['seconds']:.1f} s, {runs[path]['peak_rss_mb']:.0f} MB",
              file=sys.stderr, flush=True)
    before, after = runs["before"], runs["after"]
    return {"model": {"size": params["data"]["size"], "parameters": parameters,
                      "transformer_layers": params["transformer"]["n_layer"]},
            "images": images, "kinds": kinds, "diversity": diversity, "evaluate": evaluate,
            "before": before, "after": after, "speedup": before["seconds"] / after["seconds"],
            "largest_metric_difference": differences(before["metrics"], after["metrics"])}


def head_worktree(where: Path) -> Path:
    subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(where), "HEAD"], check=True,
                   capture_output=True)
    return where


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tiny-images", type=int, default=48, help="test images for the tiny comparison")
    ap.add_argument("--paper-images", type=int, default=2, help="test images at paper width")
    ap.add_argument("--paper-layers", type=int, default=4, help="transformer layers at paper width (the paper: 40)")
    ap.add_argument("--memory-sizes", type=int, nargs="*", default=[200, 2000],
                    help="test-set sizes for the peak memory of both paths (tiny model, 64 px, box mask)")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/evaluation_path.json")
    args = ap.parse_args(argv)
    tiny = load_params([ROOT / "params.yaml"], ["data.size=64"])
    paper = load_params([ROOT / "params.yaml", PAPER], [f"transformer.n_layer={args.paper_layers}"])
    tiny_eval = [f"evaluate.fid_images={args.tiny_images}", "evaluate.diversity_images=4",
                 "evaluate.diversity_samples=4", "evaluate.batch_size=8", "evaluate.fid_dims=2048",
                 "weights.inception=stand-in", "weights.vgg16=stand-in"]
    paper_eval = [f"evaluate.fid_images={args.paper_images}", "evaluate.batch_size=8", "evaluate.fid_dims=2048",
                  "weights.inception=stand-in", "weights.vgg16=stand-in"]
    result: dict = {"machine": {"python": platform.python_version(), "torch": torch.__version__,
                                "processor": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
                                "torch_threads": 1}}
    work = Path(tempfile.mkdtemp(prefix="evaluation_path."))
    head = work / "head"
    try:
        head_src = head_worktree(head) / "src"
        result["before_commit"] = subprocess.run(["git", "-C", str(head), "rev-parse", "HEAD"], check=True,
                                                 capture_output=True, text=True).stdout.strip()
        result["tiny"] = compare("tiny", work, head_src, tiny, args.tiny_images, tiny_eval, ["small", "large", "box"],
                                 True)
        if args.paper_images:
            paper_data = {**paper, "data": {**paper["data"], "image_format": "png", "workers": 1}}
            result["paper_width"] = compare("paper_width", work, head_src, paper_data, args.paper_images, paper_eval,
                                            ["box"], False)
        result["memory"] = {}
        for count in args.memory_sizes:
            name = f"memory_{count}"
            shards, masks = synthetic_set(work / name, tiny, count, seed=count)
            random_runs(work / name / "runs", tiny)
            overrides = [f"evaluate.fid_images={count}", f"evaluate.diversity_images={count // 10}",
                         "evaluate.diversity_samples=4", "evaluate.batch_size=8", "evaluate.fid_dims=64",
                         "weights.inception=stand-in", "weights.vgg16=stand-in"]
            result["memory"][str(count)] = {"images": count, "kinds": ["box"], "evaluate": overrides}
            for path, src in (("before", head_src), ("after", ROOT / "src")):
                run = evaluate_in(src, work / name / "runs", shards, masks, overrides, ["box"], True)
                result["memory"][str(count)][path] = {"seconds": run["seconds"], "peak_rss_mb": run["peak_rss_mb"]}
                print(f"{name}, {path}: {run['seconds']:.1f} s, {run['peak_rss_mb']:.0f} MB", file=sys.stderr,
                      flush=True)
    finally:
        if head.exists():
            subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(head)], check=False,
                           capture_output=True)
        shutil.rmtree(work, ignore_errors=True)
    result["command"] = " ".join(["python", "benchmarks/evaluation_path.py",
                                  *(argv if argv is not None else sys.argv[1:])])
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
