"""NumPy backend: the CPU fallback and the reference for every other backend.

All methods take canonical ``(outer, C, inner)`` C-contiguous arrays (see
``gpubn.backends.base``).  Normalization is memory-bound, so the code is built
around the number of times each array crosses main memory, the way a fused
kernel would be:

* The array is walked in **cache-sized tiles** (``_CHUNK`` elements, from the
  largest CPU cache; at least ``_MIN_TILES`` tiles on large inputs; rows too
  wide for a tile are cut into column blocks).  Every tile is read from memory
  once per pass; the few NumPy operations applied to it run on data that sits
  in the CPU's cache.  Tiles are large because each NumPy call has a fixed
  cost.  A training forward costs one read pass (statistics) plus one read +
  one write pass (normalize); a backward one read pass over ``x`` and ``dy``
  for the sums plus one for ``dx``.  PyTorch's CPU kernels read ``x`` twice
  for the statistics.
* **Statistics** are the sums of ``d = x - shift`` and ``d * d`` per channel,
  two reductions per tile: along rows (NCHW) as single-threaded BLAS dots
  (``vecdot``, on row segments of at most ``_ROW_SEG`` values, for which
  OpenBLAS starts none of its threads: they would spin on the cores the tile
  workers need), down columns
  (NC, channels-last) as ``np.add.reduce`` and ``einsum``.  Partial sums of a
  tile row segment or tile column are in the working dtype, added in float64.
  The shift is none for data that a small sample shows centred, else the
  sample's means; where ``(mean - shift)**2 / var`` still exceeds ``_REDO``
  the sums are taken again around the mean, so ``1e4 + N(0, 1)`` float32
  data keeps its variance to about 1e-6.
* Elementwise work uses ``out=`` into the output or one scratch block per
  thread; float16 is widened tile by tile.  Outputs come from a cache of
  reusable buffers, and outputs, scratch blocks and the per-channel vectors
  streamed alongside the tiles start at the page offset of the input, which
  keeps the loops clear of 4K aliasing (see ``host_cache``).
* ``y = x * a + b`` (two operations per tile) is used when every channel's
  ``|mean| * invstd`` is at most ``_FAST_RANGE``, where its rounding equals the
  centred form's; otherwise the data is centred on the float64 mean split as
  ``hi + lo`` (``x - hi`` is exact near the mean, ``lo`` is folded into the
  per-channel constants).  The backward sums and ``dx`` do the same.
* Tiles are spread over up to 4 threads (``GPUBN_NUM_THREADS``), the calling
  one included; NumPy releases the GIL, and each tile writes its own partial
  slots, so results do not depend on the thread count.

NaN or Inf in a channel's data make that channel's statistics NaN (an Inf-only
channel has an infinite mean), so in training every output of the channel is
NaN, as in PyTorch; in eval mode they stay confined to their own elements.
"""

from __future__ import annotations

import functools
import os
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from . import host_cache
from .base import Backend, ChannelStats, guard_skips, update_running


def _cache_chunk():
    """Elements per tile, from the size of the largest CPU cache: a 64th of
    it (the three or four tiles of one step and those of a second worker
    thread stay well inside it), between 2**16 and 2**20; 2**18 when the size
    is not known.  Measured on a 2-core EPYC (512 KiB L2 per core, 32 MiB
    L3): tiles of 2**18-2**19 elements run all four passes 1.5-3x faster than
    L2-sized tiles of 2**15, whose per-call costs dominate."""
    best = 0
    try:
        base = "/sys/devices/system/cpu/cpu0/cache"
        for idx in os.listdir(base):
            if not idx.startswith("index"):
                continue
            with open(os.path.join(base, idx, "size")) as f:
                text = f.read().strip().upper()
            mult = {"K": 1 << 10, "M": 1 << 20}.get(text[-1:], 1)
            best = max(best, int(text.rstrip("KM")) * mult)
    except (OSError, ValueError):
        best = 0
    if best <= 0:
        return 1 << 18
    return int(min(max(best // 64, 1 << 16), 1 << 20))


_CHUNK = _cache_chunk()  # elements per tile (a 32 MiB L3 gives 2**19)
_SMALL_CHUNK = 1 << 16   # tiles are never made smaller than this to get _MIN_TILES
_MIN_TILES = 8
_ROW_MIN = 64          # inner extent from which the row layout is used
_ROW_SEG = 8192        # rows layout: rows are cut into segments of at most this many values
_MIN_BLOCK_ROWS = 16   # column layout: fewer whole rows per tile -> column blocks of this many rows
_FOLD = 1024          # column layout: fold narrow rows to at least this many values
_FAST_RANGE = 8.0      # |mean| * invstd up to which x*scale + shift is used directly
_SAMPLE = 32           # values per channel in the sample that picks the statistics' shift
_REDO = 16.0           # (mean of x - shift)**2 / var above which the sums are redone


def _num_threads():
    env = os.environ.get("GPUBN_NUM_THREADS")
    if env:
        try:
            return max(1, int(env))
        except ValueError:
            pass
    return _CPU_THREADS


_CPU_THREADS = max(1, min(4, os.cpu_count() or 1))


_POOL = None
_POOL_LOCK = threading.Lock()


def _pool(n):
    """The shared worker pool, with at least ``n`` threads."""
    global _POOL
    with _POOL_LOCK:
        if _POOL is None or _POOL._max_workers < n:
            _POOL = ThreadPoolExecutor(max_workers=n, thread_name_prefix="gpubn")
        return _POOL


def _quiet(fn):
    """Non-finite data gives NaN/Inf results as in PyTorch, without NumPy's
    RuntimeWarnings."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with np.errstate(invalid="ignore", over="ignore", divide="ignore"):
            return fn(*args, **kwargs)
    return wrapper


def _sum(a, axis):
    """Sum of a tile along ``axis`` in its own dtype (a NumPy reduction)."""
    return np.add.reduce(a, axis=axis)


def _rowdot(a, b):
    """Dot products along the rows of a tile (``b``: a tile or one row).

    NumPy's ``vecdot`` makes one BLAS dot per row: about three times faster
    than ``np.add.reduce`` along rows, and single-threaded for rows of up to
    ``_ROW_SEG`` values (the layout never makes longer ones), so OpenBLAS
    starts none of its own threads, which would spin on the cores the tile
    workers need.  Longer rows (layer norm) and NumPy < 2 use ``einsum``."""
    if _HAS_VECDOT and a.shape[-1] <= _ROW_SEG:
        return np.vecdot(a, b)
    return np.einsum("ij,ij->i" if b.ndim == 2 else "ij,j->i", a, b)


def _coldot(a, b):
    """Dot products down the columns of two tiles (one fused NumPy loop)."""
    return np.einsum("ij,ij->j", a, b)


_HAS_VECDOT = hasattr(np, "vecdot")


def _work_dtype(dtype):
    return np.dtype(np.float64) if dtype == np.float64 else np.dtype(np.float32)


class _Layout:
    """How a canonical ``(outer, C, inner)`` array is cut into tiles.

    Row layout (``inner >= _ROW_MIN``): a 2-D view ``(outer*C, inner)``; row ``r``
    belongs to channel ``r % C``.  Column layout: a 2-D view
    ``(outer, C*inner)``; column ``j`` belongs to channel ``j // inner``.  Tiles
    are ``(r0, r1, c0, c1)`` rectangles of about ``_CHUNK`` elements, in memory
    order; ``rb``/``cb`` below index the tile grid.
    """

    def __init__(self, x3):
        outer, c, inner = shape = x3.shape
        # buffers streamed alongside x start at x's page offset
        self.offset = host_cache.page_offset(x3)
        self.outer, self.c, self.inner = outer, c, inner
        # at least _MIN_TILES tiles when the array is large enough, so that
        # the worker threads have work to share
        chunk = min(_CHUNK, max(_SMALL_CHUNK, outer * c * inner // _MIN_TILES))
        self.rows_mode = inner >= _ROW_MIN
        self.k = 1
        if self.rows_mode:     # runs of whole rows; a row longer than a tile is split
            R, W = outer * c, inner
            cs = min(W, chunk, _ROW_SEG)
            rs = max(1, chunk // cs)
        else:                  # blocks of rows; rows too wide for a tile are split
            R, W = outer, c * inner
            rs = max(1, chunk // W)
            if rs >= min(R, _MIN_BLOCK_ROWS):   # whole rows (contiguous tiles)
                cs = W
                # narrow rows are folded k at a time into rows of k*W values, so
                # that per-channel operands broadcast along long contiguous runs
                self.k = max(1, _FOLD // W)
                rs = -(-rs // self.k) * self.k
            else:              # column blocks of min(R, _MIN_BLOCK_ROWS) rows
                rs = min(R, _MIN_BLOCK_ROWS)
                cs = min(W, max(16, chunk // rs))
        self.shape2 = (R, W)
        self.rs, self.cs = min(rs, R), cs
        # row edges of the tiles; folded layouts end with the rows that do
        # not fill a fold, so every other tile folds (and its column sums add
        # at most rs/k values in the working dtype)
        whole = R - R % self.k
        self.edges = list(range(0, whole, self.rs)) + ([whole] if whole else [0])
        if R > whole:
            self.edges.append(R)
        self.nrb = len(self.edges) - 1
        self.ncb = -(-W // self.cs)

    def view(self, a3):
        return a3.reshape(self.shape2)

    def tiles(self):
        W = self.shape2[1]
        e = self.edges
        return [(rb, cb, e[rb], e[rb + 1], cb * self.cs, min(W, (cb + 1) * self.cs))
                for rb in range(self.nrb) for cb in range(self.ncb)]

    def per_channel(self, v, dtype):
        """A per-channel vector expanded for broadcasting against tiles:
        ``(outer*C, 1)`` (rows layout) or ``(k*C*inner,)`` (column layout)."""
        v = np.asarray(v, dtype=dtype)
        if self.rows_mode:     # a column of scalars, broadcast along each row
            out = host_cache.empty((self.outer, self.c), dtype, 0)
            out[...] = v
            return out.reshape(-1, 1)
        out = host_cache.empty((self.k, self.c, self.inner), dtype, self.offset)
        out[...] = v[:, None]
        return out.reshape(-1)

    def fold(self, r0, r1, *arrays):
        """Column layout: tiles whose row count is a multiple of k as
        ``(rows/k, k*W)`` views.  Returns ``(folded, arrays...)``."""
        if self.k > 1 and (r1 - r0) % self.k == 0:
            kw = self.k * self.shape2[1]
            return (True,) + tuple(a.reshape(-1, kw) for a in arrays)
        return (False,) + arrays

    def unfold(self, part, folded):
        """Sum the k column groups of a folded tile's per-column result."""
        if folded:
            return part.reshape(self.k, self.shape2[1]).sum(axis=0, dtype=np.float64)
        return part

    def channel_total(self, parts):
        """Per-channel float64 totals of per-tile partial sums: ``(R, ncb)``
        (rows layout) or ``(nrb, W)`` (column layout) arrays."""
        if self.rows_mode:
            return parts.sum(axis=1).reshape(self.outer, self.c).sum(axis=0)
        return parts.sum(axis=0).reshape(self.c, self.inner).sum(axis=1)

    def parts(self):
        """An empty float64 array for one partial sum per tile row or column."""
        R, W = self.shape2
        return host_cache.empty((R, self.ncb) if self.rows_mode else (self.nrb, W),
                                np.float64, 0)

    def store_sums(self, t, folded, s_a, s_ab, a, b, ones):
        """Tile ``t``'s partial sums of ``a`` into ``s_a`` and of ``a * b``
        into ``s_ab`` (see :meth:`parts`): BLAS dots along rows, a reduction
        and an ``einsum`` down columns.  ``ones``: at least a tile row of 1s."""
        rb, cb, r0, r1, c0, c1 = t
        if self.rows_mode:
            at = (slice(r0, r1), cb)
            s_a[at] = _rowdot(a, ones[:c1 - c0])
            s_ab[at] = _rowdot(a, b)
        else:
            at = (rb, slice(c0, c1))
            s_a[at] = self.unfold(_sum(a, 0), folded)
            s_ab[at] = self.unfold(_coldot(a, b), folded)

    def take(self, vec, r0, r1, c0, c1, folded=False):
        """The part of an expanded per-channel vector that matches a tile."""
        if self.rows_mode:
            return vec[r0:r1]
        return vec if folded else vec[c0:c1]

    def run(self, work, dtype):
        """Call ``work(tile, scratch)`` for every tile (see :func:`run_split`);
        each thread has its own scratch."""
        def run_group(group):
            scratch = host_cache.empty((self.rs, self.cs), dtype, self.offset)
            for t in group:
                work(t, scratch)

        run_split(self.tiles(), run_group)


def run_split(items, run_group):
    """Call ``run_group`` on consecutive groups of ``items``, one group per
    thread when there are enough items (NumPy and BLAS release the GIL); the
    calling thread takes the first group itself.  Every item writes to its
    own slots, so results do not depend on the thread count."""
    nthreads = min(_num_threads(), len(items) // 4)
    if nthreads <= 1:
        run_group(items)
        return
    size = -(-len(items) // nthreads)
    groups = [items[i:i + size] for i in range(0, len(items), size)]
    futures = [_pool(nthreads - 1).submit(run_group, g) for g in groups[1:]]
    run_group(groups[0])
    for f in futures:
        f.result()


def _chunk(a2, r0, r1, c0, c1, wdt):
    blk = a2[r0:r1, c0:c1]
    return blk if blk.dtype == wdt else blk.astype(wdt)


def _sample_shift(x3, wdt):
    """The shift the statistics' sums are taken around: ``None`` (none) when
    a sample of about ``_SAMPLE`` values per channel has every channel's mean
    within two standard deviations of zero, else the sample means rounded to
    ``wdt`` (0 where not finite).  The sample is a contiguous run from the
    middle of the rows of every 16th outer slice or fewer (the first one when
    there are fewer than 16), so it reads a small part of the array."""
    outer, _, inner = x3.shape
    n_outer = max(1, min(outer // 16, -(-_SAMPLE // inner)))
    run = min(inner, -(-_SAMPLE // n_outer))
    start = (inner - run) // 2
    sample = x3[::outer // n_outer, :, start:start + run]
    s = host_cache.empty(sample.shape, np.float64, 0)
    s[...] = sample
    count = s.shape[0] * s.shape[2]
    m = np.add.reduce(s, axis=(0, 2)) / count
    sq = np.add.reduce(np.multiply(s, s, out=s), axis=(0, 2)) / count      # mean of x**2
    return shift_rule(m, sq, wdt)


def shift_rule(m, sq, wdt):
    """From a sample's float64 means ``m`` and mean squares ``sq`` per group:
    None when every ``|m|`` is at most twice the sample's standard deviation
    (``5 m**2 <= 4 sq``), else ``m`` rounded to ``wdt`` (0 where not finite),
    as float64."""
    if np.all(5.0 * m * m <= 4.0 * sq):
        return None
    return np.where(np.isfinite(m), m, 0.0).astype(wdt).astype(np.float64)


def shifted_moments(sums, n, shift, wdt):
    """``(mean, m2, shift)`` in float64 per group from ``sums(shift)``, which
    returns the float64 sums of ``d = x - shift`` and ``d*d`` over ``n``
    values (``d = x`` for a None shift).  The rounding error of ``m2`` grows
    with ``(mean - shift)**2 / var``; where that exceeds ``_REDO`` (a sample
    unlike the rest of its group) the sums are taken once more around the
    mean just found.  Returns the shift of the sums used."""
    for _ in range(2):
        s1, s2 = sums(shift)
        d_mean = s1 / n
        m2 = s2 - s1 * d_mean
        base = 0.0 if shift is None else shift
        far = d_mean * d_mean > _REDO * m2 / n       # False where NaN
        if not far.any():
            break
        shift = np.where(far, np.asarray(base + d_mean).astype(wdt), base).astype(np.float64)
    np.maximum(m2, 0.0, out=m2, where=~np.isnan(m2))
    return base + d_mean, m2, base                   # an Inf-only group: mean Inf


def _shifted_sums(x3, lay, shift):
    """Per-channel ``(sum d, sum d*d)`` in float64 of ``d = x - shift``
    (``d = x`` when ``shift`` is None), from one read of ``x3``.  Each tile
    row segment (rows layout) or tile column (column layout) is summed in the
    working dtype; the partial sums are added in float64."""
    wdt = _work_dtype(x3.dtype)
    x2 = lay.view(x3)
    s1, s2 = lay.parts(), lay.parts()
    k_e = None if shift is None else lay.per_channel(shift, wdt)
    ones = np.ones(lay.cs, dtype=wdt)

    def work(t, scratch):
        _, _, r0, r1, c0, c1 = t
        f, d, sc = lay.fold(r0, r1, _chunk(x2, r0, r1, c0, c1, wdt),
                            scratch[:r1 - r0, :c1 - c0])
        if k_e is not None:
            d = np.subtract(d, lay.take(k_e, r0, r1, c0, c1, f), out=sc)
        lay.store_sums(t, f, s1, s2, d, d, ones)

    lay.run(work, wdt)
    return lay.channel_total(s1), lay.channel_total(s2)


def _moments(x3):
    """Per-channel ``(mean, m2)`` in float64, usually from one read of ``x3``.

    Sums of ``d`` and ``d*d`` for ``d = x - shift`` (:func:`_sample_shift`)
    give ``mean = shift + sum d / n`` and ``m2 = sum d*d - (sum d)**2 / n``,
    taken again around the mean where the sample misled
    (:func:`shifted_moments`), so the variance of ``1e4 + N(0, 1)`` float32
    data stays right to about 1e-6."""
    lay = _Layout(x3)
    wdt = _work_dtype(x3.dtype)
    n = x3.shape[0] * x3.shape[2]
    mean, m2, _ = shifted_moments(lambda shift: _shifted_sums(x3, lay, shift), n,
                                  _sample_shift(x3, wdt), wdt)
    return mean, m2


def _fast(mean, invstd):
    """Whether ``x*a + b`` forms (which round relative to ``|x|``) are as
    accurate as centred ones: every channel's ``|mean| * invstd`` is moderate."""
    with np.errstate(invalid="ignore", over="ignore"):
        r = np.abs(np.asarray(mean, np.float64)) * np.asarray(invstd, np.float64)
    return bool(np.all(r <= _FAST_RANGE))


def _split(mean, wdt):
    """``mean`` (float64) as ``hi + lo`` with ``hi`` in the working dtype: data
    near the mean minus ``hi`` is exact, and ``lo`` is folded into per-channel
    constants, so centring keeps the full precision of the mean."""
    mean = np.asarray(mean, np.float64)
    hi = mean.astype(wdt)
    with np.errstate(invalid="ignore"):
        lo = np.where(np.isfinite(hi), mean - hi, 0.0)
    return hi, lo


def _normalize(x3, mean, invstd, scale, shift):
    """``y = (x - mean) * scale + shift`` per channel: one read and one write
    of memory, the arithmetic on cache-resident tiles."""
    lay = _Layout(x3)
    wdt = _work_dtype(x3.dtype)
    x2 = lay.view(x3)
    y3 = host_cache.empty(x3.shape, x3.dtype, lay.offset)
    y2 = lay.view(y3)
    direct = x3.dtype == wdt
    shift = np.zeros_like(scale) if shift is None else shift
    if _fast(mean, invstd):       # y = x * scale + (shift - mean * scale)
        a_e = lay.per_channel(scale, wdt)
        b_e = lay.per_channel(shift - mean * scale, wdt)
        m_e = None
    else:                         # y = (x - m_hi) * scale + (shift - m_lo * scale)
        m_hi, m_lo = _split(mean, wdt)
        m_e = lay.per_channel(m_hi, wdt)
        a_e = lay.per_channel(scale, wdt)
        b_e = lay.per_channel(shift - m_lo * scale, wdt)

    def work(t, scratch):
        _, _, r0, r1, c0, c1 = t
        out2 = y2[r0:r1, c0:c1] if direct else scratch[:r1 - r0, :c1 - c0]
        f, blk, out = lay.fold(r0, r1, _chunk(x2, r0, r1, c0, c1, wdt), out2)
        if m_e is not None:
            np.subtract(blk, lay.take(m_e, r0, r1, c0, c1, f), out=out)
            blk = out
        np.multiply(blk, lay.take(a_e, r0, r1, c0, c1, f), out=out)
        np.add(out, lay.take(b_e, r0, r1, c0, c1, f), out=out)
        if not direct:
            y2[r0:r1, c0:c1] = out2

    lay.run(work, wdt)
    return y3


def _backward_sums(dy3, x3, mean, invstd):
    """Per-channel ``(sum dy, sum dy * (x - mean))`` in float64, one read of each."""
    lay = _Layout(x3)
    wdt = _work_dtype(x3.dtype)
    x2, dy2 = lay.view(x3), lay.view(dy3)
    fast = _fast(mean, invstd)     # sum dy*(x-mean) = sum dy*x - mean * sum dy
    m_hi, m_lo = _split(mean, wdt)
    m_e = None if fast else lay.per_channel(m_hi, wdt)
    sdy, sdx = lay.parts(), lay.parts()
    ones = np.ones(lay.cs, dtype=wdt)

    def work(t, scratch):
        _, _, r0, r1, c0, c1 = t
        f, blk, g, sc = lay.fold(r0, r1, _chunk(x2, r0, r1, c0, c1, wdt),
                                 _chunk(dy2, r0, r1, c0, c1, wdt),
                                 scratch[:r1 - r0, :c1 - c0])
        if m_e is not None:
            blk = np.subtract(blk, lay.take(m_e, r0, r1, c0, c1, f), out=sc)
        lay.store_sums(t, f, sdy, sdx, g, blk, ones)

    lay.run(work, wdt)
    sdy, sdx = lay.channel_total(sdy), lay.channel_total(sdx)
    # the tiles subtracted nothing (fast) or m_hi (centred): remove the rest
    sdx = sdx - (np.asarray(mean, np.float64) if fast else m_lo) * sdy
    return sdy, sdx


def _dx(dy3, x3, mean, invstd, k, c1, c0):
    """``dx = k * (dy - c0 - (x - mean) * c1)`` per channel; one pass over
    ``x``, ``dy`` and ``dx`` in memory."""
    lay = _Layout(x3)
    wdt = _work_dtype(x3.dtype)
    x2, dy2 = lay.view(x3), lay.view(dy3)
    dx3 = host_cache.empty(x3.shape, x3.dtype, lay.offset)
    dx2 = lay.view(dx3)
    direct = x3.dtype == wdt
    k_e, c1_e = lay.per_channel(k, wdt), lay.per_channel(c1, wdt)
    if _fast(mean, invstd):       # (x - mean) * c1 + c0 == x * c1 + (c0 - mean * c1)
        m_e, c0_e = None, lay.per_channel(c0 - mean * c1, wdt)
    else:                         # (x - m_hi) * c1 + (c0 - m_lo * c1)
        m_hi, m_lo = _split(mean, wdt)
        m_e, c0_e = lay.per_channel(m_hi, wdt), lay.per_channel(c0 - m_lo * c1, wdt)

    def work(t, scratch):
        _, _, r0, r1, c0_, c1_ = t
        out2 = dx2[r0:r1, c0_:c1_] if direct else scratch[:r1 - r0, :c1_ - c0_]
        f, blk, g, out = lay.fold(r0, r1, _chunk(x2, r0, r1, c0_, c1_, wdt),
                                  _chunk(dy2, r0, r1, c0_, c1_, wdt), out2)
        if m_e is not None:
            np.subtract(blk, lay.take(m_e, r0, r1, c0_, c1_, f), out=out)
            blk = out
        np.multiply(blk, lay.take(c1_e, r0, r1, c0_, c1_, f), out=out)
        np.add(out, lay.take(c0_e, r0, r1, c0_, c1_, f), out=out)
        np.subtract(g, out, out=out)
        np.multiply(out, lay.take(k_e, r0, r1, c0_, c1_, f), out=out)
        if not direct:
            dx2[r0:r1, c0_:c1_] = out2

    lay.run(work, wdt)
    return dx3


def _f64(v):
    return None if v is None else np.asarray(v, dtype=np.float64)


class NumpyBackend(Backend):
    name = "numpy"
    xp = np

    @_quiet
    def bn_stats(self, x3) -> ChannelStats:
        acc = _work_dtype(x3.dtype)
        mean, m2 = _moments(x3)
        return ChannelStats(count=x3.shape[0] * x3.shape[2], mean=mean.astype(acc),
                            m2=m2.astype(acc))

    @_quiet
    def bn_forward_train(self, x3, weight, bias, running_mean, running_var, momentum, eps,
                         skipped=None):
        acc = _work_dtype(x3.dtype)
        n = x3.shape[0] * x3.shape[2]
        mean, m2 = _moments(x3)
        invstd = 1.0 / np.sqrt(m2 / n + eps)
        scale = invstd if weight is None else invstd * _f64(weight)
        y3 = _normalize(x3, mean, invstd, scale, _f64(bias))
        unbiased = m2 / (n - 1)
        skip = None
        if skipped is not None:
            skip = guard_skips(np, mean, unbiased)
            skipped[...] = skip
        if running_mean is not None:
            update_running(running_mean, mean, momentum, skip)
        if running_var is not None:
            update_running(running_var, unbiased, momentum, skip)
        return y3, mean.astype(acc), invstd.astype(acc)

    @_quiet
    def bn_forward_eval(self, x3, weight, bias, running_mean, running_var, eps):
        acc = _work_dtype(x3.dtype)
        invstd = (1.0 / np.sqrt(_f64(running_var) + eps)).astype(acc)
        mean = np.array(running_mean, dtype=acc)
        return self.bn_apply(x3, mean, invstd, weight, bias), mean, invstd

    @_quiet
    def bn_apply(self, x3, mean, invstd, weight, bias):
        scale = _f64(invstd) if weight is None else _f64(invstd) * _f64(weight)
        return _normalize(x3, _f64(mean), _f64(invstd), scale, _f64(bias))

    @_quiet
    def bn_backward_reduce(self, dy3, x3, mean, invstd):
        acc = _work_dtype(x3.dtype)
        sdy, sdx = _backward_sums(dy3, x3, _f64(mean), _f64(invstd))
        return sdy.astype(acc), (sdx * _f64(invstd)).astype(acc)

    @_quiet
    def bn_backward_dx(self, dy3, x3, mean, invstd, weight, sum_dy, sum_dy_xhat, count):
        invstd = _f64(invstd)
        k = invstd if weight is None else invstd * _f64(weight)
        # dx = k * (dy - sum_dy/n - (x - mean) * invstd * sum_dy_xhat/n)
        return _dx(dy3, x3, _f64(mean), invstd, k, invstd * _f64(sum_dy_xhat) / count,
                   _f64(sum_dy) / count)

    @_quiet
    def bn_backward(self, dy3, x3, mean, invstd, weight, training):
        acc = _work_dtype(x3.dtype)
        invstd64, mean64 = _f64(invstd), _f64(mean)
        sdy, sdx = _backward_sums(dy3, x3, mean64, invstd64)
        sum_dy_xhat = sdx * invstd64
        k = invstd64 if weight is None else invstd64 * _f64(weight)
        if training:
            n = x3.shape[0] * x3.shape[2]
            dx3 = _dx(dy3, x3, mean64, invstd64, k, invstd64 * sum_dy_xhat / n, sdy / n)
        else:   # statistics held fixed: dx = dy * weight * invstd
            dx3 = (dy3 * k.astype(acc)[None, :, None]).astype(x3.dtype, copy=False)
        return dx3, sum_dy_xhat.astype(acc), sdy.astype(acc)

    # -- layer norm (implemented in gpubn.backends.numpy_layer_norm) ------
    def ln_forward(self, x2, weight, bias, eps):
        from .numpy_layer_norm import ln_forward
        return ln_forward(x2, weight, bias, eps)

    def ln_backward(self, dy2, x2, mean, rstd, weight, want_grads):
        from .numpy_layer_norm import ln_backward
        return ln_backward(dy2, x2, mean, rstd, weight, want_grads)
