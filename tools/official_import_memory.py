"""Peak memory of importing the authors' full-size transformer checkpoint (issue 11).

Builds a synthetic places256_transformer.ckpt with the released key layout
(tests/fixtures/official/released_layouts.json.gz) and, like the real file, two Adam moments per
trained weight (11.8 GB; pass --layers to cut the 40 blocks, e.g. for a small disk), then imports
its transformer in a fresh process (official.read_checkpoint -> take -> export_final) and prints
the file size, the written weights' size and the importer's peak RSS. The synthetic tensors are
zeros backed by sparse files, so building the checkpoint needs disk, not memory.

    .venv/bin/python tools/official_import_memory.py --work /tmp/official-memory [--layers 40]
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
LAYOUTS = ROOT / "tests" / "fixtures" / "official" / "released_layouts.json.gz"
NAME = "places256_transformer.ckpt"


def zeros(folder: Path, shape: list[int], counter: list[int]) -> torch.Tensor:
    """A float32 tensor of zeros mapped from its own sparse file (no memory until read)."""
    n = 1
    for s in shape:
        n *= s
    path = folder / f"{counter[0]}.bin"
    counter[0] += 1
    with open(path, "wb") as f:
        f.truncate(max(n, 1) * 4)
    return torch.from_file(str(path), shared=False, size=max(n, 1), dtype=torch.float32)[:n].view(shape)


def build(work: Path, layers: int) -> Path:
    keys = json.load(gzip.open(LAYOUTS))[NAME]["keys"]
    keep = {k: v for k, v in keys.items()
            if not k.startswith("transformer.blocks.") or int(k.split(".")[2]) < layers}
    backing = work / "backing"
    backing.mkdir(parents=True, exist_ok=True)
    counter = [0]
    state = {k: zeros(backing, shape, counter) for k, shape in keep.items()}
    trained = [v for k, v in state.items() if k.startswith("transformer.") and not k.endswith(".attn.mask")]
    moments = {i: {"step": torch.tensor(1.0), "exp_avg": zeros(backing, list(w.shape), counter),
                   "exp_avg_sq": zeros(backing, list(w.shape), counter)} for i, w in enumerate(trained)}
    checkpoint = {"epoch": 1, "global_step": 1, "pytorch-lightning_version": "1.9.0", "state_dict": state,
                  "optimizer_states": [{"state": moments, "param_groups": [{"params": list(moments)}]}],
                  "lr_schedulers": [], "loops": {}, "callbacks": {}}
    path = work / "ckpts" / NAME
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(checkpoint, path)
    for f in backing.iterdir():
        f.unlink()
    return path


def import_transformer(path: Path, runs: Path, layers: int) -> None:
    """The import's transformer step alone, as import_official runs it."""
    sys.path.insert(0, str(ROOT / "src"))
    from latent_inpaint.params import load_params
    from latent_inpaint.official import read_checkpoint
    from latent_inpaint.saved import export_final
    from latent_inpaint.stages import official

    arch = official.PLACES256
    arch = official.Architecture(arch.vqgan, arch.resolution, {**arch.transformer, "n_layer": layers},
                                 arch.refiner_size, arch.refiner_channel_mult)
    model = official.build_models(load_params([ROOT / "params.yaml"]), arch)["transformer"]
    state, _ = read_checkpoint(path)
    taken = official.take_weights("transformer", path, state, "transformer.", model)
    official.load_taken(model, taken.weights)
    export_final(runs / "transformer", "transformer", {"transformer": model}, source=str(path))
    print(json.dumps({"peak_rss_bytes": peak_rss()}))


def peak_rss() -> int:
    """This process's peak resident set (VmHWM). Not getrusage's ru_maxrss: across fork + exec it
    keeps the parent's peak (here, the builder's mapped checkpoint)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status (Linux only)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--layers", type=int, default=40, help="transformer blocks to keep (released: 40)")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--reuse", action="store_true", help="import the checkpoint --work already holds")
    args = parser.parse_args()
    if args.child:
        import_transformer(args.work / "ckpts" / NAME, args.work / "runs", args.layers)
        return
    start = time.time()
    path = args.work / "ckpts" / NAME if args.reuse else build(args.work, args.layers)
    built = time.time()
    out = subprocess.run([sys.executable, __file__, "--work", str(args.work), "--layers", str(args.layers), "--child"],
                         capture_output=True, text=True, check=True)
    peak = json.loads(out.stdout.strip().splitlines()[-1])["peak_rss_bytes"]
    weights = sum(p.stat().st_size for p in (args.work / "runs" / "transformer" / "final").glob("*.safetensors"))
    print(json.dumps({"layers": args.layers, "checkpoint_bytes": path.stat().st_size, "weights_written_bytes": weights,
                      "import_peak_rss_bytes": peak, "build_s": round(built - start, 1),
                      "import_s": round(time.time() - built, 1)}, indent=1))


if __name__ == "__main__":
    main()
