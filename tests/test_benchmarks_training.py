"""The paper-scale cost benchmarks at the tiny configuration, so that they do not rot: the training
step benchmark (benchmarks/paper_training.py) and the protocol estimate (benchmarks/paper_protocol.py),
and the FLOP counts they rest on, against the formulas."""

from __future__ import annotations

import json
import math
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from conftest import REPO, params

sys.path.insert(0, str(REPO / "benchmarks"))
import paper_protocol  # noqa: E402
import paper_training  # noqa: E402


def test_counted_flops_of_a_convolution_and_of_cpu_attention_are_the_formulas():
    """Conv: 2 B C_out H W C_in k^2 forward, twice that backward (input and weight gradients).
    Attention on the CPU (which FlopCounterMode leaves out by itself): 4 B h L^2 d forward
    (QK^T and AV), 2.5x that backward."""
    b, c_in, c_out, k, s = 2, 3, 8, 3, 16
    conv = nn.Conv2d(c_in, c_out, k, padding=1, bias=False)
    x = torch.randn(b, c_in, s, s, requires_grad=True)
    with paper_training.flop_mode() as counter:
        conv(x).sum().backward()
    forward = 2 * b * c_out * s * s * c_in * k * k
    assert counter.get_total_flops() == 3 * forward

    heads, length, dim = 4, 32, 16
    q = torch.randn(b, heads, length, dim, requires_grad=True)
    allowed = torch.rand(b, 1, length, length) > 0.2
    with paper_training.flop_mode(by_module=False) as counter:
        F.scaled_dot_product_attention(q, q, q, attn_mask=allowed).sum().backward()
    forward = 4 * b * heads * length * length * dim
    assert counter.get_total_flops() == forward + 10 * b * heads * length * length * dim  # backward 2.5x


def _finite_positive(name: str, stage: dict, keys=("flops_per_step", "step_s", "peak_memory_bytes",
                                                   "trained_parameters")) -> None:
    assert "error" not in stage, (name, stage)
    assert stage["losses_finite"] and stage["batch"] == 1
    for key in keys:
        assert math.isfinite(stage[key]) and stage[key] > 0, (name, key, stage[key])


def test_training_benchmark_at_reduced_width_gives_finite_positive_costs(tmp_path):
    """The two GAN stages through the command (a process each); the other two in this one."""
    out = tmp_path / "training.json"
    result = paper_training.main(["--device", "cpu", "--width", "reduced", "--batch", "1", "--steps", "2",
                                  "--threads", "1", "--stages", "vqgan", "decoder", "--out", str(out)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(result))
    assert result["peak_flops"] > 0 and "measured" in result["peak_source"]
    # MFU against the peak of what the steps ran in (bf16 on a CPU with bf16 units, else fp32).
    assert result["peak_source"].startswith(f"measured: best {result['stages']['vqgan']['precision']} 2048")
    for name, stage in result["stages"].items():
        _finite_positive(name, stage, ("flops_per_step", "step_s", "peak_memory_bytes", "mfu", "trained_parameters"))
        assert stage["mfu"] == pytest.approx(stage["flops_per_step"] / stage["step_s"] / result["peak_flops"])
    # The VQGAN is stepped past disc_start: its step runs the discriminator, with its own optimizer.
    assert result["stages"]["vqgan"]["step"] == params()["vqgan"]["disc_start"]
    assert set(result["stages"]["vqgan"]["losses"][0]) == {"vqgan", "disc"}
    assert set(result["stages"]["decoder"]["losses"][0]) == {"decoder", "disc"}
    for name in ("encoder", "transformer"):
        _finite_positive(name, paper_training.measure_stage(name, "reduced", torch.device("cpu"), 1, 2))


def test_transformer_step_flops_are_six_per_parameter_per_token_plus_attention(tmp_path):
    """The transformer's counted training FLOPs at batch 1: 6 per weight per token for its linear
    layers (2 forward, 4 backward: input and weight gradients), 4 for the input projection of the
    fixed codebook vectors (no input gradient), and attention's 4 T^2 d forward and 8 T^2 d
    backward per layer (with dropout, the CPU takes the math path: two batched matmuls forward,
    four backward); LayerNorms and the rest are elementwise work FlopCounterMode leaves out."""
    p = params()
    cfg = p["transformer"]
    params_ = paper_training.stage_params("reduced")
    stage = paper_training.build_stage("transformer", params_, tmp_path)
    model = stage.modules["transformer"]
    tokens = (p["data"]["size"] // 2 ** (len(p["vqgan"]["channel_mult"]) - 1)) ** 2
    linear = sum(m.weight.numel() for m in model.modules() if isinstance(m, nn.Linear))
    first = model.tok_proj.weight.numel()
    batch = paper_training.synthetic_batch("transformer", params_, 1, seed=0)
    with paper_training.flop_mode() as counter:
        stage.loss("transformer", stage.modules, batch, 0, {})[0].backward()
    attention = cfg["n_layer"] * 12 * tokens * tokens * cfg["n_embd"]
    assert counter.get_total_flops() == 6 * (linear - first) * tokens + 4 * first * tokens + attention


def test_protocol_estimate_at_reduced_width_counts_the_batched_calls(tmp_path):
    out = tmp_path / "protocol.json"
    result = paper_protocol.main(["--width", "reduced", "--threads", "1", "--out", str(out)])
    assert json.loads(out.read_text())["estimate"] == json.loads(json.dumps(result["estimate"]))
    assert out.with_suffix(".md").read_text().startswith("# The paper's evaluation protocol")
    for name, cost in result["modules"].items():
        if isinstance(cost, dict) and "flops" in cost:
            assert math.isfinite(cost["flops"]) and cost["flops"] >= 0, name
            # the diversity's sums are elementwise (no FLOPs the counter sees): their time is from bytes
            assert cost["flops"] > 0 or cost["bytes"] > 0, name
    ev, steps = params()["evaluate"], params()["sample"]["steps"]
    fid, div = result["calls"]["batched"]["fid (3 masks)"], result["calls"]["batched"]["diversity (box)"]
    assert fid["decoder_per_sample"] == 3 * ev["fid_images"]
    assert fid["inception"] == 4 * ev["fid_images"]  # three mask types and the real images once
    n, s = ev["diversity_images"], ev["diversity_samples"]
    assert div["encoder_restrictive"] == div["e_prt"] == n  # once per image
    assert div["transformer_step"] == n + n * s * (steps - 1)  # the first step shared by the samples
    assert div["lpips_vgg"] == n * s and div["lpips_sums"] == n * s
    per_sample = result["calls"]["per_sample"]["diversity (box)"]
    assert per_sample["encoder_restrictive"] == n * s and per_sample["transformer_step"] == n * s * steps
    batched, per_sample = result["estimate"]["batched"], result["estimate"]["per_sample"]
    assert 0 < batched["high"]["total_s"] < batched["central"]["total_s"] < batched["low"]["total_s"]
    assert batched["central"]["total_s"] < per_sample["central"]["total_s"]
    assert batched["central"]["total_s"] == pytest.approx(sum(batched["central"]["module_seconds"].values()))
    assert batched["central"]["cross_check_total_s"] > 0
    assert "biharmonic" not in " ".join(result["calls"]["batched"])  # classical, on the CPU
