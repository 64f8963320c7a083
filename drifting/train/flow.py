"""Flow-matching baseline (rectified flow): `drifting train-flow`, `drifting sample-flow`.

The comparison the project needs: the drifting generator against flow matching with the *same network* (the DiT of
`drifting.models.dit`, same preset, same parameter count) and the same GPU time, sampled with 1 Euler step (a
one-step generator, the drifting model's setting) and with 50.

Convention (rectified flow): t = 0 is noise, t = 1 is data,

    x_t = (1 - t) * noise + t * data,        target velocity v = data - noise,        loss = mean (v_theta - v)^2,

and sampling integrates dx/dt = v_theta(x, t) from t = 0 (noise) to t = 1 with `steps` Euler steps of size 1/steps.

Time conditioning through the same network. The DiT is conditioned on a scalar alpha (the guidance scale) through a
sinusoidal embedding (frequencies 1e4^(-k/128), k < 128) -> MLP -> RMSNorm, added to the class and style
embeddings. `VelocityNet` feeds the flow time there: alpha = 1 + TIME_SCALE * t with TIME_SCALE = 3, so t in [0, 1]
spans alpha in [1, 4], exactly the range the drifting generator's alpha is trained on (GuidanceConfig alpha_min,
alpha_max). The conditioning input therefore has the range the embedding was built and initialised for, and its
fastest frequencies turn through 3 radians over the flow's time interval, three times the span SiT gets from the same
embedder with raw t in [0, 1], which is known to suffice. No parameter is added or removed: the velocity net *is*
the generator (its output layer starts at zero, i.e. v = 0, a fine starting point for a velocity).

Style indices: the DiT also takes per-sample random style indices. They are drawn exactly as the generator's
(`draw_inputs`: noise, then style, per sample) and kept for all Euler steps of a sample. They carry no information
about the data, so the optimal velocity ignores them; drawing them keeps the interface and lets a flow sample and a
drifting sample with the same seed share their noise.

Exactness as in gen.py: every random draw of step s (data indices, noise, style, times) comes from CPU generators
seeded by (seed, s) and is drawn for the whole global batch on every process; each process takes its contiguous
slice. Resume needs nothing but the step (2 steps + resume + 2 steps equal 4 steps, bit for bit on a CPU).

The export `ema.pt` holds the generator's state dict (the plain DiT keys), with meta {"kind": "flow",
"time_scale": 3.0, ...}. Sample it with `flow_samples_to_npz` / `drifting sample-flow`; `drifting sample` refuses
it (its `load_generator` would otherwise run the velocity net as a one-step generator). The .npz
has exactly the layout of `sample_to_npz` (it *is* `sample_to_npz`, around an Euler sampler), so `drifting eval`
scores it unchanged, and sample i has the same noise as sample i of `drifting sample` with the same seed.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Sequence

import torch
from torch import Tensor, nn
from tqdm import tqdm

from drifting.config import config_to_dict, save_config
from drifting.data.datasets import to_uint8
from drifting.models.generate import draw_inputs
from drifting.train import dist
from drifting.train.checkpoint import export_weights, latest_checkpoint, load_checkpoint, save_checkpoint
from drifting.train.ema import ema_copy, ema_update
from drifting.train.gen import DataConfig, GenConfig, ModelConfig, build_model, load_training_data, step_generator
from drifting.train.log import RunLogger, Throughput
from drifting.train.parallel import (
    full_optimizer_state_dict, full_state_dict, load_full_optimizer_state_dict, load_full_state_dict, wrap_model,
)
from drifting.train.schedule import lr_at

__all__ = [
    "TIME_SCALE", "TIME_SAMPLINGS", "GRID_STEPS", "FlowTrainConfig", "FlowConfig", "VelocityNet", "EulerSampler",
    "interpolate", "flow_loss", "sample_time", "euler", "sample_flow", "train", "main", "load_velocity_net",
    "flow_samples_to_npz", "flow_sample_main",
]

TIME_SCALE = 3.0  # alpha = 1 + 3 t: t in [0, 1] -> alpha in [1, 4], the drifting generator's alpha range
TIME_SAMPLINGS = ("uniform", "logit-normal")
GRID_STEPS = (1, 50)  # default Euler steps of the sample grids: the one-step comparison and the multi-step baseline


@dataclass(frozen=True)
class FlowTrainConfig:
    steps: int = 300
    batch: int = 64  # global batch of real images (and noises); the drifting preset's classes * gen_per_class
    lr: float = 1e-3  # the tiny default model; the small-image presets use 2e-4 like their drifting presets
    warmup_steps: int = 20
    weight_decay: float = 0.01
    grad_clip: float = 2.0
    ema_decays: tuple[float, ...] = (0.999,)
    ema_warmup: bool = True  # decay_t = min(decay, (1 + t) / (10 + t)), as in gen.py
    # t ~ U(0, 1), or sigmoid(N(0, 1)) (SD3's logit-normal, its best rectified-flow sampling, more weight mid-path)
    time_sampling: Literal["uniform", "logit-normal"] = "logit-normal"
    grid_steps: tuple[int, ...] = GRID_STEPS  # one sample grid per entry, with that many Euler steps
    compile: bool = False
    seed: int = 0
    log_every: int = 50
    sample_every: int = 0  # 0: only at the end
    checkpoint_every: int = 0  # 0: only at the end
    keep_checkpoints: int = 2
    # Stop after this many minutes of training (checked at the log steps), ending as at the last step. 0: no limit.
    # Gives a baseline the drifting run's GPU time.
    time_limit_min: float = 0.0


@dataclass(frozen=True)
class FlowConfig:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: FlowTrainConfig = field(default_factory=FlowTrainConfig)

    def __post_init__(self) -> None:
        t = self.train
        # The data and model sections are the drifting trainer's: its checks, with its messages (data.*, model.*).
        GenConfig(data=self.data, model=self.model)
        for name in ("steps", "batch", "log_every", "keep_checkpoints"):
            if getattr(t, name) < 1:
                raise ValueError(f"train.{name}: expected an integer >= 1, got {getattr(t, name)}")
        for name in ("warmup_steps", "sample_every", "checkpoint_every"):
            if getattr(t, name) < 0:
                raise ValueError(f"train.{name}: expected an integer >= 0, got {getattr(t, name)}")
        if t.time_limit_min < 0:
            raise ValueError(f"train.time_limit_min: expected minutes >= 0 (0: no limit), got {t.time_limit_min}")
        if not t.lr > 0:
            raise ValueError(f"train.lr: expected a number > 0, got {t.lr}")
        if not t.grad_clip > 0:
            raise ValueError(f"train.grad_clip: expected a number > 0, got {t.grad_clip}")
        if t.weight_decay < 0:
            raise ValueError(f"train.weight_decay: expected a number >= 0, got {t.weight_decay}")
        if t.time_sampling not in TIME_SAMPLINGS:
            raise ValueError(f"train.time_sampling: expected one of {list(TIME_SAMPLINGS)}, got {t.time_sampling!r}")
        if not all(0 <= d < 1 for d in t.ema_decays):
            raise ValueError(f"train.ema_decays: expected values in [0, 1), got {t.ema_decays}")
        if not all(n >= 1 for n in t.grid_steps):
            raise ValueError(f"train.grid_steps: expected Euler step counts >= 1, got {t.grid_steps}")


# ---------------------------------------------------------------------------------------------------------------------
# The velocity net, the loss, the sampler
# ---------------------------------------------------------------------------------------------------------------------


class VelocityNet(nn.Module):
    """v(x_t, t, labels, style) = generator(x_t, labels, alpha=1 + time_scale * t, style): the generator, unchanged.

    It has no parameters of its own (`parameters()` are the generator's), and it exposes the generator interface
    (`num_classes`, `noise_shape`, `style_tokens`, `style_codebook`) so `draw_inputs` draws its noise and styles.
    """

    def __init__(self, generator: nn.Module, time_scale: float = TIME_SCALE):
        super().__init__()
        self.generator = generator
        self.time_scale = float(time_scale)

    @property
    def num_classes(self) -> int:
        return self.generator.num_classes

    @property
    def noise_shape(self) -> tuple[int, ...]:
        return tuple(self.generator.noise_shape)

    @property
    def style_tokens(self) -> int:
        return self.generator.style_tokens

    @property
    def style_codebook(self) -> int:
        return self.generator.style_codebook

    def forward(self, x_t: Tensor, t: Tensor | float, labels: Tensor, style: Tensor | None = None) -> Tensor:
        """x_t [B, *noise_shape], t [B] (or one number) in [0, 1], labels [B], style [B, T] or None -> v [B, ...]."""
        t = torch.as_tensor(t, dtype=torch.float32, device=x_t.device).expand(x_t.shape[0])
        return self.generator(x_t, labels, 1.0 + self.time_scale * t, style)


def _check_steps(steps: object, name: str = "steps") -> int:
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"{name}: expected an integer number of Euler steps >= 1, got {steps!r}")
    return steps


def _per_sample(t: Tensor, x: Tensor) -> Tensor:
    """t [B] -> [B, 1, ..., 1], to broadcast against x [B, ...]."""
    return t.reshape(-1, *([1] * (x.dim() - 1))).to(x.dtype)


def interpolate(noise: Tensor, data: Tensor, t: Tensor) -> Tensor:
    """x_t = (1 - t) * noise + t * data, t [B]: noise at t = 0, data at t = 1."""
    t = _per_sample(t, data)
    return (1 - t) * noise + t * data


def flow_loss(velocity_net: nn.Module, data: Tensor, noise: Tensor, t: Tensor, labels: Tensor,
              style: Tensor | None = None) -> Tensor:
    """The rectified-flow loss: mean over all elements of (v_theta(x_t, t) - (data - noise))^2, in fp32."""
    x_t = interpolate(noise, data, t)
    v = velocity_net(x_t, t, labels, style).float()
    return (v - (data - noise).float()).square().mean()


def sample_time(n: int, kind: str, generator: torch.Generator | None = None) -> Tensor:
    """n flow times in (0, 1): "uniform" U(0, 1), or "logit-normal" sigmoid(N(0, 1))."""
    if kind == "uniform":
        return torch.rand(n, generator=generator)
    if kind == "logit-normal":
        return torch.sigmoid(torch.randn(n, generator=generator))
    raise ValueError(f"time_sampling: expected one of {list(TIME_SAMPLINGS)}, got {kind!r}")


@torch.no_grad()
def euler(velocity_net: nn.Module, noise: Tensor, labels: Tensor, steps: int, style: Tensor | None = None) -> Tensor:
    """Integrate dx/dt = v(x, t) from t = 0 (x = noise) to t = 1 with `steps` Euler steps of size 1 / steps."""
    steps = _check_steps(steps)
    x = noise
    for i in range(steps):
        t = torch.full((x.shape[0],), i / steps, device=x.device)
        x = x + velocity_net(x, t, labels, style).to(x.dtype) / steps
    return x


@torch.no_grad()
def sample_flow(velocity_net: nn.Module, labels: Tensor | Sequence[int], steps: int, *,
                generator: torch.Generator | None = None) -> Tensor:
    """Samples [B, *noise_shape] (images in about [-1, 1], not clipped) of `labels` [B] with `steps` Euler steps.

    Noise and style indices come from `draw_inputs(velocity_net, B, generator=generator)`: a seeded generator
    reproduces the samples exactly. steps=1 is the one-step generator x = noise + v(noise, 0).
    """
    steps = _check_steps(steps)
    labels = torch.as_tensor(labels)
    if labels.dim() != 1 or labels.numel() == 0 or labels.is_floating_point() or labels.dtype == torch.bool:
        raise ValueError(f"labels: expected a non-empty 1-D integer tensor, got {labels.dtype} {tuple(labels.shape)}")
    noise, style = draw_inputs(velocity_net, labels.shape[0], generator=generator)  # on the model's device
    return euler(velocity_net, noise, labels.to(noise.device), steps, style)


class EulerSampler(nn.Module):
    """The Euler sampler as a one-step generator: forward(noise, labels, alpha, style) -> euler(...), alpha ignored.

    It has the generator interface, so `drifting.eval.sample.sample_to_npz` (and anything else that takes a
    generator) runs it unchanged: same noise blocks, same .npz layout, same DDP split.
    """

    def __init__(self, velocity_net: VelocityNet, steps: int):
        super().__init__()
        self.velocity_net = velocity_net
        self.steps = _check_steps(steps)

    num_classes = property(lambda self: self.velocity_net.num_classes)
    noise_shape = property(lambda self: self.velocity_net.noise_shape)
    style_tokens = property(lambda self: self.velocity_net.style_tokens)
    style_codebook = property(lambda self: self.velocity_net.style_codebook)

    def forward(self, noise: Tensor, labels: Tensor, alpha: Tensor | float | None = None,
                style: Tensor | None = None) -> Tensor:
        return euler(self.velocity_net, noise, labels, self.steps, style)


@torch.no_grad()
def save_flow_grid(velocity_net: nn.Module, num_classes: int, path: Path, *, steps: int, seed: int,
                   per_class: int = 8) -> Path:
    """A PNG of Euler samples: one row per class (at most 10 rows), `per_class` columns, fixed noise."""
    from drifting.eval.sample import save_image_grid

    rows = min(num_classes, 10)
    labels = torch.arange(rows).repeat_interleave(per_class)
    x = sample_flow(velocity_net, labels, steps, generator=torch.Generator().manual_seed(seed))
    return save_image_grid(to_uint8(x).cpu(), labels, path, per_class=per_class)


# ---------------------------------------------------------------------------------------------------------------------
# The loop
# ---------------------------------------------------------------------------------------------------------------------


def train(cfg: FlowConfig, run_dir: str | Path, *, resume: bool = True, progress: bool = True) -> dict:
    """Train the velocity net; checkpoints, metrics, grids and the EMA export go to run_dir. Returns final metrics."""
    device = dist.init_distributed()
    rank, world = dist.rank(), dist.world_size()
    t = cfg.train
    run_dir = Path(run_dir)
    data = load_training_data(cfg.data)
    num_classes, shape, labels = data.num_classes, data.shape, data.labels
    if t.batch % world:
        raise ValueError(f"train.batch: a batch of {t.batch} does not divide over {world} processes")
    local = slice(rank * (t.batch // world), (rank + 1) * (t.batch // world))

    torch.manual_seed(t.seed)
    model = build_model(GenConfig(model=cfg.model), num_classes, shape).to(device)  # the drifting generator
    emas = {d: ema_copy(model) for d in t.ema_decays}
    train_model = wrap_model(VelocityNet(model), strategy="ddp" if world > 1 else "none", device=device)
    opt = torch.optim.AdamW(model.parameters(), lr=t.lr, betas=(0.9, 0.95), weight_decay=t.weight_decay)
    start = 0
    ckpt_dir = run_dir / "checkpoints"
    if resume and latest_checkpoint(ckpt_dir) is not None:
        state = load_checkpoint(ckpt_dir, map_location=device)
        load_full_state_dict(model, state["model"])
        for d, ema in emas.items():
            load_full_state_dict(ema, state["ema"][str(d)])
        load_full_optimizer_state_dict(model, opt, state["optimizer"])
        start = state["step"]
        dist.print0(f"resumed from step {start} ({latest_checkpoint(ckpt_dir)})")
    if dist.is_main():
        save_config(cfg, run_dir / "config.yaml")
    if t.compile:
        train_model = torch.compile(train_model)
    logger = RunLogger(run_dir, enabled=dist.is_main())
    meter = Throughput()
    autocast = torch.autocast("cuda", torch.bfloat16, enabled=cfg.model.bf16 and device.type == "cuda")
    last: dict = {}
    limit = dist.TimeLimit(t.time_limit_min, every=t.log_every)
    step_done = start

    for step in tqdm(range(start, t.steps), desc="train-flow", disable=not (progress and dist.is_main()),
                     initial=start, total=t.steps):
        t0 = time.perf_counter()
        for group in opt.param_groups:
            group["lr"] = lr_at(step, peak=t.lr, warmup_steps=t.warmup_steps)
        # 1. The global batch's draws (every process draws all of them), then this process's slice.
        g_data, g_noise, g_time = (step_generator(t.seed, step, k) for k in range(3))
        idx = torch.randint(len(labels), (t.batch,), generator=g_data)  # uniform, with replacement
        real = data.sample(idx, g_data)  # [batch, *shape] in the data's storage dtype
        noise, style = draw_inputs(model, t.batch, generator=g_noise, device="cpu")
        times = sample_time(t.batch, t.time_sampling, g_time)
        # asynchronous copies: a blocking one would wait for the GPU's queue to drain (a host sync each)
        x1 = data.to_model(real[local].to(device, non_blocking=True))
        x0, tt, y = (v[local].to(device, non_blocking=True) for v in (noise, times, labels[idx]))
        s = None if style is None else style[local].to(device, non_blocking=True)

        # 2. Loss, backward (DDP averages the equal-sized local means: the global mean), clip, AdamW, EMA.
        opt.zero_grad(set_to_none=True)
        with autocast:
            loss = flow_loss(train_model, x1, x0, tt, y, s)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip)
        opt.step()
        warm = (1 + step) / (10 + step) if t.ema_warmup else 1.0
        ema_update(emas, model, {d: min(d, warm) for d in t.ema_decays})
        meter.update(t.batch)
        step_done = step + 1
        stop = limit.reached(step_done)  # the time budget is spent: end here as at the last step
        final = stop or step_done == t.steps

        # 3. Log, sample, checkpoint.
        if step_done % t.log_every == 0 or final:
            mean_loss = dist.all_reduce_sum_tensor(loss.detach()) / world
            last = {"loss": float(mean_loss), "grad_norm": float(grad_norm), "lr": opt.param_groups[0]["lr"],
                    "samples_per_s": meter.rate(), "step_ms": 1e3 * (time.perf_counter() - t0)}
            logger.log(step_done, last)
        if ((t.sample_every and step_done % t.sample_every == 0) or final) and dist.is_main() \
                and data.storage == torch.uint8:  # latents would need the VAE decoder: not drawn
            net = VelocityNet(emas[max(t.ema_decays)] if t.ema_decays else model)
            for n in t.grid_steps:
                save_flow_grid(net, num_classes, run_dir / f"samples_{step_done:06d}_euler{n}.png", steps=n,
                               seed=t.seed)
        if (t.checkpoint_every and step_done % t.checkpoint_every == 0) or final:
            state = {"model": full_state_dict(model), "ema": {str(d): full_state_dict(e) for d, e in emas.items()},
                     "optimizer": full_optimizer_state_dict(model, opt), "step": step_done,
                     "config": config_to_dict(cfg)}
            if dist.is_main():
                save_checkpoint(ckpt_dir / f"ckpt-{step_done:09d}.pt", state, keep_last=t.keep_checkpoints)
            dist.barrier()
        if stop:
            dist.print0(limit.stopped(step_done))
            break
    if t.ema_decays and dist.is_main():
        export_weights(run_dir / "ema.pt", full_state_dict(emas[max(t.ema_decays)]), config_to_dict(cfg),
                       meta={"kind": "flow", "time_scale": TIME_SCALE, "time_sampling": t.time_sampling,
                             "step": step_done, "ema_decay": max(t.ema_decays), "num_classes": num_classes,
                             "shape": list(shape)})
    logger.close()
    return last


def main(cfg: FlowConfig, run_dir: str | Path, *, resume: bool = True, progress: bool = True) -> dict:
    try:
        return train(cfg, run_dir, resume=resume, progress=progress)
    finally:
        dist.cleanup()


# ---------------------------------------------------------------------------------------------------------------------
# Sampling to .npz (the layout of drifting.eval.sample.sample_to_npz, scored by `drifting eval`)
# ---------------------------------------------------------------------------------------------------------------------


def load_velocity_net(ema_file: str | os.PathLike, device: str | torch.device = "cpu") -> VelocityNet:
    """The velocity net of a `drifting train-flow` export (ema.pt); refuses a drifting generator's export."""
    from drifting.eval.sample import load_generator

    ema_file = Path(ema_file)
    if not ema_file.is_file():
        raise FileNotFoundError(f"flow weights not found: {ema_file} (`drifting train-flow` writes <run>/ema.pt)")
    state = torch.load(ema_file, map_location="cpu", weights_only=True)
    meta = state.get("meta", {}) if isinstance(state, dict) else {}
    if meta.get("kind") != "flow":
        raise ValueError(f"{ema_file}: not a flow-matching export (meta.kind is {meta.get('kind')!r}, expected "
                         "'flow'); sample a drifting generator with `drifting sample`")
    generator = load_generator(ema_file, device=device, kind="flow")
    return VelocityNet(generator, float(meta.get("time_scale", TIME_SCALE))).eval()


def flow_samples_to_npz(ema_file: str | os.PathLike, out: str | os.PathLike, *, num_per_class: int, steps: int,
                        seed: int = 0, batch: int = 256, device: str | torch.device | None = None,
                        grid: bool = True) -> Path:
    """`steps`-step Euler samples of a flow export to `out` (.npz, plus a PNG grid beside it).

    The file is written by `sample_to_npz` itself around `EulerSampler`: `images` uint8 [N, C, H, W], `labels`
    int64 [N] (balanced, interleaved), and the scalars `alpha` (1.0: no guidance), `seed`, `num_classes`; sample i
    has the noise of sample i of `drifting sample` with the same seed. Runs under torchrun like `sample_to_npz`.
    """
    from drifting.eval.sample import sample_to_npz

    steps = _check_steps(steps)
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    net = load_velocity_net(ema_file, device=device)
    return sample_to_npz(EulerSampler(net, steps), out, num_per_class=num_per_class, alpha=1.0, seed=seed,
                         batch=batch, grid=grid)


def flow_sample_main(ema: str, out: str | None = None, *, num_per_class: int = 1000, steps: int = 1, seed: int = 0,
                     batch: int = 256, device: str | None = None) -> Path:
    """`drifting sample-flow`: default out <ema dir>/samples_euler<steps>.npz. One process, or N under torchrun."""
    _check_steps(steps)
    dev = dist.init_distributed()
    try:
        out = out or str(Path(ema).parent / f"samples_euler{steps}.npz")
        path = flow_samples_to_npz(ema, out, num_per_class=num_per_class, steps=steps, seed=seed, batch=batch,
                                   device=device or dev)
        dist.print0(f"wrote {path} ({steps} Euler steps) and {path.with_suffix('.png')}")
        return path
    finally:
        dist.cleanup()
