"""The library's performance bar, counted by emu: global-memory element
passes over the tensors (x, y, dy, dx) and kernel launches per op.

  forward, training   <= 3 passes, <= 3 launches  (ours: 3 passes, 2 launches when
                                                   x does not fit on chip; else 2, 1:
                                                   test_read_once.py)
  forward, inference     2 passes,    1 launch
  backward, training  <= 5 passes, <= 3 launches  (ours: 5 passes, 2 launches when
                                                   x and dy do not fit on chip; else 3, 1:
                                                   test_read_once.py)
  backward, eval                                  (ours: 3 passes, 1 launch)

and the same with the residual-block epilogue (y = relu(bn(x) + residual)),
whose counts are listed above its tests below.

A pass is one tensor's worth of bytes loaded or stored; the per-launch,
per-argument byte counts come from ``gpubn.emu.launch_log``.  The bounds
asserted are the ones the kernels are designed for, so any extra pass or
launch fails here.
"""

from __future__ import annotations

import numpy as np
import pytest

from gpubn import kernels as catalog
from gpubn.backends import get_backend
from gpubn.launch import MAP_UNROLL

try:
    EMU = get_backend("emu")
    _REASON = None
except RuntimeError as exc:
    EMU, _REASON = None, str(exc)
else:
    import dataclasses

    from gpubn.backends.emu import EMU_TUNING, EmuBackend

    # the training forward and backward when the tensor does not fit on chip
    # (the read-once kernels' counts are asserted in test_read_once.py)
    TWO_PASS = EmuBackend(tuning=dataclasses.replace(EMU_TUNING, read_once=False))

pytestmark = pytest.mark.skipif(EMU is None, reason=_REASON or "")

SHAPES = {
    "nchw-vector": (8, 3, 256),
    "nchw-tail": (8, 3, 251),
    "nhwc": (500, 12, 1),
}


# The read-once kernels' grid barrier counter (argument position): emu counts
# every poll of it, as many as the block schedule makes (on a GPU one word in
# L2), so traffic counts leave it out.
BARRIER_ARG = {"bn_forward_once_nchw": 8, "bn_forward_once_nhwc": 7,
               "bn_backward_once_nchw": 10, "bn_backward_once_nhwc": 9}


def _count(log, nbytes):
    """(launches, tensor passes, [(launch, bytes of its other arguments)])."""
    tensor_bytes = 0
    other = []
    for rec in log:
        spec = catalog.kernel_of(rec.kernel)
        rest = 0
        for index, traffic in rec.buffers.items():
            moved = traffic.loaded + traffic.stored
            if index in spec.tensor_args:
                tensor_bytes += moved
            else:
                rest += moved
        other.append((rec, rest))
    return len(log), tensor_bytes / nbytes, other


def _side_traffic_is_per_channel(other, shape):
    """Arguments other than the tensors (per-channel vectors, partials,
    counters) move a bounded number of bytes, never one access per element:
    a reduction block at most 64 per channel plus 64 (a partial state and its
    counter), and each of its threads at most 64 (its channels' constants);
    an elementwise thread at most 64 (its channel's constants) per
    MAP_UNROLL runs of a channel it handles for channel axis 1, per channel
    it handles for channels last (per thread: on a GPU a warp's reads of one value are one
    broadcast through the read-only cache, not DRAM traffic)."""
    outer, channels, inner = shape
    for rec, moved in other:
        blocks = rec.grid[0] * rec.grid[1] * rec.grid[2]
        threads = blocks * rec.block[0] * rec.block[1] * rec.block[2]
        name = catalog.kernel_of(rec.kernel).name
        if "apply" in name or "_dx_" in name:
            vec = int(rec.kernel.rsplit(",", 1)[1].strip(" >"))
            if inner > 1:   # one group of MAP_UNROLL runs of a channel at a time
                groups = channels * -(-outer // MAP_UNROLL)
                per_thread = -(-groups // (rec.grid[1] * rec.block[1]))
            else:
                per_thread = vec * -(-(channels // vec) // (rec.grid[0] * rec.block[0]))
            assert moved <= threads * per_thread * 64, (rec.kernel, rec.grid, moved)
        else:   # partials and counters per block, its channels' constants per thread
            assert moved <= blocks * (64 * channels + 64) + threads * 64, (rec.kernel, moved)


def _data(shape, dtype):
    rng = np.random.default_rng(0)
    acc = np.float64 if dtype == np.float64 else np.float32
    c = shape[1]
    x = rng.standard_normal(shape).astype(dtype)
    dy = rng.standard_normal(shape).astype(dtype)
    return x, dy, np.ones(c, acc), np.zeros(c, acc), np.zeros(c, acc), np.ones(c, acc)


@pytest.fixture(params=list(SHAPES))
def shape(request):
    return SHAPES[request.param]


@pytest.fixture(params=[np.float32, np.float16], ids=["float32", "float16"])
def dtype(request):
    return request.param


def _record(fn):
    from gpubn.emu import recording

    with recording() as log:
        out = fn()
    return log, out


def _assert_counts(fn, x, launches, passes, shape=None):
    """Run ``fn`` under emu's recorder: it made ``launches`` launches and
    ``passes`` passes over x-sized tensors, and (given ``shape``) its other
    arguments moved per-channel amounts only.  Returns what ``fn`` returned."""
    log, out = _record(fn)
    got_launches, got_passes, other = _count(log, x.nbytes)
    assert (got_launches, got_passes) == (launches, passes), [r.kernel for r in log]
    if shape is not None:
        _side_traffic_is_per_channel(other, shape)
    return out


def test_forward_training(shape, dtype):
    x, _, w, b, rm, rv = _data(shape, dtype)
    _assert_counts(lambda: TWO_PASS.bn_forward_train(x, w, b, rm, rv, 0.1, 1e-5), x, 2, 3.0,
                   shape)


def test_forward_inference(shape, dtype):
    x, _, w, b, rm, rv = _data(shape, dtype)
    _assert_counts(lambda: EMU.bn_forward_eval(x, w, b, rm, rv, 1e-5), x, 1, 2.0, shape)


def test_backward_training(shape, dtype):
    x, dy, w, _, _, _ = _data(shape, dtype)
    _, mean, invstd = EMU.bn_forward_train(x, w, None, None, None, 0.1, 1e-5)
    _assert_counts(lambda: TWO_PASS.bn_backward(dy, x, mean, invstd, w, True), x, 2, 5.0, shape)


def test_backward_eval_is_one_pass_over_each_tensor(shape, dtype):
    x, dy, w, _, _, _ = _data(shape, dtype)
    mean, invstd = np.zeros_like(w), np.ones_like(w)
    _assert_counts(lambda: EMU.bn_backward(dy, x, mean, invstd, w, False), x, 1, 3.0)


def test_stats_only(shape, dtype):
    x = _data(shape, dtype)[0]
    _assert_counts(lambda: EMU.bn_stats(x), x, 1, 1.0)


def test_counts_see_every_tensor_argument():
    """The catalog's tensor argument positions are the arrays of x's size:
    over calls that pass every optional one (residual, dx_eval, the ReLU's
    mask and masked gradient), each kernel's big arguments are exactly its
    tensor arguments, on the two-pass and the read-once paths."""
    x, dy, w, b, rm, rv = _data(SHAPES["nchw-tail"], np.float32)
    z = x[::-1].copy()
    logs = []
    for be in (TWO_PASS, EMU):  # the two-pass kernels, then the read-once ones
        log, (y, mean, invstd) = _record(
            lambda: be.bn_forward_train_act(x, w, b, rm, rv, 0.1, 1e-5, z, True))
        logs += log
        for training in (True, False):
            logs += _record(lambda: be.bn_backward_relu(dy, x, mean, invstd, w, y, training))[0]
    seen = {}
    for rec in logs:
        name = catalog.kernel_of(rec.kernel).name
        big = {i for i, t in rec.buffers.items()
               if max(t.loaded, t.stored) >= x.nbytes and i != BARRIER_ARG.get(name)}
        seen.setdefault(name, set()).update(big)
    assert set(seen) == {"bn_stats_nchw", "bn_apply_nchw", "bn_backward_reduce_nchw",
                         "bn_backward_dx_nchw", "bn_forward_once_nchw",
                         "bn_backward_once_nchw"}
    for name, big in seen.items():
        assert big == set(catalog.KERNELS[name].tensor_args), (name, big)


# -- the residual-block epilogue: no extra launch, one pass per extra tensor ----------------
#
#   forward training + add + relu      2 launches, 4 passes (x twice, residual, y)
#   forward inference + add + relu     1 launch,   3 passes
#   backward training of relu          2 launches, 7 passes (dy, y, x, write g; g, x, dx)
#   backward eval of relu              1 launch,   5 passes (dy, y, x; write dx and g)
#   backward of an add alone           as plain batch norm (dresidual is dy)


@pytest.mark.parametrize("relu", [False, True], ids=["add", "add-relu"])
def test_forward_training_with_residual(shape, dtype, relu):
    x, _, w, b, rm, rv = _data(shape, dtype)
    z = x[::-1].copy()
    _assert_counts(lambda: TWO_PASS.bn_forward_train_act(x, w, b, rm, rv, 0.1, 1e-5, z, relu),
                   x, 2, 4.0, shape)


def test_forward_relu_alone_adds_nothing(shape, dtype):
    x, _, w, b, rm, rv = _data(shape, dtype)
    _assert_counts(lambda: TWO_PASS.bn_forward_train_act(x, w, b, rm, rv, 0.1, 1e-5, None, True),
                   x, 2, 3.0)


def test_forward_inference_with_residual_relu(shape, dtype):
    x, _, w, b, rm, rv = _data(shape, dtype)
    z = x[::-1].copy()
    _assert_counts(lambda: EMU.bn_forward_eval_act(x, w, b, rm, rv, 1e-5, z, True), x, 1, 3.0,
                   shape)


@pytest.mark.parametrize("training,launches,passes", [(True, 2, 7.0), (False, 1, 5.0)],
                         ids=["training", "eval"])
def test_backward_relu(shape, dtype, training, launches, passes):
    x, dy, w, b, _, _ = _data(shape, dtype)
    y, mean, invstd = EMU.bn_forward_train_act(x, w, b, None, None, 0.1, 1e-5, None, True)
    _assert_counts(lambda: TWO_PASS.bn_backward_relu(dy, x, mean, invstd, w, y, training), x,
                   launches, passes, shape)
