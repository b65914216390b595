"""What a forward pass runs in on a device (train.precision, sample.precision): fp32 on the CPU;
on a GPU bf16 autocast with TF32 matmuls from Ampere on, fp16 autocast (with a gradient scaler
when training) before it. Training and inference share it."""

from __future__ import annotations

import torch

# bf16 and TF32 tensor cores came with Ampere (compute capability 8.0); a V100 (7.0), the paper's
# GPU, has fp16 tensor cores only, and emulates bf16 slowly.
AMPERE = (8, 0)


def resolve_precision(precision: str, device_type: str, capability: tuple[int, int] | None = None) -> str:
    """train.precision -> what a step runs in: "bf16" | "fp16" | "fp32". auto: fp32 off CUDA;
    bf16 (and TF32 matmuls) from Ampere on; fp16 with a gradient scaler before it."""
    if precision != "auto":
        return precision
    if device_type != "cuda":
        return "fp32"
    return "bf16" if capability is not None and tuple(capability) >= AMPERE else "fp16"


def precision_for(precision: str, device: torch.device):
    """(autocast: a callable giving the context of a forward pass, its GradScaler) for
    train.precision on `device`. The scaler is disabled (a pass-through) except under fp16,
    whose small range underflows gradients without it. Allows TF32 matmuls where bf16 runs."""
    capability = torch.cuda.get_device_capability(device) if device.type == "cuda" else None
    resolved = resolve_precision(precision, device.type, capability)
    if resolved == "bf16" and device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(resolved)
    scaler = torch.amp.GradScaler(device.type, enabled=resolved == "fp16")
    return (lambda: torch.autocast(device.type, dtype=dtype or torch.bfloat16, enabled=dtype is not None)), scaler
