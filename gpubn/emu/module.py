"""``RawModule`` / ``RawKernel`` for the emu backend, mirroring CuPy's."""

from __future__ import annotations

import ctypes
import os
import re
import shutil
import struct
import subprocess
import threading
from typing import Dict, Optional, Sequence, Tuple

import numpy as np

from . import compiler
from .config import DEVICE, LaunchRecord, Traffic, _record, get_options
from .errors import DeadlockError, EmuError, KernelError, LaunchError, MemcheckError, RaceError

_I64 = ctypes.c_int64
_U64 = ctypes.c_uint64


class _Buffer(ctypes.Structure):
    _fields_ = [("lo", _U64), ("size", _U64), ("loaded", _U64), ("stored", _U64), ("arg_index", _I64)]


class _Launch(ctypes.Structure):
    _fields_ = [
        ("thunk", _U64), ("args", _U64), ("buffers", _U64), ("nbuffers", _I64),
        ("grid", _I64 * 3), ("block", _I64 * 3),
        ("shared_mem", _I64), ("seed", _I64), ("shuffle", _I64), ("memcheck", _I64), ("racecheck", _I64),
        ("initcheck", _I64), ("resident", _I64), ("global_report", _I64),
        ("error", _I64), ("is_store", _I64), ("size", _I64), ("region", _I64), ("address", _U64),
        ("block_idx", _I64 * 3), ("thread_idx", _I64 * 3), ("other_thread", _I64 * 3), ("other_is_store", _I64),
        ("buffer", _I64), ("offset", _I64), ("blocks_run", _I64), ("other_block", _I64 * 3),
        ("message", ctypes.c_char * 4096),
    ]


_KIND_NAMES = {1: "pointer", 2: "integer", 3: "floating-point", 4: "struct"}
_ERR_MEMCHECK, _ERR_RACE, _ERR_DEADLOCK, _ERR_KERNEL, _ERR_CONFIG = 1, 2, 3, 4, 5
_R_DYNAMIC, _R_STATIC, _R_GLOBAL = 2, 3, 4

_ORDINARY_RESIDENT = 4      # blocks an ordinary launch interleaves (at most one fewer than its grid)
# Threads emu can hold at once: each fiber's stack has a guard page, two memory
# mappings per thread against the kernel's limit of about 65530.
_MAX_RESIDENT_THREADS = 24576

_libs: Dict[str, ctypes.CDLL] = {}
_libs_lock = threading.Lock()


def _load(path: str) -> ctypes.CDLL:
    with _libs_lock:
        lib = _libs.get(path)
        if lib is None:
            lib = ctypes.CDLL(path, mode=os.RTLD_LOCAL | os.RTLD_NOW)
            lib.gpubn_emu_launch.restype = _I64
            lib.gpubn_emu_launch.argtypes = [ctypes.POINTER(_Launch)]
            lib.gpubn_emu_launch_size.restype = _I64
            if lib.gpubn_emu_launch_size() != ctypes.sizeof(_Launch):
                raise EmuError("emu runtime and Python disagree on the launch record layout")
            _libs[path] = lib
        return lib


def _dim3(value, what: str) -> Tuple[int, int, int]:
    if isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_)):
        dims = (int(value), 1, 1)
    elif isinstance(value, (tuple, list)) and 1 <= len(value) <= 3:
        dims = tuple(int(v) if isinstance(v, (int, np.integer)) and not isinstance(v, bool) else None
                     for v in value)
        if None in dims:
            raise TypeError(f"{what} must be an int or a tuple of 1 to 3 ints, got {value!r}")
        dims = dims + (1,) * (3 - len(dims))
    else:
        raise TypeError(f"{what} must be an int or a tuple of 1 to 3 ints, got {value!r}")
    if min(dims) < 1:
        raise ValueError(f"{what} dimensions must be >= 1, got {dims}")
    return dims  # type: ignore[return-value]


def _describe(value) -> str:
    if isinstance(value, np.ndarray):
        return f"numpy.ndarray of {value.dtype}"
    if isinstance(value, np.generic):
        return f"numpy.{type(value).__name__} ({value.dtype.itemsize} bytes)"
    return type(value).__name__


class Function:
    """A kernel of an emu :class:`RawModule`; call it like a CuPy ``RawKernel``:
    ``fn(grid, block, args, shared_mem=0)``."""

    def __init__(self, module: "RawModule", name: str, lib: ctypes.CDLL, index: int, library_path: str):
        self.module = module
        self.name = name
        self._lib = lib
        self._library_path = library_path
        self._thunk = ctypes.cast(getattr(lib, f"gpubn_emu_thunk_{index}"), ctypes.c_void_p).value
        info_fn = getattr(lib, f"gpubn_emu_info_{index}")
        info_fn.restype = ctypes.POINTER(ctypes.c_longlong)
        info = info_fn()
        n = info[0]
        self.num_params = n
        self.param_sizes = tuple(info[1 + i] for i in range(n))
        self.param_kinds = tuple(_KIND_NAMES[info[1 + n + i]] for i in range(n))
        self.shared_size_bytes = _static_shared(library_path)[index]
        self.max_threads_per_block = DEVICE.max_threads_per_block
        self.num_regs = DEVICE.registers_per_thread
        self._max_dynamic = DEVICE.default_shared_per_block - self.shared_size_bytes

    @property
    def max_dynamic_shared_size_bytes(self) -> int:
        """The most dynamic shared memory a launch may ask for (CUDA's
        ``CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES``, as on CuPy's
        ``Function``): 48 KiB minus the static shared memory unless raised, at
        most 227 KiB minus it."""
        return self._max_dynamic

    @max_dynamic_shared_size_bytes.setter
    def max_dynamic_shared_size_bytes(self, value) -> None:
        limit = DEVICE.max_shared_per_block - self.shared_size_bytes
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or not 0 <= value <= limit:
            raise LaunchError(f"kernel {self.name!r}: max_dynamic_shared_size_bytes must be an int in [0, {limit}] "
                              f"({DEVICE.max_shared_per_block} bytes per block on {DEVICE.name} minus "
                              f"{self.shared_size_bytes} bytes of static shared memory), got {value!r}",
                              "CUDA_ERROR_INVALID_VALUE")
        self._max_dynamic = int(value)

    def __repr__(self):
        return f"<gpubn.emu.Function {self.name!r} ({self.num_params} parameters)>"

    # ------------------------------------------------------------ arguments
    def _convert(self, args):
        if not isinstance(args, (tuple, list)):
            raise TypeError(f"kernel {self.name!r}: args must be a tuple, got {type(args).__name__}")
        if len(args) != self.num_params:
            raise TypeError(f"kernel {self.name!r} takes {self.num_params} arguments, got {len(args)}")
        keep = []
        ptrs = (ctypes.c_void_p * max(1, len(args)))()
        buffers = []
        for i, a in enumerate(args):
            size, kind = self.param_sizes[i], self.param_kinds[i]
            where = f"kernel {self.name!r}, argument {i}"
            if a is None:
                raise TypeError(
                    f"{where}: None is not a null pointer: CuPy's RawKernel does not pass None "
                    f"as NULL (the kernel receives a garbage address), so emu refuses it; pass "
                    f"np.uint64(0) for a null pointer (CuPy and emu both pass it as 8 zero bytes)")
            if kind == "pointer" and isinstance(a, np.uint64):
                # a raw device address (CuPy passes the scalar's 8 bytes); 0 is the
                # null pointer, anything else is checked by memcheck.  Signed
                # integers stay refused: there they are far more often a slip.
                cell = ctypes.c_void_p(int(a) or None)
                keep.append(cell)
                ptrs[i] = ctypes.addressof(cell)
                continue
            if isinstance(a, np.ndarray):
                if kind != "pointer":
                    raise TypeError(f"{where}: the parameter is a {size}-byte {kind} value, got {_describe(a)}")
                if a.dtype.hasobject:
                    raise TypeError(f"{where}: arrays of Python objects cannot be passed to a kernel")
                if not (a.flags.c_contiguous or a.flags.f_contiguous):
                    raise ValueError(f"{where}: arrays must be contiguous (pass np.ascontiguousarray(...))")
                cell = ctypes.c_void_p(a.ctypes.data)
                if a.nbytes:
                    buffers.append((a.ctypes.data, a.nbytes, i))
                keep.append(a)
                keep.append(cell)
                ptrs[i] = ctypes.addressof(cell)
                continue
            given = _describe(a)          # as the caller wrote it (a Python int is an `int`)
            if isinstance(a, bool):
                a = np.bool_(a)
            elif isinstance(a, int):
                a = np.int64(a)
            elif isinstance(a, float):
                a = np.float64(a)
            elif isinstance(a, complex):
                a = np.complex128(a)
            if not isinstance(a, np.generic):
                raise TypeError(f"{where}: expected a NumPy array or a NumPy scalar, got {given}")
            if kind == "pointer":
                raise TypeError(f"{where}: the parameter is a pointer, got {given}")
            if a.dtype.itemsize != size:
                raise TypeError(f"{where}: the parameter is a {size}-byte {kind} value, got {given}")
            if kind == "floating-point" and not isinstance(a, np.floating):
                raise TypeError(f"{where}: the parameter is a {size}-byte floating-point value, got {given}")
            if kind == "integer" and not isinstance(a, (np.integer, np.bool_)):
                raise TypeError(f"{where}: the parameter is a {size}-byte integer value, got {given}")
            cell = np.array(a)
            keep.append(cell)
            ptrs[i] = cell.ctypes.data
        return ptrs, buffers, keep

    # ------------------------------------------------------------ launch
    def _check_resources(self, g, b, shared_mem: int) -> None:
        """What the driver refuses before any thread runs, on the modelled device."""
        d, name = DEVICE, self.name
        if b[0] * b[1] * b[2] > d.max_threads_per_block or any(v > m for v, m in zip(b, d.max_block)):
            raise LaunchError(f"kernel {name!r}: block {b} exceeds CUDA's limits ({d.max_threads_per_block} "
                              f"threads, x and y <= {d.max_block[0]}, z <= {d.max_block[2]})",
                              "CUDA_ERROR_INVALID_VALUE")
        if any(v > m for v, m in zip(g, d.max_grid)):
            raise LaunchError(f"kernel {name!r}: grid {g} exceeds CUDA's limits (x < 2**31, y and z <= "
                              f"{d.max_grid[1]})", "CUDA_ERROR_INVALID_VALUE")
        total = self.shared_size_bytes + shared_mem
        if shared_mem > self._max_dynamic:
            why = (f"more than the {d.default_shared_per_block} a block may use unless the function opts in "
                   f"(Function.max_dynamic_shared_size_bytes = {shared_mem}; it is {self._max_dynamic})"
                   if total <= d.max_shared_per_block else
                   f"more than the {d.max_shared_per_block} a block may use on {d.name}")
            raise LaunchError(f"kernel {name!r}: {self.shared_size_bytes} bytes of static plus {shared_mem} bytes "
                              f"of dynamic shared memory = {total} bytes per block, {why}",
                              "CUDA_ERROR_INVALID_VALUE")
        params = 0
        for size in self.param_sizes:
            params = -(-params // min(size, 8)) * min(size, 8) + size
        if params > d.max_param_bytes:
            raise LaunchError(f"kernel {name!r}: {params} bytes of kernel parameters; at most {d.max_param_bytes}",
                              "CUDA_ERROR_INVALID_VALUE")

    def max_active_blocks_per_multiprocessor(self, block_size: int, dynamic_smem_size: int = 0) -> int:
        """How many blocks of ``block_size`` threads with ``dynamic_smem_size``
        bytes of dynamic shared memory fit on one SM of the modelled device
        (``cudaOccupancyMaxActiveBlocksPerMultiprocessor``): limited by threads,
        registers (``num_regs`` per thread, allocated per warp), shared memory
        and blocks per SM."""
        d = DEVICE
        warps = -(-int(block_size) // 32)
        shared = self.shared_size_bytes + int(dynamic_smem_size) + d.reserved_shared_per_block
        return max(0, min(d.max_blocks_per_sm, d.max_threads_per_sm // (32 * warps),
                          d.registers_per_sm // (self.num_regs * 32 * warps), d.shared_per_sm // shared))

    def __call__(self, grid, block, args, *, shared_mem=0, stream=None, enable_cooperative_groups=None):
        g = _dim3(grid, "grid")
        b = _dim3(block, "block")
        if isinstance(shared_mem, bool) or not isinstance(shared_mem, (int, np.integer)) or shared_mem < 0:
            raise ValueError(f"shared_mem must be a non-negative int, got {shared_mem!r}")
        self._check_resources(g, b, int(shared_mem))
        cooperative = self.module.enable_cooperative_groups if enable_cooperative_groups is None \
            else bool(enable_cooperative_groups)
        nblocks = g[0] * g[1] * g[2]
        per_sm = self.max_active_blocks_per_multiprocessor(b[0] * b[1] * b[2], int(shared_mem))
        coresident = DEVICE.sm_count * per_sm
        if cooperative and nblocks > coresident:
            raise LaunchError(f"kernel {self.name!r}: a cooperative launch of {nblocks} blocks, but at most "
                              f"{coresident} can be co-resident on {DEVICE.name} ({DEVICE.sm_count} SMs x {per_sm} "
                              f"blocks of {b[0] * b[1] * b[2]} threads with {self.shared_size_bytes + int(shared_mem)}"
                              f" bytes of shared memory and {self.num_regs} registers per thread)",
                              "CUDA_ERROR_COOPERATIVE_LAUNCH_TOO_LARGE")
        # An ordinary launch promises no co-residency: one block fewer than the
        # grid runs at a time, so a wait on a block that has not started is a
        # deadlock; a cooperative launch runs every block at once.
        resident = nblocks if cooperative else max(1, min(nblocks - 1, coresident, _ORDINARY_RESIDENT))
        if resident * b[0] * b[1] * b[2] > _MAX_RESIDENT_THREADS:
            raise EmuError(f"kernel {self.name!r}: this cooperative launch runs {nblocks} blocks of "
                           f"{b[0] * b[1] * b[2]} threads at once, more than the {_MAX_RESIDENT_THREADS} threads "
                           f"emu can hold at a time; test it with a smaller grid")
        ptrs, buffers, keep = self._convert(args)
        opts = get_options()
        bufarr = (_Buffer * max(1, len(buffers)))()
        for k, (lo, size, idx) in enumerate(buffers):
            bufarr[k].lo, bufarr[k].size, bufarr[k].arg_index = lo, size, idx
        L = _Launch()
        L.thunk = self._thunk
        L.args = ctypes.addressof(ptrs)
        L.buffers = ctypes.addressof(bufarr)
        L.nbuffers = len(buffers)
        L.grid[:] = g
        L.block[:] = b
        L.shared_mem = int(shared_mem)
        L.shuffle = opts.seed is not None
        L.seed = opts.seed or 0
        L.memcheck = opts.memcheck
        L.racecheck = opts.racecheck
        L.initcheck = opts.initcheck
        L.resident = resident
        L.global_report = opts.global_racecheck
        self._lib.gpubn_emu_launch(ctypes.byref(L))
        del keep
        if L.error:
            raise self._error(L, g, b, args)
        loaded = sum(bufarr[k].loaded for k in range(len(buffers)))
        stored = sum(bufarr[k].stored for k in range(len(buffers)))
        per, sizes = {}, {}
        for k, (_, size, idx) in enumerate(buffers):
            t = per.get(idx, Traffic(0, 0))
            per[idx] = Traffic(t.loaded + bufarr[k].loaded, t.stored + bufarr[k].stored)
            sizes[idx] = sizes.get(idx, 0) + int(size)
        _record(LaunchRecord(self.name, g, b, int(shared_mem), loaded, stored, per,
                             sizes=sizes))

    # ------------------------------------------------------------ errors
    def _error(self, L: _Launch, grid, block, args) -> EmuError:
        msg = L.message.decode(errors="replace")
        blk = tuple(L.block_idx)
        thr = tuple(L.thread_idx) if L.thread_idx[0] >= 0 else None
        name = self.name
        if L.error == _ERR_MEMCHECK:
            access = "store" if L.is_store else "load"
            where = f"kernel {name!r}, block {blk}, thread {thr}"
            if L.region == _R_DYNAMIC:
                detail = (f"offset {L.offset} of dynamic shared memory "
                          f"(shared_mem={L.shared_mem} bytes)")
                buf = None
                off = L.offset
            elif L.region == _R_STATIC:
                var = _symbol_at(self._library_path, int(L.offset))
                detail = (f"byte {var[1]} of __shared__ variable {var[0]!r}" if var
                          else f"static shared memory (module offset 0x{L.offset:x})")
                buf, off = None, L.offset
            elif L.buffer >= 0:
                nbytes = self._buffer_size(L)
                off = L.offset
                arr = args[L.buffer]
                rel = (f"{-off} bytes before its start" if off < 0 else
                       f"{off - nbytes} bytes past its end" if off >= nbytes else "inside it")
                if off >= 0 and off % arr.itemsize == 0:
                    rel = f"element {off // arr.itemsize}, " + rel
                detail = (f"nearest buffer: argument {L.buffer} ({nbytes} bytes, {arr.dtype} array of shape "
                          f"{arr.shape}), offset {off} ({rel})")
                buf = int(L.buffer)
                other = _landed_in(args, buf, int(L.address)) if not 0 <= off < nbytes else None
                if other is not None:
                    # Each argument runs in its own staged copy, so this pointer did not
                    # reach the neighbour on emu; on the GPU it may silently have.
                    msg = (f"pointer from argument {buf} reached argument {other[0]} at offset {other[1]} "
                           f"(the arrays are neighbours in memory; a GPU would not have reported it)")
            else:
                detail = "the launch has no array arguments"
                buf, off = None, 0
            text = (f"memcheck: invalid {L.size}-byte {access} at 0x{L.address:x} in {where}: {msg}; {detail}")
            return MemcheckError(text, name, blk, thr, access, int(L.size), int(L.address), buf, int(off))
        if L.error == _ERR_RACE and L.region == _R_GLOBAL:
            access = "store" if L.is_store else "load"
            other, other_block = tuple(L.other_thread), tuple(L.other_block)
            buf, off = int(L.buffer), int(L.offset)
            arr = args[buf]
            elem = f" (element {off // arr.itemsize})" if arr.itemsize else ""
            other_access = "store" if L.other_is_store else "load"
            where = (f"at byte {off}{elem} of argument {buf} ({arr.dtype} array of shape {arr.shape}) in kernel "
                     f"{name!r}")
            if msg == "non-volatile load":
                text = (f"racecheck: inter-block race (non-volatile load hazard) {where}: block {blk} thread {thr} "
                        f"loads it with a plain load while block {other_block} thread {other} writes it with an "
                        f"atomic or a volatile store, and nothing orders them; the compiler may keep a plain load "
                        f"in a register (a spin-wait on it never ends): load it with a volatile load or an atomic, "
                        f"then __threadfence() before using what it guards")
            else:
                text = (f"racecheck: inter-block race ({msg} hazard) {where}: block {blk} thread {thr} {access}s it "
                        f"after block {other_block} thread {other} {'stored' if L.other_is_store else 'loaded'} "
                        f"it, with no chain ordering them (the {'writer' if L.other_is_store else 'reader'}'s "
                        f"__threadfence() after its {other_access}, then an atomic; this block's atomic on that "
                        f"location, then its __threadfence())")
            return RaceError(text, name, blk, thr, other, access, other_access, "global", off, None,
                             other_block=other_block, buffer=buf)
        if L.error == _ERR_RACE:
            access = "store" if L.is_store else "load"
            other_access = "store" if L.other_is_store else "load"
            other = tuple(L.other_thread)
            if L.region == _R_DYNAMIC:
                memory, offset, variable = "dynamic shared", int(L.offset), None
                where = f"byte {offset} of dynamic shared memory"
            else:
                memory, offset = "static shared", int(L.offset)
                variable = _symbol_at(self._library_path, offset)
                where = (f"byte {variable[1]} of __shared__ variable {variable[0]!r}" if variable
                         else f"static shared memory (module offset 0x{offset:x})")
                variable = variable[0] if variable else None
            text = (f"racecheck: {msg} at {where} in kernel {name!r}, block {blk}: thread {thr} {access}s it "
                    f"after thread {other} {'stored to' if other_access == 'store' else 'loaded'} it with no "
                    f"__syncthreads() (or __syncwarp() within a warp) in between")
            return RaceError(text, name, blk, thr, other, access, other_access, memory, offset, variable)
        if L.error == _ERR_DEADLOCK and thr is not None:      # a spin-wait that cannot end
            return DeadlockError(f"deadlock in kernel {name!r}, block {blk}: thread {thr} {msg}", name, blk, thr)
        if L.error == _ERR_DEADLOCK:
            n = block[0] * block[1] * block[2]
            text = (f"deadlock in kernel {name!r}, block {blk} ({n} threads, linear thread index "
                    f"x + y*blockDim.x + z*blockDim.x*blockDim.y): {msg}. A barrier must be reached by every "
                    f"thread of the block")
            return DeadlockError(text, name, blk, None)
        if L.error == _ERR_KERNEL:
            return KernelError(f"kernel {name!r}, block {blk}, thread {thr}: {msg}", name, blk, thr)
        return EmuError(f"kernel {name!r}: {msg}")

    @staticmethod
    def _buffer_size(L) -> int:
        # the argument's size, found from the launch's buffer table
        bufs = ctypes.cast(L.buffers, ctypes.POINTER(_Buffer))
        for k in range(L.nbuffers):
            if bufs[k].arg_index == L.buffer:
                return int(bufs[k].size)
        return 0


def _landed_in(args, source: int, address: int):
    """(index, offset) of the array argument other than ``source`` whose host
    memory holds ``address``, or ``None``."""
    for i, a in enumerate(args):
        if i != source and isinstance(a, np.ndarray) and a.nbytes:
            lo = a.ctypes.data
            if lo <= address < lo + a.nbytes:
                return i, address - lo
    return None


class RawModule:
    """A CUDA C++ source compiled for the emu backend, like ``cupy.RawModule``.

    ``RawModule(code=src, options=("-I/dir", "-DFOO=1"), name_expressions=("k<float>",))``
    then ``get_function("k<float>")`` (a name expression, or the name of an
    ``extern "C" __global__`` kernel).  The source is compiled on first use.
    """

    def __init__(self, code: Optional[str] = None, *, path: Optional[str] = None, options: Sequence[str] = (),
                 name_expressions: Optional[Sequence[str]] = None, filename: Optional[str] = None,
                 enable_cooperative_groups: bool = False, **cupy_only):
        for key in cupy_only:
            if key not in ("backend", "translate_cucomplex", "log_stream", "jitify"):
                raise TypeError(f"RawModule() got an unexpected keyword argument {key!r}")
        if (code is None) == (path is None):
            raise TypeError("RawModule needs exactly one of code= (CUDA C++ source) or path= (a .cu file)")
        if path is not None:
            with open(path, encoding="utf-8") as fh:
                code = fh.read()
            filename = filename or os.path.basename(path)
        if not isinstance(code, str):
            raise TypeError(f"code must be a str, got {type(code).__name__}")
        if isinstance(options, str):
            options = (options,)
        names = () if name_expressions is None else tuple(name_expressions)
        for n in names:
            if not isinstance(n, str) or not n.strip():
                raise TypeError(f"name_expressions must be non-empty strings, got {n!r}")
        compiler.parse_options(tuple(options))      # validate now
        self.code = code
        self.options = tuple(options)
        self.name_expressions = names
        self.filename = filename or "kernel.cu"
        # CuPy's parameter: launches of this module's kernels are cooperative
        # (every block co-resident; refused when the grid cannot be)
        self.enable_cooperative_groups = bool(enable_cooperative_groups)
        self._built = None
        self._functions: Dict[str, Function] = {}
        self._lock = threading.Lock()

    def compile(self) -> "RawModule":
        """Compile now (otherwise done by the first ``get_function``)."""
        with self._lock:
            if self._built is None:
                self._built = compiler.build(self.code, self.options, self.name_expressions, self.filename)
        return self

    @property
    def library_path(self) -> str:
        self.compile()
        return str(self._built.path)

    def get_function(self, name: str) -> Function:
        self.compile()
        with self._lock:
            fn = self._functions.get(name)
            if fn is None:
                kernels = self._built.kernels
                if name not in kernels:
                    raise EmuError(
                        f"no kernel {name!r} in this module; name expressions: {list(self.name_expressions)}, "
                        f"extern \"C\" kernels: {[k for k in kernels if k not in self.name_expressions]}")
                lib = _load(str(self._built.path))
                fn = Function(self, name, lib, kernels.index(name), str(self._built.path))
                self._functions[name] = fn
            return fn


def RawKernel(code: str, name: str, options: Sequence[str] = (), **kwargs) -> Function:
    """Like ``cupy.RawKernel(code, name, options)``: the ``extern "C"`` kernel
    ``name`` of ``code``, ready to launch."""
    return RawModule(code=code, options=options, **kwargs).get_function(name)


# ---------------------------------------------------------------- static shared variable names
_symtabs: Dict[str, list] = {}


def _symbol_at(path: str, offset: int):
    """(demangled name, offset inside it) of the data symbol covering ``offset``."""
    syms = _symtabs.get(path)
    if syms is None:
        try:
            syms = _read_symbols(path)
        except Exception:  # a diagnostic nicety: never fail the report over it
            syms = []
        _symtabs[path] = syms
    for value, size, name in syms:
        if value <= offset < value + max(size, 1):
            return _demangle(name).replace(compiler.SHARED_STORAGE_PREFIX, ""), offset - value
    return None


_static_shared_cache: Dict[str, Tuple[int, ...]] = {}
_CALL_TARGET = re.compile(r"<([^>+@]+)(?:@plt)?(?:\+0x[0-9a-f]+)?>")


def _static_shared(path: str) -> Tuple[int, ...]:
    """Bytes of static ``__shared__`` storage each entry point of a library
    can reach (its ``shared_size_bytes``), index by entry point.

    All static shared variables of a module live in one region on emu; a GPU
    gives each kernel those it uses.  Which ones a kernel uses is read off the
    machine code: the functions reachable from its entry point through calls
    and jumps, and the shared-storage symbols they address."""
    sizes = _static_shared_cache.get(path)
    if sizes is not None:
        return sizes
    tool = shutil.which("objdump")
    symbols = {name: size for _, size, name in _read_symbols(path)}
    refs: Dict[str, set] = {}
    if tool:
        out = subprocess.run([tool, "-d", "-w", "--no-show-raw-insn", path], capture_output=True, text=True,
                             timeout=120).stdout
        current = None
        for line in out.splitlines():
            if line and not line[0].isspace():
                m = re.match(r"[0-9a-f]+ <(.+)>:$", line)
                current = refs.setdefault(m.group(1), set()) if m else None
            elif current is not None:
                current.update(_CALL_TARGET.findall(line))
    entries = sorted(int(n[len("gpubn_emu_thunk_"):]) for n in refs if n.startswith("gpubn_emu_thunk_"))
    result = []
    for i in range(entries[-1] + 1 if entries else 0):
        seen, todo, total = set(), [f"gpubn_emu_thunk_{i}"], 0
        while todo:
            fn = todo.pop()
            if fn in seen:
                continue
            seen.add(fn)
            if compiler.SHARED_STORAGE_PREFIX in fn and fn in symbols:
                total += symbols[fn]
            todo.extend(refs.get(fn, ()))
        result.append(total)
    sizes = tuple(result)
    _static_shared_cache[path] = sizes
    return sizes


def _read_symbols(path: str) -> list:
    with open(path, "rb") as fh:
        data = fh.read()
    if data[:4] != b"\x7fELF" or data[4] != 2:
        return []
    shoff, = struct.unpack_from("<Q", data, 0x28)
    shentsize, shnum = struct.unpack_from("<HH", data, 0x3A)
    sections = [struct.unpack_from("<IIQQQQIIQQ", data, shoff + i * shentsize) for i in range(shnum)]
    out = []
    for sh in sections:
        if sh[1] != 2:      # SHT_SYMTAB
            continue
        strtab = sections[sh[6]]
        for k in range(sh[5] // 24):
            st_name, st_info, _, _, st_value, st_size = struct.unpack_from("<IBBHQQ", data, sh[4] + k * 24)
            if st_info & 0xF != 1 or st_size == 0:    # STT_OBJECT
                continue
            start = strtab[4] + st_name
            name = data[start:data.index(b"\0", start)].decode(errors="replace")
            out.append((st_value, st_size, name))
    return out


def _demangle(name: str) -> str:
    tool = shutil.which("c++filt")
    if tool and name.startswith("_Z"):
        try:
            return subprocess.run([tool, name], capture_output=True, text=True, timeout=10).stdout.strip() or name
        except OSError:
            return name
    return name
