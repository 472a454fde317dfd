"""gpubn.torch, the drop-in for torch.nn.BatchNorm*d, against PyTorch itself.

CPU tensors run on the default NumPy backend and, where named, on emu (the
CUDA kernels); the CUDA tests need a GPU and CuPy.  Models and batches are
small: emu executes every kernel thread on the CPU.
"""

from __future__ import annotations

import copy
import subprocess
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="PyTorch is not installed (extra 'gpubn[torch]')")

import gpubn  # noqa: E402
import gpubn.torch as gt  # noqa: E402
from conftest import BFLOAT16, TOL, unavailable_reason  # noqa: E402
from gpubn.backends.cuda import CudaBackend  # noqa: E402

_EMU_REASON = unavailable_reason("emu")

CPU_BACKENDS = [None, pytest.param("emu", marks=pytest.mark.skipif(
    _EMU_REASON is not None, reason=_EMU_REASON or ""))]
CPU_IDS = ["auto", "emu"]

_CUDA_REASON = CudaBackend.unavailable_reason()
needs_gpu = pytest.mark.skipif(_CUDA_REASON is not None, reason=_CUDA_REASON or "")


def assert_tensors_close(actual, expected, dtype, name):
    rtol, atol = TOL[np.dtype(dtype)]
    torch.testing.assert_close(actual.detach().double(), expected.detach().double(), rtol=rtol,
                               atol=atol, msg=lambda m: f"{name}: {m}")


def _pair(cls_name="BatchNorm2d", c=3, **kwargs):
    """(torch layer, drop-in) with the same random parameters and statistics."""
    torch.manual_seed(0)
    ref = getattr(torch.nn, cls_name)(c, **kwargs)
    if ref.affine:
        with torch.no_grad():
            ref.weight.uniform_(0.5, 1.5)
            ref.bias.normal_()
    ours = getattr(gt, cls_name)(c, **kwargs)
    ours.load_state_dict(ref.state_dict())
    return ref, ours


def _run(layer, x, dy):
    x = x.detach().clone().requires_grad_()
    y = layer(x)
    y.backward(dy)
    return y, x.grad


# ------------------------------------------------------- import rules ----
def test_gpubn_never_imports_torch_and_the_drop_in_needs_no_cupy():
    code = ("import sys\n"
            "import gpubn\n"
            "assert 'torch' not in sys.modules, 'import gpubn imported torch'\n"
            "sys.modules['cupy'] = None  # any import of CuPy fails\n"
            "import gpubn.torch\n"
            "print('ok')\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr
    # without PyTorch the error says what to install
    code = "import sys\nsys.modules['torch'] = None\nimport gpubn.torch\n"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode != 0 and "pip install 'gpubn[torch]'" in out.stderr, out.stderr


# ---------------------------------------------------------- gradcheck ----
@pytest.mark.parametrize("backend", CPU_BACKENDS, ids=CPU_IDS)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_gradcheck_float64(backend, training):
    torch.manual_seed(1)
    x = (torch.randn(4, 3, 2, 3, dtype=torch.float64) * 2 + 1).requires_grad_()
    w = torch.rand(3, dtype=torch.float64).add_(0.5).requires_grad_()
    b = torch.randn(3, dtype=torch.float64).requires_grad_()
    rm = torch.randn(3, dtype=torch.float64)
    rv = torch.rand(3, dtype=torch.float64).add_(0.5)

    def f(x, w, b):
        return gt.batch_norm(x, rm.clone(), rv.clone(), w, b, training, 0.1, 1e-5,
                             backend=backend)

    assert torch.autograd.gradcheck(f, (x, w, b), eps=1e-6, atol=1e-7, rtol=1e-5)


def test_gradcheck_catches_a_wrong_gradient(monkeypatch):
    """The check above can fail: a backward with dx off by 0.01 is caught."""
    import gpubn.torch as module

    real = module.batch_norm_backward

    def wrong(dy, saved):
        dx, dw, db = real(dy, saved)
        return dx + 0.01, dw, db

    monkeypatch.setattr(module, "batch_norm_backward", wrong)
    x = torch.randn(4, 3, 5, dtype=torch.float64, requires_grad=True)
    assert not torch.autograd.gradcheck(lambda x: gt.batch_norm(x, None, None, training=True),
                                        (x,), eps=1e-6, atol=1e-7, raise_exception=False)


# ----------------------------------------------------- layer vs torch ----
@pytest.mark.parametrize("backend", CPU_BACKENDS, ids=CPU_IDS)
@pytest.mark.parametrize("cls_name,shape", [("BatchNorm1d", (6, 4)), ("BatchNorm1d", (5, 4, 7)),
                                            ("BatchNorm2d", (4, 4, 5, 6)),
                                            ("BatchNorm3d", (2, 4, 3, 4, 5))])
@pytest.mark.parametrize("momentum", [0.1, None])
def test_train_then_eval_matches_torch(backend, cls_name, shape, momentum):
    ref, ours = _pair(cls_name, 4, momentum=momentum)
    ours.backend = backend
    for step in range(3):
        x = torch.randn(shape) * 2 + step
        dy = torch.randn(shape)
        y_r, dx_r = _run(ref, x, dy)
        y_o, dx_o = _run(ours, x, dy)
        assert_tensors_close(y_o, y_r, np.float32, f"y step {step}")
        assert_tensors_close(dx_o, dx_r, np.float32, f"dx step {step}")
    assert_tensors_close(ours.weight.grad, ref.weight.grad, np.float32, "accumulated dweight")
    assert_tensors_close(ours.bias.grad, ref.bias.grad, np.float32, "accumulated dbias")
    for key, value in ref.state_dict().items():
        assert_tensors_close(ours.state_dict()[key], value, np.float32, key)
    ref.eval()
    ours.eval()
    x, dy = torch.randn(shape), torch.randn(shape)
    y_r, dx_r = _run(ref, x, dy)
    y_o, dx_o = _run(ours, x, dy)
    assert_tensors_close(y_o, y_r, np.float32, "eval y")
    assert_tensors_close(dx_o, dx_r, np.float32, "eval dx")
    assert int(ours.num_batches_tracked) == 3


@pytest.mark.parametrize("track", [True, False], ids=["tracked", "untracked"])
@pytest.mark.parametrize("affine", [True, False], ids=["affine", "noaffine"])
def test_options_match_torch_in_both_modes(track, affine):
    ref, ours = _pair("BatchNorm2d", 3, track_running_stats=track, affine=affine)
    x, dy = torch.randn(4, 3, 3, 5), torch.randn(4, 3, 3, 5)
    for mode in ("train", "eval"):
        ref.train(mode == "train")
        ours.train(mode == "train")
        y_r, dx_r = _run(ref, x, dy)
        y_o, dx_o = _run(ours, x, dy)
        assert_tensors_close(y_o, y_r, np.float32, f"{mode} y")
        assert_tensors_close(dx_o, dx_r, np.float32, f"{mode} dx")
    assert ours.state_dict().keys() == ref.state_dict().keys()


# ------------------------------------------------------ channels_last ----
@pytest.mark.parametrize("backend", CPU_BACKENDS, ids=CPU_IDS)
@pytest.mark.parametrize("dims", [2, 3])
def test_channels_last_keeps_its_layout_without_a_copy(backend, dims):
    cls_name, shape, fmt = (("BatchNorm2d", (3, 4, 5, 6), torch.channels_last) if dims == 2 else
                            ("BatchNorm3d", (2, 4, 3, 4, 5), torch.channels_last_3d))
    ref, ours = _pair(cls_name, 4)
    ours.backend = backend
    x = (torch.randn(shape) * 3 + 1).contiguous(memory_format=fmt)
    dy = torch.randn(shape).contiguous(memory_format=fmt)
    assert not x.is_contiguous()
    y_r, dx_r = _run(ref, x, dy)
    xg = x.detach().clone().requires_grad_()
    y_o = ours(xg)
    # the kernels read x where it lies: the saved canonical array is a view of x
    saved, order, _ = y_o.grad_fn.gpubn
    assert order is not None and np.shares_memory(saved.x3, xg.detach().numpy())
    y_o.backward(dy)
    assert y_o.is_contiguous(memory_format=fmt) and xg.grad.is_contiguous(memory_format=fmt)
    assert_tensors_close(y_o, y_r, np.float32, "y")
    assert_tensors_close(xg.grad, dx_r, np.float32, "dx")
    assert_tensors_close(ours.weight.grad, ref.weight.grad, np.float32, "dweight")


def test_contiguous_input_is_not_copied():
    _, ours = _pair("BatchNorm2d", 3)
    x = torch.randn(2, 3, 4, 4)
    y = ours(x.requires_grad_())
    saved, order, _ = y.grad_fn.gpubn
    assert order is None and np.shares_memory(saved.x3, x.detach().numpy())


def test_in_place_change_of_the_input_after_forward_is_detected():
    _, ours = _pair("BatchNorm1d", 3)
    x = torch.randn(4, 3, requires_grad=True)
    h = x * 1.0
    y = ours(h)
    with torch.no_grad():
        h.add_(1)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.sum().backward()


# --------------------------------------------------------- state_dict ----
def test_state_dict_round_trips_both_ways():
    ref, ours = _pair("BatchNorm2d", 5, momentum=None)
    for _ in range(2):
        ref(torch.randn(4, 5, 3, 3) + 2)
        ours(torch.randn(4, 5, 3, 3) - 1)
    # torch -> drop-in
    a = gt.BatchNorm2d(5, momentum=None)
    a.load_state_dict(ref.state_dict())
    # drop-in -> torch
    b = torch.nn.BatchNorm2d(5, momentum=None)
    b.load_state_dict(ours.state_dict())
    for src, dst in ((ref, a), (ours, b)):
        s, d = src.state_dict(), dst.state_dict()
        assert list(s) == list(d)
        for key in s:
            assert torch.equal(s[key], d[key]), key
    # and into the NumPy layer, whose keys are PyTorch's
    layer = gpubn.BatchNorm(5, backend="numpy")
    layer.load_state_dict(ours.state_dict())
    np.testing.assert_array_equal(layer.running_var, ours.running_var.numpy())
    assert layer.num_batches_tracked == 2


# ------------------------------------------------ convert / revert ----
class _Block(torch.nn.Module):
    """conv, BN, ReLU, conv, BN, residual add, ReLU; pooled into a classifier."""

    def __init__(self, c=4, classes=3):
        super().__init__()
        self.stem = torch.nn.Sequential(torch.nn.Conv2d(3, c, 3, padding=1, bias=False),
                                        torch.nn.BatchNorm2d(c), torch.nn.ReLU())
        self.conv = torch.nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn = torch.nn.BatchNorm2d(c)
        self.head = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(c, classes),
                                        torch.nn.BatchNorm1d(classes))

    def forward(self, x):
        h = self.stem(x)
        h = torch.relu(h + self.bn(self.conv(h)))
        return self.head(h.mean(dim=(2, 3), keepdim=True))


def _batch_norms(model):
    return [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]


def test_convert_and_revert_in_place():
    torch.manual_seed(3)
    model = _Block()
    params = {name: p for name, p in model.named_parameters()}
    buffers = {name: b for name, b in model.named_buffers()}
    assert gt.convert(model, backend="numpy") is model
    kinds = [type(m) for m in _batch_norms(model)]
    assert kinds == [gt.BatchNorm2d, gt.BatchNorm2d, gt.BatchNorm1d]
    assert all(m.backend == "numpy" for m in _batch_norms(model))
    assert all(p is params[n] for n, p in model.named_parameters())
    assert all(b is buffers[n] for n, b in model.named_buffers())
    converted = model(torch.randn(4, 3, 6, 6))
    assert converted.grad_fn.name() == "_NormFunctionBackward"
    assert gt.revert(model) is model
    kinds = [type(m) for m in _batch_norms(model)]
    assert kinds == [torch.nn.BatchNorm2d, torch.nn.BatchNorm2d, torch.nn.BatchNorm1d]
    assert not any("backend" in vars(m) for m in _batch_norms(model))
    assert model(torch.randn(4, 3, 6, 6)).grad_fn.name() != "_NormFunctionBackward"


def test_convert_a_batch_norm_itself_and_leave_subclasses():
    class MyBN(torch.nn.BatchNorm2d):
        pass

    bn = gt.convert(torch.nn.BatchNorm2d(3))
    assert type(bn) is gt.BatchNorm2d
    tree = torch.nn.Sequential(MyBN(3), torch.nn.SyncBatchNorm(3))
    gt.convert(tree)
    assert type(tree[0]) is MyBN and type(tree[1]) is gt.SyncBatchNorm
    copied = copy.deepcopy(bn)
    assert type(copied) is gt.BatchNorm2d


@pytest.mark.parametrize("backend", CPU_BACKENDS, ids=CPU_IDS)
def test_20_steps_of_a_conv_net_match_torch(backend):
    """The same small residual conv net trained 20 steps with SGD (momentum),
    once with PyTorch's batch norm and once converted, from the same seed:
    losses and parameters agree within the suite's float32 tolerance.  (Both
    are float32 computations of the same function; 20 SGD steps leave their
    rounding-level differences at a few 1e-6 on values of order 1.)"""
    torch.manual_seed(7)
    ref = _Block()
    ours = gt.convert(copy.deepcopy(ref), backend=backend)
    data = [(torch.randn(8, 3, 6, 6), torch.randint(0, 3, (8,))) for _ in range(4)]
    losses = {}
    for name, model in (("torch", ref), ("gpubn", ours)):
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        losses[name] = []
        for step in range(20):
            x, target = data[step % len(data)]
            loss = torch.nn.functional.cross_entropy(model(x), target)
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses[name].append(loss.item())
    rtol, atol = TOL[np.dtype(np.float32)]
    np.testing.assert_allclose(losses["gpubn"], losses["torch"], rtol=rtol, atol=atol)
    assert losses["torch"][-1] < losses["torch"][0], "the net did not train"
    for (name, p_r), (_, p_o) in zip(ref.state_dict().items(), ours.state_dict().items()):
        torch.testing.assert_close(p_o, p_r, rtol=rtol, atol=atol, msg=lambda m: f"{name}: {m}")
    ref.eval()
    ours.eval()
    x = torch.randn(8, 3, 6, 6)
    torch.testing.assert_close(ours(x), ref(x), rtol=rtol, atol=atol)


# ---------------------------------------------------- narrow storage ----
@pytest.mark.parametrize("backend", CPU_BACKENDS, ids=CPU_IDS)
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_narrow_inputs_with_float32_parameters(backend, dtype):
    """float16 / bfloat16 activations with float32 parameters and running
    statistics (autocast's mix): output in the input's dtype, against
    PyTorch in float32 on the same values."""
    if dtype == "bfloat16" and BFLOAT16 is None:
        pytest.skip("ml_dtypes is not installed")
    tdt = getattr(torch, dtype)
    ref, ours = _pair("BatchNorm2d", 3)
    ours.backend = backend
    x = (torch.randn(4, 3, 5, 5) * 2 + 1).to(tdt)
    dy = torch.randn(4, 3, 5, 5).to(tdt)
    y_r, dx_r = _run(ref, x.float(), dy.float())
    xg = x.clone().requires_grad_()
    y_o = ours(xg)
    if dtype == "bfloat16":                     # CPU bfloat16 goes through a view, not a copy
        assert np.shares_memory(y_o.grad_fn.gpubn[0].x3, xg.detach().view(torch.int16).numpy())
    y_o.backward(dy)
    assert y_o.dtype == tdt and xg.grad.dtype == tdt and ours.weight.grad.dtype == torch.float32
    key = np.dtype(np.float16) if dtype == "float16" else BFLOAT16
    assert_tensors_close(y_o, y_r, key, "y")
    assert_tensors_close(xg.grad, dx_r, key, "dx")
    assert_tensors_close(ours.running_var, ref.running_var, np.float32, "running_var")


def test_autocast_output_feeds_the_drop_in():
    """Under CPU autocast to bfloat16 the convolution hands the batch norm
    bfloat16 activations; the drop-in takes them with its float32 state."""
    if BFLOAT16 is None:
        pytest.skip("ml_dtypes is not installed")
    torch.manual_seed(5)
    conv = torch.nn.Conv2d(3, 4, 3)
    ref, ours = _pair("BatchNorm2d", 4)
    x = torch.randn(2, 3, 6, 6)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        h = conv(x)
        y = ours(h)
    assert h.dtype == torch.bfloat16 and y.dtype == torch.bfloat16
    assert_tensors_close(y, ref(h.float()), BFLOAT16, "y")


# ------------------------------------------------------ torch.compile ----
def test_torch_compile_runs_with_a_graph_break_at_the_batch_norms():
    """The gpubn call is excluded from tracing (documented in gpubn.torch):
    the compiled model gives the eager results, forward and backward, with
    the graph broken where gpubn runs."""
    torch.manual_seed(9)
    model = gt.convert(torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4),
                                           torch.nn.ReLU(), torch.nn.Conv2d(4, 4, 3),
                                           torch.nn.BatchNorm2d(4)))
    eager = copy.deepcopy(model)
    x = torch.randn(2, 3, 8, 8)
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="aot_eager")
    y_c = compiled(x)
    y_e = eager(x)
    torch.testing.assert_close(y_c, y_e, rtol=0, atol=0)
    y_c.sum().backward()
    y_e.sum().backward()
    torch.testing.assert_close(model[0].weight.grad, eager[0].weight.grad)
    explanation = torch._dynamo.explain(copy.deepcopy(eager))(x)
    assert explanation.graph_break_count >= 1 and explanation.graph_count >= 2, explanation


# ---------------------------------------------------------- bad input ----
def test_bad_input_raises_before_the_batch_counter_moves():
    _, ours = _pair("BatchNorm2d", 3)
    before = {k: v.clone() for k, v in ours.state_dict().items()}
    with pytest.raises(ValueError, match=r"expected 4D input \(got 3D input\)"):
        ours(torch.randn(2, 3, 4))
    with pytest.raises(ValueError, match=r"weight must have shape \(4,\) to match the 4 channels"):
        ours(torch.randn(2, 4, 4, 4))
    with pytest.raises(ValueError, match=r"expected more than 1 value per channel"):
        ours(torch.randn(1, 3, 1, 1))
    with pytest.raises(TypeError, match=r"x must have a floating-point dtype"):
        ours(torch.ones(2, 3, 4, 4, dtype=torch.int32))
    for key, value in ours.state_dict().items():
        assert torch.equal(value, before[key]), key


def test_bad_backend_and_module_arguments():
    with pytest.raises(ValueError, match=r"backend must be one of .* got 'gpu'"):
        gt.BatchNorm2d(3, backend="gpu")
    with pytest.raises(ValueError, match=r"backend must be one of"):
        gt.convert(torch.nn.BatchNorm2d(3), backend="gpu")
    with pytest.raises(TypeError, match=r"module must be a torch.nn.Module, got list"):
        gt.convert([])
    with pytest.raises(TypeError, match=r"input must be a torch.Tensor, got ndarray"):
        gt.batch_norm(np.ones((2, 3)), None, None, training=True)


def test_constructor_is_torchs():
    ours = gt.BatchNorm1d(6, eps=1e-3, momentum=0.3, affine=False, track_running_stats=True,
                          dtype=torch.float64, backend="numpy")
    ref = torch.nn.BatchNorm1d(6, eps=1e-3, momentum=0.3, affine=False, dtype=torch.float64)
    assert isinstance(ours, torch.nn.BatchNorm1d)
    assert (ours.eps, ours.momentum, ours.affine, ours.backend) == (1e-3, 0.3, False, "numpy")
    assert ours.state_dict().keys() == ref.state_dict().keys()
    assert ours.running_mean.dtype == torch.float64
    assert "backend='numpy'" in repr(ours)


# --------------------------------------------------------------- CUDA ----
@needs_gpu
@pytest.mark.gpu
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_cuda_tensors_on_the_current_stream(layout, dtype):
    if not torch.cuda.is_available():
        pytest.skip("this PyTorch build has no CUDA")
    tdt = getattr(torch, dtype)
    ref, ours = _pair("BatchNorm2d", 8)
    ref, ours = ref.cuda(), ours.cuda()
    x = (torch.randn(4, 8, 6, 6, device="cuda") * 2 + 1).to(tdt)
    dy = torch.randn(4, 8, 6, 6, device="cuda").to(tdt)
    if layout == "channels_last":
        x, dy = x.contiguous(memory_format=torch.channels_last), dy.contiguous(
            memory_format=torch.channels_last)
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        y_r, dx_r = _run(ref, x.float(), dy.float())
        y_o, dx_o = _run(ours, x, dy)
    stream.synchronize()
    assert y_o.device == x.device and y_o.dtype == tdt
    if layout == "channels_last":
        assert y_o.is_contiguous(memory_format=torch.channels_last)
    key = np.dtype(dtype) if dtype != "bfloat16" else BFLOAT16
    assert_tensors_close(y_o.cpu(), y_r.cpu(), key, "y")
    assert_tensors_close(dx_o.cpu(), dx_r.cpu(), key, "dx")
    assert_tensors_close(ours.running_var.cpu(), ref.running_var.cpu(), np.float32,
                         "running_var")


def test_weight_changed_in_place_between_forward_and_backward_is_detected():
    _, ours = _pair("BatchNorm1d", 3)
    y = ours(torch.randn(4, 3))
    with torch.no_grad():
        ours.weight.mul_(2)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.sum().backward()


def test_second_derivatives_raise_as_documented():
    _, ours = _pair("BatchNorm1d", 3)
    x = torch.randn(4, 3, requires_grad=True)
    (gx,) = torch.autograd.grad(ours(x).pow(2).sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="once_differentiable"):
        gx.sum().backward()


def test_bfloat16_without_ml_dtypes_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "ml_dtypes", None)
    install = r"\(pip install 'gpubn\[bfloat16\]'\)"
    with pytest.raises(TypeError, match=r"bfloat16 tensors need ml_dtypes " + install):
        gt.as_array(torch.ones(2, dtype=torch.bfloat16))


def test_inference_mode_and_a_layer_on_another_device():
    ref, ours = _pair("BatchNorm2d", 3)
    x = torch.randn(2, 3, 4, 4)
    with torch.inference_mode():
        assert_tensors_close(ours(x), ref(x), np.float32, "inference-mode y")
    assert int(ours.num_batches_tracked) == 1
    ours.to("meta")
    with pytest.raises(ValueError, match=r"input is on cpu but the layer's parameters and "
                                         r"buffers are on meta"):
        ours(x)


@pytest.mark.parametrize("training", [False, True])
@pytest.mark.parametrize("cls_name", ["BatchNorm2d", "SyncBatchNorm"])
def test_an_empty_batch_behaves_as_torchs(cls_name, training):
    # gpubn's functional API refuses an empty batch; the drop-in must not
    ref = getattr(torch.nn, cls_name)(3) if cls_name != "SyncBatchNorm" else torch.nn.BatchNorm2d(3)
    ours = getattr(gt, cls_name)(3)
    for m in (ref, ours):
        m.train(training)
    x_ref = torch.zeros(0, 3, 4, 4, requires_grad=True)
    x_ours = x_ref.detach().clone().requires_grad_(True)
    y_ref, y_ours = ref(x_ref), ours(x_ours)
    assert y_ours.shape == y_ref.shape == (0, 3, 4, 4)
    y_ref.sum().backward()
    y_ours.sum().backward()
    assert x_ours.grad.shape == x_ref.grad.shape
    for key, value in ref.state_dict().items():
        torch.testing.assert_close(ours.state_dict()[key], value, equal_nan=True, msg=key)
