"""Tests of the benchmark suite's parts that need no GPU: bytes moved, peak
bandwidth from device attributes, timer plumbing, output checks, report
formats, suites, the textbook NumPy version, and a tiny CPU run end to end."""

import io
import os
import re
import sys
import time
from pathlib import Path

import numpy as np
import pytest

# bench/ is a top-level folder of the repository, not part of the package
_ROOT = str(Path(__file__).resolve().parents[1])
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

from bench import gpu, metrics, naive, report, runner, suites  # noqa: E402
from bench.__main__ import main  # noqa: E402
from bench.env import (describe_allocator, describe_memory, machine_info,  # noqa: E402
                       transparent_hugepages)
from bench.inputs import make_setup  # noqa: E402
from bench.providers import (GpubnProvider, NaiveProvider, Provider, TorchProvider,  # noqa: E402
                             cuda_event_timer)
from bench.suites import Case  # noqa: E402


# -- bytes moved ------------------------------------------------------------------

def test_bytes_moved_batch_norm_by_hand():
    # x (2, 3, 4, 5) float32: 120 elements of 4 bytes, C = 3 float32 vectors
    n, c = 120, 3
    assert metrics.bytes_moved("batch_norm", "fwd_train", (2, 3, 4, 5), 1, "float32") == 2 * n * 4 + 8 * c * 4
    assert metrics.bytes_moved("batch_norm", "fwd_infer", (2, 3, 4, 5), 1, "float32") == 2 * n * 4 + 4 * c * 4
    assert metrics.bytes_moved("batch_norm", "bwd", (2, 3, 4, 5), 1, "float32") == 3 * n * 4 + 5 * c * 4
    assert metrics.bytes_moved("batch_norm", "fwd_bwd", (2, 3, 4, 5), 1, "float32") == 5 * n * 4 + 13 * c * 4


def test_bytes_moved_uses_the_channel_axis_and_accumulation_dtype():
    # channels-last: C is the last dimension (5), not shape[1]
    assert metrics.bytes_moved("batch_norm", "fwd_train", (2, 3, 4, 5), -1, "float32") == 960 + 8 * 5 * 4
    # float16 elements are 2 bytes, per-channel vectors stay float32
    assert metrics.bytes_moved("batch_norm", "bwd", (2, 3, 4, 5), 1, "float16") == 3 * 120 * 2 + 5 * 3 * 4
    # float64 data accumulates (and stores vectors) in float64
    assert metrics.bytes_moved("batch_renorm", "fwd_infer", (2, 3, 4, 5), 1, "float64") == 2 * 120 * 8 + 4 * 3 * 8


def test_bytes_moved_layer_norm_by_hand():
    r, h = 6, 10  # 6 rows of 10 features
    assert metrics.bytes_moved("layer_norm", "fwd_train", (r, h), -1, "float32") == 2 * 60 * 4 + (2 * h + 2 * r) * 4
    assert metrics.bytes_moved("layer_norm", "bwd", (r, h), -1, "float32") == 3 * 60 * 4 + (2 * r + 3 * h) * 4
    fb = metrics.bytes_moved("layer_norm", "fwd_bwd", (r, h), -1, "float32")
    assert fb == (metrics.bytes_moved("layer_norm", "fwd_train", (r, h), -1, "float32")
                  + metrics.bytes_moved("layer_norm", "bwd", (r, h), -1, "float32"))


@pytest.mark.parametrize("kwargs, match", [
    (dict(kind="batch_norm", op="forward", shape=(2, 3), axis=1, dtype="float32"), "op must be"),
    (dict(kind="batch_norm", op="bwd", shape=(2, 3), axis=1, dtype="int8"), "dtype must be"),
    (dict(kind="group_norm", op="bwd", shape=(2, 3), axis=1, dtype="float32"), "kind must be"),
    (dict(kind="batch_norm", op="bwd", shape=(2, 0), axis=1, dtype="float32"), "positive"),
    (dict(kind="batch_norm", op="bwd", shape=(2, 3), axis=2, dtype="float32"), "axis 2 is out of range"),
])
def test_bytes_moved_rejects_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        metrics.bytes_moved(**kwargs)


def test_gbps():
    assert metrics.gbps(3_000_000_000, 1.5) == pytest.approx(2.0)
    assert metrics.gbps(100, 0.0) is None


# -- peak bandwidth ---------------------------------------------------------------

def test_peak_bandwidth_from_attributes():
    # H100 SXM: 2619 MHz HBM3, 5120-bit bus -> 2 * 2.619e9 * 640 B = 3.352 TB/s
    assert metrics.peak_bandwidth(2_619_000, 5120) == pytest.approx(3.35232e12)
    # A100 40GB: 1215 MHz, 5120 bits -> 1.555 TB/s
    assert metrics.peak_bandwidth(1_215_000, 5120) == pytest.approx(1.5552e12)
    # a GDDR6 card with a 256-bit bus at 7001 MHz -> 448 GB/s
    assert metrics.peak_bandwidth(7_001_000, 256) == pytest.approx(448.064e9)


@pytest.mark.parametrize("clock, width, match", [(0, 5120, "memory_clock_khz"), (2_619_000, 0, "bus_width_bits"),
                                                 (None, 5120, "memory_clock_khz")])
def test_peak_bandwidth_rejects_missing_attributes(clock, width, match):
    with pytest.raises(ValueError, match=match):
        metrics.peak_bandwidth(clock, width)


def test_describe_device_from_attribute_numbers():
    info = gpu.describe_device("NVIDIA H100 80GB HBM3", {16: 132, 36: 2_619_000, 37: 5120})
    assert info["sm_count"] == 132
    assert info["peak_gbps"] == pytest.approx(3352.32)
    # an attribute the driver did not report leaves the peak unknown, not wrong
    assert gpu.describe_device("x", {16: 10, 36: None, 37: 256})["peak_gbps"] is None


def test_peak_share_in_rows():
    p = _FakeProvider("gpubn-cuda", device="gpu")
    case = Case("batch_norm", (4, 8, 16, 16), "NCHW")
    nbytes = metrics.bytes_moved("batch_norm", "fwd_train", case.shape, 1, "float32")
    row = runner.make_row(case, "fwd_train", p, times=[2e-6, 1e-6, 3e-6], peak_bytes_per_s=2e12)
    assert row["median_s"] == 2e-6 and row["min_s"] == 1e-6 and row["max_s"] == 3e-6
    assert row["gbps"] == pytest.approx(nbytes / 2e-6 / 1e9)
    assert row["peak_gbps"] == pytest.approx(2000.0)
    assert row["peak_share"] == pytest.approx(row["gbps"] / 2000.0)


# -- GPU timer plumbing, with fakes ----------------------------------------------------

class _Result:
    def __init__(self, gpu_times):
        self.gpu_times = gpu_times


def test_times_from_benchmark_takes_the_first_device():
    res = _Result(np.array([[1e-3, 2e-3, 3e-3], [9.0, 9.0, 9.0]]))
    assert gpu.times_from_benchmark(res) == [1e-3, 2e-3, 3e-3]
    with pytest.raises(ValueError, match="gpu_times"):
        gpu.times_from_benchmark(_Result(np.zeros((1, 0))))


def test_cuda_event_timer_converts_milliseconds_and_counts_calls():
    clock = {"t": 0.0}
    calls = []

    class Event:
        def __init__(self, enable_timing):
            assert enable_timing
            self.t = None

        def record(self):
            self.t = clock["t"]

        def elapsed_time(self, end):      # milliseconds, as torch.cuda.Event
            return (end.t - self.t) * 1e3

    def fn():
        calls.append(1)
        clock["t"] += 0.25 * len(calls)   # each call takes longer

    times = cuda_event_timer(fn, repeats=3, warmup=2, event_cls=Event, synchronize=lambda: None)
    assert len(calls) == 5
    assert times == pytest.approx([0.75, 1.0, 1.25])


def test_gpu_providers_say_why_they_cannot_run_here():
    try:
        import cupy  # noqa: F401
        have_cupy = True
    except ImportError:
        have_cupy = False
    if not have_cupy:
        reason = gpu.GpubnCudaProvider().unavailable_reason()
        assert reason and "CuPy" in reason
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        assert "CUDA" in TorchProvider("gpu").unavailable_reason()


# -- summaries, checks and ratios -------------------------------------------------

def test_summarize():
    s = metrics.summarize([3.0, 1.0, 2.0, 10.0])
    assert s == {"median": 2.5, "min": 1.0, "max": 10.0, "repeats": 4}
    with pytest.raises(ValueError, match="empty"):
        metrics.summarize([])


def test_compare_names_the_output_that_differs():
    rng = np.random.default_rng(0)
    ref = tuple(rng.standard_normal((4, 5)) for _ in range(3))
    assert runner.compare(ref, ref, "bwd", "float32") == "ok"
    bad = (ref[0], ref[1] * 1.01, ref[2])
    msg = runner.compare(bad, ref, "bwd", "float32")
    assert msg.startswith("mismatch: dweight")
    assert "shape" in runner.compare((ref[0][:2],), (ref[0],), "fwd_train", "float32")
    assert "non-finite" in runner.compare((ref[0] * np.nan,), (ref[0],), "fwd_train", "float32")
    assert "expected 4 outputs" in runner.compare(ref, ref, "fwd_bwd", "float32")


def _row(provider, backend, median, op="fwd_bwd", shape=(2, 3, 4, 4), device="cpu", **kw):
    case = Case("batch_norm", shape, "NCHW")
    p = _FakeProvider(provider, device=device, backend=backend)
    return runner.make_row(case, op, p, times=[median], **kw)


def test_add_ratios_uses_the_torch_row_of_the_same_case():
    rows = [_row("torch-cpu", "torch", 2.0), _row("gpubn-numpy", "numpy", 1.0),
            _row("gpubn-numpy", "numpy", 5.0, shape=(2, 3, 8, 8)),    # no torch row for it
            _row("torch-cpu", "torch", 4.0, op="bwd"), _row("gpubn-numpy", "numpy", 6.0, op="bwd")]
    runner.add_ratios(rows)
    assert rows[0]["ratio_to_torch"] == 1.0
    assert rows[1]["ratio_to_torch"] == 0.5
    assert rows[2]["ratio_to_torch"] is None
    assert rows[4]["ratio_to_torch"] == 1.5
    summary = report.ratio_summary(rows)
    assert summary["gpubn-numpy"]["fwd_bwd"]["median"] == 0.5
    assert summary["gpubn-numpy"]["bwd"] == {"median": 1.5, "min": 1.5, "max": 1.5, "n": 1,
                                             "worst": "bn NCHW 2x3x4x4 float32"}


def test_summary_names_the_worst_case_and_the_floor_of_the_large_cases():
    """The printed summary: the median ratio to PyTorch per op with the case
    of the largest ratio, and the time over the copy-bandwidth floor
    (1 / peak_share) of the cases moving at least LARGE_BYTES only."""
    big, small = (32, 64, 56, 56), (2, 3, 4, 4)
    bw = 10e9
    rows = [_row("torch-cpu", "torch", 4.0, shape=big), _row("gpubn-cpu", "cpu", 1.0, shape=big),
            _row("torch-cpu", "torch", 1.0, shape=small),
            _row("gpubn-cpu", "cpu", 0.9, shape=small),
            _row("torch-cpu", "torch", 1.0, shape=(8, 3, 4, 4)),
            _row("gpubn-cpu", "cpu", 0.1, shape=(8, 3, 4, 4))]
    for r in rows:      # the shares as the runner computes them, from known bandwidths
        r["peak_share"] = r["bytes"] / r["median_s"] / bw
        r["loop_share"] = r["bytes"] / r["median_s"] / (bw / 2)
    runner.add_ratios(rows)
    s = report.ratio_summary(rows)["gpubn-cpu"]["fwd_bwd"]
    assert (s["median"], s["max"], s["worst"]) == (0.25, 0.9, "bn NCHW 2x3x4x4 float32")
    floor = report.floor_summary(rows)
    assert set(floor) == {"gpubn-cpu", "torch-cpu"}
    f = floor["gpubn-cpu"]["fwd_bwd"]
    assert f["n"] == 1 and f["worst"] == "bn NCHW 32x64x56x56 float32"
    assert f["median"] == pytest.approx(1.0 * bw / rows[1]["bytes"])
    # against a copy loop at half the bandwidth, the same case is half as far
    g = report.floor_summary(rows, share="loop_share")["gpubn-cpu"]["fwd_bwd"]
    assert g["median"] == pytest.approx(f["median"] / 2) and g["worst"] == f["worst"]
    text = report.format_summary(rows)
    assert "gpubn-cpu: fwd_bwd 0.25 [0.10-0.90, bn NCHW 2x3x4x4 float32]" in text
    copy, loop = text.index("over the copy-bandwidth floor"), text.index("a compiled copy loop")
    assert copy < loop
    assert text.index(f"gpubn-cpu: fwd_bwd {f['median']:.2f} [{f['max']:.2f}, bn NCHW 32x64x56x56",
                      copy) < loop
    assert text.index(f"gpubn-cpu: fwd_bwd {g['median']:.2f} [{g['max']:.2f}, bn NCHW 32x64x56x56",
                      loop) > loop


# -- the runner with fake providers (the structure the GPU path uses) --------------

class _FakeProvider(Provider):
    """Times itself with its own timer, as the GPU providers do."""

    def __init__(self, name, device="cpu", backend="numpy", peer=False, reason=None,
                 scale=1.0, fail=False):
        self.name, self.device, self.backend, self.peer = name, device, backend, peer
        self._reason, self._scale, self._fail = reason, scale, fail
        self.timed = 0

    def unavailable_reason(self):
        return self._reason

    def prepare(self, setup, op):
        if self._fail:
            raise RuntimeError("kernel launch failed\nsecond line")
        x = setup.x
        n = len(runner.OUTPUT_NAMES[op])
        return lambda: tuple(x * self._scale for _ in range(n))

    def timer(self, fn, repeats, warmup):
        self.timed += 1
        return [1e-3 * (i + 1) for i in range(repeats)]


def test_run_suite_reports_unavailable_errors_and_mismatches_without_stopping():
    cases = [(Case("batch_norm", (2, 3, 4, 4), "NCHW"), ("fwd_train", "bwd"))]
    peer = _FakeProvider("torch-fake", backend="torch", peer=True)
    good = _FakeProvider("good")
    wrong = _FakeProvider("wrong", scale=1.5)
    missing = _FakeProvider("missing", reason="library not installed")
    broken = _FakeProvider("broken", fail=True)
    stream = io.StringIO()
    rows = runner.run_suite(cases, [good, wrong, missing, broken, peer], repeats=3, warmup=0,
                            progress=runner.Progress(10, stream=stream))
    by = {(r["provider"], r["op"]): r for r in rows}
    assert len(rows) == 10
    assert by[("torch-fake", "bwd")]["check"] == "reference"
    assert by[("good", "bwd")]["check"] == "ok" and by[("good", "bwd")]["ratio_to_torch"] == 1.0
    assert by[("wrong", "fwd_train")]["check"].startswith("mismatch: y")
    assert by[("missing", "bwd")]["status"] == "unavailable"
    assert by[("missing", "bwd")]["reason"] == "library not installed"
    assert by[("broken", "bwd")]["status"] == "error"
    assert by[("broken", "bwd")]["reason"] == "RuntimeError: kernel launch failed"
    assert by[("good", "bwd")]["median_s"] == 2e-3 and by[("good", "bwd")]["repeats"] == 3
    assert missing.timed == 0 and good.timed == 2
    progress = stream.getvalue().splitlines()
    assert len(progress) == 10 and progress[-1].startswith("[  10/10]")
    with pytest.raises(ValueError, match="repeats"):
        runner.run_suite(cases, [good], repeats=0)


class _CountingProvider(Provider):
    """A CPU provider timed by the runner with the host clock."""

    def __init__(self, name, log, fail_at=None, peer=False):
        self.name, self.log, self.fail_at, self.peer = name, log, fail_at, peer
        self.backend = "torch" if peer else "numpy"

    def prepare(self, setup, op):
        x = setup.x
        n = len(runner.OUTPUT_NAMES[op])

        def fn():
            self.log.append(self.name)
            if self.fail_at is not None and self.log.count(self.name) == self.fail_at:
                raise MemoryError("out of memory")
            return tuple(x for _ in range(n))
        return fn


def test_cpu_providers_are_timed_in_one_block_each():
    log = []
    a, b = _CountingProvider("a", log, peer=True), _CountingProvider("b", log)
    c = _CountingProvider("c", log, fail_at=3)
    cases = [(Case("batch_norm", (2, 3, 4, 4), "NCHW"), ("fwd_train",))]
    rows = runner.run_suite(cases, [b, c, a], repeats=4, warmup=1,
                            progress=runner.Progress(3, enabled=False))
    # first the checked call of each (the peer first), then each provider's
    # 1 warm-up + 4 timed calls back to back; c fails on its third call
    assert log == ["a", "b", "c"] + ["a"] * 5 + ["b"] * 5 + ["c"] * 2
    by = {r["provider"]: r for r in rows}
    assert by["a"]["repeats"] == 4 and by["b"]["repeats"] == 4
    assert by["c"]["status"] == "error" and "out of memory" in by["c"]["reason"]
    assert by["b"]["check"] == "ok" and by["b"]["ratio_to_torch"] is not None


def test_bandwidth_floor_measured_next_to_each_providers_timings():
    """measure_peak runs right after each CPU provider's timings of a case
    and is the floor of its rows (peak_gbps, peak_share), not the run's."""
    log = []
    a, b = _CountingProvider("a", log, peer=True), _CountingProvider("b", log)
    measured = iter([10e9, 20e9, 30e9, 40e9])

    def measure():
        log.append("copy")
        peak = next(measured)
        return {"peak_bytes_per_s": peak, "loop_bytes_per_s": peak / 2}

    cases = [(Case("batch_norm", (2, 3, 4, 4), "NCHW"), ("fwd_train",)),
             (Case("batch_norm", (2, 3, 4, 5), "NCHW"), ("fwd_train",))]
    rows = runner.run_suite(cases, [b, a], repeats=2, warmup=0, peak_bytes_per_s=1e9,
                            measure_peak=measure, progress=runner.Progress(4, enabled=False))
    assert log == ["a", "b", "a", "a", "copy", "b", "b", "copy"] * 2
    assert [(r["provider"], r["peak_gbps"]) for r in rows] == [("a", 10.0), ("b", 20.0),
                                                                ("a", 30.0), ("b", 40.0)]
    assert all(r["peak_share"] == pytest.approx(r["gbps"] / r["peak_gbps"]) for r in rows)
    assert all(r["loop_gbps"] == r["peak_gbps"] / 2 for r in rows)
    assert all(r["loop_share"] == pytest.approx(r["gbps"] / r["loop_gbps"]) for r in rows)


def test_time_budget_cuts_repeats_of_slow_providers_only():
    assert runner._calls(0.001, repeats=10, warmup=1, budget=2.0) == (10, 1)
    assert runner._calls(0.5, repeats=10, warmup=1, budget=2.0) == (4, 0)   # 2 s / 0.5 s
    assert runner._calls(30.0, repeats=10, warmup=1, budget=2.0) == (runner.MIN_REPEATS, 0)
    assert runner._calls(30.0, repeats=10, warmup=1, budget=None) == (10, 1)
    log = []
    fast, slow = _CountingProvider("fast", log, peer=True), _CountingProvider("slow", log)
    cases = [(Case("batch_norm", (2, 3, 4, 4), "NCHW"), ("fwd_train",))]
    rows = runner.run_suite(cases, [fast, slow], repeats=10, warmup=1, budget=1e-12,
                            progress=runner.Progress(2, enabled=False))
    assert [r["repeats"] for r in rows] == [runner.MIN_REPEATS] * 2


class _ColdStartProvider(_CountingProvider):
    """A CPU provider whose first call is slow (code loaded or compiled)."""

    def prepare(self, setup, op):
        fn = super().prepare(setup, op)

        def first_slow():
            if not self.log:
                time.sleep(0.05)
            return fn()
        return first_slow


def test_budget_sizes_the_timed_calls_by_a_warm_call_not_a_cold_first_one():
    log = []
    p = _ColdStartProvider("cold", log, peer=True)
    cases = [(Case("batch_norm", (2, 3, 4, 4), "NCHW"), ("fwd_train",))]
    rows = runner.run_suite(cases, [p], repeats=10, warmup=1, budget=0.1,
                            progress=runner.Progress(1, enabled=False))
    # the 0.05 s first call alone would allow 2 calls in 0.1 s (cut to 3)
    assert rows[0]["repeats"] == 10
    assert log.count("cold") == 2 + 1 + 10       # checked + warm estimate, warm-up, timed


def test_isolated_timing_runs_each_provider_in_a_process_of_its_own_taking_turns():
    case = Case("batch_norm", (4, 3, 5, 5), "NCHW")
    plans = {"naive-numpy": [("fwd_train", 3, 1), ("bwd", 2, 0)],
             "gpubn-numpy": [("fwd_train", 7, 1)]}
    res = runner.time_interleaved(case, plans, rounds=3)
    pids = {name: r["pid"] for name, r in res.items()}
    assert None not in pids.values() and os.getpid() not in pids.values()
    assert len(set(pids.values())) == 2
    naive, ours = res["naive-numpy"], res["gpubn-numpy"]
    assert len(naive["times"]["fwd_train"]) == 3 and len(naive["times"]["bwd"]) == 2
    assert len(ours["times"]["fwd_train"]) == 7 and "bwd" not in ours["times"]
    assert all(t > 0 for r in res.values() for ts in r["times"].values() for t in ts)
    # fwd_train: 3 rounds each (1 + 1 + 1 calls and 3 + 3 + 1), in turns
    turns = sorted((span, name) for name, r in res.items() for span in r["spans"]["fwd_train"])
    assert [name for _, name in turns] == ["naive-numpy", "gpubn-numpy"] * 3
    assert all(a[0][1] <= b[0][0] for a, b in zip(turns, turns[1:]))   # never at once
    assert len(naive["spans"]["bwd"]) == 2                              # 2 calls: 2 rounds


def test_timed_calls_are_spread_over_the_rounds():
    assert runner._round_calls(7, 3) == [3, 3, 1]
    assert runner._round_calls(3, 5) == [1, 1, 1]
    assert runner._round_calls(20, 5) == [4] * 5
    assert runner._round_calls(1, 5) == [1]


def test_isolated_timing_reports_a_provider_that_cannot_start_or_dies():
    case = Case("batch_norm", (4, 3, 5, 5), "NCHW")
    res = runner.time_interleaved(case, {"no-such-provider": [("fwd_train", 3, 1)]})
    assert isinstance(res["no-such-provider"]["times"]["fwd_train"], RuntimeError)
    assert "no-such-provider" in str(res["no-such-provider"]["times"]["fwd_train"])
    worker = runner.Worker(case, "naive-numpy")
    try:
        assert worker.error is None
        assert len(worker.time("fwd_train", 2, 0)["times"]) == 2
        os.kill(worker.pid, 9)
        worker._proc.wait()
        reply = worker.time("fwd_train", 2, 0)
        assert "worker process failed" in reply["error"]
    finally:
        worker.close()


def test_run_suite_isolated_checks_here_and_times_in_workers():
    cases = [(Case("batch_norm", (4, 3, 5, 5), "NCHW"), ("fwd_train", "fwd_bwd"))]
    peer, numpy_backend = NaiveProvider(), GpubnProvider("numpy")
    peer.peer = True          # the textbook version stands in for PyTorch here
    peer.backend = "torch"
    rows = runner.run_suite(cases, [numpy_backend, peer], repeats=2, warmup=0, isolate=True,
                            progress=runner.Progress(4, enabled=False))
    assert [(r["provider"], r["op"]) for r in rows] == [
        ("naive-numpy", "fwd_train"), ("gpubn-numpy", "fwd_train"),
        ("naive-numpy", "fwd_bwd"), ("gpubn-numpy", "fwd_bwd")]
    for r in rows:
        assert r["status"] == "ok" and r["isolated"] and r["repeats"] == 2
    assert rows[1]["check"] == "ok" and rows[3]["check"] == "ok"
    assert rows[1]["ratio_to_torch"] is not None


# -- report formats -------------------------------------------------------------------

def test_jsonl_round_trip_keeps_machine_and_fields(tmp_path):
    rows = [_row("torch-cpu", "torch", 2e-3), _row("gpubn-numpy", "numpy", 1e-3)]
    runner.add_ratios(rows)
    path = tmp_path / "sub" / "r.jsonl"
    machine = {"cpu": "test cpu", "numpy": np.__version__}
    assert report.write_jsonl(rows, str(path), machine, timestamp="T0") == 2
    assert report.write_jsonl(rows[:1], str(path), machine, timestamp="T1") == 1   # appends
    back = report.read_jsonl(str(path))
    assert [r["timestamp"] for r in back] == ["T0", "T0", "T1"]
    assert back[1]["machine"] == machine
    for key in ("provider", "backend", "shape", "dtype", "op", "median_s", "min_s", "max_s",
                "gbps", "ratio_to_torch", "bytes", "layout"):
        assert key in back[1]
    assert back[1]["ratio_to_torch"] == 0.5 and back[1]["shape"] == [2, 3, 4, 4]
    path.write_text("{not json}\n")
    with pytest.raises(ValueError, match="r.jsonl:1"):
        report.read_jsonl(str(path))


def test_machine_info_records_the_allocator_settings(monkeypatch):
    """Fresh outputs' page faults depend on how the C allocator gives freed
    memory back: the settings that change it are recorded and printed."""
    for k in [k for k in os.environ if k.startswith("MALLOC_")] + ["GLIBC_TUNABLES",
                                                                   "LD_PRELOAD"]:
        monkeypatch.delenv(k, raising=False)
    assert machine_info()["allocator_env"] == {}
    assert describe_allocator({}) == "the C library's defaults"
    monkeypatch.setenv("MALLOC_TRIM_THRESHOLD_", "2000000000")
    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", "1000000000")
    monkeypatch.setenv("MALLOCATE", "unrelated")
    env = machine_info()["allocator_env"]
    assert env == {"MALLOC_MMAP_THRESHOLD_": "1000000000",
                   "MALLOC_TRIM_THRESHOLD_": "2000000000"}
    assert describe_allocator(env) == ("MALLOC_MMAP_THRESHOLD_=1000000000, "
                                       "MALLOC_TRIM_THRESHOLD_=2000000000")
    assert describe_memory({"allocator_env": env, "transparent_hugepages": "madvise"}) == (
        "allocator: MALLOC_MMAP_THRESHOLD_=1000000000, MALLOC_TRIM_THRESHOLD_=2000000000; "
        "transparent huge pages: madvise")


def test_transparent_huge_page_mode_is_the_bracketed_one(tmp_path):
    f = tmp_path / "enabled"
    f.write_text("always [madvise] never\n")
    assert transparent_hugepages(str(f)) == "madvise"
    f.write_text("[always] madvise never\n")
    assert transparent_hugepages(str(f)) == "always"
    f.write_text("garbled\n")
    assert transparent_hugepages(str(f)) is None
    assert transparent_hugepages(str(tmp_path / "missing")) is None


def test_format_ratio():
    assert report.format_ratio(0.5) == "0.50x"
    assert report.format_ratio(12.345) == "12.35x"
    assert report.format_ratio(0.0123) == "0.012x"


def test_replay_prints_tables_from_a_results_file(tmp_path, capsys):
    rows = [_row("torch-cpu", "torch", 2e-3), _row("gpubn-numpy", "numpy", 1e-3)]
    runner.add_ratios(rows)
    for r in rows:
        r["section"] = "cpu"
    path = tmp_path / "r.jsonl"
    report.write_jsonl(rows, str(path), {"cpu": "test cpu", "cpu_count": 2})
    assert main(["--from", str(path), "--markdown", "--no-chart"]) == 0
    out = capsys.readouterr().out
    assert "test cpu" in out and "| bn fwd_bwd | NCHW | 2x3x4x4 |" in out and "0.50x" in out


def test_cells_give_the_spread_in_the_median_unit():
    p = _FakeProvider("x")
    case = Case("batch_norm", (2, 3, 4, 4), "NCHW")
    assert report.format_cell(runner.make_row(case, "bwd", p, times=[1.5, 1.2, 1.9]), False, False) \
        == "1.5 s [1.2-1.9]"
    assert report.format_cell(runner.make_row(case, "bwd", p, times=[2e-3, 1e-3, 4e-3]), False, False) \
        == "2 ms [1-4]"
    assert report.format_cell(runner.make_row(case, "bwd", p, times=[5e-5, 4e-5, 6e-5]), False, False) \
        == "50 us [40-60]"
    assert report.format_cell(runner.make_row(case, "bwd", p, times=[0.44, 0.43, 1.18]), False, False) \
        == "440 ms [430-1180]"


def test_format_time_units():
    assert report.format_time(2.5) == "2.5 s"
    assert report.format_time(0.0123) == "12.3 ms"
    assert report.format_time(4.56e-5) == "45.6 us"
    assert report.format_time(None) == "-"


def test_format_table_text_and_markdown():
    rows = [_row("torch-cpu", "torch", 2e-3), _row("gpubn-numpy", "numpy", 1e-3)]
    case = Case("batch_norm", (2, 3, 4, 4), "NCHW")
    rows.append(runner.make_row(case, "fwd_bwd", NaiveProvider(), status="unavailable", reason="x"))
    runner.add_ratios(rows)
    text = report.format_table(rows)
    lines = text.splitlines()
    assert lines[0].split() == ["op", "layout", "shape", "dtype", "torch-cpu", "gpubn-numpy", "naive-numpy"]
    assert "bn fwd_bwd" in lines[2] and "2x3x4x4" in lines[2]
    assert "1 ms" in lines[2] and "0.50x" in lines[2] and "unavailable" in lines[2]
    md = report.format_table(rows, markdown=True).splitlines()
    assert md[0].startswith("| op | layout") and md[1].startswith("|---|")
    assert md[2].count("|") == 8


def test_format_table_shows_bandwidth_on_gpu():
    rows = [_row("gpubn-cuda", "cuda", 1e-5, device="gpu", peak_bytes_per_s=1e12)]
    text = report.format_table(rows)
    nbytes = rows[0]["bytes"]
    assert f"{nbytes / 1e-5 / 1e9:.0f} GB/s" in text
    assert f"({100 * nbytes / 1e-5 / 1e12:.0f}%)" in text


def test_plot_writes_a_png(tmp_path):
    pytest.importorskip("matplotlib")
    rows = [_row("torch-cpu", "torch", 2e-3), _row("gpubn-numpy", "numpy", 1e-3)]
    runner.add_ratios(rows)
    path = report.plot(rows, str(tmp_path / "c.png"))
    assert path and open(path, "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    assert report.plot([], str(tmp_path / "d.png")) is None


# -- suites ------------------------------------------------------------------------------

def test_quick_suite_covers_every_family_layout_and_op():
    cases = suites.get_suite("quick")
    assert {c.kind for c, _ in cases} == set(suites.KINDS)
    assert {c.layout for c, _ in cases} == set(suites.LAYOUTS)
    assert {op for _, ops in cases for op in ops} == set(suites.OPS)
    assert max(c.numel for c, _ in cases) <= 20_000


def test_resnet50_suite_has_every_layer_in_both_layouts_and_batches():
    cases = [c for c, _ in suites.get_suite("resnet50")]
    assert len(cases) == 2 * 2 * len(suites.RESNET50_BN_LAYERS)
    assert {c.shape[0] for c in cases} == {32, 256}
    nhwc = [c for c in cases if c.layout == "NHWC"]
    assert all(c.channels == c.shape[3] and c.axis == -1 for c in nhwc)
    assert Case("batch_norm", (256, 2048, 7, 7), "NCHW") in cases


def test_small_suite_stays_within_a_megabyte_in_every_layout():
    cases = [c for c, _ in suites.get_suite("small")]
    assert {c.layout for c in cases} == set(suites.LAYOUTS)
    assert max(c.numel for c in cases) * 4 <= 1 << 20
    assert min(c.numel for c in cases) * 4 <= 4096
    nhwc = [c for c in cases if c.layout == "NHWC"]
    assert nhwc and all(c.axis == -1 and c.channels == c.shape[3] for c in nhwc)


def test_default_suite_has_the_issue_families():
    cases = [c for c, _ in suites.get_suite("default")]
    assert any(c.layout == "NCHW" and c.shape[0] == 32 for c in cases)
    assert any(c.layout == "NHWC" and c.shape[0] == 32 for c in cases)
    assert Case("batch_norm", (256, 512, 7, 7), "NCHW") in cases
    assert any(c.layout == "NC" for c in cases)
    assert {c.shape[-1] for c in cases if c.kind == "layer_norm"} == {768, 4096}


def test_get_suite_filters_and_validates():
    cases = suites.get_suite("quick", dtypes=("float32", "float64"), kinds=["layer_norm"], ops=["bwd"])
    assert [(c.dtype, ops) for c, ops in cases] == [("float32", ("bwd",)), ("float64", ("bwd",))]
    with pytest.raises(ValueError, match="suite must be one of"):
        suites.get_suite("huge")
    with pytest.raises(ValueError, match="dtype must be"):
        suites.get_suite("quick", dtypes=("int8",))
    with pytest.raises(ValueError, match="ops must be among"):
        suites.get_suite("quick", ops=["forward"])


@pytest.mark.parametrize("args, match", [
    (("batch_norm", (2, 3, 4), "NCHW"), "needs 4"),
    (("layer_norm", (2, 3, 4, 5), "NCHW"), "layer_norm cases use layout 'rows'"),
    (("batch_norm", (2, 3), "rows"), "layout 'rows' is for layer_norm"),
    (("batch_norm", (2, 0, 4, 4), "NCHW"), "positive ints"),
    (("batch_norm", (2, 3), "NLC"), "layout must be"),
])
def test_case_validation(args, match):
    with pytest.raises(ValueError, match=match):
        Case(*args)


# -- the textbook version is right (it is only a reference if it is) ------------------------

def _torch_bn_grads(x, w, b, dy, axis):
    torch = pytest.importorskip("torch")
    xt = torch.from_numpy(np.moveaxis(x, axis, 1).copy()).requires_grad_(True)
    wt = torch.from_numpy(w.copy()).requires_grad_(True)
    bt = torch.from_numpy(b.copy()).requires_grad_(True)
    y = torch.nn.functional.batch_norm(xt, None, None, wt, bt, training=True, eps=1e-5)
    g = torch.autograd.grad(y, (xt, wt, bt), torch.from_numpy(np.moveaxis(dy, axis, 1).copy()))
    return (np.moveaxis(y.detach().numpy(), 1, axis), np.moveaxis(g[0].numpy(), 1, axis),
            g[1].numpy(), g[2].numpy())


@pytest.mark.parametrize("shape, axis", [((4, 3, 5, 2), 1), ((4, 5, 2, 3), -1), ((7, 6), 1)])
def test_naive_batch_norm_matches_torch_in_float64(shape, axis):
    rng = np.random.default_rng(1)
    x = rng.standard_normal(shape) * 3 + 1
    dy = rng.standard_normal(shape)
    c = shape[axis]
    w, b = rng.standard_normal(c), rng.standard_normal(c)
    rm, rv = np.zeros(c), np.ones(c)
    y, cache = naive.batch_norm_forward_train(x, w, b, rm, rv, 0.1, 1e-5, axis)
    dx, dw, db = naive.batch_norm_backward(dy, cache)
    ty, tdx, tdw, tdb = _torch_bn_grads(x, w, b, dy, axis)
    for a, e in [(y, ty), (dx, tdx), (dw, tdw), (db, tdb)]:
        np.testing.assert_allclose(a, e, rtol=1e-10, atol=1e-10)
    m = x.size // c
    batch_var = np.var(np.moveaxis(x, axis, 0).reshape(c, -1), axis=1)
    np.testing.assert_allclose(rv, 0.9 + 0.1 * batch_var * m / (m - 1), rtol=1e-12)


def test_naive_layer_norm_matches_torch_in_float64():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(2)
    x, dy = rng.standard_normal((5, 12)) + 2, rng.standard_normal((5, 12))
    w, b = rng.standard_normal(12), rng.standard_normal(12)
    y, cache = naive.layer_norm_forward(x, w, b, 1e-5)
    dx, dw, db = naive.layer_norm_backward(dy, cache)
    xt, wt, bt = (torch.from_numpy(a.copy()).requires_grad_(True) for a in (x, w, b))
    yt = torch.nn.functional.layer_norm(xt, (12,), wt, bt, 1e-5)
    g = torch.autograd.grad(yt, (xt, wt, bt), torch.from_numpy(dy))
    for a, e in [(y, yt.detach().numpy()), (dx, g[0].numpy()), (dw, g[1].numpy()), (db, g[2].numpy())]:
        np.testing.assert_allclose(a, e, rtol=1e-10, atol=1e-10)


def test_naive_batch_renorm_gradients_by_finite_differences():
    # r and d held constant: the loss below freezes them at the base point
    rng = np.random.default_rng(3)
    shape, c = (6, 3, 2, 2), 3
    x, dy = rng.standard_normal(shape) * 2 + 1, rng.standard_normal(shape)
    w, b = rng.standard_normal(c), rng.standard_normal(c)
    rm, rs = np.full(c, 0.5), np.full(c, 1.5)
    y, cache = naive.batch_renorm_forward_train(x, w, b, rm.copy(), rs.copy(), 3.0, 5.0, 0.01, 1e-5, 1)
    r, d = cache["r"], cache["d"]
    assert not np.allclose(r, 1.0) and not np.allclose(d, 0.0)   # the case exercises r and d
    dx, dw, db = naive.batch_renorm_backward(dy, cache)

    def loss(xv):
        mu = xv.mean(axis=(0, 2, 3), keepdims=True)
        std = np.sqrt(((xv - mu) ** 2).mean(axis=(0, 2, 3), keepdims=True) + 1e-5)
        yv = ((xv - mu) / std * r + d) * w.reshape(1, c, 1, 1) + b.reshape(1, c, 1, 1)
        return float(np.sum(yv * dy))

    num = np.zeros_like(x)
    h = 1e-6
    for idx in np.ndindex(*shape):
        xp, xm = x.copy(), x.copy()
        xp[idx] += h
        xm[idx] -= h
        num[idx] = (loss(xp) - loss(xm)) / (2 * h)
    np.testing.assert_allclose(dx, num, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(db, dy.sum(axis=(0, 2, 3)), rtol=1e-12)
    np.testing.assert_allclose(dw, (dy * cache["xhat"]).sum(axis=(0, 2, 3)), rtol=1e-12)


def test_setup_is_shared_and_state_copies_are_independent():
    case = Case("batch_norm", (2, 3, 4, 4), "NCHW")
    a, b = make_setup(case), make_setup(case)
    np.testing.assert_array_equal(a.x, b.x)
    s1, s2 = a.state(), a.state()
    s1["running_mean"] += 1
    np.testing.assert_array_equal(s2["running_mean"], a.running_mean)
    assert a.x.dtype == np.float32 and a.weight.dtype == np.float32
    assert make_setup(case.with_dtype("float64")).weight.dtype == np.float64


def test_out_provider_writes_y_and_dx_into_the_same_arrays():
    """gpubn-<backend>-out passes arrays allocated once in prepare as out=:
    every call returns those same arrays, holding what a new result holds;
    batch renorm has no out=."""
    setup = make_setup(Case("batch_norm", (4, 16, 4, 5), "NCHW"))
    plain, into = GpubnProvider("numpy"), GpubnProvider("numpy", out=True)
    assert into.name == "gpubn-numpy-out" and plain.name == "gpubn-numpy"
    run = into.prepare(setup, "fwd_bwd")
    first, second = run(), run()
    assert first[0] is second[0] and first[1] is second[1]
    for name, a, e in zip(("y", "dx", "dweight", "dbias"), second,
                          plain.prepare(setup, "fwd_bwd")()):
        np.testing.assert_array_equal(a, e, err_msg=name)
    ln = make_setup(Case("layer_norm", (4, 8), "rows"))
    run = into.prepare(ln, "fwd_bwd")
    first, second = run(), run()
    assert first[0] is second[0] and first[1] is second[1]
    for name, a, e in zip(("y", "dx", "dweight", "dbias"), second, plain.prepare(ln, "fwd_bwd")()):
        np.testing.assert_array_equal(a, e, err_msg=name)
    renorm = Case("batch_renorm", (2, 3, 4, 4), "NCHW")
    assert "renorm" in into.supports(renorm, "fwd_bwd") and plain.supports(renorm, "fwd_bwd") is None


# -- end to end ----------------------------------------------------------------------------

@pytest.mark.slow   # worker processes time every case: about a minute and a half
def test_quick_cpu_run_end_to_end(tmp_path, capsys):
    out = tmp_path / "quick.jsonl"
    rc = main(["cpu", "--quick", "--repeats", "1", "--warmup", "0", "--out", str(out),
               "--no-chart", "--quiet"])
    assert rc == 0
    stdout = capsys.readouterr().out
    assert "## CPU" in stdout and "gpubn-numpy" in stdout and "naive-numpy" in stdout
    assert "gpubn-cpu" in stdout and "# host copy bandwidth" in stdout
    rows = report.read_jsonl(str(out))
    quick = suites.get_suite("quick")
    # five providers (gpubn-cpu-out's rows for batch renorm say why not)
    assert len(rows) == sum(len(ops) for _, ops in quick) * 5
    assert all(r["machine"]["numpy"] == np.__version__ for r in rows)
    by = {(r["provider"], r["kind"], r["layout"], r["op"]): r for r in rows}
    for layout in ("NCHW", "NHWC", "NC"):
        for op in suites.OPS:
            naive_row = by[("naive-numpy", "batch_norm", layout, op)]
            assert naive_row["status"] == "ok" and naive_row["median_s"] > 0
            gp = by[("gpubn-numpy", "batch_norm", layout, op)]
            assert gp["status"] == "ok", gp["reason"]
            if by[("torch-cpu", "batch_norm", layout, op)]["status"] == "ok":
                # same inputs, outputs compared with PyTorch's, ratio from the same run
                assert gp["check"] == "ok" and naive_row["check"] == "ok"
                assert gp["ratio_to_torch"] == pytest.approx(
                    gp["median_s"] / by[("torch-cpu", "batch_norm", layout, op)]["median_s"])
    for r in rows:
        assert r["status"] in ("ok", "unavailable"), r
        if r["status"] == "ok":
            assert r["gbps"] == pytest.approx(r["bytes"] / r["median_s"] / 1e9)
            assert not r["check"].startswith("mismatch"), r


@pytest.mark.slow   # the CLI with worker processes
def test_without_pytorch_gpubn_becomes_the_reference(tmp_path, monkeypatch):
    monkeypatch.setattr(TorchProvider, "unavailable_reason", lambda self: "PyTorch is not installed")
    out = tmp_path / "nt.jsonl"
    assert main(["cpu", "--quick", "--kind", "batch_norm", "--op", "fwd_bwd", "--repeats", "1",
                 "--out", str(out), "--no-chart", "--quiet"]) == 0
    rows = report.read_jsonl(str(out))
    by = {(r["provider"], r["layout"]): r for r in rows}
    assert by[("torch-cpu", "NCHW")]["status"] == "unavailable"
    assert by[("gpubn-numpy", "NCHW")]["check"] == "reference"
    assert by[("naive-numpy", "NCHW")]["check"] == "ok"
    assert all(r["ratio_to_torch"] is None for r in rows)


def test_gpu_section_without_a_device_says_why(tmp_path, capsys):
    if gpu.gpu_unavailable_reason() is None:
        pytest.skip("a CUDA device is present")
    out = tmp_path / "g.jsonl"
    rc = main(["gpu", "--quick", "--out", str(out), "--quiet"])
    assert rc == 0
    text = capsys.readouterr().out
    assert "GPU: unavailable:" in text
    assert re.search(r"^# date: \d{4}-\d\d-\d\d \d\d:\d\d", text, flags=re.M)   # for RESULTS.md
    # nothing ran, so nothing was written, and the output does not claim otherwise
    assert not out.exists()
    assert "appended" not in text and "no results: nothing was written" in text


def test_cli_rejects_unknown_section(capsys):
    assert main(["tpu"]) == 2
    assert "unknown section" in capsys.readouterr().err


# -- emu traffic accounting, with records shaped like gpubn.emu's -----------------------

def test_summarize_records_counts_passes_and_tensor_buffers():
    from bench import traffic
    numel, itemsize = 1000, 4
    xb = numel * itemsize
    # a stats kernel reading x and writing a 64-byte workspace, then a normalize
    # kernel reading x and the workspace and writing y
    records = [
        {"kernel": "stats<float>", "bytes_loaded": xb, "bytes_stored": 64,
         "buffers": {0: {"bytes_loaded": xb, "bytes_stored": 0, "nbytes": xb},
                     1: {"bytes_loaded": 0, "bytes_stored": 64, "nbytes": 64}}},
        {"kernel": "normalize<float>", "bytes_loaded": xb + 64, "bytes_stored": xb,
         "buffers": {0: (xb, 0, xb), 1: (64, 0, 64), 2: (0, xb, xb)}},
    ]
    s = traffic.summarize_records(records, numel, itemsize)
    assert s["launches"] == 2 and s["kernels"] == ["stats<float>", "normalize<float>"]
    assert s["bytes_loaded"] == 2 * xb + 64 and s["bytes_stored"] == xb + 64
    assert s["passes"] == pytest.approx((3 * xb + 128) / xb)
    assert s["bytes_per_element"] == pytest.approx((3 * xb + 128) / numel)
    assert s["tensor_passes"] == pytest.approx(3.0)
    # records without per-buffer sizes: tensor passes unknown, not guessed
    plain = [{"kernel": "k", "bytes_loaded": xb, "bytes_stored": xb}]
    assert traffic.summarize_records(plain, numel, itemsize)["tensor_passes"] is None


def test_traffic_rows_carry_the_ideal_and_pytorch_style_passes():
    from bench import traffic
    assert traffic.IDEAL_PASSES["fwd_train"] == 2 and traffic.IDEAL_PASSES["bwd"] == 3
    assert traffic.PYTORCH_PASSES["fwd_train"] == 3 and traffic.PYTORCH_PASSES["bwd"] == 5
    layouts = {c.layout for c, _ in traffic.traffic_cases()}
    assert {"NCHW", "NHWC"} <= layouts
    rows = traffic.run_traffic([(Case("batch_norm", (2, 3, 4, 4), "NCHW"), ("fwd_train", "bwd"))])
    assert rows[0]["ideal_passes"] == 2 and rows[0]["pytorch_passes"] == 3
    text = report.format_traffic_table(rows)
    assert "bn fwd_train" in text and "2x3x4x4" in text
    reason = traffic.emu_unavailable_reason()
    if reason is not None:
        assert rows[0]["status"] == "unavailable" and reason in rows[0]["reason"]
        return
    # the real kernels on emu: records carry buffer sizes, so the passes over
    # x, y, dy and dx are exact (the kernels' budget: forward 2 and backward 3,
    # one launch each, when the tensor fits on chip, as this one does)
    fwd, bwd = rows
    assert fwd["status"] == "ok" and bwd["status"] == "ok", (fwd["reason"], bwd["reason"])
    assert fwd["launches"] == 1 and fwd["tensor_passes"] == pytest.approx(2.0)
    assert bwd["launches"] == 1 and bwd["tensor_passes"] == pytest.approx(3.0)
    assert fwd["passes"] > fwd["tensor_passes"]      # plus per-channel vectors and workspace


# -- the GPU path against stand-ins for CuPy (no device needed) -------------------------

def _fake_cupy(monkeypatch, attrs):
    import sys
    import types

    runtime = types.SimpleNamespace(
        getDeviceCount=lambda: 1,
        getDeviceProperties=lambda dev: {"name": b"Fake GPU", "totalGlobalMem": 1 << 30},
        deviceGetAttribute=lambda attr, dev: attrs[attr],
        runtimeGetVersion=lambda: 13000,
        driverGetVersion=lambda: 13000,
    )
    cupy = types.ModuleType("cupy")
    cupy.cuda = types.SimpleNamespace(runtime=runtime)
    cupy.asarray = np.asarray
    cupy.asnumpy = np.asarray
    cupy.__version__ = "0-fake"
    calls = {}

    def benchmark(fn, n_repeat, n_warmup):
        calls["args"] = (n_repeat, n_warmup)
        for _ in range(n_warmup + n_repeat):
            fn()
        return _Result(np.full((1, n_repeat), 2e-6))

    profiler = types.ModuleType("cupyx.profiler")
    profiler.benchmark = benchmark
    cupyx = types.ModuleType("cupyx")
    cupyx.profiler = profiler
    monkeypatch.setitem(sys.modules, "cupy", cupy)
    monkeypatch.setitem(sys.modules, "cupyx", cupyx)
    monkeypatch.setitem(sys.modules, "cupyx.profiler", profiler)
    return calls


def test_device_info_and_cupy_timer_with_a_stand_in(monkeypatch):
    calls = _fake_cupy(monkeypatch, {16: 132, 36: 2_619_000, 37: 5120})
    assert gpu.gpu_unavailable_reason() is None
    info = gpu.device_info(0)
    assert info["name"] == "Fake GPU" and info["sm_count"] == 132
    assert info["peak_gbps"] == pytest.approx(3352.32)
    assert gpu.cupy_timer(lambda: None, repeats=4, warmup=0) == [2e-6] * 4
    assert calls["args"] == (4, 1)      # at least one warm-up call


def test_gpu_rows_through_the_runner_with_a_stand_in(monkeypatch):
    # gpubn's cuda provider, pointed at the numpy backend and a fake CuPy:
    # prepare, check against the peer, CUDA-event timer, GB/s and share of peak
    _fake_cupy(monkeypatch, {16: 132, 36: 2_619_000, 37: 5120})
    prov = gpu.GpubnCudaProvider()
    monkeypatch.setattr(prov, "backend", "numpy")
    monkeypatch.setattr(prov, "unavailable_reason", lambda: None)
    peer = NaiveProvider()
    peer.peer = True
    cases = [(Case("batch_norm", (4, 8, 6, 6), "NCHW"), ("fwd_train", "fwd_bwd"))]
    rows = runner.run_suite(cases, [prov, peer], repeats=3, warmup=0, peak_bytes_per_s=3.35232e12,
                            progress=runner.Progress(4, enabled=False))
    mine = [r for r in rows if r["provider"] == "gpubn-cuda"]
    assert [r["status"] for r in mine] == ["ok", "ok"], mine
    for r in mine:
        assert r["device"] == "gpu" and r["check"] == "ok" and r["median_s"] == 2e-6
        assert r["peak_share"] == pytest.approx(r["bytes"] / 2e-6 / 3.35232e12)
    assert "GB/s" in report.format_table(rows)


# -- host yardsticks (bench/host.py) -----------------------------------------------

class _Clock:
    """A fake ``time.perf_counter``: each call advances by ``step`` seconds."""

    def __init__(self, step):
        self.t, self.step = 0.0, step

    def __call__(self):
        self.t += self.step
        return self.t


def test_copy_bandwidth_counts_the_read_and_the_write(monkeypatch):
    """A copy of n bytes moves 2n (read + write); with every copy timed at
    exactly one clock step the bandwidth is 2n / step."""
    from bench import host
    monkeypatch.setattr(host.time, "perf_counter", _Clock(0.5))
    nbytes = 1 << 20
    assert host.copy_bandwidth(nbytes, repeats=3) == 2 * nbytes / 0.5


def test_copy_bandwidth_is_the_median_of_the_repeats(monkeypatch):
    """One slow copy among five does not move the result."""
    from bench import host
    steps = iter([0.0, 1.0, 1.0, 2.0, 2.0, 12.0, 12.0, 13.0, 13.0, 14.0])
    monkeypatch.setattr(host.time, "perf_counter", lambda: next(steps))
    nbytes = 8 << 10
    assert host.copy_bandwidth(nbytes, repeats=5) == 2 * nbytes / 1.0


def test_the_copy_loop_copies_and_counts_the_read_and_the_write(monkeypatch):
    """The compiled copy loop copies every value, blocks and a partial last
    one included, and is timed as the NumPy copy is (2n bytes a copy)."""
    pytest.importorskip("numba")
    from bench import host
    from gpubn.backends import cpu
    src = np.arange(3 * cpu._BLOCK + 5, dtype=np.float64)
    dst = np.zeros_like(src)
    host._copy_loop()(dst, src)
    np.testing.assert_array_equal(dst, src)
    monkeypatch.setattr(host.time, "perf_counter", _Clock(0.25))
    nbytes = 1 << 20
    assert host.loop_copy_bandwidth(nbytes, repeats=3) == 2 * nbytes / 0.25
    assert host.yardsticks(nbytes, repeats=3) == {"peak_bytes_per_s": 2 * nbytes / 0.25,
                                                  "loop_bytes_per_s": 2 * nbytes / 0.25}


def test_the_copy_loop_is_absent_without_numba(monkeypatch):
    from bench import host

    def missing():
        raise ImportError("no numba")
    monkeypatch.setattr(host, "_copy_loop", missing)
    assert host.loop_copy_bandwidth(1 << 20, repeats=1) is None
    assert host.yardsticks(1 << 20, repeats=1)["loop_bytes_per_s"] is None


def test_first_call_compiles_into_an_empty_cache_then_loads_from_it(monkeypatch):
    """Two child processes share one fresh cache directory: the first (cold)
    one's time is the compile cost, the second's the cached cost, and its
    second call the steady cost; the child gets this tree on its path."""
    import json
    import os
    import subprocess
    from types import SimpleNamespace
    from bench import host
    seen = []

    def fake_run(cmd, env, cwd, capture_output, text, timeout):
        cache = env["GPUBN_CACHE_DIR"]
        seen.append((cache, sorted(os.listdir(cache)), cmd[-2:]))
        Path(cache, "compiled").write_text("")        # the cold run fills it
        first = 30.0 if len(seen) == 1 else 0.5
        out = {"import_s": 0.25, "first_s": first, "second_s": 0.01}
        assert env["PYTHONPATH"].split(os.pathsep)[0] == host._ROOT
        return SimpleNamespace(returncode=0, stdout="warming up\n" + json.dumps(out) + "\n",
                               stderr="")

    monkeypatch.setattr(subprocess, "run", fake_run)
    got = host.cpu_first_call("float16", shape=(2, 3, 4, 4))
    assert got == {"compile_s": 30.0, "cached_s": 0.5, "steady_s": 0.01, "import_s": 0.25}
    assert [s[1] for s in seen] == [[], ["compiled"]]
    assert seen[0][0] == seen[1][0] and not os.path.exists(seen[0][0])   # removed after
    assert [s[2] for s in seen] == [["float16", "[2, 3, 4, 4]"]] * 2


def test_first_call_failure_names_the_childs_last_error_line(monkeypatch):
    import subprocess
    from types import SimpleNamespace
    from bench import host
    monkeypatch.setattr(subprocess, "run", lambda *a, **k: SimpleNamespace(
        returncode=1, stdout="", stderr="Traceback\n  ...\nImportError: no numba\n"))
    with pytest.raises(RuntimeError, match="^ImportError: no numba$"):
        host.cpu_first_call()


@pytest.mark.slow   # two child processes, the first compiling every loop it runs
def test_first_call_measured_for_real():
    """The disk cache pays off: loading the compiled loops is much cheaper
    than compiling them, and a steady call is cheaper still.  On a small
    input, which runs on the calling thread only: the bench's input
    compiles the threaded loops too (82 s for this test against 30 on a
    slow 2-core machine)."""
    pytest.importorskip("numba")
    from bench import host
    got = host.cpu_first_call(shape=(4, 8, 6, 6))
    assert got["compile_s"] > 2 * got["cached_s"] > 0
    assert got["cached_s"] > got["steady_s"] > 0


def test_torch_after_cpu_times_torch_alone_and_right_after_a_cpu_call(monkeypatch):
    """Each 'after' timing directly follows a cpu backend forward; 'alone'
    ones follow nothing but torch (the call order is recorded)."""
    pytest.importorskip("numba")
    torch = pytest.importorskip("torch")
    import gpubn
    from bench import host
    calls = []
    real_bn, real_torch = gpubn.batch_norm_forward, torch.nn.functional.batch_norm
    monkeypatch.setattr(gpubn, "batch_norm_forward",
                        lambda *a, **k: calls.append("cpu") or real_bn(*a, **k))
    monkeypatch.setattr(torch.nn.functional, "batch_norm",
                        lambda *a, **k: calls.append("torch") or real_torch(*a, **k))
    got = host.torch_after_cpu(shape=(2, 3, 4, 4), repeats=3)
    assert set(got) == {"alone_s", "after_cpu_s", "threading_layer"}
    assert got["alone_s"] > 0 and got["after_cpu_s"] > 0
    assert got["threading_layer"] in ("tbb", "workqueue", "omp")
    assert calls == ["cpu", "torch"] + ["torch"] * 3 + ["cpu", "torch"] * 3


# -- modelled time at realistic sizes (bench traffic) -------------------------------------

def _emu_or_skip():
    from bench import traffic
    reason = traffic.emu_unavailable_reason()
    if reason is not None:
        pytest.skip(reason)


def test_bytes_moved_of_the_epilogue_by_hand():
    # (2, 3, 4, 4) float32: 96 elements of 4 bytes, 3 channels of 4 bytes
    # forward + add + relu: x, residual, y + 8 per-channel vectors
    assert metrics.bytes_moved("batch_norm", "fwd_train_add_relu", (2, 3, 4, 4), 1,
                               "float32") == 3 * 384 + 8 * 12
    # backward: dy, x, y (mask); dx, dresidual + 5 per-channel vectors
    assert metrics.bytes_moved("batch_norm", "bwd_add_relu", (2, 3, 4, 4), 1,
                               "float32") == 5 * 384 + 5 * 12
    with pytest.raises(ValueError, match="op must be one of"):
        metrics.bytes_moved("layer_norm", "bwd_add_relu", (4, 8), -1, "float32")


def test_modelled_time_by_hand():
    from bench import traffic
    # ResNet-50's layer1 bn3 at batch 32, float32: 32*256*56*56 = 25,690,112
    # elements, 102,760,448 bytes; 3 passes at 4.8 TB/s = 64.2253 us
    assert traffic.modelled_us(3 * 102_760_448, 4800.0) == pytest.approx(64.2253, abs=1e-4)
    # 1 GB at 1000 GB/s is a millisecond
    assert traffic.modelled_us(1e9, 1000.0) == pytest.approx(1000.0)
    with pytest.raises(ValueError, match="copy_gbps"):
        traffic.modelled_us(1e9, 0.0)


def test_copy_bandwidth_choice_prefers_measured_then_given_then_nominal():
    from bench import traffic
    assert traffic.copy_bandwidth_choice(4100.0, 3000.0) == (
        4100.0, "device-to-device copy measured in this run")
    gbps, source = traffic.copy_bandwidth_choice(None, 3000.0)
    assert gbps == 3000.0 and "--copy-gbps" in source
    gbps, source = traffic.copy_bandwidth_choice()
    assert gbps == 4800.0 and "H200" in source and "nominal" in source
    with pytest.raises(ValueError, match="copy_gbps must be a positive"):
        traffic.copy_bandwidth_choice(None, -1.0)


def test_cli_rejects_a_bad_copy_bandwidth(capsys):
    assert main(["traffic", "--copy-gbps", "0"]) == 2
    assert "--copy-gbps must be > 0" in capsys.readouterr().err


def test_modelled_path_follows_the_resources():
    from bench import traffic
    # NHWC 32x7x7x512: blocks of 32 channels x 8 rows, each row 16 values:
    # 512 / 32 = 16 column tiles x ceil(1568 / 128) = 13 splits = 208 blocks;
    # at 128 registers, 256 threads take 32768 of an SM's 65536: 264 resident
    late = Case("batch_norm", (32, 7, 7, 512), "NHWC")
    fits, why, cfg = traffic.modelled_path(late, "fwd_train", lambda k, d: (128, 0))
    assert fits and "208 blocks of 256 threads x 16 + 0 values" in why and cfg.staged == 0
    # at 255 registers (8192 per warp: 8 warps per SM) 132 blocks of 256
    # threads are resident, and 16 tiles need more: narrower blocks stage.
    # 128 threads (4 rows, 264 resident): <= 16 splits of 98 rows, 4 x (16 +
    # 9) >= 98: 9 staged; 64 threads (2 rows, 528): <= 33 splits of 47.5
    # rows, 2 x (16 + 8): 8; 32 threads (1 row, 1056): <= 66 splits of 23.8
    # rows: 8 too, and equal capacities keep the wider block.  The backward
    # stages dy and x: 8 values x 64 threads x 2 arrays x 4 bytes.
    fits, why, cfg = traffic.modelled_path(late, "bwd_add_relu", lambda k, d: (255, 0))
    assert fits and (cfg.staged, cfg.block, cfg.shared_mem) == (8, (32, 2, 1), 4096)
    assert "x 16 + 8 values (registers + staged; 0 + 4096 B shared per block)" in why
    # the largest layer, 32x56x56x256 in float32: 103 MB, more than 132 SMs
    # hold in shared memory (228 KiB each) and registers together
    big = Case("batch_norm", (32, 56, 56, 256), "NHWC")
    fits, why, _ = traffic.modelled_path(big, "fwd_train", lambda k, d: (32, 0))
    assert not fits and "fit at once" in why
    # NCHW 32x512x7x7: a channel's 1568 values in one block of 128 threads
    seen = []
    fits, _, cfg = traffic.modelled_path(Case("batch_norm", (32, 512, 7, 7), "NCHW"), "bwd",
                                         lambda k, d: seen.append((k, d)) or (64, 0))
    assert fits and seen == [("bn_backward_once_nchw", "float32")] and cfg.block[0] == 128


@pytest.mark.parametrize("static, path, want", [
    (0, "read-once", {"fwd_train": 2, "bwd": 3, "fwd_train_add_relu": 3, "bwd_add_relu": 5}),
    (228 * 1024, "two-pass", {"fwd_train": 3, "bwd": 5, "fwd_train_add_relu": 4,
                              "bwd_add_relu": 7}),
])
def test_run_model_scales_the_small_shapes_passes(static, path, want):
    """The realistic NHWC 32x7x7x512 needs 208 read-once blocks of 256
    threads, 16 values each in registers: at 64 registers (4 blocks per SM,
    528 resident) and no static shared memory every op reads once; a
    function whose static shared memory alone fills an SM's 228 KiB (with
    the 1 KiB reserved per block) has no resident block, so none does.
    The modelled bytes are emu's tensor passes on the small shape, forced
    onto that path, times the realistic tensor's 3,211,264 bytes."""
    _emu_or_skip()
    from bench import traffic
    case = Case("batch_norm", (32, 7, 7, 512), "NHWC")
    rows = traffic.run_model([(case, traffic.MODEL_OPS)], copy_gbps=1000.0,
                             resources=lambda k, d: (64, static))
    x_bytes = 32 * 7 * 7 * 512 * 4
    assert x_bytes == 3_211_264
    pytorch = {"fwd_train": 3, "bwd": 5, "fwd_train_add_relu": 8, "bwd_add_relu": 8}
    assert [r["op"] for r in rows] == list(traffic.MODEL_OPS)
    for r in rows:
        assert r["status"] == "ok", r["reason"]
        assert r["path"] == path
        assert r["passes"] == want[r["op"]]
        assert r["bytes"] == want[r["op"]] * x_bytes
        assert r["us"] == pytest.approx(want[r["op"]] * x_bytes / 1e12 * 1e6)
        assert r["pytorch_bytes"] == pytorch[r["op"]] * x_bytes
        assert r["pytorch_ratio"] == pytest.approx(pytorch[r["op"]] / want[r["op"]])
    text = report.format_model_table(rows)
    assert path in text and "bwd_add_relu" in text and "32x7x7x512" in text


def test_run_model_catches_a_small_shape_on_the_wrong_path(monkeypatch):
    """The check that the emu run took the planned path: an emu backend that
    ignores the forced choice (the small shape always fits, so it reads once)
    against a plan that says two-pass is an error row, not a number."""
    _emu_or_skip()
    from bench import traffic
    from gpubn.backends import get_backend
    monkeypatch.setattr(traffic, "_forced_emu", lambda read_once: get_backend("emu"))
    rows = traffic.run_model([(Case("batch_norm", (32, 7, 7, 512), "NHWC"), ("fwd_train",))],
                             resources=lambda k, d: (64, 230 * 1024))
    assert rows[0]["status"] == "error"
    assert "emu ran read-once, the plan picks two-pass" in rows[0]["reason"]


def test_traffic_has_the_epilogue_rows_in_both_layouts():
    from bench import traffic
    ops = {c.layout: set(o) for c, o in traffic.traffic_cases() if c.kind == "batch_norm"}
    for layout in ("NCHW", "NHWC"):
        assert {"fwd_train_add_relu", "bwd_add_relu"} <= ops[layout]
    assert {c.layout for c, _ in traffic.model_cases()} == {"NCHW", "NHWC"}
    _emu_or_skip()
    rows = traffic.run_traffic([(Case("batch_norm", (2, 5, 3, 4), "NHWC"), traffic.EPILOGUE_OPS)])
    fwd, bwd = rows
    assert (fwd["status"], bwd["status"]) == ("ok", "ok"), (fwd["reason"], bwd["reason"])
    # read x and the residual, write y; read dy, x and y, write dx and dresidual
    assert fwd["path"] == bwd["path"] == "read-once"
    assert fwd["tensor_passes"] == pytest.approx(3.0) and bwd["tensor_passes"] == pytest.approx(5.0)
    assert (fwd["pytorch_passes"], bwd["pytorch_passes"]) == (8, 8)
    assert "read-once" in report.format_traffic_table(rows)


# -- the epilogue ops through the providers (PyTorch's unfused add + ReLU) ----------------

@pytest.mark.parametrize("layout, shape", [("NCHW", (4, 3, 5, 6)), ("NHWC", (4, 5, 6, 3))])
def test_epilogue_ops_agree_between_gpubn_and_torch(layout, shape):
    """gpubn's fused relu(bn(x) + residual) and its backward against
    PyTorch's batch norm, in-place add and in-place ReLU (autograd) on the
    same inputs, float64: outputs equal to rounding (the check the GPU run
    makes between gpubn-cuda and torch-cuda)."""
    pytest.importorskip("torch")
    case = Case("batch_norm", shape, layout, "float64")
    setup = make_setup(case)
    ours, theirs = GpubnProvider("numpy"), TorchProvider("cpu")
    for op in ("fwd_train_add_relu", "bwd_add_relu"):
        a = ours.to_host(ours.prepare(setup, op)())
        b = theirs.to_host(theirs.prepare(setup, op)())
        assert len(a) == len(runner.OUTPUT_NAMES[op]) == len(b)
        assert runner.compare(a, b, op, "float64") == "ok", op
    y = ours.to_host(ours.prepare(setup, "fwd_train_add_relu")())[0]
    assert (y == 0).any() and (y > 0).any()      # the ReLU cuts: the mask matters
    # a wrong residual (the unfused sum without the ReLU) is caught
    plain = theirs.to_host(theirs.prepare(setup, "fwd_train")())[0]
    wrong = (plain + np.ascontiguousarray(setup.x[::-1]),)
    assert runner.compare(wrong, (y,), "fwd_train_add_relu", "float64").startswith("mismatch")


def test_epilogue_ops_are_refused_outside_batch_norm():
    ln = Case("layer_norm", (4, 8), "rows")
    for p in (GpubnProvider("numpy"), TorchProvider("cpu")):
        assert "not defined for layer_norm" in p.supports(ln, "bwd_add_relu")
    assert NaiveProvider().supports(Case("batch_norm", (4, 3), "NC"), "fwd_train_add_relu")
    assert suites.get_suite("standard", ops=["bwd_add_relu"])
    with pytest.raises(ValueError, match="ops must be among"):
        suites.get_suite("standard", ops=["bwd_add_gelu"])


def test_traffic_command_prints_the_modelled_table_with_its_sources(tmp_path, capsys,
                                                                    monkeypatch):
    """``python -m bench traffic --copy-gbps``: the header names the copy
    bandwidth's source and the occupancy's, and the row's time is the
    hand-computed one (NHWC 32x7x7x512 float32 forward, read-once at the
    emu plan's 3 blocks per SM: 208 <= 396 blocks, 2 passes of 3,211,264
    bytes at 2000 GB/s = 3.2 us; PyTorch's 3 passes: 4.8 us)."""
    _emu_or_skip()
    import bench.__main__ as cli
    from bench import traffic
    monkeypatch.setattr(traffic, "ptxas_resources", lambda arch=traffic.MODEL_ARCH: None)
    monkeypatch.setattr(cli, "traffic_cases", lambda: [
        (Case("batch_norm", (2, 3, 4, 4), "NCHW"), ("fwd_train",))])
    monkeypatch.setattr(cli, "model_cases", lambda: [
        (Case("batch_norm", (32, 7, 7, 512), "NHWC"), ("fwd_train",))])
    out = tmp_path / "t.jsonl"
    assert main(["traffic", "--copy-gbps", "2000", "--quiet", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "# copy bandwidth: 2000 GB/s, given with --copy-gbps" in text
    assert "(their occupancy): assumed (no ptxas)" in text
    assert "ResNet-50 batch-32 batch-norm layers held on chip" in text
    line = next(ln for ln in text.splitlines() if "32x7x7x512" in ln)
    # 16 column tiles x 13 splits of 8 x 16 rows at emu's 64 registers: 4
    # blocks of 256 threads per SM, nothing staged
    assert line.split()[4:] == ["read-once", "16", "x256", "2", "6.4", "3.2", "3", "9.6", "4.8",
                                "1.50x"]
    rows = report.read_jsonl(str(out))
    assert [r["section"] for r in rows] == ["traffic", "model"]


# -- which ResNet-50 batch-32 layers the read-once kernels hold on an H200 ----------------

# The read-once kernels' (registers, static shared bytes) as ptxas 12.x gives
# them for sm_90 at this writing; the test fixes them so that its answer does
# not move with the toolkit.
_H200_RESOURCES = {
    ("bn_forward_once_nchw", "float32"): (128, 1152),
    ("bn_forward_once_nchw", "bfloat16"): (126, 1152),
    ("bn_forward_once_nhwc", "float32"): (64, 6528),
    ("bn_forward_once_nhwc", "bfloat16"): (72, 6528),
    ("bn_backward_once_nchw", "float32"): (165, 896),
    ("bn_backward_once_nchw", "bfloat16"): (166, 896),
    ("bn_backward_once_nhwc", "float32"): (127, 2688),
    ("bn_backward_once_nhwc", "bfloat16"): (105, 2688),
}


def _fits_by_hand(c, h, op, dtype, layout):
    """Whether some block size and staged count holds the layer: every
    block size the plan may take (channel axis 1: 256 down to 32 threads
    per channel; channels last: 32 channels x 8 down to 1 rows), every count
    of staged values, and CUDA's occupancy rules written out for an H200
    (132 SMs; 65536 registers, allocated per warp in units of 256; 2048
    threads, 32 blocks and 228 KiB of shared memory per SM, 1 KiB of it
    reserved per block; at most 227 KiB per block)."""
    kernel = f"bn_{'backward' if op == 'bwd' else 'forward'}_once_{layout.lower()}"
    registers, static = _H200_RESOURCES[(kernel, dtype)]
    per_value = (2 if op == "bwd" else 1) * (2 if dtype == "bfloat16" else 4)
    values = 32 * h * h            # of a channel (NCHW) or rows of a column tile (NHWC)
    if layout == "NCHW":
        tiles, blocks = c, [(t, t) for t in (256, 128, 64, 32)]     # (threads, step)
    else:
        tiles, blocks = c // 32, [(32 * by, by) for by in (8, 4, 2, 1)]
    per_warp = -(-registers * 32 // 256) * 256
    for threads, step in blocks:
        by_registers = 65536 // per_warp // (threads // 32)
        staged = 0
        while static + staged * threads * per_value <= 227 * 1024:
            shared = static + staged * threads * per_value + 1024
            per_sm = min(2048 // threads, by_registers, 228 * 1024 // shared, 32)
            if tiles * -(-values // (step * (16 + staged))) <= 132 * per_sm:
                return True
            if per_sm == 0:
                break
            staged += 1
    return False


def test_resnet50_batch32_coverage_on_an_h200():
    """The read-once path on an H200 for ResNet-50's 53 batch-norm layers at
    batch 32 (12 shapes), forward and backward, float32 and bfloat16, both
    layouts, against a brute force over block sizes and staged counts.

    By hand: an SM holds at most 228 KiB of shared memory plus 2048 threads
    x 16 values in registers (128 KiB of float32, 64 KiB of bfloat16): 132
    SMs hold 48.1 MB of float32 and 39.5 MB of bfloat16.  So the 102.8 MB
    layers (64x112x112, 256x56x56) never fit, nor in float32 the 51.4 MB ones
    (128x56x56, 512x28x28): 11 layers of 53; the backward keeps twice the
    bytes.  Everything else of the forward fits: 42 of 53 layers in float32
    ("most"), 48 in bfloat16 ("nearly all")."""
    from bench import traffic

    rows = traffic.coverage(lambda kernel, dtype: _H200_RESOURCES[(kernel, dtype)])
    assert len(rows) == 12 * 8 and sum(layers for _, _, layers in traffic.RESNET50_BN) == 53
    for r in rows:
        want = _fits_by_hand(r["channels"], r["size"], r["op"].split("_")[0], r["dtype"],
                             r["layout"])
        assert r["read_once"] == want, r
    too_big = {(64, 112), (256, 56)} | {(128, 56), (512, 28)}
    held = {}
    for r in rows:
        nbytes = 32 * r["channels"] * r["size"] ** 2 * (4 if r["dtype"] == "float32" else 2)
        if nbytes > (48.1e6 if r["dtype"] == "float32" else 39.5e6):
            assert not r["read_once"], r
        key = (r["op"], r["dtype"], r["layout"])
        held[key] = held.get(key, 0) + (r["layers"] if r["read_once"] else 0)
        if r["op"] == "fwd_train" and r["dtype"] == "float32":
            assert r["read_once"] == ((r["channels"], r["size"]) not in too_big), r
    for layout in ("NCHW", "NHWC"):
        assert held[("fwd_train", "float32", layout)] == 42
        assert held[("fwd_train", "bfloat16", layout)] == 48
    text = traffic.format_coverage(rows)
    assert "42/53" in text and "48/53" in text and "64x112x112" in text
