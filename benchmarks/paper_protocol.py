"""The paper's evaluation protocol for one model on one GPU, estimated from counted FLOPs.

The protocol (params.yaml + workflow/configs/paper.yaml): FID on evaluate.fid_images test images
for each of the 3 mask types, one sample each; LPIPS diversity of evaluate.diversity_images box-
masked images x evaluate.diversity_samples samples (mean over all pairs); and each ablation of
evaluate.ablations on the first evaluate.ablation_images images (box FID, one sample each).

FLOPs are counted (torch.utils.flop_counter.FlopCounterMode) on the real inference modules at
the configuration, with random weights, at `--batch` images: the restrictive encoder (and the
vanilla and miracle ones the ablations use), one transformer forward (a sampling step), the
decoder's prior E_prt and its per-sample part (post_quant_conv + G), the VQGAN decoder of the
vanilla-decoder ablation, the FID Inception-v3 (2048-d pool3, on the 299 px resize), LPIPS's VGG16
pass per sample, and the diversity's per-sample sums (metrics.diversity: the mean over all pairs
from S sum a^2 - (sum a)^2, never forming a pair). Every count
is linear in the batch, so the counts are given per image.

The calls are counted for the batched inference path (Inpainter.encode / draw / decode): the
encoder and E_prt once per image, the first sampling step once per image (its logits shared by
the image's samples), the other sample.steps - 1 steps and the decoder once per sample. The
per-sample path that preceded it (every sample through every network) is counted beside it.

GPU time = FLOPs / (peak x utilisation). Peaks are vendor figures (bf16 dense for the networks
the inference runs under bf16 autocast; TF32 dense for Inception and LPIPS, which run their
convolutions in fp32 with cuDNN's default TF32). The utilisation is an assumption, given as a
range (UTILISATION); the diversity's sums are bound by memory traffic, not FLOPs, and are
estimated from the bytes they move. Cross-check: each module's measured CPU time here
times the CPU's matmul peak measured just before it gives the FLOPs it "costs" at matmul efficiency
(non-matmul work included); scaled to the GPU's peak at the same utilisation that is a second
estimate. Not counted: JPEG decoding, masks, hole L1/PSNR/SSIM on the host (timed here per
image, reported apart), the classical biharmonic baseline (CPU: evaluate.baseline_images), the
Fréchet distances (a 2048 x 2048 matrix square root per score, seconds).

    python benchmarks/paper_protocol.py                      # paper config, CPU counts, H100 estimate
    python benchmarks/paper_protocol.py --width reduced      # the tiny config (the test)
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from paper_training import (  # noqa: E402  (a sibling script)
    RESULTS, WIDTHS, cpu_name, flop_mode, matmul_peak, random_lpips, stage_params, threads,
)

from latent_inpaint.config import section, to_dict  # noqa: E402
from latent_inpaint.decoder import VanillaDecoder, build_decoder  # noqa: E402
from latent_inpaint.encoder import build_encoder  # noqa: E402
from latent_inpaint.evaluate.fid import FID  # noqa: E402
from latent_inpaint.evaluate.metrics import diversity, hole_l1, hole_psnr, ssim  # noqa: E402
from latent_inpaint.masks import KINDS, free_form_mask  # noqa: E402
from latent_inpaint.partial_conv import token_mask  # noqa: E402
from latent_inpaint.train.distributed import seed_everything  # noqa: E402
from latent_inpaint.transformer import build_transformer  # noqa: E402
from latent_inpaint.vqgan import VQModel  # noqa: E402

# Vendor datasheet figures for the H100 SXM (dense): bf16 and TF32 tensor cores, HBM3 bandwidth.
H100 = {"name": "H100 SXM", "bf16": 989e12, "tf32": 494.7e12, "bandwidth": 3.35e12}
# Model FLOPs utilisation assumed for batched inference (batch 32 images, bf16 autocast, no
# torch.compile), per family; low / central / high, not measured on a GPU here. The transformer:
# its GEMMs are large ((32 x 256) x 1408 by 1408 x 4224, 60-70% of peak alone), but attention
# over 256 tokens, LayerNorms, the K-way softmax and the sampler's sort are memory-bound. The
# convolutional nets (3x3 convs of 128-512 channels from 256^2 down to 16^2, GroupNorm, the
# partial convolutions' mask updates) commonly run at 20-40% of peak in PyTorch eager. The
# paper's own V100 timings at batch 1 (`paper_anchor`) put its sampling at 1.7-1.9x the share
# of peak of its encoder and decoder; this CPU's measurements order them the same way.
UTILISATION = {"low": {"transformer": 0.35, "convolutional": 0.20},
               "central": {"transformer": 0.50, "convolutional": 0.30},
               "high": {"transformer": 0.65, "convolutional": 0.40}}
FAMILY = {"transformer_step": "transformer"}  # every other module: convolutional
# The diversity's sums (in the table at their FLOPs; their time from their bytes): per sample its
# features are read, widened to float64, squared and added to two running sums: about this many
# fp32-sized passes over one sample's features.
SUM_PASSES = 6
SUM_BANDWIDTH_SHARE = 0.7  # of the HBM bandwidth an elementwise kernel chain sustains
# The paper's own inference time (supplementary): one 256 px image on a V100 at batch 1, in ms,
# and the V100's vendor peaks (the paper does not say which precision it ran).
PAPER_V100_MS = {"encoder": 25, "sampling": 228, "decoder": 61}
V100 = {"fp32": 15.7e12, "fp16": 125e12}


def timed(fn, device: torch.device) -> tuple[dict, float, float]:
    """(FLOPs counted on a first call, by module; the seconds of a second call; the matmul peak
    measured just before it, which shares its moment's load on cores other jobs use too)."""
    with torch.no_grad(), flop_mode() as counter:
        fn()
    counts = {name: sum(c.values()) for name, c in counter.get_flop_counts().items()}
    peak = matmul_peak(device, seconds=0.5)
    t0 = time.perf_counter()
    with torch.no_grad():
        fn()
    return counts, time.perf_counter() - t0, peak


def inputs(params: dict, batch: int, seed: int = 0) -> dict:
    """Random images in [-1, 1], large free-form masks, random tokens, at the configuration."""
    data, vq, masks, enc = (section(params, s) for s in ("data", "vqgan", "masks", "encoder"))
    factor = 2 ** (len(vq.channel_mult) - 1)
    g, rng = torch.Generator().manual_seed(seed), np.random.default_rng(seed)
    x = torch.rand(batch, 3, data.size, data.size, generator=g) * 2 - 1  # (B, 3, H, W)
    mask = torch.from_numpy(np.stack([free_form_mask(data.size, masks.large, rng) for _ in range(batch)]))
    mask = mask.float()[:, None]  # (B, 1, H, W), 1 = visible
    side = data.size // factor
    tokens = torch.randint(vq.n_embed, (batch, side, side), generator=g)  # (B, h, w)
    return {"x": x, "mask": mask, "tokens": tokens, "m_hat": token_mask(mask, enc.alpha, factor),
            "uint8": ((x + 1) * 127.5).round().clamp(0, 255).byte().permute(0, 2, 3, 1)}  # (B, H, W, 3)


def module_costs(params: dict, batch: int, device: torch.device) -> dict[str, dict]:
    """{module: {"flops": per image, "cpu_s": per image}} for every network the protocol runs."""
    vq, enc_cfg, weights = section(params, "vqgan"), section(params, "encoder"), section(params, "weights")
    size = section(params, "data").size
    seed_everything(0)
    vqgan = VQModel(vq, size).eval()
    t = inputs(params, batch)
    x, mask, m_hat = t["x"], t["mask"], t["m_hat"]
    z_q = vqgan.quantize.lookup(t["tokens"])  # (B, embed_dim, h, w)
    flat = t["tokens"].flatten(1)  # (B, N)
    visible = m_hat.flatten(1).bool()
    costs: dict[str, dict] = {}

    def add(name: str, fn) -> None:
        counts, seconds, peak = timed(fn, device)
        costs[name] = {"flops": counts.get("Global", 0) / batch, "cpu_s": seconds / batch, "cpu_peak_flops": peak}

    for kind in ("restrictive", "vanilla", "miracle"):
        encoder = build_encoder(kind, vq, enc_cfg, size, vqgan).eval()
        add(f"encoder_{kind}", lambda: encoder(x, mask))
        del encoder
    transformer = build_transformer(section(params, "transformer"), vqgan.quantize.embedding.weight.detach(),
                                    size // vqgan.factor).eval()
    costs["transformer_parameters"] = sum(p.numel() for p in transformer.parameters())
    add("transformer_step", lambda: transformer(flat, visible))
    del transformer
    decoder = build_decoder("paper", vq, size, enc_cfg.attn_resolutions).eval()
    prior = decoder.prior(x, mask)
    add("e_prt", lambda: decoder.prior(x, mask))
    add("decoder_per_sample", lambda: decoder.decode(prior, z_q, m_hat))
    del decoder
    vanilla = VanillaDecoder(vqgan).eval()
    add("decoder_vanilla", lambda: vanilla(x, mask, z_q, m_hat))
    fid = FID("stand-in", device=device, batch_size=batch, dims=2048)
    add("inception", lambda: fid.features(t["uint8"]))
    lpips = random_lpips(weights.vgg16).to(device)
    add("lpips_vgg", lambda: lpips.net(lpips.scaling_layer(x)))
    # diversity() over 2 samples runs 2 VGG passes and adds both samples to its sums: per sample, half.
    first = t["uint8"][0].numpy()
    two_counts, two_s, _ = timed(lambda: diversity([first, first[::-1].copy()], lpips), device)
    costs["lpips_sums"] = {"flops": (two_counts["Global"] - 2 * costs["lpips_vgg"]["flops"]) / 2,
                           "cpu_s": max(two_s - 2 * costs["lpips_vgg"]["cpu_s"], 0.0) / 2,
                           "bytes": SUM_PASSES * 4 * lpips_feature_size(lpips, x[:1])}
    costs["host_metrics"] = {"cpu_s": host_metrics_seconds(t["uint8"].numpy(), mask[:, 0].numpy())}
    return costs


def lpips_feature_size(lpips, x: torch.Tensor) -> int:
    """Values in one sample's five VGG feature maps, the tensors the diversity's sums read."""
    with torch.no_grad():
        return sum(f[0].numel() for f in lpips.net(lpips.scaling_layer(x)))


def host_metrics_seconds(images: np.ndarray, masks: np.ndarray) -> float:
    """Seconds per image of the hole L1, PSNR and SSIM the evaluation computes on the host."""
    t0 = time.perf_counter()
    for image, mask in zip(images, masks):
        other = image[::-1].copy()
        hole_l1(other, image, mask), hole_psnr(other, image, mask), ssim(other, image)
    return (time.perf_counter() - t0) / len(images)


def calls(params: dict, batched: bool) -> dict[str, dict[str, float]]:
    """{part of the protocol: {module: calls}}; `batched`: the path that runs the encoder, E_prt
    and the first sampling step once per image, else every network once per sample."""
    ev, steps = section(params, "evaluate"), section(params, "sample").steps
    kinds, n_fid, n_abl = len(KINDS), ev.fid_images, ev.ablation_images
    n_div, samples = ev.diversity_images, ev.diversity_samples

    def inpaint(images: int, per_image: int, encoder: str = "encoder_restrictive", vanilla_decoder: bool = False):
        runs = images if batched else images * per_image  # the per-image networks run this often
        out = {encoder: runs, "transformer_step": runs + images * per_image * (steps - 1) if batched
               else images * per_image * steps}
        if vanilla_decoder:
            out["decoder_vanilla"] = images * per_image
        else:
            out |= {"e_prt": runs, "decoder_per_sample": images * per_image}
        return out

    parts = {
        "fid (3 masks)": _sum(inpaint(n_fid * kinds, 1), {"inception": n_fid * kinds + n_fid}),
        "diversity (box)": _sum(inpaint(n_div, samples), {"lpips_vgg": n_div * samples,
                                                           "lpips_sums": n_div * samples}),
    }
    for name in ev.ablations:
        if name == "biharmonic":
            continue  # classical, on the CPU
        part = inpaint(n_abl, 1, encoder={"vanilla_encoder": "encoder_vanilla",
                                          "miracle_encoder": "encoder_miracle"}.get(name, "encoder_restrictive"),
                       vanilla_decoder=name == "vanilla_decoder")
        parts[f"ablation {name}"] = _sum(part, {"inception": 2 * n_abl})  # each job: its real and inpainted
    return parts


def _sum(*counts: dict) -> dict:
    out: dict = {}
    for c in counts:
        for k, v in c.items():
            out[k] = out.get(k, 0) + v
    return out


PRECISION = {"inception": "tf32", "lpips_vgg": "tf32", "lpips_sums": "tf32"}  # the rest: bf16


def paper_anchor(costs: dict, steps: int) -> dict:
    """The utilisation the paper's V100 batch-1 timings imply for our counted FLOPs (encoder;
    `steps` transformer steps; E_prt and G), against the V100's fp32 and fp16 peaks."""
    flops = {"encoder": costs["encoder_restrictive"]["flops"], "sampling": steps * costs["transformer_step"]["flops"],
             "decoder": costs["e_prt"]["flops"] + costs["decoder_per_sample"]["flops"]}
    return {part: {"ms": ms, "flops": flops[part],
                   **{f"utilisation_{p}": flops[part] / (ms / 1e3) / peak for p, peak in V100.items()}}
            for part, ms in PAPER_V100_MS.items()}


def estimate(costs: dict, parts: dict) -> dict:
    """Seconds on the H100 per part and in all, at each utilisation, from counted FLOPs and from
    the CPU cross-check; the diversity sums' memory-bound time separately."""
    gpu = {}
    for level, u in UTILISATION.items():
        per_part, cross, per_module = {}, {}, {}
        for part, count in parts.items():
            flops_s = cross_s = 0.0
            for module, n in count.items():
                peak = H100[PRECISION.get(module, "bf16")] * u[FAMILY.get(module, "convolutional")]
                if module == "lpips_sums":  # bound by the bytes it moves, not its FLOPs
                    seconds = n * max(costs[module]["flops"] / peak,
                                      costs[module]["bytes"] / (H100["bandwidth"] * SUM_BANDWIDTH_SHARE))
                    cross_s += seconds
                else:
                    seconds = n * costs[module]["flops"] / peak
                    cross_s += n * costs[module]["cpu_s"] * costs[module]["cpu_peak_flops"] / peak
                flops_s += seconds
                per_module[module] = per_module.get(module, 0.0) + seconds
            per_part[part], cross[part] = flops_s, cross_s
        gpu[level] = {"utilisation": u, "seconds": per_part, "total_s": sum(per_part.values()),
                      "module_seconds": per_module,
                      "cross_check_seconds": cross, "cross_check_total_s": sum(cross.values())}
    return gpu


def total_flops(costs: dict, count: dict) -> float:
    return sum(n * costs[m]["flops"] for m, n in count.items())


def markdown(result: dict) -> str:
    est, parts = result["estimate"]["batched"], result["calls"]["batched"]
    lines = [
        f"# The paper's evaluation protocol on one {H100['name']}: an estimate",
        "",
        f"From FLOPs counted on the real inference modules at the {result['width']} configuration "
        f"(`{result['command']}`, {result['device']}); GPU time = FLOPs / (vendor peak x utilisation), "
        "utilisation assumed, not measured (no GPU was lent): low / central / high = "
        + " / ".join(f"{u['transformer']:.0%}" for u in UTILISATION.values()) + " for the transformer, "
        + " / ".join(f"{u['convolutional']:.0%}" for u in UTILISATION.values()) + " for the convolutional nets. "
        "Batched inference path: encoder, E_prt and the first sampling step once per image. CPU cross-check: "
        "each module's CPU time x the CPU's matmul peak, at the central utilisation.",
        "",
        "| part | inpaintings | PFLOP | minutes, low | central | high | CPU cross-check |",
        "|---|---|---|---|---|---|---|",
    ]
    for part, count in parts.items():
        n = count.get("decoder_per_sample", count.get("decoder_vanilla", 0))
        row = [f"{est[lvl]['seconds'][part] / 60:.1f}" for lvl in UTILISATION]
        lines.append(f"| {part} | {n:,} | {total_flops(result['modules'], count) / 1e15:.1f} | "
                     + " | ".join(row) + f" | {est['central']['cross_check_seconds'][part] / 60:.1f} |")
    tot = [f"**{est[lvl]['total_s'] / 60:.1f}**" for lvl in UTILISATION]
    all_flops = sum(total_flops(result["modules"], c) for c in parts.values())
    lines.append(f"| **all** | | **{all_flops / 1e15:.1f}** | " + " | ".join(tot)
                 + f" | **{est['central']['cross_check_total_s'] / 60:.1f}** |")
    per = result["estimate"]["per_sample"]["central"]["total_s"] / 60
    where = sorted(est["central"]["module_seconds"].items(), key=lambda kv: -kv[1])
    anchor = result["paper_v100_anchor"]
    lines += [
        "",
        f"The per-sample path (every network once per sample): {per:.1f} min, central. Where the time goes, "
        "central: " + ", ".join(f"{m} {s / 60:.1f} min" for m, s in where) + ". The diversity's sums "
        f"({result['protocol']['diversity_samples']} samples an image, the mean over all pairs without forming "
        f"one) are estimated from the bytes they move ({SUM_PASSES} fp32 passes over a sample's VGG features at "
        f"{SUM_BANDWIDTH_SHARE:.0%} of HBM bandwidth), not their FLOPs.",
        "",
        "The utilisation the paper's own V100 timings (batch 1, 314 ms an image) imply for these counts: "
        + ", ".join(f"{part} {a['ms']} ms = {a['utilisation_fp32']:.0%} of the fp32 peak "
                    f"({a['utilisation_fp16']:.1%} of fp16)" for part, a in anchor.items()) + ".",
        "",
        "| module | GFLOP per image | CPU s per image | share of the CPU's matmul peak (measured beside it) |",
        "|---|---|---|---|",
    ]
    for m, c in result["modules"].items():
        if isinstance(c, dict) and "cpu_peak_flops" in c:
            share = c["flops"] / c["cpu_s"] / c["cpu_peak_flops"] if c["cpu_s"] else float("nan")
            lines.append(f"| {m} | {c['flops'] / 1e9:.1f} | {c['cpu_s']:.3g} | {share:.0%} |")
    lines += ["", f"Host-side metrics (hole L1, PSNR, SSIM): {result['modules']['host_metrics']['cpu_s'] * 1e3:.0f} ms "
              "of one CPU core per inpainting, not in the GPU time.", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--width", choices=sorted(WIDTHS), default="paper")
    parser.add_argument("--batch", type=int, default=1, help="images per counted and timed call")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    parser.add_argument("--out", type=Path, help="the JSON (default: benchmarks/results/paper_protocol.json; "
                                                 "the Markdown table beside it)")
    args = parser.parse_args(argv)
    with threads(args.threads):
        return estimate_protocol(args, argv)


def estimate_protocol(args: argparse.Namespace, argv: list[str] | None) -> dict:
    """Count, time, estimate; the JSON and its Markdown table written, the result returned."""
    device = torch.device("cpu")
    params = stage_params(args.width)
    costs = module_costs(params, args.batch, device)
    counted = {"batched": calls(params, batched=True), "per_sample": calls(params, batched=False)}
    result = {
        "what": "the paper's evaluation protocol on one H100, estimated from counted FLOPs",
        "command": "python benchmarks/paper_protocol.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "device": f"{cpu_name()}, {torch.get_num_threads()} threads",
        "width": args.width,
        "gpu": H100,
        "utilisation": UTILISATION,
        "protocol": {k: v for k, v in to_dict(section(params, "evaluate")).items()
                     if k in ("fid_images", "diversity_images", "diversity_samples", "ablation_images", "ablations")}
        | {"mask_kinds": list(KINDS), "sample_steps": section(params, "sample").steps},
        "modules": costs,
        "calls": counted,
        "estimate": {path: estimate(costs, parts) for path, parts in counted.items()},
        "paper_v100_anchor": paper_anchor(costs, section(params, "sample").steps),
        "load_average_1min": os.getloadavg()[0],
    }
    out = args.out or RESULTS / "paper_protocol.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2, default=list) + "\n")
    out.with_suffix(".md").write_text(markdown(result))
    print(markdown(result))
    return result


if __name__ == "__main__":
    main()
