"""What a forward pass runs in on a device (train.precision, sample.precision). On a GPU: bf16
autocast with TF32 matmuls from Ampere on, fp16 autocast (with a gradient scaler when training)
before it, for training and inference alike. On a CPU: training in bf16 autocast where the CPU
has bf16 units, fp32 elsewhere; inference in fp32."""

from __future__ import annotations

import torch

# bf16 and TF32 tensor cores came with Ampere (compute capability 8.0); a V100 (7.0), the paper's
# GPU, has fp16 tensor cores only, and emulates bf16 slowly.
AMPERE = (8, 0)


def cpu_computes_bf16() -> bool:
    """Whether this CPU has bf16 arithmetic (AVX512-BF16 or AMX): oneDNN's bf16 convolutions then
    run a tiny-config training step 1.5-1.7x faster than fp32 (benchmarks/results/tiny_first_run.md);
    without it bf16 is emulated, slower than fp32."""
    names = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")  # torch's own probes (private)
    return any(check() for check in (getattr(torch.cpu, name, None) for name in names) if check is not None)


def resolve_precision(precision: str, device_type: str, capability: tuple[int, int] | None = None, *,
                      inference: bool = False, cpu_bf16: bool | None = None) -> str:
    """train.precision or sample.precision (`inference`) -> what a pass runs in: "bf16" | "fp16" |
    "fp32". auto on CUDA: bf16 (and TF32 matmuls) from Ampere on, fp16 with a gradient scaler
    before it. auto on a CPU: training in bf16 where the CPU computes it (`cpu_bf16`, default:
    cpu_computes_bf16()), else fp32; inference in fp32, so that a sample drawn in a batch stays
    bit for bit the one drawn alone (inpaint.py). Other devices: fp32."""
    if precision != "auto":
        return precision
    if device_type == "cuda":
        return "bf16" if capability is not None and tuple(capability) >= AMPERE else "fp16"
    if device_type == "cpu" and not inference:
        return "bf16" if (cpu_computes_bf16() if cpu_bf16 is None else cpu_bf16) else "fp32"
    return "fp32"


def device_precision(precision: str, device: torch.device, *, inference: bool = False) -> str:
    """resolve_precision for this device (its CUDA capability, or this CPU)."""
    capability = torch.cuda.get_device_capability(device) if device.type == "cuda" else None
    return resolve_precision(precision, device.type, capability, inference=inference)


def precision_for(precision: str, device: torch.device, *, inference: bool = False):
    """(autocast: a callable giving the context of a forward pass, its GradScaler) for
    train.precision (sample.precision: `inference`) on `device`. The scaler is disabled (a
    pass-through) except under fp16, whose small range underflows gradients without it. Allows
    TF32 matmuls where bf16 runs on a GPU."""
    resolved = device_precision(precision, device, inference=inference)
    if resolved == "bf16" and device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(resolved)
    scaler = torch.amp.GradScaler(device.type, enabled=resolved == "fp16")
    return (lambda: torch.autocast(device.type, dtype=dtype or torch.bfloat16, enabled=dtype is not None)), scaler
