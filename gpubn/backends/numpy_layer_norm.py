"""Layer norm for the NumPy backend (the CPU fallback and the reference the
kernel backends are tested against).

Rows of a C-contiguous ``(rows, n)`` array are processed in blocks of about
``_CHUNK`` elements, so the several NumPy operations on a block run on data
in the CPU cache: the forward reads ``x`` once and writes ``y`` once; the
backward reads ``x`` and ``dy`` once and writes ``dx`` once.

Statistics are shifted two-pass per row: a first row mean ``m0``, then
``d = x - m0`` and ``var = (sum d^2 - (sum d)^2 / n) / n``, which corrects the
rounding of ``m0`` and never forms ``E[x^2] - E[x]^2``.  float16 is widened
to float32 block by block; float32 and float64 are computed in their own
precision (row and column sums by BLAS matrix-vector products), with the
corrections and the sums of ``dweight`` / ``dbias`` across blocks in float64.
"""

from __future__ import annotations

import numpy as np

_CHUNK = 1 << 16


def _work_dtype(dtype):
    return np.dtype(np.float64) if dtype == np.float64 else np.dtype(np.float32)


def _blocks(rows: int, n: int):
    step = max(1, _CHUNK // n)
    for s in range(0, rows, step):
        yield s, min(s + step, rows)


def _rowdot(a, b):
    """Dot products of matching rows (BLAS where NumPy has vecdot)."""
    vecdot = getattr(np, "vecdot", None)
    return vecdot(a, b, axis=-1) if vecdot is not None else np.einsum("ij,ij->i", a, b)


def _centered(blk, n, ones, out):
    """``(d, m0, mean, m2)``: the block centred on its first row means ``m0``
    (into ``out``), the corrected row means and sums of squared deviations
    (float64).  Row sums are matrix-vector products (BLAS)."""
    m0 = (blk @ ones) / blk.dtype.type(n)
    d = np.subtract(blk, m0[:, None], out=out)
    s1 = (d @ ones).astype(np.float64)
    s2 = _rowdot(d, d).astype(np.float64)
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
    ones = np.ones(n, dtype=wdt)
    direct = x2.dtype == wdt     # work in y's own memory, else in a scratch block
    scratch = None if direct else np.empty((min(max(1, _CHUNK // n), rows), n), dtype=wdt)
    with np.errstate(invalid="ignore", over="ignore", divide="ignore"):
        for s, e in _blocks(rows, n):
            blk = x2[s:e].astype(wdt, copy=False)
            d, m0, mean, m2 = _centered(blk, n, ones, y2[s:e] if direct else scratch[:e - s])
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
    return y2, mean_out, rstd_out


def ln_backward(dy2, x2, mean, rstd, weight, want_grads):
    rows, n = x2.shape
    wdt = _work_dtype(x2.dtype)
    dx2 = np.empty_like(x2)
    w = None if weight is None else np.asarray(weight, dtype=wdt)
    dweight = np.zeros(n, dtype=np.float64) if want_grads else None
    dbias = np.zeros(n, dtype=np.float64) if want_grads else None
    ones_n = np.ones(n, dtype=wdt)
    ones_r = np.ones(min(rows, max(1, _CHUNK // n)), dtype=wdt)
    with np.errstate(invalid="ignore", over="ignore", divide="ignore"):
        for s, e in _blocks(rows, n):
            rs = np.asarray(rstd[s:e], dtype=wdt)[:, None]
            xhat = x2[s:e].astype(wdt) - np.asarray(mean[s:e], dtype=wdt)[:, None]
            xhat *= rs
            dy = dy2[s:e].astype(wdt, copy=False)
            g = dy * w if w is not None else dy.copy()
            c1 = ((g @ ones_n).astype(np.float64) / n).astype(wdt)[:, None]
            c2 = (_rowdot(g, xhat).astype(np.float64) / n).astype(wdt)[:, None]
            if want_grads:   # column sums over the block's rows (BLAS), in float64 across blocks
                o = ones_r[:e - s]
                dbias += o @ dy
                dweight += o @ (dy * xhat)
            # dx = rstd * (g - c1 - xhat * c2), in place in g
            g -= c1
            xhat *= c2
            g -= xhat
            g *= rs
            dx2[s:e] = g
    if not want_grads:
        return dx2, None, None
    return dx2, dweight.astype(wdt), dbias.astype(wdt)


__all__ = ["ln_forward", "ln_backward"]
