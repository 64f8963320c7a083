"""Diffusion Policy's Push-T protocol, and the latency per action chunk.

Protocol: 50 episodes from the seeds 100000 .. 100049 (Diffusion Policy's reset draws, drifting/policy/env.py), at
most 300 control steps each; the policy sees the last T_o = 2 observations (the first one repeated at the start),
predicts a chunk of H = 16 actions and executes T_a = 8 of them (chunk[1:9]) before it observes again; an episode
ends once coverage > 0.95. The score is the mean over episodes of the episode's maximum reward clip(coverage / 0.95).

All episodes run in lockstep, so one policy call serves every unfinished episode (B <= 50); the latency is measured
separately, for B = 1, as a deployed controller would call it.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from drifting.policy.env import MAX_STEPS, PushT
from drifting.policy.model import ChunkPolicy

TEST_SEED_START, TEST_EPISODES = 100000, 50


@torch.no_grad()
def evaluate(policy: ChunkPolicy, n_episodes: int = TEST_EPISODES, *, seed_start: int = TEST_SEED_START,
             max_steps: int = MAX_STEPS, sample_seed: int = 0, device: str | torch.device | None = None) -> dict:
    """Roll the policy out; returns {"score", "success_rate", "max_rewards" [n], "steps" [n], "seconds"}."""
    device = torch.device(device) if device is not None else next(policy.parameters()).device
    policy = policy.eval().to(device)
    generator = torch.Generator(device=device).manual_seed(sample_seed)
    envs = [PushT(max_steps=max_steps) for _ in range(n_episodes)]
    history = [[e.reset(seed=seed_start + i)] * policy.obs_horizon for i, e in enumerate(envs)]  # last T_o obs
    best = np.zeros(n_episodes)
    success = np.zeros(n_episodes, dtype=bool)
    t0 = time.perf_counter()
    while True:
        live = [i for i, e in enumerate(envs) if not e.done]
        if not live:
            break
        obs = torch.tensor(np.stack([np.stack(history[i][-policy.obs_horizon:]) for i in live]),
                           dtype=torch.float32, device=device)  # (B, T_o, D_o)
        actions = policy.predict_action(obs, generator).cpu().numpy()  # (B, T_a, D_a)
        for row, i in enumerate(live):
            for a in actions[row]:
                o, reward, done, info = envs[i].step(a)
                history[i].append(o)
                best[i] = max(best[i], reward)
                success[i] |= info["is_success"]
                if done:
                    break
            history[i] = history[i][-policy.obs_horizon:]
    for e in envs:
        e.close()
    return {"score": float(best.mean()), "success_rate": float(success.mean()), "max_rewards": best.tolist(),
            "steps": [e.steps for e in envs], "seconds": time.perf_counter() - t0}


@torch.no_grad()
def chunk_latency(policy: ChunkPolicy, *, batch: int = 1, repeats: int = 50, warmup: int = 5,
                  device: str | torch.device | None = None) -> dict:
    """Wall time of one `predict_action` call (one action chunk) in ms: {"median_ms", "mean_ms", "p90_ms"}."""
    device = torch.device(device) if device is not None else next(policy.parameters()).device
    policy = policy.eval().to(device)
    obs = torch.rand(batch, policy.obs_horizon, policy.obs_dim, device=device) * 400 + 50
    times = []
    for k in range(warmup + repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        policy.predict_action(obs)
        if device.type == "cuda":
            torch.cuda.synchronize(device)  # the chunk must be ready before the robot can act on it
        if k >= warmup:
            times.append(1e3 * (time.perf_counter() - t0))
    return {"median_ms": float(np.median(times)), "mean_ms": float(np.mean(times)),
            "p90_ms": float(np.percentile(times, 90)), "batch": batch, "device": str(device)}


def score_spread(max_rewards) -> dict:
    """The standard error of the protocol's score (a mean over episodes) and the episodes that never reach 5% of
    the goal's coverage: with 50 episodes the error is ~0.05, the size of many differences between policies."""
    r = np.asarray(max_rewards, dtype=float)
    se = float(r.std(ddof=1) / np.sqrt(len(r))) if len(r) > 1 else float("nan")
    return {"score_se": se, "episodes_below_0.05": int((r < 0.05).sum())}


def score_policy(policy: ChunkPolicy, *, episodes: int = TEST_EPISODES, max_steps: int = MAX_STEPS,
                 sample_seeds: int = 1, device=None) -> dict:
    """`evaluate` under noise seed 0 (the protocol's score) with its spread, and with sample_seeds > 1 the same
    episodes under seeds 1..N-1 too ("scores_by_sample_seed", "score_mean_over_sample_seeds")."""
    result = evaluate(policy, episodes, max_steps=max_steps, device=device)
    result.update(score_spread(result["max_rewards"]))
    if sample_seeds > 1:
        scores = [result["score"]] + [evaluate(policy, episodes, max_steps=max_steps, device=device,
                                               sample_seed=k)["score"] for k in range(1, sample_seeds)]
        result["scores_by_sample_seed"] = scores
        result["score_mean_over_sample_seeds"] = float(np.mean(scores))
    return result


def checkpoint_curve(rows: list[dict], last: int) -> dict:
    """Diffusion Policy's two summaries of a run's checkpoints: the best one, and the mean of the last `last` (each
    row's score is its mean over noise seeds where it has one)."""
    scores = [r.get("score_mean_over_sample_seeds", r["score"]) for r in rows]
    best = int(np.argmax(scores))
    tail = scores[-last:]
    return {"best": {"step": rows[best]["step"], "score": scores[best]},
            "mean_of_last": {"checkpoints": len(tail), "first_step": rows[-len(tail)]["step"],
                             "score": float(np.mean(tail))}}


def _summary(result: dict) -> dict:
    """A result without its per-episode lists."""
    return {k: v for k, v in result.items() if k not in ("max_rewards", "steps")}


def cli(argv=None) -> None:
    from drifting.policy.train import load_policy
    from drifting.train.checkpoint import list_checkpoints

    p = argparse.ArgumentParser(description="Evaluate a Push-T policy under Diffusion Policy's protocol.")
    p.add_argument("policy", help="policy.pt written by drifting.policy.train, or a training checkpoint "
                                  "(RUN/checkpoints/ckpt-<step>.pt, or that folder for the latest; its EMA weights)")
    p.add_argument("--episodes", type=int, default=TEST_EPISODES)
    p.add_argument("--max-steps", type=int, default=MAX_STEPS)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--sample-seeds", type=int, default=1,
                   help="also roll out with the policy's noise seeds 1..N-1 on the same episodes and report the "
                        "mean score (the protocol's score stays seed 0's)")
    p.add_argument("--all-checkpoints", action="store_true",
                   help="policy is a run's checkpoints folder (or the run): score every checkpoint in step order and "
                        "report the best one and the mean of the last --last (Diffusion Policy's two summaries)")
    p.add_argument("--last", type=int, default=5, help="with --all-checkpoints: how many of the last checkpoints "
                                                       "the mean takes")
    p.add_argument("--out", default=None, help="write the results as JSON here")
    a = p.parse_args(argv)
    for name in ("episodes", "max_steps", "sample_seeds", "last"):
        if getattr(a, name) < 1:
            p.error(f"--{name.replace('_', '-')}: expected >= 1, got {getattr(a, name)}")
    if a.all_checkpoints:
        found = list_checkpoints(a.policy) or list_checkpoints(Path(a.policy) / "checkpoints")  # the folder or RUN
        if not found:
            p.error(f"--all-checkpoints: expected a folder of ckpt-<step>.pt files (RUN/checkpoints), got {a.policy}")
        rows = []
        for step, path in found:
            r = score_policy(load_policy(path, map_location=a.device), episodes=a.episodes, max_steps=a.max_steps,
                             sample_seeds=a.sample_seeds, device=a.device)
            rows.append({"step": step, **_summary(r)})
            print(f"step {step}: score {r['score']:.3f}" + (f", mean over noise seeds "
                  f"{r['score_mean_over_sample_seeds']:.3f}" if a.sample_seeds > 1 else ""), flush=True)
        result = {"checkpoints": rows, **checkpoint_curve(rows, a.last)}
        print(json.dumps({k: v for k, v in result.items() if k != "checkpoints"}, indent=2))
    else:
        policy = load_policy(a.policy, map_location=a.device)
        result = score_policy(policy, episodes=a.episodes, max_steps=a.max_steps, sample_seeds=a.sample_seeds,
                              device=a.device)
        result["latency"] = chunk_latency(policy, device=a.device)
        print(json.dumps(_summary(result), indent=2))
    if a.out:
        Path(a.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    cli()
