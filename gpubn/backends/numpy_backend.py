"""NumPy backend: the CPU fallback and the reference for every other backend.

All methods take canonical ``(outer, C, inner)`` C-contiguous arrays (see
``gpubn.backends.base``).  The code is written for speed with plain NumPy:

* reductions run as ``np.add.reduce`` / ``np.einsum`` over axes ``(0, 2)`` of the
  canonical view, which walks memory in order and never materializes a
  transposed copy;
* the output buffer doubles as scratch space (the centred input is written
  into it, then scaled in place), so a training forward allocates one array;
* float32 data is processed in float32; accuracy comes from centring, not
  from wider arithmetic: the variance is the two-pass (shifted) formula
  ``M2 = sum(d**2) - sum(d)**2 / n`` with ``d = x - mean0`` and ``mean0`` a first
  estimate of the mean, and row partial sums are added in float64.  This is
  exact to rounding for data far from zero (``1e4 + N(0, 1)``), unlike
  ``E[x**2] - E[x]**2``;
* float16 data is widened to float32 once and computed in float32.

NaN or Inf in a channel's data make that channel's statistics NaN (training)
and so every output of the channel NaN, as in PyTorch; in eval mode, where the
statistics are fixed, they stay confined to their own elements.
"""

from __future__ import annotations

import functools

import numpy as np

from .base import Backend, ChannelStats

_ROW_MIN = 256          # inner extent from which per-row reductions are used
_BLOCK = 4096           # rows per float32 partial sum in column reductions
_vecdot = getattr(np, "vecdot", None)


def _work(x3):
    """float16 -> float32 copy; float32/float64 pass through."""
    if x3.dtype == np.float16:
        return x3.astype(np.float32)
    return x3


def _chan(v):
    """Per-channel vector as a broadcastable (1, C, 1) view."""
    return v.reshape(1, -1, 1)


def _quiet(fn):
    """Non-finite data gives NaN/Inf results as in PyTorch, without NumPy's
    RuntimeWarnings."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with np.errstate(invalid="ignore", over="ignore", divide="ignore"):
            return fn(*args, **kwargs)
    return wrapper


def _rowdot(a2, b2):
    """Dot product of matching rows of two 2-D arrays (BLAS where NumPy has it)."""
    if _vecdot is not None:
        return _vecdot(a2, b2, axis=-1)
    return np.einsum("ij,ij->i", a2, b2)


def _channel_reduce(a, b=None):
    """Per-channel sum of ``a`` (``b is None``) or of ``a * b``, in float64.

    Every partial sum runs over at most a row (``inner`` contiguous values) or
    a block of ``_BLOCK`` rows in the array's own dtype, and the partials are
    added in float64: float32 rounding grows with the block, not with the
    channel's element count.  Large contiguous rows (NCHW with big H*W) are
    reduced per row; small ones (NC, channels-last, small H*W) column-wise, so
    that every pass reads memory in order with vectorized inner loops.
    """
    outer, c, inner = a.shape
    if inner >= _ROW_MIN:
        a2 = a.reshape(outer * c, inner)
        if b is None:
            part = a2 @ np.ones(inner, dtype=a.dtype)
        else:
            part = _rowdot(a2, b.reshape(outer * c, inner))
        return np.add.reduce(part.reshape(outer, c), axis=0, dtype=np.float64)
    width = c * inner
    a2 = a.reshape(outer, width)
    b2 = None if b is None else b.reshape(outer, width)
    total = np.zeros(width, dtype=np.float64)
    ones = np.ones(min(outer, _BLOCK), dtype=a.dtype)
    for s in range(0, outer, _BLOCK):
        blk = a2[s:s + _BLOCK]
        if b2 is None:
            part = (ones if blk.shape[0] == ones.shape[0] else ones[:blk.shape[0]]) @ blk
        else:
            part = np.einsum("ij,ij->j", blk, b2[s:s + _BLOCK])
        total += part
    return total if inner == 1 else total.reshape(c, inner).sum(axis=1)


def _channel_sum(a):
    return _channel_reduce(a)


def _channel_sumsq(d):
    return _channel_reduce(d, d)


def _channel_dot(a, b):
    return _channel_reduce(a, b)


class NumpyBackend(Backend):
    name = "numpy"
    xp = np

    # -- statistics ----------------------------------------------------
    def _centered_moments(self, xw, out):
        """Write ``d = x - mean0`` into ``out``; return ``(mean, m2, d, delta)``
        per channel in float64, m2 being the sum of squared deviations from the
        mean and delta = mean - mean0 (the first estimate's error)."""
        outer, c, inner = xw.shape
        n = outer * inner
        mean0 = _channel_sum(xw) / n
        mean0w = mean0.astype(xw.dtype)
        with np.errstate(invalid="ignore", over="ignore"):   # Inf/NaN data: NaN stats
            d = np.subtract(xw, _chan(mean0w), out=out)
            s1 = _channel_sum(d)
            s2 = _channel_sumsq(d)
            delta = s1 / n
            m2 = s2 - s1 * delta
            np.maximum(m2, 0.0, out=m2, where=~np.isnan(m2))
            # a channel holding +-Inf has an infinite mean (as PyTorch reports)
            mean = np.where(np.isfinite(mean0), mean0w.astype(np.float64) + delta, mean0)
        return mean, m2, d, delta

    @_quiet
    def bn_stats(self, x3) -> ChannelStats:
        xw = _work(x3)
        acc = xw.dtype
        mean, m2, _, _ = self._centered_moments(xw, np.empty_like(xw))
        return ChannelStats(count=x3.shape[0] * x3.shape[2],
                            mean=mean.astype(acc), m2=m2.astype(acc))

    # -- forward -------------------------------------------------------
    @_quiet
    def bn_forward_train(self, x3, weight, bias, running_mean, running_var,
                         momentum, eps):
        xw = _work(x3)
        acc = xw.dtype
        n = x3.shape[0] * x3.shape[2]
        y = xw if xw is not x3 else np.empty_like(xw)   # float16: reuse the widened copy
        mean, m2, d, delta = self._centered_moments(xw, y)
        var = m2 / n
        invstd = 1.0 / np.sqrt(var + eps)
        # y = (d - delta) * alpha + bias  ==  d * alpha + (bias - delta * alpha)
        alpha = invstd if weight is None else invstd * weight
        beta = -delta * alpha
        if bias is not None:
            beta += bias
        np.multiply(d, _chan(alpha.astype(acc)), out=d)
        np.add(d, _chan(beta.astype(acc)), out=d)
        if running_mean is not None:
            running_mean *= 1.0 - momentum
            running_mean += (momentum * mean).astype(running_mean.dtype)
        if running_var is not None:
            unbiased = m2 / (n - 1)
            running_var *= 1.0 - momentum
            running_var += (momentum * unbiased).astype(running_var.dtype)
        return (d.astype(x3.dtype, copy=False), mean.astype(acc), invstd.astype(acc))

    @_quiet
    def bn_forward_eval(self, x3, weight, bias, running_mean, running_var, eps):
        acc = running_mean.dtype
        invstd = (1.0 / np.sqrt(running_var.astype(np.float64) + eps)).astype(acc)
        return self.bn_apply(x3, running_mean, invstd, weight, bias), running_mean.copy(), invstd

    @_quiet
    def bn_apply(self, x3, mean, invstd, weight, bias):
        xw = _work(x3)
        acc = xw.dtype
        alpha = invstd.astype(np.float64) if weight is None else invstd.astype(np.float64) * weight
        beta = -mean.astype(np.float64) * alpha
        if bias is not None:
            beta = beta + bias
        y = xw if xw is not x3 else np.empty_like(xw)
        np.multiply(xw, _chan(alpha.astype(acc)), out=y)
        np.add(y, _chan(beta.astype(acc)), out=y)
        return y.astype(x3.dtype, copy=False)

    # -- backward ------------------------------------------------------
    def _centered(self, xw, mean, out=None):
        return np.subtract(xw, _chan(mean.astype(xw.dtype)), out=out)

    @_quiet
    def bn_backward_reduce(self, dy3, x3, mean, invstd):
        xw, dyw = _work(x3), _work(dy3)
        acc = xw.dtype
        d = self._centered(xw, mean, out=xw if xw is not x3 else None)
        sum_dy = _channel_sum(dyw)
        sum_dy_xhat = _channel_dot(dyw, d) * invstd
        return sum_dy.astype(acc), sum_dy_xhat.astype(acc)

    @_quiet
    def bn_backward_dx(self, dy3, x3, mean, invstd, weight, sum_dy, sum_dy_xhat, count):
        xw, dyw = _work(x3), _work(dy3)
        d = self._centered(xw, mean, out=xw if xw is not x3 else None)
        return self._dx_from_sums(dyw, d, x3.dtype, invstd, weight,
                                  sum_dy.astype(np.float64), sum_dy_xhat.astype(np.float64),
                                  count)

    def _dx_from_sums(self, dyw, d, out_dtype, invstd, weight, sum_dy, sum_dy_xhat, count):
        # dx = k * (dy - sum_dy/n - (x - mean) * invstd * sum_dy_xhat/n),  k = weight * invstd
        # computed in place in d = x - mean, four passes and no temporary
        acc = d.dtype
        invstd64 = invstd.astype(np.float64)
        k = invstd64 if weight is None else invstd64 * weight
        np.multiply(d, _chan((invstd64 * sum_dy_xhat / count).astype(acc)), out=d)
        np.add(d, _chan((sum_dy / count).astype(acc)), out=d)
        np.subtract(dyw, d, out=d)
        np.multiply(d, _chan(k.astype(acc)), out=d)
        return d.astype(out_dtype, copy=False)

    @_quiet
    def bn_backward(self, dy3, x3, mean, invstd, weight, training):
        xw, dyw = _work(x3), _work(dy3)
        acc = xw.dtype
        d = self._centered(xw, mean, out=xw if xw is not x3 else None)
        sum_dy = _channel_sum(dyw)
        sum_dy_xhat = _channel_dot(dyw, d) * invstd.astype(np.float64)
        if training:
            dx = self._dx_from_sums(dyw, d, x3.dtype, invstd, weight, sum_dy, sum_dy_xhat,
                                    x3.shape[0] * x3.shape[2])
        else:
            k = invstd.astype(np.float64) if weight is None else invstd.astype(np.float64) * weight
            dx = np.multiply(dyw, _chan(k.astype(acc)), out=d).astype(x3.dtype, copy=False)
        return dx, sum_dy_xhat.astype(acc), sum_dy.astype(acc)

    # -- layer norm (implemented in gpubn.backends.numpy_layer_norm) ------
    def ln_forward(self, x2, weight, bias, eps):
        from .numpy_layer_norm import ln_forward
        return ln_forward(x2, weight, bias, eps)

    def ln_backward(self, dy2, x2, mean, rstd, weight, want_grads):
        from .numpy_layer_norm import ln_backward
        return ln_backward(dy2, x2, mean, rstd, weight, want_grads)
