"""Synchronized batch normalization: statistics of the global batch across processes.

When a batch is split over several processes (one GPU or CPU worker each), every
rank normalizes with the mean and variance of the *whole* batch.  The
transport is an existing engine wrapped in a small communicator object:

* :class:`MPIComm` -- an ``mpi4py`` communicator; NumPy arrays, and CuPy arrays
  either staged through host memory (default) or handed to a CUDA-aware MPI
  (``cuda_aware=True``);
* :class:`NCCLComm` -- a ``cupy.cuda.nccl.NcclCommunicator``; CuPy arrays,
  collectives enqueued on the current CuPy stream.

Both offer the same two collectives on 1-D float64 buffers of the backend's
array module, which is all the layer uses (any object with ``rank``, ``size``,
``allgather`` and ``allreduce`` of :class:`Communicator`'s meaning works):

* forward (training): each rank computes its per-channel Welford triple
  ``(count, mean, M2)`` with the backend's statistics kernel, packs it into one
  buffer ``[status, count, mean[C], M2[C]]`` (``2C + 2`` float64 values) and
  **all-gathers** it; every rank merges the ``size`` triples with Chan's
  formula in rank order, so every rank holds bitwise the same mean, variance
  and running statistics.  Unequal batches and ranks with no samples are
  merged exactly.
* backward: one **all-reduce** of ``[status, sum dy[C], sum dy*xhat[C]]``
  (``2C + 1`` values), then each rank's ``dx`` with the global count.
  ``dweight`` / ``dbias`` come back as the global sums, identical on every
  rank: they are already all-reduced and must not be all-reduced again.

``status`` carries input errors: a rank whose own input is invalid still takes
part in the collective with ``status = 1`` and then raises its error, and the
other ranks raise :class:`RemoteRankError` instead of waiting forever (in the
backward on CuPy arrays they get NaN gradients instead: the status is not read
back there, so that the backward never synchronizes with the host).
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass
from typing import Any, Optional

import numpy as np

from . import _validation as V
from .backends import Backend, array_module, is_cupy_array
from .backends.base import update_running_stats
from .functional import BatchNormSaved, canonical_input, check_forward_options, to_acc
from .layers import BatchNorm


class RemoteRankError(RuntimeError):
    """Raised on every rank whose own input was fine when another rank's input
    was invalid in the same collective step (that rank raises its own error)."""


# --------------------------------------------------------------- helpers ----
def _to_host(a) -> np.ndarray:
    """NumPy copy of a NumPy/CuPy array (a device-to-host copy for CuPy)."""
    return a.get() if is_cupy_array(a) else np.asarray(a)


def check_buffer(buf, name: str = "buf"):
    """Raise ``ValueError`` unless ``buf`` is what a :class:`Communicator`
    collective takes: a contiguous 1-D float64 array."""
    if getattr(buf, "ndim", None) != 1 or buf.dtype != np.float64 or not buf.flags.c_contiguous:
        raise ValueError(f"{name} must be a contiguous 1-D float64 array, got "
                         f"{getattr(buf, 'shape', None)} {getattr(buf, 'dtype', type(buf).__name__)}")


# ---------------------------------------------------------- communicators ----
class Communicator:
    """The two collectives synchronized batch norm needs.

    ``rank`` / ``size`` identify this process; ``allgather(buf)`` returns a
    ``(size, n)`` array whose row ``r`` is rank ``r``'s ``buf``;
    ``allreduce(buf)`` returns the element-wise sum over ranks.  ``buf`` is a
    contiguous 1-D float64 array of the backend's array module (NumPy or CuPy)
    and the results live in the same module.  Every rank must call the same
    collectives in the same order with buffers of the same length.
    """

    rank: int = 0
    size: int = 1

    def allgather(self, buf):
        raise NotImplementedError

    def allreduce(self, buf):
        raise NotImplementedError

    def check_backend(self, backend: Backend) -> None:
        """Raise ``ValueError`` when this communicator cannot move the arrays of
        ``backend``."""

    default_backend: Optional[str] = None   # backend a layer gets when given none


def _check_mpi_comm(comm):
    for attr in ("Allgather", "Allreduce", "Get_rank", "Get_size"):
        if not hasattr(comm, attr):
            raise TypeError("comm must be an mpi4py communicator (such as MPI.COMM_WORLD), "
                            f"got {type(comm).__module__}.{type(comm).__name__}")


class MPIComm(Communicator):
    """Collectives over an ``mpi4py`` intra-communicator.

    NumPy buffers go to MPI directly.  CuPy buffers are staged through host
    memory (one device-to-host and one host-to-device copy of the small
    per-channel buffer) unless ``cuda_aware=True``, which hands the device
    buffers to MPI (mpi4py reads ``__cuda_array_interface__``; the MPI library
    must be built with CUDA support).  MPI knows nothing of CUDA streams, so
    the CUDA-aware path synchronizes the current stream before each call.
    """

    def __init__(self, comm=None, *, cuda_aware: bool = False):
        if comm is None:
            try:
                from mpi4py import MPI
            except ImportError as exc:
                raise RuntimeError(f"MPIComm needs mpi4py (pip install 'gpubn[mpi]'): {exc}") \
                    from exc
            comm = MPI.COMM_WORLD
        _check_mpi_comm(comm)
        if not isinstance(cuda_aware, (bool, np.bool_)):
            raise TypeError(f"cuda_aware must be a bool, got {type(cuda_aware).__name__}")
        self.comm = comm
        self.cuda_aware = bool(cuda_aware)
        self.rank = int(comm.Get_rank())
        self.size = int(comm.Get_size())

    @staticmethod
    def _sum_op():
        from mpi4py import MPI

        return MPI.SUM

    def _device_ready(self, buf) -> None:
        import cupy

        cupy.cuda.get_current_stream().synchronize()

    def allgather(self, buf):
        check_buffer(buf)
        if is_cupy_array(buf):
            if self.cuda_aware:
                import cupy

                out = cupy.empty((self.size, buf.size), dtype=np.float64)
                self._device_ready(buf)
                self.comm.Allgather(buf, out)
                return out
            host = np.empty((self.size, buf.size), dtype=np.float64)
            self.comm.Allgather(_to_host(buf), host)
            return array_module(buf).asarray(host)
        out = np.empty((self.size, buf.size), dtype=np.float64)
        self.comm.Allgather(buf, out)
        return out

    def allreduce(self, buf):
        check_buffer(buf)
        if is_cupy_array(buf):
            if self.cuda_aware:
                import cupy

                out = cupy.empty_like(buf)
                self._device_ready(buf)
                self.comm.Allreduce(buf, out, op=self._sum_op())
                return out
            host = np.empty(buf.size, dtype=np.float64)
            self.comm.Allreduce(_to_host(buf), host, op=self._sum_op())
            return array_module(buf).asarray(host)
        out = np.empty_like(buf)
        self.comm.Allreduce(buf, out, op=self._sum_op())
        return out

    def __repr__(self):
        return f"MPIComm(rank={self.rank}, size={self.size}, cuda_aware={self.cuda_aware})"


# NCCL's enum values (nccl.h), used when cupy.cuda.nccl cannot be imported.
NCCL_FLOAT64 = 8   # ncclFloat64 / ncclDouble
NCCL_SUM = 0       # ncclSum


def _nccl_constants():
    try:
        from cupy.cuda import nccl
    except ImportError:
        return NCCL_FLOAT64, NCCL_SUM
    return int(nccl.NCCL_FLOAT64), int(nccl.NCCL_SUM)


def _device_pointer(a) -> int:
    return int(a.data.ptr)


class NCCLComm(Communicator):
    """Collectives over a ``cupy.cuda.nccl.NcclCommunicator`` on CuPy arrays.

    The collectives are enqueued on ``stream`` (a ``cupy.cuda.Stream`` or a raw
    stream pointer), by default CuPy's current stream at call time, so they
    are ordered with the kernels around them without a host synchronization.
    ``NCCLComm.from_mpi(mpi_comm)`` builds the NCCL communicator, one process
    per GPU, with the unique id broadcast over MPI.
    """

    default_backend = "cuda"

    def __init__(self, comm, *, stream=None):
        for attr in ("allGather", "allReduce", "rank_id", "size"):
            if not hasattr(comm, attr):
                raise TypeError("comm must be a cupy.cuda.nccl.NcclCommunicator, got "
                                f"{type(comm).__module__}.{type(comm).__name__}")
        self.comm = comm
        self.stream = stream
        self.rank = int(comm.rank_id())
        self.size = int(comm.size())

    @classmethod
    def from_mpi(cls, mpi_comm=None, *, stream=None):
        """One NCCL communicator over the ranks of ``mpi_comm`` (default
        ``MPI.COMM_WORLD``); select each rank's GPU before calling."""
        from cupy.cuda import nccl

        if mpi_comm is None:
            from mpi4py import MPI

            mpi_comm = MPI.COMM_WORLD
        _check_mpi_comm(mpi_comm)
        uid = nccl.get_unique_id() if mpi_comm.Get_rank() == 0 else None
        uid = mpi_comm.bcast(uid, root=0)
        return cls(nccl.NcclCommunicator(mpi_comm.Get_size(), uid, mpi_comm.Get_rank()),
                   stream=stream)

    def _stream_ptr(self) -> int:
        if self.stream is None:
            import cupy

            return int(cupy.cuda.get_current_stream().ptr)
        return int(getattr(self.stream, "ptr", self.stream))

    def check_backend(self, backend: Backend) -> None:
        if backend.name != "cuda":
            raise ValueError("NCCLComm moves CuPy device arrays: use backend='cuda' "
                             f"(got backend {backend.name!r}); use MPIComm for NumPy arrays")

    def _empty(self, buf, shape):
        return array_module(buf).empty(shape, dtype=np.float64)

    def allgather(self, buf):
        check_buffer(buf)
        f64, _ = _nccl_constants()
        out = self._empty(buf, (self.size, buf.size))
        self.comm.allGather(_device_pointer(buf), _device_pointer(out), buf.size, f64,
                            self._stream_ptr())
        return out

    def allreduce(self, buf):
        check_buffer(buf)
        f64, op = _nccl_constants()
        out = self._empty(buf, (buf.size,))
        self.comm.allReduce(_device_pointer(buf), _device_pointer(out), buf.size, f64, op,
                            self._stream_ptr())
        return out

    def __repr__(self):
        return f"NCCLComm(rank={self.rank}, size={self.size})"


# ------------------------------------------------------- packing and merge ----
def forward_message_size(num_channels: int) -> int:
    """float64 values each rank contributes to the forward all-gather."""
    return 2 * int(num_channels) + 2


def backward_message_size(num_channels: int) -> int:
    """float64 values in the backward all-reduce."""
    return 2 * int(num_channels) + 1


def pack_stats(xp, num_channels: int, count: int = 0, mean=None, m2=None, failed=False):
    """``[status, count, mean[C], M2[C]]`` as float64 in ``xp``.  A rank with no
    samples (``count == 0``) or a failed one sends zero statistics, so that a
    NaN mean from an empty reduction never reaches the merge."""
    buf = xp.zeros(forward_message_size(num_channels), dtype=np.float64)
    if failed:
        buf[0] = 1.0
    elif count > 0:
        buf[1] = float(count)
        buf[2:2 + num_channels] = mean
        buf[2 + num_channels:] = m2
    return buf


def unpack_stats(gathered, num_channels: int):
    """Split an all-gathered ``(size, 2C + 2)`` array into
    ``(status, counts, means, m2s)`` (views)."""
    c = int(num_channels)
    if gathered.ndim != 2 or gathered.shape[1] != forward_message_size(c):
        raise ValueError(f"gathered statistics must have shape (size, {forward_message_size(c)}) "
                         f"for {c} channels, got {tuple(gathered.shape)}")
    return gathered[:, 0], gathered[:, 1], gathered[:, 2:2 + c], gathered[:, 2 + c:]


def merge_stats(counts, means, m2s, total=None):
    """Chan's merge of per-rank Welford triples, in rank order.

    ``counts`` is ``(size,)``, ``means`` and ``m2s`` are ``(size, C)`` (float64,
    any array module).  Returns ``(mean, m2)`` of the union:
    ``mean = sum_r n_r mean_r / n`` and
    ``M2 = sum_r M2_r + sum_r n_r (mean_r - mean)**2`` -- the k-piece form of
    ``M2 = M2_a + M2_b + d**2 n_a n_b / n``.  Ranks with ``n_r = 0`` contribute
    nothing.  The reductions run along the rank axis in a fixed order, so equal
    inputs give bitwise equal results on every rank.  ``total`` (the sum of the
    counts, when the caller already has it on the host) avoids a reduction.
    """
    n = counts[:, None]
    if total is None:
        total = counts.sum()
    with np.errstate(invalid="ignore", over="ignore"):   # NaN / Inf data propagate
        mean = (n * means).sum(axis=0) / total
        dev = means - mean
        m2 = m2s.sum(axis=0) + (n * dev * dev).sum(axis=0)
    return mean, m2


# -------------------------------------------------------------- functional ----
@dataclass
class SyncBatchNormSaved(BatchNormSaved):
    """:class:`BatchNormSaved` plus the communicator; ``count`` is the global
    number of values per channel, ``local_count`` this rank's."""

    comm: Any = None
    local_count: int = 0
    num_channels: int = 0


def is_communicator(obj) -> bool:
    """Whether ``obj`` can serve as a gpubn communicator: it has ``rank``,
    ``size``, ``allgather`` and ``allreduce`` (a :class:`Communicator` or
    any object shaped like one)."""
    return all(hasattr(obj, a) for a in ("allgather", "allreduce", "rank", "size"))


def _check_comm(comm):
    if not is_communicator(comm):
        raise TypeError("comm must be a gpubn communicator (MPIComm, NCCLComm or an object "
                        "with rank, size, allgather and allreduce), got "
                        f"{type(comm).__module__}.{type(comm).__name__}")


def _num_channels(num_features, x, axis, *vectors) -> int:
    """The channel count that sizes the collective: ``num_features`` when
    given, else the length of the first per-channel vector, else x's channel
    extent.  Raises when none is usable (that is a local-only failure: see the
    module notes)."""
    if num_features is not None:
        if isinstance(num_features, bool) or not isinstance(num_features, numbers.Integral):
            raise TypeError("num_features must be an int or None, got "
                            f"{type(num_features).__name__}")
        if num_features < 1:
            raise ValueError(f"num_features must be at least 1, got {num_features}")
        return int(num_features)
    for v in vectors:
        if v is not None and getattr(v, "ndim", None) == 1 and v.shape[0] >= 1:
            return int(v.shape[0])
    try:
        return int(x.shape[V.normalize_axis(axis, x.ndim)])
    except Exception as exc:
        raise TypeError("cannot tell the number of channels: give num_features=, or weight/"
                        f"running statistics, or a valid x ({exc})") from exc


def check_no_ghost(virtual_batch_size) -> None:
    """Synchronized batch norm has no ghost batch norm: it exists to
    normalize with the statistics of a batch *larger* than one rank's,
    ghost batch norm with those of groups *smaller* than it; the two ask for
    opposite things.  Raises ``ValueError`` for anything but None."""
    if virtual_batch_size is not None:
        raise ValueError(f"virtual_batch_size={virtual_batch_size!r} is not supported by sync "
                         "batch norm: it normalizes with the statistics of the global batch "
                         "over all ranks, ghost batch norm with those of small groups of one "
                         "rank's batch; use a per-rank BatchNorm(virtual_batch_size=...) for "
                         "ghost batch norm")


def _raise_for_status(status_host, comm, what: str):
    bad = [r for r, s in enumerate(status_host) if s != 0]
    if bad:
        raise RemoteRankError(f"{what}: invalid input on rank(s) {bad} of {comm.size} "
                              f"(see the error raised there); this rank ({comm.rank}) "
                              "was fine")


def sync_batch_norm_forward(x, *, comm, weight=None, bias=None, running_mean=None,
                            running_var=None, training=True, momentum=0.1, eps=1e-5, axis=1,
                            backend=None, num_batches_tracked=None, num_features=None,
                            guard_running_stats=False, virtual_batch_size=None):
    """:func:`gpubn.batch_norm_forward` over the global batch of all ranks of ``comm``.

    Every rank calls it with its own slice ``x`` of the batch (any number of
    samples, zero included: e.g. shape ``(0, C, H, W)``) and the same
    parameters.  Returns ``(y, saved)`` for this rank's slice; ``saved`` goes
    to :func:`sync_batch_norm_backward`.

    Training (``training=True``) costs one all-gather of ``2C + 2`` float64
    values per rank.  Normalization uses the global mean and biased variance;
    ``running_mean`` / ``running_var`` are updated in place with the global
    unbiased variance and end up bitwise identical on every rank (given equal
    starting values).  A global batch with one value per channel raises
    ``ValueError`` on every rank.  ``training=False`` normalizes with the
    running statistics and communicates nothing.

    ``num_features`` (the layer passes it) fixes the size of the exchange so
    that a rank whose ``x`` is malformed can still take part and every rank
    raises; without it the channel count comes from ``weight`` / the running
    statistics / ``x``.  Arguments that are the same on every rank in a
    data-parallel program (``comm``, ``eps``, ``momentum``, ``backend``,
    ``num_batches_tracked``) are checked before any communication and raise
    locally.

    ``guard_running_stats=True`` keeps a channel's running statistics for
    this step when its global batch mean or unbiased variance is not finite
    (as in :func:`gpubn.batch_norm_forward`; the decision is the same on
    every rank, since every rank holds the same global statistics) and sets
    ``saved.skipped``.  ``virtual_batch_size`` (ghost batch norm) is refused
    with ``ValueError``: see :func:`check_no_ghost`.
    """
    # ---- arguments shared by all ranks: raise before communicating ----
    _check_comm(comm)
    guard = V.check_flag(guard_running_stats, "guard_running_stats")
    check_no_ghost(virtual_batch_size)
    options = check_forward_options(x, training=training, momentum=momentum, eps=eps,
                                    backend=backend, num_batches_tracked=num_batches_tracked)
    be, training, eps = options.backend, options.training, options.eps
    if hasattr(comm, "check_backend"):
        comm.check_backend(be)
    c = _num_channels(num_features, x, axis, weight, bias, running_mean, running_var)
    xp = be.xp

    def check_vectors(xc, be, axis_, order):
        if xc != c:
            raise ValueError(f"x has {xc} channels on axis {axis_} "
                             f"(shape {tuple(x.shape)}), expected {c}")
        V.check_bn_vectors(weight, bias, running_mean, running_var, c, be, training, like=x)

    # ---- this rank's arrays: on failure still take part, then raise ----
    try:
        f = canonical_input(x, options, weight=weight, bias=bias, axis=axis,
                            check_vectors=check_vectors, local=True)
    except (TypeError, ValueError):
        if training:
            comm.allgather(pack_stats(xp, c, failed=True))
        raise
    x3, w, b, acc, shape, local_count = f.x3, f.weight, f.bias, f.acc, f.shape, f.count
    skipped = None

    if not training:
        if local_count > 0:
            y3, mean, invstd = be.bn_forward_eval(x3, w, b, to_acc(xp, running_mean, acc),
                                                  to_acc(xp, running_var, acc), eps)
        else:
            mean = to_acc(xp, running_mean, acc).copy()
            invstd = (1.0 / xp.sqrt(to_acc(xp, running_var, np.float64) + eps)).astype(acc)
            y3 = x3.copy()
    else:
        # ---- one all-gather of the per-rank Welford triples ----
        if local_count > 0:
            st = be.bn_stats(x3)
            buf = pack_stats(xp, c, local_count, st.mean, st.m2)
        else:
            buf = pack_stats(xp, c)
        gathered = comm.allgather(buf)
        status, counts, means, m2s = unpack_stats(gathered, c)
        head = _to_host(gathered[:, :2])          # (status, count) per rank: 2*size values
        _raise_for_status(head[:, 0], comm, "sync_batch_norm_forward")
        global_count = int(round(float(head[:, 1].sum())))
        V.check_count(global_count, True, shape)  # the same on every rank
        mean64, m2 = merge_stats(counts, means, m2s, total=float(global_count))
        invstd64 = 1.0 / xp.sqrt(m2 / global_count + eps)
        mean = mean64.astype(acc)
        invstd = invstd64.astype(acc)
        if running_mean is not None:
            if guard:
                skipped = xp.empty(c, dtype=np.int32)
            update_running_stats(xp, running_mean, running_var, mean64, m2 / (global_count - 1),
                                 f.factor, skipped)
        y3 = be.bn_apply(x3, mean, invstd, w, b) if local_count > 0 else x3.copy()
        f.count = global_count

    saved = f.saved(mean, invstd, w, cls=SyncBatchNormSaved, comm=comm,
                    local_count=local_count, num_channels=c, skipped=skipped)
    return f.output(y3), saved


def _pack_grads(xp, c, sum_dy=None, sum_dy_xhat=None, failed=False):
    buf = xp.zeros(backward_message_size(c), dtype=np.float64)
    if failed:
        buf[0] = 1.0
        buf[1:] = np.nan    # device paths do not read the status: poison, never hang
    elif sum_dy is not None:
        buf[1:1 + c] = sum_dy
        buf[1 + c:] = sum_dy_xhat
    return buf


def sync_batch_norm_backward(dy, saved: SyncBatchNormSaved, *, local_param_grads=False):
    """Gradients of :func:`sync_batch_norm_forward`: ``(dx, dweight, dbias)``.

    ``dx`` is this rank's slice of the gradient of the global batch.
    ``dweight`` / ``dbias`` are the sums over **all** ranks (the gradient of the
    sum of every rank's loss), identical on every rank: they are already
    all-reduced, so exclude them from any later gradient all-reduce (or
    divide as your averaging convention needs).  One all-reduce of
    ``2C + 1`` float64 values, after a training forward and after an eval one.

    An invalid ``dy`` on one rank: that rank raises its error after taking
    part in the all-reduce; with NumPy arrays the others raise
    :class:`RemoteRankError`; with CuPy arrays (any communicator) the status
    is not read back, to keep the backward free of host synchronization, and
    their gradients come out NaN.

    ``local_param_grads=True`` returns this rank's own sums as ``dweight`` /
    ``dbias`` instead (``dx`` is the same): the convention of
    ``torch.nn.SyncBatchNorm``, for a data-parallel wrapper (such as
    PyTorch's DistributedDataParallel) that all-reduces the parameter
    gradients itself.
    """
    local_param_grads = V.check_flag(local_param_grads, "local_param_grads")
    if not isinstance(saved, SyncBatchNormSaved):
        raise TypeError("saved must be the SyncBatchNormSaved returned by "
                        f"sync_batch_norm_forward, got {type(saved).__name__}")
    be, comm, c = saved.backend, saved.comm, saved.num_channels
    xp = be.xp
    try:
        V.check_grad_output(dy, saved.shape, saved.dtype, be, like=saved.x3)
    except (TypeError, ValueError):
        comm.allreduce(_pack_grads(xp, c, failed=True))
        raise

    dy3 = V.canonical_view(dy, saved.axis, xp, saved.order)
    x3, mean, invstd = saved.x3, saved.mean, saved.invstd
    acc = np.dtype(mean.dtype)
    nonempty = saved.local_count > 0
    dx3 = None
    if not saved.training:          # statistics fixed: dx is local, sums are shared
        if nonempty:
            dx3, sdxh, sdy = be.bn_backward(dy3, x3, mean, invstd, saved.weight, False)
            buf = _pack_grads(xp, c, sdy, sdxh)
        else:
            buf = _pack_grads(xp, c)
    else:
        buf = _pack_grads(xp, c, *be.bn_backward_reduce(dy3, x3, mean, invstd)) \
            if nonempty else _pack_grads(xp, c)
    total = comm.allreduce(buf)
    if not is_cupy_array(total):
        _raise_for_status([float(total[0])], comm, "sync_batch_norm_backward")
    sum_dy = total[1:1 + c].astype(acc)
    sum_dy_xhat = total[1 + c:].astype(acc)
    param_sums = buf if local_param_grads else total
    if saved.training:
        dx3 = (be.bn_backward_dx(dy3, x3, mean, invstd, saved.weight, sum_dy, sum_dy_xhat,
                                 saved.count) if nonempty else dy3.copy())
    elif dx3 is None:
        dx3 = dy3.copy()
    dweight = None if saved.weight_dtype is None else \
        param_sums[1 + c:].astype(acc).astype(saved.weight_dtype, copy=False)
    dbias = None if saved.bias_dtype is None else \
        param_sums[1:1 + c].astype(acc).astype(saved.bias_dtype, copy=False)
    return V.from_canonical(dx3, saved.shape, saved.order), dweight, dbias


# ------------------------------------------------------------------- layer ----
class SyncBatchNorm(BatchNorm):
    """:class:`gpubn.BatchNorm` whose training statistics are those of the
    global batch over all ranks of ``comm`` (an :class:`MPIComm`, an
    :class:`NCCLComm` or another :class:`Communicator`).

    Same arguments, modes and ``state_dict`` as ``BatchNorm``, plus the
    keyword ``comm``.  With an ``NCCLComm`` the backend defaults to ``cuda``.
    ``grad_weight`` / ``grad_bias`` after ``backward`` are the global sums,
    already identical on every rank: do not all-reduce them again.  Every rank
    must call forward and backward the same number of times in the same mode
    (each is a collective, or none in eval-mode forward).

    ``guard_running_stats=True`` works as in ``BatchNorm`` (on the global
    statistics, so ``skipped_updates`` agrees across ranks);
    ``virtual_batch_size`` raises ``ValueError`` (see :func:`check_no_ghost`).
    """

    def __init__(self, num_features, eps=1e-5, momentum=0.1, affine=True,
                 track_running_stats=True, axis=1, dtype="float32", backend=None, *, comm,
                 guard_running_stats=False, virtual_batch_size=None):
        _check_comm(comm)
        check_no_ghost(virtual_batch_size)
        if backend is None:
            backend = getattr(comm, "default_backend", None)
        super().__init__(num_features, eps=eps, momentum=momentum, affine=affine,
                         track_running_stats=track_running_stats, axis=axis, dtype=dtype,
                         backend=backend, guard_running_stats=guard_running_stats)
        if hasattr(comm, "check_backend"):
            comm.check_backend(self.backend)
        self.comm = comm

    def _functional_forward(self, x, **kwargs):
        if "residual" in kwargs:
            raise TypeError("SyncBatchNorm has no residual / activation epilogue: call it "
                            "without residual= and apply the add and ReLU after it")
        return sync_batch_norm_forward(x, comm=self.comm, num_features=self.num_features,
                                       **kwargs)

    def _functional_backward(self, dy, saved):
        return sync_batch_norm_backward(dy, saved)

    def __repr__(self):
        return "Sync" + super().__repr__()[:-1] + f", comm={self.comm!r})"


__all__ = [
    "Communicator", "MPIComm", "NCCLComm", "RemoteRankError", "SyncBatchNorm",
    "SyncBatchNormSaved", "sync_batch_norm_forward", "sync_batch_norm_backward",
    "pack_stats", "unpack_stats", "merge_stats", "forward_message_size",
    "backward_message_size", "check_buffer", "check_no_ghost",
]
