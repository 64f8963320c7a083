"""Tests for drifting.eval.distances: energy distance and MMD."""

import math

import pytest
import torch

from drifting.data.toy2d import get_target
from drifting.eval.distances import energy_distance, mmd

DISTANCES = [energy_distance, mmd]
N = 1000


def _sample(name: str, seed: int, n: int = N) -> torch.Tensor:
    return get_target(name).sample(n, generator=torch.Generator().manual_seed(seed))


def _reference_energy(x: torch.Tensor, y: torch.Tensor) -> float:
    """Direct, unchunked evaluation of the same estimator (U-statistic within sets)."""
    x, y = x.double(), y.double()
    n, m = len(x), len(y)
    dxy = torch.cdist(x, y, compute_mode="donot_use_mm_for_euclid_dist")
    dxx = torch.cdist(x, x, compute_mode="donot_use_mm_for_euclid_dist")
    dyy = torch.cdist(y, y, compute_mode="donot_use_mm_for_euclid_dist")
    # The diagonals are exactly 0, so summing everything and dividing by n(n-1) drops them.
    return float(2 * dxy.mean() - dxx.sum() / (n * (n - 1)) - dyy.sum() / (m * (m - 1)))


def _reference_mmd(x: torch.Tensor, y: torch.Tensor, bandwidths) -> float:
    x, y = x.double(), y.double()
    n, m = len(x), len(y)

    def k(a, b):
        sq = torch.cdist(a, b, compute_mode="donot_use_mm_for_euclid_dist") ** 2
        return sum(torch.exp(-sq / (2 * h**2)) for h in bandwidths)

    kxx = k(x, x).fill_diagonal_(0)
    kyy = k(y, y).fill_diagonal_(0)
    return float(kxx.sum() / (n * (n - 1)) + kyy.sum() / (m * (m - 1)) - 2 * k(x, y).mean())


# ---------------------------------------------------------------- closed forms


def test_energy_two_point_masses():
    # All within-set distances are 0, every cross distance is 1: 2 * 1 - 0 - 0.
    x = torch.zeros(3, 1)
    y = torch.ones(4, 1)
    assert energy_distance(x, y) == pytest.approx(2.0, abs=1e-12)


def test_energy_hand_computed_cases():
    # Cross pairs |0-3|, |0-5|, |1-3|, |1-5| average 3.5; within pairs (i != k): 1 and 2.
    x = torch.tensor([[0.0], [1.0]])
    y = torch.tensor([[3.0], [5.0]])
    assert energy_distance(x, y) == pytest.approx(2 * 3.5 - 1 - 2, abs=1e-12)
    # Identical sets: cross average (0 + 1 + 1 + 0) / 4 = 0.5, within 1 each. The U-statistic
    # (diagonal excluded) is -1 here; the V-statistic would have given 0.
    assert energy_distance(x, x.clone()) == pytest.approx(-1.0, abs=1e-12)
    # 2-D: x = {(0,0), (3,4)}, y = {(3,0), (3,0)}. Cross distances 3, 3, 4, 4; within x 5.
    x2 = torch.tensor([[0.0, 0.0], [3.0, 4.0]])
    y2 = torch.tensor([[3.0, 0.0], [3.0, 0.0]])
    assert energy_distance(x2, y2) == pytest.approx(2 * 3.5 - 5 - 0, abs=1e-12)


def test_mmd_hand_computed_cases():
    # Point masses at 0 and 1: within-set kernels are all K = len(bandwidths).
    x = torch.zeros(3, 1)
    y = torch.ones(4, 1)
    hs = (0.5, 1.0, 2.0)
    cross = sum(math.exp(-1 / (2 * h**2)) for h in hs)
    assert mmd(x, y, bandwidths=hs) == pytest.approx(2 * len(hs) - 2 * cross, rel=1e-6)
    # x = y = {0, 1}, h = 1: within e^-1/2 each; cross (1 + e^-1/2) / 2.
    x = torch.tensor([[0.0], [1.0]])
    e = math.exp(-0.5)
    assert mmd(x, x.clone(), bandwidths=(1.0,)) == pytest.approx(2 * e - (1 + e), rel=1e-6)


# ---------------------------------------------------------------- behaviour on toy targets


@pytest.mark.parametrize("distance", DISTANCES)
def test_same_target_small_compared_with_different_or_shifted(distance):
    a = _sample("bimodal", seed=0)
    b = _sample("bimodal", seed=1)
    same = distance(a, b)
    different = distance(a, _sample("ring8", seed=2))
    shifted = distance(a, b + torch.tensor([0.5, 0.0]))
    assert abs(same) < 0.1 * shifted
    assert abs(same) < 0.01 * different
    assert shifted > 0 and different > 0


@pytest.mark.parametrize("distance", DISTANCES)
def test_symmetric(distance):
    a = _sample("moons", seed=0, n=300)
    b = _sample("ring8", seed=1, n=250)
    assert distance(a, b) == pytest.approx(distance(b, a), rel=1e-6, abs=1e-9)


@pytest.mark.parametrize("dim", [3, 12])  # 3: coordinate differences; 12: the matmul path
def test_chunked_equals_unchunked_and_reference(dim):
    gen = torch.Generator().manual_seed(0)
    # Odd sizes so that the last blocks are partial.
    x = torch.randn(301, dim, generator=gen)
    y = torch.randn(211, dim, generator=gen) * 1.5 + 0.3
    hs = (0.2, 1.0, 3.0)
    e7, e_big = energy_distance(x, y, chunk=7), energy_distance(x, y, chunk=10000)
    m7, m_big = mmd(x, y, bandwidths=hs, chunk=7), mmd(x, y, bandwidths=hs, chunk=10000)
    assert e7 == pytest.approx(e_big, rel=1e-6, abs=1e-9)
    assert m7 == pytest.approx(m_big, rel=1e-6, abs=1e-9)
    assert e_big == pytest.approx(_reference_energy(x, y), rel=1e-6, abs=1e-9)
    assert m_big == pytest.approx(_reference_mmd(x, y, hs), rel=1e-6, abs=1e-9)


def test_input_dtypes_and_no_grad():
    x = torch.tensor([[0], [1], [2]])  # integer input is accepted
    y = torch.tensor([[0.5], [4.0]], dtype=torch.float64, requires_grad=True)
    value = energy_distance(x, y)
    assert isinstance(value, float)
    assert value == pytest.approx(energy_distance(x.double(), y.detach()))
    assert isinstance(mmd(x, y), float)


# ---------------------------------------------------------------- input validation


GOOD = torch.zeros(4, 2)


@pytest.mark.parametrize("distance", DISTANCES)
@pytest.mark.parametrize(
    ("x", "y", "match"),
    [
        (torch.zeros(4), GOOD, "x must be 2-D"),
        (GOOD, torch.zeros(4, 2, 1), "y must be 2-D"),
        ([[0.0, 0.0], [1.0, 1.0]], GOOD, "x must be a torch.Tensor"),
        (torch.zeros(1, 2), GOOD, "x must have at least 2 points"),
        (GOOD, torch.zeros(1, 2), "y must have at least 2 points"),
        (GOOD, torch.zeros(4, 3), "same dimension"),
        (GOOD, torch.tensor([[0.0, 1.0], [float("nan"), 0.0]]), "y must contain only finite"),
        (torch.tensor([[0.0, 1.0], [float("inf"), 0.0]]), GOOD, "x must contain only finite"),
    ],
)
def test_bad_inputs(distance, x, y, match):
    with pytest.raises(ValueError, match=match):
        distance(x, y)


@pytest.mark.parametrize("distance", DISTANCES)
@pytest.mark.parametrize("chunk", [0, -3, 2.5, True])
def test_bad_chunk(distance, chunk):
    with pytest.raises(ValueError, match="chunk"):
        distance(GOOD, GOOD, chunk=chunk)


@pytest.mark.parametrize("bandwidths", [(), (1.0, 0.0), (-1.0,), (float("nan"),), (float("inf"),), ("a",)])
def test_bad_bandwidths(bandwidths):
    with pytest.raises(ValueError, match="bandwidths"):
        mmd(GOOD, GOOD, bandwidths=bandwidths)
