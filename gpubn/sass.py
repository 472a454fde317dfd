"""Static performance report of the compiled kernels, without a GPU.

Every catalog instantiation (``gpubn.kernels``) is compiled to PTX by NVRTC
(``gpubn._nvrtc``), assembled by ``ptxas`` for sm_80 and sm_90, and
disassembled by ``nvdisasm`` (pip: ``nvidia-cuda-nvcc`` brings ptxas,
``nvidia-cuda-nvdisasm`` nvdisasm).  Per kernel this reports:

* registers, static shared memory, stack, spill stores and loads (``ptxas -v``);
* the most dynamic shared memory its launches request (layer norm stages
  weight and bias; the other kernels use none);
* in its streaming loop (the innermost loop with the most global loads; the
  whole function for the read-once kernels, which have none), the number of
  independent global loads issued before the first instruction that reads a
  loaded register (``loads in flight`` per thread), and the
  widest of those loads in bytes (``LDG.E.128``: 16);
* theoretical occupancy (resident blocks per SM, share of the SM's warps) at
  the block size of the launch plan (``gpubn.launch``).

:func:`problems` turns the report into the static checks CI runs
(``tests/test_sass.py``): no spills; registers that let the launch plan's
blocks be resident as it assumes; static plus dynamic shared memory within
the 48 KiB a launch gets without opting in; at least ``MIN_LOADS_IN_FLIGHT``
loads in flight in every streaming loop; vector loads in the channels-last
statistics.  ``python -m bench kernels`` prints the table.
"""

from __future__ import annotations

import functools
import glob
import os
import re
import shutil
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Dict, Iterable, List, Optional, Tuple

from . import kernels as catalog
from . import launch as plan

ARCHS = ("sm_80", "sm_90")
MIN_LOADS_IN_FLIGHT = 4
# Kernels whose main loop streams the tensors (statistics, elementwise,
# backward); the in-flight check applies to them.
STREAMING = ("bn_stats_nchw", "bn_stats_nhwc", "bn_apply_nchw", "bn_apply_nhwc",
             "bn_backward_reduce_nchw", "bn_backward_reduce_nhwc", "bn_backward_dx_nchw",
             "bn_backward_dx_nhwc")
# The read-once kernels (kernels/bn_persistent.cu) have no streaming loop:
# each thread's loads are straight-line code, all issued before the first
# use, and the in-flight check applies to the whole function.
READ_ONCE = ("bn_forward_once_nchw", "bn_forward_once_nhwc", "bn_backward_once_nchw",
             "bn_backward_once_nhwc")
# Channels-last statistics must read several channels per load.
VECTOR_REQUIRED = ("bn_stats_nhwc",)


# The per-SM limits of each architecture checked (CUDA programming guide,
# "Technical Specifications per Compute Capability"): A100 and H100/H200.
DEVICES = {
    "sm_80": plan.DeviceAttributes(sm_count=108, shared_per_sm=164 * 1024,
                                   max_shared_per_block_optin=163 * 1024, name="sm_80"),
    "sm_90": plan.DeviceAttributes(sm_count=132, shared_per_sm=228 * 1024,
                                   max_shared_per_block_optin=227 * 1024, name="sm_90"),
}


def occupancy(registers: int, shared_bytes: int, threads: int, arch: str) -> Tuple[int, float]:
    """Resident blocks per SM (``launch.occupancy``, the count the launch
    plan sizes grids with) and the share of the SM's threads they hold, for a
    function using ``registers`` per thread and ``shared_bytes`` (static plus
    dynamic) per block, launched with ``threads`` per block."""
    dev = DEVICES[arch]
    blocks = plan.occupancy(registers, shared_bytes, threads, 0, dev)
    warps = -(-threads // plan.WARP)
    return blocks, blocks * warps * plan.WARP / dev.max_threads_per_sm


# -- tools ---------------------------------------------------------------------------

def find_tool(name: str) -> Optional[str]:
    """Path of a CUDA tool: the pip wheels' ``nvidia/cu*/bin`` on ``sys.path``,
    ``$CUDA_PATH/bin`` / ``$CUDA_HOME/bin``, then ``PATH``."""
    for entry in sys.path:
        if entry and os.path.isdir(os.path.join(entry, "nvidia")):
            for path in sorted(glob.glob(os.path.join(entry, "nvidia", "cu*", "bin", name)),
                               reverse=True):
                if os.access(path, os.X_OK):
                    return path
    for var in ("CUDA_PATH", "CUDA_HOME"):
        root = os.environ.get(var)
        if root and os.access(os.path.join(root, "bin", name), os.X_OK):
            return os.path.join(root, "bin", name)
    return shutil.which(name)


def unavailable_reason() -> Optional[str]:
    """None when NVRTC, ptxas and nvdisasm are all here, else what is missing."""
    from . import _nvrtc

    missing = []
    if _nvrtc.unavailable_reason():
        missing.append("NVRTC (pip install nvidia-cuda-nvrtc)")
    if not find_tool("ptxas"):
        missing.append("ptxas (pip install nvidia-cuda-nvcc)")
    if not find_tool("nvdisasm"):
        missing.append("nvdisasm (pip install nvidia-cuda-nvdisasm)")
    return "missing " + ", ".join(missing) if missing else None


# -- ptxas -v ------------------------------------------------------------------------

_ENTRY = re.compile(r"Compiling entry function '([^']+)' for '(sm_\d+)'")
_PROPS = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_USED = re.compile(r"Used (\d+) registers")
_SMEM = re.compile(r"(\d+) bytes smem")


def parse_ptxas(log: str) -> Dict[str, Dict[str, int]]:
    """Per mangled function: registers, shared (static), stack, spill_stores,
    spill_loads, from ``ptxas -v`` output."""
    out: Dict[str, Dict[str, int]] = {}
    current = None
    for line in log.splitlines():
        m = _ENTRY.search(line)
        if m:
            current = out.setdefault(m.group(1), {"registers": 0, "shared": 0, "stack": 0,
                                                  "spill_stores": 0, "spill_loads": 0})
            continue
        if current is None:
            continue
        m = _PROPS.search(line)
        if m:
            current.update(stack=int(m.group(1)), spill_stores=int(m.group(2)),
                           spill_loads=int(m.group(3)))
        m = _USED.search(line)
        if m:
            current["registers"] = int(m.group(1))
            s = _SMEM.search(line)
            current["shared"] = int(s.group(1)) if s else 0
    return out


# -- SASS ------------------------------------------------------------------------------

@dataclass
class Instr:
    opcode: str                 # e.g. "LDG.E.128.CONSTANT"
    operands: List[str]
    address: int
    target: Optional[str] = None  # branch target label

    @property
    def base(self) -> str:
        return self.opcode.split(".", 1)[0]


@dataclass
class Function:
    name: str
    instrs: List[Instr] = field(default_factory=list)
    labels: Dict[str, int] = field(default_factory=dict)   # label -> index of next instr


_FUNC = re.compile(r"^//-+ \.text\.(\S+) -+")
_LABEL = re.compile(r"^(\.L_x_\d+):")
_INSTR = re.compile(r"/\*([0-9a-f]+)\*/\s+(@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)\s*(.*?)\s*;")
_TARGET = re.compile(r"`\((\.L_x_\d+)\)")
_REG = re.compile(r"(?<![\w.])R(\d+)(\.64)?(?![\w])")


def parse_sass(text: str) -> Dict[str, Function]:
    """nvdisasm output -> functions by mangled name, with their labels."""
    funcs: Dict[str, Function] = {}
    fn = None
    for line in text.splitlines():
        m = _FUNC.match(line.strip())
        if m:
            fn = funcs.setdefault(m.group(1), Function(m.group(1)))
            continue
        if fn is None:
            continue
        m = _LABEL.match(line.strip())
        if m:
            fn.labels[m.group(1)] = len(fn.instrs)
            continue
        m = _INSTR.search(line)
        if m:
            ops = m.group(4)
            t = _TARGET.search(ops)
            fn.instrs.append(Instr(m.group(3), [o.strip() for o in ops.split(",") if o.strip()],
                                   int(m.group(1), 16), t.group(1) if t else None))
    return funcs


def _regs(operand: str) -> List[int]:
    out = []
    for m in _REG.finditer(operand):
        r = int(m.group(1))
        out += [r, r + 1] if m.group(2) else [r]
    return out


def load_bytes(opcode: str) -> int:
    """Bytes one thread's global load moves: ``LDG.E.128`` 16, ``.64`` 8,
    ``.U16``/``.S16`` 2, ``.U8``/``.S8`` 1, else 4."""
    parts = opcode.split(".")
    for p, size in (("128", 16), ("64", 8), ("U16", 2), ("S16", 2), ("U8", 1), ("S8", 1)):
        if p in parts:
            return size
    return 4


def is_stream_load(ins: Instr) -> bool:
    """A global load of the streamed data: ``LDG`` without ``.STRONG``
    (volatile or coherent loads read what other blocks of the same launch
    wrote: the partial states of a split reduction, not the tensors)."""
    return ins.base == "LDG" and "STRONG" not in ins.opcode.split(".")


def _sources(ins: Instr) -> List[str]:
    """Operands an instruction reads: all of them for stores, reductions and
    branches, the ones after the destination otherwise."""
    if ins.base.startswith("ST") or ins.base in ("RED", "REDG", "BRA", "EXIT", "RET", "BAR"):
        return ins.operands
    return ins.operands[1:]


@dataclass(frozen=True)
class LoopLoads:
    loads: int          # global loads in the loop body
    in_flight: int      # loads issued before the first read of a loaded register
    widest: int         # bytes of the widest load in the loop


def loops(fn: Function) -> List[Tuple[int, int]]:
    """(first, last) instruction indices of each loop: a branch back to a
    label at or before it."""
    out = []
    for i, ins in enumerate(fn.instrs):
        if ins.base == "BRA" and ins.target in fn.labels and fn.labels[ins.target] <= i:
            out.append((fn.labels[ins.target], i))
    return out


def loop_loads(fn: Function, first: int, last: int) -> LoopLoads:
    """Global loads of one loop body, and how many are issued before the
    first instruction that reads a register one of them writes."""
    pending: set = set()
    in_flight, widest, stopped, total = 0, 0, False, 0
    for ins in fn.instrs[first:last + 1]:
        is_load = is_stream_load(ins)
        if is_load:
            total += 1
            widest = max(widest, load_bytes(ins.opcode))
        if stopped:
            continue
        if any(r in pending for op in _sources(ins) for r in _regs(op)):
            stopped = True
            continue
        if is_load:
            size = load_bytes(ins.opcode)
            dest = _regs(ins.operands[0])[:1]
            pending.update(range(dest[0], dest[0] + max(1, size // 4)) if dest else ())
            in_flight += 1
    return LoopLoads(total, in_flight, widest)


def streaming_loop(fn: Function) -> Optional[LoopLoads]:
    """The streaming loop of a function: of the innermost loops that stream
    global loads (:func:`is_stream_load`), the one with the most loads (ties:
    the one with fewer in flight, so the check judges the worse); None
    without such a loop."""
    spans = loops(fn)
    inner = [(a, b) for a, b in spans
             if not any((c, d) != (a, b) and a <= c and d <= b for c, d in spans)]
    found = [loop_loads(fn, a, b) for a, b in inner]
    found = [f for f in found if f.loads]
    if not found:
        return None
    return max(found, key=lambda f: (f.loads, -f.in_flight))


# -- the report --------------------------------------------------------------------------

@dataclass(frozen=True)
class KernelReport:
    name: str               # name expression, e.g. gpubn::bn_stats_nchw<float, float, 4>
    kernel: str             # catalog kernel
    dtype: str
    vec: int
    arch: str
    registers: int
    shared: int             # static shared memory
    dynamic_shared: int     # the most dynamic shared memory its launches request
    stack: int
    spill_stores: int
    spill_loads: int
    loop_loads: Optional[int]      # global loads in the streaming loop
    in_flight: Optional[int]       # loads in flight in it
    load_bytes: Optional[int]      # widest load in it, bytes
    threads: int                   # block size of the launch plan
    assumed_blocks: int            # resident blocks per SM the plan assumes
    blocks_per_sm: int
    occupancy: float

    @property
    def element_bytes(self) -> int:
        return catalog.itemsize(self.dtype)


def planned_block(kernel: str, tuning: plan.Tuning = plan.Tuning()) -> Tuple[int, int]:
    """(threads per block, resident blocks per SM assumed) for a kernel's
    largest launch in the launch plan.  The reductions declare
    ``REDUCE_MIN_BLOCKS`` resident blocks of ``reduce_threads`` in their
    ``__launch_bounds__`` (the plan sizes their grids from the function's
    occupancy, and the last-block merge assumes nothing more); the
    elementwise and layer-norm grids stride over their data and assume no
    residency: one block must fit."""
    if kernel.startswith(("bn_stats", "bn_backward_reduce")):
        return tuning.reduce_threads, plan.REDUCE_MIN_BLOCKS
    if kernel.startswith(("bn_apply", "bn_backward_dx")):
        return tuning.map_threads, 1
    if kernel == "bn_renorm_finish":
        return plan.renorm_finish_launch(1 << 20).block[0], 1
    return tuning.reduce_threads, 1


# Dynamic shared memory: the layer-norm row kernels stage weight and bias
# (forward) or weight (backward) in shared memory when they fit.
_STAGED_ARRAYS = {"ln_forward_warp": 2, "ln_forward_block": 2, "ln_backward_dx_warp": 1,
                  "ln_backward_dx_block": 1}


def max_dynamic_shared(kernel: str, dtype: str, static: int) -> int:
    """The most dynamic shared memory a launch of ``kernel`` requests, over
    every row length up to the one whose staging alone fills the limit,
    with the function's ``static`` shared memory."""
    arrays = _STAGED_ARRAYS.get(kernel, 0)
    if not arrays:
        return 0
    size = 8 if catalog.CXX_TYPES[dtype][1] == "double" else 4
    top = plan.SHARED_MEMORY_LIMIT // (arrays * size)
    return max(plan.ln_stage_bytes(n, size, arrays, static)
               for n in range(max(1, top - 4096 // size), top + 2))


def _instantiations(source: str) -> List[Tuple[str, str, str, int]]:
    """(name expression, kernel, dtype, vec) of every instantiation of ``source``."""
    out = []
    for dtype in catalog.CXX_TYPES:
        for spec in catalog.KERNELS.values():
            if spec.source == source:
                for vec in catalog.vector_widths(spec.name, dtype):
                    out.append((catalog.name_expression(spec.name, dtype, vec), spec.name,
                                dtype, vec))
    return out


def assemble(source: str, arch: str) -> List[KernelReport]:
    """Compile every instantiation of ``source`` (all dtypes, one NVRTC
    program), assemble it for ``arch`` and disassemble it; one report per
    instantiation."""
    from . import _nvrtc

    ptxas, nvdisasm = find_tool("ptxas"), find_tool("nvdisasm")
    if not ptxas or not nvdisasm:
        raise RuntimeError(unavailable_reason())
    insts = _instantiations(source)
    compute = "compute_" + arch.split("_")[1]
    result = _nvrtc.compile_to_ptx(catalog.read_source(source), [n for n, _, _, _ in insts],
                                   catalog.compile_options() + (f"--gpu-architecture={compute}",),
                                   source)
    with tempfile.TemporaryDirectory(prefix="gpubn-sass-") as tmp:
        ptx, cubin = os.path.join(tmp, "k.ptx"), os.path.join(tmp, "k.cubin")
        with open(ptx, "w") as f:
            f.write(result.ptx)
        log = subprocess.run([ptxas, f"-arch={arch}", "-v", ptx, "-o", cubin],
                             capture_output=True, text=True, check=True).stderr
        sass = subprocess.run([nvdisasm, "-c", cubin], capture_output=True, text=True,
                              check=True).stdout
    usage, funcs = parse_ptxas(log), parse_sass(sass)
    reports = []
    for name, kernel, dtype, vec in insts:
        mangled = result.lowered_names[name]
        u = usage[mangled]
        fn = funcs.get(mangled)
        if fn is None:
            loop = None
        elif kernel in READ_ONCE:
            loop = loop_loads(fn, 0, len(fn.instrs) - 1)
        else:
            loop = streaming_loop(fn)
        threads, assumed = planned_block(kernel)
        dyn = max_dynamic_shared(kernel, dtype, u["shared"])
        blocks, occ = occupancy(u["registers"], u["shared"] + dyn, threads, arch)
        reports.append(KernelReport(
            name, kernel, dtype, vec, arch, u["registers"], u["shared"], dyn, u["stack"],
            u["spill_stores"], u["spill_loads"], loop and loop.loads, loop and loop.in_flight,
            loop and loop.widest, threads, assumed, blocks, occ))
    return reports


@functools.lru_cache(maxsize=None)
def report(archs: Tuple[str, ...] = ARCHS) -> Tuple[KernelReport, ...]:
    """Every catalog instantiation on every arch, in catalog order (cached
    per process; two threads run NVRTC and the tools, which release the GIL)."""
    jobs = [(s, a) for s in catalog.SOURCES for a in archs]
    with ThreadPoolExecutor(max_workers=2) as pool:
        parts = list(pool.map(lambda job: assemble(*job), jobs))
    order = {k: i for i, k in enumerate(catalog.KERNELS)}
    flat = [r for part in parts for r in part]
    return tuple(sorted(flat, key=lambda r: (order[r.kernel], list(catalog.CXX_TYPES).index(r.dtype),
                                             r.vec, r.arch)))


def problems(r: KernelReport) -> List[str]:
    """What the static checks find wrong with one kernel (empty: passes)."""
    out = []
    if r.spill_stores or r.spill_loads:
        out.append(f"spills {r.spill_stores} B stores / {r.spill_loads} B loads")
    if r.blocks_per_sm < r.assumed_blocks:
        out.append(f"{r.registers} registers, {r.shared + r.dynamic_shared} B shared: "
                   f"{r.blocks_per_sm} blocks of {r.threads} threads per SM, the launch plan "
                   f"assumes {r.assumed_blocks}")
    if r.shared + r.dynamic_shared > plan.SHARED_MEMORY_LIMIT:
        out.append(f"static {r.shared} B + dynamic {r.dynamic_shared} B shared memory pass "
                   f"the {plan.SHARED_MEMORY_LIMIT} B a launch gets without opting in")
    if r.kernel in STREAMING + READ_ONCE:
        if r.in_flight is None:
            out.append("no streaming loop with global loads found")
        elif r.in_flight < MIN_LOADS_IN_FLIGHT:
            out.append(f"{r.in_flight} global load(s) in flight in the streaming loop "
                       f"(at least {MIN_LOADS_IN_FLIGHT})")
    if (r.kernel in VECTOR_REQUIRED and r.vec == max(catalog.vector_widths(r.kernel, r.dtype))
            and r.load_bytes is not None and r.load_bytes <= r.element_bytes):
        out.append(f"scalar loads ({r.load_bytes} B) in the channels-last statistics")
    return out


def table(reports: Iterable[KernelReport]):
    """``(header, rows)``: one row of strings per kernel: registers, shared
    memory, spills, loads in flight (loads in the loop), widest load,
    occupancy, and what the checks find (``python -m bench kernels`` prints it)."""
    header = ["kernel", "dtype", "vec", "arch", "regs", "smem B", "spill B", "in flight",
              "load B", "block", "blocks/SM", "occupancy", "check"]
    body = []
    for r in reports:
        bad = problems(r)
        smem = f"{r.shared}" + (f"+{r.dynamic_shared}" if r.dynamic_shared else "")
        body.append([r.kernel, r.dtype, str(r.vec), r.arch, str(r.registers), smem,
                     str(r.spill_stores + r.spill_loads),
                     "-" if r.in_flight is None else f"{r.in_flight} of {r.loop_loads}",
                     "-" if r.load_bytes is None else str(r.load_bytes), str(r.threads),
                     str(r.blocks_per_sm), f"{100 * r.occupancy:.0f}%",
                     "ok" if not bad else "FAIL: " + "; ".join(bad)])
    return header, body


def format_summary(reports: Iterable[KernelReport], arch: str = "sm_90",
                   markdown: bool = True) -> str:
    """One line per kernel on ``arch`` over its dtypes and vector widths:
    register range, most shared memory, spilled bytes, fewest loads in
    flight, widest load, lowest occupancy, and how many pass the checks."""
    groups: Dict[str, List[KernelReport]] = {}
    for r in reports:
        if r.arch == arch:
            groups.setdefault(r.kernel, []).append(r)
    header = ["kernel", "regs", "smem B", "spill B", "in flight", "widest load B",
              "occupancy", "pass"]
    body = []
    for kernel, rs in groups.items():
        flights = [r.in_flight for r in rs if r.in_flight is not None]
        widths = [r.load_bytes for r in rs if r.load_bytes is not None]
        regs = sorted({r.registers for r in rs})
        body.append([
            kernel, f"{regs[0]}-{regs[-1]}" if len(regs) > 1 else str(regs[0]),
            str(max(r.shared + r.dynamic_shared for r in rs)),
            str(max(r.spill_stores + r.spill_loads for r in rs)),
            str(min(flights)) if flights else "-", str(max(widths)) if widths else "-",
            f"{100 * min(r.occupancy for r in rs):.0f}%",
            f"{sum(not problems(r) for r in rs)}/{len(rs)}"])
    if markdown:
        lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
        return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in body])
    widths_ = [max(len(h), *(len(row[i]) for row in body)) if body else len(h)
               for i, h in enumerate(header)]
    fmt = "  ".join("{:<%d}" % w for w in widths_)
    return "\n".join([fmt.format(*header), fmt.format(*("-" * w for w in widths_))]
                     + [fmt.format(*row).rstrip() for row in body])


__all__ = ["ARCHS", "DEVICES", "MIN_LOADS_IN_FLIGHT", "KernelReport", "occupancy", "find_tool",
           "unavailable_reason", "parse_ptxas", "parse_sass", "streaming_loop", "loop_loads",
           "load_bytes", "assemble", "report", "problems", "table", "format_summary",
           "planned_block",
           "max_dynamic_shared"]
