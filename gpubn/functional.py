"""Functional batch normalization: validation, canonical view, dispatch.

Nothing here is backend-specific: the arrays go to ``gpubn.backends`` in the
canonical ``(outer, C, inner)`` layout with per-channel vectors in the
accumulation dtype, and come back in the caller's shape and dtype.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Tuple

from . import _validation as V
from .backends import get_backend


@dataclass
class BatchNormSaved:
    """What ``batch_norm_backward`` needs from the forward pass.

    ``x3`` is the canonical input (backward recomputes ``xhat`` from ``x3``,
    ``mean`` and ``invstd``, as the fused kernels do); ``mean``/``invstd`` are
    the statistics used to normalize (batch statistics in training, running
    statistics in eval) in the accumulation dtype.
    """

    x3: Any
    mean: Any
    invstd: Any
    weight: Any                 # accumulation dtype, or None (= 1)
    axis: int                   # channel axis in [0, ndim)
    shape: Tuple[int, ...]      # the input's shape
    dtype: Any                  # the input's dtype
    training: bool              # True: batch statistics (gradients flow through them)
    backend: Any
    count: int                  # values per channel
    weight_dtype: Any = None    # dtype of the weight the caller gave (for dweight)
    bias_dtype: Any = None      # dtype of the bias the caller gave, None when no bias


def resolve_momentum(momentum, num_batches_tracked) -> float:
    """Exponential-average factor for this step.

    ``momentum=None`` is the cumulative moving average: the factor is
    ``1 / (num_batches_tracked + 1)`` where ``num_batches_tracked`` counts the
    batches already folded into the running statistics (0 or None: the first
    batch replaces them).
    """
    if momentum is not None:
        return momentum
    n = 0 if num_batches_tracked is None else int(num_batches_tracked)
    return 1.0 / (n + 1)


def _check_num_batches(num_batches_tracked):
    if num_batches_tracked is None:
        return
    try:
        n = int(num_batches_tracked)
    except (TypeError, ValueError):
        raise TypeError("num_batches_tracked must be a non-negative int or None, got "
                        f"{type(num_batches_tracked).__name__}") from None
    if isinstance(num_batches_tracked, bool) or n != num_batches_tracked or n < 0:
        raise ValueError("num_batches_tracked must be a non-negative int or None, got "
                         f"{num_batches_tracked!r}")


def _to_acc(xp, v, acc):
    """Per-channel vector as a contiguous array of the accumulation dtype."""
    if v is None:
        return None
    return xp.ascontiguousarray(xp.asarray(v), dtype=acc)


def batch_norm_forward(x, *, weight=None, bias=None, running_mean=None, running_var=None,
                       training=True, momentum=0.1, eps=1e-5, axis=1, backend=None,
                       num_batches_tracked=None):
    """Batch normalization over every axis of ``x`` except the channel ``axis``.

    Returns ``(y, saved)``: ``y`` has the shape and dtype of ``x``; ``saved`` is a
    :class:`BatchNormSaved` for :func:`batch_norm_backward`.

    Every argument after ``x`` is keyword-only: ``torch.nn.functional.batch_norm``
    takes ``(input, running_mean, running_var, weight, bias, ...)`` in that
    order, and a positional call written for it must not be read as weights.

    Semantics are those of ``torch.nn.functional.batch_norm``:

    * ``training=True`` normalizes with the batch mean and *biased* variance and,
      when given, updates ``running_mean`` / ``running_var`` in place:
      ``running = (1 - momentum) * running + momentum * batch`` with the
      *unbiased* batch variance.  ``momentum=None`` is the cumulative average;
      pass ``num_batches_tracked`` (batches already folded in, before this
      one) to weight it; the caller increments its own counter.
    * ``training=False`` normalizes with ``running_mean`` / ``running_var``
      (both required).
    * ``weight`` (default 1) and ``bias`` (default 0) are per-channel.

    ``x`` may be float16 (statistics in float32), float32 or float64, of any
    layout (non-contiguous and Fortran-ordered inputs are copied once).
    ``axis=-1`` is channels-last (NHWC).  NaN or Inf in a channel's data make
    that channel's batch statistics, output and running statistics NaN in
    training, as in PyTorch; in eval they stay in their own elements.

    Bad arguments raise ``TypeError`` / ``ValueError`` before any state changes.
    """
    # ---- validation: nothing is modified before all of it has passed ----
    axis = V.check_input(x, axis, "x")
    be = get_backend(backend, x)
    V.check_owned(x, be, "x")
    training = bool(training)
    eps = V.check_eps(eps)
    momentum = V.check_momentum(momentum)
    _check_num_batches(num_batches_tracked)
    shape = tuple(x.shape)
    outer, c, inner = V.canonical_shape(shape, axis)
    count = outer * inner
    V.check_bn_vectors(weight, bias, running_mean, running_var, c, be, training)
    V.check_count(count, training, shape)

    # ---- dispatch ----
    xp = be.xp
    acc = V.acc_dtype(x.dtype)
    x3 = V.canonical_view(x, axis, xp)
    w = _to_acc(xp, weight, acc)
    b = _to_acc(xp, bias, acc)
    if training:
        rm = rv = None
        if running_mean is not None:
            rm = running_mean if _is_acc_vector(running_mean, acc) else _to_acc(xp, running_mean, acc)
            rv = running_var if _is_acc_vector(running_var, acc) else _to_acc(xp, running_var, acc)
        factor = resolve_momentum(momentum, num_batches_tracked)
        y3, mean, invstd = be.bn_forward_train(x3, w, b, rm, rv, factor, eps)
        if rm is not None and rm is not running_mean:
            running_mean[...] = rm
        if rv is not None and rv is not running_var:
            running_var[...] = rv
    else:
        rm = _to_acc(xp, running_mean, acc)
        rv = _to_acc(xp, running_var, acc)
        y3, mean, invstd = be.bn_forward_eval(x3, w, b, rm, rv, eps)

    saved = BatchNormSaved(
        x3=x3, mean=mean, invstd=invstd, weight=w, axis=axis, shape=shape, dtype=x.dtype,
        training=training, backend=be, count=count,
        weight_dtype=None if weight is None else weight.dtype,
        bias_dtype=None if bias is None else bias.dtype)
    return y3.reshape(shape), saved


def _is_acc_vector(v, acc) -> bool:
    return v.dtype == acc and v.flags.c_contiguous


def batch_norm_backward(dy, saved: BatchNormSaved):
    """Gradients of :func:`batch_norm_forward`: ``(dx, dweight, dbias)``.

    ``dx`` has the input's shape and dtype.  ``dweight`` / ``dbias`` are per-channel
    (in the dtype of the weight / bias given to the forward), or None when that
    parameter was None.  After a ``training=True`` forward the gradient flows
    through the batch statistics; after ``training=False`` they are held fixed
    (frozen batch norm: ``dx = dy * weight / sqrt(running_var + eps)``).
    """
    if not isinstance(saved, BatchNormSaved):
        raise TypeError("saved must be the BatchNormSaved returned by batch_norm_forward, "
                        f"got {type(saved).__name__}")
    be = saved.backend
    V.check_grad_output(dy, saved.shape, saved.dtype, be)
    dy3 = V.canonical_view(dy, saved.axis, be.xp)
    dx3, dw, db = be.bn_backward(dy3, saved.x3, saved.mean, saved.invstd, saved.weight,
                                 saved.training)
    dweight = None if saved.weight_dtype is None else dw.astype(saved.weight_dtype, copy=False)
    dbias = None if saved.bias_dtype is None else db.astype(saved.bias_dtype, copy=False)
    return dx3.reshape(saved.shape), dweight, dbias


__all__ = ["BatchNormSaved", "batch_norm_forward", "batch_norm_backward", "resolve_momentum"]
