"""A saved model rebuilds itself: the folder format that training, imports and inference share.

A model folder (a run's final/ or checkpoint/, or an imported model's final/) holds:

    <module>.safetensors   the weights of each module, loaded strictly
    config.json            {"stage": its name, "models": {module: spec}, "files": {file: sha256},
                            "torch": version, and what the writer adds (step, config, metrics...)}

A spec is what a model's `spec()` returns: {"model": its class name} plus the settings its
constructor takes. `build_model` rebuilds the model from it with fresh weights and `load_model`
fills them in (nanoGPT's `GPT(GPTConfig(**checkpoint["model_args"]))`). config.json is written
last: a folder that has it is complete.

A folder is replaced by renames, so a kill at any instant leaves a complete copy:

    1. write every file into <name>.tmp-<pid>, fsync each file and the folder (config.json last)
    2. rename <name> -> <name>.old                  (if <name> exists)
    3. rename <name>.tmp-<pid> -> <name>, fsync the parent folder
    4. delete <name>.old

`recover` undoes what a kill left: <name>.tmp-* folders are deleted, and <name>.old is deleted if
<name> exists (killed in step 4) or renamed back to <name> if it does not (killed in step 2-3).
"""

from __future__ import annotations

import contextlib
import importlib
import json
import os
import shutil
import stat
from pathlib import Path
from typing import Iterator, Mapping

import torch
from torch import nn

from .params import merge
from .files import sha256_file

FINAL = "final"
CONFIG = "config.json"
WEIGHTS = ".safetensors"
# Every model a folder may hold: the class name its spec gives -> the module defining it. A caller
# names the classes it expects (and so imports their modules), and the module is imported here
# only for a caller that does not: the workflow derives the code a rule runs from its imports
# (workflow/dag.py), so loading a VQGAN must not make a stage depend on the decoder's code.
MODELS = {"VQModel": "vqgan", "NLayerDiscriminator": "losses", "RestrictiveEncoder": "encoder",
          "VanillaEncoder": "encoder", "BidirectionalTransformer": "transformer", "InpaintDecoder": "decoder",
          "OfficialRestrictiveEncoder": "encoder", "OfficialTransformer": "transformer",
          "OfficialDecoder": "decoder", "Refiner": "refiner"}


class CheckpointMismatch(ValueError):
    """A saved folder does not match what tries to use it (another model, a corrupt file...)."""


# ---------------------------------------------------------------------------------- models


def spec_of(module: nn.Module) -> dict:
    """`module.spec()` as it reads back from JSON (tuples become lists)."""
    if not callable(getattr(module, "spec", None)):
        raise TypeError(f"{type(module).__name__} has no spec(): a saved module must say how to rebuild it")
    return jsonable(module.spec(), f"{type(module).__name__}.spec()")


def build_model(spec: Mapping, expected: type | tuple[type, ...] = ()) -> nn.Module:
    """A model with fresh weights from its spec, strictly: the rebuilt model's spec must be `spec`
    (an unknown or missing setting is an error). `expected`: the classes the caller accepts."""
    kind = spec.get("model")
    classes = {c.__name__: c for c in (expected if isinstance(expected, tuple) else (expected,))}
    if classes and kind not in classes:
        raise CheckpointMismatch(f"the saved model is a {kind}, not a {' or '.join(classes)}")
    if not classes and kind not in MODELS:
        raise CheckpointMismatch(f"unknown model {kind!r} in a saved spec (known: {', '.join(MODELS)})")
    cls = classes.get(kind) or getattr(importlib.import_module(f".{MODELS[kind]}", __package__), kind)
    try:
        model = cls.from_spec(spec)
    except KeyError as exc:
        raise CheckpointMismatch(f"the saved spec of a {kind} lacks {exc}: {dict(spec)}") from None
    if spec_of(model) != jsonable(spec, f"{kind} spec"):
        raise CheckpointMismatch(f"the saved spec {dict(spec)} does not rebuild a {kind} (it gives {spec_of(model)})")
    return model


def model_folder(path: str | os.PathLike) -> tuple[Path, dict]:
    """A model folder and its config.json; `path` is a run folder (its final/ is read), a final/
    or a checkpoint/ folder."""
    path = Path(path)
    if not (path / CONFIG).is_file() and (path / FINAL / CONFIG).is_file():
        path = path / FINAL
    info = read_json(path / CONFIG)
    if info is None:
        raise FileNotFoundError(f"{path / CONFIG} is missing: no saved model there (has its stage run to the end, "
                                "or been pulled with `dvc pull`?)")
    return path, info


def main_model(info: Mapping) -> str:
    """The folder's main model: the one named like its stage, or like the stage's kind
    (the encoder of stage "encoder_vanilla")."""
    stage = info.get("stage", "")
    for name in info.get("models", {}):
        if stage == name or stage.startswith(f"{name}_"):
            return name
    raise CheckpointMismatch(f"stage {stage!r} saved no model named like it (models: {sorted(info.get('models', {}))})")


def saved_spec(folder: str | os.PathLike, name: str | None = None) -> dict:
    """The spec of model `name` (None: the main one) in a model folder, without building it."""
    return _spec(*model_folder(folder), name)


def _spec(folder: Path, info: Mapping, name: str | None) -> dict:
    models = info.get("models", {})
    name = name or main_model(info)
    if name not in models:
        raise CheckpointMismatch(f"{folder} holds no model {name!r} (it holds {sorted(models)})")
    return models[name]


def load_model(folder: str | os.PathLike, expected: type | tuple[type, ...] = (), *, name: str | None = None,
               device: str | torch.device = "cpu", overrides: Mapping | None = None) -> nn.Module:
    """Rebuild model `name` (None: the main one) of a model folder from its spec, load its weights
    strictly, and return it on `device` in eval mode. `expected`: the model classes the caller
    accepts (another is an error naming both). `overrides`: a nested mapping merged into the spec
    first, e.g. {"encoder": {"alpha": 0.25}} (only settings the spec has)."""
    folder, info = model_folder(folder)
    name = name or main_model(info)
    model = build_model(merge(_spec(folder, info, name), overrides or {}, "model overrides"), expected)
    load_weights(folder, {name: model}, device)
    return model.to(device).eval()


# ---------------------------------------------------------------------------------- weights


def write_model(folder: Path, info: Mapping, modules: Mapping[str, nn.Module]) -> None:
    """<module>.safetensors for each module, then config.json: `info` with the modules' specs,
    the files' sha256 and the torch version."""
    from safetensors.torch import save_model

    files = {}
    for name, module in modules.items():
        path = folder / f"{name}{WEIGHTS}"
        save_model(module, str(path))  # contiguous CPU copies; tied weights stored once
        os.chmod(path, stat.S_IMODE(folder.stat().st_mode) & 0o666)  # safetensors writes 0600
        fsync(path)
        files[path.name] = sha256_file(path)
    models = {name: spec_of(m) for name, m in modules.items()}
    write_json(folder / CONFIG, {**info, "models": models, "files": files, "torch": torch.__version__})


def load_weights(folder: str | os.PathLike, modules: Mapping[str, nn.Module], device="cpu") -> dict:
    """Load each of `modules` strictly from a model folder (see `model_folder`); return its
    config.json. The folder may hold more modules than asked for; each one asked for must be
    there, intact (sha256), with exactly the module's keys and shapes."""
    from safetensors.torch import load_model as load_safetensors

    folder, info = model_folder(folder)
    files = info.get("files", {})
    for name, module in modules.items():
        fname = f"{name}{WEIGHTS}"
        if fname not in files:
            held = sorted(f.removesuffix(WEIGHTS) for f in files)
            raise CheckpointMismatch(f"{folder} holds no weights for module {name!r} (it holds {held})")
        if sha256_file(folder / fname) != files[fname]:
            raise CheckpointMismatch(f"{folder / fname} is corrupt: its sha256 differs from {folder / CONFIG}")
        try:
            load_safetensors(module, folder / fname, strict=True, device=str(device))
        except RuntimeError as exc:
            raise CheckpointMismatch(f"{folder / fname} does not fit module {name!r}: {exc}") from exc
    return info


def start_from(folder: str | os.PathLike, name: str, module: nn.Module) -> nn.Module:
    """Fill a freshly built `module` with the weights of model `name` of a model folder (a run, or
    an imported model such as `import-official`'s runs/<stage>), for fine-tuning: the saved model
    must be of the same class (so the same variant) and fit strictly."""
    folder, info = model_folder(folder)
    kind = _spec(folder, info, name).get("model")
    if kind != type(module).__name__:
        raise CheckpointMismatch(f"{folder} holds a {kind} as {name!r}; this stage builds a {type(module).__name__} "
                                 "(set the section's variant to the saved model's)")
    load_weights(folder, {name: module})
    return module


def export_final(run_dir: str | os.PathLike, stage: str, modules: Mapping[str, nn.Module], source: str,
                 **details) -> Path:
    """Write modules that were not trained here (an imported checkpoint) as a stage's final/, in
    the format trained ones have, atomically; `source` says where they came from, `details` (into
    config.json) what else is known of it."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    recover(run_dir, FINAL)
    with staging(run_dir, FINAL) as tmp:
        write_model(tmp, {"stage": stage, "config": {}, "step": 0, "steps": 0, "imported_from": source, **details}, modules)
    return run_dir / FINAL


# ---------------------------------------------------------------------------------- folders


@contextlib.contextmanager
def staging(run_dir: Path, name: str) -> Iterator[Path]:
    """A fresh folder to fill; on leaving, it replaces <run_dir>/<name> by the rename protocol."""
    tmp, target, old = run_dir / f"{name}.tmp-{os.getpid()}", run_dir / name, run_dir / f"{name}.old"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        yield tmp
        fsync(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if old.exists():
        shutil.rmtree(old)  # a finished swap's leftover: <name> is complete
    if target.exists():
        os.rename(target, old)
    os.rename(tmp, target)
    fsync(run_dir)
    if old.exists():
        shutil.rmtree(old)


def recover(run_dir: Path, name: str) -> None:
    """Finish or undo a folder swap that a kill interrupted (see the module docstring)."""
    for tmp in run_dir.glob(f"{name}.tmp-*"):
        shutil.rmtree(tmp)
    target, old = run_dir / name, run_dir / f"{name}.old"
    if old.exists():
        if target.exists():
            shutil.rmtree(old)
        else:
            os.rename(old, target)
            fsync(run_dir)


def fsync(path: Path) -> None:
    """Flush a written file or a folder's entries to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def jsonable(value, what: str):
    """`value` as it reads back from JSON (tuples become lists), so saved and current compare."""
    try:
        return json.loads(json.dumps(value))
    except TypeError as exc:
        raise TypeError(f"{what} must be JSON-serialisable: {exc}") from None


def read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None


def write_json(path: Path, data) -> None:
    with open(path, "w") as f:
        f.write(json.dumps(data, indent=2, sort_keys=True) + "\n")
        f.flush()
        os.fsync(f.fileno())
