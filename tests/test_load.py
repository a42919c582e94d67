"""A short, bounded load test of ``bloodcell serve``: 16 concurrent clients on 127.0.0.1, zero errors.

The server is the real command in a subprocess; the clients are the benchmark's (benchmarks/infer_speed.py),
run for 2 seconds instead of 30.
"""

from __future__ import annotations

import threading
import types
from pathlib import Path

import pytest

from serve_support import cell_jpeg, infer_speed_module

CLIENTS = 16
SECONDS = 2.0


def test_serve_under_concurrent_clients_has_no_errors(tiny_model: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    bench = infer_speed_module()
    clients: list[threading.Thread] = []

    class Client(threading.Thread):
        def start(self) -> None:
            clients.append(self)
            super().start()

    # The load test waits for its clients with a timeout: keep them, to see that each one ended.
    monkeypatch.setattr(bench, "threading", types.SimpleNamespace(Thread=Client, Lock=threading.Lock))
    images = [cell_jpeg(seed=i, size=224) for i in range(8)]
    with bench.serve_process(tiny_model, backend="torch") as port:
        result = bench.load_test(port, images, clients=CLIENTS, duration=SECONDS, max_requests=5000, timeout=30)
        # The server is still healthy after the burst.
        bench.wait_until_healthy(port, timeout=10)
    assert result["errors"] == 0, result["error_kinds"]
    assert result["ok"] >= CLIENTS  # every client got answers
    assert len(clients) == CLIENTS and not any(client.is_alive() for client in clients)  # none hung
    assert result["latency_ms_p99"] >= result["latency_ms_p50"] > 0
