from __future__ import annotations

import os
from pathlib import Path

import pytest

from latent_inpaint.config import section
from latent_inpaint.params import load_params

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


@pytest.fixture(autouse=True)
def _isolated_tracking(tmp_path, monkeypatch):
    """Tests never write into the project's own MLflow store or inherit a pipeline run."""
    monkeypatch.delenv("LATENT_INPAINT_INVOCATION", raising=False)
    monkeypatch.delenv("LATENT_INPAINT_TRACKING", raising=False)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow-test.db'}")


def params(*overrides: str) -> dict:
    return load_params([REPO / "params.yaml"], list(overrides))


def seeded_runs(root: Path, size: int) -> Path:
    """runs/{vqgan,encoder,transformer,decoder} of seeded, untrained models at `size` pixels, in
    the layout training writes: a stand-in for trained runs where what the weights learned does
    not matter."""
    import torch

    from latent_inpaint.decoder import InpaintDecoder
    from latent_inpaint.encoder import build_encoder
    from latent_inpaint.saved import export_final
    from latent_inpaint.transformer import BidirectionalTransformer
    from latent_inpaint.vqgan import VQModel

    p = params(f"data.size={size}")
    vq, enc, tf = section(p, "vqgan"), section(p, "encoder"), section(p, "transformer")
    torch.manual_seed(0)
    vqgan = VQModel(vq, size)
    encoder = build_encoder("restrictive", vq, enc, size)
    transformer = BidirectionalTransformer(tf, vqgan.quantize.embedding.weight.detach(), size // vqgan.factor)
    decoder = InpaintDecoder(vq, size, enc.attn_resolutions)
    for stage, model in {"vqgan": vqgan, "encoder": encoder, "transformer": transformer, "decoder": decoder}.items():
        export_final(root / stage, stage, {stage: model}, "test")
    return root


def data_config(*overrides: str):
    return section(params(*overrides), "data")


def shared_data(sub: str) -> Path:
    path = SHARED_DATA / sub
    if not path.is_dir():
        pytest.skip(f"real photographs not available here: {path} is missing (see shared/data/README.md)")
    return path


def venv_bin() -> str:
    """PATH with this interpreter's bin first, so subprocesses find latent-inpaint, snakemake, dvc."""
    import sys

    return f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
