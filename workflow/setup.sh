#!/usr/bin/env bash
# One-command setup: a virtual environment in .venv with the pinned stack and this project.
# Idempotent: a second run only checks. PYTHON picks the interpreter (default: python3).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install --quiet --upgrade pip
# torch and torchvision are pinned in pyproject.toml; on a CUDA machine pip takes the CUDA build.
.venv/bin/python -m pip install --quiet --editable ".[test]"
.venv/bin/python -c "import torch, torchvision, lpips, snakemake, dvc, mlflow, webdataset; print('latent-inpaint environment ready: torch', torch.__version__)"
