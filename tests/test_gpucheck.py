"""The GPU acceptance run (``.ci/gpu``, ``bench/gpucheck.py``) without a GPU:
a stand-in machine answers each command the run issues and advances a
stand-in clock, so sequencing, the time budget, the results written after
each step, the summary and JSON formats, exit status rules and missing tools
are checked here.  The self-check driver it runs under the sanitizers
(``gpubn.selfcheck``) runs for real on emu."""

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

_ROOT = str(Path(__file__).resolve().parents[1])
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

from bench import gpu, gpucheck, runner  # noqa: E402
from bench.gpucheck import CommandResult, GpuCheck  # noqa: E402
from bench.report import write_jsonl  # noqa: E402
from conftest import backend_or_skip  # noqa: E402

DEVICE = {"name": "NVIDIA H200", "sm_count": 132, "copy_gbps": 4100.0, "memcpy_gbps": 4000.0,
          "copy_kernel_gbps": 4100.0, "cupy": "14.0.0", "torch": "2.11.0"}
PYTEST_OK = "....s.\n250 passed, 10 skipped in 80.1s\n"
SANITIZER_OK = ('========= COMPUTE-SANITIZER\n{"checks": {"reference": {"ok": 72, "differ": 0}}, '
                '"failures": [], "notes": [], "ok": true}\n========= ERROR SUMMARY: 0 errors\n')
DETERMINISM_OK = json.dumps({"checks": {"repeat": {"ok": 72, "differ": 0},
                                        "against emu": {"ok": 72, "differ": 0}},
                             "failures": [], "notes": [], "ok": True})
NCU_CSV = ('==PROF== Connected to process 1\n'
           '"ID","Process ID","Process Name","Host Name","Kernel Name","Context","Stream",'
           '"Block Size","Grid Size","Device","CC","Section Name","Metric Name","Metric Unit",'
           '"Metric Value"\n'
           '"0","1","python3","h","void gpubn::bn_stats_nchw<float, float, 4>(...)","1","7",'
           '"(256, 1, 1)","(256, 2, 1)","0","9.0","Command line profiler metrics",'
           '"dram__throughput.avg.pct_of_peak_sustained_elapsed","%","1,091.5"\n'
           '"0","1","python3","h","void gpubn::bn_stats_nchw<float, float, 4>(...)","1","7",'
           '"(256, 1, 1)","(256, 2, 1)","0","9.0","Command line profiler metrics",'
           '"sm__warps_active.avg.pct_of_peak_sustained_active","%","71.2"\n')


def bench_row(provider, backend, median, dtype):
    return {"device": "gpu", "provider": provider, "backend": backend, "kind": "batch_norm",
            "op": "fwd_train", "layout": "NCHW", "shape": [32, 256, 56, 56], "dtype": dtype,
            "status": "ok", "reason": "", "check": "ok", "median_s": median,
            "gbps": 205.5e6 / median / 1e9, "copy_share": 205.5e6 / median / 1e9 / 4100}


class Clock:
    def __init__(self):
        self.t = 1000.0

    def __call__(self):
        return self.t


def classify(cmd):
    text = " ".join(cmd)
    if cmd[0].endswith("compute-sanitizer"):
        return cmd[cmd.index("--tool") + 1]
    if cmd[0].endswith("ncu"):
        return "profile"
    if "--probe device" in text:
        return "device"
    if "-c import" in text:
        return "import"
    if "-m pytest" in text:
        return "tests"
    if "--determinism" in text:
        return "determinism"
    if "-m bench gpu" in text:
        return "bench"
    raise AssertionError(f"unexpected command {cmd}")


class Machine:
    """Stand-in for ``run_command``: ``answers[step]`` is ``(seconds, status,
    output)`` or a function of the command giving that; a command that takes
    longer than its timeout is killed (``returncode`` None) at the timeout."""

    def __init__(self, clock, **answers):
        self.clock = clock
        self.calls = []
        self.answers = {
            "device": (8, 0, "loading\n" + json.dumps(DEVICE)),
            "import": (0.5, 1, "ModuleNotFoundError"),
            "tests": (90, 0, PYTEST_OK),
            "memcheck": (30, 0, SANITIZER_OK),
            "racecheck": (40, 0, SANITIZER_OK),
            "synccheck": (20, 0, SANITIZER_OK),
            "initcheck": (25, 0, SANITIZER_OK),
            "determinism": (20, 0, DETERMINISM_OK),
            "bench": self.bench,
            "profile": (30, 0, NCU_CSV),
        }
        self.answers.update(answers)
        self.on_call = None

    @staticmethod
    def bench(cmd):
        dtype = cmd[cmd.index("--dtype") + 1]
        out = cmd[cmd.index("--out") + 1]
        write_jsonl([bench_row("torch-cuda", "torch", 80e-6, dtype),
                     bench_row("torch-cuda-native", "torch", 70e-6, dtype),
                     bench_row("gpubn-cuda", "gpubn", 56e-6, dtype)], out)
        return 30, 0, "table"

    def __call__(self, cmd, *, timeout, env, cwd, log_path):
        key = classify(cmd)
        self.calls.append({"key": key, "cmd": cmd, "timeout": timeout, "env": env, "cwd": cwd,
                           "log": log_path, "at": self.clock.t})
        if self.on_call:
            self.on_call(key)
        answer = self.answers[key]
        seconds, code, output = answer(cmd) if callable(answer) else answer
        if log_path != os.devnull:
            with open(log_path, "a") as f:
                f.write(output)
        if seconds > timeout:
            self.clock.t += timeout
            return CommandResult(None, timeout, output)
        self.clock.t += seconds
        return CommandResult(code, seconds, output)


def make(tmp_path, tools=("compute-sanitizer", "ncu", "g++"), budget=450.0, **answers):
    clock = Clock()
    machine = Machine(clock, **answers)

    def which(name):
        return f"/usr/bin/{name}" if name in tools else None

    check = GpuCheck(str(tmp_path / "out"), root=_ROOT, python="python3", budget_s=budget,
                     runner=machine, which=which, clock=clock)
    return check, machine


def statuses(check):
    return {r.key: r.status for r in check.results}


def read_report(tmp_path):
    out = tmp_path / "out"
    return json.loads((out / "gpu.json").read_text()), (out / "summary.md").read_text()


# -- a full run ------------------------------------------------------------------------

def test_full_run_passes_in_order_and_writes_the_report(tmp_path):
    check, machine = make(tmp_path)
    assert check.run() == 0
    order = [c["key"] for c in machine.calls if c["key"] != "import"]
    assert order == ["device", "tests", "memcheck", "racecheck", "synccheck", "initcheck",
                     "determinism", "bench", "bench", "profile"]
    assert set(statuses(check).values()) == {"pass"}
    report, summary = read_report(tmp_path)
    assert report["verdict"] == "PASS" and report["pending"] == []
    assert [s["key"] for s in report["steps"]] == [s.key for s in check.steps]
    assert report["device"]["copy_gbps"] == 4100.0
    assert {r["dtype"] for r in report["bench"]} == {"float32", "float16"}
    tests = report["steps"][1]
    assert tests["data"] == {"passed": 250, "skipped": 10} and tests["log"] == "pytest.log"
    assert report["steps"][-1]["data"]["kernels"] == [{
        "kernel": "void gpubn::bn_stats_nchw<float, float, 4>(...)",
        gpucheck.NCU_METRICS[0]: 1091.5, gpucheck.NCU_METRICS[1]: 71.2}]
    # summary.md: verdict, then the step table, then one table per step with numbers
    assert summary.startswith("# gpubn GPU acceptance run: PASS")
    first_table = summary.index("| step | status |")
    for heading in ("## Device", "## Determinism", "## Profile (ncu)", "## Benchmark"):
        assert summary.index(heading) > first_table
    # the bench table: gpubn 56 us against the faster PyTorch path (native, 70 us)
    line = next(ln for ln in summary.splitlines() if ln.startswith("| batch_norm fwd_train")
                and "float32" in ln)
    cells = [c.strip() for c in line.strip("|").split("|")]
    assert cells[4:] == ["56.0", "3670", "90%", "80.0", "70.0", "0.80", "ok"]
    # at most 8 files, the logs named by the contract
    files = sorted(os.listdir(tmp_path / "out"))
    assert len(files) <= 8
    assert {"summary.md", "gpu.json", "pytest.log", "sanitizer-memcheck.log",
            "sanitizer-racecheck.log", "sanitizer-synccheck.log"} <= set(files)


def test_commands_run_from_the_checkout_and_install_nothing(tmp_path):
    check, machine = make(tmp_path)
    check.run()
    for call in machine.calls:
        assert call["cwd"] == _ROOT
        assert call["env"]["PYTHONPATH"].split(os.pathsep)[0] == _ROOT
        text = " ".join(call["cmd"])
        assert "pip" not in call["cmd"] and "install" not in text, text
    tests = next(c["cmd"] for c in machine.calls if c["key"] == "tests")
    assert tests[:3] == ["python3", "-m", "pytest"] and "-x" in tests
    assert tests[tests.index("-k") + 1] == "cuda"
    assert any(a.startswith("faulthandler_timeout=") for a in tests)
    for tool in ("memcheck", "racecheck", "synccheck", "initcheck"):
        cmd = next(c["cmd"] for c in machine.calls if c["key"] == tool)
        assert cmd[cmd.index("--error-exitcode") + 1] == str(gpucheck.SANITIZER_ERROR_EXIT)
        assert cmd[-6:] == ["python3", "-m", "gpubn.selfcheck", "--backend", "cuda", "--quiet"]


def test_per_test_timeout_uses_pytest_timeout_when_it_is_installed(tmp_path):
    check, machine = make(tmp_path, **{"import": (0.5, 0, "")})
    check.run()
    tests = next(c["cmd"] for c in machine.calls if c["key"] == "tests")
    assert "--timeout=60" in tests


def test_each_result_is_written_before_the_next_step_starts(tmp_path):
    check, machine = make(tmp_path)
    seen = []

    def on_call(key):
        if key == "import":
            return
        report = json.loads((tmp_path / "out" / "gpu.json").read_text())
        seen.append((key, [s["key"] for s in report["steps"]], report["verdict"]))
        summary = (tmp_path / "out" / "summary.md").read_text()
        for step in report["pending"]:
            assert f"| {step} | pending |" in summary

    machine.on_call = on_call
    check.run()
    done = [s.key for s in check.steps]
    for key, written, verdict in seen:
        assert verdict == "RUNNING"
        if key != "bench":
            assert written == done[:done.index(key)], key


# -- time budget --------------------------------------------------------------------

def test_budget_caps_each_step_and_reserves_time_for_later_required_steps(tmp_path):
    # tests hang: killed at the cap, the run goes on and fails
    check, machine = make(tmp_path, tests=(10_000, 0, "...."))
    assert check.run() == 1
    by_key = {c["key"]: c for c in machine.calls}
    assert by_key["tests"]["timeout"] == 150
    assert statuses(check)["tests"] == "timeout"
    for call in machine.calls:
        if call["key"] != "import":
            assert call["at"] - 1000.0 + call["timeout"] <= check.budget_s + 1e-9


def test_small_budget_skips_optional_steps_and_keeps_the_required_ones(tmp_path):
    check, machine = make(tmp_path, budget=250.0)
    check.run()
    st = statuses(check)
    # 250 s: device 8 + tests 90 + sanitizers ~90 + determinism 20 leave no room
    # for the optional initcheck after synccheck... nor for the benchmark
    assert st["device"] == st["tests"] == st["memcheck"] == st["determinism"] == "pass"
    assert st["profile"] == "skipped"
    skipped = [r for r in check.results if r.status == "skipped"]
    assert skipped and all("time budget" in r.detail for r in skipped)
    tests = next(c for c in machine.calls if c["key"] == "tests")
    reserve = sum(s.min_s for s in check.steps[2:] if s.required)
    assert tests["timeout"] == min(150, 250 - 8 - reserve)


def test_bench_keeps_the_rows_of_the_dtype_that_finished(tmp_path):
    calls = []

    def bench(cmd):
        calls.append(cmd)
        if len(calls) == 1:
            return Machine.bench(cmd)
        return 10_000, 0, "partial"

    check, _ = make(tmp_path, bench=bench)
    assert check.run() == 0
    report, summary = read_report(tmp_path)
    assert {r["dtype"] for r in report["bench"]} == {"float32"}
    step = next(s for s in report["steps"] if s["key"] == "bench")
    assert step["status"] == "pass" and "float16: timeout" in step["detail"]


# -- exit status ------------------------------------------------------------------------

@pytest.mark.parametrize("step, answer", [
    ("tests", (50, 1, "F\n1 failed, 20 passed in 50s\n")),
    ("tests", (50, 0, "no tests ran in 1s\n")),
    ("memcheck", (30, 97, "========= Invalid __global__ read of size 4\n"
                          "========= ERROR SUMMARY: 3 errors\n")),
    ("racecheck", (30, 97, "========= ERROR SUMMARY: 1 error\n")),
    ("synccheck", (30, 1, "Traceback ...\nRuntimeError: boom\n")),
    ("determinism", (20, 1, json.dumps({"checks": {"repeat": {"ok": 71, "differ": 1}},
                                        "failures": [{"op": "bn_train", "shape": "NCHW 3x5",
                                                      "dtype": "float32", "check": "repeat",
                                                      "ok": False, "detail": "differ: y",
                                                      "promised": True}],
                                        "notes": [], "ok": False}))),
    ("determinism", (20, 2, json.dumps({"ok": False, "error": "emu unavailable"}))),
])
def test_a_failed_check_fails_the_run(tmp_path, step, answer):
    check, _ = make(tmp_path, **{step: answer})
    assert check.run() == 1
    assert statuses(check)[step] == "fail"
    report, summary = read_report(tmp_path)
    assert report["verdict"] == "FAIL" and summary.startswith("# gpubn GPU acceptance run: FAIL")
    assert "| FAIL |" in summary


def test_sanitizer_error_count_is_reported(tmp_path):
    check, _ = make(tmp_path, memcheck=(30, 97, "========= ERROR SUMMARY: 3 errors\n"))
    check.run()
    r = next(r for r in check.results if r.key == "memcheck")
    assert r.detail == "3 error(s) reported" and r.data["errors"] == 3


@pytest.mark.parametrize("step, answer", [
    ("initcheck", (30, 97, "========= ERROR SUMMARY: 2 errors\n")),
    ("bench", (30, 1, "Traceback\nImportError: no torch\n")),
    ("profile", (30, 1, "==ERROR== ERR_NVGPUCTRPERM\n")),
])
def test_optional_steps_never_fail_the_run(tmp_path, step, answer):
    check, _ = make(tmp_path, **{step: answer})
    assert check.run() == 0
    assert statuses(check)[step] in ("fail", "error")
    assert read_report(tmp_path)[0]["verdict"] == "PASS"


def test_no_gpu_stops_the_run(tmp_path):
    check, machine = make(tmp_path, device=(3, 1, json.dumps({"error": "CUDARuntimeError: "
                                                                      "no CUDA-capable device"})))
    assert check.run() == 1
    assert [c["key"] for c in machine.calls] == ["device"]
    st = statuses(check)
    assert st.pop("device") == "fail" and set(st.values()) == {"skipped"}
    report, summary = read_report(tmp_path)
    assert "no CUDA-capable device" in report["steps"][0]["detail"]


def test_missing_tools_are_reported_and_skipped(tmp_path):
    check, machine = make(tmp_path, tools=())
    assert check.run() == 0
    st = statuses(check)
    for key in ("memcheck", "racecheck", "synccheck", "initcheck", "profile"):
        assert st[key] == "skipped"
    details = {r.key: r.detail for r in check.results}
    assert details["memcheck"] == "compute-sanitizer not found"
    assert details["profile"] == "ncu not found"
    det = next(c["cmd"] for c in machine.calls if c["key"] == "determinism")
    assert "--against" not in det and "no C++ compiler" in details["determinism"]


# -- parsers ------------------------------------------------------------------------

def test_parsers():
    assert gpucheck.pytest_counts("x\n= 3 failed, 2 passed, 1 error in 4.0s =\n") == {
        "failed": 3, "passed": 2, "errors": 1}
    assert gpucheck.pytest_counts("no summary") == {}
    assert gpucheck.sanitizer_errors("a\n========= ERROR SUMMARY: 12 errors\n") == 12
    assert gpucheck.sanitizer_errors("========= ERROR SUMMARY: 1 error") == 1
    assert gpucheck.sanitizer_errors("crashed") is None
    assert gpucheck.last_json('x\n{"a": 1}\n{"b": 2}\ntrailing\n') == {"b": 2}
    assert gpucheck.last_json("{broken\n") is None
    assert gpucheck.ncu_table("==PROF== nothing\n") == []


def _running(pid):
    """Whether ``pid`` runs (a killed process left unreaped is a zombie)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_run_command_kills_the_process_group_at_the_timeout(tmp_path):
    log = tmp_path / "log"
    pidfile = tmp_path / "pid"
    script = (f"import subprocess, sys, time; p = subprocess.Popen([sys.executable, '-c', "
              f"'import time; time.sleep(60)']); open({str(pidfile)!r}, 'w').write(str(p.pid)); "
              f"print('started', flush=True); time.sleep(60)")
    t0 = time.monotonic()
    res = gpucheck.run_command([sys.executable, "-c", script], timeout=2, env=dict(os.environ),
                               cwd=str(tmp_path), log_path=str(log))
    assert res.timed_out and time.monotonic() - t0 < 30
    assert "started" in log.read_text() and "[killed after 2 s]" in log.read_text()
    child = int(pidfile.read_text())
    time.sleep(0.2)
    assert not _running(child)
    ok = gpucheck.run_command([sys.executable, "-c", "print('hi')"], timeout=30,
                              env=dict(os.environ), cwd=str(tmp_path), log_path=str(log))
    assert ok.returncode == 0 and ok.output.strip() == "hi"


def test_ci_gpu_is_a_thin_entry_point():
    text = Path(_ROOT, ".ci", "gpu").read_text()
    assert os.access(Path(_ROOT, ".ci", "gpu"), os.X_OK)
    assert "-m bench.gpucheck" in text and "PYTHONPATH" in text
    assert not re.search(r"\bpip\b|\binstall\b", text)


def test_ci_gpu_without_a_gpu_reports_and_fails(tmp_path):
    """The real entry point, end to end, where there is no GPU: the device
    step says why, every other step is skipped, exit status 1."""
    try:
        import cupy
        if cupy.cuda.runtime.getDeviceCount() > 0:
            pytest.skip("a GPU is present: .ci/gpu would run for real")
    except Exception:
        pass
    out = tmp_path / "results"
    env = dict(os.environ, PYTHON=sys.executable)
    res = subprocess.run(["bash", str(Path(_ROOT, ".ci", "gpu")), str(out)], cwd=str(tmp_path),
                         env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode == 1, res.stdout + res.stderr
    report = json.loads((out / "gpu.json").read_text())
    assert report["verdict"] == "FAIL"
    assert report["steps"][0]["status"] == "fail"
    assert "no usable GPU" in report["steps"][0]["detail"]
    assert {s["status"] for s in report["steps"][1:]} == {"skipped"}
    assert (out / "summary.md").read_text().startswith("# gpubn GPU acceptance run: FAIL")


# -- bench pieces for the GPU --------------------------------------------------------

def test_ratio_is_to_the_faster_torch_path_and_share_to_the_copy():
    rows = [bench_row("torch-cuda", "torch", 80e-6, "float32"),
            bench_row("torch-cuda-native", "torch", 40e-6, "float32"),
            bench_row("gpubn-cuda", "gpubn", 50e-6, "float32")]
    for r in rows:
        r.update(ratio_to_torch=None, copy_share=None)
    runner.add_ratios(rows)
    assert rows[2]["ratio_to_torch"] == pytest.approx(1.25)
    gpu.add_copy_share(rows, 4000.0)
    assert rows[2]["copy_share"] == pytest.approx(205.5e6 / 50e-6 / 1e9 / 4000.0)
    assert rows[2]["copy_gbps"] == 4000.0


def test_torch_cuda_providers_set_the_cudnn_flag_around_each_call(monkeypatch):
    torch = pytest.importorskip("torch")
    seen = []

    def prepare(self, setup, op):
        seen.append(("prepare", torch.backends.cudnn.enabled))
        return lambda: seen.append(("call", torch.backends.cudnn.enabled))

    monkeypatch.setattr(gpu.TorchProvider, "prepare", prepare)
    before = torch.backends.cudnn.enabled
    names = []
    for p in gpu.gpu_providers()[:2]:
        names.append(p.name)
        fn = p.prepare(None, "bwd")
        fn()
        assert seen[-2:] == [("prepare", p.cudnn), ("call", p.cudnn)]
        assert torch.backends.cudnn.enabled == before
    assert names == ["torch-cuda", "torch-cuda-native"]


def test_copy_bandwidth_counts_read_and_write(monkeypatch):
    class Buf:
        def __init__(self, n):
            self.n = n
            self.data = self

        def copy_from_device_async(self, src, nbytes, stream):
            assert nbytes == 4 * self.n

    class FakeCupy:
        float32 = np.float32
        ones = staticmethod(lambda n, dtype: Buf(n))
        zeros_like = staticmethod(lambda a: Buf(a.n))
        copyto = staticmethod(lambda dst, src: None)

        class cuda:
            get_current_stream = staticmethod(lambda: None)

        @staticmethod
        def get_default_memory_pool():
            return type("Pool", (), {"free_all_blocks": lambda self: None})()

    monkeypatch.setitem(sys.modules, "cupy", FakeCupy)
    times = iter([[1e-3] * 5, [2e-3] * 5])
    monkeypatch.setattr(gpu, "cupy_timer", lambda fn, repeats, warmup: (fn(), next(times))[1])
    out = gpu.copy_bandwidth(nbytes=1 << 20, repeats=5)
    assert out["memcpy_gbps"] == pytest.approx(2 * (1 << 20) / 1e-3 / 1e9)
    assert out["copy_kernel_gbps"] == pytest.approx(out["memcpy_gbps"] / 2)
    assert out["copy_gbps"] == out["memcpy_gbps"]


def test_standard_suite_has_both_layouts_mlp_and_rows():
    from bench import suites

    cases = suites.get_suite("standard", ["float32", "float16"])
    assert {c.layout for c, _ in cases} == {"NCHW", "NHWC", "NC", "rows"}
    assert {op for _, ops in cases for op in ops} == {"fwd_train", "fwd_infer", "bwd",
                                                      "fwd_train_add_relu", "bwd_add_relu"}
    assert {c.dtype for c, _ in cases} == {"float32", "float16"}
    # the epilogue against PyTorch's unfused add + ReLU, and channels-last
    # training (cuDNN's persistent mode under torch-cuda), on the ResNet shapes
    epilogue = {(c.layout, c.shape) for c, ops in cases if "bwd_add_relu" in ops}
    assert {layout for layout, _ in epilogue} == {"NCHW", "NHWC"}
    assert all(c.kind == "batch_norm" and "fwd_train" in ops
               for c, ops in cases if (c.layout, c.shape) in epilogue)


# -- the self-check driver, for real on emu ------------------------------------------

def test_selfcheck_runs_every_family_on_emu_and_matches_the_reference():
    from gpubn import selfcheck

    backend_or_skip("emu")
    shapes = [s for s in selfcheck.SHAPES if s.shape in ((16, 3, 1501), (4001, 3), (3, 1031))]
    outcomes = selfcheck.selfcheck("emu", dtypes=["float32"], shapes=shapes, repeat=True)
    summary = selfcheck.summarize(outcomes)
    assert summary["ok"], summary
    assert summary["checks"] == {"reference": {"ok": 8, "differ": 0},
                                 "repeat": {"ok": 8, "differ": 0}}
    assert {o.op for o in outcomes} == {"bn_train", "bn_eval", "renorm_train", "ln",
                                        "ln_noaffine"}


def test_selfcheck_catches_planted_differences():
    from gpubn import selfcheck
    from gpubn.backends import get_backend
    from gpubn.backends.numpy_backend import NumpyBackend

    shape = [selfcheck.Shape("batch_norm", (3, 5, 7, 9), 1)]

    class Drifting(NumpyBackend):
        """Runs differ in the last bit of y: a nondeterministic reduction."""
        calls = 0

        def bn_forward_train(self, *args):
            y, mean, invstd = super().bn_forward_train(*args)
            Drifting.calls += 1
            return np.nextafter(y, np.inf) if Drifting.calls % 2 else y, mean, invstd

    outcomes = selfcheck.selfcheck(Drifting(), dtypes=["float32"], shapes=shape,
                                   reference=False, repeat=True)
    bad = [o for o in outcomes if not o.ok]
    assert [(o.op, o.check, o.detail) for o in bad] == [("bn_train", "repeat", "differ: y")]

    class Wrong(NumpyBackend):
        def bn_forward_eval(self, x3, weight, bias, rm, rv, eps):
            y, mean, invstd = super().bn_forward_eval(x3, weight, bias, rm, rv, eps)
            return y * 1.001, mean, invstd

    outcomes = selfcheck.selfcheck(Wrong(), dtypes=["float32"], shapes=shape)
    summary = selfcheck.summarize(outcomes)
    assert not summary["ok"]
    assert [(f["op"], f["detail"][:2]) for f in summary["failures"]] == [("bn_eval", "y:")]
    # against another backend: batch norm differences fail, layer norm ones are notes
    rows = [selfcheck.Shape("layer_norm", (7, 33), 1)]
    ln = selfcheck.selfcheck(get_backend("numpy"), dtypes=["float32"], shapes=shape + rows,
                             reference=False, against=Wrong())
    summary = selfcheck.summarize(ln)
    assert [f["op"] for f in summary["failures"]] == ["bn_eval"]
    assert summary["notes"] == []


def test_selfcheck_command_line_reports_json_and_exit_status(capsys):
    from gpubn import selfcheck

    assert selfcheck.main(["--backend", "numpy", "--dtype", "float64", "--family",
                           "layer_norm", "--quiet", "--determinism"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["ok"] and summary["checks"]["repeat"] == {"ok": 6, "differ": 0}
    assert selfcheck.main(["--backend", "nope", "--quiet"]) == 2
    assert "nope" in json.loads(capsys.readouterr().out.strip().splitlines()[-1])["error"]
