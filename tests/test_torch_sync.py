"""gpubn.torch.SyncBatchNorm, the drop-in for torch.nn.SyncBatchNorm.

Two real processes over a gloo process group (tests/torch_dist_worker.py,
spawned with a timeout so that a rank stuck in a collective fails the test;
slow: about 10 s alone, 30 s on a loaded machine)
are compared with PyTorch's batch norm over the concatenated global batch --
the defining property of synchronized batch norm, and the only reference on
CPU, since torch.nn.SyncBatchNorm's own forward needs a GPU.  In-process:
one rank (no process group) against torch.nn.SyncBatchNorm itself, several
simulated ranks in threads (a gpubn communicator given as the process
group), conversion, and argument errors.  NCCL needs CUDA: that test skips
without a GPU.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="PyTorch is not installed (extra 'gpubn[torch]')")

import gpubn.torch as gt  # noqa: E402
from conftest import TOL  # noqa: E402
from test_sync_bn import run_ranks, ok  # noqa: E402
import torch_dist_worker as W  # noqa: E402

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
LAUNCH_TIMEOUT_S = 180


def assert_tensors_close(actual, expected, dtype, name):
    rtol, atol = TOL[np.dtype(dtype)]
    torch.testing.assert_close(actual.detach().double(), expected.detach().double(), rtol=rtol,
                               atol=atol, msg=lambda m: f"{name}: {m}")


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(world, out_dir, transport="gloo"):
    """Run the worker on ``world`` ranks; returns each rank's results."""
    port = _free_port()
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    procs = [subprocess.Popen([sys.executable, str(HERE / "torch_dist_worker.py"), str(r),
                               str(world), str(port), str(out_dir), transport],
                              env=env, cwd=str(ROOT), stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True)
             for r in range(world)]
    logs = []
    try:
        for p in procs:
            logs.append(p.communicate(timeout=LAUNCH_TIMEOUT_S)[0])
    except subprocess.TimeoutExpired:
        for p in procs:
            p.kill()
        pytest.fail(f"{world} ranks did not finish in {LAUNCH_TIMEOUT_S} s: a rank is stuck "
                    "in a collective")
    for r, p in enumerate(procs):
        if p.returncode != 0:
            pytest.fail(f"rank {r} failed with status {p.returncode}:\n{logs[r][-4000:]}")
    return [torch.load(out_dir / f"rank{r}.pt") for r in range(world)]


@pytest.fixture(scope="module")
def gloo_run(tmp_path_factory):
    return launch(2, tmp_path_factory.mktemp("gloo"))


# ------------------------------------------------------------ reference ----
def reference_layer(case, world=2, momentum=0.1, affine=True, eval_last=True):
    """torch.nn.BatchNorm2d over the concatenated batch, step by step as the
    worker runs the drop-in, with the global statistics of each training
    step (for the per-rank parameter sums)."""
    bn = torch.nn.BatchNorm2d(W.C, momentum=momentum, affine=affine)
    if affine:
        with torch.no_grad():
            bn.weight.copy_(W.initial_parameters()[0])
            bn.bias.copy_(W.initial_parameters()[1])
    out = []
    for step, (x, dy) in enumerate(W.case_data(case, world)):
        bn.train(step < W.STEPS - 1 or not eval_last)
        x = x.clone().requires_grad_()
        bn.zero_grad(set_to_none=True)
        y = bn(x)
        y.backward(dy)
        rec = {k: v.detach().clone() for k, v in bn.state_dict().items()}
        rec.update(y=y.detach(), dx=x.grad)
        x64 = x.detach().double()
        if bn.training:
            mean, var = x64.mean((0, 2, 3)), x64.var((0, 2, 3), unbiased=False)
        else:
            mean, var = bn.running_mean.double(), bn.running_var.double()
        rec["xhat"] = (x64 - mean[:, None, None]) / torch.sqrt(var[:, None, None] + bn.eps)
        out.append(rec)
    return out


def check_layer(results, case, ref, param_sums=True):
    sizes = W.splits(case, len(results))
    bounds = np.concatenate([[0], np.cumsum(sizes)])
    for r, steps in enumerate(results):
        sl = slice(bounds[r], bounds[r + 1])
        for s, (got, want) in enumerate(zip(steps, ref)):
            where = f"{case}, rank {r}, step {s}"
            assert got["kind"] == "SyncBatchNorm", where
            assert_tensors_close(got["y"], want["y"][sl], np.float32, f"y ({where})")
            assert_tensors_close(got["dx"], want["dx"][sl], np.float32, f"dx ({where})")
            for key in ("running_mean", "running_var", "num_batches_tracked"):
                assert_tensors_close(got[key], want[key], np.float32, f"{key} ({where})")
                # every rank holds the same running statistics
                assert torch.equal(got[key], results[0][s][key]), f"{key} ({where})"
            if s == 1 and sizes[r] > 0:
                assert got["channels_last"], f"channels_last lost ({where})"
            if "dw" in got and param_sums:
                # PyTorch's convention: each rank's own sums (DDP averages them)
                dy = W.case_data(case, len(results))[s][1][sl].double()
                assert_tensors_close(got["dw"], (dy * want["xhat"][sl]).sum((0, 2, 3)),
                                     np.float32, f"dweight ({where})")
                assert_tensors_close(got["db"], dy.sum((0, 2, 3)), np.float32,
                                     f"dbias ({where})")


# ------------------------------------------------------ two gloo ranks ----
@pytest.mark.slow
def test_two_ranks_match_batch_norm_on_the_global_batch(gloo_run):
    check_layer([r["layer"] for r in gloo_run], "layer", reference_layer("layer"))


@pytest.mark.slow
def test_a_rank_with_no_samples(gloo_run):
    check_layer([r["empty_rank"] for r in gloo_run], "empty_rank",
                reference_layer("empty_rank", eval_last=False))


@pytest.mark.slow
def test_functional_sync_batch_norm(gloo_run):
    ref = reference_layer("functional")[:1]
    check_layer([[dict(r["functional"][0], kind="SyncBatchNorm",
                       num_batches_tracked=ref[0]["num_batches_tracked"])] for r in gloo_run],
                "functional", ref)


@pytest.mark.slow
def test_guard_skips_the_non_finite_channel_on_both_ranks(gloo_run):
    steps = [r["guard"] for r in gloo_run]
    # step 0 updates everything; step 1 has an Inf in channel 2 on rank 0
    ref = reference_layer("guard", momentum=None, affine=False)
    for r in range(2):
        assert int(steps[r][0]["skipped_updates"]) == 0
        assert int(steps[r][1]["skipped_updates"]) == 1, f"rank {r}"
        for key in ("running_mean", "running_var"):
            before, after = steps[r][0][key], steps[r][1][key]
            assert after[2] == before[2], f"{key}[2] moved on rank {r}"
            keep = [0, 1, 3]
            # the other channels: PyTorch's cumulative average over both steps
            assert_tensors_close(after[keep], ref[1][key][keep], np.float32, key)
        assert not torch.isfinite(ref[1]["running_mean"][2])    # unguarded, the Inf gets in


@pytest.mark.slow
def test_ddp_training_matches_single_process_training(gloo_run):
    """Conv, converted SyncBatchNorm, ReLU under DistributedDataParallel:
    after 3 SGD steps every rank's parameters and running statistics equal
    those of the same net with torch.nn.BatchNorm2d trained on the global
    batch (the per-rank parameter gradients and DDP's averaging agree)."""
    net = W.conv_net(torch.nn.BatchNorm2d(W.C))
    with torch.no_grad():
        net[1].weight.copy_(W.initial_parameters()[0])
        net[1].bias.copy_(W.initial_parameters()[1])
    opt = torch.optim.SGD(net.parameters(), lr=0.05)
    for x, dy in W.case_data("ddp", 2):
        opt.zero_grad()
        (net(x) * dy).sum().backward()
        opt.step()
    for r, res in enumerate(gloo_run):
        assert res["ddp"]["kind"] == "SyncBatchNorm"
        for key, want in net.state_dict().items():
            assert_tensors_close(res["ddp"]["state"][key], want, np.float32, f"{key} (rank {r})")


# ------------------------------------------------------------ in-process ----
def _pair(**kwargs):
    torch.manual_seed(0)
    ref = torch.nn.SyncBatchNorm(3, **kwargs)
    if ref.affine:
        with torch.no_grad():
            ref.weight.uniform_(0.5, 1.5)
            ref.bias.normal_()
    ours = gt.SyncBatchNorm(3, **kwargs)
    ours.load_state_dict(ref.state_dict())
    return ref, ours


@pytest.mark.parametrize("kwargs", [{}, dict(momentum=None), dict(affine=False),
                                    dict(track_running_stats=False)])
def test_one_process_behaves_like_torch_sync_batch_norm(kwargs):
    """Without a process group both fall back to batch norm: train steps and
    an eval step give PyTorch's outputs, gradients and state."""
    ref, ours = _pair(**kwargs)
    assert sorted(ours.state_dict()) == sorted(ref.state_dict())
    for step in range(3):
        for m in (ref, ours):
            m.train(step < 2)
        x = torch.randn(5, 3, 4, 2) * 2 + 1
        dy = torch.randn(5, 3, 4, 2)
        got = []
        for m in (ref, ours):
            xx = x.clone().requires_grad_()
            m.zero_grad(set_to_none=True)
            y = m(xx)
            y.backward(dy)
            got.append((y, xx.grad))
        assert_tensors_close(got[1][0], got[0][0], np.float32, f"y (step {step})")
        assert_tensors_close(got[1][1], got[0][1], np.float32, f"dx (step {step})")
        if ref.affine:
            assert_tensors_close(ours.weight.grad, ref.weight.grad, np.float32, "dweight")
        for key, want in ref.state_dict().items():
            assert_tensors_close(ours.state_dict()[key], want, np.float32, key)


@pytest.mark.parametrize("sizes", [[2, 3, 4], [0, 5]])
def test_simulated_ranks_given_as_the_process_group(sizes):
    """A gpubn communicator as ``process_group``: the sync path runs on
    simulated ranks (threads) and matches torch.nn.BatchNorm2d on the
    concatenated batch; weight / bias gradients are each rank's own sums."""
    torch.manual_seed(1)
    x = torch.randn(sum(sizes), 3, 2, 3) * 3 - 1
    dy = torch.randn(sum(sizes), 3, 2, 3)
    bounds = np.concatenate([[0], np.cumsum(sizes)])
    w, b = torch.rand(3) + 0.5, torch.randn(3)

    def rank_fn(comm):
        bn = gt.SyncBatchNorm(3, process_group=comm)
        with torch.no_grad():
            bn.weight.copy_(w)
            bn.bias.copy_(b)
        xx = x[bounds[comm.rank]:bounds[comm.rank + 1]].clone().requires_grad_()
        y = bn(xx)
        y.backward(dy[bounds[comm.rank]:bounds[comm.rank + 1]])
        return y.detach(), xx.grad, bn.weight.grad, bn.running_var.clone()

    results = ok(run_ranks(len(sizes), rank_fn)[0])
    ref = torch.nn.BatchNorm2d(3)
    with torch.no_grad():
        ref.weight.copy_(w)
        ref.bias.copy_(b)
    xx = x.clone().requires_grad_()
    y = ref(xx)
    y.backward(dy)
    assert_tensors_close(sum(r[2] for r in results), ref.weight.grad, np.float32,
                         "sum of the ranks' dweight")
    for r, (y_r, dx_r, _, rv) in enumerate(results):
        sl = slice(bounds[r], bounds[r + 1])
        assert_tensors_close(y_r, y[sl], np.float32, f"y (rank {r})")
        assert_tensors_close(dx_r, xx.grad[sl], np.float32, f"dx (rank {r})")
        assert_tensors_close(rv, ref.running_var, np.float32, f"running_var (rank {r})")


def test_convert_and_revert_sync_batch_norm():
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 3, 1), torch.nn.SyncBatchNorm(3),
                                torch.nn.BatchNorm2d(3))
    sync = model[1]
    params = [p for p in model.parameters()]
    assert gt.convert(model) is model
    assert type(model[1]) is gt.SyncBatchNorm and model[1] is sync
    assert type(model[2]) is gt.BatchNorm2d
    assert [p for p in model.parameters()] == params
    gt.revert(model)
    assert type(model[1]) is torch.nn.SyncBatchNorm and type(model[2]) is torch.nn.BatchNorm2d
    assert "backend" not in model[1].__dict__


def test_convert_sync_batchnorm_counterpart():
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 3, 1), torch.nn.BatchNorm2d(3))
    with torch.no_grad():
        model[1].weight.fill_(2.0)
        model[1].running_mean.fill_(0.5)
    group = object()
    out = gt.SyncBatchNorm.convert_sync_batchnorm(model, group, backend="numpy")
    assert type(out[1]) is gt.SyncBatchNorm
    assert out[1].process_group is group and out[1].backend == "numpy"
    assert (out[1].weight == 2.0).all() and (out[1].running_mean == 0.5).all()


@pytest.mark.parametrize("make", [lambda: gt.BatchNorm2d(3, guard_running_stats=True),
                                  lambda: gt.SyncBatchNorm(3, guard_running_stats=True)],
                         ids=["BatchNorm2d", "SyncBatchNorm"])
def test_revert_leaves_exactly_torchs_state_dict_keys(make):
    m = make()
    m(torch.randn(4, 3, 2, 2))
    assert "skipped_updates" in m.state_dict()
    fresh = type(m).__mro__[2](3)           # the torch.nn class it replaces
    gt.revert(m)
    assert type(m) is type(fresh)
    assert list(m.state_dict()) == list(fresh.state_dict())
    fresh.load_state_dict(m.state_dict())   # strict: no extra key
    m(torch.randn(4, 3, 2, 2))              # and it still runs as PyTorch's


def test_ghost_batch_norm_is_refused():
    with pytest.raises(ValueError, match="virtual_batch_size=4 is not supported by sync batch"):
        gt.SyncBatchNorm(3, virtual_batch_size=4)


def test_process_group_comm_needs_an_initialized_group():
    assert not torch.distributed.is_initialized()
    with pytest.raises(RuntimeError, match="init_process_group"):
        gt.ProcessGroupComm()
    with pytest.raises(RuntimeError, match="init_process_group"):
        gt.sync_batch_norm(torch.randn(4, 3), None, None)


# --------------------------------------------------------------- NCCL ----
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="NCCL needs CUDA GPUs")
def test_nccl_ranks_match_batch_norm_on_the_global_batch(tmp_path):
    """The only part that needs a GPU: NCCL process groups, CUDA tensors
    through DLPack, gpubn's cuda backend on PyTorch's stream.  One GPU: the
    functional form over a one-rank NCCL group (the layer would not
    synchronize); two or more: the full two-rank run as with gloo."""
    pytest.importorskip("cupy")
    world = min(torch.cuda.device_count(), 2)
    results = launch(world, tmp_path, "nccl")
    ref = reference_layer("functional", world)[:1]
    check_layer([[dict(r["functional"][0], kind="SyncBatchNorm",
                       num_batches_tracked=ref[0]["num_batches_tracked"])] for r in results],
                "functional", ref)
    if world > 1:
        check_layer([r["layer"] for r in results], "layer", reference_layer("layer"))


def test_constructor_is_torchs():
    group = object()
    ours = gt.SyncBatchNorm(6, 1e-3, 0.3, False, True, group, dtype=torch.float64,
                            backend="numpy", guard_running_stats=False)
    ref = torch.nn.SyncBatchNorm(6, 1e-3, 0.3, False, True, group, dtype=torch.float64)
    assert isinstance(ours, torch.nn.SyncBatchNorm)
    assert (ours.eps, ours.momentum, ours.affine, ours.process_group, ours.backend) == \
        (1e-3, 0.3, False, group, "numpy")
    assert ours.state_dict().keys() == ref.state_dict().keys()
    assert ours.running_mean.dtype == torch.float64
    assert "backend='numpy'" in repr(ours)


def test_bad_input_on_one_rank_raises_on_both_before_any_state_changes():
    """Rank 0 passes 4 channels to a 3-channel layer: it raises its own error,
    rank 1 a RemoteRankError, nobody hangs and no state moves."""
    from gpubn.distributed import RemoteRankError

    def rank_fn(comm):
        bn = gt.SyncBatchNorm(3, process_group=comm, guard_running_stats=True)
        before = {k: v.clone() for k, v in bn.state_dict().items()}
        x = torch.randn(4, 4 if comm.rank == 0 else 3, 2)
        try:
            bn(x)
        except (ValueError, RemoteRankError) as exc:
            error = exc
        else:
            error = None
        same = all(torch.equal(v, before[k]) for k, v in bn.state_dict().items())
        return error, same

    (e0, same0), (e1, same1) = ok(run_ranks(2, rank_fn)[0])
    assert isinstance(e0, ValueError) and "channels" in str(e0) and same0
    assert isinstance(e1, RemoteRankError) and same1
