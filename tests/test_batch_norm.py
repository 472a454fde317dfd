"""batch_norm_forward / batch_norm_backward against PyTorch CPU, on every backend.

Shapes stay small (a few thousand elements, one ~50k case for multi-block
reductions) because the emu backend runs the CUDA kernels element by element.
"""

from __future__ import annotations

import numpy as np
import pytest

import gpubn
from conftest import (DTYPES, assert_close, assert_rounded_close, assert_sum_close,
                      bn_dx_slack, bn_output_slack, bn_sum_terms, numeric_gradients, to_backend, to_numpy,
                      torch_batch_norm)

# (shape, channel axis): C=1, m=2, spatial 1x1, odd sizes, NC/NCL/NCHW/NCDHW,
# channels-last and a middle axis.
SHAPES = [
    ((6, 4), 1),              # NC
    ((2, 3), 1),              # m = 2 values per channel
    ((5, 1, 7), 1),           # C = 1, NCL
    ((4, 3, 1, 1), 1),        # spatial 1x1
    ((3, 5, 7, 13), 1),       # odd NCHW
    ((2, 3, 4, 3, 5), 1),     # NCDHW
    ((3, 7, 5, 6), -1),       # channels-last NHWC
    ((4, 6, 5, 3), 2),        # a middle axis
    ((4, 2, 96, 64), 1),      # ~50k: several blocks per channel
]
SHAPE_IDS = [f"{'x'.join(map(str, s))}-ax{a}" for s, a in SHAPES]


def make_input(shape, axis, dtype, seed=0, offset=3.0):
    """Data with a different mean and scale per channel (catches axis mix-ups)."""
    rng = np.random.default_rng(seed)
    c = shape[axis]
    bshape = [1] * len(shape)
    bshape[axis] = c
    mean = (offset * rng.standard_normal(c)).reshape(bshape)
    scale = rng.uniform(0.5, 2.0, c).reshape(bshape)
    return (rng.standard_normal(shape) * scale + mean).astype(dtype)


def params(c, dtype, seed=1):
    rng = np.random.default_rng(seed)
    pdt = np.float64 if dtype == np.float64 else np.float32
    return (rng.uniform(0.5, 1.5, c).astype(pdt), rng.standard_normal(c).astype(pdt),
            (0.5 * rng.standard_normal(c)).astype(pdt), rng.uniform(0.5, 2.0, c).astype(pdt))


@pytest.mark.parametrize("shape,axis", SHAPES, ids=SHAPE_IDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("mode", ["train", "train-noaffine", "eval"])
def test_forward_backward_matches_torch(backend, shape, axis, dtype, mode):
    training = mode.startswith("train")
    affine = mode != "train-noaffine"
    x = make_input(shape, axis, dtype)
    c = shape[axis]
    w, b, rm, rv = params(c, dtype)
    if not affine:
        w = b = None
    dy = np.random.default_rng(2).standard_normal(shape).astype(dtype)
    ref = torch_batch_norm(x, w, b, rm, rv, training=training, axis=axis, dy=dy)

    rm_b, rv_b = to_backend(backend, rm.copy()), to_backend(backend, rv.copy())
    y, saved = gpubn.batch_norm_forward(
        to_backend(backend, x), weight=to_backend(backend, w), bias=to_backend(backend, b),
        running_mean=rm_b, running_var=rv_b, training=training, axis=axis, backend=backend.name)
    assert y.shape == x.shape and y.dtype == x.dtype
    stats = {} if training else dict(mean=rm, var=rv)
    assert_rounded_close(y, ref["y"], dtype, bn_output_slack(x, w, b, axis, dtype, **stats), "y")
    assert_close(rm_b, ref["running_mean"], np.float32 if dtype != np.float64 else dtype,
                 "running_mean")
    assert_close(rv_b, ref["running_var"], np.float32 if dtype != np.float64 else dtype,
                 "running_var")

    dx, dw, db = gpubn.batch_norm_backward(to_backend(backend, dy), saved)
    assert dx.shape == x.shape and dx.dtype == x.dtype
    assert_rounded_close(dx, ref["dx"], dtype,
                         bn_dx_slack(x, dy, w, axis, dtype, training, **stats), "dx")
    if affine:
        # per-channel sums of m terms, bound from the accumulation dtype and m
        red, db_terms, dw_terms = bn_sum_terms(x, dy, axis, **stats)
        assert_sum_close(dw, ref["dweight"], dw_terms, red, dtype, "dweight")
        assert_sum_close(db, ref["dbias"], db_terms, red, dtype, "dbias")
    else:
        assert dw is None and db is None


@pytest.mark.parametrize("momentum", [0.1, 0.0, 1.0, None])
def test_running_stats_over_steps_match_torch(backend, torch, momentum):
    shape, c = (8, 3, 5, 4), 3
    bn_t = torch.nn.BatchNorm2d(c, momentum=momentum, dtype=torch.float64)
    rm = to_backend(backend, np.zeros(c))
    rv = to_backend(backend, np.ones(c))
    nbt = 0
    for step in range(4):
        x = make_input(shape, 1, np.float64, seed=10 + step, offset=2.0)
        gpubn.batch_norm_forward(to_backend(backend, x), running_mean=rm, running_var=rv,
                                 training=True,
                                 momentum=momentum, num_batches_tracked=nbt,
                                 backend=backend.name)
        nbt += 1
        bn_t(torch.tensor(x))
        assert_close(rm, bn_t.running_mean.numpy(), np.float64, f"running_mean step {step}")
        assert_close(rv, bn_t.running_var.numpy(), np.float64, f"running_var step {step}")
    # eval after training equals PyTorch's eval
    bn_t.eval()
    x = make_input(shape, 1, np.float64, seed=99)
    y, _ = gpubn.batch_norm_forward(to_backend(backend, x), running_mean=rm, running_var=rv,
                                    training=False, backend=backend.name)
    assert_close(y, bn_t(torch.tensor(x)).detach().numpy(), np.float64, "eval y")


@pytest.mark.parametrize("layout", ["fortran", "strided", "transposed"])
def test_noncontiguous_inputs_give_contiguous_results(backend, layout):
    base = make_input((6, 4, 10, 6), 1, np.float32)
    if layout == "fortran":
        x = np.asfortranarray(base)
        dy = np.asfortranarray(base[::-1])
    elif layout == "strided":
        big = make_input((6, 4, 10, 12), 1, np.float32, seed=5)
        x = big[:, :, :, ::2]
        dy = big[::-1, :, :, 1::2]
    else:
        x = base.transpose(0, 1, 3, 2)
        dy = base[::-1].transpose(0, 1, 3, 2)
    assert not x.flags.c_contiguous and not x.flags.f_contiguous or layout == "fortran"
    assert not dy.flags.c_contiguous
    xb, dyb = to_backend(backend, x), to_backend(backend, dy)
    xc, dyc = to_backend(backend, np.ascontiguousarray(x)), to_backend(backend, np.ascontiguousarray(dy))
    y1, s1 = gpubn.batch_norm_forward(xb, backend=backend.name)
    y2, s2 = gpubn.batch_norm_forward(xc, backend=backend.name)
    dx1 = gpubn.batch_norm_backward(dyb, s1)[0]
    dx2 = gpubn.batch_norm_backward(dyc, s2)[0]
    # the promise of the name: C-contiguous results of the input's shape
    assert y1.shape == dx1.shape == x.shape
    assert y1.flags.c_contiguous and dx1.flags.c_contiguous
    np.testing.assert_array_equal(to_numpy(y1), to_numpy(y2))
    np.testing.assert_array_equal(to_numpy(dx1), to_numpy(dx2))


def test_eval_backward_is_frozen_batch_norm(backend):
    """After an eval forward, dx = dy * weight / sqrt(running_var + eps) exactly
    as PyTorch computes it, and dweight uses the running statistics."""
    shape, axis = (4, 3, 5), 1
    x = make_input(shape, axis, np.float64)
    w, b, rm, rv = params(3, np.float64)
    dy = np.random.default_rng(3).standard_normal(shape)
    ref = torch_batch_norm(x, w, b, rm, rv, training=False, dy=dy)
    xb, wb, bb, rmb, rvb = (to_backend(backend, a) for a in (x, w, b, rm, rv))
    y, saved = gpubn.batch_norm_forward(xb, weight=wb, bias=bb, running_mean=rmb,
                                        running_var=rvb, training=False, backend=backend.name)
    dx, dw, db = gpubn.batch_norm_backward(to_backend(backend, dy), saved)
    expected_dx = dy * (w / np.sqrt(rv + 1e-5))[None, :, None]
    assert_close(dx, expected_dx, np.float64, "dx")
    assert_close(dx, ref["dx"], np.float64, "dx vs torch")
    assert_close(dw, ref["dweight"], np.float64, "dweight")
    assert_close(db, ref["dbias"], np.float64, "dbias")


def test_gradient_finite_differences_float64(backend):
    """Central differences of L = sum(y * g) in float64, without PyTorch."""
    shape, axis = (3, 2, 4), 1
    rng = np.random.default_rng(7)
    x = make_input(shape, axis, np.float64, seed=7)
    w = rng.uniform(0.5, 1.5, 2)
    b = rng.standard_normal(2)
    g = rng.standard_normal(shape)

    def loss(x_, w_, b_):
        y, _ = gpubn.batch_norm_forward(to_backend(backend, x_), weight=to_backend(backend, w_),
                                        bias=to_backend(backend, b_), axis=axis,
                                        backend=backend.name)
        return float(np.sum(to_numpy(y) * g))

    _, saved = gpubn.batch_norm_forward(to_backend(backend, x), weight=to_backend(backend, w),
                                        bias=to_backend(backend, b), axis=axis,
                                        backend=backend.name)
    dx, dw, db = (to_numpy(a) for a in gpubn.batch_norm_backward(to_backend(backend, g), saved))
    numeric = numeric_gradients(loss, (x, w, b))
    for grad, num, name in zip((dx, dw, db), numeric, ("dx", "dweight", "dbias")):
        np.testing.assert_allclose(grad, num, rtol=1e-6, atol=1e-7, err_msg=name)
