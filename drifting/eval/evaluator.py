"""Evaluator classifiers: one small CNN per dataset, whose penultimate features define `FD-<evaluator>`.

The standard FID needs Inception weights that cannot be had everywhere, and on 28x28 digits it measures little. So
each small dataset gets its own classifier, trained here by a fixed recipe and seed, and the metrics of
`eval/metrics.py` live in its feature space: Frechet distance, precision/recall, the accuracy of generated samples
against their requested labels, and an Inception-Score analogue from its logits.

    images [N, C, H, W], uint8 or [-1, 1]                                          (N, C, H, W)
    stem: conv3x3 -> BN -> ReLU                                                     (N, w0, H, W)
    per stage: conv3x3 -> BN -> ReLU -> max-pool /2, then a residual block          (N, w_i, H / 2^i, W / 2^i)
        (the residual block is x + ReLU(BN(conv(ReLU(BN(conv(x)))))), as in ResNet-9)
    global average pool -> penultimate features                                    (N, w_last)
    Linear -> logits                                                                (N, num_classes)

Widths (32, 64, 128, 256) are 1.9M parameters (7.8 MB of fp32 weights), (16, 32, 64, 128) are 0.5M (2 MB): both
under the 10 MB a committed evaluator may weigh.

Training recipe (`RECIPES`, one frozen dataclass per dataset): SGD with Nesterov momentum, a triangular learning rate
(linear warm-up over the first 15% of steps, linear decay to 0), weight decay on conv and linear weights only, random
translations (and horizontal flips where the classes allow them), bf16 autocast on CUDA. Every random draw (init,
data order, augmentation) comes from CPU generators seeded by the recipe's seed, and cuDNN is asked for deterministic
algorithms, so a rerun on the same machine repeats the weights and other devices agree up to floating-point rounding.
No early stopping or model selection on the test split: the weights after the last epoch are the evaluator, and its
test accuracy is measured once, after training, in full fp32 precision (as every later evaluation runs).

The saved file is `export_weights`' layout: {"model": state dict, "config": the recipe, "meta": test accuracy,
feature width, image shape, class count, a digest of the weights, training time, versions}, plus a `.json` sidecar
with the same config and meta for reading without torch.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import platform
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm import tqdm

from drifting.data.datasets import DATASETS, load_dataset, to_float
from drifting.data.synthetic import synthetic_images
from drifting.eval.inception import ieee_fp32
from drifting.train.checkpoint import export_weights

__all__ = [
    "EVALUATOR_ENV", "EvaluatorRecipe", "RECIPES", "EvalNet", "EvaluatorFeatures", "train_evaluator",
    "load_split", "evaluator_dir", "default_evaluator_path", "resolve_evaluator", "weights_digest",
    "train_evaluator_main",
]

EVALUATOR_ENV = "DRIFTING_EVALUATORS"  # a folder holding <dataset>.pt, overriding <repo>/evaluators


# ---------------------------------------------------------------------------------------------------------------------
# Recipes
# ---------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class EvaluatorRecipe:
    """Everything that determines an evaluator: data, architecture and training."""

    dataset: str  # a name of drifting.data.datasets.DATASETS, or "synthetic" (tests)
    widths: tuple[int, ...] = (32, 64, 128, 256)  # stem width, then one width per stage (each stage halves H, W)
    epochs: int = 20
    batch_size: int = 512
    lr: float = 0.2  # peak of the triangular schedule
    warmup_frac: float = 0.15  # fraction of the steps spent rising linearly to `lr`
    momentum: float = 0.9  # Nesterov
    weight_decay: float = 5e-4  # conv and linear weights only (not BN or biases)
    crop_pad: int = 2  # random translations by up to this many pixels (pad, then crop back)
    pad_mode: str = "constant"  # "constant" pads with black (digits, clothes), "reflect" mirrors (photos)
    flip: bool = False  # random horizontal flips (not for digits: a mirrored 2 is no 2)
    seed: int = 0

    def __post_init__(self) -> None:
        if len(self.widths) < 2 or any(isinstance(w, bool) or not isinstance(w, int) or w < 1 for w in self.widths):
            raise ValueError(f"widths: expected a stem width and at least one stage width (positive ints), got "
                             f"{self.widths!r}")
        for name in ("epochs", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: expected an integer >= 1, got {getattr(self, name)!r}")
        if not (self.lr > 0 and 0 <= self.warmup_frac < 1 and self.crop_pad >= 0):
            raise ValueError(f"lr > 0, 0 <= warmup_frac < 1 and crop_pad >= 0 expected, got {self.lr}, "
                             f"{self.warmup_frac}, {self.crop_pad}")
        if self.pad_mode not in ("constant", "reflect"):
            raise ValueError(f"pad_mode: expected 'constant' or 'reflect', got {self.pad_mode!r}")

    @property
    def name(self) -> str:
        """The evaluator's name in metric keys: FD-<name>."""
        return f"cnn-{self.dataset}"


RECIPES: dict[str, EvaluatorRecipe] = {
    "mnist": EvaluatorRecipe("mnist", widths=(16, 32, 64, 128), epochs=8),
    # Small enough to train on a 2-core CPU in minutes (the committed weights were made so): an evaluator is a fixed
    # feature space that anyone can rebuild, not a state-of-the-art classifier.
    "fashion-mnist": EvaluatorRecipe("fashion-mnist", widths=(16, 32, 64, 128), epochs=10, flip=True),
    "cifar10": EvaluatorRecipe("cifar10", widths=(16, 32, 64, 128), epochs=24, crop_pad=4, pad_mode="reflect",
                               flip=True),
    # The 8x8 synthetic squares of drifting/data/synthetic.py (train: seed 0, test: seed 1), for tests only.
    "synthetic": EvaluatorRecipe("synthetic", widths=(8, 16, 16), epochs=2, batch_size=64, lr=0.05, crop_pad=0),
}

# The synthetic set as `drifting train` makes it by default (DataConfig: 4 classes, 256 per class, 8x8).
_SYNTHETIC = dict(num_classes=4, per_class=256, size=8, channels=3)


def load_split(dataset: str, split: str, path: str | os.PathLike | None = None) -> tuple[Tensor, Tensor]:
    """(uint8 images [N, C, H, W], int64 labels [N]) of a split; "synthetic" draws train with seed 0, test with 1."""
    if dataset == "synthetic":
        if split not in ("train", "test"):
            raise ValueError(f"split must be 'train' or 'test', got {split!r}")
        return synthetic_images(**_SYNTHETIC, seed=0 if split == "train" else 1)
    return load_dataset(dataset, split, path)


def _dataset_info(dataset: str) -> tuple[int, tuple[int, int, int]]:
    """(number of classes, image shape (C, H, W)) of a dataset known to the recipes."""
    if dataset == "synthetic":
        return _SYNTHETIC["num_classes"], (_SYNTHETIC["channels"], _SYNTHETIC["size"], _SYNTHETIC["size"])
    info = DATASETS[dataset]
    return len(info.classes), info.shape


# ---------------------------------------------------------------------------------------------------------------------
# The network
# ---------------------------------------------------------------------------------------------------------------------


def _conv_bn(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True))


class _Residual(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.body = nn.Sequential(_conv_bn(c, c), _conv_bn(c, c))

    def forward(self, x: Tensor) -> Tensor:
        return x + self.body(x)


class EvalNet(nn.Module):
    """float images [N, C, H, W] in [-1, 1] -> (penultimate features [N, widths[-1]], logits [N, num_classes])."""

    def __init__(self, in_channels: int, num_classes: int, widths: tuple[int, ...] = (32, 64, 128, 256)):
        super().__init__()
        self.stem = _conv_bn(in_channels, widths[0])
        self.stages = nn.Sequential(*[
            nn.Sequential(_conv_bn(w_in, w_out), nn.MaxPool2d(2), _Residual(w_out))
            for w_in, w_out in zip(widths[:-1], widths[1:])
        ])
        self.head = nn.Linear(widths[-1], num_classes)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        x = self.stages(self.stem(x))  # (N, w_last, H / 2^s, W / 2^s)
        features = x.mean(dim=(2, 3))  # (N, w_last)
        return features, self.head(features)  # (N, w_last), (N, K)


def weights_digest(state_dict: dict[str, Tensor]) -> str:
    """A 16-hex-digit digest of a state dict's names and values: tells two evaluators apart in reference files."""
    h = hashlib.sha256()
    for key in sorted(state_dict):
        t = state_dict[key].detach().cpu().contiguous().reshape(-1)  # 1-D: 0-d tensors cannot be viewed as bytes
        h.update(key.encode())
        h.update(str(t.dtype).encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()[:16]


# ---------------------------------------------------------------------------------------------------------------------
# Inference: features and logits of a trained evaluator
# ---------------------------------------------------------------------------------------------------------------------


class EvaluatorFeatures(nn.Module):
    """A trained evaluator, frozen: images -> (penultimate features [N, D], logits [N, K]), float32.

    Images are uint8 [N, C, H, W] in 0..255, or floats in [-1, 1] (the generators' range); anything else, or
    another shape than the evaluator was trained on, is a ValueError. Always in inference mode (BN uses its running
    statistics) and in full fp32 precision (TF32 off), so features do not depend on the caller's speed settings.
    """

    def __init__(self, net: EvalNet, recipe: EvaluatorRecipe, meta: dict):
        super().__init__()
        self.net = net.eval().requires_grad_(False)
        self.recipe = recipe
        self.meta = dict(meta)
        self.shape: tuple[int, int, int] = tuple(meta["shape"])
        self.num_classes: int = int(meta["num_classes"])
        self.feature_dim: int = recipe.widths[-1]
        self.digest: str = meta.get("digest") or weights_digest(net.state_dict())

    @property
    def name(self) -> str:
        return self.recipe.name

    @property
    def device(self) -> torch.device:
        return self.net.head.weight.device

    @classmethod
    def load(cls, file: str | os.PathLike, map_location="cpu") -> EvaluatorFeatures:
        """Rebuild the network from the recipe stored in `file` (written by `train_evaluator`) and load its weights."""
        file = Path(file)
        if not file.is_file():
            raise FileNotFoundError(f"evaluator weights not found: {file} (make them with `drifting train-evaluator`)")
        state = torch.load(file, map_location=map_location, weights_only=True)
        if not isinstance(state, dict) or not {"model", "config", "meta"} <= set(state):
            raise ValueError(f"{file} is not an evaluator file (expected keys model, config, meta; "
                             f"got {sorted(state) if isinstance(state, dict) else type(state).__name__})")
        config = dict(state["config"])
        config["widths"] = tuple(config["widths"])
        recipe = EvaluatorRecipe(**config)
        meta = state["meta"]
        net = EvalNet(meta["shape"][0], meta["num_classes"], recipe.widths)
        net.load_state_dict(state["model"], strict=True)
        return cls(net, recipe, meta)

    def _prepare(self, images: Tensor) -> Tensor:
        """uint8 or [-1, 1] images [N, C, H, W] -> float32 [-1, 1] on the evaluator's device."""
        if not isinstance(images, Tensor):
            raise ValueError(f"images: expected a torch.Tensor, got {type(images).__name__}")
        if images.ndim != 4 or tuple(images.shape[1:]) != self.shape:
            raise ValueError(f"images: the {self.name} evaluator takes [N, {', '.join(map(str, self.shape))}] "
                             f"(NCHW), got {tuple(images.shape)}")
        if images.dtype == torch.uint8:
            return to_float(images.to(self.device))
        if not images.is_floating_point():
            raise ValueError(f"images: expected uint8 pixels or floats in [-1, 1], got dtype {images.dtype}")
        x = images.to(self.device, torch.float32)
        if x.numel() and not (bool(torch.isfinite(x).all()) and x.min() >= -1 and x.max() <= 1):
            raise ValueError(f"images: float images must be finite and in [-1, 1], got range "
                             f"[{x.min().item():.4g}, {x.max().item():.4g}] (clamp generator outputs first)")
        return x

    @torch.no_grad()
    def forward(self, images: Tensor) -> tuple[Tensor, Tensor]:
        """images [N, C, H, W] -> (features [N, D], logits [N, K]), float32 on the evaluator's device."""
        self.net.eval()  # even after a stray .train(): BN must use running statistics
        with ieee_fp32():
            return self.net(self._prepare(images))

    @torch.no_grad()
    def extract(self, images: Tensor | np.ndarray, batch_size: int = 500) -> tuple[Tensor, Tensor]:
        """Features and logits of a large CPU array, `batch_size` images at a time: float32 CPU tensors."""
        if isinstance(images, np.ndarray):
            images = torch.from_numpy(images)
        feats, logits = [], []
        for i in range(0, len(images), batch_size):
            f, l = self(images[i : i + batch_size])
            feats.append(f.float().cpu())
            logits.append(l.float().cpu())
        if not feats:
            raise ValueError("images: expected at least one image")
        return torch.cat(feats), torch.cat(logits)


# ---------------------------------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------------------------------


def _augment(x: Tensor, recipe: EvaluatorRecipe, gen: torch.Generator) -> Tensor:
    """Random translation by up to crop_pad pixels, then a random horizontal flip: float [B, C, H, W] -> same."""
    b, _, h, w = x.shape
    if recipe.crop_pad:
        p = recipe.crop_pad
        if recipe.pad_mode == "constant":
            padded = F.pad(x, (p, p, p, p), value=-1.0)  # black, the background of digits and clothes
        else:
            padded = F.pad(x, (p, p, p, p), mode="reflect")
        # Drawn on the CPU generator, then moved: the same shifts whatever the device.
        dy = torch.randint(0, 2 * p + 1, (b,), generator=gen).to(x.device)
        dx = torch.randint(0, 2 * p + 1, (b,), generator=gen).to(x.device)
        rows = dy[:, None] + torch.arange(h, device=x.device)  # (B, H)
        cols = dx[:, None] + torch.arange(w, device=x.device)  # (B, W)
        # Advanced indices on dims 0, 2, 3 around a slice: the result is (B, H, W, C).
        x = padded[torch.arange(b, device=x.device)[:, None, None], :, rows[:, :, None], cols[:, None, :]]
        x = x.permute(0, 3, 1, 2)  # (B, C, H, W)
    if recipe.flip:
        flip = (torch.rand(b, generator=gen) < 0.5).to(x.device)
        x = torch.where(flip[:, None, None, None], x.flip(3), x)
    return x.contiguous()


def _lr_at(step: int, total: int, recipe: EvaluatorRecipe) -> float:
    """Triangular schedule: 0 -> lr linearly over warmup_frac of the steps, then linearly back to 0."""
    peak = max(1, round(recipe.warmup_frac * total))
    if step < peak:
        return recipe.lr * (step + 1) / peak
    return recipe.lr * max(0.0, (total - step) / max(1, total - peak))


@torch.no_grad()
def _accuracy(evaluator: EvaluatorFeatures, images: Tensor, labels: Tensor, batch_size: int = 1000) -> float:
    _, logits = evaluator.extract(images, batch_size)
    return float((logits.argmax(1) == labels).double().mean())


def train_evaluator(
    dataset: str,
    path: str | os.PathLike | None,
    out_file: str | os.PathLike,
    *,
    epochs: int | None = None,
    seed: int = 0,
    device: str | torch.device | None = None,
    progress: bool = True,
) -> dict:
    """Train the evaluator of `dataset` by its recipe and save it to `out_file`; returns the saved meta.

    Args:
        dataset: a key of `RECIPES` ("mnist", "fashion-mnist", "cifar10"; "synthetic" for tests).
        path: the dataset file or folder (None: the registry's default locations; ignored for "synthetic").
        out_file: where to write the weights (a `.json` sidecar with recipe and meta is written beside it).
        epochs: overrides the recipe's epochs (None keeps it; anything else is recorded in the saved recipe).
        seed: the seed of every random draw (init, data order, augmentation).
        device: None picks cuda when available, else cpu.
    Returns:
        meta: {"test_accuracy", "train_accuracy", "num_classes", "shape", "feature_dim", "digest", "seconds", ...}.
    """
    if dataset not in RECIPES:
        raise ValueError(f"no evaluator recipe for dataset {dataset!r}; known: {', '.join(RECIPES)}")
    recipe = dataclasses.replace(RECIPES[dataset], seed=seed, **({"epochs": epochs} if epochs is not None else {}))
    device = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
    num_classes, shape = _dataset_info(dataset)
    train_x, train_y = load_split(dataset, "train", path)
    test_x, test_y = load_split(dataset, "test", path)
    if tuple(train_x.shape[1:]) != shape or tuple(test_x.shape[1:]) != shape:
        raise ValueError(f"{dataset}: expected images of shape {shape}, got train {tuple(train_x.shape[1:])} and "
                         f"test {tuple(test_x.shape[1:])}")
    if min(shape[1:]) < 2 ** (len(recipe.widths) - 1):
        raise ValueError(f"{dataset}: {shape[1]}x{shape[2]} images are too small for {len(recipe.widths) - 1} "
                         f"halving stages")

    # Init on the CPU from the seed, then move: the same initial weights on any device.
    torch.manual_seed(recipe.seed)
    net = EvalNet(shape[0], num_classes, recipe.widths).to(device)
    decay = [p for n, p in net.named_parameters() if p.ndim > 1]  # conv and linear weights
    no_decay = [p for n, p in net.named_parameters() if p.ndim <= 1]  # BN scales/shifts, biases
    opt = torch.optim.SGD([{"params": decay, "weight_decay": recipe.weight_decay},
                           {"params": no_decay, "weight_decay": 0.0}],
                          lr=recipe.lr, momentum=recipe.momentum, nesterov=True)
    gen = torch.Generator().manual_seed(recipe.seed)
    images, labels = train_x.to(device), train_y.to(device)  # whole split on the device: uint8 is small
    n = len(images)
    batch = min(recipe.batch_size, n)
    steps_per_epoch = n // batch  # drop the ragged last batch: every step sees a full batch
    total = recipe.epochs * steps_per_epoch
    autocast = torch.autocast("cuda", torch.bfloat16, enabled=device.type == "cuda")
    # cuDNN may pick nondeterministic algorithms; ask for deterministic ones and restore the caller's settings.
    cudnn = torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    t0 = time.perf_counter()
    step = 0
    try:
        net.train()
        bar = tqdm(total=total, desc=f"train-evaluator {dataset}", disable=not progress)
        for _ in range(recipe.epochs):
            order = torch.randperm(n, generator=gen)
            for i in range(steps_per_epoch):
                idx = order[i * batch : (i + 1) * batch].to(device)
                x = _augment(to_float(images[idx]), recipe, gen)
                for group in opt.param_groups:
                    group["lr"] = _lr_at(step, total, recipe)
                with autocast:
                    _, logits = net(x)
                loss = F.cross_entropy(logits.float(), labels[idx])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                step += 1
                bar.update(1)
                if step % 50 == 0 or step == total:
                    bar.set_postfix(loss=f"{loss.item():.3f}")  # a CPU-GPU sync point, hence only every 50 steps
        bar.close()
    finally:
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = cudnn
    seconds = time.perf_counter() - t0

    net = net.cpu().eval()
    state = {k: v.detach().clone() for k, v in net.state_dict().items()}
    meta = {"dataset": dataset, "name": recipe.name, "num_classes": num_classes, "shape": list(shape),
            "feature_dim": recipe.widths[-1], "digest": weights_digest(state),
            "parameters": sum(p.numel() for p in net.parameters())}
    evaluator = EvaluatorFeatures(net, recipe, meta).to(device)
    meta["test_accuracy"] = _accuracy(evaluator, test_x, test_y)
    sub = torch.randperm(n, generator=torch.Generator().manual_seed(0))[:10_000]  # fixed subset: enough to see overfit
    meta["train_accuracy"] = _accuracy(evaluator, train_x[sub], train_y[sub])
    meta.update(seconds=round(seconds, 1), steps=total, device=torch.cuda.get_device_name(device)
                if device.type == "cuda" else platform.processor() or "cpu",
                torch=str(torch.__version__), python=sys.version.split()[0],
                command=f"drifting train-evaluator {dataset} --seed {seed}"
                        + (f" --epochs {epochs}" if epochs is not None else ""))
    config = {**dataclasses.asdict(recipe), "widths": list(recipe.widths)}
    export_weights(out_file, state, config, meta=meta)
    return meta


# ---------------------------------------------------------------------------------------------------------------------
# Where evaluators live
# ---------------------------------------------------------------------------------------------------------------------


def evaluator_dir() -> Path:
    """$DRIFTING_EVALUATORS, else <repo>/evaluators (where the committed weights are)."""
    env = os.environ.get(EVALUATOR_ENV)
    return Path(env) if env else Path(__file__).resolve().parents[2] / "evaluators"


def default_evaluator_path(dataset: str) -> Path:
    """<evaluator_dir()>/<dataset>.pt."""
    return evaluator_dir() / f"{dataset}.pt"


def resolve_evaluator(name_or_path: str | os.PathLike) -> Path:
    """An existing file as is; a dataset name -> its default evaluator file; FileNotFoundError saying how to make it."""
    path = Path(name_or_path)
    if path.is_file():
        return path
    name = str(name_or_path)
    if name in RECIPES:
        path = default_evaluator_path(name)
        if path.is_file():
            return path
        raise FileNotFoundError(f"no evaluator for {name!r} at {path}; train it with `drifting train-evaluator "
                                f"{name}` (or set {EVALUATOR_ENV} to the folder holding {name}.pt)")
    raise FileNotFoundError(f"evaluator not found: {name!r} is neither a file nor one of {', '.join(RECIPES)}")


def train_evaluator_main(
    dataset: str,
    out: str | None = None,
    *,
    data: str | None = None,
    epochs: int | None = None,
    seed: int = 0,
    device: str | None = None,
    progress: bool = True,
) -> dict:
    """`drifting train-evaluator`: train `dataset`'s evaluator to `out` (default <evaluator_dir()>/<dataset>.pt)."""
    out_file = Path(out) if out is not None else default_evaluator_path(dataset)
    meta = train_evaluator(dataset, data, out_file, epochs=epochs, seed=seed, device=device, progress=progress)
    size = out_file.stat().st_size / 2**20
    print(f"{meta['name']}: test accuracy {meta['test_accuracy']:.4f} (train {meta['train_accuracy']:.4f}), "
          f"{meta['parameters'] / 1e6:.2f}M parameters, {size:.1f} MB, {meta['seconds']:.0f} s on {meta['device']}")
    print(f"wrote {out_file} and {out_file.with_suffix('.json')}")
    return meta
