"""Results: JSON lines, text/Markdown tables and charts.

Every measurement is one JSON object per line (appended, so runs accumulate
in one file).  Fields: ``timestamp``, ``machine`` (platform, CPU, core
count, versions of Python/NumPy/PyTorch/gpubn/CuPy, PyTorch's thread count,
the GPU and its peak bandwidth when one was used), ``suite``, ``device``,
``provider``, ``backend``, ``kind``, ``op``, ``layout``, ``shape``, ``axis``,
``dtype``, ``label``, ``numel``, ``bytes`` (minimum bytes moved, see
:mod:`bench.metrics`), ``status`` (ok / unavailable / error), ``reason``,
``check`` (outputs against the peer's: reference / ok / mismatch ...),
``median_s``, ``min_s``, ``max_s``, ``repeats``, ``gbps``, ``peak_gbps``,
``peak_share`` and ``ratio_to_torch``.
"""

from __future__ import annotations

import json
import os
import statistics
import time
from collections import OrderedDict
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

from .suites import KIND_ABBREV


# -- JSON lines ---------------------------------------------------------------

def write_jsonl(rows: Iterable[Dict], path: str, machine: Optional[Dict] = None,
                timestamp: Optional[str] = None) -> int:
    """Append ``rows`` to ``path`` (created with its folder), each with the
    machine description and a timestamp.  Returns the number of rows."""
    timestamp = timestamp or time.strftime("%Y-%m-%dT%H:%M:%S%z")
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    n = 0
    with open(path, "a", encoding="utf-8") as f:
        for row in rows:
            out = {"timestamp": timestamp, "machine": machine or {}}
            out.update(row)
            f.write(json.dumps(out, sort_keys=False) + "\n")
            n += 1
    return n


def read_jsonl(path: str) -> List[Dict]:
    rows = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            line = line.strip()
            if not line:
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}:{lineno}: not a JSON object ({exc})") from None
    return rows


# -- formatting -----------------------------------------------------------------

def format_time(seconds: Optional[float]) -> str:
    """Seconds as a short human string with three significant digits."""
    if seconds is None:
        return "-"
    if seconds >= 1.0:
        return f"{seconds:.3g} s"
    if seconds >= 1e-3:
        return f"{seconds * 1e3:.3g} ms"
    return f"{seconds * 1e6:.3g} us"


def format_ratio(v: float) -> str:
    """0.93 -> '0.93x'; small ratios keep two significant digits."""
    return f"{v:.2f}x" if v >= 0.095 else f"{v:.2g}x"


def _fmt_num(v: float) -> str:
    """Three significant digits, never in scientific notation."""
    return f"{v:.0f}" if abs(v) >= 100 else f"{v:.3g}"


def _case_key(r: Dict):
    return (r["kind"], r["layout"], tuple(r["shape"]), r["dtype"], r["op"])


def format_cell(r: Dict, show_ratio: bool, show_peak: bool) -> str:
    if r["status"] == "unavailable":
        return "unavailable"
    if r["status"] == "error":
        return "error"
    t = r["median_s"]
    cell = format_time(t)
    if r.get("min_s") is not None and r.get("repeats", 0) > 1:
        # spread in the median's unit (s, ms, or us)
        scale = 1.0 if t >= 1.0 else 1e3 if t >= 1e-3 else 1e6
        cell += f" [{_fmt_num(r['min_s'] * scale)}-{_fmt_num(r['max_s'] * scale)}]"
    if show_ratio and r.get("ratio_to_torch") is not None:
        cell += f" {format_ratio(r['ratio_to_torch'])}"
    if show_peak and r.get("gbps") is not None:
        cell += f" {r['gbps']:.0f} GB/s"
        if r.get("copy_share") is not None:
            cell += f" ({100 * r['copy_share']:.0f}% of copy)"
        elif r.get("peak_share") is not None:
            cell += f" ({100 * r['peak_share']:.0f}%)"
    if r.get("check", "").startswith("mismatch"):
        cell += " MISMATCH"
    return cell


def _providers_in_order(rows: Sequence[Dict]) -> List[str]:
    seen = OrderedDict()
    # peers first, then in order of appearance
    for r in rows:
        if r["backend"] == "torch":
            seen.setdefault(r["provider"], None)
    for r in rows:
        seen.setdefault(r["provider"], None)
    return list(seen)


def render(header: List[str], body: List[List[str]], markdown: bool) -> str:
    """A table of strings as aligned plain text or as markdown."""
    if markdown:
        lines = ["| " + " | ".join(header) + " |",
                 "|" + "|".join("---" for _ in header) + "|"]
        lines += ["| " + " | ".join(row) + " |" for row in body]
        return "\n".join(lines)
    widths = [max(len(h), *(len(row[i]) for row in body)) if body else len(h)
              for i, h in enumerate(header)]
    fmt = "  ".join("{:<%d}" % w for w in widths)
    lines = [fmt.format(*header), fmt.format(*("-" * w for w in widths))]
    lines += [fmt.format(*row) for row in body]
    return "\n".join(line.rstrip() for line in lines)


def format_table(rows: Sequence[Dict], markdown: bool = False) -> str:
    """One line per (case, op), one column per provider: median time
    [min-max], ratio to PyTorch, and GB/s (share of peak) on the GPU or when
    the rows carry a peak (on the CPU: a large NumPy copy's bandwidth)."""
    if not rows:
        return "(no results)"
    providers = _providers_in_order(rows)
    groups: "OrderedDict[tuple, Dict[str, Dict]]" = OrderedDict()
    for r in rows:
        groups.setdefault(_case_key(r), {})[r["provider"]] = r
    show_peak = any(r["device"] == "gpu" or r.get("peak_share") is not None for r in rows)
    header = ["op", "layout", "shape", "dtype"] + providers
    body = []
    for (kind, layout, shape, dtype, op), by_provider in groups.items():
        line = [f"{KIND_ABBREV.get(kind, kind)} {op}", layout, "x".join(map(str, shape)), dtype]
        for name in providers:
            r = by_provider.get(name)
            line.append("" if r is None else
                        format_cell(r, show_ratio=r["backend"] != "torch", show_peak=show_peak))
        body.append(line)
    return render(header, body, markdown)


def case_name(r: Dict) -> str:
    """A row's case in a few words: ``bn NCHW 32x64x56x56 float32``."""
    return (f"{KIND_ABBREV.get(r['kind'], r['kind'])} {r['layout']} "
            f"{'x'.join(map(str, r['shape']))} {r['dtype']}")


def _spread(values: List[Tuple[float, str]]) -> Dict:
    """``{median, min, max, n, worst}`` of ``(value, case)`` pairs; ``worst``
    is the case of the largest value."""
    v = [x for x, _ in values]
    return {"median": statistics.median(v), "min": min(v), "max": max(v), "n": len(v),
            "worst": max(values, key=lambda p: p[0])[1]}


def ratio_summary(rows: Sequence[Dict]) -> Dict[str, Dict[str, Dict]]:
    """provider -> op -> {median, min, max, n, worst} of ``ratio_to_torch``
    over the cases of the run (``worst``: the case of the largest ratio)."""
    acc: Dict[str, Dict[str, List[Tuple[float, str]]]] = {}
    for r in rows:
        if r.get("ratio_to_torch") is None or r["backend"] == "torch":
            continue
        acc.setdefault(r["provider"], {}).setdefault(r["op"], []).append(
            (r["ratio_to_torch"], case_name(r)))
    return {p: {op: _spread(v) for op, v in by_op.items()} for p, by_op in acc.items()}


LARGE_BYTES = 64 << 20     # cases moving at least this much are "large" for the floor


def floor_summary(rows: Sequence[Dict], min_bytes: int = LARGE_BYTES,
                  share: str = "peak_share") -> Dict[str, Dict[str, Dict]]:
    """provider -> op -> {median, min, max, n, worst} of the time over the
    memory-bandwidth floor (``1 / share``: 1.0 is the minimum passes at the
    bandwidth of the run's large copy, by NumPy for ``peak_share``, by a
    compiled loop for ``loop_share``), over the CPU cases moving at least
    ``min_bytes``."""
    acc: Dict[str, Dict[str, List[Tuple[float, str]]]] = {}
    for r in rows:
        if r.get("device") != "cpu" or not r.get(share) or r["bytes"] < min_bytes:
            continue
        acc.setdefault(r["provider"], {}).setdefault(r["op"], []).append(
            (1.0 / r[share], case_name(r)))
    return {p: {op: _spread(v) for op, v in by_op.items()} for p, by_op in acc.items()}


def format_summary(rows: Sequence[Dict]) -> str:
    """Median ratio to PyTorch per provider and op across the run's cases
    (with the worst case), and on the CPU the time over the bandwidth floor
    of the large cases."""
    summary = ratio_summary(rows)
    if not summary:
        return "(no ratios: PyTorch unavailable or nothing measured)"
    lines = ["time ratio to PyTorch (median over cases [min-max, worst case]; < 1 is faster):"]
    for p, by_op in summary.items():
        parts = [f"{op} {s['median']:.2f} [{s['min']:.2f}-{s['max']:.2f}, {s['worst']}]"
                 for op, s in by_op.items()]
        lines.append(f"  {p}: " + ", ".join(parts))
    for share, what in (("peak_share", "the copy-bandwidth floor"),
                        ("loop_share", "a compiled copy loop's bandwidth")):
        floor = floor_summary(rows, share=share)
        if floor:
            lines.append(f"time over {what}, cases moving >= {LARGE_BYTES >> 20} MiB "
                         "(median [max, worst case]; 1 is the floor):")
        for p, by_op in floor.items():
            parts = [f"{op} {s['median']:.2f} [{s['max']:.2f}, {s['worst']}]"
                     for op, s in by_op.items()]
            lines.append(f"  {p}: " + ", ".join(parts))
    problems = [r for r in rows if r["status"] != "ok" or r.get("check", "").startswith("mismatch")]
    reasons = OrderedDict()
    for r in problems:
        text = r["reason"] if r["status"] != "ok" else r["check"]
        reasons.setdefault((r["provider"], r["status"] if r["status"] != "ok" else "check", text), 0)
        reasons[(r["provider"], r["status"] if r["status"] != "ok" else "check", text)] += 1
    for (p, status, text), n in reasons.items():
        lines.append(f"  {p}: {status} in {n} measurement(s): {text}")
    return "\n".join(lines)


def format_traffic_table(rows: Sequence[Dict], markdown: bool = False) -> str:
    """emu traffic rows (see :mod:`bench.traffic`)."""
    if not rows:
        return "(no traffic results)"
    header = ["op", "layout", "shape", "dtype", "path", "launches", "bytes/elem",
              "passes", "tensor passes", "minimum", "ideal", "pytorch-style", "status"]
    body = []
    for r in rows:
        if r["status"] != "ok":
            body.append([f"{KIND_ABBREV.get(r['kind'], r['kind'])} {r['op']}", r["layout"],
                         "x".join(map(str, r["shape"])), r["dtype"], "-", "-", "-", "-", "-",
                         "-", str(r["ideal_passes"]), str(r["pytorch_passes"]),
                         f"{r['status']}: {r['reason']}"])
            continue
        body.append([
            f"{KIND_ABBREV.get(r['kind'], r['kind'])} {r['op']}", r["layout"],
            "x".join(map(str, r["shape"])), r["dtype"], r.get("path", "-"), str(r["launches"]),
            f"{r['bytes_per_element']:.2f}", f"{r['passes']:.2f}",
            "-" if r.get("tensor_passes") is None else f"{r['tensor_passes']:.2f}",
            "-" if r.get("minimum_passes") is None else f"{r['minimum_passes']:.2f}",
            str(r["ideal_passes"]), str(r["pytorch_passes"]), "ok"])
    return render(header, body, markdown)


def format_model_table(rows: Sequence[Dict], markdown: bool = False) -> str:
    """Modelled times at realistic sizes (see :func:`bench.traffic.run_model`):
    the path and, read once, what it holds on chip (values per thread in
    registers + staged in shared memory, x threads per block), gpubn's and
    PyTorch's tensor passes and MB, the modelled microseconds at the copy
    bandwidth, and PyTorch's time over gpubn's."""
    if not rows:
        return "(no modelled results)"
    header = ["op", "layout", "shape", "dtype", "path", "on chip", "passes", "MB", "us",
              "pytorch passes", "pytorch MB", "pytorch us", "pytorch / gpubn"]
    body = []
    for r in rows:
        head = [r["op"], r["layout"], "x".join(map(str, r["shape"])), r["dtype"], r["path"],
                r.get("on_chip") or "-"]
        tail = [str(r["pytorch_passes"]), f"{r['pytorch_bytes'] / 1e6:.1f}",
                f"{r['pytorch_us']:.1f}"]
        if r["status"] != "ok":
            body.append(head + ["-", "-", "-"] + tail + [f"{r['status']}: {r['reason']}"])
            continue
        body.append(head + [f"{r['passes']:g}", f"{r['bytes'] / 1e6:.1f}", f"{r['us']:.1f}"]
                    + tail + [f"{r['pytorch_ratio']:.2f}x"])
    return render(header, body, markdown)


# -- charts ---------------------------------------------------------------------

def plot(rows: Sequence[Dict], path: str) -> Optional[str]:
    """Write a PNG: on the CPU the time ratio to PyTorch per shape (one panel
    per op); on the GPU GB/s per shape against the device's peak.  Returns the
    path, or None when matplotlib is not installed or nothing was measured."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception:
        return None
    measured = [r for r in rows if r["status"] == "ok"]
    if not measured:
        return None
    gpu = any(r["device"] == "gpu" for r in measured)
    ops = list(OrderedDict.fromkeys(r["op"] for r in measured))
    providers = [p for p in _providers_in_order(measured)]
    if not gpu:   # PyTorch itself is the dashed line at 1
        providers = [p for p in providers
                     if any(r["provider"] == p and r["backend"] != "torch" and r.get("ratio_to_torch")
                            for r in measured)]
        if not providers:
            return None
    ncases = max(len({_case_key(r)[:4] for r in measured if r["op"] == op}) for op in ops)
    fig, axes = plt.subplots(len(ops), 1, figsize=(max(8.0, 0.75 * ncases + 2), 3.6 * len(ops)),
                             squeeze=False)
    for ax, op in zip(axes[:, 0], ops):
        cases = list(OrderedDict.fromkeys(_case_key(r)[:4] for r in measured if r["op"] == op))
        labels = [f"{KIND_ABBREV.get(k, k)} {lay} {'x'.join(map(str, s))}" for k, lay, s, _ in cases]
        width = 0.8 / max(1, len(providers))
        for i, p in enumerate(providers):
            vals = []
            for c in cases:
                match = [r for r in measured if r["provider"] == p and r["op"] == op and _case_key(r)[:4] == c]
                if not match:
                    vals.append(float("nan"))
                elif gpu:
                    vals.append(match[0]["gbps"] or float("nan"))
                else:
                    vals.append(match[0].get("ratio_to_torch") or float("nan"))
            xs = [j + (i - (len(providers) - 1) / 2) * width for j in range(len(cases))]
            ax.bar(xs, vals, width, label=p)
        if gpu:
            peaks = [r["peak_gbps"] for r in measured if r.get("peak_gbps")]
            if peaks:
                ax.axhline(peaks[0], color="k", linestyle="--", linewidth=1, label="peak")
            ax.set_ylabel("GB/s")
        else:
            ax.axhline(1.0, color="k", linestyle="--", linewidth=1, label="PyTorch")
            ax.set_yscale("log")
            ax.set_ylabel("time / PyTorch (log)")
        ax.set_title(op)
        ax.set_xticks(range(len(cases)))
        ax.set_xticklabels(labels, fontsize=7, rotation=35, ha="right")
        ax.legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path
