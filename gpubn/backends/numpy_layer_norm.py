"""Layer norm for the NumPy backend (the CPU fallback and the reference the
kernel backends are tested against).

Rows of a C-contiguous ``(rows, n)`` array are processed in blocks of about
``_CHUNK`` elements, so the several NumPy operations on a block run on data
in the CPU cache: the forward reads ``x`` once and writes ``y`` once; the
backward reads ``x`` and ``dy`` once and writes ``dx`` once.

Statistics are shifted two-pass per row: the row mean ``m0`` (pairwise sums),
then ``d = x - m0`` and ``var = (sum d^2 - (sum d)^2 / n) / n``, which corrects
the rounding of ``m0`` and never forms ``E[x^2] - E[x]^2``.  float16 is widened
to float32 block by block; float32 and float64 are computed in their own
precision, with per-row and column sums of ``dweight`` / ``dbias`` in float64.
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


def _centered(blk, n, wdt):
    """``(d, mean, rstd_parts)``: the block centred on its row means, the row
    means (float64) and the corrected sums of squared deviations (float64)."""
    m0 = blk.mean(axis=1, dtype=wdt)
    d = blk - m0[:, None]
    s1 = d.sum(axis=1, dtype=np.float64)
    s2 = np.einsum("ij,ij->i", d, d, dtype=np.float64) if wdt == np.float64 else \
        np.einsum("ij,ij->i", d, d).astype(np.float64)
    mean = m0.astype(np.float64) + s1 / n
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
    with np.errstate(invalid="ignore", over="ignore", divide="ignore"):
        for s, e in _blocks(rows, n):
            blk = x2[s:e].astype(wdt, copy=False)
            d, m0, mean, m2 = _centered(blk, n, wdt)
            rstd = 1.0 / np.sqrt(m2 / n + eps)
            # d was centred on m0; shift by the correction (mean - m0) in place
            d -= (mean - m0).astype(wdt)[:, None]
            d *= rstd.astype(wdt)[:, None]
            if w is not None:
                d *= w
            if b is not None:
                d += b
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
    with np.errstate(invalid="ignore", over="ignore", divide="ignore"):
        for s, e in _blocks(rows, n):
            rs = np.asarray(rstd[s:e], dtype=wdt)[:, None]
            xhat = x2[s:e].astype(wdt) - np.asarray(mean[s:e], dtype=wdt)[:, None]
            xhat *= rs
            dy = dy2[s:e].astype(wdt, copy=False)
            if want_grads:
                dweight += np.einsum("ij,ij->j", dy, xhat, dtype=np.float64) \
                    if wdt == np.float64 else np.einsum("ij,ij->j", dy, xhat)
                dbias += dy.sum(axis=0, dtype=np.float64)
            g = dy * w if w is not None else dy.copy()
            c1 = (g.sum(axis=1, dtype=np.float64) / n).astype(wdt)[:, None]
            c2 = (np.einsum("ij,ij->i", g, xhat).astype(np.float64) / n).astype(wdt)[:, None]
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
