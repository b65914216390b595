"""The paper's encoder claim, measured so that it can come out either way.

The paper (Sec. 4.3): on "small mask regions and near mask boundaries in the large mask setting"
the restrictive encoder predicts 23 % of the tokens right and "an encoder with regular
convolution" 9 %. Neither the token set nor the baseline is defined further, so both are defined
here:

- Token set ("claim tokens"): under the large free-form evaluation masks, the tokens the
  restrictive encoder keeps visible (M̂, Eq. 4) although some pixels of their f x f block are
  hole: exactly the tokens that lie in small holes or on a hole's boundary
  (`encoder.partially_masked`). Accuracy over all visible tokens is reported beside it.
- Encoders compared, all against the VQGAN's tokens of the full image:
  the restrictive encoder under each stride-1 rule (`encoder.STRIDE1_RULES`); the vanilla encoder
  (same layout, ordinary layers on [X⊙M, M], trained the same way: the ablation of Table 2); and
  the VQGAN encoder run on the masked image X⊙M (holes 0, i.e. mid-grey), untrained for masks:
  the only comparator in the authors' code.

Every trained encoder sees the same images, masks and steps for a seed; seeds change the
initial weights, the batch order and the training masks. The VQGAN (the tokenizer whose tokens
are the targets) is trained once and shared. Intervals: percentile bootstrap over evaluation
images (the same resampled images for every seed and method, so differences are paired), of the
accuracy pooled over an image set's claim tokens and averaged over seeds.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from latent_inpaint.config import EncoderConfig, MasksConfig, VQGANConfig
from latent_inpaint.data.images import IMAGE_EXTENSIONS, load_rgb, resize_center_crop
from latent_inpaint.encoder import STRIDE1_RULES, build_encoder, partially_masked
from latent_inpaint.masks import eval_mask, free_form_mask
from latent_inpaint.partial_conv import masked, token_mask
from latent_inpaint.vqgan import VQModel

EVAL_SPLIT = "encoder-claim"  # the seed name of the fixed evaluation masks
VQGAN_ON_MASKED = "vqgan_on_masked"


@dataclasses.dataclass(frozen=True)
class ClaimSettings:
    size: int  # image side in pixels
    images: int  # images used from the folder (sorted by name), the last eval_images for evaluation
    eval_images: int
    vqgan_steps: int
    encoder_steps: int
    batch_size: int
    lr: float  # Adam, for the VQGAN and every encoder
    seeds: tuple[int, ...]
    rules: tuple[str, ...] = STRIDE1_RULES
    bootstrap: int = 2000
    threads: int = 1


def methods(rules: tuple[str, ...]) -> list[str]:
    return [f"restrictive_{rule}" for rule in rules] + ["vanilla", VQGAN_ON_MASKED]


def load_images(folder: Path, count: int, size: int) -> torch.Tensor:
    """The first `count` images of `folder` by name, shorter side to `size`, centre square:
    (N, 3, size, size) in [-1, 1]."""
    files = sorted(p for p in Path(folder).iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS)[:count]
    if len(files) < count:
        raise ValueError(f"{folder} has {len(files)} images, {count} asked for")
    pixels = np.stack([np.asarray(resize_center_crop(load_rgb(p), size)) for p in files])  # (N, S, S, 3)
    return torch.from_numpy(pixels).permute(0, 3, 1, 2).float() / 127.5 - 1.0


def train_vqgan(cfg: VQGANConfig, images: torch.Tensor, steps: int, batch_size: int, lr: float, seed: int) -> VQModel:
    """A VQGAN trained with L1 + the codebook loss only: the tokenizer whose tokens the encoders
    predict. (No GAN or LPIPS: the targets need to be a fixed function of the image, not pretty.)"""
    torch.manual_seed(seed)
    model = VQModel(cfg, images.shape[-1])
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        model.quantize.init_from_data(model.quant_conv(model.encoder(images[:batch_size])), g)
    opt = torch.optim.Adam(model.parameters(), lr=lr, betas=(0.5, 0.9))
    for _ in range(steps):
        x = images[torch.randint(len(images), (batch_size,), generator=g)]
        recon, qloss, _ = model(x)
        loss = (recon - x).abs().mean() + cfg.codebook_weight * qloss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return model.eval()


def train_encoder(kind: str, vq: VQGANConfig, enc: EncoderConfig, images: torch.Tensor, tokens: torch.Tensor,
                  train_masks, settings: ClaimSettings, seed: int) -> torch.nn.Module:
    """Eq. 5: cross-entropy at visible tokens, under fresh free-form training masks."""
    torch.manual_seed(seed)
    model = build_encoder(kind, vq, enc, images.shape[-1])
    opt = torch.optim.Adam(model.parameters(), lr=settings.lr, betas=enc.betas)
    g = torch.Generator().manual_seed(seed)
    rng = np.random.default_rng(seed)
    for _ in range(settings.encoder_steps):
        rows = torch.randint(len(images), (settings.batch_size,), generator=g)
        mask = torch.from_numpy(np.stack([free_form_mask(images.shape[-1], train_masks, rng)
                                          for _ in rows])).float()[:, None]  # (B, 1, S, S)
        logits, m_hat = model(images[rows], mask)
        loss = F.cross_entropy(logits, tokens[rows], reduction="none")[m_hat].mean() if m_hat.any() else logits.sum() * 0
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return model.eval()


@torch.no_grad()
def hits(predict, images: torch.Tensor, masks: torch.Tensor, tokens: torch.Tensor, alpha: float, factor: int,
         batch_size: int) -> dict[str, np.ndarray]:
    """Per evaluation image: right predictions and counts at the claim tokens and at every
    visible token. predict(x, mask) -> tokens (B, h, w)."""
    out = {k: [] for k in ("claim_right", "claim_count", "visible_right", "visible_count")}
    for i in range(0, len(images), batch_size):
        x, m, y = images[i:i + batch_size], masks[i:i + batch_size], tokens[i:i + batch_size]
        m_hat = token_mask(m, alpha, factor)[:, 0] > 0.5  # (B, h, w)
        claim = partially_masked(m, m_hat, factor)
        right = predict(x, m) == y
        out["claim_right"].append((right & claim).sum((1, 2)))
        out["claim_count"].append(claim.sum((1, 2)))
        out["visible_right"].append((right & m_hat).sum((1, 2)))
        out["visible_count"].append(m_hat.sum((1, 2)))
    return {k: torch.cat(v).numpy() for k, v in out.items()}


def pooled(right: np.ndarray, count: np.ndarray) -> np.ndarray:
    """Accuracy pooled over images (last axis), for every leading index (e.g. seeds)."""
    return right.sum(-1) / np.maximum(count.sum(-1), 1)


def summarise(per_seed: dict[str, dict[str, np.ndarray]], tokens: str, references: tuple[str, ...], n_boot: int,
              seed: int = 0) -> dict[str, dict]:
    """per_seed[method][f"{tokens}_right" | f"{tokens}_count"]: (seeds, images) arrays.
    Per method: the accuracy averaged over seeds, its 95 % bootstrap interval over images, each
    seed's accuracy, and the paired difference from each of `references` with its interval."""
    rng = np.random.default_rng(seed)
    n_images = next(iter(per_seed.values()))[f"{tokens}_count"].shape[-1]
    draws = rng.integers(0, n_images, size=(n_boot, n_images))  # the same images for every method

    def accuracy(m: str, rows=slice(None)) -> np.ndarray:  # averaged over seeds
        right, count = per_seed[m][f"{tokens}_right"][:, rows], per_seed[m][f"{tokens}_count"][:, rows]
        return pooled(right, count).mean(0)

    boot = {m: np.array([accuracy(m, d) for d in draws]) for m in per_seed}
    table = {}
    for m in per_seed:
        table[m] = {
            "accuracy": float(accuracy(m)),
            "ci95": [float(np.percentile(boot[m], 2.5)), float(np.percentile(boot[m], 97.5))],
            "per_seed": [float(a) for a in pooled(per_seed[m][f"{tokens}_right"], per_seed[m][f"{tokens}_count"])],
            "tokens_per_seed": int(per_seed[m][f"{tokens}_count"][0].sum()),
        }
        for ref in references:
            diff = boot[m] - boot[ref]
            table[m][f"minus_{ref}"] = float(accuracy(m) - accuracy(ref))
            table[m][f"minus_{ref}_ci95"] = [float(np.percentile(diff, 2.5)), float(np.percentile(diff, 97.5))]
    return table


def measure(folder: Path, vq: VQGANConfig, enc: EncoderConfig, masks: MasksConfig, settings: ClaimSettings,
            log=print) -> dict:
    """The whole comparison: load, train the VQGAN, train every encoder for every seed, score.
    Returns the settings, the tables (claim tokens, all visible tokens; differences paired
    against the first rule's restrictive encoder and against the vanilla encoder) and the
    seconds taken."""
    torch.set_num_threads(settings.threads)
    start = time.monotonic()
    images = load_images(folder, settings.images, settings.size)
    train_x, eval_x = images[:-settings.eval_images], images[-settings.eval_images:]
    vqgan = train_vqgan(vq, train_x, settings.vqgan_steps, settings.batch_size, settings.lr, seed=0)
    factor = vqgan.factor
    tokens_of = lambda x: torch.cat([vqgan.tokenize(x[i:i + 64]) for i in range(0, len(x), 64)])  # noqa: E731
    train_y, eval_y = tokens_of(train_x), tokens_of(eval_x)
    eval_m = torch.from_numpy(np.stack([eval_mask("large", settings.size, masks, EVAL_SPLIT, i)
                                        for i in range(len(eval_x))])).float()[:, None]
    log(f"vqgan trained ({time.monotonic() - start:.0f} s); {len(torch.unique(eval_y))} codes in the eval tokens")
    score = lambda predict: hits(predict, eval_x, eval_m, eval_y, enc.alpha, factor, 32)  # noqa: E731
    per_seed: dict[str, list[dict]] = {m: [] for m in methods(settings.rules)}
    vq_hits = score(lambda x, m: vqgan.tokenize(masked(x, m)))
    for seed in settings.seeds:
        per_seed[VQGAN_ON_MASKED].append(vq_hits)
        for m in methods(settings.rules)[:-1]:
            kind, rule = ("vanilla", enc.stride1_rule) if m == "vanilla" else ("restrictive", m.split("_", 1)[1])
            t0 = time.monotonic()
            model = train_encoder(kind, vq, dataclasses.replace(enc, stride1_rule=rule), train_x, train_y,
                                  masks.train, settings, seed)
            per_seed[m].append(score(lambda x, mask: model(x, mask)[0].argmax(1)))
            log(f"seed {seed} {m}: {time.monotonic() - t0:.0f} s, claim accuracy "
                f"{pooled(per_seed[m][-1]['claim_right'], per_seed[m][-1]['claim_count']):.3f}")
    stacked = {m: {k: np.stack([h[k] for h in hs]) for k in hs[0]} for m, hs in per_seed.items()}
    references = (f"restrictive_{settings.rules[0]}", "vanilla")
    return {
        "settings": dataclasses.asdict(settings),
        "token_set": "large masks; tokens visible under M̂ whose f x f pixel block holds a hole pixel",
        "factor": factor,
        "chance": 1.0 / vq.n_embed,
        "claim_tokens": summarise(stacked, "claim", references, settings.bootstrap),
        "visible_tokens": summarise(stacked, "visible", references, settings.bootstrap),
        "seconds": round(time.monotonic() - start, 1),
    }


def markdown(result: dict) -> str:
    """The result as a Markdown table per token set."""
    lines = []
    s = result["settings"]
    lines.append(f"{s['size']} px, {s['images'] - s['eval_images']} training and {s['eval_images']} evaluation images, "
                 f"VQGAN {s['vqgan_steps']} steps, encoders {s['encoder_steps']} steps at batch {s['batch_size']}, "
                 f"seeds {list(s['seeds'])}; {result['seconds']:.0f} s in all; chance {result['chance']:.3f}.")
    for name, title in (("claim_tokens", "claim tokens (partially masked, visible)"), ("visible_tokens", "all visible tokens")):
        table = result[name]
        refs = [k for k in next(iter(table.values())) if k.startswith("minus_") and not k.endswith("ci95")]
        lines += ["", f"**{title}** ({next(iter(table.values()))['tokens_per_seed']} tokens per seed)", "",
                  "| encoder | accuracy | 95 % CI | per seed | "
                  + " | ".join(f"{r.replace('_', ' ')} (95 % CI)" for r in refs) + " |",
                  "|---|---:|---|---|" + "---|" * len(refs)]
        for m, row in table.items():
            lo, hi = row["ci95"]
            seeds = ", ".join(f"{a:.3f}" for a in row["per_seed"])
            diffs = " | ".join(f"{row[r]:+.3f} [{row[r + '_ci95'][0]:+.3f}, {row[r + '_ci95'][1]:+.3f}]" for r in refs)
            lines.append(f"| {m} | {row['accuracy']:.3f} | [{lo:.3f}, {hi:.3f}] | {seeds} | {diffs} |")
    return "\n".join(lines) + "\n"
