"""The background prefetcher: the same items in the same order as computing them inline, errors raised at the item
that failed, and a clean stop when the caller leaves early."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from drifting.data.prefetch import prefetch


def draw(step: int) -> torch.Tensor:
    return torch.randn(3, generator=torch.Generator().manual_seed(step))


@pytest.mark.parametrize("depth", [0, 1, 3])
def test_same_items_in_order(depth):
    with prefetch(draw, range(5, 12), depth=depth) as items:
        got = list(items)
    assert len(got) == 7
    for step, x in zip(range(5, 12), got):
        assert torch.equal(x, draw(step))


def test_an_error_is_raised_at_its_item():
    def fn(k):
        if k == 2:
            raise KeyError("item 2")
        return k

    with prefetch(fn, range(5), depth=2) as items:
        assert next(items) == 0 and next(items) == 1
        with pytest.raises(KeyError, match="item 2"):
            next(items)


def test_leaving_early_stops_the_thread():
    calls = []

    def slow(k):
        calls.append(k)
        time.sleep(0.01)
        return k

    before = threading.active_count()
    with prefetch(slow, range(1000), depth=2) as items:
        assert next(items) == 0
    assert threading.active_count() == before  # joined
    assert len(calls) < 10  # it worked at most a few items ahead


def test_depth_must_be_a_non_negative_integer():
    for depth in (-1, 1.5, True):
        with pytest.raises(ValueError, match="depth"):
            prefetch(draw, range(3), depth=depth)
