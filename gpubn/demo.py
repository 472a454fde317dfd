"""Batch norm at work: an MLP on the 8x8 digits, with and without BatchNorm.

``python -m gpubn demo`` trains a small multilayer perceptron with sigmoid
activations on scikit-learn's bundled digits data set (1797 images of 8x8
pixels; read from inside scikit-learn, no download) four times: without and
with ``gpubn.BatchNorm`` after each hidden dense layer, at a moderate learning
rate and at one too high for the network without batch norm.  It prints a
table of loss and accuracy per epoch, the 15th/50th/85th percentiles of one
hidden unit's input (the sigmoid's argument) over training -- the picture of
internal covariate shift from Ioffe & Szegedy (2015) -- and, when matplotlib is
installed, saves the curves as a PNG.

The dense layers, the activation, the softmax cross-entropy and plain
mini-batch SGD are written here in a few lines of array code (NumPy, or CuPy
on a GPU); the normalization and its backward pass are gpubn's.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from dataclasses import dataclass, field
from typing import List, Optional

import numpy as np

from .backends import get_backend
from .layers import BatchNorm
from .preprocessing import StandardScaler

PERCENTILES = (15, 50, 85)


# -- data -----------------------------------------------------------------------

def load_data(seed: int, test_fraction: float = 0.2):
    """Digits as float32 ``(X_train, y_train, X_test, y_test)``: a seeded
    shuffle and split, features standardized with gpubn's StandardScaler fitted
    on the training part."""
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise SystemExit("the demo needs scikit-learn for its data set: "
                         "pip install 'gpubn[demo]'") from None
    data = load_digits()
    X = np.asarray(data.data, dtype=np.float32)
    y = np.asarray(data.target, dtype=np.int64)
    order = np.random.default_rng(seed).permutation(len(X))
    n_test = int(round(len(X) * test_fraction))
    test, train = order[:n_test], order[n_test:]
    scaler = StandardScaler(backend="numpy").fit(X[train])
    return scaler.transform(X[train]), y[train], scaler.transform(X[test]), y[test]


# -- the network ----------------------------------------------------------------

def _sigmoid(xp, z):
    # two-sided form: no overflow warnings for large |z|
    e = xp.exp(-xp.abs(z))
    return xp.where(z >= 0, 1.0 / (1.0 + e), e / (1.0 + e)).astype(z.dtype)


class MLP:
    """Dense -> [BatchNorm] -> activation, repeated, then a dense output layer.

    With batch norm the hidden dense layers have no bias (BatchNorm's shift
    takes its place).  ``probe`` keeps the activation input of one unit of the
    last hidden layer from the latest forward pass.
    """

    def __init__(self, sizes, batch_norm: bool, activation: str, rng, xp, backend: str,
                 dtype=np.float32):
        self.xp = xp
        self.activation = activation
        self.W, self.b, self.bn = [], [], []
        n_hidden = len(sizes) - 2
        for i, (fan_in, fan_out) in enumerate(zip(sizes[:-1], sizes[1:])):
            w = rng.standard_normal((fan_in, fan_out)) / math.sqrt(fan_in)
            self.W.append(xp.asarray(w, dtype=dtype))
            hidden = i < n_hidden
            self.b.append(None if (hidden and batch_norm) else xp.zeros(fan_out, dtype))
            self.bn.append(BatchNorm(fan_out, dtype=dtype, backend=backend)
                           if (hidden and batch_norm) else None)

    def train(self):
        for bn in self.bn:
            if bn is not None:
                bn.train()

    def eval(self):
        for bn in self.bn:
            if bn is not None:
                bn.eval()

    def _act(self, z):
        if self.activation == "sigmoid":
            return _sigmoid(self.xp, z)
        return self.xp.maximum(z, 0)

    def _act_grad(self, a, z):
        if self.activation == "sigmoid":
            return a * (1 - a)
        return (z > 0).astype(a.dtype)

    def forward(self, x):
        self._cache = []
        h = x
        last = len(self.W) - 1
        for i, (W, b, bn) in enumerate(zip(self.W, self.b, self.bn)):
            z = h @ W
            if b is not None:
                z = z + b
            if i == last:
                return z
            if bn is not None:
                z = bn(z)
            a = self._act(z)
            self._cache.append((h, z, a))
            self.probe = z[:, 0]
            h = a
        return h

    def backward(self, dlogits):
        """Gradients of the loss given ``dlogits``; stored as ``dW``/``db``."""
        last = len(self.W) - 1
        self.dW = [None] * len(self.W)
        self.db = [None] * len(self.W)
        d = dlogits
        for i in range(last, -1, -1):
            h_in = self._cache[i][0] if i < last else self._cache[-1][2]
            self.dW[i] = h_in.T @ d
            if self.b[i] is not None:
                self.db[i] = d.sum(axis=0)
            if i == 0:
                break
            dh = d @ self.W[i].T
            _, z, a = self._cache[i - 1]
            d = dh * self._act_grad(a, z)
            bn = self.bn[i - 1]
            if bn is not None:
                d = bn.backward(d)

    def step(self, lr: float):
        for i in range(len(self.W)):
            self.W[i] -= lr * self.dW[i]
            if self.b[i] is not None:
                self.b[i] -= lr * self.db[i]
            bn = self.bn[i]
            if bn is not None:
                bn.weight -= lr * bn.grad_weight
                bn.bias -= lr * bn.grad_bias


def softmax_cross_entropy(xp, logits, y):
    """Mean cross-entropy and its gradient with respect to the logits."""
    shifted = logits - logits.max(axis=1, keepdims=True)
    logp = shifted - xp.log(xp.exp(shifted).sum(axis=1, keepdims=True))
    n = logits.shape[0]
    rows = xp.arange(n)
    loss = -logp[rows, y].mean()
    grad = xp.exp(logp)
    grad[rows, y] -= 1
    return loss, grad / n


# -- training -------------------------------------------------------------------

@dataclass
class RunResult:
    label: str
    lr: float
    batch_norm: bool
    train_loss: List[float] = field(default_factory=list)   # per epoch, mean over batches
    train_acc: List[float] = field(default_factory=list)    # per epoch, on the whole train set
    test_loss: List[float] = field(default_factory=list)
    test_acc: List[float] = field(default_factory=list)
    probe_step: List[int] = field(default_factory=list)     # training step of each probe
    probe: List[tuple] = field(default_factory=list)        # (p15, p50, p85) per probe

    @property
    def final_test_acc(self) -> float:
        return self.test_acc[-1]


@dataclass
class DemoConfig:
    epochs: int = 20
    seed: int = 0
    lr: float = 0.5
    high_lr: float = 16.0
    batch_size: int = 32
    hidden: tuple = (100, 100, 100)
    activation: str = "sigmoid"
    probes_per_epoch: int = 4


class _Progress:
    """A plain-text progress bar on a stream (stderr); line per run when the
    stream is not a terminal."""

    def __init__(self, total: int, stream, enabled: bool = True, width: int = 30):
        self.total, self.stream, self.enabled, self.width = total, stream, enabled, width
        self.done = 0
        self.tty = enabled and hasattr(stream, "isatty") and stream.isatty()
        self.start = time.perf_counter()
        self._last = 0.0

    def update(self, n: int, text: str):
        self.done += n
        if not self.tty:
            return
        now = time.perf_counter()
        if now - self._last < 0.1 and self.done < self.total:
            return
        self._last = now
        frac = self.done / self.total
        bar = "#" * int(frac * self.width)
        self.stream.write(f"\r[{bar:<{self.width}}] {100 * frac:5.1f}%  {text:<40}")
        self.stream.flush()

    def line(self, text: str):
        if not self.enabled:
            return
        if self.tty:
            self.stream.write("\r" + " " * (self.width + 50) + "\r")
        self.stream.write(text + "\n")
        self.stream.flush()


def _evaluate(net, xp, X, y):
    net.eval()
    logits = net.forward(X)
    loss, _ = softmax_cross_entropy(xp, logits, y)
    acc = (logits.argmax(axis=1) == y).astype(xp.float64).mean()
    probe = net.probe
    net.train()
    return float(loss), float(acc), probe


def train_one(cfg: DemoConfig, data, lr: float, batch_norm: bool, xp, backend: str,
              progress: Optional[_Progress] = None) -> RunResult:
    """Train one network from the seeded initialization; returns its curves."""
    Xtr, ytr, Xte, yte = data
    label = f"{'BN' if batch_norm else 'plain'} lr={lr:g}"
    res = RunResult(label=label, lr=lr, batch_norm=batch_norm)
    rng = np.random.default_rng(cfg.seed)          # same weights and batches for every run
    sizes = (Xtr.shape[1],) + tuple(cfg.hidden) + (10,)
    net = MLP(sizes, batch_norm, cfg.activation, rng, xp, backend)
    n = Xtr.shape[0]
    steps_per_epoch = n // cfg.batch_size           # full batches only
    if steps_per_epoch == 0:
        raise ValueError(f"batch_size {cfg.batch_size} is larger than the training set "
                         f"({n} images)")
    probe_every = max(1, steps_per_epoch // cfg.probes_per_epoch)
    step = 0

    def probe():
        _, _, z = _evaluate(net, xp, Xte, yte)
        z = z.get() if hasattr(z, "get") else np.asarray(z)
        res.probe_step.append(step)
        res.probe.append(tuple(float(v) for v in np.percentile(z, PERCENTILES)))

    probe()
    with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
        for epoch in range(cfg.epochs):
            order = xp.asarray(rng.permutation(n))
            losses = []
            for s in range(steps_per_epoch):
                idx = order[s * cfg.batch_size:(s + 1) * cfg.batch_size]
                logits = net.forward(Xtr[idx])
                loss, grad = softmax_cross_entropy(xp, logits, ytr[idx])
                net.backward(grad)
                net.step(lr)
                losses.append(loss)
                step += 1
                if step % probe_every == 0:
                    probe()
                if progress is not None:
                    progress.update(1, f"{label}  epoch {epoch + 1}/{cfg.epochs}")
            res.train_loss.append(float(xp.stack(losses).mean()))
            _, acc, _ = _evaluate(net, xp, Xtr, ytr)
            res.train_acc.append(acc)
            loss, acc, _ = _evaluate(net, xp, Xte, yte)
            res.test_loss.append(loss)
            res.test_acc.append(acc)
    return res


def pick_backend(requested: Optional[str] = None):
    """``(backend name, array module, sentence saying why)``."""
    if requested is not None:
        be = get_backend(requested)
        return be.name, be.xp, "requested"
    if os.environ.get("GPUBN_BACKEND"):
        be = get_backend(None)
        return be.name, be.xp, "from GPUBN_BACKEND"
    try:
        be = get_backend("cuda")
    except RuntimeError as exc:                    # says why: no CuPy, no device, ...
        return "numpy", np, str(exc)
    try:
        import cupy
        name = cupy.cuda.runtime.getDeviceProperties(cupy.cuda.Device().id)["name"]
        name = name.decode() if isinstance(name, bytes) else str(name)
    except Exception:  # the name is cosmetic
        name = "GPU"
    return be.name, be.xp, f"on {name}"


def run_demo(cfg: DemoConfig, backend: Optional[str] = None, progress_stream=None,
             progress: bool = True):
    """Train the four networks; returns ``(runs, info)``."""
    name, xp, why = pick_backend(backend)
    Xtr, ytr, Xte, yte = load_data(cfg.seed)
    data = (xp.asarray(Xtr), xp.asarray(ytr), xp.asarray(Xte), xp.asarray(yte))
    plan = [(cfg.lr, False), (cfg.lr, True), (cfg.high_lr, False), (cfg.high_lr, True)]
    total = len(plan) * cfg.epochs * (len(Xtr) // cfg.batch_size)
    bar = _Progress(total, progress_stream if progress_stream is not None else sys.stderr,
                    enabled=progress)
    runs = []
    t0 = time.perf_counter()
    for lr, bn in plan:
        t = time.perf_counter()
        res = train_one(cfg, data, lr, bn, xp, name, bar)
        runs.append(res)
        bar.line(f"{res.label:<16} trained in {time.perf_counter() - t:5.1f} s, "
                 f"test accuracy {100 * res.final_test_acc:5.1f}%")
    info = dict(backend=name, backend_note=why, n_train=len(Xtr), n_test=len(Xte),
                seconds=time.perf_counter() - t0,
                steps_per_epoch=len(Xtr) // cfg.batch_size)
    return runs, info


# -- reporting --------------------------------------------------------------------

def _fmt_acc(a):
    return "  nan" if a != a else f"{100 * a:5.1f}"


def _fmt_loss(v):
    return "   nan" if v != v else (f"{v:6.3f}" if v < 100 else f"{v:6.0e}")


def format_report(cfg: DemoConfig, runs, info) -> str:
    sizes = "-".join(str(s) for s in (64,) + tuple(cfg.hidden) + (10,))
    lines = [
        f"gpubn demo: {cfg.activation} MLP {sizes} on the 8x8 digits "
        f"({info['n_train']} train / {info['n_test']} test images), "
        f"SGD, batch {cfg.batch_size}, seed {cfg.seed}",
        f"backend: {info['backend']} ({info['backend_note']})",
        "",
        "Loss (training, mean over the epoch's batches) and test accuracy (%) per epoch:",
        "",
    ]
    head1 = "epoch " + "".join(f"| {r.label:^16} " for r in runs)
    head2 = "      " + "".join("|  loss  test %   " for _ in runs)
    lines += [head1, head2, "-" * len(head1)]
    for e in range(cfg.epochs):
        row = f"{e + 1:5d} " + "".join(
            f"| {_fmt_loss(r.train_loss[e])}  {_fmt_acc(r.test_acc[e])}   " for r in runs)
        lines.append(row)
    lines.append("")
    lines.append("Final accuracy (%)      " + "".join(f"{r.label:>16}" for r in runs))
    lines.append("  train                 " + "".join(
        f"{_fmt_acc(r.train_acc[-1]):>16}" for r in runs))
    lines.append("  test                  " + "".join(
        f"{_fmt_acc(r.test_acc[-1]):>16}" for r in runs))
    lines.append("")
    # internal covariate shift: percentiles of one unit's activation input
    base = [r for r in runs if r.lr == cfg.lr]
    lines.append(f"Input of hidden unit 0 of the last hidden layer (the {cfg.activation}'s "
                 f"argument) on the test images, network in eval mode, at lr={cfg.lr:g}:")
    lines.append(f"percentiles {'/'.join(str(p) for p in PERCENTILES)}")
    lines.append("")
    lines.append("  step " + "".join(f"| {r.label:^26} " for r in base))
    spe = info["steps_per_epoch"]
    marks = sorted({0, spe // 2, spe, 2 * spe, 5 * spe, cfg.epochs * spe // 2,
                    cfg.epochs * spe})
    steps = base[0].probe_step
    for m in marks:
        k = min(range(len(steps)), key=lambda i: abs(steps[i] - m))
        if abs(steps[k] - m) > max(1, spe // 4):
            continue
        row = f"{steps[k]:6d} " + "".join(
            "| " + " ".join(f"{v:8.3f}" for v in r.probe[k]) + " " for r in base)
        lines.append(row)
    lines.append("")
    return "\n".join(lines)


def save_plot(cfg: DemoConfig, runs, info, path: str) -> bool:
    """Write the curves to ``path`` (PNG); False when matplotlib is missing."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, ax = plt.subplots(2, 2, figsize=(11, 8))
    epochs = np.arange(1, cfg.epochs + 1)
    styles = {(False, cfg.lr): "C0--", (True, cfg.lr): "C0-",
              (False, cfg.high_lr): "C3--", (True, cfg.high_lr): "C3-"}
    for r in runs:
        st = styles.get((r.batch_norm, r.lr), "k-")
        ax[0, 0].plot(epochs, 100 * np.array(r.test_acc), st, label=r.label)
        ax[0, 1].plot(epochs, r.train_loss, st, label=r.label)
    ax[0, 0].set(title="test accuracy", xlabel="epoch", ylabel="%")
    ax[0, 1].set(title="training loss", xlabel="epoch", yscale="log")
    for a in ax[0]:
        a.legend()
        a.grid(alpha=0.3)
    base = [r for r in runs if r.lr == cfg.lr]
    lo = min(min(p) for r in base for p in r.probe)
    hi = max(max(p) for r in base for p in r.probe)
    for a, r in zip(ax[1], base):
        p = np.array(r.probe)
        a.plot(r.probe_step, p[:, 1], "C2-", label="median")
        a.fill_between(r.probe_step, p[:, 0], p[:, 2], color="C2", alpha=0.3,
                       label="15th-85th percentile")
        a.set(title=f"{cfg.activation} input of one unit, {r.label}", xlabel="training step",
              ylim=(lo - 0.1 * (hi - lo), hi + 0.1 * (hi - lo)))
        a.legend()
        a.grid(alpha=0.3)
    fig.suptitle(f"gpubn demo: {cfg.activation} MLP on digits, with and without "
                 f"BatchNorm ({info['backend']} backend, seed {cfg.seed})")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


# -- command line -----------------------------------------------------------------

def _int_at_least(low, why=""):
    def parse(text):
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if v < low:
            raise argparse.ArgumentTypeError(f"must be at least {low}{why}, got {v}")
        return v
    return parse


def _positive_float(text):
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not (v > 0 and math.isfinite(v)):
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text}")
    return v


def add_arguments(p):
    """The demo's options, on an argparse parser (shared with ``gpubn demo``)."""
    p.add_argument("--epochs", type=_int_at_least(1), default=None,
                   help="training epochs per run (default 20, or 4 with --quick)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--quick", action="store_true", help="a short run (4 epochs)")
    p.add_argument("--lr", type=_positive_float, default=DemoConfig.lr,
                   help=f"the moderate learning rate (default {DemoConfig.lr:g})")
    p.add_argument("--high-lr", type=_positive_float, default=DemoConfig.high_lr,
                   help=f"the high learning rate (default {DemoConfig.high_lr:g})")
    p.add_argument("--batch-size", type=_int_at_least(2, " (batch norm needs 2 samples)"),
                   default=DemoConfig.batch_size,
                   help=f"mini-batch size (default {DemoConfig.batch_size})")
    p.add_argument("--activation", choices=("sigmoid", "relu"), default="sigmoid",
                   help="hidden activation (default sigmoid, the saturating case)")
    p.add_argument("--backend", choices=("numpy", "emu", "cuda"), default=None,
                   help="default: cuda when CuPy and a GPU are present, else numpy")
    p.add_argument("--out", default="gpubn_demo.png",
                   help="PNG path for the curves (default ./gpubn_demo.png)")
    p.add_argument("--no-plot", action="store_true", help="do not write the PNG")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


DESCRIPTION = ("train an MLP on the 8x8 digits with and without gpubn.BatchNorm and "
               "show what batch norm does")


def run_from_args(args, stdout=None, stderr=None) -> int:
    """Run the demo for parsed arguments; returns the exit code."""
    stdout = stdout if stdout is not None else sys.stdout
    stderr = stderr if stderr is not None else sys.stderr
    epochs = args.epochs if args.epochs is not None else (4 if args.quick else 20)
    cfg = DemoConfig(epochs=epochs, seed=args.seed, lr=args.lr, high_lr=args.high_lr,
                     batch_size=args.batch_size, activation=args.activation)
    try:
        runs, info = run_demo(cfg, backend=args.backend, progress_stream=stderr,
                              progress=not args.no_progress)
    except (RuntimeError, ValueError) as exc:      # backend not available, batch too large
        stderr.write(f"gpubn demo: error: {exc}\n")
        return 2
    stdout.write(format_report(cfg, runs, info))
    if not args.no_plot:
        path = os.path.abspath(args.out)
        if save_plot(cfg, runs, info, path):
            stdout.write(f"curves written to {path}\n")
        else:
            stdout.write("no plot: matplotlib is not installed (pip install 'gpubn[plot]')\n")
    stdout.flush()
    return 0


def main(argv=None, stdout=None, stderr=None) -> int:
    parser = add_arguments(argparse.ArgumentParser(prog="gpubn demo", description=DESCRIPTION))
    return run_from_args(parser.parse_args(argv), stdout, stderr)


if __name__ == "__main__":
    sys.exit(main())
