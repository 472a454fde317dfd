"""A drop-in for PyTorch's batch norm layers, running gpubn's kernels.

``gpubn.torch.BatchNorm1d/2d/3d`` subclass ``torch.nn.BatchNorm1d/2d/3d``:
same constructor (plus a keyword-only ``backend``), parameters, buffers,
``state_dict`` keys and train/eval behaviour; their forward and backward go
through gpubn (:func:`gpubn.batch_norm_forward` / :func:`gpubn.batch_norm_backward`)
inside a ``torch.autograd.Function``.  ``gpubn.torch.SyncBatchNorm`` does the
same for ``torch.nn.SyncBatchNorm`` with gpubn's sync batch norm, its
collectives run by ``torch.distributed`` on the layer's process group
(:class:`ProcessGroupComm`).  :func:`convert` turns the batch norm layers of
an existing model into these in place, :func:`revert` undoes it.

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
import functools

import numpy as np

try:
    import torch
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError("gpubn.torch needs PyTorch: pip install 'gpubn[torch]'") from exc
from torch.autograd.function import once_differentiable

from . import _validation as V
from .backends import BACKENDS
from .distributed import (Communicator, check_buffer, check_no_ghost, is_communicator,
                          sync_batch_norm_backward, sync_batch_norm_forward)
from .functional import batch_norm_backward, batch_norm_forward

__all__ = ["BatchNorm1d", "BatchNorm2d", "BatchNorm3d", "ProcessGroupComm", "SyncBatchNorm",
           "as_array", "as_tensor", "batch_norm", "convert", "revert", "sync_batch_norm"]


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
class _NormFunction(torch.autograd.Function):
    """A gpubn forward and its backward as one autograd node.  ``forward``
    (``batch_norm_forward`` or ``sync_batch_norm_forward`` with its fixed
    arguments bound) gets the arrays, the channel axis, the guard and
    ``options``; ``backward(dy, saved)`` returns ``(dx, dweight, dbias)``.
    ``ctx.gpubn`` holds gpubn's saved state (statistics in float32 for
    narrow inputs), the channels-last order and the backward."""

    @staticmethod
    def forward(ctx, x, weight, bias, running_mean, running_var, skipped_updates, forward,
                backward, options):
        order = _channels_last_order(x)
        xv = x if order is None else x.permute(order)
        with _stream_of(x):
            y, saved = forward(
                as_array(xv), weight=as_array(weight), bias=as_array(bias),
                running_mean=as_array(running_mean), running_var=as_array(running_var),
                axis=1 if order is None else -1,
                guard_running_stats=skipped_updates is not None, **options)
            y = as_tensor(y)
            if saved.skipped is not None:
                skipped_updates.add_(as_tensor(saved.skipped).sum())
        ctx.gpubn = (saved, order, backward)
        # gpubn's saved state refers to x's and weight's memory: keep them
        # alive, and let autograd refuse a backward after an in-place change
        ctx.save_for_backward(x, weight)
        return y if order is None else y.permute(_inverse(order))

    @staticmethod
    @once_differentiable
    def backward(ctx, dy):
        saved, order, backward = ctx.gpubn
        ctx.saved_tensors  # noqa: B018 -- raises if x was modified in place
        dyv = dy if order is None else dy.permute(order)
        with _stream_of(dy):
            grads = [as_tensor(g) for g in backward(as_array(dyv), saved)]
        if order is not None:
            grads[0] = grads[0].permute(_inverse(order))
        return (*grads, None, None, None, None, None, None)


def _check_devices(x, *tensors):
    for t in tensors:
        if t is not None and t.device != x.device:
            raise ValueError(f"input is on {x.device} but the layer's parameters and buffers "
                             f"are on {t.device}: move one of them (layer.to(device))")


def _check_call(input, skipped_updates, *tensors):
    """The checks the functional entry points share, before anything runs."""
    if not isinstance(input, torch.Tensor):
        raise TypeError(f"input must be a torch.Tensor, got {type(input).__name__}")
    if skipped_updates is not None and (
            not isinstance(skipped_updates, torch.Tensor) or skipped_updates.dim() != 0
            or skipped_updates.dtype.is_floating_point):
        raise TypeError("skipped_updates must be a 0-d integer torch.Tensor or None")
    _check_devices(input, *tensors, skipped_updates)


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
    _check_call(input, skipped_updates, running_mean, running_var, weight, bias)
    return _NormFunction.apply(input, weight, bias, running_mean, running_var, skipped_updates,
                               batch_norm_forward, batch_norm_backward,
                               dict(training=bool(training), momentum=momentum, eps=eps,
                                    backend=backend, virtual_batch_size=virtual_batch_size))


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
        y = self._normalize(input, self.running_mean if pass_running else None,
                            self.running_var if pass_running else None, use_batch_stats, factor)
        if count:
            self.num_batches_tracked.add_(1)
        return y

    def _skipped_arg(self):
        """The counter the guard increments this call (None: no guard)."""
        return self.skipped_updates if self.guard_running_stats and self.training else None

    def _normalize(self, input, running_mean, running_var, use_batch_stats, factor):
        if input.numel() == 0:
            # gpubn refuses an empty batch; a drop-in must behave as torch's
            # layer does (an empty output, the running statistics kept)
            return torch.nn.functional.batch_norm(
                input, running_mean, running_var, self.weight, self.bias, use_batch_stats,
                factor, self.eps)
        return batch_norm(input, running_mean, running_var, self.weight, self.bias,
                          use_batch_stats, factor, self.eps, backend=self.backend,
                          virtual_batch_size=self.virtual_batch_size if self.training else None,
                          skipped_updates=self._skipped_arg())

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


class SyncBatchNorm(_GpubnBatchNorm, torch.nn.SyncBatchNorm):
    """``torch.nn.SyncBatchNorm`` on gpubn's sync batch norm
    (:func:`gpubn.sync_batch_norm_forward` / ``_backward``).

    Same constructor (plus the keywords ``backend`` and
    ``guard_running_stats``), parameters, buffers, ``state_dict`` keys and
    modes as PyTorch's.  In training, when ``torch.distributed`` is
    initialized and ``process_group`` (default: the world) has more than one
    rank, the statistics are those of the global batch: each forward
    all-gathers every rank's per-channel ``(count, mean, M2)`` and each
    backward all-reduces the two per-channel sums, through
    :class:`ProcessGroupComm` (``torch.distributed`` on the group: NCCL for
    CUDA tensors, gloo for CPU tensors as well).  Otherwise (eval mode, one
    rank, no process group) it is :class:`BatchNorm2d`'s plain batch norm
    and communicates nothing, as PyTorch's does.

    As in PyTorch, ``weight.grad`` / ``bias.grad`` are this rank's own sums:
    the data-parallel wrapper (DistributedDataParallel) all-reduces them.

    Unlike PyTorch's, CPU tensors synchronize too (over a gloo group), and
    ``process_group`` may also be a gpubn communicator
    (:class:`gpubn.NCCLComm`, :class:`gpubn.MPIComm`, ...), used as it is.
    ``virtual_batch_size`` is refused with ``ValueError``: ghost batch norm
    normalizes groups smaller than a rank's batch, sync batch norm a batch
    larger than it.
    """

    def __init__(self, *args, virtual_batch_size=None, **kwargs):
        check_no_ghost(virtual_batch_size)
        super().__init__(*args, **kwargs)

    def _communicator(self):
        """The communicator a training forward synchronizes over, or None
        when there is nothing to synchronize with (PyTorch's rule)."""
        group = self.process_group
        if is_communicator(group):
            return group if group.size > 1 else None
        if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
            return None
        comm = ProcessGroupComm(group)
        return comm if comm.size > 1 else None

    def _normalize(self, input, running_mean, running_var, use_batch_stats, factor):
        comm = self._communicator() if self.training else None
        if comm is None:
            return super()._normalize(input, running_mean, running_var, use_batch_stats, factor)
        return sync_batch_norm(input, running_mean, running_var, self.weight, self.bias, factor,
                               self.eps, process_group=comm, backend=self.backend,
                               skipped_updates=self._skipped_arg(),
                               num_features=self.num_features)

    @classmethod
    def convert_sync_batchnorm(cls, module, process_group=None, *, backend=None):
        """``torch.nn.SyncBatchNorm.convert_sync_batchnorm`` giving gpubn's
        SyncBatchNorm: every batch norm layer of ``module`` becomes one
        (new modules, as PyTorch's does), synchronized over
        ``process_group``.  Returns the converted module."""
        return convert(torch.nn.SyncBatchNorm.convert_sync_batchnorm(module, process_group),
                       backend=backend)


# ------------------------------------------------ torch.distributed ----
class ProcessGroupComm(Communicator):
    """A gpubn communicator (see :class:`gpubn.distributed.Communicator`)
    running ``torch.distributed`` collectives on ``group`` (None: the world
    group of the initialized default process group).

    The float64 buffers cross to tensors without a copy (NumPy arrays as CPU
    tensors, CuPy arrays through DLPack); the collectives are synchronous,
    ordered after the work already queued on PyTorch's current stream (the
    stream gpubn's kernels run on inside the drop-ins).  Any backend that
    has ``all_gather`` and ``all_reduce`` for the tensors' device works:
    NCCL for CUDA tensors, gloo for CPU (and CUDA) tensors.
    """

    def __init__(self, group=None):
        dist = torch.distributed
        if not (dist.is_available() and dist.is_initialized()):
            raise RuntimeError("ProcessGroupComm needs an initialized torch.distributed process "
                               "group: call torch.distributed.init_process_group first")
        self.group = group
        self.rank = int(dist.get_rank(group))
        self.size = int(dist.get_world_size(group))
        if self.rank < 0:
            raise ValueError(f"this process (global rank {dist.get_rank()}) is not a member of "
                             "the process group")
        self.nccl = str(dist.get_backend(group)).lower() == "nccl"

    def check_backend(self, backend) -> None:
        if self.nccl and backend.name != "cuda":
            raise ValueError("the process group runs on NCCL, which moves CUDA tensors only: "
                             f"got gpubn backend {backend.name!r} (CPU tensors need a gloo "
                             "group)")

    def allgather(self, buf):
        check_buffer(buf)
        t = as_tensor(buf)
        out = torch.empty((self.size, t.numel()), dtype=t.dtype, device=t.device)
        torch.distributed.all_gather(list(out.unbind(0)), t, group=self.group)
        return as_array(out)

    def allreduce(self, buf):
        check_buffer(buf)
        out = as_tensor(buf).clone()
        torch.distributed.all_reduce(out, group=self.group)
        return as_array(out)

    def __repr__(self):
        return f"ProcessGroupComm(rank={self.rank}, size={self.size})"


def _comm_for(process_group):
    return process_group if is_communicator(process_group) else ProcessGroupComm(process_group)


@torch.compiler.disable
def sync_batch_norm(input, running_mean, running_var, weight=None, bias=None, momentum=0.1,
                    eps=1e-5, *, process_group=None, backend=None, skipped_updates=None,
                    num_features=None):
    """Training-mode batch norm over the global batch of ``process_group``'s
    ranks (a ``torch.distributed`` group, None for the world, or a gpubn
    communicator), as an autograd function: the forward all-gathers the
    per-channel statistics, the backward all-reduces the two per-channel
    sums; ``weight`` / ``bias`` get this rank's own gradient sums (PyTorch's
    convention).  ``running_mean`` / ``running_var`` (or None) are updated
    in place with the global statistics; ``skipped_updates`` as in
    :func:`batch_norm`.  ``num_features`` sizes the collectives (default:
    the length of ``weight`` or the running statistics, else the input's
    channel count), so that a rank whose input has the wrong channel count
    still takes part, raises its error, and the other ranks raise
    ``gpubn.RemoteRankError`` instead of waiting.  Every rank must call it,
    and its backward, alike."""
    _check_call(input, skipped_updates, running_mean, running_var, weight, bias)
    comm = _comm_for(process_group)
    forward = functools.partial(sync_batch_norm_forward, comm=comm, num_features=num_features)
    backward = functools.partial(sync_batch_norm_backward, local_param_grads=True)
    return _NormFunction.apply(input, weight, bias, running_mean, running_var, skipped_updates,
                               forward, backward,
                               dict(training=True, momentum=momentum, eps=eps, backend=backend))


# ---------------------------------------------------- convert/revert ----
_DROP_INS = {torch.nn.BatchNorm1d: BatchNorm1d, torch.nn.BatchNorm2d: BatchNorm2d,
             torch.nn.BatchNorm3d: BatchNorm3d, torch.nn.SyncBatchNorm: SyncBatchNorm}
_ORIGINALS = {v: k for k, v in _DROP_INS.items()}


def convert(module, *, backend=None):
    """Make every ``torch.nn.BatchNorm1d/2d/3d`` and ``torch.nn.SyncBatchNorm``
    in ``module``'s tree (the module itself included) a gpubn drop-in, in
    place: the same objects with the same parameters, buffers, devices,
    hooks and process group (an optimizer holding the parameters keeps
    working).  Subclasses of those layers are left alone.  Returns
    ``module``."""
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
    """Undo :func:`convert` in place: gpubn drop-ins become the PyTorch
    layers they replace, with exactly those layers' parameters and buffers
    (a guard's ``skipped_updates`` count is dropped, since PyTorch's layers
    have no such key and ``load_state_dict`` into one would fail on it).
    Returns ``module``."""
    if not isinstance(module, torch.nn.Module):
        raise TypeError(f"module must be a torch.nn.Module, got {type(module).__name__}")
    for m in module.modules():
        original = _ORIGINALS.get(type(m))
        if original is not None:
            m.__class__ = original
            for name in ("backend", "virtual_batch_size", "guard_running_stats"):
                m.__dict__.pop(name, None)
            m._buffers.pop("skipped_updates", None)
    return module
