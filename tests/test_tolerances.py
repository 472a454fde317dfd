"""The bounds of conftest catch what they must: sum_tolerance a systematic
error of one ulp of the storage dtype per summand, assert_rounded_close with
the batch norm, layer norm and batch renorm slacks a float16 output or dx one
ulp off (the planted defects), while exact values and every backend's results
(tests/test_batch_norm.py, test_layer_norm.py, test_renorm.py) pass them."""

from __future__ import annotations

import numpy as np
import pytest

import gpubn
from conftest import (BFLOAT16, assert_rounded_close, assert_sum_close, bn_dx_slack, bn_output_slack,
                      bn_sum_terms, ln_dx_slack, ln_output_slack, renorm_output_slack)
from test_batch_norm import make_input
from test_layer_norm import make as make_layer_norm
from test_renorm import make_case as make_renorm_case, paper_backward, paper_train_step


def _one_ulp_per_term(terms, red, dtype):
    """Exact sums plus one ulp of ``dtype`` per summand, all in one direction."""
    t = np.asarray(terms, dtype=np.float64)
    ulps = np.abs(np.spacing(t.astype(dtype))).astype(np.float64)
    return t.sum(axis=red), (t + ulps).sum(axis=red)


@pytest.mark.parametrize("shape,dtype", [
    ((6, 4), np.float16),               # m = 6
    ((3, 5, 7, 13), np.float16),        # m = 273
    ((4, 2, 96, 64), np.float16),       # m = 24576
    ((4, 2, 96, 64), np.float32),
    ((4, 2, 96, 64), np.float64),
], ids=lambda v: "x".join(map(str, v)) if isinstance(v, tuple) else np.dtype(v).name)
def test_one_ulp_per_summand_fails_the_bound(shape, dtype):
    x = make_input(shape, 1, dtype)
    dy = np.random.default_rng(2).standard_normal(shape).astype(dtype)
    red, db_terms, dw_terms = bn_sum_terms(x, dy, 1)
    x64 = x.astype(np.float64)
    xh = (x64 - x64.mean(axis=red, keepdims=True)) / np.sqrt(x64.var(axis=red, keepdims=True) + 1e-5)
    for name, terms, exact_terms in (("dbias", db_terms, db_terms),
                                     ("dweight", dw_terms, dy.astype(np.float64) * xh)):
        exact, planted = _one_ulp_per_term(exact_terms, red, dtype)
        assert_sum_close(exact, exact, terms, red, dtype, name)
        with pytest.raises(AssertionError, match=rf"{name}: \d+ of \d+ sums differ beyond"):
            assert_sum_close(planted, exact, terms, red, dtype, name)


def test_float16_dweight_bound_is_far_below_a_float16_tolerance():
    """The old scaled float16 tolerance (rtol = atol = 0.01 * sqrt(m) / 4, 0.39
    for m = 24576) let any error through; the bound is near float32's."""
    shape = (4, 2, 96, 64)
    x = make_input(shape, 1, np.float16)
    dy = np.random.default_rng(2).standard_normal(shape).astype(np.float16)
    _, saved = gpubn.batch_norm_forward(x, weight=np.ones(2, np.float32), backend="numpy")
    _, dw, _ = gpubn.batch_norm_backward(dy, saved)
    red, _, dw_terms = bn_sum_terms(x, dy, 1)
    off = np.abs(dw).astype(np.float64) * 1e-3 + 1e-3     # passes rtol=atol=0.39 easily
    with pytest.raises(AssertionError, match=r"dweight: 2 of 2 sums differ"):
        assert_sum_close(dw.astype(np.float64) + off, dw, dw_terms, red, np.float16, "dweight")


@pytest.mark.parametrize("shape", [(6, 4), (4, 2, 96, 64)], ids=["m6", "m24576"])
def test_one_ulp_per_float16_output_fails_the_elementwise_bound(shape):
    """The correctly rounded float16 output passes assert_rounded_close with
    batch norm's slack; the same output one float16 ulp off everywhere fails."""
    x = make_input(shape, 1, np.float16)
    x64 = x.astype(np.float64)
    red = tuple(i for i in range(x.ndim) if i != 1)
    exact = (x64 - x64.mean(axis=red, keepdims=True)) / np.sqrt(
        x64.var(axis=red, keepdims=True) + 1e-5)
    _rounded_passes_one_ulp_off_fails(exact, np.dtype(np.float16),
                                      bn_output_slack(x, None, None, 1, np.float16), "y")


HALF_DTYPES = [np.dtype(np.float16)] + ([BFLOAT16] if BFLOAT16 is not None else [])


def _rounded_passes_one_ulp_off_fails(exact, dtype, slack, name):
    """``exact`` rounded once to ``dtype`` passes assert_rounded_close with
    ``slack``; the same values one ulp of ``dtype`` further up fail."""
    rounded = exact.astype(dtype)
    assert_rounded_close(rounded, exact, dtype, slack, name)
    one_ulp_off = np.nextafter(rounded, np.array(np.inf, dtype))
    with pytest.raises(AssertionError,
                       match=rf"{name}: \d+ of \d+ elements differ beyond half an ulp"):
        assert_rounded_close(one_ulp_off, exact, dtype, slack, name)


@pytest.mark.parametrize("shape,n", [((3, 7), 7), ((2, 3, 5), 15), ((2, 2048), 2048)],
                         ids=["n7", "n15", "n2048"])
@pytest.mark.parametrize("dtype", HALF_DTYPES, ids=lambda d: d.name)
def test_one_ulp_per_half_layer_norm_output_and_dx_fails(shape, n, dtype):
    """Layer norm's y and dx bounds (those tests/test_layer_norm.py holds every
    backend to) pass the exact result rounded to float16 / bfloat16 and fail
    it one ulp off."""
    x, w, b, dy = make_layer_norm(shape, shape[-1:] if n == shape[-1] else shape[1:], dtype)
    eps = 1e-5
    x2 = x.astype(np.float64).reshape(-1, n)
    rstd = 1.0 / np.sqrt(x2.var(axis=1, keepdims=True) + eps)
    xhat = (x2 - x2.mean(axis=1, keepdims=True)) * rstd
    w2, b2 = w.astype(np.float64).reshape(1, n), b.astype(np.float64).reshape(1, n)
    y = (xhat * w2 + b2).reshape(shape)
    g = dy.astype(np.float64).reshape(-1, n) * w2
    dx = (rstd * (g - g.mean(axis=1, keepdims=True)
                  - xhat * (g * xhat).mean(axis=1, keepdims=True))).reshape(shape)
    _rounded_passes_one_ulp_off_fails(y, dtype, ln_output_slack(x, n, w, b, dtype), "y")
    _rounded_passes_one_ulp_off_fails(dx, dtype, ln_dx_slack(x, dy, n, w, dtype), "dx")


@pytest.mark.parametrize("shape", [(6, 4), (4, 2, 96, 64)], ids=["m6", "m24576"])
@pytest.mark.parametrize("dtype", HALF_DTYPES, ids=lambda d: d.name)
def test_one_ulp_per_half_renorm_output_and_dx_fails(shape, dtype):
    """Batch renorm's y and dx bounds (those tests/test_renorm.py holds every
    backend to), with r and d clipped on some channels, pass the paper's
    result rounded to float16 / bfloat16 and fail it one ulp off."""
    rmax, dmax, eps = 1.5, 0.5, 1e-3
    x, w, b, mu, sigma, dy = make_renorm_case(shape, 1, dtype)
    w, b, mu, sigma = (v.astype(np.float64) for v in (w, b, mu, sigma))
    ref = paper_train_step(x, w, b, mu, sigma, rmax, dmax, eps, 0.1)
    dx = paper_backward(x, dy, w, ref["r"], ref["d"], eps)[0]
    _rounded_passes_one_ulp_off_fails(
        ref["y"], dtype,
        renorm_output_slack(x, w, b, 1, dtype, ref["r"], ref["d"], mu, sigma, eps), "y")
    _rounded_passes_one_ulp_off_fails(
        dx, dtype, bn_dx_slack(x, dy, w * ref["r"], 1, dtype, True, eps=eps), "dx")
