"""Time one CPU provider's ops on one case in a process of its own.

The runner starts ``python -m bench.worker`` with a JSON spec on stdin and
reads one JSON line from the end of stdout::

    spec:   {"provider": "torch-cpu", "kind": ..., "shape": [...], "layout": ...,
             "dtype": ..., "axis": ..., "seed": 0, "torch_threads": 2 or null,
             "ops": [[op, timed calls, warm-up calls], ...]}
    reply:  {"pid": ..., "times": {op: [seconds, ...] or {"error": text}}}

The inputs are rebuilt from the seed (:func:`bench.inputs.make_setup`), so
they equal the ones the parent checked.  Each op gets one untimed call before
its warm-up calls, as the parent's checked call is for in-process timing.
"""

from __future__ import annotations

import gc
import json
import os
import sys


def run(spec: dict) -> dict:
    from .inputs import make_setup
    from .providers import cpu_providers, select
    from .runner import error_text
    from .suites import Case

    if spec.get("torch_threads"):
        import torch
        torch.set_num_threads(int(spec["torch_threads"]))
        os.environ["GPUBN_NUM_THREADS"] = str(int(spec["torch_threads"]))   # same count
    provider = select(cpu_providers(), [spec["provider"]])[0]
    case = Case(spec["kind"], tuple(spec["shape"]), spec["layout"], spec["dtype"],
                axis=spec["axis"])
    setup = make_setup(case, seed=spec["seed"])
    times = {}
    for op, n, w in spec["ops"]:
        fn = None
        try:
            fn = provider.prepare(setup, op)
            fn()
            times[op] = provider.timer(fn, n, w)
        except Exception as exc:    # reported for this op; the others still run
            times[op] = {"error": error_text(exc)}
        del fn
        gc.collect()
    return {"pid": os.getpid(), "times": times}


def main() -> int:
    reply = run(json.load(sys.stdin))
    sys.stdout.write("\n" + json.dumps(reply) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
