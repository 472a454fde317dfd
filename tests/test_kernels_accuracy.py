"""Accuracy far from zero, on every backend: float32 data 1e4 + N(0, 1),
y and dx against a float64 evaluation of the same formulas on the same
float32 values, for channel axis 1 (NCHW) and channels last.

The bounds below are derived, not measured; the tests assert them
elementwise, and assert that they meet the library's goal of 5e-5.
``u = 2**-24`` is float32's unit roundoff, ``mu`` / ``invstd`` / ``xhat`` the
exact (float64) channel mean, inverse std and normalized input, ``a = weight
* invstd``.

y.  Every backend subtracts the mean before it scales,
``y = (x - hi) * scale + (bias - lo * scale)`` with ``hi + lo`` the mean
(the kernels carry that pair from their compensated statistics; NumPy
accumulates in float64).  ``x - hi`` is exact (Sterbenz: x and hi lie
within a factor 2), ``hi + lo`` and invstd are right to a few u relative,
so with one rounding each for ``scale``, ``shift``, the FMA and the float32
result::

    |y - y64| <= 8 u (|xhat * weight| + |bias| + |weight|)

(about 5e-6 here; the kernels reach 4e-7).  Folding the mean into the shift
instead, ``y = x * scale + (bias - mean * scale)``, rounds |mean * scale| =
1e4 on every element: 7e-4.

dx.  The saved mean is float32 (as in PyTorch), ``hi = mu + delta`` with
``|delta| <= ulp(mu) / 2`` (2**-11 at 1e4), and every backend's backward
uses it consistently (its sums and dx are centred on hi).  With
``e = delta * invstd`` the centred formula gives exactly::

    dx(hi) - dx(mu) = a * e * (mean(dy * xhat) + xhat * mean(dy) - e * mean(dy))

which is small because mean(dy) and mean(dy * xhat) are: ~1/sqrt(m) for
m values per channel.  Rounding of the float32 arithmetic adds at most
``16 u |a| (|dy| + |xhat| + 1)``.  With m = 16384 the bound is about 3e-5.
"""

from __future__ import annotations

import numpy as np
import pytest

import gpubn
from conftest import to_backend, to_numpy

U = 2.0 ** -24
EPS = 1e-5
GOAL = 5e-5

LAYOUTS = {"nchw": ((16, 3, 32, 32), 1), "channels-last": ((16, 32, 32, 3), -1)}


def _case(shape, axis):
    rng = np.random.default_rng(15)
    x = (1e4 + rng.standard_normal(shape)).astype(np.float32)
    dy = rng.standard_normal(shape).astype(np.float32)
    c = shape[axis]
    weight = rng.uniform(0.5, 1.5, c).astype(np.float32)
    bias = rng.uniform(-3.0, 3.0, c).astype(np.float32)
    return x, dy, weight, bias


def _reference(x, dy, weight, bias, axis):
    """float64 y, dx, and the per-element bounds of the module docstring."""
    xs = np.moveaxis(x.astype(np.float64), axis, -1)
    gs = np.moveaxis(dy.astype(np.float64), axis, -1)
    red = tuple(range(xs.ndim - 1))
    mu = xs.mean(red)
    invstd = 1.0 / np.sqrt(xs.var(red) + EPS)
    xhat = (xs - mu) * invstd
    y = xhat * weight + bias
    a = weight * invstd
    mean_dy, mean_dy_xhat = gs.mean(red), (gs * xhat).mean(red)
    dx = a * (gs - mean_dy - xhat * mean_dy_xhat)
    y_bound = 8 * U * (np.abs(xhat * weight) + np.abs(bias) + np.abs(weight))
    e = np.spacing(mu.astype(np.float32)).astype(np.float64) / 2 * invstd
    dx_bound = (np.abs(a) * e * (np.abs(mean_dy_xhat) + np.abs(xhat) * np.abs(mean_dy)
                                 + e * np.abs(mean_dy))
                + 16 * U * np.abs(a) * (np.abs(gs) + np.abs(xhat) + 1))
    back = lambda t: np.moveaxis(t, -1, axis)  # noqa: E731
    return back(y), back(dx), back(y_bound), back(dx_bound)


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_far_from_zero_float32(backend, layout):
    shape, axis = LAYOUTS[layout]
    x, dy, weight, bias = _case(shape, axis)
    y_ref, dx_ref, y_bound, dx_bound = _reference(x, dy, weight, bias, axis)
    assert y_bound.max() < GOAL and dx_bound.max() < GOAL  # the bounds meet the goal
    put = lambda a: to_backend(backend, a)  # noqa: E731
    y, saved = gpubn.batch_norm_forward(put(x), weight=put(weight), bias=put(bias), axis=axis,
                                        backend=backend.name)
    dx, _, _ = gpubn.batch_norm_backward(put(dy), saved)
    y_err = np.abs(to_numpy(y).astype(np.float64) - y_ref)
    dx_err = np.abs(to_numpy(dx).astype(np.float64) - dx_ref)
    worst = np.unravel_index(np.argmax(y_err - y_bound), y_err.shape)
    assert (y_err <= y_bound).all(), (
        f"y off by {y_err[worst]:.3g} at {worst} (bound {y_bound[worst]:.3g})")
    worst = np.unravel_index(np.argmax(dx_err - dx_bound), dx_err.shape)
    assert (dx_err <= dx_bound).all(), (
        f"dx off by {dx_err[worst]:.3g} at {worst} (bound {dx_bound[worst]:.3g})")


def test_the_y_bound_catches_a_folded_mean():
    """The planted defect: y = x * scale + (bias - mean * scale) with float32
    constants (what the kernels did before) breaks the y bound by far."""
    shape, axis = LAYOUTS["nchw"]
    x, dy, weight, bias = _case(shape, axis)
    y_ref, _, y_bound, _ = _reference(x, dy, weight, bias, axis)
    xs = np.moveaxis(x, axis, -1)
    mean = xs.astype(np.float64).mean(axis=(0, 1, 2)).astype(np.float32)
    invstd = (1 / np.sqrt(xs.astype(np.float64).var(axis=(0, 1, 2)) + EPS)).astype(np.float32)
    scale = weight * invstd
    y = np.moveaxis(xs * scale + (bias - mean * scale), -1, axis)
    assert (np.abs(y - y_ref) > y_bound).any()
    assert np.abs(y - y_ref).max() > 10 * GOAL


def test_the_dx_bound_catches_variance_from_a_rounded_mean():
    """The planted defect: Welford with a float32 mean rounded at 1e4 on every
    step (what the kernels did before) gives the variance to ~1e-4 relative;
    dx from that invstd breaks the dx bound."""
    shape, axis = LAYOUTS["channels-last"]
    x, dy, weight, bias = _case(shape, axis)
    _, dx_ref, _, dx_bound = _reference(x, dy, weight, bias, axis)
    xs = np.moveaxis(x.astype(np.float64), axis, -1)
    gs = np.moveaxis(dy.astype(np.float64), axis, -1)
    mean = xs.mean(axis=(0, 1, 2)).astype(np.float32).astype(np.float64)
    invstd = 1.0 / np.sqrt(xs.var(axis=(0, 1, 2)) * (1 + 2e-4) + EPS)
    xhat = (xs - mean) * invstd
    dx = weight * invstd * (gs - gs.mean(axis=(0, 1, 2))
                            - xhat * (gs * xhat).mean(axis=(0, 1, 2)))
    assert (np.abs(np.moveaxis(dx, -1, axis) - dx_ref) > dx_bound).any()


def _ln_case(n):
    """Rows of 1e4 + N(0, 1), their float64 y, the y bound and the row means."""
    rng = np.random.default_rng(16)
    x = (1e4 + rng.standard_normal((8, n))).astype(np.float32)
    w = rng.uniform(0.5, 1.5, n).astype(np.float32)
    b = rng.uniform(-3.0, 3.0, n).astype(np.float32)
    x64 = x.astype(np.float64)
    mu = x64.mean(axis=1, keepdims=True)
    xhat = (x64 - mu) / np.sqrt(x64.var(axis=1, keepdims=True) + EPS)
    bound = 8 * U * (np.abs(xhat * w) + np.abs(b) + np.abs(w))   # as for batch norm's y
    return x, w, b, xhat * w + b, bound, mu


@pytest.mark.parametrize("n", [256, 1031])
def test_layer_norm_far_from_zero_float32(backend, n):
    """Layer norm subtracts the row mean as a pair too: y within the bound
    of batch norm's y (module docstring), for warp-per-row (256) and
    block-per-row (1031, odd: scalar accesses) rows."""
    x, w, b, y_ref, bound, _ = _ln_case(n)
    assert bound.max() < GOAL
    put = lambda a: to_backend(backend, a)  # noqa: E731
    y, _ = gpubn.layer_norm_forward(put(x), n, put(w), put(b), eps=EPS, backend=backend.name)
    err = np.abs(to_numpy(y).astype(np.float64) - y_ref)
    assert (err <= bound).all(), f"y off by {err.max():.3g} (bound {bound.max():.3g})"


def test_the_layer_norm_bound_catches_a_rounded_mean():
    """The planted defect: (x - mean) * rstd with the mean rounded to float32
    (what the layer-norm kernels did before) breaks the bound."""
    x, w, b, y_ref, bound, mu = _ln_case(1031)
    x64 = x.astype(np.float64)
    rstd = 1 / np.sqrt(x64.var(axis=1, keepdims=True) + EPS)
    y = (x64 - mu.astype(np.float32)) * rstd * w + b
    assert (np.abs(y - y_ref) > bound).any()
