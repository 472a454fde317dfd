"""What both CPU backends (the ``numpy`` reference and the fused ``cpu``
loops) promise beyond the shared op tests: accuracy on data far from zero,
no warnings for non-finite input, a working ``os.fork()`` child, bfloat16."""

from __future__ import annotations

import importlib
import os
import signal
import time
import warnings

import numpy as np
import pytest

import gpubn
from conftest import unavailable_reason

HOST = ("numpy", "cpu")


@pytest.fixture(params=HOST)
def host(request):
    reason = unavailable_reason(request.param)
    if reason is not None:
        pytest.skip(reason)
    return request.param


def _f64_batch_norm(x, dy, axis):
    """y and training dx by the textbook float64 formulas (weight 1, bias 0)."""
    x64, dy64 = x.astype(np.float64), dy.astype(np.float64)
    red = tuple(i for i in range(x.ndim) if i != axis % x.ndim)
    mean = x64.mean(axis=red, keepdims=True)
    xhat = (x64 - mean) / np.sqrt(x64.var(axis=red, keepdims=True) + 1e-5)
    dx = (dy64 - dy64.mean(axis=red, keepdims=True)
          - xhat * (dy64 * xhat).mean(axis=red, keepdims=True)) \
        / np.sqrt(x64.var(axis=red, keepdims=True) + 1e-5)
    return xhat, dx


@pytest.mark.parametrize("shape,axis", [((8, 3, 40, 50), 1), ((4000, 5), 1),
                                        ((6, 20, 20, 4), -1)],
                         ids=["nchw", "nc", "nhwc"])
def test_far_from_zero_float32_keeps_float32_accuracy(host, shape, axis):
    """1e4 + N(0, 1) float32 data: y and dx within 5e-5 of float64 (a
    variance from float32 E[x^2] - E[x]^2, or x*scale + shift with a float32
    mean, is off by far more)."""
    rng = np.random.default_rng(0)
    x = (1e4 + rng.standard_normal(shape)).astype(np.float32)
    dy = rng.standard_normal(shape).astype(np.float32)
    y, saved = gpubn.batch_norm_forward(x, axis=axis, backend=host)
    dx, _, _ = gpubn.batch_norm_backward(dy, saved)
    y_ref, dx_ref = _f64_batch_norm(x, dy, axis)
    assert np.max(np.abs(y - y_ref)) <= 5e-5
    assert np.max(np.abs(dx - dx_ref)) <= 5e-5


def _nonfinite_input(shape):
    x = np.random.default_rng(1).standard_normal(shape).astype(np.float32)
    x[0, 0, 0, 0] = np.nan      # channel 0: NaN
    x[:, 1] = np.inf            # channel 1: Inf only
    x[3, 2, 5, 5] = -np.inf     # channel 2: one -Inf
    return x


@pytest.mark.parametrize("shape", [(16, 8, 64, 64), (4, 8, 6, 6)])
def test_nonfinite_input_gives_nan_channels_and_no_warning(host, shape):
    """At a size that uses every thread, and at one that runs as a single
    tile: NaN / Inf in a channel make that channel's training outputs NaN
    (Inf-only: mean Inf) and raise no RuntimeWarning, forward and backward,
    training and eval."""
    x = _nonfinite_input(shape)
    dy = np.ones(shape, np.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        rm, rv = np.zeros(8, np.float32), np.ones(8, np.float32)
        w, b = np.ones(8, np.float32), np.zeros(8, np.float32)
        y, saved = gpubn.batch_norm_forward(x, weight=w, bias=b, running_mean=rm,
                                            running_var=rv, backend=host)
        dx, dw, db = gpubn.batch_norm_backward(dy, saved)
        ye, saved_e = gpubn.batch_norm_forward(x, running_mean=rm, running_var=rv,
                                               training=False, backend=host)
        dxe, _, _ = gpubn.batch_norm_backward(dy, saved_e)
    assert np.isnan(y[:, :3]).all() and np.isnan(dx[:, :3]).all()
    assert np.isfinite(y[:, 3:]).all() and np.isfinite(dx[:, 3:]).all()
    assert np.isnan(rm[0]) and rm[1] == np.inf and rm[2] == -np.inf
    assert np.isfinite(db).all()           # sum dy needs no statistics
    # eval: non-finite values stay in their own elements
    assert np.isnan(rv[:3]).all()
    assert np.isfinite(ye[:, 3:]).all()


@pytest.mark.parametrize("shape", [(16, 8, 64, 64), (4, 8, 6, 6)])
def test_nonfinite_input_raises_no_warning_in_any_op(host, shape):
    """The ops besides plain batch norm on the same non-finite input, large
    and one-tile: the residual + ReLU epilogue and its backward, the two
    backward passes of sync batch norm, layer norm over the rows, batch
    renorm.  NaN stays NaN, and a gradient sum past float32's range is Inf
    (channel 4's dy, as in PyTorch); no RuntimeWarning anywhere."""
    from gpubn.backends import get_backend

    x = _nonfinite_input(shape)
    dy = np.ones(shape, np.float32)
    dy[:, 4] = 3e38
    be = get_backend(host)
    x3, dy3 = x.reshape(shape[0], shape[1], -1), dy.reshape(shape[0], shape[1], -1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        y, saved = gpubn.batch_norm_forward(x, residual=np.ones_like(x), activation="relu",
                                            backend=host)
        dx, _, _, _ = gpubn.batch_norm_backward(dy, saved)
        mean, invstd = saved.mean, saved.invstd
        sum_dy, sum_dy_xhat = be.bn_backward_reduce(dy3, x3, mean, invstd)
        dx_split = be.bn_backward_dx(dy3, x3, mean, invstd, None, sum_dy, sum_dy_xhat,
                                     shape[0] * shape[2] * shape[3])
        rows = x.reshape(-1, shape[-1])
        yl, saved_l = gpubn.layer_norm_forward(rows, shape[-1], np.ones(shape[-1], np.float32),
                                               np.zeros(shape[-1], np.float32), backend=host)
        dxl, dwl, dbl = gpubn.layer_norm_backward(np.ones_like(rows), saved_l)
        yr, saved_r = gpubn.batch_renorm_forward(x, running_mean=np.zeros(8, np.float32),
                                                 running_std=np.ones(8, np.float32),
                                                 backend=host)
        dxr, _, _ = gpubn.batch_renorm_backward(dy, saved_r)
    assert np.isnan(y[:, 0]).all() and np.isnan(dx[:, 0]).all() and np.isnan(dx_split[:, 0]).all()
    finite = [3, 5, 6, 7]
    assert np.isfinite(y[:, 3:]).all() and np.isfinite(dx[:, finite]).all()
    assert np.isnan(sum_dy_xhat[0]) and sum_dy[4] == np.inf and np.isfinite(sum_dy[:4]).all()
    assert np.isnan(dx_split[:, 4]).all() or np.isinf(dx_split[:, 4]).all()
    assert np.isnan(yl[0]).all() and np.isnan(dxl[0]).all()     # the row holding the NaN
    assert np.isnan(dwl).any() and np.isfinite(dbl).all()
    assert np.isnan(yr[:, 0]).all() and np.isnan(dxr[:, 0]).all()


_CHILD_TIMEOUT = 120.0


def test_forked_child_runs_after_the_parent_used_its_threads(host, monkeypatch):
    """A child made by os.fork() after the parent's forward (threads started,
    compiled loops loaded) runs its own forward and exits; before the rewrite
    it hung on the inherited thread pool."""
    if host == "cpu":       # its threads, whatever the input's size
        monkeypatch.setattr(importlib.import_module("gpubn.backends.cpu"), "_SERIAL_MAX", 0)
    x = np.random.default_rng(2).standard_normal((32, 64, 32, 32)).astype(np.float32)
    y_parent, _ = gpubn.batch_norm_forward(x, backend=host)
    pid = os.fork()
    if pid == 0:        # child: exit status says whether it got the parent's result
        code = 1
        try:
            y, _ = gpubn.batch_norm_forward(x, backend=host)
            code = 0 if np.array_equal(y, y_parent) else 2
        finally:
            os._exit(code)
    deadline = time.monotonic() + _CHILD_TIMEOUT
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            pytest.fail(f"the forked child hung for {_CHILD_TIMEOUT:.0f} s in its first forward")
        time.sleep(0.05)
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0, status


@pytest.mark.parametrize("layout", ["nchw", "nc"])
def test_bfloat16_like_float16(host, layout):
    """bfloat16 storage, float32 statistics, outputs rounded to nearest even
    from the float64 formulas' values."""
    ml_dtypes = pytest.importorskip("ml_dtypes", reason="ml_dtypes (the test extra) is not "
                                                         "installed")
    bf16 = np.dtype(ml_dtypes.bfloat16)
    shape = (6, 4, 9, 7) if layout == "nchw" else (300, 5)
    rng = np.random.default_rng(3)
    x = (rng.standard_normal(shape) * 3 + 2).astype(bf16)
    dy = rng.standard_normal(shape).astype(bf16)
    y, saved = gpubn.batch_norm_forward(x, backend=host)
    dx, dw, db = gpubn.batch_norm_backward(dy, saved)
    assert y.dtype == dx.dtype == bf16 and saved.mean.dtype == np.float32
    y_ref, dx_ref = _f64_batch_norm(x, dy, 1)
    # bfloat16 keeps 8 significant bits: one rounding of the output (2**-8
    # relative) on top of float32 arithmetic, and the data's own rounding
    # was already applied before the reference was computed
    rtol, atol = 2.0 ** -7, 2.0 ** -7
    np.testing.assert_allclose(y.astype(np.float64), y_ref, rtol=rtol, atol=atol)
    np.testing.assert_allclose(dx.astype(np.float64), dx_ref, rtol=rtol, atol=atol)
    x2b = x.reshape(shape[0], -1)
    lo = gpubn.layer_norm_forward(x2b, x2b.shape[1:], backend=host)[0]
    x2 = x.reshape(shape[0], -1).astype(np.float64)
    ln_ref = (x2 - x2.mean(1, keepdims=True)) / np.sqrt(x2.var(1, keepdims=True) + 1e-5)
    np.testing.assert_allclose(lo.astype(np.float64), ln_ref, rtol=rtol, atol=atol)

