"""Checkpoints: plain dicts of state_dicts, tensors and Python scalars, written atomically.

A training checkpoint is what the trainer passes to `save_checkpoint`, by convention

    {"step": int, "model": ..., "ema": {...}, "opt": ..., "queue": ..., "rng": capture_rng_state(...),
     "config": config_to_dict(cfg)}

Nothing in it is a pickled object, so `torch.load(..., weights_only=True)` reads it: loading never runs code from
the file, and a checkpoint survives refactors of the classes that produced it (rebuild the model from the stored
config, then `load_state_dict`). `save_checkpoint` checks this before writing and names the offending key.

Files are named `ckpt-<step>.pt` (`checkpoint_path`) inside a checkpoint directory, so the latest one and the ones to
delete follow from the names. The weights-only export for sampling (`export_weights`) is a separate, small file.

Distributed runs: gather full state dicts (see `parallel.full_state_dict`), write from rank 0 only, then barrier.
RNG states are per process: for bit-exact resume under DDP, gather every rank's `capture_rng_state()` into a list.
"""

from __future__ import annotations

import json
import os
import random
import re
from collections import OrderedDict
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch

from drifting.atomic import atomic_write

__all__ = [
    "CheckpointError",
    "capture_rng_state",
    "checkpoint_path",
    "export_weights",
    "latest_checkpoint",
    "list_checkpoints",
    "load_checkpoint",
    "restore_rng_state",
    "save_checkpoint",
]

_NAME = re.compile(r"^ckpt-(\d+)\.pt$")
_SCALARS = (type(None), bool, int, float, complex, str, bytes, bytearray, torch.device, torch.dtype, torch.Size)
_CONTAINERS = (dict, OrderedDict, list, tuple, set)


class CheckpointError(RuntimeError):
    """A checkpoint file exists but cannot be read (truncated, corrupt, or holding pickled objects)."""


def checkpoint_path(ckpt_dir: str | os.PathLike, step: int) -> Path:
    """`<ckpt_dir>/ckpt-<step, 9 digits>.pt`: the name `list_checkpoints` and the rotation recognise."""
    return Path(ckpt_dir) / f"ckpt-{step:09d}.pt"


def list_checkpoints(ckpt_dir: str | os.PathLike) -> list[tuple[int, Path]]:
    """(step, path) of the `ckpt-<step>.pt` files in `ckpt_dir`, oldest first; [] if the directory is missing."""
    ckpt_dir = Path(ckpt_dir)
    if not ckpt_dir.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in ckpt_dir.iterdir() if (m := _NAME.match(p.name)) and p.is_file()]
    return sorted(found)


def latest_checkpoint(ckpt_dir: str | os.PathLike) -> Path | None:
    """The checkpoint with the highest step in `ckpt_dir`, or None."""
    found = list_checkpoints(ckpt_dir)
    return found[-1][1] if found else None


def save_checkpoint(
    path: str | os.PathLike,
    state: Mapping[str, Any],
    *,
    keep_last: int | None = None,
    keep_every: int | None = None,
) -> Path:
    """Write `state` to `path` atomically, then optionally delete older checkpoints beside it.

    A crash at any point leaves either the previous file or the complete new one at `path`, never a partial file:
    the data goes to a temporary file in the same directory, is fsync'ed, and then renamed over `path`.

    Args:
        path: the file to write, usually `checkpoint_path(ckpt_dir, step)`.
        state: plain data only (see the module docstring); checked before anything is written.
        keep_last: if set, keep only the newest `keep_last` `ckpt-<step>.pt` files in the directory (the authors
            keep 2). The file just written is always kept.
        keep_every: also keep every checkpoint whose step is a multiple of this (permanent snapshots).
    Returns:
        The path written.
    """
    if keep_last is not None and keep_last < 1:
        raise ValueError(f"keep_last must be >= 1 or None, got {keep_last}")
    _check_plain(state, "state")
    path = Path(path)
    atomic_write(path, lambda f: torch.save(dict(state), f))
    if keep_last is not None:
        found = list_checkpoints(path.parent)
        keep = {p for _, p in found[-keep_last:]} | {path}
        if keep_every:
            keep |= {p for s, p in found if s % keep_every == 0}
        for _, p in found:
            if p not in keep:
                p.unlink(missing_ok=True)  # another process may have rotated it already
    return path


def load_checkpoint(path_or_dir: str | os.PathLike, *, map_location: Any = "cpu") -> dict[str, Any]:
    """Load a checkpoint file, or the latest `ckpt-<step>.pt` of a directory, with `weights_only=True`.

    Raises:
        FileNotFoundError: the path does not exist, or the directory holds no checkpoint.
        CheckpointError: the file exists but cannot be read; the message names it.
    """
    path = Path(path_or_dir)
    if path.is_dir():
        latest = latest_checkpoint(path)
        if latest is None:
            raise FileNotFoundError(f"no checkpoint (ckpt-<step>.pt) in directory {path}")
        path = latest
    elif not path.exists():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # torch raises RuntimeError, UnpicklingError, EOFError, ... depending on the damage
        raise CheckpointError(f"cannot read checkpoint {path} (corrupt, truncated or not a torch file): {e}") from e
    if not isinstance(state, dict):
        raise CheckpointError(f"checkpoint {path} holds a {type(state).__name__}, expected a dict")
    return state


def export_weights(
    path: str | os.PathLike,
    model_state: Mapping[str, torch.Tensor],
    config_dict: Mapping[str, Any],
    *,
    meta: Mapping[str, Any] | None = None,
) -> Path:
    """Write a weights-only file for sampling and evaluation (typically the EMA weights), plus a JSON sidecar.

    `path` gets {"model": state dict on CPU, "config": config_dict, "meta": meta} (everything needed to rebuild and
    load the model); `path.with_suffix(".json")` gets {"config", "meta"} for reading without torch. `meta` holds
    plain values such as {"step": 200000, "ema_decay": 0.999}. Both writes are atomic.
    """
    path = Path(path)
    meta = dict(meta or {})
    state = {
        "model": {k: v.detach().cpu() for k, v in model_state.items()},
        "config": dict(config_dict),
        "meta": meta,
    }
    _check_plain(state, "export")
    atomic_write(path, lambda f: torch.save(state, f))
    text = json.dumps({"config": state["config"], "meta": meta}, indent=2, sort_keys=False)
    atomic_write(path.with_suffix(".json"), lambda f: f.write(text.encode() + b"\n"))
    return path


# --------------------------------------------------------------------------- RNG state


def capture_rng_state(generators: Mapping[str, torch.Generator] | None = None) -> dict[str, Any]:
    """The state of every random number generator the trainer draws from, as plain data.

    Covers Python's `random`, NumPy's global generator, torch's CPU generator, every CUDA device's default generator
    (when CUDA is available) and the explicit `generators` given by name (e.g. a noise or data-order generator).
    """
    np_state = np.random.get_state()  # ("MT19937", uint32[624] keys, pos, has_gauss, cached_gaussian)
    state: dict[str, Any] = {
        "python": random.getstate(),  # (version, tuple of 625 ints, gauss_next): plain Python already
        "numpy": {
            "kind": np_state[0],
            # A numpy array would need pickle to load; a tensor of the same integers does not.
            "keys": torch.from_numpy(np_state[1].astype(np.int64)),
            "pos": int(np_state[2]),
            "has_gauss": int(np_state[3]),
            "cached_gaussian": float(np_state[4]),
        },
        "torch": torch.get_rng_state(),
        "generators": {name: g.get_state() for name, g in (generators or {}).items()},
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: Mapping[str, Any], generators: Mapping[str, torch.Generator] | None = None) -> None:
    """Restore what `capture_rng_state` captured; the next random numbers are the ones that followed the capture.

    `generators` must hold (at least) the names captured. CUDA states are restored for the devices present, and
    skipped without CUDA, so a GPU checkpoint still resumes on CPU (with other CUDA numbers, which are then unused).
    """
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))
    n = state["numpy"]
    keys = n["keys"].numpy().astype(np.uint32)
    np.random.set_state((n["kind"], keys, n["pos"], n["has_gauss"], n["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        cuda_states = state["cuda"][: torch.cuda.device_count()]
        for device, s in enumerate(cuda_states):
            torch.cuda.set_rng_state(s, device)
    saved = state.get("generators", {})
    given = generators or {}
    missing = sorted(set(saved) - set(given))
    if missing:
        raise KeyError(f"restore_rng_state: no generator passed for the captured names {missing}")
    for name, s in saved.items():
        given[name].set_state(s)


# --------------------------------------------------------------------------- internals


def _check_plain(obj: Any, where: str) -> None:
    """Raise TypeError at the first value that `torch.load(weights_only=True)` would refuse, naming its key path."""
    t = type(obj)
    # Exact types: numpy.float64 subclasses float but pickles as a numpy object.
    if t in _SCALARS or t in (torch.Tensor, torch.nn.Parameter):
        return
    if t in _CONTAINERS:
        items = obj.items() if isinstance(obj, dict) else enumerate(obj)
        for k, v in items:
            if isinstance(obj, dict) and type(k) not in _SCALARS:
                raise TypeError(f"{where}: key {k!r} of type {type(k).__name__} is not plain data")
            _check_plain(v, f"{where}[{k!r}]")
        return
    hint = " (convert numpy values with .item() or torch.from_numpy)" if t.__module__.startswith("numpy") else ""
    raise TypeError(
        f"{where}: {t.__module__}.{t.__qualname__} cannot go into a checkpoint; only state dicts, tensors and plain "
        f"Python values load with weights_only=True{hint}"
    )
