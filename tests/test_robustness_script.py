"""benchmarks/robustness.py end to end on a tiny synthetic dataset: one row a recipe, on the split and overrides asked
for."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmark_support import benchmark_module
from conftest import make_aria_dataset

TINY = [
    "data.image_size=32", "data.block_size=4", "model.kwargs={width: 0.5}", "train.batch_size=16",
    "train.num_threads=1",
]  # fmt: skip


@pytest.mark.parametrize("protocol", ["session", "random"])
def test_each_recipe_gets_a_row_scored_on_the_protocols_split(tmp_path: Path, monkeypatch, protocol: str) -> None:
    robustness = benchmark_module("robustness")
    dataset = make_aria_dataset(tmp_path / "aria", per_class=24, size=40, segmented=False)
    monkeypatch.setenv("BLOODCELL_HOME", str(tmp_path / "home"))
    trained = []
    real_fit = robustness.fit

    def fit_recording(config, *args, **kwargs):
        trained.append((config.data.protocol, config.data.embargo, config.augment.hue))
        return real_fit(config, *args, **kwargs)

    monkeypatch.setattr(robustness, "fit", fit_recording)
    out = tmp_path / "out"
    argv = ["--data", str(dataset), "--recipes", "plain", "--epochs", "1", "--protocol", protocol, "--out", str(out)]
    for item in [*TINY, "data.embargo=0"]:
        argv += ["--set", item]
    rows = robustness.main(argv)

    assert trained == [(protocol, 0, 0.0)]  # the protocol asked for, --set on top of the recipe's own overrides
    [row] = rows
    assert row["recipe"] == "plain" and row["protocol"] == protocol
    assert 0 <= row["clean_ci"][0] <= row["clean"] <= row["clean_ci"][1] <= 1
    assert set(row["shifts"]) and all(len(values) == 3 for values in row["shifts"].values())
    assert row["worst_medium"]["shift"] in row["shifts"]
    stem = "robustness" if protocol == "session" else "robustness-random"
    assert json.loads((out / f"{stem}.json").read_text())[0]["protocol"] == protocol
    assert (out / f"{stem}.md").read_text().startswith("| recipe |")
