"""qlib.domain.shifts: corruptions are deterministic, bounded, shape-preserving and do what they say.

Reference: the formulas of the module docstring (ImageNet-C style corruptions, Hendrycks &
Dietterich 2019), checked on fresh random images every run; rotation against ``torch.rot90``.
"""

from __future__ import annotations

import pytest
import torch

from qlib.domain import shifts
from qlib.domain.shifts import SEVERITIES, SHIFTS, corrupt, corrupt_dataset


def images(n=6, size=8, seed=None):
    g = torch.Generator().manual_seed(seed if seed is not None else int(torch.randint(0, 2**31, (1,))))
    return torch.randn(n, 1, size, size, generator=g) * 1.3 + 0.2


@pytest.mark.parametrize("shift", SHIFTS)
@pytest.mark.parametrize("severity", SEVERITIES)
def test_deterministic_bounded_and_shape_preserving(shift, severity):
    x = images()
    a, b = corrupt(x, shift, severity, seed=3), corrupt(x, shift, severity, seed=3)
    assert torch.equal(a, b)
    assert a.shape == x.shape and a.dtype == x.dtype
    assert a.min() >= x.min() - 1e-6 and a.max() <= x.max() + 1e-6
    assert torch.isfinite(a).all()
    assert not torch.equal(a, x)


@pytest.mark.parametrize("shift", ["gaussian_noise", "rotation", "elastic"])
def test_random_shifts_depend_on_the_seed_only(shift):
    x = images(n=16)
    state = torch.random.get_rng_state()
    a, b = corrupt(x, shift, 5, seed=0), corrupt(x, shift, 5, seed=1)
    assert torch.equal(torch.random.get_rng_state(), state)  # the global generator is untouched
    assert not torch.equal(a, b)


@pytest.mark.parametrize("shift", SHIFTS)
def test_damage_grows_with_severity(shift):
    x = images(n=32, size=16)
    err = [(corrupt(x, shift, s, seed=0) - x).pow(2).mean().item() for s in SEVERITIES]
    assert all(e2 > e1 for e1, e2 in zip(err, err[1:])), err


def test_explicit_bounds_are_respected():
    x = images()
    lo, hi = x.min().item() - 1.0, x.max().item() + 1.0
    out = corrupt(x, "gaussian_noise", 5, bounds=(lo, hi))
    assert out.min() >= lo - 1e-6 and out.max() <= hi + 1e-6


def test_formulas_in_pixel_units():
    u = torch.rand(4, 1, 8, 8)
    assert torch.allclose(shifts.inversion(u, 1.0), 1 - u)
    assert torch.allclose(shifts.contrast(u, 0.5).mean((1, 2, 3)), u.mean((1, 2, 3)), atol=1e-6)
    assert torch.allclose(shifts.contrast(u, 0.5) - shifts.contrast(u, 0.5).mean((1, 2, 3), keepdim=True),
                          0.5 * (u - u.mean((1, 2, 3), keepdim=True)), atol=1e-6)
    blurred = shifts.blur(torch.ones(2, 1, 8, 8), 1.0)
    assert torch.allclose(blurred, torch.ones_like(blurred))  # a blur keeps constants
    noise = shifts.gaussian_noise(torch.zeros(1, 1, 64, 64), 0.1, seed=0)
    assert abs(noise.std().item() - 0.1) < 0.01


def test_rotation_by_90_degrees_matches_rot90():
    u = torch.rand(3, 1, 8, 8)
    r = shifts.rotation(u, 90.0, seed=0)
    sign = torch.randint(0, 2, (3,), generator=torch.Generator().manual_seed(0)) * 2 - 1
    for i in range(3):
        want = torch.rot90(u[i], k=1 if sign[i] > 0 else -1, dims=(1, 2))
        assert torch.allclose(r[i], want, atol=1e-5), i


def test_none_and_dataset_wrapper():
    x = images()
    assert torch.equal(corrupt(x, "none", 0), x)
    ds = torch.utils.data.TensorDataset(x, torch.arange(len(x)))
    out = corrupt_dataset(ds, "blur", 2)
    assert torch.equal(out.tensors[1], ds.tensors[1])
    assert torch.equal(out.tensors[0], corrupt(x, "blur", 2))


def test_bad_input_is_rejected_with_a_clear_message():
    x = images()
    with pytest.raises(ValueError, match="unknown shift"):
        corrupt(x, "fog", 1)
    with pytest.raises(ValueError, match="severity"):
        corrupt(x, "blur", 6)
    with pytest.raises(ValueError, match=r"\(N, C, H, W\)"):
        corrupt(x[0], "blur", 1)
    with pytest.raises(ValueError, match="NaN"):
        corrupt(x.masked_fill(x > 1, float("nan")), "blur", 1)
    with pytest.raises(TypeError, match="torch.Tensor"):
        corrupt(x.numpy(), "blur", 1)
    with pytest.raises(ValueError, match="hi > lo"):
        corrupt(x, "blur", 1, bounds=(1.0, 0.0))
