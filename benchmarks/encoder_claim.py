"""The paper's encoder claim (restrictive 23 % vs regular-conv 9 % token accuracy on small-mask and
boundary tokens under large masks), on real photos, under each stride-1 rule, with intervals.
What is measured and how: latent_inpaint/evaluate/encoder_claim.py.

    python benchmarks/encoder_claim.py --size 32 --set 'vqgan.channel_mult=[1,2,4]' --images 300 \
        --eval-images 100 --vqgan-steps 60 --encoder-steps 150 --seeds 0 1 2 --threads 1

(the run in README: 32 px with an f4 VQGAN, 8 x 8 tokens of 4 x 4 pixels, sized for two shared
CPU cores; on a GPU raise --size, --encoder-steps and the layout).

Writes <out>.json and <out>.md (default benchmarks/results/encoder_claim).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
from pathlib import Path

import torch

from latent_inpaint.config import section
from latent_inpaint.params import load_params
from latent_inpaint.encoder import STRIDE1_RULES
from latent_inpaint.evaluate.encoder_claim import ClaimSettings, markdown, measure

ROOT = Path(__file__).resolve().parents[1]


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--folder", type=Path, default=ROOT.parent / "shared/data/places_natural/images")
    ap.add_argument("--params", type=Path, default=ROOT / "params.yaml",
                    help="vqgan, encoder and masks sections (the tiny layout by default)")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                    help="a params override, e.g. vqgan.channel_mult=[1,2,4] (repeatable)")
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--images", type=int, default=800)
    ap.add_argument("--eval-images", type=int, default=200)
    ap.add_argument("--vqgan-steps", type=int, default=400)
    ap.add_argument("--encoder-steps", type=int, default=300)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--rules", nargs="+", default=list(STRIDE1_RULES), choices=STRIDE1_RULES)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1: no oversubscription on shared cores)")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/encoder_claim")
    args = ap.parse_args(argv)
    params = load_params([args.params], args.overrides)
    settings = ClaimSettings(size=args.size, images=args.images, eval_images=args.eval_images,
                             vqgan_steps=args.vqgan_steps, encoder_steps=args.encoder_steps,
                             batch_size=args.batch_size, lr=args.lr, seeds=tuple(args.seeds), rules=tuple(args.rules),
                             threads=args.threads)
    result = measure(args.folder, section(params, "vqgan"), section(params, "encoder"), section(params, "masks"),
                     settings, log=lambda line: print(line, file=sys.stderr, flush=True))
    result["machine"] = {"python": platform.python_version(), "torch": torch.__version__,
                         "processor": platform.processor() or platform.machine(), "threads": args.threads}
    result["command"] = " ".join(["python", "benchmarks/encoder_claim.py", *(argv if argv is not None else sys.argv[1:])])
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    args.out.with_suffix(".md").write_text(markdown(result))
    print(markdown(result))
    return result


if __name__ == "__main__":
    main()
