"""Guidance scale sampling and the unconditional weight: the authors' quantile table, the law, the errors."""

from __future__ import annotations

import math

import pytest
import torch

from drifting.guidance import alpha_quantile, guidance_weight, sample_alpha

U = torch.tensor([0.25, 0.5, 0.75, 0.9], dtype=torch.float64)


@pytest.mark.parametrize(
    "power, expected",
    [(3, [1.14, 1.37, 1.84, 2.53]), (5, [1.07, 1.19, 1.41, 1.76])],  # official-code-notes.md section 3
)
def test_quantiles_match_the_authors_table(power, expected):
    alpha = alpha_quantile(U, power=power)
    torch.testing.assert_close(alpha, torch.tensor(expected, dtype=torch.float64), atol=5e-3, rtol=0)


@pytest.mark.parametrize("power", [-1.0, 0.0, 0.5, 2.0, 3.0, 5.0])
def test_quantile_is_the_closed_form_inverse_cdf(power):
    a, b, s = 1.0, 4.0, 1.0 - power
    u = torch.linspace(0, 1, 11, dtype=torch.float64)
    expected = (a**s + u * (b**s - a**s)) ** (1 / s)
    torch.testing.assert_close(alpha_quantile(u, power=power), expected, rtol=1e-12, atol=1e-12)


def test_power_one_is_log_uniform_and_continuous():
    u = torch.linspace(0, 1, 11, dtype=torch.float64)
    log_uniform = 1.5 * (3.0 / 1.5) ** u
    torch.testing.assert_close(alpha_quantile(u, power=1, alpha_min=1.5, alpha_max=3.0), log_uniform)
    # The expm1/log1p form has no cancellation near power = 1.
    near = alpha_quantile(u, power=1 + 1e-9, alpha_min=1.5, alpha_max=3.0)
    torch.testing.assert_close(near, log_uniform, rtol=1e-8, atol=0)


def test_sample_alpha_follows_the_law():
    alpha = sample_alpha(200_000, power=3, generator=torch.Generator().manual_seed(0))
    assert alpha.shape == (200_000,) and alpha.dtype == torch.float32
    assert alpha.min() >= 1.0 and alpha.max() <= 4.0
    # Empirical quantiles against the table (standard error of a quantile here is ~0.002).
    q = torch.quantile(alpha[:100_000].double(), U)
    torch.testing.assert_close(q, alpha_quantile(U, power=3), atol=0.02, rtol=0)
    # Mean of p(alpha) ~ alpha^-3 on [1, 4]: (1 - 1/4) / ((1 - 1/16) / 2) = 1.6.
    assert abs(alpha.double().mean().item() - 1.6) < 0.01


def test_no_guidance_fraction():
    alpha = sample_alpha(100_000, power=3, no_guidance_frac=0.5, generator=torch.Generator().manual_seed(1))
    frac_one = (alpha == 1.0).double().mean().item()
    assert abs(frac_one - 0.5) < 0.01
    assert (sample_alpha(100, power=5, no_guidance_frac=1.0) == 1).all()


def test_sample_alpha_deterministic_and_stream_independent_of_frac():
    a = sample_alpha(64, power=5, generator=torch.Generator().manual_seed(7))
    b = sample_alpha(64, power=5, generator=torch.Generator().manual_seed(7))
    assert torch.equal(a, b)
    # The random stream advances equally with or without the no-guidance coin being used.
    g0, g1 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    sample_alpha(10, power=3, generator=g0)
    sample_alpha(10, power=3, no_guidance_frac=0.5, generator=g1)
    assert torch.equal(torch.rand(5, generator=g0), torch.rand(5, generator=g1))


def test_degenerate_interval_and_empty():
    assert (sample_alpha(5, power=3, alpha_min=2.0, alpha_max=2.0) == 2.0).all()
    assert sample_alpha(0, power=3).shape == (0,)


def test_guidance_weight():
    # Ablation: C_g = 64, C_n = 16 -> 3.9375 (alpha - 1); SOTA: C_g = 64, C_n = 32 -> 1.96875 (alpha - 1).
    assert guidance_weight(4.0, 64, 16) == pytest.approx(3 * 63 / 16)
    assert guidance_weight(1.0, 64, 32) == 0.0
    alpha = torch.tensor([1.0, 2.0, 3.5])
    torch.testing.assert_close(guidance_weight(alpha, 64, 32), (alpha - 1) * 63 / 32)
    assert guidance_weight(3.0, 5, 0) == 8.0  # max(1, C_n)
    # A.7: alpha = ((C_g - 1) + C_n w) / (C_g - 1).
    c_g, c_n, a = 16, 8, 2.7
    w = guidance_weight(a, c_g, c_n)
    assert ((c_g - 1) + c_n * w) / (c_g - 1) == pytest.approx(a)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(n=-1, power=3), "n must"),
        (dict(n=2.0, power=3), "n must"),
        (dict(n=2, power=math.nan), "power"),
        (dict(n=2, power=3, alpha_min=0.5), "alpha_min"),
        (dict(n=2, power=3, alpha_min=3.0, alpha_max=2.0), "alpha_max"),
        (dict(n=2, power=3, no_guidance_frac=1.5), "no_guidance_frac"),
    ],
)
def test_sample_alpha_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        sample_alpha(**kwargs)


def test_guidance_weight_errors():
    with pytest.raises(ValueError, match="num_gen"):
        guidance_weight(2.0, 0, 4)
    with pytest.raises(ValueError, match="num_uncond"):
        guidance_weight(2.0, 4, -1)
    with pytest.raises(ValueError, match="alpha"):
        guidance_weight(0.5, 4, 4)
    with pytest.raises(ValueError, match="alpha"):
        guidance_weight(torch.tensor([1.0, 0.9]), 4, 4)
    with pytest.raises(ValueError, match="floating"):
        guidance_weight(torch.tensor([1, 2]), 4, 4)
