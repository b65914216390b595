"""Training cost at the paper's scale: step time, model FLOPs, FLOPs utilisation and peak memory
of each trained stage (vqgan, encoder, transformer, decoder), with random weights and synthetic
data, and the paper-size dry run.

Each stage is built by its own stage class (stages/<name>.py) from params.yaml with the paper
overlay (workflow/configs/paper.yaml; `--width reduced`: params.yaml alone, the tiny CPU
configuration), and takes optimizer steps through the training loop's own phase step
(train/loop.py): every phase of the stage, its loss, backward and optimizer step, under the
precision train.precision gives the device. The VQGAN is stepped past vqgan.disc_start, so its
step includes the discriminator (three quarters of the paper's steps do). LPIPS is the network
weights.vgg16 loads, with random weights: full-width VGG16 where the paper config names the real
file, the narrowed stand-in where the tiny one does. Data: random images in [-1, 1], MAT
free-form training masks, uniform random tokens, in the shapes the stages' loaders give.

Step 1 is the warm-up, run under torch.utils.flop_counter.FlopCounterMode: its count is the
model FLOPs of one step (forward and backward of every network the step runs, the frozen LPIPS
and discriminator included; the optimizer's elementwise updates are not FLOPs it counts). The
later steps are timed. FLOPs utilisation (MFU) = FLOPs per step / step time / the device's peak:
on a CPU the best matmul rate measured here in the steps' precision (`matmul_peak`: fp32, or bf16
on a CPU with bf16 units), on a GPU the vendor's bf16 dense figure (`VENDOR_PEAKS`). Every stage
runs in a fresh subprocess, so its peak memory is its own (on a CPU the peak resident set, VmHWM;
on a GPU torch's peak allocation). A CPU run also
scales each stage's counted FLOPs to its configured batch and gives the time of a step and of
all its steps on one H100 at an assumed utilisation (`h100_estimate`).

    python benchmarks/paper_training.py --device cpu --width reduced           # the tiny config
    python benchmarks/paper_training.py --device cuda                          # paper batches, on a GPU
    python benchmarks/paper_training.py --dry-run --threads 1                  # paper size, batch 1, CPU
    python benchmarks/paper_training.py --dry-run --stages transformer         # one stage alone

On cores that other jobs share, `--threads 1` avoids OpenMP's stalls (a tiny decoder step: 14 s
with 2 threads, 0.6 s with 1, at a load average of 8 on 2 cores).

The dry run (`--dry-run`): each stage at the full paper configuration takes two optimizer steps
at batch 1 on the CPU; it checks shapes run, every loss is finite, and reports each stage's peak
resident memory (benchmarks/results/paper_dry_run.json).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.utils.flop_counter as flop_counter
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from latent_inpaint.config import section
from latent_inpaint.data.ingest import MANIFEST
from latent_inpaint.data.masked import MaskedBatch
from latent_inpaint.data.tokens import write_tokens
from latent_inpaint.losses import load_lpips
from latent_inpaint.masks import free_form_mask
from latent_inpaint.params import load_params
from latent_inpaint.partial_conv import token_mask
from latent_inpaint.stages.decoder import DecoderStage
from latent_inpaint.stages.encoder import EncoderStage
from latent_inpaint.stages.transformer import TransformerStage, random_visible
from latent_inpaint.stages.vqgan import VQGANStage
from latent_inpaint.train.distributed import seed_everything
from latent_inpaint.train.loop import _accumulate
from latent_inpaint.precision import device_precision, precision_for, resolve_precision
from latent_inpaint.train.step import Meter, only_trainable, to_device
from latent_inpaint.vqgan import VQModel
from latent_inpaint.weights import STAND_IN_SEED, is_stand_in

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
STAGES = ("vqgan", "encoder", "transformer", "decoder")
WIDTHS = {"paper": ("params.yaml", "workflow/configs/paper.yaml"), "reduced": ("params.yaml",)}

# Vendor datasheet figures, dense (no sparsity), in FLOP/s: bf16 tensor cores from Ampere on, fp16
# on the V100 (no bf16). Vendor peaks, not measurements: sustained clocks give less.
VENDOR_PEAKS = {
    "H100": (989e12, "bf16 dense, H100 SXM datasheet"),
    "H200": (989e12, "bf16 dense, H200 datasheet (the H100's tensor cores)"),
    "A100": (312e12, "bf16 dense, A100 datasheet"),
    "V100": (125e12, "fp16 dense, V100 SXM2 datasheet"),
}

# Model FLOPs utilisation assumed for bf16 training in PyTorch eager on an H100, low and high,
# for `h100_estimate`; an assumption until a GPU run of this script replaces it.
H100_TRAINING_MFU = (0.3, 0.5)

aten = torch.ops.aten
# FlopCounterMode counts the CUDA attention kernels but not the CPU one that
# F.scaled_dot_product_attention dispatches to: the same formulas for it.
CPU_ATTENTION_FLOPS = {
    aten._scaled_dot_product_flash_attention_for_cpu:
        lambda q, k, v, *args, out_shape=None, **kwargs: flop_counter.sdpa_flop_count(q, k, v),
    aten._scaled_dot_product_flash_attention_for_cpu_backward:
        lambda grad, q, k, v, *args, out_shape=None, **kwargs: flop_counter.sdpa_backward_flop_count(grad, q, k, v),
}


class _Untracked:
    """Stands in for FlopCounterMode's module tracker: every FLOP counted under "Global" alone."""
    parents = ("Global",)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        pass


def flop_mode(by_module: bool = True) -> FlopCounterMode:
    """A FlopCounterMode that also counts attention on the CPU; `by_module` False: totals only,
    for steps that take gradients with autograd.grad (R1), which its module tracker rejects."""
    mode = FlopCounterMode(display=False, custom_mapping=CPU_ATTENTION_FLOPS)
    if not by_module:
        mode.mod_tracker = _Untracked()
    return mode


def module_flops(mode: FlopCounterMode, depth: int = 1) -> dict[str, int]:
    """FLOPs per module `depth` levels below the outermost calls, e.g. {"VQModel": ..., "LPIPS": ...}:
    what FlopCounterMode attributes to each network's call. The total also holds what it cannot
    attribute, e.g. the backward passes of taming's adaptive GAN weight (torch.autograd.grad)."""
    return {name: sum(counts.values()) for name, counts in mode.get_flop_counts().items()
            if name != "Global" and name.count(".") == depth - 1}


def stage_params(width: str) -> dict:
    return load_params([ROOT / f for f in WIDTHS[width]])


def random_lpips(setting: str | None) -> nn.Module:
    """The LPIPS network `weights.vgg16` loads, with random weights: the narrowed stand-in when it
    names the stand-in, else full-width VGG16 (the weight file only fills it)."""
    if is_stand_in(setting):
        return load_lpips(setting)
    import lpips

    with warnings.catch_warnings(), torch.random.fork_rng(devices=[]):
        warnings.simplefilter("ignore")
        torch.manual_seed(STAND_IN_SEED)
        return lpips.LPIPS(net="vgg", pnet_rand=True, verbose=False).eval().requires_grad_(False)


def synthetic_data(folder: Path, size: int, factor: int, n_embed: int, maps: int = 4) -> tuple[Path, Path]:
    """(shards, tokens) folders holding what the stages read when they are built: a manifest that
    gives the image size, and random train and val token maps. Batches are made separately."""
    shards, tokens = folder / "shards", folder / "tokens"
    shards.mkdir(parents=True, exist_ok=True)
    tokens.mkdir(parents=True, exist_ok=True)
    (shards / MANIFEST).write_text(json.dumps({"params": {"size": size}, "splits": {}}))
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        write_tokens(tokens, split, rng.integers(0, n_embed, (maps, size // factor, size // factor)),
                     [f"{split}{i}" for i in range(maps)])
    return shards, tokens


def build_stage(name: str, params: dict, folder: Path):
    """The stage object its `run` builds, over synthetic data; the LPIPS it uses set by `random_lpips`."""
    data, vq, train, masks, weights, enc = (
        section(params, s) for s in ("data", "vqgan", "train", "masks", "weights", "encoder"))
    stand_in = section(params | {"weights": {**params["weights"], "vgg16": "stand-in"}}, "weights")
    seed_everything(train.seed)
    if name == "vqgan":
        stage = VQGANStage(vq, train, stand_in, folder, data.size)
    else:
        vqgan = VQModel(vq, data.size)
        shards, tokens = synthetic_data(folder, data.size, vqgan.factor, vq.n_embed)
        if name == "encoder":
            stage = EncoderStage("restrictive", vqgan, enc, masks, train, shards, tokens)
        elif name == "transformer":
            stage = TransformerStage(section(params, "transformer"), train, vqgan, tokens)
        elif name == "decoder":
            stage = DecoderStage(section(params, "decoder"), masks, train, stand_in, shards, tokens, vqgan,
                                 alpha=enc.alpha, attn_resolutions=enc.attn_resolutions)
        else:
            raise ValueError(f"unknown stage {name!r} (known: {', '.join(STAGES)})")
    if "lpips" in getattr(stage, "frozen", {}):
        stage.frozen["lpips"] = random_lpips(weights.vgg16)
    return stage


def synthetic_batch(name: str, params: dict, batch: int, seed: int):
    """One micro-batch of `name`'s training data, as its `batches()` gives it."""
    data, vq, masks, enc = (section(params, s) for s in ("data", "vqgan", "masks", "encoder"))
    g = torch.Generator().manual_seed(seed)
    factor = 2 ** (len(vq.channel_mult) - 1)
    side = data.size // factor
    x = torch.rand(batch, 3, data.size, data.size, generator=g) * 2 - 1  # (B, 3, H, W) in [-1, 1]
    tokens = torch.randint(vq.n_embed, (batch, side, side), generator=g)  # (B, h, w)
    if name == "vqgan":
        return x
    if name == "transformer":
        flat = tokens.flatten(1)  # (B, N)
        return flat, random_visible(flat.shape, section(params, "transformer").mask_ratio, g)
    rng = np.random.default_rng(seed)
    mask = torch.from_numpy(np.stack([free_form_mask(data.size, masks.train, rng) for _ in range(batch)]))
    mask = mask.float()[:, None]  # (B, 1, H, W), 1 = visible
    if name == "encoder":
        return MaskedBatch(x, mask, tokens)
    return x, mask, tokens, token_mask(mask, enc.alpha, factor)


def first_step(name: str, params: dict) -> int:
    """The step index the stage is stepped at: the VQGAN's discriminator joins at disc_start."""
    return section(params, "vqgan").disc_start if name == "vqgan" else 0


def peak_rss() -> int:
    """This process's peak resident set (VmHWM), bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def available_memory() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no MemAvailable in /proc/meminfo")


def matmul_peak(device: torch.device, n: int = 2048, seconds: float = 2.0,
                dtype: torch.dtype = torch.float32) -> float:
    """The best matmul rate (FLOP/s) of n x n `dtype` matrices on `device`, over `seconds`."""
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    best, end = 0.0, time.perf_counter() + seconds
    while time.perf_counter() < end:
        sync(device)
        t0 = time.perf_counter()
        a @ b
        sync(device)
        best = max(best, 2 * n**3 / (time.perf_counter() - t0))
    return best


def device_peak(device: torch.device, precision: str = "fp32") -> tuple[float, str, str]:
    """(peak FLOP/s, what it is, the device's name); on a CPU in `precision`, what its steps run in
    (bf16 where train.precision auto finds bf16 units)."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, (peak, source) in VENDOR_PEAKS.items():
            if key in name:
                return peak, f"vendor figure: {source}", name
        raise ValueError(f"no vendor peak listed for {name}: add it to VENDOR_PEAKS")
    name = cpu_name()
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision, torch.float32)
    return (matmul_peak(device, dtype=dtype),
            f"measured: best {precision} 2048x2048 matmul, {torch.get_num_threads()} threads", name)


def cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return f"{line.split(':', 1)[1].strip()} ({os.cpu_count()} cores)"
    return platform.processor() or "cpu"


@contextlib.contextmanager
def threads(count: int | None):
    """torch's CPU threads set to `count` (None: left as they are) for the block."""
    before = torch.get_num_threads()
    if count:
        torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def train_step(stage, optimizers, frozen, batch, step: int, autocast, scaler) -> dict[str, float]:
    """One optimizer step of every phase, as the training loop takes it with one micro-batch and
    one process; the phases' losses."""
    view = {**frozen, **stage.modules}
    meter, scratch = Meter(), {}
    trained = [p for opt in optimizers.values() for g in opt.param_groups for p in g["params"]]
    for phase, opt in optimizers.items():
        ids = {id(p) for g in opt.param_groups for p in g["params"]}
        with only_trainable(trained, ids):
            stepped = _accumulate(stage, phase, view, [], [batch], [scratch], step, autocast, scaler, meter)
        if stepped:
            scaler.step(opt)
            opt.zero_grad(set_to_none=True)
    scaler.update()
    return {k.removeprefix("loss/"): v for k, v in meter.means().items() if k.startswith("loss/")}


def measure_stage(name: str, width: str, device: torch.device, batch: int | None, steps: int) -> dict:
    """Build stage `name`, take `steps` optimizer steps (the first counted, the rest timed)."""
    params = stage_params(width)
    batch = batch or section(params, name).batch_size
    with tempfile.TemporaryDirectory() as tmp:
        stage = build_stage(name, params, Path(tmp))
    frozen = getattr(stage, "frozen", {})
    for m in stage.modules.values():
        m.to(device).train()
    for m in frozen.values():
        m.to(device).eval().requires_grad_(False)
    optimizers = stage.optimizers(stage.modules, 1)
    trained = sum(p.numel() for m in stage.modules.values() for p in m.parameters())
    if device.type == "cpu":  # gradients, two Adam moments, a foreach temporary, 1 GiB of margin
        need, free = 4 * 4 * trained + (1 << 30), available_memory()
        if need > free:
            raise MemoryError(f"{name}: gradients and Adam state need ~{need / 2**30:.1f} GiB more, "
                              f"{free / 2**30:.1f} GiB is available")
    train_cfg = section(params, "train")
    autocast, scaler = precision_for(train_cfg.precision, device)
    capability = torch.cuda.get_device_capability(device) if device.type == "cuda" else None
    at = first_step(name, params)
    losses, times = [], []
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    counter = flop_mode(by_module=name != "decoder")  # the decoder's R1 takes autograd.grad
    for i in range(steps):
        data = to_device(synthetic_batch(name, params, batch, seed=i), device)
        sync(device)
        t0 = time.perf_counter()
        with counter if i == 0 else contextlib.nullcontext():
            losses.append(train_step(stage, optimizers, frozen, data, at + i, autocast, scaler))
        sync(device)
        times.append(time.perf_counter() - t0)
    finite = all(math.isfinite(v) for step_losses in losses for v in step_losses.values())
    return {
        "batch": batch,
        "step": at,
        "precision": resolve_precision(train_cfg.precision, device.type, capability),
        "trained_parameters": trained,
        "parameters": {k: sum(p.numel() for p in m.parameters()) for k, m in {**stage.modules, **frozen}.items()},
        "flops_per_step": counter.get_total_flops(),
        "flops_by_module": module_flops(counter),
        "warmup_s": times[0],
        "step_s": float(np.median(times[1:])) if steps > 1 else None,
        "step_times_s": times[1:],
        "losses": losses,
        "losses_finite": finite,
        "peak_memory_bytes": torch.cuda.max_memory_allocated(device) if device.type == "cuda" else peak_rss(),
        "peak_memory_kind": "torch.cuda.max_memory_allocated" if device.type == "cuda" else "VmHWM (peak RSS)",
    }


def run_isolated(name: str, args: argparse.Namespace) -> dict:
    """measure_stage in a fresh interpreter: the stage's peak memory is its own."""
    command = [sys.executable, __file__, "--one", name, "--width", args.width, "--device", args.device,
               "--steps", str(args.steps), "--threads", str(torch.get_num_threads())]
    command += ["--batch", str(args.batch)] if args.batch else []
    done = subprocess.run(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    if done.returncode != 0:
        return {"error": done.stderr.strip().splitlines()[-1] if done.stderr.strip() else f"exit {done.returncode}",
                "returncode": done.returncode}
    return json.loads(done.stdout.strip().splitlines()[-1])


def summarise(r: dict, peak: float) -> dict:
    if "error" in r or not r.get("step_s"):
        return r
    achieved = r["flops_per_step"] / r["step_s"]
    return {**r, "flops_per_s": achieved, "mfu": achieved / peak}


def h100_estimate(stages: dict, params: dict) -> dict:
    """Per stage: the FLOPs of a step at its configured batch (the counted step scaled by the batch:
    every network's FLOPs are linear in it) and its time on one H100 at H100_TRAINING_MFU."""
    peak = VENDOR_PEAKS["H100"][0]
    out = {}
    for name, r in stages.items():
        if "error" in r:
            continue
        batch = section(params, name).batch_size
        flops = r["flops_per_step"] / r["batch"] * batch
        out[name] = {"batch": batch, "steps": section(params, name).steps, "flops_per_step": flops,
                     **{f"step_ms_at_{u:.0%}": flops / (peak * u) * 1e3 for u in H100_TRAINING_MFU},
                     **{f"hours_at_{u:.0%}": flops / (peak * u) * section(params, name).steps / 3600
                        for u in H100_TRAINING_MFU}}
    return out


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default=None, help="cpu | cuda (default: cuda if available, else cpu)")
    parser.add_argument("--width", choices=sorted(WIDTHS), default="paper",
                        help="paper: params.yaml + workflow/configs/paper.yaml; reduced: params.yaml alone")
    parser.add_argument("--batch", type=int, help="micro-batch of every stage (default: each stage's batch_size)")
    parser.add_argument("--steps", type=int, default=3, help="optimizer steps per stage, the first a counted warm-up")
    parser.add_argument("--stages", nargs="+", choices=STAGES, default=list(STAGES))
    parser.add_argument("--dry-run", action="store_true",
                        help="the paper-size dry run: paper width, batch 1, two steps, on the CPU")
    parser.add_argument("--out", type=Path, help="the JSON (default: benchmarks/results/"
                                                 "paper_training_<device>_<width>.json, or paper_dry_run.json)")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    parser.add_argument("--one", choices=STAGES, help=argparse.SUPPRESS)  # a child: one stage, JSON to stdout
    args = parser.parse_args(argv)
    if args.dry_run:
        args.device, args.width, args.batch, args.steps = "cpu", "paper", 1, 2
    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(args.device)
    with threads(args.threads):
        if args.one:
            print(json.dumps(measure_stage(args.one, args.width, device, args.batch, args.steps)))
            return {}
        return measure(args, device, argv)


def measure(args: argparse.Namespace, device: torch.device, argv: list[str] | None) -> dict:
    """Every stage of `args.stages` in its own process; the results JSON written and returned."""
    load_before = os.getloadavg()
    precision = device_precision(section(stage_params(args.width), "train").precision, device)
    peak, peak_source, device_name = device_peak(device, precision)
    stages = {}
    for name in args.stages:
        r = stages[name] = summarise(run_isolated(name, args), peak)
        print(f"{name}: " + (r["error"] if "error" in r else
                             f"step {r['step_s']:.3g} s, {r['flops_per_step'] / 1e12:.3g} TFLOP, MFU {r['mfu']:.1%}, "
                             f"peak {r['peak_memory_bytes'] / 2**30:.2f} GiB"), flush=True)
    result = {
        "what": "paper-size dry run" if args.dry_run else "training step cost",
        "device": device_name,
        "width": args.width,
        "peak_flops": peak,
        "peak_source": peak_source,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "load_average_1min": {"before": load_before[0], "after": os.getloadavg()[0]},
        "command": "python benchmarks/paper_training.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "stages": stages,
    }
    if args.dry_run:
        result["passed"] = all(s.get("losses_finite") for s in stages.values())
    if device.type == "cpu":
        result["h100_estimate"] = h100_estimate(stages, stage_params(args.width))
    out = args.out or RESULTS / ("paper_dry_run.json" if args.dry_run else
                                 f"paper_training_{args.device}_{args.width}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"written to {out}")
    return result


if __name__ == "__main__":
    main()
