"""One training loop shared by every stage: a stage supplies modules, batches and losses.

`loop.py` is the loop; `checkpoint.py` the run folder (checkpoints, resume, final/);
`distributed.py` ranks, DDP, seeds and stop signals. Saved models are `latent_inpaint.saved`'s.
"""

from ..saved import CheckpointMismatch
from .distributed import param_digest, seed_everything
from .loop import Stage, TrainingInterrupted, loop_settings, run, scaled_lr, train

__all__ = [
    "CheckpointMismatch",
    "Stage",
    "TrainingInterrupted",
    "loop_settings",
    "param_digest",
    "run",
    "scaled_lr",
    "seed_everything",
    "train",
]
