"""Inference: the four trained parts turn (image, mask) into pluralistic samples.

    E (restrictive encoder) on X⊙M  -> tokens at visible token positions, token mask M̂
    T (transformer), k sampling steps -> a token for every masked position (a new draw per sample)
    VQGAN codebook                   -> Z, the codebook vectors of the full token map
    decoder (E_prt + coupling + G)   -> X' ; output = X⊙M + X'⊙(1-M)

Images of any size and aspect: the model works at its training size S, so the image and mask
are resized to S x S (aspect not kept), inpainted, the result is resized back to the original
size, and only the hole pixels take it: every visible pixel of the original stays bit-identical.
Nothing at full size is held as floats, and one full-size sample at a time, so memory and time
grow with the pixel count only through uint8 resizes and PNG writes.

Batched (issue 13): what reads the image alone (E, and the decoder's prior E_prt) runs once per
image (`encode`); the first sampling step, whose input is the same for all samples of an image,
once per image; then the samples of many images, any mix of masks, go through the transformer
(`draw`) and the decoder's token part (`decode`) sample.batch_size at a time, in
sample.precision. Each sample's tokens and pixels are those of sampling it alone with its seed:
bit for bit on the CPU; on a GPU up to the last bits that kernels chosen per batch shape change.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from .config import SampleConfig
from .decoder import InpaintDecoder, OfficialDecoder, VanillaDecoder, composite
from .encoder import MiracleEncoder, OfficialRestrictiveEncoder, RestrictiveEncoder, VanillaEncoder
from .refiner import Refiner
from .sampler import sample, sample_official
from .saved import load_model, saved_spec
from .precision import precision_for
from .transformer import BidirectionalTransformer, OfficialTransformer
from .vqgan import VQModel


def pick_device(name: str | torch.device | None = None) -> torch.device:
    """The device named, else the local GPU if there is one."""
    return torch.device(name or ("cuda" if torch.cuda.is_available() else "cpu"))


@dataclasses.dataclass
class Inpainter:
    vqgan: torch.nn.Module
    encoder: torch.nn.Module
    transformer: torch.nn.Module
    decoder: torch.nn.Module
    size: int
    device: torch.device
    refiner: torch.nn.Module | None = None  # the released models' refinement network, if imported

    @classmethod
    def from_runs(cls, runs_dir: Path = Path("runs"), device: str | torch.device | None = None,
                  encoder: str = "encoder", decoder: str = "decoder", alpha: float | None = None) -> Inpainter:
        """Load runs/{vqgan,<encoder>,transformer,<decoder>} (trained, or pulled with DVC); each
        saved model rebuilds itself from the config saved beside its weights.

        encoder: a trained encoder's run folder name ("encoder", "encoder_vanilla") or "miracle"
        (the VQGAN's tokens of the full image under M̂: ablation); decoder: "decoder" or "vanilla"
        (tokens decoded by the VQGAN decoder and pasted: ablation); alpha: another threshold for
        the restrictive encoder at inference (its weights do not depend on alpha)."""
        runs_dir, device = Path(runs_dir), pick_device(device)
        vqgan = load_model(runs_dir / "vqgan", VQModel, device=device)
        if encoder == "miracle":
            trained_alpha = saved_spec(runs_dir / "encoder")["encoder"]["alpha"]
            enc = MiracleEncoder(vqgan, trained_alpha if alpha is None else alpha)
        else:
            overrides = None if alpha is None else {"encoder": {"alpha": alpha}}
            enc = load_model(runs_dir / encoder, (RestrictiveEncoder, VanillaEncoder, OfficialRestrictiveEncoder),
                             device=device, overrides=overrides)
        tf = load_model(runs_dir / "transformer", (BidirectionalTransformer, OfficialTransformer), device=device)
        dec = VanillaDecoder(vqgan) if decoder == "vanilla" else load_model(
            runs_dir / decoder, (InpaintDecoder, OfficialDecoder), device=device)
        parts = [m.to(device).eval() for m in (vqgan, enc, tf, dec)]
        # runs/refiner exists only for the authors' released models (`import-official`).
        refiner = (load_model(runs_dir / "refiner", Refiner, device=device)
                   if decoder != "vanilla" and (runs_dir / "refiner" / "final" / "config.json").is_file() else None)
        return cls(*parts, size=vqgan.resolution, device=device, refiner=refiner)

    def _precision(self, cfg: SampleConfig) -> contextlib.AbstractContextManager:
        """sample.precision's autocast (auto: fp32 on a CPU, as train.precision on a GPU)."""
        return precision_for(cfg.precision, self.device, inference=True)[0]()

    @torch.no_grad()
    def encode(self, x: torch.Tensor, mask: torch.Tensor, cfg: SampleConfig) -> Encoded:
        """What depends on the image alone, once per image: x (I, 3, S, S) in [-1, 1], mask
        (I, 1, S, S) 1 = visible -> the encoder's tokens and M̂, and the decoder's prior (E_prt)."""
        def one(x: torch.Tensor, mask: torch.Tensor) -> tuple:
            logits, token_mask = self.encoder(x, mask)  # (I, K, h, w), (I, h, w)
            return logits.argmax(1).flatten(1), token_mask, self.decoder.prior(x, mask)

        x, mask = x.to(self.device), mask.to(self.device)
        with self._precision(cfg):
            return Encoded(x, mask, *self._by_rows(one, x, mask))

    @torch.no_grad()
    def draw(self, enc: Encoded, rows: torch.Tensor, seeds: Sequence[int], cfg: SampleConfig) -> torch.Tensor:
        """Tokens (R, N) of one sample per row: rows (R,) the image (of `enc`) each row samples,
        seeds (R,) each row's seed. sample.sampler ours: every row in one transformer batch, the
        first step's logits computed once per image (the samples of an image share its input),
        the draws per row from its seed, so a row's tokens do not depend on the other rows.
        official: the authors' sampler on each run of consecutive rows of one image, the global
        generator seeded with the run's first seed."""
        tokens, visible = enc.tokens[rows], enc.token_mask.flatten(1)[rows].bool()  # (R, N)
        steps = {"steps": cfg.steps, "temperature": cfg.temperature, "anneal": cfg.anneal}
        with self._precision(cfg):
            if cfg.sampler == "ours":
                images, image_of_row = rows.unique(return_inverse=True)
                first = self.transformer(enc.tokens[images], enc.token_mask.flatten(1)[images].bool())  # (I, N, K)
                return sample(self.transformer, tokens, visible, **steps, seeds=seeds, first_logits=first[image_of_row])
            runs, start = [], 0
            for count in rows.unique_consecutive(return_counts=True)[1].tolist():
                with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
                    torch.manual_seed(seeds[start])
                    runs.append(sample_official(self.transformer, tokens[start:start + count],
                                                visible[start:start + count], **steps))
                start += count
            return torch.cat(runs)

    @torch.no_grad()
    def decode(self, enc: Encoded, rows: torch.Tensor, tokens: torch.Tensor, cfg: SampleConfig) -> torch.Tensor:
        """Pixels of each row's sample: rows (R,) as for `draw`, tokens (R, N) -> (R, 3, S', S') in
        [-1, 1] (about), visible pixels exactly the image's; S' = S, or the refiner's output side."""
        def one(x: torch.Tensor, mask: torch.Tensor, token_mask: torch.Tensor, prior: torch.Tensor | None,
                tokens: torch.Tensor) -> torch.Tensor:
            z_q = self.vqgan.quantize.lookup(tokens.view(len(tokens), *token_mask.shape[-2:]))  # (R, embed_dim, h, w)
            out = composite(x, mask, self.decoder.decode(prior, z_q, token_mask).float())  # (R, 3, S, S)
            if self.refiner is None:
                return out
            side = self.refiner.size_out
            x_out = x if side == x.shape[-1] else F.interpolate(x, size=(side, side), mode="bicubic", align_corners=False)
            return self.refiner.refine(out, x_out, mask).float()  # (R, 3, side, side)

        prior = None if enc.prior is None else enc.prior[rows]
        with self._precision(cfg):
            return self._by_rows(one, enc.x[rows], enc.mask[rows], enc.token_mask[rows], prior, tokens)

    def _by_rows(self, fn: Callable, *tensors: torch.Tensor | None):
        """fn(*tensors), each (R, ...) or None, in one batch on an accelerator; on the CPU row by
        row, as oneDNN picks its convolution kernels per batch size, so that a sample's pixels do
        not depend in their last bits on which rows share its batch. The price, at the paper's
        widths on 2 cores: G on 8 rows takes 25.7 CPU-s row by row, 19.9 in one batch
        (benchmarks/results/paper_inference_cpu.json), 3 % of the time of 8 samples."""
        if self.device.type != "cpu":
            return fn(*tensors)
        return _cat([fn(*(None if t is None else t[r:r + 1] for t in tensors)) for r in range(len(tensors[0]))])

    def inpaint_batch(self, x: torch.Tensor, mask: torch.Tensor, cfg: SampleConfig, seeds: list[int]) -> torch.Tensor:
        """x (B, 3, S, S) in [-1, 1], mask (B, 1, S, S) 1 = visible -> (B, 3, S', S'), one sample per
        row drawn with that row's seed, in one batch; S' = S, or the refiner's output side (512
        for places512)."""
        enc = self.encode(x, mask, cfg)
        rows = torch.arange(len(seeds), device=self.device)
        return self.decode(enc, rows, self.draw(enc, rows, seeds, cfg), cfg)

    def inpaint(self, image: np.ndarray, mask: np.ndarray, cfg: SampleConfig, samples: int, seed: int) -> list[np.ndarray]:
        """image (H, W, 3) uint8, mask (H, W) 1 = visible -> `samples` (H, W, 3) uint8 results at
        the original size (visible pixels untouched); sample j is drawn with seed + j."""
        return list(self.iter_inpaint(image, mask, cfg, samples, seed))

    def inpaint_many(self, images: Sequence[np.ndarray], masks: Sequence[np.ndarray], cfg: SampleConfig,
                     samples: int, seeds: Sequence[int]) -> list[list[np.ndarray]]:
        """`inpaint` over many images at once: result[i][j] == inpaint(images[i], masks[i], cfg,
        samples, seeds[i])[j] (same tokens, same pixels). images (H, W, 3) uint8 of any sizes,
        masks (H, W) 1 = visible. The encoder and E_prt run once per image, the samples of all the
        images go through the transformer and decoder sample.batch_size at a time. Memory grows
        with the images given (about 1 MB each at 256 px, beside the results): hand a test set
        over in batches."""
        results = [[] for _ in images]
        for i, result in self._iter_many(images, masks, cfg, samples, seeds):
            results[i].append(result)
        return results

    def iter_inpaint(self, image: np.ndarray, mask: np.ndarray, cfg: SampleConfig, samples: int,
                     seed: int) -> Iterator[np.ndarray]:
        """`inpaint`'s results one at a time: the model works at S x S, each sample is resized
        up as uint8 and pasted into the hole (tile-free), one full-size array at a time."""
        return (result for _, result in self._iter_many([image], [mask], cfg, samples, [seed]))

    def _iter_many(self, images: Sequence[np.ndarray], masks: Sequence[np.ndarray], cfg: SampleConfig,
                   samples: int, seeds: Sequence[int]) -> Iterator[tuple[int, np.ndarray]]:
        """(image index, sample) for every sample of every image, in order. Rows (image, sample j,
        seed + j) go through `draw` and `decode` in chunks of sample.batch_size; with the authors'
        sampler a chunk holds one image's samples only (their sampler reads the batch as one)."""
        if not len(images) == len(masks) == len(seeds):
            raise ValueError(f"need one mask and one seed per image: {len(images)} images, {len(masks)} masks, "
                             f"{len(seeds)} seeds")
        todo = [i for i, mask in enumerate(masks) if not mask.all()]  # the others have nothing to fill
        if todo:
            enc = self._encode_images([images[i] for i in todo], [masks[i] for i in todo], cfg)
        rows = [(k, j) for k in range(len(todo)) for j in range(samples)]  # (image of enc, sample)
        if cfg.sampler == "ours":
            chunks = iter(_chunks(rows, cfg.batch_size))
        else:
            chunks = (c for k in range(len(todo)) for c in _chunks(rows[k * samples:(k + 1) * samples], cfg.batch_size))
        ready = iter(())  # this chunk's samples at the model size, (S', S', 3) uint8 each
        for i, (image, mask) in enumerate(zip(images, masks)):
            if mask.all():
                yield from ((i, image.copy()) for _ in range(samples))
                continue
            for _ in range(samples):
                small = next(ready, None)
                if small is None:
                    chunk = next(chunks)
                    index = torch.tensor([k for k, _ in chunk], device=self.device)
                    tokens = self.draw(enc, index, [seeds[todo[k]] + j for k, j in chunk], cfg)
                    y = self.decode(enc, index, tokens, cfg).cpu()
                    ready = iter(((y.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy())
                    small = next(ready)
                yield i, _paste(image, mask, small)

    def _encode_images(self, images: list[np.ndarray], masks: list[np.ndarray], cfg: SampleConfig) -> Encoded:
        """`encode` of images of any sizes, resized to the model's, sample.batch_size at a time."""
        inputs = [_model_input(image, mask, self.size) for image, mask in zip(images, masks)]
        parts = [self.encode(torch.cat([x for x, _ in part]), torch.cat([m for _, m in part]), cfg)
                 for part in _chunks(inputs, cfg.batch_size)]
        return Encoded(*(None if values[0] is None else torch.cat(values)
                         for values in zip(*(vars(p).values() for p in parts))))


@dataclasses.dataclass
class Encoded:
    """What inference computes once per image (I images at the model size S)."""
    x: torch.Tensor  # (I, 3, S, S) in [-1, 1]
    mask: torch.Tensor  # (I, 1, S, S) 1 = visible
    tokens: torch.Tensor  # (I, N) the encoder's tokens, meaningful where visible
    token_mask: torch.Tensor  # (I, h, w) M̂, 1 = visible token
    prior: torch.Tensor | None  # decoder.prior(x, mask), e.g. E_prt (I, C, h, w); None for the vanilla decoder


def _cat(parts: list):
    """torch.cat of a list of tensors, of tuples of them (column by column), or of Nones (None)."""
    if parts[0] is None:
        return None
    if isinstance(parts[0], tuple):
        return tuple(_cat(list(column)) for column in zip(*parts))
    return torch.cat(parts)


def _chunks(items: list, size: int) -> list[list]:
    return [items[k:k + size] for k in range(0, len(items), size)]


def _model_input(image: np.ndarray, mask: np.ndarray, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """image (H, W, 3) uint8, mask (H, W) 1 = visible -> x (1, 3, S, S) in [-1, 1], mask (1, 1, S, S)."""
    square = (size, size)
    small = np.asarray(Image.fromarray(image).resize(square, Image.Resampling.BICUBIC, reducing_gap=3.0))
    x = torch.from_numpy(small.copy()).permute(2, 0, 1)[None].float() / 127.5 - 1  # (1, 3, S, S)
    # A model pixel is visible only where all the original pixels it covers are: never invent there.
    hole = torch.from_numpy(mask == 0)[None, None].float()  # (1, 1, H, W)
    return x, 1 - F.adaptive_max_pool2d(hole, square)  # (1, 1, S, S)


def _paste(image: np.ndarray, mask: np.ndarray, small: np.ndarray) -> np.ndarray:
    """A model-size sample (S', S', 3) uint8 resized to the image's size and pasted into its hole."""
    h, w = mask.shape
    full = np.asarray(Image.fromarray(small).resize((w, h), Image.Resampling.BICUBIC))  # (H, W, 3)
    return np.where(mask.astype(bool)[..., None], image, full)
