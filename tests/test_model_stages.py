"""Stages 1 and 2 trained on the embedded data: token accuracies rise far above chance."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch

from conftest import REPO, data_config, params, venv_bin
from latent_inpaint.config import ConfigError, section
from latent_inpaint.data.default import build_default_dataset
from latent_inpaint.data.ingest import prepare
from latent_inpaint.data.tokens import load_tokens
from latent_inpaint.encoder import RestrictiveEncoder, VanillaEncoder
from latent_inpaint.saved import CheckpointMismatch, load_model, saved_spec
from latent_inpaint.stages.encoder import EncoderStage
from latent_inpaint.stages.tokens import tokenize
from latent_inpaint.stages.transformer import TransformerStage
from latent_inpaint.train import train
from latent_inpaint.transformer import BidirectionalTransformer
from latent_inpaint.vqgan import VQModel

SIZE = 32
TINY = [f"data.size={SIZE}", "data.shard_size=8", "data.workers=1", "train.workers=0", "train.eval_images=16",
        "train.checkpoint_every=1000", "tracking.enabled=false"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """Shards of 64 default crops and the tokens a (seeded, untrained) VQGAN gives them: a fixed
    function of the images, which is all the encoder and transformer need to learn from."""
    root = tmp_path_factory.mktemp("stages")
    build_default_dataset(root / "images", count=64, size=SIZE, seed=0)
    prepare(data_config(*TINY), root / "images", root / "shards", progress=False)
    torch.manual_seed(0)
    vqgan = VQModel(section(params(*TINY), "vqgan"), SIZE)
    tokenize(vqgan, root / "shards", root / "tokens", batch_size=16, device=torch.device("cpu"))
    return root, vqgan


def majority_share(tokens: np.ndarray) -> float:
    return np.bincount(tokens.ravel()).max() / tokens.size


def test_restrictive_encoder_learns_visible_tokens(data, tmp_path):
    root, vqgan = data
    p = params(*TINY, "encoder.steps=120")
    stage = EncoderStage("restrictive", vqgan, section(p, "encoder"), section(p, "masks"), section(p, "train"),
                         root / "shards", root / "tokens")
    metrics = train(stage, section(p, "train"), 120, tmp_path / "run", section(p, "tracking"), {}, device="cpu")
    val = load_tokens(root / "tokens", "val")[0]
    floor = max(1 / vqgan.cfg.n_embed, majority_share(np.asarray(val)))  # chance, or always the commonest code
    # Measured: 0.24 on val (chance 0.016; the commonest code covers 0.16 of val's tokens).
    assert metrics["eval"]["val_accuracy"] > max(5 / vqgan.cfg.n_embed, floor + 0.05), (metrics["eval"], floor)
    assert "partial_accuracy" in metrics["train"]

    # The run folder alone rebuilds the encoder; alpha, a threshold its weights do not depend
    # on, may be overridden, and nothing else the spec lacks.
    batch = next(stage.data["val"].evaluation(4, "large", section(p, "masks"), 4))
    loaded = load_model(tmp_path / "run")
    assert isinstance(loaded, RestrictiveEncoder) and loaded.alpha == section(p, "encoder").alpha
    with torch.no_grad():
        assert torch.equal(loaded(batch.image, batch.mask)[0], stage.modules["encoder"].eval()(batch.image, batch.mask)[0])
    other = load_model(tmp_path / "run", overrides={"encoder": {"alpha": 0.25}})
    assert other.alpha == 0.25 and other.encoder.conv_in.alpha == 0.25
    assert saved_spec(tmp_path / "run")["encoder"]["alpha"] == section(p, "encoder").alpha  # the folder is unchanged
    with pytest.raises(ConfigError, match="unknown key 'alpah'"):
        load_model(tmp_path / "run", overrides={"encoder": {"alpah": 0.25}})


def test_transformer_learns_masked_tokens_from_token_maps_alone(data, tmp_path):
    root, vqgan = data
    p = params(*TINY, "transformer.steps=200")
    stage = TransformerStage(section(p, "transformer"), section(p, "train"), vqgan, root / "tokens")
    metrics = train(stage, section(p, "train"), 200, tmp_path / "run", section(p, "tracking"), {}, device="cpu")
    val = load_tokens(root / "tokens", "val")[0]
    floor = max(1 / vqgan.cfg.n_embed, majority_share(np.asarray(val)))
    assert metrics["eval"]["val_masked_accuracy"] > floor + 0.1, (metrics["eval"], floor)
    assert metrics["train"]["tokens_per_s"] > 0

    # Rebuilt without the VQGAN: its codebook is in the transformer's own weights.
    loaded = load_model(tmp_path / "run")
    assert isinstance(loaded, BidirectionalTransformer)
    assert torch.equal(loaded.codebook, vqgan.quantize.embedding.weight.detach())
    tokens, visible = next(stage.batches(0, 1, seed=3))
    with torch.no_grad():
        assert torch.equal(loaded(tokens, visible), stage.modules["transformer"].eval()(tokens, visible))


def test_a_saved_spec_rebuilds_its_model_strictly(data, tmp_path):
    from latent_inpaint.saved import build_model, export_final

    _, vqgan = data
    export_final(tmp_path / "run", "vqgan", {"vqgan": vqgan}, source="test")
    spec = saved_spec(tmp_path / "run")
    assert spec == {"model": "VQModel", "vqgan": vqgan.spec()["vqgan"], "resolution": SIZE}
    with pytest.raises(CheckpointMismatch, match="does not rebuild a VQModel"):
        build_model({**spec, "colour": "blue"})
    with pytest.raises(CheckpointMismatch, match="lacks 'resolution'"):
        build_model({k: v for k, v in spec.items() if k != "resolution"})
    with pytest.raises(CheckpointMismatch, match="unknown model 'GPT'"):
        build_model({**spec, "model": "GPT"})
    with pytest.raises(CheckpointMismatch, match="holds no model 'disc'"):
        load_model(tmp_path / "run", name="disc")
    # A caller names the classes it accepts: another model in the folder is refused, naming both.
    assert isinstance(load_model(tmp_path / "run", VQModel), VQModel)
    with pytest.raises(CheckpointMismatch, match="is a VQModel, not a RestrictiveEncoder or VanillaEncoder"):
        load_model(tmp_path / "run", (RestrictiveEncoder, VanillaEncoder))
    with pytest.raises(FileNotFoundError, match="config.json is missing"):
        load_model(tmp_path / "elsewhere")


def test_figure_alpha_command_writes_the_picture(tmp_path):
    out = tmp_path / "figure3.png"
    run = subprocess.run(
        [sys.executable, "-m", "latent_inpaint.cli", "figure-alpha", "--params", str(REPO / "params.yaml"),
         "--out", str(out)], capture_output=True, text=True, check=False, env={"PATH": venv_bin()})
    assert run.returncode == 0, run.stderr
    from PIL import Image

    assert Image.open(out).size[0] > 100
