"""``python -m bench dask``: ratios, the providers' cross-check, the table, and
one tiny run end to end on a one-worker cluster."""

import json
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("dask.array", reason="Dask is not installed; install the 'test' extra")
pytest.importorskip("distributed", reason="distributed is not installed")

_ROOT = str(Path(__file__).resolve().parents[1])
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

from bench import dask_bench  # noqa: E402
from bench.__main__ import main  # noqa: E402


def _row(provider, workers, gbps):
    return {"provider": provider, "workers": workers, "gbps": gbps, "median_s": 1.0 / gbps,
            "min_s": 0.9 / gbps, "max_s": 1.1 / gbps, "status": "ok", "error": None}


def test_ratios_compare_within_a_worker_count_and_scale_from_the_fewest():
    rows = [_row("gpubn", 1, 2.0), _row("dask-ml", 1, 1.0), _row("dask", 1, 4.0),
            _row("gpubn", 2, 3.0), _row("dask-ml", 2, 3.0), _row("dask", 2, 6.0)]
    dask_bench.add_dask_ratios(rows)
    g1, _, _, g2, m2, d2 = rows
    assert g1["vs_dask-ml"] == 2.0 and g1["vs_dask"] == 0.5
    assert g2["vs_dask-ml"] == 1.0 and g2["vs_dask"] == 0.5
    assert g2["scaling"] == 1.5 and m2["scaling"] == 3.0 and d2["scaling"] == 1.5
    assert g1["scaling"] == 1.0 and "vs_dask" not in d2
    table = dask_bench.format_dask_table(rows)
    assert table.splitlines()[2].split()[:5] == ["1", "dask-ml", "1.000", "[0.900-1.100]", "1.00"]
    assert dask_bench.format_dask_table(rows, markdown=True).startswith("| workers |")


def test_check_catches_a_provider_that_disagrees():
    ref = (np.array([0.5, 0.25]), np.array([1 / 12, 1 / 12]))
    assert dask_bench._check("dask", (ref[0] + 1e-13, ref[1]), ref) is None
    msg = dask_bench._check("dask", (ref[0], ref[1] * (1 + 1e-6)), ref)
    assert msg is not None and msg.startswith("dask: var differs")


@pytest.mark.parametrize("argv, match", [
    (["--dask-workers", "one"], "--dask-workers must be positive counts like 1,2, got 'one'"),
    (["--dask-workers", "1,0"], "--dask-workers must be positive counts"),
    (["--dask-gb", "-1"], "--dask-gb must be > 0"),
])
def test_bad_arguments(argv, match, capsys):
    assert main(["dask", "--quiet"] + argv) == 2
    assert match in capsys.readouterr().err
    with pytest.raises(ValueError, match="gb, chunk_mb must be > 0"):
        dask_bench.run_dask(gb=0)


def test_tiny_run_end_to_end(tmp_path, capsys):
    out = tmp_path / "r.jsonl"
    assert main(["dask", "--quick", "--dask-gb", "0.004", "--dask-workers", "1",
                 "--repeats", "1", "--quiet", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "StandardScaler.fit throughput" in text
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert {r["provider"] for r in rows} >= {"gpubn", "dask"}
    for r in rows:
        assert r["section"] == "dask" and r["workers"] == 1 and r["status"] == "ok", r
        assert r["bytes"] == r["shape"][0] * r["shape"][1] * 8 and r["blocks"] >= 1
        assert r["gbps"] == pytest.approx(r["bytes"] / r["median_s"] / 1e9)
