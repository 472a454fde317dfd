"""A drop-in for PyTorch's batch norm layers, running gpubn's kernels.

``gpubn.torch.BatchNorm1d/2d/3d`` subclass ``torch.nn.BatchNorm1d/2d/3d``:
same constructor (plus a keyword-only ``backend``), parameters, buffers,
``state_dict`` keys and train/eval behaviour; their forward and backward go
through gpubn (:func:`gpubn.batch_norm_forward` / :func:`gpubn.batch_norm_backward`)
inside a ``torch.autograd.Function``.  :func:`convert` turns the batch norm
layers of an existing model into these in place, :func:`revert` undoes it.

Tensors reach gpubn without a copy: CPU tensors as NumPy views (bfloat16 as
an ``int16`` view re-typed to ``ml_dtypes.bfloat16``), CUDA tensors as CuPy
arrays through DLPack, launched on PyTorch's current stream.  A
``torch.channels_last`` (or ``channels_last_3d``) input is normalized in its
own memory order (channels-last, ``axis=-1``) and the output keeps that
layout.  float16 / bfloat16 inputs work with float32 parameters and running
statistics (what autocast produces), statistics in float32.

``torch.compile``: the gpubn call is excluded from tracing
(``torch.compiler.disable``), so a compiled model runs it eagerly between
graphs: a graph break where a batch norm layer runs, results unchanged.

Importing this module needs PyTorch (extra ``gpubn[torch]``) but not CuPy;
``import gpubn`` never imports it.
"""

from __future__ import annotations

import contextlib

import numpy as np

try:
    import torch
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError("gpubn.torch needs PyTorch: pip install 'gpubn[torch]'") from exc
from torch.autograd.function import once_differentiable

from . import _validation as V
from .backends import BACKENDS
from .functional import batch_norm_backward, batch_norm_forward

__all__ = ["BatchNorm1d", "BatchNorm2d", "BatchNorm3d", "as_array", "as_tensor", "batch_norm",
           "convert", "revert"]


# ------------------------------------------------- tensors <-> arrays ----
def _bfloat16():
    try:
        import ml_dtypes
    except ImportError:
        raise TypeError("bfloat16 tensors need ml_dtypes (pip install 'gpubn[bfloat16]'): "
                        "it provides the bfloat16 dtype of NumPy and CuPy arrays") from None
    return np.dtype(ml_dtypes.bfloat16)


def as_array(t):
    """The NumPy (CPU) or CuPy (CUDA) array sharing ``t``'s memory, without a
    copy; None passes through.  bfloat16 crosses as ``int16`` and is re-typed
    to ``ml_dtypes.bfloat16`` on the other side (NumPy has no bfloat16 of its
    own, and CuPy's DLPack exchange of it is recent)."""
    if t is None:
        return None
    t = t.detach()
    bf16 = t.dtype == torch.bfloat16
    if bf16:
        t = t.view(torch.int16)
    if t.device.type == "cpu":
        a = t.numpy()
    elif t.device.type == "cuda":
        import cupy

        a = cupy.from_dlpack(t)
    else:
        raise TypeError(f"gpubn runs on CPU and CUDA tensors, got a tensor on {t.device}")
    return a.view(_bfloat16()) if bf16 else a


def as_tensor(a):
    """The tensor sharing the memory of a NumPy or CuPy array (no copy)."""
    if a is None:
        return None
    bf16 = a.dtype.name == "bfloat16"
    if bf16:
        a = a.view(np.int16)
    t = torch.from_numpy(a) if isinstance(a, np.ndarray) else torch.from_dlpack(a)
    return t.view(torch.bfloat16) if bf16 else t


def _stream_of(t):
    """Context that makes CuPy launch on PyTorch's current stream of ``t``'s
    device (nothing for CPU tensors)."""
    if t.device.type != "cuda":
        return contextlib.nullcontext()
    import cupy

    stack = contextlib.ExitStack()
    stack.enter_context(cupy.cuda.Device(t.device.index))
    stream = torch.cuda.current_stream(t.device)
    stack.enter_context(cupy.cuda.ExternalStream(stream.cuda_stream, t.device.index))
    return stack


def _channels_last_order(x):
    """The permutation that puts a channels-last input's channel axis last in
    memory order (its NHWC view is contiguous), or None to keep axis 1."""
    if x.is_contiguous():
        return None
    if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last):
        return (0, 2, 3, 1)
    if x.dim() == 5 and x.is_contiguous(memory_format=torch.channels_last_3d):
        return (0, 2, 3, 4, 1)
    return None


def _inverse(order):
    return tuple(int(i) for i in np.argsort(order))


# ------------------------------------------------------- autograd ----
class _BatchNormFunction(torch.autograd.Function):
    """gpubn's forward and backward as one autograd node.  ``ctx.gpubn``
    holds gpubn's saved state (statistics in float32 for narrow inputs) and
    the channels-last order."""

    @staticmethod
    def forward(ctx, x, weight, bias, running_mean, running_var, training, momentum, eps,
                backend, virtual_batch_size, skipped_updates):
        order = _channels_last_order(x)
        xv = x if order is None else x.permute(order)
        with _stream_of(x):
            y, saved = batch_norm_forward(
                as_array(xv), weight=as_array(weight), bias=as_array(bias),
                running_mean=as_array(running_mean), running_var=as_array(running_var),
                training=training, momentum=momentum, eps=eps,
                axis=1 if order is None else -1, backend=backend,
                guard_running_stats=skipped_updates is not None,
                virtual_batch_size=virtual_batch_size)
            y = as_tensor(y)
            if saved.skipped is not None:
                skipped_updates.add_(as_tensor(saved.skipped).sum())
        ctx.gpubn = (saved, order)
        # gpubn's saved state refers to x's and weight's memory: keep them
        # alive, and let autograd refuse a backward after an in-place change
        ctx.save_for_backward(x, weight)
        return y if order is None else y.permute(_inverse(order))

    @staticmethod
    @once_differentiable
    def backward(ctx, dy):
        saved, order = ctx.gpubn
        ctx.saved_tensors  # noqa: B018 -- raises if x was modified in place
        dyv = dy if order is None else dy.permute(order)
        with _stream_of(dy):
            grads = [as_tensor(g) for g in batch_norm_backward(as_array(dyv), saved)]
        if order is not None:
            grads[0] = grads[0].permute(_inverse(order))
        return (*grads, None, None, None, None, None, None, None, None)


def _check_devices(x, *tensors):
    for t in tensors:
        if t is not None and t.device != x.device:
            raise ValueError(f"input is on {x.device} but the layer's parameters and buffers "
                             f"are on {t.device}: move one of them (layer.to(device))")


@torch.compiler.disable
def batch_norm(input, running_mean, running_var, weight=None, bias=None, training=False,
               momentum=0.1, eps=1e-5, *, backend=None, virtual_batch_size=None,
               skipped_updates=None):
    """``torch.nn.functional.batch_norm`` on gpubn (same arguments; channel
    axis 1).  ``backend``: a gpubn backend name, or None to choose from the
    tensors (CPU -> a NumPy backend, CUDA -> ``cuda``).
    ``virtual_batch_size``: ghost batch norm in training (see
    ``gpubn.batch_norm_forward``).  ``skipped_updates``: a 0-d integer
    tensor turns ``guard_running_stats`` on and is incremented in place by
    the number of channels whose running-statistics update was skipped."""
    if not isinstance(input, torch.Tensor):
        raise TypeError(f"input must be a torch.Tensor, got {type(input).__name__}")
    if skipped_updates is not None and (
            not isinstance(skipped_updates, torch.Tensor) or skipped_updates.dim() != 0
            or skipped_updates.dtype.is_floating_point):
        raise TypeError("skipped_updates must be a 0-d integer torch.Tensor or None")
    _check_devices(input, running_mean, running_var, weight, bias, skipped_updates)
    return _BatchNormFunction.apply(input, weight, bias, running_mean, running_var,
                                    bool(training), momentum, eps, backend, virtual_batch_size,
                                    skipped_updates)


# --------------------------------------------------------- modules ----
def _check_backend(backend):
    if backend is not None and backend not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(map(repr, BACKENDS))} or None, "
                         f"got {backend!r}")
    return backend


class _GpubnBatchNorm:
    """The forward shared by the drop-ins: ``torch.nn.modules.batchnorm._BatchNorm.forward``'s
    logic, with the batch counter moved past the call so a bad input changes
    nothing."""

    backend = None       # gpubn backend name; None: chosen per call from the input
    virtual_batch_size = None    # ghost batch norm in training (k samples per group)
    guard_running_stats = False  # then the buffer ``skipped_updates`` counts skipped updates

    def __init__(self, *args, backend=None, guard_running_stats=False, virtual_batch_size=None,
                 **kwargs):
        guard = V.check_flag(guard_running_stats, "guard_running_stats")
        if virtual_batch_size is not None:
            V.check_virtual_batch_size(virtual_batch_size, (virtual_batch_size,), 1)
        super().__init__(*args, **kwargs)
        self.backend = _check_backend(backend)
        self.virtual_batch_size = virtual_batch_size
        self.guard_running_stats = guard and self.track_running_stats
        if self.guard_running_stats:
            self.register_buffer("skipped_updates",
                                 torch.zeros((), dtype=torch.long,
                                             device=self.running_mean.device))

    def forward(self, input):
        self._check_input_dim(input)
        factor = 0.0 if self.momentum is None else self.momentum
        count = self.training and self.track_running_stats and self.num_batches_tracked is not None
        if count and self.momentum is None:          # cumulative average over the batches
            factor = 1.0 / float(self.num_batches_tracked + 1)
        use_batch_stats = self.training or (self.running_mean is None and self.running_var is None)
        pass_running = not self.training or self.track_running_stats
        y = batch_norm(input, self.running_mean if pass_running else None,
                       self.running_var if pass_running else None, self.weight, self.bias,
                       use_batch_stats, factor, self.eps, backend=self.backend,
                       virtual_batch_size=self.virtual_batch_size if self.training else None,
                       skipped_updates=self.skipped_updates if self.guard_running_stats
                       and self.training else None)
        if count:
            self.num_batches_tracked.add_(1)
        return y

    def extra_repr(self):
        extra = f", backend={self.backend!r}"
        if self.guard_running_stats:
            extra += ", guard_running_stats=True"
        if self.virtual_batch_size is not None:
            extra += f", virtual_batch_size={self.virtual_batch_size}"
        return super().extra_repr() + extra


class BatchNorm1d(_GpubnBatchNorm, torch.nn.BatchNorm1d):
    """``torch.nn.BatchNorm1d`` on gpubn's kernels ((N, C) or (N, C, L) input)."""


class BatchNorm2d(_GpubnBatchNorm, torch.nn.BatchNorm2d):
    """``torch.nn.BatchNorm2d`` on gpubn's kernels (NCHW, contiguous or channels_last)."""


class BatchNorm3d(_GpubnBatchNorm, torch.nn.BatchNorm3d):
    """``torch.nn.BatchNorm3d`` on gpubn's kernels (NCDHW, contiguous or channels_last_3d)."""


_DROP_INS = {torch.nn.BatchNorm1d: BatchNorm1d, torch.nn.BatchNorm2d: BatchNorm2d,
             torch.nn.BatchNorm3d: BatchNorm3d}
_ORIGINALS = {v: k for k, v in _DROP_INS.items()}


def convert(module, *, backend=None):
    """Make every ``torch.nn.BatchNorm1d/2d/3d`` in ``module``'s tree (the
    module itself included) a gpubn drop-in, in place: the same objects with
    the same parameters, buffers, devices and hooks (an optimizer holding the
    parameters keeps working).  Subclasses of those layers and SyncBatchNorm
    are left alone.  Returns ``module``."""
    if not isinstance(module, torch.nn.Module):
        raise TypeError(f"module must be a torch.nn.Module, got {type(module).__name__}")
    _check_backend(backend)
    for m in module.modules():
        drop_in = _DROP_INS.get(type(m))
        if drop_in is not None:
            m.__class__ = drop_in
            m.backend = backend
    return module


def revert(module):
    """Undo :func:`convert` in place: gpubn drop-ins become the
    ``torch.nn.BatchNorm*d`` they replace.  Returns ``module``."""
    if not isinstance(module, torch.nn.Module):
        raise TypeError(f"module must be a torch.nn.Module, got {type(module).__name__}")
    for m in module.modules():
        original = _ORIGINALS.get(type(m))
        if original is not None:
            m.__class__ = original
            for name in ("backend", "virtual_batch_size", "guard_running_stats"):
                m.__dict__.pop(name, None)
    return module
