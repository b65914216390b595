"""Iterative parallel decoding of the masked tokens (paper Sec. 3.2, after MaskGIT).

k steps. At step i (0-based) the transformer sees the visible tokens, its logits are divided by
T_i = t * s**i and turned into probabilities; every still-masked position draws a token from its
categorical distribution, and the n_i positions with the highest confidence (their maximum
probability, as in the authors' code) keep their draw and become visible. A cosine schedule fixes
n_i so that the counts add up to the number of masked tokens exactly. (The paper writes the
softmax as exp(t z); dividing by T, as the authors' code does, is what makes s = 0.9 sharpen the
later steps, "draw with more certainty when more evidence is present".)

Each row has its own masked count and its own random generator: a row's sample depends only on
its own tokens, mask and seed, never on which other rows share the batch (the authors' code
needs every row to have the same count; this one does not).

`sample_official` is the authors' sampler step for step, for the equivalence test with their
released models and for users who want their exact behaviour. It differs from `sample` in three
ways: the per-step counts come from row 0's masked count for the whole batch, and a step takes
min(count, 1 + (masked tokens in the batch) // B) positions per row, so a row with fewer masked
tokens re-draws known (even visible) positions once its own run out, and sampling may go on past
`steps` steps; confidence ignores visibility only through a zero (ties broken by torch.argsort,
which is not stable); draws come from torch.multinomial on the global generator.
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import numpy as np
import torch
from torch import nn


def cosine_schedule(n_masked: int, steps: int) -> list[int]:
    """Tokens accepted at each of `steps` steps; the counts add up to `n_masked` exactly.

    The number still unknown after step i follows the authors' code,
    unknowns_i = floor(N * cos(pi * i / (2 k))), i = 0..k, so unknowns_0 = N and unknowns_k = 0,
    with one change: while tokens remain, every step accepts at least one, i.e.
    unknowns_i = max(0, min(floor(N cos(pi i / 2k)), unknowns_{i-1} - 1)) for 0 < i < k. For small
    N the plain formula gives an early step nothing to do (N=4, k=5: [1, 0, 1, 1, 1]); with the
    change that work moves to the earlier step ([1, 1, 1, 1, 0]) and the schedule otherwise keeps
    the official curve. Consequences: for N >= k every step accepts at least one token (then
    floor(N cos(pi i / 2k)) >= k - i, so the clamp never starves a later step); for N < k the
    first N steps accept one token each and the rest accept none; N = 0 gives k zeros.
    """
    if steps < 1:
        raise ValueError(f"steps must be at least 1, got {steps}")
    if n_masked < 0:
        raise ValueError(f"n_masked must be non-negative, got {n_masked}")
    unknown = [n_masked]
    for i in range(1, steps):
        official = math.floor(n_masked * math.cos(math.pi * i / (2 * steps)))
        unknown.append(max(0, min(official, unknown[-1] - 1)))
    unknown.append(0)
    return [unknown[i - 1] - unknown[i] for i in range(1, steps + 1)]


def _generators(batch: int, generators, seeds) -> list[torch.Generator] | None:
    if generators is not None and seeds is not None:
        raise ValueError("pass generators or seeds, not both")
    if seeds is not None:
        generators = [torch.Generator().manual_seed(int(s)) for s in seeds]
    if generators is not None and len(generators) != batch:
        raise ValueError(f"need one generator or seed per row: {len(generators)} for {batch} rows")
    return generators


def _gumbel(shape: tuple[int, ...], generators, device: torch.device) -> torch.Tensor:
    """Gumbel noise (B, *shape), row b drawn from generators[b] on the generator's own device, so
    a CPU seed gives the same draws whatever device the model runs on."""
    if generators is None:
        u = torch.rand(shape, device=device)
    else:
        u = torch.stack([torch.rand(shape[1:], generator=g, device=g.device).to(device) for g in generators])
    return -torch.log(-torch.log(u.clamp_min(torch.finfo(u.dtype).tiny)))


@torch.no_grad()
def sample(
    model: nn.Module,
    tokens: torch.Tensor,
    visible: torch.Tensor,
    *,
    steps: int,
    temperature: float,
    anneal: float,
    generators: Sequence[torch.Generator] | None = None,
    seeds: Sequence[int] | None = None,
    first_logits: torch.Tensor | None = None,
) -> torch.Tensor:
    """Fill every masked position of `tokens` (B, N) long; `visible` (B, N) bool -> (B, N) long.

    Visible tokens are returned unchanged. `model(tokens, visible)` must return logits (B, N, K)
    (a BidirectionalTransformer; call model.eval() first for sampling without dropout).
    Randomness: one generator per row, given directly or as integer seeds; with neither, torch's
    global generator (then rows are not independently reproducible). Seeds make generators on the
    CPU, whose draws are moved to the model's device. Independence from the batch holds exactly as
    far as the model's own outputs do not vary with batch size (on a GPU, kernels chosen per
    shape may differ in the last bits).

    Temperature: T_i = temperature * anneal**i. T_i = 0 decodes greedily: each position takes its
    argmax, and the acceptance order uses the untempered probabilities (at T = 0 every maximum
    probability is 1). Tokens are drawn with the Gumbel-max trick, which is exactly a draw from
    softmax(logits / T_i).

    first_logits: model(tokens, visible) (B, N, K) when the caller has it already: the samples of
    one image share their input, so their first step's logits are computed once and expanded
    (the draws stay per row).
    """
    if temperature < 0 or anneal < 0:
        raise ValueError(f"temperature and anneal must be non-negative, got {temperature}, {anneal}")
    if tokens.shape != visible.shape or tokens.dim() != 2:
        raise ValueError(f"tokens {tuple(tokens.shape)} and visible {tuple(visible.shape)} must be the same (B, N)")
    b, n = tokens.shape
    if first_logits is not None and first_logits.shape[:2] != (b, n):
        raise ValueError(f"first_logits must be (B, N, K) = ({b}, {n}, K), got {tuple(first_logits.shape)}")
    generators = _generators(b, generators, seeds)
    visible = visible.bool().clone()
    tokens = torch.where(visible, tokens, torch.zeros_like(tokens))
    schedules = torch.tensor(
        [cosine_schedule(int(m), steps) for m in (~visible).sum(1).tolist()], device=tokens.device
    )  # (B, steps)
    positions = torch.arange(n, device=tokens.device)

    for i in range(steps):
        if visible.all():
            break
        logits = (first_logits if i == 0 and first_logits is not None else model(tokens, visible)).float()  # (B, N, K)
        t = temperature * anneal**i
        if t > 0:
            logits = logits / t
            probs = logits.softmax(-1)
            draw = (logits + _gumbel((b, n, logits.shape[-1]), generators, logits.device)).argmax(-1)
        else:
            probs = logits.softmax(-1)
            draw = logits.argmax(-1)
        confidence = probs.amax(-1).masked_fill(visible, -1.0)  # (B, N); visible never chosen
        # Rank by confidence within each row (ties by position); accept the top n_i of each row.
        order = confidence.sort(dim=1, descending=True, stable=True).indices
        accept = torch.zeros_like(visible).scatter_(1, order, positions[None] < schedules[:, i : i + 1])
        accept &= ~visible
        tokens = torch.where(accept, draw, tokens)
        visible |= accept
    return tokens


Draw = Callable[[torch.Tensor, int], torch.Tensor]  # (probs (R, K), step) -> codes (R, 1)


@torch.no_grad()
def sample_official(
    model: nn.Module,
    tokens: torch.Tensor,
    visible: torch.Tensor,
    *,
    steps: int,
    temperature: float,
    anneal: float,
    draw: str | Draw | None = None,
    on_step: Callable[[int, torch.Tensor, torch.Tensor], None] | None = None,
) -> torch.Tensor:
    """The authors' sampler (see the module docstring): fill `tokens` (B, N) where `visible` (B, N)
    is False -> (B, N) long. draw: None draws with torch.multinomial; "argmax" takes each chosen
    position's most probable code; a callable gets (probs (B*k, K), step) and returns (B*k, 1)
    codes, so a test can inject recorded draws. on_step(step, candidates (B, k), codes (B, k))
    sees every step."""
    if tokens.shape != visible.shape or tokens.dim() != 2:
        raise ValueError(f"tokens {tuple(tokens.shape)} and visible {tuple(visible.shape)} must be the same (B, N)")
    b = tokens.shape[0]
    unknown = ~visible.bool()
    tokens = torch.where(unknown, torch.zeros_like(tokens), tokens)
    n0 = int(unknown[0].sum())
    left = (n0 * np.cos(math.pi * np.arange(steps) / (2 * steps))).astype(np.int32)  # their formula, in numpy
    drawn = (left - np.append(left, 0)[1:]).tolist()
    step = 0
    while unknown.any():
        n = max(drawn[step] if step < len(drawn) else drawn[-1], 1)
        t = temperature * anneal**step
        probs = (model(tokens, ~unknown).float() / t).softmax(-1)  # (B, N, K)
        k = min(n, 1 + int(unknown.sum()) // b)
        confidence = (probs * unknown[..., None]).amax(-1)  # (B, N); 0 where known
        candidates = torch.argsort(confidence, 1, descending=True)[:, :k]  # (B, k)
        chosen = probs.gather(1, candidates[..., None].expand(-1, -1, probs.shape[-1]))  # (B, k, K)
        if draw is None:
            codes = torch.multinomial(chosen.reshape(b * k, -1), num_samples=1)
        elif draw == "argmax":
            codes = chosen.argmax(-1)
        else:
            codes = draw(chosen.reshape(b * k, -1), step)
        codes = codes.reshape(b, k).to(tokens.dtype)
        if on_step is not None:
            on_step(step, candidates, codes)
        unknown.scatter_(1, candidates, False)
        tokens = tokens.scatter(1, candidates, codes)
        step += 1
    return tokens
