"""``python -m bench dask``: fitting a scaler on a Dask array, out of core.

One data set, generated on the workers and kept in their memory
(``persist``), is reduced by three providers in the same cluster, in turns:

* ``gpubn``: ``gpubn.preprocessing.StandardScaler().fit(X)``;
* ``dask-ml``: ``dask_ml.preprocessing.StandardScaler().fit(X)`` (when
  installed);
* ``dask``: ``dask.compute(X.mean(axis=0), X.var(axis=0))``, Dask alone.

Each is timed ``repeats`` times (median, min and max); throughput is the
array's bytes over the time.  The whole run is repeated on a local cluster of
1 and of 2 worker processes (one thread each), which gives the scaling from 1
to 2 workers.  Every provider's mean and variance are checked against
``gpubn``'s before timing.
"""

from __future__ import annotations

import statistics
import time
from typing import Callable, Dict, List, Optional, Sequence

import numpy as np

PROVIDERS = ("gpubn", "dask-ml", "dask")


def _providers(X) -> Dict[str, Callable[[], tuple]]:
    """name -> callable returning ``(mean, var)`` as NumPy arrays."""
    import dask

    from gpubn.preprocessing import StandardScaler

    def ours():
        s = StandardScaler().fit(X)
        return s.mean_, s.var_

    def dask_alone():
        return dask.compute(X.mean(axis=0), X.var(axis=0))

    out = {"gpubn": ours}
    try:
        from dask_ml.preprocessing import StandardScaler as DaskMLScaler
    except ImportError:
        pass
    else:
        def dask_ml():
            s = DaskMLScaler().fit(X)
            return np.asarray(s.mean_), np.asarray(s.var_)
        out["dask-ml"] = dask_ml
    out["dask"] = dask_alone
    return out


def _check(name, got, ref):
    """A provider's (mean, var) agree with gpubn's to float64 rounding of a
    long sum (relative 1e-9; the data are uniform on [0, 1))."""
    for what, a, b in zip(("mean", "var"), got, ref):
        a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
        if not np.allclose(a, b, rtol=1e-9, atol=1e-12):
            return f"{name}: {what} differs from gpubn's by {float(np.max(np.abs(a - b))):.3g}"
    return None


def run_dask(gb: float = 2.0, features: int = 64, chunk_mb: float = 64.0,
             workers: Sequence[int] = (1, 2), repeats: int = 3, seed: int = 0,
             progress: Optional[Callable[[str], None]] = None) -> List[Dict]:
    """Time the providers on a ``gb``-gigabyte float64 array of ``features``
    columns in row blocks of about ``chunk_mb`` MB; one row per provider and
    worker count."""
    import dask.array as da
    from distributed import Client, LocalCluster, wait

    if gb <= 0 or features < 1 or chunk_mb <= 0 or repeats < 1 or not workers:
        raise ValueError("run_dask: gb, chunk_mb must be > 0, features, repeats >= 1, "
                         "workers not empty")
    row_bytes = 8 * features
    n = max(1, int(gb * 1e9) // row_bytes)
    rows_per_chunk = max(1, min(n, int(chunk_mb * 1e6) // row_bytes))
    nbytes = n * row_bytes
    say = progress or (lambda text: None)
    rows: List[Dict] = []
    for w in workers:
        say(f"dask: starting a local cluster of {w} worker process(es)")
        with LocalCluster(n_workers=w, threads_per_worker=1, processes=True,
                          dashboard_address=None, memory_limit=0) as cluster, \
                Client(cluster) as client:
            rng = da.random.default_rng(seed)
            X = rng.random((n, features), chunks=(rows_per_chunk, features)).persist()
            wait(X)
            providers = _providers(X)
            say(f"dask: {nbytes / 1e9:.2f} GB in {X.numblocks[0]} blocks on {w} worker(s); "
                f"checking {', '.join(providers)}")
            ref = providers["gpubn"]()
            errors = {name: _check(name, f(), ref) for name, f in providers.items()}
            times: Dict[str, List[float]] = {name: [] for name in providers}
            for r in range(repeats):          # in turns, so load changes hit all alike
                for name, f in providers.items():
                    t0 = time.perf_counter()
                    f()
                    times[name].append(time.perf_counter() - t0)
                say(f"dask: {w} worker(s), repeat {r + 1}/{repeats} done")
            client.cancel(X)
        for name in providers:
            med = statistics.median(times[name])
            rows.append({
                "section": "dask", "provider": name, "workers": w, "op": "fit",
                "shape": [n, features], "dtype": "float64", "chunk_rows": rows_per_chunk,
                "blocks": -(-n // rows_per_chunk), "bytes": nbytes, "times": times[name],
                "median_s": med, "min_s": min(times[name]), "max_s": max(times[name]),
                "gbps": nbytes / med / 1e9, "status": "ok" if errors[name] is None else "mismatch",
                "error": errors[name]})
    add_dask_ratios(rows)
    return rows


def add_dask_ratios(rows: List[Dict]) -> None:
    """``vs_<peer>``: gpubn's throughput over the peer's with the same worker
    count (same run); ``scaling``: a provider's throughput over its own with
    the fewest workers."""
    by = {(r["provider"], r["workers"]): r for r in rows}
    fewest = min(r["workers"] for r in rows)
    for r in rows:
        base = by.get((r["provider"], fewest))
        r["scaling"] = r["gbps"] / base["gbps"] if base else None
        if r["provider"] == "gpubn":
            for peer in PROVIDERS[1:]:
                other = by.get((peer, r["workers"]))
                if other:
                    r[f"vs_{peer}"] = r["gbps"] / other["gbps"]


def format_dask_table(rows: Sequence[Dict], markdown: bool = False) -> str:
    header = ["workers", "provider", "median s [min-max]", "GB/s", "gpubn / provider",
              "scaling vs fewest workers", "check"]
    gpubn = {r["workers"]: r for r in rows if r["provider"] == "gpubn"}
    body = []
    for r in rows:
        mine = gpubn.get(r["workers"])
        ratio = mine["gbps"] / r["gbps"] if mine else float("nan")
        body.append([str(r["workers"]), r["provider"],
                     f"{r['median_s']:.3f} [{r['min_s']:.3f}-{r['max_s']:.3f}]",
                     f"{r['gbps']:.2f}", f"{ratio:.2f}",
                     "-" if r.get("scaling") is None else f"{r['scaling']:.2f}",
                     r["status"] if r["error"] is None else r["error"]])
    if markdown:
        lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        lines += ["| " + " | ".join(b) + " |" for b in body]
        return "\n".join(lines)
    widths = [max(len(h), *(len(b[i]) for b in body)) for i, h in enumerate(header)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    return "\n".join([fmt.format(*header)] + [fmt.format(*b) for b in body])
