import argparse
import datetime
import dataclasses
import logging
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from latent_inpaint.config import section
from latent_inpaint.params import load_params
from latent_inpaint.taming import import_taming_checkpoint
from latent_inpaint.vqgan import (
    AttnBlock,
    Downsample,
    VectorQuantizer,
    VQModel,
    count_parameters,
    encoder_levels,
)

REPO = Path(__file__).resolve().parents[1]
TAMING_KEYS = Path(__file__).parent / "fixtures" / "taming_vqgan_f16_1024_keys.txt"
# taming-transformers' f16 VQModel without its loss module, counted by building taming's own
# Encoder/Decoder (see the fixture's header): encoder 29,298,176 + decoder 42,449,795 + codebook
# 262,144 + quant_conv and post_quant_conv 2 x 65,792.
TAMING_F16_PARAMS = 72_141_699
SIZE = 64  # params.yaml data.size


@pytest.fixture(scope="module")
def tiny_cfg():
    return section(load_params([REPO / "params.yaml"]), "vqgan")


@pytest.fixture(scope="module")
def paper_cfg():
    return section(load_params([REPO / "params.yaml", REPO / "workflow" / "configs" / "paper.yaml"]), "vqgan")


def tiny_model(cfg, seed=0) -> VQModel:
    torch.manual_seed(seed)
    return VQModel(cfg, SIZE)


def images(n=2, seed=1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, SIZE, SIZE, generator=g) * 2 - 1


def smooth_images() -> torch.Tensor:
    """Two colour ramps: learnable in a few steps, unlike noise."""
    t = torch.linspace(-1, 1, SIZE)
    y, x = torch.meshgrid(t, t, indexing="ij")
    return torch.stack([torch.stack([0.8 * x, 0.6 * y, x * y]), torch.stack([-0.7 * y, 0.5 * x, 0.3 + 0 * x])])


# ---------------------------------------------------------------------------------- paper layout


def test_paper_config_has_taming_f16_parameter_names_and_count(paper_cfg):
    with torch.device("meta"):
        model = VQModel(paper_cfg, 256)
    assert all(p.is_meta for p in model.parameters())
    lines = TAMING_KEYS.read_text().splitlines()
    assert lines[0].startswith("#")
    expected = {line for line in lines if line and not line.startswith("#")}
    keys = set(model.state_dict())
    assert keys == expected, (sorted(expected - keys)[:10], sorted(keys - expected)[:10])
    assert count_parameters(model) == TAMING_F16_PARAMS
    assert tuple(model.state_dict()["quantize.embedding.weight"].shape) == (1024, 256)
    assert model.last_layer() is model.decoder.conv_out.weight


def test_encoder_levels_follow_the_f16_layout(paper_cfg):
    levels = encoder_levels(paper_cfg.base_channels, paper_cfg.channel_mult, 256, paper_cfg.attn_resolutions)
    assert [lv.resolution for lv in levels] == [256, 128, 64, 32, 16]
    assert [lv.channels for lv in levels] == [128, 128, 256, 256, 512]
    assert [lv.in_channels for lv in levels] == [128, 128, 128, 256, 256]
    assert [lv.attn for lv in levels] == [False, False, False, False, True]
    assert [lv.downsample for lv in levels] == [True, True, True, True, False]


def test_attention_is_softmax_of_scaled_dot_products():
    torch.manual_seed(0)
    block = AttnBlock(32)
    x = torch.randn(2, 32, 3, 5)
    h = block.norm(x)
    q, k, v = (m(h).flatten(2) for m in (block.q, block.k, block.v))  # (B, C, N)
    weights = torch.softmax(q.transpose(1, 2) @ k / math.sqrt(32), dim=-1)  # (B, N query, N key)
    expected = x + block.proj_out((v @ weights.transpose(1, 2)).reshape(2, 32, 3, 5))
    torch.testing.assert_close(block(x), expected, atol=1e-5, rtol=1e-5)


def test_downsample_pads_right_and_bottom_only():
    down = Downsample(2)
    with torch.no_grad():
        down.conv.weight.zero_()
        down.conv.bias.zero_()
        for c in range(2):
            down.conv.weight[c, c, 1, 1] = 1.0  # centre tap
    x = torch.arange(2 * 8 * 8, dtype=torch.float32).reshape(1, 2, 8, 8)
    # With taming's (0, 1, 0, 1) padding the centre of output (i, j) is input (2i+1, 2j+1).
    assert torch.equal(down(x), x[:, :, 1::2, 1::2])


# ---------------------------------------------------------------------------------- quantizer


def hand_quantizer(beta=0.25) -> VectorQuantizer:
    q = VectorQuantizer(n_embed=2, embed_dim=2, beta=beta)
    with torch.no_grad():
        q.embedding.weight.copy_(torch.tensor([[0.0, 0.0], [1.0, 1.0]]))
    return q


def hand_vectors() -> torch.Tensor:
    # Three 2-d vectors on a 1x3 grid: (0.1, 0.2) -> code 0, (0.9, 1.3) -> code 1,
    # (0.6, 0.3) -> code 0 (squared distances 0.45 vs 0.65).
    return torch.tensor([[0.1, 0.2], [0.9, 1.3], [0.6, 0.3]]).T.reshape(1, 2, 1, 3)


def test_codebook_loss_puts_beta_on_the_encoder_side():
    q = hand_quantizer(beta=0.25)
    z = hand_vectors().requires_grad_(True)
    z_q, loss, indices = q(z)
    assert indices.tolist() == [[[0, 1, 0]]]
    # Squared errors 0.05 + 0.10 + 0.45 = 0.60 over 6 elements: mse 0.1; loss = (1 + beta) * 0.1.
    assert loss.item() == pytest.approx(0.125, abs=1e-7)
    loss.backward()
    # Encoder side: beta * 2 (z - e) / 6.
    codes = torch.tensor([[0.0, 0.0], [1.0, 1.0], [0.0, 0.0]]).T.reshape(1, 2, 1, 3)
    torch.testing.assert_close(z.grad, 0.25 * 2 * (hand_vectors() - codes) / 6)
    # Codebook side, full weight: 2 (e - z) / 6 summed over the vectors that chose the code:
    # code 0 <- (0.1, 0.2), (0.6, 0.3): 2 * (-0.7, -0.5) / 6; code 1 <- (0.9, 1.3): 2 * (0.1, -0.3) / 6.
    torch.testing.assert_close(q.embedding.weight.grad, torch.tensor([[-0.7, -0.5], [0.1, -0.3]]) / 3)


def test_gradient_passes_straight_through_to_the_encoder_output():
    q = hand_quantizer()
    z = hand_vectors().requires_grad_(True)
    z_q, _, indices = q(z)
    z_q.retain_grad()
    w = torch.tensor([[[[1.0, -2.0, 3.0]], [[0.5, 4.0, -1.0]]]])
    (z_q * w).sum().backward()
    assert torch.equal(z.grad, z_q.grad)
    assert torch.equal(z.grad, w)
    assert q.embedding.weight.grad is None  # codes move only through the codebook loss
    assert torch.equal(z_q.detach(), q.lookup(indices))  # values are exactly the code vectors


def test_nearest_code_is_the_l2_nearest_not_the_largest_dot_product():
    q = VectorQuantizer(n_embed=4, embed_dim=2, beta=0.25)
    with torch.no_grad():
        q.embedding.weight.copy_(torch.tensor([[1.0, 0.0], [3.0, 0.0], [0.0, 1.0], [-1.0, -1.0]]))
    vectors = torch.tensor([[1.2, 0.0], [2.1, 0.1], [0.1, 0.8], [-0.4, -0.9], [0.0, 0.0]])
    z = vectors.T.reshape(1, 2, 1, 5)
    # (1.2, 0) has its largest dot product with (3, 0) but lies nearest (1, 0).
    assert q.nearest(z).tolist() == [[[0, 1, 2, 3, 0]]]
    assert q.lookup(torch.tensor([[[3, 1]]])).tolist() == [[[[-1.0, 3.0]], [[-1.0, 0.0]]]]


def test_codebook_starts_uniform_in_plus_minus_one_over_k():
    q = VectorQuantizer(n_embed=64, embed_dim=32, beta=0.25)
    w = q.embedding.weight
    assert w.abs().max() <= 1 / 64 and w.abs().max() > 0.9 / 64


# ---------------------------------------------------------------------------------- tiny model


def test_tiny_config_forward_gives_8x8_tokens_and_sane_images(tiny_cfg):
    model = tiny_model(tiny_cfg)
    assert model.factor == 8  # the tiny config is f8: 8x8 tokens at 64 px
    x = images(3)
    xrec, qloss, indices = model(x)
    assert xrec.shape == x.shape
    assert indices.shape == (3, 8, 8) and indices.dtype == torch.long
    assert 0 <= indices.min() and indices.max() < tiny_cfg.n_embed
    assert qloss.ndim == 0 and torch.isfinite(qloss) and qloss > 0
    assert torch.isfinite(xrec).all() and xrec.abs().max() < 10


def test_a_size_the_factor_does_not_divide_is_refused(tiny_cfg):
    with pytest.raises(ValueError, match="image size 60 is not a multiple of the VQGAN's down-sampling factor 8"):
        VQModel(tiny_cfg, 60)


def test_decoding_tokens_equals_decoding_the_quantized_vectors(tiny_cfg):
    model = tiny_model(tiny_cfg).eval()
    with torch.no_grad():
        z_q, _, indices = model.encode(images())
        assert torch.equal(model.quantize.lookup(indices), z_q)
        direct = model.decode(z_q)
        assert torch.equal(model.decode(model.quantize.lookup(indices)), direct)
        assert torch.equal(model.decode_indices(indices), direct)


def test_tokenize_is_deterministic_and_restores_the_mode(tiny_cfg):
    model = tiny_model(tiny_cfg).train()
    x = images()
    tokens = model.tokenize(x)
    assert model.training
    assert torch.equal(model.tokenize(x), tokens)
    assert torch.equal(tiny_model(tiny_cfg).tokenize(x), tokens)
    assert torch.equal(model.encode(x)[2], tokens)
    assert not tokens.requires_grad


def test_reconstruction_loss_falls_and_reaches_encoder_and_codebook(tiny_cfg):
    model = tiny_model(tiny_cfg)
    x = smooth_images()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    losses = []
    for step in range(25):
        xrec, qloss, _ = model(x)
        rec = F.l1_loss(xrec, x)
        opt.zero_grad()
        (rec + qloss).backward()
        if step == 0:
            assert model.encoder.conv_in.weight.grad.abs().sum() > 0
            assert model.quantize.embedding.weight.grad.abs().sum() > 0
        opt.step()
        losses.append(rec.item())
    assert losses[-1] < 0.7 * losses[0], losses


# ---------------------------------------------------------------------------------- import


def taming_checkpoint(model: VQModel, path: Path, extra: dict | None = None) -> Path:
    state = {k: v.clone() for k, v in model.state_dict().items()}
    state["loss.logvar"] = torch.zeros(())
    state["loss.discriminator.main.0.weight"] = torch.randn(64, 3, 4, 4)
    state["loss.perceptual_loss.lin0.model.1.weight"] = torch.randn(1, 64, 1, 1)
    torch.save({"state_dict": state, "global_step": 7, "epoch": 1, **(extra or {})}, path)
    return path


def test_import_round_trips_a_taming_checkpoint(tiny_cfg, tmp_path, caplog):
    source = tiny_model(tiny_cfg, seed=3)
    path = taming_checkpoint(source, tmp_path / "last.ckpt")
    with caplog.at_level(logging.INFO, logger="latent_inpaint.taming"):
        model = import_taming_checkpoint(path, tiny_cfg, SIZE)
    assert "3 loss.* tensors dropped" in caplog.text
    assert not any(p.is_meta for p in model.parameters())
    for k, v in source.state_dict().items():
        assert torch.equal(model.state_dict()[k], v), k
    x = images()
    assert torch.equal(model.tokenize(x), source.tokenize(x))


def test_import_reads_safetensors(tiny_cfg, tmp_path):
    source = tiny_model(tiny_cfg, seed=4)
    path = tmp_path / "vqgan.safetensors"
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(path))
    model = import_taming_checkpoint(path, tiny_cfg, SIZE)
    assert torch.equal(model.quantize.embedding.weight, source.quantize.embedding.weight)


def test_import_names_missing_and_unexpected_keys(tiny_cfg, tmp_path):
    source = tiny_model(tiny_cfg)
    state = source.state_dict()
    state["quantize.embed.weight"] = state.pop("quantize.embedding.weight")
    path = tmp_path / "renamed.ckpt"
    torch.save({"state_dict": state}, path)
    with pytest.raises(ValueError) as err:
        import_taming_checkpoint(path, tiny_cfg, SIZE)
    message = str(err.value)
    assert str(path) in message
    assert "missing (1): quantize.embedding.weight" in message
    assert "unexpected (1): quantize.embed.weight" in message


def test_import_names_the_first_shape_mismatch(tiny_cfg, tmp_path):
    path = taming_checkpoint(tiny_model(tiny_cfg), tmp_path / "last.ckpt")
    bigger = dataclasses.replace(tiny_cfg, n_embed=2 * tiny_cfg.n_embed)
    with pytest.raises(ValueError, match=r"quantize\.embedding\.weight is \(64, 32\) in the checkpoint, \(128, 32\)"):
        import_taming_checkpoint(path, bigger, SIZE)


def test_import_refuses_arbitrary_pickles_unless_trusted(tiny_cfg, tmp_path):
    source = tiny_model(tiny_cfg)
    # An argparse.Namespace of hparams is one of the inert types Lightning files hold: read safely.
    path = taming_checkpoint(source, tmp_path / "hparams.ckpt", {"hparams": argparse.Namespace(lr=1.0)})
    assert torch.equal(import_taming_checkpoint(path, tiny_cfg, SIZE).decoder.conv_out.weight,
                       source.decoder.conv_out.weight)
    # Any other Python object is refused unless the file is trusted.
    path = taming_checkpoint(source, tmp_path / "old.ckpt", {"hparams": datetime.timedelta(days=1)})
    with pytest.raises(ValueError, match="trust_pickle"):
        import_taming_checkpoint(path, tiny_cfg, SIZE)
    model = import_taming_checkpoint(path, tiny_cfg, SIZE, trust_pickle=True)
    assert torch.equal(model.decoder.conv_out.weight, source.decoder.conv_out.weight)
