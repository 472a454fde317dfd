"""SyncBatchNorm over real MPI processes: ``mpiexec -n 2`` and ``-n 3`` on this machine.

One launch per rank count runs every case (tests/mpi_worker.py); here each rank's
results are compared with single-process batch norm over the concatenated
global batch on the same backend: forward output, dx, dweight, dbias and the
running statistics after several steps, for equal and unequal splits and a rank
with no samples; the one-value-per-channel error and a bad input on one rank
must raise on every rank, not hang.  A hang fails the test through the
launch's timeout.

Needs mpi4py and an MPI launcher (``pip install -e '.[mpi]'``: mpi4py with the
MPICH wheel); skipped with the reason otherwise.
"""

from __future__ import annotations

import os
import pickle
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import gpubn
from conftest import assert_close
from mpi_worker import case_data, rank_slice

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
LAUNCH_TIMEOUT_S = 240


def _find_mpiexec():
    candidates = [Path(sys.executable).parent / "mpiexec", shutil.which("mpiexec"),
                  shutil.which("mpirun")]
    for c in candidates:
        if c and os.access(str(c), os.X_OK):
            return str(c)
    return None


def _mpi_or_skip():
    try:
        import mpi4py  # noqa: F401  (imports without initializing MPI)
    except ImportError:
        pytest.skip("mpi4py is not installed (pip install -e '.[mpi]')")
    mpiexec = _find_mpiexec()
    if mpiexec is None:
        pytest.skip("no mpiexec found next to the Python interpreter or on PATH "
                    "(pip install -e '.[mpi]' installs MPICH's)")
    return mpiexec


def _launch(mpiexec, nranks, out_dir, script=HERE / "mpi_worker.py", mode="cpu"):
    version = subprocess.run([mpiexec, "--version"], capture_output=True, text=True,
                             timeout=30).stdout
    env = dict(os.environ, OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1", MKL_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    args = [mpiexec]
    if "Open MPI" in version or "OpenRTE" in version or "PRRTE" in version:
        env.update(OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1")
        args.append("--oversubscribe")
    args += ["-n", str(nranks), sys.executable, str(script), str(out_dir), mode]
    try:
        proc = subprocess.run(args, env=env, capture_output=True, text=True,
                              timeout=LAUNCH_TIMEOUT_S, cwd=str(ROOT))
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"mpiexec -n {nranks} did not finish in {LAUNCH_TIMEOUT_S} s: a rank is "
                    f"stuck in a collective\nstderr:\n{exc.stderr}")
    if proc.returncode != 0:
        pytest.fail(f"mpiexec -n {nranks} failed with status {proc.returncode}\n"
                    f"stdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-3000:]}")
    if script != HERE / "mpi_worker.py":
        return proc.stdout
    results = []
    for r in range(nranks):
        with open(out_dir / f"rank{r}.pkl", "rb") as f:
            results.append(pickle.load(f))
    return results


def _warm_emu():
    """Compile the emu kernels once here so that the ranks find them cached."""
    try:
        gpubn.backends.get_backend("emu")
    except RuntimeError:
        return
    x = np.random.default_rng(0).standard_normal((4, 3, 5))
    for xx in (x, x.astype(np.float32)):
        y, saved = gpubn.batch_norm_forward(xx, backend="emu")
        gpubn.batch_norm_backward(y, saved)


@pytest.fixture(scope="module", params=[2, 3], ids=lambda n: f"{n}ranks")
def mpi_run(request, tmp_path_factory):
    mpiexec = _mpi_or_skip()
    _warm_emu()
    nranks = request.param
    results = _launch(mpiexec, nranks, tmp_path_factory.mktemp(f"mpi{nranks}"))
    assert [r["rank"] for r in results] == list(range(nranks))
    assert all(r["size"] == nranks for r in results)
    return nranks, results


def _records(mpi_run, backend, case):
    nranks, results = mpi_run
    if backend in results[0]["skipped"]:
        pytest.skip(results[0]["skipped"][backend])
    recs = [r["backends"][backend][case] for r in results]
    for r, rec in enumerate(recs):
        if rec and rec[0].get("error") == "crash":
            pytest.fail(f"rank {r} crashed:\n{rec[0]['message']}")
    return nranks, recs


def _reference_layer(data, backend, steps):
    """Single-process BatchNorm over the whole batch for the given step indices."""
    bn = gpubn.BatchNorm(data["c"], affine=data["affine"], track_running_stats=data["track"],
                         momentum=data["momentum"], axis=data["axis"], dtype="float32",
                         backend=backend)
    if data["affine"]:
        bn.weight[...] = data["weight"]
        bn.bias[...] = data["bias"]
    out = {}
    for step in steps:
        x, dy = data["steps"][step]
        bn.train(data["modes"][step] == "train")
        rec = {"y": bn(x), "dx": bn.backward(dy), "dweight": bn.grad_weight,
               "dbias": bn.grad_bias}
        if bn.track_running_stats:
            rec.update(running_mean=bn.running_mean.copy(), running_var=bn.running_var.copy(),
                       num_batches_tracked=bn.num_batches_tracked)
        out[step] = rec
    return out


def _check_step(got_by_rank, ref, data, step):
    """Compare every rank's record of one step with the single-process one."""
    dt = np.dtype(data["dtype"])
    nranks = len(got_by_rank)
    for r, got in enumerate(got_by_rank):
        assert "error" not in got, f"rank {r} step {step}: {got.get('error')}: {got.get('message')}"
        sl = rank_slice(data["splits"], r)
        where = f"rank {r}/{nranks} step {step}"
        assert got["y"].shape == ref["y"][sl].shape and got["y"].dtype == dt
        assert_close(got["y"], ref["y"][sl], dt, f"y ({where})")
        assert_close(got["dx"], ref["dx"][sl], dt, f"dx ({where})")
        for key in ("dweight", "dbias"):
            if ref[key] is None:
                assert got[key] is None, f"{key} ({where}) should be None"
            else:
                assert_close(got[key], ref[key], np.float32, f"{key} ({where})")
        for key in ("running_mean", "running_var"):
            if key in ref:
                assert_close(got[key], ref[key], np.float32, f"{key} ({where})")
        if "num_batches_tracked" in ref:
            assert got["num_batches_tracked"] == ref["num_batches_tracked"], where
    # every rank holds exactly the same statistics and parameter gradients
    for key in ("running_mean", "running_var", "dweight", "dbias"):
        vals = [g.get(key) for g in got_by_rank]
        if vals[0] is not None:
            for r, v in enumerate(vals[1:], 1):
                assert np.array_equal(v, vals[0]), f"{key} differs between rank 0 and {r}"


# ---- checks of one case; ref_backend runs the single-process reference ----
def check_layer_case(nranks, recs, case, ref_backend):
    data = case_data(case, nranks)
    ref = _reference_layer(data, ref_backend, range(len(data["modes"])))
    for step in range(len(data["modes"])):
        _check_step([rec[step] for rec in recs], ref[step], data, step)


def check_functional_case(nranks, recs, ref_backend):
    data = case_data("unequal_zero_functional", nranks)
    assert 0 in data["splits"]
    c = data["c"]
    rm, rv = np.zeros(c, np.float32), np.ones(c, np.float32)
    for step, (x, dy) in enumerate(data["steps"]):
        y, saved = gpubn.batch_norm_forward(x, weight=data["weight"], bias=data["bias"],
                                            running_mean=rm, running_var=rv,
                                            momentum=None, num_batches_tracked=step,
                                            backend=ref_backend)
        dx, dw, db = gpubn.batch_norm_backward(dy, saved)
        ref = dict(y=y, dx=dx, dweight=dw, dbias=db, running_mean=rm.copy(),
                   running_var=rv.copy(), num_batches_tracked=step + 1)
        _check_step([rec[step] for rec in recs], ref, data, step)


def check_one_value(recs):
    for r, rec in enumerate(recs):
        assert rec[0].get("error") == "ValueError", f"rank {r}: {rec[0]}"
        assert "more than 1 value per channel" in rec[0]["message"]
        # the failed step left the running statistics alone
        assert np.array_equal(rec[0]["running_mean"], np.zeros(3, np.float32))
        assert np.array_equal(rec[0]["running_var"], np.ones(3, np.float32))
        assert rec[0]["num_batches_tracked"] == 0


def check_bad_rank(nranks, recs, ref_backend):
    data = case_data("bad_rank", nranks)
    for r, rec in enumerate(recs):
        first = rec[0]
        if r == 1:
            assert first.get("error") == "ValueError", first
            assert "channels" in first["message"]
        else:
            assert first.get("error") == "RemoteRankError", f"rank {r}: {first}"
            assert "rank(s) [1]" in first["message"]
        assert np.array_equal(first["running_mean"], np.zeros(3, np.float32))
        assert np.array_equal(first["running_var"], np.ones(3, np.float32))
        assert first["num_batches_tracked"] == 0
    # the failed step did not desynchronize the ranks: the next one is right
    ref = _reference_layer(data, ref_backend, [1])
    _check_step([rec[1] for rec in recs], ref[1], data, 1)


def check_bad_dy(nranks, recs, ref_backend, device):
    """Host buffers: the other ranks raise.  Device buffers: the status is not
    read back (no synchronization), the other ranks' gradients are NaN."""
    data = case_data("bad_dy_rank", nranks)
    for r, rec in enumerate(recs):
        first = rec[0]
        if r == 1:
            assert first.get("error") == "TypeError" and "dy" in first["message"], first
        elif device:
            assert "error" not in first, f"rank {r}: {first}"
            assert np.isnan(first["dweight"]).all() and np.isnan(first["dx"]).all()
        else:
            assert first.get("error") == "RemoteRankError", f"rank {r}: {first}"
    ref = _reference_layer(data, ref_backend, [0, 1])
    _check_step([rec[1] for rec in recs], ref[1], data, 1)


# -------------------------------------------------- CPU: numpy, cpu, emu ----
BACKENDS = ["numpy", "cpu", "emu"]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", ["equal_nchw", "channels_last_noaffine"])
def test_layer_steps_match_single_process(mpi_run, backend, case):
    nranks, recs = _records(mpi_run, backend, case)
    check_layer_case(nranks, recs, case, backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_functional_unequal_split_with_empty_rank(mpi_run, backend):
    check_functional_case(*_records(mpi_run, backend, "unequal_zero_functional"), backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_one_value_per_channel_raises_on_every_rank(mpi_run, backend):
    check_one_value(_records(mpi_run, backend, "one_value")[1])


@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_input_on_one_rank_raises_everywhere_and_the_next_step_works(mpi_run, backend):
    check_bad_rank(*_records(mpi_run, backend, "bad_rank"), backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_dy_on_one_rank_raises_everywhere_and_the_next_step_works(mpi_run, backend):
    check_bad_dy(*_records(mpi_run, backend, "bad_dy_rank"), backend, device=False)


# ------------------------------------------- GPU: cuda over MPI and NCCL ----
@pytest.fixture(scope="module")
def gpu_mpi_run(tmp_path_factory):
    mpiexec = _mpi_or_skip()
    cupy = pytest.importorskip("cupy", reason="no CUDA device / NCCL: CuPy is not installed")
    try:
        ndev = cupy.cuda.runtime.getDeviceCount()
    except Exception as exc:  # noqa: BLE001 - no driver
        pytest.skip(f"no CUDA device: {exc}")
    if ndev < 1:
        pytest.skip("no CUDA device")
    try:
        gpubn.backends.get_backend("cuda")
    except RuntimeError as exc:
        pytest.skip(str(exc))
    return 2, _launch(mpiexec, 2, tmp_path_factory.mktemp("mpi_gpu"), mode="gpu")


@pytest.mark.gpu
@pytest.mark.parametrize("transport", ["cuda+mpi", "cuda+nccl"])
def test_gpu_ranks_match_single_process(gpu_mpi_run, transport):
    nranks, _ = gpu_mpi_run
    for case in ("equal_nchw", "channels_last_noaffine"):
        check_layer_case(nranks, _records(gpu_mpi_run, transport, case)[1], case, "numpy")
    check_functional_case(*_records(gpu_mpi_run, transport, "unequal_zero_functional"),
                          "numpy")
    check_one_value(_records(gpu_mpi_run, transport, "one_value")[1])
    check_bad_rank(*_records(gpu_mpi_run, transport, "bad_rank"), "numpy")
    check_bad_dy(*_records(gpu_mpi_run, transport, "bad_dy_rank"), "numpy", device=True)


def test_readme_example_runs_on_two_ranks(tmp_path):
    mpiexec = _mpi_or_skip()
    text = (ROOT / "README.md").read_text()
    blocks = [b for b in re.findall(r"```py\n(.*?)```", text, flags=re.S)
              if "sync_bn_example.py" in b]
    assert len(blocks) == 1, "README lacks the sync_bn_example.py block"
    script = tmp_path / "sync_bn_example.py"
    script.write_text(blocks[0])
    out = _launch(mpiexec, 2, tmp_path, script=script)
    assert out.startswith("2 ranks: [") and out.count("\n") == 1, out
    # dbias is the sum of dy = 1 over the global batch: 8 + 9 samples of 10 x 10
    assert out.strip().endswith("[1700. 1700. 1700.]"), out
