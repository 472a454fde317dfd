"""The demo: its hand-written MLP gradients, and a short run that shows batch
norm rescuing a learning rate too high for the plain network."""

from __future__ import annotations

import io

import numpy as np
import pytest

from gpubn import demo


def _needs_sklearn():
    pytest.importorskip("sklearn.datasets",
                        reason="the demo's data set comes with scikit-learn; install the "
                               "'test' or 'demo' extra")


@pytest.mark.parametrize("batch_norm", [False, True])
@pytest.mark.parametrize("activation", ["sigmoid", "relu"])
def test_mlp_gradients_match_finite_differences(batch_norm, activation):
    # float64 network, central differences on every parameter of a tiny MLP
    rng = np.random.default_rng(0)
    net = demo.MLP((5, 4, 3, 3), batch_norm, activation, rng, np, "numpy", dtype=np.float64)
    if batch_norm:                               # move the affine parameters off 1 / 0
        for bn in net.bn[:2]:
            bn.weight[:] = rng.uniform(0.5, 1.5, bn.weight.shape)
            bn.bias[:] = rng.normal(size=bn.bias.shape)
    x = rng.normal(size=(6, 5))
    y = np.array([0, 1, 2, 0, 1, 2])

    def loss():
        return float(demo.softmax_cross_entropy(np, net.forward(x), y)[0])

    _, grad = demo.softmax_cross_entropy(np, net.forward(x), y)
    net.backward(grad)
    params = [(net.W[i], net.dW[i]) for i in range(3)]
    params += [(net.b[i], net.db[i]) for i in range(3) if net.b[i] is not None]
    params += [(bn.weight, bn.grad_weight) for bn in net.bn if bn is not None]
    params += [(bn.bias, bn.grad_bias) for bn in net.bn if bn is not None]
    assert len(params) == (8 if batch_norm else 6)
    h = 1e-6
    for p, g in params:
        num = np.zeros_like(p)
        for i in np.ndindex(p.shape):
            old = p[i]
            p[i] = old + h
            up = loss()
            p[i] = old - h
            down = loss()
            p[i] = old
            num[i] = (up - down) / (2 * h)
        np.testing.assert_allclose(g, num, rtol=1e-5, atol=1e-8)
    # one SGD step moves every parameter by -lr * its gradient
    before = [(p.copy(), g.copy()) for p, g in params]
    net.step(0.25)
    for (p, _), (old, g) in zip(params, before):
        np.testing.assert_allclose(p, old - 0.25 * g, rtol=1e-15, atol=1e-15)


def test_batch_norm_rescues_a_high_learning_rate():
    # Four epochs at learning rate 16: over seeds 0..11, measured on two
    # versions of the numpy backend (the high-rate run is chaotic in the last
    # float32 bits), the plain network stayed at chance (8.4-12.0% test
    # accuracy) and the batch-norm network reached 50.1-89.4%; the smallest
    # gap was 40 points.  A 25-point margin leaves room for rounding on other
    # platforms and backends yet fails if batch norm stops helping.
    _needs_sklearn()
    cfg = demo.DemoConfig(epochs=4, seed=0)
    data = demo.load_data(cfg.seed)
    plain = demo.train_one(cfg, data, cfg.high_lr, False, np, "numpy")
    bn = demo.train_one(cfg, data, cfg.high_lr, True, np, "numpy")
    assert len(bn.test_acc) == len(plain.test_acc) == 4
    assert bn.final_test_acc > plain.final_test_acc + 0.25, (plain.test_acc, bn.test_acc)
    assert plain.final_test_acc < 0.3
    # the probe records the percentiles of one unit's input, ordered
    assert len(bn.probe) == len(bn.probe_step) > 4
    assert all(p15 <= p50 <= p85 for p15, p50, p85 in bn.probe)


def test_demo_network_trains_alike_on_every_backend(backend):
    # the same seeded run on another backend (emu runs the CUDA kernels on the
    # CPU, cuda on the GPU) must follow numpy's: float32 rounding differs only in
    # the last bits, which 20 steps of SGD do not blow up to 1e-3
    _needs_sklearn()
    cfg = demo.DemoConfig(epochs=2, seed=0)
    Xtr, ytr, Xte, yte = demo.load_data(0)
    data = (Xtr[:320], ytr[:320], Xte, yte)           # 10 steps per epoch: seconds on emu
    ref = demo.train_one(cfg, data, cfg.lr, True, np, "numpy")
    xp = backend.xp
    got = demo.train_one(cfg, tuple(xp.asarray(a) for a in data), cfg.lr, True, xp,
                         backend.name)
    np.testing.assert_allclose(got.train_loss, ref.train_loss, rtol=1e-3)
    np.testing.assert_allclose(got.probe, ref.probe, rtol=1e-3, atol=1e-3)
    assert abs(got.final_test_acc - ref.final_test_acc) <= 2 / 359   # two test images


def test_runs_are_reproducible_and_seeded():
    _needs_sklearn()
    cfg = demo.DemoConfig(epochs=1, seed=3)
    data = demo.load_data(3)
    a = demo.train_one(cfg, data, cfg.lr, True, np, "numpy")
    b = demo.train_one(cfg, data, cfg.lr, True, np, "numpy")
    assert a == b
    cfg4 = demo.DemoConfig(epochs=1, seed=4)
    c = demo.train_one(cfg4, demo.load_data(4), cfg.lr, True, np, "numpy")
    assert c.train_loss != a.train_loss


def test_command_line_prints_the_table_and_writes_the_png(tmp_path):
    _needs_sklearn()
    out, err = io.StringIO(), io.StringIO()
    png = tmp_path / "curves.png"
    rc = demo.main(["--quick", "--epochs", "1", "--backend", "numpy", "--out", str(png)],
                   stdout=out, stderr=err)
    assert rc == 0
    text = out.getvalue()
    assert "backend: numpy" in text
    for label in ("plain lr=0.5", "BN lr=0.5", "plain lr=16", "BN lr=16"):
        assert label in text
    rows = [ln for ln in text.splitlines()               # epoch rows: a column per run
            if ln[:6].strip().isdigit() and ln.count("|") == 4]
    assert [r.split()[0] for r in rows] == ["1"]
    assert "percentiles 15/50/85" in text
    assert "trained in" in err.getvalue()                # progress goes to stderr
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        assert "matplotlib is not installed" in text
    else:
        assert f"curves written to {png}" in text
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_gpubn_demo_subcommand(capsys):
    _needs_sklearn()
    from gpubn.__main__ import main

    assert main(["demo", "--epochs", "1", "--no-plot", "--no-progress", "--seed", "1"]) == 0
    captured = capsys.readouterr()
    assert "gpubn demo: sigmoid MLP 64-100-100-100-10" in captured.out
    assert "seed 1" in captured.out
    assert "Final accuracy" in captured.out
    assert captured.err == ""                            # --no-progress: nothing on stderr


def test_command_line_reports_run_errors():
    _needs_sklearn()
    out, err = io.StringIO(), io.StringIO()
    rc = demo.main(["--batch-size", "5000", "--no-plot"], stdout=out, stderr=err)
    assert rc == 2
    assert "batch_size 5000 is larger than the training set (1438 images)" in err.getvalue()
    assert out.getvalue() == ""


@pytest.mark.parametrize("argv,message", [
    (["--epochs", "0"], "argument --epochs: must be at least 1, got 0"),
    (["--batch-size", "1"], "argument --batch-size: must be at least 2 (batch norm needs"),
    (["--lr", "-1"], "argument --lr: must be a positive number, got -1"),
    (["--high-lr", "fast"], "argument --high-lr: expected a number, got 'fast'"),
    (["--backend", "tpu"], "invalid choice: 'tpu'"),
])
def test_command_line_rejects_bad_arguments(argv, message, capsys):
    with pytest.raises(SystemExit) as info:
        demo.main(argv)
    assert info.value.code == 2
    assert message in capsys.readouterr().err
