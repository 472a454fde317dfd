"""Worker for tests/test_torch_sync.py, launched once per rank as
``python torch_dist_worker.py RANK WORLD PORT OUT {gloo|nccl}``.

Every rank joins a ``torch.distributed`` process group (gloo on CPU tensors,
or NCCL with one GPU per rank), runs every case of ``CASES`` on its own
slice of a global batch that all ranks (and the test process) generate from
the same seed, and saves what it got (outputs, gradients, running
statistics, parameters after training) to ``OUT/rank<r>.pt``.  The test
process compares those with PyTorch's single-process batch norm over the
concatenated batch; no assertion lives here, so a wrong result can never be
hidden by the worker.
"""

from __future__ import annotations

import sys
from datetime import timedelta

import torch
import torch.distributed as dist

C = 4                       # channels of every case
SHAPE = (C, 3, 3)           # one sample
STEPS = 3


def splits(case: str, world: int):
    """Samples per rank (the global batch is their sum)."""
    table = {"layer": [3, 5], "ddp": [2, 4], "guard": [2, 3], "empty_rank": [0, 6],
             "functional": [3, 5]}
    if world == 1:
        return [sum(table[case])]
    return table[case]


def case_data(case: str, world: int):
    """(x, dy) of the global batch for each step (float32, fixed seed)."""
    g = torch.Generator().manual_seed(len(case))
    n = sum(splits(case, world))
    data = []
    for step in range(STEPS):
        x = torch.randn((n, *SHAPE), generator=g) * (1.0 + step) + 0.5
        dy = torch.randn((n, *SHAPE), generator=g)
        if case == "guard" and step == 1:
            x[0, 2, 1, 1] = float("inf")      # on rank 0's slice: channel 2 is not finite
        data.append((x, dy))
    return data


def initial_parameters():
    g = torch.Generator().manual_seed(11)
    return torch.rand(C, generator=g) + 0.5, torch.randn(C, generator=g)


def conv_net(bn):
    torch.manual_seed(5)
    net = torch.nn.Sequential(torch.nn.Conv2d(C, C, 3, padding=1, bias=False), bn,
                              torch.nn.ReLU())
    return net


def _slice(t, case, world, rank):
    sizes = splits(case, world)
    start = sum(sizes[:rank])
    return t[start:start + sizes[rank]].contiguous()


def run_layer(case, world, rank, device, make, eval_last=True):
    """Train STEPS steps (the last in eval mode with ``eval_last``) of the
    layer ``make()``; record what each step produced."""
    import gpubn.torch as gt  # noqa: F401 -- make() uses it

    bn = make().to(device)
    out = []
    for step, (x, dy) in enumerate(case_data(case, world)):
        bn.train(step < STEPS - 1 or not eval_last)
        x = _slice(x, case, world, rank).to(device)
        if step == 1 and x.shape[0] > 0:
            x = x.contiguous(memory_format=torch.channels_last)
        x.requires_grad_()
        bn.zero_grad(set_to_none=True)
        y = bn(x)
        y.backward(_slice(dy, case, world, rank).to(device))
        rec = {k: v.detach().cpu().clone() for k, v in bn.state_dict().items()}
        rec.update(y=y.detach().cpu(), dx=x.grad.cpu(), kind=type(bn).__name__,
                   channels_last=y.is_contiguous(memory_format=torch.channels_last)
                   and not y.is_contiguous())
        if bn.weight is not None:
            rec.update(dw=bn.weight.grad.cpu(), db=bn.bias.grad.cpu())
        out.append(rec)
    return out


def run_ddp(world, rank, device):
    """A conv net with a converted SyncBatchNorm, data-parallel, trained
    STEPS SGD steps; each rank's loss is ``world * sum(out * dy)``
    of its slice, so that DDP's average of the gradients is the gradient of
    ``sum(out * dy)`` over the global batch."""
    import gpubn.torch as gt

    net = gt.convert(conv_net(torch.nn.SyncBatchNorm(C)))
    with torch.no_grad():
        net[1].weight.copy_(initial_parameters()[0])
        net[1].bias.copy_(initial_parameters()[1])
    net = net.to(device)
    # DistributedDataParallel refuses SyncBatchNorm in CPU modules: there,
    # its gradient averaging (an all-reduce of each gradient, divided by the
    # world size) is done here
    ddp = torch.nn.parallel.DistributedDataParallel(net) if device.type == "cuda" else net
    opt = torch.optim.SGD(ddp.parameters(), lr=0.05)
    for x, dy in case_data("ddp", world):
        opt.zero_grad()
        y = ddp(_slice(x, "ddp", world, rank).to(device))
        loss = world * (y * _slice(dy, "ddp", world, rank).to(device)).sum()
        loss.backward()
        if ddp is net:
            for p in net.parameters():
                dist.all_reduce(p.grad)
                p.grad /= world
        opt.step()
    state = {k: v.detach().cpu().clone() for k, v in net.state_dict().items()}
    return {"state": state, "kind": type(net[1]).__name__}


def run_functional(world, rank, device):
    """gpubn.torch.sync_batch_norm over the world group: also with one rank,
    where the layer would not synchronize (the NCCL check on one GPU)."""
    import gpubn.torch as gt

    w, b = (t.to(device).requires_grad_() for t in initial_parameters())
    rm, rv = torch.zeros(C, device=device), torch.ones(C, device=device)
    x, dy = case_data("functional", world)[0]
    x = _slice(x, "functional", world, rank).to(device).requires_grad_()
    y = gt.sync_batch_norm(x, rm, rv, w, b, 0.1, 1e-5)
    y.backward(_slice(dy, "functional", world, rank).to(device))
    return [{"y": y.detach().cpu(), "dx": x.grad.cpu(), "dw": w.grad.cpu(), "db": b.grad.cpu(),
             "running_mean": rm.cpu(), "running_var": rv.cpu()}]


def main():
    rank, world, port, out, transport = (int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]),
                                         sys.argv[4], sys.argv[5])
    if transport == "nccl":
        torch.cuda.set_device(rank)
        device = torch.device("cuda", rank)
    else:
        device = torch.device("cpu")
    dist.init_process_group(transport, init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world, timeout=timedelta(seconds=60))
    import gpubn.torch as gt

    def layer():
        bn = gt.convert(torch.nn.SyncBatchNorm(C))     # convert keeps the group (the world)
        with torch.no_grad():
            bn.weight.copy_(initial_parameters()[0])
            bn.bias.copy_(initial_parameters()[1])
        return bn

    results = {"functional": run_functional(world, rank, device)}
    if world > 1:
        results["layer"] = run_layer("layer", world, rank, device, layer)
        # (an empty batch in eval mode is an error in gpubn: train steps only)
        results["empty_rank"] = run_layer("empty_rank", world, rank, device, layer,
                                          eval_last=False)
        results["guard"] = run_layer(
            "guard", world, rank, device,
            lambda: gt.SyncBatchNorm(C, momentum=None, affine=False, guard_running_stats=True))
        results["ddp"] = run_ddp(world, rank, device)
    torch.save(results, f"{out}/rank{rank}.pt")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
