"""ResNet-MAE pre-training: `drifting train-mae`. One readable loop, top to bottom, shaped like `train/gen.py`.

Each step (official-code-notes.md 6.2): draw a batch of real images; random-resized-crop (area 0.2-1, bicubic) and,
for datasets whose classes survive a mirror, a horizontal flip; zero each 2x2 cell of the encoder's patchified grid
independently with probability `mask_ratio`; reconstruct with the U-Net decoder; the loss is

    recon = sum over masked positions and channels of (x_hat - x)^2 / number of masked positions     (no norm-pix)
    total = lambda * CE(head(mean of layer4), y) + (1 - lambda) * recon

with lambda = 0 except in the optional classification fine-tune (the last `finetune_steps` steps), where it ramps
linearly 0 -> `finetune_lambda` (0.1) over `finetune_ramp` steps. AdamW (lr 4e-3, warmup then constant, betas
(0.9, 0.95), wd 0.01), grad-clip 2.0, an EMA of the weights. The EMA encoder is exported with its config to
`encoder.pt`, which `drifting train loss.encoder=<preset> loss.encoder_weights=<run>/encoder.pt` loads.

Exactness by construction (as in gen.py). Every random draw of step s (images, crops, flips, masks) comes from a CPU
generator seeded by (seed, s) and is drawn for the whole global batch on every process, so resume needs no RNG state:
2 steps + resume + 2 steps equal 4 steps, bit for bit on a CPU. Under DDP each process takes its slice of the batch
and normalises its share of the loss by the *global* number of masked positions, so the averaged gradient is the
single-process one.

The encoder is the preset resized to the data: in_channels, image_size and num_classes come from the dataset (and
`model.width` when set). These build arguments go into the export's meta as `encoder_kwargs`; a loader rebuilds the
encoder with `resnet_maes[meta["encoder"]](**meta["encoder_kwargs"])`.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm import tqdm

from drifting.config import config_to_dict, save_config
from drifting.data.datasets import DATASETS, load_dataset, to_float
from drifting.data.synthetic import synthetic_images
from drifting.models.resnet_mae import ResNetMAE, patchify, resnet_maes
from drifting.train import dist
from drifting.train.checkpoint import export_weights, latest_checkpoint, load_checkpoint, save_checkpoint
from drifting.train.ema import ema_copy, ema_update
from drifting.train.log import RunLogger, Throughput
from drifting.train.parallel import unwrap, wrap_model
from drifting.train.schedule import lr_at

__all__ = [
    "MAEConfig", "MAEDataConfig", "MAEModelConfig", "MAETrainConfig", "MAEEvalConfig", "train_mae", "main",
    "build_encoder", "load_split", "random_mask", "apply_mask", "masked_recon_loss", "finetune_lambda",
    "random_resized_crop", "evaluate", "linear_probe",
]


@dataclass(frozen=True)
class MAEDataConfig:
    dataset: str = "synthetic"  # synthetic | mnist | fashion-mnist | cifar10
    path: str | None = None  # the dataset file or folder (default: the registry's search path)
    # The synthetic set (drifting/data/synthetic.py): the default is the one `drifting train` uses, so the two
    # defaults pair up. Its test split is the same recipe with another seed.
    synthetic_classes: int = 4
    synthetic_per_class: int = 256
    synthetic_size: int = 8
    synthetic_channels: int = 3


@dataclass(frozen=True)
class MAEModelConfig:
    encoder: str = "mae_tiny"  # a preset of drifting.models.resnet_mae.resnet_maes, resized to the data
    width: int | None = None  # override the preset's C (stage widths C, 2C, 4C, 8C)


@dataclass(frozen=True)
class MAETrainConfig:
    steps: int = 30
    batch: int = 32  # global batch (the authors': 8192)
    lr: float = 4e-3
    warmup_steps: int = 5  # linear from 1e-6, then constant (the authors': 4000)
    weight_decay: float = 0.01
    betas: tuple[float, float] = (0.9, 0.95)
    grad_clip: float = 2.0
    ema_decay: float = 0.9995
    # decay_t = min(decay, (1 + t) / (10 + t)), as in gen.py: 0.9995 from step 0 keeps 22% of the random
    # initialisation after 3,000 steps, which the evaluation would measure. False: the authors' constant decay.
    ema_warmup: bool = True
    mask_ratio: float = 0.5  # probability that a 2x2 cell of the patchified grid is zeroed
    crop: bool = True  # random-resized-crop to the image size (bicubic)
    crop_scale: tuple[float, float] = (0.2, 1.0)  # range of the crop's area, as a fraction of the image's
    flip: bool | None = None  # horizontal flip; None: on for cifar10 / fashion-mnist, off for digits and synthetic
    bf16: bool = True  # bf16 autocast on CUDA (parameters, EMA and loss stay fp32); ignored on a CPU
    finetune_steps: int = 0  # the last N steps add the classification loss (the authors' 3000 for MAE-640, else 0)
    finetune_ramp: int = 1000  # lambda ramps linearly from 0 to finetune_lambda over this many steps
    finetune_lambda: float = 0.1
    compile: bool = False
    seed: int = 0
    log_every: int = 10
    checkpoint_every: int = 0  # 0: only at the end
    keep_checkpoints: int = 2
    # Stop after this many minutes of training (checked at the log steps), ending as at the last step: checkpoint,
    # evaluation, export (the fine-tune, scheduled on `steps`, may not have begun). 0: no limit.
    time_limit_min: float = 0.0


@dataclass(frozen=True)
class MAEEvalConfig:
    every: int = 0  # evaluate every N steps (0: only at the end; the authors': 2000)
    images: int = 5000  # test images for the masked-reconstruction loss and the probe's accuracy
    probe_images: int = 10000  # train images (clean, no augmentation) the linear probe is fitted on
    probe_steps: int = 100  # L-BFGS iterations of the full-batch logistic regression
    probe_l2: float = 1e-4  # L2 penalty on the probe's weights (standardised features)
    batch: int = 500  # images per encoder forward during evaluation


@dataclass(frozen=True)
class MAEConfig:
    data: MAEDataConfig = field(default_factory=MAEDataConfig)
    model: MAEModelConfig = field(default_factory=MAEModelConfig)
    train: MAETrainConfig = field(default_factory=MAETrainConfig)
    eval: MAEEvalConfig = field(default_factory=MAEEvalConfig)

    def __post_init__(self) -> None:
        d, t, e = self.data, self.train, self.eval
        if d.dataset != "synthetic" and d.dataset not in DATASETS:
            raise ValueError(f"data.dataset: expected 'synthetic' or one of {sorted(DATASETS)}, got {d.dataset!r}")
        if self.model.encoder not in resnet_maes:
            raise ValueError(f"model.encoder: expected one of {sorted(resnet_maes)}, got {self.model.encoder!r}")
        if self.model.width is not None and self.model.width < 1:
            raise ValueError(f"model.width: expected None or an integer >= 1, got {self.model.width}")
        for name in ("steps", "batch", "log_every", "keep_checkpoints"):
            if getattr(t, name) < 1:
                raise ValueError(f"train.{name}: expected an integer >= 1, got {getattr(t, name)}")
        for name in ("warmup_steps", "checkpoint_every", "finetune_steps", "finetune_ramp"):
            if getattr(t, name) < 0:
                raise ValueError(f"train.{name}: expected an integer >= 0, got {getattr(t, name)}")
        if t.time_limit_min < 0:
            raise ValueError(f"train.time_limit_min: expected minutes >= 0 (0: no limit), got {t.time_limit_min}")
        if t.finetune_steps > t.steps:
            raise ValueError(f"train.finetune_steps: {t.finetune_steps} is more than train.steps = {t.steps}")
        if not 0.0 < t.mask_ratio < 1.0:
            raise ValueError(f"train.mask_ratio: expected a value in (0, 1), got {t.mask_ratio}")
        lo, hi = t.crop_scale
        if not 0.0 < lo <= hi <= 1.0:
            raise ValueError(f"train.crop_scale: expected 0 < min <= max <= 1, got {t.crop_scale}")
        if not 0.0 <= t.ema_decay < 1.0:
            raise ValueError(f"train.ema_decay: expected a value in [0, 1), got {t.ema_decay}")
        if not 0.0 <= t.finetune_lambda <= 1.0:
            raise ValueError(f"train.finetune_lambda: expected a value in [0, 1], got {t.finetune_lambda}")
        if t.lr <= 0 or t.grad_clip <= 0 or t.weight_decay < 0 or not all(0 <= b < 1 for b in t.betas):
            raise ValueError(f"train: expected lr > 0, grad_clip > 0, weight_decay >= 0, betas in [0, 1); got "
                             f"{t.lr}, {t.grad_clip}, {t.weight_decay}, {t.betas}")
        for name in ("every", "images", "probe_images", "probe_steps"):
            if getattr(e, name) < 0:
                raise ValueError(f"eval.{name}: expected an integer >= 0, got {getattr(e, name)}")
        if e.batch < 1 or e.probe_l2 < 0:
            raise ValueError(f"eval: expected batch >= 1 and probe_l2 >= 0, got {e.batch}, {e.probe_l2}")

    @property
    def use_flip(self) -> bool:
        """The flip actually used: mirrored digits are other glyphs, and the synthetic class is the square's place."""
        if self.train.flip is not None:
            return self.train.flip
        return self.data.dataset in ("cifar10", "fashion-mnist")


# ---------------------------------------------------------------------------------------------------------------------
# Setup
# ---------------------------------------------------------------------------------------------------------------------


def load_split(cfg: MAEDataConfig, split: str) -> tuple[Tensor, Tensor, int]:
    """(images uint8 [N, C, H, W], labels int64 [N], number of classes) of the train or test split."""
    if cfg.dataset == "synthetic":
        images, labels = synthetic_images(cfg.synthetic_classes, cfg.synthetic_per_class, cfg.synthetic_size,
                                          cfg.synthetic_channels, seed=0 if split == "train" else 1)
        return images, labels, cfg.synthetic_classes
    images, labels = load_dataset(cfg.dataset, split, cfg.path)
    return images, labels, len(DATASETS[cfg.dataset].classes)


def build_encoder(cfg: MAEModelConfig, shape: tuple[int, ...], num_classes: int) -> tuple[ResNetMAE, dict]:
    """The preset resized to the data, and the keyword arguments it was built with (stored in the export)."""
    if len(shape) != 3 or shape[1] != shape[2]:
        raise ValueError(f"model.encoder: square images [C, H, H] expected, the data is {list(shape)}")
    kwargs = {"in_channels": int(shape[0]), "image_size": int(shape[1]), "num_classes": int(num_classes)}
    if cfg.width is not None:
        kwargs["width"] = cfg.width
    return resnet_maes[cfg.encoder](**kwargs), kwargs


def step_generator(seed: int, step: int, purpose: int) -> torch.Generator:
    """The CPU generator of one kind of draw at one step: a pure function of (seed, step, purpose)."""
    return torch.Generator().manual_seed((seed * 1_000_003 + step) * 8 + purpose)


# ---------------------------------------------------------------------------------------------------------------------
# Augmentation, masking, loss: pure functions of tensors
# ---------------------------------------------------------------------------------------------------------------------


def crop_params(n: int, scale: tuple[float, float], flip: bool, generator: torch.Generator,
                ratio: tuple[float, float] = (3 / 4, 4 / 3)) -> Tensor:
    """Affine maps [n, 2, 3] of random-resized-crops (for `random_resized_crop`), drawn on the CPU.

    Area fraction s ~ U(scale), aspect r log-uniform in `ratio`; the box is sqrt(s r) x sqrt(s / r) of the image's
    sides, clipped to the image (torchvision retries instead of clipping, which favours no particular shape),
    placed uniformly inside it. With `flip`, half of the maps mirror x.
    """
    s = scale[0] + (scale[1] - scale[0]) * torch.rand(n, generator=generator)
    log_r = math.log(ratio[0]) + (math.log(ratio[1]) - math.log(ratio[0])) * torch.rand(n, generator=generator)
    w = (s * log_r.exp()).sqrt().clamp(max=1.0)  # box sides as fractions of the image's
    h = (s / log_r.exp()).sqrt().clamp(max=1.0)
    cx = (1 - w) * (2 * torch.rand(n, generator=generator) - 1)  # box centre in grid_sample's [-1, 1] coordinates
    cy = (1 - h) * (2 * torch.rand(n, generator=generator) - 1)
    sign = 1 - 2 * (torch.rand(n, generator=generator) < 0.5).float() if flip else torch.ones(n)
    zero = torch.zeros(n)
    return torch.stack([torch.stack([w * sign, zero, cx], 1), torch.stack([zero, h, cy], 1)], 1)  # (n, 2, 3)


def random_resized_crop(x: Tensor, theta: Tensor) -> Tensor:
    """x [N, C, H, W] in [-1, 1], theta [N, 2, 3] from `crop_params` -> crops resized to [N, C, H, W] (bicubic)."""
    grid = F.affine_grid(theta.to(x), list(x.shape), align_corners=False)
    # Bicubic overshoots at edges; clamp back to the data's range. Border padding: taps outside the box stay inside.
    return F.grid_sample(x, grid, mode="bicubic", padding_mode="border", align_corners=False).clamp(-1, 1)


def random_mask(n: int, grid_size: int, ratio: float, generator: torch.Generator) -> Tensor:
    """Bool [n, G, G] over the patchified grid, True = masked: each 2x2 cell is masked independently w.p. `ratio`.

    An odd G leaves a last row and column of half cells (the authors' grids are 32 or 28, always even).
    """
    cells = -(-grid_size // 2)
    m = torch.rand(n, cells, cells, generator=generator) < ratio  # (n, G/2, G/2)
    return m.repeat_interleave(2, 1).repeat_interleave(2, 2)[:, :grid_size, :grid_size]  # (n, G, G)


def apply_mask(x: Tensor, mask: Tensor, patch_size: int = 1) -> Tensor:
    """Zero the masked positions (the authors zero them; nothing is dropped): x [N, C, H, W], mask [N, G, G]."""
    pixels = mask.repeat_interleave(patch_size, 1).repeat_interleave(patch_size, 2)  # (N, H, W)
    return x.masked_fill(pixels[:, None].to(x.device), 0.0)


def masked_recon_loss(recon: Tensor, target: Tensor, mask: Tensor, patch_size: int = 1, *,
                      num_masked: float | Tensor | None = None) -> Tensor:
    """The authors' MAE loss: squared error summed over masked positions and channels / number of masked positions.

    recon, target [N, C, H, W]; mask bool [N, G, G] with G = H / patch_size (True = masked). A position is a cell of
    the patchified grid, with C p^2 channels. num_masked: the denominator (default mask.sum()); the trainer passes the
    global batch's count so that per-process shares add up to the whole-batch loss.
    """
    err = patchify((recon.float() - target.float()), patch_size).square().sum(1)  # (N, G, G)
    denom = mask.sum().clamp_min(1) if num_masked is None else num_masked
    return (err * mask.to(err)).sum() / denom


def finetune_lambda(step: int, *, steps: int, finetune_steps: int, ramp: int, peak: float = 0.1) -> float:
    """Weight of the classification loss at `step` (0-based): 0 before the last `finetune_steps` steps, then
    linear from 0 (first fine-tune step) to `peak` after `ramp` steps, then constant."""
    start = steps - finetune_steps
    if finetune_steps <= 0 or step < start:
        return 0.0
    return peak if ramp <= 0 else peak * min(1.0, (step - start) / ramp)


# ---------------------------------------------------------------------------------------------------------------------
# The loop
# ---------------------------------------------------------------------------------------------------------------------


def train_mae(cfg: MAEConfig, run_dir: str | Path, *, resume: bool = True, progress: bool = True) -> dict:
    """Pre-train a ResNet-MAE; checkpoints, metrics and the EMA export go to run_dir. Returns the final metrics."""
    device = dist.init_distributed()
    rank, world = dist.rank(), dist.world_size()
    t = cfg.train
    run_dir = Path(run_dir)
    images, labels, num_classes = load_split(cfg.data, "train")
    test_images, test_labels, _ = load_split(cfg.data, "test")
    shape = tuple(images.shape[1:])
    if t.batch % world:
        raise ValueError(f"train.batch: {t.batch} images per step do not divide over {world} processes")
    local = t.batch // world

    torch.manual_seed(t.seed)
    model, encoder_kwargs = build_encoder(cfg.model, shape, num_classes)
    model = model.to(device)
    p, grid_size = model.cfg.patch_size, model.cfg.grid_size
    ema = ema_copy(model)
    opt = torch.optim.AdamW(model.parameters(), lr=t.lr, betas=t.betas, weight_decay=t.weight_decay)
    start = 0
    ckpt_dir = run_dir / "checkpoints"
    if resume and latest_checkpoint(ckpt_dir) is not None:
        state = load_checkpoint(ckpt_dir, map_location=device)
        model.load_state_dict(state["model"])
        ema.load_state_dict(state["ema"])
        opt.load_state_dict(state["optimizer"])
        start = state["step"]
        dist.print0(f"resumed from step {start} ({latest_checkpoint(ckpt_dir)})")
    if dist.is_main():
        save_config(cfg, run_dir / "config.yaml")
    train_model = wrap_model(model, strategy="ddp" if world > 1 else "none", device=device)
    if t.compile:
        train_model = torch.compile(train_model)
    logger = RunLogger(run_dir, enabled=dist.is_main())
    meter = Throughput()
    autocast = torch.autocast("cuda", torch.bfloat16, enabled=t.bf16 and device.type == "cuda")
    images_dev, labels_dev = images.to(device), labels.to(device)  # uint8: 150 MB for CIFAR-10, once
    window = torch.zeros(3, device=device)  # running (total, recon, ce) shares since the last log
    window_steps, last = 0, {}
    limit = dist.TimeLimit(t.time_limit_min, every=t.log_every)
    step_done = start

    def run_eval(step_done: int) -> dict:
        if not dist.is_main():
            return {}
        metrics = evaluate(ema, cfg, (images, labels), (test_images, test_labels), num_classes, device)
        logger.log(step_done, metrics)
        return metrics

    for step in tqdm(range(start, t.steps), desc="train-mae", disable=not (progress and dist.is_main()),
                     initial=start, total=t.steps):
        t0 = time.perf_counter()
        lr = lr_at(step, peak=t.lr, warmup_steps=t.warmup_steps)
        for group in opt.param_groups:
            group["lr"] = lr
        lam = finetune_lambda(step, steps=t.steps, finetune_steps=t.finetune_steps, ramp=t.finetune_ramp,
                              peak=t.finetune_lambda)
        # 1. The global batch's draws, identical on every process: images, crops and flips, masks.
        g = step_generator(t.seed, step, 0)
        idx = torch.randint(len(images), (t.batch,), generator=g)
        theta = crop_params(t.batch, t.crop_scale, cfg.use_flip, g) if t.crop else None
        flips = torch.rand(t.batch, generator=g) < 0.5 if (cfg.use_flip and not t.crop) else None
        mask = random_mask(t.batch, grid_size, t.mask_ratio, g)  # (B, G, G)
        num_masked = mask.sum().clamp_min(1).item()  # global count: the loss's denominator on every process

        # 2. This process's slice: augment on the device, mask, reconstruct.
        mine = slice(rank * local, (rank + 1) * local)
        rows = idx[mine].to(device, non_blocking=True)  # asynchronous: a blocking copy is a host sync
        x = to_float(images_dev[rows])  # (b, C, H, W) in [-1, 1]
        if theta is not None:
            x = random_resized_crop(x, theta[mine].to(device, non_blocking=True))
        elif flips is not None:
            x = torch.where(flips[mine].to(device, non_blocking=True)[:, None, None, None], x.flip(-1), x)
        m = mask[mine].to(device, non_blocking=True)
        with autocast:
            recon, logits = train_model(apply_mask(x, m, p))
        recon_share = masked_recon_loss(recon, x, m, p, num_masked=num_masked)  # this process's share of the loss
        # CE is always computed (weight 0 outside the fine-tune) so that DDP sees a gradient for every parameter.
        ce_share = F.cross_entropy(logits.float(), labels_dev[rows], reduction="sum") / t.batch
        loss_share = lam * ce_share + (1 - lam) * recon_share
        opt.zero_grad(set_to_none=True)
        (loss_share * world).backward()  # DDP averages gradients over processes; each loss is a share of the sum
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip)
        opt.step()
        decay = min(t.ema_decay, (1 + step) / (10 + step)) if t.ema_warmup else t.ema_decay
        ema_update(ema, model, decay)
        window += torch.stack([loss_share, recon_share, ce_share]).detach()
        window_steps += 1
        meter.update(t.batch)
        step_done = step + 1
        stop = limit.reached(step_done)  # the time budget is spent: end here as at the last step
        final = stop or step_done == t.steps

        # 3. Log, evaluate, checkpoint.
        if step_done % t.log_every == 0 or final:
            # Summed over processes, the shares are the global losses; one CPU-GPU sync per log.
            total, recon_l, ce = (dist.all_reduce_sum_tensor(window) / window_steps).tolist()
            last = {"loss": total, "recon": recon_l, "ce": ce, "lambda": lam, "grad_norm": float(grad_norm),
                    "lr": lr, "mask_frac": num_masked / (t.batch * grid_size**2), "samples_per_s": meter.rate(),
                    "step_ms": 1e3 * (time.perf_counter() - t0)}
            logger.log(step_done, last)
            window.zero_()
            window_steps = 0
        if cfg.eval.every and step_done % cfg.eval.every == 0 and not final:
            run_eval(step_done)
            dist.barrier()
        if (t.checkpoint_every and step_done % t.checkpoint_every == 0) or final:
            if dist.is_main():
                save_checkpoint(ckpt_dir / f"ckpt-{step_done:09d}.pt", {
                    "model": unwrap(model).state_dict(), "ema": ema.state_dict(), "optimizer": opt.state_dict(),
                    "step": step_done, "config": config_to_dict(cfg)}, keep_last=t.keep_checkpoints)
            dist.barrier()
        if stop:
            dist.print0(limit.stopped(step_done))
            break

    # 4. Evaluate the EMA weights and export them.
    metrics = run_eval(step_done)
    if dist.is_main():
        export_weights(run_dir / "encoder.pt", ema.state_dict(), config_to_dict(cfg),
                       meta={"step": step_done, "ema_decay": t.ema_decay, "encoder": cfg.model.encoder,
                             "encoder_kwargs": encoder_kwargs, "num_classes": num_classes, "shape": list(shape),
                             "metrics": metrics})
    dist.barrier()
    logger.close()
    return {**last, **metrics}


# ---------------------------------------------------------------------------------------------------------------------
# Evaluation
# ---------------------------------------------------------------------------------------------------------------------


def _subset(n_total: int, n: int, seed: int) -> Tensor:
    """A fixed random subset of min(n, n_total) indices (the same at every evaluation of a run)."""
    return torch.randperm(n_total, generator=torch.Generator().manual_seed(seed))[:n]


@torch.no_grad()
def evaluate(model: ResNetMAE, cfg: MAEConfig, train: tuple[Tensor, Tensor], test: tuple[Tensor, Tensor],
             num_classes: int, device: torch.device) -> dict:
    """Masked-reconstruction loss on the test split and linear-probe accuracy, for `model` (the EMA) in fp32.

    test_masked_loss:  the training loss (masked positions) on clean test images with fixed 2x2-cell masks
    test_visible_loss: the same over the visible positions (the authors' "unmasked loss")
    probe_acc:         logistic regression on the spatial mean of layer4 (clean images), fitted on a train subset
    probe_train_acc:   its accuracy on that subset
    head_acc:          the classification head on clean test images (only with a fine-tune)
    """
    e, p = cfg.eval, model.cfg.patch_size
    model.eval()
    test_idx = _subset(len(test[0]), e.images, cfg.train.seed + 1)
    train_idx = _subset(len(train[0]), e.probe_images, cfg.train.seed + 2)
    g = torch.Generator().manual_seed(cfg.train.seed + 3)
    err = torch.zeros(4, dtype=torch.float64)  # masked error, masked count, visible error, visible count
    test_feats, train_feats = [], []
    for chunk in test_idx.split(e.batch):
        x = to_float(test[0][chunk].to(device))
        mask = random_mask(len(x), model.cfg.grid_size, cfg.train.mask_ratio, g).to(device)
        recon, _ = model(apply_mask(x, mask, p))
        sums = [masked_recon_loss(recon, x, m, p, num_masked=1.0) for m in (mask, ~mask)]  # error sums
        err += torch.stack([sums[0], mask.sum().float(), sums[1], (~mask).sum().float()]).double().cpu()
        test_feats.append(model.taps(x)["layer4"].mean(dim=(2, 3)))
    for chunk in train_idx.split(e.batch):
        train_feats.append(model.taps(to_float(train[0][chunk].to(device)))["layer4"].mean(dim=(2, 3)))
    metrics = {"test_masked_loss": float(err[0] / err[1].clamp_min(1)),
               "test_visible_loss": float(err[2] / err[3].clamp_min(1))}
    if len(train_idx) and len(test_idx) and e.probe_steps:
        f_test, f_train = torch.cat(test_feats), torch.cat(train_feats)
        y_test, y_train = test[1][test_idx].to(device), train[1][train_idx].to(device)
        train_acc, test_acc = linear_probe(f_train, y_train, f_test, y_test, num_classes, steps=e.probe_steps,
                                           l2=e.probe_l2)
        metrics.update(probe_acc=test_acc, probe_train_acc=train_acc)
        if cfg.train.finetune_steps and model.head is not None:
            metrics["head_acc"] = float((model.head(f_test).argmax(1) == y_test).float().mean())
    return metrics


def linear_probe(train_x: Tensor, train_y: Tensor, test_x: Tensor, test_y: Tensor, num_classes: int, *,
                 steps: int = 100, l2: float = 1e-4) -> tuple[float, float]:
    """Multinomial logistic regression on frozen features, full-batch L-BFGS: (train accuracy, test accuracy).

    train_x [N, D], test_x [M, D]; features are standardised with the train statistics (so one l2 suits every
    encoder width). Deterministic: zero initialisation, no sampling.
    """
    mu, sd = train_x.mean(0), train_x.std(0).clamp_min(1e-6)
    a, b = (train_x - mu) / sd, (test_x - mu) / sd  # (N, D), (M, D)
    w = torch.zeros(a.shape[1], num_classes, device=a.device, requires_grad=True)
    bias = torch.zeros(num_classes, device=a.device, requires_grad=True)
    opt = torch.optim.LBFGS([w, bias], lr=1.0, max_iter=steps, history_size=20, line_search_fn="strong_wolfe",
                            tolerance_grad=1e-7, tolerance_change=1e-10)

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(a @ w + bias, train_y) + l2 * w.square().sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    with torch.no_grad():
        train_acc = (a @ w + bias).argmax(1).eq(train_y).float().mean()
        test_acc = (b @ w + bias).argmax(1).eq(test_y).float().mean()
    return float(train_acc), float(test_acc)


def main(cfg: MAEConfig, run_dir: str | Path, *, resume: bool = True, progress: bool = True) -> dict:
    try:
        return train_mae(cfg, run_dir, resume=resume, progress=progress)
    finally:
        dist.cleanup()
