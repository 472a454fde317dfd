"""Large host buffers for the NumPy backend: placed in the page, and cached.

**Placement.**  Loops that store to one array while loading another run
several times slower when the load address lies a few bytes past the store
address modulo 4096: the CPU takes the load for a read of the pending store
(4K aliasing; measured 6x on a multiply whose per-column operand sat 4-28
bytes past the output).  Where the arrays are placed is up to the allocator,
so a call could be fast or slow by chance.  :func:`empty_at` puts a buffer at
a given offset into its page; the backend puts its outputs, scratch blocks
and streamed per-channel vectors at the page offset of the input, so that
corresponding elements of every array share their low 12 address bits.

**Caching.**  Every forward and backward returns a new array as large as its
input.  Fresh memory faults on its first write to each page and the kernel
zeroes it; the C allocator often hands large freed blocks straight back to
the system (glibc does once more than twice its recent largest request lies
free at the top of the heap), so a loop that allocates ``y`` and ``dx`` of
the same shapes every step can pay those faults every call: 25-45 % of a
forward + backward of a 25 MB batch on a 2-core machine.  The cache keeps
the buffers it handed out and hands one out again once nothing but the cache
refers to it: the array returned to the caller, and every view of it (whose
``base`` is the cached buffer), holds a reference, so a buffer is reused only
after the last of them is gone, as CuPy's memory pool recycles device
memory.  Only buffers of at least ``MIN_BYTES`` (64 KiB) are kept: smaller
ones come from the allocator's free lists, while larger ones are mapped
fresh, or trimmed back to the system when freed, as long as the allocator's
thresholds are low, as they are in a new process (there a forward + backward
of 32x2048x7x7 faulted in 2200 pages per call for its per-channel vectors and
partial sums of 0.4-1.6 MB).  All kept buffers together
are held to ``limit`` bytes, in use or idle (``GPUBN_HOST_CACHE_MB``, default
256; 0 turns the cache off): beyond it, buffers are plain allocations that
go back to the allocator when freed.  So at most ``limit`` bytes stay held
after the caller drops its arrays; ``gpubn.empty_host_cache()`` releases
them.  Reference counts decide when a buffer is idle, so the cache
is off on interpreters without exact ones (free-threaded CPython, PyPy).
"""

from __future__ import annotations

import math
import os
import sys
import threading
from collections import OrderedDict

import numpy as np

MIN_BYTES = 64 << 10
PAGE = 4096


def _address(a: np.ndarray) -> int:
    return a.__array_interface__["data"][0]


def empty_at(shape, dtype, offset: int) -> np.ndarray:
    """An uninitialized C-contiguous array whose data starts ``offset``
    bytes into a page (modulo :data:`PAGE`), rounded down to the dtype's
    alignment; see the module docstring for why."""
    dtype = np.dtype(dtype)
    shape = tuple(shape)
    nbytes = math.prod(shape) * dtype.itemsize
    raw = np.empty(nbytes + PAGE, dtype=np.uint8)
    return _place(raw, shape, dtype, offset)


def _place(raw, shape, dtype, offset):
    """A view of ``raw`` (``PAGE`` bytes longer than needed) at ``offset``
    into a page, rounded down to the alignment of ``dtype``."""
    nbytes = math.prod(shape) * dtype.itemsize
    start = (offset - offset % dtype.alignment - _address(raw)) % PAGE
    return raw[start:start + nbytes].view(dtype).reshape(shape)


def _default_limit() -> int:
    env = os.environ.get("GPUBN_HOST_CACHE_MB")
    if env:
        try:
            return max(0, int(float(env) * (1 << 20)))
        except ValueError:
            pass
    return 256 << 20


def _exact_refcounts() -> bool:
    if sys.implementation.name != "cpython":
        return False
    gil = getattr(sys, "_is_gil_enabled", None)
    return gil is None or gil()


class HostCache:
    """Buffers by ``id``, most recently handed out last."""

    def __init__(self, limit: int):
        self.limit = limit if _exact_refcounts() else 0
        self._lock = threading.Lock()
        self._bufs: "OrderedDict[int, np.ndarray]" = OrderedDict()

    def _counts(self):
        return [(k, b, sys.getrefcount(b)) for k, b in self._bufs.items()]

    def _idle(self):
        """``(key, buffer)`` of the buffers nothing refers to but the cache:
        :meth:`_counts` gives them the count of a buffer that only the
        cache's dict holds (:data:`_IDLE_REFS`)."""
        return [(k, b) for k, b, n in self._counts() if n <= _IDLE_REFS]

    def empty(self, shape, dtype, offset: int) -> np.ndarray:
        """Like :func:`empty_at`, from an idle buffer of the same size when
        there is one.  A new buffer is kept for reuse when it fits in
        ``limit`` with the buffers kept already, once the least recently
        used idle ones are dropped; otherwise it is a plain allocation."""
        dtype = np.dtype(dtype)
        shape = tuple(shape)
        size = math.prod(shape) * dtype.itemsize + PAGE
        if self.limit <= 0 or size < MIN_BYTES or size > self.limit:
            return empty_at(shape, dtype, offset)
        with self._lock:
            idle = self._idle()
            for key, raw in idle:
                if raw.size == size:
                    self._bufs.move_to_end(key)
                    return _place(raw, shape, dtype, offset)
            held = sum(b.nbytes for b in self._bufs.values())
            if held - sum(b.nbytes for _, b in idle) + size > self.limit:
                return empty_at(shape, dtype, offset)   # the kept buffers are in use
            for key, raw in idle:                 # least recently used first
                if held + size <= self.limit:
                    break
                held -= raw.nbytes
                del self._bufs[key]
            raw = np.empty(size, dtype=np.uint8)
            self._bufs[id(raw)] = raw
            return _place(raw, shape, dtype, offset)

    def held_bytes(self) -> int:
        """Bytes of the buffers kept for reuse, in use or idle."""
        with self._lock:
            return sum(b.nbytes for b in self._bufs.values())

    def idle_bytes(self) -> int:
        """Bytes held in buffers that nothing else refers to."""
        with self._lock:
            return sum(b.nbytes for _, b in self._idle())

    def free(self):
        """Forget every buffer; idle ones go back to the allocator."""
        with self._lock:
            self._bufs.clear()


def _calibrate() -> int:
    """The count :meth:`HostCache._counts` gives a buffer that only the
    cache's dict holds."""
    cache = HostCache(0)
    cache._bufs[0] = np.empty(1)
    return cache._counts()[0][2]


_IDLE_REFS = _calibrate()
CACHE = HostCache(_default_limit())


def page_offset(a: np.ndarray) -> int:
    """Where the data of ``a`` starts in its page."""
    return _address(a) % PAGE


def empty(shape, dtype, offset: int) -> np.ndarray:
    """A buffer for the backend (output or scratch) at ``offset`` into its
    page, from the cache when it is large (:meth:`HostCache.empty`)."""
    return CACHE.empty(shape, dtype, offset)


def empty_host_cache() -> None:
    """Release the idle output buffers the NumPy backend keeps for reuse
    (buffers still referred to stay with their arrays)."""
    CACHE.free()
