"""Inference at the paper's configuration, before and after batching (issue 13): per-stage latency
of one sample, the time of S samples of one image, throughput and peak memory, random weights
and synthetic 256 x 256 images (the timings do not depend on what the weights learned).

    python benchmarks/paper_inference.py --device cpu --samples 8            # the paper's widths
    python benchmarks/paper_inference.py --device cpu --width reduced        # the tiny params, 32 px

Paths: `old` is the code before batching, kept here as it was (Inpainter.inpaint_batch over S
copies of the image, 8 rows a batch: the encoder and E_prt once per sample, every sampling step
per sample); `new` is Inpainter.encode / draw / decode as inpaint_many runs them (the encoder and
E_prt once per image, the first sampling step once per image, the samples in one batch). Both
draw with the same seeds; the run fails unless they give the same tokens and the same pixels
(to the last bits the old path's own convolutions change with its batch size: PIXEL_NOISE).
Writes JSON (default benchmarks/results/paper_inference_<device>.json, reduced width:
..._reduced.json) with the device's name and the machine's load.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import resource
import sys
import time
from pathlib import Path

import numpy as np
import torch

from latent_inpaint.config import section
from latent_inpaint.decoder import build_decoder
from latent_inpaint.encoder import build_encoder
from latent_inpaint.inpaint import Inpainter, pick_device
from latent_inpaint.masks import eval_mask
from latent_inpaint.params import load_params
from latent_inpaint.sampler import sample
from latent_inpaint.transformer import build_transformer
from latent_inpaint.vqgan import VQModel

ROOT = Path(__file__).resolve().parents[1]
PAPER = ROOT / "workflow/configs/paper.yaml"
OLD_BATCH = 8  # the samples per forward pass of the code before batching (inpaint.BATCH)
REDUCED = ["data.size=32"]  # the tiny params.yaml layout
# The old path's pixels depend in their last bits on how many samples share its convolution
# batches (oneDNN picks kernels per batch size: `sample0_alone_vs_in_batch_max_abs_diff`); the new
# path runs them row by row on the CPU. Same tokens and pixels within this are the same samples.
PIXEL_NOISE = 1e-4


def build(params: dict, device: torch.device) -> Inpainter:
    """The four parts as training builds them, seeded random weights, in eval mode."""
    size = section(params, "data").size
    vq, enc, tf, dec = (section(params, name) for name in ("vqgan", "encoder", "transformer", "decoder"))
    torch.manual_seed(0)
    vqgan = VQModel(vq, size)
    encoder = build_encoder("restrictive", vq, enc, size)
    transformer = build_transformer(tf, vqgan.quantize.embedding.weight.detach(), size // vqgan.factor)
    decoder = build_decoder(dec.variant, vq, size, enc.attn_resolutions)
    parts = [m.to(device).eval() for m in (vqgan, encoder, transformer, decoder)]
    return Inpainter(*parts, size=size, device=device)


def synthetic(size: int, masks, index: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A smooth random picture with noise and the `large` evaluation mask `index`:
    x (1, 3, S, S) in [-1, 1], mask (1, 1, S, S) 1 = visible."""
    rng = np.random.default_rng(index)
    yy, xx = np.mgrid[0:size, 0:size] / size
    base = np.stack([np.sin(6 * xx + rng.uniform(0, 6)), np.cos(5 * yy + rng.uniform(0, 6)), xx * yy], 0)
    x = torch.from_numpy(np.clip(base + rng.normal(0, 0.1, base.shape), -1, 1)).float()[None]
    mask = torch.from_numpy(eval_mask("large", size, masks, "test", index).astype(np.float32))[None, None]
    return x, mask


class Clock:
    """Wall time per named stage (synchronised on a GPU), and this process's CPU time, which other
    jobs on a shared machine disturb less than the wall time."""

    def __init__(self, device: torch.device):
        self.device, self.seconds, self.cpu_seconds = device, {}, {}

    def __call__(self, name: str, fn, *args):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        start, cpu = time.perf_counter(), time.process_time()
        out = fn(*args)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start
        self.cpu_seconds[name] = self.cpu_seconds.get(name, 0.0) + time.process_time() - cpu
        return out

    def report(self) -> dict:
        return {"wall": {k: round(v, 3) for k, v in self.seconds.items()},
                "cpu": {k: round(v, 3) for k, v in self.cpu_seconds.items()}}


@torch.no_grad()
def old_path(model: Inpainter, x, mask, cfg, samples: int, seed: int, clock: Clock) -> tuple[torch.Tensor, torch.Tensor]:
    """The code before batching (Inpainter.iter_inpaint and inpaint_batch at 970604b), stage by
    stage: every OLD_BATCH samples a batch of copies of the image -> (tokens (S, N), pixels (S, 3, S', S'))."""
    tokens_out, pixels_out = [], []
    for first in range(0, samples, OLD_BATCH):
        n = min(OLD_BATCH, samples - first)
        xs, ms = x.expand(n, -1, -1, -1), mask.expand(n, -1, -1, -1)
        logits, token_mask = clock("encoder", model.encoder, xs, ms)
        b, _, h, w = logits.shape
        tokens = clock("sampling", lambda: sample(
            model.transformer, logits.argmax(1).flatten(1), token_mask.flatten(1), steps=cfg.steps,
            temperature=cfg.temperature, anneal=cfg.anneal, seeds=[seed + first + i for i in range(n)]))
        z_q = model.vqgan.quantize.lookup(tokens.view(b, h, w))
        composite, _ = clock("decoder", model.decoder, xs * ms, ms, z_q, token_mask)
        tokens_out.append(tokens)
        pixels_out.append(xs * ms + composite * (1 - ms))
    return torch.cat(tokens_out), torch.cat(pixels_out)


@torch.no_grad()
def new_path(model: Inpainter, x, mask, cfg, samples: int, seed: int, clock: Clock) -> tuple[torch.Tensor, torch.Tensor]:
    """inpaint_many's path for one image: encode once, then draw and decode sample.batch_size rows at a time."""
    enc = clock("encoder+prior", model.encode, x, mask, cfg)
    tokens_out, pixels_out = [], []
    for first in range(0, samples, cfg.batch_size):
        rows = torch.zeros(min(cfg.batch_size, samples - first), dtype=torch.long, device=model.device)
        tokens = clock("sampling", model.draw, enc, rows, [seed + first + i for i in range(len(rows))], cfg)
        tokens_out.append(tokens)
        pixels_out.append(clock("decoder", model.decode, enc, rows, tokens, cfg))
    return torch.cat(tokens_out), torch.cat(pixels_out)


@torch.no_grad()
def decoder_batching(model: Inpainter, x, mask, cfg, samples: int, clock: Clock) -> None:
    """G on `samples` rows of one image in one batch (as on an accelerator) and row by row (as
    Inpainter runs it on the CPU): what batching the convolutional parts gains on this device."""
    enc = model.encode(x, mask, cfg)
    rows = torch.zeros(samples, dtype=torch.long, device=model.device)
    tokens = model.draw(enc, rows, list(range(samples)), cfg)
    z_q = model.vqgan.quantize.lookup(tokens.view(samples, *enc.token_mask.shape[-2:]))
    prior, token_mask = enc.prior[rows], enc.token_mask[rows]
    clock("one_batch", model.decoder.decode, prior, z_q, token_mask)
    clock("row_by_row", lambda: [model.decoder.decode(prior[r:r + 1], z_q[r:r + 1], token_mask[r:r + 1])
                                 for r in range(samples)])


def as_uint8(pixels: torch.Tensor) -> torch.Tensor:
    return ((pixels.float().clamp(-1, 1) + 1) * 127.5).round().byte().cpu()


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def measure(params: dict, device: torch.device, samples: int, paths: list[str], warmup: int = 1,
            log=lambda line: None) -> dict:
    model = build(params, device)
    cfg = section(params, "sample")
    x, mask = (t.to(device) for t in synthetic(model.size, section(params, "masks"), 0))
    built_mb = peak_memory_mb(device)
    result = {"size": model.size, "samples": samples, "sample": dataclasses.asdict(cfg),
              "parameters_m": {name: round(sum(p.numel() for p in getattr(model, name).parameters()) / 1e6, 2)
                               for name in ("encoder", "transformer", "decoder")},
              "hole_ratio": round(float(1 - mask.mean()), 3), "memory_mb": {"after_build": round(built_mb)}}
    run = {"old": old_path, "new": new_path}
    for _ in range(warmup):  # first calls pay for kernel set-up: not the old path's cost alone
        new_path(model, x, mask, cfg, 1, 0, Clock(device))
    outputs = {}
    for path in paths:
        log(f"{path}: one sample")
        one = Clock(device)
        _, alone = run[path](model, x, mask, cfg, 1, 0, one)
        log(f"{path}: {samples} samples of one image")
        many = Clock(device)
        start, cpu = time.perf_counter(), time.process_time()
        outputs[path] = run[path](model, x, mask, cfg, samples, 0, many)
        total, total_cpu = time.perf_counter() - start, time.process_time() - cpu
        result[path] = {"batch1_seconds": one.report(), f"samples{samples}_seconds": many.report(),
                        f"samples{samples}_total_seconds": {"wall": round(total, 3), "cpu": round(total_cpu, 3)},
                        "samples_per_second": round(samples / total, 4)}
        result["memory_mb"][f"peak_after_{path}"] = round(peak_memory_mb(device))
        # Sample 0 asked alone and among `samples`: equal unless kernels change with the batch size.
        result[path]["sample0_alone_vs_in_batch_max_abs_diff"] = float((alone - outputs[path][1][:1]).abs().max())
        log(json.dumps(result[path]))
    if samples > 1 and "new" in paths:
        log(f"decoder G on {samples} rows: one batch vs row by row")
        gain = Clock(device)
        decoder_batching(model, x, mask, cfg, samples, gain)
        result[f"decoder_{samples}_rows_seconds"] = gain.report()
    if len(outputs) == 2:
        (old_tokens, old_pixels), (new_tokens, new_pixels) = outputs["old"], outputs["new"]
        old_u8, new_u8 = as_uint8(old_pixels), as_uint8(new_pixels)
        result["same_tokens"] = bool(torch.equal(old_tokens, new_tokens))
        result["same_pixels"] = bool(torch.equal(old_u8, new_u8))
        result["pixel_max_abs_diff_uint8"] = int((old_u8.int() - new_u8.int()).abs().max())
        result["pixel_max_abs_diff_float"] = float((old_pixels.float() - new_pixels.float()).abs().max())
        key = f"samples{samples}_total_seconds"
        result[f"speedup_{samples}_samples"] = {kind: round(result["old"][key][kind] / result["new"][key][kind], 3)
                                                for kind in ("wall", "cpu")}
    return result


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default=None, help="cpu | cuda (default: the GPU if there is one)")
    ap.add_argument("--width", choices=("paper", "reduced"), default="paper",
                    help="paper: params.yaml + workflow/configs/paper.yaml; reduced: the tiny params.yaml at 32 px")
    ap.add_argument("--samples", type=int, default=8)
    ap.add_argument("--paths", nargs="+", choices=("old", "new"), default=["old", "new"])
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE")
    ap.add_argument("--warmup", type=int, default=1, help="untimed one-sample runs first")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = pick_device(args.device)
    files = [ROOT / "params.yaml"] + ([PAPER] if args.width == "paper" else [])
    params = load_params(files, (REDUCED if args.width == "reduced" else []) + args.overrides)
    load_before = os.getloadavg()
    result = measure(params, device, args.samples, args.paths, args.warmup, log=lambda line: print(line, file=sys.stderr, flush=True))
    result["width"] = args.width
    result["machine"] = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or platform.machine(),
        "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(), "python": platform.python_version(),
        "torch": torch.__version__, "load_average_before_after": [round(load_before[0], 2), round(os.getloadavg()[0], 2)],
        "note": "a shared machine: other jobs ran beside this one (see the load averages)"}
    result["command"] = " ".join(["python", "benchmarks/paper_inference.py", *(argv if argv is not None else sys.argv[1:])])
    name = f"paper_inference_{device.type}" + ("_reduced" if args.width == "reduced" else "")
    out = args.out or ROOT / "benchmarks/results" / f"{name}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))
    if len(args.paths) == 2 and not (result["same_tokens"] and result["pixel_max_abs_diff_float"] <= PIXEL_NOISE):
        raise SystemExit(f"the new path's samples differ from the old path's: tokens equal {result['same_tokens']}, "
                         f"pixels max diff {result['pixel_max_abs_diff_float']}")
    return result


if __name__ == "__main__":
    main()
