"""The residual-block epilogue: ``y = relu(batch_norm(x) + residual)`` on every
backend, against PyTorch float64 (the same graph built from torch ops) and
finite differences; the layer; bad input.  Traffic and launch counts of the
fused kernels are asserted in test_traffic.py.
"""

from __future__ import annotations

import numpy as np
import pytest

import gpubn
from conftest import (BFLOAT16, DTYPES, acc_unit_roundoff, assert_rounded_close,
                      assert_sum_close, bn_dx_slack, bn_output_slack, bn_sum_terms,
                      numeric_gradients, to_backend, to_numpy, torch_batch_norm)

SHAPES = [
    ((4, 3, 5, 7), 1),        # NCHW, odd runs (scalar tail)
    ((2, 4, 8, 8), 1),        # NCHW, vector runs
    ((3, 6, 5, 8), -1),       # channels-last
    ((9, 5), 1),              # NC
    ((8, 3, 16, 16), 1),      # NCHW, several vectors per thread (unrolled walks, tails)
    ((16, 8, 8, 16), -1),     # channels-last, several rows per thread
]
SHAPE_IDS = [f"{'x'.join(map(str, s))}-ax{a}" for s, a in SHAPES]
ALL_DTYPES = DTYPES + ((BFLOAT16,) if BFLOAT16 is not None else ())


def _data(shape, axis, dtype, seed=0):
    rng = np.random.default_rng(seed)
    c = shape[axis]
    x = (rng.standard_normal(shape) * 1.5 + 0.5).astype(dtype)
    z = rng.standard_normal(shape).astype(dtype)
    dy = rng.standard_normal(shape).astype(dtype)
    w = rng.uniform(0.5, 1.5, c).astype(np.float32)
    b = rng.uniform(-0.5, 0.5, c).astype(np.float32)
    return x, z, dy, w, b


def _per_channel(v, shape, axis):
    s = [1] * len(shape)
    s[axis] = shape[axis]
    return np.reshape(v, s)


def _torch_block(x, z, w, b, axis, training, dy, relu=True, rm=None, rv=None, eps=1e-5):
    """relu(batch_norm(x) + z) and its gradients, built from torch ops in float64."""
    import torch

    def t(a, grad=True):
        return torch.tensor(np.moveaxis(to_numpy(a).astype(np.float64), axis, 1)
                            if a.ndim > 1 else to_numpy(a).astype(np.float64),
                            requires_grad=grad)

    xt, zt, wt, bt = t(x), t(z), t(w), t(b)
    rmt = None if rm is None else torch.tensor(rm.astype(np.float64))
    rvt = None if rv is None else torch.tensor(rv.astype(np.float64))
    pre = torch.nn.functional.batch_norm(xt, rmt, rvt, wt, bt, training, 0.1, eps) + zt
    y = torch.relu(pre) if relu else pre
    y.backward(t(dy, grad=False))

    def back(a):
        return np.moveaxis(a.detach().numpy(), 1, axis)

    return {"y": back(y), "pre": back(pre), "dx": back(xt.grad), "dres": back(zt.grad),
            "dweight": wt.grad.numpy(), "dbias": bt.grad.numpy()}


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("shape,axis", SHAPES, ids=SHAPE_IDS)
def test_forward_matches_bn_plus_residual_relu(backend, shape, axis, dtype):
    """y within half an ulp of the float64 result plus batch norm's slack and
    the add's rounding in the accumulation dtype (ReLU is 1-Lipschitz and
    adds none)."""
    x, z, _, w, b = _data(shape, axis, dtype)
    rm0, rv0 = np.zeros(shape[axis], np.float32), np.ones(shape[axis], np.float32)
    rm, rv = to_backend(backend, rm0.copy()), to_backend(backend, rv0.copy())
    y, saved = gpubn.batch_norm_forward(to_backend(backend, x), weight=to_backend(backend, w),
                                    bias=to_backend(backend, b), running_mean=rm,
                                    running_var=rv, axis=axis, backend=backend.name,
                                    residual=to_backend(backend, z), activation="relu")
    ref = torch_batch_norm(x, w, b, rm0.copy(), rv0.copy(), axis=axis)
    expected = np.maximum(ref["y"] + z.astype(np.float64), 0.0)
    slack = bn_output_slack(x, w, b, axis, dtype) \
        + 4.0 * acc_unit_roundoff(dtype) * np.abs(z.astype(np.float64))
    assert y.dtype == x.dtype
    assert_rounded_close(y, expected, dtype, slack, name="y")
    # the epilogue leaves the statistics and their update as they are
    rm2, rv2 = to_backend(backend, rm0.copy()), to_backend(backend, rv0.copy())
    _, plain = gpubn.batch_norm_forward(to_backend(backend, x), weight=to_backend(backend, w),
                                        bias=to_backend(backend, b), running_mean=rm2,
                                        running_var=rv2, axis=axis, backend=backend.name)
    assert np.array_equal(to_numpy(rm), to_numpy(rm2))
    assert np.array_equal(to_numpy(rv), to_numpy(rv2))
    assert np.array_equal(to_numpy(saved.invstd), to_numpy(plain.invstd))


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("shape,axis", SHAPES, ids=SHAPE_IDS)
def test_gradients_match_torch_float64(backend, shape, axis, training):
    """float64 data: every output and gradient against PyTorch's autograd of
    relu(batch_norm(x) + z), the ReLU's mask included."""
    dtype = np.float64
    x, z, dy, w, b = _data(shape, axis, dtype)
    w, b = w.astype(np.float64), b.astype(np.float64)
    c = shape[axis]
    rng = np.random.default_rng(1)
    rm, rv = rng.standard_normal(c) * 0.3, rng.uniform(0.5, 2.0, c)
    ref = _torch_block(x, z, w, b, axis, training, dy, rm=rm, rv=rv)
    # the mask is a comparison: no element may sit within rounding of the kink
    assert np.abs(ref["pre"]).min() > 1e-9
    B = lambda a: to_backend(backend, a)  # noqa: E731
    y, saved = gpubn.batch_norm_forward(B(x), weight=B(w), bias=B(b), running_mean=B(rm.copy()),
                                        running_var=B(rv.copy()), training=training, axis=axis,
                                        backend=backend.name, residual=B(z), activation="relu")
    dx, dw, db, dres = gpubn.batch_norm_backward(B(dy), saved)
    if training:
        mean, var = None, None
    else:
        mean, var = rm, rv
    slack = bn_output_slack(x, w, b, axis, dtype, mean=mean, var=var) \
        + 4.0 * acc_unit_roundoff(dtype) * np.abs(z)
    assert_rounded_close(y, ref["y"], dtype, slack, name="y")
    assert np.array_equal(to_numpy(dres), ref["dres"]), "dresidual is dy masked by y > 0"
    g = ref["dres"]
    assert_rounded_close(dx, ref["dx"], dtype,
                         bn_dx_slack(x, g, w, axis, dtype, training, mean=mean, var=var),
                         name="dx")
    red, sum_dy, sum_dy_xhat = bn_sum_terms(x, g, axis, mean=mean, var=var)
    assert_sum_close(db, ref["dbias"], sum_dy, red, dtype, name="dbias")
    assert_sum_close(dw, ref["dweight"], sum_dy_xhat, red, dtype, name="dweight")


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("shape,axis", SHAPES[:3], ids=SHAPE_IDS[:3])
def test_backward_low_precision(backend, shape, axis, dtype):
    """Storage dtypes below float64: the mask is the backend's own y (what it
    is defined from), dresidual is exactly dy where y > 0 and 0 elsewhere, and
    dx is batch norm's gradient of that masked dy within its bound."""
    x, z, dy, w, b = _data(shape, axis, dtype)
    # parameters in the accumulation dtype: dweight / dbias are not rounded further
    acc = np.float64 if dtype == np.float64 else np.float32
    w, b = w.astype(acc), b.astype(acc)
    B = lambda a: to_backend(backend, a)  # noqa: E731
    y, saved = gpubn.batch_norm_forward(B(x), weight=B(w), bias=B(b), axis=axis,
                                        backend=backend.name, residual=B(z), activation="relu")
    dx, dw, db, dres = gpubn.batch_norm_backward(B(dy), saved)
    y = to_numpy(y).astype(np.float64)
    assert (y > 0).any() and (y == 0).any()
    g = np.where(y > 0, dy.astype(np.float64), 0.0)
    assert dres.dtype == x.dtype
    assert np.array_equal(to_numpy(dres).astype(np.float64), g)
    ref = torch_batch_norm(x, w, b, axis=axis, dy=g)
    assert_rounded_close(dx, ref["dx"], dtype, bn_dx_slack(x, g, w, axis, dtype, True),
                         name="dx")
    red, sum_dy, sum_dy_xhat = bn_sum_terms(x, g, axis)
    assert_sum_close(db, ref["dbias"], sum_dy, red, dtype, name="dbias")
    assert_sum_close(dw, ref["dweight"], sum_dy_xhat, red, dtype, name="dweight")


@pytest.mark.parametrize("relu", [False, True], ids=["add", "add-relu"])
@pytest.mark.parametrize("axis", [1, -1])
def test_finite_differences(backend, axis, relu):
    """Gradients of sum(r * y) for a fixed r with respect to x, weight, bias
    and the residual, against central differences (float64, h = 1e-6: the
    truncation error is O(h**2) and the rounding O(eps / h), about 1e-10)."""
    shape = (3, 2, 2, 2) if axis == 1 else (3, 2, 2, 3)
    x, z, r, w, b = _data(shape, axis, np.float64, seed=5)
    w, b = w.astype(np.float64), b.astype(np.float64)
    act = "relu" if relu else None
    B = lambda a: to_backend(backend, a)  # noqa: E731

    def loss(x_, w_, b_, z_):
        y, _ = gpubn.batch_norm_forward(B(x_), weight=B(w_), bias=B(b_), axis=axis,
                                        backend=backend.name, residual=B(z_), activation=act)
        return float((to_numpy(y) * r).sum())

    pre = _torch_block(x, z, w, b, axis, True, r)["pre"]
    assert np.abs(pre).min() > 1e-3  # far from the kink against h
    y, saved = gpubn.batch_norm_forward(B(x), weight=B(w), bias=B(b), axis=axis,
                                        backend=backend.name, residual=B(z), activation=act)
    got = gpubn.batch_norm_backward(B(r), saved)
    num = numeric_gradients(loss, [x, w, b, z])
    for name, g, n in zip(("dx", "dweight", "dbias", "dresidual"),
                          (got[0], got[1], got[2], got[3]), num):
        np.testing.assert_allclose(to_numpy(g), n, rtol=1e-6, atol=1e-7, err_msg=name)


def test_add_alone_passes_dy_through(backend):
    x, z, dy, w, b = _data((4, 3, 5), 1, np.float32)
    B = lambda a: to_backend(backend, a)  # noqa: E731
    _, saved = gpubn.batch_norm_forward(B(x), weight=B(w), bias=B(b), backend=backend.name,
                                        residual=B(z))
    dyb = B(dy)
    dx, dw, db, dres = gpubn.batch_norm_backward(dyb, saved)
    assert dres is dyb
    plain_dx, plain_dw, plain_db = gpubn.batch_norm_backward(
        dyb, gpubn.batch_norm_forward(B(x), weight=B(w), bias=B(b), backend=backend.name)[1])
    assert np.array_equal(to_numpy(dx), to_numpy(plain_dx))
    assert np.array_equal(to_numpy(dw), to_numpy(plain_dw))


def test_relu_without_residual_returns_three(backend):
    x, _, dy, w, b = _data((6, 4), 1, np.float32)
    B = lambda a: to_backend(backend, a)  # noqa: E731
    y, saved = gpubn.batch_norm_forward(B(x), weight=B(w), bias=B(b), backend=backend.name,
                                        activation="relu")
    assert (to_numpy(y) >= 0).all()
    assert len(gpubn.batch_norm_backward(B(dy), saved)) == 3


def test_layer(backend):
    shape, axis = (4, 3, 5, 7), 1
    x, z, dy, _, _ = _data(shape, axis, np.float32)
    B = lambda a: to_backend(backend, a)  # noqa: E731
    layer = gpubn.BatchNorm(3, activation="relu", backend=backend.name)
    assert "activation='relu'" in repr(layer)
    y = layer(B(x), residual=B(z))
    y_ref, saved = gpubn.batch_norm_forward(B(x), weight=B(np.ones(3, np.float32)),
                                            bias=B(np.zeros(3, np.float32)),
                                            backend=backend.name, residual=B(z),
                                            activation="relu")
    assert np.array_equal(to_numpy(y), to_numpy(y_ref))
    assert layer.num_batches_tracked == 1
    dx, dres = layer.backward(B(dy))
    dx_ref, dw_ref, _, dres_ref = gpubn.batch_norm_backward(B(dy), saved)
    assert np.array_equal(to_numpy(dx), to_numpy(dx_ref))
    assert np.array_equal(to_numpy(dres), to_numpy(dres_ref))
    assert np.array_equal(to_numpy(layer.grad_weight), to_numpy(dw_ref))
    # without a residual the same layer applies the ReLU alone and returns dx
    y = layer(B(x))
    assert (to_numpy(y) >= 0).all() and (to_numpy(y) == 0).any()
    assert layer.backward(B(dy)).shape == shape
    layer.eval()
    y = layer(B(x), residual=B(z))
    rm, rv = to_numpy(layer.running_mean), to_numpy(layer.running_var)
    expected = np.maximum((x - _per_channel(rm, shape, axis))
                          / np.sqrt(_per_channel(rv, shape, axis) + 1e-5) + z, 0)
    np.testing.assert_allclose(to_numpy(y), expected, rtol=1e-5, atol=1e-5)


class _ForeignArray:
    """An array of some other array module (as a CuPy array is to NumPy)."""

    def __init__(self, a):
        self.dtype, self.shape, self.ndim = a.dtype, a.shape, a.ndim


@pytest.mark.parametrize("kwargs,error,match", [
    (dict(activation="gelu"), ValueError, "activation must be None or 'relu', got 'gelu'"),
    (dict(activation=1), TypeError, "activation must be None or 'relu', got int"),
    (dict(residual="z"), TypeError, "residual must be an array"),
    (dict(residual=np.zeros((4, 3, 6), np.float32)), ValueError,
     r"residual must have the shape of x \(4, 3, 5\), got \(4, 3, 6\)"),
    (dict(residual=np.zeros((4, 3, 5), np.float64)), TypeError,
     r"residual must have the dtype of x \(float32\), got float64"),
    (dict(residual=_ForeignArray(np.zeros((4, 3, 5), np.float32))), TypeError,
     "residual must be a numpy array for backend"),
])
def test_bad_input_leaves_state_untouched(backend, kwargs, error, match):
    if backend.xp is not np:
        pytest.skip("the bad arrays are NumPy arrays")
    x = _data((4, 3, 5), 1, np.float32)[0]
    rm, rv = np.full(3, 0.25, np.float32), np.full(3, 2.0, np.float32)
    with pytest.raises(error, match=match):
        gpubn.batch_norm_forward(x, running_mean=rm, running_var=rv, backend=backend.name,
                                 **kwargs)
    assert (rm == 0.25).all() and (rv == 2.0).all()
    if "activation" in kwargs:
        with pytest.raises(error, match=match):
            gpubn.BatchNorm(3, backend=backend.name, **kwargs)
        return
    layer = gpubn.BatchNorm(3, backend=backend.name)
    with pytest.raises(error, match=match):
        layer(x, **kwargs)
    assert layer.num_batches_tracked == 0
    assert (layer.running_mean == 0).all() and (layer.running_var == 1).all()


@pytest.mark.parametrize("epilogue", [dict(activation="relu"), dict(residual=True),
                                      dict(residual=True, activation="relu")],
                         ids=["relu", "residual", "both"])
def test_ghost_batch_norm_refused_before_state_changes(backend, epilogue):
    """virtual_batch_size with the epilogue is not supported: a clear error
    naming both, from the function and the layer, with no state touched."""
    x, z = _data((4, 3, 5), 1, np.float32)[:2]
    x, z = to_backend(backend, x), to_backend(backend, z)
    kwargs = dict(epilogue, residual=z) if "residual" in epilogue else dict(epilogue)
    match = "virtual_batch_size=2 cannot be combined with residual= or activation="
    rm = to_backend(backend, np.full(3, 0.25, np.float32))
    rv = to_backend(backend, np.full(3, 2.0, np.float32))
    with pytest.raises(ValueError, match=match):
        gpubn.batch_norm_forward(x, running_mean=rm, running_var=rv, backend=backend.name,
                                 virtual_batch_size=2, **kwargs)
    assert (to_numpy(rm) == 0.25).all() and (to_numpy(rv) == 2.0).all()
    layer = gpubn.BatchNorm(3, backend=backend.name, virtual_batch_size=2,
                            activation=epilogue.get("activation"))
    with pytest.raises(ValueError, match=match):
        layer(x, residual=kwargs.get("residual"))
    assert layer.num_batches_tracked == 0
    assert (to_numpy(layer.running_mean) == 0).all() and (to_numpy(layer.running_var) == 1).all()
