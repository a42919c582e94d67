"""``evaluate_model`` and the evaluate / explain CLI on a tiny run over the synthetic Aria-layout dataset."""

from __future__ import annotations

import hashlib
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from typer.testing import CliRunner

from bloodcell.cli import app
from bloodcell.cli.evaluate import summary_tables
from bloodcell.errors import UserError
from bloodcell.evaluate.runner import evaluate_model, evaluated_scope
from bloodcell.evaluate.shifts import SHIFTS
from bloodcell.models import load_model
from conftest import make_aria_dataset
from eval_support import make_run

DOCUMENTED_KEYS = (
    "balanced_accuracy", "balanced_accuracy_ci", "accuracy", "macro_f1", "per_class", "confusion_matrix",
    "confusion_matrix_normalized", "roc_auc", "ece", "ece_after_temperature", "temperature", "n_images",
    "robustness", "tta", "shortcut_baseline", "corner_occlusion", "explain", "data", "model", "evaluation", "plots",
)  # fmt: skip


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The toy data, with each class's file 8 a byte copy of its file 1: duplicate groups that the split
    keeps in one part and leaves out of the others (the real data hold 40 such pairs). In two classes file
    1 is trained on and file 8 falls in the embargo beside a held-out block: a left-out copy of a training
    image; in the other two file 8 is a test image and file 1 is left out."""
    root = make_aria_dataset(tmp_path_factory.mktemp("eval") / "aria", per_class=24, size=48)
    for first in (root / "Original").glob("*/*-001.jpg"):
        shutil.copyfile(first, first.with_name(first.name.replace("-001.", "-008.")))
    return root


@pytest.fixture(scope="module")
def run(dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_run(dataset, tmp_path_factory.mktemp("runs") / "toy")


@pytest.fixture(scope="module")
def metrics(run: Path) -> dict:
    return evaluate_model(run, tta=True, progress=False, n_bootstrap=200)


def test_metrics_json_has_the_documented_keys(run: Path, metrics: dict) -> None:
    written = json.loads((run / "metrics.json").read_text())
    for key in DOCUMENTED_KEYS:
        assert key in written, key
    low, high = written["balanced_accuracy_ci"]
    assert low <= written["balanced_accuracy"] <= high
    assert written["evaluation"]["split"] == "test"
    counts = written["data"]["split_summary"]["counts"]["test"]
    assert written["n_images"] == counts["total"] > 0
    assert written["data"]["split_summary"]["leakage_check"] == "passed"
    assert written["data"]["same_as_training"] is True


def test_temperature_is_fitted_on_validation_and_saved_in_the_card(run: Path, metrics: dict) -> None:
    from bloodcell.config import load_config
    from bloodcell.data.prepare import prepare_data
    from bloodcell.evaluate.calibration import fit_temperature
    from bloodcell.evaluate.runner import predict_logits

    assert metrics["temperature_source"].startswith("fitted on the validation part")
    # The value itself: the fit on the validation images, not on the test images it then scores.
    prepared = prepare_data(load_config(str(run / "config.yaml")).data, progress=False)
    val = prepared.indices("val")
    model, _ = load_model(run)
    on_val = fit_temperature(predict_logits(model, prepared.images[val]), prepared.labels[val])
    assert metrics["temperature"] == pytest.approx(on_val)
    _, card = load_model(run)
    assert card.temperature == pytest.approx(metrics["temperature"])
    assert card.metrics["test"]["balanced_accuracy"] == pytest.approx(metrics["balanced_accuracy"])


def test_each_ece_is_the_one_its_documentation_names(run: Path, metrics: dict) -> None:
    """Top level: the raw model's (T = 1) and after temperature; in the robustness and TTA sections, after it."""
    from bloodcell.config import load_config
    from bloodcell.data.prepare import prepare_data
    from bloodcell.evaluate.metrics import expected_calibration_error
    from bloodcell.evaluate.runner import predict_logits

    prepared = prepare_data(load_config(str(run / "config.yaml")).data, progress=False)
    test = prepared.indices("test")
    import torch

    logits = torch.as_tensor(predict_logits(load_model(run)[0], prepared.images[test]))
    labels = prepared.labels[test]
    raw = expected_calibration_error(labels, logits.softmax(dim=1).numpy())
    scaled = expected_calibration_error(labels, (logits / metrics["temperature"]).softmax(dim=1).numpy())
    assert raw != pytest.approx(scaled)  # the two differ on this model, so the checks below tell them apart
    assert metrics["ece"] == pytest.approx(raw) and metrics["ece_after_temperature"] == pytest.approx(scaled)
    assert metrics["robustness"]["clean"]["ece"] == pytest.approx(scaled)


def test_robustness_tta_baseline_and_gradcam_sections(metrics: dict) -> None:
    robustness = metrics["robustness"]
    assert list(robustness["shifts"]) == list(SHIFTS)
    for rows in robustness["shifts"].values():
        assert [r["severity"] for r in rows] == [0, 1, 2, 3]
        assert rows[0]["balanced_accuracy"] == pytest.approx(metrics["balanced_accuracy"])
    assert set(robustness["worst"]) == {"1", "2", "3"}
    for severity in (1, 2, 3):  # the worst shift is the lowest score at that severity
        lowest = min(rows[severity]["balanced_accuracy"] for rows in robustness["shifts"].values())
        assert robustness["worst"][str(severity)]["balanced_accuracy"] == pytest.approx(lowest)
    assert metrics["tta"]["views"] == 8 and 0 <= metrics["tta"]["balanced_accuracy"] <= 1
    assert 0 <= metrics["shortcut_baseline"]["balanced_accuracy"] <= 1
    occlusion = metrics["corner_occlusion"]
    assert list(occlusion["corners"]) == ["top-left", "top-right", "bottom-left", "bottom-right"]
    assert occlusion["clean_balanced_accuracy"] == pytest.approx(metrics["balanced_accuracy"])
    assert all(0 <= row["changed_predictions"] <= occlusion["n_images"] for row in occlusion["corners"].values())
    assert metrics["data_audit"]["corner_baselines"]["strongest"] in occlusion["corners"]
    assert metrics["explain"]["target_layer"] == "stages"
    assert metrics["explain"]["map_size"] == [2, 2]  # bloodnet's last stage at 48 px: stride 32, rounded up
    assert metrics["explain"]["n_masked"] >= 1 and metrics["explain"]["cam_energy_on_cell"] is not None


def test_corner_occlusion_counts_the_predictions_a_masked_corner_changes() -> None:
    """A model that reads the bottom-right corner changes its mind when that corner is painted over."""
    from bloodcell.evaluate.runner import corner_occlusion

    rng = np.random.default_rng(0)
    images = rng.integers(100, 156, size=(20, 40, 40, 3), dtype=np.uint8)
    y_true = np.repeat([0, 1], 10)
    images[y_true == 1, 36:, 28:] = 255  # class 1's images carry a white label in that corner

    def reads_the_corner(batch: np.ndarray) -> np.ndarray:
        bright = (batch[:, 36:, 28:].mean(axis=(1, 2, 3)) > 200).astype(float)
        return np.stack([1 - bright, bright], axis=1)

    def ignores_it(batch: np.ndarray) -> np.ndarray:
        centre = batch[:, 10:30, 10:30].mean(axis=(1, 2, 3))
        return np.stack([centre, -centre], axis=1)

    cheat = corner_occlusion(reads_the_corner, images, y_true, reads_the_corner(images))
    assert cheat["clean_balanced_accuracy"] == 1.0
    assert cheat["corners"]["bottom-right"] == {"balanced_accuracy": 0.5, "changed_predictions": 10}
    assert all(cheat["corners"][c]["changed_predictions"] == 0 for c in ("top-left", "top-right", "bottom-left"))
    honest = corner_occlusion(ignores_it, images, y_true, ignores_it(images))
    assert all(row["changed_predictions"] == 0 for row in honest["corners"].values())


def test_plots_and_predictions_are_written(run: Path, metrics: dict) -> None:
    for name in ("confusion_matrix", "roc", "reliability", "robustness", "training_curves", "gradcam_grid"):
        assert (run / metrics["plots"][name]).stat().st_size > 1000, name
    assert (run / "plots" / "gradcam_grid.png").is_file()
    predictions = pd.read_csv(run / "predictions.csv")
    assert len(predictions) == metrics["n_images"]
    probability_columns = [f"p_{name}" for name in metrics["classes"]]
    assert list(predictions) == ["path", "block", "true_class", "predicted_class", "confidence", *probability_columns]
    assert np.allclose(predictions[probability_columns].sum(axis=1), 1.0, atol=1e-4)


def test_split_all_on_another_copy_of_the_dataset(run: Path, metrics: dict, tmp_path: Path,  # metrics: T fitted
                                                  caplog: pytest.LogCaptureFixture) -> None:
    other = make_aria_dataset(tmp_path / "copy", per_class=12, size=48, seed=5, segmented=False)
    card_temperature = load_model(run)[1].temperature
    with caplog.at_level("WARNING", logger="bloodcell.data.splits"):
        result = evaluate_model(run, other, split="all", robustness=False, explain=False, progress=False,
                                n_bootstrap=50)  # fmt: skip
    # No split is used to score every image: its warnings (the audit's split included) would mislead.
    assert not [r for r in caplog.records if r.name == "bloodcell.data.splits"], caplog.text
    assert result["n_images"] == 48
    assert "--split all" not in evaluated_scope(result, "copy")
    assert "--split all scores every image" in evaluated_scope({**result, "evaluation": {"split": "test"}}, "copy")
    assert result["temperature_source"] == "model card"  # another dataset never refits the model's temperature
    assert result["temperature"] == pytest.approx(card_temperature)
    assert result["data"]["same_as_training"] is False
    assert Path(result["out_dir"]).parent == run / "evaluations"
    assert re.fullmatch(r"copy-[0-9a-f]{8}-all", Path(result["out_dir"]).name)


def test_a_model_trained_with_class_names_on_a_folder_of_some_of_them(run: Path, tmp_path: Path,
                                                                       caplog: pytest.LogCaptureFixture) -> None:  # fmt: skip
    """A model trained with --classes asked every one of its names of the folders: a folder of some of them
    (and one it does not know) failed, as a model without names no longer does."""
    import shutil

    named = tmp_path / "named"
    shutil.copytree(run / "checkpoints" / "best", named)
    card = json.loads((named / "card.json").read_text())
    card["config"]["data"]["class_names"] = ["Benign", "Early Pre-B", "Pre-B", "Pro-B"]
    (named / "card.json").write_text(json.dumps(card))
    other = make_aria_dataset(tmp_path / "copy", per_class=12, size=48, seed=6, segmented=False) / "Original"
    lab = tmp_path / "lab"
    for source, name in (("Benign", "Benign"), ("Pro", "Pro-B"), ("Pre", "other")):
        shutil.copytree(other / source, lab / name)
    with caplog.at_level("WARNING"):
        result = evaluate_model(named, lab, split="all", robustness=False, explain=False, progress=False, n_bootstrap=20)
    assert [name for name, row in result["per_class"].items() if row["support"]] == ["Benign", "Pro-B"]
    assert result["data"]["folders_left_out"] == {"other": 12} and "no folder holds Early Pre-B, Pre-B" in caplog.text


def test_a_quiet_look_at_the_data_leaves_their_warnings_to_the_evaluation(tmp_path: Path,
                                                                          caplog: pytest.LogCaptureFixture) -> None:  # fmt: skip
    """The look that matches a model's classes to the folders is quieted; the warnings it would give were
    counted as given, and the evaluation's own look then said nothing of a stray image."""
    from bloodcell.data.layouts import find_dataset
    from bloodcell.evaluate.runner import _found_or_none

    lab = make_aria_dataset(tmp_path / "copy", per_class=3, size=32, segmented=False) / "Original"
    (lab / "stray.jpg").write_bytes((lab / "Pro" / "WBC-Malignant-Pro-001.jpg").read_bytes())
    assert _found_or_none(lab, "Original") is not None
    with caplog.at_level("WARNING"):
        find_dataset(lab)
    assert "stray.jpg not used" in caplog.text


def test_a_model_trained_with_class_names_on_a_folder_of_one_of_them(run: Path, tmp_path: Path) -> None:
    """Names that are no canonical classes, and one folder: no layout without the names, so its folders are
    matched to them directly (every name was asked of the folders, and the others failed)."""
    import shutil

    named = tmp_path / "named"
    shutil.copytree(run / "checkpoints" / "best", named)
    card = json.loads((named / "card.json").read_text())
    card["classes"] = card["config"]["data"]["class_names"] = ["normal", "hematogones", "x", "y"]
    (named / "card.json").write_text(json.dumps(card))
    other = make_aria_dataset(tmp_path / "copy", per_class=8, size=48, seed=7, segmented=False) / "Original"
    shutil.copytree(other / "Benign", tmp_path / "lab" / "normal")
    result = evaluate_model(named, tmp_path / "lab", split="all", robustness=False, explain=False, progress=False,
                            n_bootstrap=20)  # fmt: skip
    assert [name for name, row in result["per_class"].items() if row["support"]] == ["normal"]


def test_another_labs_folders_with_one_class_the_model_lacks(run: Path, tmp_path: Path,
                                                              caplog: pytest.LogCaptureFixture) -> None:  # fmt: skip
    """Folders named the lab's way, and a "normal/" class the model does not know: the model's classes are
    matched by alias, the extra folder is named and left out (all five used to be taken as unknown classes)."""
    import shutil

    other = make_aria_dataset(tmp_path / "copy", per_class=12, size=48, seed=5, segmented=False) / "Original"
    lab = tmp_path / "lab"
    for source, name in zip(("Benign", "Early", "Pre", "Pro"), ("hematogones", "early_preB", "preB", "proB")):
        shutil.copytree(other / source, lab / name)
    (lab / "normal").mkdir()  # two images: too few to split as a class of their own, which it is not
    for image in sorted((other / "Pro").glob("*.jpg"))[:2]:
        shutil.copy(image, lab / "normal" / image.name)
    with caplog.at_level("WARNING"):
        result = evaluate_model(run, lab, split="all", robustness=False, explain=False, progress=False, n_bootstrap=20)
    assert result["n_images"] == 48  # normal/'s copies of proB/ images are not counted twice
    assert "Benign = hematogones/" in caplog.text and "normal/ not used" in caplog.text
    # The folder left out is recorded and named where the scope is said, not "every image of lab".
    assert result["data"]["folders_left_out"] == {"normal": 2}
    assert evaluated_scope(result, "lab") == "every image of lab, not normal/ (2 images: a class the model does not know)"

    # Some of the model's classes beside a folder it does not know: the others are absent, as on a folder of
    # some of the classes without one (the model's 4 classes used to be asked of the folders, and failed).
    shutil.rmtree(lab / "early_preB")
    shutil.rmtree(lab / "preB")
    caplog.clear()
    with caplog.at_level("WARNING"):
        result = evaluate_model(run, lab, split="all", robustness=False, explain=False, progress=False, n_bootstrap=20)
    assert result["n_images"] == 24 and result["classes"] == ["Benign", "Early Pre-B", "Pre-B", "Pro-B"]
    assert [name for name, row in result["per_class"].items() if row["support"]] == ["Benign", "Pro-B"]
    assert "no folder holds Early Pre-B, Pre-B" in caplog.text


def test_every_image_of_data_too_few_to_split_is_scored_in_its_blocks(run: Path, tmp_path: Path) -> None:
    """Another lab's two patients of a class: `--split all` needs no parts, yet rebuilding the split refused
    the data ("gives only 2 session block(s)"), while one patient a class, or three, was scored."""
    from bloodcell.report import build_report

    other = make_aria_dataset(tmp_path / "copy", per_class=12, size=48, seed=8, segmented=False) / "Original"
    lab = tmp_path / "lab"
    for source, patients in (("Benign", ("p1",)), ("Pro", ("p2", "p3"))):
        images = sorted((other / source).glob("*.jpg"))
        for k, patient in enumerate(patients):
            (lab / source / patient).mkdir(parents=True)
            for image in images[k::len(patients)]:
                shutil.copy(image, lab / source / patient / image.name)
    with pytest.raises(UserError, match="gives only 2 session block.*; or score every image, which needs no split: add --split all to this command"):
        evaluate_model(run, lab, split="test", robustness=False, explain=False, progress=False, n_bootstrap=20)
    folder = tmp_path / "ev"
    result = evaluate_model(run, lab, split="all", robustness=False, explain=False, progress=False, n_bootstrap=20,
                            out_dir=folder)  # fmt: skip
    assert result["n_images"] == 24 and result["shortcut_baseline"] is None
    assert result["data"]["protocol"] == "none" and "2 sub-folder(s)" in result["data"]["not_split"]
    # the interval's units: Pro-B's two patients a block each, Benign's one folder (no patient told apart)
    # in blocks of the run's size, 4
    split = pd.read_csv(result["data"]["split_summary"]["split"])
    assert split.groupby("block")["path"].agg(lambda paths: {p.split("/")[1] for p in paths}).map(len).eq(1).all()
    assert result["data"]["n_blocks"] == 2 + 12 // 4
    assert "move the images out" not in result["data"]["not_split"]  # the advice for a split is no reason
    assert Path(result["data"]["split_summary"]["split"]).name.startswith("unsplit-")
    html = build_report(folder).read_text(encoding="utf-8")
    assert "Not split: the model's protocol cannot cut these data (class &#39;Pro-B&#39; gives only 2" in html
    assert "Leakage check" not in html  # of no split
    assert result["data"]["split_summary"]["leakage_check"] is None
    assert "The model's protocol cannot cut these data (class 'Pro-B' gives only 2" in (folder / "report.md").read_text()


def test_the_model_s_own_data_that_this_version_cannot_split_are_refused_not_scored_as_held_out(
    run: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Data a model was trained on, cut by older rules that this version cannot apply: scored whole, its
    training images (without a record of them) and their embargo neighbours counted as held out."""
    from bloodcell.data import prepare, splits

    def too_few(*args: object, **kwargs: object) -> None:
        raise splits.TooFewToSplit("class 'Benign' gives only 2 session block(s)", "add images")

    monkeypatch.setattr(prepare, "make_split", too_few)
    # --split test says so too, rather than pointing at --split all, which would refuse them
    for split in ("all", "test"):
        with pytest.raises(UserError, match="trained on these data, but this version of bloodcell cannot split them"):
            evaluate_model(run, split=split, robustness=False, explain=False, progress=False, n_bootstrap=20)


def test_folders_of_none_of_the_model_s_classes_are_a_clear_error(run: Path, tmp_path: Path) -> None:
    other = make_aria_dataset(tmp_path / "copy", per_class=8, size=48, seed=5, segmented=False) / "Original"
    for source, name in zip(("Benign", "Pro"), ("normal", "reactive")):
        shutil.copytree(other / source, tmp_path / "lab" / name)
    with pytest.raises(UserError, match="no folder under .*lab is one of the model's classes .*folders there: normal, reactive"):
        evaluate_model(run, tmp_path / "lab", split="all", robustness=False, explain=False, progress=False, n_bootstrap=20)


def test_the_scope_names_the_folders_of_classes_the_model_does_not_know() -> None:
    metrics = {"evaluation": {"split": "all"},
               "data": {"training_images_left_out": 3, "folders_left_out": {"PreB": 12, "early_pre_b": 12}}}  # fmt: skip
    assert evaluated_scope(metrics, "a") == ("every image of a, not PreB/, early_pre_b/ (24 images: classes the model "
                                             "does not know), less the 3 images the model trained on or copies or "
                                             "capture-order neighbours of them")  # fmt: skip
    test_part = {**metrics, "evaluation": {"split": "test"}}
    assert "not PreB/, early_pre_b/ (24 images in all: classes" in evaluated_scope(test_part, "a")
    older = {"evaluation": {"split": "all"}, "data": {"training_images_left_out": 0}}  # a metrics.json before it
    assert evaluated_scope(older, "a") == "every image of a"


def files_trained_on(root: Path, trained: list[str]) -> int:
    """How many of the Original files under ``root`` have the bytes of a training image (copies included)."""
    return sum(hashlib.sha256(path.read_bytes()).hexdigest() in set(trained) for path in (root / "Original").rglob("*.jpg"))


def test_changed_data_leave_out_the_images_the_model_trained_on(
    run: Path, dataset: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """With files added the split is rebuilt differently: the training images must not be scored."""
    changed = tmp_path / "changed"
    shutil.copytree(dataset, changed)
    Image.new("RGB", (48, 48), (120, 60, 150)).save(changed / "Original" / "Pro" / "WBC-Malignant-Pro-900.jpg")
    trained = (run / "trained-on.sha256").read_text().split()
    with caplog.at_level("WARNING", logger="bloodcell.evaluate.runner"):
        result = evaluate_model(run, changed, split="all", robustness=False, explain=False, progress=False, n_bootstrap=50)
    assert result["data"]["same_as_training"] is False
    left_out = files_trained_on(dataset, trained)  # byte copies too; and their capture-order neighbours
    assert result["data"]["training_images_left_out"] > left_out > len(trained) > 0
    assert result["n_images"] == 4 * 24 + 1 - result["data"]["training_images_left_out"]
    assert any("the model was trained on, or copies or capture-order neighbours" in r.getMessage() for r in caplog.records)

    unrecorded = tmp_path / "unrecorded"
    shutil.copytree(run, unrecorded)
    (unrecorded / "trained-on.sha256").unlink()
    caplog.clear()
    with caplog.at_level("WARNING", logger="bloodcell.evaluate.runner"):
        result = evaluate_model(unrecorded, changed, split="all", robustness=False, explain=False, progress=False, n_bootstrap=50)
    assert result["data"]["training_images_left_out"] is None and result["n_images"] == 4 * 24 + 1
    assert any("no record of its training images" in r.getMessage() for r in caplog.records)


def test_a_re_encoded_copy_of_the_data_still_leaves_out_the_training_images(run: Path, dataset: Path, tmp_path: Path) -> None:
    """Re-saved at another JPEG quality every file has other bytes; its perceptual hash still names the picture."""
    copy = tmp_path / "re-encoded"
    shutil.copytree(dataset, copy)
    for path in (copy / "Original").rglob("*.jpg"):
        with Image.open(path) as image:
            image.convert("RGB").save(path, quality=70)
    trained = (run / "trained-on.sha256").read_text().split()
    assert len((run / "trained-on.phash").read_text().split()) > 0
    result = evaluate_model(run, copy, split="all", robustness=False, explain=False, progress=False, n_bootstrap=50)
    assert result["data"]["same_as_training"] is False
    left_out = files_trained_on(dataset, trained)  # by their original bytes: none of the copy's match
    assert result["data"]["training_images_left_out"] > left_out > 0  # and their capture-order neighbours
    assert result["n_images"] == 4 * 24 - result["data"]["training_images_left_out"]


def test_split_all_on_its_own_data_leaves_out_the_duplicates_and_the_embargo_of_its_training_images(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A duplicate group's members outside its kept part are left out of the split; --split all would score
    them as unseen while their copy was trained on."""
    import types

    from bloodcell.evaluate.runner import _without_training_images

    split = pd.DataFrame({
        "split": ["train", "embargo", "test", "embargo", "val"],
        "dup_group": [0, 0, 1, 2, 3],
    })  # fmt: skip
    prepared = types.SimpleNamespace(split=split)
    with caplog.at_level("WARNING", logger="bloodcell.evaluate.runner"):
        kept, left_out = _without_training_images(np.arange(5), prepared, None, True, "all", ["train", "val"])
    # The embargoed copy of row 0 goes with it, and so does row 3, embargoed beside a held-out block: a
    # capture-order neighbour of training images, left out of training only to keep the gap.
    assert kept.tolist() == [2] and left_out == 4
    assert "4 of the 5 images are ones the model was trained on, or copies or capture-order neighbours" in caplog.text


def test_other_data_leave_out_the_re_captures_of_trained_fields_and_warn_without_phashes(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """On other data, a trained image's own copy is found by its hashes; a shifted re-capture of it (other
    bytes, another perceptual hash) only by these data's index, which put it in the copy's duplicate group."""
    import types

    from bloodcell.evaluate.runner import _without_training_images
    from bloodcell.models.card import TrainedOn

    split = pd.DataFrame({
        "split": ["test"] * 5,
        "sha256": ["s-trained", "s-other", "s-recapture", "s-fresh", "s-far"],
        "phash": ["0" * 16, "f" * 16, "0f0f0f0f0f0f0f0f", "ff00ff00ff00ff00", "00ff00ff00ff00ff"],
        "dup_group": [0, 1, 0, 2, 3],
    })  # fmt: skip
    prepared = types.SimpleNamespace(split=split)
    trained = TrainedOn(sha256=frozenset({"s-trained"}), phash=("0" * 16,))
    kept, left_out = _without_training_images(np.arange(1, 5), prepared, trained, False, "all", ["train"])
    assert kept.tolist() == [1, 3, 4] and left_out == 1  # row 2, the re-capture of row 0, is left out too
    caplog.clear()
    with caplog.at_level("WARNING", logger="bloodcell.evaluate.runner"):
        kept, _ = _without_training_images(np.arange(5), prepared, TrainedOn(frozenset({"s-trained"})), False, "all",
                                           ["train"])  # fmt: skip
    assert kept.tolist() == [1, 3, 4]
    assert any("no record of its training images' perceptual hashes" in r.getMessage() for r in caplog.records)


def test_near_any_compares_only_across_the_two_lists() -> None:
    from bloodcell.data.index import near_any, phash_distances_below

    rng = np.random.default_rng(0)
    hashes = [f"{v:016x}" for v in rng.integers(0, 2**63, 300)]
    evaluated, references = hashes[:200] + ["0" * 16] * 50, hashes[200:] + ["0" * 15 + "1"]
    i, j = phash_distances_below([*evaluated, *references], 10)
    expected = np.zeros(len(evaluated), bool)
    expected[i[(i < len(evaluated)) & (j >= len(evaluated))]] = True
    assert np.array_equal(near_any(evaluated, references, 10, chunk=7), expected) and expected[-1]
    assert not near_any(evaluated, [], 10).any()


def test_a_model_recorded_before_perceptual_hashes_loads_with_none(tmp_path: Path) -> None:
    from bloodcell.models.card import load_trained_on

    (tmp_path / "trained-on.sha256").write_text("ab\ncd\n")
    record = load_trained_on([tmp_path])
    assert record is not None and record.sha256 == {"ab", "cd"} and record.phash == ()


def test_every_image_of_its_own_data_means_every_image_it_did_not_train_on(run: Path, metrics: dict) -> None:
    from bloodcell.config import load_config
    from bloodcell.data.prepare import prepare_data

    result = evaluate_model(run, split="all", robustness=False, explain=False, progress=False, n_bootstrap=50)
    counts = result["data"]["split_summary"]["counts"]
    split = prepare_data(load_config(str(run / "config.yaml")).data, progress=False).split
    trained = split["split"] == "train"
    copies = split["dup_group"].isin(split["dup_group"][trained]) & ~trained  # left out beside their original
    embargo = (split["split"] == "embargo") & ~copies  # neighbours of trained images, not held out
    left_out = int(trained.sum() + copies.sum() + embargo.sum())
    assert copies.sum() > 0 and embargo.sum() > 0  # the toy data hold both
    assert counts["train"]["total"] == trained.sum()
    assert result["data"]["training_images_left_out"] == left_out
    assert result["n_images"] == len(split) - left_out
    # The validation images are among those scored, and the card's temperature was fitted on them.
    assert result["temperature_source"] == "model card, fitted on the validation images among these (partly in-sample)"
    scope = f"less the {left_out} images the model trained on or copies or capture-order neighbours of them"
    assert evaluated_scope(result, "aria") == f"every image of aria, {scope}"
    table = "".join(str(t.title) for t in summary_tables(result))
    assert scope in table


def test_the_validation_part_says_its_temperature_was_fitted_on_it(run: Path, metrics: dict, tmp_path: Path) -> None:
    """The card's temperature was fitted on the validation part (by the test evaluation, ``metrics``):
    scored there, its ECE is in-sample. Before any fit the card's T = 1 is named as such."""
    result = evaluate_model(run, split="val", robustness=False, explain=False, progress=False, n_bootstrap=50,
                            update_card=False)  # fmt: skip
    assert result["temperature_source"] == "model card, fitted on these validation images (in-sample)"
    assert result["temperature"] == pytest.approx(metrics["temperature"]) and metrics["temperature"] != 1.0

    unfitted = tmp_path / "unfitted"
    shutil.copytree(run, unfitted)
    card_file = unfitted / "checkpoints" / "best" / "card.json"
    card = json.loads(card_file.read_text())
    card_file.write_text(json.dumps({**card, "temperature": 1.0, "metrics": {}}))
    result = evaluate_model(unfitted, split="val", robustness=False, explain=False, progress=False, n_bootstrap=50,
                            update_card=False)  # fmt: skip
    assert result["temperature_source"] == "model card (never fitted: T = 1)" and result["temperature"] == 1.0
    other = make_aria_dataset(tmp_path / "other", per_class=8, size=48, seed=7, segmented=False)
    result = evaluate_model(unfitted, other, split="all", robustness=False, explain=False, progress=False,
                            n_bootstrap=20, update_card=False)  # fmt: skip
    assert result["temperature_source"] == "model card (never fitted: T = 1)"  # on other data too


def test_a_card_without_a_manifest_hash_is_not_taken_for_its_own_data(run: Path, metrics: dict, tmp_path: Path) -> None:  # metrics: the card's T is fitted
    """Nothing proves the data are its own: no temperature refitted on them, its training record applies."""
    copy = tmp_path / "no-manifest"
    shutil.copytree(run, copy)
    for card_file in (copy / "checkpoints").glob("*/card.json"):
        card = json.loads(card_file.read_text())
        card["manifest_sha256"] = None
        card_file.write_text(json.dumps(card))
    result = evaluate_model(copy, split="test", robustness=False, explain=False, progress=False, n_bootstrap=50,
                            update_card=False)  # fmt: skip
    assert result["data"]["same_as_training"] is False
    assert result["temperature_source"] == "model card"
    # Checked against trained-on.sha256: no test image is a training image; what is left out are capture-order
    # neighbours of a left-out byte copy of one (conservative, as on any other data).
    tested = result["data"]["split_summary"]["counts"]["test"]["total"]
    assert result["n_images"] + result["data"]["training_images_left_out"] == tested
    assert result["data"]["training_images_left_out"] <= 2


def test_cli_evaluate_json_and_table(run: Path) -> None:
    runner = CliRunner()
    result = runner.invoke(app, ["evaluate", str(run), "--split", "val", "--no-robustness", "--no-explain",
                                 "--json", "--no-progress"])  # fmt: skip
    assert result.exit_code == 0, result.output
    payload = json.loads(result.stdout)
    assert payload["evaluation"]["split"] == "val" and payload["robustness"] is None
    table = runner.invoke(app, ["evaluate", str(run), "--split", "val", "--no-robustness", "--no-explain", "--no-progress"])
    assert table.exit_code == 0, table.output
    assert "balanced accuracy" in table.stdout and "Pro-B" in table.stdout
    confident = payload["confident_errors"]
    assert "errors at >= 90 % confidence" in table.stdout
    assert f"{confident['count']} of {confident['errors']}" in table.stdout


def test_cli_explain_writes_overlays(run: Path, dataset: Path, tmp_path: Path) -> None:
    images = sorted((dataset / "Original" / "Pro").glob("*.jpg"))[:2]
    result = CliRunner().invoke(app, ["explain", str(run), *map(str, images), "--out", str(tmp_path / "cams"), "--json"])
    assert result.exit_code == 0, result.output
    rows = json.loads(result.stdout)["images"]
    assert len(rows) == 2 and all(Path(r["overlay"]).is_file() for r in rows)
    # An input that matches nothing keeps its place among the others, as in predict.
    inputs = [str(images[0]), str(tmp_path / "gone.jpg"), str(images[1])]
    result = CliRunner().invoke(app, ["explain", str(run), *inputs, "--out", str(tmp_path / "cams2"), "--json"])
    assert [Path(row["image"]).name for row in json.loads(result.stdout)["images"]] == [Path(i).name for i in inputs]


def test_cli_explain_reports_a_bad_image_and_explains_the_others(run: Path, dataset: Path, tmp_path: Path) -> None:
    folder = tmp_path / "mixed"
    folder.mkdir()
    good = sorted((dataset / "Original" / "Pro").glob("*.jpg"))[0]
    (folder / "good.jpg").write_bytes(good.read_bytes())
    (folder / "cut.jpg").write_bytes(good.read_bytes()[:200])
    (folder / "._good.jpg").write_bytes(b"\x00\x05\x16\x07 macOS resource fork")  # hidden: not an input
    (folder / "notes.txt").write_text("not an image by its suffix: named, as predict does")
    missing = tmp_path / "not-there.jpg"
    result = CliRunner().invoke(app, ["explain", str(run), str(folder), str(missing), "--out", str(tmp_path / "cams"), "--json"])
    assert result.exit_code == 1, result.output
    payload = json.loads(result.stdout)
    assert [Path(name).name for name in payload["skipped"]] == ["notes.txt"]
    rows = {Path(row["image"]).name: row for row in payload["images"]}
    assert set(rows) == {"good.jpg", "cut.jpg", "not-there.jpg"} and payload["n_failed"] == 2
    assert "no such file" in rows["not-there.jpg"]["error"]
    assert rows["good.jpg"]["error"] is None and Path(rows["good.jpg"]["overlay"]).is_file()
    assert "truncated" in rows["cut.jpg"]["error"] and rows["cut.jpg"]["overlay"] is None
    # The table, piped: paths wrapped, not cut short, where the overlays went, and the skipped file.
    result = CliRunner().invoke(app, ["explain", str(run), str(folder), "--out", str(tmp_path / "cams")], env={"COLUMNS": "80"})
    assert "\u2026" not in result.stdout
    assert f"1 overlay(s) written to {tmp_path / 'cams'}/; 1 image(s) failed" in result.stdout
    assert "skipped 1 file(s)" in result.stderr and "notes.txt" in result.stderr


def test_cli_explain_into_the_images_folder_again_skips_the_earlier_overlays(run: Path, dataset: Path,
                                                                            tmp_path: Path) -> None:
    folder = tmp_path / "exu"
    folder.mkdir()
    (folder / "a.jpg").write_bytes(sorted((dataset / "Original" / "Pro").glob("*.jpg"))[0].read_bytes())
    for _ in range(2):
        result = CliRunner().invoke(app, ["explain", str(run), str(folder), "--out", str(folder)])
        assert result.exit_code == 0, result.output
    assert f"1 overlay(s) written to {folder}/; 1 earlier overlay(s) skipped" in result.stdout
    assert sorted(p.name for p in folder.iterdir()) == ["a.gradcam.png", "a.jpg"]


def _another_run(run: Path, folder: Path) -> Path:
    """A copy of ``run`` whose model is another (its weights changed: only hashed, never loaded here)."""
    shutil.copytree(run, folder)
    with (folder / "checkpoints" / "best" / "model.safetensors").open("ab") as weights:
        weights.write(b"\0")
    return folder


def test_evaluate_out_refuses_another_model_s_run_or_evaluation(run: Path, tmp_path: Path) -> None:
    other = _another_run(run, tmp_path / "m2")
    with pytest.raises(UserError, match=r"m2 is the folder of another training run .*choose another --out"):
        evaluate_model(run, out_dir=other, robustness=False, explain=False, progress=False)
    folder = tmp_path / "ev"
    folder.mkdir()
    (folder / "metrics.json").write_text(json.dumps({"model": {"path": str(other / "checkpoints" / "best")}}))
    with pytest.raises(UserError, match=r"ev/metrics.json is the evaluation of another model .*m2"):
        evaluate_model(run, out_dir=folder, robustness=False, explain=False, progress=False)
    assert json.loads((folder / "metrics.json").read_text())["model"]["path"].endswith("best")  # left as it was
    assert not (folder / "plots").exists()


def test_evaluate_into_a_copy_of_its_run_says_its_reports_are_stale(run: Path, tmp_path: Path) -> None:
    copy = tmp_path / "m1c"
    shutil.copytree(run, copy)  # the same model's run: allowed
    (copy / "report.html").write_text("<html>the previous evaluation</html>")
    result = CliRunner().invoke(app, ["evaluate", str(run), "--out", str(copy), "--no-robustness", "--no-explain",
                                      "--no-progress"])  # fmt: skip
    assert result.exit_code == 0, result.output
    assert (f"report.html in {copy} describes the previous evaluation; rebuild it with: bloodcell report {copy}"
            in result.stderr)  # fmt: skip
    assert json.loads((copy / "metrics.json").read_text())["model"]["weights_sha256"]


def test_cli_explain_with_only_a_model_is_a_user_error(run: Path) -> None:
    result = CliRunner().invoke(app, ["explain", str(run)])
    assert result.exit_code != 0
    assert "no images were given" in str(result.exception)


def test_results_of_a_model_outside_a_run_go_under_evaluations_once(run: Path, tmp_path: Path) -> None:
    from bloodcell.evaluate.runner import default_out_dir
    from bloodcell.models.card import bundled_model_dir

    _, card = load_model(run)
    model_dir = tmp_path / "model"  # a model folder that is not inside a run
    model_dir.mkdir()
    digest = hashlib.sha256(str(Path("aria").resolve()).encode()).hexdigest()[:8]
    # Named with a hash of the model folder's path: a model of one's own named "default", as every model of
    # the default config is, wrote over the bundled model's results.
    own = Path("evaluations") / f"{card.name}-{hashlib.sha256(str(model_dir.resolve()).encode()).hexdigest()[:8]}"
    assert default_out_dir(model_dir, card, "test", True, Path("aria")) == own
    assert default_out_dir(model_dir, card, "val", True, Path("aria")) == own / f"aria-{digest}-val"
    bundled = bundled_model_dir()
    assert default_out_dir(bundled, card, "val", False, Path("aria")) == Path("evaluations") / card.name / f"aria-{digest}-val"
    best = run / "checkpoints" / "best"
    assert default_out_dir(best, card, "test", True, Path("aria")) == run  # its own test part: the run itself
    assert default_out_dir(best, card, "val", True, Path("aria")) == run / "evaluations" / f"aria-{digest}-val"


def test_two_data_folders_of_one_name_get_results_folders_of_their_own(run: Path, tmp_path: Path) -> None:
    """lab1/a and lab2/a: both used to write RUN/evaluations/a-all, the second over the first."""
    from bloodcell.evaluate.runner import default_out_dir

    _, card = load_model(run)
    best = run / "checkpoints" / "best"
    first, second = (default_out_dir(best, card, "all", False, tmp_path / lab / "a") for lab in ("lab1", "lab2"))
    assert first != second and first.parent == second.parent == run / "evaluations"
    assert re.fullmatch(r"a-[0-9a-f]{8}-all", first.name) and re.fullmatch(r"a-[0-9a-f]{8}-all", second.name)
    assert default_out_dir(best, card, "all", False, tmp_path / "lab1" / "x" / ".." / "a") == first  # one folder, one name


def test_an_evaluation_whose_grad_cam_cannot_run_keeps_its_scores(run: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from bloodcell.errors import NoFeatureMap, UserError
    from bloodcell.evaluate import runner

    def no_feature_map(*args, **kwargs):
        raise NoFeatureMap("Net: no convolutional feature map found for Grad-CAM")

    monkeypatch.setattr(runner, "explain_examples", no_feature_map)
    result = evaluate_model(run, split="val", robustness=False, progress=False, n_bootstrap=50, update_card=False)
    assert result["explain"] is None and 0 <= result["balanced_accuracy"] <= 1
    # Any other error is the caller's to see, before the work: a misspelt method is not "no Grad-CAM".
    with pytest.raises(UserError, match="unknown CAM method 'grad-cam'"):
        evaluate_model(run, split="val", robustness=False, progress=False, cam_method="grad-cam", update_card=False)
    with pytest.raises(UserError, match="no layer 'stages.9'"):
        evaluate_model(run, split="val", robustness=False, progress=False, target_layer="stages.9", update_card=False)


def test_the_sanity_check_and_grid_map_the_layer_asked_for(run: Path, tmp_path: Path) -> None:
    """An earlier stage gives a finer map; the report says which layer and how fine."""
    result = evaluate_model(run, split="val", robustness=False, progress=False, n_bootstrap=50, update_card=False,
                            target_layer="stages.1", out_dir=tmp_path)  # fmt: skip
    assert result["explain"]["target_layer"] == "stages.1" and result["explain"]["map_size"] == [6, 6]
    assert (tmp_path / "plots" / "gradcam_grid.png").is_file()


def test_the_test_part_is_rebuilt_with_the_split_seed_the_model_trained_with(dataset: Path, tmp_path: Path) -> None:
    """Another split seed draws other test blocks: rebuilt with seed 0, a seed-3 model's "test" part would
    hold images it trained on."""
    from bloodcell.config import load_config
    from bloodcell.data.prepare import prepare_data

    run = make_run(dataset, tmp_path / "seed3", data={"split_seed": 3})
    result = evaluate_model(run, robustness=False, explain=False, progress=False, n_bootstrap=50, update_card=False)
    scored = pd.read_csv(run / "predictions.csv")["path"]
    prepared = prepare_data(load_config(str(run / "config.yaml")).data, progress=False)
    test_part = prepared.split.iloc[prepared.indices("test")]
    assert sorted(scored) == sorted(test_part["path"]) and result["n_images"] == len(test_part)
    trained = set((run / "trained-on.sha256").read_text().split())
    by_path = prepared.split.set_index("path")["sha256"]
    assert not trained & set(by_path[scored]), "a training image was scored as held-out"
    default_seed = prepare_data(load_config(str(run / "config.yaml")).data.model_copy(update={"split_seed": 0}),
                                progress=False)  # fmt: skip
    assert set(default_seed.split.iloc[default_seed.indices("test")]["path"]) != set(scored)  # the seed matters here


def test_the_robustness_suite_scores_the_shifted_images() -> None:
    """A "model" that reads the mean brightness of the first channel: every shift that changes it must
    change its score, and severity 0 is the clean score."""
    from bloodcell.evaluate.runner import robustness_suite

    rng = np.random.default_rng(0)
    images = rng.integers(60, 200, size=(40, 24, 24, 3), dtype=np.uint8)
    y_true = (images[..., 0].mean(axis=(1, 2)) > images[..., 0].mean()).astype(int)

    def brightness_reader(batch: np.ndarray) -> np.ndarray:
        level = batch[..., 0].reshape(len(batch), -1).mean(axis=1) - images[..., 0].mean()
        return np.stack([-level, level, -100 + 0 * level, -100 + 0 * level], axis=1)

    suite = robustness_suite(brightness_reader, images, y_true, None, 4, 1.0, n_bootstrap=20, shifts=["brightness_contrast"])
    rows = suite["shifts"]["brightness_contrast"]
    assert rows[0]["balanced_accuracy"] == 1.0 == suite["clean"]["balanced_accuracy"]
    assert rows[3]["balanced_accuracy"] < 1.0  # the dimmed images are read as the dark class
    # Two of the model's four classes among the images: a constant guess scores 0.5 on them, not 0.25.
    assert suite["chance"] == 0.5


def test_the_shortcut_baseline_is_fitted_on_the_training_part(run: Path, metrics: dict) -> None:
    from bloodcell.config import load_config
    from bloodcell.data.audit import border_colour_baseline
    from bloodcell.data.prepare import prepare_data

    prepared = prepare_data(load_config(str(run / "config.yaml")).data, progress=False)
    expected = border_colour_baseline(prepared.images, prepared.labels, prepared.indices("train"), prepared.indices("test"))
    assert metrics["shortcut_baseline"]["balanced_accuracy"] == pytest.approx(expected["balanced_accuracy"])
    assert metrics["shortcut_baseline"]["scored_on"] == "test"


def test_the_grid_title_survives_random_maps_without_energy(run: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Flat random-weights maps leave their energy share undefined (None); the grid is still drawn."""
    from bloodcell.explain import gradcam

    real_check = gradcam.sanity_check

    def flat_random_maps(*args, **kwargs):
        return {**real_check(*args, **kwargs), "random_energy_on_cell": None, "random_energy_to_area_ratio": None}

    monkeypatch.setattr(gradcam, "sanity_check", flat_random_maps)
    result = evaluate_model(run, split="val", robustness=False, progress=False, n_bootstrap=50, update_card=False)
    assert result["explain"]["random_energy_on_cell"] is None and result["explain"]["cam_energy_on_cell"] is not None


def test_the_grid_rows_of_classes_without_images_say_so(run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A folder of two of the model's four classes: the other two rows are empty for want of images, not
    "no correct prediction" / "no mistake"."""
    from bloodcell.report import plots

    other = make_aria_dataset(tmp_path / "copy", per_class=8, size=48, seed=5, segmented=False) / "Original"
    for source, name in zip(("Benign", "Pro"), ("benign", "pro-b")):
        shutil.copytree(other / source, tmp_path / "two" / name)
    drawn = {}
    monkeypatch.setattr(plots, "plot_gradcam_grid", lambda rows, path, title: drawn.update(rows))
    evaluate_model(run, tmp_path / "two", split="all", robustness=False, out_dir=tmp_path / "ev", progress=False,
                   n_bootstrap=20, update_card=False)  # fmt: skip
    captions = {name: {e["caption"] for e in examples if e["overlay"] is None} for name, examples in drawn.items()}
    assert captions["Early Pre-B"] == captions["Pre-B"] == {"no images of this class"}
    assert "no images of this class" not in captions["Benign"] | captions["Pro-B"]


def test_the_summary_names_where_the_grad_cam_maps_look() -> None:
    from rich.console import Console

    explain = {"target_layer": "stages.1", "energy_to_area_ratio": 1.87, "favours_cell": True, "passed": True}
    metrics = json.loads((Path(__file__).parents[1] / "benchmarks" / "records" / "cpu"
                          / "bundled-evaluate-stages1-13.json").read_text())  # fmt: skip
    console = Console(width=200, record=True)
    for table in summary_tables({**metrics, "explain": {**metrics["explain"], **explain}}):
        console.print(table)
    text = console.export_text()
    assert "Grad-CAM energy on stained cells / their area (layer stages.1)" in text
    assert "1.870" in text and "favours the cells; sanity check passed" in text


def test_the_robustness_suite_shifts_a_chunk_at_a_time_with_the_same_scores(monkeypatch: pytest.MonkeyPatch) -> None:
    """Shifted in chunks (memory stays bounded on a large test part), every image gets what it got whole."""
    from bloodcell.evaluate import runner
    from bloodcell.evaluate.shifts import SHIFTS

    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, size=(23, 16, 16, 3), dtype=np.uint8)
    y_true = np.arange(23) % 4
    seen: list[int] = []

    def reader(batch: np.ndarray) -> np.ndarray:
        seen.append(len(batch))
        return batch.reshape(len(batch), -1, 4).astype(np.float64).mean(axis=1)

    whole = runner.robustness_suite(reader, images, y_true, None, 4, 1.0, n_bootstrap=10)
    monkeypatch.setattr(runner, "SHIFT_CHUNK", 5)
    seen.clear()
    chunked = runner.robustness_suite(reader, images, y_true, None, 4, 1.0, n_bootstrap=10)
    assert max(seen) == 23 and sorted(set(seen)) == [3, 5, 23]  # the clean pass whole, the shifts in fives
    assert chunked == whole and set(whole["shifts"]) == set(SHIFTS)


def test_its_own_data_split_otherwise_than_in_training_still_leaves_out_what_it_trained_on(
    run: Path, dataset: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A newer bloodcell may split the same data otherwise (it did, when joined blocks began to be held out
    together): test images the model's record names as trained on are left out, with a warning."""
    from bloodcell.config import load_config
    from bloodcell.data.index import build_index
    from bloodcell.data.splits import make_split

    settings = load_config(str(run / "config.yaml")).data  # the run's block size and embargo
    split = make_split(build_index(dataset, progress=False).manifest, "session", settings.split_seed,
                       block_size=settings.block_size, embargo=settings.embargo)  # fmt: skip
    test_hashes = split.loc[split["split"] == "test", "sha256"].tolist()
    older = tmp_path / "older"
    shutil.copytree(run, older)
    with (older / "trained-on.sha256").open("a") as record:
        record.write("\n".join(test_hashes[:3]) + "\n")
    with caplog.at_level("WARNING", logger="bloodcell.evaluate.runner"):
        result = evaluate_model(older, robustness=False, explain=False, progress=False, n_bootstrap=20)
    assert result["data"]["same_as_training"] is True
    left_out = sum(split.loc[split["split"] == "test", "sha256"].isin(test_hashes[:3]))
    assert result["data"]["training_images_left_out"] == left_out >= 3
    assert result["n_images"] == len(test_hashes) - left_out
    assert "splits the data differently from the one that trained it" in caplog.text
    # --split all leaves them out too, with the parts the present split says it trained on
    every = evaluate_model(older, split="all", robustness=False, explain=False, progress=False, n_bootstrap=20)
    plain = evaluate_model(run, split="all", robustness=False, explain=False, progress=False, n_bootstrap=20,
                           out_dir=tmp_path / "plain")  # fmt: skip
    assert every["n_images"] == plain["n_images"] - left_out


def test_a_refit_model_s_validation_part_is_scored_not_taken_for_a_changed_split(
    run: Path, dataset: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A model refit on train + val records its validation images as trained on: that is no sign that the
    split rules changed, and --split val must score them (with its in-sample warning), not crash on nothing."""
    from bloodcell.config import load_config
    from bloodcell.data.index import build_index
    from bloodcell.data.splits import make_split

    settings = load_config(str(run / "config.yaml")).data  # the run's block size and embargo
    split = make_split(build_index(dataset, progress=False).manifest, "session", settings.split_seed,
                       block_size=settings.block_size, embargo=settings.embargo)  # fmt: skip
    refit = tmp_path / "refit"
    shutil.copytree(run, refit)
    card_path = refit / "checkpoints" / "best" / "card.json"
    card = json.loads(card_path.read_text())
    card["split"]["trained_on"] = ["train", "val"]
    card_path.write_text(json.dumps(card))
    with (refit / "trained-on.sha256").open("a") as record:
        record.write("\n".join(split.loc[split["split"] == "val", "sha256"]) + "\n")
    result = evaluate_model(refit, split="val", robustness=False, explain=False, progress=False, n_bootstrap=20)
    assert result["n_images"] == int((split["split"] == "val").sum())
    assert "splits the data differently" not in caplog.text


def test_a_run_whose_data_moved_is_told_to_point_at_them(run: Path, tmp_path: Path) -> None:
    moved = tmp_path / "moved"
    shutil.copytree(run, moved)
    for card_path in moved.glob("checkpoints/*/card.json"):  # the config evaluate reads is the card's
        card = json.loads(card_path.read_text())
        card["config"]["data"]["root"] = str(tmp_path / "gone")
        card_path.write_text(json.dumps(card))
    with pytest.raises(UserError, match=r"no longer at .*gone .*pass --data DATA"):
        evaluate_model(moved, robustness=False, explain=False, progress=False, n_bootstrap=20)
