"""Folding an inference-mode batch norm into the layer before it.

In eval mode a batch norm is a per-channel affine map,
``y = (x - mean) * s + beta`` with ``s = gamma / sqrt(var + eps)``.  When its
input is the output of a linear or convolution layer ``x = W * u + b``, the
pair is one layer of the same kind with

    W' = W * s          (channel c of the output axis scaled by s[c])
    b' = (b - mean) * s + beta

which is what inference runtimes do before they deploy a network.  Batch
renorm's eval map has ``s = gamma / running_std`` and folds the same way.
"""

from __future__ import annotations

import numpy as np

from . import _validation as V
from .backends import array_module

__all__ = ["fold_batch_norm"]


def _bn_state(bn, eps):
    """``(state, eps)`` of a batch-norm layer or of its state dict."""
    if hasattr(bn, "keys"):
        state = bn
        eps = 1e-5 if eps is None else V.check_eps(eps)
    elif hasattr(bn, "state_dict") and hasattr(bn, "running_mean"):
        if bn.running_mean is None:
            raise ValueError("bn has no running statistics (track_running_stats=False): its "
                             "eval mode normalizes with batch statistics and cannot be folded")
        if eps is not None:
            raise ValueError("eps is taken from the bn layer; pass eps only with a state dict")
        state = bn.state_dict()
        eps = bn.eps
    else:
        raise TypeError("bn must be a BatchNorm layer or its state dict, "
                        f"got {type(bn).__name__}")
    if "running_mean" not in state:
        raise ValueError("bn has no 'running_mean': folding needs the running statistics")
    if ("running_var" in state) == ("running_std" in state):
        raise ValueError("bn must hold exactly one of 'running_var' (batch norm) or "
                         "'running_std' (batch renorm)")
    return state, eps


def fold_batch_norm(weight, bias, bn, axis=0, *, eps=None):
    """Weight and bias of a linear / convolution layer followed by ``bn`` in
    eval mode, folded into one layer: ``(weight', bias')``.

    ``weight``: the layer's weight (NumPy or CuPy), whose ``axis`` is the
    output-channel axis (0 for ``Linear``/``Conv*d`` weights of shape
    ``(out, in, ...)``; 1 for ``ConvTranspose*d`` weights ``(in, out, ...)``).
    ``bias``: its bias of shape ``(out,)``, or None (no bias: zero).
    ``bn``: a :class:`gpubn.BatchNorm` / :class:`gpubn.BatchRenorm` layer, or a
    state dict with ``running_mean`` and ``running_var`` (or ``running_std``)
    and optionally ``weight`` and ``bias`` (absent: 1 and 0).  ``eps`` (only
    with a state dict, default 1e-5) is the batch norm's epsilon.

    Computed in float64; both results have ``weight``'s dtype and array module
    (the bias is returned even when ``bias`` is None).
    """
    V.check_float_array(weight, "weight")
    if weight.ndim < 1:
        raise ValueError("weight must have at least one dimension (the output channels), "
                         f"got shape {tuple(weight.shape)}")
    axis = V.normalize_axis(axis, weight.ndim)
    c = int(weight.shape[axis])
    state, eps = _bn_state(bn, eps)
    xp = array_module(weight)

    def vector(v, name):
        V.check_channel_vector(v, name, c)
        if array_module(v) is not xp:
            raise TypeError(f"{name} must be a {xp.__name__} array like weight, got "
                            f"{type(v).__module__}.{type(v).__name__}")
        return v.astype(np.float64)

    b = None if bias is None else vector(bias, "bias")
    mean = vector(state["running_mean"], "bn running_mean")
    if "running_var" in state:
        scale = 1.0 / xp.sqrt(vector(state["running_var"], "bn running_var") + eps)
    else:
        scale = 1.0 / vector(state["running_std"], "bn running_std")
    if state.get("weight") is not None:
        scale = scale * vector(state["weight"], "bn weight")
    shift = -mean * scale
    if b is not None:
        shift = shift + b * scale
    if state.get("bias") is not None:
        shift = shift + vector(state["bias"], "bn bias")
    bshape = [1] * weight.ndim
    bshape[axis] = c
    folded = weight.astype(np.float64) * scale.reshape(bshape)
    return folded.astype(weight.dtype), shift.astype(weight.dtype)
