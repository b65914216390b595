"""Reading the authors' released checkpoints safely and leanly, and taking from them exactly the
weights a module needs.

Their files are pytorch-lightning checkpoints: pickles of {"state_dict": ..., "optimizer_states":
..., "loops": ..., "callbacks": ..., ...}, up to 11.8 GB (the transformer, two Adam moments per
weight). `read_checkpoint` memory-maps the file and unpickles it with torch's weights-only
unpickler plus an explicit allowlist of inert stand-ins for the few non-tensor types Lightning
writes, so no code from the file runs and tensors stay on disk until read. `take` then selects a
module's weights under a prefix, checks them strictly against the module's expected shapes and
lists everything it leaves behind, so nothing is dropped silently.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import os
import pickle
import re
import zipfile
from pathlib import Path

import torch


class CheckpointError(ValueError):
    """A checkpoint that cannot be used; the message names the file and what is wrong."""


class _StandIn:
    """An inert object in place of a class a checkpoint names: it accepts any construction and
    state and does nothing with them."""

    def __init__(self, *args, **kwargs):
        self.args = args

    def __setstate__(self, state):
        self.state = state


def _stand_in(qualified_name: str) -> type:
    return type(qualified_name.rsplit(".", 1)[-1], (_StandIn,), {"qualified_name": qualified_name})


# Non-tensor globals Lightning checkpoints hold outside the weights (older Lightning keys callback
# states by the callback's class; hparams may be a Namespace; metrics may be numpy scalars). Each
# becomes a stand-in: nothing of these libraries is imported or run.
ALLOWED_GLOBALS = (
    "pytorch_lightning.callbacks.model_checkpoint.ModelCheckpoint",
    "pytorch_lightning.callbacks.early_stopping.EarlyStopping",
    "pytorch_lightning.callbacks.lr_monitor.LearningRateMonitor",
    "argparse.Namespace",
    "omegaconf.dictconfig.DictConfig",
    "omegaconf.listconfig.ListConfig",
    "numpy.core.multiarray.scalar",
    "numpy._core.multiarray.scalar",
    "numpy.dtype",
)
_SAFE_GLOBALS = [(_stand_in(name), name) for name in ALLOWED_GLOBALS]


def read_checkpoint(path: str | os.PathLike, *, trust_pickle: bool = False) -> tuple[dict[str, torch.Tensor], list[str]]:
    """(state_dict, the other top-level entries' names) of a Lightning checkpoint, memory-mapped.

    Tensors stay backed by the file until read. A global outside torch's weights-only set and
    ALLOWED_GLOBALS is refused unless trust_pickle (then the file is unpickled in full: only for
    files the user trusts)."""
    path = Path(path)
    if not zipfile.is_zipfile(path):
        raise CheckpointError(f"{path}: not a torch zip checkpoint (truncated, corrupt, or a legacy format)")
    try:
        if trust_pickle:
            obj = torch.load(path, map_location="cpu", mmap=True, weights_only=False)
        else:
            with torch.serialization.safe_globals(_SAFE_GLOBALS):
                obj = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except pickle.UnpicklingError as exc:
        found = re.search(r"GLOBAL [\w.]+", str(exc))
        reason = f"{found.group(0)} is not allowed" if found else str(exc).strip().splitlines()[-1]
        raise CheckpointError(
            f"{path}: refused: the pickle needs something outside the allowlist of safe types ({reason}). "
            "Nothing from it was run. If you trust the file's source, pass --trust-pickle (trust_pickle=True)."
        ) from None
    except (RuntimeError, EOFError, zipfile.BadZipFile) as exc:
        raise CheckpointError(f"{path}: unreadable checkpoint ({str(exc).splitlines()[0]})") from None
    if not isinstance(obj, dict) or not isinstance(obj.get("state_dict"), dict):
        raise CheckpointError(f"{path}: expected a Lightning checkpoint with a 'state_dict' entry")
    state = obj["state_dict"]
    bad = [k for k, v in state.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise CheckpointError(f"{path}: state_dict entries that are not tensors: {_key_list(bad)}")
    return state, sorted(k for k in obj if k != "state_dict")


def _key_list(keys: list[str], limit: int = 10) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f", ... ({len(keys) - limit} more)" if len(keys) > limit else "")


@dataclasses.dataclass(frozen=True)
class Taken:
    """What `take` kept (renamed to the module's names) and what it left behind, by reason."""

    weights: dict[str, torch.Tensor]
    dropped: dict[str, list[str]]  # reason -> checkpoint keys

    def summary(self, path: str | os.PathLike) -> str:
        lines = [f"{path}: {len(self.weights)} tensors kept"]
        lines += [f"  dropped {len(keys)} {reason}" for reason, keys in self.dropped.items() if keys]
        return "\n".join(lines)


def take(
    path: str | os.PathLike,
    state: dict[str, torch.Tensor],
    expected: dict[str, torch.Size],
    *,
    prefix: str = "",
    rename: dict[str, str] | None = None,
    drop: dict[str, tuple[str, ...]] | None = None,
) -> Taken:
    """The tensors of `state` a module needs, strictly.

    A checkpoint key under `prefix` is the module key `rename.get(rest, rest)`; every module key
    in `expected` must be found with its shape. Keys outside the prefix, or matching one of
    `drop`'s patterns (reason -> key prefixes, e.g. {"loss/discriminator weights": ("loss.",)}, or
    glob patterns with a `*`, e.g. "*.resample_filter"), are dropped and reported; any other key
    under the prefix is an error."""
    rename, drop = rename or {}, drop or {}
    weights: dict[str, torch.Tensor] = {}
    dropped: dict[str, list[str]] = {reason: [] for reason in drop}
    dropped["outside " + (prefix or "the module")] = []
    unexpected: list[str] = []
    for key, value in state.items():
        reason = next((r for r, patterns in drop.items() if any(_matches(key, p) for p in patterns)), None)
        if reason is not None:
            dropped[reason].append(key)
        elif not key.startswith(prefix):
            dropped["outside " + (prefix or "the module")].append(key)
        else:
            name = key[len(prefix):]
            name = rename.get(name, name)
            if name in expected:
                weights[name] = value
            else:
                unexpected.append(key)
    missing = [k for k in expected if k not in weights]
    if missing or unexpected:
        raise CheckpointError(
            f"{path}: does not match the module (prefix {prefix!r})\n"
            f"  missing ({len(missing)}): {_key_list(missing)}\n"
            f"  unexpected ({len(unexpected)}): {_key_list(unexpected)}"
        )
    wrong = [k for k in expected if tuple(weights[k].shape) != tuple(expected[k])]
    if wrong:
        raise CheckpointError(
            f"{path}: {len(wrong)} tensor(s) have the wrong shape: "
            + "; ".join(f"{prefix}{k} is {tuple(weights[k].shape)} in the checkpoint, "
                        f"{tuple(expected[k])} in the module" for k in wrong[:5])
        )
    return Taken(weights, dropped)


def _matches(key: str, pattern: str) -> bool:
    return fnmatch.fnmatchcase(key, pattern) if "*" in pattern else key.startswith(pattern)
