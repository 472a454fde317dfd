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
pass over x and dy, then dx pass re-reading them = 5), with ``path`` saying
whether the read-once or the two-pass kernels ran.

:func:`run_model` turns the counts into modelled times at ResNet-50 sizes:
tensor passes x bytes of the real tensor / copy bandwidth, on the path the
launch plan picks for the real shape (see the section below).
"""

from __future__ import annotations

import functools
import importlib
from typing import Dict, List, Optional, Sequence, Tuple

from .inputs import DMAX, EPS, MOMENTUM, RENORM_MOMENTUM, RMAX, make_setup, residual
from .metrics import ITEMSIZE, bytes_moved
from .suites import EPILOGUE_OPS, Case, KIND_ABBREV

# The residual-block epilogue, y = relu(bn(x) + residual) (``fwd_train_add_relu``)
# and its backward (``bwd_add_relu``: dx and dresidual).  Ideal: read x and the
# residual, write y; backward: read dy, x and y (the ReLU's mask), write dx and
# dresidual (a 1-bit mask instead of y would make it 4 passes and an eighth
# of a byte per element).
IDEAL_PASSES = {"fwd_train": 2, "fwd_infer": 2, "bwd": 3, "fwd_bwd": 5,
                "fwd_train_add_relu": 3, "bwd_add_relu": 5}
# PyTorch's CUDA batch norm: statistics, finalize, elementwise; backward:
# reduce + elementwise (fused into one for contiguous NCHW).  The epilogue as
# torchvision's residual blocks run it: batch norm, then ``out += identity``
# (read out and identity, write out: 3 passes, 1 launch) and an in-place
# ReLU (2 passes, 1 launch); backward: the ReLU's threshold_backward (read the
# gradient and the output, write: 3 passes, 1 launch), the add passes its
# gradient on as dresidual and to batch norm's backward (5 passes, 2
# launches).  PyTorch never asks cuDNN for its fused BN_ADD_ACTIVATION (ATen
# calls cuDNN's batch norm with CUDNN_BATCHNORM_OPS_BN), so this unfused
# sequence is what a PyTorch model moves.
PYTORCH_PASSES = {"fwd_train": 3, "fwd_infer": 2, "bwd": 5, "fwd_bwd": 8,
                  "fwd_train_add_relu": 3 + 3 + 2, "bwd_add_relu": 3 + 5}
PYTORCH_LAUNCHES = {"fwd_train": 3, "fwd_infer": 1, "bwd": 2, "fwd_bwd": 5,
                    "fwd_train_add_relu": 3 + 1 + 1, "bwd_add_relu": 1 + 2}
# Layer norm keeps a row on chip in the forward (one kernel, 2 passes); the
# backward is a dx kernel plus a dweight/dbias column reduction.
LN_PYTORCH_PASSES = {"fwd_train": 2, "fwd_infer": 2, "bwd": 5, "fwd_bwd": 7}
LN_PYTORCH_LAUNCHES = {"fwd_train": 1, "fwd_infer": 1, "bwd": 2, "fwd_bwd": 3}


def traffic_cases() -> List[Tuple[Case, Sequence[str]]]:
    """Small shapes (the emu checks every access): NCHW, NHWC, NC, rows."""
    bn_ops = ("fwd_train", "fwd_infer", "bwd")
    conv_ops = bn_ops + EPILOGUE_OPS
    return [
        (Case("batch_norm", (8, 16, 16, 16), "NCHW", label="small conv"), conv_ops),
        (Case("batch_norm", (8, 16, 16, 16), "NHWC", label="small conv"), conv_ops),
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


def _run_op(case: Case, op: str, setup, recording, backend="emu"):
    """Run ``op`` on the emu backend (``backend``: its name or an emu backend
    instance); record only the op itself."""
    gpubn = importlib.import_module("gpubn")
    state = setup.state()
    x, dy, w, b = setup.x, setup.dy, setup.weight, setup.bias
    rm, rv = state["running_mean"], state["running_var"]
    training = op != "fwd_infer"
    if case.kind == "batch_norm":
        fwd, bwd = gpubn.batch_norm_forward, getattr(gpubn, "batch_norm_backward", None)
        args = (x,)
        kwargs = dict(weight=w, bias=b, running_mean=rm, running_var=rv, training=training,
                      momentum=MOMENTUM, eps=EPS, axis=case.axis, backend=backend)
        if op in EPILOGUE_OPS:   # a residual of x's shape and dtype, not x itself
            kwargs.update(residual=residual(setup), activation="relu")
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
    if op.startswith("fwd"):
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
                    row["path"] = path_of(row["kernels"])
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


def path_of(kernels: Sequence[str]) -> str:
    """Which path an op's launches took: ``read-once`` (a cooperative
    bn_*_once_* kernel ran), ``two-pass`` (a training op's statistics or
    gradient reduction ran separately) or ``-`` (neither: an elementwise op)."""
    if any("_once_" in k for k in kernels):
        return "read-once"
    if any(("bn_stats" in k or "bn_backward_reduce" in k) for k in kernels):
        return "two-pass"
    return "-"


# -- modelled time at realistic sizes --------------------------------------------------
#
# emu counts the bytes of small shapes; the passes over tensor-sized buffers do
# not depend on the size as long as the path (read-once or two-pass) is the
# same.  So each realistic shape's path is decided by the launch plan
# (gpubn.launch.once_fits) for the modelled device, the small shape is run on
# emu forced onto that path, and its tensor passes times the realistic
# tensor's bytes, over the copy bandwidth, is the modelled time: the time of a
# kernel sequence that moves its bytes at the speed of a device-to-device copy
# (launch latency, the grid barrier and the statistics' arithmetic left out).

# The device the launch plan models: an H200 (sm_90, 132 SMs, the limits of
# gpubn.sass.DEVICES["sm_90"], which an H100 SXM shares) and its HBM3e's
# nominal bandwidth, 4.8 TB/s (an H100 SXM's HBM3: 3.35 TB/s).  A copy
# reaches about 90 % of the nominal figure, so a measured or given copy
# bandwidth is preferred.
MODEL_DEVICE = "H200"
MODEL_ARCH = "sm_90"
NOMINAL_COPY_GBPS = 4800.0
MODEL_OPS = ("fwd_train", "bwd") + EPILOGUE_OPS
# ResNet-50 (torchvision) batch-norm layers at batch 32: the largest (layer1's
# bn3, 103 MB in float32), a middle one and a late one.
MODEL_SHAPES = ((32, 256, 56, 56), (32, 256, 14, 14), (32, 512, 7, 7))
MODEL_SMALL_SHAPE = (8, 16, 16, 16)


def model_cases(dtype: str = "float32") -> List[Tuple[Case, Sequence[str]]]:
    """The realistic cases whose time is modelled, NCHW and NHWC."""
    out = []
    for n, c, h, w in MODEL_SHAPES:
        for layout, shape in (("NCHW", (n, c, h, w)), ("NHWC", (n, h, w, c))):
            out.append((Case("batch_norm", shape, layout, dtype, label="ResNet-50 b32"),
                        MODEL_OPS))
    return out


def copy_bandwidth_choice(measured: Optional[float] = None,
                          given: Optional[float] = None) -> Tuple[float, str]:
    """The copy bandwidth (GB/s, read + write) the modelled times use and
    where it comes from: the device-to-device copy measured in this run, else
    the user's ``--copy-gbps``, else the modelled device's nominal bandwidth."""
    for value, name in ((measured, "measured copy bandwidth"), (given, "copy_gbps")):
        if value is not None and not (isinstance(value, (int, float)) and value > 0):
            raise ValueError(f"{name} must be a positive number of GB/s, got {value!r}")
    if measured is not None:
        return float(measured), "device-to-device copy measured in this run"
    if given is not None:
        return float(given), "given with --copy-gbps"
    return NOMINAL_COPY_GBPS, (f"nominal HBM3e bandwidth of an {MODEL_DEVICE} (no GPU here, "
                               f"no --copy-gbps)")


def modelled_us(nbytes: float, copy_gbps: float) -> float:
    """Microseconds to move ``nbytes`` (read + write) at ``copy_gbps``."""
    if not copy_gbps > 0:
        raise ValueError(f"copy_gbps must be positive, got {copy_gbps!r}")
    return nbytes / (copy_gbps * 1e9) * 1e6


def canonical_shape(case: Case) -> Tuple[int, int, int]:
    """``(outer, C, inner)``, the view the kernels and the launch plan see."""
    axis = case.axis % len(case.shape)
    outer = inner = 1
    for d in case.shape[:axis]:
        outer *= d
    for d in case.shape[axis + 1:]:
        inner *= d
    return outer, case.shape[axis], inner


@functools.lru_cache(maxsize=None)
def ptxas_resources(arch: str = MODEL_ARCH):
    """``resources(kernel, dtype) -> (registers, static shared bytes)`` of the
    read-once kernels as ptxas compiles them for ``arch`` (from
    ``gpubn.sass``), or None when ptxas or nvdisasm is missing."""
    from gpubn import sass

    if sass.unavailable_reason() is not None:
        return None
    try:
        reports = sass.assemble("bn_persistent.cu", arch)
    except Exception:   # NVRTC or the tools failed: the caller falls back
        return None
    usage = {(r.kernel, r.dtype): (r.registers, r.shared) for r in reports}

    def resources(kernel: str, dtype: str) -> Tuple[int, int]:
        return usage[(kernel, dtype)]
    return resources


# Without ptxas: the registers per thread emu's functions report
# (gpubn.emu's Device.registers_per_thread) and no static shared memory.
ASSUMED_REGISTERS = 64


def assumed_resources(kernel: str, dtype: str) -> Tuple[int, int]:
    """The read-once kernels' resources when ptxas cannot say: emu's model."""
    return ASSUMED_REGISTERS, 0


def model_plan(shape3, dtype: str, op: str, resources) -> Tuple[bool, str, "object"]:
    """Whether the launch plan runs the read-once ``op`` (a benchmark op:
    ``fwd_*`` or ``bwd*``) on the canonical ``shape3`` on the modelled device
    (``gpubn.launch.once_launch`` and ``once_fits`` with the function's
    ``resources(kernel, dtype)``), why, and the launch."""
    from gpubn import launch as plan
    from gpubn import sass

    op_name = "backward" if op.startswith("bwd") else "forward"
    kernel = plan.once_launch(shape3, dtype, op_name).kernel
    dev = sass.DEVICES[MODEL_ARCH]
    registers, static = resources(kernel, dtype)
    cfg = plan.once_launch(shape3, dtype, op_name, dev, registers, static)
    fits, why = plan.once_fits(cfg, dev, registers, static)
    return fits, why, cfg


def modelled_path(case: Case, op: str, resources) -> Tuple[bool, str, "object"]:
    """:func:`model_plan` of a benchmark case."""
    return model_plan(canonical_shape(case), case.dtype, op, resources)


def on_chip(cfg) -> str:
    """A read-once launch's capacity in words: values per thread (registers
    + staged) and threads per block, e.g. ``16+82 x256``."""
    return f"{cfg.staged and f'16+{cfg.staged}' or '16'} x{cfg.block[0] * cfg.block[1]}"


def resolve_resources(resources=None):
    """``(resources, where they come from)``: the given ones, else ptxas's,
    else emu's model."""
    if resources is not None:
        return resources, "given"
    found = ptxas_resources()
    if found is not None:
        return found, f"ptxas {MODEL_ARCH}"
    return assumed_resources, (f"assumed (no ptxas): {ASSUMED_REGISTERS} registers per thread, "
                               f"no static shared memory")


def _forced_emu(read_once: bool):
    import dataclasses

    from gpubn.backends.emu import EMU_TUNING, EmuBackend
    return EmuBackend(tuning=dataclasses.replace(EMU_TUNING, read_once=read_once))


def run_model(cases=None, copy_gbps: Optional[float] = None, resources=None,
              progress=None) -> List[Dict]:
    """One row per realistic (case, op): the path the launch plan takes on
    the modelled device, gpubn's tensor passes (emu, on a small shape of the
    same layout and dtype forced onto that path) and PyTorch's, both as bytes
    of the realistic shape and as modelled microseconds at ``copy_gbps``
    (default: the nominal bandwidth).  ``resources(kernel, dtype)``: the
    read-once kernels' registers and static shared memory (default: ptxas's,
    else emu's model)."""
    cases = model_cases() if cases is None else cases
    gbps = NOMINAL_COPY_GBPS if copy_gbps is None else copy_gbps
    resources, occupancy_source = resolve_resources(resources)
    reason = emu_unavailable_reason()
    recording = None if reason else importlib.import_module("gpubn.emu").recording
    counted: Dict[Tuple, Dict] = {}
    rows = []
    for case, ops in cases:
        for op in ops:
            once, why, cfg = modelled_path(case, op, resources)
            x_bytes = case.numel * ITEMSIZE[case.dtype]
            pt = PYTORCH_PASSES[op]
            row = {"device": "model", "provider": "gpubn-model", "backend": "emu",
                   "kind": case.kind, "op": op, "layout": case.layout,
                   "shape": list(case.shape), "dtype": case.dtype, "numel": case.numel,
                   "path": "read-once" if once else "two-pass", "path_reason": why,
                   "on_chip": on_chip(cfg) if once else "",
                   "occupancy_source": occupancy_source, "copy_gbps": gbps,
                   "pytorch_passes": pt, "pytorch_bytes": pt * x_bytes,
                   "pytorch_us": modelled_us(pt * x_bytes, gbps), "status": "ok", "reason": ""}
            key = (case.layout, case.dtype, op, once)
            if reason is None and key not in counted:
                small = Case(case.kind, _small_shape(case.layout), case.layout, case.dtype)
                try:
                    records = _run_op(small, op, make_setup(small), recording,
                                      backend=_forced_emu(once))
                    counted[key] = summarize_records(records, small.numel, ITEMSIZE[small.dtype])
                except Exception as exc:
                    text = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
                    counted[key] = {"error": text.splitlines()[0][:300]}
            got = counted.get(key, {"error": reason})
            if "error" in got:
                row.update(status="error" if reason is None else "unavailable",
                           reason=got["error"])
            elif path_of(got["kernels"]) != row["path"]:
                row.update(status="error", reason=f"emu ran {path_of(got['kernels'])}, "
                                                  f"the plan picks {row['path']}")
            else:
                passes = got["tensor_passes"]
                row.update(launches=got["launches"], kernels=got["kernels"], passes=passes,
                           bytes=passes * x_bytes, us=modelled_us(passes * x_bytes, gbps))
                row["pytorch_ratio"] = row["pytorch_us"] / row["us"]
            rows.append(row)
            if progress is not None:
                progress.step(f"model {case.layout} {case.shape_str} {op}: {row['path']}")
    return rows


def _small_shape(layout: str) -> Tuple[int, ...]:
    n, c, h, w = MODEL_SMALL_SHAPE
    return (n, c, h, w) if layout == "NCHW" else (n, h, w, c)


# -- which ResNet-50 layers the read-once kernels hold --------------------------------

# ResNet-50's (torchvision) batch-norm layers at batch 32: (C, H = W, how many
# layers have that shape); 53 in all.
RESNET50_BN = ((64, 112, 1), (64, 56, 6), (256, 56, 4), (128, 56, 1), (128, 28, 7),
               (512, 28, 5), (256, 28, 1), (256, 14, 11), (1024, 14, 7), (512, 14, 1),
               (512, 7, 5), (2048, 7, 4))
RESNET50_BATCH = 32
COVERAGE_COLUMNS = tuple((op, dtype, layout) for op in ("fwd_train", "bwd")
                         for dtype in ("float32", "bfloat16") for layout in ("NCHW", "NHWC"))


def coverage(resources=None) -> List[Dict]:
    """One row per ResNet-50 batch-32 batch-norm shape and (op, dtype,
    layout) of ``COVERAGE_COLUMNS``: whether the launch plan runs it
    read-once on the modelled device, with what on chip, and why."""
    resources, _ = resolve_resources(resources)
    rows = []
    for c, h, layers in RESNET50_BN:
        for op, dtype, layout in COVERAGE_COLUMNS:
            shape3 = (RESNET50_BATCH, c, h * h) if layout == "NCHW" \
                else (RESNET50_BATCH * h * h, c, 1)
            once, why, cfg = model_plan(shape3, dtype, op, resources)
            rows.append({"channels": c, "size": h, "layers": layers, "op": op, "dtype": dtype,
                         "layout": layout, "read_once": once,
                         "on_chip": on_chip(cfg) if once else "", "reason": why})
    return rows


def format_coverage(rows: Sequence[Dict], markdown: bool = False) -> str:
    """The coverage table: a line per shape (its layers, float32 MB of x),
    a column per (op, dtype, layout) with what each thread holds on chip
    (registers + staged values x threads per block) or ``-`` (two-pass), and
    the layers read once out of all."""
    by_shape: Dict[Tuple[int, int], Dict] = {}
    for r in rows:
        by_shape.setdefault((r["channels"], r["size"]), {"layers": r["layers"]})[
            (r["op"], r["dtype"], r["layout"])] = r
    header = ["shape (N=32)", "layers", "MB fp32"] + [
        f"{op.split('_')[0]} {'fp32' if dtype == 'float32' else 'bf16'} {layout}"
        for op, dtype, layout in COVERAGE_COLUMNS]
    body, held = [], {col: 0 for col in COVERAGE_COLUMNS}
    total = 0
    for (c, h), cols in by_shape.items():
        total += cols["layers"]
        line = [f"{c}x{h}x{h}", str(cols["layers"]),
                f"{RESNET50_BATCH * c * h * h * 4 / 1e6:.1f}"]
        for col in COVERAGE_COLUMNS:
            r = cols[col]
            line.append(r["on_chip"] if r["read_once"] else "-")
            held[col] += cols["layers"] if r["read_once"] else 0
        body.append(line)
    body.append(["read once", str(total), ""] + [f"{held[col]}/{total}"
                                                 for col in COVERAGE_COLUMNS])
    from .report import render
    return render(header, body, markdown)
