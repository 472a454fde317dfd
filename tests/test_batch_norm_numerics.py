"""Numerical behaviour: stable variance, NaN/Inf propagation, literature properties."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import assume, given, settings, strategies as st
from hypothesis.extra.numpy import arrays

import gpubn
from conftest import assert_close, to_backend, to_numpy, torch_batch_norm


# ------------------------------------------------------------ stability ----
@pytest.mark.parametrize("shape,axis", [((4, 2, 500, 500), 1), ((1000, 1000, 2), -1),
                                        ((1_000_000, 2), 1)],
                         ids=["nchw", "channels-last", "nc"])
def test_variance_stable_for_large_mean_float32(shape, axis):
    """1e4 + N(0, 1) in float32, a million values per channel: the batch
    variance (read back from running_var with momentum=1) is right to 1e-3."""
    rng = np.random.default_rng(0)
    x = (1e4 + rng.standard_normal(shape, dtype=np.float32)).astype(np.float32)
    c = shape[axis]
    rm, rv = np.zeros(c, np.float32), np.ones(c, np.float32)
    y, saved = gpubn.batch_norm_forward(x, running_mean=rm, running_var=rv, momentum=1.0,
                                        axis=axis, backend="numpy")
    xs = np.moveaxis(x, axis, 0).reshape(c, -1).astype(np.float64)
    n = xs.shape[1]
    exact_mean = xs.mean(axis=1)
    exact_var = ((xs - exact_mean[:, None]) ** 2).sum(axis=1) / (n - 1)
    np.testing.assert_allclose(rv, exact_var, rtol=1e-3)
    np.testing.assert_allclose(rm, exact_mean, rtol=1e-7)
    np.testing.assert_allclose(1.0 / saved.invstd ** 2 - 1e-5, exact_var * (n - 1) / n, rtol=1e-3)
    # the output is standardized
    ys = np.moveaxis(y, axis, 0).reshape(c, -1).astype(np.float64)
    np.testing.assert_allclose(ys.std(axis=1), 1.0, rtol=1e-3)


def test_variance_stable_small_spread_on_backend(backend):
    x = (1e4 + np.random.default_rng(1).standard_normal((16, 3, 33))).astype(np.float32)
    rv = to_backend(backend, np.ones(3, np.float32))
    rm = to_backend(backend, np.zeros(3, np.float32))
    gpubn.batch_norm_forward(to_backend(backend, x), running_mean=rm, running_var=rv,
                             momentum=1.0, backend=backend.name)
    exact = np.moveaxis(x, 1, 0).reshape(3, -1).astype(np.float64).var(axis=1, ddof=1)
    np.testing.assert_allclose(to_numpy(rv), exact, rtol=1e-3)


# ------------------------------------------------------------- NaN / Inf ----
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_nan_inf_propagate_like_torch(backend, training):
    x = np.random.default_rng(0).standard_normal((5, 3, 4))
    x[1, 0, 2] = np.nan
    x[3, 1, 0] = np.inf
    rm, rv = np.zeros(3), np.ones(3)
    ref = torch_batch_norm(x, None, None, rm.copy(), rv.copy(), training=training)
    rm_b, rv_b = to_backend(backend, rm), to_backend(backend, rv)
    y, _ = gpubn.batch_norm_forward(to_backend(backend, x), running_mean=rm_b, running_var=rv_b,
                                    training=training, backend=backend.name)
    y = to_numpy(y)
    if training:          # whole channel poisoned, channel 2 untouched
        assert np.isnan(y[:, 0]).all() and np.isnan(y[:, 1]).all()
        assert np.isfinite(y[:, 2]).all()
    else:                 # confined to the element
        assert np.isnan(y).sum() == 1 and np.isinf(y).sum() == 1
    assert_close(y, ref["y"], np.float64, "y")
    assert_close(rm_b, ref["running_mean"], np.float64, "running_mean")
    assert_close(rv_b, ref["running_var"], np.float64, "running_var")


# ------------------------------------------------------------ properties ----
def _batch(draw_shape):
    # distinct values: a constant channel (which the checks must skip) stays rare
    return arrays(np.float64, draw_shape, unique=True,
                  elements=st.floats(-100, 100, allow_nan=False, allow_infinity=False))


shapes = st.tuples(st.integers(2, 6), st.integers(1, 4), st.integers(1, 5))


def _spread_enough(x):
    """Property checks need channels whose values are not (almost) constant."""
    s = np.moveaxis(x, 1, 0).reshape(x.shape[1], -1)
    return bool((s.std(axis=1) > 1e-3 * (1 + np.abs(s).max(axis=1))).all())


@settings(max_examples=40, deadline=None)
@given(data=st.data(), shape=shapes)
def test_property_output_standardized(data, shape):
    x = data.draw(_batch(shape))
    assume(_spread_enough(x))
    y, _ = gpubn.batch_norm_forward(x, eps=1e-12, backend="numpy")
    ys = np.moveaxis(y, 1, 0).reshape(shape[1], -1)
    var = np.moveaxis(x, 1, 0).reshape(shape[1], -1).var(axis=1)
    np.testing.assert_allclose(ys.mean(axis=1), 0, atol=1e-9)
    # var(y) = var / (var + eps): 1 - 2.6e-7 for two values 2**-8 apart
    np.testing.assert_allclose(ys.var(axis=1), var / (var + 1e-12), rtol=1e-7)


@settings(max_examples=40, deadline=None)
@given(data=st.data(), shape=shapes, a=st.floats(1e-2, 1e2), b=st.floats(-1e3, 1e3))
def test_property_affine_invariance_and_gradient_scaling(data, shape, a, b):
    """BN(a*x + b) == BN(x) for a > 0; dx scales as 1/a; dx sums to 0 per channel."""
    x = data.draw(_batch(shape))
    assume(_spread_enough(x))
    # eps (1e-12) must stay negligible next to the variance of a * x too
    assume((a * np.moveaxis(x, 1, 0).reshape(shape[1], -1).std(axis=1)).min() ** 2 >= 1e-5)
    dy = data.draw(_batch(shape))
    w = np.linspace(0.5, 1.5, shape[1])
    y1, s1 = gpubn.batch_norm_forward(x, weight=w, eps=1e-12, backend="numpy")
    y2, s2 = gpubn.batch_norm_forward(a * x + b, weight=w, eps=1e-12, backend="numpy")
    np.testing.assert_allclose(y2, y1, rtol=1e-6, atol=1e-6)
    dx1, dw1, _ = gpubn.batch_norm_backward(dy, s1)
    dx2, dw2, _ = gpubn.batch_norm_backward(dy, s2)
    # natural scale of dx: |dy| * weight * invstd (dx itself may cancel to ~0)
    scale = (np.abs(dy).max() + 1.0) * w.max() * float(np.max(s1.invstd))
    np.testing.assert_allclose(dx2 * a / scale, dx1 / scale, atol=1e-6)
    np.testing.assert_allclose(dw2, dw1, rtol=1e-6, atol=1e-6 * (1 + np.abs(dw1).max()))
    sums = np.moveaxis(dx1, 1, 0).reshape(shape[1], -1).sum(axis=1)
    np.testing.assert_allclose(sums / scale, 0, atol=1e-9 * dx1.size)
