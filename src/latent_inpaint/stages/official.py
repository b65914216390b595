"""Import the authors' released models (github.com/nintendops/latent-code-inpainting) as this
project's runs/{vqgan,encoder,transformer,decoder,refiner}/final, with the "official" variants.

Each released file is read safely and memory-mapped (official.read_checkpoint); each of our
models takes exactly its weights from it (official.take): a missing key or a wrong shape stops
the import naming the file and the keys, and everything left behind (optimizer state, the VQGAN
copies embedded in later stages, loss networks, the constant FIR filters and causal masks) is
listed in the summary. Every file is checked before anything is written, and each final/ is
replaced atomically (saved.export_final), so a refused import leaves runs/ as it was.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch
import yaml
from torch import nn

from ..config import (OFFICIAL_MODELS, ConfigError, EncoderConfig, TransformerConfig, VQGANConfig, build, section,
                      to_dict)
from ..decoder import OfficialDecoder
from ..encoder import OfficialRestrictiveEncoder
from ..official import CheckpointError, Taken, read_checkpoint, take
from ..partial_conv import fir_filter
from ..refiner import Refiner
from ..saved import export_final
from ..taming import expected_state, load_taken
from ..transformer import OfficialTransformer
from ..vqgan import Layout, VQModel

STAGES = ("vqgan", "encoder", "transformer", "decoder", "refiner")


@dataclasses.dataclass(frozen=True)
class Architecture:
    """The released models' sizes (from their configs/*.yaml): the VQGAN's layout, which the
    encoder and decoder share, the transformer's, and the refiner's output side and decoder levels."""

    vqgan: dict  # VQGANConfig's architecture keys
    resolution: int
    transformer: dict  # n_layer, n_embd, n_head
    refiner_size: int
    refiner_channel_mult: tuple[int, ...]

    @classmethod
    def load(cls, path: str | Path) -> Architecture:
        """Sizes from a YAML file with this class's fields (vqgan and transformer with the keys of
        F16 and GPT below): models the authors' code trained at other widths."""
        values = yaml.safe_load(Path(path).read_text())
        fields = [f.name for f in dataclasses.fields(cls)]
        if not isinstance(values, dict) or set(values) != set(fields):
            raise ConfigError(f"{path}: an architecture has exactly the keys {', '.join(fields)}")
        for key, known in (("vqgan", F16), ("transformer", GPT)):
            if not isinstance(values[key], dict) or set(values[key]) != set(known):
                raise ConfigError(f"{path}: {key} has exactly the keys {', '.join(known)}")
        return cls(**{**values, "refiner_channel_mult": tuple(values["refiner_channel_mult"])})


F16 = {"base_channels": 128, "channel_mult": [1, 1, 2, 2, 4], "num_res_blocks": 2, "attn_resolutions": [16],
       "z_channels": 256, "n_embed": 1024, "embed_dim": 256}
GPT = {"n_layer": 40, "n_embd": 1408, "n_head": 16}
PLACES256 = Architecture(F16, 256, GPT, 256, (1, 1, 2, 2, 4))
PLACES512 = Architecture(F16, 256, GPT, 512, (1, 1, 1, 2, 2, 4))

# Which file (and prefix in it) each of our models comes from; see official-code.md.
SOURCES = {
    "places256": {"vqgan": ("places256_vqgan1024_BASE.ckpt", ""), "encoder": ("places256_partialencoder.ckpt", ""),
                  "transformer": ("places256_transformer.ckpt", "transformer."),
                  "decoder": ("places256_decoder.ckpt", ""), "refiner": ("places256_unet.ckpt", "")},
    "places512": {"vqgan": ("places256_vqgan1024_BASE.ckpt", ""), "encoder": ("places256_partialencoder.ckpt", ""),
                  "transformer": ("places256_transformer.ckpt", "transformer."),
                  "decoder": ("places_unet_512.ckpt", "first_stage_model."), "refiner": ("places_unet_512.ckpt", "")},
    "celeba": {"vqgan": ("celeba_vqgan.ckpt", ""), "encoder": ("celeba_encoder.ckpt", ""),
               "transformer": ("celeba_transformer.ckpt", "transformer."),
               "decoder": ("celeba_decoder.ckpt", "first_stage_model."), "refiner": ("celeba_decoder.ckpt", "")},
}
ARCHITECTURES = {"places256": PLACES256, "places512": PLACES512, "celeba": PLACES256}
MODELS = OFFICIAL_MODELS

# What each model leaves behind in its file, by reason (prefixes, or globs with a `*`).
LOSSES = ("loss.", "loss_fstg.")


def _drop(stage: str, prefix: str) -> dict[str, tuple[str, ...]]:
    if stage == "vqgan":
        return {"loss networks": LOSSES}
    if stage == "encoder":
        return {"embedded VQGAN copy": ("first_stage_model.", "quantize."),
                "FIR filter constants": ("*.resample_filter",)}
    if stage == "transformer":
        return {"causal-mask buffers": (f"{prefix}blocks.*.attn.mask",)}
    if stage == "decoder":  # alone, or inside a refiner's file under `prefix`
        return {"embedded VQGAN copy": (f"{prefix}first_stage_model.",),
                "loss networks": LOSSES + (f"{prefix}loss.",)}
    return {"embedded decoder and VQGAN copies": ("first_stage_model.",), "loss networks": LOSSES}


# ---------------------------------------------------------------------------------- our models


def build_models(params: dict, arch: Architecture) -> dict[str, nn.Module]:
    """Our five models at the released sizes on the meta device (no memory until filled);
    training settings the released files do not fix come from `params`."""
    vq = build(VQGANConfig, {**to_dict(section(params, "vqgan")), **arch.vqgan, "pretrained": None}, "vqgan")
    enc = build(EncoderConfig, {**to_dict(section(params, "encoder")), "variant": "official",
                                "attn_resolutions": list(arch.vqgan["attn_resolutions"])}, "encoder")
    tf = build(TransformerConfig, {**to_dict(section(params, "transformer")), "variant": "official",
                                   **arch.transformer}, "transformer")
    layout = Layout.of(vq, arch.resolution)
    grid = arch.resolution // vq.factor
    refined = dataclasses.replace(layout, channel_mult=tuple(arch.refiner_channel_mult), resolution=arch.refiner_size)
    with torch.device("meta"):
        return {"vqgan": VQModel(vq, arch.resolution), "encoder": OfficialRestrictiveEncoder(vq, enc, arch.resolution),
                "transformer": OfficialTransformer(tf, vq.n_embed, grid),
                "decoder": OfficialDecoder(vq, arch.resolution), "refiner": Refiner(layout, refined, vq.embed_dim)}


# Our transformer keys -> theirs (minGPT's); c_attn is their query, key and value side by side.
_GPT_NAMES = {"ln_1": "ln1", "ln_2": "ln2", "attn.c_proj": "attn.proj", "mlp.c_fc": "mlp.0", "mlp.c_proj": "mlp.2"}


def _their_transformer_keys(expected: dict[str, torch.Size]) -> dict[str, torch.Size]:
    theirs = {}
    for key, shape in expected.items():
        if key == "pos_emb":
            theirs[key] = torch.Size([1, *shape])
        elif ".attn.c_attn." in key:
            for part in ("query", "key", "value"):
                theirs[key.replace("c_attn", part)] = torch.Size([shape[0] // 3, *shape[1:]])
        else:
            for ours, their in _GPT_NAMES.items():
                key2 = key.replace(f".{ours}.", f".{their}.")
                if key2 != key:
                    break
            theirs[key2] = shape
    return theirs


def _to_our_transformer(weights: dict[str, torch.Tensor], expected: dict[str, torch.Size]) -> dict[str, torch.Tensor]:
    ours = {}
    for key in expected:
        if key == "pos_emb":
            ours[key] = weights[key][0]
        elif ".attn.c_attn." in key:
            ours[key] = torch.cat([weights[key.replace("c_attn", part)] for part in ("query", "key", "value")])
        else:
            ours[key] = weights[next((key.replace(f".{o}.", f".{t}.") for o, t in _GPT_NAMES.items()
                                      if f".{o}." in key), key)]
    return ours


def _check_filters(path: Path, state: dict[str, torch.Tensor]) -> None:
    """The released encoder's FIR filters are constants; dropping them is safe only if they hold
    the value our layers compute."""
    expected = fir_filter()
    for key, value in state.items():
        if key.endswith(".resample_filter") and not (value.shape == expected.shape
                                                     and torch.allclose(value.float(), expected, atol=1e-7)):
            raise CheckpointError(f"{path}: {key} is not the [1,3,3,1] low-pass filter the encoder assumes")


def take_weights(stage: str, path: Path, state: dict[str, torch.Tensor], prefix: str, model: nn.Module) -> Taken:
    """The weights of our `model` for `stage` from a released file's state (under `prefix`), in our
    names, strictly (official.take), with what was left behind."""
    expected = expected_state(model)
    if stage == "transformer":
        taken = take(path, state, _their_transformer_keys(expected), prefix=prefix, drop=_drop(stage, prefix))
        return Taken(_to_our_transformer(taken.weights, expected), taken.dropped)
    if stage == "encoder":
        _check_filters(path, state)
        rename = {k.replace("head.", "cls_head.", 1): k for k in expected if k.startswith("head.")}
        return take(path, state, expected, prefix=prefix, rename=rename, drop=_drop(stage, prefix))
    return take(path, state, expected, prefix=prefix, drop=_drop(stage, prefix))


# ---------------------------------------------------------------------------------- import


def import_official(checkpoints: Path, model: str, runs: Path, params: dict, *, trust_pickle: bool = False,
                    arch: Architecture | None = None) -> str:
    """Import the released `model` (places256 | places512 | celeba) from the folder of their
    .ckpt files into runs/<stage>/final; returns the summary (what was kept and dropped).
    `arch` replaces the released sizes, else pretrained.architecture's file does if set (tests
    import reduced-width files this way)."""
    if model not in SOURCES:
        raise ValueError(f"unknown released model {model!r} (known: {', '.join(MODELS)})")
    checkpoints, runs = Path(checkpoints), Path(runs)
    sizes = section(params, "pretrained").architecture
    models = build_models(params, arch or (Architecture.load(sizes) if sizes else ARCHITECTURES[model]))
    states: dict[Path, tuple[dict[str, torch.Tensor], list[str]]] = {}
    taken: dict[str, Taken] = {}
    summaries: list[str] = []
    for stage in STAGES:  # read and check every file before writing anything
        name, prefix = SOURCES[model][stage]
        path = checkpoints / name
        if not path.is_file():
            raise CheckpointError(f"{path}: missing (the {model} import needs {name} for the {stage})")
        if path not in states:
            states[path] = read_checkpoint(path, trust_pickle=trust_pickle)
        taken[stage] = take_weights(stage, path, states[path][0], prefix, models[stage])
        summaries.append(f"{stage} <- {taken[stage].summary(path)}")
    lines = [f"imported the authors' {model} models from {checkpoints}"]
    for stage in STAGES:
        load_taken(models[stage], taken.pop(stage).weights)
        source = checkpoints / SOURCES[model][stage][0]
        final = export_final(runs / stage, stage, {stage: models.pop(stage)}, source=str(source), official_model=model,
                             source_bytes=source.stat().st_size)
        lines.append(f"  {stage}: {final}")
    lines.append("what each model took (everything else listed, nothing dropped silently):")
    lines += [f"  {line}" for s in summaries for line in s.splitlines()]
    for path, (_, others) in states.items():
        lines.append(f"  {path.name}: top-level entries dropped: {', '.join(others)}")
    return "\n".join(lines)
