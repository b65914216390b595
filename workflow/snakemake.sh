#!/bin/sh
# How dvc.yaml's stages run Snakemake. DVC runs each stage's cmd in a plain shell, where an
# unactivated project has neither `snakemake` nor the rules' `latent-inpaint` on PATH: put the
# project's .venv first when it has one (else keep the environment that runs DVC) and run
# Snakemake with the interpreter found there.
project=$(cd "$(dirname "$0")/.." && pwd)
if [ -x "$project/.venv/bin/python" ]; then
    PATH="$project/.venv/bin:$PATH"
    export PATH
fi
for python in python python3; do
    if command -v "$python" >/dev/null 2>&1 && "$python" -c "import snakemake" 2>/dev/null; then
        exec "$python" -m snakemake "$@"
    fi
done
echo "latent-inpaint: no Python with Snakemake here: run workflow/setup.sh (makes $project/.venv)" >&2
exit 127
