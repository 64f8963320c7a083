"""The sample queue (the authors' memory bank): recent real samples per class, and recent samples of any class.

Each training step pushes the latest real samples; positives for a class and unconditional negatives are then drawn
from the queues instead of from the loader, so a step can use C_p positives of each of its N_c classes without a
class-balanced loader (official-code-notes.md section 4). The queues hold raw samples (images or latents), never
features: features are recomputed every step by the current encoder.

Layout (K classes, P = per_class, U = unconditional, sample shape S):

    classes       [K, P, *S]   one ring buffer per class
    uncond        [U, *S]      one ring buffer over all classes
    class_pos     [K]          next write slot of each class ring
    class_count   [K]          samples held per class (<= P)
    uncond_pos, uncond_count   the same for the unconditional ring (0-d)

Every pushed sample goes into its class ring and into the unconditional ring. While a ring is not yet full its
samples sit in slots [0, count): writes start at slot 0 and wrap only once the ring is full. The bookkeeping tensors
live on the CPU whatever `device` is, so no decision ever waits on an accelerator.

Differences from the authors' code, all deliberate:
- storage dtype is chosen (uint8 for pixels: 4x less memory than their float32; bf16 or fp32 for latents);
- draws take a torch.Generator, so they are reproducible (theirs use numpy's global RNG);
- an empty queue is an error rather than silently repeating slot 0;
- `state_dict` makes the queues part of a checkpoint (theirs are rebuilt on resume), and `prefill` fills them before
  step 0 (theirs start empty, so for ~2k steps a class's positives are copies of one or two images).
Under DDP each rank keeps its own queues and pushes its own share of the batch, as the authors' hosts do.
"""

from __future__ import annotations

from typing import Iterable, NamedTuple, Sequence

import torch
from torch import Tensor

__all__ = ["QueueCounts", "SampleQueue"]

# Samples per push inside `prefill`; bounds the memory of the gathered chunk.
_PREFILL_CHUNK = 4096


class QueueCounts(NamedTuple):
    classes: Tensor  # [K] int64, samples held per class
    unconditional: int  # samples held by the unconditional queue


def _rank_within_group(groups: Tensor, num_groups: int) -> tuple[Tensor, Tensor]:
    """For ints `groups` [B]: (rank [B], sizes [num_groups]), rank = how many earlier entries share the group."""
    order = torch.argsort(groups, stable=True)
    sizes = torch.bincount(groups, minlength=num_groups)
    starts = torch.cumsum(sizes, 0) - sizes
    rank = torch.empty_like(groups)
    rank[order] = torch.arange(len(groups)) - starts[groups[order]]
    return rank, sizes


def _draw_indices(held: Tensor, capacity: int, count: int, generator: torch.Generator | None) -> Tensor:
    """Slot indices [n, count] into rings of `capacity` slots holding held [n] (> 0) samples in slots [0, held).

    Row r draws without replacement when held[r] >= count (a random subset, in random order), with replacement
    otherwise. Both kinds of draw are always made, so the random stream advances by the same amount whatever the fill.
    """
    n, device = len(held), generator.device if generator is not None else torch.device("cpu")
    held = held.to(device)
    # Without replacement: sort random keys, with the empty slots' keys pushed past every real one.
    keys = torch.rand(n, capacity, generator=generator, device=device)
    keys.masked_fill_(torch.arange(capacity, device=device) >= held[:, None], 2.0)
    subset = keys.argsort(dim=1)[:, : min(count, capacity)]
    # With replacement: uniform over [0, held). float64 so that u * held never rounds up to held.
    u = torch.rand(n, count, generator=generator, device=device, dtype=torch.float64)
    repeated = torch.minimum((u * held[:, None]).long(), held[:, None] - 1)
    if count > capacity:  # no ring can hold `count` distinct samples
        return repeated.cpu()
    return torch.where((held >= count)[:, None], subset, repeated).cpu()


class SampleQueue:
    """Per-class ring buffers of `per_class` samples plus one unconditional ring of `unconditional` samples.

    num_classes: K; sample_shape: the shape S of one sample, e.g. (1, 28, 28) or (4, 32, 32);
    dtype/device: how the samples are stored (uint8 pixels, bf16/fp32 latents; host memory by default).
    Draws come back in the storage dtype on the storage device; convert them (e.g. `datasets.to_float`) yourself.
    """

    def __init__(
        self,
        num_classes: int,
        sample_shape: Sequence[int],
        *,
        per_class: int = 128,
        unconditional: int = 1000,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ):
        for name, value in (("num_classes", num_classes), ("per_class", per_class), ("unconditional", unconditional)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        sample_shape = tuple(sample_shape)
        if not all(isinstance(d, int) and not isinstance(d, bool) and d >= 1 for d in sample_shape):
            raise ValueError(f"sample_shape must be a sequence of positive ints, got {sample_shape!r}")
        if not isinstance(dtype, torch.dtype):
            raise ValueError(f"dtype must be a torch.dtype, got {dtype!r}")
        self.num_classes, self.sample_shape = num_classes, sample_shape
        self.per_class, self.unconditional = per_class, unconditional
        self.dtype, self.device = dtype, torch.device(device)
        self.classes = torch.zeros(num_classes, per_class, *sample_shape, dtype=dtype, device=self.device)
        self.uncond = torch.zeros(unconditional, *sample_shape, dtype=dtype, device=self.device)
        self.class_pos = torch.zeros(num_classes, dtype=torch.long)
        self.class_count = torch.zeros(num_classes, dtype=torch.long)
        self.uncond_pos = torch.zeros((), dtype=torch.long)
        self.uncond_count = torch.zeros((), dtype=torch.long)

    def __repr__(self) -> str:
        return (
            f"SampleQueue(num_classes={self.num_classes}, sample_shape={self.sample_shape}, "
            f"per_class={self.per_class}, unconditional={self.unconditional}, dtype={self.dtype}, "
            f"device={self.device}, held={int(self.class_count.sum())}+{int(self.uncond_count)})"
        )

    @property
    def nbytes(self) -> int:
        """Memory of the two sample buffers, in bytes."""
        return self.classes.nbytes + self.uncond.nbytes

    # -----------------------------------------------------------------------------------------------------------------
    # Writing
    # -----------------------------------------------------------------------------------------------------------------

    def push(self, x: Tensor, labels: Tensor) -> None:
        """Push samples x [B, *S] with labels [B] into their class rings and into the unconditional ring.

        Within one push, samples enter in batch order: when a push brings more samples of a class than the ring
        holds, only the last `per_class` of them remain (likewise the last `unconditional` overall).
        """
        labels = self._check_batch(x, labels)
        if len(labels) == 0:
            return
        x = x.to(device=self.device, dtype=self.dtype)
        # Class rings. Dropping the samples a later one of the same push would overwrite keeps the write indices
        # unique: index_put_ with repeated indices has no defined winner.
        rank, sizes = _rank_within_group(labels, self.num_classes)
        keep = rank >= (sizes[labels] - self.per_class)
        slot = (self.class_pos[labels] + rank) % self.per_class
        kept = keep.nonzero().squeeze(1)  # on the CPU: a boolean mask on the GPU would read its count back (a sync)
        self.classes[self._index(labels[kept]), self._index(slot[kept])] = x[self._index(kept)]
        self.class_pos.copy_((self.class_pos + sizes) % self.per_class)
        self.class_count.copy_(torch.clamp(self.class_count + sizes, max=self.per_class))
        # Unconditional ring: one group, the same rule.
        n = len(labels)
        first = max(0, n - self.unconditional)
        slot = (self.uncond_pos + torch.arange(first, n)) % self.unconditional
        self.uncond[self._index(slot)] = x[first:]
        self.uncond_pos.copy_((self.uncond_pos + n) % self.unconditional)
        self.uncond_count.copy_(torch.clamp(self.uncond_count + n, max=self.unconditional))

    def prefill(
        self,
        source: Tensor | Iterable[tuple[Tensor, Tensor]],
        labels: Tensor | None = None,
        *,
        generator: torch.Generator | None = None,
        max_samples: int | None = None,
    ) -> int:
        """Fill the queues before training; returns the number of samples pushed.

        source = a tensor x [N, *S] with `labels` [N] (a whole dataset in memory): pushes a random permutation of
            it, stopping as soon as every class ring holds min(per_class, samples of that class) and the
            unconditional ring min(unconditional, N). Reproducible with `generator`.
        source = an iterable of (x [B, *S], labels [B]) batches (a data loader): pushes whole batches until every
            class ring and the unconditional ring are full, the iterable ends, or `max_samples` were pushed. A class
            the loader never yields keeps its ring empty, so give `max_samples` for a loader that never ends.
        """
        if max_samples is not None and (isinstance(max_samples, bool) or not isinstance(max_samples, int)
                                        or max_samples < 0):
            raise ValueError(f"max_samples must be a non-negative int or None, got {max_samples!r}")
        if isinstance(source, Tensor):
            labels = self._check_batch(source, labels)
            n = len(labels)
            device = generator.device if generator is not None else torch.device("cpu")
            perm = torch.randperm(n, generator=generator, device=device).cpu()
            # The pushed prefix of the permutation must hold per_class samples of every class (all of a rarer one)
            # and fill the unconditional ring: it ends at the last sample that is among the first per_class of its
            # class in permutation order, or at `unconditional` samples if that is later.
            rank, _ = _rank_within_group(labels[perm], self.num_classes)
            used = torch.nonzero(rank < self.per_class)
            length = max(int(used[-1]) + 1 if len(used) else 0, min(n, self.unconditional))
            if max_samples is not None:
                length = min(length, max_samples)
            for start in range(0, length, _PREFILL_CHUNK):
                index = perm[start : min(start + _PREFILL_CHUNK, length)]
                self.push(source[index.to(source.device)], labels[index])
            return length
        if labels is not None:
            raise ValueError("prefill: labels go with a tensor source; an iterable source yields (x, labels) pairs")
        pushed, batches = 0, iter(source)
        # Check before pulling a batch, so a full queue never consumes one more from the loader.
        while not self._full() and (max_samples is None or pushed < max_samples):
            batch = next(batches, None)
            if batch is None:
                break
            if not (isinstance(batch, (tuple, list)) and len(batch) == 2):
                raise ValueError(f"prefill: the iterable must yield (x, labels) pairs, got {type(batch).__name__}")
            x, y = batch
            if max_samples is not None:
                x, y = x[: max_samples - pushed], y[: max_samples - pushed]
            self.push(x, y)
            pushed += len(y)
        return pushed

    def _full(self) -> bool:
        return bool((self.class_count == self.per_class).all()) and int(self.uncond_count) == self.unconditional

    def _check_batch(self, x: Tensor, labels: Tensor | None) -> Tensor:
        """Validate a batch; returns the labels as CPU int64 [B]."""
        if not isinstance(x, Tensor) or not isinstance(labels, Tensor):
            raise ValueError(f"x and labels must be tensors, got {type(x).__name__} and {type(labels).__name__}")
        if tuple(x.shape[1:]) != self.sample_shape:
            raise ValueError(f"x must have shape [B, {', '.join(map(str, self.sample_shape))}], got {tuple(x.shape)}")
        if labels.ndim != 1 or len(labels) != len(x) or labels.is_floating_point() or labels.is_complex():
            raise ValueError(f"labels must be an integer tensor [B] with B = {len(x)}, got {labels.dtype} "
                             f"{tuple(labels.shape)}")
        # Casting floats into an integer queue would silently truncate (e.g. [-1, 1] images to all zeros).
        if x.is_floating_point() and not (self.dtype.is_floating_point or self.dtype.is_complex):
            raise ValueError(f"the queue stores {self.dtype}; push integer samples (e.g. uint8 pixels), not {x.dtype}")
        labels = labels.long().cpu()
        if len(labels) and (int(labels.min()) < 0 or int(labels.max()) >= self.num_classes):
            raise ValueError(f"labels must lie in [0, {self.num_classes}), got min {int(labels.min())}, "
                             f"max {int(labels.max())}")
        return labels

    # -----------------------------------------------------------------------------------------------------------------
    # Reading
    # -----------------------------------------------------------------------------------------------------------------

    def counts(self) -> QueueCounts:
        """Samples held: per class (a copy, [K] int64) and in the unconditional queue."""
        return QueueCounts(self.class_count.clone(), int(self.uncond_count))

    def sample_positive(self, labels: Tensor, count: int, generator: torch.Generator | None = None) -> Tensor:
        """C_p = count samples of each class in labels [N_c] -> [N_c, count, *S].

        Without replacement from a class ring that holds >= count samples, with replacement from one that holds
        fewer. Classes may repeat in labels; each row is drawn independently.
        """
        labels = self._check_labels(labels)
        count = self._check_count(count)
        held = self.class_count[labels]
        if count > 0 and bool((held == 0).any()):
            empty = sorted(set(labels[held == 0].tolist()))
            raise ValueError(f"sample_positive: the queues of classes {empty} are empty; push (or prefill) first")
        if count == 0:
            return self.classes.new_empty(len(labels), 0, *self.sample_shape)
        slot = _draw_indices(held, self.per_class, count, generator)
        return self.classes[self._index(labels[:, None]), self._index(slot)]

    def sample_unconditional(self, n_rows: int, count: int, generator: torch.Generator | None = None) -> Tensor:
        """C_n = count samples of any class for each of n_rows rows (one per class of the step) -> [n_rows, count, *S].

        Rows are independent draws from the one unconditional ring, each without replacement when the ring holds
        >= count samples, with replacement otherwise.
        """
        if isinstance(n_rows, bool) or not isinstance(n_rows, int) or n_rows < 0:
            raise ValueError(f"n_rows must be a non-negative int, got {n_rows!r}")
        count = self._check_count(count)
        if count == 0 or n_rows == 0:
            return self.uncond.new_empty(n_rows, count, *self.sample_shape)
        if int(self.uncond_count) == 0:
            raise ValueError("sample_unconditional: the unconditional queue is empty; push (or prefill) first")
        held = self.uncond_count.expand(n_rows)
        slot = _draw_indices(held, self.unconditional, count, generator)
        return self.uncond[self._index(slot)]

    def _index(self, index: Tensor) -> Tensor:
        """A CPU index tensor on the queue's device, copied asynchronously: a blocking copy would make the host wait
        for everything queued on the GPU."""
        return index.to(self.device, non_blocking=True)

    def _check_labels(self, labels: Tensor) -> Tensor:
        if not isinstance(labels, Tensor) or labels.ndim != 1 or labels.is_floating_point() or labels.is_complex():
            raise ValueError(f"labels must be an integer tensor [N_c], got {labels!r}")
        labels = labels.long().cpu()
        if len(labels) and (int(labels.min()) < 0 or int(labels.max()) >= self.num_classes):
            raise ValueError(f"labels must lie in [0, {self.num_classes}), got {labels.tolist()}")
        return labels

    @staticmethod
    def _check_count(count: int) -> int:
        if isinstance(count, bool) or not isinstance(count, int) or count < 0:
            raise ValueError(f"count must be a non-negative int, got {count!r}")
        return count

    # -----------------------------------------------------------------------------------------------------------------
    # Checkpointing
    # -----------------------------------------------------------------------------------------------------------------

    def state_dict(self) -> dict:
        """Everything needed to resume exactly: the buffers, write positions and counts, and the layout.

        As with nn.Module.state_dict, the tensors are the live buffers, not copies: save them before the next push.
        Plain tensors, ints and strings only, so it loads with torch.load(weights_only=True).
        """
        return {
            "num_classes": self.num_classes,
            "sample_shape": list(self.sample_shape),
            "per_class": self.per_class,
            "unconditional": self.unconditional,
            "dtype": str(self.dtype).removeprefix("torch."),
            "classes": self.classes,
            "uncond": self.uncond,
            "class_pos": self.class_pos,
            "class_count": self.class_count,
            "uncond_pos": self.uncond_pos,
            "uncond_count": self.uncond_count,
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore a `state_dict`; the layout (classes, shape, sizes, dtype) must match this queue's."""
        expected = self.state_dict()
        missing = sorted(set(expected) - set(state))
        unknown = sorted(set(state) - set(expected))
        if missing or unknown:
            raise ValueError(f"queue state_dict: missing keys {missing}, unexpected keys {unknown}")
        for key in ("num_classes", "sample_shape", "per_class", "unconditional", "dtype"):
            if state[key] != expected[key]:
                raise ValueError(f"queue state_dict has {key}={state[key]!r}, this queue has {expected[key]!r}")
        for key in ("classes", "uncond", "class_pos", "class_count", "uncond_pos", "uncond_count"):
            if not isinstance(state[key], Tensor) or state[key].shape != expected[key].shape:
                raise ValueError(f"queue state_dict: '{key}' must be a tensor of shape {tuple(expected[key].shape)}")
            expected[key].copy_(state[key])
