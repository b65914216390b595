import pytest
import torch
import torch.nn.functional as F
from torch import nn

from conftest import REPO, params
from latent_inpaint.config import section
from latent_inpaint.params import load_params
from latent_inpaint.transformer import BidirectionalTransformer

GRID = 8  # params.yaml: 64 px through the f8 VQGAN


@pytest.fixture
def tiny():
    p = params()
    cfg, vq = section(p, "transformer"), section(p, "vqgan")
    torch.manual_seed(0)
    codebook = torch.randn(vq.n_embed, vq.embed_dim)
    return BidirectionalTransformer(cfg, codebook, GRID).eval()


def random_inputs(model, batch=3, seed=1):
    g = torch.Generator().manual_seed(seed)
    n = GRID * GRID
    tokens = torch.randint(model.n_embed, (batch, n), generator=g)
    visible = torch.rand(batch, n, generator=g) < 0.5
    return tokens, visible


def test_tiny_config_forward(tiny):
    tokens, visible = random_inputs(tiny)
    logits = tiny(tokens, visible)
    assert logits.shape == (3, GRID * GRID, 64)
    assert torch.isfinite(logits).all()
    with pytest.raises(ValueError, match="tokens"):
        tiny(tokens[:, :10], visible[:, :10])


def test_outputs_ignore_token_ids_at_masked_positions(tiny):
    tokens, visible = random_inputs(tiny)
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        reference = tiny(tokens, visible)
        for fill in (torch.randint(tiny.n_embed, tokens.shape, generator=g), torch.full_like(tokens, -1)):
            changed = torch.where(visible, tokens, fill)  # -1 or anything: masked ids are never read
            assert torch.allclose(tiny(changed, visible), reference, atol=1e-6, rtol=0)


def test_masked_position_is_not_context_but_visible_one_is(tiny):
    tokens, visible = random_inputs(tiny, batch=1)
    with torch.no_grad():
        reference = tiny(tokens, visible)[0]
        # Whatever a masked position holds (here: its positional embedding, perturbed), no other
        # position sees it; a visible position's is seen by all.
        for j, seen in ((int((~visible[0]).nonzero()[0]), False), (int(visible[0].nonzero()[0]), True)):
            others = torch.arange(GRID * GRID) != j
            saved = tiny.pos_emb[j].clone()
            tiny.pos_emb[j] += torch.randn(tiny.cfg.n_embd, generator=torch.Generator().manual_seed(j))
            change = (tiny(tokens, visible)[0] - reference)
            tiny.pos_emb[j] = saved
            assert change[j].abs().amax() > 1e-4
            assert (change[others].abs().amax() > 1e-4) == seen
        # Unmasking one more position (with some token) changes what the others see...
        j = int((~visible[0]).nonzero()[0])
        more = visible.clone()
        more[0, j] = True
        others = torch.arange(GRID * GRID) != j
        assert (tiny(tokens, more)[0][others] - reference[others]).abs().amax() > 1e-4
        # ...and so does changing a visible token.
        i = int(visible[0].nonzero()[0])
        changed = tokens.clone()
        changed[0, i] = (tokens[0, i] + 1) % tiny.n_embed
        others = torch.arange(GRID * GRID) != i
        assert (tiny(changed, visible)[0][others] - reference[others]).abs().amax() > 1e-4


def test_fully_masked_and_fully_visible_rows(tiny):
    n = GRID * GRID
    tokens = torch.zeros(2, n, dtype=torch.long)
    visible = torch.stack([torch.zeros(n, dtype=torch.bool), torch.ones(n, dtype=torch.bool)])
    with torch.no_grad():
        assert torch.isfinite(tiny(tokens, visible)).all()


def test_codebook_is_a_frozen_buffer_saved_with_the_model(tiny):
    assert "codebook" in tiny.state_dict()
    assert all(p is not tiny.codebook for p in tiny.parameters())
    assert not tiny.codebook.requires_grad


def test_param_groups_decay_linear_weights_only(tiny):
    decay, no_decay = tiny.param_groups(0.01)
    assert decay["weight_decay"] == 0.01 and no_decay["weight_decay"] == 0.0
    linear_weights = {id(m.weight) for m in tiny.modules() if isinstance(m, nn.Linear)}
    assert {id(p) for p in decay["params"]} == linear_weights
    names = {id(p): name for name, p in tiny.named_parameters()}
    assert {names[id(p)] for p in no_decay["params"]} >= {"mask_emb", "pos_emb", "ln_f.weight", "ln_f.bias"}
    assert all(names[id(p)].endswith("bias") or "ln" in names[id(p)] or "emb" in names[id(p)] for p in no_decay["params"])
    every = [id(p) for group in (decay, no_decay) for p in group["params"]]
    assert sorted(every) == sorted(id(p) for p in tiny.parameters())  # each exactly once


def test_paper_config_builds_on_meta_device():
    p = load_params([REPO / "params.yaml", REPO / "workflow" / "configs" / "paper.yaml"])
    cfg, vq = section(p, "transformer"), section(p, "vqgan")
    with torch.device("meta"):
        model = BidirectionalTransformer(cfg, torch.empty(vq.n_embed, vq.embed_dim), 16)
    assert all(t.is_meta for t in [*model.parameters(), *model.buffers()])
    count = model.num_parameters()
    print(f"paper transformer: {count:,} parameters")
    assert 0.9e9 < count < 1.0e9  # the paper: ~0.95 B


# ---------------------------------------------------------------------------------- learning


def pattern_maps(batch: int, k: int, g: torch.Generator) -> torch.Tensor:
    """Token maps (B, GRID*GRID) of two random codes laid out as one of four patterns."""
    r = torch.arange(GRID)[:, None].expand(GRID, GRID)
    c = torch.arange(GRID)[None, :].expand(GRID, GRID)
    layouts = torch.stack([r % 2, c % 2, (r + c) % 2, (c >= GRID // 2).long()]).flatten(1)  # (4, N)
    which = torch.randint(len(layouts), (batch,), generator=g)
    codes = torch.randint(k, (batch, 2), generator=g)
    return codes.gather(1, layouts[which])


def random_visible(tokens: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    ratio = 0.15 + 0.6 * torch.rand(tokens.shape[0], 1, generator=g)
    return torch.rand(tokens.shape, generator=g) >= ratio


def test_tiny_transformer_learns_masked_tokens(tiny):
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    model = tiny.train()
    cfg = model.cfg
    opt = torch.optim.AdamW(model.param_groups(cfg.weight_decay), lr=cfg.lr, betas=cfg.betas)
    for _ in range(150):
        tokens = pattern_maps(32, model.n_embed, g)
        visible = random_visible(tokens, g)
        logits = model(tokens, visible)
        loss = F.cross_entropy(logits[~visible], tokens[~visible])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    model.eval()
    tokens = pattern_maps(256, model.n_embed, g)
    visible = random_visible(tokens, g)
    with torch.no_grad():
        predicted = model(tokens, visible).argmax(-1)
    accuracy = (predicted[~visible] == tokens[~visible]).float().mean().item()
    chance = 1 / model.n_embed
    print(f"masked-token accuracy {accuracy:.3f} (chance {chance:.3f})")
    assert accuracy > 5 * chance
