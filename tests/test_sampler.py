import math

import pytest
import torch
from torch import nn

from conftest import params
from latent_inpaint.config import section
from latent_inpaint.sampler import cosine_schedule, sample
from latent_inpaint.transformer import BidirectionalTransformer

GRID = 8
N = GRID * GRID
K = 64
SETTINGS = dict(steps=5, temperature=1.0, anneal=0.9)


class FixedLogits(nn.Module):
    """Test fixture, not a model: returns the same logits (N, K) for every row and input, and
    records the `visible` mask of each call."""

    def __init__(self, logits: torch.Tensor):
        super().__init__()
        self.register_buffer("logits", logits)
        self.seen: list[torch.Tensor] = []

    def forward(self, tokens, visible):
        self.seen.append(visible.clone())
        return self.logits.expand(tokens.shape[0], -1, -1)


@pytest.fixture
def tiny():
    p = params()
    cfg, vq = section(p, "transformer"), section(p, "vqgan")
    torch.manual_seed(0)
    return BidirectionalTransformer(cfg, torch.randn(vq.n_embed, vq.embed_dim), GRID).eval()


def masks(*n_masked: int) -> torch.Tensor:
    """(B, N) visible masks, row b with n_masked[b] masked positions at seeded random places."""
    g = torch.Generator().manual_seed(sum(n_masked))
    rows = []
    for m in n_masked:
        row = torch.ones(N, dtype=torch.bool)
        row[torch.randperm(N, generator=g)[:m]] = False
        rows.append(row)
    return torch.stack(rows)


def inputs(*n_masked: int) -> tuple[torch.Tensor, torch.Tensor]:
    visible = masks(*n_masked)
    tokens = torch.randint(K, visible.shape, generator=torch.Generator().manual_seed(7))
    return torch.where(visible, tokens, -1), visible  # -1 marks the holes


# ---------------------------------------------------------------------------------- schedule


def official(n: int, k: int) -> list[int]:
    unknowns = [math.floor(n * math.cos(math.pi * i / (2 * k))) for i in range(k + 1)]
    return [unknowns[i - 1] - unknowns[i] for i in range(1, k + 1)]


def test_schedule_sums_exactly_and_is_non_negative():
    for n in range(1, 257):
        for k in range(1, 11):
            counts = cosine_schedule(n, k)
            assert len(counts) == k and sum(counts) == n and min(counts) >= 0, (n, k, counts)
            if n >= k:
                assert min(counts) >= 1, (n, k, counts)
            if min(official(n, k)) >= 1:
                assert counts == official(n, k), (n, k)


def test_schedule_hand_computed_values():
    # N = 256, k = 5: 256 cos(pi i/10) = 256, 243.47, 207.11, 150.47, 79.11, 0 -> floors
    # 256, 243, 207, 150, 79, 0 -> accepted 13, 36, 57, 71, 79.
    assert cosine_schedule(256, 5) == official(256, 5) == [13, 36, 57, 71, 79]
    # N = 10, k = 5: 10, 9.51, 8.09, 5.88, 3.09, 0 -> 10, 9, 8, 5, 3, 0.
    assert cosine_schedule(10, 5) == official(10, 5) == [1, 1, 3, 2, 3]
    assert cosine_schedule(7, 1) == [7]


def test_schedule_small_counts_accept_at_least_one_while_tokens_remain():
    # Official: 4, 3.80, 3.24, 2.35, 1.24, 0 -> 4, 3, 3, 2, 1, 0: step 2 would accept nothing.
    assert official(4, 5) == [1, 0, 1, 1, 1]
    assert cosine_schedule(4, 5) == [1, 1, 1, 1, 0]
    assert cosine_schedule(2, 5) == [1, 1, 0, 0, 0]
    assert cosine_schedule(0, 5) == [0, 0, 0, 0, 0]
    with pytest.raises(ValueError):
        cosine_schedule(3, 0)
    with pytest.raises(ValueError):
        cosine_schedule(-1, 3)


# ---------------------------------------------------------------------------------- sampler


def test_sampler_keeps_visible_tokens_and_fills_every_hole(tiny):
    tokens, visible = inputs(10, 37, 0, N)  # different counts, a full row and an empty one
    out = sample(tiny, tokens, visible, seeds=[0, 1, 2, 3], **SETTINGS)
    assert out.dtype == torch.long and out.shape == tokens.shape
    assert torch.equal(out[visible], tokens[visible])
    assert ((out >= 0) & (out < K)).all()
    assert not out.requires_grad


def test_same_seed_same_sample_other_seed_other_sample(tiny):
    tokens, visible = inputs(40, 40)
    a = sample(tiny, tokens, visible, seeds=[5, 6], **SETTINGS)
    b = sample(tiny, tokens, visible, seeds=[5, 6], **SETTINGS)
    c = sample(tiny, tokens, visible, seeds=[8, 9], **SETTINGS)
    assert torch.equal(a, b)
    assert not torch.equal(a[0], c[0]) and not torch.equal(a[1], c[1])
    gens = [torch.Generator().manual_seed(5), torch.Generator().manual_seed(6)]
    assert torch.equal(sample(tiny, tokens, visible, generators=gens, **SETTINGS), a)


def test_a_rows_sample_does_not_depend_on_its_batch(tiny):
    tokens, visible = inputs(25, 50, 3)
    batch = sample(tiny, tokens, visible, seeds=[11, 12, 13], **SETTINGS)
    for row, seed in enumerate([11, 12, 13]):
        alone = sample(tiny, tokens[row : row + 1], visible[row : row + 1], seeds=[seed], **SETTINGS)
        assert torch.equal(alone[0], batch[row])


def test_first_logits_computed_once_per_input_give_the_same_samples(tiny):
    """Samples of one image share the first step's input: its logits, computed once and expanded,
    give exactly the tokens of computing them per row (the draws stay per row)."""
    tokens, visible = inputs(25, 50)
    rows = torch.tensor([0, 0, 0, 1, 1])  # three samples of the first input, two of the second
    seeds = [3, 4, 5, 3, 4]
    plain = sample(tiny, tokens[rows], visible[rows], seeds=seeds, **SETTINGS)
    first = tiny(tokens, visible)  # (2, N, K): once per input
    shared = sample(tiny, tokens[rows], visible[rows], seeds=seeds, first_logits=first[rows], **SETTINGS)
    assert torch.equal(shared, plain)
    assert not torch.equal(plain[0], plain[1])  # and the samples differ
    with pytest.raises(ValueError, match="first_logits must be"):
        sample(tiny, tokens, visible, seeds=[1, 2], first_logits=first[:1], **SETTINGS)


def test_each_row_follows_its_own_schedule_most_confident_first():
    g = torch.Generator().manual_seed(0)
    # Position p's top logit has margin p / 8 over the rest: confidence rises with position.
    logits = torch.randn(N, K, generator=g) * 0.01
    top = torch.randint(K, (N,), generator=g)
    logits[torch.arange(N), top] += torch.arange(N) / 8
    stub = FixedLogits(logits)
    tokens, visible = inputs(20, 45, 0)
    sample(stub, tokens, visible, seeds=[0, 1, 2], steps=4, temperature=1.0, anneal=1.0)
    assert len(stub.seen) == 4
    for row, n in enumerate((20, 45, 0)):
        holes = (~visible[row]).nonzero().flatten()  # ascending = least confident first
        accepted = [int((~seen[row]).sum()) for seen in stub.seen] + [0]
        assert [a - b for a, b in zip(accepted, accepted[1:])] == cosine_schedule(n, 4)
        for seen in stub.seen:  # what is still masked is always the least confident holes
            still = (~seen[row]).nonzero().flatten()
            assert torch.equal(still, holes[: len(still)])


@pytest.mark.parametrize("temperature", [0.0, 1e-6])
def test_zero_temperature_gives_the_argmax(temperature):
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(N, K, generator=g) * 3  # fixture logits: argmax known, no near-ties
    tokens, visible = inputs(30, 64)
    out = sample(FixedLogits(logits), tokens, visible, seeds=[0, 1], steps=5, temperature=temperature, anneal=0.9)
    expected = torch.where(visible, tokens, logits.argmax(-1).expand_as(tokens))
    assert torch.equal(out, expected)


def test_draws_follow_the_tempered_distribution():
    # Two codes with logits 0 and log 3 at every position: P(code 1) = 3/4 at T = 1.
    logits = torch.full((N, K), -1e9)
    logits[:, 0], logits[:, 1] = 0.0, math.log(3)
    tokens, visible = inputs(*[N] * 8)
    out = sample(FixedLogits(logits), tokens, visible, seeds=list(range(8)), steps=1, temperature=1.0, anneal=0.9)
    share = (out == 1).float().mean().item()
    assert set(out.unique().tolist()) <= {0, 1}
    assert abs(share - 0.75) < 0.05  # 512 draws: std 0.019


def test_generator_arguments_are_checked(tiny):
    tokens, visible = inputs(5, 5)
    with pytest.raises(ValueError, match="one generator"):
        sample(tiny, tokens, visible, seeds=[1], **SETTINGS)
    with pytest.raises(ValueError, match="not both"):
        sample(tiny, tokens, visible, seeds=[1, 2], generators=[torch.Generator()] * 2, **SETTINGS)
