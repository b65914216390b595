"""Typed, frozen views of `params.yaml`.

`params.yaml` is the single source of every hyperparameter: the dataclasses below declare the
keys and their types but carry no default values, so a key missing from the file is an error,
and so is a key the code does not know (a misspelling would otherwise be silently ignored).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import types
import typing
from pathlib import Path
from typing import Any, Mapping

import yaml

PACKAGED_PARAMS = Path(__file__).with_name("params.yaml")


class ConfigError(ValueError):
    """A parameter file or override is malformed; the message names the file and the key."""


# ---------------------------------------------------------------------------------- sections


@dataclasses.dataclass(frozen=True)
class DataConfig:
    source: str  # "default" (embedded set built from scikit-image photographs) or a directory
    layout: str  # folder | places365 | celebahq
    lists: str | None  # places365: folder of the official file lists; celebahq: split file
    celebahq_mapping: str | None  # CelebAMask-HQ's CelebA-HQ-to-CelebA-mapping.txt, if used
    size: int  # output side in pixels (shorter side resized, then centre-cropped)
    min_side: int  # images whose shorter side is below this are skipped, never upscaled
    val_fraction: float
    test_fraction: float
    split_seed: int
    shard_size: int  # images per WebDataset tar
    image_format: str  # png (lossless) | jpg
    jpeg_quality: int
    workers: int  # processes used to decode, resize and encode
    default_count: int  # images in the embedded default dataset
    default_seed: int

    def __post_init__(self):
        _check_choice("data.layout", self.layout, ("folder", "places365", "celebahq"))
        _check_choice("data.image_format", self.image_format, ("png", "jpg"))
        _check_positive("data.size", self.size)
        _check_positive("data.shard_size", self.shard_size)
        _check_positive("data.workers", self.workers)
        if not 0 <= self.val_fraction + self.test_fraction < 1:
            raise ConfigError("data.val_fraction + data.test_fraction must lie in [0, 1)")


@dataclasses.dataclass(frozen=True)
class FreeFormConfig:
    """MAT's free-form generator: rectangles at two scales plus brush strokes."""

    rects_half: int  # up to this many rectangles of side < s/2
    rects_full: int  # up to this many rectangles of side < s
    strokes: int  # up to this many brush strokes
    hole_range: tuple[float, float]  # rejection-sampled into (lo, hi) hole ratio

    def __post_init__(self):
        lo, hi = self.hole_range
        if not 0 <= lo < hi <= 1:
            raise ConfigError(f"hole_range must satisfy 0 <= lo < hi <= 1, got {self.hole_range}")


@dataclasses.dataclass(frozen=True)
class MasksConfig:
    small: FreeFormConfig
    large: FreeFormConfig
    train: FreeFormConfig  # masks drawn on the fly when training the encoder and the decoder
    box_fraction: float  # side of the centred box as a fraction of the image side
    seed: int  # evaluation masks are fixed files drawn from this seed
    splits: tuple[str, ...]  # splits that get fixed evaluation mask sets
    grid_count: int  # masks per type shown in masks.png


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """The one training loop's settings, shared by every stage."""

    seed: int
    grad_accum: int  # micro-batches per optimizer step
    workers: int  # data loader processes per rank
    precision: str  # auto (bf16 autocast on GPU, fp32 on CPU) | bf16 | fp32
    log_every: int  # steps between logged losses
    checkpoint_every: int  # steps between atomic checkpoints (and at the end)
    image_every: int  # steps between logged pictures
    eval_images: int  # validation images for the stage's metric

    def __post_init__(self):
        _check_choice("train.precision", self.precision, ("auto", "bf16", "fp32"))
        for key in ("grad_accum", "log_every", "checkpoint_every", "image_every"):
            _check_positive(f"train.{key}", getattr(self, key))


@dataclasses.dataclass(frozen=True)
class VQGANConfig:
    pretrained: str | None  # a taming-transformers VQGAN checkpoint to import instead of training
    base_channels: int
    channel_mult: tuple[int, ...]
    num_res_blocks: int
    attn_resolutions: tuple[int, ...]
    z_channels: int
    n_embed: int  # codebook size K
    embed_dim: int  # codebook vector size n_z
    codebook_init: str  # uniform (taming) | data (K encoder outputs of the first batch)
    beta: float  # commitment weight
    disc_start: int
    disc_weight: float
    disc_layers: int
    perceptual_weight: float
    codebook_weight: float
    base_lr: float  # lr = base_lr * batch * GPUs
    batch_size: int
    steps: int

    def __post_init__(self):
        _check_choice("vqgan.codebook_init", self.codebook_init, ("uniform", "data"))

    @property
    def factor(self) -> int:
        """Image side / token grid side: each level but the last halves the side."""
        return 2 ** (len(self.channel_mult) - 1)


@dataclasses.dataclass(frozen=True)
class EncoderConfig:
    alpha: float  # restrictive conv threshold on the visible fraction (Eq. 3-4)
    attn_resolutions: tuple[int, ...]
    lr: float
    betas: tuple[float, float]
    batch_size: int
    steps: int


@dataclasses.dataclass(frozen=True)
class TransformerConfig:
    n_layer: int
    n_embd: int
    n_head: int
    mlp_ratio: int
    dropout: float
    mask_ratio: tuple[float, float]  # masking ratio drawn from U(lo, hi) during training
    lr: float
    betas: tuple[float, float]
    weight_decay: float
    batch_size: int
    steps: int


@dataclasses.dataclass(frozen=True)
class DecoderConfig:
    init_from_vqgan: bool
    token_noise: float  # fraction of ground-truth tokens replaced at random during training
    r1_weight: float
    perceptual_weight: float
    l1_weight: float  # a hole L1 term; 0 in the paper (Eq. 9), needed by short CPU runs
    lr: float
    betas: tuple[float, float]
    batch_size: int
    steps: int


@dataclasses.dataclass(frozen=True)
class SampleConfig:
    steps: int  # k
    temperature: float  # t
    anneal: float  # s: T_i = t * s**i
    samples: int
    seed: int

    def __post_init__(self):
        for key in ("steps", "samples"):
            _check_positive(f"sample.{key}", getattr(self, key))


# The ablation variants `latent-inpaint evaluate --variant` and `evaluate.ablations` name.
ABLATIONS = ("full | t<temperature> (e.g. t0.5) | alpha<value> (e.g. alpha0.25) | vanilla_encoder | "
             "miracle_encoder | vanilla_decoder | biharmonic (the classical reference alone)")


@dataclasses.dataclass(frozen=True)
class EvaluateConfig:
    fid_images: int
    diversity_images: int
    diversity_samples: int
    batch_size: int
    fid_dims: int  # 2048 is the standard FID; 64/192/768 (pytorch-fid's other blocks) only for speed
    ablations: tuple[str, ...]  # variants scored by the ablation rule (see ABLATIONS)

    def __post_init__(self):
        _check_choice("evaluate.fid_dims", self.fid_dims, (64, 192, 768, 2048))


@dataclasses.dataclass(frozen=True)
class WeightsConfig:
    """Standard pretrained files, never downloaded at run time. None: the usual cache
    (torch hub's checkpoints folder); a path; or "stand-in": random weights, labelled as such in
    every number they produce (for offline smoke runs and tests only)."""

    vgg16: str | None  # torchvision's ImageNet VGG16 (vgg16-397923af.pth), for LPIPS
    inception: str | None  # the FID Inception-v3 weights (pt_inception-2015-12-05-6726825d.pth)


@dataclasses.dataclass(frozen=True)
class TrackingConfig:
    enabled: bool
    uri: str | None  # None: MLFLOW_TRACKING_URI, else the embedded store in the working dir
    experiment: str
    log_images: bool


@dataclasses.dataclass(frozen=True)
class JobResources:
    mem_mb: int  # memory a job asks for
    runtime: int  # minutes: the job's time limit

    def __post_init__(self):
        _check_positive("resources.*.mem_mb", self.mem_mb)
        _check_positive("resources.*.runtime", self.runtime)


@dataclasses.dataclass(frozen=True)
class ResourcesConfig:
    """What each job asks a scheduler for. The rules read it; it is no rerun trigger."""

    gpu: bool  # training, tokens and evaluation jobs ask for GPUs
    processes: int  # training processes per job (torchrun --nproc_per_node): one per GPU
    train: JobResources  # each training job
    infer: JobResources  # tokens, evaluate, ablation
    light: JobResources  # default data, prepare, masks, report

    def __post_init__(self):
        _check_positive("resources.processes", self.processes)


SECTIONS: dict[str, type] = {
    "data": DataConfig,
    "masks": MasksConfig,
    "train": TrainConfig,
    "vqgan": VQGANConfig,
    "encoder": EncoderConfig,
    "transformer": TransformerConfig,
    "decoder": DecoderConfig,
    "sample": SampleConfig,
    "evaluate": EvaluateConfig,
    "weights": WeightsConfig,
    "tracking": TrackingConfig,
    "resources": ResourcesConfig,
}


# ---------------------------------------------------------------------------------- building


def _check_choice(key: str, value, choices) -> None:
    if value not in choices:
        raise ConfigError(f"{key} must be one of {', '.join(map(str, choices))}; got {value!r}")


def _check_positive(key: str, value) -> None:
    if value <= 0:
        raise ConfigError(f"{key} must be positive, got {value}")


def _coerce(value: Any, hint: Any, key: str) -> Any:
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _coerce(value, inner, key)
    if dataclasses.is_dataclass(hint):
        return build(hint, value, key)
    if isinstance(value, str) and hint is not str:
        # Command lines (snakemake --config, --set) hand nested values over as text.
        try:
            value = yaml.safe_load(value)
        except yaml.YAMLError:
            pass
    if hint is float and isinstance(value, str):
        try:
            value = float(value)  # YAML 1.1 reads "5e-5" (no dot) as text
        except ValueError:
            pass
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key} must be a list, got {value!r}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(v, args[0], f"{key}[{i}]") for i, v in enumerate(value))
        if len(value) != len(args):
            raise ConfigError(f"{key} must have {len(args)} items, got {value!r}")
        return tuple(_coerce(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
    if hint is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if hint in (int, str, bool) and type(value) is hint:
        return value
    raise ConfigError(f"{key} must be {getattr(hint, '__name__', hint)}, got {value!r}")


def build(cls: type, values: Any, where: str):
    """Build dataclass `cls` from a mapping; unknown and missing keys are errors naming them."""
    if not isinstance(values, Mapping):
        raise ConfigError(f"{where} must be a mapping, got {values!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(values) - set(names))
    if unknown:
        raise ConfigError(f"unknown key(s) in {where}: {', '.join(unknown)} (known: {', '.join(names)})")
    missing = [n for n in names if n not in values]
    if missing:
        raise ConfigError(f"missing key(s) in {where}: {', '.join(missing)}")
    return cls(**{n: _coerce(values[n], hints[n], f"{where}.{n}") for n in names})


def section(params: Mapping[str, Any], name: str):
    """The frozen dataclass of one params.yaml section."""
    if name not in params:
        raise ConfigError(f"params have no '{name}' section")
    return build(SECTIONS[name], params[name], name)


def validate(params: Mapping[str, Any]) -> dict:
    """Build every section once, so a bad key fails before any work starts; return the sections
    as canonical typed data (text from a command line such as "64" becomes 64)."""
    unknown = sorted(set(params) - set(SECTIONS))
    if unknown:
        raise ConfigError(f"unknown section(s): {', '.join(unknown)} (known: {', '.join(SECTIONS)})")
    return {name: to_dict(section(params, name)) for name in SECTIONS}


# ---------------------------------------------------------------------------------- loading


def _read_yaml(path: Path) -> dict:
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(f"cannot read parameter file {path}: {exc.strerror}") from None
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path} is not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must hold a mapping of sections, got {type(data).__name__}")
    return data


def merge(base: dict, overlay: Mapping, where: str) -> dict:
    """Deep-merge `overlay` into a copy of `base`. Overlays may only set keys the base has."""
    out = copy.deepcopy(base)
    for key, value in overlay.items():
        if base and key not in base:
            raise ConfigError(f"unknown key '{key}' in {where} (known: {', '.join(map(str, base))})")
        if isinstance(value, Mapping) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value, f"{where}.{key}")
        else:
            out[key] = copy.deepcopy(value)
    return out


def parse_assignment(text: str) -> dict:
    """`data.size=128` -> {"data": {"size": 128}}; the value is read as YAML."""
    key, sep, raw = text.partition("=")
    if not sep or not key:
        raise ConfigError(f"--set expects section.key=value, got {text!r}")
    nested = yaml.safe_load(raw)
    for name in reversed(key.split(".")):
        nested = {name: nested}
    return nested


def default_params_file() -> Path:
    """./params.yaml in a project folder; anywhere else the copy shipped in the package (the
    project's params.yaml links to it), so commands that only read trained runs work anywhere."""
    local = Path("params.yaml")
    return local if local.exists() else PACKAGED_PARAMS


def load_params(
    files: list[str | os.PathLike] | None = None,
    overrides: list[str] = (),
    config_json: str | None = None,
) -> dict:
    """params.yaml, then each overlay file, then a JSON of sections, then `--set` assignments.
    Without files: ./params.yaml, else the package's own defaults (`default_params_file`)."""
    files = [Path(f) for f in files] if files else [default_params_file()]
    params: dict = {}
    for path in files:
        params = merge(params, _read_yaml(path), str(path))
    if config_json:
        try:
            sections = json.loads(config_json)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"--config-json is not valid JSON: {exc}") from None
        params = {**params, **sections}  # the JSON carries whole, already merged sections
    for text in overrides:
        params = merge(params, parse_assignment(text), "--set")
    return params


def to_dict(cfg) -> dict:
    """A dataclass config as plain JSON-able data (tuples become lists)."""
    return json.loads(json.dumps(dataclasses.asdict(cfg)))
