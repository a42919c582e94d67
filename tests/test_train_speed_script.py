"""benchmarks/train_speed.py on tiny settings: its rounds, ratios and the default recipe's per-batch costs."""

from __future__ import annotations

import pytest

from benchmark_support import benchmark_module


def train_speed_module():
    return benchmark_module("train_speed")


def test_throughput_takes_each_ratio_against_its_own_rounds_bare_runs() -> None:
    rows = train_speed_module().throughput(["bloodnet"], [32], batch=4, steps=2, threads=1, rounds=2)
    assert len(rows) == 1 and len(rows[0]["rounds"]) == 2
    row = rows[0]
    for run in row["rounds"]:
        assert run["bare"] == pytest.approx(sum(run["bare_runs"]) / 2) and run["loop"] > 0
    ratios = sorted(run["loop"] / run["bare"] for run in row["rounds"])
    assert row["ratio"] == pytest.approx(sum(ratios) / 2)  # the median of two rounds
    assert row["ratio_no_augment"] > 0


def test_default_step_costs_name_the_three_pieces() -> None:
    rows = train_speed_module().default_step_costs(batch=2, rounds=1)
    assert [row["piece"] for row in rows] == [
        "augmentation (the default config's, whole)",
        "of which the per-pixel noise draw",
        "per-image standardisation (the model's first layer)",
    ]
    assert all(row["ms"] > 0 and row["batch"] == 2 for row in rows)
