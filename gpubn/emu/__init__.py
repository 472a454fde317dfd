"""gpubn.emu: run CUDA C++ kernels on the CPU, checked.

What it is for: testing GPU code on machines without a GPU.  The very same
``.cu`` source CuPy compiles with NVRTC is compiled here with g++ against a
small SIMT runtime and run with the semantics of a CUDA launch: every CUDA
thread is a fiber, ``__syncthreads()`` is a real barrier, shared memory is
shared by the block, warp shuffles exchange values among the 32 fibers of a
warp.  Every launch is checked:

* memcheck -- every load and store must hit an argument array, shared memory
  or the thread's own stack; anything else raises :class:`MemcheckError`
  naming the kernel, block, thread, the nearest argument and the offset (the
  bad access never happens); an access of 2, 4, 8 or 16 bytes (a scalar,
  a vector type such as ``float4``, a ``reinterpret_cast`` load) at an address
  that is not a multiple of its size is a ``misaligned address`` error, as on
  the GPU (struct fields are not split into scalars, so vector accesses keep
  their width);
* buffer identity -- every argument array runs in its own copy with a
  gigabyte of unmapped address space on either side (the copy is written back
  after the launch; the same array passed twice, or overlapping views, share
  one copy), so a pointer derived from one argument cannot land in another:
  memcheck reports ``pointer from argument 0 reached argument 2 at offset ...``
  where the host arrays are neighbours;
* resource limits -- a launch the modelled device (:data:`DEVICE`, H100/H200
  limits) would refuse raises :class:`LaunchError` naming the CUDA error before
  any thread runs: more than 1024 threads per block, grid y or z above 65535,
  more than 32764 bytes of parameters, static + dynamic shared memory above
  48 KiB unless ``Function.max_dynamic_shared_size_bytes`` (CuPy's attribute)
  was raised, and above 227 KiB at all.  ``Function.shared_size_bytes`` is the
  static shared memory the kernel can reach (read off its machine code);
* racecheck -- a shared-memory byte written by one thread and read or written
  by another with no ``__syncthreads()`` (``__syncwarp()`` inside a warp) in
  between raises :class:`RaceError` naming both threads and the ``__shared__``
  variable (read-after-write, write-after-read or write-after-write, whichever
  thread runs first); shuffles and atomics are not races;
* inter-block racecheck -- global memory between the blocks of a launch,
  which compute-sanitizer's racecheck does not look at: a load or store of a
  byte another block stored in this launch raises :class:`RaceError`
  (``memory == "global"``, "inter-block race", naming both blocks and threads,
  the argument and the offset) unless a release/acquire chain orders them: the
  writer's ``__threadfence()`` after its store (or a fence after which the block
  passed a ``__syncthreads()``), then an atomic of the writer's block; an atomic
  of the reader on that location (or a load of a value an atomic wrote), then
  the reader's ``__threadfence()`` (shared with its block by a
  ``__syncthreads()``).  A last-block reduction with both fences runs clean;
  without either it is reported.  A store after another block's load of the
  byte with no such chain is a write-after-read race.  Volatile stores and
  loads are strong, as atomics are: a volatile store publishes like an atomic,
  a volatile load observes it (and orders nothing without the fence after it);
  a plain load or store of a location another block writes with an atomic or a
  volatile store, unordered, is a race ("non-volatile load": a spin-wait on a
  plain load may never end).  With ``options(global_racecheck=False)`` these
  races are not raised, but a racing load returns, as drawn from the seed, the
  value from before the racing store, so results are wrong as on a GPU;
* initcheck -- a load of shared memory no thread of the block has written
  raises :class:`MemcheckError` (reported at the next barrier, so that a
  missing barrier is reported as the race it is);
* deadlock -- a barrier not every thread of the block reaches raises
  :class:`DeadlockError` instead of hanging, and so does a thread spinning on
  memory no runnable thread will change (threads switch only at barriers,
  warp collectives and exits; a spinning thread hands over to the others
  first, so intra-block flag waits work);
* traffic -- bytes loaded from and stored to each argument array are counted
  per launch: :func:`launch_log` lists a :class:`LaunchRecord` (kernel, grid,
  block, shared_mem, bytes_loaded, bytes_stored, per-argument ``buffers``) for
  every successful launch since :func:`clear_launch_log`;
  ``with recording() as log:`` collects those of a region and
  ``with label("op"):`` tags them (e.g. with the op that launched them).

Use it like CuPy (``RawModule(path="k.cu")`` reads the source from a file)::

    import numpy as np
    from gpubn import emu

    mod = emu.RawModule(code=src, options=("-I/path/to/headers",),
                        name_expressions=("scale<float>",))
    fn = mod.get_function("scale<float>")
    x = np.arange(1000, dtype=np.float32); y = np.empty_like(x)
    fn((4,), (256,), (x, y, np.int64(x.size), np.float32(2.0)))

Arguments: NumPy arrays (contiguous; their data pointer is passed and their
extent is what memcheck allows), ``np.uint64(0)`` for a null pointer (an
``np.uint64`` scalar is a raw address, as in CuPy; ``None`` is refused because
CuPy's RawKernel does not pass it as NULL) and NumPy scalars passed by value, whose size and kind (integer / floating point) must match the
kernel parameter.  Python ``int``/``float``/``bool`` become int64/float64/bool
as in CuPy, so prefer explicit NumPy scalars (``np.int32(n)``).

Options: ``-I``, ``-D``, ``-U`` and ``-std=c++17/20`` are honoured; other
NVRTC flags (``-arch``, ``--use_fast_math``, ...) are accepted and ignored.
``GPUBN_EMU=1`` is defined; ``__CUDACC__``, ``__CUDA_ARCH__`` and
``__CUDACC_RTC__`` are not.  Checks are on by default; change them with
``set_options(memcheck=..., racecheck=..., initcheck=..., seed=...)`` or
``with options(seed=3): ...``; ``seed`` shuffles the order in which blocks
start and which running block goes next (``GPUBN_EMU_SEED`` sets the default).  Libraries are cached under
``$GPUBN_CACHE_DIR/emu`` (default ``~/.cache/gpubn/emu``).  A GCC ``g++``
(``$CXX``) is required.

Supported CUDA subset: ``__global__``/``__device__``/``__host__`` functions
and templates, ``threadIdx``/``blockIdx``/``blockDim``/``gridDim``/``warpSize``,
static ``__shared__`` arrays and ``extern __shared__ T name[];`` (rewritten to
the launch's dynamic shared memory, 16-byte aligned, at most 227 KiB),
``__syncthreads`` (and ``_count/_and/_or``), ``__syncwarp``, ``__shfl*_sync``
(any type of at most 8 bytes, widths 1..32), ``__ballot/__any/__all_sync``,
``__activemask`` (the lanes that have not exited), ``__match_any_sync``,
``__reduce_*_sync``, atomics
(``atomicAdd/Sub/Exch/Min/Max/And/Or/Xor/Inc/Dec/CAS``), fences, ``__ldg`` and
the cache-hint loads/stores, CUDA vector types (``float4``, ...), the math
functions and intrinsics of the CUDA math API that have a C library
counterpart (``rsqrtf``, ``__fdividef``, ``__frcp_rn``, ...), bit casts and
integer intrinsics (``__popc``, ``__clz``, ``__ffs``, ...), ``__constant__``
data with an initializer, ``printf``, and ``assert`` (a failed assertion
raises :class:`KernelError`, as does ``__trap()``).

Refused at compile time with :class:`EmuCompileError` naming the construct:
inline ``asm``, cooperative groups, textures and surfaces, ``__managed__``
memory, ``__device__`` global variables, dynamic parallelism, ``wmma``, and
the pre-CUDA-9 warp intrinsics without ``_sync``.  The check runs on the
preprocessed source and the project's headers, so such code may stay in
branches emu does not take (``#if defined(__CUDA_ARCH__)``).  CUDA toolkit
headers are not available (``#include <cuda_fp16.h>`` fails to compile).
``extern __shared__`` declarations are rewritten to the launch's dynamic
shared memory, and a static ``__shared__ T s[N];`` becomes storage plus a
static reference ``s`` the compiler cannot see through (so that ``s[0]`` or a
``__shared__`` scalar, whose accesses it would prove in bounds, is checked
too); in headers as well.

Semantics worth knowing: the blocks of a launch run on the calling OS thread
as groups of fibers, each CUDA thread on a 64 KiB stack, several blocks at a
time, interleaved: a block runs until its threads all wait (a barrier, a warp
collective, a spin-wait hand-over) or exit, then the next running block (round
robin, or the seed's choice) goes on.  An ordinary launch runs at most one
block fewer than its grid at a time (4 at most): it promises no co-residency,
so a block waiting for a block that has not started is a deadlock.  A
cooperative launch (``RawModule(..., enable_cooperative_groups=True)`` or
``fn(..., enable_cooperative_groups=True)``, as in CuPy) runs every block at
once, so a grid barrier written with atomics and fences works; a grid larger
than the device could hold at once (``Function.max_active_blocks_per_multiprocessor``
times the SM count, from threads, ``num_regs`` -- an assumed 64 registers per
thread -- and shared memory) raises :class:`LaunchError`
(``CUDA_ERROR_COOPERATIVE_LAUNCH_TOO_LARGE``), and one of more than 24576
threads in all, more than emu holds at once, raises :class:`EmuError`; all ``__syncthreads()`` calls of
a block are one barrier whatever the call site, as on sm_70 and newer (g++
duplicates barrier calls into the branches before them), and it must be
reached by every thread of the block (a thread that returned early makes a
later ``__syncthreads()`` a deadlock, as the CUDA programming guide
requires); warp collectives must name only live lanes of the warp; a shuffle reading a lane outside its mask returns all-ones bits;
dynamic shared memory starts every block filled with 0xFF bytes (NaN /
-1), so reading it before writing shows up.  Racecheck tracks every byte of
shared memory; memcheck treats all static ``__shared__`` variables of a
module as one region (an overflow from one into another is not caught).
"""

from .config import (DEVICE, Device, LaunchRecord, Options, Traffic, clear_launch_log, get_options, label, launch_log, options,
                     recording, set_options)
from .errors import DeadlockError, EmuCompileError, EmuError, KernelError, LaunchError, MemcheckError, RaceError
from .module import Function, RawKernel, RawModule
from .compiler import find_compiler


def unavailable_reason():
    """``None`` when emu can compile kernels here, else why not."""
    try:
        find_compiler()
    except EmuCompileError as exc:
        return str(exc)
    return None


def available() -> bool:
    """Whether emu can compile and run kernels on this machine."""
    return unavailable_reason() is None


__all__ = [
    "RawModule", "RawKernel", "Function",
    "set_options", "get_options", "options", "Options",
    "launch_log", "clear_launch_log", "recording", "label", "LaunchRecord", "Traffic",
    "DEVICE", "Device",
    "EmuError", "EmuCompileError", "LaunchError", "KernelError", "MemcheckError", "RaceError", "DeadlockError",
    "available", "unavailable_reason",
]
