"""The GPU acceptance run behind ``.ci/gpu`` (contract: GPU-CHECK in the
project notes; summary in the README).

``python -m bench.gpucheck [OUTDIR]`` runs, in this order and each in a
process of its own with a time limit:

1. ``device``: GPU, SM count, memory, driver, CUDA runtime, CuPy, PyTorch,
   and the device-to-device copy bandwidth measured with CuPy;
2. ``tests``: ``pytest -q -x -k cuda`` (the cuda tests and every
   backend-parametrized test's cuda instance), a per-test timeout;
3. ``memcheck``, ``racecheck``, ``synccheck`` and, when time is left,
   ``initcheck``: ``compute-sanitizer`` over ``python -m gpubn.selfcheck``;
4. ``determinism``: every op twice, bitwise equal; cuda against emu on the
   same launch configuration, bitwise where promised;
5. ``bench``: ``python -m bench gpu --suite standard`` in float32 and
   float16 against PyTorch with and without cuDNN;
6. ``profile`` (when time is left): ``ncu`` on one large forward and
   backward per layout: DRAM throughput and achieved occupancy per kernel.

Every step's result is written to ``OUTDIR/gpu.json`` and
``OUTDIR/summary.md`` as soon as it is known, so a run cut short still
reports what it reached.  The whole run stays within ``--budget`` seconds
(default 450, under the contract's 8 minutes): each step gets at most its own
cap and never the time the later required steps need at least; a step that
would get less than its minimum is skipped and says so.  Missing optional
tools (``compute-sanitizer``, ``ncu``, emu's C++ compiler) are reported and
skipped.  The exit status is 1 when a test, a sanitizer or a determinism
check failed (or the device could not be used), else 0; benchmark and
profile numbers never fail the run.  Nothing is installed; child processes
run gpubn from the checkout (``PYTHONPATH``).

The step logic is plain Python tested without a GPU (``tests/test_gpucheck.py``)
with a stand-in for the command runner and the clock.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

PASS, FAIL, SKIP, TIMEOUT, ERROR = "pass", "fail", "skipped", "timeout", "error"
# Tools the run uses when present; none is required.
SANITIZER = "compute-sanitizer"
NCU = "ncu"
SANITIZER_ERROR_EXIT = 97
# ncu metrics: DRAM throughput in % of peak, achieved occupancy in %.
NCU_METRICS = ("dram__throughput.avg.pct_of_peak_sustained_elapsed",
               "sm__warps_active.avg.pct_of_peak_sustained_active")


@dataclass
class CommandResult:
    returncode: Optional[int]   # None when the command was killed at its time limit
    seconds: float
    output: str                 # stdout and stderr together

    @property
    def timed_out(self) -> bool:
        return self.returncode is None


def run_command(cmd: Sequence[str], *, timeout: float, env: Dict[str, str], cwd: str,
                log_path: str) -> CommandResult:
    """Run ``cmd`` in a new process group, output appended to ``log_path``;
    at ``timeout`` the whole group is killed (a hung test or a sanitizer's
    children too)."""
    t0 = time.monotonic()
    with open(log_path, "ab") as log:
        log.write(f"\n$ {' '.join(cmd)}\n".encode())
        log.flush()
        proc = subprocess.Popen(list(cmd), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                env=env, cwd=cwd, start_new_session=True)
        try:
            out, _ = proc.communicate(timeout=max(timeout, 0.1))
            code: Optional[int] = proc.returncode
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            out, _ = proc.communicate()
            code = None
        log.write(out)
        if code is None:
            log.write(f"\n[killed after {timeout:.0f} s]\n".encode())
    return CommandResult(code, time.monotonic() - t0, out.decode(errors="replace"))


# -- parsing the children's output ---------------------------------------------------

def last_json(output: str) -> Optional[Dict]:
    """The last line of ``output`` that is a JSON object, or None."""
    for line in reversed(output.strip().splitlines()):
        line = line.strip()
        if line.startswith("{"):
            try:
                return json.loads(line)
            except ValueError:
                continue
    return None


_PYTEST_COUNT = re.compile(r"(\d+) (passed|failed|errors?|skipped|xfailed|xpassed|deselected)")


def pytest_counts(output: str) -> Dict[str, int]:
    """Counts from pytest's final summary line (``3 passed, 1 skipped in 2.0s``)."""
    counts: Dict[str, int] = {}
    for line in reversed(output.strip().splitlines()):
        found = _PYTEST_COUNT.findall(line)
        if found and (" in " in line or line.startswith("=")):
            for n, what in found:
                counts["errors" if what.startswith("error") else what] = int(n)
            break
    return counts


_SANITIZER_SUMMARY = re.compile(r"ERROR SUMMARY: (\d+) errors?")


def sanitizer_errors(output: str) -> Optional[int]:
    """The error count of compute-sanitizer's summary line, None without one."""
    found = _SANITIZER_SUMMARY.findall(output)
    return int(found[-1]) if found else None


def ncu_table(output: str) -> List[Dict]:
    """Kernel rows from ``ncu --csv`` output: one dict per launch with the
    kernel name and each metric of ``NCU_METRICS`` as a float."""
    lines = [ln for ln in output.splitlines() if ln.startswith('"')]
    if not lines:
        return []
    by_launch: Dict[str, Dict] = {}
    for rec in csv.DictReader(io.StringIO("\n".join(lines))):
        name, metric = rec.get("Kernel Name"), rec.get("Metric Name")
        if not name or metric not in NCU_METRICS:
            continue
        row = by_launch.setdefault(rec.get("ID", name), {"kernel": name})
        try:
            row[metric] = float(str(rec.get("Metric Value", "")).replace(",", ""))
        except ValueError:
            row[metric] = None
    return list(by_launch.values())


# -- the run -------------------------------------------------------------------------

@dataclass
class Step:
    """One step: at most ``cap_s`` seconds, not started with less than
    ``min_s``; a ``required`` step's failure fails the run, and its minimum
    is reserved while earlier steps run."""

    key: str
    title: str
    cap_s: float
    min_s: float
    required: bool
    run: Callable[["GpuCheck", "Step", float], Dict]


@dataclass
class StepResult:
    key: str
    title: str
    status: str
    seconds: float = 0.0
    detail: str = ""
    log: str = ""
    data: Dict = field(default_factory=dict)

    def as_dict(self) -> Dict:
        return dict(self.__dict__)


class GpuCheck:
    """The acceptance run.  ``runner`` (``run_command``'s signature),
    ``which`` and ``clock`` are replaceable for the tests."""

    LOGS = {"tests": "pytest.log", "memcheck": "sanitizer-memcheck.log",
            "racecheck": "sanitizer-racecheck.log", "synccheck": "sanitizer-synccheck.log",
            "initcheck": "sanitizer-initcheck.log"}
    STEP_LOG = "steps.log"   # device, determinism, bench and profile output

    def __init__(self, outdir: str, *, root: str = ROOT, python: str = sys.executable,
                 budget_s: float = 450.0, runner=run_command, which=shutil.which,
                 clock=time.monotonic, test_timeout_s: float = 60.0,
                 bench_repeats: int = 20):
        self.outdir = outdir
        self.root = root
        self.python = python
        self.budget_s = budget_s
        self.runner = runner
        self.which = which
        self.clock = clock
        self.test_timeout_s = test_timeout_s
        self.bench_repeats = bench_repeats
        self.results: List[StepResult] = []
        self.device: Dict = {}
        self.bench_rows: List[Dict] = []
        self.env = dict(os.environ)
        self.env["PYTHONPATH"] = os.pathsep.join(
            [root] + [p for p in [os.environ.get("PYTHONPATH")] if p])
        self.env.setdefault("PYTHONUNBUFFERED", "1")
        self.started = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        self.steps = self.default_steps()

    # -- the steps, in order -----------------------------------------------------
    def default_steps(self) -> List[Step]:
        return [
            Step("device", "Device and versions", 60, 20, True, GpuCheck.step_device),
            Step("tests", "Tests on the device", 150, 30, True, GpuCheck.step_tests),
            Step("memcheck", "Sanitizer: memcheck", 60, 20, True, GpuCheck.step_sanitizer),
            Step("racecheck", "Sanitizer: racecheck", 60, 20, True, GpuCheck.step_sanitizer),
            Step("synccheck", "Sanitizer: synccheck", 45, 15, True, GpuCheck.step_sanitizer),
            Step("initcheck", "Sanitizer: initcheck", 45, 15, False, GpuCheck.step_sanitizer),
            Step("determinism", "Determinism", 45, 15, True, GpuCheck.step_determinism),
            Step("bench", "Benchmark", 150, 40, False, GpuCheck.step_bench),
            Step("profile", "Profile", 60, 30, False, GpuCheck.step_profile),
        ]

    def _py(self, *args: str) -> List[str]:
        return [self.python, *args]

    def _call(self, cmd: Sequence[str], timeout: float, log: str) -> CommandResult:
        return self.runner(list(cmd), timeout=timeout, env=self.env, cwd=self.root,
                           log_path=os.path.join(self.outdir, log))

    def step_device(self, step: Step, timeout: float) -> Dict:
        res = self._call(self._py("-m", "bench.gpucheck", "--probe", "device"), timeout,
                         self.STEP_LOG)
        info = last_json(res.output)
        if res.timed_out:
            return {"status": TIMEOUT, "seconds": res.seconds,
                    "detail": f"no answer within {timeout:.0f} s"}
        if res.returncode != 0 or not info or "error" in info:
            why = (info or {}).get("error") or _tail(res.output)
            return {"status": FAIL, "seconds": res.seconds, "detail": f"no usable GPU: {why}"}
        self.device = info
        return {"status": PASS, "seconds": res.seconds, "data": info,
                "detail": f"{info.get('name')}, copy {info.get('copy_gbps', 0):.0f} GB/s"}

    def step_tests(self, step: Step, timeout: float) -> Dict:
        cmd = self._py("-m", "pytest", "-q", "-x", "-k", "cuda", "-p", "no:cacheprovider",
                       "-o", f"faulthandler_timeout={self.test_timeout_s:.0f}", "tests")
        if self._has_module("pytest_timeout"):
            cmd[3:3] = [f"--timeout={self.test_timeout_s:.0f}"]
        res = self._call(cmd, timeout, self.LOGS["tests"])
        counts = pytest_counts(res.output)
        if res.timed_out:
            return {"status": TIMEOUT, "seconds": res.seconds, "data": counts,
                    "detail": f"pytest did not finish within {timeout:.0f} s"}
        ok = res.returncode == 0 and counts.get("passed", 0) > 0
        detail = ", ".join(f"{n} {k}" for k, n in counts.items()) or _tail(res.output)
        if res.returncode == 0 and not counts.get("passed"):
            detail = "no test passed (" + detail + ")"
        return {"status": PASS if ok else FAIL, "seconds": res.seconds, "data": counts,
                "detail": detail}

    def step_sanitizer(self, step: Step, timeout: float) -> Dict:
        tool = self.which(SANITIZER)
        if not tool:
            return {"status": SKIP, "detail": f"{SANITIZER} not found"}
        cmd = [tool, "--tool", step.key, "--error-exitcode", str(SANITIZER_ERROR_EXIT),
               *self._py("-m", "gpubn.selfcheck", "--backend", "cuda", "--quiet")]
        if step.key == "racecheck":
            cmd[3:3] = ["--racecheck-report", "all"]
        res = self._call(cmd, timeout, self.LOGS[step.key])
        errors = sanitizer_errors(res.output)
        summary = last_json(res.output) or {}
        data = {"errors": errors, "selfcheck": summary.get("checks")}
        if res.timed_out:
            return {"status": TIMEOUT, "seconds": res.seconds, "data": data,
                    "detail": f"did not finish within {timeout:.0f} s"}
        if res.returncode == 0 and errors == 0:
            return {"status": PASS, "seconds": res.seconds, "data": data,
                    "detail": "0 errors"}
        if errors:
            detail = f"{errors} error(s) reported"
        elif summary.get("failures"):
            detail = f"{len(summary['failures'])} self-check failure(s)"
        else:
            detail = f"exit status {res.returncode}: {_tail(res.output)}"
        return {"status": FAIL, "seconds": res.seconds, "data": data, "detail": detail}

    def step_determinism(self, step: Step, timeout: float) -> Dict:
        against = ["--against", "emu"]
        note = ""
        if not (self.which(os.environ.get("CXX", "g++")) or self.which("c++")):
            against, note = [], "; cuda vs emu skipped: no C++ compiler for emu"
        cmd = self._py("-m", "gpubn.selfcheck", "--backend", "cuda", "--no-reference",
                       "--determinism", "--quiet", *against)
        res = self._call(cmd, timeout, self.STEP_LOG)
        summary = last_json(res.output)
        if res.timed_out:
            return {"status": TIMEOUT, "seconds": res.seconds,
                    "detail": f"did not finish within {timeout:.0f} s"}
        if not summary or "checks" not in summary:
            why = (summary or {}).get("error") or _tail(res.output)
            return {"status": FAIL, "seconds": res.seconds, "detail": f"did not run: {why}"}
        parts = [f"{k}: {v['ok']} equal, {v['differ']} differ"
                 for k, v in summary["checks"].items()]
        ok = res.returncode == 0 and summary.get("ok")
        return {"status": PASS if ok else FAIL, "seconds": res.seconds, "data": summary,
                "detail": "; ".join(parts) + note}

    def step_bench(self, step: Step, timeout: float) -> Dict:
        from .report import read_jsonl

        deadline = self.clock() + timeout
        tmp = tempfile.mkdtemp(prefix="gpubn-bench-")
        statuses, seconds = [], 0.0
        try:
            for dtype in ("float32", "float16"):
                left = deadline - self.clock()
                if left < step.min_s / 2:
                    statuses.append(f"{dtype}: skipped (time budget)")
                    continue
                out = os.path.join(tmp, f"{dtype}.jsonl")
                cmd = self._py("-m", "bench", "gpu", "--suite", "standard", "--dtype", dtype,
                               "--repeats", str(self.bench_repeats), "--no-chart", "--quiet",
                               "--markdown", "--out", out)
                res = self._call(cmd, left, self.STEP_LOG)
                seconds += res.seconds
                rows = read_jsonl(out) if os.path.exists(out) else []
                self.bench_rows += rows
                statuses.append(f"{dtype}: " + ("timeout" if res.timed_out else
                                                 f"{len(rows)} rows" if rows else
                                                 f"no rows ({_tail(res.output)})"))
                self._write()
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        status = PASS if self.bench_rows else ERROR
        return {"status": status, "seconds": seconds, "detail": "; ".join(statuses),
                "data": {"rows": len(self.bench_rows)}}

    def step_profile(self, step: Step, timeout: float) -> Dict:
        tool = self.which(NCU)
        if not tool:
            return {"status": SKIP, "detail": f"{NCU} not found"}
        cmd = [tool, "--csv", "--metrics", ",".join(NCU_METRICS), "--kernel-name",
               "regex:bn_|ln_", *self._py("-m", "bench.gpucheck", "--probe", "profile")]
        res = self._call(cmd, timeout, self.STEP_LOG)
        table = ncu_table(res.output)
        if res.timed_out and not table:
            return {"status": TIMEOUT, "seconds": res.seconds,
                    "detail": f"did not finish within {timeout:.0f} s"}
        if not table:
            return {"status": ERROR, "seconds": res.seconds,
                    "detail": f"no kernel metrics: {_tail(res.output)}"}
        return {"status": PASS, "seconds": res.seconds, "data": {"kernels": table},
                "detail": f"{len(table)} kernel launches profiled"}

    def _has_module(self, name: str) -> bool:
        res = self.runner(self._py("-c", f"import {name}"), timeout=30, env=self.env,
                          cwd=self.root, log_path=os.devnull)
        return res.returncode == 0

    # -- sequencing and the time budget ------------------------------------------
    def run(self) -> int:
        os.makedirs(self.outdir, exist_ok=True)
        for name in set(self.LOGS.values()) | {self.STEP_LOG}:
            open(os.path.join(self.outdir, name), "w").close()
        t0 = self.clock()
        self._write()
        stop = ""
        for i, step in enumerate(self.steps):
            reserve = sum(s.min_s for s in self.steps[i + 1:] if s.required)
            left = self.budget_s - (self.clock() - t0)
            timeout = min(step.cap_s, left - reserve)
            if stop:
                result = StepResult(step.key, step.title, SKIP, detail=stop)
            elif timeout < step.min_s:
                result = StepResult(step.key, step.title, SKIP,
                                    detail=f"time budget ({max(left, 0):.0f} s left)")
            else:
                out = step.run(self, step, timeout)
                result = StepResult(step.key, step.title, out["status"],
                                    out.get("seconds", 0.0), out.get("detail", ""),
                                    self.LOGS.get(step.key, self.STEP_LOG)
                                    if out["status"] != SKIP else "",
                                    out.get("data", {}))
            self.results.append(result)
            if step.key == "device" and result.status != PASS:
                stop = "no usable GPU (see the device step)"
            self._write()
        return 1 if self.failed() else 0

    def failed(self) -> List[StepResult]:
        """Results that fail the run: required steps that failed or timed out."""
        required = {s.key for s in self.steps if s.required}
        return [r for r in self.results
                if r.key in required and r.status in (FAIL, TIMEOUT, ERROR)]

    def verdict(self) -> str:
        if self.failed():
            return "FAIL"
        return "PASS" if len(self.results) == len(self.steps) else "RUNNING"

    # -- output ------------------------------------------------------------------
    def report(self) -> Dict:
        return {"schema": 1, "started": self.started, "commit": self.commit(),
                "budget_s": self.budget_s, "verdict": self.verdict(),
                "device": self.device,
                "steps": [r.as_dict() for r in self.results],
                "pending": [s.key for s in self.steps[len(self.results):]],
                "bench": self.bench_rows}

    def commit(self) -> Optional[str]:
        if not hasattr(self, "_commit"):
            self._commit = None
            head = os.path.join(self.root, ".git")
            if os.path.exists(head) and self.which("git"):
                try:
                    self._commit = subprocess.run(
                        ["git", "rev-parse", "--short", "HEAD"], cwd=self.root,
                        capture_output=True, text=True, timeout=10).stdout.strip() or None
                except (OSError, subprocess.SubprocessError):
                    self._commit = None
        return self._commit

    def _write(self) -> None:
        report = self.report()
        _write_atomic(os.path.join(self.outdir, "gpu.json"), json.dumps(report, indent=1))
        _write_atomic(os.path.join(self.outdir, "summary.md"), format_summary(report))


def _tail(text: str, n: int = 200) -> str:
    lines = [ln for ln in text.strip().splitlines() if ln.strip()]
    return (lines[-1] if lines else "no output")[-n:]


def _write_atomic(path: str, text: str) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)


# -- summary.md --------------------------------------------------------------------

def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c).replace("|", "/") for c in r) + " |" for r in rows]
    return "\n".join(lines)


def _pct(v) -> str:
    return "-" if v is None else f"{100 * v:.0f}%"


def _num(v, fmt="{:.0f}") -> str:
    return "-" if v is None else fmt.format(v)


def bench_table(rows: Sequence[Dict]) -> str:
    """One line per (case, op, dtype): gpubn's time, GB/s and share of the
    copy bandwidth, PyTorch's (cuDNN and native) times and the ratio to the
    faster of them."""
    groups: Dict[tuple, Dict[str, Dict]] = {}
    for r in rows:
        key = (r["kind"], r["layout"], "x".join(map(str, r["shape"])), r["dtype"], r["op"])
        groups.setdefault(key, {})[r["provider"]] = r
    body = []
    for (kind, layout, shape, dtype, op), by in groups.items():
        g = by.get("gpubn-cuda", {})
        torch_times = {p: r.get("median_s") for p, r in by.items()
                       if r.get("backend") == "torch" and r.get("median_s")}
        best = min(torch_times.values()) if torch_times else None
        status = g.get("status", "-")
        check = g.get("check", "")
        body.append([
            f"{kind} {op}", layout, shape, dtype,
            _num(g.get("median_s") and g["median_s"] * 1e6, "{:.1f}") if status == "ok"
            else f"{status}: {g.get('reason', '')[:60]}",
            _num(g.get("gbps")), _pct(g.get("copy_share")),
            _num(torch_times.get("torch-cuda") and torch_times["torch-cuda"] * 1e6, "{:.1f}"),
            _num(torch_times.get("torch-cuda-native")
                 and torch_times["torch-cuda-native"] * 1e6, "{:.1f}"),
            _num(g.get("median_s") / best if best and g.get("median_s") else None, "{:.2f}"),
            "MISMATCH" if check.startswith("mismatch") else "ok" if check else "-",
        ])
    return _table(["op", "layout", "shape", "dtype", "gpubn us", "GB/s", "of copy",
                   "cuDNN us", "native us", "ratio to best torch", "check"], body)


def format_summary(report: Dict) -> str:
    """summary.md: the verdict and the step table first, then one table per
    step that has numbers."""
    steps = report["steps"]
    lines = [f"# gpubn GPU acceptance run: {report['verdict']}", "",
             f"started {report['started']}, commit {report.get('commit') or '?'}, "
             f"budget {report['budget_s']:.0f} s", ""]
    body = [[s["title"], s["status"].upper() if s["status"] in (FAIL, TIMEOUT, ERROR)
             else s["status"], f"{s['seconds']:.0f} s", s["detail"], s["log"] or "-"]
            for s in steps]
    body += [[k, "pending", "-", "-", "-"] for k in report.get("pending", [])]
    lines += [_table(["step", "status", "time", "detail", "log"], body), ""]
    dev = report.get("device") or {}
    if dev:
        keys = ("name", "compute_capability", "sm_count", "memory_gib", "driver",
                "cuda_runtime", "cupy", "torch", "torch_cuda", "cudnn", "peak_gbps",
                "memcpy_gbps", "copy_kernel_gbps", "copy_gbps")
        lines += ["## Device", "",
                  _table(["", "value"], [[k, _fmt_value(dev.get(k))] for k in keys
                                         if k in dev]), ""]
    for s in steps:
        if s["key"] == "determinism" and s["data"].get("checks"):
            rows = [[k, v["ok"], v["differ"]] for k, v in s["data"]["checks"].items()]
            lines += ["## Determinism", "", _table(["check", "equal", "differ"], rows), ""]
            bad = s["data"].get("failures", []) + s["data"].get("notes", [])
            if bad:
                lines += [_table(["op", "shape", "dtype", "check", "outputs", "fails run"],
                                 [[b["op"], b["shape"], b["dtype"], b["check"], b["detail"],
                                   "yes" if b["promised"] else "no"] for b in bad]), ""]
        if s["key"] == "profile" and s["data"].get("kernels"):
            rows = [[k["kernel"][:70], _num(k.get(NCU_METRICS[0]), "{:.1f}"),
                     _num(k.get(NCU_METRICS[1]), "{:.1f}")] for k in s["data"]["kernels"]]
            lines += ["## Profile (ncu)", "",
                      _table(["kernel", "DRAM throughput %", "achieved occupancy %"], rows), ""]
    if report.get("bench"):
        lines += ["## Benchmark", "",
                  "median of CUDA-event timings; GB/s = minimum bytes of the op / time; "
                  "'of copy' = share of the measured device-to-device copy bandwidth; "
                  "ratio < 1: gpubn is faster than the faster PyTorch path; 'cuDNN us' of a "
                  "channels-last (NHWC) training row is cuDNN's persistent mode "
                  "(CUDNN_BATCHNORM_SPATIAL_PERSISTENT, ATen's choice for channels-last "
                  "training); *_add_relu rows: gpubn's fused epilogue against PyTorch's "
                  "batch norm + in-place add + in-place ReLU", "",
                  bench_table(report["bench"]), ""]
    return "\n".join(lines)


def _fmt_value(v) -> str:
    if isinstance(v, float):
        return f"{v:.1f}"
    return str(v)


# -- probes (run in child processes, on the GPU) -------------------------------------

def probe_device() -> Dict:
    """Device and versions, and the copy bandwidth (needs CuPy and a GPU)."""
    import cupy

    from .gpu import copy_bandwidth, device_info

    info = device_info(cupy.cuda.Device().id)
    dev = cupy.cuda.Device()
    info["compute_capability"] = dev.compute_capability
    info["memory_gib"] = dev.mem_info[1] / 2 ** 30
    info["cupy"] = cupy.__version__
    try:
        import torch
        info["torch"] = torch.__version__
        info["torch_cuda"] = torch.version.cuda
        info["cudnn"] = torch.backends.cudnn.version() if torch.cuda.is_available() else None
    except ImportError:
        info["torch"] = None
    info.update(copy_bandwidth())
    return info


def probe_profile() -> Dict:
    """One large forward (training) and backward per layout, for ``ncu``."""
    import cupy

    import gpubn

    launches = 0
    for shape, axis in (((32, 256, 56, 56), 1), ((32, 56, 56, 256), -1)):
        x = cupy.random.standard_normal(shape, dtype=cupy.float32)
        dy = cupy.random.standard_normal(shape, dtype=cupy.float32)
        c = shape[axis]
        w = cupy.ones(c, cupy.float32)
        b = cupy.zeros(c, cupy.float32)
        y, saved = gpubn.batch_norm_forward(x, weight=w, bias=b, training=True, axis=axis,
                                            backend="cuda")
        gpubn.batch_norm_backward(dy, saved)
        launches += 1
    cupy.cuda.get_current_stream().synchronize()
    return {"ok": True, "cases": launches}


# -- command line --------------------------------------------------------------------

def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.gpucheck",
                                description="The GPU acceptance run (.ci/gpu).")
    p.add_argument("outdir", nargs="?", default="gpu-results",
                   help="where summary.md, gpu.json and the logs go (default ./gpu-results)")
    p.add_argument("--budget", type=float, default=float(os.environ.get("GPUCHECK_BUDGET", 450)),
                   help="seconds for the whole run (default 450, or $GPUCHECK_BUDGET)")
    p.add_argument("--probe", choices=("device", "profile"), default=None,
                   help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.probe:
        try:
            out = probe_device() if args.probe == "device" else probe_profile()
        except Exception as exc:  # reported to the parent, which decides
            print(json.dumps({"error": f"{type(exc).__name__}: {exc}"}))
            return 1
        print(json.dumps(out))
        return 0
    if args.budget <= 0:
        p.error("--budget must be positive")
    check = GpuCheck(args.outdir, budget_s=args.budget)
    status = check.run()
    print(format_summary(check.report()))
    print(f"\nresults in {os.path.abspath(args.outdir)} (exit status {status})")
    return status


if __name__ == "__main__":
    sys.exit(main())
