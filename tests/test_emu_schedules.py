"""The kernels under other block schedules: a cheap guard in the ordinary suite.

emu draws the order in which blocks start, and which running block goes on,
from a seed (``GPUBN_EMU_SEED``; the rest of the suite runs under whatever it
says, the default schedule when it is unset).  Here a representative set of
launches -- batch norm's training and inference forward and its backward on
the two-pass kernels, the read-once (cooperative) forward and backward with
the add-ReLU epilogue, layer norm's forward and backward -- runs under the
default schedule and two seeded ones.  Each run is checked by emu as usual
(memcheck, shared and global racecheck, deadlock, the arrival counters left
zero), and the results must be bitwise equal across schedules: the kernels
promise it (no floating-point atomics on result paths, partials merged in a
fixed order), so a merge in arrival order, or a load that sees another
block's data before it was published, shows here.
"""

from __future__ import annotations

import numpy as np
import pytest

from conftest import assert_same_under_schedules, unavailable_reason
from test_read_once import STAGED, STAGING_DEVICE, _data as _read_once_data, _emu

_REASON = unavailable_reason("emu")

pytestmark = pytest.mark.skipif(_REASON is not None, reason=_REASON or "")


def _data(shape, dtype, seed=0):
    """test_read_once's inputs (x, the residual z, weight, bias), with an
    incoming gradient dy and running statistics away from 0 and 1."""
    x, z, w, b, _, _ = _read_once_data(shape, dtype, seed)
    rng = np.random.default_rng(seed + 1)
    c = shape[1]
    return (x, rng.standard_normal(shape).astype(dtype), z, w, b,
            rng.standard_normal(c).astype(w.dtype), rng.uniform(0.5, 1.5, c).astype(w.dtype))


# several blocks per channel (last-block merges) in both layouts, ragged tails
SHAPES = {"nchw": (4, 3, 51), "nhwc": (300, 33, 1)}


def _kernels(log):
    from gpubn import kernels as catalog

    return [catalog.kernel_of(r.kernel).name for r in log]


@pytest.mark.parametrize("layout", list(SHAPES))
def test_two_pass_forward_and_backward(layout):
    from gpubn import emu

    x, dy, _, w, b, rm0, rv0 = _data(SHAPES[layout], np.float32)
    be = _emu(False)

    def train():
        rm, rv = rm0.copy(), rv0.copy()
        y, mean, invstd = be.bn_forward_train(x, w, b, rm, rv, 0.1, 1e-5)
        return y, mean, invstd, rm, rv

    def evaluate():
        return be.bn_forward_eval(x, w, b, rm0, rv0, 1e-5)

    with emu.recording() as log:
        _, mean, invstd, _, _ = assert_same_under_schedules(train)
    # the reduction really is split over blocks, so the schedule matters
    assert any(r.grid[1] > 1 for r in log), [r.grid for r in log]
    assert_same_under_schedules(evaluate)
    with emu.recording() as log:
        assert_same_under_schedules(lambda: be.bn_backward(dy, x, mean, invstd, w, True))
    assert not any("once" in k for k in _kernels(log))


@pytest.mark.parametrize("layout,staged", [("nchw", False), ("nhwc", False), ("nchw", True),
                                           ("nhwc", True)])
def test_read_once_forward_and_backward(layout, staged):
    """Registers only, and with values staged in shared memory (a device
    whose registers cannot hold the tensor: test_read_once.STAGING_DEVICE)."""
    from gpubn import emu

    shape = STAGED[f"{layout}-staged"] if staged else SHAPES[layout]
    x, dy, z, w, b, rm0, rv0 = _data(shape, np.float16)
    be = _emu(True, STAGING_DEVICE if staged else None)

    def forward():
        rm, rv = rm0.copy(), rv0.copy()
        y, mean, invstd = be.bn_forward_train_act(x, w, b, rm, rv, 0.1, 1e-5, z, True)
        return y, mean, invstd, rm, rv

    with emu.recording() as log:
        y, mean, invstd, _, _ = assert_same_under_schedules(forward)
    assert set(_kernels(log)) == {f"bn_forward_once_{layout}"}
    assert all((r.shared_mem > 0) == staged for r in log)
    with emu.recording() as log:
        assert_same_under_schedules(lambda: be.bn_backward_relu(dy, x, mean, invstd, w, y, True))
    assert set(_kernels(log)) == {f"bn_backward_once_{layout}"}
    assert all((r.shared_mem > 0) == staged for r in log)


def test_layer_norm_forward_and_backward():
    from gpubn import emu
    from gpubn.backends import get_backend

    be = get_backend("emu")
    rng = np.random.default_rng(4)
    rows, n = 37, 72
    x = (rng.standard_normal((rows, n)) * 2.0 + 1.0).astype(np.float32)
    dy = rng.standard_normal((rows, n)).astype(np.float32)
    w = rng.uniform(0.5, 1.5, n).astype(np.float32)
    b = rng.uniform(-0.5, 0.5, n).astype(np.float32)
    _, mean, rstd = assert_same_under_schedules(lambda: be.ln_forward(x, w, b, 1e-5))
    with emu.recording() as log:
        assert_same_under_schedules(lambda: be.ln_backward(dy, x, mean, rstd, w, True))
    assert any(r.grid[0] > 1 for r in log), [r.grid for r in log]


# ------------------------------------------------- the guard catches a defect
PLANTED = r"""
// planted: each block adds its value to the result with a floating-point
// atomic, so the sum is rounded in the order the blocks arrive
extern "C" __global__ void sum_in_arrival_order(const float* v, float* out) {
    if (threadIdx.x == 0) atomicAdd(out, v[blockIdx.x]);
}
// the fix: partials in index order, summed by the last block in that order
extern "C" __global__ void sum_in_index_order(const float* v, float* partial, unsigned* ticket,
                                              float* out) {
    __shared__ bool last;
    if (threadIdx.x == 0) {
        partial[blockIdx.x] = v[blockIdx.x];
        __threadfence();
        last = atomicAdd(ticket, 1u) == gridDim.x - 1;
    }
    __syncthreads();
    if (last && threadIdx.x == 0) {
        __threadfence();
        float s = 0.0f;
        for (unsigned b = 0; b < gridDim.x; ++b) s += ((volatile float*)partial)[b];
        out[0] = s;
        *ticket = 0;
    }
}
"""


def test_guard_catches_a_merge_in_arrival_order():
    from gpubn import emu

    mod = emu.RawModule(code=PLANTED)
    # float32 sums of these depend on the order: 1e8 + 1 rounds the 1 away
    v = np.array([1e8, 1.0, -1e8, 1.0, 1.0, -1e8, 1e8, 1.0], np.float32)

    def arrival():
        out = np.zeros(1, np.float32)
        mod.get_function("sum_in_arrival_order")((v.size,), (32,), (v, out))
        return (out,)

    def index():
        out, partial = np.zeros(1, np.float32), np.zeros(v.size, np.float32)
        ticket = np.zeros(1, np.uint32)
        mod.get_function("sum_in_index_order")((v.size,), (32,), (v, partial, ticket, out))
        return (out,)

    with pytest.raises(AssertionError, match=r"result 0 depends on the block schedule: seed \d"):
        assert_same_under_schedules(arrival)
    (out,) = assert_same_under_schedules(index)
    expected = np.float32(0.0)
    for value in v:                       # index order, in float32
        expected = np.float32(expected + value)
    assert out[0] == expected
