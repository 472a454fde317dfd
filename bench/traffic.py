"""Global-memory traffic and launches per op, counted by the emu backend.

The emu backend runs the very kernels of ``kernels/*.cu`` on the CPU and
records, per launch, the bytes loaded from and stored to global memory
(argument buffers) and, per argument buffer, its own counts.  This module
runs each op once on small shapes under ``gpubn.emu.recording()`` and turns
the records into:

``launches``           kernel launches of the op
``bytes_per_element``  all global bytes moved / elements of x
``passes``             all global bytes / bytes of x: element-sized passes,
                       per-channel vectors and workspaces included
``minimum_passes``     the op's minimum bytes (:mod:`bench.metrics`: tensors
                       once each plus the per-channel vectors) / bytes of x
``extra_bytes``        all bytes - minimum bytes: re-reads and workspaces
``tensor_passes``      only the element-sized buffers (x, y, dy, dx) / bytes
                       of x, when the records carry buffer sizes

against the ideal (forward reads x and writes y: 2 passes; backward reads x
and dy and writes dx: 3) and against what a PyTorch-style kernel sequence
needs (forward: statistics pass + normalize pass = 3; backward: reduction
pass over x and dy, then dx pass re-reading them = 5).
"""

from __future__ import annotations

import importlib
from typing import Dict, List, Optional, Sequence, Tuple

from .inputs import DMAX, EPS, MOMENTUM, RENORM_MOMENTUM, RMAX, make_setup
from .metrics import ITEMSIZE, bytes_moved
from .suites import Case, KIND_ABBREV

IDEAL_PASSES = {"fwd_train": 2, "fwd_infer": 2, "bwd": 3, "fwd_bwd": 5}
PYTORCH_PASSES = {"fwd_train": 3, "fwd_infer": 2, "bwd": 5, "fwd_bwd": 8}
# PyTorch's CUDA batch norm: statistics, finalize, elementwise; backward:
# reduce + elementwise (fused into one for contiguous NCHW).
PYTORCH_LAUNCHES = {"fwd_train": 3, "fwd_infer": 1, "bwd": 2, "fwd_bwd": 5}
# Layer norm keeps a row on chip in the forward (one kernel, 2 passes); the
# backward is a dx kernel plus a dweight/dbias column reduction.
LN_PYTORCH_PASSES = {"fwd_train": 2, "fwd_infer": 2, "bwd": 5, "fwd_bwd": 7}
LN_PYTORCH_LAUNCHES = {"fwd_train": 1, "fwd_infer": 1, "bwd": 2, "fwd_bwd": 3}


def traffic_cases() -> List[Tuple[Case, Sequence[str]]]:
    """Small shapes (the emu checks every access): NCHW, NHWC, NC, rows."""
    bn_ops = ("fwd_train", "fwd_infer", "bwd")
    return [
        (Case("batch_norm", (8, 16, 16, 16), "NCHW", label="small conv"), bn_ops),
        (Case("batch_norm", (8, 16, 16, 16), "NHWC", label="small conv"), bn_ops),
        (Case("batch_norm", (256, 64), "NC", label="small mlp"), bn_ops),
        (Case("batch_renorm", (8, 16, 16, 16), "NCHW", label="small conv"), ("fwd_train", "bwd")),
        (Case("layer_norm", (64, 256), "rows", label="small transformer"), ("fwd_train", "bwd")),
    ]


def _get(record, key, default=None):
    if isinstance(record, dict):
        return record.get(key, default)
    return getattr(record, key, default)


def _buffers(record) -> Optional[Dict]:
    """Per-buffer counts of a launch record as {index: (loaded, stored, nbytes)};
    None when the record carries none.  Buffer sizes come from the per-buffer
    entry (``nbytes``) or from a ``sizes`` mapping (argument index -> bytes)
    on the record; they are None when the record has neither."""
    raw = _get(record, "buffers")
    if raw is None:
        return None
    sizes = _get(record, "sizes") or _get(record, "buffer_sizes") or {}
    out = {}
    items = raw.items() if isinstance(raw, dict) else enumerate(raw)
    for idx, b in items:
        if b is None:
            continue
        if isinstance(b, dict):
            loaded = b.get("bytes_loaded", b.get("loaded", 0))
            stored = b.get("bytes_stored", b.get("stored", 0))
            nbytes = b.get("nbytes", b.get("size"))
        elif hasattr(b, "loaded") or hasattr(b, "bytes_loaded"):
            loaded = _get(b, "loaded", _get(b, "bytes_loaded", 0))
            stored = _get(b, "stored", _get(b, "bytes_stored", 0))
            nbytes = _get(b, "nbytes", _get(b, "size", None))
        else:
            loaded, stored = b[0], b[1]
            nbytes = b[2] if len(b) > 2 else None
        if nbytes is None:
            nbytes = sizes.get(idx)
        out[idx] = (int(loaded or 0), int(stored or 0), None if nbytes is None else int(nbytes))
    return out


def summarize_records(records: Sequence, numel: int, itemsize: int,
                      minimum_bytes: Optional[int] = None) -> Dict:
    """Launches, bytes and passes of one op from its launch records;
    ``minimum_bytes`` (see :func:`bench.metrics.bytes_moved`) gives
    ``extra_bytes``, what the kernels move beyond the minimum."""
    x_bytes = numel * itemsize
    loaded = sum(int(_get(r, "bytes_loaded", 0)) for r in records)
    stored = sum(int(_get(r, "bytes_stored", 0)) for r in records)
    tensor = 0
    known = True
    for r in records:
        bufs = _buffers(r)
        if bufs is None or any(nb is None for _, _, nb in bufs.values()):
            known = False
            break
        tensor += sum(ld + st for ld, st, nb in bufs.values() if nb == x_bytes)
    launches = []
    for r in records:
        bufs = _buffers(r) or {}
        launches.append({
            "kernel": str(_get(r, "kernel", "?")),
            "grid": list(_get(r, "grid", ()) or ()),
            "block": list(_get(r, "block", ()) or ()),
            "bytes_loaded": int(_get(r, "bytes_loaded", 0)),
            "bytes_stored": int(_get(r, "bytes_stored", 0)),
            "buffers": {str(i): [ld, st] for i, (ld, st, _) in sorted(bufs.items())},
        })
    return {
        "launches": len(records),
        "kernels": [str(_get(r, "kernel", "?")) for r in records],
        "launch_details": launches,
        "bytes_loaded": loaded,
        "bytes_stored": stored,
        "bytes_per_element": (loaded + stored) / numel,
        "passes": (loaded + stored) / x_bytes,
        "tensor_passes": tensor / x_bytes if known else None,
        "minimum_passes": None if minimum_bytes is None else minimum_bytes / x_bytes,
        "extra_bytes": None if minimum_bytes is None else loaded + stored - minimum_bytes,
    }


def emu_unavailable_reason() -> Optional[str]:
    try:
        gpubn = importlib.import_module("gpubn")
    except Exception as exc:  # pragma: no cover
        return f"cannot import gpubn: {exc}"
    try:
        emu = importlib.import_module("gpubn.emu")
    except Exception as exc:
        return f"gpubn.emu cannot be imported: {exc}"
    if not hasattr(emu, "recording"):
        return "gpubn.emu.recording is not available in this version"
    if not hasattr(gpubn, "batch_norm_forward"):
        return "gpubn.batch_norm_forward is not available in this version"
    try:
        from gpubn.backends import get_backend
        get_backend("emu")
    except Exception as exc:
        return str(exc)
    return None


def _missing_api(kind: str) -> Optional[str]:
    gpubn = importlib.import_module("gpubn")
    for name in _API[kind]:
        if not hasattr(gpubn, name):
            return f"gpubn.{name} is not available in this version"
    return None


_API = {
    "batch_norm": ("batch_norm_forward", "batch_norm_backward"),
    "batch_renorm": ("batch_renorm_forward", "batch_renorm_backward"),
    "layer_norm": ("layer_norm_forward", "layer_norm_backward"),
}


def _run_op(case: Case, op: str, setup, recording):
    """Run ``op`` on the emu backend; record only the op itself."""
    gpubn = importlib.import_module("gpubn")
    state = setup.state()
    x, dy, w, b = setup.x, setup.dy, setup.weight, setup.bias
    rm, rv = state["running_mean"], state["running_var"]
    training = op != "fwd_infer"
    if case.kind == "batch_norm":
        fwd, bwd = gpubn.batch_norm_forward, getattr(gpubn, "batch_norm_backward", None)
        args = (x,)
        kwargs = dict(weight=w, bias=b, running_mean=rm, running_var=rv, training=training,
                      momentum=MOMENTUM, eps=EPS, axis=case.axis, backend="emu")
    elif case.kind == "batch_renorm":
        fwd, bwd = gpubn.batch_renorm_forward, getattr(gpubn, "batch_renorm_backward", None)
        args = (x,)
        kwargs = dict(weight=w, bias=b, running_mean=rm, running_std=rv, rmax=RMAX, dmax=DMAX,
                      training=training, momentum=RENORM_MOMENTUM, eps=EPS, axis=case.axis,
                      backend="emu")
    else:
        fwd, bwd = gpubn.layer_norm_forward, getattr(gpubn, "layer_norm_backward", None)
        args = (x, (case.shape[-1],), w, b)
        kwargs = dict(eps=EPS, backend="emu")
    if op in ("fwd_train", "fwd_infer"):
        with recording() as log:
            fwd(*args, **kwargs)
        return list(log)
    _, saved = fwd(*args, **kwargs)
    with recording() as log:
        bwd(dy, saved)
    return list(log)


def run_traffic(cases=None, progress=None) -> List[Dict]:
    """One row per (case, op) with the emu counts, or the reason it could
    not run."""
    cases = traffic_cases() if cases is None else cases
    reason = emu_unavailable_reason()
    recording = None
    if reason is None:
        recording = importlib.import_module("gpubn.emu").recording
    rows = []
    for case, ops in cases:
        setup = make_setup(case) if reason is None else None
        for op in ops:
            pt_passes = (LN_PYTORCH_PASSES if case.kind == "layer_norm" else PYTORCH_PASSES)[op]
            pt_launches = (LN_PYTORCH_LAUNCHES if case.kind == "layer_norm" else PYTORCH_LAUNCHES)[op]
            row = {
                "device": "emu", "provider": "gpubn-emu", "backend": "emu",
                "kind": case.kind, "op": op, "layout": case.layout, "shape": list(case.shape),
                "axis": case.axis, "dtype": case.dtype, "numel": case.numel,
                "ideal_passes": IDEAL_PASSES[op], "pytorch_passes": pt_passes,
                "pytorch_launches": pt_launches, "status": "ok", "reason": "",
            }
            desc = f"emu {KIND_ABBREV[case.kind]} {case.layout} {case.shape_str} {op}"
            missing = reason or _missing_api(case.kind)
            if missing is not None:
                row.update(status="unavailable", reason=missing)
            else:
                try:
                    records = _run_op(case, op, setup, recording)
                    row.update(summarize_records(
                        records, case.numel, ITEMSIZE[case.dtype],
                        bytes_moved(case.kind, op, case.shape, case.axis, case.dtype)))
                except NotImplementedError as exc:
                    row.update(status="unavailable",
                               reason="the emu backend does not implement this op yet" + (f" ({exc})" if str(exc) else ""))
                except Exception as exc:
                    text = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
                    row.update(status="error", reason=text.splitlines()[0][:300])
            rows.append(row)
            if progress is not None:
                progress.step(desc + (f": {row['passes']:.2f} passes, {row['launches']} launches"
                                      if row["status"] == "ok" else f": {row['status']} ({row['reason']})"))
    return rows
