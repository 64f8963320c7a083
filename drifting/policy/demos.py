"""Push-T demonstrations: the original zarr, Diffusion Policy's split, (observation, action chunk) windows, and the
min-max normaliser that the policy keeps.

The file (`pusht_cchi_v7_replay.zarr`, zarr v2; only these arrays are read):

    data/state            (N, 5) f4   agent x, agent y, block x, block y, block angle   (the observation)
    data/action           (N, 2) f4   commanded agent position, pixels
    meta/episode_ends     (E,)  int   exclusive end index of each episode in the N concatenated steps

Split (as Diffusion Policy): validation episodes = `default_rng(seed).choice(E, n_val, replace=False)` with
n_val = min(max(1, round(E * val_ratio)), E - 1); the remaining episodes are subsampled to at most
`max_train_episodes` by a second `default_rng(seed).choice` over their positions. For the 206 episodes, 2% and 90:
4 validation and 90 training episodes.

Windows (as Diffusion Policy's sampler): every start s in [-(T_o - 1), L - H + (T_a - 1)] of an episode of length L
gives steps s .. s+H-1, indices clamped into the episode (the first / last step repeated at its borders). The
observation is the first T_o steps of the window, the action chunk all H steps.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn


@dataclass(frozen=True)
class DemoConfig:
    # The original zarr, read in place (never copied into the repository), or an .npz made by `export_npz`.
    path: str = "../shared/data/pusht/pusht_cchi_v7_replay.zarr"
    val_ratio: float = 0.02
    max_train_episodes: int | None = 90
    split_seed: int = 42
    obs_horizon: int = 2  # T_o
    pred_horizon: int = 16  # H
    action_horizon: int = 8  # T_a


# ---------------------------------------------------------------------------------------------------------------------
# Reading and splitting
# ---------------------------------------------------------------------------------------------------------------------


def read_zarr(path: str | Path) -> dict[str, np.ndarray]:
    """{"state": f4 [N, 5], "action": f4 [N, 2], "episode_ends": int64 [E]} from a Push-T replay zarr."""
    import zarr  # optional dependency (the `policy` extra)

    if not Path(path).exists():
        raise FileNotFoundError(f"no Push-T zarr at {path} (Diffusion Policy's pusht_cchi_v7_replay.zarr; see README)")
    root = zarr.open_group(str(path), mode="r")
    return {"state": np.asarray(root["data/state"][:], dtype=np.float32),
            "action": np.asarray(root["data/action"][:], dtype=np.float32),
            "episode_ends": np.asarray(root["meta/episode_ends"][:], dtype=np.int64)}


def read_demos(path: str | Path) -> dict[str, np.ndarray]:
    """The three arrays of `read_zarr`, from the zarr or from an `.npz` holding them (made by `export_npz`)."""
    if Path(path).suffix != ".npz":
        return read_zarr(path)
    if not Path(path).is_file():
        raise FileNotFoundError(f"no Push-T demonstrations at {path} "
                                "(an .npz made by `python -m drifting.policy.demos ZARR OUT.npz`)")
    with np.load(path) as f:
        missing = {"state", "action", "episode_ends"} - set(f.files)
        if missing:
            raise ValueError(f"{path}: missing arrays {sorted(missing)} (expected state, action, episode_ends)")
        return {"state": f["state"].astype(np.float32), "action": f["action"].astype(np.float32),
                "episode_ends": f["episode_ends"].astype(np.int64)}


def export_npz(zarr_path: str | Path, out: str | Path) -> Path:
    """Write the arrays a state policy reads (state, action, episode_ends; ~1 MB, no images) to a compressed .npz.

    For machines without zarr, or to carry the demonstrations without the 30 MB of images in the original.
    """
    np.savez_compressed(out, **read_zarr(zarr_path))
    return Path(out)


def split_episodes(n_episodes: int, val_ratio: float = 0.02, max_train: int | None = 90,
                   seed: int = 42) -> tuple[np.ndarray, np.ndarray]:
    """Diffusion Policy's split: (train episode indices, validation episode indices), both sorted."""
    val = np.zeros(n_episodes, dtype=bool)
    n_val = min(max(1, round(n_episodes * val_ratio)), n_episodes - 1) if val_ratio > 0 else 0
    if n_val > 0:
        val[np.random.default_rng(seed).choice(n_episodes, size=n_val, replace=False)] = True
    train = np.flatnonzero(~val)
    if max_train is not None and len(train) > max_train:
        keep = np.random.default_rng(seed).choice(len(train), size=max_train, replace=False)
        train = np.sort(train[keep])
    return train, np.flatnonzero(val)


def window_index(episode_ends: np.ndarray, episodes: np.ndarray, obs_horizon: int, pred_horizon: int,
                 action_horizon: int) -> np.ndarray:
    """int64 [W, H]: the global step index of every step of every window, padded by clamping at episode borders."""
    starts = np.concatenate([[0], episode_ends[:-1]])
    rows = []
    for e in episodes:
        first, length = int(starts[e]), int(episode_ends[e] - starts[e])
        s = np.arange(-(obs_horizon - 1), length - pred_horizon + (action_horizon - 1) + 1)  # window starts
        steps = np.clip(s[:, None] + np.arange(pred_horizon)[None, :], 0, length - 1)  # (W_e, H)
        rows.append(first + steps)
    return np.concatenate(rows) if rows else np.zeros((0, pred_horizon), dtype=np.int64)


# ---------------------------------------------------------------------------------------------------------------------
# Normaliser
# ---------------------------------------------------------------------------------------------------------------------


class MinMaxNormalizer(nn.Module):
    """Per-dimension affine map of [min, max] onto [-1, 1]; its statistics are buffers, saved in the policy's
    state_dict. Dimensions with (almost) no range map to 0 (the range is floored at `eps`)."""

    def __init__(self, dim: int, eps: float = 1e-4):
        super().__init__()
        self.eps = eps
        self.register_buffer("low", torch.zeros(dim))
        self.register_buffer("high", torch.ones(dim))

    @torch.no_grad()
    def fit(self, x: Tensor) -> MinMaxNormalizer:
        x = x.reshape(-1, x.shape[-1]).float()
        self.low.copy_(x.min(0).values)
        self.high.copy_(x.max(0).values)
        return self

    def _scale(self) -> tuple[Tensor, Tensor]:
        half = ((self.high - self.low) / 2).clamp_min(self.eps)
        return (self.high + self.low) / 2, half

    def normalize(self, x: Tensor) -> Tensor:  # (..., D) raw -> (..., D) in [-1, 1]
        mid, half = self._scale()
        return (x - mid) / half

    def unnormalize(self, y: Tensor) -> Tensor:  # (..., D) in [-1, 1] -> raw
        mid, half = self._scale()
        return y * half + mid


# ---------------------------------------------------------------------------------------------------------------------
# The training set
# ---------------------------------------------------------------------------------------------------------------------


class PushTDemos:
    """All windows of the chosen episodes, held as tensors.

    obs [W, T_o, 5] and action [W, H, 2] in raw units (`fit_normalizers` maps them to [-1, 1]); episode [W].
    """

    def __init__(self, cfg: DemoConfig, split: str = "train", data: dict[str, np.ndarray] | None = None):
        data = read_demos(cfg.path) if data is None else data
        ends = data["episode_ends"]
        train, val = split_episodes(len(ends), cfg.val_ratio, cfg.max_train_episodes, cfg.split_seed)
        if split not in ("train", "val"):
            raise ValueError(f"split: expected 'train' or 'val', got {split!r}")
        self.episodes = train if split == "train" else val
        idx = window_index(ends, self.episodes, cfg.obs_horizon, cfg.pred_horizon, cfg.action_horizon)
        self.obs = torch.from_numpy(data["state"][idx[:, : cfg.obs_horizon]])  # (W, T_o, 5)
        self.action = torch.from_numpy(data["action"][idx])  # (W, H, 2)
        # the episode of each window (its current step's), non-decreasing: an episode's windows are contiguous
        self.episode = torch.from_numpy(np.searchsorted(ends, idx[:, cfg.obs_horizon - 1], side="right"))
        self.cfg = cfg

    def __len__(self) -> int:
        return len(self.obs)

    def fit_normalizers(self) -> tuple[MinMaxNormalizer, MinMaxNormalizer]:
        """(obs normaliser, action normaliser) fitted on these windows (padding repeats real steps only)."""
        return (MinMaxNormalizer(self.obs.shape[-1]).fit(self.obs),
                MinMaxNormalizer(self.action.shape[-1]).fit(self.action))


def synthetic_zarr(path: str | Path, episode_lengths: tuple[int, ...] = (30, 25, 40), seed: int = 0) -> Path:
    """A tiny Push-T-shaped zarr (random walks) with the original layout, for tests and smoke runs."""
    import zarr

    rng = np.random.default_rng(seed)
    n = sum(episode_lengths)
    state = np.concatenate([rng.uniform(100, 400, (1, 5)) + np.cumsum(rng.normal(0, 3, (k, 5)), 0)
                            for k in episode_lengths]).astype(np.float32)
    state[:, 4] = np.mod(state[:, 4], 2 * np.pi)
    action = (state[:, :2] + rng.normal(0, 5, (n, 2))).astype(np.float32)
    root = zarr.open_group(str(path), mode="w", zarr_format=2) if _zarr3() else zarr.open_group(str(path), mode="w")
    root.create_group("data")
    root.create_group("meta")
    root["data/state"] = state
    root["data/action"] = action
    root["meta/episode_ends"] = np.cumsum(episode_lengths).astype(np.int64)
    return Path(path)


def _zarr3() -> bool:
    import zarr

    return int(zarr.__version__.split(".")[0]) >= 3


if __name__ == "__main__":  # python -m drifting.policy.demos ZARR OUT.npz
    import sys

    if len(sys.argv) != 3:
        raise SystemExit("usage: python -m drifting.policy.demos PUSHT_ZARR OUT.npz")
    print(export_npz(sys.argv[1], sys.argv[2]))
