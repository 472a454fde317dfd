"""The bounds of conftest catch what they must: sum_tolerance a systematic
error of one ulp of the storage dtype per summand, assert_rounded_close a
float16 output one ulp off (the planted defects), while exact values and every
backend's results (tests/test_batch_norm.py) pass them."""

from __future__ import annotations

import numpy as np
import pytest

import gpubn
from conftest import assert_rounded_close, assert_sum_close, bn_output_slack, bn_sum_terms
from test_batch_norm import make_input


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
    slack = bn_output_slack(x, None, None, 1, np.float16)
    rounded = exact.astype(np.float16)
    assert_rounded_close(rounded, exact, np.float16, slack, "y")
    one_ulp_off = np.nextafter(rounded, np.float16(np.inf))
    with pytest.raises(AssertionError, match=r"y: \d+ of \d+ elements differ beyond half an ulp"):
        assert_rounded_close(one_ulp_off, exact, np.float16, slack, "y")
