"""drift_loss split over 2 gloo processes equals the same call in one process (loss, gradient and statistics)."""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist

from drifting.drift import all_reduce_sum, drift_loss
from multiproc import spawn

# An uneven split: rank 0 holds 5 problems, rank 1 holds 3.
SPLIT = (0, 5, 8)


def make_inputs():
    g = torch.Generator().manual_seed(0)
    gen = torch.randn(8, 6, 5, generator=g, dtype=torch.float64)
    pos = torch.randn(8, 4, 5, generator=g, dtype=torch.float64) + 0.5
    neg = torch.randn(8, 3, 5, generator=g, dtype=torch.float64)
    neg_weight = torch.rand(8, 3, generator=g, dtype=torch.float64) * 3
    return gen, pos, neg, neg_weight


def _worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        gen, pos, neg, neg_weight = make_inputs()
        sl = slice(SPLIT[rank], SPLIT[rank + 1])
        mine = gen[sl].clone().requires_grad_()
        loss, info = drift_loss(mine, pos[sl], neg[sl], neg_weight=neg_weight[sl], chunk_size=2,
                                all_reduce=all_reduce_sum())
        loss.sum().backward()
        torch.save({"loss": loss.detach(), "grad": mine.grad, **info}, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_two_gloo_processes_equal_one_process(tmp_path):
    if not dist.is_available():
        pytest.skip("torch.distributed is not available")
    spawn(_worker, 2, str(tmp_path / "init"), str(tmp_path))
    gen, pos, neg, neg_weight = make_inputs()
    gen.requires_grad_()
    loss, info = drift_loss(gen, pos, neg, neg_weight=neg_weight)
    loss.sum().backward()
    parts = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    torch.testing.assert_close(torch.cat([p["loss"] for p in parts]), loss.detach(), rtol=1e-12, atol=0)
    torch.testing.assert_close(torch.cat([p["grad"] for p in parts]), gen.grad, rtol=1e-12, atol=1e-15)
    for p in parts:
        torch.testing.assert_close(p["scale"], info["scale"], rtol=1e-12, atol=0)
        torch.testing.assert_close(p["drift_ms"], info["drift_ms"], rtol=1e-12, atol=0)
    # Without the all-reduce each rank would see other statistics: the test above is not vacuous.
    alone, _ = drift_loss(gen.detach()[:5], pos[:5], neg[:5], neg_weight=neg_weight[:5])
    assert not torch.allclose(alone, loss.detach()[:5], rtol=1e-4)
