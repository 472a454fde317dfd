"""Synchronized batch norm in one process: packing, the Chan merge, and the layer
with several simulated ranks.

Simulated ranks are threads sharing an in-process communicator that implements
the same ``allgather`` / ``allreduce`` interface as ``MPIComm`` and ``NCCLComm``
(only one rank computes at a time; the collectives hand over).  The NCCL path
runs with a fake ``NcclCommunicator`` that moves host memory through the raw
pointers ``NCCLComm`` passes, so its argument handling (pointers, counts,
dtype and op codes, stream) is exercised without a GPU.  Real MPI processes:
tests/test_sync_bn_mpi.py.
"""

from __future__ import annotations

import ctypes
import threading

import numpy as np
import pytest

import gpubn
from conftest import assert_close, to_backend, to_numpy
from gpubn import distributed as D
from gpubn.backends import array_module

TIMEOUT_S = 60


# ------------------------------------------------------- simulated ranks ----
class _Group:
    """Shared state of ``size`` simulated ranks.  One rank computes at a time
    (``baton``); a collective deposits its buffer, hands the baton over and
    waits for everyone."""

    def __init__(self, size):
        self.size = size
        self.barrier = threading.Barrier(size, timeout=TIMEOUT_S)
        self.baton = threading.Lock()
        self.slots = [None] * size
        self.calls = []     # (rank, kind, length)

    def exchange(self, rank, host_array):
        self.slots[rank] = np.array(host_array, dtype=np.float64, copy=True)
        self.baton.release()
        try:
            self.barrier.wait()
            got = np.stack(self.slots)
            self.barrier.wait()     # nobody overwrites a slot before all have read
        finally:
            self.baton.acquire()
        return got


class ThreadComm(D.Communicator):
    def __init__(self, group, rank):
        self.group, self.rank, self.size = group, rank, group.size

    def allgather(self, buf):
        self.group.calls.append((self.rank, "allgather", buf.size))
        return to_backend_like(buf, self.group.exchange(self.rank, to_numpy(buf)))

    def allreduce(self, buf):
        self.group.calls.append((self.rank, "allreduce", buf.size))
        rows = self.group.exchange(self.rank, to_numpy(buf))
        total = rows[0].copy()
        for row in rows[1:]:
            total += row
        return to_backend_like(buf, total)


def to_backend_like(like, a):
    return a if isinstance(like, np.ndarray) else array_module(like).asarray(a)


def run_ranks(size, fn, make_comm=None):
    """Run ``fn(comm)`` on ``size`` simulated ranks; returns each rank's result
    or the exception it raised."""
    group = _Group(size)
    comms = [make_comm(group, r) if make_comm else ThreadComm(group, r) for r in range(size)]
    results = [None] * size

    def body(r):
        group.baton.acquire()
        try:
            results[r] = fn(comms[r])
        except BaseException as exc:   # noqa: BLE001 - reported per rank
            results[r] = exc
        finally:
            group.baton.release()

    threads = [threading.Thread(target=body, args=(r,), daemon=True) for r in range(size)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(TIMEOUT_S * 2)
    assert not any(t.is_alive() for t in threads), "a simulated rank hangs in a collective"
    return results, group


def ok(results):
    for r, res in enumerate(results):
        if isinstance(res, BaseException):
            raise AssertionError(f"rank {r} raised {type(res).__name__}: {res}") from res
    return results


# ---------------------------------------------------------- packing/merge ----
def test_message_sizes():
    assert D.forward_message_size(3) == 8       # status, count, 3 means, 3 M2
    assert D.backward_message_size(3) == 7      # status, 3 sum dy, 3 sum dy*xhat


def test_pack_and_unpack_layout():
    mean = np.array([1.5, -2.0, 3.25], np.float32)
    m2 = np.array([4.0, 0.5, 9.0], np.float32)
    buf = D.pack_stats(np, 3, 7, mean, m2)
    assert buf.dtype == np.float64 and buf.shape == (8,)
    np.testing.assert_array_equal(buf, [0, 7, 1.5, -2.0, 3.25, 4.0, 0.5, 9.0])
    # an empty rank sends zeros even if a kernel reported a NaN mean for no data
    empty = D.pack_stats(np, 3, 0, np.full(3, np.nan), np.zeros(3))
    np.testing.assert_array_equal(empty, np.zeros(8))
    failed = D.pack_stats(np, 3, failed=True)
    np.testing.assert_array_equal(failed, [1, 0, 0, 0, 0, 0, 0, 0])
    status, counts, means, m2s = D.unpack_stats(np.stack([buf, empty, failed]), 3)
    np.testing.assert_array_equal(status, [0, 0, 1])
    np.testing.assert_array_equal(counts, [7, 0, 0])
    np.testing.assert_array_equal(means[0], mean)
    np.testing.assert_array_equal(m2s[0], m2)
    with pytest.raises(ValueError, match=r"shape \(size, 8\)"):
        D.unpack_stats(np.zeros((2, 7)), 3)


def _piece_stats(pieces):
    counts = np.array([p.shape[0] for p in pieces], np.float64)
    means = np.stack([p.mean(axis=0) if len(p) else np.zeros(p.shape[1]) for p in pieces])
    m2s = np.stack([((p - p.mean(axis=0)) ** 2).sum(axis=0) if len(p) else np.zeros(p.shape[1])
                    for p in pieces])
    return counts, means, m2s


@pytest.mark.parametrize("sizes", [[4, 4, 4], [1, 0, 9, 2], [0, 0, 5], [2, 1]])
def test_merge_equals_statistics_of_the_concatenation(sizes):
    rng = np.random.default_rng(sum(sizes))
    pieces = [rng.normal(loc=3.0 * i, scale=1.0 + i, size=(n, 5)) for i, n in enumerate(sizes)]
    whole = np.concatenate(pieces)
    mean, m2 = D.merge_stats(*_piece_stats(pieces))
    np.testing.assert_allclose(mean, whole.mean(axis=0), rtol=1e-13, atol=1e-13)
    np.testing.assert_allclose(m2 / len(whole), whole.var(axis=0), rtol=1e-12)


def test_merge_is_stable_for_a_large_offset():
    # per-rank moments around their own means: no E[x^2] - E[x]^2 cancellation
    rng = np.random.default_rng(1)
    pieces = [1e8 + rng.standard_normal((n, 2)) for n in (300, 1, 0, 700)]
    whole = np.concatenate(pieces)
    mean, m2 = D.merge_stats(*_piece_stats(pieces))
    np.testing.assert_allclose(m2 / len(whole), whole.var(axis=0), rtol=1e-9)


# ------------------------------------------------ layer, simulated ranks ----
def _layer_run(backend, splits, x_steps, dy_steps, modes, axis=1, dtype="float64",
               affine=True, momentum=0.1):
    c = x_steps[0].shape[axis]
    rng = np.random.default_rng(7)
    w, b = rng.uniform(0.5, 1.5, c), rng.standard_normal(c)
    bounds = np.concatenate([[0], np.cumsum(splits)])

    def make(cls, **kw):
        bn = cls(c, axis=axis, dtype=dtype, affine=affine, momentum=momentum,
                 backend=backend.name, **kw)
        if affine:
            bn.weight[...] = to_backend(backend, w)
            bn.bias[...] = to_backend(backend, b)
        return bn

    def rank_fn(comm):
        bn = make(gpubn.SyncBatchNorm, comm=comm)
        sl = slice(bounds[comm.rank], bounds[comm.rank + 1])
        out = []
        for mode, x, dy in zip(modes, x_steps, dy_steps):
            bn.train(mode == "train")
            y = bn(to_backend(backend, np.ascontiguousarray(x[sl])))
            dx = bn.backward(to_backend(backend, np.ascontiguousarray(dy[sl])))
            out.append(dict(y=to_numpy(y), dx=to_numpy(dx), dw=to_numpy(bn.grad_weight),
                            db=to_numpy(bn.grad_bias), rm=to_numpy(bn.running_mean),
                            rv=to_numpy(bn.running_var)))
        return out

    results, group = run_ranks(len(splits), rank_fn)
    ref_bn = make(gpubn.BatchNorm)
    ref = []
    for mode, x, dy in zip(modes, x_steps, dy_steps):
        ref_bn.train(mode == "train")
        y = ref_bn(to_backend(backend, x))
        dx = ref_bn.backward(to_backend(backend, dy))
        ref.append(dict(y=to_numpy(y), dx=to_numpy(dx), dw=to_numpy(ref_bn.grad_weight),
                        db=to_numpy(ref_bn.grad_bias), rm=to_numpy(ref_bn.running_mean),
                        rv=to_numpy(ref_bn.running_var)))
    return ok(results), ref, bounds, group


def _compare(results, ref, bounds, dtype, param_dtype):
    for r, steps in enumerate(results):
        sl = slice(bounds[r], bounds[r + 1])
        for s, (got, want) in enumerate(zip(steps, ref)):
            where = f"rank {r} step {s}"
            assert_close(got["y"], want["y"][sl], dtype, f"y ({where})")
            assert_close(got["dx"], want["dx"][sl], dtype, f"dx ({where})")
            for k in ("dw", "db", "rm", "rv"):
                if want[k] is None:
                    assert got[k] is None, f"{k} ({where})"
                else:
                    assert_close(got[k], want[k], param_dtype, f"{k} ({where})")
                    # bitwise the same on every rank
                    assert np.array_equal(got[k], results[0][s][k]), f"{k} differs on rank {r}"


@pytest.mark.parametrize("splits", [[3, 3, 3], [5, 1, 0, 2], [0, 4]],
                         ids=["equal", "unequal_with_empty", "empty_first"])
def test_layer_matches_single_process_on_the_concatenated_batch(backend, splits):
    rng = np.random.default_rng(len(splits))
    n = sum(splits)
    xs = [1.0 + 2.0 * rng.standard_normal((n, 3, 2, 3)) for _ in range(3)]
    dys = [rng.standard_normal((n, 3, 2, 3)) for _ in range(3)]
    results, ref, bounds, _ = _layer_run(backend, splits, xs, dys, ["train", "train", "eval"])
    _compare(results, ref, bounds, np.float64, np.float64)


def test_layer_channels_last_float32_cumulative_momentum(backend):
    splits = [2, 0, 3]
    rng = np.random.default_rng(11)
    xs = [(3.0 + rng.standard_normal((5, 2, 4))).astype(np.float32) for _ in range(2)]
    dys = [rng.standard_normal((5, 2, 4)).astype(np.float32) for _ in range(2)]
    results, ref, bounds, _ = _layer_run(backend, splits, xs, dys, ["train", "train"], axis=-1,
                                         dtype="float32", momentum=None)
    _compare(results, ref, bounds, np.float32, np.float32)


def test_one_collective_per_direction_and_message_sizes():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((6, 4, 3))
    _, _, _, group = _layer_run(gpubn.backends.get_backend("numpy"), [2, 4], [x, x], [x, x],
                                ["train", "eval"])
    per_rank = [[(k, n) for (r, k, n) in group.calls if r == rank] for rank in range(2)]
    # train: forward all-gather (2C+2), backward all-reduce (2C+1);
    # eval: the forward needs no communication, the backward sums dweight/dbias
    assert per_rank[0] == per_rank[1] == [("allgather", 10), ("allreduce", 9),
                                          ("allreduce", 9)]


def test_one_value_per_channel_raises_on_every_rank_and_changes_nothing():
    def rank_fn(comm):
        bn = gpubn.SyncBatchNorm(3, comm=comm)
        x = np.ones((1 if comm.rank == 1 else 0, 3), np.float32)
        try:
            bn(x)
        finally:
            assert bn.num_batches_tracked == 0
            assert np.array_equal(bn.running_mean, np.zeros(3, np.float32))
            assert np.array_equal(bn.running_var, np.ones(3, np.float32))

    results, _ = run_ranks(3, rank_fn)
    for r, res in enumerate(results):
        assert isinstance(res, ValueError), f"rank {r}: {res!r}"
        assert "more than 1 value per channel" in str(res)


def test_all_ranks_empty_raises_value_error():
    def rank_fn(comm):
        y, _ = gpubn.sync_batch_norm_forward(np.zeros((0, 2)), comm=comm)

    results, _ = run_ranks(2, rank_fn)
    assert all(isinstance(r, ValueError) for r in results), results


@pytest.mark.parametrize("bad", ["channels", "dtype", "ndim"])
def test_bad_input_on_one_rank_raises_on_all_ranks(bad):
    def rank_fn(comm):
        bn = gpubn.SyncBatchNorm(3, comm=comm)
        x = np.ones((2, 3, 4), np.float32)
        if comm.rank == 2:
            x = {"channels": np.ones((2, 4, 4), np.float32),
                 "dtype": np.ones((2, 3, 4), np.int32),
                 "ndim": np.ones(3, np.float32)}[bad]
        try:
            bn(x)
        finally:
            assert bn.num_batches_tracked == 0
            assert np.array_equal(bn.running_mean, np.zeros(3, np.float32))

    results, _ = run_ranks(3, rank_fn)
    local = {"channels": (ValueError, "4 channels"), "dtype": (TypeError, "floating-point"),
             "ndim": (ValueError, "at least 2 dimensions")}[bad]
    assert isinstance(results[2], local[0]) and local[1] in str(results[2]), repr(results[2])
    for r in (0, 1):
        assert isinstance(results[r], D.RemoteRankError), repr(results[r])
        assert "rank(s) [2]" in str(results[r])


@pytest.mark.parametrize("bad", ["weight", "readonly", "axis"])
def test_bad_arrays_in_the_functional_call_on_one_rank(bad):
    """The per-channel vectors and the axis go through the shared forward
    checks: the rank with the bad one raises its own error after the
    all-gather, the others RemoteRankError, and no rank's running statistics
    change."""
    def rank_fn(comm):
        x = np.random.default_rng(comm.rank).standard_normal((4, 3, 5))
        w, rm, rv = np.ones(3), np.zeros(3), np.ones(3)
        kwargs = dict(weight=w, running_mean=rm, running_var=rv, axis=1)
        if comm.rank == 1:
            if bad == "weight":
                kwargs["weight"] = np.ones(4)
            elif bad == "readonly":
                rv.flags.writeable = False
            else:
                kwargs["axis"] = 3
        try:
            gpubn.sync_batch_norm_forward(x, comm=comm, num_features=3, **kwargs)
        finally:
            assert np.array_equal(rm, np.zeros(3)) and np.array_equal(rv, np.ones(3))

    results, group = run_ranks(3, rank_fn)
    local = {"weight": "weight", "readonly": "read-only", "axis": "axis=3"}[bad]
    assert isinstance(results[1], ValueError) and local in str(results[1]), repr(results[1])
    for r in (0, 2):
        assert isinstance(results[r], D.RemoteRankError), repr(results[r])
        assert "rank(s) [1]" in str(results[r])


def test_bad_dy_on_one_rank_raises_on_all_ranks():
    def rank_fn(comm):
        bn = gpubn.SyncBatchNorm(3, comm=comm)
        x = np.random.default_rng(comm.rank).standard_normal((4, 3)).astype(np.float32)
        y = bn(x)
        dy = y[:, :2] if comm.rank == 0 else np.ones_like(y)
        bn.backward(dy)

    results, _ = run_ranks(2, rank_fn)
    assert isinstance(results[0], ValueError) and "dy must have the shape" in str(results[0])
    assert isinstance(results[1], D.RemoteRankError)


def test_shared_argument_errors_raise_before_any_communication():
    def rank_fn(comm):
        errors = []
        for kwargs in (dict(eps=0.0), dict(momentum=2.0), dict(num_batches_tracked=-1)):
            try:
                gpubn.sync_batch_norm_forward(np.ones((4, 3)), comm=comm, **kwargs)
            except (TypeError, ValueError) as exc:
                errors.append(type(exc).__name__)
        return errors

    results, group = run_ranks(2, rank_fn)
    assert ok(results) == [["ValueError"] * 3] * 2
    assert group.calls == []


def test_residual_is_refused_before_any_state_changes():
    bn = gpubn.SyncBatchNorm(3, comm=ThreadComm(_Group(1), 0))
    x = np.ones((4, 3), np.float32)
    with pytest.raises(TypeError, match="SyncBatchNorm has no residual / activation epilogue"):
        bn(x, residual=x)
    assert bn.num_batches_tracked == 0 and (bn.running_mean == 0).all()


def test_argument_types():
    with pytest.raises(TypeError, match="comm must be a gpubn communicator"):
        gpubn.SyncBatchNorm(3, comm=object())
    with pytest.raises(TypeError, match="comm"):
        gpubn.SyncBatchNorm(3)
    with pytest.raises(TypeError, match="comm must be a gpubn communicator"):
        gpubn.sync_batch_norm_forward(np.ones((4, 3)), comm="world")
    with pytest.raises(TypeError, match="mpi4py communicator"):
        gpubn.MPIComm(object())
    with pytest.raises(TypeError, match="NcclCommunicator"):
        gpubn.NCCLComm(object())
    with pytest.raises(TypeError, match="saved must be the SyncBatchNormSaved"):
        _, saved = gpubn.batch_norm_forward(np.ones((4, 3)))
        gpubn.sync_batch_norm_backward(np.ones((4, 3)), saved)


# ----------------------------------------------------------------- MPIComm ----
class _FakeMPI:
    """Single-process stand-in with mpi4py's buffer interface."""

    def __init__(self):
        self.calls = []

    def Get_rank(self):
        return 0

    def Get_size(self):
        return 1

    def Allgather(self, send, recv):
        self.calls.append("Allgather")
        recv[...] = np.asarray(send)[None]

    def Allreduce(self, send, recv, op=None):
        self.calls.append(("Allreduce", op))
        recv[...] = send


def test_mpicomm_numpy_path_with_a_single_rank(monkeypatch):
    fake = _FakeMPI()
    monkeypatch.setattr(D.MPIComm, "_sum_op", staticmethod(lambda: "SUM"))
    comm = gpubn.MPIComm(fake)
    assert (comm.rank, comm.size, comm.cuda_aware) == (0, 1, False)
    x = np.random.default_rng(3).standard_normal((5, 2, 3))
    bn, ref = gpubn.SyncBatchNorm(2, dtype="float64", comm=comm), gpubn.BatchNorm(2, dtype="float64")
    assert_close(bn(x), ref(x), np.float64, "y")
    assert_close(bn.backward(x), ref.backward(x), np.float64, "dx")
    assert_close(bn.grad_weight, ref.grad_weight, np.float64, "dweight")
    assert fake.calls == ["Allgather", ("Allreduce", "SUM")]
    with pytest.raises(ValueError, match="contiguous 1-D float64"):
        comm.allgather(np.zeros(3, np.float32))
    with pytest.raises(TypeError, match="cuda_aware must be a bool"):
        gpubn.MPIComm(fake, cuda_aware="yes")


# ---------------------------------------------------------------- NCCLComm ----
def _host_view(ptr, count):
    return np.ctypeslib.as_array((ctypes.c_double * count).from_address(ptr))


class _FakeNccl:
    """Stand-in for ``cupy.cuda.nccl.NcclCommunicator`` that moves host memory
    through the raw pointers it is given, with the same call signatures."""

    def __init__(self, group, rank):
        self.group, self.rank = group, rank
        self.streams = []

    def rank_id(self):
        return self.rank

    def size(self):
        return self.group.size

    def allGather(self, sendbuf, recvbuf, count, datatype, stream):
        assert datatype == D.NCCL_FLOAT64
        self.streams.append(stream)
        rows = self.group.exchange(self.rank, _host_view(sendbuf, count))
        _host_view(recvbuf, count * self.group.size)[:] = rows.ravel()

    def allReduce(self, sendbuf, recvbuf, count, datatype, op, stream):
        assert datatype == D.NCCL_FLOAT64 and op == D.NCCL_SUM
        self.streams.append(stream)
        rows = self.group.exchange(self.rank, _host_view(sendbuf, count))
        total = rows[0].copy()
        for row in rows[1:]:
            total += row
        _host_view(recvbuf, count)[:] = total


class _HostNCCLComm(D.NCCLComm):
    """NCCLComm on host arrays (the pointer hook and backend check relaxed)."""

    def check_backend(self, backend):
        pass


def test_nccl_constants_are_ncclh_values():
    assert (D.NCCL_FLOAT64, D.NCCL_SUM) == (8, 0)
    nccl = pytest.importorskip("cupy.cuda.nccl", reason="CuPy with NCCL is not installed")
    assert (int(nccl.NCCL_FLOAT64), int(nccl.NCCL_SUM)) == (D.NCCL_FLOAT64, D.NCCL_SUM)


def test_ncclcomm_layer_with_fake_nccl_on_three_ranks(monkeypatch):
    monkeypatch.setattr(D, "_device_pointer", lambda a: a.ctypes.data)
    monkeypatch.setattr(D, "_nccl_constants", lambda: (D.NCCL_FLOAT64, D.NCCL_SUM))
    bounds = [0, 2, 2, 7]          # rank r holds x[bounds[r]:bounds[r + 1]]: 2, 0 and 5 samples
    rng = np.random.default_rng(5)
    x, dy = rng.standard_normal((7, 3, 4)), rng.standard_normal((7, 3, 4))

    def rank_fn(comm):
        bn = gpubn.SyncBatchNorm(3, dtype="float64", comm=comm, backend="numpy")
        sl = slice(bounds[comm.rank], bounds[comm.rank + 1])
        y = bn(np.ascontiguousarray(x[sl]))
        dx = bn.backward(np.ascontiguousarray(dy[sl]))
        return y, dx, bn.grad_weight, bn.running_var.copy(), comm.comm.streams

    results, _ = run_ranks(3, rank_fn,
                           make_comm=lambda g, r: _HostNCCLComm(_FakeNccl(g, r), stream=1234))
    ref = gpubn.BatchNorm(3, dtype="float64")
    y, dx = ref(x), ref.backward(dy)
    for r, (gy, gdx, gdw, grv, streams) in enumerate(ok(results)):
        sl = slice(bounds[r], bounds[r + 1])
        assert_close(gy, y[sl], np.float64, f"y rank {r}")
        assert_close(gdx, dx[sl], np.float64, f"dx rank {r}")
        assert_close(gdw, ref.grad_weight, np.float64, f"dweight rank {r}")
        assert_close(grv, ref.running_var, np.float64, f"running_var rank {r}")
        assert streams == [1234, 1234]     # enqueued on the given stream


def test_ncclcomm_needs_the_cuda_backend():
    group = _Group(1)
    comm = D.NCCLComm(_FakeNccl(group, 0), stream=0)
    assert (comm.rank, comm.size) == (0, 1)
    with pytest.raises(ValueError, match="backend='cuda'"):
        gpubn.sync_batch_norm_forward(np.ones((4, 3)), backend="numpy", comm=comm)
    with pytest.raises(ValueError, match="backend='cuda'"):
        gpubn.SyncBatchNorm(3, backend="numpy", comm=comm)


# --------------------------------------------------------------------- GPU ----
def _cuda_or_skip():
    cupy = pytest.importorskip("cupy", reason="no CUDA device / NCCL: CuPy is not installed")
    try:
        if cupy.cuda.runtime.getDeviceCount() < 1:
            pytest.skip("no CUDA device / NCCL")
        from cupy.cuda import nccl  # noqa: F401
    except Exception as exc:  # noqa: BLE001 - driver missing, NCCL missing
        pytest.skip(f"no CUDA device / NCCL: {exc}")
    try:
        gpubn.backends.get_backend("cuda")
    except RuntimeError as exc:
        pytest.skip(str(exc))
    return cupy


@pytest.mark.gpu
@pytest.mark.parametrize("transport", ["nccl", "mpi_staged"])
def test_gpu_single_rank_matches_batch_norm(transport, monkeypatch):
    cupy = _cuda_or_skip()
    if transport == "nccl":
        from cupy.cuda import nccl

        comm = gpubn.NCCLComm(nccl.NcclCommunicator(1, nccl.get_unique_id(), 0))
    else:
        monkeypatch.setattr(D.MPIComm, "_sum_op", staticmethod(lambda: "SUM"))
        comm = gpubn.MPIComm(_FakeMPI())
    rng = np.random.default_rng(9)
    x = cupy.asarray(rng.standard_normal((6, 4, 5, 3)).astype(np.float32))
    dy = cupy.asarray(rng.standard_normal((6, 4, 5, 3)).astype(np.float32))
    bn = gpubn.SyncBatchNorm(4, comm=comm, backend="cuda")
    ref = gpubn.BatchNorm(4, backend="cuda")
    for _ in range(2):
        assert_close(bn(x), ref(x), np.float32, "y")
        assert_close(bn.backward(dy), ref.backward(dy), np.float32, "dx")
    assert_close(bn.grad_weight, ref.grad_weight, np.float32, "dweight")
    assert_close(bn.running_var, ref.running_var, np.float32, "running_var")


# ------------------------------------------ guard, local sums, no ghost ----
def test_guard_keeps_a_non_finite_channels_running_stats_on_every_rank():
    """Rank 0's slice has an Inf in channel 1: with the guard, channel 1 keeps
    its running statistics on both ranks and is counted once per step; the
    other channels update as batch norm on the concatenated batch does."""
    rng = np.random.default_rng(3)
    x = rng.standard_normal((6, 3, 4))
    x[1, 1, 2] = np.inf
    bounds = [0, 2, 6]

    def rank_fn(comm):
        bn = gpubn.SyncBatchNorm(3, comm=comm, dtype="float64", backend="numpy",
                                 guard_running_stats=True)
        for _ in range(2):
            bn(np.ascontiguousarray(x[bounds[comm.rank]:bounds[comm.rank + 1]]))
        return bn.running_mean.copy(), bn.running_var.copy(), bn.skipped_updates, \
            set(bn.state_dict())

    results, _ = run_ranks(2, rank_fn)
    ref = gpubn.BatchNorm(3, dtype="float64", backend="numpy", guard_running_stats=True)
    for _ in range(2):
        ref(x)
    assert ref.skipped_updates == 2 and ref.running_mean[1] == 0 and ref.running_var[1] == 1
    for r, (rm, rv, skipped, keys) in enumerate(ok(results)):
        assert skipped == 2, f"rank {r}"
        assert rm[1] == 0.0 and rv[1] == 1.0, f"rank {r}: the guarded channel moved"
        assert_close(rm, ref.running_mean, np.float64, f"running_mean (rank {r})")
        assert_close(rv, ref.running_var, np.float64, f"running_var (rank {r})")
        assert "skipped_updates" in keys
    # without the guard the Inf reaches the running statistics (the test can fail)
    results, _ = run_ranks(2, lambda comm: gpubn.sync_batch_norm_forward(
        np.ascontiguousarray(x[bounds[comm.rank]:bounds[comm.rank + 1]]), comm=comm,
        running_mean=np.zeros(3), running_var=np.ones(3), backend="numpy")[1].skipped)
    assert ok(results) == [None, None]


def test_guard_flags_in_the_functional_call():
    x = np.ones((4, 2, 3))
    x[:, 0] = np.linspace(0, 1, 12).reshape(4, 3)
    x[0, 1, 0] = np.nan

    def rank_fn(comm):
        rm, rv = np.zeros(2), np.ones(2)
        _, saved = gpubn.sync_batch_norm_forward(x[2 * comm.rank:2 * comm.rank + 2], comm=comm,
                                                 running_mean=rm, running_var=rv,
                                                 backend="numpy", guard_running_stats=True)
        return saved.skipped.tolist(), rm, rv

    for skipped, rm, rv in ok(run_ranks(2, rank_fn)[0]):
        assert skipped == [0, 1]
        assert rm[0] == pytest.approx(0.1 * 0.5) and rm[1] == 0 and rv[1] == 1


def test_local_param_grads_are_each_ranks_own_sums():
    """``local_param_grads=True``: dweight / dbias are sums over this rank's
    slice (PyTorch's SyncBatchNorm convention); they add up to the global
    ones and dx does not change."""
    rng = np.random.default_rng(5)
    x, dy = rng.standard_normal((7, 3, 5)), rng.standard_normal((7, 3, 5))
    bounds = [0, 3, 7]
    mean = x.mean(axis=(0, 2))
    invstd = 1.0 / np.sqrt(x.var(axis=(0, 2)) + 1e-5)
    xhat = (x - mean[:, None]) * invstd[:, None]

    def rank_fn(comm):
        sl = slice(bounds[comm.rank], bounds[comm.rank + 1])
        out = {}
        for local in (False, True):
            _, saved = gpubn.sync_batch_norm_forward(
                np.ascontiguousarray(x[sl]), comm=comm, weight=np.full(3, 2.0),
                bias=np.zeros(3), backend="numpy")
            out[local] = gpubn.sync_batch_norm_backward(np.ascontiguousarray(dy[sl]), saved,
                                                        local_param_grads=local)
        return out

    results = ok(run_ranks(2, rank_fn)[0])
    for r, out in enumerate(results):
        sl = slice(bounds[r], bounds[r + 1])
        np.testing.assert_array_equal(out[True][0], out[False][0])
        assert_close(out[True][1], (dy[sl] * xhat[sl]).sum(axis=(0, 2)), np.float64, "dweight")
        assert_close(out[True][2], dy[sl].sum(axis=(0, 2)), np.float64, "dbias")
        assert_close(out[False][1], (dy * xhat).sum(axis=(0, 2)), np.float64, "global dweight")
    assert_close(results[0][True][1] + results[1][True][1], results[0][False][1], np.float64,
                 "sum of local dweights")


def test_ghost_batch_norm_is_refused_before_anything_changes():
    group = _Group(1)
    comm = ThreadComm(group, 0)
    with pytest.raises(ValueError, match="virtual_batch_size=2 is not supported by sync batch"):
        gpubn.SyncBatchNorm(3, comm=comm, virtual_batch_size=2)
    rm = np.zeros(3)
    with pytest.raises(ValueError, match="virtual_batch_size=2 is not supported by sync batch"):
        gpubn.sync_batch_norm_forward(np.ones((4, 3)), comm=comm, running_mean=rm,
                                      running_var=np.ones(3), virtual_batch_size=2)
    assert group.calls == [] and (rm == 0).all()
    with pytest.raises(TypeError, match="guard_running_stats must be a bool"):
        gpubn.sync_batch_norm_forward(np.ones((4, 3)), comm=comm, guard_running_stats="yes")
    with pytest.raises(TypeError, match="local_param_grads must be a bool"):
        gpubn.sync_batch_norm_backward(np.ones((4, 3)), None, local_param_grads=1)
