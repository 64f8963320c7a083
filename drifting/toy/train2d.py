"""The 2-D toy experiments of the paper's Figures 3 and 4, and the Table 1 / Table 11 ablations in 2-D.

An MLP maps Gaussian noise to points in the plane. Each step follows Algorithm 1: draw N generated points and N_pos
target points, compute V = drift_field(x, y_pos, x) (the generated points are the negatives), and minimise
||x - stopgrad(x + V)||^2, whose value is ||V||^2. The generator starts in one of three places (Figure 3): between
the modes, far from all of them, or collapsed onto one mode.

Quality: energy distance and MMD between 10,000 generated and 10,000 target points, next to the same figure for two
independent target samples (the floor), and the number of target modes covered.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Literal

import torch
from torch import Tensor, nn
from tqdm import tqdm

from drifting.data.toy2d import count_covered_modes, get_target, mode_fractions
from drifting.drift import drift_field
from drifting.eval.distances import energy_distance, two_sample_distances
from drifting.models.mlp import mlp

Init = Literal["between", "far", "collapsed"]
INITS: tuple[str, ...] = ("between", "far", "collapsed")


@dataclass(frozen=True)
class ToyConfig:
    """One toy experiment: a target, the initialisations to train from, the drift and the optimiser."""

    target: str = "bimodal"  # bimodal | ring8 | checkerboard | moons | spiral
    inits: tuple[str, ...] = INITS
    steps: int = 1500
    batch: int = 256  # N: generated points per step, also the negatives
    num_pos: int = 256  # N_pos: target points per step
    temperature: float = 0.25  # tau of exp(-||x - y|| / tau), in data units (the targets span about [-4, 4])
    normalize: Literal["xy", "y", "none"] = "xy"
    attraction: float = 1.0
    repulsion: float = 1.0
    lr: float = 2e-3  # Adam; decayed along a cosine to `lr * final_lr_fraction` so the end state is not jittery
    final_lr_fraction: float = 0.05
    noise_dim: int = 2
    hidden: int = 128
    depth: int = 3
    init_spread: float = 0.2  # std of the generated points at step 0
    eval_samples: int = 10_000
    track_every: int = 50  # energy distance on 1,000 points every this many steps, for the curves
    snapshots: tuple[int, ...] = (0, 100, 300, 1500)  # steps shown in Figure 3 (those past `steps` are dropped)
    seed: int = 0

    def __post_init__(self) -> None:
        get_target(self.target)  # raises ValueError listing the valid names
        for init in self.inits:
            if init not in INITS:
                raise ValueError(f"inits: expected values among {INITS}, got {init!r}")
        for name in ("steps", "batch", "num_pos", "noise_dim", "hidden", "depth", "eval_samples", "track_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: expected an integer >= 1, got {getattr(self, name)}")
        if self.eval_samples < 2:
            raise ValueError("eval_samples: expected at least 2")
        if not 0 < self.final_lr_fraction <= 1:
            raise ValueError(f"final_lr_fraction: expected a number in (0, 1], got {self.final_lr_fraction}")
        for name in ("temperature", "lr", "init_spread"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name}: expected a number > 0, got {getattr(self, name)}")
        if any(s < 0 for s in self.snapshots):
            raise ValueError(f"snapshots: expected steps >= 0, got {self.snapshots}")

    @property
    def snapshot_steps(self) -> list[int]:
        """The steps drawn in Figure 3: the configured ones within the run, always with the first and the last."""
        return sorted({s for s in self.snapshots if s <= self.steps} | {0, self.steps})


class ToyGenerator(nn.Module):
    """x = center + MLP(eps): the output layer starts small so the points start as a blob of `spread` at `center`."""

    def __init__(self, noise_dim: int, hidden: int, depth: int, center: Tensor, spread: float):
        super().__init__()
        self.net = mlp(noise_dim, 2, hidden, depth)
        self.center = nn.Parameter(center.clone().float())
        with torch.no_grad():
            self.net[-1].bias.zero_()
            self.net[-1].weight.mul_(spread / self.net[-1].weight.std().clamp_min(1e-8) / hidden**0.5)

    def forward(self, eps: Tensor) -> Tensor:
        return self.center + self.net(eps)


def initial_center(target, init: str, generator: torch.Generator) -> Tensor:
    """Where the generated points start: the data mean, beyond the data, or on one mode."""
    y = target.sample(4096, generator)
    mean = y.mean(0)
    if init == "between":
        return mean
    if init == "far":
        radius = (y - mean).norm(dim=1).quantile(0.99)
        return mean + torch.tensor([0.0, 1.5]) * radius
    modes = target.assign_modes(y)
    on_first = y[modes == 0] if (modes == 0).any() else y[:1]
    return on_first.mean(0)


@dataclass
class ToyRun:
    """What one training run from one initialisation produced."""

    init: str
    loss: list[float] = field(default_factory=list)  # ||V||^2 averaged over the batch, per step
    drift_norm: list[float] = field(default_factory=list)  # mean ||V|| per step
    energy: list[tuple[int, float]] = field(default_factory=list)  # (step, energy distance on 1,000 points)
    snapshots: dict[int, Tensor] = field(default_factory=dict)  # step -> [n, 2] generated points
    metrics: dict[str, float] = field(default_factory=dict)


def sample_points(model: ToyGenerator, n: int, noise_dim: int, generator: torch.Generator) -> Tensor:
    with torch.no_grad():
        return model(torch.randn(n, noise_dim, generator=generator))


def quality(target, points: Tensor, reference: Tensor) -> dict[str, float]:
    """Energy distance, MMD and covered modes of `points` against an independent target sample."""
    out: dict = two_sample_distances(points, reference)
    if target.modes:
        out["modes_covered"] = count_covered_modes(target, points)
        out["mode_fractions"] = [round(f, 4) for f in mode_fractions(target, points).tolist()]
    return out


def train_toy(cfg: ToyConfig, init: str, reference: Tensor, progress: bool = True) -> ToyRun:
    """Train one generator from one initialisation; returns its curves, snapshots and start/end metrics."""
    target = get_target(cfg.target)
    torch.manual_seed(cfg.seed)
    data_gen = torch.Generator().manual_seed(cfg.seed + 1)
    noise_gen = torch.Generator().manual_seed(cfg.seed + 2)
    eval_gen = torch.Generator().manual_seed(cfg.seed + 3)
    model = ToyGenerator(cfg.noise_dim, cfg.hidden, cfg.depth, initial_center(target, init, data_gen), cfg.init_spread)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    lr_at = lambda s: cfg.final_lr_fraction + (1 - cfg.final_lr_fraction) * 0.5 * (1 + math.cos(math.pi * s / cfg.steps))  # noqa: E731
    schedule = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    run = ToyRun(init)
    snapshot_steps = set(cfg.snapshot_steps)
    start = quality(target, sample_points(model, cfg.eval_samples, cfg.noise_dim, eval_gen), reference)
    for step in tqdm(range(cfg.steps + 1), desc=f"toy {cfg.target}/{init}", disable=not progress, leave=False):
        if step in snapshot_steps:
            run.snapshots[step] = sample_points(model, 2000, cfg.noise_dim, eval_gen)
        if step % cfg.track_every == 0 or step == cfg.steps:
            points = sample_points(model, 1000, cfg.noise_dim, eval_gen)
            run.energy.append((step, energy_distance(points, reference[:1000])))
        if step == cfg.steps:
            break
        x = model(torch.randn(cfg.batch, cfg.noise_dim, generator=noise_gen))
        y_pos = target.sample(cfg.num_pos, data_gen)
        with torch.no_grad():  # V is a frozen target: no gradient flows through it
            v = drift_field(x, y_pos, temperature=cfg.temperature, normalize=cfg.normalize,
                            attraction=cfg.attraction, repulsion=cfg.repulsion, check_finite=False)
        loss = (x - (x + v).detach()).square().sum(-1).mean()  # = mean ||V||^2
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        schedule.step()
        run.loss.append(loss.item())
        run.drift_norm.append(v.norm(dim=-1).mean().item())
    end = quality(target, sample_points(model, cfg.eval_samples, cfg.noise_dim, eval_gen), reference)
    run.metrics = {**{f"start_{k}": v for k, v in start.items()}, **{f"end_{k}": v for k, v in end.items()}}
    return run


def reference_samples(cfg: ToyConfig) -> tuple[Tensor, dict[str, float]]:
    """An independent target sample for the metrics, and the floor: the metrics of a second target sample."""
    target = get_target(cfg.target)
    g = torch.Generator().manual_seed(cfg.seed + 100)
    reference = target.sample(cfg.eval_samples, g)
    return reference, quality(target, target.sample(cfg.eval_samples, g), reference)


# ---------------------------------------------------------------------------------------------------------------------
# Ablations (Table 1: anti-symmetry; Table 11: kernel normalisation), in 2-D
# ---------------------------------------------------------------------------------------------------------------------

ABLATIONS: dict[str, dict[str, dict]] = {
    "antisymmetry": {
        "V+ - V-": dict(attraction=1.0, repulsion=1.0),
        "1.5V+ - V-": dict(attraction=1.5, repulsion=1.0),
        "V+ - 1.5V-": dict(attraction=1.0, repulsion=1.5),
        "2V+ - V-": dict(attraction=2.0, repulsion=1.0),
        "V+ - 2V-": dict(attraction=1.0, repulsion=2.0),
        "attraction only": dict(attraction=1.0, repulsion=0.0),
    },
    "normalization": {
        "softmax over x and y": dict(normalize="xy"),
        "softmax over y": dict(normalize="y"),
        "none": dict(normalize="none"),
    },
}


# ---------------------------------------------------------------------------------------------------------------------
# Entry point and figures
# ---------------------------------------------------------------------------------------------------------------------


def run_experiment(cfg: ToyConfig, out: Path, ablation: str | None = None, progress: bool = True) -> dict:
    """Train from each initialisation (or each ablation variant x initialisation), write figures and metrics.json."""
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    reference, floor = reference_samples(cfg)
    variants = ABLATIONS[ablation] if ablation else {"default": {}}
    results: dict[str, dict[str, ToyRun]] = {}
    for name, change in variants.items():
        vcfg = replace(cfg, **change)
        results[name] = {init: train_toy(vcfg, init, reference, progress) for init in cfg.inits}
    summary = {
        "target": cfg.target,
        "floor": floor,
        "runs": {name: {init: run.metrics for init, run in runs.items()} for name, runs in results.items()},
        "seconds": round(time.perf_counter() - t0, 2),
    }
    if ablation:
        summary["ablation"] = ablation
        plot_ablation(cfg, results, reference, out / f"ablation_{ablation}.png")
    else:
        runs = results["default"]
        plot_evolution(cfg, runs, reference, out / "figure3_evolution.png")
        plot_curves(runs, out / "figure4_loss.png")
    (out / "metrics.json").write_text(json.dumps(summary, indent=2))
    return summary


def format_table(summary: dict) -> str:
    """A plain-text table of the final metrics, one row per variant and initialisation, with the floor."""
    lines = [f"target {summary['target']}" + (f", ablation {summary['ablation']}" if "ablation" in summary else "")]
    header = f"{'variant':<22} {'init':<10} {'energy start':>12} {'energy end':>11} {'MMD end':>9} {'modes':>6}"
    lines += [header, "-" * len(header)]
    for name, runs in summary["runs"].items():
        for init, m in runs.items():
            modes = m.get("end_modes_covered", "-")
            lines.append(f"{name:<22} {init:<10} {m['start_energy_distance']:>12.4f} {m['end_energy_distance']:>11.4f}"
                         f" {m['end_mmd']:>9.5f} {modes!s:>6}")
    f = summary["floor"]
    lines.append(f"{'floor (2 target samples)':<33} {'':>12} {f['energy_distance']:>11.4f} {f['mmd']:>9.5f} "
                 f"{f.get('modes_covered', '-')!s:>6}")
    return "\n".join(lines)


def _axes_limits(reference: Tensor) -> tuple[float, float, float, float]:
    lo, hi = reference.min(0).values, reference.max(0).values
    pad = 0.15 * (hi - lo).max().item()
    return lo[0].item() - pad, hi[0].item() + pad, lo[1].item() - pad, hi[1].item() + pad


def _scatter(ax, reference: Tensor, points: Tensor, limits) -> None:
    ax.hist2d(reference[:, 0].numpy(), reference[:, 1].numpy(), bins=80, range=[limits[:2], limits[2:]], cmap="Greys")
    ax.scatter(points[:, 0].numpy(), points[:, 1].numpy(), s=1.5, c="tab:orange", alpha=0.6)
    ax.set_xticks([]), ax.set_yticks([])


def plot_evolution(cfg: ToyConfig, runs: dict[str, ToyRun], reference: Tensor, path: Path) -> None:
    """Figure 3: the generated points over the target density, one row per initialisation, one column per step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = cfg.snapshot_steps
    fig, axes = plt.subplots(len(runs), len(steps), figsize=(2.4 * len(steps), 2.4 * len(runs)), squeeze=False)
    for row, (init, run) in enumerate(runs.items()):
        pts_all = torch.cat([reference] + [run.snapshots[s] for s in steps])
        limits = _axes_limits(pts_all)
        for col, s in enumerate(steps):
            _scatter(axes[row][col], reference, run.snapshots[s], limits)
            axes[row][col].set_title(f"{init}, step {s}", fontsize=9)
    fig.suptitle(f"Drifting a generator onto '{cfg.target}' (grey: target, orange: generated)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_curves(runs: dict[str, ToyRun], path: Path) -> None:
    """Figure 4: the loss ||V||^2, the drift magnitude ||V|| and the energy distance per step, on log axes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_v, ax_e) = plt.subplots(1, 3, figsize=(14, 3.6))
    for init, run in runs.items():
        ax_loss.semilogy(run.loss, label=init, lw=1)
        ax_v.semilogy(run.drift_norm, label=init, lw=1)
        steps, energy = zip(*run.energy)
        ax_e.semilogy(steps, [max(e, 1e-4) for e in energy], label=init, lw=1)
    ax_loss.set_title("loss = mean ||V||^2"), ax_v.set_title("drift magnitude mean ||V||")
    ax_e.set_title("energy distance to the target (1,000 points)")
    for ax in (ax_loss, ax_v, ax_e):
        ax.set_xlabel("step"), ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_ablation(cfg: ToyConfig, results: dict[str, dict[str, ToyRun]], reference: Tensor, path: Path) -> None:
    """Final generated points of every variant (rows) from every initialisation (columns)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    inits = list(cfg.inits)
    fig, axes = plt.subplots(len(results), len(inits), figsize=(2.6 * len(inits), 2.4 * len(results)), squeeze=False)
    limits = _axes_limits(reference)
    last = cfg.steps
    for row, (name, runs) in enumerate(results.items()):
        for col, init in enumerate(inits):
            run = runs[init]
            _scatter(axes[row][col], reference, run.snapshots[last], limits)
            energy = run.metrics["end_energy_distance"]
            axes[row][col].set_title(f"{name} / {init}\nenergy {energy:.3f}", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
