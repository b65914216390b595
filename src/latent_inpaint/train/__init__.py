"""One training loop shared by every stage: a stage supplies modules, batches and losses.

See `loop.py` for the step, the checkpoint layout and the rename protocol that makes
checkpoints atomic.
"""

from .distributed import unwrap, world_size
from .loop import (
    CheckpointMismatch,
    Stage,
    TrainingInterrupted,
    export_final,
    load_stage_weights,
    loop_settings,
    param_digest,
    scaled_lr,
    seed_everything,
    train,
)

__all__ = [
    "CheckpointMismatch",
    "Stage",
    "TrainingInterrupted",
    "export_final",
    "load_stage_weights",
    "loop_settings",
    "param_digest",
    "scaled_lr",
    "seed_everything",
    "train",
    "unwrap",
    "world_size",
]
