"""The read-once training forward and backward (kernels/bn_persistent.cu):
one cooperative launch each, x (and dy) read once, against PyTorch float64,
finite differences and the two-pass kernels; the automatic choice and its
fallback (ghost batch norm included); emu's barrier, race and co-residency
checks.  Planted defects of the barrier are in test_emu_mutations.py.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

import gpubn
from conftest import (BFLOAT16, DTYPES, acc_unit_roundoff, assert_rounded_close,
                      assert_same_under_schedules, assert_sum_close, bn_dx_slack, bn_output_slack, bn_sum_terms,
                      numeric_gradients, sum_tolerance, torch_batch_norm, unavailable_reason)
from gpubn import kernels as catalog
from gpubn.launch import (ONCE_ITEMS, DeviceAttributes, Launch, occupancy, once_fits,
                          once_launch)

_REASON = unavailable_reason("emu")

pytestmark = pytest.mark.skipif(_REASON is not None, reason=_REASON or "")

ALL_DTYPES = DTYPES + ((BFLOAT16,) if BFLOAT16 is not None else ())
# canonical (outer, C, inner): several splits per channel, a ragged last
# split, channels last with a partial column tile
SHAPES = {"nchw-splits": (5, 3, 1000), "nchw-small": (3, 2, 7), "nhwc": (700, 5, 1),
          "nhwc-tiles": (90, 40, 1)}
# A device whose registers hold less than these shapes: 4 SMs of 256 threads
# (at emu's 64 registers per thread), 16 values each in registers, 16384 at
# once, with an H100's 228 KiB of shared memory per SM: the plan must stage
# (the float64 backward of nhwc-tiles-staged above 48 KiB per block, opting in).
STAGING_DEVICE = DeviceAttributes(sm_count=4, max_threads_per_sm=256, name="4 SMs of 256 threads")
STAGED = {"nchw-staged": (6, 3, 1000), "nhwc-staged": (3000, 5, 1),
          "nhwc-tiles-staged": (800, 40, 1)}
CASES = {**SHAPES, **STAGED}


def _device(case):
    return STAGING_DEVICE if case in STAGED else None


def _emu(read_once, device=None):
    from gpubn.backends.emu import EMU_TUNING, EmuBackend

    return EmuBackend(tuning=dataclasses.replace(EMU_TUNING, read_once=read_once),
                      device_attributes=device)


def _data(shape, dtype, seed=0):
    rng = np.random.default_rng(seed)
    c = shape[1]
    acc = np.float64 if dtype == np.float64 else np.float32
    x = (rng.standard_normal(shape) * 2.0 + 3.0).astype(dtype)
    z = rng.standard_normal(shape).astype(dtype)
    w = rng.uniform(0.5, 1.5, c).astype(acc)
    b = rng.uniform(-0.5, 0.5, c).astype(acc)
    return x, z, w, b, np.zeros(c, acc), np.ones(c, acc)


def _static_shared(kernel, dtype="float32"):
    """Static shared memory of an emu-compiled read-once function (what the
    backend's plan counts besides the staging)."""
    be = _emu(None)
    return int(be._function(Launch(kernel, 1, (1, 1, 1), (32, 1, 1)), dtype).shared_size_bytes)


def _run(be, x, z, w, b, rm, rv, relu):
    from gpubn import emu

    with emu.recording() as log:
        y, mean, invstd = be.bn_forward_train_act(x, w, b, rm, rv, 0.1, 1e-5, z, relu)
    return y, mean, invstd, log


def _assert_read_once_traffic(log, case, x, passes, state_bytes):
    """``log`` is one read-once launch, staging in shared memory exactly for
    the STAGED cases, moving ``passes`` passes over x-sized tensors plus the
    side traffic of :func:`_assert_side_traffic`."""
    from test_traffic import _count

    assert (log[0].shared_mem > 0) == (case in STAGED)
    launches, got, _ = _count(log, x.nbytes)
    assert launches == 1 and got == passes, [r.kernel for r in log]
    _assert_side_traffic(log, x.shape, state_bytes)


def _assert_side_traffic(log, shape, state_bytes):
    """Besides the tensors, the one read-once launch in ``log`` moves a
    partial state (``state_bytes``) written per block and the S of its
    channel(s) read back, and per-channel vectors (at most 8 values of 8
    bytes per channel a block handles); the grid barrier's counter is left
    out (test_traffic.BARRIER_ARG)."""
    from test_traffic import BARRIER_ARG

    (rec,) = log
    spec = catalog.kernel_of(rec.kernel)
    side = sum(t.loaded + t.stored for i, t in rec.buffers.items()
               if i not in spec.tensor_args and i != BARRIER_ARG[spec.name])
    blocks, splits = rec.grid[0] * rec.grid[1], rec.grid[1]
    channels_per_block = min(shape[1], rec.block[0]) if shape[2] == 1 else 1
    assert side <= blocks * channels_per_block * (state_bytes * (splits + 1) + 8 * 8), side


@pytest.mark.parametrize("epilogue", ["plain", "add-relu"])
@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("case", list(CASES))
def test_read_once_matches_torch_and_the_two_pass_path(case, dtype, epilogue):
    shape = CASES[case]
    x, z, w, b, rm0, rv0 = _data(shape, dtype)
    z, relu = (z, True) if epilogue == "add-relu" else (None, False)
    out = {}
    for name, read_once in (("once", True), ("two-pass", False)):
        rm, rv = rm0.copy(), rv0.copy()
        y, mean, invstd, log = _run(_emu(read_once, _device(case)), x, z, w, b, rm, rv, relu)
        out[name] = (y, mean, invstd, rm, rv)
        kernels = [catalog.kernel_of(r.kernel).name for r in log]
        if read_once:
            assert kernels == [f"bn_forward_once_{'nchw' if shape[2] > 1 else 'nhwc'}"]
            assert (log[0].shared_mem > 0) == (case in STAGED)  # staged values, or none
        else:
            assert len(kernels) == 2 and not any("once" in k for k in kernels)
    ref = torch_batch_norm(x, w, b, rm0.copy(), rv0.copy())
    expected = ref["y"] + (0.0 if z is None else z.astype(np.float64))
    if relu:
        expected = np.maximum(expected, 0.0)
    slack = bn_output_slack(x, w, b, 1, dtype) \
        + (0.0 if z is None else 4.0 * acc_unit_roundoff(dtype) * np.abs(z.astype(np.float64)))
    y, mean, invstd, rm, rv = out["once"]
    assert_rounded_close(y, expected, dtype, slack, name="y (read-once)")
    # the statistics: Welford merges in another order than the two-pass
    # kernels, so equal to a few units of the accumulation dtype's rounding
    # per merge level (1 + log2 m levels)
    m = shape[0] * shape[2]
    u = acc_unit_roundoff(dtype) * 4.0 * (1.0 + np.log2(m))
    y2, mean2, invstd2, rm2, rv2 = out["two-pass"]
    xs = np.abs(x.astype(np.float64)).max()
    np.testing.assert_allclose(mean, mean2, rtol=0, atol=u * xs)
    np.testing.assert_allclose(invstd, invstd2, rtol=u * xs * xs, atol=0)
    np.testing.assert_allclose(rm, ref["running_mean"], rtol=0, atol=u * xs)
    np.testing.assert_allclose(rv, ref["running_var"], rtol=u * xs * xs, atol=0)


@pytest.mark.parametrize("case", ["nchw-splits", "nhwc-tiles", "nchw-staged",
                                  "nhwc-tiles-staged"])
@pytest.mark.parametrize("epilogue,passes", [("plain", 2.0), ("add", 3.0), ("add-relu", 3.0)])
def test_traffic_one_launch_read_x_once(case, epilogue, passes):
    """The issue's table: forward training that fits on chip is 1 launch and
    2 passes (read x, write y), 3 with a residual (read it too); values
    staged in shared memory move no global bytes."""
    shape = CASES[case]
    x, z, w, b, rm, rv = _data(shape, np.float32)
    z = None if epilogue == "plain" else z
    _, _, _, log = _run(_emu(None, _device(case)), x, z, w, b, rm, rv, epilogue == "add-relu")
    _assert_read_once_traffic(log, case, x, passes, 24)


def test_automatic_choice_and_its_reasons(monkeypatch, capfd):
    monkeypatch.setenv("GPUBN_DEBUG_KERNELS", "1")
    x, z, w, b, rm, rv = _data((4, 4, 64), np.float32)
    # fits: 4 channels x 1 split on a 132-SM device
    *_, log = _run(_emu(None), x, None, w, b, rm, rv, False)
    assert [catalog.kernel_of(r.kernel).name for r in log] == ["bn_forward_once_nchw"]
    err = capfd.readouterr().err
    assert "forward training: read-once (the tensor fits on chip: 4 blocks" in err
    # a device holding 3 blocks at once: 4 channels need 4, whatever each
    # holds; the plan states the most a block can (the widest block, staging
    # all the shared memory a block may have besides the function's static)
    small = DeviceAttributes(sm_count=1, max_blocks_per_sm=3, name="small")
    *_, log = _run(_emu(None, small), x, None, w, b, rm, rv, False)
    assert [catalog.kernel_of(r.kernel).name for r in log] == ["bn_stats_nchw", "bn_apply_nchw"]
    err = capfd.readouterr().err
    most = (227 * 1024 - _static_shared("bn_forward_once_nchw")) // (32 * 4)
    assert f"forward training: two-pass (the tensor needs 4 blocks of 32 threads x 16 + {most} " \
           f"values" in err and "on chip, 1 fit at once (1 SMs x 1))" in err
    # no cooperative launches: the two-pass kernels
    nocoop = DeviceAttributes(sm_count=132, name="old", cooperative_launch=False)
    *_, log = _run(_emu(None, nocoop), x, None, w, b, rm, rv, False)
    assert len(log) == 2 and "old has no cooperative launches" in capfd.readouterr().err
    # forced off
    *_, log = _run(_emu(False), x, None, w, b, rm, rv, False)
    assert len(log) == 2 and "two-pass (Tuning.read_once=False)" in capfd.readouterr().err
    # forced on where it cannot run: an error, before anything is written
    rm0 = rm.copy()
    with pytest.raises(ValueError, match="read_once=True, but the read-once forward cannot run"):
        _run(_emu(True, small), x, None, w, b, rm, rv, False)
    assert np.array_equal(rm, rm0)


def test_plan_holds_every_element_once():
    """Each layout's grid x block x ONCE_ITEMS covers the tensor, and one
    split fewer would not."""
    for shape in ((5, 3, 1000), (1, 7, 4096), (3, 2, 7)):
        cfg = once_launch(shape, "float32")
        per_block = cfg.block[0] * ONCE_ITEMS
        m = shape[0] * shape[2]
        assert cfg.grid == (shape[1], -(-m // per_block), 1)
        assert (cfg.splits - 1) * per_block < m <= cfg.splits * per_block
    for shape in ((700, 5, 1), (90, 40, 1), (10_000, 64, 1)):
        cfg = once_launch(shape, "float16")
        bx, by = cfg.block[:2]
        assert cfg.grid[0] * bx >= shape[1] > (cfg.grid[0] - 1) * bx
        assert (cfg.splits - 1) * by * ONCE_ITEMS < shape[0] <= cfg.splits * by * ONCE_ITEMS
        assert bx * by <= 256 and by & (by - 1) == 0
    # staged values continue each thread's items: a block holds threads x
    # (16 + staged) values (rows), and the splits just cover the channel
    # (two SMs at 64 registers: 2048 threads x 16 values in registers, less
    # than each of these tensors, 456 KiB of shared memory, more)
    two_sms = DeviceAttributes(sm_count=2, name="two SMs")
    for shape, op in (((6, 3, 3000), "forward"), ((4, 3, 4000), "backward"),
                      ((1500, 32, 1), "forward"), ((1200, 32, 1), "backward")):
        cfg = once_launch(shape, "float32", op, two_sms, 64, 1024)
        threads, items = cfg.block[0] * cfg.block[1], ONCE_ITEMS + cfg.staged
        assert cfg.staged > 0 and cfg.shared_mem == cfg.staged * threads * 4 * (
            2 if op == "backward" else 1)
        span, step = (shape[0] * shape[2], threads) if shape[2] > 1 else (shape[0], cfg.block[1])
        assert (cfg.splits - 1) * step * items < span <= cfg.splits * step * items
        assert once_fits(cfg, two_sms, 64, 1024)[0]
        # one value fewer per thread, at that block size: more blocks than fit
        blocks = cfg.grid[0] * -(-span // (step * (items - 1)))
        shared = cfg.shared_mem // cfg.staged * (cfg.staged - 1)
        assert blocks > 2 * occupancy(64, 1024, threads, shared, two_sms)
    # ResNet's 64x56x56 at batch 64, registers only: 64 x 49 blocks; at 80
    # registers of 256 threads (3 blocks per SM) 396 fit
    fits, why = once_fits(once_launch((64, 64, 3136), "float32"),
                          DeviceAttributes(sm_count=132), 80, 0)
    assert not fits and "3136 blocks" in why and "396 fit at once" in why


@pytest.mark.parametrize("case", ["nchw-splits", "nhwc", "nhwc-tiles", "nchw-staged",
                                  "nhwc-tiles-staged"])
def test_clean_and_bitwise_stable_under_schedule_seeds(case):
    """emu's inter-block race checker runs on every access of the forward and
    the backward (with the epilogue), its block race checker on every
    shared-memory access (the staged values included); several block
    schedules give bitwise the same results (the partials merge in index
    order)."""
    x, z, w, b, rm, rv = _data(CASES[case], np.float16)
    dy = np.random.default_rng(5).standard_normal(x.shape).astype(np.float16)
    dev = _device(case)

    def run():
        y, mean, invstd, log = _run(_emu(True, dev), x, z, w, b, rm.copy(), rv.copy(), True)
        assert len(log) == 1 and catalog.kernel_of(log[0].kernel).name.startswith("bn_forward_once")
        assert (log[0].shared_mem > 0) == (case in STAGED)
        (dx, dw, db, dz), kernels, _ = _backward(_emu(True, dev), dy, x, mean, invstd, w, y)
        assert len(kernels) == 1 and kernels[0].startswith("bn_backward_once")
        return y, mean, invstd, dx, dw, db, dz

    assert_same_under_schedules(run, seeds=(1, 2, 3))


def test_emu_refuses_a_grid_that_is_not_co_resident():
    from gpubn import emu

    be = _emu(True)
    x, _, w, b, _, _ = _data((4, 3, 64), np.float32)
    cfg = once_launch(x.shape, "float32")
    too_many = Launch(cfg.kernel, 1, (3, 2000, 1), cfg.block, 2000, 3 * 2000 * 24, 2)
    y = np.empty_like(x)
    args = (x, y, None, np.int64(4), np.int32(3), np.int64(64), np.int32(0),
            np.empty(too_many.partial_bytes, np.uint8), np.zeros(2, np.uint32), w, b,
            np.empty(3, np.float32), np.empty(3, np.float32), None, None, np.int32(0),
            np.float32(0.1), np.float32(1e-5))
    with pytest.raises(emu.LaunchError, match="COOPERATIVE_LAUNCH_TOO_LARGE"):
        be._launch(too_many, "float32", args)


def test_functional_and_layer_take_the_read_once_path(monkeypatch, capfd):
    """The public API reaches the read-once kernels on emu (the default
    plan) and agrees with the numpy reference."""
    monkeypatch.setenv("GPUBN_DEBUG_KERNELS", "1")
    rng = np.random.default_rng(2)
    x = rng.standard_normal((6, 4, 5, 5)).astype(np.float32)
    layer = gpubn.BatchNorm(4, backend="emu")
    y = layer(x)
    assert "read-once" in capfd.readouterr().err
    ref = gpubn.BatchNorm(4, backend="numpy")
    np.testing.assert_allclose(y, ref(x), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(layer.running_var, ref.running_var, rtol=1e-6)


def test_items_per_thread_match_the_kernel_source():
    text = catalog.read_source("bn_persistent.cu")
    (line,) = [ln for ln in text.splitlines() if ln.startswith("#define GPUBN_ONCE_ITEMS ")]
    assert int(line.split()[2]) == ONCE_ITEMS


# -- the read-once training backward ------------------------------------------------

def _backward(be, dy, x, mean, invstd, w, y):
    """dx, dweight, dbias (and dresidual when ``y``, the epilogue's output,
    masks dy) on ``be``, with the launches it made."""
    from gpubn import emu

    with emu.recording() as log:
        if y is None:
            out = be.bn_backward(dy, x, mean, invstd, w, True) + (None,)
        else:
            out = be.bn_backward_relu(dy, x, mean, invstd, w, y, True)
    return out, [catalog.kernel_of(r.kernel).name for r in log], log


def _backward_data(shape, dtype, relu, seed=0):
    """x, dy, weight and the two-pass forward's y (relu(bn(x) + z) with the
    epilogue, else None), mean and invstd: one forward for both backward
    paths."""
    x, z, w, b, _, _ = _data(shape, dtype, seed)
    dy = np.random.default_rng(seed + 7).standard_normal(shape).astype(dtype)
    y, mean, invstd = _emu(False).bn_forward_train_act(x, w, b, None, None, 0.1, 1e-5,
                                                       z if relu else None, relu)
    return x, dy, w, (y if relu else None), mean, invstd


@pytest.mark.parametrize("epilogue", ["plain", "add-relu"])
@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("case", list(CASES))
def test_read_once_backward_matches_torch_and_the_two_pass_path(case, dtype, epilogue):
    shape = CASES[case]
    relu = epilogue == "add-relu"
    x, dy, w, y, mean, invstd = _backward_data(shape, dtype, relu)
    layout = "nchw" if shape[2] > 1 else "nhwc"
    out = {}
    for name, read_once in (("once", True), ("two-pass", False)):
        out[name], kernels, log = _backward(_emu(read_once, _device(case)), dy, x, mean,
                                            invstd, w, y)
        if read_once:
            assert kernels == [f"bn_backward_once_{layout}"]
            assert (log[0].shared_mem > 0) == (case in STAGED)
        else:
            assert kernels == [f"bn_backward_reduce_{layout}", f"bn_backward_dx_{layout}"]
    # the ReLU's mask: dresidual is dy where y > 0, else 0, on both paths
    g = dy.astype(np.float64)
    if relu:
        g = np.where(y.astype(np.float64) > 0, g, 0.0)
        assert (g == 0).any() and (g != 0).any()
        for name in out:
            assert out[name][3].dtype == x.dtype
            assert np.array_equal(out[name][3].astype(np.float64), g), name
    ref = torch_batch_norm(x, w, np.zeros_like(w), dy=g)  # a bias, for its gradient
    red, sum_dy, sum_dy_xhat = bn_sum_terms(x, g, 1)
    for name, (dx, dw, db, _) in out.items():
        assert_rounded_close(dx, ref["dx"], dtype, bn_dx_slack(x, g, w, 1, dtype, True),
                             name=f"dx ({name})")
        assert_sum_close(db, ref["dbias"], sum_dy, red, dtype, name=f"dbias ({name})")
        assert_sum_close(dw, ref["dweight"], sum_dy_xhat, red, dtype, name=f"dweight ({name})")
    # the two paths: each within its bound of the reference, so within twice
    # of each other (their sums merge in another order)
    once, two = out["once"], out["two-pass"]
    assert_sum_close(once[2], two[2], sum_dy, red, dtype, name="dbias (paths)",
                     extra=sum_tolerance(sum_dy, red, dtype))
    assert_sum_close(once[1], two[1], sum_dy_xhat, red, dtype, name="dweight (paths)",
                     extra=sum_tolerance(sum_dy_xhat, red, dtype))


@pytest.mark.parametrize("case", ["nchw-splits", "nhwc-tiles", "nchw-staged",
                                  "nhwc-tiles-staged"])
@pytest.mark.parametrize("epilogue,passes", [("plain", 3.0), ("add-relu", 5.0)])
def test_traffic_backward_one_launch_read_dy_and_x_once(case, epilogue, passes):
    """The issue's table: backward training that fits on chip is 1 launch
    and 3 passes (read dy and x, write dx); of add + relu 5 (read dy, y and
    x, write dx and dresidual: the mask is read from y)."""
    shape = CASES[case]
    x, dy, w, y, mean, invstd = _backward_data(shape, np.float32, epilogue == "add-relu")
    _, _, log = _backward(_emu(None, _device(case)), dy, x, mean, invstd, w, y)
    _assert_read_once_traffic(log, case, x, passes, 8)


def test_backward_automatic_choice_and_its_reasons(monkeypatch, capfd):
    monkeypatch.setenv("GPUBN_DEBUG_KERNELS", "1")
    x, dy, w, _, mean, invstd = _backward_data((4, 4, 64), np.float32, False)
    capfd.readouterr()
    _, kernels, _ = _backward(_emu(None), dy, x, mean, invstd, w, None)
    assert kernels == ["bn_backward_once_nchw"]
    assert "backward training: read-once (the tensor fits on chip: 4 blocks" in \
        capfd.readouterr().err
    small = DeviceAttributes(sm_count=1, max_blocks_per_sm=3, name="small")
    _, kernels, _ = _backward(_emu(None, small), dy, x, mean, invstd, w, None)
    assert kernels == ["bn_backward_reduce_nchw", "bn_backward_dx_nchw"]
    most = (227 * 1024 - _static_shared("bn_backward_once_nchw")) // (32 * 2 * 4)
    err = capfd.readouterr().err
    assert f"backward training: two-pass (the tensor needs 4 blocks of 32 threads x 16 + {most} " \
           f"values" in err and "on chip, 1 fit at once (1 SMs x 1))" in err
    nocoop = DeviceAttributes(sm_count=132, name="old", cooperative_launch=False)
    _, kernels, _ = _backward(_emu(None, nocoop), dy, x, mean, invstd, w, None)
    assert len(kernels) == 2 and "old has no cooperative launches" in capfd.readouterr().err
    _, kernels, _ = _backward(_emu(False), dy, x, mean, invstd, w, None)
    assert len(kernels) == 2 and "backward training: two-pass (Tuning.read_once=False)" in \
        capfd.readouterr().err
    with pytest.raises(ValueError, match="read_once=True, but the read-once backward cannot run"):
        _backward(_emu(True, small), dy, x, mean, invstd, w, None)
    # eval-mode backward is one launch already: no read-once kernel
    from gpubn import emu

    with emu.recording() as log:
        _emu(True).bn_backward(dy, x, mean, invstd, w, False)
    assert [catalog.kernel_of(r.kernel).name for r in log] == ["bn_backward_reduce_nchw"]


def test_ghost_batch_norm_takes_the_two_pass_kernels(monkeypatch, capfd):
    """virtual_batch_size (groups reduced separately, grid z) keeps the
    two-pass kernels, forward and backward, and says so."""
    monkeypatch.setenv("GPUBN_DEBUG_KERNELS", "1")
    rng = np.random.default_rng(4)
    x = rng.standard_normal((8, 3, 5, 5)).astype(np.float32)
    dy = rng.standard_normal(x.shape).astype(np.float32)
    from gpubn import emu

    with emu.recording() as log:
        y, saved = gpubn.batch_norm_forward(x, training=True, virtual_batch_size=2,
                                            backend="emu")
        dx, dw, db = gpubn.batch_norm_backward(dy, saved)
    kernels = [catalog.kernel_of(r.kernel).name for r in log]
    assert kernels == ["bn_stats_nchw", "bn_apply_nchw", "bn_backward_reduce_nchw",
                       "bn_backward_dx_nchw"]
    err = capfd.readouterr().err
    assert "forward training: two-pass (ghost batch norm: 4 groups reduce separately)" in err
    assert "backward training: two-pass (ghost batch norm: 4 groups reduce separately)" in err
    y_ref, saved_ref = gpubn.batch_norm_forward(x, training=True, virtual_batch_size=2,
                                                backend="numpy")
    dx_ref, _, _ = gpubn.batch_norm_backward(dy, saved_ref)
    np.testing.assert_allclose(dx, dx_ref, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("axis", [1, -1])
def test_public_backward_is_read_once_and_matches_finite_differences(monkeypatch, capfd, axis):
    """The public API reaches the read-once backward on emu (the default
    plan); the gradients of sum(r * relu(bn(x) + z)) with respect to x,
    weight, bias and z against central differences of the numpy reference's
    forward (float64, h = 1e-6: truncation O(h**2), rounding O(eps / h),
    about 1e-10)."""
    monkeypatch.setenv("GPUBN_DEBUG_KERNELS", "1")
    shape = (3, 2, 2, 2) if axis == 1 else (3, 2, 2, 3)
    c = shape[axis]
    rng = np.random.default_rng(9)
    x, z, r = (rng.standard_normal(shape) for _ in range(3))
    w, b = rng.uniform(0.5, 1.5, c), rng.uniform(-0.5, 0.5, c)

    def forward(x_, w_, b_, z_, backend):
        return gpubn.batch_norm_forward(x_, weight=w_, bias=b_, axis=axis, backend=backend,
                                        residual=z_, activation="relu")

    pre = torch_batch_norm(x, w, b, axis=axis)["y"] + z
    assert np.abs(pre).min() > 1e-3 and (pre < 0).any()  # the mask matters, far from the kink
    _, saved = forward(x, w, b, z, "emu")
    capfd.readouterr()
    got = gpubn.batch_norm_backward(r, saved)
    assert "backward training: read-once" in capfd.readouterr().err
    num = numeric_gradients(lambda *a: float((forward(*a, "numpy")[0] * r).sum()), [x, w, b, z])
    for name, g, n in zip(("dx", "dweight", "dbias", "dresidual"), got, num):
        np.testing.assert_allclose(g, n, rtol=1e-6, atol=1e-7, err_msg=name)


def test_a_tensor_beyond_registers_and_shared_memory_takes_the_two_pass_path(monkeypatch,
                                                                            capfd):
    """One SM of 256 threads with 16 KiB of shared memory (15 KiB a block)
    holds 256 x 16 values in registers and, next to the forward's static
    shared memory, (15 KiB - static) / (256 threads x 4 bytes) = 13 float32
    values per thread staged: 256 x 29 = 7424 values, fewer than the 18000 of
    a (6, 3, 1000) tensor (3 channels: 3 blocks at the least, 1 resident).
    The plan falls back to the two-pass kernels and says so with the most
    it could hold; forced read-once is an error before any state changes."""
    monkeypatch.setenv("GPUBN_DEBUG_KERNELS", "1")
    tiny = DeviceAttributes(sm_count=1, max_threads_per_sm=256, shared_per_sm=16 * 1024,
                            max_shared_per_block_optin=15 * 1024, name="tiny")
    x, z, w, b, rm, rv = _data((6, 3, 1000), np.float32)
    capfd.readouterr()
    *_, log = _run(_emu(None, tiny), x, z, w, b, rm, rv, True)
    assert [catalog.kernel_of(r.kernel).name for r in log] == ["bn_stats_nchw", "bn_apply_nchw"]
    most = (15 * 1024 - _static_shared("bn_forward_once_nchw")) // (256 * 4)
    assert most == 13
    err = capfd.readouterr().err
    assert f"two-pass (the tensor needs 3 blocks of 256 threads x 16 + {most} values" in err
    assert "on chip, 1 fit at once (1 SMs x 1))" in err
    rm0 = rm.copy()
    with pytest.raises(ValueError, match="read_once=True, but the read-once forward cannot run"):
        _run(_emu(True, tiny), x, z, w, b, rm, rv, True)
    assert np.array_equal(rm, rm0)


def test_launch_opts_in_to_the_devices_shared_memory_above_48k():
    """Dynamic shared memory above 48 KiB minus the static needs the
    function's opt-in (CUDA's cudaFuncAttributeMaxDynamicSharedMemorySize,
    CuPy's and emu's ``max_dynamic_shared_size_bytes``): the backend raises
    it to the device's most before such a launch, never lowers it, and
    leaves it alone below."""
    class Function:   # a stand-in for a CuPy Function
        num_regs, shared_size_bytes = 64, 1152
        max_dynamic_shared_size_bytes = 48 * 1024 - 1152

        def __init__(self):
            self.launched = []

        def __call__(self, grid, block, args, shared_mem=0):
            self.launched.append((shared_mem, self.max_dynamic_shared_size_bytes))

    dev = DeviceAttributes(sm_count=4, max_shared_per_block_optin=100_000)
    be = _emu(None, dev)
    fn = Function()
    be._function = lambda cfg, key: fn
    cfg = Launch("bn_forward_once_nchw", 1, (1, 1, 1), (32, 1, 1))
    for shared in (0, 40_000, 60_000, 50_000):
        be._launch(cfg, "float32", (), shared)
    low = 48 * 1024 - 1152
    assert fn.launched == [(0, low), (40_000, low), (60_000, 100_000 - 1152),
                           (50_000, 100_000 - 1152)]
