"""Reading the authors' Lightning checkpoints: safely (no code runs), strictly (missing keys and
wrong shapes named), and nothing dropped without being listed."""

from __future__ import annotations

import lzma
import sys
import types
from pathlib import Path

import pytest
import torch

from latent_inpaint.official import CheckpointError, read_checkpoint, take

FIXTURES = Path(__file__).parent / "fixtures" / "official"


LIGHTNING_CALLBACK = "pytorch_lightning.callbacks.model_checkpoint"


@pytest.fixture
def model_checkpoint_class(monkeypatch):
    """A class pickled under Lightning's name (older Lightning keys callback states by it)."""
    cls = type("ModelCheckpoint", (), {"__module__": LIGHTNING_CALLBACK})
    parts = LIGHTNING_CALLBACK.split(".")
    for i in range(1, len(parts) + 1):
        monkeypatch.setitem(sys.modules, ".".join(parts[:i]), types.ModuleType(".".join(parts[:i])))
    monkeypatch.setattr(sys.modules[LIGHTNING_CALLBACK], "ModelCheckpoint", cls, raising=False)
    return cls


def lightning_file(path: Path, state: dict, **extra) -> Path:
    weights = [v for v in state.values() if v.is_floating_point()]
    checkpoint = {
        "epoch": 1, "global_step": 10, "pytorch-lightning_version": "1.9.0", "state_dict": state,
        "optimizer_states": [{"state": {i: {"step": torch.tensor(10.0), "exp_avg": torch.zeros_like(w),
                                            "exp_avg_sq": torch.zeros_like(w)} for i, w in enumerate(weights)},
                              "param_groups": [{"lr": 1e-4, "params": list(range(len(weights)))}]}],
        "lr_schedulers": [], **extra,
    }
    torch.save(checkpoint, path)
    return path


def small_state() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "encoder.conv.weight": torch.randn(4, 3, 3, 3, generator=g),
        "encoder.conv.bias": torch.randn(4, generator=g),
        "loss.discriminator.weight": torch.randn(2, 2, generator=g),
        "first_stage_model.quantize.embedding.weight": torch.randn(8, 4, generator=g),
    }


EXPECTED = {"conv.weight": torch.Size([4, 3, 3, 3]), "conv.bias": torch.Size([4])}
DROP = {"loss/discriminator weights": ("loss.",), "embedded VQGAN copies": ("first_stage_model.",)}


def test_reads_weights_and_lists_the_rest(tmp_path, model_checkpoint_class, monkeypatch):
    state = small_state()
    path = lightning_file(tmp_path / "m.ckpt", state, callbacks={
        model_checkpoint_class: {"best_model_path": "", "kth_value": torch.tensor(1.0)}})
    monkeypatch.delitem(sys.modules, LIGHTNING_CALLBACK)  # reading must not need Lightning
    read, others = read_checkpoint(path)
    assert set(read) == set(state) and all(torch.equal(read[k], state[k]) for k in state)
    assert "optimizer_states" in others and "callbacks" in others
    taken = take(path, read, EXPECTED, prefix="encoder.", drop=DROP)
    assert set(taken.weights) == set(EXPECTED)
    assert taken.dropped["loss/discriminator weights"] == ["loss.discriminator.weight"]
    assert taken.dropped["embedded VQGAN copies"] == ["first_stage_model.quantize.embedding.weight"]
    summary = taken.summary(path)
    assert "2 tensors kept" in summary and "dropped 1 loss/discriminator weights" in summary


class _Exploit:
    def __reduce__(self):
        return (Path.touch, (Path("/tmp/official_loading_exploit_ran"),))


def test_refuses_a_pickle_that_would_run_code(tmp_path):
    marker = Path("/tmp/official_loading_exploit_ran")
    marker.unlink(missing_ok=True)
    path = lightning_file(tmp_path / "evil.ckpt", small_state(), hparams=_Exploit())
    with pytest.raises(CheckpointError, match=r"evil\.ckpt.*refused.*--trust-pickle"):
        read_checkpoint(path)
    assert not marker.exists()


def test_refuses_a_truncated_file(tmp_path):
    path = lightning_file(tmp_path / "whole.ckpt", small_state())
    cut = tmp_path / "cut.ckpt"
    cut.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(CheckpointError, match=r"cut\.ckpt"):
        read_checkpoint(cut)


def test_missing_key_is_named(tmp_path):
    state = small_state()
    del state["encoder.conv.bias"]
    path = lightning_file(tmp_path / "m.ckpt", state)
    with pytest.raises(CheckpointError, match=r"m\.ckpt.*\n.*missing \(1\): conv\.bias"):
        take(path, read_checkpoint(path)[0], EXPECTED, prefix="encoder.", drop=DROP)


def test_unexpected_key_under_the_prefix_is_named(tmp_path):
    state = small_state() | {"encoder.extra.weight": torch.zeros(1)}
    path = lightning_file(tmp_path / "m.ckpt", state)
    with pytest.raises(CheckpointError, match=r"unexpected \(1\): encoder\.extra\.weight"):
        take(path, read_checkpoint(path)[0], EXPECTED, prefix="encoder.", drop=DROP)


def test_wrong_shape_is_named(tmp_path):
    state = small_state() | {"encoder.conv.weight": torch.zeros(4, 4, 3, 3)}
    path = lightning_file(tmp_path / "m.ckpt", state)
    with pytest.raises(CheckpointError, match=r"m\.ckpt.*encoder\.conv\.weight is \(4, 4, 3, 3\).*\(4, 3, 3, 3\)"):
        take(path, read_checkpoint(path)[0], EXPECTED, prefix="encoder.", drop=DROP)


def test_rename_maps_checkpoint_names_to_the_module(tmp_path):
    path = lightning_file(tmp_path / "m.ckpt", small_state())
    taken = take(path, read_checkpoint(path)[0], {"head.weight": torch.Size([4, 3, 3, 3]), "conv.bias": torch.Size([4])},
                 prefix="encoder.", rename={"conv.weight": "head.weight"}, drop=DROP)
    assert set(taken.weights) == {"head.weight", "conv.bias"}


@pytest.mark.parametrize("name", ["vqgan", "encoder", "transformer", "decoder", "unet", "unet_up"])
def test_reads_the_authors_format_fixtures(tmp_path, name):
    """The tiny checkpoints written by their modules (tools/official_reference.py) read safely."""
    path = tmp_path / f"{name}.ckpt"
    path.write_bytes(lzma.decompress((FIXTURES / f"{name}.ckpt.xz").read_bytes()))
    state, others = read_checkpoint(path)
    assert "optimizer_states" in others and "callbacks" in others
    assert all(isinstance(v, torch.Tensor) for v in state.values()) and state
