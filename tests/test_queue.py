"""The sample queue: ring semantics, draws with and without replacement, prefill, exact resume, storage dtype."""

from __future__ import annotations

import io

import pytest
import torch

from drifting.data.queue import SampleQueue


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def tagged(labels: list[int], start: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Samples [B, 2] = (label, serial number from `start`), so every drawn sample says where it came from."""
    y = torch.tensor(labels, dtype=torch.long)
    x = torch.stack([y.float(), torch.arange(start, start + len(labels)).float()], dim=1)
    return x, y


def sequential_reference(pushes, num_classes, per_class, unconditional):
    """Python-list rings fed one sample at a time: the obvious semantics that `push` vectorises."""
    rings = [[None] * per_class for _ in range(num_classes)]
    pos, uncond, upos = [0] * num_classes, [None] * unconditional, 0
    for x, y in pushes:
        for sample, label in zip(x, y.tolist()):
            rings[label][pos[label]] = sample
            pos[label] = (pos[label] + 1) % per_class
            uncond[upos] = sample
            upos = (upos + 1) % unconditional
    return rings, uncond


def test_push_matches_one_sample_at_a_time():
    q = SampleQueue(3, (2,), per_class=4, unconditional=6)
    labels = torch.randint(3, (40,), generator=gen(0))
    # Uneven pushes, including one with more samples of a class than its ring holds and one larger than the uncond ring.
    pushes = [tagged(labels[a:b].tolist(), a) for a, b in [(0, 1), (1, 3), (3, 20), (20, 21), (21, 40)]]
    for x, y in pushes:
        q.push(x, y)
    rings, uncond = sequential_reference(pushes, 3, 4, 6)
    for c in range(3):
        held = int(q.counts().classes[c])
        assert held == min(4, int((labels == c).sum()))
        for slot in range(held):
            assert torch.equal(q.classes[c, slot], rings[c][slot])
    assert q.counts().unconditional == 6
    assert all(torch.equal(q.uncond[s], uncond[s]) for s in range(6))


def test_ring_keeps_the_latest_and_overwrites_oldest_first():
    q = SampleQueue(2, (2,), per_class=3, unconditional=4)
    for i in range(5):  # class 0 receives serials 0..4 one by one
        q.push(*tagged([0], i))
    assert q.classes[0, :, 1].tolist() == [3.0, 4.0, 2.0]  # slots 0, 1 overwritten by 3, 4; 2 still holds 2
    assert int(q.class_pos[0]) == 2 and q.counts().classes.tolist() == [3, 0]
    assert sorted(q.uncond[:, 1].tolist()) == [1.0, 2.0, 3.0, 4.0]
    # One push of 7 samples of class 1: only the last 3 stay, and so do the last 4 overall in the uncond ring.
    q.push(*tagged([1] * 7, 100))
    assert sorted(q.classes[1, :, 1].tolist()) == [104.0, 105.0, 106.0]
    assert sorted(q.uncond[:, 1].tolist()) == [103.0, 104.0, 105.0, 106.0]


def test_positives_come_from_their_class_without_replacement():
    q = SampleQueue(4, (2,), per_class=16, unconditional=50)
    labels = torch.arange(4).repeat_interleave(16)
    q.push(*tagged(labels.tolist()))
    draw = q.sample_positive(torch.tensor([2, 0, 2, 3]), 10, generator=gen(1))
    assert draw.shape == (4, 10, 2)
    assert draw[:, :, 0].tolist() == [[2.0] * 10, [0.0] * 10, [2.0] * 10, [3.0] * 10]
    for row in draw:
        assert len(set(row[:, 1].tolist())) == 10  # no repeats
    assert not torch.equal(draw[0], draw[2])  # a repeated class gets an independent draw
    # count == held: a permutation of the whole ring.
    full = q.sample_positive(torch.tensor([1]), 16, generator=gen(2))[0, :, 1]
    assert sorted(full.tolist()) == list(range(16, 32))


def test_positives_with_replacement_only_while_a_queue_holds_too_few():
    q = SampleQueue(2, (2,), per_class=8, unconditional=20)
    q.push(*tagged([0, 0, 0, 1, 1, 1, 1, 1, 1]))  # class 0 holds 3, class 1 holds 6
    draw = q.sample_positive(torch.tensor([0, 1]), 5, generator=gen(3))
    assert set(draw[0, :, 1].tolist()) <= {0.0, 1.0, 2.0}  # 5 draws from 3 samples: repeats are forced
    assert len(set(draw[1, :, 1].tolist())) == 5  # 6 >= 5: distinct
    # count above the ring size: always with replacement, still only that class's samples.
    big = q.sample_positive(torch.tensor([1]), 20, generator=gen(4))
    assert set(big[0, :, 1].tolist()) == set(range(3, 9))


def test_without_replacement_draws_are_uniform_subsets():
    q = SampleQueue(1, (2,), per_class=8, unconditional=8)
    q.push(*tagged([0] * 6))
    draws = q.sample_positive(torch.zeros(3000, dtype=torch.long), 3, generator=gen(5))[:, :, 1]
    assert all(len(set(row.tolist())) == 3 for row in draws[:200])
    hits = torch.bincount(draws.long().flatten(), minlength=6).double() / draws.shape[0]
    torch.testing.assert_close(hits, torch.full((6,), 0.5, dtype=torch.float64), atol=0.04, rtol=0)


def test_unconditional_draws():
    q = SampleQueue(3, (2,), per_class=4, unconditional=10)
    q.push(*tagged([0, 1, 2, 0, 1, 2, 0, 1, 2, 0, 1, 2], 0))  # 12 pushes: the uncond ring holds serials 2..11
    draw = q.sample_unconditional(5, 10, generator=gen(6))
    assert draw.shape == (5, 10, 2)
    for row in draw:
        assert sorted(row[:, 1].tolist()) == list(range(2, 12))  # without replacement: each row a permutation
    assert len({tuple(row[:, 1].tolist()) for row in draw}) > 1  # rows are independent
    many = q.sample_unconditional(2, 25, generator=gen(7))  # more than held: with replacement
    assert set(many[:, :, 1].flatten().tolist()) <= set(range(2, 12))
    assert q.sample_unconditional(3, 0).shape == (3, 0, 2)


def test_draws_are_deterministic_given_a_generator():
    q = SampleQueue(3, (2,), per_class=8, unconditional=20)
    q.push(*tagged(torch.randint(3, (30,), generator=gen(0)).tolist()))
    labels = torch.tensor([0, 1, 2, 1])
    assert torch.equal(q.sample_positive(labels, 6, gen(9)), q.sample_positive(labels, 6, gen(9)))
    assert torch.equal(q.sample_unconditional(4, 6, gen(9)), q.sample_unconditional(4, 6, gen(9)))
    assert not torch.equal(q.sample_positive(labels, 6, gen(9)), q.sample_positive(labels, 6, gen(10)))


def test_state_dict_round_trip_resumes_exactly():
    def run(q, steps, seed):
        g, out = gen(seed), []
        for step in range(steps):
            labels = torch.randint(5, (7,), generator=g)
            q.push(tagged(labels.tolist(), 1000 * step + seed)[0], labels)
            out.append(q.sample_positive(labels[:3], 4, g))
            out.append(q.sample_unconditional(3, 5, g))
        return out

    a = SampleQueue(5, (2,), per_class=6, unconditional=12)
    run(a, 4, seed=1)
    buffer = io.BytesIO()
    torch.save(a.state_dict(), buffer)
    b = SampleQueue(5, (2,), per_class=6, unconditional=12)
    b.load_state_dict(torch.load(io.BytesIO(buffer.getvalue()), weights_only=True))
    assert torch.equal(a.counts().classes, b.counts().classes) and a.counts().unconditional == b.counts().unconditional
    after_a, after_b = run(a, 3, seed=2), run(b, 3, seed=2)
    assert all(torch.equal(x, y) for x, y in zip(after_a, after_b))


def test_load_state_dict_rejects_another_layout():
    state = SampleQueue(5, (2,), per_class=6).state_dict()
    with pytest.raises(ValueError, match="per_class"):
        SampleQueue(5, (2,), per_class=8).load_state_dict(state)
    with pytest.raises(ValueError, match="dtype"):
        SampleQueue(5, (2,), per_class=6, dtype=torch.bfloat16).load_state_dict(state)
    with pytest.raises(ValueError, match="missing keys"):
        SampleQueue(5, (2,), per_class=6).load_state_dict({k: v for k, v in state.items() if k != "uncond"})


def test_storage_dtype():
    pixels = torch.randint(0, 256, (6, 1, 3, 3), generator=gen(0), dtype=torch.uint8)
    q = SampleQueue(2, (1, 3, 3), per_class=4, unconditional=8, dtype=torch.uint8)
    q.push(pixels, torch.tensor([0, 1, 0, 1, 0, 1]))
    assert q.classes.dtype == torch.uint8 and q.nbytes == 2 * 4 * 9 + 8 * 9
    draw = q.sample_positive(torch.tensor([0]), 3, gen(1))
    assert draw.dtype == torch.uint8
    assert sorted(draw[0].flatten(1).tolist()) == sorted(pixels[[0, 2, 4]].flatten(1).tolist())
    with pytest.raises(ValueError, match="uint8"):
        q.push(pixels.float() / 255, torch.zeros(6, dtype=torch.long))  # floats into a pixel queue: refused
    latents = torch.randn(4, 3, generator=gen(2))
    qb = SampleQueue(1, (3,), per_class=4, unconditional=4, dtype=torch.bfloat16)
    qb.push(latents, torch.zeros(4, dtype=torch.long))
    assert qb.uncond.dtype == torch.bfloat16
    assert torch.equal(qb.classes[0], latents.bfloat16())


def test_prefill_from_tensors_fills_every_class():
    labels = torch.arange(4).repeat(50)[torch.randperm(200, generator=gen(0))]
    x, _ = tagged(labels.tolist())
    q = SampleQueue(4, (2,), per_class=8, unconditional=30)
    pushed = q.prefill(x, labels, generator=gen(1))
    assert q.counts().classes.tolist() == [8] * 4 and q.counts().unconditional == 30
    assert 32 <= pushed < 200  # stops once full, not after the whole dataset
    for c in range(4):
        assert (q.classes[c, :, 0] == c).all()
    q2 = SampleQueue(4, (2,), per_class=8, unconditional=30)
    q2.prefill(x, labels, generator=gen(1))
    assert torch.equal(q.classes, q2.classes) and torch.equal(q.uncond, q2.uncond)
    # A class with fewer samples than the ring: all of them are pushed.
    q3 = SampleQueue(5, (2,), per_class=8, unconditional=30)
    assert q3.prefill(x[:0], labels[:0]) == 0  # an empty dataset pushes nothing
    few_x, few_y = tagged([4, 4, 4] + [0] * 20)
    q3.prefill(few_x, few_y, generator=gen(2))
    assert q3.counts().classes.tolist() == [8, 0, 0, 0, 3]


def test_prefill_from_batches_stops_when_full():
    pulled = []

    def loader():
        for step in range(100):
            pulled.append(step)
            yield tagged([0, 1, 0, 1], 4 * step)

    q = SampleQueue(2, (2,), per_class=4, unconditional=6)
    assert q.prefill(loader()) == 8  # 2 batches fill both rings
    assert pulled == [0, 1]  # and no batch is pulled beyond that
    q = SampleQueue(3, (2,), per_class=4, unconditional=6)  # class 2 never comes: max_samples bounds the loop
    assert q.prefill(loader(), max_samples=10) == 10
    with pytest.raises(ValueError, match="pairs"):
        SampleQueue(2, (2,), per_class=4).prefill([torch.zeros(2, 2)])


def test_errors():
    q = SampleQueue(3, (2,), per_class=4, unconditional=4)
    q.push(*tagged([0]))
    with pytest.raises(ValueError, match=r"classes \[1, 2\] are empty"):
        q.sample_positive(torch.tensor([0, 2, 1, 2]), 2)
    with pytest.raises(ValueError, match="unconditional queue is empty"):
        SampleQueue(3, (2,)).sample_unconditional(2, 3)
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 3\)"):
        q.push(*tagged([3]))
    with pytest.raises(ValueError, match="shape"):
        q.push(torch.zeros(2, 3), torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError, match="labels"):
        q.push(torch.zeros(2, 2), torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="count"):
        q.sample_positive(torch.tensor([0]), -1)
    with pytest.raises(ValueError, match="per_class"):
        SampleQueue(3, (2,), per_class=0)
    with pytest.raises(ValueError, match="sample_shape"):
        SampleQueue(3, (0, 2))
