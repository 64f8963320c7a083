"""2-D target distributions for toy experiments.

Every target exposes the same small interface (see `Target2D`):

- ``name``: the registry key,
- ``modes``: the number of modes, 0 where modes are not defined (spiral),
- ``sample(n, generator)``: ``[n, 2]`` float32 samples, deterministic given the generator,
- ``assign_modes(points)``: ``[n]`` int64 index of the mode each point belongs to, -1 for none.

Mode assignment is what mode-coverage metrics (`mode_fractions`, `count_covered_modes`) are
built on: a generator that collapses shows up as modes receiving (almost) no points.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import Tensor

__all__ = [
    "Target2D",
    "GaussianMixture2D",
    "Checkerboard",
    "Moons",
    "Spiral",
    "TARGETS",
    "get_target",
    "mode_fractions",
    "count_covered_modes",
]

# A point farther than this many noise standard deviations from every mode belongs to none.
_MODE_RADIUS_STDS = 3.0


class Target2D(Protocol):
    """The interface shared by all toy targets."""

    @property
    def name(self) -> str: ...

    @property
    def modes(self) -> int: ...

    def sample(self, n: int, generator: torch.Generator | None = None) -> Tensor: ...

    def assign_modes(self, points: Tensor) -> Tensor: ...


def _check_n(n: int) -> None:
    # bool is an int subclass; sample(True) is almost certainly a bug.
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise ValueError(f"n must be a non-negative int, got {n!r}")


def _device_of(generator: torch.Generator | None) -> torch.device:
    # Sampling calls must run on the generator's device, or torch refuses the generator.
    return generator.device if generator is not None else torch.device("cpu")


def _check_points(points: Tensor) -> Tensor:
    """Validate ``points`` [n, 2] and return it as a floating tensor."""
    if not isinstance(points, Tensor):
        raise ValueError(f"points must be a torch.Tensor of shape [n, 2], got {type(points).__name__}")
    if points.ndim != 2 or points.shape[1] != 2:
        raise ValueError(f"points must have shape [n, 2], got {tuple(points.shape)}")
    return points if points.is_floating_point() else points.float()


@dataclass(frozen=True)
class GaussianMixture2D:
    """Equal-weight mixture of isotropic Gaussians with a shared standard deviation.

    A point belongs to the nearest component if it lies within 3 std of its centre; the
    supplied mixtures have components far enough apart that these disks do not overlap.
    """

    name: str
    centers: tuple[tuple[float, float], ...]
    std: float

    @property
    def modes(self) -> int:
        return len(self.centers)

    def _centers(self, device: torch.device) -> Tensor:
        """Component means, [modes, 2] float32."""
        return torch.tensor(self.centers, dtype=torch.float32, device=device)

    def sample(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        """Draw ``n`` points, [n, 2] float32."""
        _check_n(n)
        device = _device_of(generator)
        component = torch.randint(self.modes, (n,), generator=generator, device=device)
        noise = torch.randn(n, 2, generator=generator, device=device)
        return self._centers(device)[component] + self.std * noise

    def assign_modes(self, points: Tensor) -> Tensor:
        """Nearest component within 3 std, else -1: [n, 2] -> [n] int64."""
        points = _check_points(points)
        centers = self._centers(points.device).to(points.dtype)
        dist = torch.cdist(points, centers)  # [n, modes]
        nearest_dist, nearest = dist.min(dim=1)
        return torch.where(nearest_dist <= _MODE_RADIUS_STDS * self.std, nearest, -1)


@dataclass(frozen=True)
class Checkerboard:
    """Uniform over the dark squares of a ``cells`` x ``cells`` board on [-h, h]^2.

    Squares are indexed by column ``ix`` (from x = -h) and row ``iy`` (from y = -h); a square
    is dark when ``ix + iy`` is even, so the bottom-left square is dark. Modes are the dark
    squares, numbered row by row from the bottom-left. Square edges count as inside.
    """

    name: str
    half_width: float = 4.0
    cells: int = 4

    @property
    def side(self) -> float:
        return 2.0 * self.half_width / self.cells

    @property
    def modes(self) -> int:
        # With an odd board the dark squares are the extra one: ceil(cells^2 / 2).
        return (self.cells * self.cells + 1) // 2

    def _dark_cells(self, device: torch.device) -> Tensor:
        """(ix, iy) of each dark square in mode order, [modes, 2] int64."""
        iy, ix = torch.meshgrid(
            torch.arange(self.cells, device=device), torch.arange(self.cells, device=device), indexing="ij"
        )
        cells = torch.stack([ix.reshape(-1), iy.reshape(-1)], dim=1)  # row-major: iy outer
        return cells[(cells.sum(dim=1) % 2) == 0]

    def sample(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        """Draw ``n`` points, [n, 2] float32."""
        _check_n(n)
        device = _device_of(generator)
        square = torch.randint(self.modes, (n,), generator=generator, device=device)
        offset = torch.rand(n, 2, generator=generator, device=device)
        corner = self._dark_cells(device)[square].float() * self.side - self.half_width
        return corner + self.side * offset

    def assign_modes(self, points: Tensor) -> Tensor:
        """Index of the dark square containing each point, else -1: [n, 2] -> [n] int64."""
        points = _check_points(points)
        device = points.device
        # Look-up table from (iy, ix) to mode index, -1 on light squares.
        table = torch.full((self.cells, self.cells), -1, dtype=torch.long, device=device)
        dark = self._dark_cells(device)
        table[dark[:, 1], dark[:, 0]] = torch.arange(len(dark), device=device)
        inside = (points.abs() <= self.half_width).all(dim=1)
        # Clamping puts the closed outer edge x = +h into the last column; points outside
        # the board get a valid (clamped) index that is discarded by `inside` below.
        index = torch.floor((points + self.half_width) / self.side).long().clamp(0, self.cells - 1)
        return torch.where(inside, table[index[:, 1], index[:, 0]], -1)


@dataclass(frozen=True)
class Moons:
    """Two interleaving half circles of radius ``radius`` plus isotropic Gaussian noise.

    The layout is the usual "two moons" one, scaled by ``radius`` and centred at the origin:
    the upper arc has centre (-r/2, -r/4) and opens downwards, the lower arc has centre
    (r/2, r/4) and opens upwards. With r = 2 the noiseless data spans [-3, 3] x [-1.5, 1.5].
    Mode 0 is the upper arc, mode 1 the lower one; each has weight 1/2.
    """

    name: str
    radius: float = 2.0
    noise: float = 0.15

    @property
    def modes(self) -> int:
        return 2

    def _arc_centers(self, device: torch.device) -> Tensor:
        """Centres of the upper and lower arcs, [2, 2] float32."""
        r = self.radius
        return torch.tensor([[-r / 2, -r / 4], [r / 2, r / 4]], dtype=torch.float32, device=device)

    def sample(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        """Draw ``n`` points, [n, 2] float32."""
        _check_n(n)
        device = _device_of(generator)
        moon = torch.randint(2, (n,), generator=generator, device=device)
        angle = math.pi * torch.rand(n, generator=generator, device=device)
        noise = torch.randn(n, 2, generator=generator, device=device)
        # The lower arc is the upper one rotated by pi about its own centre.
        side = 1.0 - 2.0 * moon.float()  # +1 upper, -1 lower
        on_arc = self.radius * side[:, None] * torch.stack([torch.cos(angle), torch.sin(angle)], dim=1)
        return self._arc_centers(device)[moon] + on_arc + self.noise * noise

    def assign_modes(self, points: Tensor) -> Tensor:
        """Nearest arc within 3 noise std of the point, else -1: [n, 2] -> [n] int64."""
        points = _check_points(points)
        centers = self._arc_centers(points.device).to(points.dtype)
        dist = torch.stack(
            [
                _semicircle_distance(points, centers[0], self.radius, upper=True),
                _semicircle_distance(points, centers[1], self.radius, upper=False),
            ],
            dim=1,
        )  # [n, 2]
        nearest_dist, nearest = dist.min(dim=1)
        return torch.where(nearest_dist <= _MODE_RADIUS_STDS * self.noise, nearest, -1)


def _semicircle_distance(points: Tensor, center: Tensor, radius: float, upper: bool) -> Tensor:
    """Euclidean distance from points [n, 2] to a half circle, [n].

    The half circle is the upper (y >= centre y) or lower half of the circle. For a point on
    the arc's side of the centre line the closest arc point is along the ray from the centre;
    on the other side it is one of the two endpoints centre +- (radius, 0).
    """
    rel = points - center
    radial = (rel.norm(dim=1) - radius).abs()
    endpoint = torch.tensor([radius, 0.0], dtype=points.dtype, device=points.device)
    to_endpoints = torch.minimum((rel - endpoint).norm(dim=1), (rel + endpoint).norm(dim=1))
    on_arc_side = rel[:, 1] >= 0 if upper else rel[:, 1] <= 0
    return torch.where(on_arc_side, radial, to_endpoints)


@dataclass(frozen=True)
class Spiral:
    """A noisy Archimedean spiral r = max_radius * theta / theta_max; it has no modes.

    The spiral angle is drawn as theta_max * sqrt(u), u ~ U(0, 1): arc length grows roughly
    like theta^2, so this makes points roughly uniform along the curve instead of crowding
    at the centre. The noiseless curve lies in the disk of radius ``max_radius``.
    """

    name: str
    turns: float = 1.5
    max_radius: float = 3.8
    noise: float = 0.1

    @property
    def modes(self) -> int:
        return 0

    def sample(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        """Draw ``n`` points, [n, 2] float32."""
        _check_n(n)
        device = _device_of(generator)
        progress = torch.rand(n, generator=generator, device=device).sqrt()  # in [0, 1)
        noise = torch.randn(n, 2, generator=generator, device=device)
        angle = 2.0 * math.pi * self.turns * progress
        radius = self.max_radius * progress
        curve = radius[:, None] * torch.stack([torch.cos(angle), torch.sin(angle)], dim=1)
        return curve + self.noise * noise

    def assign_modes(self, points: Tensor) -> Tensor:
        """Always -1 (no modes): [n, 2] -> [n] int64."""
        points = _check_points(points)
        return torch.full((points.shape[0],), -1, dtype=torch.long, device=points.device)


def _ring(n_modes: int, radius: float) -> tuple[tuple[float, float], ...]:
    """Centres of ``n_modes`` points evenly spaced on a circle, the first at angle 0."""
    angles = [2.0 * math.pi * k / n_modes for k in range(n_modes)]
    return tuple((radius * math.cos(a), radius * math.sin(a)) for a in angles)


TARGETS: dict[str, Target2D] = {
    # Figure 3 of the paper: two equal-weight Gaussians at (+-2, 0), std 0.5.
    "bimodal": GaussianMixture2D("bimodal", centers=((-2.0, 0.0), (2.0, 0.0)), std=0.5),
    # Neighbouring centres are 2 * 4 * sin(pi / 8) ~ 3.06 apart, well over 2 * 3 std = 1.8.
    "ring8": GaussianMixture2D("ring8", centers=_ring(8, 4.0), std=0.3),
    "checkerboard": Checkerboard("checkerboard", half_width=4.0, cells=4),
    "moons": Moons("moons", radius=2.0, noise=0.15),
    "spiral": Spiral("spiral", turns=1.5, max_radius=3.8, noise=0.1),
}


def get_target(name: str) -> Target2D:
    """Look up a target by name; raises ValueError listing the valid names."""
    try:
        return TARGETS[name]
    except (KeyError, TypeError):
        valid = ", ".join(sorted(TARGETS))
        raise ValueError(f"unknown toy target {name!r}; valid names: {valid}") from None


def _mode_counts(target: Target2D, points: Tensor) -> Tensor:
    """Number of points assigned to each mode, [modes] int64 (unassigned points dropped)."""
    if target.modes == 0:
        raise ValueError(f"target {target.name!r} has no modes; mode coverage is undefined for it")
    assigned = target.assign_modes(points)
    if assigned.numel() == 0:
        raise ValueError("points must contain at least one point, got shape [0, 2]")
    return torch.bincount(assigned[assigned >= 0], minlength=target.modes)


def mode_fractions(target: Target2D, points: Tensor) -> Tensor:
    """Fraction of all points assigned to each mode: points [n, 2] -> [modes] float64.

    The denominator is n, including points assigned to no mode, so the fractions sum to the
    fraction of assigned points (<= 1). Raises ValueError for targets without modes.
    """
    counts = _mode_counts(target, points)
    return counts.double() / points.shape[0]


def count_covered_modes(target: Target2D, points: Tensor, min_share: float = 0.1) -> int:
    """Number of modes that receive a reasonable share of the points [n, 2].

    Rule: with n points and K modes, a mode is covered when at least
    ``max(1, min_share * n / K)`` points are assigned to it, i.e. by default at least 10% of
    the n / K points it would get if the points were spread evenly over the modes. The floor
    of 1 point keeps tiny point sets from counting empty modes as covered.
    Raises ValueError for targets without modes.
    """
    counts = _mode_counts(target, points)
    threshold = max(1.0, min_share * points.shape[0] / target.modes)
    return int((counts >= threshold).sum().item())
