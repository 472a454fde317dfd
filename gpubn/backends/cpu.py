"""The ``cpu`` backend: fused parallel loops compiled by Numba (extra ``gpubn[cpu]``).

Normalization is memory-bound, so each pass is one loop over memory, the same
passes as the GPU kernels:

* statistics: one read of ``x``;
* normalize: one read of ``x``, one write of ``y``;
* backward: one read of ``x`` and ``dy`` for the two sums, then one read of
  ``x`` and ``dy`` and one write of ``dx``;
* the residual-block epilogue ``relu(bn(x) + residual)``: the residual is
  read in the normalize loop; its backward masks ``dy`` by ``y > 0`` in the
  loop of the sums, which writes the masked gradient (``dresidual``) that the
  ``dx`` loop then reads in place of ``dy``;
* NCHW training with many channels whose values fit the cache
  (:func:`_tile_channels`): one loop per tile of channels (their runs side
  by side, so short runs make long rows) does both passes of a direction,
  the second over values the first just read, so memory sees one read of
  ``x`` and a write of ``y`` forward, one read of ``x`` and ``dy`` and a
  write of ``dx`` backward (the floor).  Short runs are walked by columns
  (the loop over a tile's row vectorizes across its channels), runs of
  ``_RUNS_MIN`` values or more (``_RUNS_MIN_CACHED`` in a tensor held in the
  cache, ``_ROWS_MIN`` in fewer than ``_FEW_ROWS`` rows) one by one, as the
  rows of NCHW (constants per run, none per column);
* layer norm: one read and one write per direction (a row is normalized while
  it is still in the cache).

Work is cut into blocks by the shape alone (never by the thread count).  Each
block writes its own partial sums, and the partials are added in block order,
so the results are bitwise the same for any number of threads (a tile is
summed in order, on one thread).  A canonical
``(outer, C, inner)`` array is walked in memory order: rows of ``inner``
values of one channel when ``inner`` is long (NCHW), else whole ``C * inner``
rows with the per-channel constants streamed alongside (NC, channels-last),
where the loop over channels is the one the compiler vectorizes.

Accuracy: sums are taken around a per-channel (per-row for layer norm) shift,
the first value of the channel, within a row (NCHW) or over up to
``_FOLD`` rows (NC, channels-last) in the data's precision and across those
in float64; a channel whose mean lands far from its shift is
summed again around the mean.  Normalization subtracts the mean as
``hi + lo`` (``x - hi`` is exact near the mean, ``lo`` folds into the
per-channel constants), so ``1e4 + N(0, 1)`` float32 data keeps float32
accuracy.  float32 and float64 are computed in their own precision;
float16 and bfloat16 are widened to float32 in registers as they are read
and rounded to nearest even as they are written (no float32 copy).

Threads: Numba's ``tbb`` layer when the ``tbb`` package is installed (the
extra ``gpubn[cpu]`` brings it where it has wheels), else ``workqueue``: the
two that survive ``os.fork()`` and whose idle threads sleep instead of
spinning.  ``tbb`` starts a loop in microseconds, ``workqueue`` wakes its
threads for each loop (about 0.1 ms) and does not allow two parallel regions
at once; calls from several Python threads take turns on a lock under
either.  ``GPUBN_NUM_THREADS`` caps the threads used; a loop over few
values runs on the calling thread (:func:`_serial_max`).  Compiled loops are
cached on disk under ``$GPUBN_CACHE_DIR/cpu`` (default
``~/.cache/gpubn/cpu``), so a new process does not compile them again.

Outputs of ``_STREAM_BYTES`` (8 MiB) or more are written with non-temporal
stores, whole cache lines at a time, bypassing the caches: a plain store
reads its line before writing it, a third of the traffic of a loop that
reads one tensor and writes another.

Outputs are ordinary NumPy arrays; on import the backend raises glibc's
malloc thresholds once (:func:`_prime_malloc`), so outputs of up to 32 MiB
freed and allocated again call after call reuse the heap's pages instead of
faulting them in anew.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import importlib.metadata
import math
import os
import platform
import sys
import threading
import time
from typing import NamedTuple

import numpy as np

from .._validation import acc_dtype
from .base import HostBackend, quiet

try:
    import llvmlite.ir
    import numba
    import numba.core.cgutils
    import numba.extending
except ImportError as exc:  # the backend registry reports this
    raise ImportError(f"Numba is not installed ({exc}); install the extra gpubn[cpu]") from exc

from numba.core import caching as _numba_caching

from ..emu.compiler import cache_dir as _gpubn_cache_dir


# ------------------------------------------------------------ threading ----
_TBB_LIBRARY = {"win32": "tbb12.dll", "darwin": "libtbb.12.dylib"}.get(sys.platform,
                                                                        "libtbb.so.12")


def _load_tbb() -> bool:
    """Load the library of the ``tbb`` package, if installed, so that
    Numba's ``tbb`` layer finds it (pip puts it in the environment's lib
    folder, which the loader does not search in a virtual environment)."""
    try:
        files = importlib.metadata.files("tbb") or ()
    except importlib.metadata.PackageNotFoundError:
        return False
    for f in files:
        if f.name == _TBB_LIBRARY:
            try:
                ctypes.CDLL(str(f.locate()), mode=ctypes.RTLD_GLOBAL)
                return True
            except OSError:
                return False
    return False


_load_tbb()     # also for a user who asks for tbb with NUMBA_THREADING_LAYER
if "NUMBA_THREADING_LAYER" not in os.environ:
    # tbb when it loads (Numba checks its version too), else workqueue, which
    # is always there: never the GNU OpenMP layer, which hangs in a forked
    # child and keeps its threads spinning after a loop
    numba.config.THREADING_LAYER = "default"
    numba.config.THREADING_LAYER_PRIORITY = ["tbb", "workqueue", "omp"]

_LOCK = threading.Lock()


def _new_lock():
    global _LOCK
    _LOCK = threading.Lock()


os.register_at_fork(after_in_child=_new_lock)   # a lock held by another thread at fork


def num_threads() -> int:
    """Threads a call uses: ``GPUBN_NUM_THREADS`` when set (at least 1), else
    every thread Numba starts; never more than Numba started."""
    limit = numba.config.NUMBA_NUM_THREADS
    env = os.environ.get("GPUBN_NUM_THREADS")
    if env:
        try:
            return max(1, min(limit, int(env)))
        except ValueError:
            pass
    return limit


def _serialized(fn):
    """Run a backend method alone (the workqueue layer runs one parallel
    region at a time; :class:`_jit` sets the threads of each).  NumPy's error
    state (:func:`quiet`) is entered only around the few NumPy expressions
    left between the compiled loops: it costs a microsecond, a small input's
    whole loop."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with _LOCK:
            return fn(*args, **kwargs)
    return wrapper


# ------------------------------------------------------------ allocator ----
# glibc serves a request above its mmap threshold (128 KiB at start) with a
# mapping of its own, and when such a block is freed raises the threshold to
# its size (up to 32 MiB) and the heap's trim threshold to twice that.  Until
# a process has freed a large block, a forward's y and a backward's dx of a
# few MiB, allocated and freed on every call, go back to the system each time
# and their pages fault in again on the next call: batch norm forward +
# backward of 256x1024 float32 took 2.0 ms (480 faults a call) against
# 0.5 ms with the thresholds up.  Freeing one block of just under 32 MiB
# (never touched, so never faulted in) once sets them where a program that
# has freed a large array has them anyway.
# Larger arrays still get mappings of their own, and an explicit setting
# (MALLOC_TRIM_THRESHOLD_ and the like) turns the dynamic thresholds off;
# out= avoids them all.
_PRIME_BYTES = (32 << 20) - (64 << 10)  # its mapping within glibc's 32 MiB cap


def _prime_malloc() -> bool:
    """Raise glibc's dynamic mmap and trim thresholds as freeing a large
    array would (see above); False where the C library is not glibc or
    ``GPUBN_MALLOC_PRIME=0``."""
    if os.environ.get("GPUBN_MALLOC_PRIME", "1") == "0":
        return False
    try:
        if not os.confstr("CS_GNU_LIBC_VERSION"):
            return False
    except (AttributeError, ValueError, OSError):    # not glibc
        return False
    libc = ctypes.CDLL(None)
    libc.malloc.restype = ctypes.c_void_p
    libc.malloc.argtypes = [ctypes.c_size_t]
    libc.free.argtypes = [ctypes.c_void_p]
    block = libc.malloc(_PRIME_BYTES)
    libc.free(block)
    return bool(block)


_prime_malloc()


# ---------------------------------------------------------- disk cache -----
def cache_dir() -> str:
    """Where compiled loops are kept: ``$GPUBN_CACHE_DIR/cpu`` (default
    ``~/.cache/gpubn/cpu``)."""
    return str(_gpubn_cache_dir().parent / "cpu")


class _CacheLocator(_numba_caching._CacheLocator):
    """Numba's cache for the functions of this file goes to :func:`cache_dir`
    (not next to the source, which may be a read-only site-packages)."""

    def __init__(self, py_func, py_file):
        self._py_file = py_file
        self._lineno = py_func.__code__.co_firstlineno
        # one folder per installed copy of this file
        tag = hashlib.sha256(os.path.abspath(py_file).encode()).hexdigest()[:12]
        self._path = os.path.join(cache_dir(), tag)

    def ensure_cache_path(self):
        os.makedirs(self._path, exist_ok=True)
        super().ensure_cache_path()

    def get_cache_path(self):
        return self._path

    def get_source_stamp(self):
        st = os.stat(self._py_file)
        return st.st_mtime, st.st_size

    def get_disambiguator(self):
        return str(self._lineno)

    @classmethod
    def from_function(cls, py_func, py_file):
        if os.path.abspath(py_file) != os.path.abspath(__file__):
            return None
        return cls(py_func, py_file)


_LOCATORS = getattr(_numba_caching, "CacheImpl", None) or _numba_caching._CacheImpl
if _CacheLocator not in _LOCATORS._locator_classes:
    _LOCATORS._locator_classes.insert(0, _CacheLocator)

# reassociation lets the compiler vectorize the sums; no contraction (an FMA
# would break identities such as dy*w - c1 == 0 for a one-value row); NaN and
# Inf keep IEEE semantics (no 'nnan' / 'ninf')
_FLAGS = {"reassoc"}


@numba.njit(inline="always")
def _i64(i):
    """A ``prange`` index (unsigned) as the int64 a caller from Python passes:
    one compiled version of the blocks' code for both."""
    return np.int64(i)


class _jit:
    """A loop over blocks: ``serial(b0, b1, *args)`` runs the blocks ``[b0,
    b1)`` in order on the calling thread; ``parallel(n, *args)``, a
    ``prange`` over the ``n`` blocks, calls it a block at a time on the
    threads: the same blocks, so the same results.  The blocks' code is
    compiled once, in ``serial``; ``parallel`` is a short loop around it.
    Called with the number of blocks and the number of values the loop
    walks first: inputs of one block, or of at most :func:`_serial_max`
    values, run ``serial`` over every block, where waking the threads costs
    more than they save; ``parallel`` runs on ``num_threads()`` threads (a
    setting of the calling thread, made here: a few microseconds a serial
    call need not pay).  Use: ``@_jit.over(serial)`` on the parallel loop."""

    def __init__(self, serial, parallel):
        self.serial = serial
        self.parallel = numba.njit(parallel=True, cache=True, fastmath=_FLAGS)(parallel)

    @classmethod
    def over(cls, serial):
        return lambda parallel: cls(serial, parallel)

    def __call__(self, blocks, values, *args):
        if blocks > 1 and values > _serial_max():
            return self.threaded(blocks, *args)
        return self.serial(0, blocks, *args)

    def threaded(self, blocks, *args):
        """``parallel`` on ``num_threads()`` threads."""
        numba.set_num_threads(num_threads())
        return self.parallel(blocks, *args)


# ------------------------------------------------ float16 and bfloat16 -----
# The loops take float16 and bfloat16 arrays as their bits, float16 as uint16
# and bfloat16 as int16 (the integer type tells the compiled loop which format
# it holds), widen each value to float32 in registers as it is read and round
# each result to nearest even as it is written: no float32 copy of the tensor.
# The results are bitwise those of NumPy's (float16) and ml_dtypes' (bfloat16)
# conversions, NaN included (tests/test_cpu_backend.py runs every bit pattern).
@functools.lru_cache(maxsize=None)      # called for every array of every call
def _bits_dtype(dtype):
    """The dtype the loops see for data of ``dtype``."""
    if dtype == np.float16:
        return np.dtype(np.uint16)
    return np.dtype(np.int16) if dtype.name == "bfloat16" else dtype


@numba.njit(cache=True)
def f16_bits_to_f32(h):
    """A float16 (its bits, uint16) as float32, exactly."""
    u = np.uint32(np.uint16(h))
    sign = np.uint32((u & 0x8000) << 16)
    o = np.uint32((u & 0x7fff) << 13)       # exponent and fraction in float32's places
    # finite values: the exponent bias moves from 15 to 127, a factor 2**112
    # (exact, subnormal float16 values included); all-ones exponent: Inf / NaN
    scaled = np.float32(np.uint32(o).view(np.float32) * np.float32(2.0 ** 112)).view(np.uint32)
    o = np.uint32(o | 0x7f800000) if o >= np.uint32(0x0f800000) else scaled
    return np.uint32(o | sign).view(np.float32)


@numba.njit(cache=True)
def f32_to_f16_bits(f):
    """float32 to float16 (bits, uint16), rounded to nearest even; overflow to
    Inf; NaN keeps its sign and the top of its payload (never 0, as NumPy)."""
    u = np.float32(f).view(np.uint32)
    sign = np.uint32((u >> 16) & 0x8000)
    a = np.uint32(u & 0x7fffffff)
    if a >= np.uint32(0x47800000):          # |f| >= 65536 (rounds to Inf), Inf, NaN
        pay = np.uint32((a >> 13) & 0x3ff)
        o = np.uint32(0x7c00 | max(pay, np.uint32(1))) if a > np.uint32(0x7f800000) \
            else np.uint32(0x7c00)
    elif a < np.uint32(0x38800000):         # below 2**-14: a subnormal result or 0
        # adding 0.5 puts the float16 subnormal's bits at the bottom of the
        # fraction, rounded to nearest even by the float32 add itself
        o = np.uint32(np.float32(np.uint32(a).view(np.float32) + np.float32(0.5)).view(
            np.uint32) - 0x3f000000)
    else:                                   # normal: rebias by -112 << 23, round the 13 bits
        o = np.uint32(np.uint32(a + 0xc8000fff + ((a >> 13) & 1)) >> 13)
    return np.uint16(o | sign)


@numba.njit(cache=True)
def bf16_bits_to_f32(h):
    """A bfloat16 (its bits, int16) as float32, exactly: the top half."""
    return np.uint32(np.uint32(np.uint16(h)) << 16).view(np.float32)


@numba.njit(cache=True)
def f32_to_bf16_bits(f):
    """float32 to bfloat16 (bits, int16), rounded to nearest even; NaN to the
    quiet NaN of its sign (as ml_dtypes)."""
    u = np.float32(f).view(np.uint32)
    if np.uint32(u & 0x7fffffff) > np.uint32(0x7f800000):
        return np.int16(np.uint16(((u >> 16) & 0x8000) | 0x7fc0))
    return np.int16(np.uint16(np.uint32(u + 0x7fff + ((u >> 16) & 1)) >> 16))


def _ld(v):
    """A stored value as the loops compute with it (compiled code only)."""
    raise NotImplementedError


def _st(v, like):
    """A computed value as stored in an array of ``like``'s dtype (compiled code only)."""
    raise NotImplementedError


@numba.extending.overload(_ld)
def _ld_impl(v):
    if v == numba.types.uint16:
        return lambda v: f16_bits_to_f32(v)
    if v == numba.types.int16:
        return lambda v: bf16_bits_to_f32(v)
    return lambda v: v


@numba.extending.overload(_st)
def _st_impl(v, like):
    if like.dtype == numba.types.uint16:
        return lambda v, like: f32_to_f16_bits(v)
    if like.dtype == numba.types.int16:
        return lambda v, like: f32_to_bf16_bits(v)
    return lambda v, like: v


def _at(v, j):
    """``v[j]`` of an array, ``v`` itself of a scalar: one loop body serves
    per-column and per-row constants (compiled code only)."""
    raise NotImplementedError


def _as(v, c):
    """The number ``c`` in the dtype of the array or scalar ``v`` (compiled
    code only)."""
    raise NotImplementedError


@numba.extending.overload(_as)
def _as_impl(v, c):
    cast = numba.np.numpy_support.as_dtype(getattr(v, "dtype", v)).type
    return lambda v, c: cast(c)


@numba.extending.overload(_at)
def _at_impl(v, j):
    if isinstance(v, numba.types.Array):
        return lambda v, j: v[j]
    return lambda v, j: v


# ---------------------------------------------- writes around the caches ----
# An output larger than the caches is written with non-temporal stores: a
# plain store first reads the line it writes into the cache (a loop that
# reads x and writes y moves three tensors' worth of bytes, not two) and
# evicts data still to be read.  Here a normalize over 256 MB ran at 17-18
# GB/s (read + write, one thread) with plain stores and at 33-36 GB/s
# streamed, as fast as glibc's copy of the same arrays.  Smaller outputs keep
# plain stores, so the next op may find them in the cache: a forward followed
# by a NumPy op reading y took 0.64 ms at 3 MiB with plain stores against
# 0.71 streamed, 1.46 against 1.43 at 6 MiB and 2.91 against 2.73 at 12 MiB
# (a 32 MiB last-level cache).
_STREAM_BYTES = 8 << 20     # outputs of this many bytes or more are streamed
_STREAM_ALIGN = 32          # bytes: the widest vector store the loops are compiled to
_LINE = 64                  # bytes in a cache line
_X86 = platform.machine().lower() in ("x86_64", "amd64", "i386", "i686")


@numba.extending.intrinsic
def _stream_store(typingctx, a, i, v):
    """``a[i] = v`` as a non-temporal store (compiled code only).

    The store states ``_STREAM_ALIGN``-byte alignment.  For one item that is
    not true, but the compiler vectorizes a non-temporal store only when its
    stated alignment allows the vector instruction (which needs it), and the
    vectors it makes of a loop of these stores are aligned when the loop
    walks a unit-stride view from a cache-line boundary on, as the row
    loops do (:func:`_stream_span`); the scalar stores of a remainder need
    no alignment."""
    sig = numba.types.void(a, i, v)

    def codegen(context, builder, signature, args):
        aty, ity, vty = signature.args
        data = context.make_array(aty)(context, builder, args[0]).data
        val = context.cast(builder, args[2], vty, aty.dtype)
        store = builder.store(val, builder.gep(data, [args[1]]), align=_STREAM_ALIGN)
        store.set_metadata("nontemporal", builder.module.add_metadata(
            [numba.core.cgutils.int32_t(1)]))
        return context.get_dummy_value()

    return sig, codegen


@numba.extending.intrinsic
def _store_fence(typingctx):
    """Orders the thread's non-temporal stores before its later stores (the
    end of a block of work), compiled code only: ``sfence`` on x86, a full
    fence elsewhere."""
    sig = numba.types.void()

    def codegen(context, builder, signature, args):
        if _X86:
            fnty = llvmlite.ir.FunctionType(llvmlite.ir.VoidType(), [])
            builder.call(numba.core.cgutils.get_or_insert_function(
                builder.module, fnty, "llvm.x86.sse.sfence"), [])
        else:
            builder.fence("seq_cst")
        return context.get_dummy_value()

    return sig, codegen


@numba.njit(cache=True)
def _put(out, r, j, v, streamed):
    """``out[r, j] = v`` of the C-contiguous 2-D ``out`` (unsigned ``r`` and
    ``j``): non-temporal when ``streamed``."""
    if streamed:
        _stream_store(out, r * np.uint64(out.shape[1]) + j, v)
    else:
        out[r, j] = v


@numba.njit(cache=True)
def _stream_span(out, r, j0, n, stream):
    """The items ``[lo, hi)`` of the ``n`` items from ``out[r, j0]`` (a part
    of a row of the C-contiguous 2-D ``out``) a loop writes with non-temporal
    stores: their whole cache lines when ``stream`` (and their address is a
    multiple of the item size), else none.  The partial lines at either end
    keep plain stores: a line written partly each way (the end of one row,
    the start of the next) costs a read and a write of memory of its own."""
    addr = out.ctypes.data + (np.int64(r) * out.shape[1] + np.int64(j0)) * out.itemsize
    if not stream or addr % out.itemsize:
        return n, n
    per_line = _LINE // out.itemsize
    lo = min(n, ((-addr) % _LINE) // out.itemsize)
    return lo, lo + (n - lo) // per_line * per_line


def _streamed(a):
    """Whether the loops write the output ``a`` with non-temporal stores:
    True, or None for plain stores.  The loops' ``stream`` is one of the
    two, never False: the compiler drops the code under a test of an
    argument against None (not under a boolean's value), so a loop compiled
    for None leaves the streamed row loops out, and a process with no output
    of ``_STREAM_BYTES`` never compiles them (about half the compile time
    of a first forward + backward)."""
    return True if a.nbytes >= _STREAM_BYTES else None


_ROWS_MIN = 16          # inner extent from which a channel's runs are walked one by one
_TILE = 4096            # columns of a channel tile of the fused NCHW loops (at least)
_TILE_BYTES = 1 << 20   # a tile's data (per array) kept in the cache between two loops
_TILES_MIN = 16         # ... when there are this many tiles to share out
_RUNS_MIN = 512         # a tile's runs from this length on are walked one by one:
# 8x64x56x56 float32 (in the last-level cache) forward 0.44 to 0.23 ms and
# backward 0.58 to 0.37 against the columns; forward + backward 32x512x28x28
# 0.88x and 4x64x28x28 0.52x the columns' time (the constants per column,
# made per tile, cost as much as the data over a few rows).  At 7x7 the
# columns are ahead (32x2048x7x7 forward 1.40 against 2.47 ms run by run),
# at 14x14 once the tensor is out of the cache (32x1024x14x14 forward +
# backward 1.13x the columns' time run by run) ...
_RUNS_MIN_CACHED = 64   # ... and runs of 64 or more are walked one by one when
_CACHED_BYTES = 8 << 20  # the tensor is under this size (32x256x14x14, 6.4 MB:
# 0.77x the columns' time, 8x64x14x14 0.79x, 8x16x12x12 0.92x; 16x64x8x8
# forward 0.72x, backward 0.65x, 16x256x8x8 0.90x and 0.85x; 32x64x7x7
# 1.3x and 1.1x at 49, left to them) ...
_FEW_ROWS = 16          # ... and runs of _ROWS_MIN or more in fewer rows than this:
# the constants per column, made on every call, and the column sums' fold
# partials, a row's width each, are paid for over too few rows (forward +
# backward 1x2048x7x7 0.13x the columns' time run by run, 8x256x7x7 0.53x,
# 4x128x6x6 0.63x; at 16 rows 0.64-1.34x, at 32 0.79-1.61x)
_BLOCK = 1 << 15        # elements per block of work (about)
_ONE_TILE = 1 << 17     # values up to which an input is one tile (_tile_channels): a
# pass in one call on the calling thread, where the blocked loops make two
# parallel regions of 10-25 us each to wake the threads.  Forward + backward
# through the API against the blocked plan (float32, two threads): 64x512
# 0.69x, 128x512 0.70x, 128x1024 0.87x, 32x32x8x8 0.85x; at 256x1024 1.05x,
# 32x14x14x64 channels-last 1.22x


def _l2_bytes() -> int:
    """The size of the first CPU's level-2 cache in bytes (Linux: sysfs), 0
    where it cannot be read."""
    base = "/sys/devices/system/cpu/cpu0/cache"

    def read(index, name):
        with open(os.path.join(base, index, name)) as f:
            return f.read().strip()
    try:
        for index in sorted(os.listdir(base)):
            if read(index, "level") == "2" and read(index, "type") in ("Unified", "Data"):
                size = read(index, "size")          # "2048K"
                scale = {"K": 1 << 10, "M": 1 << 20}.get(size[-1:], 1)
                return int(size.rstrip("KM")) * scale
    except (OSError, ValueError):
        pass
    return 0


# Short rows (NC, channels-last) above _ONE_TILE values are one tile still
# while their x and dy fit in a core's L2 together: their blocked loops make
# two parallel regions a pass, and waking the threads costs 18-26 us here
# after the calling thread has worked for 0.1-1 ms (1.4 us back to back),
# while one tile runs at the cache's speed on the calling thread.  Forward +
# backward through the API, timed as the bench times (20 calls after an idle
# pause, in turns), float32, two threads, L2 2 MiB, one tile against
# blocked, median: 3136x64 335 / 565 us, 256x1024 444 / 442 (the slowest
# quarter from 492 / 696), 6272x64 681 / 711, 512x1024 835 / 784,
# 1024x1024 1527 / 1235.  (On the 512 KiB L2 of the machine _ONE_TILE
# was measured on, 256x1024 was 1.05x slower as one tile.)  NCHW runs tile
# by tile on the threads, a region a pass, and keeps _ONE_TILE.
_L2_BYTES = _l2_bytes()
_MAX_BLOCKS = 256
_SUM_BLOCKS = 16        # most blocks of a loop writing partial sums (_partials_plan)
_FOLD = 64              # rows a column is summed over in the accumulation dtype
_WIDE = 2048            # values per row of the column sums (at least, rows allowing)
_AFFINE_WIDE = 512      # ... of the normalize and dx loops writing an output not streamed:
# each row costs a loop setup and ends in a scalar remainder, which for rows
# of 16 values cost more than the values (a 1152x16 float32 normalize took
# 102 us row by row, 15 us 32 rows at a time, 21 at 64); the constants,
# repeated once per row of a group, grow with it (64x256: 11 us at 256
# values a row, 20 at 1024)
_REDO = 16.0            # (mean - shift)**2 / var above which the sums are taken again
# Values up to which a loop runs on the calling thread (_jit): where waking
# the threads costs more than they save.  That depends on the machine, not
# on the layer alone.  tbb starts a loop in about 5 us; on a 2-core AMD EPYC
# one thread still finished a forward + backward first up to about 256K
# values (float32; 256x1024 1.16x, 4x28x28x64 channels-last 1.34x the serial
# time with two), on a 2-core Intel Xeon two threads took 0.71x the serial
# time at 256x1024 and 0.63x at layer norm 256x768 and 4x64x28x28.  Numba's
# workqueue threads cost about 0.1 ms a loop (1M values: 1.6 ms on one
# thread, 2.6 on two).  So the limit is measured, once per process, at the
# first input that could use the threads (_crossover: 55-130K on that
# Xeon; 130-550K from process to process on the EPYC, whose threads wake
# slower or faster from minute to minute; a line through two sizes far
# apart put it anywhere from 130K to 4M there).  It is never below the
# one-tile inputs, which a training forward and backward walk on the
# calling thread anyway: there an inference over 64K values took 1.3x
# longer on two threads than on one.
_SERIAL_MAX_RANGE = (_ONE_TILE, 1 << 22)
_SERIAL_MAX = None      # set by _serial_max (tests set it)
_TIMING_SECONDS = 0.01  # seconds of calls after which _loop_times stops at a size


def _serial_max() -> int:
    """``_SERIAL_MAX``, measured by :func:`_crossover` at the first call."""
    global _SERIAL_MAX
    if _SERIAL_MAX is None:
        _SERIAL_MAX = _crossover()
    return _SERIAL_MAX


def _crossover(repeats=15) -> int:
    """The number of values from which the normalize loop (one read, one
    write: the middle of the passes) finishes first on ``num_threads()``
    threads rather than on the calling thread, within
    ``_SERIAL_MAX_RANGE``: float32 inputs of sizes doubling from the range's
    lower bound are timed both ways (:func:`_loop_times`) until the threads
    are ahead; the limit is where the difference of the two times, joined by
    a straight line from the size before, is zero (the lower bound when the
    threads are ahead at once, the upper bound when never).  The times of
    two sizes far apart would not do: a loop's time per value rises where
    its arrays leave the cache, and the threads' gain with it, so a line
    through them misplaced the crossing (and a small timing error moved it
    by hundreds of thousands of values).  Once per process: a few
    milliseconds (0.05-0.13 s where the threads are never ahead)."""
    lo, hi = _SERIAL_MAX_RANGE
    if num_threads() < 2:
        return hi
    before = None               # (size, serial - threaded seconds) of the size before
    n = lo
    while n <= hi:
        serial, threaded = _loop_times(n, repeats)
        ahead = serial - threaded
        if ahead > 0:
            if before is None:
                return lo
            n0, ahead0 = before
            return int(n0 + (n - n0) * -ahead0 / (ahead - ahead0))
        before = (n, ahead)
        n *= 2
    return hi


def _loop_times(n, repeats: int):
    """``(serial, threaded)``: the least wall-clock seconds of the normalize
    loop over ``n`` float32 values on the calling thread and on
    ``num_threads()`` threads, each way as a call runs it (into a fresh
    output; the threads set), best of ``repeats`` calls each after one
    untimed (which may load code, start threads, map pages), or of fewer,
    three at least, once the calls have taken ``_TIMING_SECONDS`` (large
    sizes, where the two ways differ by more than the noise).  The two ways
    take turns, so a machine whose speed drifts meets both alike."""
    width = 1024
    c = np.zeros(width, np.float32)
    x = np.ones((n // width, width), np.float32)      # written: not the zero page
    blocks = max(2, n // _BLOCK)
    args = (x, x[:0], False, c, c, c, 1, False, -(-x.shape[0] // blocks), None)
    ways = (functools.partial(_normalize_loop.serial, 0, blocks, *args),
            functools.partial(_normalize_loop.threaded, blocks, *args))
    best = [float("inf")] * len(ways)
    for way in ways:
        way(np.empty_like(x))
    spent = 0.0
    for done in range(repeats):
        if done >= 3 and spent > _TIMING_SECONDS:
            break
        for i, way in enumerate(ways):
            out = np.empty_like(x)
            t = time.perf_counter()
            way(out)
            took = time.perf_counter() - t
            best[i] = min(best[i], took)
            spent += took
    return tuple(best)


# ---------------------------------------------------------------- loops ----
# Data arrays (x, dy, y, z, out) hold the stored values (float16 / bfloat16 as
# bits); each is read through _ld and written through _st.  The per-channel
# vectors are in the accumulation dtype (float32, or float64 for float64 data),
# which the accumulators take from them.
@numba.njit(cache=True, fastmath=_FLAGS)
def _column_sums(x, dy, r0, r1, j0, k, a1, a2):
    """Add to ``a1[j]`` and ``a2[j]`` (in the accumulation dtype) the sums
    over rows ``[r0, r1)`` of column ``j0 + j`` of the 2-D ``x``, for ``d = x
    - k[j]``: ``d`` and ``d * d``, or with ``dy`` values ``dy`` and ``dy *
    d``.  Vectorized along the row, four rows at a time (the accumulators
    are loaded and stored once per four rows)."""
    L = np.uint64(k.size)
    j0 = np.uint64(j0)
    with_dy = dy.size > 0
    r = np.uint64(r0)
    r1 = np.uint64(r1)
    one = np.uint64(1)
    while r + np.uint64(4) <= r1:
        r_1, r_2, r_3 = r + one, r + np.uint64(2), r + np.uint64(3)
        if with_dy:
            for j in range(L):
                kj, c = k[j], j0 + j
                e0, e1, e2, e3 = _ld(dy[r, c]), _ld(dy[r_1, c]), _ld(dy[r_2, c]), _ld(dy[r_3, c])
                a1[j] += (e0 + e1) + (e2 + e3)
                a2[j] += ((e0 * (_ld(x[r, c]) - kj) + e1 * (_ld(x[r_1, c]) - kj))
                          + (e2 * (_ld(x[r_2, c]) - kj) + e3 * (_ld(x[r_3, c]) - kj)))
        else:
            for j in range(L):
                kj, c = k[j], j0 + j
                d0, d1 = _ld(x[r, c]) - kj, _ld(x[r_1, c]) - kj
                d2, d3 = _ld(x[r_2, c]) - kj, _ld(x[r_3, c]) - kj
                a1[j] += (d0 + d1) + (d2 + d3)
                a2[j] += (d0 * d0 + d1 * d1) + (d2 * d2 + d3 * d3)
        r += np.uint64(4)
    while r < r1:
        if with_dy:
            for j in range(L):
                e0 = _ld(dy[r, j0 + j])
                a1[j] += e0
                a2[j] += e0 * (_ld(x[r, j0 + j]) - k[j])
        else:
            for j in range(L):
                d0 = _ld(x[r, j0 + j]) - k[j]
                a1[j] += d0
                a2[j] += d0 * d0
        r += one


# The loops over a row take the 2-D arrays and the row's index, never a view
# of the row: a view made per row costs Numba's reference counts (an atomic
# increment and decrement each), which the compiler prunes only around the
# simplest loop bodies: 50-100 ns a row, as much as a short row's values
# (a 128x512 float32 tile normalized in 16 us through row views, 8 without).
# They write the items [i0, i1) of a part of row ``r`` that starts at column
# ``j0`` (items j0 + i0 to j0 + i1 of the row), with non-temporal stores
# when ``streamed``.  Constants are a value per item of the part (indexed
# from the part's start) or one for the row (:func:`_at`), in the
# accumulation dtype.  An absent array (:data:`_NONE`) has no values.  (The
# indices are unsigned: a signed one gets a negative-index wraparound on
# every access, which keeps the compiler from vectorizing the loop.)
@numba.njit(inline="always")
def _normalize_run(out, r, j0, i0, i1, streamed, x, z, relu, m, a, b0):
    """``out = (x - m) * a + b0``, plus ``z`` when it has values, then the
    ReLU (``v <= 0`` to +0, NaN kept) when ``relu``.  The ReLU is
    ``max(v, 0) + 0``, else ``max(v, -inf) + -0`` (``v`` itself): selects, no
    branch, which would keep the compiler from vectorizing the streamed
    loop."""
    floor = _as(a, 0.0) if relu else _as(a, -np.inf)
    plus = _as(a, 0.0) if relu else _as(a, -0.0)
    r, j0 = np.uint64(r), np.uint64(j0)
    if z.size > 0:
        for j in range(np.uint64(i0), np.uint64(i1)):
            c = j0 + j
            v = (_ld(x[r, c]) - _at(m, j)) * _at(a, j) + _at(b0, j) + _ld(z[r, c])
            _put(out, r, c, _st(max(v, floor) + plus, out), streamed)
    else:
        for j in range(np.uint64(i0), np.uint64(i1)):
            c = j0 + j
            v = (_ld(x[r, c]) - _at(m, j)) * _at(a, j) + _at(b0, j)
            _put(out, r, c, _st(max(v, floor) + plus, out), streamed)


@numba.njit(inline="always")
def _dx_run(out, r, j0, i0, i1, streamed, g, x, m, a, b0, k):
    """``out = k * (g - b0 - (x - m) * a)``, or ``out = k * g`` when ``x``
    has no values."""
    r, j0 = np.uint64(r), np.uint64(j0)
    if x.size > 0:
        for j in range(np.uint64(i0), np.uint64(i1)):
            c = j0 + j
            v = _at(k, j) * (_ld(g[r, c]) - _at(b0, j) - (_ld(x[r, c]) - _at(m, j)) * _at(a, j))
            _put(out, r, c, _st(v, out), streamed)
    else:
        for j in range(np.uint64(i0), np.uint64(i1)):
            c = j0 + j
            _put(out, r, c, _st(_at(k, j) * _ld(g[r, c]), out), streamed)


@numba.njit(cache=True)
def _line_part(i0, i1, lo, hi, per_line):
    """The items ``[p0, p1)`` of ``[i0, i1)`` a loop over part of a row
    streams, given the row's span ``[lo, hi)`` (:func:`_stream_span`): the
    span's whole cache lines within ``[i0, i1)``, so a streamed vector
    starts on a line.  ``i0 <= p0 <= p1 <= i1``."""
    p0 = min(i1, lo + -(-(max(i0, lo) - lo) // per_line) * per_line)
    p1 = max(p0, lo + (min(i1, hi) - lo) // per_line * per_line)
    return p0, p1


# A loop over rows writes them by one of two paths, chosen once for all its
# rows: not streamed, one loop per row (or run); streamed, three (the partial
# lines at either end, the whole lines between: _normalize_streamed,
# _dx_streamed).
@numba.njit(inline="always")
def _normalize_streamed(out, r, j0, n, i0, i1, x, z, relu, m, a, b0):
    """:func:`_normalize_run` over the items ``[i0, i1)`` of the part of
    ``n`` items of row ``r`` from column ``j0``: the whole cache lines of
    its streamed span (:func:`_stream_span`) with non-temporal stores, the
    rest with plain ones."""
    lo, hi = _stream_span(out, r, j0, n, True)
    p0, p1 = _line_part(i0, i1, lo, hi, _LINE // out.itemsize)
    _normalize_run(out, r, j0, i0, p0, False, x, z, relu, m, a, b0)
    _normalize_run(out, r, j0, p0, p1, True, x, z, relu, m, a, b0)
    _normalize_run(out, r, j0, p1, i1, False, x, z, relu, m, a, b0)


@numba.njit(inline="always")
def _dx_streamed(out, r, j0, n, i0, i1, g, x, m, a, b0, k):
    """:func:`_dx_run` over part of a streamed row, as in
    :func:`_normalize_streamed`."""
    lo, hi = _stream_span(out, r, j0, n, True)
    p0, p1 = _line_part(i0, i1, lo, hi, _LINE // out.itemsize)
    _dx_run(out, r, j0, i0, p0, False, g, x, m, a, b0, k)
    _dx_run(out, r, j0, p0, p1, True, g, x, m, a, b0, k)
    _dx_run(out, r, j0, p1, i1, False, g, x, m, a, b0, k)


# The loops over rows are functions of their own, each one loop nest
# around one inlined row function.  Inlined into a function that also
# allocates arrays and branches around its loops (the blocked and the tile
# loops), or next to another inlined call, the compiler kept reference
# counts of the arrays a row reads: a few atomic operations a row (the
# normalize loop of a 128x512 float32 tile took 21 us there, 9 us in a
# function of its own).  tests/test_cpu_backend.py reads their code.  The
# streamed loops (outputs of _STREAM_BYTES or more, rows of _WIDE values or
# more) keep some: the three parts of a streamed row are three calls.
@numba.njit(cache=True, fastmath=_FLAGS)
def _normalize_columns(out, r0, r1, j0, n, x, z, relu, m, a, b0):
    """:func:`_normalize_run` on the ``n`` items from column ``j0`` of the
    rows ``[r0, r1)``, the constants one per item (``m[j]`` for item
    ``j``)."""
    for r in range(r0, r1):
        _normalize_run(out, r, j0, 0, n, False, x, z, relu, m, a, b0)


@numba.njit(cache=True, fastmath=_FLAGS)
def _normalize_columns_streamed(out, r0, r1, j0, n, x, z, relu, m, a, b0):
    """:func:`_normalize_columns` with non-temporal stores
    (:func:`_normalize_streamed`), then the fence."""
    for r in range(r0, r1):
        _normalize_streamed(out, r, j0, n, 0, n, x, z, relu, m, a, b0)
    _store_fence()


@numba.njit(cache=True, fastmath=_FLAGS)
def _normalize_runs(out, r0, r1, j0, n, inner, x, z, relu, m, a, b0):
    """:func:`_normalize_run` on the ``n`` items from column ``j0`` of the
    rows ``[r0, r1)``, a run of ``inner`` items at a time: counting the runs
    from the first row (``n // inner`` a row), run ``i`` is channel ``q = i
    % m.size``, with the constants ``m[q]``, ``a[q]``, ``b0[q]`` (the order
    of the canonical layout)."""
    per_row = n // inner
    q = (r0 * per_row) % m.size       # the channel of the next run
    for r in range(r0, r1):
        for c in range(per_row):
            _normalize_run(out, r, j0, c * inner, (c + 1) * inner, False, x, z, relu, m[q],
                           a[q], b0[q])
            q = 0 if q + 1 == m.size else q + 1


@numba.njit(cache=True, fastmath=_FLAGS)
def _normalize_runs_streamed(out, r0, r1, j0, n, inner, x, z, relu, m, a, b0):
    """:func:`_normalize_runs` with non-temporal stores, then the fence."""
    per_row = n // inner
    q = (r0 * per_row) % m.size
    for r in range(r0, r1):
        for c in range(per_row):
            _normalize_streamed(out, r, j0, n, c * inner, (c + 1) * inner, x, z, relu, m[q],
                                a[q], b0[q])
            q = 0 if q + 1 == m.size else q + 1
    _store_fence()


@numba.njit(cache=True, fastmath=_FLAGS)
def _dx_columns(out, r0, r1, j0, n, g, x, m, a, b0, k):
    """:func:`_dx_run` as :func:`_normalize_columns` runs the normalize."""
    for r in range(r0, r1):
        _dx_run(out, r, j0, 0, n, False, g, x, m, a, b0, k)


@numba.njit(cache=True, fastmath=_FLAGS)
def _dx_columns_streamed(out, r0, r1, j0, n, g, x, m, a, b0, k):
    """:func:`_dx_columns` with non-temporal stores, then the fence."""
    for r in range(r0, r1):
        _dx_streamed(out, r, j0, n, 0, n, g, x, m, a, b0, k)
    _store_fence()


@numba.njit(cache=True, fastmath=_FLAGS)
def _dx_runs(out, r0, r1, j0, n, inner, g, x, m, a, b0, k):
    """:func:`_dx_run` as :func:`_normalize_runs` runs the normalize."""
    per_row = n // inner
    q = (r0 * per_row) % m.size
    for r in range(r0, r1):
        for c in range(per_row):
            _dx_run(out, r, j0, c * inner, (c + 1) * inner, False, g, x, m[q], a[q], b0[q], k[q])
            q = 0 if q + 1 == m.size else q + 1


@numba.njit(cache=True, fastmath=_FLAGS)
def _dx_runs_streamed(out, r0, r1, j0, n, inner, g, x, m, a, b0, k):
    """:func:`_dx_runs` with non-temporal stores, then the fence."""
    per_row = n // inner
    q = (r0 * per_row) % m.size
    for r in range(r0, r1):
        for c in range(per_row):
            _dx_streamed(out, r, j0, n, c * inner, (c + 1) * inner, g, x, m[q], a[q], b0[q],
                         k[q])
            q = 0 if q + 1 == m.size else q + 1
    _store_fence()


@numba.njit(inline="always")
def _normalize_rows(out, r0, r1, j0, n, inner, runs, stream, x, z, relu, m, a, b0):
    """The normalize over rows ``[r0, r1)`` by runs (``runs``: constants per
    channel) or by columns (one per item), streamed (``stream`` True) or
    not (None; only these two loops are compiled then, :func:`_streamed`):
    the loop functions above."""
    if stream is None:
        if runs:
            _normalize_runs(out, r0, r1, j0, n, inner, x, z, relu, m, a, b0)
        else:
            _normalize_columns(out, r0, r1, j0, n, x, z, relu, m, a, b0)
    elif runs:
        _normalize_runs_streamed(out, r0, r1, j0, n, inner, x, z, relu, m, a, b0)
    else:
        _normalize_columns_streamed(out, r0, r1, j0, n, x, z, relu, m, a, b0)


@numba.njit(inline="always")
def _dx_rows(out, r0, r1, j0, n, inner, runs, stream, g, x, m, a, b0, k):
    """The dx loop over rows as :func:`_normalize_rows` runs the normalize."""
    if stream is None:
        if runs:
            _dx_runs(out, r0, r1, j0, n, inner, g, x, m, a, b0, k)
        else:
            _dx_columns(out, r0, r1, j0, n, g, x, m, a, b0, k)
    elif runs:
        _dx_runs_streamed(out, r0, r1, j0, n, inner, g, x, m, a, b0, k)
    else:
        _dx_columns_streamed(out, r0, r1, j0, n, g, x, m, a, b0, k)


@numba.njit(inline="always")
def _ln_y_run(out, r, i0, i1, streamed, x, hi, rs, lo, w, b):
    """Layer norm's ``y = ((x - hi) * rs + lo) * w + b`` (:func:`_ln_row`)
    on the items ``[i0, i1)`` of row ``r``."""
    r = np.uint64(r)
    for j in range(np.uint64(i0), np.uint64(i1)):
        _put(out, r, j, _st(((_ld(x[r, j]) - hi) * rs + lo) * w[j] + b[j], out), streamed)


@numba.njit(inline="always")
def _ln_dx_run(out, r, i0, i1, streamed, g, x, m, rs, w, c1, c2, aw, ab):
    """Layer norm's ``dx = rs * (g * w - c1 - xhat * c2)`` for ``xhat = (x -
    m) * rs`` on the items ``[i0, i1)`` of row ``r``; when ``aw`` has
    values, ``aw += g * xhat`` and ``ab += g`` in the same loop
    (:func:`_ln_backward`)."""
    r = np.uint64(r)
    if aw.size > 0:
        for j in range(np.uint64(i0), np.uint64(i1)):
            xhat = (_ld(x[r, j]) - m) * rs
            gj = _ld(g[r, j])
            _put(out, r, j, _st(rs * (gj * w[j] - c1 - xhat * c2), out), streamed)
            aw[j] += gj * xhat
            ab[j] += gj
    else:
        for j in range(np.uint64(i0), np.uint64(i1)):
            xhat = (_ld(x[r, j]) - m) * rs
            _put(out, r, j, _st(rs * (_ld(g[r, j]) * w[j] - c1 - xhat * c2), out), streamed)


@numba.njit(inline="always")
def _ln_y_streamed(out, r, x, hi, rs, lo, w, b):
    """:func:`_ln_y_run` over row ``r``, streamed as in
    :func:`_normalize_streamed`."""
    n = out.shape[1]
    i0, i1 = _stream_span(out, r, 0, n, True)
    _ln_y_run(out, r, 0, i0, False, x, hi, rs, lo, w, b)
    _ln_y_run(out, r, i0, i1, True, x, hi, rs, lo, w, b)
    _ln_y_run(out, r, i1, n, False, x, hi, rs, lo, w, b)


@numba.njit(inline="always")
def _ln_dx_streamed(out, r, g, x, m, rs, w, c1, c2, aw, ab):
    """:func:`_ln_dx_run` over row ``r``, streamed as in
    :func:`_normalize_streamed`."""
    n = out.shape[1]
    i0, i1 = _stream_span(out, r, 0, n, True)
    _ln_dx_run(out, r, 0, i0, False, g, x, m, rs, w, c1, c2, aw, ab)
    _ln_dx_run(out, r, i0, i1, True, g, x, m, rs, w, c1, c2, aw, ab)
    _ln_dx_run(out, r, i1, n, False, g, x, m, rs, w, c1, c2, aw, ab)


@numba.njit(inline="always")
def _run_sums(x, g, r, j0, n, with_dy, k, zero):
    """``(sum d, sum d * d)`` for ``d = x - k``, or with ``dy`` values
    ``(sum g, sum g * d)``, over the ``n`` items of row ``r`` from column
    ``j0`` of the 2-D ``x`` (and ``g``), in the accumulation dtype
    (``zero``'s): a vectorized reduction."""
    a1 = zero
    a2 = zero
    r, j0 = np.uint64(r), np.uint64(j0)
    if with_dy:
        for j in range(j0, j0 + np.uint64(n)):
            gj = _ld(g[r, j])
            a1 += gj
            a2 += gj * (_ld(x[r, j]) - k)
    else:
        for j in range(j0, j0 + np.uint64(n)):
            d = _ld(x[r, j]) - k
            a1 += d
            a2 += d * d
    return a1, a2


@numba.njit(cache=True, fastmath=_FLAGS)
def _runs_sums(x, dy, r0, r1, j0, n, inner, k, t1, t2):
    """Add to ``t1[q]`` and ``t2[q]`` (float64) the sums of
    :func:`_run_sums` over the ``n`` items from column ``j0`` of the rows
    ``[r0, r1)`` of the 2-D ``x`` (and ``dy``), a run of ``inner`` items at a
    time, each run summed in the accumulation dtype; run ``i`` (counting
    from the first row) is channel ``q = i % k.size``, its shift ``k[q]``.
    A loop nest of its own (see :func:`_normalize_columns`)."""
    per_row = n // inner
    with_dy = dy.size > 0
    zero = k.dtype.type(0.0)
    q = (r0 * per_row) % k.size
    for r in range(r0, r1):
        for c in range(per_row):
            a1, a2 = _run_sums(x, dy, r, j0 + c * inner, inner, with_dy, k[q], zero)
            t1[q] += np.float64(a1)
            t2[q] += np.float64(a2)
            q = 0 if q + 1 == k.size else q + 1


@numba.njit(cache=True, fastmath=_FLAGS)
def _masked_runs_sums(x, dy, y, r0, r1, k, t1, t2, g_out):
    """:func:`_runs_sums` of whole rows (a row is one run) of ``g = 0 where
    y <= 0, else dy``, written to ``g_out``: ``sum g`` and ``sum g * (x -
    k[q])`` (the ReLU's gradient, :func:`_sums_blocks`)."""
    W = x.shape[1]
    zero = k.dtype.type(0.0)
    for r in range(r0, r1):
        q = r % k.size
        c1 = zero
        c2 = zero
        u = np.uint64(r)
        for i in range(np.uint64(W)):
            g = zero if _ld(y[u, i]) <= 0 else _ld(dy[u, i])
            g_out[u, i] = _st(g, g_out)
            c1 += g
            c2 += g * (_ld(x[u, i]) - k[q])
        t1[q] += c1
        t2[q] += c2


@numba.njit(cache=True, fastmath=_FLAGS)
def _sums_blocks(b0, b1, x, dy, y, shift, inner, rows, per, s1, s2, g_out):
    """Partial sums per block ``b`` of ``per`` rows of the 2-D view ``x``
    (see :class:`_Layout`), per channel ``q`` (``rows``) or column ``q``:
    ``s1[b, q] = sum d``, ``s2[b, q] = sum d * d`` for ``d = x - shift``
    (``shift``: a value per channel, of the ``C`` channels); with ``dy``
    values ``s1 = sum g``, ``s2 = sum g * d`` for ``g = dy``, or with ``y``
    values (the ReLU's output) ``g = 0 where y <= 0, else dy``, written to
    ``g_out``.  ``rows``: row ``r`` is one run of channel ``q = r % C``,
    summed in the accumulation dtype (a vectorized reduction); else column
    ``q`` of every row (channel ``(q // inner) % C``: rows of ``inner``
    values per channel, several rows taken as one), summed in float64
    (vectorized along the row).  Blocks ``[b0, b1)``."""
    R, W = x.shape
    masked = y.size > 0
    zero = shift.dtype.type(0.0)
    k = _layout_constant(shift, rows, inner, W)
    a1 = np.empty(0 if rows else W, shift.dtype)
    a2 = np.empty(0 if rows else W, shift.dtype)
    for b in range(b0, b1):
        s1[b, :] = 0.0
        s2[b, :] = 0.0
        r1 = min(R, (b + 1) * per)
        if rows:    # a row is one run
            if masked:
                _masked_runs_sums(x, dy, y, b * per, r1, k, s1[b], s2[b], g_out)
            else:
                _runs_sums(x, dy, b * per, r1, 0, W, W, k, s1[b], s2[b])
            continue
        # column sums in the accumulation dtype over at most _FOLD rows at a
        # time, folded into float64
        for f0 in range(b * per, r1, _FOLD):
            f1 = min(r1, f0 + _FOLD)
            if masked:
                for r in range(f0, f1):
                    for q in range(W):
                        g_out[r, q] = _st(zero if _ld(y[r, q]) <= 0 else _ld(dy[r, q]), g_out)
            a1[:] = zero
            a2[:] = zero
            _column_sums(x, g_out if masked else dy, f0, f1, 0, k, a1, a2)
            for q in range(W):
                s1[b, q] += np.float64(a1[q])
                s2[b, q] += np.float64(a2[q])


@_jit.over(_sums_blocks)
def _sums(n, x, dy, y, shift, inner, rows, per, s1, s2, g_out):
    """:func:`_sums_blocks` over ``n`` blocks in parallel (the shift made one
    per column once, for every block)."""
    k = _layout_constant(shift, rows, inner, x.shape[1])
    for b in numba.prange(n):
        i = _i64(b)
        _sums_blocks(i, i + 1, x, dy, y, k, inner, rows, per, s1, s2, g_out)


# The normalize and the dx loop are two functions: with the row loops of
# both in one function the compiler kept the reference counts of the row
# views in the loops it did not prune (2048x64 float32 dx: 132 us, 42 in a
# function of its own).
@numba.njit(cache=True, fastmath=_FLAGS)
def _normalize_blocks(b0, b1, x, z, relu, mean, a, b0v, inner, rows, per, stream, out):
    """``out = (x - mean[q]) * a[q] + b0v[q]``, plus ``z`` when it has
    values, then the ReLU (``v <= 0`` to 0, NaN kept) when ``relu``, the
    constants a value per channel, rows, blocks and channel ``q`` as in
    :func:`_sums_blocks`; non-temporal stores when ``stream`` is True
    (None: plain stores, :func:`_streamed`).  Blocks
    ``[b0, b1)`` of ``per`` rows."""
    R, W = out.shape
    mean, a = _layout_constant(mean, rows, inner, W), _layout_constant(a, rows, inner, W)
    b0v = _layout_constant(b0v, rows, inner, W)
    for b in range(b0, b1):
        r0, r1 = b * per, min(R, (b + 1) * per)
        # with rows, a row is one run
        _normalize_rows(out, r0, r1, 0, W, W, rows, stream, x, z, relu, mean, a, b0v)


@_jit.over(_normalize_blocks)
def _normalize_loop(n, x, z, relu, mean, a, b0v, inner, rows, per, stream, out):
    """:func:`_normalize_blocks` over ``n`` blocks in parallel (the
    constants made one per column once, for every block)."""
    W = out.shape[1]
    mean, a = _layout_constant(mean, rows, inner, W), _layout_constant(a, rows, inner, W)
    b0v = _layout_constant(b0v, rows, inner, W)
    for b in numba.prange(n):
        i = _i64(b)
        _normalize_blocks(i, i + 1, x, z, relu, mean, a, b0v, inner, rows, per, stream, out)


@numba.njit(cache=True, fastmath=_FLAGS)
def _dx_blocks(b0, b1, dy, x, mean, a, b0v, k, inner, rows, per, stream, out):
    """``out = k[q] * (dy - b0v[q] - (x - mean[q]) * a[q])``, or ``out =
    k[q] * dy`` when ``x`` has no values (statistics held fixed); rows,
    blocks and streaming as in :func:`_normalize_blocks`."""
    R, W = out.shape
    mean, a = _layout_constant(mean, rows, inner, W), _layout_constant(a, rows, inner, W)
    b0v, k = _layout_constant(b0v, rows, inner, W), _layout_constant(k, rows, inner, W)
    for b in range(b0, b1):
        r0, r1 = b * per, min(R, (b + 1) * per)
        _dx_rows(out, r0, r1, 0, W, W, rows, stream, dy, x, mean, a, b0v, k)


@_jit.over(_dx_blocks)
def _dx_loop(n, dy, x, mean, a, b0v, k, inner, rows, per, stream, out):
    """:func:`_dx_blocks` over ``n`` blocks in parallel (the constants made
    one per column once, for every block)."""
    W = out.shape[1]
    mean, a = _layout_constant(mean, rows, inner, W), _layout_constant(a, rows, inner, W)
    b0v, k = _layout_constant(b0v, rows, inner, W), _layout_constant(k, rows, inner, W)
    for b in numba.prange(n):
        i = _i64(b)
        _dx_blocks(i, i + 1, dy, x, mean, a, b0v, k, inner, rows, per, stream, out)


@numba.njit(inline="always")
def _ln_row(x, r, k, eps):
    """The statistics of row ``r`` of the layer norm forward: sums around the
    row's first value ``k`` (in the accumulation dtype, ``k``'s; again around
    the mean when that was far off); returns the float64 ``(mean, rstd)``
    and the constants of ``y = ((x - hi) * rs + lo) * w + b``
    (:func:`_ln_y_run`)."""
    n = x.shape[1]
    zero = _as(k, 0.0)
    if not np.isfinite(k):
        k = zero
    for _ in range(2):
        a1, a2 = _run_sums(x, x, r, 0, n, False, k, zero)
        dm = np.float64(a1) / n
        m2 = np.float64(a2) - np.float64(a1) * dm
        if not dm * dm * n > _REDO * m2:      # False for NaN
            break
        k = _as(k, np.float64(k) + dm)
    mean = np.float64(k) + dm
    rstd = 1.0 / np.sqrt(max(m2, 0.0) / n + eps) if m2 == m2 else m2
    hi = _as(k, mean)
    lo = _as(k, -(mean - np.float64(hi)) * rstd if np.isfinite(hi) else 0.0)
    return mean, rstd, hi, _as(k, rstd), lo


@numba.njit(inline="always")
def _ln_dx_constants(g, x, r, m, rs, w):
    """The ``(c1, c2)`` of row ``r`` of a layer-norm backward
    (:func:`_ln_dx_run`): the means of ``g = dy * w`` and of ``g * (x - m)``
    times ``rs``, summed in the accumulation dtype."""
    n = x.shape[1]
    a1 = w.dtype.type(0.0)
    a2 = w.dtype.type(0.0)
    u = np.uint64(r)
    for j in range(np.uint64(n)):
        gj = _ld(g[u, j]) * w[j]
        a1 += gj
        a2 += gj * (_ld(x[u, j]) - m)
    return w.dtype.type(np.float64(a1) / n), w.dtype.type(np.float64(a2) * np.float64(rs) / n)


# Layer norm's row loops are functions of their own, each one loop nest, for
# the reason given above the normalize loops: inlined side by side in the
# blocks' function, the row functions kept about ten reference counts a row
# in the forward and 26 in the backward (64x256 float32 backward: 10.4 us,
# 8.3 in loops of their own).  The forward's loop keeps one (``x``, passed
# on to sums that may be taken twice).  The backward takes a chunk of rows
# at a time, as many as keep dy's and x's values of them in L1
# (_CHUNK_BYTES): the row constants of the chunk in one loop, then dx, plain
# or streamed, reading them from two small arrays, so that plain and
# streamed dx are the same bits (each loop summing for itself gave dx
# differing in the last bit: the sums compiled differently in the two
# functions).  A call of a loop costs about 50 ns, hence chunks and not rows.
_CHUNK_BYTES = 16 << 10


@numba.njit(inline="always")
def _ln_chunk(x):
    """Rows of the 2-D ``x`` a layer-norm loop takes at a time (above)."""
    return max(1, min(_FOLD, _CHUNK_BYTES // max(1, x.shape[1] * x.itemsize)))


@numba.njit(cache=True, fastmath=_FLAGS)
def _ln_rows(out, r0, r1, x, first, w, b, eps, mean_out, rstd_out):
    """Layer norm forward on the rows ``[r0, r1)``: a row's statistics
    (:func:`_ln_row`, into ``mean_out[r]`` and ``rstd_out[r]``), then its
    ``y`` (:func:`_ln_y_run`) while the row is in L1."""
    n = x.shape[1]
    for r in range(r0, r1):
        mean_out[r], rstd_out[r], hi, rs, lo = _ln_row(x, r, first[r], eps)
        _ln_y_run(out, r, 0, n, False, x, hi, rs, lo, w, b)


@numba.njit(cache=True, fastmath=_FLAGS)
def _ln_rows_streamed(out, r0, r1, x, first, w, b, eps, mean_out, rstd_out):
    """:func:`_ln_rows` with non-temporal stores (the caller fences)."""
    for r in range(r0, r1):
        mean_out[r], rstd_out[r], hi, rs, lo = _ln_row(x, r, first[r], eps)
        _ln_y_streamed(out, r, x, hi, rs, lo, w, b)


@numba.njit(cache=True, fastmath=_FLAGS)
def _ln_dx_constants_rows(g, x, r0, r1, mean, rstd, w, c1, c2):
    """:func:`_ln_dx_constants` of the rows ``[r0, r1)`` into ``c1[i]`` and
    ``c2[i]`` for ``i = r - r0``."""
    for r in range(r0, r1):
        i = r - r0
        c1[i], c2[i] = _ln_dx_constants(g, x, r, mean[r], rstd[r], w)


@numba.njit(cache=True, fastmath=_FLAGS)
def _ln_dx_rows(out, r0, r1, g, x, mean, rstd, w, c1, c2, aw, ab):
    """:func:`_ln_dx_run` on the rows ``[r0, r1)``, their constants from
    :func:`_ln_dx_constants_rows`."""
    n = x.shape[1]
    for r in range(r0, r1):
        i = r - r0
        _ln_dx_run(out, r, 0, n, False, g, x, mean[r], rstd[r], w, c1[i], c2[i], aw, ab)


@numba.njit(cache=True, fastmath=_FLAGS)
def _ln_dx_rows_streamed(out, r0, r1, g, x, mean, rstd, w, c1, c2, aw, ab):
    """:func:`_ln_dx_rows` with non-temporal stores (the caller fences)."""
    for r in range(r0, r1):
        i = r - r0
        _ln_dx_streamed(out, r, g, x, mean[r], rstd[r], w, c1[i], c2[i], aw, ab)


@numba.njit(cache=True, fastmath=_FLAGS)
def _ln_forward_blocks(b0, b1, x, first, w, b, eps, per, stream, y, mean_out, rstd_out):
    """Layer norm forward (:func:`_ln_rows`), streamed or not for all the
    rows (as in :func:`_normalize_blocks`), on the blocks ``[b0, b1)`` of
    ``per`` rows."""
    rows = x.shape[0]
    for blk in range(b0, b1):
        r0, r1 = blk * per, min(rows, (blk + 1) * per)
        if stream is None:
            _ln_rows(y, r0, r1, x, first, w, b, eps, mean_out, rstd_out)
        else:
            _ln_rows_streamed(y, r0, r1, x, first, w, b, eps, mean_out, rstd_out)
            _store_fence()


@_jit.over(_ln_forward_blocks)
def _ln_forward(n, x, first, w, b, eps, per, stream, y, mean_out, rstd_out):
    """:func:`_ln_forward_blocks` over ``n`` blocks in parallel."""
    for blk in numba.prange(n):
        i = _i64(blk)
        _ln_forward_blocks(i, i + 1, x, first, w, b, eps, per, stream, y, mean_out, rstd_out)


@numba.njit(cache=True, fastmath=_FLAGS)
def _ln_backward_blocks(b0, b1, dy, x, mean, rstd, w, per, stream, dx, pw, pb):
    """Layer norm backward, a chunk of rows at a time (:func:`_ln_chunk`):
    their two sums (:func:`_ln_dx_constants_rows`), then ``dx``; block
    partial column sums ``pw`` (dy * xhat) and ``pb`` (dy) when they have
    rows, summed in the accumulation dtype over ``_FOLD`` rows at a time and
    those sums in float64.  The blocks ``[b0, b1)`` of ``per`` rows."""
    rows, n = x.shape
    grads = pw.shape[0] > 0
    aw = np.empty(n if grads else 0, w.dtype)
    ab = np.empty(n if grads else 0, w.dtype)
    chunk = _ln_chunk(x)
    c1 = np.empty(chunk, w.dtype)
    c2 = np.empty(chunk, w.dtype)
    for blk in range(b0, b1):
        if grads:
            pw[blk, :] = 0.0
            pb[blk, :] = 0.0
        r1 = min(rows, (blk + 1) * per)
        for f0 in range(blk * per, r1, _FOLD):
            aw[:] = 0.0
            ab[:] = 0.0
            f1 = min(r1, f0 + _FOLD)
            for c0 in range(f0, f1, chunk):
                ce = min(f1, c0 + chunk)
                _ln_dx_constants_rows(dy, x, c0, ce, mean, rstd, w, c1, c2)
                if stream is None:
                    _ln_dx_rows(dx, c0, ce, dy, x, mean, rstd, w, c1, c2, aw, ab)
                else:
                    _ln_dx_rows_streamed(dx, c0, ce, dy, x, mean, rstd, w, c1, c2, aw, ab)
            if grads:
                for j in range(n):
                    pw[blk, j] += np.float64(aw[j])
                    pb[blk, j] += np.float64(ab[j])
        if stream is not None:
            _store_fence()


@_jit.over(_ln_backward_blocks)
def _ln_backward(n, dy, x, mean, rstd, w, per, stream, dx, pw, pb):
    """:func:`_ln_backward_blocks` over ``n`` blocks in parallel."""
    for blk in numba.prange(n):
        i = _i64(blk)
        _ln_backward_blocks(i, i + 1, dy, x, mean, rstd, w, per, stream, dx, pw, pb)


@numba.njit(cache=True, fastmath=_FLAGS)
def _tile_sums(x, dy, j0, k, inner, group, runs, t1, t2):
    """Float64 totals per channel, into ``t1`` / ``t2``, of the tile of
    ``k.size`` whole channels from column ``j0`` (``inner`` columns each) of
    the 2-D ``(N, C * inner)`` view ``x`` (or, for a tile of every channel,
    the ``(N / group, group * C * inner)`` view: ``group`` rows as one): for
    ``d = x - k[c]`` (``k``: a shift per channel, in the accumulation dtype)
    ``(sum d, sum d * d)``, or with ``dy`` values ``(sum dy, sum dy * d)``.
    With ``runs`` a row's values of one channel are summed run by run in the
    accumulation dtype, as :func:`_sums` sums a row, a channel's runs in
    float64 in row order (``group`` is then 1); else by columns,
    over ``_FOLD`` rows at a time (:func:`_column_sums`), those sums of a
    column in float64 in row order, then a channel's columns (its ``inner``
    columns of each row of the group, in memory order), as
    :func:`_channel_totals` adds the blocked loops' partials.  (Adding a
    channel's columns after every fold cost a third of a one-tile forward
    at 8x14x14x64 channels-last: 1.8K scalar additions.)"""
    N = x.shape[0]
    zero = k.dtype.type(0.0)
    t1[:] = 0.0
    t2[:] = 0.0
    if runs:
        _runs_sums(x, dy, 0, N, j0, k.size * inner, inner, k, t1, t2)
        return
    width = k.size * inner * group
    kc = _per_column(k, inner, width)
    c1, c2 = np.empty(width, k.dtype), np.empty(width, k.dtype)
    s1, s2 = np.zeros(width), np.zeros(width)
    for f0 in range(0, N, _FOLD):
        c1[:] = zero
        c2[:] = zero
        _column_sums(x, dy, f0, min(N, f0 + _FOLD), j0, kc, c1, c2)
        for i in range(np.uint64(width)):     # a column's folds, in order
            s1[i] += np.float64(c1[i])
            s2[i] += np.float64(c2[i])
    # a channel's columns in memory order; a column per channel (NC,
    # channels-last) apart, which reads them in a row over the channels and
    # vectorizes (the general loop took 1.1-1.2x the time of a 2x4096 forward)
    C = np.uint64(k.size)
    for g in range(np.uint64(group)):
        if inner == 1:
            for c in range(C):
                t1[c] += s1[g * C + c]
                t2[c] += s2[g * C + c]
        else:
            for c in range(C):
                i0 = (g * C + c) * np.uint64(inner)
                for i in range(i0, i0 + np.uint64(inner)):
                    t1[c] += s1[i]
                    t2[c] += s2[i]


@numba.njit(cache=True)
def _tile_span(tile, t, channels, inner):
    """Tile ``tile`` of ``t`` channels: its first channel, its number of
    channels, its first column and its number of columns."""
    c0 = tile * t
    tc = min(channels, c0 + t) - c0
    return c0, tc, c0 * inner, tc * inner


@numba.njit(cache=True)
def _per_column(v, inner, width):
    """The per-channel values ``v`` one per column of ``width`` columns:
    ``out[j] = v[(j // inner) % v.size]`` (a tile's channels; or every
    channel, then again for each further row of a group taken as one).
    Plain loops over unsigned indices (a slice per channel cost 10x more at
    ``inner = 1``; signed indices kept the stores from vectorizing, 1.4 us
    for 64 channels of 64 columns)."""
    out = np.empty(width, v.dtype)
    period = np.uint64(min(width, v.size * inner))
    n = np.uint64(inner)
    if inner == 1:
        for j in range(period):
            out[j] = v[j]
    else:
        for c in range((period + n - np.uint64(1)) // n):
            val = v[c]
            for j in range(c * n, min(period, (c + np.uint64(1)) * n)):
                out[j] = val
    for j in range(period, np.uint64(width)):
        out[j] = out[j - period]
    return out


@numba.njit(cache=True)
def _layout_constant(v, rows, inner, width):
    """A constant of the loops over a :class:`_Layout` view of ``width``
    columns: per channel with ``rows``, else one per column
    (:func:`_per_column`), which ``v`` of ``width`` values already is (made
    so once by a parallel loop for all its blocks; or ``inner == 1``)."""
    return v if rows or v.size == width else _per_column(v, inner, width)


@numba.njit(cache=True, fastmath=_FLAGS)
def _tile_forward_blocks(tile0, tile1, x, z, relu, w, b, eps, inner, t, group, runs, stream, y,
                         running_mean, running_var, momentum, skipped, mean_out, invstd_out):
    """Training forward of the 2-D ``(N, C * inner)`` view of a canonical
    array, ``t`` channels (a tile: their runs side by side) at a time, for
    tiles whose ``N`` rows stay in the cache between the two loops: the
    statistics as in :func:`_moments` (around each channel's first value; a
    tile with a channel whose mean was far off is summed again, that channel
    around its mean); the step between the passes for the tile's channels
    (:func:`_finish`: ``mean_out`` and ``invstd_out`` in the accumulation
    dtype, the running statistics and the guard, each absent when it has no
    values); then ``y`` as in :func:`_normalize` (plus ``z`` and the ReLU as
    in :func:`_normalize_blocks`) from the rows just read: one read of ``x``
    from memory instead of two.  A tile of every channel may take ``group``
    rows as one (the views then ``(N / group, group * C * inner)``).  The
    tiles ``[tile0, tile1)``."""
    N = x.shape[0]
    C = w.size
    count = N * inner * group
    for tile in range(tile0, tile1):
        c0, tc, j0, L = _tile_span(tile, t, C, inner)
        L *= group
        k = np.empty(tc, w.dtype)
        _first_values(x, j0, inner, k)
        shift = np.empty(tc)
        for c in range(tc):
            shift[c] = np.float64(k[c])
        t1, t2 = np.empty(tc), np.empty(tc)
        mean, m2 = np.empty(tc), np.empty(tc)
        for again in range(2):
            _tile_sums(x, x[:0], j0, k, inner, group, runs, t1, t2)
            far = _centre(t1, t2, count, shift, _REDO, again == 0, w, mean, m2)
            if again == 1 or not far:
                break
            for c in range(tc):     # around the moved shifts
                k[c] = w.dtype.type(shift[c])
        invstd = np.empty(tc)
        # slices of an absent (empty) array are empty
        _finish(mean, m2, count, eps, running_mean[c0:c0 + tc], running_var[c0:c0 + tc],
                momentum, skipped[c0:c0 + tc], invstd, mean_out[c0:c0 + tc],
                invstd_out[c0:c0 + tc])
        hi, s, sh = np.empty(tc, w.dtype), np.empty(tc, w.dtype), np.empty(tc, w.dtype)
        _affine_constants(mean, invstd, w[c0:c0 + tc], b[c0:c0 + tc], hi, s, sh)
        # the constants one per channel with runs, else one per column
        _normalize_rows(y, 0, N, j0, L, inner, runs, stream, x, z, relu,
                        _layout_constant(hi, runs, inner, L), _layout_constant(s, runs, inner, L),
                        _layout_constant(sh, runs, inner, L))


@_jit.over(_tile_forward_blocks)
def _tile_forward(n, x, z, relu, w, b, eps, inner, t, group, runs, stream, y, running_mean,
                  running_var, momentum, skipped, mean_out, invstd_out):
    """:func:`_tile_forward_blocks` over ``n`` tiles in parallel."""
    for tile in numba.prange(n):
        i = _i64(tile)
        _tile_forward_blocks(i, i + 1, x, z, relu, w, b, eps, inner, t, group, runs, stream, y,
                             running_mean, running_var, momentum, skipped, mean_out, invstd_out)


@numba.njit(cache=True, fastmath=_FLAGS)
def _tile_backward_blocks(tile0, tile1, dy, x, mean, invstd, w, inner, t, group, runs, stream,
                          dw_out, db_out, dx):
    """Training backward of the 2-D ``(N, C * inner)`` view of a canonical
    array a tile at a time (``group`` as in :func:`_tile_forward`): the two
    sums as in :func:`_sums`, then ``dx`` as in :func:`_dx` from the rows
    just read: one read of ``x`` and ``dy`` from memory instead of two;
    ``dw_out = sum dy * xhat`` and ``db_out = sum dy`` per channel, in the
    accumulation dtype (the float64 sums rounded once, as
    ``CpuBackend._backward`` rounds those of the blocked loops).  The tiles
    ``[tile0, tile1)``."""
    N = x.shape[0]
    C = mean.size
    count = N * inner * group
    for tile in range(tile0, tile1):
        c0, tc, j0, L = _tile_span(tile, t, C, inner)
        L *= group
        m = mean[c0:c0 + tc]
        t1, t2 = np.empty(tc), np.empty(tc)
        _tile_sums(x, dy, j0, m, inner, group, runs, t1, t2)
        inv, sum_dy_xhat = np.empty(tc), np.empty(tc)
        for c in range(tc):
            inv[c] = np.float64(invstd[c0 + c])
            sum_dy_xhat[c] = t2[c] * inv[c]
            db_out[c0 + c] = t1[c]
            dw_out[c0 + c] = sum_dy_xhat[c]
        f, a, b0 = np.empty(tc, mean.dtype), np.empty(tc, mean.dtype), np.empty(tc, mean.dtype)
        _dx_constants(inv, w[c0:c0 + tc], t1, sum_dy_xhat, count, f, a, b0)
        _dx_rows(dx, 0, N, j0, L, inner, runs, stream, dy, x,
                 _layout_constant(m, runs, inner, L), _layout_constant(a, runs, inner, L),
                 _layout_constant(b0, runs, inner, L), _layout_constant(f, runs, inner, L))


@_jit.over(_tile_backward_blocks)
def _tile_backward(n, dy, x, mean, invstd, w, inner, t, group, runs, stream, dw_out, db_out, dx):
    """:func:`_tile_backward_blocks` over ``n`` tiles in parallel."""
    for tile in numba.prange(n):
        i = _i64(tile)
        _tile_backward_blocks(i, i + 1, dy, x, mean, invstd, w, inner, t, group, runs, stream,
                              dw_out, db_out, dx)


# ------------------------------------------------------------- helpers -----
def _bits(a):
    """An array as the loops take it: float16 / bfloat16 as their bits."""
    dt = a.dtype
    return a if dt in _FLOATS else a.view(_bits_dtype(dt))


_FLOATS = frozenset(map(np.dtype, (np.float32, np.float64)))     # taken as they are


_NONE = {dt: np.empty((1, 0), dt) for dt in map(np.dtype, (np.float32, np.float64, np.uint16,
                                                            np.int16))}
_EMPTY = {dt: np.empty(0, dt) for dt in map(np.dtype, (np.float32, np.float64, np.int32))}
_NO_GUARD = _EMPTY[np.dtype(np.int32)]      # the guard's flags when there is no guard


class _Layout:
    """How a canonical ``(outer, C, inner)`` array is walked, from its shape
    alone.  Long runs (``inner >= _ROWS_MIN``, NCHW): a 2-D view of
    ``outer * C`` rows of ``inner`` values, row ``r`` in channel ``r % C``.
    Short runs (NC, channels-last): ``outer`` rows of ``C * inner`` values
    (the loops repeat the per-channel constants to one per column); the
    column sums take ``group`` of them (:func:`_row_group`) as one row.  Rows are cut into
    ``nb`` blocks of ``per`` rows of about ``_BLOCK`` values (the column sums:
    ``sum_nb`` blocks of ``sum_per`` rows)."""

    def __init__(self, shape):
        outer, self.c, self.inner = shape
        self.rows = self.inner >= _ROWS_MIN
        self.shape2 = (outer * self.c, self.inner) if self.rows else (outer, self.c * self.inner)
        n_rows = self.shape2[0]
        nb = max(1, min(_MAX_BLOCKS, n_rows, outer * self.c * self.inner // _BLOCK))
        self.per = -(-n_rows // nb)
        self.nb = -(-n_rows // self.per)
        # the column sums keep an accumulator per column, loaded and stored
        # every few rows: short rows are summed ``group`` at a time (adjacent
        # in memory, one row to the loop), and a block writes a row of
        # partials (:func:`_partials_plan`)
        self.group = 1 if self.rows else _row_group(n_rows, self.shape2[1], _WIDE)
        self.affine_group = 1 if self.rows else _affine_group(n_rows, self.shape2[1])
        self.width = self.c if self.rows else self.shape2[1] * self.group  # partials per block
        self.sum_per, self.sum_nb = (self.per, self.nb) if self.rows else \
            _partials_plan(n_rows // self.group)

    def view(self, a3, dtype=None, group=1):
        """A canonical array (None: absent, as an empty one of the loops'
        ``dtype``) as the 2-D array the loops walk (``group`` rows as one)."""
        if a3 is None:
            return _NONE[_bits_dtype(dtype)]
        rows, width = self.shape2
        return _bits(a3).reshape(rows // group, width * group)

    def sums(self, x3, dy3, shift, y3=None, g3=None):
        """``_sums`` over the whole array: per-channel float64 totals (with
        ``y3``, of ``dy3`` masked by ``y3 > 0``, written to ``g3``)."""
        parts = np.empty((2, self.sum_nb, self.width))
        dt, g = x3.dtype, self.group
        _sums(self.sum_nb, x3.size, self.view(x3, dt, g), self.view(dy3, dt, g),
              self.view(y3, dt, g), _acc(shift, dt), self.inner, self.rows,
              self.sum_per, parts[0], parts[1], self.view(g3, dt, g))
        totals = np.empty((2, self.c))
        _channel_totals(parts, *((1, 1) if self.rows else (self.group, self.inner)), totals)
        return totals[0], totals[1]

    def affine(self, x3, dy3, mean, a, b0, k, z3=None, relu=False, out=None):
        """The normalize loop (``dy3`` None: ``(x3 - mean) * a + b0``, plus
        ``z3``, then the ReLU) or the dx loop (``k * (dy3 - b0 - (x3 - mean)
        * a)``; ``x3`` None: ``k * dy3``) over the whole array, into ``out``
        or a new array of the data's dtype.  Short rows are taken several at
        a time: a streamed output's ``group`` at a time, as in the column
        sums, so the partial cache lines at either end of a row
        (:func:`_stream_span`) are paid once per group (the constants
        repeated ``group`` times cost microseconds, nothing next to a
        streamed output), others to ``_AFFINE_WIDE`` values."""
        like = dy3 if x3 is None else x3
        out = np.empty(like.shape, like.dtype) if out is None else out
        stream = _streamed(out)
        dt, g = like.dtype, self.group if stream else self.affine_group
        per = max(1, self.per // g)
        n = -(-(self.shape2[0] // g) // per)
        x, y = self.view(x3, dt, g), self.view(out, dt, g)
        if dy3 is None:
            _normalize_loop(n, like.size, x, self.view(z3, dt, g), relu, _acc(mean, dt),
                            _acc(a, dt), _acc(b0, dt), self.inner, self.rows, per, stream, y)
        else:
            _dx_loop(n, like.size, self.view(dy3, dt, g), x, _acc(mean, dt), _acc(a, dt),
                     _acc(b0, dt), _acc(k, dt), self.inner, self.rows, per, stream, y)
        return out


@functools.lru_cache(maxsize=64)
def _cached_layout(shape, constants):
    return _Layout(shape)


def _layout(shape):
    """The :class:`_Layout` of a shape, made once per shape (and per value
    of the tuning constants it reads, which tests change)."""
    return _cached_layout(shape, (_ROWS_MIN, _BLOCK, _MAX_BLOCKS, _SUM_BLOCKS, _FOLD, _WIDE,
                                  _AFFINE_WIDE))


def _row_group(rows, width, wide):
    """How many of ``rows`` rows of ``width`` values a loop takes as one: the
    fewest (dividing ``rows``) that make ``wide`` values or more, else the
    most, up to ``_FOLD``.  (Short rows cost more in loop setup, and summed
    row by row in accumulator loads and stores, than in the data: the column
    sums and the loops writing a streamed output make rows of ``_WIDE``
    values; the normalize and dx loops writing an output kept in the cache
    rows of ``_AFFINE_WIDE``, their per-column constants in L1.)"""
    group = 1
    for g in range(1, _FOLD + 1):
        if rows % g == 0:
            group = g
            if g * width >= wide:
                break
    return group


def _affine_group(rows, width):
    """How many of ``rows`` short rows of ``width`` values the normalize and
    dx loops take as one (:func:`_row_group`): to ``_AFFINE_WIDE`` values,
    or for a small input to ``sqrt(2 * rows * width)``.  Their constants,
    repeated to one per column, are made on every call, at a cost that
    grows with the width of a row as the rows' setups fall with it; the
    balance is near that width (float32 forward + backward of 16x64: 5.0
    and 4.7 us one row at a time, 6.4 and 6.0 eight rows as one; 1152x16:
    12.6 and 14.9 one at a time, 9.5 and 10.4 at eight)."""
    return _row_group(rows, width, min(_AFFINE_WIDE, math.isqrt(2 * rows * width)))


def _partials_plan(rows, per=1):
    """``(rows per block, blocks)`` of a loop whose blocks each write a row
    of float64 partial sums (the column sums; layer norm's weight and bias
    gradients): at most ``_SUM_BLOCKS`` blocks of ``_FOLD`` rows or more
    (and ``per`` or more), so the partials stay small."""
    per = max(per, _FOLD, -(-rows // _SUM_BLOCKS))
    return per, -(-rows // per)


def _row_plan(rows, n):
    per = max(1, min(rows, _BLOCK // max(n, 1)))
    per = max(per, -(-rows // _MAX_BLOCKS))
    return per, -(-rows // per)


def _acc(v, dtype):
    """A per-channel vector in the accumulation dtype of data of ``dtype``."""
    return np.asarray(v, dtype=acc_dtype(dtype))


def _vec(v, dtype, c, fill):
    return np.full(c, fill, dtype) if v is None else np.asarray(v, dtype=dtype)


# The arithmetic on per-channel vectors between the loops is compiled too: a
# NumPy expression costs 2-6 us a ufunc at 4096 channels, and a forward +
# backward chained about forty of them (0.45 ms of 0.83 for 256x4096
# float32).  Plain IEEE arithmetic, no fastmath flags, NumPy's error model (a
# division by zero gives Inf or NaN): the operations and their order are
# those of the formulas in the docstrings.  Both are set explicitly: a
# function left without them takes those of the compiled loop that first
# calls it (Numba's inherited flags), and the loops reassociate.
@numba.njit(cache=True, error_model="numpy", fastmath=False)
def _channel_totals(parts, group, inner, out):
    """``out[s, ch]``: the float64 total of the block partials ``parts[s]``
    of each sum ``s`` (rows: blocks; columns: ``group`` copies of ``C``
    channels of ``inner`` columns each), each column summed over the blocks
    in block order, then a channel's columns in memory order."""
    one = group == 1 and inner == 1         # a column per channel: no second sum
    c = out.shape[1]
    for s in range(parts.shape[0]):
        col = out[s] if one else np.empty(parts.shape[2])
        for i in range(col.size):       # loops: an array expression compiles
            col[i] = parts[s, 0, i]     # for seconds
        for b in range(1, parts.shape[1]):
            for i in range(col.size):
                col[i] += parts[s, b, i]
        if one:
            continue
        # a channel's columns added in memory order; with one column per
        # channel and group, a row of the channels at a time (a vector add:
        # a channel's sum alone is a chain of dependent adds, 12 us for 32
        # groups of 64 channels)
        tot = out[s]
        if inner == 1:
            for ch in range(c):
                tot[ch] = 0.0
            for g in range(group):
                cg = col[g * c:(g + 1) * c]
                for ch in range(c):
                    tot[ch] += cg[ch]
            continue
        for ch in range(c):
            t = 0.0
            for g in range(group):
                for i in range((g * c + ch) * inner, (g * c + ch + 1) * inner):
                    t += col[i]
            tot[ch] = t


@numba.njit(cache=True)
def _first_values(x, j0, inner, out):
    """The shifts the sums are taken around: ``out[c]``, the first value of
    channel ``c`` from column ``j0`` of the 2-D ``(N, C * inner)`` view
    ``x`` (its first row's column ``j0 + c * inner``), 0 where not finite,
    in ``out``'s dtype (the accumulation dtype or float64: exact)."""
    for c in range(out.size):
        v = _ld(x[0, j0 + c * inner])
        out[c] = v if np.isfinite(v) else 0.0


@numba.njit(cache=True, error_model="numpy", fastmath=False)
def _centre(t1, t2, n, shift, redo, move, like, mean, m2):
    """From the sums ``t1 = sum d``, ``t2 = sum d * d`` of ``d = x - shift``
    over ``n`` values per channel: ``mean = shift + dm`` and ``m2 = t2 - t1 *
    dm`` for ``dm = t1 / n`` (negative rounding to 0, NaN kept).  Returns
    whether a channel's mean lies far from its shift (``dm * dm * n > redo *
    m2``); with ``move`` such a channel's ``shift`` becomes its mean, rounded
    to the accumulation dtype (``like``'s), to sum around again."""
    far = False
    for c in range(t1.size):
        dm = t1[c] / n
        v = t2[c] - t1[c] * dm
        mean[c] = shift[c] + dm
        m2[c] = 0.0 if v < 0.0 else v
        if dm * dm * n > redo * v:       # False for NaN
            far = True
            if move:
                shift[c] = np.float64(like.dtype.type(mean[c]))
    return far


@numba.njit(cache=True, error_model="numpy", fastmath=False)
def _finish(mean, m2, count, eps, running_mean, running_var, momentum, skipped, invstd,
            mean_acc, invstd_acc):
    """The step between a training forward's two passes, from the float64
    ``mean`` and ``m2`` of ``count`` values per channel: ``invstd = 1 /
    sqrt(m2 / count + eps)`` (float64) and both in the accumulation dtype
    (``mean_acc``, ``invstd_acc``); the running statistics (absent: no
    values) step towards the mean and the unbiased variance ``m2 / (count -
    1)`` by ``momentum`` in float64, rounded once to their dtype; with
    ``skipped`` values the guard (a channel whose mean or unbiased variance
    is not finite in the accumulation dtype keeps its running statistics and
    gets 1, the others 0).  The arithmetic of :func:`host_forward_train`
    (``update_running`` and ``guard_skips`` of the base module), in one
    call instead of a score of NumPy ones; the tests hold the two bitwise
    equal."""
    acc = mean_acc.dtype.type
    for c in range(mean.size):
        invstd[c] = 1.0 / np.sqrt(m2[c] / count + eps)
        mean_acc[c] = mean[c]
        invstd_acc[c] = invstd[c]
        var = m2[c] / (count - 1)
        if skipped.size > 0:
            skip = not (np.isfinite(acc(mean[c])) and np.isfinite(acc(var)))
            skipped[c] = 1 if skip else 0
            if skip:
                continue
        if running_mean.size > 0:
            running_mean[c] = (1.0 - momentum) * np.float64(running_mean[c]) + momentum * mean[c]
        if running_var.size > 0:
            running_var[c] = (1.0 - momentum) * np.float64(running_var[c]) + momentum * var


@numba.njit(cache=True, error_model="numpy", fastmath=False)
def _affine_constants(mean, invstd, w, b, hi, a, b0):
    """The normalize loop's per-channel constants, in the accumulation dtype
    (``hi``'s): ``y = (x - hi) * a + b0`` with ``mean = hi + lo`` (``lo = mean
    - hi``, 0 where ``hi`` is not finite), ``a = invstd * w``, ``b0 = b - lo *
    a``, computed in float64 (``mean``, ``invstd``, ``w`` and ``b`` of any
    float dtype, widened)."""
    for c in range(mean.size):
        m = np.float64(mean[c])
        h = hi.dtype.type(m)
        lo = m - np.float64(h) if np.isfinite(h) else 0.0
        scale = np.float64(invstd[c]) * np.float64(w[c])
        hi[c] = h
        a[c] = scale
        b0[c] = np.float64(b[c]) - lo * scale


@numba.njit(cache=True, error_model="numpy", fastmath=False)
def _eval_constants(running_mean, running_var, eps, w, b, mean, invstd, hi, a, b0):
    """An inference forward's per-channel vectors: ``mean`` (the running
    mean) and ``invstd = 1 / sqrt(running_var + eps)`` computed in float64,
    both in their arrays' accumulation dtype, as ``host_eval_constants`` of
    the base module computes them (the tests hold the two bitwise equal);
    then the normalize loop's constants from them (:func:`_affine_constants`).
    One call instead of a dozen NumPy ones."""
    for c in range(mean.size):
        mean[c] = running_mean[c]
        invstd[c] = 1.0 / np.sqrt(np.float64(running_var[c]) + eps)
    _affine_constants(mean, invstd, w, b, hi, a, b0)


@numba.njit(cache=True, error_model="numpy", fastmath=False)
def _dx_constants(invstd, w, sum_dy, sum_dy_xhat, count, k, a, b0):
    """The dx loop's per-channel constants, in the accumulation dtype
    (``k``'s): ``k = invstd * w``, ``a = invstd * sum_dy_xhat / count``, ``b0
    = sum_dy / count`` (float64 inputs)."""
    for c in range(invstd.size):
        k[c] = invstd[c] * w[c]
        a[c] = invstd[c] * sum_dy_xhat[c] / count
        b0[c] = sum_dy[c] / count


def _moments(x):
    """Per-channel float64 ``(mean, m2)`` of a canonical array."""
    lay = _layout(x.shape)
    like = _NONE[np.dtype(acc_dtype(x.dtype))]
    shift = np.empty(lay.c)
    _first_values(_bits(x).reshape(x.shape[0], -1), 0, lay.inner, shift)
    mean, m2 = np.empty(lay.c), np.empty(lay.c)
    for again in range(2):
        t1, t2 = lay.sums(x, None, shift)
        if not _centre(t1, t2, x.shape[0] * x.shape[2], shift, _REDO, again == 0, like,
                       mean, m2):
            break
    return mean, m2


def _normalize(x3, mean, invstd, weight, bias, z3=None, relu=False, out=None):
    """``y = (x - mean) * invstd * weight + bias`` per channel (float64
    ``mean`` and ``invstd``; ``weight`` / ``bias`` None for 1 / 0), plus
    ``z3`` when given, then the ReLU when ``relu``; into ``out`` when given."""
    c = x3.shape[1]
    acc = acc_dtype(x3.dtype)
    hi, a, b0 = np.empty(c, acc), np.empty(c, acc), np.empty(c, acc)
    _affine_constants(_f64(mean), _f64(invstd), _vec(weight, np.float64, c, 1.0),
                      _vec(bias, np.float64, c, 0.0), hi, a, b0)
    return _layout(x3.shape).affine(x3, None, hi, a, b0, a, z3, relu, out)


def _backward_sums(dy3, x3, mean):
    """Per-channel float64 ``(sum dy, sum dy * (x - mean))``."""
    return _layout(x3.shape).sums(x3, dy3, mean)


def _dx(dy3, x3, mean, invstd, weight, sum_dy, sum_dy_xhat, count, out=None):
    """Training dx = weight*invstd*(dy - sum_dy/m - (x - mean)*invstd*sum_dy_xhat/m),
    into ``out`` when given."""
    c = x3.shape[1]
    acc = acc_dtype(x3.dtype)
    k, a, b0 = np.empty(c, acc), np.empty(c, acc), np.empty(c, acc)
    _dx_constants(_f64(invstd), _vec(weight, np.float64, c, 1.0), _f64(sum_dy),
                  _f64(sum_dy_xhat), count, k, a, b0)
    return _layout(x3.shape).affine(x3, dy3, mean, a, b0, k, out=out)


def _tile_channels(shape, dtype):
    """Channels per tile of the fused loops (:func:`_tile_forward`,
    :func:`_tile_backward`), or 0 where they do not apply.  An input of
    ``_ONE_TILE`` values or fewer, of any layout, is one tile of every
    channel: a pass is one compiled call on the calling thread (a small
    input's cost is the calls, not the values).  Else they need runs
    (``inner >= _ROWS_MIN``, NCHW), ``_TILES_MIN`` channels or more, and one
    channel's values of an array within ``_TILE_BYTES`` (the second loop over
    a tile then reads the cache); a tile is then the fewest whole channels
    that make ``_TILE`` columns or more (longer rows stream better), within
    the cache budget, and there are at least ``_TILES_MIN`` tiles to share
    out.  Short rows are one tile up to ``_L2_BYTES`` of x and dy (see
    there).  Decided by the shape and the machine's L2 size, so results do
    not depend on the thread count."""
    outer, c, inner = shape
    values, itemsize = outer * c * inner, np.dtype(dtype).itemsize
    if values <= _ONE_TILE or (inner < _ROWS_MIN and 2 * values * itemsize <= _L2_BYTES):
        return c
    per_channel = outer * inner * itemsize
    if inner < _ROWS_MIN or c < _TILES_MIN or per_channel > _TILE_BYTES:
        return 0
    return max(1, min(-(-_TILE // inner), _TILE_BYTES // per_channel, c // _TILES_MIN))


class _TilePlan(NamedTuple):
    """How the tile loops walk a shape (:func:`_tiles`)."""

    t: int              # channels per tile (:func:`_tile_channels`; 0: no tiles)
    group: int          # rows taken as one
    runs: bool          # a row walked run by run (else by columns)
    tiles: int          # the number of tiles
    flat: tuple         # the 2-D shape of the views the loops walk


def _tiles(shape, dtype):
    """The :class:`_TilePlan` of a canonical shape: the channels per tile
    (:func:`_tile_channels`), the rows the tile loops take as one (a tile of
    every channel takes short rows several at a time, as the normalize loop
    does: :func:`_affine_group`) and whether they walk a row run by run
    (constants per run; else by columns, the constants one per column, made
    per tile: ``_RUNS_MIN``, ``_RUNS_MIN_CACHED``, ``_FEW_ROWS``).  Made once per shape and
    dtype (and per value of the tuning constants it reads, which tests
    change)."""
    return _cached_tiles(shape, dtype, (_ONE_TILE, _L2_BYTES, _ROWS_MIN, _TILE, _TILE_BYTES,
                                        _TILES_MIN, _FOLD, _AFFINE_WIDE, _RUNS_MIN,
                                        _RUNS_MIN_CACHED, _CACHED_BYTES, _FEW_ROWS))


@functools.lru_cache(maxsize=64)
def _cached_tiles(shape, dtype, constants):
    outer, c, inner = shape
    t = _tile_channels(shape, dtype)
    runs = inner >= _RUNS_MIN or (inner >= _RUNS_MIN_CACHED
                                  and outer * c * inner * np.dtype(dtype).itemsize
                                  < _CACHED_BYTES) or (inner >= _ROWS_MIN and outer < _FEW_ROWS)
    group = _affine_group(outer, c * inner) if t >= c and not runs else 1
    return _TilePlan(t, group, runs, -(-c // t) if t else 0,
                     (outer // group, group * c * inner))


def _forward_tiles(x3, plan, weight, bias, eps, z3, relu, running, out=None):
    """``(y3, mean, invstd)`` of :func:`_tile_forward` by the :func:`_tiles`
    ``plan`` (``running``: its running statistics, momentum and guard
    arguments; ``y3`` is ``out`` when given)."""
    acc = acc_dtype(x3.dtype)
    c = x3.shape[1]
    y3 = np.empty(x3.shape, x3.dtype) if out is None else out
    mean, invstd = np.empty(c, acc), np.empty(c, acc)
    flat = plan.flat
    _tile_forward(plan.tiles, x3.size, _bits(x3).reshape(flat),
                  _NONE[_bits_dtype(x3.dtype)] if z3 is None else _bits(z3).reshape(flat), relu,
                  _vec(weight, acc, c, 1.0), _vec(bias, acc, c, 0.0), float(eps), x3.shape[2],
                  plan.t, plan.group, plan.runs, _streamed(y3), _bits(y3).reshape(flat),
                  *running, mean, invstd)
    return y3, mean, invstd


def _backward_tiles(dy3, x3, plan, mean, invstd, weight, out=None):
    """``(dx3, dweight, dbias)`` of :func:`_tile_backward` by the
    :func:`_tiles` ``plan`` (``dx3`` is ``out`` when given)."""
    acc = acc_dtype(x3.dtype)
    c = x3.shape[1]
    dx3 = np.empty(x3.shape, x3.dtype) if out is None else out
    dw, db = np.empty(c, acc), np.empty(c, acc)
    flat = plan.flat
    _tile_backward(plan.tiles, x3.size, _bits(dy3).reshape(flat), _bits(x3).reshape(flat),
                   np.asarray(mean, acc), np.asarray(invstd, acc), _vec(weight, acc, c, 1.0),
                   x3.shape[2], plan.t, plan.group, plan.runs, _streamed(dx3), dw, db,
                   _bits(dx3).reshape(flat))
    return dx3, dw, db


def _f64(v):
    return None if v is None else np.asarray(v, dtype=np.float64)


class CpuBackend(HostBackend):
    name = "cpu"

    @_serialized
    def moments(self, x3):
        return _moments(x3)

    @_serialized
    def bn_forward_train(self, x3, weight, bias, running_mean, running_var, momentum, eps,
                         skipped=None, out=None):
        return self._forward_train(x3, weight, bias, running_mean, running_var, momentum, eps,
                                   None, False, skipped, out)

    @_serialized
    def bn_forward_train_act(self, x3, weight, bias, running_mean, running_var, momentum, eps,
                             residual, relu, skipped=None, out=None):
        return self._forward_train(x3, weight, bias, running_mean, running_var, momentum, eps,
                                   residual, relu, skipped, out)

    def _forward_train(self, x3, weight, bias, running_mean, running_var, momentum, eps,
                       residual, relu, skipped, out):
        plan = _tiles(x3.shape, x3.dtype)
        acc = acc_dtype(x3.dtype)
        absent = _EMPTY[acc]        # what _finish takes for no values
        running = (absent if running_mean is None else running_mean,
                   absent if running_var is None else running_var, float(momentum),
                   _NO_GUARD if skipped is None else skipped)
        if plan.t:    # one loop computes the statistics, steps the running ones, and y
            return _forward_tiles(x3, plan, weight, bias, eps, residual, relu, running, out)
        mean, m2 = _moments(x3)
        c = mean.size
        invstd, mean_acc, invstd_acc = np.empty(c), np.empty(c, acc), np.empty(c, acc)
        _finish(mean, m2, x3.shape[0] * x3.shape[2], float(eps), *running, invstd, mean_acc,
                invstd_acc)
        y3 = _normalize(x3, mean, invstd, weight, bias, residual, relu, out)
        return y3, mean_acc, invstd_acc

    @_serialized
    def bn_forward_eval(self, x3, weight, bias, running_mean, running_var, eps, out=None):
        return self._forward_eval(x3, weight, bias, running_mean, running_var, eps, None, False,
                                  out)

    @_serialized
    def bn_forward_eval_act(self, x3, weight, bias, running_mean, running_var, eps, residual,
                            relu, out=None):
        return self._forward_eval(x3, weight, bias, running_mean, running_var, eps, residual,
                                  relu, out)

    def _forward_eval(self, x3, weight, bias, running_mean, running_var, eps, residual, relu,
                      out):
        c, acc = x3.shape[1], acc_dtype(x3.dtype)
        mean, invstd, hi, a, b0 = np.empty((5, c), acc)
        _eval_constants(running_mean, running_var, float(eps), _vec(weight, acc, c, 1.0),
                        _vec(bias, acc, c, 0.0), mean, invstd, hi, a, b0)
        return _layout(x3.shape).affine(x3, None, hi, a, b0, None, residual, relu, out), mean, \
            invstd

    def bn_apply(self, x3, mean, invstd, weight, bias):
        return self._apply(x3, mean, invstd, weight, bias, None, False)

    @_serialized
    def _apply(self, x3, mean, invstd, weight, bias, residual, relu, out=None):
        return _normalize(x3, _f64(mean), _f64(invstd), weight, bias, residual, relu, out)

    @_serialized
    def bn_backward_reduce(self, dy3, x3, mean, invstd):
        acc = acc_dtype(x3.dtype)
        sum_dy, sum_dy_xmu = _backward_sums(dy3, x3, mean)
        with quiet():
            return sum_dy.astype(acc), (sum_dy_xmu * _f64(invstd)).astype(acc)

    @_serialized
    def bn_backward_dx(self, dy3, x3, mean, invstd, weight, sum_dy, sum_dy_xhat, count):
        return _dx(dy3, x3, mean, invstd, weight, sum_dy, sum_dy_xhat, count)

    @_serialized
    def bn_backward(self, dy3, x3, mean, invstd, weight, training, out=None):
        return self._backward(dy3, x3, mean, invstd, weight, training, out=out)

    @_serialized
    def bn_backward_relu(self, dy3, x3, mean, invstd, weight, y3, training, out=None):
        g3 = np.empty(x3.shape, x3.dtype)
        return (*self._backward(dy3, x3, mean, invstd, weight, training, y3, g3, out), g3)

    def _backward(self, dy3, x3, mean, invstd, weight, training, y3=None, g3=None, out=None):
        """:meth:`bn_backward`; with ``y3`` (the forward's output) of the
        ReLU's gradient ``g = 0 where y3 <= 0, else dy``, written to ``g3``."""
        plan = _tiles(x3.shape, x3.dtype)
        if plan.t and training and y3 is None:    # one loop computes the sums and dx
            return _backward_tiles(dy3, x3, plan, mean, invstd, weight, out)
        acc = acc_dtype(x3.dtype)
        sum_dy, sum_dy_xmu = _layout(x3.shape).sums(x3, dy3, mean, y3, g3)
        with quiet():
            sum_dy_xhat = sum_dy_xmu * _f64(invstd)
            dweight, dbias = sum_dy_xhat.astype(acc), sum_dy.astype(acc)
        g = dy3 if y3 is None else g3
        if training:
            dx3 = _dx(g, x3, mean, invstd, weight, sum_dy, sum_dy_xhat,
                      x3.shape[0] * x3.shape[2], out)
        else:   # statistics held fixed: dx = dy * weight * invstd
            with quiet():
                k = _f64(invstd) if weight is None else _f64(invstd) * _f64(weight)
            unused = np.zeros_like(k)
            dx3 = _layout(x3.shape).affine(None, g, unused, unused, unused, k, out=out)
        return dx3, dweight, dbias

    # -- layer norm ----------------------------------------------------
    @_serialized
    def ln_forward(self, x2, weight, bias, eps, out=None):
        rows, n = x2.shape
        acc = acc_dtype(x2.dtype)
        y = np.empty(x2.shape, x2.dtype) if out is None else out
        mean = np.empty(rows, acc)
        rstd = np.empty(rows, acc)
        per, nb = _row_plan(rows, n)
        _ln_forward(nb, x2.size, _bits(x2), x2[:, 0].astype(acc), _vec(weight, acc, n, 1.0),
                    _vec(bias, acc, n, 0.0), float(eps), per, _streamed(y), _bits(y), mean, rstd)
        return y, mean, rstd

    @_serialized
    def ln_backward(self, dy2, x2, mean, rstd, weight, want_grads, out=None):
        rows, n = x2.shape
        acc = acc_dtype(x2.dtype)
        per, nb = _row_plan(rows, n)
        if want_grads:      # a block writes a row of partials of the two gradients
            per, nb = _partials_plan(rows, per)
        dx = np.empty(x2.shape, x2.dtype) if out is None else out
        parts = np.empty((2, nb if want_grads else 0, n))      # dweight's and dbias's
        _ln_backward(nb, x2.size, _bits(dy2), _bits(x2), np.asarray(mean, acc),
                     np.asarray(rstd, acc), _vec(weight, acc, n, 1.0), per, _streamed(dx),
                     _bits(dx), parts[0], parts[1])
        if not want_grads:
            return dx, None, None
        totals = np.empty((2, n))
        _channel_totals(parts, 1, 1, totals)
        with quiet():
            dweight, dbias = totals.astype(acc)
        return dx, dweight, dbias
