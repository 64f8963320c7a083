"""Run directories, metrics as JSON lines (plus TensorBoard when installed), and a throughput meter.

    run_dir = make_run_dir("runs", "dit_b2")          # runs/dit_b2/000, then 001, ... (rank 0 only)
    logger = RunLogger(run_dir, enabled=is_main())
    meter = Throughput()
    for step in ...:
        ...
        meter.update(batch_size)
        if step % log_every == 0:
            logger.log(step, {"loss": loss, "lr": lr, "samples_per_s": meter.rate()}, echo=True)
    logger.close()

`metrics.jsonl` gets one JSON object per `log` call, {"step", "time", "elapsed", **metrics}, appended with a single
write so a crash loses at most the line being written (`read_metrics` skips such a torn last line). Non-finite
floats become null: strict JSON has no NaN, and readers such as jq would reject the whole file.
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Any, Callable, Mapping

import torch

__all__ = ["RunLogger", "Throughput", "format_metrics", "make_run_dir", "read_metrics"]


def make_run_dir(root: str | os.PathLike, name: str) -> Path:
    """Create and return `<root>/<name>/<NNN>`, numbered one past the highest existing number (000 first).

    Call it on rank 0 only and pass the path to the other ranks (e.g. `dist.broadcast_object_list`).
    """
    parent = Path(root) / name
    parent.mkdir(parents=True, exist_ok=True)
    taken = [int(p.name) for p in parent.iterdir() if p.is_dir() and p.name.isdigit()]
    n = max(taken, default=-1) + 1
    while True:
        run_dir = parent / f"{n:03d}"
        try:
            run_dir.mkdir()  # exist_ok=False: two runs started at once cannot share a directory
            return run_dir
        except FileExistsError:
            n += 1


class RunLogger:
    """Append metrics to `<run_dir>/metrics.jsonl` and, when available, to TensorBoard event files in `run_dir`.

    Args:
        run_dir: the run's directory (created if missing).
        use_tensorboard: also write TensorBoard scalars when `torch.utils.tensorboard` imports (silently skipped
            when the `tensorboard` package is absent).
        enabled: False makes every method a no-op; pass `is_main()` so only rank 0 writes.
    """

    def __init__(self, run_dir: str | os.PathLike, *, use_tensorboard: bool = True, enabled: bool = True):
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / "metrics.jsonl"
        self.enabled = enabled
        self._start = time.time()
        self._tb = None
        if not enabled:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if use_tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except Exception:  # noqa: BLE001 - the optional extra is absent, or broken (protobuf/numpy mismatch)
                SummaryWriter = None
            if SummaryWriter is not None:
                self._tb = SummaryWriter(log_dir=str(self.run_dir))

    @property
    def tensorboard(self) -> bool:
        """Whether TensorBoard event files are being written."""
        return self._tb is not None

    def log(self, step: int, metrics: Mapping[str, Any], *, echo: bool = False) -> dict[str, Any]:
        """Record `metrics` at `step`; returns the record written (or {} when disabled).

        Values may be Python numbers, strings, bools, one-element tensors or numpy scalars. Tensors are read with
        `.item()`, a CPU-GPU sync point: log every N steps, not every step.
        """
        if not self.enabled:
            return {}
        now = time.time()
        record: dict[str, Any] = {"step": int(step), "time": round(now, 3), "elapsed": round(now - self._start, 3)}
        for key, value in metrics.items():
            if key in record:
                raise ValueError(f"metric name {key!r} is reserved")
            record[key] = _plain(key, value)
        line = json.dumps(record, allow_nan=False) + "\n"
        # O_APPEND and one write() per line: concurrent writers and crashes cannot interleave or tear earlier lines.
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            data = line.encode()
            while data:
                data = data[os.write(fd, data):]
        finally:
            os.close(fd)
        if self._tb is not None:
            for key, value in record.items():
                if key not in ("step", "time", "elapsed") and isinstance(value, (int, float)) \
                        and not isinstance(value, bool):
                    self._tb.add_scalar(key, value, global_step=step)
        if echo:
            print(format_metrics(record), flush=True)
        return record

    def close(self) -> None:
        """Flush and close TensorBoard (the JSON lines are already on disk)."""
        if self._tb is not None:
            self._tb.close()
            self._tb = None

    def __enter__(self) -> RunLogger:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def format_metrics(record: Mapping[str, Any]) -> str:
    """One readable line: `step 100 | loss 0.1234 | lr 0.0002 | ...` (time fields left out)."""
    parts = [f"step {record['step']}"] if "step" in record else []
    for key, value in record.items():
        if key in ("step", "time", "elapsed"):
            continue
        parts.append(f"{key} {value:.4g}" if isinstance(value, float) else f"{key} {value}")
    return " | ".join(parts)


def read_metrics(path: str | os.PathLike) -> list[dict[str, Any]]:
    """The records of a `metrics.jsonl` (or of a run directory's), skipping a torn last line left by a crash."""
    path = Path(path)
    if path.is_dir():
        path = path / "metrics.jsonl"
    lines = path.read_text(encoding="utf-8").splitlines()
    records = []
    for i, line in enumerate(lines):
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            if i == len(lines) - 1:
                break  # the write in progress when the process died
            raise ValueError(f"{path}:{i + 1}: not a JSON line: {line[:80]!r}") from None
    return records


class Throughput:
    """Samples per second between successive `rate()` calls, exponentially smoothed across calls.

    Call `update(n)` after every step and `rate()` at log time: timing whole log windows (not single steps) is what
    makes the figure meaningful on a GPU, whose steps run asynchronously. The first window includes start-up and
    compilation; the smoothing lets later windows take over.

    Args:
        smoothing: weight of the previous smoothed rate in [0, 1); 0 reports the last window alone.
        clock: a seconds counter (time.perf_counter; tests pass a fake one).
    """

    def __init__(self, smoothing: float = 0.5, clock: Callable[[], float] = time.perf_counter):
        if not 0.0 <= smoothing < 1.0:
            raise ValueError(f"smoothing must be in [0, 1), got {smoothing}")
        self.smoothing = smoothing
        self.clock = clock
        self.total = 0  # samples since construction, e.g. for kimg
        self._window = 0
        self._since = clock()
        self._rate: float | None = None

    def update(self, n: int) -> None:
        """Count `n` more samples (the global batch, or this rank's share times the world size)."""
        self.total += n
        self._window += n

    def rate(self) -> float:
        """Smoothed samples/s, including the window since the previous call (0.0 before any time has passed)."""
        now = self.clock()
        dt = now - self._since
        if dt > 0:
            window_rate = self._window / dt
            if self._rate is None:
                self._rate = window_rate
            else:
                self._rate = self.smoothing * self._rate + (1.0 - self.smoothing) * window_rate
            self._window, self._since = 0, now
        return self._rate or 0.0


def _plain(key: str, value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise ValueError(f"metric {key!r}: expected a one-element tensor, got shape {tuple(value.shape)}")
        value = value.item()
    elif hasattr(value, "item") and callable(value.item):  # numpy scalars
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise TypeError(f"metric {key!r}: cannot log a {type(value).__name__}")
