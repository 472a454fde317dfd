"""Command line: ``python -m bench [cpu] [gpu] [traffic] [dask] [kernels] [options]``.

Without a section name it runs the CPU benchmark and the emu traffic
accounting, plus the GPU benchmark when CuPy sees a CUDA device; ``dask``
(scaler fit throughput on a local Dask cluster) runs when named, and so does
``kernels``: the static table of every compiled kernel (registers, shared
memory, spills, global loads in flight, load width, occupancy:
``gpubn.sass``).  Tables go
to stdout, progress to stderr, rows are appended as JSON lines to ``--out``
(default ``bench/results/<date-time>.jsonl``), and PNG charts are written
next to it when matplotlib is installed.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from typing import List, Optional

from . import gpu as gpu_mod
from . import host
from .dask_bench import format_dask_table, run_dask
from .env import describe_memory, machine_info
from .providers import cpu_providers, select
from .report import (format_summary, format_table, render, format_traffic_table, plot,
                     format_model_table,
                     read_jsonl, write_jsonl)
from .runner import Progress, run_suite
from .suites import ALL_OPS, DTYPES, KINDS, SUITES, get_suite
from .traffic import (MODEL_ARCH, MODEL_DEVICE, copy_bandwidth_choice, coverage,
                      format_coverage, model_cases, resolve_resources, run_model,
                      run_traffic, traffic_cases)

SECTIONS = ("cpu", "gpu", "traffic", "dask")
STATIC_SECTIONS = ("kernels",)
RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m bench",
        description="Benchmark gpubn against PyTorch and a textbook NumPy version "
                    "(CPU), PyTorch CUDA (GPU), and count the CUDA kernels' memory "
                    "traffic on the emu backend.")
    p.add_argument("sections", nargs="*", metavar="SECTION",
                   help=f"any of {', '.join(SECTIONS + STATIC_SECTIONS)} (default: cpu and "
                        "traffic, plus gpu when a CUDA device is present)")
    p.add_argument("--suite", default=None, choices=sorted(SUITES),
                   help="shape suite (default: 'default' on the CPU, 'resnet50' plus the "
                        "default suite's other shapes on the GPU: 'full')")
    p.add_argument("--quick", action="store_true", help="tiny shapes, few repeats (seconds)")
    p.add_argument("--dtype", action="append", choices=DTYPES, default=None,
                   help="dtype(s) to run (repeatable; default float32)")
    p.add_argument("--kind", action="append", choices=KINDS, default=None,
                   help="op families to run (repeatable; default all)")
    p.add_argument("--op", action="append", choices=ALL_OPS, default=None,
                   help="ops to run (repeatable; default all)")
    p.add_argument("--provider", action="append", default=None,
                   help="providers to run (repeatable; e.g. torch-cpu, gpubn-numpy, gpubn-cpu, "
                        "gpubn-cpu-out, "
                        "naive-numpy, torch-cuda, torch-cuda-native, gpubn-cuda)")
    p.add_argument("--repeats", type=int, default=None,
                   help="timed calls per measurement (default 20 CPU, 50 GPU; 3 with --quick)")
    p.add_argument("--budget", type=float, default=2.0,
                   help="CPU: seconds of timed calls per provider and measurement after which "
                        "repeats are cut, never below 3 (default 2; 0 for always --repeats)")
    p.add_argument("--warmup", type=int, default=1,
                   help="untimed calls before timing, after the checked first call (default 1)")
    p.add_argument("--torch-threads", type=int, default=None, metavar="N",
                   help="torch.set_num_threads(N) before measuring (default: PyTorch's own "
                        "default; the count used is recorded with the results)")
    p.add_argument("--shared-process", action="store_true",
                   help="CPU: time every provider in this process instead of one process "
                        "per provider and shape")
    p.add_argument("--out", default=None,
                   help="JSON-lines file the rows are appended to "
                        "(default bench/results/<date-time>.jsonl)")
    p.add_argument("--no-chart", action="store_true", help="do not write PNG charts")
    p.add_argument("--no-check", action="store_true",
                   help="do not compare each provider's outputs with PyTorch's")
    p.add_argument("--markdown", action="store_true", help="print tables as Markdown")
    p.add_argument("--from", dest="from_path", default=None, metavar="JSONL",
                   help="measure nothing: print the tables (and charts unless --no-chart) "
                        "of a results file written earlier")
    p.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    p.add_argument("--dask-gb", type=float, default=None, metavar="GB",
                   help="dask: size of the float64 array the scalers fit (default 2; "
                        "0.02 with --quick)")
    p.add_argument("--copy-gbps", type=float, default=None, metavar="GB/S",
                   help="traffic: copy bandwidth (read + write) the modelled times use when no "
                        f"GPU measures it (default: an {MODEL_DEVICE}'s nominal)")
    p.add_argument("--dask-workers", default="1,2", metavar="N,M",
                   help="dask: worker-process counts of the local clusters (default 1,2)")
    return p


def _chart_path(out: str, section: str) -> str:
    stem = out[:-6] if out.endswith(".jsonl") else os.path.splitext(out)[0]
    return f"{stem}-{section}.png"


def _print_section(rows, section, markdown):
    titles = {
        "cpu": "CPU: median time [min-max ms], ratio to PyTorch CPU",
        "gpu": "GPU: median time [min-max], ratio to the faster PyTorch CUDA path, GB/s "
               "(share of the measured device-to-device copy bandwidth)",
        "traffic": "emu: global-memory traffic per op (passes = bytes / bytes of x)",
        "dask": "Dask: StandardScaler.fit throughput on a local cluster, ratios in the same run",
    }
    print(f"\n## {titles[section]}\n")
    if section == "dask":
        print(format_dask_table(rows, markdown=markdown))
        return
    if section == "traffic":
        print(format_traffic_table(rows, markdown=markdown))
        return
    print(format_table(rows, markdown=markdown))
    print()
    print(format_summary(rows))


def print_kernels(markdown: bool) -> int:
    """The static table of every catalog kernel on sm_80 and sm_90
    (``gpubn.sass``); 2 when ptxas or nvdisasm is missing."""
    from gpubn import sass

    reason = sass.unavailable_reason()
    if reason:
        print(f"error: kernels: {reason}", file=sys.stderr)
        return 2
    reports = sass.report()
    print("\n## Kernels: ptxas resources, global loads in flight in the streaming loop, "
          "occupancy at the launch plan's block size\n")
    print(render(*sass.table(reports), markdown=markdown))
    print("\n## Kernels on sm_90, over dtypes and vector widths (fewest loads in flight, "
          "lowest occupancy)\n")
    print(sass.format_summary(reports, "sm_90", markdown=markdown))
    failing = [r for r in reports if sass.problems(r)]
    print(f"\n{len(reports) - len(failing)} of {len(reports)} instantiations pass the static "
          f"checks")
    return 0


def _replay(args) -> int:
    rows = read_jsonl(args.from_path)
    if not rows:
        print(f"error: {args.from_path} holds no rows", file=sys.stderr)
        return 2
    m = rows[-1].get("machine", {})
    print(f"# machine: {m.get('cpu')} ({m.get('cpu_count')} cores, load {m.get('loadavg')}), "
          f"numpy {m.get('numpy')}, torch {m.get('torch')} ({m.get('torch_threads')} threads), "
          f"gpubn {m.get('gpubn')}; {rows[-1].get('timestamp')}")
    print(f"# {describe_memory(m)}")
    for section in SECTIONS:
        part = [r for r in rows if r.get("section", r.get("device")) == section
                or (section == "traffic" and r.get("device") == "emu")]
        if not part:
            continue
        _print_section(part, section, args.markdown)
        if section in ("cpu", "gpu") and not args.no_chart:
            png = plot(part, _chart_path(args.from_path, section))
            print(f"# chart: {png}" if png else "# chart: skipped (matplotlib not installed)")
    return 0


def _copy_bytes(quick: bool) -> int:
    """Size of the arrays of the host copy that measures the bandwidth floor."""
    return 64 << 20 if quick else 256 << 20


def _host_yardsticks(machine, providers, quick: bool) -> None:
    """Measure (and print, and keep in ``machine``) the host copy bandwidth,
    the floor of the CPU rows' share; on full runs with the ``cpu`` backend
    also its first-call cost and whether PyTorch runs slower right after it."""
    floors = host.yardsticks(_copy_bytes(quick))
    machine["host_copy_gbps"] = floors["peak_bytes_per_s"] / 1e9
    print(f"# host copy bandwidth: {machine['host_copy_gbps']:.1f} GB/s at the start (read + "
          f"write; each CPU row's share is of the same copy measured right after its timing)")
    if floors["loop_bytes_per_s"]:
        machine["host_loop_copy_gbps"] = floors["loop_bytes_per_s"] / 1e9
        print(f"# the same copy as a compiled loop over memory in order: "
              f"{machine['host_loop_copy_gbps']:.1f} GB/s (the rows' loop share)")
    if quick or "gpubn-cpu" not in {p.name for p in providers}:
        return
    first = machine["cpu_first_call"] = host.cpu_first_call()
    if first:
        print(f"# cpu backend, first bn forward+backward "
              f"({'x'.join(map(str, host.FIRST_CALL_SHAPE))}) in a new process: "
              f"{first['compile_s']:.1f} s compiling, {first['cached_s']:.2f} s from the disk "
              f"cache, {1e3 * first['steady_s']:.1f} ms the next call")
    spin = machine["torch_after_cpu"] = host.torch_after_cpu()
    if spin:
        print(f"# torch bn forward 32x64x56x56: {1e3 * spin['alone_s']:.1f} ms alone, "
              f"{1e3 * spin['after_cpu_s']:.1f} ms right after a cpu backend forward "
              f"(threads: Numba's {spin['threading_layer']} layer)")


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    if args.from_path:
        return _replay(args)
    bad = [s for s in args.sections if s not in SECTIONS + STATIC_SECTIONS]
    if bad:
        print(f"error: unknown section(s) {bad}; choose from {SECTIONS + STATIC_SECTIONS}",
              file=sys.stderr)
        return 2
    if "kernels" in args.sections:
        status = print_kernels(args.markdown)
        if args.sections == ["kernels"]:
            return status
    if args.repeats is not None and args.repeats < 1:
        print("error: --repeats must be >= 1", file=sys.stderr)
        return 2
    if args.budget < 0:
        print("error: --budget must be >= 0", file=sys.stderr)
        return 2
    if args.copy_gbps is not None and not args.copy_gbps > 0:
        print(f"error: --copy-gbps must be > 0, got {args.copy_gbps}", file=sys.stderr)
        return 2
    if args.warmup < 0:
        print("error: --warmup must be >= 0", file=sys.stderr)
        return 2
    workers = [int(w) for w in args.dask_workers.split(",") if w.strip().isdigit()]
    if len(workers) != len(args.dask_workers.split(",")) or not all(workers):
        print(f"error: --dask-workers must be positive counts like 1,2, got "
              f"{args.dask_workers!r}", file=sys.stderr)
        return 2
    if args.dask_gb is not None and not args.dask_gb > 0:
        print("error: --dask-gb must be > 0", file=sys.stderr)
        return 2
    if args.torch_threads is not None:
        if args.torch_threads < 1:
            print("error: --torch-threads must be >= 1", file=sys.stderr)
            return 2
        try:
            import torch
            torch.set_num_threads(args.torch_threads)
        except ImportError:
            pass
    gpu_reason = gpu_mod.gpu_unavailable_reason()
    sections = list(args.sections) or (["cpu", "traffic"] + (["gpu"] if gpu_reason is None else []))
    suite = "quick" if args.quick else args.suite
    dtypes = args.dtype or ["float32"]
    out = args.out or os.path.join(RESULTS_DIR, time.strftime("%Y%m%d-%H%M%S") + ".jsonl")

    gpu_info = None
    if "gpu" in sections and gpu_reason is None:
        gpu_info = gpu_mod.device_info()
    machine = machine_info(gpu_info)
    print(f"# date: {time.strftime('%Y-%m-%d %H:%M %z')}")
    print(f"# machine: {machine['cpu']} ({machine['cpu_count']} cores, load {machine['loadavg']}), "
          f"python {machine['python']}, "
          f"numpy {machine['numpy']}, torch {machine['torch']} ({machine['torch_threads']} threads), "
          f"gpubn {machine['gpubn']}, cupy {machine['cupy']}")
    print(f"# {describe_memory(machine)}")
    if gpu_info:
        print(f"# gpu: {gpu_info['name']}, {gpu_info['sm_count']} SMs, peak "
              f"{gpu_info['peak_gbps'] or float('nan'):.0f} GB/s")
    status = 0
    quiet = args.quiet
    written = 0     # rows appended to ``out``
    copy = None     # the device-to-device copy bandwidth, once measured
    try:
        if "cpu" in sections:
            cases = get_suite(suite or "default", dtypes, args.kind, args.op)
            wanted = args.provider and [p for p in args.provider if not p.endswith("cuda")]
            if args.provider and not wanted:
                raise SystemExit("error: --provider names no CPU provider "
                                 "(torch-cpu, gpubn-numpy, gpubn-cpu, gpubn-cpu-out, naive-numpy)")
            providers = select(cpu_providers(), wanted)
            repeats = args.repeats or (3 if args.quick else 20)
            _host_yardsticks(machine, providers, quick=args.quick)
            total = sum(len(o) for _, o in cases) * len(providers)
            print(f"# cpu: suite {suite or 'default'}, {len(cases)} shapes, {total} measurements, "
                  f"{repeats} repeats", file=sys.stderr)
            rows = run_suite(cases, providers, repeats=repeats, warmup=args.warmup,
                             suite=suite or "default", check=not args.no_check,
                             peak_bytes_per_s=machine["host_copy_gbps"] * 1e9,
                             budget=args.budget or None, isolate=not args.shared_process,
                             torch_threads=args.torch_threads,
                             progress=Progress(total, enabled=not quiet),
                             measure_peak=lambda: host.yardsticks(_copy_bytes(args.quick),
                                                                  repeats=5))
            peaks = sorted(r["peak_gbps"] for r in rows if r.get("peak_gbps"))
            if peaks:
                print(f"# host copy bandwidth next to the timings: {peaks[0]:.1f}-{peaks[-1]:.1f}"
                      f" GB/s, median {peaks[len(peaks) // 2]:.1f}")
            for r in rows:
                r["section"] = "cpu"
            _print_section(rows, "cpu", args.markdown)
            write_jsonl(rows, out, machine)
            written += len(rows)
            if not args.no_chart:
                png = plot(rows, _chart_path(out, "cpu"))
                print(f"# chart: {png}" if png else "# chart: skipped (matplotlib not installed)")
        if "gpu" in sections:
            if gpu_reason is not None:
                print(f"\n## GPU: unavailable: {gpu_reason}")
            else:
                cases = get_suite(suite or "full", dtypes, args.kind, args.op)
                wanted = args.provider and [p for p in args.provider if p.endswith("cuda")]
                if args.provider and not wanted:
                    raise SystemExit("error: --provider names no GPU provider "
                                     "(torch-cuda, torch-cuda-native, gpubn-cuda)")
                providers = select(gpu_mod.gpu_providers(), wanted)
                copy = copy or gpu_mod.copy_bandwidth()
                print(f"# gpu: device-to-device copy {copy['copy_gbps']:.0f} GB/s "
                      f"(cudaMemcpyAsync {copy['memcpy_gbps']:.0f}, copy kernel "
                      f"{copy['copy_kernel_gbps']:.0f})")
                repeats = args.repeats or (10 if args.quick else 50)
                total = sum(len(o) for _, o in cases) * len(providers)
                rows = run_suite(cases, providers, repeats=repeats, warmup=max(args.warmup, 3),
                                 suite=suite or "full", check=not args.no_check,
                                 peak_bytes_per_s=(gpu_info["peak_gbps"] or 0) * 1e9 or None,
                                 progress=Progress(total, enabled=not quiet))
                for r in rows:
                    r["section"] = "gpu"
                gpu_mod.add_copy_share(rows, copy["copy_gbps"])
                _print_section(rows, "gpu", args.markdown)
                write_jsonl(rows, out, machine)
                written += len(rows)
                if not args.no_chart:
                    png = plot(rows, _chart_path(out, "gpu"))
                    print(f"# chart: {png}" if png else "# chart: skipped (matplotlib not installed)")
        if "traffic" in sections:
            cases = traffic_cases()
            if args.kind:
                cases = [(c, o) for c, o in cases if c.kind in args.kind]
            total = sum(len(o) for _, o in cases)
            rows = run_traffic(cases, progress=Progress(total, enabled=not quiet))
            for r in rows:
                r["section"] = "traffic"
            _print_section(rows, "traffic", args.markdown)
            write_jsonl(rows, out, machine)
            written += len(rows)
            if copy is None and gpu_reason is None:
                copy = gpu_mod.copy_bandwidth()
            gbps, source = copy_bandwidth_choice(copy and copy["copy_gbps"], args.copy_gbps)
            realistic = [(c, o) for c, o in model_cases() if not args.kind or c.kind in args.kind]
            rows = run_model(realistic, copy_gbps=gbps,
                             progress=Progress(sum(len(o) for _, o in realistic),
                                               enabled=not quiet))
            print("\n## Modelled time per op at ResNet-50 sizes: tensor bytes (emu-counted passes "
                  "x bytes of x) / copy bandwidth\n")
            print(f"# copy bandwidth: {gbps:.0f} GB/s, {source}")
            print(f"# path: the launch plan's choice on an {MODEL_DEVICE} ({MODEL_ARCH}, 132 SMs), "
                  f"read-once kernels' registers and static shared memory (their occupancy): "
                  f"{rows[0]['occupancy_source'] if rows else '-'}")
            print("# pytorch: its native kernel sequence; the epilogue unfused (batch norm, then "
                  "an add and a ReLU)\n")
            print(format_model_table(rows, markdown=args.markdown))
            for r in rows:
                r["section"] = "model"
            write_jsonl(rows, out, machine)
            written += len(rows)
            if not args.kind or "batch_norm" in args.kind:
                resources, source = resolve_resources()
                print(f"\n## ResNet-50 batch-32 batch-norm layers held on chip (read-once) on an "
                      f"{MODEL_DEVICE}\n")
                print(f"# each column: values per thread (16 in registers + staged in shared "
                      f"memory) x threads per block, or - (two-pass); resources: {source}\n")
                print(format_coverage(coverage(resources), markdown=args.markdown))
        if "dask" in sections:
            gb = args.dask_gb or (0.02 if args.quick else 2.0)
            rows = run_dask(gb=gb, workers=workers,
                            chunk_mb=4.0 if args.quick else 64.0,
                            repeats=args.repeats or (2 if args.quick else 3),
                            progress=None if quiet else
                            (lambda text: print(f"# {text}", file=sys.stderr)))
            _print_section(rows, "dask", args.markdown)
            write_jsonl(rows, out, machine)
            written += len(rows)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        status = 130
    if written:
        print(f"\n# {written} results appended to {out}")
    else:
        print(f"\n# no results: nothing was written to {out}")
    return status


if __name__ == "__main__":
    sys.exit(main())
