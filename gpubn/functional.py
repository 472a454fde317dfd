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
    y3: Any = None              # the canonical output when it went through a ReLU (its mask)
    residual: bool = False      # the forward added a residual (backward returns its gradient)


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


def check_num_batches(num_batches_tracked):
    """``num_batches_tracked``: a non-negative int or None."""
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


def to_acc(xp, v, acc):
    """Per-channel vector as a contiguous array of the accumulation dtype
    (``v`` itself when it already is one; None passes through)."""
    if v is None:
        return None
    return xp.ascontiguousarray(xp.asarray(v), dtype=acc)


@dataclass
class ForwardInput:
    """A forward call's input after validation, in the canonical layout: what
    the per-channel forwards (batch norm, batch renorm, sync batch norm) do
    with it differs, how they get here and what they save does not."""

    backend: Any
    x3: Any                     # (outer, C, inner) view or copy of x
    weight: Any                 # accumulation dtype, or None
    bias: Any
    acc: Any                    # accumulation dtype
    axis: int
    shape: Tuple[int, ...]
    dtype: Any
    count: int                  # values per channel
    training: bool
    eps: float
    factor: float               # this step's running-statistics rate
    weight_dtype: Any = None
    bias_dtype: Any = None

    def running(self, v):
        """A running-statistics vector to update in place: ``v`` itself when
        it already has the accumulation dtype and is contiguous, else a
        working copy that :meth:`write_back` copies into ``v``."""
        if v is None or (v.dtype == self.acc and v.flags.c_contiguous):
            return v
        return to_acc(self.backend.xp, v, self.acc)

    @staticmethod
    def write_back(dst, work):
        if work is not dst:
            dst[...] = work

    def saved(self, mean, invstd, weight, cls=None, **extra):
        """The saved state for the backward: ``weight`` is the one the
        backward scales by (batch renorm's ``weight * r``)."""
        return (cls or BatchNormSaved)(
            x3=self.x3, mean=mean, invstd=invstd, weight=weight, axis=self.axis,
            shape=self.shape, dtype=self.dtype, training=self.training, backend=self.backend,
            count=self.count, weight_dtype=self.weight_dtype, bias_dtype=self.bias_dtype,
            **extra)


def prepare_forward(x, *, weight, bias, training, momentum, eps, axis, backend,
                    num_batches_tracked, check_vectors) -> ForwardInput:
    """The common part of a per-channel forward: validate every argument
    (``check_vectors(num_channels, backend)`` checks the op's own
    per-channel vectors) before anything is converted or written, then put
    ``x`` in the canonical layout and the parameters in the accumulation
    dtype."""
    axis = V.check_input(x, axis, "x")
    be = get_backend(backend, x)
    V.check_owned(x, be, "x")
    training = bool(training)
    eps = V.check_eps(eps)
    momentum = V.check_momentum(momentum)
    check_num_batches(num_batches_tracked)
    shape = tuple(x.shape)
    outer, c, inner = V.canonical_shape(shape, axis)
    count = outer * inner
    check_vectors(c, be)
    V.check_count(count, training, shape)

    xp = be.xp
    acc = V.acc_dtype(x.dtype)
    return ForwardInput(
        backend=be, x3=V.canonical_view(x, axis, xp), weight=to_acc(xp, weight, acc),
        bias=to_acc(xp, bias, acc), acc=acc, axis=axis, shape=shape, dtype=x.dtype,
        count=count, training=training, eps=eps,
        factor=resolve_momentum(momentum, num_batches_tracked),
        weight_dtype=None if weight is None else weight.dtype,
        bias_dtype=None if bias is None else bias.dtype)


def batch_norm_forward(x, *, weight=None, bias=None, running_mean=None, running_var=None,
                       training=True, momentum=0.1, eps=1e-5, axis=1, backend=None,
                       num_batches_tracked=None, residual=None, activation=None):
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
    * ``residual`` (an array of x's shape, dtype and array module) and
      ``activation="relu"`` add the epilogue of a residual block,
      ``y = relu(batch_norm(x) + residual)``, inside the same launches
      (each optional; computed in the accumulation dtype, rounded once).
      The backward then returns the residual's gradient as well and takes
      the ReLU's mask from ``y`` (keep ``y`` unmodified until then).

    ``x`` may be float16 or bfloat16 (``ml_dtypes.bfloat16``; statistics in
    float32), float32 or float64, of any layout (non-contiguous and Fortran-ordered inputs are copied once).
    ``axis=-1`` is channels-last (NHWC).  NaN or Inf in a channel's data make
    that channel's batch statistics, output and running statistics NaN in
    training, as in PyTorch; in eval they stay in their own elements.

    Bad arguments raise ``TypeError`` / ``ValueError`` before any state changes.
    """
    relu = V.check_activation(activation)

    def check_vectors(c, be):
        V.check_bn_vectors(weight, bias, running_mean, running_var, c, be, training)
        V.check_residual(residual, x.shape, x.dtype, be)

    f = prepare_forward(x, weight=weight, bias=bias, training=training, momentum=momentum,
                        eps=eps, axis=axis, backend=backend,
                        num_batches_tracked=num_batches_tracked, check_vectors=check_vectors)
    be, xp = f.backend, f.backend.xp
    fused = residual is not None or relu
    z3 = None if residual is None else V.canonical_view(residual, f.axis, xp)
    if f.training:
        rm, rv = f.running(running_mean), f.running(running_var)
        if fused:
            y3, mean, invstd = be.bn_forward_train_act(f.x3, f.weight, f.bias, rm, rv, f.factor,
                                                       f.eps, z3, relu)
        else:
            y3, mean, invstd = be.bn_forward_train(f.x3, f.weight, f.bias, rm, rv, f.factor,
                                                   f.eps)
        if running_mean is not None:
            f.write_back(running_mean, rm)
            f.write_back(running_var, rv)
    else:
        rm, rv = to_acc(xp, running_mean, f.acc), to_acc(xp, running_var, f.acc)
        if fused:
            y3, mean, invstd = be.bn_forward_eval_act(f.x3, f.weight, f.bias, rm, rv, f.eps, z3,
                                                      relu)
        else:
            y3, mean, invstd = be.bn_forward_eval(f.x3, f.weight, f.bias, rm, rv, f.eps)
    saved = f.saved(mean, invstd, f.weight, y3=y3 if relu else None,
                    residual=residual is not None)
    return y3.reshape(f.shape), saved


def batch_norm_backward(dy, saved: BatchNormSaved):
    """Gradients of :func:`batch_norm_forward`: ``(dx, dweight, dbias)``, and
    ``(dx, dweight, dbias, dresidual)`` when the forward added a ``residual``.

    ``dx`` has the input's shape and dtype.  ``dweight`` / ``dbias`` are per-channel
    (in the dtype of the weight / bias given to the forward), or None when that
    parameter was None.  After a ``training=True`` forward the gradient flows
    through the batch statistics; after ``training=False`` they are held fixed
    (frozen batch norm: ``dx = dy * weight / sqrt(running_var + eps)``).

    After ``activation="relu"`` the gradient at the ReLU's input is
    ``g = 0 where y <= 0, else dy`` (the mask read from the forward's ``y``,
    as ``torch.relu``'s backward does); ``dresidual`` is ``g``, or ``dy``
    itself when there was no activation (the add passes it through).
    """
    if not isinstance(saved, BatchNormSaved):
        raise TypeError("saved must be the BatchNormSaved returned by batch_norm_forward, "
                        f"got {type(saved).__name__}")
    be = saved.backend
    V.check_grad_output(dy, saved.shape, saved.dtype, be)
    dy3 = V.canonical_view(dy, saved.axis, be.xp)
    if saved.y3 is not None:
        dx3, dw, db, g3 = be.bn_backward_relu(dy3, saved.x3, saved.mean, saved.invstd,
                                              saved.weight, saved.y3, saved.training)
        dresidual = g3.reshape(saved.shape)
    else:
        dx3, dw, db = be.bn_backward(dy3, saved.x3, saved.mean, saved.invstd, saved.weight,
                                     saved.training)
        dresidual = dy
    dweight = None if saved.weight_dtype is None else dw.astype(saved.weight_dtype, copy=False)
    dbias = None if saved.bias_dtype is None else db.astype(saved.bias_dtype, copy=False)
    if saved.residual:
        return dx3.reshape(saved.shape), dweight, dbias, dresidual
    return dx3.reshape(saved.shape), dweight, dbias


__all__ = ["BatchNormSaved", "ForwardInput", "batch_norm_forward", "batch_norm_backward",
           "check_num_batches", "prepare_forward", "resolve_momentum", "to_acc"]
