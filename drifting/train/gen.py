"""Generator training: `drifting train`. One readable loop, top to bottom.

Each step (official-code-notes.md 7.1): push real samples into the per-class queues; choose N_c classes and one
guidance scale alpha per class; generate C_g samples per class in one step; draw C_p positives per class and C_n
unconditional samples per class from the queues; the drifting loss over the encoder's feature keys (or over the raw
samples when there is no encoder); backward; clip; AdamW; EMA.

Exactness by construction. Every random draw of step s comes from generators seeded by (seed, s) and is drawn for
the whole global batch on every process, so:
- classes can be processed in chunks (gradient accumulation): the loss's global statistics are computed first over
  all chunks (`FeatureDriftLoss.stats`), then each chunk's loss is differentiated; the update equals one big step;
- N processes each take N_c / N of the classes, sum the statistics with all-reduce and average gradients through
  DDP or FSDP2 (the loss is multiplied by N to undo the averaging): the update equals the single-process one;
- resume needs no RNG state beyond the step: 2 steps + resume + 2 steps equal 4 steps, bit for bit on a CPU.
The queues are replicated: every process pushes the same real samples and keeps the same queues.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Literal, NamedTuple

import torch
from torch import Tensor
from tqdm import tqdm

from drifting.config import config_to_dict, save_config
from drifting.data.datasets import DATASETS, load_dataset, to_float
from drifting.data.image_stream import ImageFolderStream
from drifting.data.latents import load_latents
from drifting.data.prefetch import prefetch
from drifting.data.queue import SampleQueue
from drifting.data.synthetic import synthetic_images
from drifting.drift import all_reduce_sum
from drifting.feature_loss import ClassBatch, FeatureDriftLoss
from drifting.features import FeatureConfig
from drifting.guidance import guidance_weight, sample_alpha
from drifting.models.dit import GENERATORS, build_generator
from drifting.models.generate import draw_inputs
from drifting.models.resnet_mae import resnet_maes
from drifting.train import dist
from drifting.train.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint, export_weights
from drifting.train.ema import ema_copy, ema_update
from drifting.train.log import RunLogger, Throughput
from drifting.train.parallel import (
    full_optimizer_state_dict, full_state_dict, is_sharded, load_full_optimizer_state_dict, load_full_state_dict,
    set_gradient_sync, wrap_model,
)
from drifting.train.schedule import lr_at


@dataclass(frozen=True)
class DataConfig:
    # synthetic | mnist | fashion-mnist | cifar10 (held in memory) | latents (a cache, see data/latents.py) |
    # image-folder (root/<class>/<image>, decoded on demand: ImageNet pixels, see data/image_stream.py)
    dataset: str = "synthetic"
    path: str | None = None  # the dataset file or folder (default: the registry's search path; required for
    # latents and image-folder)
    synthetic_classes: int = 4  # the synthetic set: classes, images per class, size
    synthetic_per_class: int = 256
    synthetic_size: int = 8
    # latents only: a local AutoencoderKL folder to decode the sample grids to pixels (with the cache's scaling);
    # None draws no grids for latent runs
    vae: str | None = None
    # image-folder only: crop size, augmentation ("rrc": RandomResizedCrop(0.2-1) + flip as the authors' pixel
    # configs; "center": ADM center crop + flip) and decoding threads
    image_size: int = 256
    augment: Literal["rrc", "center"] = "rrc"
    workers: int | None = None


@dataclass(frozen=True)
class ModelConfig:
    generator: str = "DiT-tiny"  # a preset of drifting.models.dit.GENERATORS; sizes below override it
    hidden_size: int | None = None
    depth: int | None = None
    num_heads: int | None = None
    patch_size: int | None = None
    bf16: bool = False  # bf16 autocast on CUDA (parameters stay fp32)
    attn_fp32: bool = True


@dataclass(frozen=True)
class LossConfig:
    encoder: str | None = None  # a preset of drifting.models.resnet_mae.resnet_maes; None: raw samples only
    encoder_weights: str | None = None  # the file `drifting train-mae` exports, or "random" (required with an encoder)
    # the pixel configs' second encoder: ConvNeXt-V2-Base weights (timm, HF or Facebook file), or "random" (tests)
    convnext_weights: str | None = None
    subset: Literal["a,b", "a-c", "a-d"] = "a-d"
    temperatures: tuple[float, ...] = (0.02, 0.05, 0.2)
    normalize: Literal["xy", "y", "none"] = "xy"
    affinity_floor: float = 1e-6
    attraction: float = 1.0
    repulsion: float = 1.0
    impl: Literal["auto", "reference", "fused"] = "auto"
    # Steps on the raw samples' key alone before the encoders' keys join (0: from the start, as the authors). The
    # zero-initialised generator starts with every sample of a class at one point; at small scale the encoders' keys
    # (huge gradients for such near-constant images) kept it there, while the raw key separates the samples within a
    # few hundred steps (docs/results.md). Not in the paper; the step count is a guess to tune.
    encoder_start_step: int = 0


@dataclass(frozen=True)
class GuidanceConfig:
    power: float = 3.0  # p(alpha) ~ alpha^-power on [alpha_min, alpha_max]
    alpha_min: float = 1.0
    alpha_max: float = 4.0
    no_guidance_frac: float = 0.0


@dataclass(frozen=True)
class TrainConfig:
    steps: int = 300
    classes: int = 4  # N_c per step (global)
    gen_per_class: int = 16  # C_g
    pos_per_class: int = 16  # C_p
    uncond_per_class: int = 4  # C_n
    class_chunk: int | None = None  # classes per gradient-accumulation chunk on each process (None: all at once)
    # With class chunks: run the encoders once in the statistics pass, holding every chunk's features between its two
    # passes (memory for the features of all local classes at once), instead of once per pass, and keep the real
    # samples' features for the loss calls (one encoder forward on them less per chunk). Same loss bit for bit.
    stats_keep_features: bool = False
    # With class chunks: the statistics math once per tap and pass, its keys' problems stacked, instead of once per key
    # (~4x fewer kernels; the same statistics to float rounding; slower on a CPU, 2% faster steps on an H200).
    stats_group_keys: bool = False
    # With class chunks: statistics calls of at least this many problems on the fused kernel (CUDA), smaller ones on
    # the reference math (compiled with stats_compiled); None: all on the reference math. Same statistics to float
    # rounding. On an H200 at the ablation size, 1 (all on the kernel) takes the 86 keys' statistics math of a
    # 4-class chunk from 193 ms compiled to 98 ms (ninth sitting); in the step it gained nothing alone (9.57 s), but
    # is part of the fastest step measured (5.54 s, with the options below; docs/benchmarks.md, eleventh sitting).
    stats_fused_min_problems: int | None = None
    # With class chunks: the statistics' reference math under torch.compile (dynamic shapes; a few compilations at
    # the start). Same statistics to float rounding (which on keys of nearly equal vectors is ~1e-2 in float32 on
    # either path: docs/benchmarks.md). On an H200 at the ablation size, 18% off the statistics pass (sixth sitting).
    stats_compiled: bool = False
    # With class chunks: the statistics calls of fewer problems than this per chunk (the mean, std and window keys:
    # 4-64 problems in a chunk of 4 classes) made once per pass over every chunk's problems, not once per chunk. The
    # same statistics to float rounding. On an H200 each of those calls took ~1 ms with 4-64 problems, one program
    # per problem on a few of the 132 SMs (docs/benchmarks.md, ninth sitting); 128 turns their 16 x 80 calls per
    # pass into 80 of 16x the problems. None: off.
    stats_stack_below: int | None = None
    # With stats_stack_below: the losses of those stacked calls too, computed in the statistics pass over every
    # chunk once the statistics are known (FeatureDriftLoss.stats(stacked_losses=True)); each chunk's loss call then
    # only carries their gradient back to the taps: 80 of the 86 keys leave the loss phase's 16 x 26 calls (which
    # spent ~1 ms each on their few problems), for one call per key or tap in the statistics pass. The same loss and
    # gradient to float rounding; memory for those keys' generated problems (+12 GiB at chunks of 4). With
    # stats_stack_below=128 and stats_fused_min_problems=1, an H200's ablation step went from 9.57 to 8.75 s
    # (tenth sitting). Off by default.
    stats_stacked_losses: bool = False
    # With class chunks: each chunk's loss call takes a tap's mean and std keys in one drifting-loss call, their
    # problems stacked, each at its own statistics (FeatureDriftLoss(..., group_keys=True)): 26 calls instead of 86
    # for a latent MAE-256, the same loss to float rounding. On an H200 at the ablation size, the loss phase 0.35 s
    # shorter (eighth sitting); off by default (the reference's one call per key).
    loss_group_keys: bool = False
    # With class chunks on CUDA: each chunk's keys and drifting losses (all of the loss call but the encoders)
    # replayed from one CUDA graph (FeatureDriftLoss(..., cuda_graph=True)), captured at the first chunk: the same
    # loss and gradient, the Python that launches ~900 kernels per chunk run once. Memory for the graph's copy of a
    # chunk's taps and of one call's temporaries. Off by default.
    loss_cuda_graph: bool = False
    # With class chunks on one CUDA process: the statistics pass's encoders and key math replayed from one CUDA graph
    # (FeatureDriftLoss.stats(..., cuda_graph=True)): the same statistics, the host's launches of some thousands of
    # kernels per step made once: 0.1-0.6 s per ablation step on an H200, the more the slower the host (fourteenth and
    # twentieth sittings of docs/benchmarks.md). Memory: the graph keeps its peak (every chunk's generated taps)
    # reserved: +30 GiB at the ablation size with chunks of 4, more than an 80-GiB H100 holds beside the step.
    stats_cuda_graph: bool = False
    lr: float = 1e-3  # the tiny default model; the paper's presets use 2e-4 or 4e-4
    warmup_steps: int = 20
    weight_decay: float = 0.01
    grad_clip: float = 2.0
    ema_decays: tuple[float, ...] = (0.999,)
    # decay_t = min(decay, (1 + t) / (10 + t)): without it, samples of a short run are mostly the zero-output
    # initialisation (0.999^1000 = 37% of it after 1,000 steps). False: the authors' constant decay from step 0.
    ema_warmup: bool = True
    queue_per_class: int = 128
    queue_uncond: int = 1000
    push_per_step: int = 64
    prefill: bool = True  # fill the queues before step 0 (the authors' start empty: positives repeat for ~2k steps)
    prefetch: int = 2  # steps of real samples read ahead in a background thread (0: inline)
    # "ddp": every process holds the whole generator. "fsdp": FSDP2 shards the generator, its EMA copies and the
    # optimiser state per transformer block (for generators that do not fit once per GPU, e.g. L/2 at large batch).
    strategy: Literal["ddp", "fsdp"] = "ddp"
    compile: bool = False  # torch.compile the generator
    compile_encoder: bool = False  # torch.compile the feature encoder's forward (FeatureDriftLoss.compile_encoders)
    seed: int = 0
    log_every: int = 50
    sample_every: int = 0  # 0: only at the end
    checkpoint_every: int = 0  # 0: only at the end
    keep_checkpoints: int = 2
    # Stop after this many minutes of training (checked at the log steps), ending as at the last step: checkpoint,
    # EMA export, grid. A resume continues towards `steps`. 0: no limit. Equal-time baselines use it.
    time_limit_min: float = 0.0


@dataclass(frozen=True)
class GenConfig:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    guidance: GuidanceConfig = field(default_factory=GuidanceConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def __post_init__(self) -> None:
        t = self.train
        if self.data.dataset not in ("synthetic", "latents", "image-folder") and self.data.dataset not in DATASETS:
            raise ValueError(f"data.dataset: expected 'synthetic', 'latents', 'image-folder' or one of "
                             f"{sorted(DATASETS)}, got {self.data.dataset!r}")
        if self.data.dataset == "latents" and self.data.path is None:
            raise ValueError("data.path: the latent cache folder is required with data.dataset=latents "
                             "(build it with `python -m drifting.data.latents IMAGES VAE OUT`)")
        if self.data.dataset == "image-folder" and self.data.path is None:
            raise ValueError("data.path: the image folder (root/<class>/<images>) is required with "
                             "data.dataset=image-folder")
        if self.data.augment not in ("rrc", "center"):
            raise ValueError(f"data.augment: expected 'rrc' or 'center', got {self.data.augment!r}")
        if self.data.vae is not None and self.data.dataset != "latents":
            raise ValueError(f"data.vae: decodes latent samples; data.dataset is {self.data.dataset!r}, not 'latents'")
        if self.model.generator not in GENERATORS:
            raise ValueError(f"model.generator: expected one of {sorted(GENERATORS)}, got {self.model.generator!r}")
        if self.loss.encoder is not None and self.loss.encoder not in resnet_maes:
            raise ValueError(f"loss.encoder: expected None or one of {sorted(resnet_maes)}, got {self.loss.encoder!r}")
        for name in ("steps", "classes", "gen_per_class", "pos_per_class", "push_per_step", "log_every"):
            if getattr(t, name) < 1:
                raise ValueError(f"train.{name}: expected an integer >= 1, got {getattr(t, name)}")
        if self.loss.encoder_start_step < 0:
            raise ValueError(f"loss.encoder_start_step: expected an integer >= 0, got {self.loss.encoder_start_step}")
        if self.loss.encoder_start_step and self.loss.encoder is None and self.loss.convnext_weights is None:
            raise ValueError("loss.encoder_start_step: delays the encoders' keys, but no encoder is configured "
                             "(loss.encoder / loss.convnext_weights)")
        if t.time_limit_min < 0:
            raise ValueError(f"train.time_limit_min: expected minutes >= 0 (0: no limit), got {t.time_limit_min}")
        if t.prefetch < 0:
            raise ValueError(f"train.prefetch: expected an integer >= 0, got {t.prefetch}")
        if t.uncond_per_class < 0:
            raise ValueError(f"train.uncond_per_class: expected >= 0, got {t.uncond_per_class}")
        if t.class_chunk is not None and t.class_chunk < 1:
            raise ValueError(f"train.class_chunk: expected None or >= 1, got {t.class_chunk}")
        if t.stats_fused_min_problems is not None and t.stats_fused_min_problems < 1:
            raise ValueError(f"train.stats_fused_min_problems: expected None or >= 1, got {t.stats_fused_min_problems}")
        if t.stats_stack_below is not None and t.stats_stack_below < 1:
            raise ValueError(f"train.stats_stack_below: expected None or >= 1, got {t.stats_stack_below}")
        if t.stats_stacked_losses and t.stats_stack_below is None:
            raise ValueError("train.stats_stacked_losses: needs train.stats_stack_below (it computes the losses of "
                             "those stacked calls)")
        if t.loss_cuda_graph and t.class_chunk is None:
            raise ValueError("train.loss_cuda_graph: needs train.class_chunk (the graph is replayed over the chunks)")
        if t.stats_cuda_graph and t.class_chunk is None:
            raise ValueError("train.stats_cuda_graph: needs train.class_chunk (there are no statistics without chunks)")
        if t.strategy not in ("ddp", "fsdp"):
            raise ValueError(f"train.strategy: expected 'ddp' or 'fsdp', got {t.strategy!r}")
        if not all(0 <= d < 1 for d in t.ema_decays):
            raise ValueError(f"train.ema_decays: expected values in [0, 1), got {t.ema_decays}")


# ---------------------------------------------------------------------------------------------------------------------
# Setup
# ---------------------------------------------------------------------------------------------------------------------


class TrainingData(NamedTuple):
    """What the loop needs of a data set: draw samples by index, their labels, and how the queue stores them."""

    sample: Callable[[Tensor, torch.Generator], Tensor]  # (indices [k], generator) -> [k, *shape] in `storage`
    labels: Tensor  # int64 [N]
    num_classes: int
    shape: tuple[int, ...]
    storage: torch.dtype  # uint8 images (converted to [-1, 1] when drawn from the queue) or float32 latents

    def to_model(self, x: Tensor) -> Tensor:
        return to_float(x) if self.storage == torch.uint8 else x.float()


def load_training_data(cfg: DataConfig) -> TrainingData:
    """Images (uint8 [N, C, H, W], held in memory, or decoded on demand from a folder) or a latent cache (float,
    memory-mapped shards)."""
    if cfg.dataset == "latents":
        latents, labels = load_latents(cfg.path)
        return TrainingData(latents.sample, labels, latents.num_classes, tuple(latents.shape), torch.float32)
    if cfg.dataset == "image-folder":
        stream = ImageFolderStream(cfg.path, cfg.image_size, augment=cfg.augment, workers=cfg.workers)
        return TrainingData(stream.sample, stream.labels, stream.num_classes, stream.shape, torch.uint8)
    if cfg.dataset == "synthetic":
        images, labels = synthetic_images(cfg.synthetic_classes, cfg.synthetic_per_class, cfg.synthetic_size)
    else:
        images, labels = load_dataset(cfg.dataset, "train", cfg.path)
    return TrainingData(lambda idx, g: images[idx], labels, int(labels.max()) + 1, tuple(images.shape[1:]),
                        torch.uint8)


def build_model(cfg: GenConfig, num_classes: int, shape: tuple[int, ...]) -> torch.nn.Module:
    """The generator preset, resized to the data (channels, image size, classes) and the config's overrides."""
    m = cfg.model
    overrides = {k: getattr(m, k) for k in ("hidden_size", "depth", "num_heads", "patch_size")
                 if getattr(m, k) is not None}
    return build_generator(m.generator, in_channels=shape[0], image_size=shape[1], num_classes=num_classes,
                           bf16=m.bf16, attn_fp32=m.attn_fp32, **overrides)


def build_loss(cfg: LossConfig, shape: tuple[int, ...], device: torch.device, *,
               compile_encoder: bool = False) -> FeatureDriftLoss:
    """FeatureDriftLoss over the encoder's keys, or over the raw samples (encoder None); compile_encoder:
    torch.compile the encoder's taps (`FeatureDriftLoss.compile_encoders`)."""
    encoder = None
    if cfg.encoder is not None:
        if cfg.encoder_weights is None:
            raise ValueError("loss.encoder_weights: give the trained encoder's file (`drifting train-mae` writes "
                             "encoder.pt), or 'random' for a randomly initialised encoder")
        state = None
        if cfg.encoder_weights != "random":
            if not Path(cfg.encoder_weights).exists():
                raise FileNotFoundError(f"loss.encoder_weights: no file at {cfg.encoder_weights}")
            state = torch.load(cfg.encoder_weights, map_location="cpu", weights_only=True)
        # `drifting train-mae` resizes the preset to its data and records how in the export's meta; a random encoder
        # takes the preset's widths sized to this data
        kwargs = (state or {}).get("meta", {}).get("encoder_kwargs") or {"in_channels": shape[0],
                                                                          "image_size": shape[1]}
        encoder = resnet_maes[cfg.encoder](**kwargs)
        if (encoder.cfg.in_channels, encoder.cfg.image_size) != (shape[0], shape[1]):
            raise ValueError(f"loss.encoder_weights: the encoder takes {encoder.cfg.in_channels}x"
                             f"{encoder.cfg.image_size} inputs, the data is {shape[0]}x{shape[1]}")
        if state is not None:
            missing, _ = encoder.load_state_dict(state.get("model", state), strict=False)
            if missing:
                raise ValueError(f"loss.encoder_weights: the file does not match {cfg.encoder} "
                                 f"(missing {missing[:3]}...)")
        encoder = encoder.to(device)
    encoders = [encoder] if encoder is not None else []
    if cfg.convnext_weights is not None:
        from drifting.models.adapters import ConvNeXtV2Features, adapter_configs

        if shape[0] != 3:
            raise ValueError(f"loss.convnext_weights: ConvNeXt-V2 takes RGB pixels, the data has {shape[0]} channels")
        convnext = (ConvNeXtV2Features(adapter_configs["convnextv2_base"]) if cfg.convnext_weights == "random"
                    else ConvNeXtV2Features.from_file(cfg.convnext_weights, adapter_configs["convnextv2_base"]))
        encoders.append(convnext.to(device))
    features = FeatureConfig(subset=cfg.subset, use_norm_x=encoder is not None)
    loss = FeatureDriftLoss(encoders or None, features, temperatures=cfg.temperatures, normalize=cfg.normalize,
                            affinity_floor=cfg.affinity_floor, attraction=cfg.attraction, repulsion=cfg.repulsion,
                            impl=cfg.impl, check_finite=False)
    if compile_encoder:
        loss.compile_encoders()
    return loss


def step_generator(seed: int, step: int, purpose: int, device: torch.device | str = "cpu") -> torch.Generator:
    """The generator of one kind of draw at one step: a pure function of (seed, step, purpose) on `device` (CPU
    unless told). A CUDA generator gives the same numbers on GPUs with the same number of multiprocessors (PyTorch's
    random kernels size their grid by it): every GPU of one kind, e.g. H100 SXM and H200 (132), not an A100 (108)."""
    return torch.Generator(device=device).manual_seed((seed * 1_000_003 + step) * 8 + purpose)


# Purposes of step_generator: 0 the real samples pushed, 1 the step's classes, guidance and queue draws, 2 the noise
# and style indices of the generated samples (on the model's device), 6 and 7 the queue's prefill (at step 0).
NOISE_PURPOSE = 2


# ---------------------------------------------------------------------------------------------------------------------
# The loop
# ---------------------------------------------------------------------------------------------------------------------


def train(cfg: GenConfig, run_dir: str | Path, *, resume: bool = True, progress: bool = True) -> dict:
    """Train a generator; checkpoints, metrics, samples and the EMA export go to run_dir. Returns final metrics."""
    device = dist.init_distributed()
    rank, world = dist.rank(), dist.world_size()
    t = cfg.train
    for name in ("loss_cuda_graph", "stats_cuda_graph"):
        if getattr(t, name) and device.type != "cuda":
            raise ValueError(f"train.{name}: needs a CUDA device, got {device}")
    if t.stats_cuda_graph and world > 1:
        raise ValueError(f"train.stats_cuda_graph: one process only (the statistics' collectives are not captured), "
                         f"got {world}")
    run_dir = Path(run_dir)
    data = load_training_data(cfg.data)
    num_classes, shape, labels = data.num_classes, data.shape, data.labels
    if t.classes > num_classes:
        raise ValueError(f"train.classes: {t.classes} classes per step, but the data has only {num_classes}")
    if t.classes % world:
        raise ValueError(f"train.classes: {t.classes} classes per step do not divide over {world} processes")
    local_classes = t.classes // world
    chunk = t.class_chunk or local_classes
    if local_classes % chunk:
        raise ValueError(f"train.class_chunk: {chunk} does not divide the {local_classes} classes of a process")

    torch.manual_seed(t.seed)
    model = build_model(cfg, num_classes, shape).to(device)
    emas = {d: ema_copy(model) for d in t.ema_decays}
    # Wrap before the optimiser exists: FSDP2 replaces the parameters by their shards (DTensors) in place, and the
    # EMA copies are sharded alike so that each rank updates its own shard.
    strategy = t.strategy if world > 1 else "none"
    train_model = wrap_model(model, strategy=strategy, device=device)
    if strategy == "fsdp":
        emas = {d: wrap_model(e, strategy="fsdp", device=device) for d, e in emas.items()}
    loss_fn = build_loss(cfg.loss, shape, device, compile_encoder=t.compile_encoder)
    # the raw key alone, for the steps before loss.encoder_start_step
    raw_loss_fn = (build_loss(replace(cfg.loss, encoder=None, convnext_weights=None), shape, device)
                   if cfg.loss.encoder_start_step else loss_fn)
    opt = torch.optim.AdamW(model.parameters(), lr=t.lr, betas=(0.9, 0.95), weight_decay=t.weight_decay)
    queue = SampleQueue(num_classes, shape, per_class=t.queue_per_class, unconditional=t.queue_uncond,
                        dtype=data.storage, device=device)
    start = 0
    ckpt_dir = run_dir / "checkpoints"
    if resume and latest_checkpoint(ckpt_dir) is not None:
        state = load_checkpoint(ckpt_dir, map_location=device)
        load_full_state_dict(model, state["model"])  # collectives under FSDP2: every rank loads, keeps its shard
        for d, ema in emas.items():
            load_full_state_dict(ema, state["ema"][str(d)])
        load_full_optimizer_state_dict(model, opt, state["optimizer"])
        queue.load_state_dict(state["queue"])
        start = state["step"]
        dist.print0(f"resumed from step {start} ({latest_checkpoint(ckpt_dir)})")
    elif t.prefill:  # a random permutation of the data, in pieces, until every class queue is full
        order = torch.randperm(len(labels), generator=step_generator(t.seed, 0, 7))
        pieces = ((data.sample(i, step_generator(t.seed, 0, 6)), labels[i]) for i in order.split(4096))
        queue.prefill(pieces, max_samples=len(labels))
    if dist.is_main():
        save_config(cfg, run_dir / "config.yaml")
    if t.compile:
        train_model = torch.compile(train_model)
    # Latent runs draw their grids through the VAE decoder (loaded now, so a wrong path fails before training).
    decode = None
    if cfg.data.vae is not None and dist.is_main():
        from drifting.data.latents import LatentDecoder

        decode = LatentDecoder.for_cache(cfg.data.path, cfg.data.vae, device=device)
    logger = RunLogger(run_dir, enabled=dist.is_main())
    meter = Throughput()
    autocast = torch.autocast("cuda", torch.bfloat16, enabled=cfg.model.bf16 and device.type == "cuda")
    reduce = all_reduce_sum() if world > 1 else None
    last: dict = {}
    limit = dist.TimeLimit(t.time_limit_min, every=t.log_every)
    step_done = start

    def real_samples(step: int) -> tuple[Tensor, Tensor]:
        """The real samples step `step` pushes into the queues: a pure function of (seed, step)."""
        g_push = step_generator(t.seed, step, 0)
        idx = torch.randint(len(labels), (t.push_per_step,), generator=g_push)
        return data.sample(idx, g_push), labels[idx]

    # The next steps' real samples are decoded / read in a background thread while this step computes.
    pushes = prefetch(real_samples, range(start, t.steps), depth=t.prefetch)
    for step in tqdm(range(start, t.steps), desc="train", disable=not (progress and dist.is_main()),
                     initial=start, total=t.steps):
        t0 = time.perf_counter()
        for group in opt.param_groups:
            group["lr"] = lr_at(step, peak=t.lr, warmup_steps=t.warmup_steps)
        # 1. Push real samples; choose classes and guidance; draw queue samples and noise for the global batch.
        x_push, y_push = next(pushes)
        # Labels stay on the CPU, where the queue keeps its bookkeeping: no device-to-host copy, no synchronisation.
        queue.push(x_push.to(device, non_blocking=True), y_push)
        g_step = step_generator(t.seed, step, 1)
        classes = torch.randperm(num_classes, generator=g_step)[: t.classes]
        alpha = sample_alpha(t.classes, power=cfg.guidance.power, alpha_min=cfg.guidance.alpha_min,
                             alpha_max=cfg.guidance.alpha_max, no_guidance_frac=cfg.guidance.no_guidance_frac,
                             generator=g_step)
        w = guidance_weight(alpha, t.gen_per_class, t.uncond_per_class)
        pos = queue.sample_positive(classes, t.pos_per_class, g_step)
        neg = queue.sample_unconditional(t.classes, t.uncond_per_class, g_step) if t.uncond_per_class else None
        # The step's noise, drawn where the model runs from a generator of its own: on the CPU its 16.8M normals
        # (ablation size) take ~0.1 s of one core per step, and every process draws the whole batch's noise to take
        # its share (the same update whatever the number of processes), so a CPU draw would not shrink with GPUs.
        # (Since 2026-11-28: a run resumed from an older checkpoint continues with other noise; a job must not mix
        # GPUs of different multiprocessor counts, see step_generator.)
        noise, style = draw_inputs(model, t.classes * t.gen_per_class, device=device,
                                   generator=step_generator(t.seed, step, NOISE_PURPOSE, device))
        # One asynchronous copy each of the step's labels, guidance scales and weights (a blocking copy per chunk
        # would make the host wait for the GPU's queue to drain, three times per chunk and pass).
        classes_d, alpha_d, w_d = (x.to(device, non_blocking=True) for x in (classes, alpha, w))

        # 2. This process's classes, in chunks: (class slice, its generator inputs, its real samples)
        def chunk_inputs(k: int):
            c = slice(rank * local_classes + k * chunk, rank * local_classes + (k + 1) * chunk)
            s = slice(c.start * t.gen_per_class, c.stop * t.gen_per_class)
            cls = classes_d[c].repeat_interleave(t.gen_per_class)
            a = alpha_d[c].repeat_interleave(t.gen_per_class)
            real_pos = data.to_model(pos[c].flatten(0, 1))
            real_neg = data.to_model(neg[c].flatten(0, 1)) if neg is not None else None
            return (noise[s], cls, a, None if style is None else style[s]), real_pos, real_neg, w_d[c]

        def generate(inputs):
            with autocast:
                return train_model(*inputs).float()

        n_chunks = local_classes // chunk
        step_loss = loss_fn if step >= cfg.loss.encoder_start_step else raw_loss_fn
        stats = None
        if n_chunks > 1:  # global statistics first, over every chunk of every process
            with torch.no_grad():
                batches = []
                for k in range(n_chunks):
                    inputs, p, n, wk = chunk_inputs(k)
                    batches.append(ClassBatch(generate(inputs), p, n, wk))
                with autocast:
                    stats = step_loss.stats(batches, all_reduce=reduce, keep_sources=t.stats_keep_features,
                                            group_keys=t.stats_group_keys,
                                            fused_min_problems=t.stats_fused_min_problems,
                                            compiled=t.stats_compiled, stack_below=t.stats_stack_below,
                                            stacked_losses=t.stats_stacked_losses, cuda_graph=t.stats_cuda_graph,
                                            total_classes=t.classes)  # known: no host sync for the count
        opt.zero_grad(set_to_none=True)
        total, info = None, {}
        for k in range(n_chunks):
            inputs, p, n, wk = chunk_inputs(k)
            with set_gradient_sync(train_model, k == n_chunks - 1):  # reduce gradients once, after the last chunk
                x = generate(inputs)
                # The encoders run under the same autocast as the generator (the authors' MAE runs in bf16, and
                # FeatureDriftLoss gives its taps in bf16; the ConvNeXt adapter keeps fp32 itself); the drifting math
                # inside the loss is fp32 whatever the keys.
                with autocast:
                    loss, info = step_loss(x, p, n, wk, stats=stats, all_reduce=reduce if stats is None else None,
                                           total_classes=t.classes if stats is None else None,  # no host sync
                                           chunk=k,  # with stats_keep_features: the real taps of the stats pass
                                           group_keys=t.loss_group_keys and stats is not None,
                                           cuda_graph=t.loss_cuda_graph and stats is not None)
                (loss * world).backward()  # DDP averages gradients over processes; the loss is a share of the sum
            total = loss.detach() if total is None else total + loss.detach()  # read only when logged
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip)
        if hasattr(grad_norm, "full_tensor"):  # FSDP2: a DTensor of the global norm
            grad_norm = grad_norm.full_tensor()
        opt.step()
        warm = (1 + step) / (10 + step) if t.ema_warmup else 1.0
        ema_update(emas, model, {d: min(d, warm) for d in t.ema_decays})
        meter.update(t.classes * t.gen_per_class)
        step_done = step + 1
        stop = limit.reached(step_done)  # the time budget is spent: end here as at the last step
        final = stop or step_done == t.steps

        # 3. Log, sample, checkpoint.
        if step_done % t.log_every == 0 or final:
            # Each process's loss is its share of the global sum: summed over processes, it is the step's loss.
            last = {"loss": float(dist.all_reduce_sum_tensor(total)), "grad_norm": float(grad_norm),
                    "lr": opt.param_groups[0]["lr"], "samples_per_s": meter.rate(),
                    "step_ms": 1e3 * (time.perf_counter() - t0)}
            for key, v in info.items():  # scale and drift RMS per temperature show progress; the loss is ~constant
                last[f"scale/{key}"] = float(v["scale"])
                for tau, ms in zip(cfg.loss.temperatures, v["drift_ms"].tolist()):
                    last[f"drift_rms_{tau}/{key}"] = math.sqrt(ms)
            logger.log(step_done, last)
        if (t.sample_every and step_done % t.sample_every == 0) or final:
            if data.storage == torch.uint8 or cfg.data.vae is not None:  # latents are drawn through the VAE
                sampler = _plain_on_rank0(emas[max(t.ema_decays)] if t.ema_decays else model, cfg, num_classes,
                                          shape, device)
                if sampler is not None:
                    save_grid(sampler, num_classes, run_dir / f"samples_{step_done:06d}.png", seed=t.seed,
                              decode=decode)
        if (t.checkpoint_every and step_done % t.checkpoint_every == 0) or final:
            # Full (unsharded) states on CPU; collectives under FSDP2, so every rank gathers and rank 0 writes.
            state = {"model": full_state_dict(model), "ema": {str(d): full_state_dict(e) for d, e in emas.items()},
                     "optimizer": full_optimizer_state_dict(model, opt), "queue": queue.state_dict(),
                     "step": step_done, "config": config_to_dict(cfg)}
            if dist.is_main():
                save_checkpoint(ckpt_dir / f"ckpt-{step_done:09d}.pt", state, keep_last=t.keep_checkpoints)
            dist.barrier()
        if stop:
            dist.print0(limit.stopped(step_done))
            break
    pushes.close()
    if t.ema_decays:
        ema_state = full_state_dict(emas[max(t.ema_decays)])
        if dist.is_main():
            export_weights(run_dir / "ema.pt", ema_state, config_to_dict(cfg),
                           meta={"step": step_done, "ema_decay": max(t.ema_decays), "num_classes": num_classes,
                                 "shape": list(shape)})
    logger.close()
    return last


def _plain_on_rank0(model: torch.nn.Module, cfg: GenConfig, num_classes: int, shape: tuple[int, ...],
                    device: torch.device) -> torch.nn.Module | None:
    """`model` as one plain module on rank 0 (None elsewhere), for drawing sample grids.

    A plain or DDP-replicated module is returned as it is; an FSDP2-sharded one is gathered (a collective: every
    rank calls this) into a fresh unsharded copy, since a sharded forward would need every rank to take part.
    """
    if not is_sharded(model):
        return model if dist.is_main() else None
    state = full_state_dict(model)
    if not dist.is_main():
        return None
    plain = build_model(cfg, num_classes, shape).to(device)
    plain.load_state_dict(state)
    return plain


@torch.no_grad()
def save_grid(model: torch.nn.Module, num_classes: int, path: Path, *, seed: int, per_class: int = 8,
              alpha: float = 1.0, decode: Callable[[Tensor], Tensor] | None = None) -> None:
    """A grid of one-step samples: one row per class (at most 10 rows), fixed noise, as a PNG.

    decode: latents -> uint8 pixels (a `LatentDecoder`) for latent generators; images are drawn as they are.
    """
    from PIL import Image

    from drifting.data.datasets import to_uint8

    rows = min(num_classes, 10)
    labels = torch.arange(rows).repeat_interleave(per_class)
    device = next(model.parameters()).device
    noise, style = draw_inputs(model, len(labels), generator=torch.Generator().manual_seed(seed), device=device)
    model.eval()
    x = model(noise, labels.to(device), torch.full((len(labels),), alpha, device=device), style).float()
    img = (decode(x) if decode is not None else to_uint8(x.clamp(-1, 1))).cpu()  # uint8 [N, C, H, W]
    n, c, h, w = img.shape
    grid = img.reshape(rows, per_class, c, h, w).permute(0, 3, 1, 4, 2).reshape(rows * h, per_class * w, c)
    scale = max(1, 128 // h)
    image = Image.fromarray(grid.squeeze(-1).numpy() if c == 1 else grid.numpy())
    image.resize((image.width * scale, image.height * scale), Image.NEAREST).save(path)


def main(cfg: GenConfig, run_dir: str | Path, *, resume: bool = True, progress: bool = True) -> dict:
    try:
        return train(cfg, run_dir, resume=resume, progress=progress)
    finally:
        dist.cleanup()

