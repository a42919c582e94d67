"""Temperature scaling: fits a known temperature, lowers ECE of an over-confident model, lands in the card."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from bloodcell.evaluate.calibration import (
    fit_temperature,
    nll_at_temperature,
    save_temperature,
)
from bloodcell.evaluate.metrics import expected_calibration_error
from bloodcell.models import Classifier, ModelCard, create_model, load_model, save_model
from bloodcell.probabilities import softmax_with_temperature


def calibrated_logits(n: int = 4000, classes: int = 4, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Logits whose softmax is exactly the probability the label was drawn with (a calibrated model)."""
    rng = np.random.default_rng(seed)
    logits = rng.normal(0.0, 1.5, size=(n, classes))
    probs = softmax_with_temperature(logits)
    labels = np.array([rng.choice(classes, p=p) for p in probs])
    return logits, labels


def test_fit_recovers_the_temperature_of_an_over_confident_model() -> None:
    logits, labels = calibrated_logits()
    temperature = fit_temperature(3.0 * logits, labels)  # over-confident by a factor of 3
    assert temperature == pytest.approx(3.0, rel=0.1)


def test_temperature_lowers_ece_and_nll_of_an_over_confident_toy_model() -> None:
    logits, labels = calibrated_logits(seed=1)
    val, test = slice(0, 2000), slice(2000, None)
    hot = 4.0 * logits
    temperature = fit_temperature(hot[val], labels[val])
    before = expected_calibration_error(labels[test], softmax_with_temperature(hot[test]))
    after = expected_calibration_error(labels[test], softmax_with_temperature(hot[test], temperature))
    assert temperature > 1.5
    assert after < before / 2
    assert nll_at_temperature(hot[test], labels[test], temperature) < nll_at_temperature(hot[test], labels[test], 1.0)


def test_temperature_does_not_change_predictions() -> None:
    logits, _ = calibrated_logits(n=100)
    np.testing.assert_array_equal(
        softmax_with_temperature(logits, 2.5).argmax(axis=1), softmax_with_temperature(logits).argmax(axis=1)
    )


def test_fit_without_data_is_identity() -> None:
    assert fit_temperature(np.zeros((0, 4)), np.zeros(0, dtype=int)) == 1.0


def test_a_validation_part_read_all_right_keeps_the_temperature_at_one(caplog: pytest.LogCaptureFixture) -> None:
    logits, labels = calibrated_logits(n=200, seed=2)
    right = labels == logits.argmax(axis=1)
    with caplog.at_level("WARNING", logger="bloodcell.evaluate.calibration"):
        assert fit_temperature(logits[right], labels[right]) == 1.0  # not the search's bound, 0.05
    assert "no temperature can be fitted" in caplog.text


def test_non_finite_logits_are_refused() -> None:
    logits, labels = calibrated_logits(n=50)
    logits[7, 2] = np.nan
    with pytest.raises(ValueError, match="1 of 50 validation logits are NaN or infinite"):
        fit_temperature(logits, labels)


def test_a_model_with_broken_weights_is_named_not_scored() -> None:
    from bloodcell.errors import UserError
    from bloodcell.evaluate.runner import predict_logits
    from bloodcell.models import create_model

    model = create_model("bloodnet", 4, width=0.25)
    with torch.no_grad():
        next(p for name, p in model.named_parameters() if name.endswith("bias")).fill_(float("nan"))
    with pytest.raises(UserError, match="NaN or infinite for 3 of 3 images"):
        predict_logits(model, np.zeros((3, 32, 32, 3), dtype=np.uint8))


def test_save_temperature_updates_the_card(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = Classifier(create_model("bloodnet", 4, width=0.5))
    save_model(model, ModelCard(architecture="bloodnet", arch_kwargs={"width": 0.5}, input_size=32), tmp_path / "m")
    card = save_temperature(tmp_path / "m", 1.7, {"test": {"balanced_accuracy": 0.9}})
    assert card.temperature == pytest.approx(1.7)
    _, loaded = load_model(tmp_path / "m")
    assert loaded.temperature == pytest.approx(1.7)
    assert loaded.metrics["test"]["balanced_accuracy"] == 0.9
