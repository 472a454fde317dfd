"""The fused ``cpu`` backend (Numba): every interface method against the NumPy
reference on both loop layouts, bitwise results for any thread count,
concurrent Python threads, the re-centred sums, the disk cache and the
automatic choice."""

from __future__ import annotations

import importlib.metadata
import os
import re
import subprocess
import sys
import threading
import types
from pathlib import Path

import numpy as np
import pytest

import gpubn
from conftest import BFLOAT16, assert_close

pytest.importorskip("numba", reason="Numba (the extra gpubn[cpu]) is not installed")
from gpubn.backends import cpu  # noqa: E402
import numba  # noqa: E402

REF = gpubn.backends.get_backend("numpy")
CPU = gpubn.backends.get_backend("cpu")

ALL_DTYPES = (np.float16, np.float32, np.float64) + ((BFLOAT16,) if BFLOAT16 is not None else ())

# (outer, C, inner): NC, channels-last-like short runs, NCHW runs, one channel,
# the last: NCHW with enough channels to run tile by tile
SHAPES = [(300, 7, 1), (40, 5, 3), (6, 4, 50), (3, 1, 200), (5, 16, 40)]


@pytest.fixture(params=["one-tile", "blocked"])
def small_plan(request, monkeypatch):
    """Inputs of up to _ONE_TILE values run the fused tile loops as one tile
    of every channel; "blocked" runs them, as larger inputs, through the
    blocked loops (``_ONE_TILE = 0``, and short rows no longer one tile for
    the L2's sake), so the small shapes of these tests cover both."""
    if request.param == "blocked":
        monkeypatch.setattr(cpu, "_ONE_TILE", 0)
        monkeypatch.setattr(cpu, "_L2_BYTES", 0)
    return request.param


def _case(shape, dtype, seed=0):
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal(shape) * 2 + 3).astype(dtype)
    dy = rng.standard_normal(shape).astype(dtype)
    c = shape[1]
    acc = np.float64 if dtype == np.float64 else np.float32
    w = np.linspace(0.5, 1.5, c).astype(acc)
    b = np.linspace(-1, 1, c).astype(acc)
    return x, dy, w, b


def _ops(be, x, dy, w, b):
    """Every batch-norm method of the interface, in the order a user runs them."""
    c = x.shape[1]
    rm, rv = np.zeros(c, w.dtype), np.ones(c, w.dtype)
    y, mean, invstd = be.bn_forward_train(x, w, b, rm, rv, 0.1, 1e-5)
    st = be.bn_stats(x)
    dx, dw, db = be.bn_backward(dy, x, mean, invstd, w, True)
    dxe, _, _ = be.bn_backward(dy, x, mean, invstd, w, False)
    sdy, sdxh = be.bn_backward_reduce(dy, x, mean, invstd)
    dx2 = be.bn_backward_dx(dy, x, mean, invstd, w, sdy, sdxh, st.count)
    ye, _, _ = be.bn_forward_eval(x, w, b, rm, rv, 1e-5)
    ya = be.bn_apply(x, mean, invstd, w, b)
    return dict(y=y, mean=mean, invstd=invstd, rm=rm, rv=rv, st_mean=st.mean, st_m2=st.m2,
                dx=dx, dw=dw, db=db, dx_eval=dxe, sum_dy=sdy, sum_dy_xhat=sdxh, dx_parts=dx2,
                y_eval=ye, y_apply=ya)


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64],
                         ids=lambda d: np.dtype(d).name)
def test_every_method_matches_the_reference(shape, dtype, small_plan):
    x, dy, w, b = _case(shape, dtype)
    _assert_ops_match(_ops(CPU, x, dy, w, b), _ops(REF, x, dy, w, b), x, w)


def _assert_ops_match(got, ref, x, w):
    """:func:`_ops`' results of the backend against the reference's."""
    m = x.shape[0] * x.shape[2]
    for name, e in ref.items():
        a = got[name]
        assert a.dtype == e.dtype and a.shape == e.shape, name
        # sums over m values carry about sqrt(m) roundings of the data's precision
        scale = max(1.0, m ** 0.5 / 4) if name in ("dw", "db", "sum_dy", "sum_dy_xhat",
                                                   "st_m2") else 1.0
        assert_close(a, e, x.dtype if name not in ("rm", "rv") else w.dtype, name, scale=scale)


def test_layer_norm_matches_the_reference():
    for dtype in (np.float16, np.float32, np.float64):
        rng = np.random.default_rng(1)
        x = (rng.standard_normal((37, 129)) * 3 + 50).astype(dtype)
        dy = rng.standard_normal(x.shape).astype(dtype)
        acc = np.float64 if dtype == np.float64 else np.float32
        w = np.linspace(0.5, 1.5, 129).astype(acc)
        b = np.linspace(-1, 1, 129).astype(acc)
        outs = []
        for be in (CPU, REF):
            y, mean, rstd = be.ln_forward(x, w, b, 1e-5)
            outs.append((y, mean, rstd) + be.ln_backward(dy, x, mean, rstd, w, True))
        for name, a, e in zip(("y", "mean", "rstd", "dx", "dw", "db"), *outs):
            assert a.dtype == e.dtype, name
            assert_close(a, e, dtype, name, scale=3.0 if name in ("dw", "db") else 1.0)


def _epilogue_ops(be, x, dy, w, b, z, training):
    """The residual-block epilogue's methods: forward (training or eval) with
    the residual and the ReLU, then the backward through the mask."""
    c = x.shape[1]
    rm, rv = np.full(c, 0.5, w.dtype), np.full(c, 2.0, w.dtype)
    if training:
        y, mean, invstd = be.bn_forward_train_act(x, w, b, rm, rv, 0.1, 1e-5, z, True)
    else:
        y, mean, invstd = be.bn_forward_eval_act(x, w, b, rm, rv, 1e-5, z, True)
    y_add, _, _ = be.bn_forward_eval_act(x, w, b, rm, rv, 1e-5, z, False)
    dx, dw, db, g = be.bn_backward_relu(dy, x, mean, invstd, w, y, training)
    return dict(y=y, y_add=y_add, mean=mean, invstd=invstd, rm=rm, rv=rv, dx=dx, dw=dw, db=db,
                g=g)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64],
                         ids=lambda d: np.dtype(d).name)
def test_epilogue_matches_the_reference(shape, dtype, training, small_plan):
    """relu(bn(x) + z) and its backward in the fused loops against the
    reference; the ReLU's gradient is exactly dy where the backend's own y is
    positive, and the rest is batch norm's backward of that g."""
    x, dy, w, b = _case(shape, dtype)
    z = np.random.default_rng(9).standard_normal(shape).astype(dtype) * 2
    got, ref = _epilogue_ops(CPU, x, dy, w, b, z, training), \
        _epilogue_ops(REF, x, dy, w, b, z, training)
    assert (got["y"] == 0).any() and (got["y"] > 0).any()
    m = shape[0] * shape[2]
    for name in ("y", "y_add", "mean", "invstd", "rm", "rv"):
        assert got[name].dtype == ref[name].dtype, name
        assert_close(got[name], ref[name], dtype if name[0] == "y" else w.dtype, name)
    g = np.where(got["y"] <= 0, np.zeros((), dtype), dy)
    assert got["g"].dtype == x.dtype
    np.testing.assert_array_equal(got["g"], g)
    # the backward of that g, against the reference's
    for name, e in zip(("dx", "dw", "db"),
                       REF.bn_backward(g, x, got["mean"], got["invstd"], w, training)):
        assert_close(got[name], e, dtype, name,
                     scale=max(1.0, m ** 0.5 / 4) if name != "dx" else 1.0)


def _peak_bytes(fn, *args):
    """Peak bytes the call allocates through NumPy (tracemalloc sees every
    NumPy array buffer)."""
    import tracemalloc
    fn(*args)                           # compiled and warm: measure the steady state
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        fn(*args)
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


@pytest.mark.parametrize("shape", [(32, 16, 1024), (16384, 16, 1)], ids=["rows", "columns"])
@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=lambda d: np.dtype(d).name)
def test_passes_allocate_only_their_outputs(monkeypatch, shape, dtype):
    """No tensor-sized temporary, float16 and bfloat16 included (they are
    widened in registers, not copied to float32): each call allocates its
    outputs (y; dx; dx and the residual's gradient) plus per-channel vectors,
    block partials and each running tile's per-column vectors (a few rows
    of a tile, per thread: two threads here), well under a tenth of the
    tensor.  A float32 copy of float16 data, or the reference's float64
    arithmetic, is far above the bound."""
    monkeypatch.setenv("GPUBN_NUM_THREADS", "2")
    x, dy, w, b = _case(shape, dtype)
    z = np.ones(shape, dtype)
    c = shape[1]
    rm, rv = np.zeros(c, w.dtype), np.ones(c, w.dtype)
    bound = lambda outputs: outputs * x.nbytes + x.nbytes // 10  # noqa: E731
    y, mean, invstd = CPU.bn_forward_train_act(x, w, b, rm, rv, 0.1, 1e-5, z, True)
    calls = {
        "forward": (1, lambda be: be.bn_forward_train(x, w, b, rm, rv, 0.1, 1e-5)),
        "eval": (1, lambda be: be.bn_forward_eval(x, w, b, rm, rv, 1e-5)),
        "backward": (1, lambda be: be.bn_backward(dy, x, mean, invstd, w, True)),
        "backward-eval": (1, lambda be: be.bn_backward(dy, x, mean, invstd, w, False)),
        "epilogue": (1, lambda be: be.bn_forward_train_act(x, w, b, rm, rv, 0.1, 1e-5, z,
                                                           True)),
        "epilogue-backward": (2, lambda be: be.bn_backward_relu(dy, x, mean, invstd, w, y,
                                                                True)),
    }
    for name, (outputs, call) in calls.items():
        assert _peak_bytes(call, CPU) <= bound(outputs), name
    # the bound can fail: the reference computes in float64 copies
    assert _peak_bytes(calls["forward"][1], REF) > bound(1)


def test_layer_norm_passes_allocate_only_their_outputs(monkeypatch):
    """Layer norm over long rows: the forward allocates y (and a mean and
    rstd per row), the backward dx plus its blocks' partial sums of the
    weight's and bias's gradients, which stay well under a tenth of the
    tensor (with a block per 8 rows of 4096 values they were half of it)."""
    monkeypatch.setenv("GPUBN_NUM_THREADS", "2")
    rng = np.random.default_rng(4)
    x = rng.standard_normal((512, 4096)).astype(np.float32)
    dy = rng.standard_normal(x.shape).astype(np.float32)
    w, b = np.full(4096, 0.5, np.float32), np.zeros(4096, np.float32)
    _, mean, rstd = CPU.ln_forward(x, w, b, 1e-5)
    bound = x.nbytes + x.nbytes // 10
    assert _peak_bytes(lambda: CPU.ln_forward(x, w, b, 1e-5)) <= bound
    assert _peak_bytes(lambda: CPU.ln_backward(dy, x, mean, rstd, w, True)) <= bound


@pytest.fixture
def many_blocks(monkeypatch):
    """Blocks of a few hundred values, so small inputs have many blocks and
    every thread gets several (the column sums group short rows to 8 values
    at most), and the loops run on the threads whatever the input's size
    (none as one tile)."""
    monkeypatch.setattr(cpu, "_BLOCK", 256)
    monkeypatch.setattr(cpu, "_ONE_TILE", 0)
    monkeypatch.setattr(cpu, "_L2_BYTES", 0)
    monkeypatch.setattr(cpu, "_WIDE", 8)
    monkeypatch.setattr(cpu, "_SERIAL_MAX", 0)


@pytest.mark.parametrize("shape", SHAPES[:3] + SHAPES[4:], ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=lambda d: np.dtype(d).name)
def test_results_are_bitwise_the_same_for_any_thread_count(many_blocks, monkeypatch, shape,
                                                           dtype):
    shape = (shape[0] * 4,) + shape[1:]
    x, dy, w, b = _case(shape, dtype, seed=2)
    assert cpu._Layout(x.shape).nb > 4 and cpu._Layout(x.shape).sum_nb > 2
    runs = []
    for threads in ("1", "2", "3"):
        monkeypatch.setenv("GPUBN_NUM_THREADS", threads)
        r = _ops(CPU, x, dy, w, b)
        y, mean, rstd = CPU.ln_forward(x.reshape(shape[0], -1), None, None, 1e-5)
        r["ln"] = (y,) + CPU.ln_backward(dy.reshape(y.shape), x.reshape(y.shape), mean, rstd,
                                         None, True)
        runs.append(r)
    for r in runs[1:]:
        for name in r:
            for a, e in zip(np.atleast_1d(r[name]) if name != "ln" else r[name],
                            np.atleast_1d(runs[0][name]) if name != "ln" else runs[0][name]):
                np.testing.assert_array_equal(a, e, err_msg=name)


def test_thread_count_follows_the_environment(monkeypatch):
    import numba
    monkeypatch.setenv("GPUBN_NUM_THREADS", "1")
    assert cpu.num_threads() == 1
    monkeypatch.setenv("GPUBN_NUM_THREADS", "10000")
    assert cpu.num_threads() == numba.config.NUMBA_NUM_THREADS
    monkeypatch.delenv("GPUBN_NUM_THREADS")
    assert cpu.num_threads() == numba.config.NUMBA_NUM_THREADS
    # a parallel loop runs on that many threads (set as it is called)
    seen = []
    real = cpu._sums.parallel
    monkeypatch.setattr(cpu._sums, "parallel", lambda *a: seen.append(numba.get_num_threads())
                        or real(*a))
    monkeypatch.setattr(cpu, "_SERIAL_MAX", 0)
    x = np.ones((64, 8, 1024), np.float32)
    assert cpu._layout(x.shape).sum_nb > 1 and not cpu._tile_channels(x.shape, x.dtype)
    for n in ("1", str(numba.config.NUMBA_NUM_THREADS)):
        monkeypatch.setenv("GPUBN_NUM_THREADS", n)
        CPU.bn_stats(x)
    assert seen == [1, numba.config.NUMBA_NUM_THREADS]


def test_small_inputs_run_on_the_calling_thread(monkeypatch):
    """A loop over at most _SERIAL_MAX values runs its blocks one after the
    other on the calling thread (waking the threads costs more than they
    save), a larger one the parallel loop over them; both walk the same
    blocks, so the results are bitwise the same."""
    ran = []
    for name in ("_sums", "_normalize_loop", "_dx_loop"):
        loop = getattr(cpu, name)
        for kind in ("parallel", "serial"):
            monkeypatch.setattr(loop, kind, lambda *a, _real=getattr(loop, kind), _kind=kind:
                                ran.append(_kind) or _real(*a))
    x, dy, w, b = _case((64, 8, 1024), np.float32)
    assert cpu._layout(x.shape).nb > 1 and cpu._layout(x.shape).sum_nb > 1
    results = []
    for limit, expected in ((x.size, "serial"), (x.size - 1, "parallel")):
        monkeypatch.setattr(cpu, "_SERIAL_MAX", limit)
        ran.clear()
        y, mean, invstd = CPU.bn_forward_train(x, w, b, None, None, 0.1, 1e-5)
        results.append((y, mean, invstd) + CPU.bn_backward(dy, x, mean, invstd, w, True))
        assert ran == [expected] * 4, limit
    for a, e in zip(*results):
        np.testing.assert_array_equal(a, e)


@pytest.mark.parametrize("wake_us, expected", [
    (20.0, 20e-6 / 1e-10),              # 20 us + 0.1 ns n = 0.2 ns n at n = 200000
    (1.0, cpu._SERIAL_MAX_RANGE[0]),     # ahead at the first size, the lower bound
    (1e6, cpu._SERIAL_MAX_RANGE[1]),     # never ahead within the range: the upper bound
])
def test_the_serial_limit_is_where_the_two_ways_cross(monkeypatch, wake_us, expected):
    """_crossover times sizes doubling from the range's lower bound until
    the threads are ahead and returns where the difference of the two ways
    crosses zero between that size and the one before (a machine where a
    value costs 0.2 ns on one thread, 0.1 on two, and waking them
    ``wake_us``), within _SERIAL_MAX_RANGE; it stops timing there."""
    monkeypatch.setenv("GPUBN_NUM_THREADS", "2")
    if cpu.num_threads() < 2:
        pytest.skip("Numba started one thread: _crossover has nothing to time")
    timed = []

    def model(n, repeats):
        timed.append(n)
        return n * 2e-10, wake_us * 1e-6 + n * 1e-10

    monkeypatch.setattr(cpu, "_loop_times", model)
    assert cpu._crossover() == pytest.approx(expected, abs=1)
    lo, hi = cpu._SERIAL_MAX_RANGE
    ladder = [lo << i for i in range((hi // lo).bit_length())]
    assert ladder[-1] == hi
    # the sizes up to the first where the threads are ahead, and no further
    ahead = [n for n in ladder if n * 2e-10 > wake_us * 1e-6 + n * 1e-10]
    assert timed == (ladder[:ladder.index(ahead[0]) + 1] if ahead else ladder)


def test_the_serial_limit_without_a_second_thread_or_a_gain(monkeypatch):
    """With one thread, or when two threads gain nothing a value, every loop
    within the range runs on the calling thread (the upper bound)."""
    hi = cpu._SERIAL_MAX_RANGE[1]
    monkeypatch.setenv("GPUBN_NUM_THREADS", "1")
    monkeypatch.setattr(cpu, "_loop_times",
                        lambda n, repeats: pytest.fail("timed with one thread"))
    assert cpu._crossover() == hi
    monkeypatch.setenv("GPUBN_NUM_THREADS", "2")
    if cpu.num_threads() < 2:
        return
    monkeypatch.setattr(cpu, "_loop_times", lambda n, repeats: (n * 1e-10, n * 1e-10))
    assert cpu._crossover() == hi


def test_the_loop_times_are_the_two_ways_of_the_normalize_loop(monkeypatch):
    """_loop_times times the normalize loop on the calling thread and on the
    threads, in turns, and returns the best of each (the fastest call)."""
    calls = []
    monkeypatch.setattr(cpu._normalize_loop, "serial",
                        lambda *args: calls.append("serial"))
    monkeypatch.setattr(cpu._normalize_loop, "threaded",
                        lambda *args: calls.append("threaded"))
    clock = iter([0.0, 3.0, 10.0, 11.0, 20.0, 22.0, 30.0, 35.0])   # serial 3, 2; threaded 1, 5
    monkeypatch.setattr(cpu, "time", types.SimpleNamespace(perf_counter=lambda: next(clock)))
    assert cpu._loop_times(1 << 16, 2) == (2.0, 1.0)
    assert calls == ["serial", "threaded"] * 3       # one untimed call each, then in turns
    # once the calls have taken _TIMING_SECONDS, three rounds are enough
    calls.clear()
    clock = iter(float(t) for t in range(100))
    monkeypatch.setattr(cpu, "_TIMING_SECONDS", 0.5)
    assert cpu._loop_times(1 << 16, 15) == (1.0, 1.0)
    assert calls == ["serial", "threaded"] * 4


def test_the_serial_limit_is_measured_once_per_process(monkeypatch):
    """_serial_max measures at its first call only, and the measurement runs
    the real loops to a limit within the range."""
    calls = []
    real = cpu._crossover
    monkeypatch.setattr(cpu, "_crossover", lambda: calls.append(1) or real())
    monkeypatch.setattr(cpu, "_SERIAL_MAX", None)
    first = cpu._serial_max()
    assert cpu._serial_max() == first and calls == [1]
    lo, hi = cpu._SERIAL_MAX_RANGE
    assert lo <= first <= hi


def test_concurrent_calls_from_python_threads(many_blocks):
    """Several Python threads calling at once (the threading layer runs one
    parallel region at a time; the backend queues them) get the results of
    sequential calls."""
    cases = [_case((64, 8, 40), np.float32, seed=s) for s in range(4)]
    expected = [_ops(CPU, *c) for c in cases]
    results, errors = [None] * 8, []

    def work(i):
        try:
            results[i] = _ops(CPU, *cases[i % 4])
        except Exception as exc:   # reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors
    for i, r in enumerate(results):
        for name, e in expected[i % 4].items():
            np.testing.assert_array_equal(r[name], e, err_msg=name)


def _far_first_value(shape):
    """1e4 + N(0, 1) float32 with every channel's first value 100 away: the
    shift the sums start from is far from the mean."""
    x = (1e4 + np.random.default_rng(4).standard_normal(shape)).astype(np.float32)
    x[0, :, 0] += 100.0
    return x


@pytest.mark.parametrize("shape", [(4, 3, 4000), (20000, 3, 1)], ids=["rows", "columns"])
def test_sums_taken_again_around_the_mean_when_the_shift_is_far(monkeypatch, shape):
    x = _far_first_value(shape)
    xs = np.moveaxis(x, 1, 0).reshape(3, -1).astype(np.float64)
    ref_m2 = ((xs - xs.mean(axis=1, keepdims=True)) ** 2).sum(axis=1)
    mean, m2 = cpu._moments(x)
    np.testing.assert_allclose(mean, xs.mean(axis=1), rtol=1e-7)
    np.testing.assert_allclose(m2, ref_m2, rtol=1e-5)
    if shape[2] == 1:
        return       # runs of one value are summed in float64: no cancellation to show
    # the check is what keeps it: without the second pass the float32 run sums cancel
    monkeypatch.setattr(cpu, "_REDO", np.inf)
    _, m2_once = cpu._moments(x)
    assert np.max(np.abs(m2_once / ref_m2 - 1)) > 1e-4


def test_layer_norm_rows_taken_again_when_the_first_value_is_far():
    x = (1e4 + np.random.default_rng(5).standard_normal((64, 700))).astype(np.float32)
    x[:, 0] += 1000.0
    x64 = x.astype(np.float64)
    _, mean, rstd = CPU.ln_forward(x, None, None, 1e-5)
    np.testing.assert_allclose(mean, x64.mean(axis=1), rtol=1e-7)
    np.testing.assert_allclose(rstd, 1 / np.sqrt(x64.var(axis=1) + 1e-5), rtol=1e-5)


def test_compiled_loops_are_cached_under_the_gpubn_cache_dir(tmp_path):
    """GPUBN_CACHE_DIR moves the cache; nothing is written next to the package."""
    code = ("from gpubn.backends import cpu; "
            "print(cpu._sums.parallel._cache._cache_path); print(cpu.cache_dir())")
    env = dict(os.environ, GPUBN_CACHE_DIR=str(tmp_path))
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                         text=True, timeout=120, cwd=Path(__file__).parents[1])
    assert out.returncode == 0, out.stderr
    path, root = out.stdout.split()
    assert root == str(tmp_path / "cpu") and Path(path).parent == Path(root)
    package = Path(cpu.__file__).parent / "__pycache__"
    assert not list(package.glob("cpu.*.nbi")), "Numba cache written into the package"


_FAULTS_PER_CALL = r"""
import resource, sys
import numpy as np
import gpubn
x = np.random.default_rng(0).standard_normal((256, 1024), dtype=np.float32)
def call():
    y, saved = gpubn.batch_norm_forward(x, backend="cpu")
    return gpubn.batch_norm_backward(x, saved)
for _ in range(3):
    call()
faults = []
for _ in range(10):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    call()
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(sorted(faults)[len(faults) // 2])
"""


def _faults_per_call(**env):
    """The median call's page faults in a new process, without the C
    allocator's own settings (``MALLOC_*_``, ``GLIBC_TUNABLES``: any of them
    turns glibc's dynamic thresholds off, and Dask sets one for its workers)."""
    base = {k: v for k, v in os.environ.items()
            if not k.startswith("MALLOC_") and k != "GLIBC_TUNABLES"}
    run = subprocess.run([sys.executable, "-c", _FAULTS_PER_CALL], env=dict(base, **env),
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr
    return int(run.stdout.split()[-1])


@pytest.mark.skipif(not hasattr(os, "confstr") or sys.platform != "linux",
                    reason="glibc's malloc thresholds: Linux only")
def test_fresh_outputs_reuse_the_heap_in_a_new_process():
    """In a process that has freed no large block, glibc gives a forward's y
    and a backward's dx (1 MiB each here) back to the system on every call
    and faults their 512 pages in again on the next; the backend raises the
    thresholds at import (_prime_malloc), so the median call faults in no
    page.  GPUBN_MALLOC_PRIME=0 turns that off and shows the faults."""
    try:
        os.confstr("CS_GNU_LIBC_VERSION")
    except (ValueError, OSError):
        pytest.skip("the C library is not glibc")
    primed = _faults_per_call()
    assert primed < 32, f"{primed} page faults in the median call"
    unprimed = _faults_per_call(GPUBN_MALLOC_PRIME="0")
    if unprimed < 256:
        pytest.skip(f"glibc kept the pages here without priming ({unprimed} faults a call)")
    assert unprimed >= 256 > primed


def test_automatic_choice_is_cpu_for_numpy_arrays_and_numpy_without_numba(monkeypatch):
    from gpubn import backends
    monkeypatch.delenv("GPUBN_BACKEND", raising=False)
    assert backends.get_backend(None, np.ones(3)).name == "cpu"
    # without Numba the cpu module does not import: numpy is chosen
    monkeypatch.setitem(backends._REGISTRY, "cpu", "gpubn.backends._no_such_module:X")
    monkeypatch.delitem(backends._INSTANCES, "cpu")
    backends._host_auto.cache_clear()
    try:
        assert backends.get_backend(None, np.ones(3)).name == "numpy"
        with pytest.raises(RuntimeError, match="backend 'cpu' is not available"):
            backends.get_backend("cpu")
    finally:
        backends._host_auto.cache_clear()



def _tbb_installed():
    try:
        importlib.metadata.distribution("tbb")
        return True
    except importlib.metadata.PackageNotFoundError:
        return False


def test_the_threading_layer(monkeypatch):
    """The layer the fork and concurrency tests above exercise: tbb when
    the tbb package is installed (gpubn[cpu] brings it on x86-64), else
    workqueue; the user's NUMBA_THREADING_LAYER when set."""
    import numba
    asked = os.environ.get("NUMBA_THREADING_LAYER")
    if asked and asked not in ("tbb", "workqueue", "omp"):
        pytest.skip(f"NUMBA_THREADING_LAYER={asked} names a kind of layer, not one")
    monkeypatch.setattr(cpu, "_BLOCK", 256)
    monkeypatch.setattr(cpu, "_SERIAL_MAX", 0)
    CPU.bn_stats(np.ones((64, 4, 32), np.float32))       # a parallel loop has run
    assert numba.threading_layer() == (asked or ("tbb" if _tbb_installed() else "workqueue"))


def test_the_tbb_library_is_loaded_from_the_package_when_there(monkeypatch, tmp_path):
    """_load_tbb finds the library in the tbb package's install record
    (a virtual environment's loader would not), and says False, raising
    nothing, when the package is missing, lists no library or its file does
    not load."""
    if _tbb_installed():
        assert cpu._load_tbb()

    def missing(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "files", missing)
    assert cpu._load_tbb() is False
    monkeypatch.setattr(importlib.metadata, "files", lambda name: None)
    assert cpu._load_tbb() is False
    broken = tmp_path / cpu._TBB_LIBRARY
    broken.write_bytes(b"not a shared library")
    record = type("Record", (), {"name": broken.name, "locate": lambda self: broken})()
    monkeypatch.setattr(importlib.metadata, "files", lambda name: [record])
    assert cpu._load_tbb() is False


@pytest.mark.parametrize("layer", ["tbb", "workqueue"])
def test_fork_and_python_threads_under_either_layer(layer):
    """The fork, concurrency and thread-count tests pass under both layers
    gpubn picks, each in a process of its own (a process has one layer):
    this one's is tested by this run."""
    import numba
    if layer == "tbb" and not _tbb_installed():
        pytest.skip("the tbb package is not installed")
    numba.get_num_threads()     # starts this process's layer
    if numba.threading_layer() == layer:
        pytest.skip(f"this process runs {layer}")
    here = Path(__file__).parent
    tests = [f"{here / 'test_cpu_backend.py'}::{name}" for name in (
        "test_the_threading_layer", "test_concurrent_calls_from_python_threads",
        "test_results_are_bitwise_the_same_for_any_thread_count")]
    tests.append(f"{here / 'test_host_backends.py'}::"
                 "test_forked_child_runs_after_the_parent_used_its_threads")
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *tests],
                         env=dict(os.environ, NUMBA_THREADING_LAYER=layer), cwd=here,
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-2000:]
    assert " passed" in run.stdout and "skipped" not in run.stdout.splitlines()[-1]


# ------------------------------------------- float16 / bfloat16 in registers ---
HALVES = [pytest.param(np.float16, cpu.f16_bits_to_f32, cpu.f32_to_f16_bits, id="float16")]
if BFLOAT16 is not None:
    HALVES.append(pytest.param(BFLOAT16, cpu.bf16_bits_to_f32, cpu.f32_to_bf16_bits,
                               id="bfloat16"))


@numba.njit
def _each(fn, a, out):
    for i in range(a.size):
        out[i] = fn(a[i])
    return out


def _f32_bits(a):
    return np.asarray(a, np.float32).view(np.uint32)


@pytest.mark.parametrize("dtype,widen,narrow", HALVES)
def test_widening_is_exact_for_every_bit_pattern(dtype, widen, narrow):
    """All 65536 patterns: the same float32 as NumPy / ml_dtypes, bit for
    bit; NaN keeps its sign and payload (the float16 / bfloat16 fraction in
    the top of float32's); and narrowing the result gives the pattern back
    (every finite value and Inf round-trip; NaN as narrowing defines it)."""
    bits = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16)
    got = _each(widen, bits.view(cpu._bits_dtype(np.dtype(dtype))), np.empty(bits.size,
                                                                               np.float32))
    ref = bits.view(dtype).astype(np.float32)
    nan = np.isnan(ref)
    assert nan.sum() == (2046 if dtype == np.float16 else 254)   # every NaN pattern
    np.testing.assert_array_equal(_f32_bits(got)[~nan], _f32_bits(ref)[~nan])
    u = bits.astype(np.uint32)
    sign, frac = (u & 0x8000) << 16, u & (0x3ff if dtype == np.float16 else 0x7f)
    expected_nan = sign | 0x7f800000 | (frac << (13 if dtype == np.float16 else 16))
    np.testing.assert_array_equal(_f32_bits(got)[nan], expected_nan[nan])
    back = _each(narrow, got, np.empty(bits.size, cpu._bits_dtype(np.dtype(dtype))))
    np.testing.assert_array_equal(back.view(np.uint16)[~nan], bits[~nan])


def _narrowing_cases(dtype):
    """float32 inputs that exercise rounding: every value of the format, one
    float32 ulp either side, the exact midpoints to both neighbours (ties to
    even), the overflow and subnormal boundaries, and a million random
    patterns."""
    shift = 13 if dtype == np.float16 else 16
    exact = _f32_bits(np.arange(1 << 16, dtype=np.uint32).astype(np.uint16).view(dtype)
                      .astype(np.float32)).astype(np.int64)
    half_ulp = 1 << (shift - 1)
    cands = [exact, exact + 1, exact - 1, exact + half_ulp, exact - half_ulp,
             exact + half_ulp + 1, exact + half_ulp - 1,
             np.random.default_rng(0).integers(0, 1 << 32, 1 << 20)]
    u = np.concatenate(cands) & 0xFFFFFFFF
    return u.astype(np.uint32).view(np.float32)


@pytest.mark.parametrize("dtype,widen,narrow", HALVES)
def test_narrowing_rounds_as_numpy_for_every_format_value_and_tie(dtype, widen, narrow):
    f = _narrowing_cases(dtype)
    with np.errstate(over="ignore", invalid="ignore"):
        ref = f.astype(dtype).view(np.uint16)
    got = _each(narrow, f, np.empty(f.size, cpu._bits_dtype(np.dtype(dtype)))).view(np.uint16)
    nan = np.isnan(f)
    np.testing.assert_array_equal(got[~nan], ref[~nan])
    u = _f32_bits(f)[nan]
    sign = (u >> 16) & 0x8000
    if dtype == np.float16:     # NumPy: the payload's top 10 bits, at least 1
        expected = sign | 0x7c00 | np.maximum((u >> 13) & 0x3ff, 1)
    else:                       # ml_dtypes: the quiet NaN of the sign
        expected = sign | 0x7fc0
    np.testing.assert_array_equal(got[nan], expected.astype(np.uint16))
    if dtype == np.float16:
        np.testing.assert_array_equal(got[nan], ref[nan])


def _elementwise_ops(be, x, dy, z, w, b, mean, invstd, sums, y):
    """The passes whose results depend only on the data and the given
    per-channel vectors (the sums' order of addition is the compiler's, and
    may differ between storage dtypes within float32's rounding)."""
    c = x.shape[1]
    rm, rv = np.full(c, 0.5, w.dtype), np.full(c, 2.0, w.dtype)
    return dict(
        y_apply=be.bn_apply(x, mean, invstd, w, b),
        y_eval=be.bn_forward_eval(x, w, b, rm, rv, 1e-5)[0],
        y_eval_relu=be.bn_forward_eval_act(x, w, b, rm, rv, 1e-5, z, True)[0],
        dx_eval=be.bn_backward(dy, x, mean, invstd, w, False)[0],
        dx_parts=be.bn_backward_dx(dy, x, mean, invstd, w, *sums, x.shape[0] * x.shape[2]),
        g=be.bn_backward_relu(dy, x, mean, invstd, w, y, True)[3])


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", ALL_DTYPES[:1] + ALL_DTYPES[3:],
                         ids=lambda d: np.dtype(d).name)
def test_half_precision_results_are_those_of_float32_rounded(shape, dtype, small_plan):
    """float16 / bfloat16 data give bitwise what the backend computes for
    the same data widened to float32, rounded to nearest even, in every pass
    that reads the data with given per-channel vectors: the widening and the
    rounding in the loops change the memory traffic, not the results."""
    x, dy, w, b = _case(shape, dtype)
    z = np.random.default_rng(9).standard_normal(shape).astype(dtype)
    c = shape[1]
    y, mean, invstd = CPU.bn_forward_train_act(x, w, b, np.zeros(c, w.dtype),
                                               np.ones(c, w.dtype), 0.1, 1e-5, z, True)
    sums = CPU.bn_backward_reduce(dy, x, mean, invstd)
    half = _elementwise_ops(CPU, x, dy, z, w, b, mean, invstd, sums, y)
    wide = _elementwise_ops(CPU, *(a.astype(np.float32) for a in (x, dy, z)), w, b, mean,
                            invstd, sums, y.astype(np.float32))
    for name, e in wide.items():
        assert half[name].dtype == dtype, name
        np.testing.assert_array_equal(half[name].view(np.uint16), e.astype(dtype).view(np.uint16),
                                      err_msg=name)


# ------------------------------------------------- the finishing step ------
@pytest.mark.parametrize("acc", [np.float32, np.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("momentum", [0.1, 1.0, 0.0, 1 / 3])
@pytest.mark.parametrize("tracked,guard", [(True, False), (True, True), (False, False)],
                         ids=["running", "guarded", "untracked"])
def test_finishing_step_is_the_host_arithmetic_bitwise(acc, momentum, tracked, guard):
    """The compiled step between the passes (invstd, the per-channel vectors
    in the accumulation dtype, the running statistics and their guard) gives
    the bits of the NumPy arithmetic the numpy backend runs
    (``host_forward_train``), non-finite and out-of-range channels
    included."""
    from gpubn.backends.base import host_forward_train
    rng = np.random.default_rng(11)
    c, count = 12, 37
    mean = rng.standard_normal(c) * 1e3
    m2 = rng.random(c) * 1e4
    mean[1], mean[2], m2[3], m2[4] = np.nan, np.inf, np.inf, 1e300   # 1e300: Inf in float32
    m2[5] = 0.0
    start = [rng.standard_normal(c).astype(acc), rng.random(c).astype(acc) + 0.5]
    want_run = [v.copy() for v in start] if tracked else [None, None]
    got_run = [v.copy() for v in start] if tracked else [None, None]
    want_skip = np.full(c, 7, np.int32) if guard else None
    got_skip = np.full(c, 7, np.int32) if guard else None
    x3 = np.empty((count, c, 1), acc)
    with np.errstate(all="ignore"):
        _, want_mean, want_inv = host_forward_train(x3, lambda _: (mean, m2), lambda *_: None,
                                                    1e-5, *want_run, momentum, want_skip)
    inv = np.empty(c)
    got_mean, got_inv = np.empty(c, acc), np.empty(c, acc)
    empty = np.empty(0, acc)
    cpu._finish(mean, m2, count, 1e-5, *(empty if v is None else v for v in got_run), momentum,
                np.empty(0, np.int32) if got_skip is None else got_skip, inv, got_mean, got_inv)
    np.testing.assert_array_equal(inv, 1.0 / np.sqrt(m2 / count + 1e-5))
    for got, want, name in [(got_mean, want_mean, "mean"), (got_inv, want_inv, "invstd"),
                            *zip(got_run, want_run, ("running_mean", "running_var")),
                            (got_skip, want_skip, "skipped")]:
        if want is None:
            continue
        assert got.dtype == want.dtype, name
        assert got.tobytes() == want.tobytes(), name
    if guard:
        # the variance of channel 4 is finite in float64 only
        assert got_skip.tolist() == [0, 1, 1, 1, int(acc == np.float32)] + [0] * (c - 5)


def test_finishing_step_keeps_its_arithmetic_when_a_fast_loop_calls_it():
    """The step between the passes gives the bits of the host arithmetic
    also when it is first compiled for a call from a loop compiled with the
    loops' flags (reassociation), as the tile forward calls it: it sets its
    own flags rather than take its caller's.  Checked on a copy compiled
    afresh with the step's own options."""
    from gpubn.backends.base import host_forward_train
    options = {k: v for k, v in cpu._finish.targetoptions.items() if k != "nopython"}
    fresh = numba.njit(**options)(cpu._finish.py_func)

    @numba.njit(fastmath=cpu._FLAGS)
    def from_a_loop(mean, m2, count, eps, rm, rv, momentum, skipped, inv, mean_acc, inv_acc):
        fresh(mean, m2, count, eps, rm, rv, momentum, skipped, inv, mean_acc, inv_acc)

    rng = np.random.default_rng(5)
    c, count = 64, 37
    mean, m2 = rng.standard_normal(c) * 1e3, rng.random(c) * 1e4
    start = [rng.standard_normal(c), rng.random(c) + 0.5]
    want, got = [v.copy() for v in start], [v.copy() for v in start]
    x3 = np.empty((count, c, 1))
    host_forward_train(x3, lambda _: (mean, m2), lambda *_: None, 1e-5, *want, 0.1, None)
    from_a_loop(mean, m2, count, 1e-5, *got, 0.1, np.empty(0, np.int32), np.empty(c),
                np.empty(c), np.empty(c))
    for g, w in zip(got, want):
        assert g.tobytes() == w.tobytes()


@pytest.mark.parametrize("acc", [np.float32, np.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("affine", [True, False], ids=["affine", "no-affine"])
def test_eval_constants_are_the_host_arithmetic_bitwise(acc, affine):
    """The compiled step of an inference forward gives the bits of the numpy
    backend's ``host_eval_constants`` for mean and invstd (non-finite,
    negative and zero variances included), and the normalize loop's
    constants of the formulas in float64: ``hi`` the mean rounded, ``a =
    invstd * w``, ``b0 = b - (mean - hi) * a`` (0 for ``mean - hi`` where
    ``hi`` is not finite)."""
    from gpubn.backends.base import host_eval_constants
    rng = np.random.default_rng(12)
    c = 10
    rm = (rng.standard_normal(c) * 1e3).astype(acc)
    rv = (rng.random(c) * 1e2).astype(acc)
    rm[1], rm[2], rv[3], rv[4], rv[5], rv[6] = np.nan, -np.inf, -1.0, 0.0, np.inf, np.nan
    w = rng.standard_normal(c).astype(acc) if affine else np.ones(c, acc)
    b = rng.standard_normal(c).astype(acc) if affine else np.zeros(c, acc)
    with np.errstate(all="ignore"):
        want_mean, want_inv = host_eval_constants(np.empty((2, c, 1), acc), rm, rv, 1e-5)
        m = want_mean.astype(np.float64)
        want_hi = m.astype(acc)
        lo = np.where(np.isfinite(want_hi), m - want_hi.astype(np.float64), 0.0)
        scale = want_inv.astype(np.float64) * w.astype(np.float64)
        want_a, want_b0 = scale.astype(acc), (b.astype(np.float64) - lo * scale).astype(acc)
    got = [np.empty(c, acc) for _ in range(5)]
    cpu._eval_constants(rm, rv, 1e-5, w, b, *got)
    for g, want, name in zip(got, (want_mean, want_inv, want_hi, want_a, want_b0),
                             ("mean", "invstd", "hi", "a", "b0")):
        assert g.dtype == want.dtype, name
        assert g.tobytes() == want.tobytes(), name


# ------------------------------------------ groups of short rows (NC, NHWC) ---
@pytest.mark.parametrize("blocks,group,c,inner", [(4, 1, 7, 1), (3, 2, 5, 4), (1, 3, 2, 1)])
def test_channel_totals_add_the_blocks_in_order_then_a_channels_columns(blocks, group, c, inner):
    """The partials of the column sums become per-channel totals in a fixed
    order (bitwise results for any thread count): each column over the
    blocks first, then a channel's columns in memory order; both sums of a
    pass (their own data) in one call."""
    parts = np.random.default_rng(6).standard_normal((2, blocks, group * c * inner)) * 1e8
    want = []
    for s in range(2):
        col = [0.0] * parts.shape[2]
        for j in range(parts.shape[2]):
            total = float(parts[s, 0, j])
            for b in range(1, blocks):
                total += float(parts[s, b, j])
            col[j] = total
        want.append([0.0] * c)
        for g in range(group):
            for ch in range(c):
                for i in range(inner):
                    want[s][ch] += col[(g * c + ch) * inner + i]
    out = np.empty((2, c))
    cpu._channel_totals(parts, group, inner, out)
    assert out.tolist() == want


def test_short_rows_are_grouped_by_the_shape():
    """The loops over short rows (NC, channels-last) take several rows as
    one: the column sums the fewest rows that make _WIDE (2048) values,
    among the divisors of the row count up to _FOLD (64), else the most of
    those; the normalize and dx loops likewise to _AFFINE_WIDE (512), or
    for a small input to sqrt(2 * rows * width) values."""
    assert cpu._row_group(100352, 256, cpu._WIDE) == 8        # 32x56x56x256 channels-last
    assert cpu._row_group(256, 4096, cpu._WIDE) == 1          # long enough already
    assert cpu._row_group(98, 64, cpu._WIDE) == 49            # 2, 7 and 14 rows are too few
    assert cpu._row_group(300, 7, cpu._WIDE) == 60            # never 2048: the most rows
    assert cpu._row_group(101, 64, cpu._WIDE) == 1            # a prime count of rows
    assert cpu._Layout((100352, 256, 1)).group == 8
    assert cpu._Layout((16, 128, 4)).group == 4
    assert cpu._Layout((8, 16, 1024)).group == 1   # NCHW runs are not grouped
    # the normalize and dx loops writing an output kept in the cache: rows
    # of _AFFINE_WIDE (512) values (a streamed output's as the column
    # sums'), fewer for small inputs, whose constants per column cost as
    # much as their rows' setups
    assert cpu._Layout((100352, 16, 1)).affine_group == 32  # 512 values
    assert cpu._Layout((1152, 16, 1)).affine_group == 12    # 8x12x12x16: sqrt(36864) = 192
    assert cpu._Layout((64, 64, 1)).affine_group == 2       # sqrt(8192) = 90.5
    assert cpu._Layout((98, 64, 1)).affine_group == 2       # sqrt(12544) = 112
    assert cpu._Layout((16, 64, 1)).affine_group == 1       # sqrt(2048) = 45
    assert cpu._Layout((256, 1024, 1)).affine_group == 1
    assert cpu._Layout((8, 16, 1024)).affine_group == 1


def test_a_shape_is_planned_once_per_value_of_the_constants(monkeypatch):
    """The plan of a shape is kept (a call of a small input spent a third
    of its time planning) and made again when a constant it reads changes."""
    plan = cpu._layout((100352, 256, 1))
    assert cpu._layout((100352, 256, 1)) is plan and plan.group == 8
    monkeypatch.setattr(cpu, "_WIDE", 8)
    assert cpu._layout((100352, 256, 1)).group == 1
    assert cpu._layout((64, 64, 1)).nb == 1
    monkeypatch.setattr(cpu, "_BLOCK", 256)
    assert cpu._layout((64, 64, 1)).nb == 16


@pytest.mark.parametrize("shape", [(64, 64, 1), (16, 128, 4), (98, 64, 1), (101, 24, 1)],
                         ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64],
                         ids=lambda d: np.dtype(d).name)
def test_groups_of_short_rows_match_the_reference(shape, dtype, small_plan):
    """Every method and the residual + ReLU epilogue with rows grouped to
    _WIDE values (32, 4 and 49 rows as one; the normalize and dx loops 8, 1
    and 14) or not at all (a prime row count), against the float64
    reference."""
    x, dy, w, b = _case(shape, dtype)
    _assert_ops_match(_ops(CPU, x, dy, w, b), _ops(REF, x, dy, w, b), x, w)
    z = np.random.default_rng(3).standard_normal(shape).astype(dtype)
    c = shape[1]
    state = lambda: (np.zeros(c, w.dtype), np.ones(c, w.dtype))  # noqa: E731
    y, mean, invstd = CPU.bn_forward_train_act(x, w, b, *state(), 0.1, 1e-5, z, True)
    y_ref, mean_ref, invstd_ref = REF.bn_forward_train_act(x, w, b, *state(), 0.1, 1e-5, z, True)
    assert_close(y, y_ref, dtype, "y (add + relu)")
    got = CPU.bn_backward_relu(dy, x, mean, invstd, w, y, True)
    ref = REF.bn_backward_relu(dy, x, mean_ref, invstd_ref, w, y_ref, True)
    for name, a, e in zip(("dx", "dresidual"), (got[0], got[3]), (ref[0], ref[3])):
        assert_close(a, e, dtype, name)


# ------------------------------------------------- tiles of channels (NCHW) ---
def test_tiles_of_channels_are_chosen_by_the_shape(monkeypatch):
    """NCHW runs with many channels whose values fit the cache budget run the
    fused tile loops (one read of x forward, one of x and dy backward); too
    few channels, short runs or too much data per channel the blocked ones.
    Tiles are whole channels, at least _TILE columns where the cache budget
    allows, and at least _TILES_MIN of them.  (Small inputs, one tile of
    every channel, aside: ``_ONE_TILE = 0``.)"""
    monkeypatch.setattr(cpu, "_ONE_TILE", 0)
    monkeypatch.setattr(cpu, "_L2_BYTES", 0)
    ran = []
    for name in ("_tile_forward", "_tile_backward", "_sums", "_normalize_loop", "_dx_loop"):
        real = getattr(cpu, name)
        monkeypatch.setattr(cpu, name, lambda *a, _real=real, _name=name:
                            ran.append(_name) or _real(*a))
    fits = cpu._TILE_BYTES // 4 // 50
    for shape, tiled in [((fits, 16, 50), True), ((fits + 1, 16, 50), False),
                         ((4, 15, 50), False), ((50, 16, 15), False)]:
        x, dy, w, b = _case(shape, np.float32)
        ran.clear()
        _, mean, invstd = CPU.bn_forward_train(x, w, b, None, None, 0.1, 1e-5)
        CPU.bn_backward(dy, x, mean, invstd, w, True)
        expected = (["_tile_forward", "_tile_backward"] if tiled
                    else ["_sums", "_normalize_loop", "_sums", "_dx_loop"])
        assert ran == expected, shape
    # channels per tile: 4096 columns or more (ceil(4096 / 49) = 84); then the
    # cache budget (1 MiB of a channel's values); then 16 tiles
    assert cpu._tile_channels((32, 2048, 49), np.float32) == 84
    assert cpu._tile_channels((4096, 2048, 49), np.float32) == (1 << 20) // (4096 * 49 * 4)
    assert cpu._tile_channels((32, 64, 20), np.float32) == 4
    assert cpu._tile_channels((32, 64, 3136), np.float32) == 2


def test_small_inputs_are_one_tile_of_every_channel(monkeypatch):
    """An input of _ONE_TILE values or fewer, of any layout, runs a training
    forward and a backward as one compiled call each (the tile loops over
    one tile of every channel, short rows several at a time, as the
    normalize loop groups them), on the calling thread; one value more and
    it is planned as before."""
    assert cpu._tiles((16, 64, 1), np.float32)[:2] == (64, 1)          # NC: rows of 64 >= 45
    assert cpu._tiles((1152, 16, 1), np.float32)[:2] == (16, 12)       # 8x12x12x16 channels-last
    assert cpu._tiles((8, 16, 144), np.float32)[:2] == (16, 1)         # NCHW 8x16x12x12
    assert cpu._tiles((101, 24, 1), np.float32)[:2] == (24, 1)         # a prime row count
    assert cpu._tiles((1, 1, cpu._ONE_TILE), np.float32)[:2] == (1, 1)
    assert cpu._tiles((2, 1, cpu._ONE_TILE // 2 + 1), np.float32)[0] == 0
    monkeypatch.setattr(cpu, "_L2_BYTES", 0)
    assert cpu._tiles((cpu._ONE_TILE + 1, 1, 1), np.float16)[0] == 0
    # runs of 512 values or more are walked one by one, of 64 or more in a
    # tensor under _CACHED_BYTES, of 16 or more in fewer than 16 rows;
    # shorter ones (and those of a larger tensor with more rows) by columns
    assert cpu._tiles((4, 64, 784), np.float32)[2]
    assert cpu._tiles((32, 512, 784), np.float32)[2]
    assert cpu._tiles((8, 16, 144), np.float32)[2]
    assert cpu._tiles((16, 64, 64), np.float32)[2]
    assert not cpu._tiles((32, 1024, 196), np.float32)[2]
    assert not cpu._tiles((32, 64, 49), np.float32)[2]
    assert cpu._tiles((8, 256, 49), np.float32)[2]
    assert cpu._tiles((15, 64, 16), np.float32)[2]
    assert not cpu._tiles((16, 64, 16), np.float32)[2]
    assert not cpu._tiles((8, 64, 15), np.float32)[2]
    ran = []
    for name in ("_tile_forward", "_tile_backward", "_sums", "_normalize_loop", "_dx_loop"):
        for kind in ("parallel", "serial"):
            loop = getattr(cpu, name)
            monkeypatch.setattr(loop, kind, lambda *a, _real=getattr(loop, kind),
                                _name=f"{name}.{kind}": ran.append(_name) or _real(*a))
    for shape in [(16, 64, 1), (1152, 16, 1), (8, 16, 144), (101, 24, 1)]:
        x, dy, w, b = _case(shape, np.float32)
        ran.clear()
        _, mean, invstd = CPU.bn_forward_train(x, w, b, None, None, 0.1, 1e-5)
        CPU.bn_backward(dy, x, mean, invstd, w, True)
        assert ran == ["_tile_forward.serial", "_tile_backward.serial"], shape


def test_short_rows_are_one_tile_while_x_and_dy_fit_in_the_l2(monkeypatch):
    """Short rows (NC, channels-last) above _ONE_TILE values are one tile as
    long as x and dy take at most the L2 together; NCHW runs keep the
    _ONE_TILE limit (their tile loops wake the threads once a pass)."""
    monkeypatch.setattr(cpu, "_L2_BYTES", 2 << 20)
    assert cpu._tiles((3136, 64, 1), np.float32)[:2] == (64, 8)        # 4x28x28x64 channels-last
    assert cpu._tiles((256, 1024, 1), np.float32)[0] == 1024           # 2 x 1 MiB
    assert cpu._tiles((257, 1024, 1), np.float32)[0] == 0
    assert cpu._tiles((512, 1024, 1), np.float16)[0] == 1024           # 2 x 1 MiB of float16
    assert cpu._tiles((128, 1024, 1), np.float64)[0] == 1024
    assert cpu._tiles((129, 1024, 1), np.float64)[0] == 0
    assert cpu._tiles((4, 64, 784), np.float32)[0] == 4                # NCHW: tiles as before
    monkeypatch.setattr(cpu, "_L2_BYTES", 512 << 10)
    assert cpu._tiles((3136, 64, 1), np.float32)[0] == 0
    assert cpu._tiles((32, 4096, 1), np.float32)[0] == 4096            # _ONE_TILE values


def test_the_l2_size_is_the_systems():
    """The L2 size read from sysfs is the one the C library reports."""
    if not os.path.isdir("/sys/devices/system/cpu/cpu0/cache"):
        pytest.skip("no CPU cache information in sysfs here")
    try:
        reported = int(subprocess.run(["getconf", "LEVEL2_CACHE_SIZE"], capture_output=True,
                                      text=True, check=True).stdout.strip())
    except (OSError, ValueError, subprocess.CalledProcessError):
        pytest.skip("getconf does not report the L2 size here")
    if reported <= 0:
        pytest.skip("getconf does not report the L2 size here")
    assert cpu._l2_bytes() == reported


def test_a_short_row_input_of_one_tile_for_the_l2_matches_the_reference(monkeypatch):
    """Above _ONE_TILE values, as one tile: every method against the
    reference (the loops are those of small inputs, the rows longer)."""
    monkeypatch.setattr(cpu, "_L2_BYTES", 2 << 20)
    x, dy, w, b = _case((2100, 64, 1), np.float32)
    assert x.size > cpu._ONE_TILE and cpu._tiles(x.shape, x.dtype)[0] == 64
    _assert_ops_match(_ops(CPU, x, dy, w, b), _ops(REF, x, dy, w, b), x, w)


@pytest.mark.parametrize("shape", [(4, 64, 20), (5, 70, 16), (20, 70, 16), (130, 32, 17),
                                   (3, 33, 1030)],
                         ids=["tiles-of-4", "last-tile-short", "last-tile-short-columns",
                              "rows-over-fold", "runs-one-by-one"])
@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64],
                         ids=lambda d: np.dtype(d).name)
def test_tiles_of_several_channels_match_the_reference(monkeypatch, shape, dtype):
    """Tiles of several channels (a short last tile, walked run by run in
    fewer than _FEW_ROWS rows and by columns in more; more rows than one
    _FOLD; runs of _RUNS_MIN or more, walked one by one): forward, backward
    and the residual + ReLU epilogue against the float64 reference."""
    monkeypatch.setattr(cpu, "_ONE_TILE", 0)    # the small ones: tiles of several
    monkeypatch.setattr(cpu, "_L2_BYTES", 0)
    t = cpu._tile_channels(shape, dtype)
    assert t > 1 and (shape[1] % t or shape[0] > cpu._FOLD or shape == (4, 64, 20))
    assert (shape[2] >= cpu._RUNS_MIN) == (shape == (3, 33, 1030))
    # fewer than _FEW_ROWS rows: run by run; more: by columns
    assert cpu._tiles(shape, dtype).runs == (shape[0] < cpu._FEW_ROWS or shape[2] >= cpu._RUNS_MIN)
    x, dy, w, b = _case(shape, dtype)
    _assert_ops_match(_ops(CPU, x, dy, w, b), _ops(REF, x, dy, w, b), x, w)
    z = np.random.default_rng(3).standard_normal(shape).astype(dtype)
    c = shape[1]
    y, _, _ = CPU.bn_forward_train_act(x, w, b, np.zeros(c, w.dtype), np.ones(c, w.dtype),
                                       0.1, 1e-5, z, True)
    y_ref, _, _ = REF.bn_forward_train_act(x, w, b, np.zeros(c, w.dtype), np.ones(c, w.dtype),
                                           0.1, 1e-5, z, True)
    assert_close(y, y_ref, dtype, "y (add + relu)")


@pytest.mark.parametrize("dtype", [np.float16, np.float32], ids=lambda d: np.dtype(d).name)
def test_channel_by_channel_statistics_summed_again_when_the_shift_is_far(dtype):
    """1e4 + N(0, 1) data with every channel's first value 100 away (float16:
    100 + N(0, 1) and 10 away): the variance keeps the accuracy of the
    data's precision (without the second sum around the mean the float32
    runs cancel about 4 digits)."""
    base, off = (1e4, 100.0) if dtype == np.float32 else (100.0, 10.0)
    x = (base + np.random.default_rng(4).standard_normal((4, 16, 2000))).astype(dtype)
    x[0, :, 0] += off
    assert cpu._tile_channels(x.shape, x.dtype)
    xs = np.moveaxis(x, 1, 0).reshape(16, -1).astype(np.float64)
    _, mean, invstd = CPU.bn_forward_train(x, None, None, None, None, 0.1, 0.0)
    np.testing.assert_allclose(mean, xs.mean(axis=1), rtol=1e-7)
    np.testing.assert_allclose(invstd, 1 / xs.std(axis=1), rtol=2e-6)


def test_channel_by_channel_non_finite_channels():
    """A NaN in one channel, an Inf in another: those channels are NaN in
    training (as in the reference), the others untouched."""
    x, dy, w, b = _case((5, 16, 40), np.float32)
    x[2, 3, 7], x[0, 9, 0] = np.nan, np.inf
    got, ref = _ops(CPU, x, dy, w, b), _ops(REF, x, dy, w, b)
    for name in ("y", "mean", "invstd", "dx", "dw", "db"):
        assert_close(got[name], ref[name], np.float32, name, scale=3.0)
    assert np.isnan(got["y"][:, [3, 9]]).all() and np.isfinite(np.delete(got["y"], [3, 9], 1)).all()


# ------------------------------------------------- writes around the caches ---
def _at_offset(shape, dtype, offset):
    """A NaN-filled array of ``shape`` whose data start ``offset`` bytes past
    a cache line (an item a loop leaves unwritten stays NaN)."""
    dtype = np.dtype(dtype)
    raw = np.empty(int(np.prod(shape)) * dtype.itemsize + 128, np.uint8)
    start = -raw.ctypes.data % 64 + offset
    a = raw[start:start + int(np.prod(shape)) * dtype.itemsize].view(dtype).reshape(shape)
    a[...] = np.nan
    return a


def _writing_ops(x, dy, z, w, b, offset):
    """Every loop that writes an element-sized output, each into an ``out``
    array ``offset`` bytes past a cache line."""
    c = x.shape[1]
    out = lambda: _at_offset(x.shape, x.dtype, offset)  # noqa: E731
    rm, rv = np.full(c, 0.5, w.dtype), np.full(c, 2.0, w.dtype)
    y, mean, invstd = CPU.bn_forward_train_act(x, w, b, None, None, 0.1, 1e-5, z, True,
                                               out=out())
    r = dict(y_relu=y,
             y=CPU.bn_forward_train(x, w, b, None, None, 0.1, 1e-5, out=out())[0],
             y_eval=CPU.bn_forward_eval_act(x, w, b, rm, rv, 1e-5, z, False, out=out())[0],
             dx=CPU.bn_backward(dy, x, mean, invstd, w, True, out=out())[0],
             dx_eval=CPU.bn_backward(dy, x, mean, invstd, w, False, out=out())[0],
             dx_relu=CPU.bn_backward_relu(dy, x, mean, invstd, w, y, True, out=out())[0])
    x2, dy2 = x.reshape(x.shape[0], -1), dy.reshape(x.shape[0], -1)
    n = x2.shape[1]
    w2, b2 = np.linspace(0.5, 1.5, n).astype(w.dtype), np.linspace(-1, 1, n).astype(w.dtype)
    o2 = lambda: _at_offset(x2.shape, x.dtype, offset)  # noqa: E731
    r["ln_y"], mean, rstd = CPU.ln_forward(x2, w2, b2, 1e-5, out=o2())
    r["ln_dx"], r["ln_dw"], r["ln_db"] = CPU.ln_backward(dy2, x2, mean, rstd, w2, True, out=o2())
    r["ln_dx_only"] = CPU.ln_backward(dy2, x2, mean, rstd, w2, False, out=o2())[0]
    return r


# NCHW runs of 300 (blocked loops), tiles of 4 channels of 20 (by columns),
# tiles of 2 channels of 1030 (run by run, a run ending within a cache line),
# NC with grouped rows, short channels-last runs
@pytest.mark.parametrize("shape", [(3, 4, 300), (4, 64, 20), (2, 32, 1030), (300, 70, 1),
                                   (60, 24, 3)],
                         ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=lambda d: np.dtype(d).name)
def test_streamed_outputs_are_bitwise_those_of_plain_stores(monkeypatch, shape, dtype,
                                                          small_plan):
    """Non-temporal stores change where the bytes go, not the results: every
    loop writing an output, into arrays starting at each offset within a
    cache line that the item size allows (rows then begin and end at every
    position within a line), gives bitwise what plain stores give, and
    leaves no item unwritten."""
    x, dy, w, b = _case(shape, dtype)
    z = np.random.default_rng(5).standard_normal(shape).astype(dtype)
    offsets = range(0, 64, np.dtype(dtype).itemsize * (1 if shape == (3, 4, 300) else 3))
    for offset in offsets:
        results = []
        for threshold in (1 << 62, 0):      # plain stores, then every output streamed
            monkeypatch.setattr(cpu, "_STREAM_BYTES", threshold)
            results.append(_writing_ops(x, dy, z, w, b, offset))
        plain, streamed = results
        for name, e in plain.items():
            if e.dtype.kind == "f" and e.size == x.size:
                assert not np.isnan(e).any(), (name, offset)
            np.testing.assert_array_equal(streamed[name].view(np.uint8), e.view(np.uint8),
                                          err_msg=f"{name}, offset {offset}")


@pytest.mark.parametrize("itemsize", [2, 4, 8])
def test_the_streamed_span_is_the_whole_cache_lines_of_a_row(itemsize):
    """The items a row writes with non-temporal stores start at the row's
    first cache-line boundary and end at its last, for a row starting
    anywhere; none when streaming is off, or when the row's address is not a
    multiple of its item size."""
    dtype = {2: np.uint16, 4: np.float32, 8: np.float64}[itemsize]
    raw = np.zeros(4096, np.uint8)
    base = -raw.ctypes.data % 64
    for n in (0, 3, 40, 333):
        for offset in range(0, 64, itemsize):
            row = raw[base + offset:base + offset + n * itemsize].view(dtype)[None]
            lo, hi = cpu._stream_span(row, 0, 0, n, True)
            first = min(n, (-offset % 64) // itemsize)
            last = first + (n - first) * itemsize // 64 * 64 // itemsize
            assert (lo, hi) == (first, last), (n, offset)
            if hi > lo:
                assert (offset + lo * itemsize) % 64 == 0 and (hi - lo) * itemsize % 64 == 0
            assert cpu._stream_span(row, 0, 0, n, False) == (n, n)
        odd = raw[base + 1:base + 1 + 40 * itemsize].view(dtype)[None]
        assert cpu._stream_span(odd, 0, 0, 40, True) == (40, 40)
    # a part of a row of a 2-D array: the address of its first item counts
    rows = raw[base:base + 2 * 100 * itemsize].view(dtype).reshape(2, 100)
    for r, j0 in ((0, 0), (1, 0), (1, 3), (0, 17)):
        first = min(50, (-(r * 100 + j0) * itemsize % 64) // itemsize)
        lo, hi = cpu._stream_span(rows, r, j0, 50, True)
        assert lo == first and ((r * 100 + j0 + lo) * itemsize) % 64 == 0, (r, j0)
        assert hi == lo + (50 - lo) * itemsize // 64 * 64 // itemsize


def test_a_part_of_a_row_streams_the_whole_lines_of_the_span_within_it():
    """A loop over the items [i0, i1) of a row (one channel's run within a
    tile's row) streams exactly the lines of the row's span that lie wholly
    within [i0, i1), so each streamed vector starts on a line; nothing when
    the row is not streamed (span [n, n))."""
    part = numba.njit(lambda i0, i1, lo, hi, per: cpu._line_part(i0, i1, lo, hi, per))
    for per in (4, 16):
        for n in (0, 7, 3 * per + 5):
            for lo in {min(n, s) for s in range(per)} | {n}:
                hi = n if lo == n else lo + (n - lo) // per * per
                lines = [(a, a + per) for a in range(lo, hi, per)]
                for i0 in range(n + 1):
                    for i1 in range(i0, n + 1):
                        p0, p1 = part(i0, i1, lo, hi, per)
                        assert i0 <= p0 <= p1 <= i1, (per, n, lo, i0, i1)
                        inside = [(a, b) for a, b in lines if i0 <= a and b <= i1]
                        if inside:
                            assert (p0, p1) == (inside[0][0], inside[-1][1]), (per, n, lo, i0, i1)
                        else:
                            assert p0 == p1, (per, n, lo, i0, i1)


def _truncating_vector_stores() -> bool:
    """Whether the compiler's target has AVX-512BW (with VL): there LLVM
    folds the rounding of 32-bit lanes to 16 bits and their store into one
    truncating store (``vpmovdw`` to memory), which has no non-temporal form,
    and drops the store's non-temporal hint."""
    import llvmlite.binding as llvm
    features = llvm.get_host_cpu_features()
    return bool(features.get("avx512bw", False) and features.get("avx512vl", False))


@pytest.mark.skipif(cpu._X86 is False or sys.maxsize < 2**32,
                    reason="the machine-code check reads x86-64 mnemonics")
@pytest.mark.parametrize("dtype,packed", [
    (np.float32, "movntps"), (np.float64, "movntpd"),
    pytest.param(np.uint16, "movntdq", marks=pytest.mark.xfail(
        _truncating_vector_stores(), strict=True,
        reason="known: on AVX-512BW targets the float16 bits are written with truncating "
               "stores (vpmovdw), not streamed; large float16 outputs there pay a read "
               "of each line they write"))],
    ids=["float32", "float64", "float16-bits"])
def test_streamed_rows_compile_to_vector_non_temporal_stores(dtype, packed):
    """The streamed loops are vectorized: their machine code stores whole
    vectors non-temporally (a scalar loop of non-temporal stores writes at a
    fraction of the bandwidth).  Checked on the two streamed row
    functions, compiled afresh so their code can be read.  (float16 on
    AVX-512BW targets: a known exception, see the mark.)"""
    acc = np.float64 if dtype == np.float64 else np.float32
    afresh = numba.njit(fastmath=cpu._FLAGS)
    normalize, dx = afresh(cpu._normalize_streamed.py_func), afresh(cpu._dx_streamed.py_func)
    x = np.ones((2, 1000), dtype)
    c = np.ones(1000, acc)
    out = np.empty_like(x)
    normalize(out, 1, 0, 1000, 0, 1000, x, x[:0], False, c, c, c)
    dx(out, 1, 0, 1000, 0, 1000, x, x, c, c, c, c)
    for probe in (normalize, dx):
        asm = probe.inspect_asm(probe.signatures[0])
        assert re.search(rf"\bv?{packed}\s", asm), probe


def _calls_streamed_loops(fn, stream):
    """Whether the compiled code of the blocks loop ``fn`` (compiled afresh
    for a 6x64 float32 output and ``stream``, so its code can be read) calls
    a streamed row loop."""
    afresh = numba.njit(fastmath=cpu._FLAGS)(fn.py_func)
    x, c = np.ones((6, 64), np.float32), np.ones(64, np.float32)
    if fn is cpu._normalize_blocks:
        afresh(0, 1, x, x[:0], False, c, c, c, 1, False, 6, stream, np.empty_like(x))
    else:
        afresh(0, 1, x, x, c, c, c, c, 1, False, 6, stream, np.empty_like(x))
    ir = afresh.inspect_llvm(afresh.signatures[0])
    return any(name in ir for name in ("_normalize_columns_streamed", "_normalize_runs_streamed",
                                       "_dx_columns_streamed", "_dx_runs_streamed"))


@pytest.mark.parametrize("fn", ["_normalize_blocks", "_dx_blocks"])
def test_a_loop_for_an_output_not_streamed_leaves_the_streamed_loops_out(fn):
    """An output not streamed is ``stream=None`` (:func:`cpu._streamed`): the
    compiler drops the streamed branch of the row loops, so a process that
    writes no large output never compiles the streamed loops."""
    assert cpu._streamed(np.empty(16)) is None
    assert cpu._streamed(np.empty(cpu._STREAM_BYTES, np.uint8)) is True
    assert not _calls_streamed_loops(getattr(cpu, fn), None)


def test_the_streamed_loop_check_sees_them_called():
    """The check above finds the streamed loops where they are compiled in."""
    assert _calls_streamed_loops(cpu._normalize_blocks, True)


@pytest.mark.skipif(cpu._X86 is False or sys.maxsize < 2**32 or not _truncating_vector_stores(),
                    reason="an AVX-512BW target's machine code")
def test_float16_streamed_rows_fold_into_truncating_stores_on_avx512bw():
    """What the exception above is: the float16 streamed loop is vectorized
    (it is not a scalar loop) but stores with ``vpmovdw`` to memory and no
    non-temporal instruction."""
    afresh = numba.njit(fastmath=cpu._FLAGS)
    normalize = afresh(cpu._normalize_streamed.py_func)
    x, c = np.ones((2, 1000), np.uint16), np.ones(1000, np.float32)
    normalize(np.empty_like(x), 1, 0, 1000, 0, 1000, x, x[:0], False, c, c, c)
    asm = normalize.inspect_asm(normalize.signatures[0])
    assert re.search(r"\bvpmovdw\s+%[xyz]mm\d+, [^%]*\(", asm)
    assert not re.search(r"\bv?movnt", asm)


def _loop_reference_counts(fn, *args):
    """``(increments, loops)``: the reference-count increments the compiled
    code of ``fn`` (compiled afresh for ``args``, so its code can be read)
    makes inside its loops, and how many loops it has.  A loop is read off
    the compiled function's blocks, which the compiler lays out in order: a
    branch back to an earlier block closes one, and the blocks from there to
    the branch are its body.  A block on the way out of a raised exception
    (it writes the exception's record) runs once, not once a row, so its
    counts are not counted; the compiler may lay it out among a loop's."""
    afresh = numba.njit(fastmath=cpu._FLAGS)(fn)
    afresh(*args)
    ir = afresh.inspect_llvm(afresh.signatures[0])
    body = ir[ir.index("\ndefine "):]
    body = body[:body.index("\n}\n")]
    blocks = [[]]
    names = {}
    for line in body.splitlines()[2:]:
        label = re.match(r"^([\w.$-]+):", line)
        if label:
            names[label.group(1)] = len(blocks)
            blocks.append([])
        else:
            blocks[-1].append(line)
    inside, loops = set(), 0
    for j, lines in enumerate(blocks):
        for line in lines:
            if line.strip().startswith("br "):
                for target in re.findall(r"label %([\w.$-]+)", line):
                    i = names.get(target)
                    if i is not None and i <= j:
                        inside.update(range(i, j + 1))
                        loops += 1
    raising = {i for i, lines in enumerate(blocks) if "!numba_exception_output" in "".join(lines)}
    increments = sum("\n".join(blocks[i]).count("call void @NRT_incref(")
                     for i in inside - raising)
    return increments, loops


def _row_loop_args(dtype=np.float32):
    x = np.ones((6, 64), dtype)
    per_col, per_run = np.ones(64, np.float32), np.ones(4, np.float32)
    sums = np.zeros(4), np.zeros(4)
    per_row = np.ones(6, np.float32)
    stats = per_row.copy(), per_row.copy()      # layer norm's mean and rstd
    chunk = per_row.copy(), per_row.copy()      # ... and a chunk's row constants
    return {
        "_normalize_columns": (np.empty_like(x), 0, 6, 0, 64, x, x[:0], True, per_col, per_col,
                               per_col),
        "_normalize_runs": (np.empty_like(x), 0, 6, 0, 64, 16, x, x[:0], True, per_run,
                            per_run, per_run),
        "_dx_columns": (np.empty_like(x), 0, 6, 0, 64, x, x, per_col, per_col, per_col,
                        per_col),
        "_dx_runs": (np.empty_like(x), 0, 6, 0, 64, 16, x, x, per_run, per_run, per_run,
                     per_run),
        "_runs_sums": (x, x, 0, 6, 0, 64, 16, per_run, *sums),
        "_masked_runs_sums": (x, x, x, 0, 6, per_run, *sums, np.empty_like(x)),
        "_ln_dx_constants_rows": (x, x, 0, 6, *stats, per_col, *chunk),
        "_ln_dx_rows": (np.empty_like(x), 0, 6, x, x, *stats, per_col, *chunk, per_col.copy(),
                        per_col.copy()),
    }


@pytest.mark.parametrize("name", list(_row_loop_args()))
def test_the_row_loops_keep_no_reference_counts(name):
    """The loops over rows that are not streamed keep no reference counting
    in their loops: an increment and a decrement of each array a row reads
    are atomic operations, which kept in a loop cost more than a short row's
    values (the reason each row loop is a function of its own)."""
    increments, loops = _loop_reference_counts(getattr(cpu, name).py_func,
                                               *_row_loop_args()[name])
    assert loops > 0
    assert increments == 0


def test_the_reference_count_check_sees_counts_kept_in_a_row_loop():
    """The check above finds the counts in a row loop the compiler keeps
    them in: the plain and the streamed row, one inlined call each, in one
    loop."""
    plain, streamed = cpu._normalize_run, cpu._normalize_streamed

    def kept(out, r0, r1, n, stream, x, z, m, a, b0):
        for r in range(r0, r1):
            if stream:
                streamed(out, r, 0, n, 0, n, x, z, False, m, a, b0)
            else:
                plain(out, r, 0, 0, n, False, x, z, False, m, a, b0)

    x, c = np.ones((6, 64), np.float32), np.ones(64, np.float32)
    increments, loops = _loop_reference_counts(kept, np.empty_like(x), 0, 6, 64, False, x,
                                               x[:0], c, c, c)
    assert loops > 0
    assert increments > 0


@pytest.mark.parametrize("threshold", [1 << 62, 0], ids=["plain", "streamed"])
@pytest.mark.parametrize("shape", [(40, 8, 1), (4, 1, 40)], ids=["columns", "rows"])
def test_the_relu_maps_non_positive_values_to_plus_zero_and_keeps_nan(monkeypatch, threshold,
                                                                        shape):
    """The normalize loops' ReLU is branch-free (``max(v, 0) + 0``) so they
    vectorize: it still gives +0 for negative values, -0 and -Inf, keeps NaN
    and +Inf; without the ReLU, ``(x - 0) * 1 + 0`` is every value unchanged
    but -0, which the added bias makes +0."""
    monkeypatch.setattr(cpu, "_STREAM_BYTES", threshold)
    v = np.array([-1.5, -0.0, 0.0, np.nan, np.inf, -np.inf, 2.5, -1e-30], np.float32)
    x = np.resize(v, shape)
    c = shape[1]
    one, zero = np.ones(c, np.float32), np.zeros(c, np.float32)
    for relu in (True, False):
        y = CPU.bn_forward_eval_act(x, one, zero, zero, one, 0.0, np.zeros_like(x), relu)[0]
        expected = np.where(np.isnan(x) | (x > 0), x, np.float32(0)) if relu else x + 0
        np.testing.assert_array_equal(y, expected)
        zeros = ~np.isnan(x) & (expected == 0)
        assert not np.signbit(y[zeros]).any(), relu
