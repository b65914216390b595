"""The authors' released models through our code: the tiny checkpoints their code wrote
(tests/fixtures/official, made by tools/official_reference.py) are imported with
`import-official`, and every stage's output is compared with what their code computed on the
same inputs. Logits and pixels within 1e-4, tokens identical. Their code is not needed here."""

from __future__ import annotations

import dataclasses
import gzip
import json
import lzma
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from conftest import params
from torch import nn

from latent_inpaint import cli
from latent_inpaint.config import section
from latent_inpaint.data.default import build_default_dataset
from latent_inpaint.data.ingest import prepare
from latent_inpaint.params import load_params, merge
from latent_inpaint.decoder import OfficialDecoder
from latent_inpaint.encoder import OfficialRestrictiveEncoder
from latent_inpaint.inpaint import Inpainter
from latent_inpaint.official import CheckpointError
from latent_inpaint.refiner import Refiner
from latent_inpaint.sampler import sample_official
from latent_inpaint.saved import load_model, saved_spec
from latent_inpaint.stages import official
from latent_inpaint.stages.decoder import DecoderStage
from latent_inpaint.stages.encoder import EncoderStage
from latent_inpaint.stages.tokens import tokenize
from latent_inpaint.stages.transformer import TransformerStage
from latent_inpaint.train import train
from latent_inpaint.transformer import OfficialTransformer
from latent_inpaint.vqgan import VQModel

FIXTURES = Path(__file__).parent / "fixtures" / "official"
TOLERANCE = 1e-4
# The reduced width tools/official_reference.py built their modules at (reference.json "tiny").
TINY = official.Architecture(
    vqgan={"base_channels": 32, "channel_mult": [1, 1], "num_res_blocks": 1, "attn_resolutions": [8],
           "z_channels": 16, "n_embed": 32, "embed_dim": 16},
    resolution=16, transformer={"n_layer": 2, "n_embd": 32, "n_head": 2}, refiner_size=16, refiner_channel_mult=(1, 1))
TINY_UP = dataclasses.replace(TINY, refiner_size=32, refiner_channel_mult=(1, 1, 1))
SAMPLING = {"steps": 5, "temperature": 1.0, "anneal": 0.9}  # eval.ipynb: sampling_ratio 0.2, t 1.0, 0.9 per step
# The fixture files under the names of the released files they stand for.
RELEASED_NAMES = {"vqgan": "places256_vqgan1024_BASE.ckpt", "encoder": "places256_partialencoder.ckpt",
                  "transformer": "places256_transformer.ckpt", "decoder": "places256_decoder.ckpt",
                  "unet": "places256_unet.ckpt", "unet_up": "places_unet_512.ckpt"}


def released_folder(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for fixture, name in RELEASED_NAMES.items():
        (folder / name).write_bytes(lzma.decompress((FIXTURES / f"{fixture}.ckpt.xz").read_bytes()))
    return folder


@pytest.fixture(scope="module")
def ref() -> dict[str, torch.Tensor]:
    return load_file(str(FIXTURES / "reference.safetensors"))


@pytest.fixture(scope="module")
def imported(tmp_path_factory) -> dict:
    """Both imports (16 px with the 16 px refiner; 16 -> 32 px), loaded as inference loads them."""
    root = tmp_path_factory.mktemp("official")
    checkpoints = released_folder(root / "ckpts")
    params = load_params()
    summary = official.import_official(checkpoints, "places256", root / "runs", params, arch=TINY)
    official.import_official(checkpoints, "places512", root / "runs512", params, arch=TINY_UP)
    runs, runs512 = root / "runs", root / "runs512"
    return {
        "summary": summary, "runs": runs, "runs512": runs512,
        "vqgan": load_model(runs / "vqgan", VQModel),
        "encoder": load_model(runs / "encoder", OfficialRestrictiveEncoder),
        "transformer": load_model(runs / "transformer", OfficialTransformer),
        "decoder": load_model(runs / "decoder", OfficialDecoder), "refiner": load_model(runs / "refiner", Refiner),
        "decoder_up": load_model(runs512 / "decoder", OfficialDecoder),
        "refiner_up": load_model(runs512 / "refiner", Refiner),
    }


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape
    return (a.float() - b.float()).abs().max().item()


# ---------------------------------------------------------------------------------- stages


def test_vqgan_encode_decode(imported, ref):
    vq = imported["vqgan"]
    with torch.no_grad():
        z_q, _, indices = vq.encode(ref["image"])
        assert max_diff(z_q, ref["vqgan.quant"]) < TOLERANCE
        assert torch.equal(indices.flatten(1), ref["vqgan.indices"])
        assert max_diff(vq.decode(z_q), ref["vqgan.decoded"]) < TOLERANCE


def test_encoder_logits_and_token_mask(imported, ref):
    with torch.no_grad():
        logits, m_hat = imported["encoder"](ref["image"], ref["mask"])
    assert max_diff(logits, ref["encoder.logits"]) < TOLERANCE
    assert torch.equal(m_hat[:, None].float(), ref["encoder.token_mask"])
    visible = m_hat.flatten(1)  # their argmax at masked tokens picks among zeros: not a token
    assert torch.equal(logits.argmax(1).flatten(1)[visible], ref["encoder.indices"][visible])


def test_transformer_logits(imported, ref):
    tf = imported["transformer"]
    ids, visible = ref["transformer.ids"], ref["transformer.visible"].bool()
    with torch.no_grad():
        assert max_diff(tf.forward_ids(ids, visible), ref["transformer.logits"]) < TOLERANCE
        # Our interface: codes and visibility, the start token and [MASK] class handled inside.
        logits = tf(ids[:, 1:] - 1, visible[:, 1:])
    assert max_diff(logits, ref["transformer.logits"][:, 1:, 1:]) < TOLERANCE


@pytest.mark.parametrize("mode", ["argmax", "seeded"])
def test_sampler_reproduces_their_steps(imported, ref, mode):
    """Their exact sampler (row 0's count, the batch cap, re-drawn known tokens of row 1) with
    argmax draws, or with their recorded torch.multinomial draws injected."""
    tokens, visible = ref["sampler.start"], ref["sampler.start"] >= 0
    steps = {}
    draw = "argmax" if mode == "argmax" else (lambda probs, i: ref[f"sampler.seeded.step{i}.draws"])
    out = sample_official(imported["transformer"], tokens, visible, **SAMPLING, draw=draw,
                          on_step=lambda i, candidates, codes: steps.setdefault(i, candidates))
    assert torch.equal(out, ref[f"sampler.{mode}.tokens"])
    assert len(steps) == 6  # one step past the five scheduled
    for i, candidates in steps.items():
        assert torch.equal(candidates, ref[f"sampler.{mode}.step{i}.candidates"])
    assert (out != tokens)[visible].sum() == 6  # the quirk, reproduced: known tokens of row 1 re-drawn


def test_decoder_and_refiners(imported, ref):
    with torch.no_grad():
        _, raw = imported["decoder"](ref["image"], ref["mask"], ref["decoder.quant"], ref["encoder.token_mask"])
        assert max_diff(raw, ref["decoder.raw"]) < TOLERANCE
        assert max_diff(imported["refiner"](ref["unet.input"]), ref["unet.raw"]) < TOLERANCE
        assert max_diff(imported["refiner_up"](ref["unet.input"]), ref["unet_up.raw"]) < TOLERANCE


@pytest.mark.parametrize("mode", ["argmax", "seeded"])
def test_whole_inference(imported, ref, mode):
    """eval.ipynb end to end: encoder -> their sampler -> codebook -> decoder -> refiner (16 px,
    and 16 -> 32 px with the 512-style refiner's own decoder)."""
    x, mask = ref["image"], ref["mask"]
    draw = "argmax" if mode == "argmax" else (lambda probs, i: ref[f"sampler.seeded.step{i}.draws"])
    with torch.no_grad():
        logits, m_hat = imported["encoder"](x, mask)
        tokens = sample_official(imported["transformer"], logits.argmax(1).flatten(1), m_hat.flatten(1),
                                 **SAMPLING, draw=draw)
        assert torch.equal(tokens, ref[f"sampler.{mode}.tokens"])
        z_q = imported["vqgan"].quantize.lookup(tokens.view(2, 8, 8))
        for suffix, image_out in (("", x), ("_up", ref["image_up"])):
            decoded, _ = imported[f"decoder{suffix}"](x, mask, z_q, m_hat)
            assert max_diff(decoded, ref[f"inference{suffix}.{mode}.decoded"]) < TOLERANCE
            final = imported[f"refiner{suffix}"].refine(decoded, image_out, mask)
            assert max_diff(final, ref[f"inference{suffix}.{mode}.final"]) < TOLERANCE


# ---------------------------------------------------------------------------------- the import


def test_import_writes_official_variants_and_lists_what_it_dropped(imported):
    runs = imported["runs"]
    assert saved_spec(runs / "encoder")["encoder"]["variant"] == "official"
    assert saved_spec(runs / "transformer")["transformer"]["variant"] == "official"
    assert saved_spec(runs / "decoder")["model"] == "OfficialDecoder"
    assert saved_spec(runs / "refiner")["model"] == "Refiner"
    summary = imported["summary"]
    assert "dropped 12 FIR filter constants" in summary and "dropped 2 causal-mask buffers" in summary
    assert "optimizer_states" in summary


def test_import_official_command(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(official.ARCHITECTURES, "places256", TINY)
    checkpoints = released_folder(tmp_path / "ckpts")
    assert cli.main(["import-official", str(checkpoints), "--model", "places256", "--runs", str(tmp_path / "runs")]) == 0
    assert "imported the authors' places256 models" in capsys.readouterr().out
    for stage in official.STAGES:
        assert (tmp_path / "runs" / stage / "final" / "config.json").is_file()


@pytest.mark.parametrize("runs, side", [("runs", 16), ("runs512", 32)])
def test_inpaint_runs_the_imported_models_with_the_refiner(imported, runs, side):
    model = Inpainter.from_runs(imported[runs], device="cpu")
    assert isinstance(model.refiner, Refiner) and model.size == 16
    x, mask = torch.rand(2, 3, 16, 16) * 2 - 1, torch.ones(2, 1, 16, 16)
    mask[:, :, 4:12, 4:12] = 0
    cfg = section(load_params(), "sample")
    assert model.inpaint_batch(x, mask, cfg, seeds=[0, 1]).shape == (2, 3, side, side)
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (40, 30, 3), dtype=np.uint8)
    hole = np.ones((40, 30), dtype=np.uint8)
    hole[10:30, 5:25] = 0
    results = model.inpaint(image, hole, cfg, samples=2, seed=0)
    assert all(r.shape == image.shape and np.array_equal(r[hole == 1], image[hole == 1]) for r in results)


# ---------------------------------------------------------------------------------- refusals


def rewrite(path: Path, change) -> None:
    """Apply `change` to the state_dict of a Lightning checkpoint file (safely read: our stand-ins
    replace the callback key class, which torch.save then writes under our name; harmless here)."""
    checkpoint = torch.load(path, weights_only=False)
    change(checkpoint["state_dict"])
    torch.save(checkpoint, path)


def runs_before(runs: Path) -> dict[str, bytes]:
    return {str(p.relative_to(runs)): p.read_bytes() for p in sorted(runs.rglob("*")) if p.is_file()}


class _Exploit:
    def __reduce__(self):
        return (Path.touch, (Path("/tmp/official_import_exploit_ran"),))


def _missing_key(state):
    del state["cls_head.conv.bias"]


def _wrong_shape(state):
    state["transformer.tok_emb.weight"] = torch.zeros(34, 32)


@pytest.mark.parametrize("case", ["missing key", "wrong shape", "truncated", "code in the pickle"])
def test_refusals_name_the_file_and_write_nothing(tmp_path, case):
    checkpoints = released_folder(tmp_path / "ckpts")
    runs = tmp_path / "runs"
    params = load_params()
    official.import_official(checkpoints, "places256", runs, params, arch=TINY)  # a previous import
    before = runs_before(runs)
    if case == "missing key":
        name, pattern = "places256_partialencoder.ckpt", r"missing \(1\): head\.conv\.bias"
        rewrite(checkpoints / name, _missing_key)
    elif case == "wrong shape":
        name, pattern = "places256_transformer.ckpt", r"transformer\.tok_emb\.weight is \(34, 32\) in the checkpoint"
        rewrite(checkpoints / name, _wrong_shape)
    elif case == "truncated":
        name, pattern = "places256_unet.ckpt", "not a torch zip checkpoint|unreadable"
        data = (checkpoints / name).read_bytes()
        (checkpoints / name).write_bytes(data[: len(data) // 2])
    else:
        name, pattern = "places256_decoder.ckpt", r"refused.*--trust-pickle"
        checkpoint = torch.load(checkpoints / name, weights_only=False)
        torch.save({**checkpoint, "hparams": _Exploit()}, checkpoints / name)
        Path("/tmp/official_import_exploit_ran").unlink(missing_ok=True)
    with pytest.raises(CheckpointError, match=pattern) as err:
        official.import_official(checkpoints, "places256", runs, params, arch=TINY)
    assert str(checkpoints / name) in str(err.value)
    assert runs_before(runs) == before  # every final/ as it was, no temporary folder left
    assert not Path("/tmp/official_import_exploit_ran").exists()


def test_a_missing_file_is_named(tmp_path):
    checkpoints = released_folder(tmp_path / "ckpts")
    (checkpoints / "places256_unet.ckpt").unlink()
    with pytest.raises(CheckpointError, match=r"places256_unet\.ckpt: missing"):
        official.import_official(checkpoints, "places256", tmp_path / "runs", load_params(), arch=TINY)
    assert not (tmp_path / "runs").exists()


# ---------------------------------------------------------------------------------- full size


def released_layouts() -> dict:
    with gzip.open(FIXTURES / "released_layouts.json.gz") as f:
        return json.load(f)


EXPECTED_DROPS = {"vqgan": {"loss networks"}, "encoder": {"embedded VQGAN copy", "FIR filter constants"},
                  "transformer": {"causal-mask buffers"}, "decoder": {"embedded VQGAN copy", "loss networks"},
                  "refiner": {"embedded decoder and VQGAN copies", "loss networks"}}


@pytest.mark.parametrize("model", official.MODELS)
def test_every_released_layout_imports_strictly_at_full_size(model):
    """Each released file's key -> shape list (their modules built at full size on the meta device)
    fills our full-size official variants exactly: nothing missing, nothing unexpected, every shape
    right, and what is dropped is only what we mean to drop. Covers all ten files."""
    layouts = released_layouts()
    models = official.build_models(load_params(), official.ARCHITECTURES[model])
    fir = official.fir_filter()
    for stage in official.STAGES:
        name, prefix = official.SOURCES[model][stage]
        state = {k: fir.clone() if k.endswith(".resample_filter") else torch.empty(shape, device="meta")
                 for k, shape in layouts[name]["keys"].items()}
        taken = official.take_weights(stage, Path(name), state, prefix, models[stage])
        official.load_taken(models[stage], taken.weights)  # strict: every key, every shape
        dropped = {reason for reason, keys in taken.dropped.items() if keys}
        assert dropped == EXPECTED_DROPS[stage] | ({f"outside {prefix}"} if prefix else set()), (name, dropped)
    assert models["transformer"].num_parameters() > 0.9e9  # 40 layers x 1408 wide
    assert {official.SOURCES[model][s][0] for s in official.STAGES} <= set(layouts)


def test_the_layout_check_covers_all_ten_released_files():
    files = {official.SOURCES[m][s][0] for m in official.MODELS for s in official.STAGES}
    assert files == set(released_layouts()) and len(files) == 10


# ---------------------------------------------------------------------------------- fine-tuning


FINETUNE = ["data.size=16", "data.min_side=16", "data.shard_size=8", "data.workers=1", "train.workers=0",
            "train.eval_images=4", "tracking.enabled=false"]
STEPS = 3


@pytest.fixture(scope="module")
def tiny_data(imported, tmp_path_factory) -> dict:
    """16 px shards of default crops and the imported VQGAN's tokens of them: data to fine-tune on."""
    root = tmp_path_factory.mktemp("finetune")
    build_default_dataset(root / "images", count=32, size=16, seed=0)
    prepare(section(params(*FINETUNE), "data"), root / "images", root / "shards", progress=False)
    tokenize(imported["vqgan"], root / "shards", root / "tokens", batch_size=16, device=torch.device("cpu"))
    return {"shards": root / "shards", "tokens": root / "tokens"}


def finetuned(stage, p: dict, run_dir: Path, before: nn.Module, expected: type) -> nn.Module:
    """Train `stage` (started from `before`'s weights) a few steps; the saved model, checked to be
    of the `expected` class (the variant kept) with every weight finite and some moved."""
    start = {k: v.clone() for k, v in stage.modules[stage.name].state_dict().items()}
    assert all(torch.equal(start[k], v) for k, v in before.state_dict().items())  # init_from: the imported weights
    train(stage, section(p, "train"), STEPS, run_dir, section(p, "tracking"), {}, device="cpu")
    after = load_model(run_dir, expected)
    moved = [k for k, v in after.state_dict().items() if not torch.equal(v, start[k])]
    assert all(torch.isfinite(v).all() for v in after.state_dict().values())
    assert len(moved) > len(start) // 2, f"only {len(moved)} of {len(start)} tensors moved"
    return after


def test_train_encoder_fine_tunes_the_imported_encoder(imported, tiny_data, tmp_path):
    """encoder.init_from + encoder.variant official: the stage trains the released encoder."""
    p = params(*FINETUNE, "encoder.variant=official", "encoder.attn_resolutions=[8]", "encoder.batch_size=4",
               f"encoder.init_from={imported['runs'] / 'encoder'}")
    stage = EncoderStage("restrictive", imported["vqgan"], section(p, "encoder"), section(p, "masks"),
                         section(p, "train"), tiny_data["shards"], tiny_data["tokens"])
    finetuned(stage, p, tmp_path / "run", imported["encoder"], OfficialRestrictiveEncoder)
    assert saved_spec(tmp_path / "run")["encoder"]["variant"] == "official"


def test_train_decoder_fine_tunes_the_imported_decoder(imported, tiny_data, tmp_path):
    """decoder.init_from + decoder.variant official: the stage trains the released decoder (not
    initialised from the VQGAN: init_from wins)."""
    p = params(*FINETUNE, "decoder.variant=official", "decoder.batch_size=4",
               f"decoder.init_from={imported['runs'] / 'decoder'}")
    stage = DecoderStage(section(p, "decoder"), section(p, "masks"), section(p, "train"), section(p, "weights"),
                         tiny_data["shards"], tiny_data["tokens"], imported["vqgan"], alpha=0.5,
                         attn_resolutions=(8,))
    finetuned(stage, p, tmp_path / "run", imported["decoder"], OfficialDecoder)


def test_train_transformer_fine_tunes_the_imported_transformer(imported, tiny_data, tmp_path):
    """transformer.init_from + transformer.variant official: the stage trains the released
    transformer; a paper-variant stage refuses those weights."""
    p = params(*FINETUNE, "transformer.variant=official", "transformer.n_layer=2", "transformer.n_embd=32",
               "transformer.n_head=2", "transformer.batch_size=4",
               f"transformer.init_from={imported['runs'] / 'transformer'}")
    stage = TransformerStage(section(p, "transformer"), section(p, "train"), imported["vqgan"], tiny_data["tokens"])
    finetuned(stage, p, tmp_path / "run", imported["transformer"], OfficialTransformer)

    paper = merge(p, {"transformer": {"variant": "paper"}}, "test")
    with pytest.raises(ValueError, match="holds a OfficialTransformer.*builds a BidirectionalTransformer"):
        TransformerStage(section(paper, "transformer"), section(paper, "train"), imported["vqgan"], tiny_data["tokens"])
