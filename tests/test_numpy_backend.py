"""NumPy backend internals: tiling, threading and the fast/centred paths.

The backend walks arrays in cache-sized tiles on several threads; tiny tiles
here force every path (split rows, row blocks, remainders) on small inputs.
"""

from __future__ import annotations

import numpy as np
import pytest

import gpubn
from gpubn.backends import numpy_backend as nb
from conftest import DTYPES, assert_close, torch_batch_norm
from test_batch_norm import make_input


@pytest.fixture
def tiny_tiles(monkeypatch):
    monkeypatch.setattr(nb, "_CHUNK", 128)
    monkeypatch.setattr(nb, "_MIN_BLOCK_ROWS", 3)
    monkeypatch.setattr(nb, "_FOLD", 32)


@pytest.mark.parametrize("shape,axis", [
    ((5, 3, 300), 1),        # rows split into tiles of 128 + remainder
    ((7, 4, 70), 1),         # rows layout, several rows per tile
    ((51, 5, 3), 1),         # column layout: folded row blocks, unfolded remainder
    ((41, 300), 1),          # NC, rows wider than a tile
    ((9, 4, 6, 5), -1),      # channels-last
    ((5, 60, 2), 1),         # column layout, rows wider than a tile: column blocks
], ids=["split-rows", "rows", "columns", "nc-wide", "nhwc", "column-blocks"])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("offset", [0.0, 50.0], ids=["fast", "centred"])
def test_tiled_threaded_matches_torch_and_is_deterministic(tiny_tiles, monkeypatch, shape,
                                                           axis, dtype, offset):
    # offset 50: |mean| / std > 8 selects the centred (x - mean) code paths
    x = make_input(shape, axis, dtype, offset=0.5)
    if offset:
        x = (x.astype(np.float64) + offset).astype(dtype)
    c = shape[axis]
    w = np.linspace(0.5, 1.5, c)
    b = np.linspace(-1, 1, c)
    dy = np.random.default_rng(3).standard_normal(shape).astype(dtype)
    ref = torch_batch_norm(x, w, b, np.zeros(c), np.ones(c), axis=axis, dy=dy)
    paths = []
    real_fast = nb._fast
    monkeypatch.setattr(nb, "_fast", lambda m, i: paths.append(real_fast(m, i)) or paths[-1])
    results = []
    for threads in ("1", "3"):
        monkeypatch.setenv("GPUBN_NUM_THREADS", threads)
        rm, rv = np.zeros(c), np.ones(c)
        y, saved = gpubn.batch_norm_forward(x, weight=w, bias=b, running_mean=rm, running_var=rv,
                                            axis=axis, backend="numpy")
        dx, dw, db = gpubn.batch_norm_backward(dy, saved)
        results.append((y, dx, dw, db, rm, rv))
    assert paths and all(p == (offset == 0) for p in paths), paths
    for a, b_ in zip(*results):
        np.testing.assert_array_equal(a, b_)      # thread count changes nothing
    y, dx, dw, db, rm, rv = results[0]
    scale = 1.0
    assert_close(y, ref["y"], dtype, "y", scale=scale)
    assert_close(rm, ref["running_mean"], np.float32 if dtype != np.float64 else dtype, "rm")
    assert_close(rv, ref["running_var"], np.float32 if dtype != np.float64 else dtype, "rv",
                 scale=scale)
    assert_close(dx, ref["dx"], dtype, "dx", scale=2.0 * scale)
    m = x.size // c
    sums = max(1.0, m ** 0.5 / 4) * scale
    assert_close(dw, ref["dweight"], dtype, "dweight", scale=sums)
    assert_close(db, ref["dbias"], dtype, "dbias", scale=sums)


def test_backend_interface_pieces_agree_with_fused(tiny_tiles):
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
def test_layer_norm_blocks_threaded_match_float64_formula(monkeypatch, dtype):
    from gpubn.backends import numpy_layer_norm as nl
    monkeypatch.setattr(nl, "_CHUNK", 3 * 37)          # 3 rows per block, 13 blocks + remainder
    rng = np.random.default_rng(5)
    x = (rng.standard_normal((41, 37)) * 2 + 100).astype(dtype)
    dy = rng.standard_normal(x.shape).astype(dtype)
    w = np.linspace(0.5, 1.5, 37)
    b = np.linspace(-1, 1, 37)
    acc = np.float64 if dtype == np.float64 else np.float32
    results = []
    for threads in ("1", "3"):
        monkeypatch.setenv("GPUBN_NUM_THREADS", threads)
        y, mean, rstd = nl.ln_forward(x, w.astype(acc), b.astype(acc), 1e-5)
        dx, dw, db = nl.ln_backward(dy, x, mean, rstd, w.astype(acc), True)
        results.append((y, mean, rstd, dx, dw, db))
    for a, b_ in zip(*results):
        np.testing.assert_array_equal(a, b_)      # thread count changes nothing
    # the textbook formulas in float64
    x64, dy64 = x.astype(np.float64), dy.astype(np.float64)
    mu = x64.mean(axis=1, keepdims=True)
    rs = 1.0 / np.sqrt(((x64 - mu) ** 2).mean(axis=1, keepdims=True) + 1e-5)
    xhat = (x64 - mu) * rs
    g = dy64 * w
    dx_ref = rs * (g - g.mean(axis=1, keepdims=True)
                   - xhat * (g * xhat).mean(axis=1, keepdims=True))
    y, mean, rstd, dx, dw, db = results[0]
    assert_close(y, xhat * w + b, dtype, "y")
    assert_close(mean, mu[:, 0], dtype, "mean")
    assert_close(rstd, rs[:, 0], dtype, "rstd")
    assert_close(dx, dx_ref, dtype, "dx")
    assert_close(dw, (dy64 * xhat).sum(axis=0), dtype, "dweight")
    assert_close(db, dy64.sum(axis=0), dtype, "dbias")


def _exact_moments(x3):
    xs = np.moveaxis(x3, 1, 0).reshape(x3.shape[1], -1).astype(np.float64)
    mean = xs.mean(axis=1)
    return mean, ((xs - mean[:, None]) ** 2).sum(axis=1)


def _count_sums(monkeypatch):
    shifts = []
    real = nb._shifted_sums
    monkeypatch.setattr(nb, "_shifted_sums",
                        lambda x3, lay, shift: shifts.append(shift) or real(x3, lay, shift))
    return shifts


@pytest.mark.parametrize("shape", [(4, 3, 4000), (20000, 3, 1)], ids=["rows", "columns"])
@pytest.mark.parametrize("offset", [0.5, 1e4], ids=["centred-data", "offset-data"])
def test_statistics_shift_comes_from_the_sample(monkeypatch, shape, offset):
    """Data near zero is summed as it is; data far from zero around the
    sample's mean; either way in one pass and right to ~1e-6."""
    shifts = _count_sums(monkeypatch)
    x3 = (offset + np.random.default_rng(0).standard_normal(shape)).astype(np.float32)
    mean, m2 = nb._moments(x3)
    assert len(shifts) == 1
    assert (shifts[0] is None) == (offset < 1)
    ref_mean, ref_m2 = _exact_moments(x3)
    np.testing.assert_allclose(mean, ref_mean, rtol=1e-7)
    np.testing.assert_allclose(m2, ref_m2, rtol=1e-5)


@pytest.mark.parametrize("shape", [(4, 3, 4000), (20000, 3, 1)], ids=["rows", "columns"])
@pytest.mark.parametrize("bad_shift", ["none", "far"])
def test_statistics_redone_when_the_sample_misleads(monkeypatch, shape, bad_shift):
    """A sample unlike its channel (planted here: no shift, or a shift 1e4
    away, for 1e4 + N(0, 1) float32 data) would leave float32 sums that
    cancel; the second pass around the first mean restores ~1e-6."""
    monkeypatch.setattr(nb, "_sample_shift",
                        lambda x3, wdt: None if bad_shift == "none" else np.full(3, 2e4))
    shifts = _count_sums(monkeypatch)
    x3 = (1e4 + np.random.default_rng(1).standard_normal(shape)).astype(np.float32)
    mean, m2 = nb._moments(x3)
    assert len(shifts) == 2
    ref_mean, ref_m2 = _exact_moments(x3)
    np.testing.assert_allclose(shifts[1], ref_mean, rtol=1e-6)
    np.testing.assert_allclose(mean, ref_mean, rtol=1e-7)
    np.testing.assert_allclose(m2, ref_m2, rtol=1e-5)


@pytest.mark.parametrize("planted", ["sampled", "none", "far"])
def test_layer_norm_row_statistics_survive_a_misleading_sample(monkeypatch, planted):
    """Layer norm rows of 1e4 + N(0, 1) float32: the sampled shift, or a
    planted one (none, or 1e4 away) redone around the mean, give the row
    mean and rstd to ~1e-6."""
    from gpubn.backends import numpy_layer_norm as nl
    if planted != "sampled":
        monkeypatch.setattr(nl, "_row_shift", lambda blk: None if planted == "none"
                            else np.full(blk.shape[0], 2e4, blk.dtype))
    x = (1e4 + np.random.default_rng(2).standard_normal((64, 700))).astype(np.float32)
    y, mean, rstd = nl.ln_forward(x, None, None, 1e-5)
    x64 = x.astype(np.float64)
    np.testing.assert_allclose(mean, x64.mean(axis=1), rtol=1e-7)
    np.testing.assert_allclose(rstd, 1 / np.sqrt(x64.var(axis=1) + 1e-5), rtol=1e-5)
    np.testing.assert_allclose(y, (x64 - x64.mean(axis=1, keepdims=True))
                               / np.sqrt(x64.var(axis=1, keepdims=True) + 1e-5), atol=1e-5)
