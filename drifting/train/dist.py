"""One code path for CPU, one GPU and N GPUs: `torchrun` sets the environment, plain `python` runs one process.

    device = init_distributed()        # reads RANK / WORLD_SIZE / LOCAL_RANK; no variables -> single process
    torch.manual_seed(rank_seed(cfg.seed))
    ...
    print0(f"step {step}")             # only rank 0 prints
    cleanup()

Without torchrun's variables no process group is created: `rank()` is 0, `world_size()` 1, `barrier()` and
`all_reduce_sum_tensor` do nothing, so tests and notebooks need no ports. NCCL tuning variables (NCCL_NVLS_ENABLE and
friends) are left to the environment on purpose: whether NVLink SHARP works depends on the machine, not on us.
"""

from __future__ import annotations

import datetime
import os
import time

import torch
import torch.distributed as dist

__all__ = [
    "all_reduce_sum_tensor",
    "barrier",
    "cleanup",
    "init_distributed",
    "is_main",
    "local_rank",
    "print0",
    "rank",
    "rank_seed",
    "world_size",
]


def init_distributed(
    *,
    backend: str | None = None,
    init_method: str = "env://",
    timeout: datetime.timedelta | None = None,
) -> torch.device:
    """Join the process group described by torchrun's variables and return this process's device.

    Single process (no RANK / WORLD_SIZE in the environment): no group is created; the device is cuda:0 when CUDA is
    available, else cpu. Under torchrun: `backend` defaults to nccl with CUDA and gloo without; with CUDA, the current
    device is set to cuda:LOCAL_RANK before the group starts, so collectives and `.cuda()` land on this rank's GPU.
    Calling it again after the group exists only returns the device.

    Args:
        backend: "nccl" or "gloo"; None picks as above.
        init_method: how ranks find each other; torchrun's default "env://" reads MASTER_ADDR / MASTER_PORT
            (tests pass "file://<path>").
        timeout: for collectives; raise it when rank 0 may write a large checkpoint while the others wait.
    """
    cuda = torch.cuda.is_available()
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return torch.device("cuda", 0) if cuda else torch.device("cpu")

    device = torch.device("cuda", local_rank()) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        backend = backend or ("nccl" if cuda else "gloo")
        kwargs = {} if timeout is None else {"timeout": timeout}
        if backend == "nccl":
            # Binds the communicator to this GPU now; otherwise barrier() has to guess the device and warns.
            kwargs["device_id"] = device
        dist.init_process_group(
            backend,
            init_method=init_method,
            rank=int(os.environ["RANK"]),
            world_size=int(os.environ["WORLD_SIZE"]),
            **kwargs,
        )
    return device


def rank() -> int:
    """Global rank of this process (0 without a process group)."""
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def world_size() -> int:
    """Number of processes (1 without a process group)."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def local_rank() -> int:
    """Rank within this machine, from torchrun's LOCAL_RANK (0 when unset)."""
    return int(os.environ.get("LOCAL_RANK", 0))


def is_main() -> bool:
    """True on rank 0, the process that logs and writes checkpoints."""
    return rank() == 0


def rank_seed(seed: int) -> int:
    """A distinct seed per rank from one global seed (DiT's `seed * world_size + rank`)."""
    return seed * world_size() + rank()


def print0(*args, **kwargs) -> None:
    """`print` on rank 0 only, flushed so lines interleave sensibly with other output under torchrun."""
    if is_main():
        kwargs.setdefault("flush", True)
        print(*args, **kwargs)


def barrier() -> None:
    """Wait for every rank (no-op in a single process)."""
    if world_size() > 1:
        dist.barrier()


def all_reduce_sum_tensor(t: torch.Tensor) -> torch.Tensor:
    """The sum of `t` over all ranks, as a new tensor (`t` is left unchanged; a copy in a single process).

    Meant for log-time metrics: reduce once every `log_every` steps, not every step.
    """
    out = t.detach().clone()
    if world_size() > 1:
        dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out


def any_rank(flag: bool) -> bool:
    """True on every rank when `flag` is True on at least one (a collective: every rank must call it)."""
    if world_size() == 1:
        return bool(flag)
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


class TimeLimit:
    """A wall-clock budget for a training loop (`train.time_limit_min`); minutes <= 0 means no limit.

    `reached(step_done)` becomes True once `minutes` have passed since the limit was made. It looks at the clock only
    every `every` steps (the log steps, where the loop synchronises anyway) and every rank gets the same answer, so all
    processes leave the loop after the same step; the loop then ends as at its last step (checkpoint, export), and a
    later resume continues towards `train.steps`.
    """

    def __init__(self, minutes: float, every: int):
        self.minutes = minutes
        self.deadline = time.monotonic() + 60.0 * minutes if minutes > 0 else None
        self.every = max(1, int(every))

    def reached(self, step_done: int) -> bool:
        if self.deadline is None or step_done % self.every:
            return False
        return any_rank(time.monotonic() >= self.deadline)

    def stopped(self, step_done: int) -> str:
        """The line a loop prints when it leaves at the limit."""
        return f"train.time_limit_min = {self.minutes} reached: stopped after step {step_done}"


def cleanup() -> None:
    """Leave the process group, if one was created (safe to call in any case)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
