"""Time one CPU provider on one case in a process of its own.

The runner starts ``python -m bench.worker`` and talks to it in JSON lines:
the spec is the first line of stdin, then one request per line; the worker
answers the spec and each request with a stdout line that starts with
``REPLY`` (anything else a library prints there is passed over)::

    spec:     {"provider": "torch-cpu", "kind": ..., "shape": [...], "layout": ...,
               "dtype": ..., "axis": ..., "seed": 0, "torch_threads": 2 or null}
    answer:   {"pid": ...}, or {"pid": ..., "error": text} (and the worker exits)
    request:  {"op": op, "calls": n, "warmup": w}
    answer:   {"times": [seconds, ...], "start": t0, "end": t1} or {"error": text}

It exits at the end of its stdin.  The inputs are rebuilt from the seed
(:func:`bench.inputs.make_setup`), so they equal the ones the parent
checked.  The first request for an op prepares it and makes one untimed
call (as the parent's checked call is for in-process timing); a request for
another op drops the one before, so one op's buffers are held at a time.
``start`` and ``end`` (seconds of the system clock) bound the request's
timed calls, so the parent can show that providers took turns.
"""

from __future__ import annotations

import gc
import json
import os
import sys
import time

REPLY = "REPLY "


def _answer(obj: dict) -> None:
    sys.stdout.write("\n" + REPLY + json.dumps(obj) + "\n")
    sys.stdout.flush()


def serve(spec: dict, requests) -> None:
    """Answer the spec, then each request of the iterable ``requests``."""
    from .inputs import make_setup
    from .providers import cpu_providers, select
    from .runner import error_text
    from .suites import Case

    try:
        if spec.get("torch_threads"):
            import torch
            torch.set_num_threads(int(spec["torch_threads"]))
            os.environ["GPUBN_NUM_THREADS"] = str(int(spec["torch_threads"]))   # same count
        provider = select(cpu_providers(), [spec["provider"]])[0]
        case = Case(spec["kind"], tuple(spec["shape"]), spec["layout"], spec["dtype"],
                    axis=spec["axis"])
        setup = make_setup(case, seed=spec["seed"])
    except Exception as exc:    # reported to the parent
        _answer({"pid": os.getpid(), "error": error_text(exc)})
        return
    _answer({"pid": os.getpid()})
    op, fn = None, None
    for request in requests:
        try:
            if request["op"] != op:
                op, fn = None, None
                gc.collect()
                fn = provider.prepare(setup, request["op"])
                fn()
                op = request["op"]
            start = time.time()
            times = provider.timer(fn, int(request["calls"]), int(request["warmup"]))
            _answer({"times": times, "start": start, "end": time.time()})
        except Exception as exc:    # reported for this request; the others still run
            op, fn = None, None
            _answer({"error": error_text(exc)})


def main() -> int:
    lines = (json.loads(line) for line in sys.stdin if line.strip())
    spec = next(lines, None)
    if spec is not None:
        serve(spec, lines)
    return 0


if __name__ == "__main__":
    sys.exit(main())
