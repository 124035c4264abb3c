"""Micro-benchmark session: runs on a GPU, or on the CPU with DDPM_BENCH_CPU=1 (else skipped).
Each test records its row (benchmarks/common.py); with DDPM_BENCH_JSON=PATH the rows are written
there after every test (a run cut off by the suite's timeout keeps what it measured), for the GPU
suite and `python -m benchmarks.report`."""
import os

import pytest

from benchmarks import common

ROWS: list[dict] = []


def pytest_collection_modifyitems(config, items):
    if common.ON_GPU or common.cpu_enabled():
        return
    skip = pytest.mark.skip(reason="micro-benchmarks need CUDA (or DDPM_BENCH_CPU=1 for the CPU table)")
    for item in items:  # the hook sees every collected item: leave tests/ alone when run together
        if item.nodeid.startswith("benchmarks/"):
            item.add_marker(skip)


@pytest.fixture
def record(benchmark):
    """record(row, timed): keep the row for the JSON and let pytest-benchmark time `timed` too, in a
    group per op/direction/shape so its table compares the backends of one case side by side."""
    def _record(row: dict, timed):
        ROWS.append(row)
        if os.environ.get("DDPM_BENCH_JSON"):
            common.write_rows(os.environ["DDPM_BENCH_JSON"], ROWS)
        if row["status"] == "unavailable":
            pytest.skip(row["error"])
        assert row["status"] == "ok", row["error"]
        benchmark.group = f"{row['op']} {row['direction']} {row['dtype']} {row['shape']}"
        benchmark.extra_info.update({k: row[k] for k in ("backend", "GBps", "TFLOPs") if row[k] is not None})
        benchmark.pedantic(common.synced(timed), rounds=5, warmup_rounds=1)
    return _record

