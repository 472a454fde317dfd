"""Benchmark cases and the named suites that group them.

A :class:`Case` is one normalization problem: the op family (batch norm,
batch renorm, layer norm), the input shape, the channel axis (batch norm) or
the normalized trailing dimension (layer norm), the dtype and a label saying
where the shape comes from.  A suite is a list of ``(case, ops)`` pairs; the
ops are ``fwd_train``, ``fwd_infer``, ``bwd`` and ``fwd_bwd``.

Suites:

``quick``     tiny shapes, every family and op: seconds (used by the tests/CI).
``default``   the CPU suite: representative ResNet-50 layers at batch 32 in
              NCHW and NHWC, a deep small-spatial layer, MLP features and
              transformer rows; a few minutes on two cores.
``resnet50``  every distinct batch-norm layer of ResNet-50, batch 32 and 256,
              NCHW and NHWC (the GPU suite; large for a CPU).
``small``     inputs of up to about 1 MB (MLP features, small convolutions
              in both layouts, short layer-norm rows), where the cost of a
              call, not of its bytes, decides; a minute or two on two cores.
``full``      ``resnet50`` plus the other shape families.
``standard``  the GPU acceptance run's shapes (``.ci/gpu``): ResNet-style
              NCHW and channels-last, MLP features, layer-norm rows; forward
              training, inference and backward, and on the ResNet shapes the
              add + ReLU epilogue; about a minute on one GPU.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from math import prod
from typing import Dict, List, Sequence, Tuple

KINDS = ("batch_norm", "batch_renorm", "layer_norm")
OPS = ("fwd_train", "fwd_infer", "bwd", "fwd_bwd")
# Batch norm's residual-block epilogue, y = relu(bn(x) + residual), training
# forward and its backward (dx, dweight, dbias, dresidual).
EPILOGUE_OPS = ("fwd_train_add_relu", "bwd_add_relu")
ALL_OPS = OPS + EPILOGUE_OPS
DTYPES = ("float16", "float32", "float64")
LAYOUTS = ("NCHW", "NHWC", "NC", "rows")

# Short names used in tables.
KIND_ABBREV = {"batch_norm": "bn", "batch_renorm": "brn", "layer_norm": "ln"}


@dataclass(frozen=True)
class Case:
    """One problem. ``shape`` is the array's shape as stored: NHWC cases are
    ``(N, H, W, C)`` with ``axis=-1``; layer-norm rows are ``(tokens, hidden)``
    normalized over the last dimension."""

    kind: str
    shape: Tuple[int, ...]
    layout: str
    dtype: str = "float32"
    label: str = field(default="", compare=False)
    axis: int = field(default=None)  # type: ignore[assignment]

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {self.kind!r}")
        if self.layout not in LAYOUTS:
            raise ValueError(f"layout must be one of {LAYOUTS}, got {self.layout!r}")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {DTYPES}, got {self.dtype!r}")
        shape = tuple(self.shape)
        if not shape or any((not isinstance(d, int)) or d < 1 for d in shape):
            raise ValueError(f"shape must be a non-empty tuple of positive ints, got {self.shape!r}")
        object.__setattr__(self, "shape", shape)
        expected_ndim = {"NCHW": 4, "NHWC": 4, "NC": 2, "rows": 2}[self.layout]
        if len(shape) != expected_ndim:
            raise ValueError(
                f"shape {shape} has {len(shape)} dimensions, layout {self.layout} needs {expected_ndim}")
        if self.kind == "layer_norm" and self.layout != "rows":
            raise ValueError(f"layer_norm cases use layout 'rows', got {self.layout!r}")
        if self.kind != "layer_norm" and self.layout == "rows":
            raise ValueError(f"layout 'rows' is for layer_norm, not {self.kind}")
        if self.axis is None:
            axis = -1 if self.layout in ("NHWC", "rows") else 1
            object.__setattr__(self, "axis", axis)

    # -- derived sizes ------------------------------------------------
    @property
    def numel(self) -> int:
        return prod(self.shape)

    @property
    def channels(self) -> int:
        """Length of the per-channel (batch norm) or per-feature (layer norm)
        parameter vectors."""
        return self.shape[self.axis]

    @property
    def groups(self) -> int:
        """Number of independent statistics: channels for batch norm, rows
        for layer norm."""
        if self.kind == "layer_norm":
            return self.numel // self.shape[-1]
        return self.channels

    @property
    def per_group(self) -> int:
        """Values reduced into one statistic."""
        return self.numel // self.groups

    @property
    def shape_str(self) -> str:
        return "x".join(map(str, self.shape))

    def with_dtype(self, dtype: str) -> "Case":
        return Case(self.kind, self.shape, self.layout, dtype, self.label, self.axis)

    def key(self) -> str:
        return f"{KIND_ABBREV[self.kind]} {self.layout} {self.shape_str} {self.dtype}"


def _nchw_and_nhwc(kind, n, c, h, w, label, ops):
    return [
        (Case(kind, (n, c, h, w), "NCHW", label=label), ops),
        (Case(kind, (n, h, w, c), "NHWC", label=label), ops),
    ]


# Distinct batch-norm layers of ResNet-50 (torchvision v1.5 layout, 224x224
# input): (channels, height, width) -> where they occur.
RESNET50_BN_LAYERS: Dict[Tuple[int, int, int], str] = {
    (64, 112, 112): "stem bn1",
    (64, 56, 56): "layer1 bn1/bn2",
    (256, 56, 56): "layer1 bn3/downsample",
    (128, 56, 56): "layer2.0 bn1",
    (128, 28, 28): "layer2 bn1/bn2",
    (512, 28, 28): "layer2 bn3/downsample",
    (256, 28, 28): "layer3.0 bn1",
    (256, 14, 14): "layer3 bn1/bn2",
    (1024, 14, 14): "layer3 bn3/downsample",
    (512, 14, 14): "layer4.0 bn1",
    (512, 7, 7): "layer4 bn1/bn2",
    (2048, 7, 7): "layer4 bn3/downsample",
}

BN_OPS = OPS
LN_OPS = ("fwd_train", "bwd", "fwd_bwd")
TRAIN_OPS = ("fwd_train", "bwd", "fwd_bwd")


def quick_suite() -> List[Tuple[Case, Sequence[str]]]:
    """Tiny shapes covering every family, layout and op (seconds)."""
    return [
        (Case("batch_norm", (8, 16, 12, 12), "NCHW", label="small conv"), BN_OPS),
        (Case("batch_norm", (8, 12, 12, 16), "NHWC", label="small conv"), BN_OPS),
        (Case("batch_norm", (64, 128), "NC", label="small mlp"), BN_OPS),
        (Case("batch_renorm", (8, 16, 12, 12), "NCHW", label="small conv"), TRAIN_OPS),
        (Case("layer_norm", (64, 256), "rows", label="small transformer"), LN_OPS),
    ]


def default_suite() -> List[Tuple[Case, Sequence[str]]]:
    """The CPU suite: a few minutes on two cores."""
    cases: List[Tuple[Case, Sequence[str]]] = []
    for (c, h, w) in [(64, 56, 56), (256, 56, 56), (512, 28, 28), (1024, 14, 14), (2048, 7, 7)]:
        label = "resnet50 " + RESNET50_BN_LAYERS[(c, h, w)]
        cases += _nchw_and_nhwc("batch_norm", 32, c, h, w, label, BN_OPS)
    cases += _nchw_and_nhwc("batch_norm", 256, 512, 7, 7, "deep small-spatial", BN_OPS)
    cases += [
        (Case("batch_norm", (256, 4096), "NC", label="mlp features"), BN_OPS),
        (Case("batch_norm", (4096, 1024), "NC", label="mlp features, large batch"), BN_OPS),
        (Case("batch_renorm", (32, 256, 56, 56), "NCHW", label="resnet50 layer1 bn3"), TRAIN_OPS),
        (Case("layer_norm", (4096, 768), "rows", label="transformer hidden 768"), LN_OPS),
        (Case("layer_norm", (2048, 4096), "rows", label="transformer hidden 4096"), LN_OPS),
    ]
    return cases


def small_suite() -> List[Tuple[Case, Sequence[str]]]:
    """Inputs of 4 KB to 1 MB (float32): per-call cost against the peer's."""
    cases: List[Tuple[Case, Sequence[str]]] = [
        (Case("batch_norm", shape, "NC", label="mlp features, small"), BN_OPS)
        for shape in [(16, 64), (64, 256), (128, 512), (256, 1024)]]
    for n, c, hw in [(8, 16, 12), (16, 64, 8), (8, 64, 14), (4, 64, 28)]:
        cases += _nchw_and_nhwc("batch_norm", n, c, hw, hw, "small conv", BN_OPS)
    cases += [(Case("layer_norm", shape, "rows", label="transformer rows, short"), LN_OPS)
              for shape in [(64, 256), (256, 768)]]
    return cases


def resnet50_suite() -> List[Tuple[Case, Sequence[str]]]:
    """Every distinct ResNet-50 batch-norm layer, batch 32 and 256, both layouts."""
    cases: List[Tuple[Case, Sequence[str]]] = []
    for n in (32, 256):
        for (c, h, w), where in RESNET50_BN_LAYERS.items():
            cases += _nchw_and_nhwc("batch_norm", n, c, h, w, f"resnet50 {where}", BN_OPS)
    return cases


def full_suite() -> List[Tuple[Case, Sequence[str]]]:
    cases = resnet50_suite()
    seen = {case for case, _ in cases}
    for case, ops in default_suite():
        if case not in seen:
            cases.append((case, ops))
    cases += [
        (Case("layer_norm", (16384, 768), "rows", label="transformer hidden 768, 16k tokens"), LN_OPS),
        (Case("layer_norm", (8192, 4096), "rows", label="transformer hidden 4096, 8k tokens"), LN_OPS),
    ]
    return cases


def standard_suite() -> List[Tuple[Case, Sequence[str]]]:
    """The shapes of the GPU acceptance run: large enough to be
    bandwidth-bound (25-100 MB per float32 tensor, well above an H100/H200's
    50 MB L2 for the ResNet layers), few enough for a minute of measuring."""
    ops = ("fwd_train", "fwd_infer", "bwd")
    cases: List[Tuple[Case, Sequence[str]]] = []
    for (c, h, w) in [(256, 56, 56), (1024, 14, 14)]:
        cases += _nchw_and_nhwc("batch_norm", 32, c, h, w,
                                "resnet50 " + RESNET50_BN_LAYERS[(c, h, w)], ops + EPILOGUE_OPS)
    cases += [
        (Case("batch_norm", (4096, 1024), "NC", label="mlp features, large batch"), ops),
        (Case("layer_norm", (16384, 768), "rows", label="transformer hidden 768, 16k tokens"),
         ("fwd_train", "bwd")),
        (Case("layer_norm", (8192, 4096), "rows", label="transformer hidden 4096, 8k tokens"),
         ("fwd_train", "bwd")),
    ]
    return cases


SUITES = {
    "quick": quick_suite,
    "default": default_suite,
    "small": small_suite,
    "resnet50": resnet50_suite,
    "full": full_suite,
    "standard": standard_suite,
}


def get_suite(name: str, dtypes: Sequence[str] = ("float32",), kinds=None, ops=None):
    """The suite ``name`` expanded over ``dtypes`` and filtered by ``kinds``
    and ``ops`` (None keeps all).  Returns a list of ``(case, ops)``."""
    if name not in SUITES:
        raise ValueError(f"suite must be one of {', '.join(SUITES)}, got {name!r}")
    for d in dtypes:
        if d not in DTYPES:
            raise ValueError(f"dtype must be one of {DTYPES}, got {d!r}")
    if kinds is not None:
        bad = [k for k in kinds if k not in KINDS]
        if bad:
            raise ValueError(f"kinds must be among {KINDS}, got {bad}")
    if ops is not None:
        bad = [o for o in ops if o not in ALL_OPS]
        if bad:
            raise ValueError(f"ops must be among {ALL_OPS}, got {bad}")
    out = []
    for case, case_ops in SUITES[name]():
        if kinds is not None and case.kind not in kinds:
            continue
        chosen = [o for o in case_ops if ops is None or o in ops]
        if not chosen:
            continue
        for d in dtypes:
            out.append((case.with_dtype(d), tuple(chosen)))
    return out
