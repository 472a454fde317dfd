"""Batch Renormalization (Ioffe, 2017): functional forward/backward and the
``BatchRenorm`` layer.

Batch renorm corrects the batch statistics towards the moving ones, so that
training sees the same normalization inference will use, which helps with
small or non-i.i.d. batches.  The algorithm is the paper's (Algorithm 1):

* ``sigma_B = sqrt(var_B + eps)`` with the *biased* batch variance;
* ``r = clip(sigma_B / sigma, 1/rmax, rmax)`` and
  ``d = clip((mu_B - mu) / sigma, -dmax, dmax)`` with the moving ``mu`` and
  ``sigma`` *before* this step's update;
* ``y = weight * (xhat * r + d) + bias`` with ``xhat = (x - mu_B) / sigma_B``;
* ``r`` and ``d`` are constants for backprop: ``dx`` is the batch-norm
  backward with ``weight * r`` in place of ``weight``,
  ``dweight = r * sum(dy * xhat) + d * sum(dy)``, ``dbias = sum(dy)``;
* the moving statistics move towards the batch's:
  ``mu = (1 - momentum) * mu + momentum * mu_B`` and
  ``sigma = (1 - momentum) * sigma + momentum * sigma_B``;
* inference normalizes with them: ``y = weight * (x - mu) / sigma + bias``.

``rmax = 1, dmax = 0`` is batch norm exactly (only the moving statistics
differ: a standard deviation that includes ``eps`` instead of the unbiased
variance).  The usual schedule starts there and relaxes ``rmax`` / ``dmax``
over training (the paper: ``rmax`` 1 -> 3, ``dmax`` 0 -> 5); ``BatchRenorm``
lets you set both between steps.

Where others differ:

* Keras ``BatchNormalization(renorm=True)`` keeps a second pair of moving
  averages (``renorm_momentum``) only for computing ``r`` and ``d``, tracks a
  moving standard deviation there but a moving *variance* for inference, and
  takes ``renorm_clipping={'rmin', 'rmax', 'dmax'}`` with ``rmin`` independent
  of ``rmax``.  Here one pair of moving statistics serves both, as in the
  paper, and ``r`` lies in ``[1/rmax, rmax]``.
* Chainer's ``BatchRenormalization`` moves ``avg_var`` (a variance, with the
  unbiased batch variance) and derives ``sigma = sqrt(avg_var + eps)`` from it;
  here the moving ``sigma`` is the average of the batch ``sigma_B``, as the
  paper writes it.
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass
from typing import Any

import numpy as np

from . import _validation as V
from .backends import is_cupy_array
from .functional import BatchNormSaved, prepare_forward, to_acc
from .layers import ChannelNorm


def _check_clip_bound(value, name: str, low: float, clips: str) -> float:
    """A clipping bound: a real number >= ``low`` (``inf`` allowed: no
    clipping); ``clips`` says what it clips, for the message."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a float >= {low:g}, got {type(value).__name__}")
    value = float(value)
    if not value >= low:   # also rejects nan
        raise ValueError(f"{name} must be >= {low:g} ({clips}), got {value}")
    return value


def check_rmax(rmax) -> float:
    """``rmax``: a real number >= 1 (``inf`` allowed: no clipping of r)."""
    return _check_clip_bound(rmax, "rmax", 1.0, "r is clipped to [1/rmax, rmax]")


def check_dmax(dmax) -> float:
    """``dmax``: a real number >= 0 (``inf`` allowed: no clipping of d)."""
    return _check_clip_bound(dmax, "dmax", 0.0, "d is clipped to [-dmax, dmax]")


def check_running_std(running_std, name: str = "running_std"):
    """The moving sigma divides: a zero or negative value is an error (NaN,
    which NaN input in training produces, propagates as in batch norm).
    Checked on host (NumPy) arrays; on CuPy arrays the check would cost a
    device synchronization per call and is left to ``load_state_dict``."""
    if is_cupy_array(running_std):
        return
    bad = np.flatnonzero(np.asarray(running_std) <= 0)
    if bad.size:
        raise ValueError(f"{name} must be positive (it is the moving standard deviation, "
                         f"a divisor), got {float(np.asarray(running_std)[bad[0]])!r} at channel "
                         f"{int(bad[0])}" + (f" and {bad.size - 1} more" if bad.size > 1 else ""))


@dataclass
class BatchRenormSaved:
    """What ``batch_renorm_backward`` needs from the forward pass.

    ``bn`` is the batch-norm saved state with ``weight * r`` as its weight
    (training) or the moving statistics as its statistics (inference); ``r`` /
    ``d`` are the per-channel corrections (None after an inference forward).
    """

    bn: BatchNormSaved
    r: Any
    d: Any


def check_no_ghost(virtual_batch_size) -> None:
    """Batch renorm has no ghost batch norm (``virtual_batch_size``): its
    ``r`` and ``d`` already pull each batch's statistics towards the moving
    ones, which is what ghost batch norm's small groups work against, and
    the paper defines neither per-group corrections nor how a step's groups
    would move the moving statistics.  Raises ``ValueError`` for anything
    but None."""
    if virtual_batch_size is not None:
        raise ValueError(f"virtual_batch_size={virtual_batch_size!r} is not supported by batch "
                         "renorm: its r and d correct each batch's statistics towards the "
                         "moving ones, ghost batch norm normalizes small groups with their own; "
                         "use BatchNorm(virtual_batch_size=...) for ghost batch norm")


def batch_renorm_forward(x, *, weight=None, bias=None, running_mean, running_std, rmax=1.0,
                         dmax=0.0, training=True, momentum=0.1, eps=1e-5, axis=1, backend=None,
                         num_batches_tracked=None, guard_running_stats=False,
                         virtual_batch_size=None):
    """Batch renormalization over every axis of ``x`` except the channel ``axis``.

    Returns ``(y, saved)``; ``saved`` (a :class:`BatchRenormSaved`) goes to
    :func:`batch_renorm_backward`.  ``running_mean`` / ``running_std`` (the
    moving ``mu`` and ``sigma``, per channel) are required: training computes
    ``r`` and ``d`` from them and then updates them in place; inference
    normalizes with them.  ``weight`` / ``bias`` default to None (1 and 0).
    Every argument after ``x`` is keyword-only.
    ``momentum`` is the update rate of the moving statistics (PyTorch's
    convention); ``None`` is the cumulative average weighted by
    ``num_batches_tracked`` (batches already folded in).  See the module
    docstring for the algorithm and how it compares with Keras and Chainer.

    ``guard_running_stats=True`` keeps a channel's moving statistics for this
    step when its batch mean or ``sigma_B`` is not finite (the other
    channels update; ``saved.bn.skipped`` flags those channels, a ``(C,)``
    int32 array), as :func:`gpubn.batch_norm_forward` does, in the same
    finishing step.  ``virtual_batch_size`` raises ``ValueError`` (see
    :func:`check_no_ghost`).

    Bad arguments raise ``TypeError`` / ``ValueError`` before any state changes.
    """
    rmax = check_rmax(rmax)
    dmax = check_dmax(dmax)
    guard = V.check_flag(guard_running_stats, "guard_running_stats")
    check_no_ghost(virtual_batch_size)

    def check_vectors(c, be, axis_, order):
        V.check_channel_vector(weight, "weight", c, like=x)
        V.check_channel_vector(bias, "bias", c, like=x)
        if running_mean is None or running_std is None:
            raise ValueError("batch renorm needs running_mean and running_std (the moving "
                             "statistics r and d are computed from), got None")
        V.check_channel_vector(running_mean, "running_mean", c, be, writable=training, like=x)
        V.check_channel_vector(running_std, "running_std", c, be, writable=training, like=x)
        check_running_std(running_std)

    f = prepare_forward(x, weight=weight, bias=bias, training=training, momentum=momentum,
                        eps=eps, axis=axis, backend=backend,
                        num_batches_tracked=num_batches_tracked, check_vectors=check_vectors)
    be, xp = f.backend, f.backend.xp
    skipped = None
    if f.training:
        guarded = {}
        if guard:    # `skipped` only with the guard: a backend without it still runs
            skipped = guarded["skipped"] = xp.empty(f.x3.shape[1], dtype=np.int32)
        y3, mean, invstd, r, d, w_bn = f.update_running(
            running_mean, running_std,
            lambda rm, rs: be.bn_renorm_forward_train(f.x3, f.weight, f.bias, rm, rs, rmax,
                                                      dmax, f.factor, f.eps, **guarded))
    else:
        mean = to_acc(xp, running_mean, f.acc).copy()
        invstd = (1.0 / to_acc(xp, running_std, f.acc)).astype(f.acc, copy=False)
        y3 = be.bn_apply(f.x3, mean, invstd, f.weight, f.bias)
        r = d = None
        w_bn = f.weight
    return f.output(y3), BatchRenormSaved(bn=f.saved(mean, invstd, w_bn, skipped=skipped), r=r,
                                          d=d)


def batch_renorm_backward(dy, saved: BatchRenormSaved):
    """Gradients of :func:`batch_renorm_forward`: ``(dx, dweight, dbias)``.

    ``r`` and ``d`` are held constant (the paper's choice): after a training
    forward ``dx`` is the batch-norm backward with ``weight * r``,
    ``dweight = r * sum(dy * xhat) + d * sum(dy)`` and ``dbias = sum(dy)``;
    after an inference forward the moving statistics are constants
    (``dx = dy * weight / sigma``).  ``dweight`` / ``dbias`` are None when the
    forward had no weight / bias.
    """
    if not isinstance(saved, BatchRenormSaved):
        raise TypeError("saved must be the BatchRenormSaved returned by batch_renorm_forward, "
                        f"got {type(saved).__name__}")
    s = saved.bn
    be = s.backend
    V.check_grad_output(dy, s.shape, s.dtype, be, like=s.x3)
    dy3 = V.canonical_view(dy, s.axis, be.xp, s.order)
    dx3, sum_dy_xhat, sum_dy = be.bn_backward(dy3, s.x3, s.mean, s.invstd, s.weight, s.training)
    dweight = dbias = None
    if s.weight_dtype is not None:
        dw = sum_dy_xhat if saved.r is None else saved.r * sum_dy_xhat + saved.d * sum_dy
        dweight = dw.astype(s.weight_dtype, copy=False)
    if s.bias_dtype is not None:
        dbias = sum_dy.astype(s.bias_dtype, copy=False)
    return V.from_canonical(dx3, s.shape, s.order), dweight, dbias


class BatchRenorm(ChannelNorm):
    """Batch renormalization layer (Ioffe, 2017), with ``BatchNorm``'s
    conventions: ``axis`` (1, or -1 for channels-last), ``train()`` /
    ``eval()``, ``backward(dy)`` setting ``grad_weight`` / ``grad_bias``,
    ``momentum`` (``None``: cumulative average), parameters in ``dtype``,
    the backend chosen per call unless ``backend=`` names one.

    State: ``weight``, ``bias``, ``running_mean`` (moving mu, starts at 0),
    ``running_std`` (moving sigma, starts at 1, must stay positive) and
    ``num_batches_tracked``, under those ``state_dict`` keys.  ``rmax`` and
    ``dmax`` are attributes that may be changed between steps for the usual
    warm-up schedule (start at ``rmax=1, dmax=0``, which is batch norm, and
    relax them).

    ``guard_running_stats=True`` keeps a channel's moving statistics for a
    step whose batch mean or ``sigma_B`` is not finite and counts those
    channel updates in ``skipped_updates`` (in ``state_dict`` only with the
    guard), as ``BatchNorm`` does; ``virtual_batch_size`` raises
    ``ValueError`` (see :func:`check_no_ghost`).
    """

    _running_names = ("running_mean", "running_std")

    def __init__(self, num_features, eps=1e-5, momentum=0.1, rmax=1.0, dmax=0.0, affine=True,
                 axis=1, dtype="float32", backend=None, *, guard_running_stats=False,
                 virtual_batch_size=None):
        rmax, dmax = check_rmax(rmax), check_dmax(dmax)
        check_no_ghost(virtual_batch_size)
        super().__init__(num_features, eps=eps, momentum=momentum, affine=affine,
                         track_running_stats=True, axis=axis, dtype=dtype, backend=backend,
                         guard_running_stats=guard_running_stats)
        self._rmax, self._dmax = rmax, dmax

    @property
    def rmax(self) -> float:
        return self._rmax

    @rmax.setter
    def rmax(self, value):
        self._rmax = check_rmax(value)

    @property
    def dmax(self) -> float:
        return self._dmax

    @dmax.setter
    def dmax(self, value):
        self._dmax = check_dmax(value)

    def forward(self, x):
        backend = self._backend_for(x)
        y, saved = batch_renorm_forward(
            x, weight=self.weight, bias=self.bias, running_mean=self.running_mean,
            running_std=self.running_std, rmax=self._rmax, dmax=self._dmax,
            training=self.training, momentum=self.momentum, eps=self.eps, axis=self.axis,
            backend=backend,
            num_batches_tracked=self.num_batches_tracked if self.training else None,
            guard_running_stats=self.guard_running_stats)
        if self.training:
            self.num_batches_tracked += 1
        self._count_skipped(saved.bn.skipped)
        self._saved = saved
        return y

    __call__ = forward

    def _functional_backward(self, dy, saved):
        return batch_renorm_backward(dy, saved)

    def _check_state_value(self, key, value):
        if key == "running_std":
            check_running_std(_host(value), "state['running_std']")

    def __repr__(self):
        return (f"BatchRenorm({self.num_features}, eps={self.eps}, momentum={self.momentum}, "
                f"rmax={self._rmax}, dmax={self._dmax}, affine={self.affine}, "
                f"axis={self.axis}, dtype={self.dtype.name}, backend={self._backend_repr()}"
                + (", guard_running_stats=True" if self.guard_running_stats else "") + ")")


def _host(a):
    return a.get() if is_cupy_array(a) else a


__all__ = ["BatchRenorm", "BatchRenormSaved", "batch_renorm_forward", "batch_renorm_backward"]
