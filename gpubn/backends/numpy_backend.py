"""NumPy backend: the reference every other backend is tested against, and the
CPU fallback when Numba (the ``cpu`` backend) is not installed.

The textbook formulas, written to be checked against the derivation rather
than to be fast.  Every method takes canonical ``(outer, C, inner)`` arrays
(see ``gpubn.backends.base``); a channel's ``m = outer * inner`` values lie
along axes 0 and 2.  All arithmetic is in float64; results are rounded once
to the storage dtype (outputs) or to the accumulation dtype (per-channel
vectors: float32 for float16 / bfloat16 / float32 data, float64 for float64).

Batch norm, per channel, over its m values::

    mean   = sum(x) / m
    m2     = sum((x - mean)**2)             (two passes, corrected: stable for any mean)
    invstd = 1 / sqrt(m2 / m + eps)         (biased variance)
    xhat   = (x - mean) * invstd
    y      = weight * xhat + bias
    running_mean <- (1 - momentum) * running_mean + momentum * mean
    running_var  <- (1 - momentum) * running_var  + momentum * m2 / (m - 1)

Backward, from ``y = weight * xhat + bias`` with mean and invstd functions of
x (training) or constants (eval)::

    dbias   = sum(dy)
    dweight = sum(dy * xhat)
    dx      = weight * invstd * (dy - dbias / m - xhat * dweight / m)   (training)
    dx      = weight * invstd * dy                                      (eval)

Layer norm is the same with the roles of the axes swapped: statistics per
row of a ``(rows, n)`` array, weight and bias per column.

NaN or Inf in a channel's data make its statistics NaN (an Inf-only channel
has an infinite mean), so in training every output of that channel is NaN,
as in PyTorch; in eval mode they stay confined to their own elements.  No
RuntimeWarning is raised for them.
"""

from __future__ import annotations

import functools

import numpy as np

from .._validation import acc_dtype
from .base import HostBackend, host_eval_constants, host_forward_train, into, quiet

_F64 = np.float64
_CH = (0, 2)          # the axes of one channel's values in a canonical array


def _quiet(fn):
    """Non-finite data gives NaN/Inf results as in PyTorch, without NumPy's
    RuntimeWarnings."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with quiet():
            return fn(*args, **kwargs)
    return wrapper


def _f64(v):
    """A per-channel vector (or None) as float64."""
    return None if v is None else np.asarray(v, dtype=_F64)


def _bcast(v):
    """A per-channel vector shaped to broadcast against ``(outer, C, inner)``."""
    return v[None, :, None]


def _corrected_two_pass(d, m, axes, mean):
    """Chan, Golub and LeVeque's corrected two-pass step: from deviations ``d``
    of ``m`` values from a first ``mean``, ``m2 = sum d**2 - (sum d)**2 / m``
    and the mean moved by ``sum d / m`` (what the first pass rounded off; an
    infinite mean stays as it is)."""
    c = d.sum(axis=axes)
    return mean + np.where(np.isfinite(c), c / m, 0.0), (d * d).sum(axis=axes) - c * c / m


def _moments(x3):
    """Per-channel ``(mean, m2)`` in float64: the mean, then the squared
    deviations from it (corrected two-pass)."""
    x = x3.astype(_F64)
    m = x3.shape[0] * x3.shape[2]
    mean = x.sum(axis=_CH) / m
    return _corrected_two_pass(x - _bcast(mean), m, _CH, mean)


def _affine(x3, mean, invstd, weight, bias):
    """``y = weight * (x - mean) * invstd + bias`` in float64, rounded to x's dtype."""
    scale = invstd if weight is None else invstd * weight
    # "+ 0.0" without a bias as with one: -0 * scale + 0 is +0
    y = (x3.astype(_F64) - _bcast(mean)) * _bcast(scale) + (0.0 if bias is None else _bcast(bias))
    return y.astype(x3.dtype)


def _backward_sums(dy3, x3, mean, invstd):
    """Per-channel ``(sum dy, sum dy * xhat)`` in float64."""
    dy = dy3.astype(_F64)
    xhat = (x3.astype(_F64) - _bcast(mean)) * _bcast(invstd)
    return dy.sum(axis=_CH), np.einsum("ocj,ocj->c", dy, xhat)


def _dx(dy3, x3, mean, invstd, weight, sum_dy, sum_dy_xhat, m):
    """Training dx = weight*invstd*(dy - sum_dy/m - xhat*sum_dy_xhat/m)."""
    k = invstd if weight is None else invstd * weight
    xhat = (x3.astype(_F64) - _bcast(mean)) * _bcast(invstd)
    dx = (dy3.astype(_F64) - _bcast(sum_dy / m) - xhat * _bcast(sum_dy_xhat / m)) * _bcast(k)
    return dx.astype(x3.dtype)


class NumpyBackend(HostBackend):
    name = "numpy"

    @_quiet
    def moments(self, x3):
        return _moments(x3)

    @_quiet
    def bn_forward_train(self, x3, weight, bias, running_mean, running_var, momentum, eps,
                         skipped=None, out=None):
        return host_forward_train(
            x3, _moments,
            lambda mean, invstd: into(out, _affine(x3, mean, invstd, _f64(weight), _f64(bias))),
            eps, running_mean, running_var, momentum, skipped)

    @_quiet
    def bn_forward_eval(self, x3, weight, bias, running_mean, running_var, eps, out=None):
        mean, invstd = host_eval_constants(x3, running_mean, running_var, eps)
        return into(out, self.bn_apply(x3, mean, invstd, weight, bias)), mean, invstd

    @_quiet
    def bn_apply(self, x3, mean, invstd, weight, bias):
        return _affine(x3, _f64(mean), _f64(invstd), _f64(weight), _f64(bias))

    @_quiet
    def bn_backward_reduce(self, dy3, x3, mean, invstd):
        acc = acc_dtype(x3.dtype)
        sum_dy, sum_dy_xhat = _backward_sums(dy3, x3, _f64(mean), _f64(invstd))
        return sum_dy.astype(acc), sum_dy_xhat.astype(acc)

    @_quiet
    def bn_backward_dx(self, dy3, x3, mean, invstd, weight, sum_dy, sum_dy_xhat, count):
        return _dx(dy3, x3, _f64(mean), _f64(invstd), _f64(weight), _f64(sum_dy),
                   _f64(sum_dy_xhat), count)

    @_quiet
    def bn_backward(self, dy3, x3, mean, invstd, weight, training, out=None):
        acc = acc_dtype(x3.dtype)
        mean, invstd, weight = _f64(mean), _f64(invstd), _f64(weight)
        sum_dy, sum_dy_xhat = _backward_sums(dy3, x3, mean, invstd)
        if training:
            dx3 = _dx(dy3, x3, mean, invstd, weight, sum_dy, sum_dy_xhat,
                      x3.shape[0] * x3.shape[2])
        else:   # statistics held fixed
            k = invstd if weight is None else invstd * weight
            dx3 = (dy3.astype(_F64) * _bcast(k)).astype(x3.dtype)
        return into(out, dx3), sum_dy_xhat.astype(acc), sum_dy.astype(acc)

    # -- layer norm: statistics per row, weight and bias per column --------
    @_quiet
    def ln_forward(self, x2, weight, bias, eps, out=None):
        acc = acc_dtype(x2.dtype)
        x = x2.astype(_F64)
        n = x2.shape[1]
        first = x.mean(axis=1)
        mean, m2 = _corrected_two_pass(x - first[:, None], n, 1, first)
        rstd = 1.0 / np.sqrt(m2 / n + eps)
        y = (x - mean[:, None]) * rstd[:, None]
        if weight is not None:
            y *= _f64(weight)
        y += 0.0 if bias is None else _f64(bias)
        return into(out, y.astype(x2.dtype)), mean.astype(acc), rstd.astype(acc)

    @_quiet
    def ln_backward(self, dy2, x2, mean, rstd, weight, want_grads, out=None):
        acc = acc_dtype(x2.dtype)
        rstd = _f64(rstd)[:, None]
        dy = dy2.astype(_F64)
        xhat = (x2.astype(_F64) - _f64(mean)[:, None]) * rstd
        g = dy if weight is None else dy * _f64(weight)
        dx = rstd * (g - g.mean(axis=1, keepdims=True)
                     - xhat * np.einsum("rj,rj->r", g, xhat)[:, None] / x2.shape[1])
        dx = into(out, dx.astype(x2.dtype))
        if not want_grads:
            return dx, None, None
        return (dx, np.einsum("rj,rj->j", dy, xhat).astype(acc),
                dy.sum(axis=0).astype(acc))
