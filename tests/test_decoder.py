"""Stage 3: the coupling of Eq. 7-8, the exact keeping of visible pixels, and the decoder stage
trained through the shared loop on the embedded data."""

from __future__ import annotations

import logging
import math

import numpy as np
import pytest
import torch

from conftest import REPO, data_config, params
from latent_inpaint.config import section
from latent_inpaint.params import load_params
from latent_inpaint.data.default import build_default_dataset
from latent_inpaint.data.ingest import prepare
from latent_inpaint.decoder import InpaintDecoder, OfficialDecoder, PartialEncoder, VanillaDecoder, couple
from latent_inpaint.masks import eval_mask
from latent_inpaint.partial_conv import token_mask
from latent_inpaint.data.tokens import load_tokens
from latent_inpaint.saved import load_model
from latent_inpaint.stages.decoder import DecoderStage
from latent_inpaint.stages.tokens import tokenize
from latent_inpaint.train import param_digest, train
from latent_inpaint.vqgan import IMAGE_CHANNELS, Encoder, Layout, VQModel

SIZE = 32  # f8: 4x4 tokens
TINY = [f"data.size={SIZE}", "data.shard_size=8", "data.workers=1", "train.workers=0", "train.eval_images=16",
        "train.checkpoint_every=1000", "tracking.enabled=false"]
STEPS = 30

log = logging.getLogger(__name__)


@pytest.fixture(scope="module")
def vq():
    return section(params(*TINY), "vqgan")


ATTN = section(params(*TINY), "encoder").attn_resolutions  # E_prt's, as the restrictive encoder's


def vqgan(vq, seed=0) -> VQModel:
    torch.manual_seed(seed)
    return VQModel(vq, SIZE).eval()


def inputs(vq, seed=1):
    """Random images, a hand-made mask (a box and a right strip), random code vectors, M̂."""
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(2, 3, SIZE, SIZE, generator=g) * 2 - 1
    mask = torch.ones(2, 1, SIZE, SIZE)
    mask[0, :, 6:20, 4:18] = 0
    mask[1, :, :, 20:] = 0
    mask[1, :, 2:5, 2:5] = 0
    z_q = torch.randn(2, vq.embed_dim, SIZE // 8, SIZE // 8, generator=g)
    return x, mask, z_q, token_mask(mask, 0.5, 8)


def dark(x, mask, fill):
    return torch.where(mask > 0.5, x, torch.full_like(x, fill) if isinstance(fill, float) else fill)


# ---------------------------------------------------------------------------------- Eq. 7-8


def test_couple_is_eq_7_8_on_a_hand_made_input():
    z = torch.tensor([[2.0, 4.0], [6.0, 8.0]]).view(1, 1, 2, 2)
    e = torch.tensor([[0.0, 2.0], [10.0, -8.0]]).view(1, 1, 2, 2)
    m = torch.tensor([[1.0, 0.0], [0.0, 1.0]]).view(1, 1, 2, 2)
    # visible tokens: E_prt; masked tokens: (Z + E_prt) / 2
    expected = torch.tensor([[0.0, 3.0], [8.0, -8.0]]).view(1, 1, 2, 2)
    assert torch.equal(couple(z, e, m), expected)
    assert torch.equal(couple(z, e, m[:, 0] > 0.5), expected)  # (B, h, w) bool as well
    two = couple(z.expand(1, 2, 2, 2), e.expand(1, 2, 2, 2), m)  # M̂ is shared by the channels
    assert torch.equal(two, expected.expand(1, 2, 2, 2))
    with pytest.raises(ValueError, match="token mask"):
        couple(z, e, torch.ones(1, 1, 3, 3))


@pytest.mark.parametrize("paper", [False, True])
def test_e_prt_has_the_full_vqgan_encoder_layout_with_the_papers_attention(vq, paper):
    """Layer for layer and name for name the VQGAN encoder on [X⊙M, M] (num_res_blocks blocks a
    level, the middle block with attention), attention at the given resolutions: 32 and 16 in
    the paper's configuration."""
    size, attn = SIZE, ATTN
    if paper:
        p = load_params([REPO / "params.yaml", REPO / "workflow" / "configs" / "paper.yaml"])
        vq, size, attn = section(p, "vqgan"), 256, section(p, "encoder").attn_resolutions
        assert attn == (32, 16)
    with torch.device("meta"):
        e_prt = PartialEncoder(vq, size, attn)
        plain = Encoder(IMAGE_CHANNELS + 1, Layout.of(vq, size, attn))
    shapes = lambda m: {k: tuple(v.shape) for k, v in m.state_dict().items()}  # noqa: E731
    assert shapes(e_prt) == shapes(plain)
    assert [lv.resolution for lv in e_prt.levels if lv.attn] == list(attn)
    assert len(e_prt.down[0].block) == vq.num_res_blocks and hasattr(e_prt.mid, "attn_1")


def test_partial_encoder_reaches_the_token_grid_and_fills_the_hole(vq):
    x, mask, _, m_hat = inputs(vq)
    torch.manual_seed(0)
    e, m = PartialEncoder(vq, SIZE, ATTN)(x, mask)
    assert e.shape == (2, vq.z_channels, SIZE // 8, SIZE // 8) and m.shape == (2, 1, SIZE // 8, SIZE // 8)
    assert (m >= m_hat).all() and m.sum() > m_hat.sum()  # standard partial convs grow the mask
    assert torch.equal(e * (1 - m), torch.zeros_like(e))


# ---------------------------------------------------------------------------------- visible pixels


@pytest.mark.parametrize("kind", ["inpaint", "vanilla"])
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_visible_pixels_are_kept_bit_for_bit_and_the_hole_content_does_not_matter(vq, kind, mode):
    torch.manual_seed(2)
    model = InpaintDecoder(vq, SIZE, ATTN) if kind == "inpaint" else VanillaDecoder(vqgan(vq))
    model.train(mode == "train")
    x, mask, z_q, m_hat = inputs(vq)
    out, raw = model(x, mask, z_q, m_hat)
    visible = (mask > 0.5).expand_as(x)
    assert torch.equal(out[visible], x[visible])
    assert torch.equal(out[~visible], raw[~visible])
    assert not torch.equal(raw[visible], x[visible])  # the paste, not the network, keeps them
    noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(3)) * 10
    for fill in (noise, 0.0, float("nan"), float("inf")):
        out2, raw2 = model(dark(x, mask, fill), mask, z_q, m_hat[:, 0])
        assert torch.equal(out2, out) and torch.equal(raw2, raw), fill


@pytest.mark.parametrize("kind", ["inpaint", "official", "vanilla"])
def test_prior_then_decode_is_the_whole_forward_and_the_prior_reads_the_image_alone(vq, kind):
    """Inference runs the prior once per image and decode once per sample: together they are
    forward, number for number (training calls forward, unchanged)."""
    torch.manual_seed(2)
    model = {"inpaint": lambda: InpaintDecoder(vq, SIZE, ATTN), "official": lambda: OfficialDecoder(vq, SIZE),
             "vanilla": lambda: VanillaDecoder(vqgan(vq))}[kind]().eval()
    x, mask, z_q, m_hat = inputs(vq)
    out, raw = model(x, mask, z_q, m_hat)
    prior = model.prior(x, mask)
    assert torch.equal(model.decode(prior, z_q, m_hat), raw)
    if kind == "inpaint":  # Eq. 7-8 spelled out: G(couple(post_quant_conv(Z), E_prt, M̂))
        e_prt = model.partial_encoder(x, mask)[0]
        assert torch.equal(prior, e_prt)
        assert torch.equal(raw, model.decoder(couple(model.post_quant_conv(z_q), e_prt, m_hat)))
    if prior is not None:  # one image's prior serves all its samples: other codes, same prior
        other = torch.randn(z_q.shape, generator=torch.Generator().manual_seed(9))
        assert torch.equal(model.prior(x, mask), prior)
        assert torch.equal(model.decode(prior, other, m_hat), model(x, mask, other, m_hat)[1])


def test_init_from_vqgan_copies_decoder_and_post_quant_conv(vq):
    model = vqgan(vq, seed=4)
    torch.manual_seed(5)
    decoder = InpaintDecoder(vq, SIZE, ATTN)
    before = decoder.decoder.conv_out.weight.clone()
    assert not torch.equal(before, model.decoder.conv_out.weight)
    decoder.init_from_vqgan(model)
    for name, source in (("decoder", model.decoder), ("post_quant_conv", model.post_quant_conv)):
        expected = source.state_dict()
        got = getattr(decoder, name).state_dict()
        assert got.keys() == expected.keys()
        assert all(torch.equal(got[k], expected[k]) for k in expected), name
    assert got["weight"].data_ptr() != expected["weight"].data_ptr()  # copies, not shared tensors
    # With every token visible and E_prt silenced, G is the VQGAN decoder on the same features.
    x, mask, z_q, _ = inputs(vq)
    with torch.no_grad():
        for p in decoder.partial_encoder.parameters():
            p.zero_()
        _, raw = decoder(x, mask, z_q, torch.zeros(2, 1, SIZE // 8, SIZE // 8))
        z = decoder.post_quant_conv(z_q)
        assert torch.allclose(raw, model.decoder(z / 2), atol=1e-5)


# ---------------------------------------------------------------------------------- the stage


@pytest.fixture(scope="module")
def data(tmp_path_factory, vq):
    """Shards of 48 default crops and the tokens a seeded, untrained VQGAN gives them."""
    root = tmp_path_factory.mktemp("decoder")
    build_default_dataset(root / "images", count=48, size=SIZE, seed=0)
    prepare(data_config(*TINY), root / "images", root / "shards", progress=False)
    tokenize(vqgan(vq), root / "shards", root / "tokens", batch_size=16, device=torch.device("cpu"))
    return root


def stage(root, vq, *overrides):
    p = params(*TINY, *overrides)
    return DecoderStage(section(p, "decoder"), section(p, "masks"), section(p, "train"), section(p, "weights"),
                        root / "shards", root / "tokens", vqgan(vq), alpha=section(p, "encoder").alpha,
                        attn_resolutions=section(p, "encoder").attn_resolutions), p


@pytest.fixture(scope="module")
def built(data, vq):
    return stage(data, vq)


def test_batches_hold_noisy_ground_truth_tokens_and_the_token_mask(data, vq, built):
    s, p = built
    truth = dict(zip(*reversed(load_tokens(data / "tokens", "train"))))
    changed, total = 0, 0
    batches = s.batches(0, 1, seed=0)
    for _ in range(4):
        x, mask, tokens, m_hat = next(batches)
        assert torch.equal(m_hat, token_mask(mask, s.alpha, 8)) and m_hat.shape == (len(x), 1, SIZE // 8, SIZE // 8)
        assert set(mask.unique().tolist()) <= {0.0, 1.0} and (mask == 0).any()
        assert tokens.dtype == torch.int64 and int(tokens.max()) < vq.n_embed
        # The loader does not return keys: recover them by the images' ground-truth tokens.
        rows = np.stack([t for t in truth.values()])
        for t in tokens.numpy():
            best = (rows != t).sum(axis=(1, 2)).min()
            changed += best
            total += t.size
    share = changed / total  # replaced tokens that drew another code
    masks = section(p, "masks")
    val = next(s.data["val"].evaluation(4, "large", masks, limit=3))  # the evaluation's fixed masks
    assert len(val.image) == 3 and all(np.array_equal(val.mask[i, 0].numpy(), eval_mask("large", SIZE, masks, "val", i))
                                       for i in range(3))
    log.info("token noise %.3f, measured share of changed tokens %.3f", section(p, "decoder").token_noise, share)
    assert 0 < share < 2 * section(p, "decoder").token_noise


def test_stage_starts_from_the_vqgan_decoder(data, vq, built):
    s, _ = built
    source = s.frozen["vqgan"].decoder.state_dict()
    got = s.modules["decoder"].decoder.state_dict()
    assert all(torch.equal(got[k], source[k]) for k in source)
    s2, _ = stage(data, vq, "decoder.init_from_vqgan=false")
    assert not torch.equal(s2.modules["decoder"].decoder.conv_out.weight, source["conv_out.weight"])
    assert s.config() != s2.config()


def test_decoder_stage_trains_both_phases_through_the_loop(data, vq, tmp_path):
    """With the tiny defaults' hole L1 term (decoder.l1_weight 1) the val hole L1 falls; Eq. 9
    alone (l1_weight 0, the paper overlay) does not in a few CPU steps (measured 0.516 -> 0.553).
    Both phases run, train their own modules only and stay finite."""
    s, p = stage(data, vq, f"decoder.steps={STEPS}", "decoder.batch_size=4", "train.log_every=10")
    every = {**s.frozen, **s.modules}
    for m in every.values():
        m.eval()
    with torch.no_grad():
        before = s.evaluate(every)
    initial = {name: param_digest({name: m}) for name, m in every.items()}
    metrics = train(s, section(p, "train"), STEPS, tmp_path / "run", section(p, "tracking"), {}, device="cpu")
    log.info("decoder stage: before %s, after %s, last train losses %s", before, metrics["eval"], metrics["train"])
    logged = metrics["train"]
    for key in ("loss/decoder", "loss/disc", "g_loss", "perceptual", "d_loss", "r1", "hole_l1"):
        assert key in logged and math.isfinite(logged[key]), (key, logged)
    assert logged["r1"] > 0
    after = metrics["eval"]
    assert set(after) == {"val_hole_l1", "val_hole_psnr"} and all(math.isfinite(v) for v in after.values()), after
    assert after["val_hole_l1"] < before["val_hole_l1"], (before, after)
    changed = {name: param_digest({name: m}) != initial[name] for name, m in every.items()}
    assert changed == {"decoder": True, "disc": True, "vqgan": False, "lpips": False}, changed
    final = tmp_path / "run" / "final"
    assert sorted(f.name for f in final.glob("*.safetensors")) == ["decoder.safetensors", "disc.safetensors"]
    with torch.no_grad():
        picture = s.pictures(every, next(s.batches(0, 1, seed=1)))
    assert picture.size[1] > 3 * SIZE  # originals, masked inputs, composites

    # The run folder alone rebuilds the trained decoder.
    loaded = load_model(tmp_path / "run")
    assert isinstance(loaded, InpaintDecoder) and not loaded.training
    x, mask, tokens, m_hat = next(s.batches(0, 1, seed=2))
    z_q = s.frozen["vqgan"].quantize.lookup(tokens)
    with torch.no_grad():
        assert torch.equal(loaded(x, mask, z_q, m_hat)[0], s.modules["decoder"].eval()(x, mask, z_q, m_hat)[0])
