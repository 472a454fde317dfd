"""``out=`` of batch_norm_forward / layer_norm_forward (y) and
batch_norm_backward / layer_norm_backward (dx): the result is written into
the caller's array, which is returned, with the same values as a new result,
on every backend, layout and op; bad ``out`` arguments raise before any
state changes."""

from __future__ import annotations

import numpy as np
import pytest

import gpubn
from conftest import BFLOAT16, backend_or_skip, to_backend, to_numpy


def _channels_last(a):
    """An NCHW-shaped array with channels-last memory (PyTorch's
    ``channels_last``)."""
    return np.ascontiguousarray(a.transpose(0, 2, 3, 1)).transpose(0, 3, 1, 2)


# (shape, axis, memory): memory "cl" is NCHW shape with channels-last strides;
# on the cpu backend (4, 16, 4, 5) runs the fused tiles, (4, 3, 4, 5) the
# two passes over runs, the others the two passes over rows
LAYOUTS = [((4, 6, 5, 3), 1, "c"), ((4, 16, 4, 5), 1, "c"), ((4, 3, 4, 5), 1, "c"),
           ((4, 3, 2, 6), -1, "c"), ((4, 6, 5, 3), 1, "cl"), ((40, 7), 1, "c")]

OPS = ["train", "eval", "train+add+relu", "eval+add+relu", "ghost"]


def _arrays(backend, shape, memory, dtype=np.float32):
    rng = np.random.default_rng(1)
    xs = [(rng.standard_normal(shape) * 2 + 1).astype(dtype) for _ in range(3)]
    if memory == "cl":
        xs = [_channels_last(a) for a in xs]
    return [to_backend(backend, a) if memory == "c" else a for a in xs]


def _nan_like(backend, x):
    """A NaN-filled array laid out like ``x`` (each element must be written)."""
    xp = backend.xp
    if x.flags.c_contiguous:
        return xp.full(x.shape, np.nan, dtype=x.dtype)
    return _channels_last(np.full(x.shape, np.nan, dtype=x.dtype))


def _run(backend, op, x, z, dy, axis=1, out_y=None, out_dx=None):
    xp = backend.xp
    c = x.shape[axis]
    rm, rv = xp.zeros(c, np.float32), xp.ones(c, np.float32)
    kw = dict(running_mean=rm, running_var=rv, backend=backend.name, axis=axis)
    if op.startswith("eval"):
        kw["training"] = False
    if op.endswith("add+relu"):
        kw.update(residual=z, activation="relu")
    if op == "ghost":
        kw["virtual_batch_size"] = x.shape[0] // 2
    y, saved = gpubn.batch_norm_forward(x, out=out_y, **kw)
    dx = gpubn.batch_norm_backward(dy, saved, out=out_dx)[0]
    return y, dx, rm, rv


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("layout", LAYOUTS, ids=lambda l: f"{'x'.join(map(str, l[0]))}-{l[2]}")
def test_out_receives_the_result(backend, layout, op):
    shape, axis, memory = layout
    if memory == "cl" and backend.xp is not np:
        pytest.skip("channels-last memory is built with NumPy here")
    x, z, dy = _arrays(backend, shape, memory)
    y0, dx0, rm0, rv0 = _run(backend, op, x, z, dy, axis)
    oy, odx = _nan_like(backend, x), _nan_like(backend, x)
    y1, dx1, rm1, rv1 = _run(backend, op, x, z, dy, axis, oy, odx)
    assert y1 is oy and dx1 is odx
    for name, a, e in (("y", y1, y0), ("dx", dx1, dx0), ("running_mean", rm1, rm0),
                       ("running_var", rv1, rv0)):
        np.testing.assert_array_equal(to_numpy(a), to_numpy(e), err_msg=name)


def test_out_for_float16_and_bfloat16(backend):
    for dtype in (np.float16, BFLOAT16):
        if dtype is None:
            continue
        x, z, dy = _arrays(backend, (6, 5, 4), "c", dtype)
        y0, dx0, _, _ = _run(backend, "train+add+relu", x, z, dy)
        oy, odx = backend.xp.empty_like(x), backend.xp.empty_like(x)
        y1, dx1, _, _ = _run(backend, "train+add+relu", x, z, dy, 1, oy, odx)
        assert y1 is oy and dx1 is odx
        np.testing.assert_array_equal(to_numpy(y1).view(np.uint16), to_numpy(y0).view(np.uint16))
        np.testing.assert_array_equal(to_numpy(dx1).view(np.uint16),
                                      to_numpy(dx0).view(np.uint16))


def _bad_outs(x, z):
    """(out, exception, message) for each kind of bad ``out`` of the forward."""
    return [
        (np.empty(x.shape[:-1] + (x.shape[-1] + 1,), x.dtype), ValueError, "must have the shape"),
        (np.empty(x.shape, np.float64), TypeError, "must have the dtype"),
        ([[0.0]], TypeError, "must be an array"),
        (np.empty(x.shape[:-1] + (2 * x.shape[-1],), x.dtype)[..., ::2], ValueError,
         "must be laid out as the result"),
        (_channels_last(np.empty(x.shape, x.dtype)), ValueError, "laid out as the result"),
        (x, ValueError, "must not share memory with x"),
        (x[...], ValueError, "must not share memory with x"),   # a view of x
        (z, ValueError, "must not share memory with residual"),
    ]


def test_bad_out_raises_before_any_state_changes():
    x, z, dy = _arrays(backend_or_skip("numpy"), (4, 6, 5, 3), "c")
    ro = np.empty_like(x)
    ro.flags.writeable = False
    cases = _bad_outs(x, z) + [(ro, ValueError, "must be writeable")]
    for backend in ("numpy", "cpu", "emu"):
        backend_or_skip(backend)
        for out, exc, msg in cases:
            rm, rv = np.zeros(6, np.float32), np.ones(6, np.float32)
            x_before = x.copy()
            with pytest.raises(exc, match=msg):
                gpubn.batch_norm_forward(x, running_mean=rm, running_var=rv, residual=z,
                                         backend=backend, out=out)
            assert (rm == 0).all() and (rv == 1).all()
            np.testing.assert_array_equal(x, x_before)


def test_bad_out_of_the_backward():
    x, z, dy = _arrays(backend_or_skip("numpy"), (4, 6, 5, 3), "c")
    y, saved = gpubn.batch_norm_forward(x, residual=z, activation="relu", backend="numpy")
    for out, msg in ((dy, "must not share memory with dy"),
                     (x, "must not share memory with the saved input"),
                     (y, "must not share memory with the forward's y"),
                     (np.empty((4, 6, 5, 4), x.dtype), "must have the shape")):
        with pytest.raises(ValueError, match=msg):
            gpubn.batch_norm_backward(dy, saved, out=out)
    # a channels-last input's dx must be channels-last memory as well
    xc = _channels_last(x)
    _, saved = gpubn.batch_norm_forward(xc, backend="numpy")
    with pytest.raises(ValueError, match="laid out as the result"):
        gpubn.batch_norm_backward(_channels_last(dy), saved, out=np.empty_like(dy))
    dyc = _channels_last(dy)
    dx = gpubn.batch_norm_backward(dyc, saved, out=_channels_last(np.empty_like(dy)))[0]
    np.testing.assert_array_equal(dx, gpubn.batch_norm_backward(dyc, saved)[0])


@pytest.mark.parametrize("affine", [False, True], ids=["plain", "affine"])
def test_layer_norm_out(backend, affine):
    x, _, dy = _arrays(backend, (6, 5, 8), "c")
    xp = backend.xp
    w = b = None
    if affine:
        w, b = xp.linspace(0.5, 1.5, 8).astype(np.float32), xp.ones(8, np.float32)
    y0, s0 = gpubn.layer_norm_forward(x, (8,), w, b, backend=backend.name)
    oy, odx = _nan_like(backend, x), _nan_like(backend, x)
    y1, s1 = gpubn.layer_norm_forward(x, (8,), w, b, backend=backend.name, out=oy)
    g0 = gpubn.layer_norm_backward(dy, s0)
    g1 = gpubn.layer_norm_backward(dy, s1, out=odx)
    assert y1 is oy and g1[0] is odx
    np.testing.assert_array_equal(to_numpy(y1), to_numpy(y0))
    for a, e in zip(g1, g0):
        np.testing.assert_array_equal(to_numpy(a), to_numpy(e))


def test_bad_out_of_layer_norm():
    x, _, dy = _arrays(backend_or_skip("numpy"), (6, 5, 8), "c")
    for out, exc, msg in [(np.empty((6, 5, 9), x.dtype), ValueError, "must have the shape"),
                          (np.empty(x.shape, np.float64), TypeError, "must have the dtype"),
                          (np.empty((6, 5, 16), x.dtype)[..., ::2], ValueError, "laid out"),
                          (x[...], ValueError, "must not share memory with x")]:
        with pytest.raises(exc, match=msg):
            gpubn.layer_norm_forward(x, (8,), out=out)
    _, saved = gpubn.layer_norm_forward(x, (8,))
    with pytest.raises(ValueError, match="must not share memory with dy"):
        gpubn.layer_norm_backward(dy, saved, out=dy)
