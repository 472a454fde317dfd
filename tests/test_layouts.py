"""Inputs laid out as a permutation of a contiguous array run on a view
(issue 15, item 10).  A PyTorch ``channels_last`` tensor reaches gpubn
through DLPack with shape NCHW and NHWC strides; with ``axis=1`` it used to be
made C-contiguous (a hidden copy: two extra passes in the forward, two in the
backward).  It is now the channels-last canonical view (N*H*W, C, 1): the same
kernels, bytes and launches as a contiguous NHWC array with ``axis=-1``, and
results come back in the input's layout, as PyTorch returns them."""

import numpy as np
import pytest

import gpubn
from gpubn import _validation as V
from gpubn import kernels as catalog
from conftest import backend_or_skip


def channels_last(shape_nchw, dtype=np.float32, seed=0):
    """An NCHW-shaped array with channels-last memory (what
    ``torch.channels_last`` gives), and its contiguous NHWC twin."""
    n, c, h, w = shape_nchw
    nhwc = np.random.default_rng(seed).standard_normal((n, h, w, c)).astype(dtype)
    return nhwc.transpose(0, 3, 1, 2), nhwc


def test_layout_order():
    x, _ = channels_last((2, 3, 4, 5))
    assert V.layout_order(x, 1) == (0, 2, 3, 1)
    assert V.layout_order(np.ones((2, 3, 4)), 1) == (0, 1, 2)
    # the channel axis may move, the others keep their order: Fortran order
    # and transposes of the other axes are copied (C-contiguous results)
    assert V.layout_order(np.ones((2, 3, 4), order="F"), 1) == (0, 1, 2)
    assert V.layout_order(np.ones((2, 3, 4, 5)).transpose(0, 1, 3, 2), 1) == (0, 1, 2, 3)
    # channels-first memory of an NHWC-shaped array with axis=-1
    assert V.layout_order(np.ones((2, 5, 3, 4)).transpose(0, 2, 3, 1), 3) == (0, 3, 1, 2)
    # sliced: no permutation of it is contiguous
    assert V.layout_order(np.ones((4, 6, 5))[:, ::2], 1) == (0, 1, 2)
    # one channel or one row: length-1 axes do not decide
    x1, _ = channels_last((2, 1, 4, 5))
    assert x1.transpose(V.layout_order(x1, 1)).flags.c_contiguous
    torch = pytest.importorskip("torch")
    t = torch.randn(2, 3, 4, 5).to(memory_format=torch.channels_last)
    assert V.layout_order(t.numpy(), 1) == (0, 2, 3, 1)


def test_canonical_view_of_channels_last_is_a_view_and_maps_back():
    x, nhwc = channels_last((2, 3, 4, 5))
    order = V.layout_order(x, 1)
    x3 = V.canonical_view(x, 1, np, order)
    assert x3.shape == (2 * 4 * 5, 3, 1) and np.shares_memory(x3, x)
    back = V.from_canonical(x3, x.shape, order)
    assert back.shape == x.shape and back.strides == x.strides
    assert np.array_equal(back, x)
    # a C-contiguous dy in the backward is put in x's layout (one copy)
    dy3 = V.canonical_view(np.ascontiguousarray(x), 1, np, order)
    assert np.array_equal(dy3, x3) and not np.shares_memory(dy3, x)


@pytest.mark.parametrize("backend", ["numpy", "emu"])
def test_channels_last_results_equal_the_contiguous_nhwc_ones(backend):
    backend_or_skip(backend)
    x, nhwc = channels_last((3, 5, 4, 6))
    dy, dy_nhwc = channels_last((3, 5, 4, 6), seed=1)
    c = 5
    w, b = np.linspace(0.5, 1.5, c).astype(np.float32), np.linspace(-1, 1, c).astype(np.float32)
    rm1, rv1, rm2, rv2 = np.zeros(c), np.ones(c), np.zeros(c), np.ones(c)
    y, saved = gpubn.batch_norm_forward(x, weight=w, bias=b, running_mean=rm1,
                                        running_var=rv1, axis=1, backend=backend)
    dx, dw, db = gpubn.batch_norm_backward(dy, saved)
    y2, saved2 = gpubn.batch_norm_forward(nhwc, weight=w, bias=b, running_mean=rm2,
                                          running_var=rv2, axis=-1, backend=backend)
    dx2, dw2, db2 = gpubn.batch_norm_backward(dy_nhwc, saved2)
    # the same canonical array, the same kernels: the same bits
    assert np.shares_memory(saved.x3, x)
    assert y.strides == x.strides and dx.strides == x.strides
    for a, e in ((y, y2.transpose(0, 3, 1, 2)), (dx, dx2.transpose(0, 3, 1, 2)), (dw, dw2),
                 (db, db2), (rm1, rm2), (rv1, rv2)):
        assert np.array_equal(a, e)
    # batch renorm takes the same path
    rs = np.ones(c)
    yr, sr = gpubn.batch_renorm_forward(x, running_mean=np.zeros(c), running_std=rs,
                                        axis=1, backend=backend)
    assert np.shares_memory(sr.bn.x3, x) and yr.strides == x.strides
    dxr, _, _ = gpubn.batch_renorm_backward(dy, sr)
    assert dxr.strides == x.strides


def _tensor_bytes(log):
    total = 0
    for rec in log:
        spec = catalog.kernel_of(rec.kernel)
        total += sum(t.loaded + t.stored for i, t in rec.buffers.items()
                     if i in spec.tensor_args)
    return len(log), total


@pytest.mark.parametrize("read_once,passes,launches", [(False, 8, 4), (True, 5, 2)],
                         ids=["two-pass", "read-once"])
def test_channels_last_costs_the_passes_of_a_contiguous_input(read_once, passes, launches):
    """emu traffic: forward and backward of the channels-last NCHW tensor
    move the tensor bytes (and launch the kernels) of the contiguous NHWC
    array, with no copy of x or dy outside the kernels (the canonical input
    is a view of x)."""
    import dataclasses

    backend_or_skip("emu")
    from gpubn.backends.emu import EMU_TUNING, EmuBackend
    from gpubn.emu import recording

    emu = EmuBackend(tuning=dataclasses.replace(EMU_TUNING, read_once=read_once))

    x, nhwc = channels_last((4, 6, 5, 7))
    dy, dy_nhwc = channels_last((4, 6, 5, 7), seed=2)
    counts = []
    for xx, dd, axis in ((x, dy, 1), (nhwc, dy_nhwc, -1)):
        with recording() as log:
            y, saved = gpubn.batch_norm_forward(xx, axis=axis, backend=emu)
            gpubn.batch_norm_backward(dd, saved)
        counts.append(_tensor_bytes(log))
        assert np.shares_memory(saved.x3, xx)
    assert counts[0] == counts[1]
    # forward: two-pass 3 passes in 2 launches (stats, apply: read x twice,
    # write y), read-once 2 in 1 (read x, write y); backward: two-pass 5 in 2
    # (read dy and x twice, write dx), read-once 3 in 1
    assert counts[0] == (launches, passes * x.nbytes)
