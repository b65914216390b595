"""Record what the authors' code computes, as test fixtures that need none of their code to use.

Given a checkout of github.com/nintendops/latent-code-inpainting (and the few packages it
imports; see tests/fixtures/official/README.md), this script

1. builds their modules at a reduced width (32 channels, 16 px images, an 8 x 8 token grid, a
   2-layer transformer) with seeded random weights, and saves each as a Lightning checkpoint the
   way their training saves it: {"state_dict": ..., "optimizer_states": [Adam moments], "loops",
   "callbacks", ...}, xz-compressed (weights are rounded to a coarse grid so that they compress);
2. runs their code on fixed inputs and records the outputs: VQGAN encode/decode, encoder logits
   and token mask, transformer logits for a given token state, their sampler (argmax draws, and
   seeded draws with every torch.multinomial result recorded so a test can inject them), decoder,
   both refiners, and the whole inference of eval.ipynb at 16 px and 16 -> 32 px;
3. builds every released checkpoint's module at full size on the meta device, as their training
   configs build it, and writes the key -> shape list of each state_dict.

Only tensors, numbers and names are written: no code of theirs. Run from the project root:

    python tools/official_reference.py --repo /path/to/latent-code-inpainting \
        --deps /path/to/their/site-packages --out tests/fixtures/official
"""

from __future__ import annotations

import argparse
import contextlib
import gzip
import io
import json
import lzma
import math
import os
import subprocess
import sys
import types
from pathlib import Path

import torch

SEED = 20240611
SIZE = 16  # tiny image side; the 512-style refiner doubles it
TINY_DD = {  # their `ddconfig` at reduced width: GroupNorm(32) makes 32 channels the least
    "double_z": False, "z_channels": 16, "resolution": SIZE, "in_channels": 3, "out_ch": 3, "ch": 32,
    "ch_mult": [1, 1], "num_res_blocks": 1, "attn_resolutions": [SIZE // 2], "dropout": 0.0,
}
TINY_DD_UP = {**TINY_DD, "resolution": 2 * SIZE, "ch_mult": [1, 1, 1]}  # as places_unet_512: one level more
TINY_N_EMBED, TINY_EMBED_DIM = 32, 16
TINY_GPT = {"vocab_size": TINY_N_EMBED + 1, "block_size": (SIZE // 2) ** 2 + 1, "n_layer": 2, "n_head": 2,
            "n_embd": 32, "embd_pdrop": 0.0, "resid_pdrop": 0.0, "attn_pdrop": 0.0}
CLAMP_RATIO = 0.25  # eval.ipynb
SAMPLING = {"sampling_ratio": 0.2, "temperature": 1.0, "temperature_degradation": 0.9, "scheduler": "cosine"}
DUMMY_LOSS = {"target": "core.modules.losses.DummyLoss"}

# Released files -> (config file, path to the module's config in it, what to change so it is
# built as training built it). See official-code.md for what each file holds.
RELEASED = {
    "places256_vqgan1024_BASE.ckpt": ("configs/places_inpainting.yaml", "vqmodel_config", "vqgan"),
    "places256_partialencoder.ckpt": ("configs/places_inpainting.yaml", "encoder_config", "encoder"),
    "places256_transformer.ckpt": ("configs/places_inpainting.yaml", "transformer_config", "transformer"),
    "places256_decoder.ckpt": ("configs/places_inpainting.yaml", "decoder_config", "decoder"),
    "places256_unet.ckpt": ("configs/places_inpainting.yaml", "unet_config", "unet_frozen"),
    "places_unet_512.ckpt": ("configs/places_inpainting_512.yaml", "unet_config", "unet_joint"),
    "celeba_vqgan.ckpt": ("configs/celeba_inpainting.yaml", "vqmodel_config", "vqgan"),
    "celeba_encoder.ckpt": ("configs/celeba_inpainting.yaml", "encoder_config", "encoder"),
    "celeba_transformer.ckpt": ("configs/celeba_inpainting.yaml", "transformer_config", "transformer"),
    "celeba_decoder.ckpt": ("configs/celeba_inpainting.yaml", "unet_config", "unet_joint"),
}


# ---------------------------------------------------------------------------------- their code


def import_official(repo: Path, deps: Path | None) -> types.SimpleNamespace:
    """Their modules, importable on a CPU without network (the shims official-code.md lists)."""
    for path in (str(repo), str(deps) if deps else None):
        if path and path not in sys.path:
            sys.path.insert(0, path)
    import pytorch_lightning  # noqa: F401  (must precede the stub below: it probes `transformers`)
    import torchvision.models

    # mingpt imports top_k_top_p_filtering from `transformers` and never calls it.
    sys.modules.setdefault("transformers", types.SimpleNamespace(top_k_top_p_filtering=None))
    vgg16 = torchvision.models.vgg16
    # LPIPS asks for ImageNet VGG weights (not available offline); their values do not matter here.
    torchvision.models.vgg16 = lambda pretrained=False, **kw: vgg16(weights=None, **kw)
    os.chdir(repo)  # LPIPS finds its own linear layers at a path relative to the checkout
    with contextlib.redirect_stdout(io.StringIO()):
        import train
    return types.SimpleNamespace(instantiate=train.instantiate_from_config)


def _cfg(target: str, **params) -> dict:
    return {"target": target, "params": params}


def build(instantiate, cfg: dict):
    """Their instantiate_from_config, quiet (their constructors print)."""
    from omegaconf import OmegaConf

    with contextlib.redirect_stdout(io.StringIO()):
        return instantiate(OmegaConf.create(cfg))


def commit_of(repo: Path) -> str | None:
    try:
        return subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


# ---------------------------------------------------------------------------------- tiny models


def randomize(module: torch.nn.Module, generator: torch.Generator) -> None:
    """Seeded random values in every parameter (norm scales near 1, small biases, embeddings and
    run-time-scaled weights at unit scale, other weights at 1/sqrt(fan_in)), rounded to a power-of-two grid 1/8 of that scale so the saved files
    compress. Constant buffers (FIR filters, causal masks) keep their values."""
    # Their StyleGAN-style layers scale weights at run time (weight_gain): those are drawn at unit scale.
    runtime_scaled = {name for name, m in module.named_modules() if hasattr(m, "weight_gain")}
    with torch.no_grad():
        for name, p in module.named_parameters():
            leaf = name.rsplit(".", 1)[-1]
            is_norm = any(part.startswith(("norm", "ln")) for part in name.split("."))
            if leaf == "weight" and is_norm:
                centre, scale = 1.0, 0.1
            elif leaf == "bias":
                centre, scale = 0.0, 0.05
            elif "emb" in name:  # token, position and codebook embeddings: unit scale, like the features
                centre, scale = 0.0, 1.0
            elif name.rsplit(".", 1)[0] in runtime_scaled:
                centre, scale = 0.0, 1.0
            else:  # 1/sqrt(fan_in): signals neither vanish nor drown in the biases
                centre, scale = 0.0, p[0].numel() ** -0.5
            step = 2.0 ** math.floor(math.log2(scale / 8))
            value = centre + scale * torch.randn(p.shape, generator=generator)
            p.copy_(torch.round(value / step) * step)


def adam_state(module: torch.nn.Module) -> dict:
    """An Adam state dict as torch writes it, one (step, exp_avg, exp_avg_sq) per parameter. The
    moments are constants: they cost nothing compressed, and an importer that took one for a
    weight would be caught by the recorded outputs."""
    params = [p for p in module.parameters() if p.requires_grad]
    state = torch.optim.Adam(params, lr=1e-4, betas=(0.5, 0.9)).state_dict()
    for i, p in enumerate(params):
        state["state"][i] = {"step": torch.tensor(1000.0), "exp_avg": torch.full_like(p, 2.0**-10),
                             "exp_avg_sq": torch.full_like(p, 2.0**-20)}
    return state


def lightning_checkpoint(module: torch.nn.Module) -> dict:
    """The dict pytorch-lightning 1.9 saves (their pinned version; their train.py adds a
    ModelCheckpoint without a monitor and no LR scheduler)."""
    callback_key = ("ModelCheckpoint{'monitor': None, 'mode': 'min', 'every_n_train_steps': 0, "
                    "'every_n_epochs': 1, 'train_time_interval': None}")
    return {
        "epoch": 3,
        "global_step": 1000,
        "pytorch-lightning_version": "1.9.0",
        "state_dict": module.state_dict(),
        "loops": {"fit_loop": {"state_dict": {}, "epoch_progress": {"total": {"ready": 4, "completed": 3}}}},
        "callbacks": {callback_key: {
            "monitor": None, "best_model_score": None, "best_model_path": "", "current_score": None,
            "dirpath": "logs/checkpoints", "best_k_models": {}, "kth_best_model_path": "",
            "kth_value": torch.tensor(float("inf")), "last_model_path": "logs/checkpoints/last.ckpt"}},
        "optimizer_states": [adam_state(module)],
        "lr_schedulers": [],
    }


def save_checkpoint(checkpoint: dict, path: Path) -> None:
    buffer = io.BytesIO()
    torch.save(checkpoint, buffer)
    path.write_bytes(lzma.compress(buffer.getvalue(), preset=9 | lzma.PRESET_EXTREME))


def tiny_models(instantiate, generator: torch.Generator) -> dict[str, torch.nn.Module]:
    """Their five module kinds at reduced width, as the released checkpoints hold them:
    vqgan, encoder, transformer, decoder (PartialDecoder), unet (RefinementUNet 16 -> 16), and
    unet_up (RefinementUNet 16 -> 32 with its own PartialDecoder, like places_unet_512 and
    celeba_decoder)."""
    dd = dict(TINY_DD)
    codes = {"n_embed": TINY_N_EMBED, "embed_dim": TINY_EMBED_DIM}
    decoder_cfg = _cfg("core.models.decoder.decoder.PartialDecoder", ddconfig=dd, lossconfig=DUMMY_LOSS,
                       restriction=False, **codes)
    models = {
        "vqgan": build(instantiate, _cfg("core.models.vqgan.VQModel", ddconfig=dd, lossconfig=DUMMY_LOSS, **codes)),
        "encoder": build(instantiate, _cfg("core.models.encoder.MaskPartialEncoderModel",
                                           ddconfig={**dd, "clamp_ratio": CLAMP_RATIO}, **codes)),
        "transformer": build(instantiate, _cfg(
            "core.models.transformer.Transformer", transformer_config=_cfg("core.modules.transformer.mingpt.GPT", **TINY_GPT),
            cond_stage_config="__is_unconditional__", cond_stage_key="segmentation", attention_extent="mask")),
        "decoder": build(instantiate, decoder_cfg),
        "unet": build(instantiate, _cfg("core.models.decoder.unet.RefinementUNet", ddconfig=dd, freeze_firststage=True,
                                        **codes)),
        "unet_up": build(instantiate, _cfg("core.models.decoder.unet.RefinementUNet", ddconfig=dict(TINY_DD_UP),
                                           edconfig=dd, input_res=SIZE, freeze_firststage=True, **codes)),
    }
    # As InpaintingMaster builds a jointly trained refiner for inference: its own PartialDecoder
    # (without the VQGAN copy training embedded in it) under first_stage_model.
    unet_up = models["unet_up"]
    unet_up.freeze_firststage, unet_up.first_stage_model_type = False, "decoder"
    unet_up.first_stage_model = build(instantiate, decoder_cfg)
    unet_up.loss_fstg = unet_up.first_stage_model.loss
    for model in models.values():
        randomize(model, generator)
        model.eval()
    return models


# ---------------------------------------------------------------------------------- recorded outputs


def fixed_inputs(generator: torch.Generator) -> dict[str, torch.Tensor]:
    """Two 16 px images in [-1, 1] (smooth, so the VQGAN sees structure) and two masks (1 = keep):
    row 0 a centred 10 x 10 hole, row 1 a seeded blob hole; the rows have different token counts,
    which is where their sampler's batch quirk shows."""
    coarse = torch.rand(2, 3, 4, 4, generator=generator) * 2 - 1
    image = torch.nn.functional.interpolate(coarse, size=(SIZE, SIZE), mode="bilinear", align_corners=False)
    image = (image + 0.1 * torch.randn(image.shape, generator=generator)).clamp(-1, 1)
    mask = torch.ones(2, 1, SIZE, SIZE)
    mask[0, :, 3:13, 3:13] = 0
    blob = torch.nn.functional.interpolate(torch.rand(1, 1, 4, 4, generator=generator), size=(SIZE, SIZE),
                                           mode="bilinear", align_corners=False)
    mask[1] = (blob[0] < 0.6).float()
    up = torch.nn.functional.interpolate(image, size=(2 * SIZE, 2 * SIZE), mode="bilinear", align_corners=False)
    return {"image": image, "mask": mask, "image_up": up}


@contextlib.contextmanager
def recorded_multinomial(log: list[torch.Tensor]):
    """torch.multinomial as usual, with every result appended to `log` (the draws a test injects)."""
    original = torch.multinomial

    def multinomial(*args, **kwargs):
        out = original(*args, **kwargs)
        log.append(out.clone())
        return out

    torch.multinomial = multinomial
    try:
        yield
    finally:
        torch.multinomial = original


def sample_tokens(transformer, z_indices, mask_out, *, sample: bool):
    """Their sampler as eval.ipynb calls it: (tokens (B, N), per-step candidates, per-step draws)."""
    b = z_indices.shape[0]
    batch = {"image": torch.zeros(b, SIZE, SIZE, 3)}
    _, c = transformer.get_xc(batch)
    _, c_indices = transformer.encode_to_c(c)
    mask = transformer.preprocess_mask(mask_out, z_indices)
    start = mask * z_indices + (1 - mask) * torch.full_like(z_indices, transformer.mask_token)
    draws: list[torch.Tensor] = []
    with recorded_multinomial(draws):
        tokens, _, candidates = transformer.sample(start, c_indices, sample=sample, top_k=None, return_probs=True,
                                                   **SAMPLING)
    return start, tokens, [torch.as_tensor(c) for c in candidates], draws


def record(models: dict, inputs: dict) -> tuple[dict[str, torch.Tensor], dict]:
    """Run their code on the fixed inputs: (tensors by name, facts about them)."""
    out: dict[str, torch.Tensor] = dict(inputs)
    facts: dict = {}
    vq, enc, tr, dec = models["vqgan"], models["encoder"], models["transformer"], models["decoder"]
    unet, unet_up = models["unet"], models["unet_up"]
    enc.set_first_stage_model(vq)
    tr.set_first_stage_model(enc)
    dec.set_first_stage_model(vq)
    x, mask = inputs["image"], inputs["mask"]

    with torch.no_grad():
        quant, _, (_, _, idx) = vq.encode(x)
        out["vqgan.quant"], out["vqgan.indices"] = quant, idx.reshape(x.shape[0], -1)
        out["vqgan.decoded"] = vq.decode(quant)

        logits, m_hat = enc.encode_logits(x * mask, mask, clamp_ratio=CLAMP_RATIO)
        out["encoder.logits"], out["encoder.token_mask"] = logits, m_hat
        quant_enc, _, info, mask_out = enc.encode(x * mask, mask, clamp_ratio=CLAMP_RATIO)
        b, _, h, w = quant_enc.shape
        z_indices = info[2].reshape(b, -1).long()
        mask_out = mask_out.reshape(b, -1)
        out["encoder.indices"] = z_indices

        # Transformer logits for a token state: the encoder's tokens where M̂ is visible.
        keep = mask_out.long()
        state = keep * (z_indices + 1)  # their ids: code i is i + 1, 0 = [MASK]
        ids = torch.cat([torch.zeros(b, 1, dtype=torch.long), state], 1)  # start token 0 in front
        visible = torch.cat([torch.ones(b, 1, dtype=torch.long), keep], 1)
        out["transformer.ids"], out["transformer.visible"] = ids, visible
        out["transformer.logits"] = tr.transformer(ids, mask=visible, autoregressive=False)[0]

        for mode, sample in (("argmax", False), ("seeded", True)):
            torch.manual_seed(SEED)
            start, tokens, candidates, draws = sample_tokens(tr, z_indices, mask_out, sample=sample)
            out[f"sampler.{mode}.tokens"] = tokens
            for i, cand in enumerate(candidates):
                out[f"sampler.{mode}.step{i}.candidates"] = cand
            for i, d in enumerate(draws):
                out[f"sampler.{mode}.step{i}.draws"] = d
            facts[f"sampler.{mode}.steps"] = len(candidates)
        out["sampler.start"] = start

        # The whole inference of eval.ipynb, with each sampler's tokens.
        for mode in ("argmax", "seeded"):
            tokens = out[f"sampler.{mode}.tokens"]
            quant_full = vq.quantize.get_codebook_entry(tokens.reshape(-1).int(), shape=(b, h, w, TINY_EMBED_DIM))
            batch = batch_of(x * mask)  # eval.ipynb's batch: the masked image, channels last
            decoded, *_ = dec(batch, quant=quant_full, mask_in=mask, mask_out=mask_out.reshape(b, 1, h, w),
                              return_fstg=False, debug=True)
            composite = x * mask + decoded * (1 - mask)
            out[f"inference.{mode}.decoded"] = decoded
            out[f"inference.{mode}.final"] = unet.refine(composite, None, recomp=False) * (1 - mask) + x * mask
            # The 512-style path: the refiner's own decoder, then 16 -> 32, pasted into the 32 px input.
            joint = unet_up.first_stage_model
            joint.set_first_stage_model(vq)
            decoded_up, *_ = joint(batch, quant=quant_full, mask_in=mask, mask_out=mask_out.reshape(b, 1, h, w),
                                   return_fstg=False, debug=True)
            mask_up = torch.nn.functional.interpolate(mask, size=(2 * SIZE, 2 * SIZE))
            refined = unet_up.refine(x * mask + decoded_up * (1 - mask), None, recomp=False)
            out[f"inference_up.{mode}.decoded"] = decoded_up
            out[f"inference_up.{mode}.final"] = inputs["image_up"] * mask_up + refined * (1 - mask_up)

        # Each stage alone on the argmax tokens, without the pastes.
        tokens = out["sampler.argmax.tokens"]
        quant_full = vq.quantize.get_codebook_entry(tokens.reshape(-1).int(), shape=(b, h, w, TINY_EMBED_DIM))
        out["decoder.quant"] = quant_full
        out["decoder.raw"] = dec(batch_of(x * mask), quant=quant_full, mask_in=mask,
                                 mask_out=mask_out.reshape(b, 1, h, w), recomposition=False, return_fstg=False)[0]
        out["unet.input"] = x * mask + out["decoder.raw"] * (1 - mask)
        out["unet.raw"] = unet.refine(out["unet.input"], None, recomp=False)
        out["unet_up.raw"] = unet_up.refine(out["unet.input"], None, recomp=False)
    facts["shapes"] = {k: list(v.shape) for k, v in out.items()}
    return {k: v.detach().contiguous() for k, v in out.items()}, facts


def batch_of(image: torch.Tensor) -> dict:
    return {"image": image.permute(0, 2, 3, 1)}


# ---------------------------------------------------------------------------------- full-size layouts


def _strip_ckpt(node):
    if isinstance(node, dict):
        return {k: _strip_ckpt(v) for k, v in node.items() if k != "ckpt_path"}
    if isinstance(node, list):
        return [_strip_ckpt(v) for v in node]
    return node


def full_size_layouts(instantiate, repo: Path) -> dict:
    """{file: {"keys": {name: shape}, "weights_bytes": fp32 bytes of the state_dict}} for every
    released checkpoint, its module built on the meta device."""
    from omegaconf import OmegaConf

    layouts = {}
    for name, (config_file, section, kind) in RELEASED.items():
        params = OmegaConf.to_container(OmegaConf.load(repo / config_file).model.params, resolve=True)
        vq_cfg = _strip_ckpt(params["vqmodel_config"])
        vq_embedded = {**vq_cfg, "params": {**vq_cfg["params"], "lossconfig": DUMMY_LOSS}}
        cfg = _strip_ckpt(params[section])
        if kind in ("encoder", "transformer", "decoder"):
            cfg["params"]["first_stage_config"] = vq_embedded  # their training configs embed the VQGAN
        if kind.startswith("unet"):
            decoder = _strip_ckpt(params["decoder_config"])
            decoder["params"]["first_stage_config"] = vq_embedded
            cfg["params"].update(first_stage_model_type="decoder", first_stage_config=decoder,
                                 freeze_firststage=kind == "unet_frozen",
                                 lossconfig=decoder["params"]["lossconfig"])
        with torch.device("meta"), _meta_filters():
            model = build(instantiate, cfg)
        state = model.state_dict()
        layouts[name] = {
            "config": f"{config_file}:model.params.{section}",
            "keys": {k: list(v.shape) for k, v in state.items()},
            "weights_bytes": sum(v.numel() * v.element_size() for v in state.values()),
        }
    return layouts


@contextlib.contextmanager
def _meta_filters():
    """Their FIR filters are built on the CPU and moved; on the meta device keep them there."""
    from core.torch_utils.ops import upfirdn2d

    original = upfirdn2d.setup_filter

    def setup_filter(f, device=None, **kwargs):
        with torch.device("cpu"):
            return original(f, **kwargs).to("meta")

    upfirdn2d.setup_filter = setup_filter
    try:
        yield
    finally:
        upfirdn2d.setup_filter = original


# ---------------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repo", type=Path, required=True, help="a checkout of nintendops/latent-code-inpainting")
    parser.add_argument("--deps", type=Path, help="folder with their pinned packages (pip install --target)")
    parser.add_argument("--out", type=Path, required=True, help="fixture folder to write")
    parser.add_argument("--commit", help="their commit id, if --repo is an export without .git")
    args = parser.parse_args(argv)
    repo, out = args.repo.resolve(), args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)

    official = import_official(repo, args.deps.resolve() if args.deps else None)
    torch.set_grad_enabled(False)
    torch.manual_seed(SEED)  # their constructors draw initial weights from the global generator
    generator = torch.Generator().manual_seed(SEED)
    models = tiny_models(official.instantiate, generator)
    for name, model in models.items():
        save_checkpoint(lightning_checkpoint(model), out / f"{name}.ckpt.xz")
    tensors, facts = record(models, fixed_inputs(generator))

    from safetensors.torch import save_file

    save_file(tensors, str(out / "reference.safetensors"))
    layouts = full_size_layouts(official.instantiate, repo)
    with gzip.GzipFile(out / "released_layouts.json.gz", "wb", mtime=0) as f:  # mtime=0: same bytes each run
        f.write((json.dumps(layouts, indent=0) + "\n").encode())
    meta = {
        "source": "https://github.com/nintendops/latent-code-inpainting",
        "commit": args.commit or commit_of(repo),
        "command": "python tools/official_reference.py --repo REPO --deps DEPS --out tests/fixtures/official"
                   + (f" --commit {args.commit}" if args.commit else ""),
        "torch": torch.__version__,
        "seed": SEED,
        "tiny": {"ddconfig": TINY_DD, "ddconfig_up": TINY_DD_UP, "n_embed": TINY_N_EMBED,
                 "embed_dim": TINY_EMBED_DIM, "gpt": TINY_GPT, "clamp_ratio": CLAMP_RATIO, "sampling": SAMPLING},
        "checkpoints": {name: f"{name}.ckpt.xz" for name in models},
        **facts,
    }
    (out / "reference.json").write_text(json.dumps(meta, indent=1) + "\n")


if __name__ == "__main__":
    main()
