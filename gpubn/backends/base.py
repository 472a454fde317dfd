"""The internal backend interface.

Every backend works on *canonical* arrays: C-contiguous, 3-D, shaped
``(outer, C, inner)`` where ``outer`` is the product of the dimensions before
the channel axis and ``inner`` the product of those after it.  NCHW input is
``(N, C, H*W)``; channels-last input (``axis=-1``) is ``(N*H*W, C, 1)``.  The
functional layer (``gpubn.functional``) validates arguments, builds this view
and dispatches; a backend never sees an invalid argument.

Per-channel vectors (weight, bias, running statistics, saved mean/invstd) are
1-D arrays of length C in the *accumulation dtype*: float32 for float16 /
bfloat16 / float32 data, float64 for float64 data.  ``None`` for weight means
1, for bias 0.  Running statistics are updated in place.

``count`` below is ``outer * inner``: the number of values per channel.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Tuple

import numpy as np

from .._validation import acc_dtype


@dataclass
class ChannelStats:
    """Welford triple per channel: exact integer count, mean and M2 (sum of
    squared deviations) in the accumulation dtype."""

    count: int
    mean: Any
    m2: Any


class Backend:
    """Base class. Subclasses set ``name`` and ``xp`` (the array module)."""

    name: str = "?"
    xp: Any = None

    # -- availability --------------------------------------------------
    @classmethod
    def unavailable_reason(cls) -> Optional[str]:
        """None when the backend can run here, else a sentence saying why not."""
        return None

    def owns(self, x) -> bool:
        """True when ``x`` is an array of this backend's array module."""
        return isinstance(x, self.xp.ndarray)

    # -- batch norm ----------------------------------------------------
    def bn_stats(self, x3) -> ChannelStats:
        """Per-channel Welford triple of a canonical array (no side effects)."""
        raise NotImplementedError

    def bn_forward_train(self, x3, weight, bias, running_mean, running_var,
                         momentum: float, eps: float, skipped=None,
                         out=None) -> Tuple[Any, Any, Any]:
        """Training forward: returns ``(y3, mean, invstd)``; ``y3`` is ``out``
        (a C-contiguous array like ``x3``, or None: a new one).  The same
        ``out`` is taken by every method that returns a tensor of ``x3``'s
        shape first (forward: y3, backward: dx3).

        Normalizes with the biased batch variance.  When ``running_mean`` /
        ``running_var`` are not None they are updated in place with the given
        exponential factor ``momentum`` (already resolved from ``None`` /
        ``num_batches_tracked`` by the caller) and the *unbiased* variance.
        ``skipped`` (None, or a ``(C,)`` int32 array of ``xp``) turns the guard
        on: channels :func:`guard_skips` names keep their running statistics
        and get ``skipped[c] = 1``, the others update and get 0.
        """
        raise NotImplementedError

    def bn_forward_train_groups(self, x3, groups: int, weight, bias,
                                eps: float, out=None) -> Tuple[Any, Any, Any, Any]:
        """Ghost batch norm's training forward: the outer extent of ``x3`` is
        ``groups`` consecutive equal batches, each normalized with its own
        statistics (shared weight and bias).  Returns ``(y3, mean, invstd,
        m2)``, the last three ``(groups, C)`` in the accumulation dtype; the
        caller updates the running statistics (:func:`update_running_groups`).

        This default runs :meth:`bn_stats` and :meth:`bn_apply` on each
        group's slice (a view: the slices of a C-contiguous canonical array
        are contiguous); kernel backends run all groups in the same launches.
        """
        xp = self.xp
        step = x3.shape[0] // groups
        y3 = xp.empty_like(x3) if out is None else out
        mean, invstd, m2 = [], [], []
        for g in range(groups):
            xg = x3[g * step:(g + 1) * step]
            st = self.bn_stats(xg)
            with quiet():
                inv = (1.0 / xp.sqrt(st.m2 / st.count + eps)).astype(st.mean.dtype, copy=False)
            y3[g * step:(g + 1) * step] = self.bn_apply(xg, st.mean, inv, weight, bias)
            mean.append(st.mean)
            invstd.append(inv)
            m2.append(st.m2)
        return y3, xp.stack(mean), xp.stack(invstd), xp.stack(m2)

    def bn_backward_groups(self, dy3, x3, mean, invstd, weight,
                           out=None) -> Tuple[Any, Any, Any]:
        """Backward of :meth:`bn_forward_train_groups` (``mean`` / ``invstd``
        ``(groups, C)``): each group's training backward; ``dweight`` /
        ``dbias`` are summed over the groups.  Kernel backends override it
        with the group as an extra launch index."""
        xp = self.xp
        groups = mean.shape[0]
        step = x3.shape[0] // groups
        dx3 = xp.empty_like(x3) if out is None else out
        dw, db = [], []
        for g in range(groups):
            sl = slice(g * step, (g + 1) * step)
            dx3[sl], dwg, dbg = self.bn_backward(dy3[sl], x3[sl], mean[g], invstd[g], weight,
                                                 True)
            dw.append(dwg)
            db.append(dbg)
        return dx3, xp.stack(dw).sum(axis=0), xp.stack(db).sum(axis=0)

    def bn_forward_eval(self, x3, weight, bias, running_mean, running_var,
                        eps: float, out=None) -> Tuple[Any, Any, Any]:
        """Inference forward with running statistics: ``(y3, mean, invstd)``
        where mean is running_mean and invstd = 1/sqrt(running_var + eps)."""
        raise NotImplementedError

    def bn_apply(self, x3, mean, invstd, weight, bias):
        """y = (x - mean) * invstd * weight + bias, per channel (used after
        statistics were merged elsewhere, e.g. across processes)."""
        raise NotImplementedError

    def bn_backward_reduce(self, dy3, x3, mean, invstd) -> Tuple[Any, Any]:
        """Per-channel ``(sum dy, sum dy * xhat)`` in the accumulation dtype."""
        raise NotImplementedError

    def bn_backward_dx(self, dy3, x3, mean, invstd, weight, sum_dy,
                       sum_dy_xhat, count: int):
        """Training-mode dx from already reduced sums (count values/channel):
        dx = weight*invstd*(dy - sum_dy/count - xhat*sum_dy_xhat/count)."""
        raise NotImplementedError

    def bn_backward(self, dy3, x3, mean, invstd, weight,
                    training: bool, out=None) -> Tuple[Any, Any, Any]:
        """Fused backward: ``(dx3, dweight, dbias)``; dweight/dbias in the
        accumulation dtype.  ``training=False`` holds the statistics fixed
        (dx = dy * weight * invstd)."""
        raise NotImplementedError

    # -- the residual-block epilogue: y = relu(bn(x) + residual) -------
    # ``residual`` is a canonical array of x3's shape and dtype or None;
    # ``relu`` a bool.  These defaults are the reference: the unfused math
    # (batch norm, then the epilogue in float64, rounded once); the kernel
    # backends run it inside their forward and backward launches.
    def bn_forward_train_act(self, x3, weight, bias, running_mean, running_var,
                             momentum: float, eps: float, residual,
                             relu: bool, skipped=None, out=None) -> Tuple[Any, Any, Any]:
        """:meth:`bn_forward_train` (``skipped`` as there) followed by the
        epilogue."""
        guarded = {} if skipped is None else {"skipped": skipped}
        _, mean, invstd = self.bn_forward_train(x3, weight, bias, running_mean, running_var,
                                                momentum, eps, **guarded)
        return (into(out, epilogue_reference(self.xp, x3, mean, invstd, weight, bias,
                                             residual, relu)), mean, invstd)

    def bn_forward_eval_act(self, x3, weight, bias, running_mean, running_var, eps: float,
                            residual, relu: bool, out=None) -> Tuple[Any, Any, Any]:
        """:meth:`bn_forward_eval` followed by the epilogue."""
        _, mean, invstd = self.bn_forward_eval(x3, weight, bias, running_mean, running_var, eps)
        return (into(out, epilogue_reference(self.xp, x3, mean, invstd, weight, bias,
                                             residual, relu)), mean, invstd)

    def bn_backward_relu(self, dy3, x3, mean, invstd, weight, y3,
                         training: bool, out=None) -> Tuple[Any, Any, Any, Any]:
        """Backward through ``y3 = relu(bn(x3) + residual)``: the ReLU's mask
        comes from ``y3`` (``g = 0 where y3 <= 0, else dy``), then
        :meth:`bn_backward` of ``g``.  Returns ``(dx3, dweight, dbias, g3)``;
        ``g3`` is also the residual's gradient."""
        xp = self.xp
        g3 = xp.where(y3 <= 0, xp.zeros((), dtype=dy3.dtype), dy3)
        dx3, dw, db = self.bn_backward(g3, x3, mean, invstd, weight, training,
                                       **({} if out is None else {"out": out}))
        return dx3, dw, db, g3

    # -- batch renorm --------------------------------------------------
    def bn_renorm_forward_train(self, x3, weight, bias, running_mean, running_std,
                                rmax: float, dmax: float, momentum: float,
                                eps: float, skipped=None) -> Tuple[Any, Any, Any, Any, Any, Any]:
        """Batch renorm training forward: returns
        ``(y3, mean, invstd, r, d, weight * r)`` (the last is the weight the
        batch-norm backward takes).

        ``sigma_B = sqrt(m2/count + eps)``, ``invstd = 1/sigma_B``,
        ``r = clip(sigma_B/running_std, 1/rmax, rmax)``,
        ``d = clip((mean - running_mean)/running_std, -dmax, dmax)`` (NaN
        propagates), ``y = (x - mean)*invstd*(weight*r) + (bias + weight*d)``;
        then ``running_mean`` / ``running_std`` (required) move towards
        ``mean`` / ``sigma_B`` by ``momentum``, in place.  ``skipped`` (None,
        or a ``(C,)`` int32 array of ``xp``) turns the guard on: a channel
        whose ``mean`` or ``sigma_B`` is not finite keeps both moving
        statistics and gets ``skipped[c] = 1`` (:func:`guard_skips`), the
        others update and get 0.

        This default composes :meth:`bn_stats` and :meth:`bn_apply` (one read
        pass for the statistics, one read and write pass to normalize) with
        per-channel vector arithmetic in ``xp``; kernel backends replace the
        vector arithmetic with one "finish" kernel.
        """
        xp = self.xp
        stats = self.bn_stats(x3)
        acc = stats.mean.dtype
        mean = stats.mean
        sigma = xp.sqrt(stats.m2 / stats.count + eps).astype(acc, copy=False)
        invstd = (1.0 / sigma).astype(acc, copy=False)
        r, d, w_eff, b_eff = renorm_constants(xp, mean, sigma, weight, bias, running_mean,
                                              running_std, rmax, dmax)
        y3 = self.bn_apply(x3, mean, invstd, w_eff, b_eff)
        # the guard and the step are batch norm's, with sigma_B in the variance's place
        update_running_stats(xp, running_mean, running_std, mean, sigma, momentum, skipped)
        return y3, mean, invstd, r, d, w_eff

    # -- layer norm ----------------------------------------------------
    def ln_forward(self, x2, weight, bias, eps: float, out=None) -> Tuple[Any, Any, Any]:
        """Layer norm forward over the rows of a C-contiguous ``(rows, n)``
        array: returns ``(y2, mean, rstd)``, per-row mean and
        ``rstd = 1/sqrt(biased var + eps)`` in the accumulation dtype.
        ``weight`` / ``bias`` are ``(n,)`` vectors in the accumulation dtype
        or None (1 and 0); ``y2`` is ``out`` when given (as in
        :meth:`bn_forward_train`), and so is ``dx2`` of :meth:`ln_backward`."""
        raise NotImplementedError

    def ln_backward(self, dy2, x2, mean, rstd, weight,
                    want_grads: bool, out=None) -> Tuple[Any, Any, Any]:
        """Layer norm backward: ``(dx2, dweight, dbias)``.  With ``g = dy *
        weight`` and ``xhat = (x - mean) * rstd`` per row,
        ``dx = rstd * (g - mean(g) - xhat * mean(g * xhat))``;
        ``dweight = sum over rows of dy * xhat`` and ``dbias = sum of dy``
        (``(n,)``, accumulation dtype), or ``(dx2, None, None)`` when
        ``want_grads`` is False."""
        raise NotImplementedError


class HostBackend(Backend):
    """A backend of NumPy arrays whose per-channel vector arithmetic is
    float64 NumPy (``numpy``, ``cpu``).  A subclass gives its statistics pass
    as :meth:`moments`; :func:`host_forward_train` and
    :func:`host_eval_constants` below build its forward from its passes."""

    xp = np

    def moments(self, x3) -> Tuple[Any, Any]:
        """Per-channel ``(mean, m2)`` of a canonical array, float64 vectors."""
        raise NotImplementedError

    def bn_stats(self, x3) -> ChannelStats:
        acc = acc_dtype(x3.dtype)
        mean, m2 = self.moments(x3)
        with np.errstate(over="ignore"):     # a sum of squares past float32 is Inf there too
            return ChannelStats(count=x3.shape[0] * x3.shape[2], mean=mean.astype(acc),
                                m2=m2.astype(acc))


# -- host backends (numpy, cpu): per-channel arithmetic in float64 NumPy ------
def host_forward_train(x3, moments, normalize, eps: float, running_mean, running_var,
                       momentum: float, skipped=None) -> Tuple[Any, Any, Any]:
    """``Backend.bn_forward_train`` of a host backend from its two passes:
    ``moments(x3) -> (mean, m2)`` and ``normalize(mean, invstd) -> y3``
    (float64 per-channel vectors in both; ``normalize`` honours ``out=``).
    The biased variance normalizes, the unbiased one goes into the running
    statistics."""
    acc = acc_dtype(x3.dtype)
    count = x3.shape[0] * x3.shape[2]
    mean, m2 = moments(x3)
    invstd = 1.0 / np.sqrt(m2 / count + eps)
    y3 = normalize(mean, invstd)
    update_running_stats(np, running_mean, running_var, mean, m2 / (count - 1), momentum,
                         skipped)
    return y3, mean.astype(acc), invstd.astype(acc)


def host_eval_constants(x3, running_mean, running_var, eps: float) -> Tuple[Any, Any]:
    """The per-channel ``(mean, invstd)`` of an inference forward on a host
    backend, in the accumulation dtype: ``running_mean`` and
    ``1 / sqrt(running_var + eps)`` computed in float64."""
    acc = acc_dtype(x3.dtype)
    with np.errstate(invalid="ignore", divide="ignore"):
        invstd = (1.0 / np.sqrt(np.asarray(running_var, np.float64) + eps)).astype(acc)
    return np.array(running_mean, dtype=acc), invstd


def update_running(running, batch, momentum: float, skip=None) -> None:
    """The host-side running-statistics update, in place:
    ``running = (1 - momentum) * running + momentum * batch``, computed in
    float64 and rounded once to ``running``'s dtype; channels where ``skip``
    (a boolean per-channel array, see :func:`guard_skips`) is true keep their
    value.  Every backend that keeps its per-channel vectors on the host
    (numpy, cpu, the renorm default, sync batch norm) uses this one rule; the
    kernels do the same in ``bn_stats.cu``'s finishing step."""
    new = (1.0 - momentum) * running.astype("float64") + momentum * batch.astype("float64")
    if skip is None:
        running[...] = new
    else:
        keep = ~skip
        running[keep] = new[keep]


def update_running_groups(xp, running_mean, running_var, mean, m2, count: int,
                          momentum: float, skipped=None) -> None:
    """Ghost batch norm's running-statistics update, once per call: the batch
    mean and unbiased variance are the means over the groups of each group's
    (``mean`` / ``m2``: ``(groups, C)``, ``count`` values per channel and
    group); ``skipped`` (None or a ``(C,)`` int32 array) turns the guard on,
    as in ``Backend.bn_forward_train``.  Small per-channel vector arithmetic
    in ``xp``, computed in float64 like :func:`update_running`."""
    with np.errstate(invalid="ignore", over="ignore"):
        batch_mean = mean.astype("float64").mean(axis=0)
        batch_var = (m2.astype("float64") / (count - 1)).mean(axis=0)
    update_running_stats(xp, running_mean, running_var, batch_mean, batch_var, momentum,
                         skipped)


def update_running_stats(xp, running_mean, running_var, mean, unbiased_var, momentum: float,
                         skipped=None) -> None:
    """Batch norm's running-statistics step where the per-channel vectors are
    host arrays: :func:`update_running` of each (None: not tracked) with the
    batch mean and unbiased variance (batch renorm: ``running_std`` and the
    batch ``sigma_B``), and with ``skipped`` (None or a
    ``(C,)`` int32 array, see ``Backend.bn_forward_train``) the guard: the
    channels :func:`guard_skips` names keep theirs and are flagged 1."""
    skip = None
    if skipped is not None:
        skip = guard_skips(xp, mean, unbiased_var, running_mean.dtype)
        skipped[...] = skip
    if running_mean is not None:
        update_running(running_mean, mean, momentum, skip)
    if running_var is not None:
        update_running(running_var, unbiased_var, momentum, skip)


def guard_skips(xp, mean, unbiased_var, acc):
    """The guard of the running statistics: a boolean per-channel array, true
    where the batch mean or the unbiased batch variance (batch renorm: the
    batch ``sigma_B``) is not finite in the
    accumulation dtype ``acc`` (that of the running statistics; a float64
    variance beyond float32's range counts as infinite, as it is in the
    kernels' float32 statistics): that channel keeps its running statistics
    this step.  The kernels apply the same rule in ``bn_stats.cu``'s
    finishing step."""
    with np.errstate(over="ignore", invalid="ignore"):
        return ~(xp.isfinite(mean.astype(acc)) & xp.isfinite(unbiased_var.astype(acc)))


def quiet():
    """NumPy arithmetic on values that may hold NaN or Inf, without
    RuntimeWarnings: non-finite data give NaN / Inf results, as in PyTorch.
    A context manager; the host backends enter it around their NumPy
    expressions."""
    return np.errstate(invalid="ignore", over="ignore", divide="ignore")


def into(out, a):
    """``a``, or (``out`` given) ``out`` holding ``a``'s values: how a
    backend that computes a tensor elsewhere (the reference) honours
    ``out=``."""
    if out is None:
        return a
    out[...] = a
    return out


def epilogue_reference(xp, x3, mean, invstd, weight, bias, residual, relu: bool):
    """``relu(bn(x3) + residual)`` in float64 (``relu`` and ``residual``
    optional), rounded once to x3's dtype: the reference the fused kernels are
    tested against.  NaN passes the ReLU, as in ``torch.relu``; non-finite
    data raise no RuntimeWarning."""
    f = np.float64
    with quiet():
        scale = invstd.astype(f) if weight is None else invstd.astype(f) * weight.astype(f)
        v = (x3.astype(f) - mean.astype(f)[:, None]) * scale[:, None]
        if bias is not None:
            v += bias.astype(f)[:, None]
        if residual is not None:
            v += residual.astype(f)
        if relu:
            v[v <= 0] = 0
        return v.astype(x3.dtype)


def renorm_constants(xp, mean, sigma_b, weight, bias, running_mean, running_std, rmax, dmax):
    """Per-channel batch renorm constants from the batch mean and
    ``sigma_b = sqrt(var + eps)``, in the accumulation dtype of
    ``running_std``: ``(r, d, weight * r, bias + weight * d)``.  Clipping
    propagates NaN (so a NaN channel stays NaN, as in batch norm)."""
    acc = running_std.dtype
    r = xp.clip(sigma_b / running_std, 1.0 / rmax, rmax).astype(acc, copy=False)
    d = xp.clip((mean - running_mean) / running_std, -dmax, dmax).astype(acc, copy=False)
    w_eff = r.copy() if weight is None else weight * r
    b_eff = d.copy() if weight is None else weight * d
    if bias is not None:
        b_eff += bias
    return r, d, w_eff, b_eff
