"""benchmarks/crossval.py end to end on a tiny synthetic dataset: every image predicted once, by a model
that never trained on its fold."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from benchmark_support import benchmark_module
from bloodcell.probabilities import softmax_with_temperature
from conftest import make_aria_dataset

TINY = [
    "data.image_size=32", "data.block_size=4", "data.embargo=1", "model.kwargs={width: 0.5}", "train.epochs=1",
    "train.batch_size=16", "train.num_threads=1", "augment.jpeg=0.5",
]  # fmt: skip


def crossval_module():
    return benchmark_module("crossval")


def test_out_of_fold_predictions_cover_every_image_once(tmp_path: Path, monkeypatch) -> None:
    crossval = crossval_module()
    dataset = make_aria_dataset(tmp_path / "aria", per_class=24, size=40, segmented=False)
    monkeypatch.setenv("BLOODCELL_HOME", str(tmp_path / "home"))
    held_out: list[np.ndarray] = []
    real_run_fold = crossval.run_fold

    def run_fold_recording(*args, **kwargs):
        run = real_run_fold(*args, **kwargs)
        held_out.append(run["blocks"])
        return run

    monkeypatch.setattr(crossval, "run_fold", run_fold_recording)
    argv = ["--data", str(dataset), "--folds", "3", "--bootstrap", "50", "--out", str(tmp_path / "out")]
    for item in TINY:
        argv += ["--set", item]
    summary = crossval.main(argv)

    assert summary["n_images"] == 4 * 24 and summary["folds"] == 3 and len(summary["per_fold"]) == 3
    blocks = [set(b) for b in held_out]
    assert all(not (a & b) for i, a in enumerate(blocks) for b in blocks[i + 1 :]), "a block was held out twice"
    assert sum(f["held_out_images"] for f in summary["per_fold"]) == summary["n_images"]
    low, high = summary["balanced_accuracy_ci"]
    assert 0 <= low <= summary["balanced_accuracy"] <= high <= 1
    assert json.loads((tmp_path / "out" / "crossval.json").read_text())["n_images"] == summary["n_images"]
    tta = summary["tta"]
    assert 0 <= tta["balanced_accuracy_ci"][0] <= tta["balanced_accuracy"] <= tta["balanced_accuracy_ci"][1] <= 1
    assert all(0 <= f["tta_balanced_accuracy"] <= 1 for f in summary["per_fold"])

    # Every block once, with its images; every image once in the predictions file, with its block.
    assert sorted(b["block"] for b in summary["blocks"]) == sorted(set().union(*blocks))
    assert sum(b["images"] for b in summary["blocks"]) == summary["n_images"]
    accuracies = [b["accuracy"] for b in summary["blocks"]]
    assert accuracies == sorted(accuracies)
    predictions = pd.read_csv(tmp_path / "out" / "predictions.csv")
    assert len(predictions) == summary["n_images"] and predictions["path"].is_unique
    assert set(predictions["true_class"]) <= set(summary["recall"]) and set(predictions["block"]) == set().union(*blocks)
    probabilities = predictions[[f"p_{name}" for name in summary["recall"]]].to_numpy()
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, atol=1e-4)
    predicted_by_probability = [list(summary["recall"])[k] for k in probabilities.argmax(axis=1)]
    assert predicted_by_probability == predictions["predicted_class"].tolist()


def test_fold_score_is_the_balanced_accuracy_of_its_argmax() -> None:
    crossval = crossval_module()
    run = {"labels": np.array([0, 0, 1, 1]), "logits": np.array([[2.0, 0], [0, 1.0], [0, 3.0], [0, 1.0]])}
    assert crossval.fold_balanced_accuracy(run) == pytest.approx((0.5 + 1.0) / 2)


def test_block_table_names_each_blocks_errors_worst_first() -> None:
    crossval = crossval_module()
    run = {
        "fold": 0, "classes": ["Benign", "Pro-B"],
        "labels": np.array([0, 0, 0, 1, 1]), "blocks": np.array(["Benign:00", "Benign:00", "Benign:01", "Pro-B:00", "Pro-B:00"]),
        "logits": np.array([[0, 1.0], [1.0, 0], [1.0, 0], [0, 1.0], [0, 1.0]]),
    }  # fmt: skip
    table = crossval.block_table([run])
    assert [row["block"] for row in table] == ["Benign:00", "Benign:01", "Pro-B:00"]
    assert table[0] == {
        "block": "Benign:00", "fold": 0, "class": "Benign", "images": 2, "errors": 1, "accuracy": 0.5,
        "read_as": {"Pro-B": 1},
    }  # fmt: skip
    assert table[2]["errors"] == 0 and table[2]["read_as"] == {}


def test_ensemble_scores_the_mean_of_its_members_probabilities() -> None:
    crossval = crossval_module()
    sure_a, unsure_b = np.array([[4.0, 0.0], [0.0, 0.1]]), np.array([[0.0, 0.5], [0.0, 3.0]])
    combined = crossval.ensemble_logits([sure_a, unsure_b])
    mean_probabilities = (softmax_with_temperature(sure_a) + softmax_with_temperature(unsure_b)) / 2
    np.testing.assert_allclose(softmax_with_temperature(combined), mean_probabilities, rtol=1e-6)
    assert combined.argmax(axis=1).tolist() == [0, 1]  # the confident member decides each image
    assert crossval.ensemble_logits([sure_a]) is sure_a


def test_members_train_each_fold_with_successive_seeds(tmp_path: Path, monkeypatch, capsys) -> None:
    crossval = crossval_module()
    dataset = make_aria_dataset(tmp_path / "aria", per_class=16, size=40, segmented=False)
    monkeypatch.setenv("BLOODCELL_HOME", str(tmp_path / "home"))
    seeds: list[int] = []
    real_fit = crossval.fit

    def fit_recording(config, *args, **kwargs):
        seeds.append(config.train.seed)
        return real_fit(config, *args, **kwargs)

    monkeypatch.setattr(crossval, "fit", fit_recording)
    argv = ["--data", str(dataset), "--folds", "2", "--members", "2", "--bootstrap", "20", "--out", str(tmp_path / "out")]
    for item in [*TINY, "train.seed=5"]:
        argv += ["--set", item]
    summary = crossval.main(argv)

    assert seeds == [5, 6, 5, 6]
    assert summary["members"] == 2 and len(summary["member_balanced_accuracy"]) == 2
    assert all(0 <= score <= 1 for score in summary["member_balanced_accuracy"])
    capsys.readouterr()
    with pytest.raises(SystemExit) as refused:  # a usage error, naming the option: not a crash or a run
        crossval.main(["--data", str(dataset), "--members", "0"])
    # The error line, not argparse's usage line above it (which lists every option).
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert refused.value.code == 2 and "error: --members must be at least 1" in error, error


@pytest.mark.parametrize("folds", ["1", "0"])
def test_fewer_than_two_folds_is_a_usage_error(tmp_path: Path, capsys, folds: str) -> None:
    """One fold leaves its model nothing to train on (a config traceback before), none nothing to score."""
    crossval = crossval_module()
    with pytest.raises(SystemExit) as refused:
        crossval.main(["--data", str(tmp_path / "absent"), "--folds", folds])
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert refused.value.code == 2 and f"error: --folds must be at least 2, got {folds}" in error, error
