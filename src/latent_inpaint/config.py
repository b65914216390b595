"""Typed, frozen views of `params.yaml`.

`params.yaml` is the single source of every hyperparameter: the dataclasses below declare the
keys and their types but carry no default values, so a key missing from the file is an error,
and so is a key the code does not know (a misspelling would otherwise be silently ignored).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Mapping

from .checks import (SEED_LIMIT, ConfigError, build, check_choice, check_positive, check_range, check_seed,
                     check_training, to_dict)

# Which of the restrictive encoder's stride-1 convs apply alpha: see encoder.py.
STRIDE1_RULES = ("window", "centre", "window_with_skip")
OFFICIAL_MODELS = ("places256", "places512", "celeba")  # the authors' released models (stages/official.py)


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
    val_images: int  # places365: images of the training list held out as val (not a fraction)
    split_seed: int
    shard_size: int  # images per WebDataset tar
    image_format: str  # png (lossless) | jpg
    jpeg_quality: int
    workers: int  # processes used to decode, resize and encode
    default_count: int  # images in the embedded default dataset
    default_seed: int

    def __post_init__(self):
        check_choice("data.layout", self.layout, ("folder", "places365", "celebahq"))
        check_choice("data.image_format", self.image_format, ("png", "jpg"))
        for key in ("size", "min_side", "shard_size", "workers", "default_count"):
            check_positive(f"data.{key}", getattr(self, key))
        check_range("data.jpeg_quality", self.jpeg_quality, 1, 100)
        for key in ("val_fraction", "test_fraction"):
            check_range(f"data.{key}", getattr(self, key), 0, 1)
        if not 0 <= self.val_fraction + self.test_fraction < 1:
            raise ConfigError("data.val_fraction + data.test_fraction must lie in [0, 1), got "
                              f"{self.val_fraction} + {self.test_fraction}")


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
            raise ConfigError(f"hole_range must satisfy 0 <= lo < hi <= 1, got {list(self.hole_range)}")
        for key in ("rects_half", "rects_full", "strokes"):
            check_range(f"masks.*.{key}", getattr(self, key), 0, None)


@dataclasses.dataclass(frozen=True)
class MasksConfig:
    small: FreeFormConfig
    large: FreeFormConfig
    train: FreeFormConfig  # masks drawn on the fly when training the encoder and the decoder
    box_fraction: float  # side of the centred box as a fraction of the image side
    seed: int  # evaluation masks are fixed files drawn from this seed
    splits: tuple[str, ...]  # splits that get fixed evaluation mask sets
    grid_count: int  # masks per type shown in masks.png

    def __post_init__(self):
        if not 0 < self.box_fraction <= 1:
            raise ConfigError(f"masks.box_fraction must lie in (0, 1], got {self.box_fraction}")
        check_positive("masks.grid_count", self.grid_count)
        for split in self.splits:
            if split not in ("train", "val", "test"):
                raise ConfigError(f"masks.splits: unknown split {split!r} (allowed: train, val, test)")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """The one training loop's settings, shared by every stage."""

    seed: int
    grad_accum: int  # micro-batches per optimizer step
    workers: int  # data loader processes per rank
    precision: str  # auto (precision.resolve_precision: bf16 on Ampere+ or a bf16 CPU) | bf16 | fp16 | fp32
    log_every: int  # steps between logged losses
    checkpoint_every: int  # steps between atomic checkpoints (and at the end)
    image_every: int  # steps between logged pictures
    eval_images: int  # validation images for the stage's metric

    def __post_init__(self):
        check_choice("train.precision", self.precision, ("auto", "bf16", "fp16", "fp32"))
        for key in ("grad_accum", "log_every", "checkpoint_every", "image_every", "eval_images"):
            check_positive(f"train.{key}", getattr(self, key))
        check_range("train.workers", self.workers, 0, None)


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
        check_choice("vqgan.codebook_init", self.codebook_init, ("uniform", "data"))
        for key in ("base_channels", "num_res_blocks", "z_channels", "n_embed", "embed_dim", "disc_layers",
                    "base_lr", "batch_size", "steps"):
            check_positive(f"vqgan.{key}", getattr(self, key))
        if not self.channel_mult or min(self.channel_mult) <= 0:
            raise ConfigError(f"vqgan.channel_mult must be a non-empty list of positive integers, "
                              f"got {list(self.channel_mult)}")

    @property
    def factor(self) -> int:
        """Image side / token grid side: each level but the last halves the side."""
        return 2 ** (len(self.channel_mult) - 1)


@dataclasses.dataclass(frozen=True)
class EncoderConfig:
    variant: str  # paper (our training default) | official (the authors' released layers, see encoder.py)
    init_from: str | None  # a model folder (e.g. an imported runs/encoder) to fine-tune from
    alpha: float  # restrictive conv threshold on the visible fraction (Eq. 3-4)
    stride1_rule: str  # which stride-1 restrictive convs apply alpha: window | centre | window_with_skip
    attn_resolutions: tuple[int, ...]
    lr: float
    betas: tuple[float, float]
    batch_size: int
    steps: int

    def __post_init__(self):
        _check_variant("encoder.variant", self.variant)
        check_choice("encoder.stride1_rule", self.stride1_rule, STRIDE1_RULES)
        check_range("encoder.alpha", self.alpha, 0, 1)
        check_training("encoder", self)


@dataclasses.dataclass(frozen=True)
class TransformerConfig:
    variant: str  # paper | official (the released token ids: vocab K+1, a start token; see transformer.py)
    init_from: str | None  # a model folder (e.g. an imported runs/transformer) to fine-tune from
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

    def __post_init__(self):
        _check_variant("transformer.variant", self.variant)
        for key in ("n_layer", "n_embd", "n_head", "mlp_ratio"):
            check_positive(f"transformer.{key}", getattr(self, key))
        if self.n_embd % self.n_head:
            raise ConfigError(f"transformer.n_head must divide transformer.n_embd, got n_head {self.n_head} "
                              f"and n_embd {self.n_embd}")
        check_range("transformer.dropout", self.dropout, 0, 1)
        lo, hi = self.mask_ratio
        if not 0 <= lo <= hi <= 1:
            raise ConfigError(f"transformer.mask_ratio must satisfy 0 <= lo <= hi <= 1, got {list(self.mask_ratio)}")
        check_range("transformer.weight_decay", self.weight_decay, 0, None)
        check_training("transformer", self)


@dataclasses.dataclass(frozen=True)
class DecoderConfig:
    variant: str  # paper | official (the released plain-conv mask encoder; see decoder.py)
    init_from: str | None  # a model folder (e.g. an imported runs/decoder) to fine-tune from
    init_from_vqgan: bool
    token_noise: float  # fraction of ground-truth tokens replaced at random during training
    r1_weight: float
    perceptual_weight: float
    l1_weight: float  # a hole L1 term; 0 in the paper (Eq. 9), needed by short CPU runs
    lr: float
    betas: tuple[float, float]
    batch_size: int
    steps: int

    def __post_init__(self):
        _check_variant("decoder.variant", self.variant)
        check_range("decoder.token_noise", self.token_noise, 0, 1)
        for key in ("r1_weight", "perceptual_weight", "l1_weight"):
            check_range(f"decoder.{key}", getattr(self, key), 0, None)
        check_training("decoder", self)


def _check_variant(key: str, value: str) -> None:
    check_choice(key, value, ("paper", "official"))


@dataclasses.dataclass(frozen=True)
class PretrainedConfig:
    """The authors' released models in place of training (rule import_official; nothing trains)."""

    official: str | None  # the folder of their .ckpt files; None: train everything here
    model: str | None  # places256 | places512 | celeba
    architecture: str | None  # a YAML of other sizes than the released ones (stages/official.Architecture)

    def __post_init__(self):
        if self.official is not None or self.model is not None:
            check_choice("pretrained.model", self.model, OFFICIAL_MODELS)
            if self.official is None or not Path(self.official).is_dir():
                raise ConfigError(f"pretrained.official: no folder {self.official} (the authors' .ckpt files)")
        if self.architecture is not None and not Path(self.architecture).is_file():
            raise ConfigError(f"pretrained.architecture: no file {self.architecture}")


@dataclasses.dataclass(frozen=True)
class SampleConfig:
    steps: int  # k
    temperature: float  # t
    anneal: float  # s: T_i = t * s**i
    samples: int
    seed: int
    sampler: str  # ours | official (the authors' sampler: sampler.sample_official)
    batch_size: int  # samples (of one or many images) through the transformer and decoder at once
    precision: str  # auto (fp32 on CPU; bf16 + TF32 on Ampere+, fp16 before) | bf16 | fp16 | fp32

    def __post_init__(self):
        for key in ("steps", "samples", "temperature", "anneal", "batch_size"):
            check_positive(f"sample.{key}", getattr(self, key))
        check_seed("sample.seed", self.seed, self.samples)
        check_choice("sample.sampler", self.sampler, ("ours", "official"))
        check_choice("sample.precision", self.precision, ("auto", "bf16", "fp16", "fp32"))


# The ablation variants `latent-inpaint evaluate --variant`, `ablations --variants` and `evaluate.ablations` name.
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
    ablation_images: int  # test images each ablation is scored on (the paper's Table 2: a 3,000 subset)
    baseline_images: int  # at most this many test images score the biharmonic reference (a CPU solve each)

    def __post_init__(self):
        check_choice("evaluate.fid_dims", self.fid_dims, (64, 192, 768, 2048))
        for key in ("fid_images", "diversity_images", "diversity_samples", "batch_size", "ablation_images",
                    "baseline_images"):
            check_positive(f"evaluate.{key}", getattr(self, key))


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
    log_models: bool  # also log each trained stage's final/ folder (its weights) as run artifacts


@dataclasses.dataclass(frozen=True)
class JobResources:
    mem_mb: int  # memory a job asks for
    runtime: int  # minutes: the job's time limit

    def __post_init__(self):
        check_positive("resources.*.mem_mb", self.mem_mb)
        check_positive("resources.*.runtime", self.runtime)


@dataclasses.dataclass(frozen=True)
class ResourcesConfig:
    """What each job asks a scheduler for. The rules read it; it is no rerun trigger."""

    gpu: bool  # training, tokens and evaluation jobs ask for GPUs
    processes: int  # training processes per job (torchrun --nproc_per_node): one per GPU
    train: JobResources  # each training job
    infer: JobResources  # tokens, evaluate, ablation
    light: JobResources  # default data, prepare, masks, report

    def __post_init__(self):
        check_positive("resources.processes", self.processes)


SECTIONS: dict[str, type] = {
    "data": DataConfig,
    "masks": MasksConfig,
    "train": TrainConfig,
    "vqgan": VQGANConfig,
    "encoder": EncoderConfig,
    "transformer": TransformerConfig,
    "decoder": DecoderConfig,
    "pretrained": PretrainedConfig,
    "sample": SampleConfig,
    "evaluate": EvaluateConfig,
    "weights": WeightsConfig,
    "tracking": TrackingConfig,
    "resources": ResourcesConfig,
}


# ---------------------------------------------------------------------------------- building


def section(params: Mapping[str, Any], name: str):
    """The frozen dataclass of one params.yaml section."""
    if name not in params:
        raise ConfigError(f"params have no '{name}' section")
    return build(SECTIONS[name], params[name], name)


def validate(params: Mapping[str, Any], together: bool = True) -> dict:
    """Build every section once, so a bad key fails before any work starts; return the sections
    as canonical typed data (text from a command line such as "64" becomes 64). `together`: also
    check the keys that must agree across sections (data.size and the VQGAN factor); off where
    some sections are not the ones the run uses (a Snakemake job gets only the sections it reads,
    the rest from params.yaml; the Snakefile checked the whole config)."""
    unknown = sorted(set(params) - set(SECTIONS))
    if unknown:
        raise ConfigError(f"unknown section(s): {', '.join(unknown)} (known: {', '.join(SECTIONS)})")
    built = {name: section(params, name) for name in SECTIONS}
    data, vqgan = built["data"], built["vqgan"]
    if together and data.size % vqgan.factor:
        raise ConfigError(f"data.size must be a multiple of the VQGAN factor {vqgan.factor} "
                          f"(2 ** (len(vqgan.channel_mult) - 1)), got {data.size}")
    return {name: to_dict(cfg) for name, cfg in built.items()}
