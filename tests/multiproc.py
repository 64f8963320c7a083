"""Run a test worker in several processes, as torchrun would, and leave them cleanly."""

from __future__ import annotations

import os
import socket
import sys
from typing import Any, Callable

import torch.multiprocessing as mp


def free_port() -> int:
    """A TCP port that is free on this machine now (for MASTER_PORT)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_then_exit(rank: int, fn: Callable[..., None], args: tuple[Any, ...]) -> None:
    fn(rank, *args)
    # The worker has finished and written its results. Gloo's background threads can still hold work objects that
    # reach for the interpreter while it is being torn down, which aborts the process now and then (SIGABRT,
    # "terminate called without an active exception"; see pytorch/pytorch#179291). Leaving without that teardown
    # keeps a finished worker from being reported as crashed. An exception in `fn` still propagates to `spawn`.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def spawn(fn: Callable[..., None], *args: Any, nprocs: int = 2) -> None:
    """Call `fn(rank, *args)` in `nprocs` fresh processes and wait for all of them (raises if any fails)."""
    mp.spawn(_run_then_exit, args=(fn, args), nprocs=nprocs, join=True)
