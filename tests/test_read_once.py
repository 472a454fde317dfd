"""The read-once training forward (kernels/bn_persistent.cu): one cooperative
launch, x read once, against PyTorch float64 and the two-pass kernels; the
automatic choice and its fallback; emu's barrier, race and co-residency
checks.  Planted defects of the barrier are in test_emu_mutations.py.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

import gpubn
from conftest import (BFLOAT16, DTYPES, acc_unit_roundoff, assert_rounded_close,
                      bn_output_slack, torch_batch_norm, unavailable_reason)
from gpubn import kernels as catalog
from gpubn.launch import ONCE_ITEMS, DeviceAttributes, Launch, once_fits, once_launch

_REASON = unavailable_reason("emu")

pytestmark = pytest.mark.skipif(_REASON is not None, reason=_REASON or "")

ALL_DTYPES = DTYPES + ((BFLOAT16,) if BFLOAT16 is not None else ())
# canonical (outer, C, inner): several splits per channel, a ragged last
# split, channels last with a partial column tile
SHAPES = {"nchw-splits": (5, 3, 1000), "nchw-small": (3, 2, 7), "nhwc": (700, 5, 1),
          "nhwc-tiles": (90, 40, 1)}


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


def _run(be, x, z, w, b, rm, rv, relu):
    from gpubn import emu

    with emu.recording() as log:
        y, mean, invstd = be.bn_forward_train_act(x, w, b, rm, rv, 0.1, 1e-5, z, relu)
    return y, mean, invstd, log


@pytest.mark.parametrize("epilogue", ["plain", "add-relu"])
@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("case", list(SHAPES))
def test_read_once_matches_torch_and_the_two_pass_path(case, dtype, epilogue):
    shape = SHAPES[case]
    x, z, w, b, rm0, rv0 = _data(shape, dtype)
    z, relu = (z, True) if epilogue == "add-relu" else (None, False)
    out = {}
    for name, read_once in (("once", True), ("two-pass", False)):
        rm, rv = rm0.copy(), rv0.copy()
        y, mean, invstd, log = _run(_emu(read_once), x, z, w, b, rm, rv, relu)
        out[name] = (y, mean, invstd, rm, rv)
        kernels = [catalog.kernel_of(r.kernel).name for r in log]
        if read_once:
            assert kernels == [f"bn_forward_once_{'nchw' if shape[2] > 1 else 'nhwc'}"]
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


@pytest.mark.parametrize("case", ["nchw-splits", "nhwc-tiles"])
@pytest.mark.parametrize("epilogue,passes", [("plain", 2.0), ("add", 3.0), ("add-relu", 3.0)])
def test_traffic_one_launch_read_x_once(case, epilogue, passes):
    """The issue's table: forward training that fits on chip is 1 launch and
    2 passes (read x, write y), 3 with a residual (read it too)."""
    from test_traffic import _count

    shape = SHAPES[case]
    x, z, w, b, rm, rv = _data(shape, np.float32)
    z = None if epilogue == "plain" else z
    _, _, _, log = _run(_emu(None), x, z, w, b, rm, rv, epilogue == "add-relu")
    launches, got, _ = _count(log, x.nbytes)
    assert launches == 1 and got == passes, [r.kernel for r in log]
    # besides the tensors: a partial Welford state written per block and the
    # S of its channel(s) read back, per-channel vectors (at most 8 values of
    # 8 bytes per channel a block handles); the grid barrier's counters are
    # left out (its polling of one word stays in L2, and emu's count of it
    # depends on the schedule)
    (rec,) = log
    barrier = 7 if rec.kernel.startswith("gpubn::bn_forward_once_nchw") else 6
    side = sum(t.loaded + t.stored for i, t in rec.buffers.items()
               if i not in catalog.kernel_of(rec.kernel).tensor_args and i != barrier)
    blocks, splits = rec.grid[0] * rec.grid[1], rec.grid[1]
    channels_per_block = min(shape[1], rec.block[0]) if shape[2] == 1 else 1
    assert side <= blocks * channels_per_block * (24 * (splits + 1) + 8 * 8), side


def test_automatic_choice_and_its_reasons(monkeypatch, capfd):
    monkeypatch.setenv("GPUBN_DEBUG_KERNELS", "1")
    x, z, w, b, rm, rv = _data((4, 4, 64), np.float32)
    # fits: 4 channels x 1 split on a 132-SM device
    *_, log = _run(_emu(None), x, None, w, b, rm, rv, False)
    assert [catalog.kernel_of(r.kernel).name for r in log] == ["bn_forward_once_nchw"]
    err = capfd.readouterr().err
    assert "forward training: read-once (the tensor fits on chip: 4 blocks" in err
    # a device holding 3 such blocks at once: the two-pass kernels
    small = DeviceAttributes(sm_count=1, name="small")
    *_, log = _run(_emu(None, small), x, None, w, b, rm, rv, False)
    assert [catalog.kernel_of(r.kernel).name for r in log] == ["bn_stats_nchw", "bn_apply_nchw"]
    err = capfd.readouterr().err
    assert "forward training: two-pass (the tensor needs 4 blocks of 32 threads x 16 values " \
           "on chip, 3 fit at once (1 SMs x 3))" in err
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
    fits, why = once_fits(once_launch((64, 64, 3136), "float32"),
                          DeviceAttributes(sm_count=132), 3)
    assert not fits and "3136 blocks" in why  # ResNet's 64x56x56 at batch 64: 64 x 49 blocks


@pytest.mark.parametrize("case", ["nchw-splits", "nhwc-tiles"])
def test_clean_and_bitwise_stable_under_schedule_seeds(case):
    """emu's inter-block race checker runs on every access; several block
    schedules give bitwise the same results (the partials merge in index
    order)."""
    from gpubn import emu

    x, z, w, b, rm, rv = _data(SHAPES[case], np.float16)
    results = []
    for seed in (1, 2, 3):
        with emu.options(seed=seed):
            y, mean, invstd, _ = _run(_emu(True), x, z, w, b, rm.copy(), rv.copy(), True)
        results.append((y.view(np.uint16), mean, invstd))
    for other in results[1:]:
        for a, b_ in zip(results[0], other):
            assert np.array_equal(a, b_)


def test_emu_refuses_a_grid_that_is_not_co_resident():
    from gpubn import emu

    be = _emu(True)
    x, _, w, b, _, _ = _data((4, 3, 64), np.float32)
    cfg = once_launch(x.shape, "float32")
    too_many = Launch(cfg.kernel, 1, (3, 2000, 1), cfg.block, 2000, 3 * 2000 * 24, 2)
    y = np.empty_like(x)
    args = (x, y, None, np.int64(4), np.int32(3), np.int64(64),
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
