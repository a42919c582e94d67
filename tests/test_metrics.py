"""Metric code checked against scikit-learn on hand-made predictions, and the block bootstrap's behaviour."""

from __future__ import annotations

import json

import numpy as np
import pytest
from sklearn.metrics import (
    accuracy_score,
    balanced_accuracy_score,
    confusion_matrix,
    f1_score,
    precision_recall_fscore_support,
    roc_auc_score,
)

from bloodcell import CLASSES
from bloodcell.evaluate.metrics import (
    CONFIDENT,
    balanced_accuracy_from_confusion,
    block_bootstrap_ci,
    classification_metrics,
    confident_errors,
    expected_calibration_error,
    headline_metrics,
    reliability_bins,
    resampling_units,
)
from bloodcell.evaluate.runner import json_ready

# Hand-made: 12 images; class 3 (Pro-B) is never predicted, class 0 is over-predicted.
Y_TRUE = np.array([0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3])
Y_PRED = np.array([0, 0, 1, 1, 1, 0, 2, 2, 0, 0, 2, 1])


def probs_for(y_pred: np.ndarray, n_classes: int = 4, confidence: float = 0.7, seed: int = 0) -> np.ndarray:
    """Probabilities whose argmax is ``y_pred``, with some spread in the other classes."""
    rng = np.random.default_rng(seed)
    probs = rng.uniform(0.0, 1.0, size=(len(y_pred), n_classes))
    probs[np.arange(len(y_pred)), y_pred] = 0.0
    probs *= (1 - confidence) / probs.sum(axis=1, keepdims=True)
    probs[np.arange(len(y_pred)), y_pred] = confidence
    return probs


@pytest.fixture
def metrics() -> dict:
    return classification_metrics(Y_TRUE, probs_for(Y_PRED), CLASSES, blocks=None, n_bootstrap=200)


def test_headline_numbers_match_sklearn(metrics: dict) -> None:
    assert metrics["balanced_accuracy"] == pytest.approx(balanced_accuracy_score(Y_TRUE, Y_PRED))
    assert metrics["accuracy"] == pytest.approx(accuracy_score(Y_TRUE, Y_PRED))
    assert metrics["macro_f1"] == pytest.approx(f1_score(Y_TRUE, Y_PRED, average="macro", zero_division=0))
    assert metrics["n_images"] == 12


def test_per_class_report_matches_sklearn_with_a_class_never_predicted(metrics: dict) -> None:
    precision, recall, f1, support = precision_recall_fscore_support(Y_TRUE, Y_PRED, labels=[0, 1, 2, 3], zero_division=0)
    for k, name in enumerate(CLASSES):
        row = metrics["per_class"][name]
        assert row["precision"] == pytest.approx(precision[k])
        assert row["recall"] == pytest.approx(recall[k])
        assert row["f1"] == pytest.approx(f1[k])
        assert row["support"] == support[k]
    never_predicted = metrics["per_class"]["Pro-B"]
    assert never_predicted == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 3}


def test_a_class_absent_from_the_images_is_left_out_of_macro_f1_as_of_balanced_accuracy() -> None:
    # A folder of Benign and Pre-B images only, all read right: a perfect score, not 2 of 4 classes' F1.
    y_true = np.array([0, 0, 0, 2, 2, 2])
    perfect = classification_metrics(y_true, probs_for(y_true), CLASSES, blocks=None, n_bootstrap=50)
    assert perfect["balanced_accuracy"] == 1.0 and perfect["macro_f1"] == 1.0
    # No image of it and never predicted: its precision is 0 / 0, none, not 0.000 in the tables.
    assert perfect["per_class"]["Pro-B"] == {"precision": None, "recall": None, "f1": None, "support": 0}
    # Reading a present class as an absent one still costs: it is a false negative of the true class.
    y_pred = np.array([0, 0, 3, 2, 2, 2])
    wrong = classification_metrics(y_true, probs_for(y_pred), CLASSES, blocks=None, n_bootstrap=50)
    assert wrong["macro_f1"] == pytest.approx(f1_score(y_true, y_pred, labels=[0, 2], average="macro"))
    assert wrong["macro_f1"] < 1.0
    assert wrong["per_class"]["Pro-B"]["precision"] == 0.0  # predicted, never right: 0 of 1
    assert headline_metrics(y_true, probs_for(y_true), len(CLASSES))["macro_f1"] == 1.0


def test_confusion_matrix_counts_and_row_normalised(metrics: dict) -> None:
    expected = confusion_matrix(Y_TRUE, Y_PRED, labels=[0, 1, 2, 3])
    assert metrics["confusion_matrix"] == expected.tolist()
    normalised = np.array(metrics["confusion_matrix_normalized"])
    np.testing.assert_allclose(normalised.sum(axis=1), 1.0, atol=1e-6)
    np.testing.assert_allclose(normalised, expected / expected.sum(axis=1, keepdims=True), atol=1e-6)


def test_confident_errors_counts_the_wrong_answers_given_with_high_probability() -> None:
    y_true = np.array([0, 1, 2, 3, 0])
    probs = np.array([
        [0.95, 0.05, 0.0, 0.0],  # right, confident: not an error
        [0.92, 0.08, 0.0, 0.0],  # wrong at 0.92: counted
        [0.0, 0.9, 0.1, 0.0],  # wrong at exactly the threshold: counted
        [0.5, 0.0, 0.0, 0.5],  # a tie read as class 0: wrong, unsure
        [0.1, 0.6, 0.3, 0.0],  # wrong, unsure
    ])
    assert confident_errors(y_true, probs) == {"threshold": CONFIDENT, "count": 2, "errors": 4}
    assert confident_errors(y_true, probs, threshold=0.95)["count"] == 0
    metrics = classification_metrics(y_true, probs, CLASSES, n_bootstrap=10)
    assert metrics["confident_errors"] == {"threshold": 0.9, "count": 2, "errors": 4}


def test_roc_auc_one_vs_rest_matches_sklearn() -> None:
    probs = probs_for(Y_PRED, seed=3)
    probs[:, 3] += np.linspace(0, 0.05, 12)  # break ties so AUC is informative
    probs /= probs.sum(axis=1, keepdims=True)
    result = classification_metrics(Y_TRUE, probs, CLASSES, n_bootstrap=10)
    expected = roc_auc_score(Y_TRUE, probs, multi_class="ovr", average=None)
    for k, name in enumerate(CLASSES):
        assert result["roc_auc"][name] == pytest.approx(expected[k])
    assert result["roc_auc_macro"] == pytest.approx(expected.mean())


def test_roc_auc_is_none_for_a_class_absent_from_the_labels() -> None:
    y_true = np.array([0, 0, 1, 1, 2, 2])
    result = classification_metrics(y_true, probs_for(y_true), CLASSES, n_bootstrap=10)
    assert result["roc_auc"]["Pro-B"] is None
    assert result["per_class"]["Pro-B"]["support"] == 0


def test_balanced_accuracy_from_confusion_matches_sklearn_on_random_predictions() -> None:
    rng = np.random.default_rng(1)
    for _ in range(20):
        y_true = rng.integers(0, 4, 50)
        y_pred = rng.integers(0, 4, 50)
        cm = confusion_matrix(y_true, y_pred, labels=[0, 1, 2, 3])
        assert float(balanced_accuracy_from_confusion(cm)) == pytest.approx(balanced_accuracy_score(y_true, y_pred))


def test_ece_by_hand() -> None:
    # Two bins used: confidence 0.9 (2 images, 1 correct) and 0.6 (2 images, both correct).
    probs = np.array([[0.9, 0.1], [0.9, 0.1], [0.6, 0.4], [0.4, 0.6]])
    y_true = np.array([0, 1, 0, 1])
    expected = 0.5 * abs(0.5 - 0.9) + 0.5 * abs(1.0 - 0.6)
    assert expected_calibration_error(y_true, probs) == pytest.approx(expected)
    bins = reliability_bins(y_true, probs)
    assert sum(b["count"] for b in bins) == 4
    assert len(bins) == 15 and bins[0]["lower"] == 0.0 and bins[-1]["upper"] == 1.0


def test_ece_zero_when_confidence_equals_accuracy() -> None:
    # 4 images at confidence 0.75, 3 of them right.
    probs = np.tile([0.75, 0.25], (4, 1))
    assert expected_calibration_error(np.array([0, 0, 0, 1]), probs) == pytest.approx(0.0)


def test_bootstrap_interval_contains_estimate_and_narrows_with_more_blocks() -> None:
    rng = np.random.default_rng(0)

    def blocked_predictions(n_blocks_per_class: int):
        y_true, y_pred, blocks = [], [], []
        for k in range(4):
            for b in range(n_blocks_per_class):
                accuracy = rng.uniform(0.5, 1.0)  # sessions differ in how hard they are
                for _ in range(10):
                    y_true.append(k)
                    y_pred.append(k if rng.random() < accuracy else (k + 1) % 4)
                    blocks.append(f"{k}:{b}")
        return np.array(y_true), np.array(y_pred), np.array(blocks)

    widths = []
    for n_blocks in (3, 30):
        y_true, y_pred, blocks = blocked_predictions(n_blocks)
        low, high = block_bootstrap_ci(y_true, y_pred, blocks, 4, n_resamples=500)
        point = balanced_accuracy_score(y_true, y_pred)
        assert low <= point <= high
        widths.append(high - low)
    assert widths[1] < widths[0] / 2


def test_block_bootstrap_is_wider_than_image_bootstrap_for_correlated_sessions() -> None:
    # Whole sessions are right or wrong: resampling images pretends to 160 independent draws.
    y_true = np.repeat(np.arange(4), 40)
    blocks = np.array([f"{k}:{i // 10}" for k, i in zip(y_true, np.tile(np.arange(40), 4))])
    session_ok = {f"{k}:{b}": (k + b) % 3 != 0 for k in range(4) for b in range(4)}
    y_pred = np.array([t if session_ok[b] else (t + 1) % 4 for t, b in zip(y_true, blocks)])
    by_block = block_bootstrap_ci(y_true, y_pred, blocks, 4, n_resamples=500)
    by_image = block_bootstrap_ci(y_true, y_pred, None, 4, n_resamples=500)
    assert by_block[1] - by_block[0] > 1.5 * (by_image[1] - by_image[0])


def test_bootstrap_is_deterministic_and_stratified_option_works() -> None:
    y_true = np.repeat(np.arange(4), 20)
    y_pred = np.where(np.arange(80) % 3 == 0, (y_true + 1) % 4, y_true)
    blocks = np.array([f"{t}:{i % 4}" for i, t in enumerate(y_true)])
    first = block_bootstrap_ci(y_true, y_pred, blocks, 4, seed=7)
    assert first == block_bootstrap_ci(y_true, y_pred, blocks, 4, seed=7)
    low, high = block_bootstrap_ci(y_true, y_pred, blocks, 4, stratified=False)
    assert low <= balanced_accuracy_score(y_true, y_pred) <= high


def test_a_constant_predictor_gets_a_tight_interval_at_chance() -> None:
    # Stratified by class, every resample keeps all classes: always predicting one class is 0.25, always.
    y_true = np.repeat(np.arange(4), 20)
    blocks = np.array([f"{t}:{i % 3}" for i, t in enumerate(y_true)])
    assert block_bootstrap_ci(y_true, np.zeros(80, dtype=int), blocks, 4) == pytest.approx((0.25, 0.25))


def test_a_class_with_one_block_is_resampled_by_image() -> None:
    y_true = np.repeat(np.arange(2), 20)
    y_pred = y_true.copy()
    y_pred[[0, 3, 7]] = 1  # class 0: one block, a few mistakes inside it
    blocks = np.array(["0:0"] * 20 + ["1:0"] * 10 + ["1:1"] * 10)
    assert resampling_units(y_true, blocks).tolist()[:3] != [0, 0, 0]  # images of class 0 are their own units
    low, high = block_bootstrap_ci(y_true, y_pred, blocks, 2, n_resamples=300)
    assert high - low > 0.02  # a single block still carries uncertainty
    metrics = classification_metrics(y_true, np.eye(2)[y_pred], ["a", "b"], blocks, n_bootstrap=50)
    assert "single-block classes resampled by image: a" in metrics["ci_method"]


def test_the_interval_says_how_many_blocks_it_rests_on_per_class() -> None:
    """A test part holds two or three blocks a class: "11 blocks within each class" read as 11 per class."""
    y_true = np.repeat(np.arange(2), 30)
    few = np.array([f"{t}:{i % (2 + t)}" for i, t in enumerate(y_true)])  # 2 blocks of class 0, 3 of class 1
    text = classification_metrics(y_true, np.eye(2)[y_true], ["a", "b"], few, n_bootstrap=20)["ci_method"]
    assert "5 session blocks in all (2-3 per class)" in text and "rough" in text
    many = np.array([f"{t}:{i % 6}" for i, t in enumerate(y_true)])
    text = classification_metrics(y_true, np.eye(2)[y_true], ["a", "b"], many, n_bootstrap=20)["ci_method"]
    assert "12 session blocks in all (6 per class)" in text and "rough" not in text and "median" not in text
    # A small folder's split still cuts 7 blocks a class: blocks of an image or two are no sessions.
    tiny = np.array([f"{t}:{i % 15}" for i, t in enumerate(y_true)])
    text = classification_metrics(y_true, np.eye(2)[y_true], ["a", "b"], tiny, n_bootstrap=20)["ci_method"]
    assert "the blocks hold 2 images each (median), far fewer than a capture session" in text
    joined = np.where(many == "0:1", "0:0+0:1", np.where(many == "0:0", "0:0+0:1", many))
    text = classification_metrics(y_true, np.eye(2)[y_true], ["a", "b"], joined, n_bootstrap=20)["ci_method"]
    assert "11 session blocks in all" in text and "counted as one" in text
    plus = np.char.add(np.where(y_true == 0, "CD34+", "CD34-"), np.char.add(":", (np.arange(60) % 3).astype(str)))
    text = classification_metrics(y_true, np.eye(2)[y_true], ["CD34+", "CD34-"], plus, n_bootstrap=20)["ci_method"]
    assert "counted as one" not in text  # a class name may hold a "+": no block was joined


def test_metrics_are_json_ready_with_documented_keys(metrics: dict) -> None:
    for key in ("balanced_accuracy", "balanced_accuracy_ci", "accuracy", "macro_f1", "per_class", "confusion_matrix",
                "confusion_matrix_normalized", "roc_auc", "ece", "n_images"):  # fmt: skip
        assert key in metrics
    assert len(metrics["balanced_accuracy_ci"]) == 2
    json.dumps(metrics, allow_nan=False)


def test_nll_is_not_capped_for_confident_errors() -> None:
    """scikit-learn's log_loss clips probabilities at machine epsilon (at most 36 an image); a wrong answer
    at a 60-logit margin costs 60."""
    from bloodcell.probabilities import softmax_with_temperature

    logits = np.array([[0.0, 60.0, 0.0, 0.0], [5.0, 0.0, 0.0, 0.0]])
    probs = softmax_with_temperature(logits)
    exact = -np.log(probs[np.arange(2), [0, 0]].clip(min=1e-300)).mean()
    result = classification_metrics(np.array([0, 0]), probs, CLASSES, blocks=None, n_bootstrap=20)
    assert result["nll"] == pytest.approx(exact, rel=1e-6) and result["nll"] > 29


def test_a_class_without_images_has_no_row_shares_not_zero_recall() -> None:
    y_true = np.array([0, 0, 2, 2])
    result = json.loads(json.dumps(json_ready(classification_metrics(y_true, probs_for(y_true), CLASSES, n_bootstrap=20))))
    rows = result["confusion_matrix_normalized"]
    assert rows[0] == [1.0, 0.0, 0.0, 0.0] and rows[1] == [None] * 4 and rows[3] == [None] * 4


def test_balanced_accuracy_of_one_class_is_quiet() -> None:
    import warnings

    from bloodcell.evaluate.metrics import balanced_accuracy, chance_level

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert balanced_accuracy(np.array([1, 1]), np.array([1, 1])) == 1.0
    assert chance_level(np.array([0, 2, 2])) == 0.5 and chance_level(np.arange(4)) == 0.25
