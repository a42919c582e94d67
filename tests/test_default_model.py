"""The bundled default model: small, loadable, and its card tells the truth about its test numbers."""

from __future__ import annotations

import os

import pytest

from bloodcell.models.card import CARD_FILE, WEIGHTS_FILE, bundled_model_dir, load_model


def bundled_or_skip():
    directory = bundled_model_dir()
    if not (directory / CARD_FILE).is_file():
        message = f"no bundled default model at {directory}"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(message + "; under CI=true it must be shipped")
        pytest.skip(message)
    return directory


def test_bundled_model_is_small_and_complete() -> None:
    directory = bundled_or_skip()
    model, card = load_model(None)
    assert (directory / WEIGHTS_FILE).stat().st_size <= 10 * 1024 * 1024
    assert card.command and "train" in card.command
    assert card.manifest_sha256
    # Issue 8: the shipped model learned from train + val; its temperature comes from the holdout stage.
    assert card.split["trained_on"] == ["train", "val"] and "holdout" in card.temperature_source
    test = card.metrics["test"]
    for key in ("balanced_accuracy", "balanced_accuracy_ci", "recall", "ece_after_temperature"):
        assert key in test, f"the card's test metrics lack {key}"
    low, high = test["balanced_accuracy_ci"]
    assert low <= test["balanced_accuracy"] <= high
    assert set(test["recall"]) == set(card.classes)


@pytest.mark.slow
def test_card_metrics_match_a_fresh_evaluation(real_data, tmp_path) -> None:
    """`bloodcell evaluate` on the session split's test part prints what the card claims."""
    bundled_or_skip()
    from bloodcell.evaluate.runner import evaluate_model

    _, card = load_model(None)
    metrics = evaluate_model(
        None, data_root=real_data, split="test", robustness=False, explain=False, update_card=False, progress=False,
        out_dir=tmp_path,
    )
    claimed = card.metrics["test"]
    assert metrics["n_images"] == claimed["n_images"]
    for key in ("balanced_accuracy", "accuracy", "macro_f1", "ece_after_temperature"):
        assert metrics[key] == pytest.approx(claimed[key], abs=1e-6), key
    assert metrics["balanced_accuracy_ci"] == pytest.approx(claimed["balanced_accuracy_ci"], abs=1e-6)
    for name, recall in claimed["recall"].items():
        assert metrics["per_class"][name]["recall"] == pytest.approx(recall, abs=1e-6), name
