"""The NumPy reference against the float64 textbook formulas, written out
here independently of the backend (its pieces and its fused methods)."""

from __future__ import annotations

import numpy as np
import pytest

import gpubn
from conftest import DTYPES, assert_close
from test_batch_norm import make_input


def test_backend_interface_pieces_agree_with_fused():
    """bn_stats, bn_apply, bn_backward_reduce and bn_backward_dx (the pieces a
    multi-process batch norm combines) give what the fused methods give."""
    be = gpubn.backends.get_backend("numpy")
    x3 = make_input((6, 3, 70), 1, np.float64)
    dy3 = np.random.default_rng(1).standard_normal(x3.shape)
    w, bias = np.array([0.5, 1.0, 2.0]), np.array([0.1, 0.2, 0.3])
    st = be.bn_stats(x3)
    assert st.count == 6 * 70
    xs = np.moveaxis(x3, 1, 0).reshape(3, -1)
    np.testing.assert_allclose(st.mean, xs.mean(axis=1), rtol=1e-12)
    np.testing.assert_allclose(st.m2, ((xs - xs.mean(axis=1, keepdims=True)) ** 2).sum(axis=1),
                               rtol=1e-12)
    y3, mean, invstd = be.bn_forward_train(x3, w, bias, None, None, 0.1, 1e-5)
    np.testing.assert_allclose(invstd, 1 / np.sqrt(st.m2 / st.count + 1e-5), rtol=1e-12)
    np.testing.assert_allclose(be.bn_apply(x3, mean, invstd, w, bias), y3, rtol=1e-12,
                               atol=1e-12)
    dx3, dw, db = be.bn_backward(dy3, x3, mean, invstd, w, True)
    sum_dy, sum_dy_xhat = be.bn_backward_reduce(dy3, x3, mean, invstd)
    np.testing.assert_allclose(sum_dy, db, rtol=1e-12)
    np.testing.assert_allclose(sum_dy_xhat, dw, rtol=1e-12)
    dx_parts = be.bn_backward_dx(dy3, x3, mean, invstd, w, sum_dy, sum_dy_xhat, st.count)
    np.testing.assert_allclose(dx_parts, dx3, rtol=1e-10, atol=1e-12)
    ye, me, ie = be.bn_forward_eval(x3, w, bias, np.array([1.0, 2.0, 3.0]),
                                    np.array([4.0, 1.0, 0.25]), 1e-5)
    np.testing.assert_allclose(ie, 1 / np.sqrt(np.array([4.0, 1.0, 0.25]) + 1e-5))
    np.testing.assert_allclose(
        ye, (x3 - me[:, None]) * (ie * w)[:, None] + bias[:, None], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
def test_layer_norm_matches_float64_formula(dtype):
    be = gpubn.backends.get_backend("numpy")
    rng = np.random.default_rng(5)
    x = (rng.standard_normal((41, 37)) * 2 + 100).astype(dtype)
    dy = rng.standard_normal(x.shape).astype(dtype)
    w = np.linspace(0.5, 1.5, 37)
    b = np.linspace(-1, 1, 37)
    acc = np.float64 if dtype == np.float64 else np.float32
    y, mean, rstd = be.ln_forward(x, w.astype(acc), b.astype(acc), 1e-5)
    dx, dw, db = be.ln_backward(dy, x, mean, rstd, w.astype(acc), True)
    x64, dy64 = x.astype(np.float64), dy.astype(np.float64)
    mu = x64.mean(axis=1, keepdims=True)
    rs = 1.0 / np.sqrt(((x64 - mu) ** 2).mean(axis=1, keepdims=True) + 1e-5)
    xhat = (x64 - mu) * rs
    g = dy64 * w
    dx_ref = rs * (g - g.mean(axis=1, keepdims=True)
                   - xhat * (g * xhat).mean(axis=1, keepdims=True))
    assert mean.dtype == rstd.dtype == dw.dtype == db.dtype == acc
    assert_close(y, xhat * w + b, dtype, "y")
    assert_close(mean, mu[:, 0], dtype, "mean")
    assert_close(rstd, rs[:, 0], dtype, "rstd")
    assert_close(dx, dx_ref, dtype, "dx")
    assert_close(dw, (dy64 * xhat).sum(axis=0), dtype, "dweight")
    assert_close(db, dy64.sum(axis=0), dtype, "dbias")
    dx_only, none_w, none_b = be.ln_backward(dy, x, mean, rstd, w.astype(acc), False)
    np.testing.assert_array_equal(dx_only, dx)
    assert none_w is None and none_b is None


def test_statistics_of_far_from_zero_data_are_exact_to_float64():
    """Two passes in float64: 1e4 + N(0, 1) float32 data keeps its variance to
    float64 rounding (a one-pass E[x^2] - E[x]^2 in float32 would lose it all)."""
    x3 = (1e4 + np.random.default_rng(0).standard_normal((4, 3, 4000))).astype(np.float32)
    st = gpubn.backends.get_backend("numpy").bn_stats(x3)
    xs = np.moveaxis(x3, 1, 0).reshape(3, -1).astype(np.float64)
    mean = xs.mean(axis=1)
    m2 = ((xs - mean[:, None]) ** 2).sum(axis=1)
    # rounded once to float32: half an ulp each
    np.testing.assert_allclose(st.mean, mean, rtol=2 ** -24)
    np.testing.assert_allclose(st.m2, m2, rtol=2 ** -23)
