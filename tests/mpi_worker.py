"""Worker for tests/test_sync_bn_mpi.py, launched as
``mpiexec -n R python mpi_worker.py OUT [cpu|gpu]``.

Every rank runs every case of ``CASES`` on its own slice of a global batch
that all ranks (and the test process) generate from the same seed, with the
``SyncBatchNorm`` layer or the functional form, and pickles what it got
(outputs, gradients, running statistics, or the exception it raised) to
``OUT/rank<r>.pkl``.  ``cpu``: backends numpy, cpu and emu over
``MPIComm(COMM_WORLD)``.  ``gpu``: backend cuda over ``MPIComm`` (host
staging) and, when there is a GPU per rank, over ``NCCLComm``.  The test process compares those
with single-process batch norm over the concatenated batch; no assertion lives
here, so a wrong result can never be hidden by the worker.
"""

from __future__ import annotations

import os
import pickle
import sys
import traceback

import numpy as np

# case name -> description; the data and the splits come from case_data()
CASES = ("equal_nchw", "unequal_zero_functional", "channels_last_noaffine", "one_value",
         "bad_rank", "bad_dy_rank")


def splits_for(case: str, nranks: int):
    """Samples per rank (the global batch is their sum)."""
    table = {
        "equal_nchw": {2: [3, 3], 3: [2, 2, 2]},
        "unequal_zero_functional": {2: [0, 7], 3: [5, 0, 2]},
        "channels_last_noaffine": {2: [1, 4], 3: [2, 1, 3]},
        "one_value": {2: [1, 0], 3: [0, 1, 0]},
        "bad_rank": {2: [3, 2], 3: [2, 3, 1]},
        "bad_dy_rank": {2: [3, 2], 3: [2, 3, 1]},
    }
    return table[case][nranks]


def case_data(case: str, nranks: int):
    """Everything a case needs, identical in every process."""
    splits = splits_for(case, nranks)
    n = sum(splits)
    rng = np.random.default_rng(CASES.index(case) * 10 + nranks)
    opts = dict(axis=1, dtype=np.float64, affine=True, track=True, momentum=0.1,
                modes=["train"] * 3 + ["eval"], sample_shape=(3, 4, 3))
    if case == "unequal_zero_functional":
        opts.update(dtype=np.float32, momentum=None, sample_shape=(4,), modes=["train"] * 3)
    elif case == "channels_last_noaffine":
        opts.update(axis=-1, dtype=np.float32, affine=False, track=False,
                    sample_shape=(2, 3, 4), modes=["train", "train", "eval"])
    elif case == "one_value":
        opts.update(sample_shape=(3,), modes=["train"])
    elif case in ("bad_rank", "bad_dy_rank"):
        opts.update(sample_shape=(3, 5), modes=["train", "train"])
    shape = (n,) + opts["sample_shape"]
    c = shape[opts["axis"]]
    steps = []
    for _ in opts["modes"]:
        x = (2.0 + 1.5 * rng.standard_normal(shape)).astype(opts["dtype"])
        dy = rng.standard_normal(shape).astype(opts["dtype"])
        steps.append((x, dy))
    weight = rng.uniform(0.5, 1.5, c).astype(np.float32) if opts["affine"] else None
    bias = rng.standard_normal(c).astype(np.float32) if opts["affine"] else None
    return dict(splits=splits, steps=steps, weight=weight, bias=bias, c=c, **opts)


def rank_slice(splits, rank):
    start = sum(splits[:rank])
    return slice(start, start + splits[rank])


def _err(exc):
    return {"error": type(exc).__name__, "message": str(exc)}


def _identity(a):
    return a


def _host(rec):
    return {k: (v.get() if hasattr(v, "get") and hasattr(v, "device") else v)
            for k, v in rec.items()}


def run_layer_case(gpubn, comm, backend, case, data, rank, to_dev=_identity):
    """Steps through the layer; returns a list of per-step records."""
    bn = gpubn.SyncBatchNorm(data["c"], affine=data["affine"],
                             track_running_stats=data["track"], momentum=data["momentum"],
                             axis=data["axis"], dtype="float32", backend=backend, comm=comm)
    if data["affine"]:
        bn.weight[...] = to_dev(data["weight"])
        bn.bias[...] = to_dev(data["bias"])
    sl = rank_slice(data["splits"], rank)
    records = []
    for step, (mode, (x, dy)) in enumerate(zip(data["modes"], data["steps"])):
        bn.train(mode == "train")
        xs, dys = np.ascontiguousarray(x[sl]), np.ascontiguousarray(dy[sl])
        if case == "bad_rank" and step == 0 and rank == 1:
            xs = np.ascontiguousarray(xs[:, :2])          # 2 channels instead of 3
        if case == "bad_dy_rank" and step == 0 and rank == 1:
            dys = dys.astype(np.float32)                  # wrong dtype for dy
        xs, dys = to_dev(xs), to_dev(dys)
        rec = {}
        try:
            rec["y"] = bn(xs)
            rec["dx"] = bn.backward(dys)
            rec["dweight"], rec["dbias"] = bn.grad_weight, bn.grad_bias
        except Exception as exc:                          # recorded, judged by the test
            rec.update(_err(exc))
        if bn.track_running_stats:
            rec["running_mean"] = bn.running_mean.copy()
            rec["running_var"] = bn.running_var.copy()
            rec["num_batches_tracked"] = bn.num_batches_tracked
        records.append(_host(rec))
    return records


def run_functional_case(gpubn, comm, backend, data, rank, to_dev=_identity):
    c = data["c"]
    rm, rv = to_dev(np.zeros(c, np.float32)), to_dev(np.ones(c, np.float32))
    w, b = to_dev(data["weight"]), to_dev(data["bias"])
    sl = rank_slice(data["splits"], rank)
    records = []
    for step, (x, dy) in enumerate(data["steps"]):
        rec = {}
        try:
            y, saved = gpubn.sync_batch_norm_forward(
                to_dev(np.ascontiguousarray(x[sl])), weight=w, bias=b, running_mean=rm,
                running_var=rv, training=True,
                momentum=data["momentum"], axis=data["axis"], backend=backend, comm=comm,
                num_batches_tracked=step)
            dx, dw, db = gpubn.sync_batch_norm_backward(to_dev(np.ascontiguousarray(dy[sl])),
                                                        saved)
            rec.update(y=y, dx=dx, dweight=dw, dbias=db)
        except Exception as exc:
            rec.update(_err(exc))
        rec.update(running_mean=rm.copy(), running_var=rv.copy(), num_batches_tracked=step + 1)
        records.append(_host(rec))
    return records


def _cpu_setups(gpubn, world, skipped):
    comm = gpubn.MPIComm(world)
    for backend in ("numpy", "cpu", "emu"):
        try:
            gpubn.backends.get_backend(backend)
        except RuntimeError as exc:
            skipped[backend] = str(exc)
            continue
        yield backend, backend, comm, _identity


def _gpu_setups(gpubn, world, skipped):
    import cupy

    ndev = cupy.cuda.runtime.getDeviceCount()
    cupy.cuda.Device(world.Get_rank() % ndev).use()

    def to_dev(a):
        return None if a is None else cupy.asarray(a)

    yield "cuda+mpi", "cuda", gpubn.MPIComm(world), to_dev
    if ndev < world.Get_size():
        skipped["cuda+nccl"] = (f"NCCL needs a GPU per rank: {ndev} GPU(s) for "
                                f"{world.Get_size()} ranks")
        return
    yield "cuda+nccl", "cuda", gpubn.NCCLComm.from_mpi(world), to_dev


def main(out_dir, mode="cpu"):
    from mpi4py import MPI

    import gpubn

    world = MPI.COMM_WORLD
    rank, size = world.Get_rank(), world.Get_size()
    results = {"rank": rank, "size": size, "backends": {}, "skipped": {}}
    setups = (_gpu_setups if mode == "gpu" else _cpu_setups)(gpubn, world, results["skipped"])
    for key, backend, comm, to_dev in setups:
        per_case = {}
        for case in CASES:
            data = case_data(case, size)
            try:
                if case == "unequal_zero_functional":
                    per_case[case] = run_functional_case(gpubn, comm, backend, data, rank, to_dev)
                else:
                    per_case[case] = run_layer_case(gpubn, comm, backend, case, data, rank,
                                                    to_dev)
            except Exception:                             # a crash outside a step
                per_case[case] = [{"error": "crash", "message": traceback.format_exc()}]
            world.Barrier()
        results["backends"][key] = per_case
    with open(os.path.join(out_dir, f"rank{rank}.pkl"), "wb") as f:
        pickle.dump(results, f)


if __name__ == "__main__":
    main(sys.argv[1], *sys.argv[2:3])
