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

Statistics are shifted two-pass per row: a first row mean ``m0``, then
``d = x - m0`` and ``var = (sum d^2 - (sum d)^2 / n) / n``, which corrects the
rounding of ``m0`` and never forms ``E[x^2] - E[x]^2``.  float16 is widened
to float32 block by block; float32 and float64 are computed in their own
precision (NumPy reductions, pairwise along rows; not BLAS, whose threads
would spin on the cores the workers need), with the corrections and the sums
of ``dweight`` / ``dbias`` across blocks in float64.
"""

from __future__ import annotations

import numpy as np

from . import numpy_backend as _nb

_CHUNK = None   # elements per block; None: the NumPy backend's tile size


def _work_dtype(dtype):
    return np.dtype(np.float64) if dtype == np.float64 else np.dtype(np.float32)


def _blocks(rows: int, n: int):
    chunk = _CHUNK
    if chunk is None:
        chunk = min(_nb._CHUNK, max(_nb._SMALL_CHUNK, rows * n // _nb._MIN_TILES))
    step = max(1, chunk // n)
    return [(s, min(s + step, rows)) for s in range(0, rows, step)]


def _run(blocks, work):
    """``work(i, s, e)`` for every block, on the NumPy backend's worker
    threads when there are enough blocks (NumPy releases the GIL)."""
    def run_group(group):
        for i, (s, e) in group:
            work(i, s, e)

    _nb.run_split(list(enumerate(blocks)), run_group)


def _sum(a, axis):
    return np.add.reduce(a, axis=axis)


def _rowdot(a, b):
    """Row dot products: NumPy's vecdot (one single-threaded BLAS dot per row)
    for rows of up to 8192 values; beyond that OpenBLAS would thread the dot,
    so a product and a pairwise sum."""
    if a.shape[1] <= 8192 and hasattr(np, "vecdot"):
        return np.vecdot(a, b, axis=-1)
    return _sum(a * b, 1)


def _rowsq(d):
    return _rowdot(d, d)


def _centered(blk, n, out):
    """``(d, m0, mean, m2)``: the block centred on its first row means ``m0``
    (into ``out``), the corrected row means and sums of squared deviations
    (float64)."""
    m0 = _sum(blk, 1) / blk.dtype.type(n)
    d = np.subtract(blk, m0[:, None], out=out)
    s1 = _sum(d, 1).astype(np.float64)
    s2 = _rowsq(d).astype(np.float64)
    mean = np.where(np.isfinite(m0), m0.astype(np.float64) + s1 / n, m0)
    m2 = np.maximum(s2 - s1 * s1 / n, 0.0)
    return d, m0, mean, m2


def ln_forward(x2, weight, bias, eps):
    rows, n = x2.shape
    wdt = _work_dtype(x2.dtype)
    y2 = np.empty_like(x2)
    mean_out = np.empty(rows, dtype=wdt)
    rstd_out = np.empty(rows, dtype=wdt)
    w = None if weight is None else np.asarray(weight, dtype=wdt)
    b = None if bias is None else np.asarray(bias, dtype=wdt)
    direct = x2.dtype == wdt     # work in y's own memory, else in a scratch block

    def work(i, s, e):
        blk = x2[s:e].astype(wdt, copy=False)
        d, m0, mean, m2 = _centered(blk, n, y2[s:e] if direct else np.empty(blk.shape, wdt))
        rstd = 1.0 / np.sqrt(m2 / n + eps)
        # y = (d - (mean - m0)) * rstd * w + b, in place in d
        d -= (mean - m0).astype(wdt)[:, None]
        d *= rstd.astype(wdt)[:, None]
        if w is not None:
            d *= w
        if b is not None:
            d += b
        if not direct:
            y2[s:e] = d
        mean_out[s:e] = mean
        rstd_out[s:e] = rstd

    with np.errstate(invalid="ignore", over="ignore", divide="ignore"):
        _run(_blocks(rows, n), work)
    return y2, mean_out, rstd_out


def ln_backward(dy2, x2, mean, rstd, weight, want_grads):
    rows, n = x2.shape
    wdt = _work_dtype(x2.dtype)
    dx2 = np.empty_like(x2)
    w = None if weight is None else np.asarray(weight, dtype=wdt)
    blocks = _blocks(rows, n)
    part_w = [None] * len(blocks)     # per-block column sums, added in block order
    part_b = [None] * len(blocks)

    def work(i, s, e):
        rs = np.asarray(rstd[s:e], dtype=wdt)[:, None]
        xhat = x2[s:e].astype(wdt) - np.asarray(mean[s:e], dtype=wdt)[:, None]
        xhat *= rs
        dy = dy2[s:e].astype(wdt, copy=False)
        g = dy * w if w is not None else dy.copy()
        c1 = (_sum(g, 1).astype(np.float64) / n).astype(wdt)[:, None]
        c2 = (_rowdot(g, xhat).astype(np.float64) / n).astype(wdt)[:, None]
        if want_grads:   # column sums over the block's rows, in float64 across blocks
            part_b[i] = _sum(dy, 0).astype(np.float64)
            part_w[i] = _sum(dy * xhat, 0).astype(np.float64)
        # dx = rstd * (g - c1 - xhat * c2), in place in g
        g -= c1
        xhat *= c2
        g -= xhat
        g *= rs
        dx2[s:e] = g

    with np.errstate(invalid="ignore", over="ignore", divide="ignore"):
        _run(blocks, work)
    if not want_grads:
        return dx2, None, None
    dweight = np.zeros(n, dtype=np.float64)
    dbias = np.zeros(n, dtype=np.float64)
    for pw, pb in zip(part_w, part_b):
        dweight += pw
        dbias += pb
    return dx2, dweight.astype(wdt), dbias.astype(wdt)


__all__ = ["ln_forward", "ln_backward"]
