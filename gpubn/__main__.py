"""Command line: ``python -m gpubn [command]`` (or the ``gpubn`` script).

Subcommands are registered in ``COMMANDS`` (name -> (help, add_arguments,
run)); with no command, ``example`` runs.
"""

from __future__ import annotations

import argparse
import sys

import numpy as np


def _example_args(p):
    p.add_argument("--shape", default="16,4,8,8",
                   help="input shape, comma-separated (default: 16,4,8,8)")
    p.add_argument("--axis", type=int, default=1, help="channel axis (default: 1)")
    p.add_argument("--dtype", default="float32", choices=["float16", "float32", "float64"])
    p.add_argument("--backend", default=None, help="numpy, emu or cuda (default: automatic)")
    p.add_argument("--seed", type=int, default=0)


def _fmt(v):
    return "[" + ", ".join(f"{float(a):8.4f}" for a in v) + "]"


def run_example(args) -> int:
    """Normalize a random batch with a BatchNorm layer and report what it did."""
    import gpubn

    try:
        shape = tuple(int(s) for s in args.shape.split(","))
    except ValueError:
        print(f"error: --shape must be comma-separated integers, got {args.shape!r}",
              file=sys.stderr)
        return 2
    rng = np.random.default_rng(args.seed)
    c = shape[args.axis]
    bshape = [1] * len(shape)
    bshape[args.axis] = c
    x = (rng.standard_normal(shape) * rng.uniform(0.5, 3.0, c).reshape(bshape)
         + rng.uniform(-5, 5, c).reshape(bshape)).astype(args.dtype)
    bn = gpubn.BatchNorm(c, axis=args.axis, backend=args.backend)
    backend = bn.backend
    x = backend.xp.asarray(x)
    y = bn(x)

    def per_channel(a):
        a = np.moveaxis(np.asarray(a.get() if hasattr(a, "get") else a, np.float64), args.axis, 0)
        a = a.reshape(c, -1)
        return a.mean(axis=1), a.std(axis=1)

    mx, sx = per_channel(x)
    my, sy = per_channel(y)
    print(f"gpubn {gpubn.__version__}: BatchNorm({c}) on backend {backend.name!r}")
    print(f"input  shape {shape}, dtype {args.dtype}, channel axis {args.axis}, "
          f"{x.size // c} values per channel")
    print(f"before: mean {_fmt(mx)}")
    print(f"        std  {_fmt(sx)}")
    print(f"after:  mean {_fmt(my)}")
    print(f"        std  {_fmt(sy)}")
    rm, rv = (np.asarray(a.get() if hasattr(a, "get") else a) for a in
              (bn.running_mean, bn.running_var))
    print(f"running_mean {_fmt(rm)}  (momentum {bn.momentum}, {bn.num_batches_tracked} batch tracked)")
    print(f"running_var  {_fmt(rv)}")
    return 0


def _demo_args(p):
    from .demo import add_arguments
    add_arguments(p)


def _run_demo(args) -> int:
    from .demo import run_from_args
    return run_from_args(args)


# name -> (help, add_arguments(parser), run(args) -> exit code)
COMMANDS = {
    "example": ("normalize a random batch and print what happened", _example_args, run_example),
    "demo": ("train an MLP on the 8x8 digits with and without BatchNorm "
             "(needs the 'demo' extra)", _demo_args, _run_demo),
}
DEFAULT_COMMAND = "example"


def build_parser():
    parser = argparse.ArgumentParser(prog="gpubn", description="gpubn command line")
    sub = parser.add_subparsers(dest="command", metavar="command")
    for name, (help_text, add_args, run) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        add_args(p)
        p.set_defaults(_run=run)
    return parser


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0].startswith("-") and argv[0] not in ("-h", "--help"):
        argv.insert(0, DEFAULT_COMMAND)
    args = build_parser().parse_args(argv)
    return args._run(args)


if __name__ == "__main__":
    sys.exit(main())
