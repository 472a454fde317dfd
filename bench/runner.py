"""Measure a suite: every (case, op) on every provider, one shared setup.

For each (case, op) the runner builds one :class:`~bench.inputs.Setup`, asks
each provider for a callable, calls it once untimed (warm-up, and its outputs
are compared with the peer's, so a wrong result cannot hide behind a fast
time), then times ``warmup`` more untimed and ``repeats`` timed calls with
the provider's timer (the host clock on the CPU, CUDA events on the GPU).
Every timed call follows one of the same provider's: a call right after
another library's would be timed partly in its wake (PyTorch's OpenMP
threads keep spinning on the cores for a while after its call returns; a
2.8 ms call of the NumPy backend took 4.6 ms right after PyTorch on two
cores), which no program calling one library in a loop sees.  In one
process, a provider's calls run in one block, back to back.  With
``isolate`` (the command line's default), each CPU provider is timed in a
process of its own per case (:mod:`bench.worker`): the providers share no
allocator, caches or threads, so one library's memory (a cache holding
buffers, another's freed blocks at the top of the heap) cannot decide
whether another's fresh outputs fault in new pages.  Those processes take
turns (:func:`time_interleaved`): a provider's timed calls are spread over
up to five rounds, each begun with untimed warm-up calls, so a machine
whose speed drifts from minute to minute (a shared virtual machine's
memory bandwidth) meets all providers alike.  Each measurement becomes one
row (a dict, see :func:`make_row`); providers that
cannot run become rows with ``status`` "unavailable" and the reason.
"""

from __future__ import annotations

import gc
import json
import os
import subprocess
import sys
import tempfile
import time
import traceback
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

from .inputs import make_setup
from .metrics import bytes_moved, gbps, summarize
from .report import format_time
from .suites import Case, KIND_ABBREV
from .worker import REPLY

MIN_REPEATS = 3
ROUNDS = 5          # turns the providers' timed calls are spread over (isolated timing)

# Largest allowed relative error (max |a - b| / max |b|) of any output
# against the peer's, per dtype.  float32 reductions over millions of values
# differ between summation orders by ~1e-5 relative.
CHECK_TOL = {"float16": 2e-2, "float32": 2e-3, "float64": 1e-9}

OUTPUT_NAMES = {
    "fwd_train": ("y",),
    "fwd_infer": ("y",),
    "bwd": ("dx", "dweight", "dbias"),
    "fwd_bwd": ("y", "dx", "dweight", "dbias"),
    "fwd_train_add_relu": ("y",),
    "bwd_add_relu": ("dx", "dweight", "dbias", "dresidual"),
}


def compare(outputs: Sequence[np.ndarray], reference: Sequence[np.ndarray], op: str,
            dtype: str) -> str:
    """"ok" or a sentence naming the first output that differs and by how much."""
    names = OUTPUT_NAMES[op]
    if len(outputs) != len(names) or len(reference) != len(names):
        return f"mismatch: expected {len(names)} outputs {names}, got {len(outputs)} and {len(reference)}"
    tol = CHECK_TOL[dtype]
    # float32 arithmetic is exact enough for a relative check at these
    # tolerances and keeps large GPU-suite outputs cheap to compare
    work = np.float64 if dtype == "float64" else np.float32
    for name, a, b in zip(names, outputs, reference):
        a = np.asarray(a, dtype=work)
        b = np.asarray(b, dtype=work)
        if a.shape != b.shape:
            return f"mismatch: {name} has shape {a.shape}, expected {b.shape}"
        if not np.all(np.isfinite(a)):
            return f"mismatch: {name} has non-finite values"
        scale = max(float(np.max(np.abs(b))) if b.size else 0.0, 1e-30)
        err = float(np.max(np.abs(a - b))) / scale if a.size else 0.0
        if not err <= tol:
            return f"mismatch: {name} differs by {err:.2e} relative (tolerance {tol:.0e})"
    return "ok"


def make_row(case: Case, op: str, provider, *, status: str = "ok", times=None,
             reason: str = "", check: str = "", peak_bytes_per_s: Optional[float] = None,
             loop_bytes_per_s: Optional[float] = None, suite: str = "") -> Dict:
    """One result row.  ``peak_bytes_per_s``: the floor ``peak_share`` is
    taken against (GPU: the device's peak; CPU: a large NumPy copy);
    ``loop_bytes_per_s`` (CPU): the same copy by a compiled loop, for
    ``loop_share``."""
    nbytes = bytes_moved(case.kind, op, case.shape, case.axis, case.dtype)
    row = {
        "suite": suite,
        "device": provider.device,
        "provider": provider.name,
        "backend": provider.backend,
        "kind": case.kind,
        "op": op,
        "layout": case.layout,
        "shape": list(case.shape),
        "axis": case.axis,
        "dtype": case.dtype,
        "label": case.label,
        "numel": case.numel,
        "bytes": nbytes,
        "status": status,
        "reason": reason,
        "check": check,
        "median_s": None, "min_s": None, "max_s": None, "repeats": 0,
        "gbps": None, "peak_gbps": None, "peak_share": None,
        "loop_gbps": None, "loop_share": None,
        "ratio_to_torch": None,
    }
    if provider.note:
        row["note"] = provider.note
    if times is not None:
        s = summarize(times)
        row.update(median_s=s["median"], min_s=s["min"], max_s=s["max"], repeats=s["repeats"])
        row["gbps"] = gbps(nbytes, s["median"])
        if peak_bytes_per_s:
            row["peak_gbps"] = peak_bytes_per_s / 1e9
            row["peak_share"] = row["gbps"] / row["peak_gbps"] if row["gbps"] else None
        if loop_bytes_per_s:
            row["loop_gbps"] = loop_bytes_per_s / 1e9
            row["loop_share"] = row["gbps"] / row["loop_gbps"] if row["gbps"] else None
    return row


def add_ratios(rows: List[Dict]) -> None:
    """Fill ``ratio_to_torch``: median time over the median of the fastest
    torch row (on the GPU: cuDNN or PyTorch's native kernels) of the same
    (device, case, op) in the same run."""
    peers = {}
    for r in rows:
        if r["backend"] == "torch" and r["median_s"]:
            key = (r["device"], r["kind"], r["layout"], tuple(r["shape"]), r["dtype"], r["op"])
            peers[key] = min(r["median_s"], peers.get(key, r["median_s"]))
    for r in rows:
        key = (r["device"], r["kind"], r["layout"], tuple(r["shape"]), r["dtype"], r["op"])
        if r["median_s"] and key in peers:
            r["ratio_to_torch"] = r["median_s"] / peers[key]


class Progress:
    """One line per measurement on a stream (stderr by default)."""

    def __init__(self, total: int, stream=None, enabled: bool = True):
        self.total = total
        self.done = 0
        self.stream = stream if stream is not None else sys.stderr
        self.enabled = enabled
        self.t0 = time.perf_counter()

    def step(self, text: str) -> None:
        self.done += 1
        if self.enabled:
            elapsed = time.perf_counter() - self.t0
            print(f"[{self.done:>4}/{self.total}] {elapsed:7.1f}s  {text}", file=self.stream, flush=True)


def _desc(case, op, p):
    return f"{KIND_ABBREV[case.kind]} {case.layout} {case.shape_str} {case.dtype} {op} {p.name}"


def error_text(exc) -> str:
    if "BENCH_DEBUG" in os.environ:
        traceback.print_exception(exc)
    text = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
    return text.splitlines()[0][:300]


def _calls(per_call: Optional[float], repeats: int, warmup: int,
           budget: Optional[float]) -> Tuple[int, int]:
    """``(timed, warm-up)`` calls for a CPU provider whose call takes
    ``per_call`` seconds: with a ``budget`` (seconds per provider),
    ``max(3, budget / per_call)`` timed calls at most ``repeats``, and no
    warm-up calls beyond the first when that alone exceeds the budget."""
    n, w = repeats, warmup
    if budget and per_call:
        n = max(min(repeats, MIN_REPEATS), min(repeats, int(budget / per_call)))
        w = 0 if per_call * (warmup + n) > budget else warmup
    return n, w


def _check_op(case, op, setup, providers, reasons, *, suite, check, progress,
              slow: Optional[float] = None):
    """Prepare every provider for one (case, op) and make its first call,
    untimed, checking its outputs against the peer's.  Returns the rows of
    providers that cannot run it, ``ready`` as ``(provider, fn, verdict)``
    and the seconds of each one's call.  A CPU provider's first call slower
    than ``slow`` seconds is followed by a second, and the lesser counts: a
    first call may load or compile code, and sizing the timed calls by it
    left a median of 3 cold calls where 20 warm ones fit the budget."""
    rows: Dict[str, Dict] = {}
    ready = []
    per_call: Dict[str, float] = {}
    reference = None
    for p in providers:
        reason = reasons[p.name] or p.supports(case, op)
        if reason:
            rows[p.name] = make_row(case, op, p, status="unavailable", reason=reason, suite=suite)
            progress.step(f"{_desc(case, op, p)}: unavailable ({reason})")
            continue
        try:
            fn = p.prepare(setup, op)
            t0 = time.perf_counter()
            raw = fn()
            t1 = time.perf_counter()
            outputs = p.to_host(raw)
            del raw
            per_call[p.name] = t1 - t0
            if p.device == "cpu" and slow is not None and per_call[p.name] > slow:
                t0 = time.perf_counter()
                fn()
                per_call[p.name] = min(per_call[p.name], time.perf_counter() - t0)
        except Exception as exc:  # one failing provider must not stop the run
            msg = error_text(exc)
            # a backend without this op yet is unavailable, not broken
            status = "unavailable" if isinstance(exc, NotImplementedError) else "error"
            rows[p.name] = make_row(case, op, p, status=status, reason=msg, suite=suite)
            progress.step(f"{_desc(case, op, p)}: {status} ({msg})")
            continue
        verdict = ""
        if check:
            if reference is None:
                reference, verdict = outputs, "reference"
            else:
                verdict = compare(outputs, reference, op, case.dtype)
        del outputs
        ready.append((p, fn, verdict))
    reference = None
    gc.collect()
    return rows, ready, per_call


def _timed_row(case, op, p, result, verdict, *, suite, peak_bytes_per_s, progress,
               isolated=False, loop_bytes_per_s=None) -> Dict:
    """The row of one timing: a list of seconds, or the exception that stopped it."""
    if isinstance(result, BaseException):
        msg = error_text(result)
        progress.step(f"{_desc(case, op, p)}: error ({msg})")
        return make_row(case, op, p, status="error", reason=msg, suite=suite)
    row = make_row(case, op, p, times=result, check=verdict, suite=suite,
                   peak_bytes_per_s=peak_bytes_per_s, loop_bytes_per_s=loop_bytes_per_s)
    row["isolated"] = isolated
    flag = f" [{verdict}]" if verdict not in ("", "ok", "reference") else ""
    progress.step(f"{_desc(case, op, p)}: {format_time(row['median_s'])}{flag}")
    return row


_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class Worker:
    """One CPU provider's process for one case (:mod:`bench.worker`).
    ``error`` is why it could not start (None when it did)."""

    def __init__(self, case, provider: str, *, seed: int = 0,
                 torch_threads: Optional[int] = None):
        spec = {"provider": provider, "kind": case.kind, "shape": list(case.shape),
                "layout": case.layout, "dtype": case.dtype, "axis": case.axis, "seed": seed,
                "torch_threads": torch_threads}
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join([_ROOT] + [v for v in [env.get("PYTHONPATH")] if v])
        self._stderr = tempfile.TemporaryFile(mode="w+")
        self._proc = subprocess.Popen([sys.executable, "-m", "bench.worker"], cwd=_ROOT, env=env,
                                      stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                      stderr=self._stderr, text=True, bufsize=1)
        reply = self._ask(spec)
        self.pid = reply.get("pid")
        self.error = reply.get("error")

    def _ask(self, obj: dict) -> dict:
        """Send one line, return the answer (``{"error": ...}`` when the
        process is gone)."""
        try:
            self._proc.stdin.write(json.dumps(obj) + "\n")
            self._proc.stdin.flush()
            for line in self._proc.stdout:
                if line.startswith(REPLY):
                    return json.loads(line[len(REPLY):])
        except (BrokenPipeError, OSError):
            pass
        self._proc.wait()
        self._stderr.seek(0)
        err = self._stderr.read().strip().splitlines() or [
            f"exit status {self._proc.returncode}"]
        return {"error": f"worker process failed: {err[-1]}"}

    def time(self, op: str, calls: int, warmup: int) -> dict:
        """``warmup`` untimed and ``calls`` timed calls of ``op``: the
        worker's answer (``times``, ``start``, ``end``, or ``error``)."""
        if self.error:
            return {"error": self.error}
        return self._ask({"op": op, "calls": calls, "warmup": warmup})

    def close(self) -> None:
        """End the process (the end of its stdin) and wait for it."""
        try:
            self._proc.stdin.close()
        except OSError:         # it is gone already
            pass
        self._proc.wait()
        self._proc.stdout.close()
        self._stderr.close()


def _round_calls(n: int, rounds: int) -> List[int]:
    """``n`` timed calls spread over up to ``rounds`` rounds, as even as
    whole rounds allow, the last one short: 7 over 3 is 3 + 3 + 1."""
    share = -(-n // min(rounds, n))
    return [min(share, n - done) for done in range(0, n, share)]


def time_interleaved(case, plans: Dict[str, Sequence[Tuple[str, int, int]]], *,
                     rounds: int = ROUNDS, seed: int = 0,
                     torch_threads: Optional[int] = None) -> Dict[str, Dict]:
    """Time CPU providers on ``case``, each in a process of its own, taking
    turns.  ``plans``: provider name -> ``[(op, timed calls, warm-up calls),
    ...]``.  Per op, round after round, each provider in the order of
    ``plans`` makes its warm-up calls (untimed: no timed call follows
    another library's) and its share of the timed calls (spread over up to
    ``rounds`` rounds), so all are timed over the same minutes of a machine
    whose speed drifts.  Returns provider name -> ``{"pid": ..., "times": {op:
    seconds or the exception that stopped it}, "spans": {op: [(start, end)
    of each round's timed calls]}}``."""
    workers = {name: Worker(case, name, seed=seed, torch_threads=torch_threads)
               for name in plans}
    out = {name: {"pid": w.pid, "times": {}, "spans": {}} for name, w in workers.items()}
    try:
        ops = list(dict.fromkeys(op for plan in plans.values() for op, _, _ in plan))
        for op in ops:
            steps = {name: (_round_calls(n, rounds), w) for name, plan in plans.items()
                     for step_op, n, w in plan if step_op == op}
            for name in steps:
                out[name]["times"][op], out[name]["spans"][op] = [], []
            for r in range(max(len(calls) for calls, _ in steps.values())):
                for name, (calls, w) in steps.items():
                    times = out[name]["times"][op]
                    if r >= len(calls) or isinstance(times, Exception):
                        continue
                    reply = workers[name].time(op, calls[r], w)
                    if "error" in reply:
                        out[name]["times"][op] = RuntimeError(reply["error"])
                        continue
                    times += reply["times"]
                    out[name]["spans"][op].append((reply["start"], reply["end"]))
    finally:
        for w in workers.values():
            w.close()
    return out


def _peak_now(opts: Dict, provider, measure_peak) -> Dict:
    """``opts`` with the bandwidth floors measured now (CPU providers, when
    ``measure_peak`` is given: it returns ``make_row``'s
    ``peak_bytes_per_s`` and ``loop_bytes_per_s``)."""
    if measure_peak is None or provider.device != "cpu":
        return opts
    return dict(opts, **measure_peak())


def run_suite(cases, providers, *, repeats: int = 5, warmup: int = 1, suite: str = "",
              peak_bytes_per_s: Optional[float] = None, check: bool = True,
              progress: Optional[Progress] = None, seed: int = 0,
              budget: Optional[float] = None, isolate: bool = False,
              torch_threads: Optional[int] = None,
              measure_peak: Optional[Callable[[], Dict[str, Optional[float]]]] = None
              ) -> List[Dict]:
    """Measure every ``(case, ops)`` of ``cases`` on every provider.
    ``budget``: seconds of timed calls per CPU provider and measurement after
    which the repeats are cut (never below 3); None times ``repeats`` calls.
    ``isolate``: time each CPU provider in a process of its own, per case,
    the providers taking turns (:func:`time_interleaved`, with
    ``torch_threads``); the checks still run here.  ``measure_peak``
    (:func:`bench.host.yardsticks`: ``make_row``'s ``peak_bytes_per_s``
    and ``loop_bytes_per_s``): measured right after a CPU provider's
    timings of a case (isolated: after all of theirs), the bandwidth floors
    of those rows in place of the run's ``peak_bytes_per_s`` (a machine
    whose bandwidth drifts is then compared with itself at the same time)."""
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    if warmup < 0:
        raise ValueError(f"warmup must be >= 0, got {warmup}")
    total = sum(len(ops) for _, ops in cases) * len(providers)
    progress = progress or Progress(total)
    reasons = {p.name: p.unavailable_reason() for p in providers}
    # the peer runs first so the others can be checked against its outputs
    ordered = sorted(providers, key=lambda p: not p.peer)
    opts = dict(suite=suite, peak_bytes_per_s=peak_bytes_per_s, progress=progress)
    rows: List[Dict] = []
    for case, ops in cases:
        setup = make_setup(case, seed=seed)
        by_op = {}        # op -> rows by provider name
        pending = {}      # provider name -> [(op, timed, warm-up, verdict)] to time apart
        for op in ops:
            by_op[op], ready, per_call = _check_op(case, op, setup, ordered, reasons,
                                                   suite=suite, check=check, progress=progress,
                                                   slow=budget / repeats if budget else None)
            for p, fn, verdict in ready:
                n, w = (_calls(per_call.get(p.name), repeats, warmup, budget)
                        if p.device == "cpu" else (repeats, warmup))
                if isolate and p.device == "cpu":
                    pending.setdefault(p.name, []).append((op, n, w, verdict))
                    continue
                # one block of calls per provider: each timed call follows
                # one of the same provider's (see the module docstring)
                try:
                    result = p.timer(fn, n, w)
                except Exception as exc:
                    result = exc
                by_op[op][p.name] = _timed_row(case, op, p, result, verdict,
                                               **_peak_now(opts, p, measure_peak))
            ready.clear()
        del setup
        gc.collect()
        isolated = [p for p in ordered if p.name in pending]
        if isolated:
            results = time_interleaved(case, {p.name: [step[:3] for step in pending[p.name]]
                                              for p in isolated},
                                       seed=seed, torch_threads=torch_threads)
            now = _peak_now(opts, isolated[0], measure_peak)    # after all of them
            for p in isolated:
                for op, _, _, verdict in pending[p.name]:
                    result = results[p.name]["times"].get(
                        op, RuntimeError("the worker returned no time"))
                    by_op[op][p.name] = _timed_row(case, op, p, result, verdict, isolated=True,
                                                   **now)
        for op in ops:
            rows += [by_op[op][p.name] for p in ordered if p.name in by_op[op]]
    add_ratios(rows)
    return rows
