"""Batch renormalization on every backend, against a NumPy transcription of
Algorithm 1 of Ioffe (2017) written here (independent of the library), batch
norm itself (rmax=1, dmax=0), and finite differences.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

import gpubn
from gpubn.backends.kernel_backend import KernelBackend
from conftest import (acc_unit_roundoff, assert_close, assert_rounded_close, assert_sum_close,
                      backend_or_skip, bn_dx_slack, bn_output_slack, bn_sum_terms, numeric_gradients,
                      renorm_output_slack, to_backend, to_numpy)


# ------------------------------------------------- the paper, transcribed ----
def paper_train_step(x, gamma, beta, mu, sigma, rmax, dmax, eps, alpha, axis=1):
    """Algorithm 1 (training), per channel, float64, loops and all:

        mu_B    = 1/m sum x_i
        sigma_B = sqrt(eps + 1/m sum (x_i - mu_B)^2)
        r       = stop_gradient(clip[1/rmax, rmax](sigma_B / sigma))
        d       = stop_gradient(clip[-dmax, dmax]((mu_B - mu) / sigma))
        xhat_i  = (x_i - mu_B) / sigma_B * r + d
        y_i     = gamma * xhat_i + beta
        mu     := mu + alpha (mu_B - mu)
        sigma  := sigma + alpha (sigma_B - sigma)
    """
    xc = np.moveaxis(np.asarray(x, np.float64), axis, 0)
    c = xc.shape[0]
    flat = xc.reshape(c, -1)
    m = flat.shape[1]
    y = np.empty_like(flat)
    out = {k: np.empty(c) for k in ("r", "d", "mu_B", "sigma_B", "mu", "sigma")}
    for k in range(c):
        xi = flat[k]
        mu_b = sum(xi) / m
        sigma_b = np.sqrt(eps + sum((xi - mu_b) ** 2) / m)
        r = min(max(sigma_b / sigma[k], 1.0 / rmax), rmax)
        d = min(max((mu_b - mu[k]) / sigma[k], -dmax), dmax)
        y[k] = gamma[k] * ((xi - mu_b) / sigma_b * r + d) + beta[k]
        out["r"][k], out["d"][k], out["mu_B"][k], out["sigma_B"][k] = r, d, mu_b, sigma_b
        out["mu"][k] = mu[k] + alpha * (mu_b - mu[k])
        out["sigma"][k] = sigma[k] + alpha * (sigma_b - sigma[k])
    out["y"] = np.moveaxis(y.reshape(xc.shape), 0, axis)
    return out


def paper_backward(x, dy, gamma, r, d, eps, axis=1):
    """The paper's gradients with r and d treated as constants:

        dL/dxhat_i   = dL/dy_i * gamma
        dL/dsigma_B  = sum dL/dxhat_i (x_i - mu_B) (-r / sigma_B^2)
        dL/dmu_B     = sum dL/dxhat_i (-r / sigma_B)
        dL/dx_i      = dL/dxhat_i r/sigma_B + dL/dsigma_B (x_i - mu_B)/(m sigma_B)
                       + dL/dmu_B / m
        dL/dgamma    = sum dL/dy_i xhat_i,   dL/dbeta = sum dL/dy_i
    """
    xc = np.moveaxis(np.asarray(x, np.float64), axis, 0)
    gc = np.moveaxis(np.asarray(dy, np.float64), axis, 0)
    c = xc.shape[0]
    xf, gf = xc.reshape(c, -1), gc.reshape(c, -1)
    m = xf.shape[1]
    dx = np.empty_like(xf)
    dgamma, dbeta = np.empty(c), np.empty(c)
    for k in range(c):
        xi, gi = xf[k], gf[k]
        mu_b = xi.mean()
        sigma_b = np.sqrt(eps + ((xi - mu_b) ** 2).mean())
        dxhat = gi * gamma[k]
        dsigma = np.sum(dxhat * (xi - mu_b) * (-r[k] / sigma_b ** 2))
        dmu = np.sum(dxhat * (-r[k] / sigma_b))
        dx[k] = dxhat * r[k] / sigma_b + dsigma * (xi - mu_b) / (m * sigma_b) + dmu / m
        xhat = (xi - mu_b) / sigma_b * r[k] + d[k]
        dgamma[k], dbeta[k] = np.sum(gi * xhat), np.sum(gi)
    return np.moveaxis(dx.reshape(xc.shape), 0, axis), dgamma, dbeta


# ---------------------------------------------------------------- helpers ----
def make_case(shape, axis, dtype, seed=0):
    """Input with per-channel offsets and scales, parameters, and moving
    statistics placed so that some channels clip r / d and some do not."""
    rng = np.random.default_rng(seed)
    c = shape[axis]
    bshape = [1] * len(shape)
    bshape[axis] = c
    mean = 2.0 * rng.standard_normal(c)
    scale = rng.uniform(0.5, 2.0, c)
    x = (rng.standard_normal(shape) * scale.reshape(bshape) + mean.reshape(bshape)).astype(dtype)
    pdt = np.float64 if dtype == np.float64 else np.float32
    gamma = rng.uniform(0.5, 1.5, c).astype(pdt)
    beta = rng.standard_normal(c).astype(pdt)
    # moving sigma and mu relative to the channel's: r and d clip on the
    # channels 0, 2, ... and not on 1, 3, ...
    sigma = (scale * np.resize([0.5, 1.0, 3.0, 0.9], c)).astype(pdt)
    mu = (mean + scale * np.resize([1.5, 0.1, -1.2, -0.2], c)).astype(pdt)
    dy = rng.standard_normal(shape).astype(dtype)
    return x, gamma, beta, mu, sigma, dy


def renorm(backend, x, w, b, mu, sigma, rmax, dmax, **kw):
    return gpubn.batch_renorm_forward(
        to_backend(backend, x), weight=to_backend(backend, w), bias=to_backend(backend, b),
        running_mean=mu, running_std=sigma, rmax=rmax, dmax=dmax, backend=backend.name, **kw)


SHAPES = [
    ((6, 4), 1),              # NC
    ((3, 5, 7, 3), 1),        # odd NCHW
    ((3, 4, 5, 6), -1),       # channels-last
    ((4, 2, 96, 64), 1),      # several blocks per channel on the kernel backends
    ((3, 300), 1),            # more channels than one block of the finish kernel
]
SHAPE_IDS = [f"{'x'.join(map(str, s))}-ax{a}" for s, a in SHAPES]


@pytest.mark.parametrize("shape,axis", SHAPES, ids=SHAPE_IDS)
@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64],
                         ids=lambda d: np.dtype(d).name)
def test_training_matches_paper_algorithm(backend, shape, axis, dtype):
    rmax, dmax, eps, momentum = 1.5, 0.5, 1e-3, 0.2
    x, w, b, mu, sigma, dy = make_case(shape, axis, dtype)
    ref = paper_train_step(x, w.astype(float), b.astype(float), mu.astype(float),
                           sigma.astype(float), rmax, dmax, eps, momentum, axis)
    # the case exercises both clipped and unclipped r and d
    assert np.any(np.abs(ref["r"] - rmax) < 1e-12) or np.any(np.abs(ref["r"] - 1 / rmax) < 1e-12)
    assert np.any((ref["r"] > 1 / rmax) & (ref["r"] < rmax))
    assert np.any(np.abs(ref["d"]) == dmax) and np.any(np.abs(ref["d"]) < dmax)

    mu_b, sigma_b = to_backend(backend, mu.copy()), to_backend(backend, sigma.copy())
    y, saved = renorm(backend, x, w, b, mu_b, sigma_b, rmax, dmax, momentum=momentum, eps=eps,
                      axis=axis)
    assert y.shape == x.shape and y.dtype == x.dtype
    acc = np.float64 if dtype == np.float64 else np.float32
    assert_rounded_close(y, ref["y"], dtype, renorm_output_slack(
        x, w, b, axis, dtype, ref["r"], ref["d"], mu, sigma, eps), "y")
    assert_close(saved.r, ref["r"], acc, "r")
    assert_close(saved.d, ref["d"], acc, "d")
    assert_close(mu_b, ref["mu"], acc, "moving mu")
    assert_close(sigma_b, ref["sigma"], acc, "moving sigma")

    dx, dw, db = gpubn.batch_renorm_backward(to_backend(backend, dy), saved)
    ref_dx, ref_dw, ref_db = paper_backward(x, dy, w.astype(float), ref["r"], ref["d"], eps,
                                            axis)
    assert dx.shape == x.shape and dx.dtype == x.dtype and dw.dtype == w.dtype
    assert_rounded_close(dx, ref_dx, dtype,
                         bn_dx_slack(x, dy, w * ref["r"], axis, dtype, True, eps=eps), "dx")
    # dweight = r * sum(dy * xhat) + d * sum(dy): terms r * |dy| * (|xhat| + 1) + |d * dy|
    red, db_terms, bn_dw_terms = bn_sum_terms(x, dy, axis, eps=eps)
    shape_c = [1] * x.ndim
    shape_c[axis % x.ndim] = x.shape[axis]
    dw_terms = (np.abs(ref["r"]).reshape(shape_c) * bn_dw_terms
                + np.abs(ref["d"]).reshape(shape_c) * np.abs(db_terms))
    # r and d carry a few units of rounding of their own (sigma_B / sigma, ...),
    # which scale r * sum(dy * xhat) and d * sum(dy)
    d_sum_dy = ref["d"] * np.asarray(ref_db, np.float64)
    extra = 4.0 * acc_unit_roundoff(dtype) * (np.abs(ref_dw - d_sum_dy) + np.abs(d_sum_dy))
    # and the saved mean's rounding (u |mean|) moves every xhat by u |mean| /
    # sigma: r * sum(dy) * u |mean| / sigma, one error for the whole sum (it
    # decides for channels whose mean is large against their spread: m = 3)
    x64 = np.moveaxis(x.astype(np.float64), axis, -1).reshape(-1, x.shape[axis])
    extra = extra + 4.0 * acc_unit_roundoff(dtype) * np.abs(ref["r"] * np.asarray(ref_db)) \
        * np.abs(x64.mean(axis=0)) / np.sqrt(x64.var(axis=0) + eps)
    assert_sum_close(dw, ref_dw, dw_terms, red, dtype, "dweight", extra=extra)
    assert_sum_close(db, ref_db, db_terms, red, dtype, "dbias")


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64],
                         ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("affine", [True, False], ids=["affine", "noaffine"])
def test_rmax_1_dmax_0_is_batch_norm(backend, dtype, affine, monkeypatch):
    """With r = 1 and d = 0 the output and every gradient are batch norm's,
    bit for bit (the host backends round the statistics to the accumulation
    dtype on this path, so there float16/float32 agree to rounding)."""
    shape, axis = (5, 3, 6, 7), 1
    x, w, b, mu, sigma, dy = make_case(shape, axis, dtype, seed=4)
    if not affine:
        w = b = None
    # batch norm through the same two-pass kernels as renorm (its read-once
    # forward and backward merge the sums in another order)
    bn_backend = backend.name
    if isinstance(backend, KernelBackend):
        bn_backend = type(backend)(tuning=dataclasses.replace(backend.tuning, read_once=False))
    if backend.name == "cpu":   # likewise its loops (a small input is one tile, read once)
        from gpubn.backends import cpu
        monkeypatch.setattr(cpu, "_ONE_TILE", 0)
        monkeypatch.setattr(cpu, "_L2_BYTES", 0)
    B = lambda a: to_backend(backend, a)  # noqa: E731
    y, saved = gpubn.batch_renorm_forward(B(x), weight=B(w), bias=B(b), running_mean=B(mu),
                                          running_std=B(sigma), rmax=1.0, dmax=0.0, axis=axis,
                                          backend=bn_backend)
    y_bn, saved_bn = gpubn.batch_norm_forward(to_backend(backend, x),
                                              weight=to_backend(backend, w),
                                              bias=to_backend(backend, b), backend=bn_backend)
    grads = gpubn.batch_renorm_backward(to_backend(backend, dy), saved)
    grads_bn = gpubn.batch_norm_backward(to_backend(backend, dy), saved_bn)
    np.testing.assert_array_equal(to_numpy(saved.r), 1.0)
    np.testing.assert_array_equal(to_numpy(saved.d), 0.0)
    exact = backend.name not in ("numpy", "cpu") or np.dtype(dtype) == np.float64
    for name, a, e in (("y", y, y_bn), ("dx", grads[0], grads_bn[0]),
                       ("dweight", grads[1], grads_bn[1]), ("dbias", grads[2], grads_bn[2])):
        if e is None:
            assert a is None, name
        elif exact:
            np.testing.assert_array_equal(to_numpy(a), to_numpy(e), err_msg=name)
        else:
            assert_close(a, e, dtype, name, scale=0.1)


def test_gradients_by_finite_differences(backend):
    """Central differences through the library itself, float64.  The moving
    statistics put every channel on a clip bound (r = rmax, d = +-dmax), where
    r and d are locally constant, as the backward assumes."""
    shape, axis, rmax, dmax = (3, 2, 4), 1, 2.0, 0.25
    rng = np.random.default_rng(7)
    x = rng.standard_normal(shape) * np.array([1.0, 2.0])[None, :, None] + 0.5
    w = rng.uniform(0.5, 1.5, 2)
    b = rng.standard_normal(2)
    g = rng.standard_normal(shape)
    mu = np.array([-20.0, 20.0])       # far: d = +dmax, -dmax
    sigma = np.array([0.05, 0.1])      # small: r = rmax

    def forward(x_, w_, b_):
        return renorm(backend, x_, w_, b_, to_backend(backend, mu.copy()),
                      to_backend(backend, sigma.copy()), rmax, dmax, axis=axis)

    y, saved = forward(x, w, b)
    np.testing.assert_array_equal(to_numpy(saved.r), rmax)
    np.testing.assert_array_equal(to_numpy(saved.d), [dmax, -dmax])
    dx, dw, db = (to_numpy(a) for a in gpubn.batch_renorm_backward(to_backend(backend, g), saved))
    def loss(*args):
        return float(np.sum(to_numpy(forward(*args)[0]) * g))

    numeric = numeric_gradients(loss, (x, w, b))
    for grad, num, name in zip((dx, dw, db), numeric, ("dx", "dweight", "dbias")):
        np.testing.assert_allclose(grad, num, rtol=1e-5, atol=1e-7, err_msg=name)


def test_moving_statistics_over_steps_and_inference(backend):
    """Several steps with a warm-up schedule for rmax/dmax, then inference
    with the moving statistics; the layer against the transcription."""
    shape, c = (6, 3, 4, 5), 3
    layer = gpubn.BatchRenorm(c, momentum=0.3, eps=1e-4, dtype="float64", backend=backend.name)
    assert layer.rmax == 1.0 and layer.dmax == 0.0
    rng = np.random.default_rng(3)
    layer.weight[...] = to_backend(backend, rng.uniform(0.5, 1.5, c))
    layer.bias[...] = to_backend(backend, rng.standard_normal(c))
    w, b = to_numpy(layer.weight).copy(), to_numpy(layer.bias).copy()
    mu, sigma = np.zeros(c), np.ones(c)
    schedule = [(1.0, 0.0), (1.2, 0.1), (1.5, 0.3), (3.0, 5.0), (3.0, 5.0)]
    for step, (rmax, dmax) in enumerate(schedule):
        layer.rmax, layer.dmax = rmax, dmax
        x = rng.standard_normal(shape) * np.array([0.5, 1.0, 3.0])[None, :, None, None] + 4.0
        ref = paper_train_step(x, w, b, mu, sigma, rmax, dmax, 1e-4, 0.3)
        y = layer(to_backend(backend, x))
        assert_rounded_close(y, ref["y"], np.float64, renorm_output_slack(
            x, w, b, 1, np.float64, ref["r"], ref["d"], mu, sigma, 1e-4), f"y step {step}")
        mu, sigma = ref["mu"], ref["sigma"]
        assert_close(layer.running_mean, mu, np.float64, f"moving mu step {step}")
        assert_close(layer.running_std, sigma, np.float64, f"moving sigma step {step}")
    assert layer.num_batches_tracked == len(schedule)
    layer.eval()
    x = rng.standard_normal(shape) + 4.0
    dy = rng.standard_normal(shape)
    y = layer(to_backend(backend, x))
    bs = (None, slice(None), None, None)
    xhat = (x - mu[bs]) / sigma[bs]
    fixed = dict(mean=mu, var=sigma ** 2 - 1e-4, eps=1e-4)   # sigma = sqrt(var + eps)
    assert_rounded_close(y, w[bs] * xhat + b[bs], np.float64,
                         bn_output_slack(x, w, b, 1, np.float64, **fixed), "inference y")
    dx = layer.backward(to_backend(backend, dy))
    assert_rounded_close(dx, dy * (w / sigma)[bs], np.float64,
                         bn_dx_slack(x, dy, w, 1, np.float64, False, **fixed), "inference dx")
    assert_close(layer.grad_weight, (dy * xhat).sum(axis=(0, 2, 3)), np.float64, "inference dw")
    assert_close(layer.grad_bias, dy.sum(axis=(0, 2, 3)), np.float64, "inference db")
    # inference leaves the moving statistics alone
    assert_close(layer.running_mean, mu, np.float64, "moving mu after eval")
    assert layer.num_batches_tracked == len(schedule)


def test_cumulative_momentum_none(backend):
    """momentum=None: the moving statistics are plain averages of the batch
    mu_B and sigma_B (factor 1/(k+1) at step k)."""
    c = 2
    layer = gpubn.BatchRenorm(c, momentum=None, dtype="float64", backend=backend.name)
    rng = np.random.default_rng(5)
    mus, sigmas = [], []
    for step in range(3):
        x = rng.standard_normal((8, c, 3)) * (step + 1) + step
        ref = paper_train_step(x, np.ones(c), np.zeros(c), np.zeros(c), np.ones(c), 1.0, 0.0,
                               1e-5, 1.0)
        mus.append(ref["mu_B"])
        sigmas.append(ref["sigma_B"])
        layer(to_backend(backend, x))
    assert_close(layer.running_mean, np.mean(mus, axis=0), np.float64, "mu")
    assert_close(layer.running_std, np.mean(sigmas, axis=0), np.float64, "sigma")


def test_layer_state_dict_and_channels_last(backend):
    layer = gpubn.BatchRenorm(4, rmax=2.0, dmax=1.0, axis=-1, backend=backend.name)
    x = np.random.default_rng(0).standard_normal((3, 5, 5, 4)).astype(np.float32)
    y_last = layer(to_backend(backend, x))
    state = layer.state_dict()
    assert set(state) == {"weight", "bias", "running_mean", "running_std", "num_batches_tracked"}
    assert int(state["num_batches_tracked"]) == 1
    # the same step in channels-first layout from the initial state
    first = gpubn.BatchRenorm(4, rmax=2.0, dmax=1.0, backend=backend.name)
    y_first = first(to_backend(backend, np.ascontiguousarray(np.moveaxis(x, -1, 1))))
    assert_close(np.moveaxis(to_numpy(y_first), 1, -1), y_last, np.float32, "y")
    assert_close(first.running_std, state["running_std"], np.float32, "running_std")
    other = gpubn.BatchRenorm(4, axis=-1, backend=backend.name)
    other.load_state_dict(state)
    other.eval()
    layer.eval()
    np.testing.assert_array_equal(to_numpy(other(to_backend(backend, x))),
                                  to_numpy(layer(to_backend(backend, x))))
    layer.reset_running_stats()
    np.testing.assert_array_equal(to_numpy(layer.running_std), 1.0)
    assert "rmax=2.0" in repr(layer) and "BatchRenorm(4" in repr(layer)


# --------------------------------------------------------------- bad input ----
def _good(backend):
    rng = np.random.default_rng(0)
    x = to_backend(backend, rng.standard_normal((4, 3, 5)).astype(np.float32))
    return x, to_backend(backend, np.zeros(3, np.float32)), to_backend(backend, np.ones(3, np.float32))


def test_bad_forward_raises_and_leaves_state(backend):
    x, mu, sigma = _good(backend)
    xp = backend.xp
    cases = [
        (dict(rmax=0.5), ValueError, r"rmax must be >= 1"),
        (dict(rmax=float("nan")), ValueError, r"rmax must be >= 1"),
        (dict(rmax="2"), TypeError, r"rmax must be a float"),
        (dict(dmax=-0.1), ValueError, r"dmax must be >= 0"),
        (dict(dmax=None), TypeError, r"dmax must be a float"),
        (dict(running_std=None), ValueError, r"needs running_mean and running_std"),
        (dict(running_mean=None), ValueError, r"needs running_mean and running_std"),
        (dict(running_std=xp.ones(4, xp.float32)), ValueError,
         r"running_std must have shape \(3,\)"),
        (dict(weight=xp.ones(2, xp.float32)), ValueError, r"weight must have shape \(3,\)"),
        (dict(eps=0.0), ValueError, r"eps must be a positive"),
        (dict(momentum=1.5), ValueError, r"momentum must be in \[0, 1\]"),
        (dict(x=x[:1, :, :1]), ValueError, r"more than 1 value per channel"),
        (dict(x=x.astype(xp.int32)), TypeError, r"x must have a floating-point dtype"),
        (dict(axis=3), ValueError, r"axis=3 is out of range"),
    ]
    for kwargs, exc, pattern in cases:
        args = dict(x=x, weight=None, bias=None, running_mean=mu, running_std=sigma,
                    rmax=2.0, dmax=1.0, backend=backend.name)
        args.update(kwargs)
        with pytest.raises(exc, match=pattern):
            gpubn.batch_renorm_forward(**args)
        np.testing.assert_array_equal(to_numpy(mu), 0.0)
        np.testing.assert_array_equal(to_numpy(sigma), 1.0)


def test_read_only_moving_stats_rejected_before_any_write():
    x = np.random.default_rng(0).standard_normal((4, 3)).astype(np.float32)
    mu, sigma = np.zeros(3, np.float32), np.ones(3, np.float32)
    sigma.flags.writeable = False
    with pytest.raises(ValueError, match=r"running_std is updated in place but is read-only"):
        gpubn.batch_renorm_forward(x, running_mean=mu, running_std=sigma, rmax=2.0,
                                   dmax=1.0)
    np.testing.assert_array_equal(mu, 0.0)
    # inference only reads them
    y, _ = gpubn.batch_renorm_forward(x, running_mean=mu, running_std=sigma, training=False)
    assert y.shape == x.shape


def test_bad_backward_and_layer_setters(backend):
    x, mu, sigma = _good(backend)
    _, saved = gpubn.batch_renorm_forward(x, running_mean=mu, running_std=sigma,
                                          backend=backend.name)
    xp = backend.xp
    with pytest.raises(ValueError, match=r"dy must have the shape of the forward input"):
        gpubn.batch_renorm_backward(xp.ones((4, 3), xp.float32), saved)
    with pytest.raises(TypeError, match=r"dy must have the dtype of the forward input"):
        gpubn.batch_renorm_backward(xp.ones((4, 3, 5), xp.float64), saved)
    with pytest.raises(TypeError, match=r"saved must be the BatchRenormSaved"):
        gpubn.batch_renorm_backward(xp.ones((4, 3, 5), xp.float32), saved.bn)
    layer = gpubn.BatchRenorm(3, rmax=2.0, backend=backend.name)
    with pytest.raises(ValueError, match=r"rmax must be >= 1"):
        layer.rmax = 0.9
    with pytest.raises(ValueError, match=r"dmax must be >= 0"):
        layer.dmax = -1
    assert layer.rmax == 2.0 and layer.dmax == 0.0
    with pytest.raises(ValueError, match=r"weight must have shape \(5,\) to match the 5 ch"):
        layer(xp.ones((4, 5), xp.float32))
    assert layer.num_batches_tracked == 0
    np.testing.assert_array_equal(to_numpy(layer.running_std), 1.0)
    with pytest.raises(ValueError, match=r"rmax must be >= 1"):
        gpubn.BatchRenorm(3, rmax=0.0)
    with pytest.raises(ValueError, match=r"backward called before any forward"):
        gpubn.BatchRenorm(3).backward(np.ones((2, 3), np.float32))


def test_emu_launch_sequence():
    """Training forward on the kernels: statistics, the per-channel finish,
    normalize (3 launches); backward: batch norm's (1 read-once launch where
    x and dy fit on chip, as here); memcheck and racecheck on."""
    pytest.importorskip("gpubn.emu")
    from gpubn import emu
    backend_or_skip("emu")
    assert emu.get_options().memcheck and emu.get_options().racecheck
    x, w, b, mu, sigma, dy = make_case((4, 3, 5, 7), 1, np.float32)
    with emu.recording() as log:
        y, saved = renorm(gpubn.backends.get_backend("emu"), x, w, b, mu, sigma, 2.0, 1.0)
    names = [rec.kernel.split("<")[0] for rec in log]
    assert names == ["gpubn::bn_stats_nchw", "gpubn::bn_renorm_finish", "gpubn::bn_apply_nchw"]
    with emu.recording() as log:
        gpubn.batch_renorm_backward(dy, saved)
    assert [rec.kernel.split("<")[0] for rec in log] == ["gpubn::bn_backward_once_nchw"]


def test_unclipped_training_output_is_the_inference_output(backend):
    """The point of the paper: with r and d unclipped (rmax = dmax = inf),
    xhat * r + d = (x - mu) / sigma, so a training step outputs what inference
    with the moving statistics (before the step's update) outputs."""
    shape, axis = (5, 4, 3, 6), 1
    x, w, b, mu, sigma, _ = make_case(shape, axis, np.float64, seed=6)
    y_eval, _ = renorm(backend, x, w, b, to_backend(backend, mu), to_backend(backend, sigma),
                       1.0, 0.0, training=False)
    y_train, saved = renorm(backend, x, w, b, to_backend(backend, mu.copy()),
                            to_backend(backend, sigma.copy()), float("inf"), float("inf"))
    assert not np.allclose(to_numpy(saved.r), 1.0)      # r and d do real work here
    assert_close(y_train, y_eval, np.float64, "training output vs inference output")


# ------------------------------------------------ guarded moving statistics ----
@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("bad", [np.inf, np.nan])
def test_guard_keeps_a_non_finite_channels_moving_statistics(backend, dtype, bad):
    """``guard_running_stats=True``: channel 1 (an Inf or NaN) keeps its
    moving mu and sigma bit for bit and is flagged; channel 2, whose
    variance overflows, too; the others update exactly as without the guard
    (the same finishing step), which is the paper's update."""
    x, w, b, mu, sigma, _ = make_case((6, 4, 5), 1, dtype)
    x[2, 1, 3] = bad
    big = np.finfo(np.float32 if dtype == np.float32 else np.float64).max / 4
    x[:, 2] = np.where(np.arange(30).reshape(6, 5) % 2, big, -big)
    runs = {}
    for guard in (False, True):
        rm, rs = to_backend(backend, mu.copy()), to_backend(backend, sigma.copy())
        _, saved = renorm(backend, x, w, b, rm, rs, 2.0, 1.0, momentum=0.25,
                          guard_running_stats=guard)
        runs[guard] = to_numpy(rm), to_numpy(rs), saved.bn.skipped
    rm, rs, skipped = runs[True]
    np.testing.assert_array_equal(to_numpy(skipped), [0, 1, 1, 0])
    np.testing.assert_array_equal(rm[1:3], mu[1:3])
    np.testing.assert_array_equal(rs[1:3], sigma[1:3])
    rm0, rs0, skipped0 = runs[False]
    assert skipped0 is None and not np.isfinite(rm0[1]) and not np.isfinite(rs0[2])
    np.testing.assert_array_equal(rm[[0, 3]], rm0[[0, 3]])
    np.testing.assert_array_equal(rs[[0, 3]], rs0[[0, 3]])
    with np.errstate(invalid="ignore", over="ignore"):
        want = paper_train_step(x, w, b, mu, sigma, 2.0, 1.0, 1e-5, 0.25)
    assert_close(rm[[0, 3]], want["mu"][[0, 3]], dtype, "moving mu")
    assert_close(rs[[0, 3]], want["sigma"][[0, 3]], dtype, "moving sigma")


def test_guard_in_the_layer_counts_and_survives_state_dict(backend):
    bn = gpubn.BatchRenorm(3, backend=backend.name, guard_running_stats=True)
    assert "guard_running_stats=True" in repr(bn) and bn.skipped_updates == 0
    x = np.random.default_rng(2).standard_normal((4, 3, 2)).astype(np.float32)
    x[0, 0, 0] = np.nan
    for _ in range(2):
        bn(to_backend(backend, x))
    assert bn.skipped_updates == 2
    assert to_numpy(bn.running_mean)[0] == 0 and to_numpy(bn.running_std)[0] == 1
    assert to_numpy(bn.running_std)[1] != 1
    state = bn.state_dict()
    assert sorted(state) == ["bias", "num_batches_tracked", "running_mean", "running_std",
                             "skipped_updates", "weight"]
    other = gpubn.BatchRenorm(3, backend=backend.name, guard_running_stats=True)
    other.load_state_dict(state)
    assert other.skipped_updates == 2
    bn.reset_running_stats()
    assert bn.skipped_updates == 0
    assert "skipped_updates" not in gpubn.BatchRenorm(3).state_dict()


def test_ghost_batch_norm_and_a_bad_guard_are_refused_before_any_state_changes():
    with pytest.raises(ValueError, match="virtual_batch_size=2 is not supported by batch renorm"):
        gpubn.BatchRenorm(3, virtual_batch_size=2)
    x, w, b, mu, sigma, _ = make_case((4, 3), 1, np.float32)
    rm = mu.copy()
    for kw, err, msg in ((dict(virtual_batch_size=2), ValueError, "virtual_batch_size=2"),
                         (dict(guard_running_stats=1), TypeError, "guard_running_stats must be")):
        with pytest.raises(err, match=msg):
            gpubn.batch_renorm_forward(x, weight=w, bias=b, running_mean=rm, running_std=sigma,
                                       **kw)
        np.testing.assert_array_equal(rm, mu)


def test_guard_adds_no_launch_and_no_pass():
    """The guard lives in bn_renorm_finish: the same three launches, and the
    same bytes of x and y, as without it."""
    pytest.importorskip("gpubn.emu")
    from gpubn import emu
    be = backend_or_skip("emu")
    x, w, b, mu, sigma, _ = make_case((4, 3, 64), 1, np.float32)
    logs = []
    for guard in (False, True):
        with emu.recording() as log:
            renorm(be, x, w, b, mu.copy(), sigma.copy(), 2.0, 1.0, guard_running_stats=guard)
        logs.append([(r.kernel, r.grid, {i: (t.loaded, t.stored) for i, t in r.buffers.items()
                                          if max(t.loaded, t.stored) >= x.nbytes})
                     for r in log])
    assert logs[0] == logs[1] and len(logs[1]) == 3
