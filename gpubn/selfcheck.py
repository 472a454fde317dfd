"""Self-check driver: every op and storage dtype once on small odd shapes,
in both layouts, on one backend; the program the sanitizers run.

``python -m gpubn.selfcheck`` runs batch norm (training and inference
forward, both backwards), batch renorm (training forward and backward) and
layer norm (forward and backward) on three channel-axis-1 shapes, three
channels-last shapes and three row shapes, in float16, float32 and float64,
and compares every output with the ``numpy`` reference backend.  The shapes
are odd on purpose (no vector width divides their runs) and include one per
layout whose channels are split over several blocks (the partial-merge path),
and a layer-norm row long enough for the block kernel that re-reads its row.

Under ``compute-sanitizer`` (``.ci/gpu``) the driver disables CuPy's memory
pool, so every array is an allocation of its own size and an access past its
end is reported instead of landing in a neighbour of the same pool chunk.

``--determinism`` runs everything twice on the same inputs and requires
bitwise equal outputs; ``--against emu`` runs it on a second backend with the
same launch configuration (the cuda backend configured with emu's device
attributes and tuning) and compares bit for bit.  Batch norm is promised to
be bitwise equal between cuda and emu (same kernels, same grid, explicit FMAs,
correctly rounded division and square root); the other families are
compared and reported, without failing the check.

The last line printed is a JSON summary; the exit status is 1 when a check
failed, 2 when the backend cannot run.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

# (rtol, atol) per storage dtype: the test suite's tolerances (tests/conftest.py).
TOLERANCE = {"float16": (1e-2, 1e-2), "float32": (1e-4, 1e-5), "float64": (1e-9, 1e-11)}
DTYPES = ("float16", "float32", "float64")
# Families whose cuda and emu results are promised to be bitwise equal.
BITWISE_FAMILIES = ("batch_norm",)


@dataclass(frozen=True)
class Shape:
    """One input: the family it belongs to, its shape and channel axis (for
    layer norm: the number of trailing dims normalized)."""

    family: str          # "batch_norm" (also runs batch renorm) or "layer_norm"
    shape: Tuple[int, ...]
    axis: int

    @property
    def label(self) -> str:
        dims = "x".join(map(str, self.shape))
        if self.family == "layer_norm":
            return f"rows {dims}"
        return f"{'NCHW' if self.axis == 1 else 'NHWC'} {dims}"


SHAPES: Tuple[Shape, ...] = (
    # channel axis 1: odd runs; few channels with long runs (split over blocks)
    Shape("batch_norm", (3, 5, 7, 9), 1),
    Shape("batch_norm", (16, 3, 1501), 1),
    Shape("batch_norm", (2, 67, 5), 1),
    # channels-last: odd C; one with few channels and many rows (split)
    Shape("batch_norm", (3, 7, 9, 5), -1),
    Shape("batch_norm", (4001, 3), -1),
    Shape("batch_norm", (2, 5, 67), -1),
    # layer norm rows: warp kernel, block kernel in registers, block kernel re-reading
    Shape("layer_norm", (7, 33), 1),
    Shape("layer_norm", (3, 1031), 1),
    Shape("layer_norm", (2, 9001), 1),
)


def _inputs(shape: Shape, dtype: str, seed: int) -> Dict[str, np.ndarray]:
    """Host inputs of one shape and dtype, the same for every backend."""
    rng = np.random.default_rng(seed)
    acc = np.float64 if dtype == "float64" else np.float32
    n = shape.shape[-1] if shape.family == "layer_norm" else shape.shape[shape.axis]
    x = (rng.standard_normal(shape.shape) * 2 + 3).astype(dtype)
    return {
        "x": x,
        "dy": rng.standard_normal(shape.shape).astype(dtype),
        "weight": (rng.standard_normal(n) + 1).astype(acc),
        "bias": rng.standard_normal(n).astype(acc),
        "running_mean": rng.standard_normal(n).astype(acc),
        "running_var": (rng.random(n) + 0.5).astype(acc),
    }


def _ops(shape: Shape) -> Tuple[str, ...]:
    if shape.family == "layer_norm":
        return ("ln", "ln_noaffine")
    return ("bn_train", "bn_eval", "renorm_train")


def run_op(op: str, shape: Shape, dtype: str, backend, seed: int = 0) -> Dict[str, np.ndarray]:
    """Run one op (forward and backward) on ``backend`` (a name or a backend
    object); returns every output and updated state on the host."""
    import gpubn
    from gpubn.backends import get_backend

    be = get_backend(backend)
    xp = be.xp
    host = _inputs(shape, dtype, seed)
    dev = {k: xp.asarray(v) for k, v in host.items()}
    x, dy, w, b = dev["x"], dev["dy"], dev["weight"], dev["bias"]
    out: Dict[str, object] = {}
    if op in ("bn_train", "bn_eval"):
        rm, rv = dev["running_mean"], dev["running_var"]
        y, saved = gpubn.batch_norm_forward(x, weight=w, bias=b, running_mean=rm,
                                            running_var=rv, training=op == "bn_train",
                                            momentum=0.1, eps=1e-5, axis=shape.axis, backend=be)
        dx, dw, db = gpubn.batch_norm_backward(dy, saved)
        out = {"y": y, "mean": saved.mean, "invstd": saved.invstd, "dx": dx, "dweight": dw,
               "dbias": db, "running_mean": rm, "running_var": rv}
    elif op == "renorm_train":
        rm = dev["running_mean"]
        rs = xp.sqrt(dev["running_var"])
        y, saved = gpubn.batch_renorm_forward(x, weight=w, bias=b, running_mean=rm,
                                              running_std=rs, rmax=1.5, dmax=0.5, training=True,
                                              momentum=0.1, eps=1e-5, axis=shape.axis,
                                              backend=be)
        dx, dw, db = gpubn.batch_renorm_backward(dy, saved)
        out = {"y": y, "dx": dx, "dweight": dw, "dbias": db, "running_mean": rm,
               "running_std": rs}
    elif op in ("ln", "ln_noaffine"):
        affine = op == "ln"
        y, saved = gpubn.layer_norm_forward(x, (shape.shape[-1],), w if affine else None,
                                            b if affine else None, eps=1e-5, backend=be)
        dx, dw, db = gpubn.layer_norm_backward(dy, saved)
        out = {"y": y, "mean": saved.mean, "rstd": saved.rstd, "dx": dx}
        if affine:
            out.update(dweight=dw, dbias=db)
    else:
        raise ValueError(f"unknown op {op!r}")
    return {k: _to_host(v) for k, v in out.items() if v is not None}


def _to_host(a) -> np.ndarray:
    return a.get() if hasattr(a, "get") else np.asarray(a)


def close(actual: np.ndarray, expected: np.ndarray, dtype: str) -> Optional[str]:
    """None when ``actual`` matches the reference within ``TOLERANCE[dtype]``,
    else a sentence naming the worst element."""
    rtol, atol = TOLERANCE[dtype]
    a = np.asarray(actual, dtype=np.float64)
    e = np.asarray(expected, dtype=np.float64)
    if a.shape != e.shape:
        return f"shape {a.shape}, reference {e.shape}"
    err = np.abs(a - e)
    bad = ~(err <= atol + rtol * np.abs(e))
    if not bad.any():
        return None
    i = int(np.argmax(np.where(bad, np.nan_to_num(err, nan=np.inf), -1.0)))
    return (f"{int(bad.sum())} of {a.size} elements off; worst at flat index {i}: "
            f"{a.flat[i]!r} vs reference {e.flat[i]!r}")


def bitwise_differences(a: Dict[str, np.ndarray], b: Dict[str, np.ndarray]) -> List[str]:
    """Names of the outputs whose bytes differ (or that only one side has)."""
    names = sorted(set(a) | set(b))
    return [n for n in names
            if n not in a or n not in b or a[n].dtype != b[n].dtype
            or a[n].shape != b[n].shape or a[n].tobytes() != b[n].tobytes()]


@dataclass
class Outcome:
    op: str
    shape: str
    dtype: str
    check: str            # "reference", "repeat" or "against <backend>"
    ok: bool
    detail: str = ""
    promised: bool = True  # a difference fails the run

    def as_dict(self) -> Dict:
        return dict(self.__dict__)


def selfcheck(backend, *, dtypes: Sequence[str] = DTYPES, shapes: Sequence[Shape] = SHAPES,
              reference: bool = True, repeat: bool = False, against=None,
              seed: int = 0, progress: Optional[Callable[[str], None]] = None) -> List[Outcome]:
    """Run every op of ``shapes`` in ``dtypes`` once on ``backend``; with
    ``reference`` compare with the numpy backend, with ``repeat`` run again
    and require the same bits, with ``against`` (another backend) require
    the same bits for the families in ``BITWISE_FAMILIES`` and report the
    others."""
    outcomes: List[Outcome] = []
    for shape in shapes:
        for dtype in dtypes:
            for op in _ops(shape):
                got = run_op(op, shape, dtype, backend, seed)
                where = (op, shape.label, dtype)
                if reference:
                    ref = run_op(op, shape, "float64" if dtype == "float64" else dtype,
                                 "numpy", seed)
                    problems = [f"{k}: {msg}" for k in ref
                                for msg in [close(got.get(k, np.array(np.nan)), ref[k], dtype)]
                                if msg]
                    outcomes.append(Outcome(*where, "reference", not problems,
                                            "; ".join(problems)))
                if repeat:
                    diff = bitwise_differences(got, run_op(op, shape, dtype, backend, seed))
                    outcomes.append(Outcome(*where, "repeat", not diff,
                                            "differ: " + ", ".join(diff) if diff else ""))
                if against is not None:
                    diff = bitwise_differences(got, run_op(op, shape, dtype, against, seed))
                    name = getattr(against, "name", against)
                    outcomes.append(Outcome(*where, f"against {name}", not diff,
                                            "differ: " + ", ".join(diff) if diff else "",
                                            promised=shape.family in BITWISE_FAMILIES))
                if progress is not None:
                    progress(f"{op} {shape.label} {dtype}")
    return outcomes


def summarize(outcomes: Sequence[Outcome]) -> Dict:
    """Counts per check kind and the failures (promised ones fail the run)."""
    summary: Dict = {"checks": {}, "failures": [], "notes": []}
    for o in outcomes:
        c = summary["checks"].setdefault(o.check, {"ok": 0, "differ": 0})
        c["ok" if o.ok else "differ"] += 1
        if not o.ok:
            (summary["failures"] if o.promised else summary["notes"]).append(o.as_dict())
    summary["ok"] = not summary["failures"]
    return summary


def _backend(name: str, like_emu: bool):
    """The backend object for ``name``; with ``like_emu`` a cuda backend
    configured with emu's device attributes and tuning (the same grids)."""
    from gpubn.backends import get_backend

    if name == "cuda" and like_emu:
        from gpubn.backends.cuda import CudaBackend
        from gpubn.launch import EMU_DEVICE

        reason = CudaBackend.unavailable_reason()
        if reason:
            raise RuntimeError(f"backend 'cuda' is not available: {reason}")
        return CudaBackend(tuning=get_backend("emu").tuning, device_attributes=EMU_DEVICE)
    return get_backend(name)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m gpubn.selfcheck",
                                description="Run every op and dtype once on small odd shapes "
                                            "and check the results.")
    p.add_argument("--backend", default="cuda", help="backend to check (default cuda)")
    p.add_argument("--dtype", action="append", choices=DTYPES, default=None,
                   help="dtype(s) to run (repeatable; default all)")
    p.add_argument("--family", action="append", choices=("batch_norm", "layer_norm"),
                   default=None, help="op families (repeatable; default both)")
    p.add_argument("--no-reference", action="store_true",
                   help="do not compare with the numpy backend")
    p.add_argument("--determinism", action="store_true",
                   help="run everything twice and require bitwise equal outputs")
    p.add_argument("--against", default=None,
                   help="a second backend to compare with bit for bit (e.g. emu)")
    p.add_argument("--keep-pool", action="store_true",
                   help="cuda: keep CuPy's memory pool (by default every array is its own "
                        "allocation, so a sanitizer sees the exact bounds)")
    p.add_argument("--quiet", action="store_true", help="no progress lines")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.backend == "cuda" and not args.keep_pool:
            import cupy
            cupy.cuda.set_allocator(None)
        backend = _backend(args.backend, like_emu=args.against is not None)
        against = None if args.against is None else _backend(args.against, like_emu=False)
    except (ImportError, RuntimeError, ValueError) as exc:
        print(json.dumps({"ok": False, "error": str(exc)}))
        return 2
    shapes = [s for s in SHAPES if args.family is None or s.family in args.family]
    progress = None if args.quiet else (lambda line: print(line, file=sys.stderr, flush=True))
    outcomes = selfcheck(backend, dtypes=args.dtype or DTYPES, shapes=shapes,
                         reference=not args.no_reference, repeat=args.determinism,
                         against=against, progress=progress)
    summary = summarize(outcomes)
    for o in summary["failures"] + summary["notes"]:
        kind = "FAILED" if o["promised"] else "note"
        print(f"{kind}: {o['op']} {o['shape']} {o['dtype']} {o['check']}: {o['detail']}",
              file=sys.stderr)
    print(json.dumps(summary))
    return 0 if summary["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
