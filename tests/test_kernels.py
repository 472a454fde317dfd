"""The CUDA kernels of kernels/, run on the emu backend, against the NumPy
reference (computed in float64 on the same data).

Shapes are small but chosen so that the launches take every path: channels
split over several blocks (two-stage reductions, last-block merge), runs that
are and are not a multiple of the 16-byte vector width (vector and scalar
code), channels-last tiles with partial warps, C = 1, m = 2.
"""

from __future__ import annotations

import numpy as np
import pytest

from conftest import assert_close, assert_same_under_schedules
from gpubn.backends import get_backend
from gpubn.backends.numpy_backend import NumpyBackend
from gpubn.launch import EMU_DEVICE, Tuning, map_launch, reduce_launch

try:
    EMU = get_backend("emu")
    _REASON = None
except RuntimeError as exc:
    EMU, _REASON = None, str(exc)

pytestmark = pytest.mark.skipif(EMU is None, reason=_REASON or "")

REF = NumpyBackend()
DTYPES = (np.float16, np.float32, np.float64)

# canonical (outer, C, inner) shapes and what each one exercises on emu
CASES = {
    "nchw-scalar-tail-split": (4, 3, 51),    # odd run: scalar accesses; 2 blocks per channel
    "nchw-vector": (3, 2, 64),               # 16-byte vectors for every dtype
    "nchw-8byte-vector": (3, 2, 36),         # float16: 4-element (8-byte) vectors
    "nchw-C1-odd": (2, 1, 33),
    "nchw-outer1": (1, 2, 40),
    "nhwc-tiles-split": (300, 33, 1),        # 2 channel tiles (one partial), many row splits
    "nhwc-partial-warps": (37, 5, 1),
    "nhwc-vector": (20, 16, 1),
    "m2": (2, 3, 1),                         # two values per channel
}
CASE_IDS = list(CASES)


def _acc(dtype):
    return np.float64 if dtype == np.float64 else np.float32


def _data(shape, dtype, seed=0):
    rng = np.random.default_rng(seed)
    c = shape[1]
    acc = _acc(dtype)
    x = (rng.standard_normal(shape) * 2.0 + 3.0).astype(dtype)
    dy = rng.standard_normal(shape).astype(dtype)
    weight = (rng.standard_normal(c) + 1.0).astype(acc)
    bias = rng.standard_normal(c).astype(acc)
    running_mean = rng.standard_normal(c).astype(acc)
    running_var = (rng.random(c) + 0.5).astype(acc)
    return x, dy, weight, bias, running_mean, running_var


def _f64(*arrays):
    return tuple(None if a is None else np.asarray(a, dtype=np.float64) for a in arrays)


def _dx_scale(dy, invstd, weight):
    a = np.abs(invstd.astype(np.float64)) * (1.0 if weight is None else np.abs(weight))
    return float(np.max(np.abs(dy.astype(np.float64))) * np.max(a))


def test_cases_take_the_multi_block_paths():
    """The shapes above really split channels over blocks on emu."""
    for name in ("nchw-scalar-tail-split", "nhwc-tiles-split"):
        cfg = reduce_launch("stats", CASES[name], "float32", True, EMU_DEVICE, EMU.tuning)
        assert cfg.splits > 1, name
        assert cfg.grid[1] == cfg.splits
    assert reduce_launch("grad", CASES["nhwc-tiles-split"], "float32", True, EMU_DEVICE,
                         EMU.tuning).grid[0] == 2
    assert map_launch("apply", CASES["nchw-vector"], "float16", True, EMU_DEVICE,
                      EMU.tuning).vec == 8
    assert map_launch("apply", CASES["nchw-scalar-tail-split"], "float32", True, EMU_DEVICE,
                      EMU.tuning).vec == 1
    for op in ("stats", "grad"):
        assert reduce_launch(op, CASES["nchw-8byte-vector"], "float16", True, EMU_DEVICE,
                             EMU.tuning).vec == 4


@pytest.mark.parametrize("case", CASE_IDS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_stats(case, dtype):
    x = _data(CASES[case], dtype)[0]
    got = EMU.bn_stats(x)
    ref = REF.bn_stats(x.astype(np.float64))
    assert got.count == ref.count
    assert got.mean.dtype == _acc(dtype) and got.m2.dtype == _acc(dtype)
    assert_close(got.mean, ref.mean, dtype, "mean")
    # M2 grows with the count: compare it per value
    assert_close(got.m2 / got.count, ref.m2 / ref.count, dtype, "m2 / count")


@pytest.mark.parametrize("affine", [True, False], ids=["affine", "plain"])
@pytest.mark.parametrize("case", CASE_IDS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_forward_train(case, dtype, affine):
    x, _, w, b, rm, rv = _data(CASES[case], dtype)
    if not affine:
        w = b = None
    rm_g, rv_g = rm.copy(), rv.copy()
    y, mean, invstd = EMU.bn_forward_train(x, w, b, rm_g, rv_g, 0.1, 1e-5)
    rm_r, rv_r = _f64(rm, rv)
    y_r, mean_r, invstd_r = REF.bn_forward_train(x.astype(np.float64), *_f64(w, b), rm_r, rv_r,
                                                 0.1, 1e-5)
    assert y.dtype == x.dtype and y.shape == x.shape
    assert_close(y, y_r, dtype, "y")
    assert_close(mean, mean_r, dtype, "mean")
    assert_close(invstd, invstd_r, dtype, "invstd")
    assert_close(rm_g, rm_r, dtype, "running_mean")
    assert_close(rv_g, rv_r, dtype, "running_var")


@pytest.mark.parametrize("case", CASE_IDS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_forward_train_without_running_stats(case, dtype):
    x, _, w, b, _, _ = _data(CASES[case], dtype)
    y, mean, invstd = EMU.bn_forward_train(x, w, b, None, None, 0.1, 1e-3)
    y_r, mean_r, invstd_r = REF.bn_forward_train(x.astype(np.float64), *_f64(w, b), None, None,
                                                 0.1, 1e-3)
    assert_close(y, y_r, dtype, "y")
    assert_close(invstd, invstd_r, dtype, "invstd")


@pytest.mark.parametrize("case", CASE_IDS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_forward_eval_and_apply(case, dtype):
    x, _, w, b, rm, rv = _data(CASES[case], dtype)
    rm0, rv0 = rm.copy(), rv.copy()
    y, mean, invstd = EMU.bn_forward_eval(x, w, b, rm, rv, 1e-5)
    y_r, mean_r, invstd_r = REF.bn_forward_eval(x.astype(np.float64), *_f64(w, b, rm, rv), 1e-5)
    assert_close(y, y_r, dtype, "y")
    assert_close(mean, mean_r, dtype, "mean")
    assert_close(invstd, invstd_r, dtype, "invstd")
    assert np.array_equal(rm, rm0) and np.array_equal(rv, rv0), "eval changed running stats"
    # bn_apply with the statistics eval used gives the same y, bit for bit
    y2 = EMU.bn_apply(x, mean, invstd, w, b)
    assert y2.tobytes() == y.tobytes()
    y3 = EMU.bn_apply(x, mean, invstd, None, None)
    assert_close(y3, REF.bn_apply(x.astype(np.float64), *_f64(mean, invstd), None, None), dtype,
                 "y (no affine)")


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("affine", [True, False], ids=["affine", "plain"])
@pytest.mark.parametrize("case", CASE_IDS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_backward(case, dtype, affine, training):
    x, dy, w, _, _, _ = _data(CASES[case], dtype, seed=1)
    if not affine:
        w = None
    _, mean, invstd = REF.bn_forward_train(x.astype(_acc(dtype)), None, None, None, None, 0.1,
                                           1e-5)
    dx, dw, db = EMU.bn_backward(dy, x, mean, invstd, w, training)
    dx_r, dw_r, db_r = REF.bn_backward(dy.astype(np.float64), x.astype(np.float64),
                                       *_f64(mean, invstd, w), training)
    assert dx.dtype == x.dtype and dw.dtype == _acc(dtype) and db.dtype == _acc(dtype)
    # dx on its natural scale |dy| * weight * invstd (its terms cancel), sums on sqrt(m)
    scale = _dx_scale(dy, invstd, w)
    assert_close(dx / scale, dx_r / scale, dtype, "dx")
    m = x.shape[0] * x.shape[2]
    assert_close(dw / np.sqrt(m), dw_r / np.sqrt(m), dtype, "dweight")
    assert_close(db / np.sqrt(m), db_r / np.sqrt(m), dtype, "dbias")


@pytest.mark.parametrize("case", ["nchw-scalar-tail-split", "nhwc-tiles-split", "nhwc-vector"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_backward_reduce_then_dx(case, dtype):
    """The split entry points (used by sync batch norm) agree with the fused one."""
    x, dy, w, _, _, _ = _data(CASES[case], dtype, seed=2)
    _, mean, invstd = REF.bn_forward_train(x.astype(_acc(dtype)), None, None, None, None, 0.1,
                                           1e-5)
    sum_dy, sum_dy_xhat = EMU.bn_backward_reduce(dy, x, mean, invstd)
    s_r, sx_r = REF.bn_backward_reduce(dy.astype(np.float64), x.astype(np.float64),
                                       *_f64(mean, invstd))
    m = x.shape[0] * x.shape[2]
    assert_close(sum_dy / np.sqrt(m), s_r / np.sqrt(m), dtype, "sum_dy")
    assert_close(sum_dy_xhat / np.sqrt(m), sx_r / np.sqrt(m), dtype, "sum_dy_xhat")
    dx = EMU.bn_backward_dx(dy, x, mean, invstd, w, sum_dy, sum_dy_xhat, m)
    # the fused backward's two-pass kernels are these two (its read-once
    # kernel merges in another order: test_read_once.py)
    import dataclasses

    from gpubn.backends.emu import EmuBackend

    two_pass = EmuBackend(tuning=dataclasses.replace(EMU.tuning, read_once=False))
    dx_fused, dw, db = two_pass.bn_backward(dy, x, mean, invstd, w, True)
    assert dx.tobytes() == dx_fused.tobytes()
    assert dw.tobytes() == sum_dy_xhat.tobytes() and db.tobytes() == sum_dy.tobytes()


@pytest.mark.parametrize("case", ["nchw-vector", "nhwc-tiles-split"])
def test_gpu_default_tuning_on_emu(case):
    """The configuration a GPU gets (256-thread blocks, 4 values per thread
    before splitting) runs clean too, on a shape where it splits channels."""
    shape = {"nchw-vector": (4, 2, 1100), "nhwc-tiles-split": (1200, 40, 1)}[case]
    gpu_like = type(EMU)(tuning=Tuning())
    assert reduce_launch("stats", shape, "float32", True, EMU_DEVICE, Tuning()).splits > 1
    x, dy, w, b, rm, rv = _data(shape, np.float32)
    y, mean, invstd = gpu_like.bn_forward_train(x, w, b, rm, rv, 0.1, 1e-5)
    y_r, mean_r, invstd_r = REF.bn_forward_train(x.astype(np.float64), *_f64(w, b), None, None,
                                                 0.1, 1e-5)
    assert_close(y, y_r, np.float32, "y")
    dx, dw, db = gpu_like.bn_backward(dy, x, mean, invstd, w, True)
    dx_r, dw_r, db_r = REF.bn_backward(*_f64(dy, x, mean, invstd, w), True)
    scale = _dx_scale(dy, invstd, w)
    assert_close(dx / scale, dx_r / scale, np.float32, "dx")


@pytest.mark.parametrize("shape", [(203, 10, 1), (3, 4, 301)], ids=["nhwc", "nchw"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_reductions_unrolled_and_tail(shape, dtype):
    """Reductions take four positions per thread at a time plus a tail: a
    tuning that gives each thread 4 to 8 positions runs both parts."""
    tuned = type(EMU)(tuning=Tuning(reduce_threads=64, min_units_per_thread=7))
    cfg = reduce_launch("stats", shape, dtype, True, EMU_DEVICE, tuned.tuning)
    # vector units per channel: rows for channels last (vectors run along C)
    per_channel = shape[0] if shape[2] == 1 else shape[0] * shape[2] // cfg.vec
    threads_per_channel = cfg.block[1] if shape[2] == 1 else cfg.block[0]
    per_thread = -(-per_channel // cfg.splits) / threads_per_channel
    assert cfg.splits > 1 and 4 < per_thread < 8, (cfg, per_thread)
    x, dy, w, b, rm, rv = _data(shape, dtype, seed=4)
    stats = tuned.bn_stats(x)
    ref = REF.bn_stats(x.astype(np.float64))
    assert_close(stats.mean, ref.mean, dtype, "mean")
    assert_close(stats.m2 / stats.count, ref.m2 / ref.count, dtype, "m2 / count")
    _, mean, invstd = REF.bn_forward_train(x.astype(_acc(dtype)), None, None, None, None, 0.1,
                                           1e-5)
    for training in (True, False):
        dx, dw, db = tuned.bn_backward(dy, x, mean, invstd, w, training)
        dx_r, dw_r, db_r = REF.bn_backward(*_f64(dy, x, mean, invstd, w), training)
        scale = _dx_scale(dy, invstd, w)
        assert_close(dx / scale, dx_r / scale, dtype, "dx")
        m = np.sqrt(shape[0] * shape[2])
        assert_close(dw / m, dw_r / m, dtype, "dweight")
        assert_close(db / m, db_r / m, dtype, "dbias")


def test_large_mean_variance_is_stable():
    """Welford/Chan, not E[x^2] - E[x]^2: 1e4 + N(0, 1) in float32."""
    rng = np.random.default_rng(5)
    x = (1e4 + rng.standard_normal((40, 2, 50))).astype(np.float32)
    stats = EMU.bn_stats(x)
    ref = REF.bn_stats(x.astype(np.float64))
    np.testing.assert_allclose(stats.m2 / stats.count, ref.m2 / ref.count, rtol=2e-3)


def test_nonfinite_inputs_poison_their_channel_only():
    x = _data((5, 3, 4), np.float32)[0]
    x[1, 0, 2] = np.nan
    x[3, 1, 0] = np.inf
    y, mean, invstd = EMU.bn_forward_train(x, None, None, None, None, 0.1, 1e-5)
    assert np.isnan(mean[0]) and mean[1] == np.inf and np.isfinite(mean[2])
    assert np.isnan(y[:, :2]).all() and np.isfinite(y[:, 2]).all()


# ------------------------------------------------------------ half precision --
def test_float16_conversions_exhaustive():
    """All 65536 float16 values through the normalize kernel: y = x * s is
    float32 math rounded once to float16 (round to nearest even), which is
    what NumPy's float16 cast does.  Covers subnormals, overflow to inf,
    NaN, and zeros (the shift is +0, so -0 comes out as +0, as x*s + 0 does)."""
    bits = np.arange(65536, dtype=np.uint32).astype(np.uint16)
    x = bits.view(np.float16).reshape(1, 1, -1)
    zero = np.zeros(1, np.float32)
    for s in (1.0, 0.3, 3.7, 1e-4):
        scale = np.float32(s)
        y = EMU.bn_apply(x, zero, np.array([scale]), None, None)
        with np.errstate(all="ignore"):  # nan and overflow are part of the test
            expected = (x.astype(np.float32) * scale + np.float32(0)).astype(np.float16)
        same = (y.view(np.uint16) == expected.view(np.uint16)) | (np.isnan(y) & np.isnan(expected))
        assert same.all(), (f"scale {s}: {int((~same).sum())} values differ, e.g. x={x[~same][:4]} "
                            f"got {y[~same][:4]} expected {expected[~same][:4]}")


def test_bfloat16_kernels_round_to_nearest_even():
    """bfloat16 storage (no NumPy dtype: raw uint16 bits) through the
    normalize kernel, against PyTorch's float32 -> bfloat16 rounding."""
    torch = pytest.importorskip("torch", reason="PyTorch (the bfloat16 oracle) is not installed")
    from gpubn import emu, kernels

    name = kernels.name_expression("bn_apply_nchw", "bfloat16", 8)
    mod = emu.RawModule(code=kernels.read_source("bn_forward.cu"),
                        options=kernels.compile_options(), name_expressions=(name,))
    fn = mod.get_function(name)
    bits = np.arange(65536, dtype=np.uint32).astype(np.uint16).reshape(1, 1, -1)
    y = np.empty_like(bits)
    mean, invstd = np.zeros(1, np.float32), np.array([0.3], np.float32)
    null = np.uint64(0)
    fn((64, 1, 1), (128, 1, 1), (bits, y, null, mean, null, invstd, null, null, null, null,
                                 np.int64(1), np.int32(1), np.int64(bits.size), np.int32(0),
                                 np.int32(0), np.float32(0)))
    xf = torch.from_numpy(bits.astype(np.int32) << 16).view(torch.float32)  # exact widening
    yf = xf * torch.tensor(0.3, dtype=torch.float32) + 0.0  # one float32 rounding, -0 -> +0
    expected = yf.to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    nan = torch.isnan(yf).numpy()
    assert np.array_equal(y[~nan], expected[~nan])
    assert ((y[nan] & 0x7f80) == 0x7f80).all() and ((y[nan] & 0x7f) != 0).all()


# ------------------------------------------------------------- determinism --
DETERMINISM_SHAPES = {"nchw": (4, 3, 1001), "nhwc": (300, 33, 1)}  # 32 and 75 blocks per channel


@pytest.mark.parametrize("case", list(DETERMINISM_SHAPES))
@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_bitwise_deterministic_under_shuffled_block_order(case, dtype):
    shape = DETERMINISM_SHAPES[case]
    assert reduce_launch("stats", shape, "float32", True, EMU_DEVICE, EMU.tuning).splits >= 32
    x, dy, w, b, rm, rv = _data(shape, dtype, seed=3)

    def run():
        rm_s, rv_s = rm.copy(), rv.copy()
        outs = EMU.bn_forward_train(x, w, b, rm_s, rv_s, 0.1, 1e-5)
        stats = EMU.bn_stats(x)
        grads = EMU.bn_backward(dy, x, outs[1], outs[2], w, True)
        return (*outs, rm_s, rv_s, stats.mean, stats.m2, *grads)

    assert_same_under_schedules(run, seeds=(1, 2, 3))


def test_block_order_seeds_do_shuffle():
    """The premise of the determinism test: a seed changes the order in
    which the blocks of a launch run (here: the order they take tickets)."""
    from gpubn import emu

    src = r'''extern "C" __global__ void order(unsigned int* counter, unsigned int* ticket) {
        if (threadIdx.x == 0) ticket[blockIdx.x] = atomicAdd(counter, 1u);
    }'''
    fn = emu.RawModule(code=src).get_function("order")
    orders = []
    for seed in (None, 1, 2):
        counter, ticket = np.zeros(1, np.uint32), np.zeros(16, np.uint32)
        with emu.options(seed=seed):
            fn((16,), (32,), (counter, ticket))
        orders.append(ticket.tolist())
    assert orders[0] == list(range(16))
    assert orders[1] != orders[0] and orders[2] != orders[0]


# -------------------------------------------------------------- validation --
def test_arrays_of_another_module_are_refused():
    class NotAnArray:
        shape, dtype = (2, 3, 4), np.float32

    with pytest.raises(TypeError, match="x must be a numpy array"):
        EMU.bn_stats(NotAnArray())


def test_per_channel_vectors_must_match_the_accumulation_dtype():
    x = _data((2, 3, 4), np.float16)[0]
    w64 = np.ones(3, np.float64)
    with pytest.raises(ValueError, match="weight must be a contiguous \\(3,\\) float32"):
        EMU.bn_forward_train(x, w64, None, None, None, 0.1, 1e-5)
    rm = np.zeros(3, np.float32)
    with pytest.raises(ValueError, match="running_var"):
        EMU.bn_forward_train(x, None, None, rm, np.ones(4, np.float32), 0.1, 1e-5)
    assert not rm.any(), "state touched by a refused call"


def test_unsupported_dtype_is_refused():
    with pytest.raises(TypeError, match="dtype 'int32' has no kernels"):
        EMU.bn_stats(np.zeros((2, 3, 4), np.int32))


# ------------------------------------------------------------------- debug --
def test_debug_reports_only_when_asked(monkeypatch, capsys):
    x = _data((2, 3, 8), np.float32)[0]
    monkeypatch.delenv("GPUBN_DEBUG_KERNELS", raising=False)
    EMU.bn_stats(x)
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err == ""
    monkeypatch.setenv("GPUBN_DEBUG_KERNELS", "1")
    EMU.bn_stats(x)
    err = capsys.readouterr().err
    assert "gpubn::bn_stats_nchw<float, float, 4>" in err and "grid=" in err


def test_zero_channels_launch_nothing():
    from gpubn import emu

    x = np.zeros((4, 0, 5), np.float32)
    with emu.recording() as log:
        y, mean, invstd = EMU.bn_forward_train(x, None, None, None, None, 0.1, 1e-5)
        stats = EMU.bn_stats(x)
        dx, dw, db = EMU.bn_backward(x, x, mean, invstd, None, True)
    assert log == []
    assert y.shape == dx.shape == x.shape and mean.shape == dw.shape == stats.mean.shape == (0,)


@pytest.mark.parametrize("n,forward_staged,backward_staged", [
    (6046, True, True), (6047, False, True), (6144, False, True),
    (12220, False, True), (12221, False, False), (12288, False, False)])
def test_layer_norm_rows_near_the_shared_memory_limit(n, forward_staged, backward_staged):
    """Float rows where weight and bias (forward: 2n floats next to 784 B of
    static shared memory; backward: weight, n floats next to 272 B) meet the
    48 KiB a block may use: staged while static plus dynamic fits, read from
    global memory beyond, and correct either way."""
    import gpubn
    from gpubn.emu import recording
    from gpubn.launch import SHARED_MEMORY_LIMIT, ln_static_shared_bytes

    rng = np.random.default_rng(n)
    x = rng.standard_normal((2, n)).astype(np.float32)
    w, b = (rng.standard_normal(n).astype(np.float32) for _ in range(2))
    dy = rng.standard_normal((2, n)).astype(np.float32)
    with recording() as log:
        y, saved = gpubn.layer_norm_forward(x, n, w, b, backend="emu")
        dx, dw, db = gpubn.layer_norm_backward(dy, saved)
    y_ref, saved_ref = gpubn.layer_norm_forward(x, n, w, b, backend="numpy")
    dx_ref, dw_ref, db_ref = gpubn.layer_norm_backward(dy, saved_ref)
    for got, want in ((y, y_ref), (dx, dx_ref), (dw, dw_ref), (db, db_ref)):
        assert_close(got, want, np.float32)
    forward, backward = log[0], log[1]
    for rec, kernel, staged in ((forward, "ln_forward_block", forward_staged),
                                (backward, "ln_backward_dx_block", backward_staged)):
        assert rec.kernel.startswith(f"gpubn::{kernel}<"), rec.kernel
        assert rec.shared_mem + ln_static_shared_bytes(kernel, "float32") <= SHARED_MEMORY_LIMIT
        assert (rec.shared_mem > 0) == staged, rec
