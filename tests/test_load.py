"""A short, bounded load test of ``bloodcell serve``: 16 concurrent clients on 127.0.0.1, zero errors.

The server is the real command in a subprocess; the clients are the benchmark's (benchmarks/infer_speed.py),
run for 2 seconds instead of 30.
"""

from __future__ import annotations

from pathlib import Path

from serve_support import cell_jpeg, infer_speed_module

CLIENTS = 16
SECONDS = 2.0


def test_serve_under_concurrent_clients_has_no_errors(tiny_model: Path) -> None:
    bench = infer_speed_module()
    images = [cell_jpeg(seed=i, size=224) for i in range(8)]
    with bench.serve_process(tiny_model, backend="torch") as port:
        result = bench.load_test(port, images, clients=CLIENTS, duration=SECONDS, max_requests=5000, timeout=30)
        # The server is still healthy after the burst.
        bench.wait_until_healthy(port, timeout=10)
    assert result["errors"] == 0, result["error_kinds"]
    assert result["ok"] >= CLIENTS  # every client got answers
    assert result["seconds"] < SECONDS + 30  # bounded: no client hung past its deadline
    assert result["latency_ms_p99"] >= result["latency_ms_p50"] > 0
