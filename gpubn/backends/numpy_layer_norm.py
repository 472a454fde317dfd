"""Layer norm for the NumPy backend (the CPU fallback and the reference the
kernel backends are tested against).

Rows of a C-contiguous ``(rows, n)`` array are processed in blocks of whole
rows (the NumPy backend's tile size, at least 8 blocks on large inputs), so
the several NumPy operations on a block run on data in the CPU cache: the
forward reads ``x`` once and writes ``y`` once; the backward reads ``x`` and
``dy`` once and writes ``dx`` once.  Blocks are spread over the NumPy
backend's worker threads; each block writes its own rows and its own partial
``dweight`` / ``dbias``, summed in block order, so results do not depend on
the thread count.

Statistics come from two BLAS dots per row (sum of ``d`` and of ``d * d``
for ``d = x - shift``), with the shift picked as the NumPy backend picks it
for batch norm: none when a sample of each row is centred, else the sample
means, and a second pass around the mean for rows where the sample misled.
float16 is widened to float32 block by block; float32 and float64 are
computed in their own precision, with the corrections and the sums of
``dweight`` / ``dbias`` across blocks in float64.
"""

from __future__ import annotations

import numpy as np

from . import host_cache
from . import numpy_backend as _nb

_CHUNK = None   # elements per block; None: the NumPy backend's tile size


def _blocks(rows: int, n: int):
    chunk = _CHUNK
    if chunk is None:
        chunk = min(_nb._CHUNK, max(_nb._SMALL_CHUNK, rows * n // _nb._MIN_TILES))
    step = max(1, chunk // n)
    return [(s, min(s + step, rows)) for s in range(0, rows, step)]


def _run(blocks, work, x2):
    """``work(i, s, e, scratch)`` for every block, on the NumPy backend's
    worker threads when there are enough blocks (NumPy releases the GIL);
    ``scratch(name, shape, dtype)`` gives a per-thread buffer at the page
    offset of ``x2`` (see :mod:`host_cache`)."""
    offset = host_cache.page_offset(x2)

    def run_group(group):
        bufs = {}

        def scratch(name, shape, dtype):
            buf = bufs.get(name)
            if buf is None or buf.shape[0] < shape[0]:
                buf = bufs[name] = host_cache.empty(shape, dtype, offset)
            return buf[:shape[0]]

        for i, (s, e) in group:
            work(i, s, e, scratch)

    _nb.run_split(list(enumerate(blocks)), run_group)


def _row_vector(v, dtype, x2):
    """A per-column vector (weight or bias) as ``dtype``, copied to the page
    offset of ``x2``: it is streamed alongside every row."""
    if v is None:
        return None
    out = host_cache.empty((x2.shape[1],), dtype, host_cache.page_offset(x2))
    out[...] = v
    return out


def _row_shift(blk):
    """Per-row shift for the sums (the NumPy backend's ``shift_rule``) from a
    strided sample of about 32 values of every row."""
    s = blk[:, ::max(1, blk.shape[1] // 32)].astype(np.float64)
    return _nb.shift_rule(s.mean(axis=1), np.einsum("ij,ij->i", s, s) / s.shape[1],
                          blk.dtype)


def _row_moments(blk, n, out):
    """``(d, shift, mean, m2)`` of a block's rows from two BLAS row dots:
    ``d`` is the block minus ``shift`` (into ``out``; the block itself when
    there is no shift), ``shift``, ``mean`` and ``m2`` are float64."""
    ones = np.ones(n, dtype=blk.dtype)
    d = blk

    def sums(shift):
        nonlocal d
        d = blk if shift is None else np.subtract(blk, shift.astype(blk.dtype)[:, None],
                                                  out=out)
        return _nb._rowdot(d, ones).astype(np.float64), _nb._rowdot(d, d).astype(np.float64)

    mean, m2, base = _nb.shifted_moments(sums, n, _row_shift(blk), blk.dtype)
    return d, base, mean, m2


def ln_forward(x2, weight, bias, eps):
    rows, n = x2.shape
    wdt = _nb._work_dtype(x2.dtype)
    y2 = host_cache.empty(x2.shape, x2.dtype, host_cache.page_offset(x2))
    mean_out = np.empty(rows, dtype=wdt)
    rstd_out = np.empty(rows, dtype=wdt)
    w, b = _row_vector(weight, wdt, x2), _row_vector(bias, wdt, x2)
    direct = x2.dtype == wdt     # work in y's own memory, else in a scratch block

    def work(i, s, e, scratch):
        blk = x2[s:e].astype(wdt, copy=False)
        out = y2[s:e] if direct else scratch("y", blk.shape, wdt)
        d, base, mean, m2 = _row_moments(blk, n, out)
        rstd = 1.0 / np.sqrt(m2 / n + eps)
        # y = (d - (mean - shift)) * rstd * w + b
        np.multiply(d, rstd.astype(wdt)[:, None], out=out)
        out += (-(mean - base) * rstd).astype(wdt)[:, None]
        if w is not None:
            out *= w
        if b is not None:
            out += b
        if not direct:
            y2[s:e] = out
        mean_out[s:e] = mean
        rstd_out[s:e] = rstd

    with np.errstate(invalid="ignore", over="ignore", divide="ignore"):
        _run(_blocks(rows, n), work, x2)
    return y2, mean_out, rstd_out


def ln_backward(dy2, x2, mean, rstd, weight, want_grads):
    rows, n = x2.shape
    wdt = _nb._work_dtype(x2.dtype)
    dx2 = host_cache.empty(x2.shape, x2.dtype, host_cache.page_offset(x2))
    w = _row_vector(weight, wdt, x2)
    blocks = _blocks(rows, n)
    part_w = [None] * len(blocks)     # per-block column sums, added in block order
    part_b = [None] * len(blocks)
    ones = np.ones(n, dtype=wdt)
    direct = x2.dtype == wdt

    def work(i, s, e, scratch):
        rs = np.asarray(rstd[s:e], dtype=wdt)[:, None]
        x = x2[s:e].astype(wdt, copy=False)
        dy = dy2[s:e].astype(wdt, copy=False)
        xhat = np.subtract(x, np.asarray(mean[s:e], dtype=wdt)[:, None],
                           out=scratch("xhat", x.shape, wdt))
        xhat *= rs
        g = dy if w is None else np.multiply(dy, w, out=scratch("g", x.shape, wdt))
        c1 = (_nb._rowdot(g, ones).astype(np.float64) / n).astype(wdt)[:, None]
        c2 = (_nb._rowdot(g, xhat).astype(np.float64) / n).astype(wdt)[:, None]
        if want_grads:   # column sums over the block's rows, in float64 across blocks
            part_b[i] = _nb._sum(dy, 0).astype(np.float64)
            part_w[i] = _nb._coldot(dy, xhat).astype(np.float64)
        # dx = rstd * (g - c1 - xhat * c2)
        out = dx2[s:e] if direct else scratch("dx", x.shape, wdt)
        xhat *= c2
        np.subtract(g, xhat, out=out)
        out -= c1
        out *= rs
        if not direct:
            dx2[s:e] = out

    with np.errstate(invalid="ignore", over="ignore", divide="ignore"):
        _run(blocks, work, x2)
    if not want_grads:
        return dx2, None, None
    dweight = np.zeros(n, dtype=np.float64)
    dbias = np.zeros(n, dtype=np.float64)
    for pw, pb in zip(part_w, part_b):
        dweight += pw
        dbias += pb
    return dx2, dweight.astype(wdt), dbias.astype(wdt)


__all__ = ["ln_forward", "ln_backward"]
