"""Tests for drifting.data.toy2d: sampling, mode assignment and coverage."""

import math

import pytest
import torch

from drifting.data.toy2d import (
    TARGETS,
    Checkerboard,
    count_covered_modes,
    get_target,
    mode_fractions,
)

MIXTURES = ["bimodal", "ring8", "checkerboard", "moons"]
N = 4000


def _sample(name: str, n: int = N, seed: int = 0) -> torch.Tensor:
    return get_target(name).sample(n, generator=torch.Generator().manual_seed(seed))


def test_registry_names():
    assert set(TARGETS) == {"bimodal", "ring8", "checkerboard", "moons", "spiral"}
    for name, target in TARGETS.items():
        assert target.name == name
        assert get_target(name) is target


def test_get_target_unknown_lists_valid_names():
    with pytest.raises(ValueError) as info:
        get_target("swissroll")
    message = str(info.value)
    assert "swissroll" in message
    for name in TARGETS:
        assert name in message


def test_mode_counts():
    expected = {"bimodal": 2, "ring8": 8, "checkerboard": 8, "moons": 2, "spiral": 0}
    assert {name: t.modes for name, t in TARGETS.items()} == expected


@pytest.mark.parametrize("name", sorted(TARGETS))
def test_sample_shape_dtype_and_range(name):
    x = _sample(name, 1000)
    assert x.shape == (1000, 2)
    assert x.dtype == torch.float32
    assert torch.isfinite(x).all()
    # Every target is designed to live roughly in [-4, 4]^2; allow for Gaussian tails.
    assert x.abs().max() < 6.0
    assert get_target(name).sample(0).shape == (0, 2)


@pytest.mark.parametrize("name", sorted(TARGETS))
def test_sample_deterministic_given_generator(name):
    a = _sample(name, 500, seed=123)
    b = _sample(name, 500, seed=123)
    c = _sample(name, 500, seed=124)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


@pytest.mark.parametrize("bad", [-1, 2.0, True, "3"])
def test_sample_rejects_bad_n(bad):
    with pytest.raises(ValueError):
        get_target("bimodal").sample(bad)


@pytest.mark.parametrize("name", MIXTURES)
def test_mixture_samples_assigned_and_balanced(name):
    target = get_target(name)
    x = _sample(name)
    assigned = target.assign_modes(x)
    assert assigned.shape == (N,)
    assert assigned.dtype == torch.long
    assert assigned.min() >= -1 and assigned.max() < target.modes
    assert (assigned >= 0).float().mean() > 0.95
    # Equal weights: each mode's fraction is within ~5 binomial std of 1/K.
    fractions = mode_fractions(target, x)
    assert fractions.shape == (target.modes,)
    fair = 1.0 / target.modes
    tol = 5.0 * math.sqrt(fair * (1 - fair) / N)
    # The extra 0.01 absorbs the ~1% of Gaussian samples beyond 3 std, which count in n only.
    assert torch.all((fractions - fair).abs() < tol + 0.01), fractions
    assert count_covered_modes(target, x) == target.modes


def test_gaussian_assignment_radius():
    bimodal = get_target("bimodal")  # centres (+-2, 0), std 0.5: mode radius 1.5
    points = torch.tensor([[-2.0, 0.0], [2.0, 0.0], [2.0, 1.4], [-2.0, -1.6], [0.0, 0.0], [3.45, 0.0]])
    assert bimodal.assign_modes(points).tolist() == [0, 1, 1, -1, -1, 1]
    ring8 = get_target("ring8")  # first centre at angle 0, counter-clockwise
    centres = torch.tensor([[4 * math.cos(2 * math.pi * k / 8), 4 * math.sin(2 * math.pi * k / 8)] for k in range(8)])
    assert ring8.assign_modes(centres).tolist() == list(range(8))
    assert ring8.assign_modes(torch.zeros(1, 2)).tolist() == [-1]


def test_checkerboard_assignment():
    board = get_target("checkerboard")
    # Bottom-left square (x, y in [-4, -2]) is dark and is mode 0; its right neighbour is light.
    points = torch.tensor(
        [
            [-3.0, -3.0],  # dark, first mode
            [-1.0, -3.0],  # light
            [1.0, -3.0],  # dark, second mode
            [-1.0, -1.0],  # dark: row 1, column 1
            [3.0, 3.0],  # dark, last mode
            [4.0, 4.0],  # corner of the last square, edges count as inside
            [4.5, 0.0],  # off the board
            [-3.0, 3.0],  # light: column 0, row 3
        ]
    )
    assert board.assign_modes(points).tolist() == [0, -1, 1, 2, 7, 7, -1, -1]
    # Samples land only on dark squares.
    assert (board.assign_modes(_sample("checkerboard")) >= 0).all()


def test_checkerboard_odd_board_mode_count():
    assert Checkerboard("odd", half_width=3.0, cells=3).modes == 5


def test_moons_assignment():
    moons = get_target("moons")  # upper arc centre (-1, -0.5), lower arc centre (1, 0.5), r = 2
    points = torch.tensor(
        [
            [-1.0, 1.5],  # top of the upper arc
            [1.0, -1.5],  # bottom of the lower arc
            [-3.0, -0.5],  # left end of the upper arc
            [3.0, 0.5],  # right end of the lower arc
            [-1.0, 1.9],  # 0.4 above the upper arc: within 3 * 0.15
            [-1.0, 2.1],  # 0.6 above: outside
            [-3.0, -1.5],  # 1.0 below the upper arc's left end: outside
        ]
    )
    assert moons.assign_modes(points).tolist() == [0, 1, 0, 1, 0, -1, -1]


def test_spiral_has_no_modes():
    spiral = get_target("spiral")
    x = _sample("spiral", 100)
    assert (spiral.assign_modes(x) == -1).all()
    with pytest.raises(ValueError):
        mode_fractions(spiral, x)
    with pytest.raises(ValueError):
        count_covered_modes(spiral, x)


def test_collapsed_bimodal_covers_one_mode():
    bimodal = get_target("bimodal")
    x = _sample("bimodal")
    collapsed = x[bimodal.assign_modes(x) == 1]
    assert count_covered_modes(bimodal, collapsed) == 1
    fractions = mode_fractions(bimodal, collapsed)
    assert fractions[0] == 0 and fractions[1] > 0.95


def test_coverage_threshold_is_tenth_of_fair_share():
    ring8 = get_target("ring8")
    centres = torch.tensor([[4 * math.cos(2 * math.pi * k / 8), 4 * math.sin(2 * math.pi * k / 8)] for k in range(8)])
    # 800 points: fair share 100, threshold 10. Mode 0 gets 10 (covered), mode 1 gets 9 (not).
    counts = [10, 9, 781, 0, 0, 0, 0, 0]
    points = torch.cat([centres[k].expand(c, 2) for k, c in enumerate(counts)])
    assert count_covered_modes(ring8, points) == 2
    # With few points the 1-point floor applies: 4 points, one per mode 0..3 -> 4 covered.
    assert count_covered_modes(ring8, centres[:4]) == 4


def test_assign_modes_rejects_bad_shape():
    with pytest.raises(ValueError):
        get_target("bimodal").assign_modes(torch.zeros(5, 3))
    with pytest.raises(ValueError):
        get_target("moons").assign_modes(torch.zeros(5))
