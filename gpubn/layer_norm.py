"""Layer normalization (Ba et al., 2016): functional forward/backward and the
``LayerNorm`` layer, with the semantics of ``torch.nn.functional.layer_norm``.

Statistics (mean and *biased* variance) are taken per sample over the trailing
``normalized_shape`` dimensions; ``weight`` and ``bias`` (shape
``normalized_shape``) are applied elementwise:
``y = (x - mean) / sqrt(var + eps) * weight + bias``.  There are no running
statistics: training and inference compute the same thing, so the result of a
sample never depends on the rest of the batch.

Backends see a C-contiguous 2-D ``(rows, n)`` view, ``n`` the product of
``normalized_shape``; per-row mean and ``rstd = 1/sqrt(var + eps)`` come back
in the accumulation dtype (float32 for float16/float32 data, float64 for
float64) and are saved for the backward.  Channels-last tensors normalized
over their channels (ConvNeXt-style ``layer_norm(x_nhwc, (C,))``) are just
rows of length C.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Any, Tuple

import numpy as np

from . import _validation as V
from .backends import get_backend
from .functional import to_acc
from .layers import Layer


def check_normalized_shape(normalized_shape, shape, name: str = "normalized_shape"):
    """An int or a sequence of positive ints equal to the trailing dims of
    ``shape``; returned as a tuple."""
    if type(normalized_shape) is int:
        normalized_shape = (normalized_shape,)
    elif isinstance(normalized_shape, (bool, np.bool_)):
        raise TypeError(f"{name} must be an int or a tuple of ints, got bool")
    elif isinstance(normalized_shape, numbers.Integral):
        normalized_shape = (normalized_shape,)
    try:
        dims = tuple(normalized_shape)
    except TypeError:
        raise TypeError(f"{name} must be an int or a tuple of ints, got "
                        f"{type(normalized_shape).__name__}") from None
    for d in dims:
        if type(d) is not int and (isinstance(d, (bool, np.bool_))
                                   or not isinstance(d, numbers.Integral)):
            raise TypeError(f"{name} must be an int or a tuple of ints, got {normalized_shape!r}")
    if not all(type(d) is int for d in dims):     # the common case keeps the tuple
        dims = tuple(int(d) for d in dims)
    if not dims:
        raise ValueError(f"{name} must name at least one dimension, got ()")
    if any(d < 1 for d in dims):
        raise ValueError(f"{name} must hold positive sizes, got {dims}")
    if shape is not None:
        shape = tuple(shape)
        if len(shape) < len(dims) or shape[len(shape) - len(dims):] != dims:
            raise ValueError(f"{name}={dims} must equal the trailing dimensions of the input, "
                             f"got input shape {shape}")
    return dims


def _check_affine(v, name: str, dims, like):
    if v is None:
        return
    V.check_float_array(v, name)
    V.check_same_device(v, name, like)
    if tuple(v.shape) != dims:
        raise ValueError(f"{name} must have shape {dims} (normalized_shape), got "
                         f"shape {tuple(v.shape)}")


@dataclass
class LayerNormSaved:
    """What ``layer_norm_backward`` needs: the ``(rows, n)`` input, per-row
    mean and rstd (accumulation dtype), the weight as a flat vector."""

    x2: Any
    mean: Any
    rstd: Any
    weight: Any                     # (n,) accumulation dtype, or None (= 1)
    shape: Tuple[int, ...]
    dtype: Any
    normalized_shape: Tuple[int, ...]
    backend: Any
    weight_dtype: Any = None
    bias_dtype: Any = None


def layer_norm_forward(x, normalized_shape, weight=None, bias=None, eps=1e-5, backend=None, *,
                       out=None):
    """Layer normalization over the trailing ``normalized_shape`` dims of ``x``.

    Returns ``(y, saved)``: ``y`` has the shape and dtype of ``x``; ``saved``
    (a :class:`LayerNormSaved`, holding the per-row ``mean`` and ``rstd``)
    goes to :func:`layer_norm_backward`.  ``weight`` / ``bias`` have shape
    ``normalized_shape`` (None: 1 and 0), any float dtype.  ``x`` may be
    float16 or bfloat16 (statistics in float32), float32 or float64, of any
    layout.  ``out`` (optional) receives ``y``, which is then ``out`` itself:
    a C-contiguous array of x's shape, dtype and array module sharing no
    memory with ``x`` (see ``batch_norm_forward``).
    Bad arguments raise ``TypeError`` / ``ValueError``.
    """
    V.check_float_array(x, "x")
    be = get_backend(backend, x)
    V.check_owned(x, be, "x")
    dims = check_normalized_shape(normalized_shape, x.shape)
    eps = V.check_eps(eps)
    _check_affine(weight, "weight", dims, x)
    _check_affine(bias, "bias", dims, x)
    if x.size == 0:
        raise ValueError(f"x is empty (shape {tuple(x.shape)}): layer norm needs at least "
                         f"one row")
    V.check_out(out, x.shape, x.dtype, V.identity_order(x.ndim), be, "x", {"x": x}, like=x)
    xp = be.xp
    shape = tuple(x.shape)
    n = math.prod(dims)
    x2 = x.reshape(x.size // n, n)
    if not x2.flags.c_contiguous:
        x2 = xp.ascontiguousarray(x2)
    acc = V.acc_dtype(x.dtype)
    w = None if weight is None else to_acc(xp, weight.reshape(n), acc)
    b = None if bias is None else to_acc(xp, bias.reshape(n), acc)
    y2, mean, rstd = be.ln_forward(x2, w, b, eps,
                                   **({} if out is None else {"out": out.reshape(x2.shape)}))
    saved = LayerNormSaved(x2=x2, mean=mean, rstd=rstd, weight=w, shape=shape, dtype=x.dtype,
                           normalized_shape=dims, backend=be,
                           weight_dtype=None if weight is None else weight.dtype,
                           bias_dtype=None if bias is None else bias.dtype)
    return (y2.reshape(shape) if out is None else out), saved


def layer_norm_backward(dy, saved: LayerNormSaved, *, out=None):
    """Gradients of :func:`layer_norm_forward`: ``(dx, dweight, dbias)``.
    ``out`` (optional) receives ``dx``, as ``out`` of the forward ``y``
    (sharing no memory with ``dy`` or the saved input).

    ``dx`` has the input's shape and dtype; ``dweight`` / ``dbias`` have shape
    ``normalized_shape`` and the dtype of the weight / bias given to the
    forward, or are None when that parameter was None.
    """
    if not isinstance(saved, LayerNormSaved):
        raise TypeError("saved must be the LayerNormSaved returned by layer_norm_forward, "
                        f"got {type(saved).__name__}")
    be = saved.backend
    V.check_grad_output(dy, saved.shape, saved.dtype, be, like=saved.x2)
    V.check_out(out, saved.shape, saved.dtype, V.identity_order(len(saved.shape)), be,
                "the forward input", {"dy": dy, "the saved input": saved.x2}, like=saved.x2)
    dy2 = dy.reshape(saved.x2.shape)
    if not dy2.flags.c_contiguous:
        dy2 = be.xp.ascontiguousarray(dy2)
    want_grads = saved.weight_dtype is not None or saved.bias_dtype is not None
    dx2, dw, db = be.ln_backward(dy2, saved.x2, saved.mean, saved.rstd, saved.weight,
                                 want_grads,
                                 **({} if out is None else {"out": out.reshape(dy2.shape)}))
    dims = saved.normalized_shape
    dweight = (None if saved.weight_dtype is None
               else dw.reshape(dims).astype(saved.weight_dtype, copy=False))
    dbias = (None if saved.bias_dtype is None
             else db.reshape(dims).astype(saved.bias_dtype, copy=False))
    return (dx2.reshape(saved.shape) if out is None else out), dweight, dbias


class LayerNorm(Layer):
    """Layer normalization layer, the counterpart of ``torch.nn.LayerNorm``.

    ``ln(x)`` normalizes over the trailing ``normalized_shape`` dims of ``x``;
    ``ln.backward(dy)`` returns ``dx`` and sets ``grad_weight`` / ``grad_bias``.
    ``elementwise_affine=False`` has no parameters; ``bias=False`` only a
    weight.  Parameters live in ``dtype`` (float32 by default) on the
    backend's array module; ``state_dict`` uses PyTorch's key names.
    ``train()`` / ``eval()`` exist for symmetry and change nothing: layer norm
    computes the same in both modes.
    """

    def __init__(self, normalized_shape, eps=1e-5, elementwise_affine=True, bias=True,
                 dtype="float32", backend=None):
        dims = check_normalized_shape(normalized_shape, None)
        self.eps = V.check_eps(eps)
        dt = V.check_param_dtype(dtype)
        self.normalized_shape = dims
        self.elementwise_affine = bool(elementwise_affine)
        self.dtype = dt
        self._init_backend(backend)
        xp = self.backend.xp
        self.weight = xp.ones(dims, dtype=dt) if self.elementwise_affine else None
        self.bias = xp.zeros(dims, dtype=dt) if self.elementwise_affine and bias else None
        self.training = True
        self.grad_weight = None
        self.grad_bias = None
        self._saved = None

    def forward(self, x):
        backend = self._backend_for(x)
        y, self._saved = layer_norm_forward(x, self.normalized_shape, self.weight, self.bias,
                                            self.eps, backend=backend)
        return y

    __call__ = forward

    def _functional_backward(self, dy, saved):
        return layer_norm_backward(dy, saved)

    def state_dict(self):
        """Copies of the parameters under PyTorch's key names."""
        state = {}
        if self.weight is not None:
            state["weight"] = self.weight.copy()
        if self.bias is not None:
            state["bias"] = self.bias.copy()
        return state

    def _state_shape(self, key):
        return self.normalized_shape

    def __repr__(self):
        return (f"LayerNorm({self.normalized_shape}, eps={self.eps}, "
                f"elementwise_affine={self.elementwise_affine}, bias={self.bias is not None}, "
                f"dtype={self.dtype.name}, backend={self._backend_repr()})")


__all__ = ["LayerNorm", "LayerNormSaved", "layer_norm_forward", "layer_norm_backward",
           "check_normalized_shape"]
