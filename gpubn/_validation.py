"""Argument checks and the canonical view, shared by every normalization op.

Every check raises ``TypeError`` or ``ValueError`` with a message that names the
argument and the problem.  They are pure: callers run all of them before any
state (running statistics, counters) is touched.
"""

from __future__ import annotations

import functools
import math
import numbers
from typing import Optional, Sequence, Tuple

import numpy as np

FLOAT_DTYPES = ("float16", "float32", "float64")


@functools.lru_cache(maxsize=None)      # called for every array of every call
def acc_dtype(dtype) -> np.dtype:
    """Accumulation dtype for a storage dtype: float64 for float64 data,
    float32 for everything narrower (float16, bfloat16, float32)."""
    return np.dtype(np.float64) if np.dtype(dtype) == np.float64 else np.dtype(np.float32)


_FLOAT_NP_DTYPES = frozenset(np.dtype(n) for n in ("float16", "float32", "float64"))


def is_array(x) -> bool:
    """Whether ``x`` looks like an array (NumPy, CuPy or alike)."""
    return type(x) is np.ndarray or (hasattr(x, "dtype") and hasattr(x, "shape")
                                     and hasattr(x, "ndim"))


def check_float_array(x, name: str):
    """``x`` must be an array of float16, bfloat16 (``ml_dtypes.bfloat16``, the
    dtype CuPy uses as well), float32 or float64."""
    if type(x) is np.ndarray and x.dtype in _FLOAT_NP_DTYPES:     # the common case
        return
    if not is_array(x):
        raise TypeError(f"{name} must be an array (numpy.ndarray or cupy.ndarray), "
                        f"got {type(x).__name__}")
    if x.dtype in _FLOAT_NP_DTYPES:          # without formatting names
        return
    if np.dtype(x.dtype).name != "bfloat16":
        raise TypeError(f"{name} must have a floating-point dtype (float16, bfloat16, float32 "
                        f"or float64), got {x.dtype}")


def check_param_dtype(dtype, name: str = "dtype") -> np.dtype:
    """The storage dtype of a layer's parameters: float16, float32 or float64."""
    try:
        dt = np.dtype(dtype)
    except TypeError:
        raise TypeError(f"{name} must be a floating-point dtype, got {dtype!r}") from None
    if dt.name not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float16, float32 or float64, got {dt.name}")
    return dt


def normalize_axis(axis, ndim: int, name: str = "axis") -> int:
    if type(axis) is not int:       # the common case without the abstract-class checks
        if isinstance(axis, (bool, np.bool_)) or not isinstance(axis, numbers.Integral):
            raise TypeError(f"{name} must be an int, got {type(axis).__name__}")
        axis = int(axis)
    if not -ndim <= axis < ndim:
        raise ValueError(f"{name}={axis} is out of range for an input with {ndim} "
                         f"dimensions (allowed: {-ndim} to {ndim - 1})")
    return axis % ndim


def check_input(x, axis, name: str = "x", min_ndim: int = 2, allow_empty: bool = False) -> int:
    """Check the data array and its channel axis; return the axis in [0, ndim).
    ``allow_empty``: ``x`` may hold no values (one rank's share of a global
    batch)."""
    check_float_array(x, name)
    if x.ndim < min_ndim:
        raise ValueError(f"{name} must have at least {min_ndim} dimensions "
                         f"(batch and channel), got shape {tuple(x.shape)}")
    axis = normalize_axis(axis, x.ndim)
    if x.size == 0 and not allow_empty:
        raise ValueError(f"{name} is empty (shape {tuple(x.shape)}): batch norm needs "
                         f"at least one value per channel")
    return axis


def plain_input(x, axis, backend) -> Optional[int]:
    """``axis`` in ``[0, ndim)`` when ``x`` is a non-empty C-contiguous NumPy
    float array of two or more dimensions that ``backend`` owns and ``axis``
    an int in range: an input :func:`check_input` and :func:`check_owned`
    pass, whose :func:`layout_order` is the identity and canonical view a
    reshape.  Else None: the full checks decide."""
    if type(x) is not np.ndarray or type(axis) is not int:
        return None
    ndim = x.ndim
    if (ndim >= 2 and -ndim <= axis < ndim and x.dtype in _FLOAT_NP_DTYPES
            and x.flags.c_contiguous and x.size and backend.owns(x)):
        return axis % ndim
    return None


def check_eps(eps, name: str = "eps") -> float:
    if type(eps) is not float and (isinstance(eps, bool) or not isinstance(eps, numbers.Real)):
        raise TypeError(f"{name} must be a positive float, got {type(eps).__name__}")
    eps = float(eps)
    if not (eps > 0 and math.isfinite(eps)):
        raise ValueError(f"{name} must be a positive finite number, got {eps}")
    return eps


def check_flag(value, name: str) -> bool:
    """A yes/no option: a Python or NumPy bool."""
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__}")
    return bool(value)


def check_momentum(momentum, name: str = "momentum"):
    """``None`` (cumulative average) or a number in [0, 1]."""
    if momentum is None:
        return None
    if type(momentum) is not float and (isinstance(momentum, bool)
                                        or not isinstance(momentum, numbers.Real)):
        raise TypeError(f"{name} must be a float in [0, 1] or None, "
                        f"got {type(momentum).__name__}")
    momentum = float(momentum)
    if not 0.0 <= momentum <= 1.0:
        raise ValueError(f"{name} must be in [0, 1] or None, got {momentum}")
    return momentum


def device_id(a):
    """The GPU an array lives on (``a.device.id`` for CuPy and other device
    arrays), or None for host arrays (NumPy 2's ``device`` is the string
    ``"cpu"``; older NumPy has none)."""
    if type(a) is np.ndarray:
        return None
    dev = getattr(a, "device", None)
    if dev is None or isinstance(dev, str):
        return None
    return getattr(dev, "id", dev)


def check_same_device(a, name: str, like, like_name: str = "x"):
    """A device array ``a`` must live on the device of ``like`` (the call's
    input): a kernel given a pointer to another GPU's memory reads an
    illegal address.  Host arrays are not compared (the array-module checks
    decide about them)."""
    if a is None or like is None or type(a) is np.ndarray:
        return
    got, want = device_id(a), device_id(like)
    if got is not None and want is not None and got != want:
        raise ValueError(f"{name} is on device {got} but {like_name} is on device {want}; "
                         f"every array of one call must be on the same device")


def _plain_vector(v, num_channels: int, backend=None, writable: bool = False) -> bool:
    """None, or a NumPy vector of ``num_channels`` floats (writeable, and of
    ``backend``'s array module, when ``writable``): a per-channel argument
    that passes its checks (:func:`check_channel_vector`) in one test."""
    return v is None or (type(v) is np.ndarray and v.shape == (num_channels,)
                         and v.dtype in _FLOAT_NP_DTYPES
                         and (not writable or (v.flags.writeable
                                               and (backend is None or backend.owns(v)))))


def check_channel_vector(v, name: str, num_channels: int, backend=None,
                         writable: bool = False, like=None):
    """A per-channel parameter: None, or a 1-D float array of length C, on
    the device of ``like`` (the input) when given.

    With ``writable=True`` (running statistics, updated in place) it must also
    be an array of the backend's own array module and writeable.
    """
    if v is None:
        return
    if _plain_vector(v, num_channels, backend, writable):      # the common case
        return
    check_float_array(v, name)
    if tuple(v.shape) != (num_channels,):
        raise ValueError(f"{name} must have shape ({num_channels},) to match the "
                         f"{num_channels} channels of the input, got shape {tuple(v.shape)}")
    check_same_device(v, name, like)
    if writable:
        if backend is not None and not backend.owns(v):
            raise TypeError(f"{name} is updated in place, so it must be a "
                            f"{backend.xp.__name__} array for backend {backend.name!r}, "
                            f"got {type(v).__module__}.{type(v).__name__}")
        flags = getattr(v, "flags", None)
        if flags is not None and not getattr(flags, "writeable", True):
            raise ValueError(f"{name} is updated in place but is read-only")


# most ghost batch norm groups per call: the kernels' grid z bound
MAX_GROUPS = 65535


def check_virtual_batch_size(k, shape, axis: int, name: str = "virtual_batch_size") -> int:
    """Ghost batch norm's group size: None (the whole batch, one group) or a
    positive int that divides the batch (``shape[0]``; the batch axis must
    not be the channel axis).  Returns the number of groups."""
    if k is None:
        return 1
    if isinstance(k, (bool, np.bool_)) or not isinstance(k, numbers.Integral):
        raise TypeError(f"{name} must be a positive int or None, got {type(k).__name__}")
    k = int(k)
    if k < 1:
        raise ValueError(f"{name} must be a positive int or None, got {k}")
    if axis == 0:
        raise ValueError(f"{name} splits the batch axis 0, which is the channel axis here "
                         f"(axis=0)")
    n = int(shape[0])
    if n % k:
        raise ValueError(f"{name}={k} does not divide the batch size {n} (x.shape[0] = {n}): "
                         f"ghost batch norm needs groups of equal size")
    if n // k > MAX_GROUPS:
        raise ValueError(f"{name}={k} splits the batch of {n} into {n // k} groups, more than "
                         f"{MAX_GROUPS}")
    return n // k


def check_count(count: int, training: bool, shape, name: str = "x"):
    if training and count < 2:
        raise ValueError(f"expected more than 1 value per channel when training, got "
                         f"{name} of shape {tuple(shape)} ({count} value per channel)")


def canonical_shape(shape, axis: int):
    """(outer, C, inner) for a shape and a channel axis in [0, ndim)."""
    outer = math.prod(shape[:axis])
    inner = math.prod(shape[axis + 1:])
    return outer, shape[axis], inner


_IDENTITY = tuple(tuple(range(n)) for n in range(65))    # NumPy's most dimensions is 64


def identity_order(ndim: int) -> Tuple[int, ...]:
    """The axes ``0 .. ndim - 1`` in order: the layout of a C-contiguous array."""
    return _IDENTITY[ndim] if ndim < len(_IDENTITY) else tuple(range(ndim))


def layout_order(x, axis: int) -> Tuple[int, ...]:
    """The order of ``x``'s axes in memory, outermost first, when ``x`` is a
    canonical layout with its channel ``axis`` moved: the other axes in their
    own order, the channel axis anywhere among them, and
    ``x.transpose(order)`` C-contiguous.  A PyTorch ``channels_last`` tensor
    seen through DLPack (shape NCHW, strides of NHWC) gives ``(0, 2, 3, 1)``:
    it runs as channels-last.  The identity for C-contiguous arrays and for
    every other layout (Fortran order, slices, other transposes: those are
    copied once)."""
    identity = identity_order(x.ndim)
    if x.flags.c_contiguous:
        return identity
    strides, shape = x.strides, x.shape
    # axes of length 1 have no meaningful stride: they keep their place
    # relative to the others by sorting as if their stride were the next one's
    order = tuple(sorted(identity, key=lambda i: (-strides[i] if shape[i] > 1 else 0, i)))
    rest = [i for i in order if i != axis]
    if (order != identity and rest == sorted(rest)
            and x.transpose(order).flags.c_contiguous):
        return order
    return identity


def canonical_view(x, axis: int, xp=None, order: Optional[Sequence[int]] = None,
                   shape3=None):
    """C-contiguous ``(outer, C, inner)`` array holding ``x`` with its axes
    in ``order`` (default: :func:`layout_order`), channel axis ``axis``: a
    view when ``x`` laid out in that order is contiguous (C-contiguous
    arrays, and channels-last tensors of PyTorch with shape NCHW, which run
    as (N*H*W, C, 1)), else one copy.  ``shape3``: ``canonical_shape(x.shape,
    axis)`` when the caller has it.  :func:`from_canonical` maps a result
    back."""
    if xp is None:
        xp = np
    order = layout_order(x, axis) if order is None else tuple(order)
    identity = order == identity_order(x.ndim)
    if identity and x.flags.c_contiguous:       # the common case: a view
        return x.reshape(shape3 or canonical_shape(x.shape, axis))
    xt = x if identity else x.transpose(order)
    x3 = xt.reshape(canonical_shape(tuple(xt.shape), order.index(axis)))
    if not x3.flags.c_contiguous:
        x3 = xp.ascontiguousarray(x3)
    return x3


def from_canonical(a3, shape, order: Optional[Sequence[int]] = None):
    """An array of ``shape`` holding the canonical ``a3`` that
    :func:`canonical_view` made with ``order``: a view, laid out in memory
    like that input (channels-last in, channels-last out, as PyTorch does)."""
    if order is None or tuple(order) == identity_order(len(shape)):
        return a3.reshape(shape)
    a = a3.reshape(tuple(shape[i] for i in order))
    return a.transpose(tuple(int(i) for i in np.argsort(order)))


def check_owned(x, backend, name: str):
    """``x`` must be an array of the backend's own array module (no silent
    host-device copies)."""
    if not backend.owns(x):
        raise TypeError(f"{name} must be a {backend.xp.__name__} array for backend "
                        f"{backend.name!r}, got {type(x).__module__}.{type(x).__name__}")


def check_bn_vectors(weight, bias, running_mean, running_var, num_channels: int, backend,
                     training: bool, like=None):
    """The per-channel arguments of a batch-norm forward: weight and bias
    (None or length C), and the running statistics, which are updated in place
    when training, must come as a pair, and are required for inference; all
    on the device of ``like`` (the input) when given."""
    if (running_mean is not None and running_var is not None
            and _plain_vector(weight, num_channels) and _plain_vector(bias, num_channels)
            and _plain_vector(running_mean, num_channels, backend, training)
            and _plain_vector(running_var, num_channels, backend, training)):
        return      # the common case: each vector as check_channel_vector's common case
    check_channel_vector(weight, "weight", num_channels, like=like)
    check_channel_vector(bias, "bias", num_channels, like=like)
    check_channel_vector(running_mean, "running_mean", num_channels, backend, writable=training,
                         like=like)
    check_channel_vector(running_var, "running_var", num_channels, backend, writable=training,
                         like=like)
    if (running_mean is None) != (running_var is None):
        raise ValueError("running_mean and running_var must be given together "
                         "(both arrays or both None)")
    if not training and running_mean is None:
        raise ValueError("training=False needs running_mean and running_var "
                         "(inference normalizes with the running statistics)")


ACTIVATIONS = (None, "relu")


def check_activation(activation, name: str = "activation") -> bool:
    """The activation after batch norm: None or ``"relu"``; True for relu."""
    if activation is not None and not isinstance(activation, str):
        raise TypeError(f"{name} must be None or 'relu', got {type(activation).__name__}")
    if activation not in ACTIVATIONS:
        raise ValueError(f"{name} must be None or 'relu', got {activation!r}")
    return activation == "relu"


def check_tensor_like(a, shape, dtype, backend, name: str, like_name: str, like=None):
    """An array of another tensor's (``like_name``, named in the message)
    shape, dtype and array module, on the device of ``like`` when given."""
    if (type(a) is np.ndarray and a.dtype == dtype and a.shape == tuple(shape)
            and backend.owns(a)):
        return      # the common case in one test (a host array is on no device)
    check_float_array(a, name)
    if tuple(a.shape) != tuple(shape):
        raise ValueError(f"{name} must have the shape of {like_name} {tuple(shape)}, "
                         f"got {tuple(a.shape)}")
    if a.dtype != dtype:
        raise TypeError(f"{name} must have the dtype of {like_name} ({dtype}), got {a.dtype}")
    check_owned(a, backend, name)
    check_same_device(a, name, like, like_name)


def check_residual(residual, shape, dtype, backend, name: str = "residual", like=None):
    """The tensor added after batch norm: None, or an array of the input's
    shape, dtype and array module (on the device of ``like``, the input)."""
    if residual is not None:
        check_tensor_like(residual, shape, dtype, backend, name, "x", like)


def check_out(out, shape, dtype, order, backend, like_name: str, reads, like=None,
              name: str = "out"):
    """Where an op writes its result of ``like_name``'s shape and dtype:
    None, or a writeable array of that shape, dtype and array module (on the
    device of ``like``), laid out in memory as the result would be (its axes
    in ``order``, :func:`layout_order` of the input, C-contiguous: a
    C-contiguous array, or channels-last memory for a channels-last input),
    sharing no memory with any array in ``reads`` (a dict of the names and
    arrays the op reads)."""
    if out is None:
        return
    check_tensor_like(out, shape, dtype, backend, name, like_name, like)
    if not getattr(out.flags, "writeable", True):
        raise ValueError(f"{name} must be writeable")
    identity = tuple(order) == identity_order(out.ndim)
    if not (out if identity else out.transpose(order)).flags.c_contiguous:
        kind = "C-contiguous" if identity else \
            f"contiguous in the axis order {tuple(order)} (the input's)"
        raise ValueError(f"{name} must be laid out as the result: {kind}")
    for n, a in reads.items():
        if a is not None and backend.xp.may_share_memory(out, a):
            raise ValueError(f"{name} must not share memory with {n}")


def check_grad_output(dy, shape, dtype, backend, name: str = "dy", like=None):
    """The incoming gradient of a backward: an array of the forward input's
    shape, dtype and array module, on the device of ``like`` (the saved
    input) when given."""
    check_tensor_like(dy, shape, dtype, backend, name, "the forward input", like)
