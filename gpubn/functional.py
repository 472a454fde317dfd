"""Functional batch normalization: validation, canonical view, dispatch.

Nothing here is backend-specific: the arrays go to ``gpubn.backends`` in the
canonical ``(outer, C, inner)`` layout with per-channel vectors in the
accumulation dtype, and come back in the caller's shape and dtype.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, NamedTuple, Tuple

import numpy as np

from . import _validation as V
from .backends import get_backend
from .backends.base import update_running_groups


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
    order: Any = None           # the input's axes in memory order (None: as given)
    skipped: Any = None         # guarded running statistics: (C,) int32, 1 where this
                                # step's update was skipped; None without the guard
    groups: int = 1             # ghost batch norm: mean / invstd are (groups, C)
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
    if v is None or (type(v) is np.ndarray and v.dtype == acc and v.flags.c_contiguous):
        return v
    return xp.ascontiguousarray(xp.asarray(v), dtype=acc)


class ForwardOptions(NamedTuple):
    """A forward call's arguments other than the arrays, checked.  They are
    checked before any array is looked at: sync batch norm, whose ranks pass
    the same options but each its own arrays, raises on them before it
    communicates."""

    backend: Any
    training: bool
    eps: float
    factor: float               # this step's running-statistics rate


def check_forward_options(x, *, training, momentum, eps, backend,
                          num_batches_tracked) -> ForwardOptions:
    """Check the options of a per-channel forward and resolve the backend
    (for ``x`` when ``backend`` is None)."""
    be = get_backend(backend, x)
    eps = V.check_eps(eps)
    momentum = V.check_momentum(momentum)
    check_num_batches(num_batches_tracked)
    return ForwardOptions(be, bool(training), eps, resolve_momentum(momentum, num_batches_tracked))


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
    order: Any = None           # x's axes in memory order (_validation.layout_order)

    def output(self, y3):
        """The result of the canonical ``y3`` with x's shape and layout."""
        return V.from_canonical(y3, self.shape, self.order)

    def update_running(self, first, second, step):
        """Run ``step(first, second)``, which updates two running-statistics
        vectors in place (None stays None), on working copies in the
        accumulation dtype where the caller's are of another dtype or not
        contiguous, then copy the working copies back; returns what ``step``
        returns."""
        acc = self.acc
        if ((first is None or (first.dtype == acc and first.flags.c_contiguous))
                and (second is None or (second.dtype == acc and second.flags.c_contiguous))):
            return step(first, second)      # the common case: no working copies
        work = [v if v is None or (v.dtype == acc and v.flags.c_contiguous)
                else to_acc(self.backend.xp, v, acc) for v in (first, second)]
        out = step(*work)
        for dst, w in zip((first, second), work):
            if w is not dst:
                dst[...] = w
        return out

    def saved(self, mean, invstd, weight, cls=None, **extra):
        """The saved state for the backward: ``weight`` is the one the
        backward scales by (batch renorm's ``weight * r``)."""
        return (cls or BatchNormSaved)(     # the fields in order: a call's fixed cost
            self.x3, mean, invstd, weight, self.axis, self.shape, self.dtype, self.training,
            self.backend, self.count, self.weight_dtype, self.bias_dtype, self.order, **extra)


def canonical_input(x, options: ForwardOptions, *, weight, bias, axis, check_vectors,
                    local: bool = False) -> ForwardInput:
    """Validate the arrays of a per-channel forward (``check_vectors(num_channels,
    backend, axis, order)`` checks the op's own per-channel vectors; ``axis``
    is the channel axis in ``[0, ndim)``, ``order`` :func:`V.layout_order` of
    ``x``) before anything is converted or written, then put ``x`` in the
    canonical layout and the parameters in the accumulation dtype.
    ``local=True``: ``x`` is one rank's share of a global batch, which may be
    empty; the caller checks the values per channel of the whole batch."""
    be = options.backend
    plain = V.plain_input(x, axis, be)      # the common case, checked in one test
    if plain is None:                       # the full checks, and any layout
        axis = V.check_input(x, axis, "x", allow_empty=local)
        V.check_owned(x, be, "x")
        order = V.layout_order(x, axis)
    else:
        axis, order = plain, V.identity_order(x.ndim)
    shape = x.shape
    shape3 = V.canonical_shape(shape, axis)
    outer, c, inner = shape3
    count = outer * inner
    check_vectors(c, be, axis, order)
    if not local:
        V.check_count(count, options.training, shape)

    xp = be.xp
    acc = V.acc_dtype(x.dtype)
    return ForwardInput(                    # the fields in order: a call's fixed cost
        be, V.canonical_view(x, axis, xp, order, shape3),
        to_acc(xp, weight, acc), to_acc(xp, bias, acc), acc, axis, shape, x.dtype, count,
        options.training, options.eps, options.factor,
        None if weight is None else weight.dtype, None if bias is None else bias.dtype, order)


def prepare_forward(x, *, weight, bias, training, momentum, eps, axis, backend,
                    num_batches_tracked, check_vectors) -> ForwardInput:
    """The common part of a per-channel forward: every argument checked
    (:func:`check_forward_options`, then :func:`canonical_input`) before
    anything is converted or written, ``x`` in the canonical layout."""
    options = check_forward_options(x, training=training, momentum=momentum, eps=eps,
                                    backend=backend, num_batches_tracked=num_batches_tracked)
    return canonical_input(x, options, weight=weight, bias=bias, axis=axis,
                           check_vectors=check_vectors)


def batch_norm_forward(x, *, weight=None, bias=None, running_mean=None, running_var=None,
                       training=True, momentum=0.1, eps=1e-5, axis=1, backend=None,
                       num_batches_tracked=None, guard_running_stats=False,
                       virtual_batch_size=None, residual=None, activation=None, out=None):
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

    ``out`` (optional) receives ``y``, which is then ``out`` itself: an array
    of x's shape, dtype and array module, laid out in memory as ``y`` would be
    (C-contiguous, or channels-last for a channels-last ``x``), sharing no
    memory with ``x`` or ``residual``.  It saves allocating ``y``, which on
    the host is a fresh page-faulted array every call.

    ``x`` may be float16 or bfloat16 (``ml_dtypes.bfloat16``; statistics in
    float32), float32 or float64, of any layout: channels-last memory with
    shape NCHW (PyTorch's ``channels_last``) runs on a view and returns
    channels-last results; other non-contiguous and Fortran-ordered inputs are
    copied once.
    ``axis=-1`` is channels-last (NHWC).  NaN or Inf in a channel's data make
    that channel's batch statistics, output and running statistics NaN in
    training, as in PyTorch; in eval they stay in their own elements.

    ``guard_running_stats=True`` keeps a channel's running statistics for this
    step when its batch mean or unbiased variance is not finite (the other
    channels update); ``saved.skipped`` then flags those channels (a ``(C,)``
    int32 array, 1 = skipped).  The check runs where the running statistics
    are updated (the kernels' finishing step), with no extra pass.

    ``virtual_batch_size=k`` (ghost batch norm, training only; ignored when
    ``training=False``) splits the batch (axis 0) into consecutive groups of
    ``k`` samples, each normalized with its own statistics (shared weight and
    bias); ``x.shape[0]`` must be a multiple of ``k``.  The running
    statistics are updated once, with the mean over the groups of their means
    and unbiased variances; ``saved.mean`` / ``saved.invstd`` are then
    ``(groups, C)`` and the backward is per group.  The kernels run every
    group in the same launches (the group is an extra grid index).

    Bad arguments raise ``TypeError`` / ``ValueError`` before any state changes.
    """
    guard = V.check_flag(guard_running_stats, "guard_running_stats")
    relu = V.check_activation(activation)
    groups = 1

    def check_vectors(c, be, axis_, order):
        nonlocal groups
        V.check_bn_vectors(weight, bias, running_mean, running_var, c, be, training, like=x)
        V.check_residual(residual, x.shape, x.dtype, be, like=x)
        if training and virtual_batch_size is not None:
            groups = V.check_virtual_batch_size(virtual_batch_size, x.shape, axis_)
            count = x.size // c
            if groups > 1 and count // groups < 2:
                raise ValueError(f"expected more than 1 value per channel in each group of "
                                 f"virtual_batch_size={virtual_batch_size} samples when "
                                 f"training, got x of shape {tuple(x.shape)}")
            if groups > 1 and (residual is not None or relu):
                raise ValueError(f"virtual_batch_size={virtual_batch_size} cannot be combined "
                                 f"with residual= or activation= (the residual-block epilogue "
                                 f"runs on whole batches only)")
        if groups > 1 and order[0] != 0:
            order = V.identity_order(x.ndim)    # ghost groups run on a copy in the given order
        if out is not None:
            V.check_out(out, x.shape, x.dtype, order, be, "x", {"x": x, "residual": residual},
                        like=x)

    f = prepare_forward(x, weight=weight, bias=bias, training=training, momentum=momentum,
                        eps=eps, axis=axis, backend=backend,
                        num_batches_tracked=num_batches_tracked, check_vectors=check_vectors)
    be, xp = f.backend, f.backend.xp
    fused = residual is not None or relu
    skipped = None
    if groups > 1 and f.order[0] != 0:
        # ghost groups are runs of the canonical outer extent: the batch axis
        # must be outermost in memory (a layout with the channel axis first is
        # copied once into the given axis order)
        f.order = V.identity_order(len(f.shape))
        f.x3 = V.canonical_view(x, f.axis, xp, f.order)
    z3 = None if residual is None else V.canonical_view(residual, f.axis, xp, f.order)
    if guard and f.training and running_mean is not None:
        skipped = xp.empty(f.x3.shape[1], dtype="int32")
    # out= reaches the backend only when given (wrappers without it keep working)
    into = {} if out is None else {"out": V.canonical_view(out, f.axis, xp, f.order)}
    if f.training and groups > 1:
        y3, mean, invstd, m2 = be.bn_forward_train_groups(f.x3, groups, f.weight, f.bias, f.eps,
                                                          **into)
        if running_mean is not None:
            f.update_running(running_mean, running_var, lambda rm, rv: update_running_groups(
                xp, rm, rv, mean, m2, f.count // groups, f.factor, skipped))
    elif f.training:
        # `skipped` only with the guard: a backend (or wrapper) without it still runs
        guarded = {} if skipped is None else {"skipped": skipped}
        if fused:
            y3, mean, invstd = f.update_running(
                running_mean, running_var,
                lambda rm, rv: be.bn_forward_train_act(f.x3, f.weight, f.bias, rm, rv, f.factor,
                                                       f.eps, z3, relu, **guarded, **into))
        else:
            y3, mean, invstd = f.update_running(
                running_mean, running_var,
                lambda rm, rv: be.bn_forward_train(f.x3, f.weight, f.bias, rm, rv, f.factor,
                                                   f.eps, **guarded, **into))
    else:
        rm, rv = to_acc(xp, running_mean, f.acc), to_acc(xp, running_var, f.acc)
        if fused:
            y3, mean, invstd = be.bn_forward_eval_act(f.x3, f.weight, f.bias, rm, rv, f.eps, z3,
                                                      relu, **into)
        else:
            y3, mean, invstd = be.bn_forward_eval(f.x3, f.weight, f.bias, rm, rv, f.eps, **into)
    y = out if out is not None else f.output(y3)
    return y, f.saved(mean, invstd, f.weight, skipped=skipped, groups=groups,
                      y3=y3 if relu else None, residual=residual is not None)


def batch_norm_backward(dy, saved: BatchNormSaved, *, out=None):
    """Gradients of :func:`batch_norm_forward`: ``(dx, dweight, dbias)``, and
    ``(dx, dweight, dbias, dresidual)`` when the forward added a ``residual``.
    ``out`` (optional) receives ``dx``, as ``out`` of the forward receives
    ``y`` (here sharing no memory with ``dy``, the saved input or ``y``).

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
    V.check_grad_output(dy, saved.shape, saved.dtype, be, like=saved.x3)
    if out is not None:
        V.check_out(out, saved.shape, saved.dtype, saved.order, be, "the forward input",
                    {"dy": dy, "the saved input": saved.x3, "the forward's y": saved.y3},
                    like=saved.x3)
    dy3 = V.canonical_view(dy, saved.axis, be.xp, saved.order, saved.x3.shape)
    into = {} if out is None else {"out": V.canonical_view(out, saved.axis, be.xp, saved.order,
                                                           saved.x3.shape)}
    dresidual = dy
    if saved.groups > 1:
        dx3, dw, db = be.bn_backward_groups(dy3, saved.x3, saved.mean, saved.invstd,
                                            saved.weight, **into)
    elif saved.y3 is not None:
        dx3, dw, db, g3 = be.bn_backward_relu(dy3, saved.x3, saved.mean, saved.invstd,
                                              saved.weight, saved.y3, saved.training, **into)
        dresidual = V.from_canonical(g3, saved.shape, saved.order)
    else:
        dx3, dw, db = be.bn_backward(dy3, saved.x3, saved.mean, saved.invstd, saved.weight,
                                     saved.training, **into)
    dweight = None if saved.weight_dtype is None else dw.astype(saved.weight_dtype, copy=False)
    dbias = None if saved.bias_dtype is None else db.astype(saved.bias_dtype, copy=False)
    dx = out if out is not None else V.from_canonical(dx3, saved.shape, saved.order)
    if saved.residual:
        return dx, dweight, dbias, dresidual
    return dx, dweight, dbias


__all__ = ["BatchNormSaved", "ForwardInput", "ForwardOptions", "batch_norm_forward",
           "batch_norm_backward", "canonical_input", "check_forward_options",
           "check_num_batches", "prepare_forward", "resolve_momentum", "to_acc"]
