"""Policy training on Push-T demonstrations: Drifting Policy (one step) or the DDPM baseline (100 steps), same network.

Drifting Policy uses `drift_loss` on raw normalised action chunks (S = H * D_a = 32 numbers, no feature encoder);
the generated chunks are the negatives. A state rarely repeats in the demonstrations, so each problem's positive set
has to be chosen; `train.positives` picks one of three choices (compare them with the same budget):

    "knn"     per-observation problems: problem b is demonstration window b's observation; C_g chunks are generated
              for it, and its positives are the chunks of its K nearest demonstration windows in normalised
              observation space (itself included), i.e. samples of p(action | obs ~ obs_b). K = 4 by default: a
              small K keeps the sample tight (most neighbours are the same demonstration a few steps away, the
              motion shifted in time), and scored best at Diffusion Policy's size on a GPU (0.850 against <= 0.76
              for K = 16; 0.863 after 21 minutes alone on an H200, docs/results.md).
    "knn_episodes"  the same, but at most one window per demonstration episode (the nearest of each of the K
              nearest episodes; window b itself for its own). With "knn", 56% of Push-T's 15 neighbours are the same
              episode a median of 3 steps earlier or later (the same motion shifted in time); this choice removes
              them, and scores far worse (0.24-0.34 against 0.56-0.64 on the CPU, docs/results.md): another
              episode's nearest window is 2.7x further in observation space, a much looser conditional sample.
    "single"  one demonstration chunk per problem (K = 1): C_g generated samples are pulled towards the one recorded
              chunk and pushed apart from each other; the conditional spread comes only from repulsion.

The DDPM baseline trains the same `ChunkUNet` with a timestep input on the epsilon-prediction MSE, 100 steps.

Each step: draw B windows; (drift) generate C_g chunks per window, gather positives, loss = drift_loss(...).mean();
(ddpm) noise one chunk per window at a random t, MSE; backward, clip, AdamW, EMA. Checkpoints hold
{model, ema, optimizer, step, config}; `policy.pt` (the EMA policy with its normalisers) plus config is exported.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F

from drifting.config import config_to_dict, load_config, resolve_preset, save_config
from drifting.drift import drift_loss
from drifting.policy.demos import DemoConfig, PushTDemos
from drifting.policy.model import ChunkPolicy, PolicyModelConfig
from drifting.train.checkpoint import export_weights, latest_checkpoint, load_checkpoint, save_checkpoint
from drifting.train.dist import TimeLimit
from drifting.train.ema import ema_copy, ema_update
from drifting.train.log import RunLogger, Throughput
from drifting.train.schedule import lr_at


@dataclass(frozen=True)
class PolicyTrainConfig:
    method: Literal["drift", "ddpm"] = "drift"
    # drift only: how each problem gets its positives (module docstring)
    positives: Literal["knn", "knn_episodes", "single"] = "knn"
    # K nearest windows with "knn" (episodes with "knn_episodes"). 4: at Diffusion Policy's network size on a GPU,
    # K = 4 scored 0.850 after 13,400 steps where K = 16 stayed at 0.68-0.76 (docs/results.md); the CPU scale could
    # not tell them apart.
    k_pos: int = 4
    gen_per_obs: int = 16  # C_g generated chunks per problem (drift)
    batch: int = 64  # B problems (drift) / windows (ddpm) per step
    steps: int = 200  # the debug default; see the README for the Push-T budget
    lr: float = 1e-4
    warmup_steps: int = 50
    weight_decay: float = 1e-6
    grad_clip: float = 1.0
    ema_decay: float = 0.995
    temperatures: tuple[float, ...] = (0.02, 0.05, 0.2)
    ddpm_steps: int = 100
    # bf16 autocast of the network (the drifting loss and the DDPM loss stay fp32): the U-Net at Diffusion Policy's
    # widths is compute-bound on a GPU at the drifting batch (B C_g chunks per step). Off: the measured runs were fp32.
    bf16: bool = False
    # torch.compile the network for the training forwards (its GroupNorm and Mish chains fuse; the same weights and
    # results to float rounding, one compilation of ~1 min at the start): a drifting step at Diffusion Policy's size
    # on an H200 alone takes ~36 ms against ~90 eager. Off by default (the compilation dominates short CPU runs).
    compile: bool = False
    seed: int = 0
    device: str = "auto"  # auto: cuda when available
    log_every: int = 50
    checkpoint_every: int = 0  # 0: only at the end
    keep_checkpoints: int = 2
    # Stop after this many minutes of training (checked at the log steps), ending as at the last step. 0: no limit.
    time_limit_min: float = 0.0


@dataclass(frozen=True)
class PolicyConfig:
    data: DemoConfig = field(default_factory=DemoConfig)
    model: PolicyModelConfig = field(default_factory=PolicyModelConfig)
    train: PolicyTrainConfig = field(default_factory=PolicyTrainConfig)

    def __post_init__(self) -> None:
        t, d = self.train, self.data
        for name in ("k_pos", "gen_per_obs", "batch", "steps", "log_every", "ddpm_steps"):
            if getattr(t, name) < 1:
                raise ValueError(f"train.{name}: expected an integer >= 1, got {getattr(t, name)}")
        if t.time_limit_min < 0:
            raise ValueError(f"train.time_limit_min: expected minutes >= 0 (0: no limit), got {t.time_limit_min}")
        if t.method == "drift" and t.gen_per_obs < 2:
            raise ValueError("train.gen_per_obs: the drifting loss needs C_g >= 2 generated chunks per problem")
        if not (1 <= d.obs_horizon and d.action_horizon + d.obs_horizon - 1 <= d.pred_horizon):
            raise ValueError("data: need 1 <= obs_horizon and obs_horizon - 1 + action_horizon <= pred_horizon")


def build_policy(cfg: PolicyConfig) -> ChunkPolicy:
    d = cfg.data
    return ChunkPolicy(cfg.train.method, obs_dim=5, action_dim=2, obs_horizon=d.obs_horizon,
                       pred_horizon=d.pred_horizon, action_horizon=d.action_horizon, model=cfg.model,
                       ddpm_steps=cfg.train.ddpm_steps)


def load_policy(path: str | Path, map_location="cpu") -> ChunkPolicy:
    """A policy rebuilt from its stored config, normalisers included: the exported `policy.pt`, or a training
    checkpoint (`RUN/checkpoints/ckpt-<step>.pt`, or that folder for its latest), whose EMA weights are taken, as the
    export would, so that checkpoints can be evaluated while the run goes on."""
    state = load_checkpoint(path, map_location=map_location)
    cfg = load_config_dict(state["config"])
    policy = build_policy(cfg)
    policy.load_state_dict(state["ema"] if "ema" in state else state["model"])
    return policy.eval()


def load_config_dict(tree: dict) -> PolicyConfig:
    import tempfile

    import yaml

    with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as f:
        yaml.safe_dump(tree, f)
    try:
        return load_config(PolicyConfig, f.name)
    finally:
        Path(f.name).unlink()


def knn_index(obs: torch.Tensor, k: int, chunk: int = 4096, episode: torch.Tensor | None = None) -> torch.Tensor:
    """int64 [W, k]: the k nearest windows of every window by flattened normalised observation (itself first).

    With `episode` (int64 [W], non-decreasing: each episode's windows contiguous), at most one window per episode: the
    nearest window of each of the k nearest episodes (k is capped at the number of episodes)."""
    flat = obs.flatten(1)
    if episode is not None:
        if len(episode) != len(flat) or bool((episode.diff() < 0).any()):
            raise ValueError(f"episode: expected {len(flat)} non-decreasing ids, got {len(episode)}")
        starts = torch.nonzero(episode.diff()).flatten() + 1  # where each episode after the first begins
        bounds = [0, *starts.tolist(), len(flat)]
    out = []
    for s in range(0, len(flat), chunk):
        d = torch.cdist(flat[s: s + chunk], flat)  # (chunk, W)
        if episode is None:
            out.append(d.topk(min(k, len(flat)), largest=False).indices)
            continue
        # Each episode's nearest window: a min over its contiguous slice of columns.
        near = [d[:, a:b].min(1) for a, b in zip(bounds[:-1], bounds[1:])]
        dist = torch.stack([m.values for m in near], 1)  # (chunk, E)
        window = torch.stack([m.indices + a for m, a in zip(near, bounds[:-1])], 1)  # (chunk, E)
        out.append(window.gather(1, dist.topk(min(k, dist.shape[1]), largest=False).indices))
    return torch.cat(out)


# ---------------------------------------------------------------------------------------------------------------------
# The loop
# ---------------------------------------------------------------------------------------------------------------------


def main(cfg: PolicyConfig, run_dir: str | Path, *, resume: bool = True, data: dict | None = None) -> dict:
    """Train one policy into run_dir (config.yaml, metrics.jsonl, checkpoints/, policy.pt). Returns the last metrics.

    `data` (the arrays of `read_zarr`) skips reading cfg.data.path (tests)."""
    t = cfg.train
    run_dir = Path(run_dir)
    device = torch.device("cuda" if t.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if t.device == "auto" else t.device))
    torch.manual_seed(t.seed)
    g = torch.Generator().manual_seed(t.seed)  # all data draws (CPU), so runs repeat on any device

    # Data: every window of the training episodes, normalised once; the normalisers go into the policy.
    demos = PushTDemos(cfg.data, "train", data=data)
    policy = build_policy(cfg)
    obs_norm, act_norm = demos.fit_normalizers()
    policy.obs_norm.load_state_dict(obs_norm.state_dict())
    policy.action_norm.load_state_dict(act_norm.state_dict())
    cond_all = policy.cond(demos.obs)  # (W, T_o * D_o)
    chunks_all = policy.action_norm.normalize(demos.action)  # (W, H, D_a) in [-1, 1]
    neighbours = None
    if t.method == "drift" and t.positives != "single":
        neighbours = knn_index(cond_all, t.k_pos, episode=demos.episode if t.positives == "knn_episodes" else None)
    cond_all, chunks_all = cond_all.to(device), chunks_all.to(device)

    # Model, EMA, optimiser, resume.
    policy = policy.to(device)
    ema = ema_copy(policy)
    opt = torch.optim.AdamW(policy.parameters(), lr=t.lr, betas=(0.95, 0.999), weight_decay=t.weight_decay)
    net = torch.compile(policy.net) if t.compile else policy.net  # shares policy.net's parameters
    start, ckpt_dir = 0, run_dir / "checkpoints"
    if resume and latest_checkpoint(ckpt_dir) is not None:
        state = load_checkpoint(ckpt_dir, map_location=device)
        policy.load_state_dict(state["model"])
        ema.load_state_dict(state["ema"])
        opt.load_state_dict(state["optimizer"])
        start = state["step"]
        g.manual_seed(t.seed + start)
    save_config(cfg, run_dir / "config.yaml")
    logger, meter, last = RunLogger(run_dir, use_tensorboard=False), Throughput(), {}
    H, D = cfg.data.pred_horizon, policy.action_dim
    limit, done = TimeLimit(t.time_limit_min, every=t.log_every), start
    autocast = torch.autocast(device.type, torch.bfloat16, enabled=t.bf16)

    def on_device(x: torch.Tensor) -> torch.Tensor:
        return x.to(device, non_blocking=True)

    for step in range(start, t.steps):
        t0 = time.perf_counter()
        for group in opt.param_groups:
            group["lr"] = lr_at(step, peak=t.lr, warmup_steps=t.warmup_steps)
        idx = torch.randint(len(demos), (t.batch,), generator=g)
        # Drawn on the CPU generator, copied asynchronously: a blocking copy would wait for the GPU's queue to drain.
        cond, target = cond_all[on_device(idx)], chunks_all[on_device(idx)]  # (B, T_o D_o), (B, H, D)
        policy.train()
        if t.method == "drift":
            # C_g generated chunks per problem, all from one forward pass
            noise = on_device(torch.randn(t.batch * t.gen_per_obs, H, D, generator=g))
            with autocast:
                gen = net(noise, cond.repeat_interleave(t.gen_per_obs, 0))  # policy.generate: (B C_g, H, D)
            gen = gen.float().reshape(t.batch, t.gen_per_obs, H * D)  # (B, C_g, S)
            if neighbours is not None:
                pos = chunks_all[on_device(neighbours[idx])].flatten(2)  # (B, K, S)
            else:
                pos = target.reshape(t.batch, 1, H * D)  # (B, 1, S)
            loss, info = drift_loss(gen, pos, temperatures=t.temperatures, check_finite=False)
            loss = loss.mean()
        else:
            noise = on_device(torch.randn(target.shape, generator=g))
            tt = on_device(torch.randint(policy.ddpm.steps, (t.batch,), generator=g))
            with autocast:
                pred = net(policy.ddpm.add_noise(target, noise, tt), cond, tt)
            loss = F.mse_loss(pred.float(), noise)
            info = {}
        opt.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(policy.parameters(), t.grad_clip)
        opt.step()
        ema_update(ema, policy, min(t.ema_decay, (1 + step) / (10 + step)))
        meter.update(t.batch)
        done = step + 1
        stop = limit.reached(done)  # the time budget is spent: end here as at the last step
        final = stop or done == t.steps

        if done % t.log_every == 0 or final:
            last = {"loss": float(loss.detach()), "grad_norm": float(grad_norm), "lr": opt.param_groups[0]["lr"],
                    "windows_per_s": meter.rate(), "step_ms": 1e3 * (time.perf_counter() - t0)}
            if "drift_ms" in info:  # the drift loss stays ~constant by construction; the drift RMS shows progress
                for tau, ms in zip(t.temperatures, info["drift_ms"].tolist()):
                    last[f"drift_rms_{tau}"] = ms ** 0.5
            logger.log(done, last, echo=True)
        if (t.checkpoint_every and done % t.checkpoint_every == 0) or final:
            save_checkpoint(ckpt_dir / f"ckpt-{done:09d}.pt", {
                "model": policy.state_dict(), "ema": ema.state_dict(), "optimizer": opt.state_dict(),
                "step": done, "config": config_to_dict(cfg)}, keep_last=t.keep_checkpoints)
        if stop:
            print(limit.stopped(done), flush=True)
            break
    export_weights(run_dir / "policy.pt", ema.state_dict(), config_to_dict(cfg),
                   meta={"step": done, "ema_decay": t.ema_decay, "method": t.method})
    logger.close()
    return last


def cli(argv=None) -> None:
    p = argparse.ArgumentParser(description="Train a Push-T policy (Drifting Policy or the DDPM baseline).")
    p.add_argument("run_dir")
    p.add_argument("--preset", default=None,
                   help="a YAML file of PolicyConfig, or a name under configs/ (policy/pusht, policy/pusht_ddpm)")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.method=ddpm data.path=...")
    a = p.parse_intermixed_args(argv)  # RUN --preset NAME overrides...: overrides after the option too
    main(load_config(PolicyConfig, resolve_preset(a.preset) if a.preset else None, a.overrides), a.run_dir)


if __name__ == "__main__":
    cli()
