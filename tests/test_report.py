"""``build_report``: a self-contained report.html and report.md from a tiny run, and the browser check."""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from bloodcell.cli import app
from bloodcell.errors import UserError
from bloodcell.report import build_report
from conftest import make_aria_dataset
from eval_support import make_run

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
    "--disable-sync", "--no-first-run",
]  # fmt: skip


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder of two runs: ``toy`` (bloodnet) and a sibling ``seed`` trained with the seed-replica config name."""
    dataset = make_aria_dataset(tmp_path_factory.mktemp("report-data") / "aria", per_class=24, size=48)
    folder = tmp_path_factory.mktemp("report-runs")
    make_run(dataset, folder / "toy")
    make_run(dataset, folder / "seed", name="seed-replica", architecture="seed-cnn",
             arch_kwargs={"channels": [8, 8, 8, 8], "dense": 16}, steps=10)  # fmt: skip
    return folder


@pytest.fixture(scope="module")
def report(runs: Path) -> Path:
    # The baseline is evaluated first (as its own training would have done); the report finds it by name.
    build_report(runs / "seed")
    return build_report(runs / "toy")


def test_report_is_self_contained_html_with_every_section(report: Path) -> None:
    html = report.read_text(encoding="utf-8")
    assert report.name == "report.html"
    for section in ("summary", "data", "split", "training", "metrics", "calibration", "robustness", "gradcam",
                    "comparison", "card"):  # fmt: skip
        assert f'id="{section}"' in html, section
    assert html.count("data:image/png;base64,") >= 7
    # Nothing is fetched from anywhere: no external URLs in src/href, no scripts.
    assert not re.search(r'(src|href)="(https?:|//|file:)', html)
    assert "<script" not in html
    assert "Not a medical device" in html or "not a medical device" in html
    assert "Leakage check passed" in html
    assert "Corners: does the model read a drawn scale bar or label?" in html


def test_report_compares_with_the_seed_replica_sibling(report: Path, runs: Path) -> None:
    html = report.read_text(encoding="utf-8")
    assert "seed-replica (seed-cnn, seed)" in html
    assert str(runs / "seed") in html


def test_a_baseline_scored_on_other_images_is_not_compared(runs: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    from bloodcell.evaluate.runner import evaluate_model

    for name in ("toy", "seed"):
        shutil.copytree(runs / name, tmp_path / name)
    evaluate_model(tmp_path / "seed", split="val", out_dir=tmp_path / "seed", robustness=False, explain=False,
                   progress=False, n_bootstrap=50, update_card=False)  # fmt: skip
    with caplog.at_level("WARNING", logger="bloodcell.report.html"):
        html = build_report(tmp_path / "toy", baseline=tmp_path / "seed", progress=False).read_text(encoding="utf-8")
    assert "seed-replica (seed-cnn" not in html
    assert "was evaluated on other images" in caplog.text


def test_a_sibling_baseline_that_cannot_be_evaluated_again_is_left_out(runs: Path, tmp_path: Path, caplog) -> None:
    """Found by itself, an old seed-replica run whose checkpoints are gone must not sink the whole report."""
    for name in ("toy", "seed"):
        shutil.copytree(runs / name, tmp_path / name)
    if not (tmp_path / "seed" / "metrics.json").is_file():
        build_report(tmp_path / "seed")
    old = json.loads((tmp_path / "seed" / "metrics.json").read_text())
    (tmp_path / "seed" / "metrics.json").write_text(json.dumps({**old, "format": "bloodcell-metrics/1"}))
    shutil.rmtree(tmp_path / "seed" / "checkpoints")
    with caplog.at_level("WARNING", logger="bloodcell.report.html"):
        html = build_report(tmp_path / "toy", progress=False).read_text(encoding="utf-8")
    assert "seed-replica (seed-cnn" not in html and "baseline" in caplog.text and "left out" in caplog.text
    with pytest.raises((UserError, FileNotFoundError), match="no model found"):  # named by the user: theirs to see
        build_report(tmp_path / "toy", baseline=tmp_path / "seed", progress=False)


def test_a_baseline_of_another_split_seed_is_not_compared(runs: Path, tmp_path: Path, caplog) -> None:
    """Same part, same data, perhaps the same count, but other images: not comparable."""
    dataset = Path(yaml.safe_load((runs / "toy" / "config.yaml").read_text())["data"]["root"])
    shutil.copytree(runs / "toy", tmp_path / "toy")
    make_run(dataset, tmp_path / "seed", name="seed-replica", architecture="seed-cnn",
             arch_kwargs={"channels": [8, 8, 8, 8], "dense": 16}, steps=5, data={"split_seed": 6})  # fmt: skip
    build_report(tmp_path / "seed", progress=False)
    with caplog.at_level("WARNING", logger="bloodcell.report.html"):
        html = build_report(tmp_path / "toy", baseline=tmp_path / "seed", progress=False).read_text(encoding="utf-8")
    assert "seed-replica (seed-cnn" not in html and "was evaluated on other images" in caplog.text


def test_markdown_summary_beside_it(report: Path) -> None:
    markdown = report.with_name("report.md").read_text(encoding="utf-8")
    assert markdown.startswith("# bloodcell evaluation report")
    assert "| balanced accuracy (95 % CI) |" in markdown
    assert "](plots/confusion_matrix.png)" in markdown
    assert "| errors at >= 90 % confidence (after temperature) |" in markdown
    assert "&amp;" not in markdown  # Markdown is not HTML-escaped


def test_report_cli_with_explicit_baseline(runs: Path) -> None:
    result = CliRunner().invoke(app, ["report", str(runs / "seed"), "--baseline", str(runs / "toy"), "--no-progress"])
    assert result.exit_code == 0, result.output
    assert "report.html" in result.stdout


def test_report_reads_the_card_from_any_working_folder(runs: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from bloodcell.evaluate.runner import evaluate_model

    run = tmp_path / "toy"
    shutil.copytree(runs / "toy", run)
    monkeypatch.chdir(tmp_path)
    evaluate_model(Path("toy"), robustness=False, explain=False, progress=False, n_bootstrap=20)  # a relative path
    monkeypatch.chdir("/")
    html = build_report(run, evaluate=False).read_text(encoding="utf-8")
    assert "manifest sha256 not recorded" not in html


def test_report_embeds_only_pngs_inside_the_run(runs: Path, tmp_path: Path) -> None:
    """A metrics.json naming files elsewhere must not get them embedded in a report that is mailed around."""
    import json

    run = tmp_path / "toy"
    shutil.copytree(runs / "toy", run)
    if not (run / "metrics.json").is_file():
        build_report(run)
    secret = tmp_path / "secret.txt"
    secret.write_text("secret-token-123")
    metrics = json.loads((run / "metrics.json").read_text())
    metrics["plots"]["roc"] = "../secret.txt"
    metrics["plots"]["confusion_matrix"] = str(secret)
    (run / "metrics.json").write_text(json.dumps(metrics))
    # and the plots the report finds by name, linked to a file outside the run
    for name in ("gradcam_grid.png", "training_curves.png"):
        (run / "plots" / name).unlink(missing_ok=True)
        (run / "plots" / name).symlink_to(secret)
    (run / "history.csv").touch()  # older than the link, so the curves are not drawn again over it
    import os

    os.utime(run / "history.csv", (0, 0))
    html = build_report(run, evaluate=False).read_text(encoding="utf-8")
    assert base64.b64encode(b"secret-token-123").decode() not in html


def test_a_kfold_run_is_reported_on_its_held_out_fold(runs: Path, tmp_path: Path) -> None:
    """A kfold split has no test part: the report evaluates the held-out fold instead of failing."""
    dataset = Path(yaml.safe_load((runs / "toy" / "config.yaml").read_text())["data"]["root"])
    run = make_run(dataset, tmp_path / "kfold", data={"protocol": "kfold", "folds": 3})
    path = build_report(run, progress=False)
    assert path.is_file()
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["evaluation"]["split"] == "val" and metrics["data"]["protocol"] == "kfold"
    # Its checkpoint was chosen on that fold: both formats say the score is optimistic.
    for text in (path.read_text(encoding="utf-8"), (run / "report.md").read_text(encoding="utf-8")):
        assert "scored best on these same validation images, chosen on them" in text
    # Refit on train + val (the default recipe), the model learned the held-out fold too: no report on it.
    refit = make_run(dataset, tmp_path / "kfold-refit", data={"protocol": "kfold", "folds": 3, "train_on": "train+val"})
    with pytest.raises(UserError, match="no held-out images to report on"):
        build_report(refit, progress=False)


def test_a_random_split_and_validation_scores_of_a_refit_model_are_flagged(runs: Path, tmp_path: Path, caplog) -> None:
    dataset = Path(yaml.safe_load((runs / "toy" / "config.yaml").read_text())["data"]["root"])
    random_run = make_run(dataset, tmp_path / "random", data={"protocol": "random"})
    html = build_report(random_run, progress=False).read_text(encoding="utf-8")
    assert "Image-level random splits leak" in html
    assert "Warning: This model was split with the random" in (random_run / "report.md").read_text(encoding="utf-8")

    refit = tmp_path / "refit"
    shutil.copytree(runs / "toy", refit)
    card_file = refit / "checkpoints" / "best" / "card.json"
    card = json.loads(card_file.read_text())
    card["split"] = {**card.get("split", {}), "trained_on": ["train", "val"]}
    card_file.write_text(json.dumps(card))
    from bloodcell.evaluate.runner import evaluate_model

    with caplog.at_level("WARNING", logger="bloodcell.evaluate.runner"):
        evaluate_model(refit, split="val", out_dir=refit, robustness=False, explain=False, progress=False,
                       n_bootstrap=50)  # fmt: skip
    assert "its scores there are not held-out scores" in caplog.text
    html = build_report(refit, progress=False).read_text(encoding="utf-8")
    warning = "The model learned from these validation images: these are not held-out scores."
    assert warning in html and warning in (refit / "report.md").read_text(encoding="utf-8")  # both formats
    assert "The test part was never trained on" not in html  # no test part was scored


def test_the_report_says_a_per_image_standardised_model_undoes_the_brightness_shift(report: Path, runs: Path,
                                                                                  tmp_path: Path) -> None:  # fmt: skip
    """Its brightness_contrast row equals the clean score by construction: shown as robustness to a dimmer
    lamp without a word, it was evidence that cannot fail."""
    note = "undoes the brightness_contrast shift"
    assert note not in report.read_text(encoding="utf-8")  # the toy model standardises with fixed statistics
    run = tmp_path / "toy"
    shutil.copytree(runs / "toy", run)
    card_path = run / "checkpoints" / "best" / "card.json"
    card = json.loads(card_path.read_text())
    card["config"]["normalize"]["per_image"] = True
    card_path.write_text(json.dumps(card))
    metrics = json.loads((run / "metrics.json").read_text())
    metrics["model"]["path"] = str(card_path.parent)  # this copy's model, not the fixture's
    (run / "metrics.json").write_text(json.dumps(metrics))
    assert note in build_report(run, evaluate=False).read_text(encoding="utf-8")
    assert note in (run / "report.md").read_text(encoding="utf-8")  # both formats


def test_the_markdown_report_names_every_corner_that_ties_for_the_most_changed_predictions(runs: Path,
                                                                                        tmp_path: Path) -> None:  # fmt: skip
    """It named the last of the tied corners, as if that corner (the scale bar's, say) stood out."""
    run = tmp_path / "toy"
    shutil.copytree(runs / "toy", run)
    if not (run / "metrics.json").is_file():
        build_report(run)
    metrics = json.loads((run / "metrics.json").read_text())
    corners = metrics["corner_occlusion"]["corners"]
    n = metrics["corner_occlusion"]["n_images"]
    for name, changed in zip(corners, (2, 1, 2, 2)):
        corners[name]["changed_predictions"] = changed
    (run / "metrics.json").write_text(json.dumps(metrics))
    build_report(run, evaluate=False)
    names = [name for name, changed in zip(corners, (2, 1, 2, 2)) if changed == 2]
    line = f"| most predictions one masked corner changes | 2 of {n} ({', '.join(names)}) |"
    assert line in (run / "report.md").read_text(encoding="utf-8")
    for name in corners:
        corners[name]["changed_predictions"] = 0
    (run / "metrics.json").write_text(json.dumps(metrics))
    build_report(run, evaluate=False)
    assert f"| 0 of {n} (none changes any) |" in (run / "report.md").read_text(encoding="utf-8")


def _rename_classes(path: Path, names: dict[str, str]) -> None:
    """Every class name in a JSON file (metrics.json, card.json) renamed, wherever it is a key or a value."""
    text = path.read_text(encoding="utf-8")
    for old, new in names.items():
        text = text.replace(json.dumps(old), json.dumps(new))
    path.write_text(text, encoding="utf-8")


def _markdown_tables(markdown: str) -> list[list[int]]:
    """The cell count of each row of each table in a Markdown text (an escaped ``\\|`` is no border)."""
    tables: list[list[int]] = []
    previous = ""
    for line in markdown.splitlines():
        if line.startswith("|"):
            if not previous.startswith("|"):
                tables.append([])
            tables[-1].append(len(re.split(r"(?<!\\)\|", line)) - 2)
        previous = line
    return tables


def test_the_markdown_report_escapes_class_and_run_names(runs: Path, tmp_path: Path) -> None:
    """report.md wrote names as they were: a class folder ``Pre|B`` added a cell to every table it headed,
    and one named ``<img src=x onerror=...>`` was raw HTML that a Markdown viewer passes through and runs."""
    hostile = "<img src=x onerror=alert(1)>"
    run = tmp_path / "a|run"
    shutil.copytree(runs / "toy", run)
    if not (run / "metrics.json").is_file():
        build_report(run)
    card_path = run / "checkpoints" / "best" / "card.json"
    metrics = json.loads((run / "metrics.json").read_text())
    metrics["model"]["path"] = str(card_path.parent)  # this copy's model, not the fixture's
    metrics["ci_method"] += f"; single-block classes: {hostile}"  # names in prose too
    metrics["model"]["config_name"] = "stain&blur`x"  # in a code span, where entities would show as typed
    (run / "metrics.json").write_text(json.dumps(metrics))
    for path in (run / "metrics.json", card_path):
        _rename_classes(path, {"Early Pre-B": "![t](http://x.png)", "Pre-B": "Pre|B", "Pro-B": hostile})
    build_report(run, evaluate=False)
    markdown = (run / "report.md").read_text(encoding="utf-8")
    tables = _markdown_tables(markdown)
    assert len(tables) >= 4 and all(len(set(rows)) == 1 for rows in tables), tables
    header = ["part", "Benign", "!\\[t\\](http://x.png)", "Pre\\|B", "&lt;img src=x onerror=alert(1)&gt;", "total"]
    assert "| " + " | ".join(header) + " |" in markdown
    assert "<img" not in markdown and "# bloodcell evaluation report: a\\|run" in markdown
    assert "![t](" not in markdown and "config `stain&blur'x`" in markdown


def test_a_metrics_json_of_an_older_format_is_evaluated_again(runs: Path, tmp_path: Path) -> None:
    """An older bloodcell's metrics.json lacks keys the templates read: evaluate again, or say so."""
    run = tmp_path / "toy"
    shutil.copytree(runs / "toy", run)
    if not (run / "metrics.json").is_file():
        build_report(run)
    metrics = json.loads((run / "metrics.json").read_text())
    older = {**metrics, "format": "bloodcell-metrics/1"}
    del older["corner_occlusion"], older["explain"]["map_size"]
    (run / "metrics.json").write_text(json.dumps(older))
    with pytest.raises(UserError, match=r"older format \(bloodcell-metrics/1\); run `bloodcell evaluate"):
        build_report(run, evaluate=False)
    html = build_report(run).read_text(encoding="utf-8")
    assert json.loads((run / "metrics.json").read_text())["format"] == metrics["format"]
    assert "feature map is" in html


def test_an_older_evaluation_folder_outside_a_run_is_evaluated_again(runs: Path, tmp_path: Path) -> None:
    """`evaluate --out DIR` folders hold no model: the report evaluates again what the old metrics.json names."""
    from bloodcell.evaluate.runner import evaluate_model

    folder = tmp_path / "ev"
    evaluate_model(runs / "toy", split="val", robustness=False, out_dir=folder, progress=False, n_bootstrap=20,
                   update_card=False)  # fmt: skip
    metrics = json.loads((folder / "metrics.json").read_text())
    (folder / "metrics.json").write_text(json.dumps({**metrics, "format": "bloodcell-metrics/1"}))
    with pytest.raises(UserError, match=r"run `bloodcell evaluate .*checkpoints/best --data .* --split val --out"):
        build_report(folder, evaluate=False)
    build_report(folder)
    again = json.loads((folder / "metrics.json").read_text())
    assert again["format"] == metrics["format"] and again["evaluation"]["split"] == "val"
    assert again["robustness"] is None and again["explain"] is not None  # the sections it had, no others


def test_a_run_whose_metrics_scored_another_model_is_refused(runs: Path, tmp_path: Path) -> None:
    """`evaluate other --out RUN` before that was refused: the report would describe one model with another's
    scores. A copy of the run, whose metrics.json names the original's model, is still its own."""
    build_report(runs / "seed")  # its metrics.json
    run = tmp_path / "toy"
    shutil.copytree(runs / "toy", run)
    if not (run / "metrics.json").is_file():
        build_report(run)
    assert build_report(run, evaluate=False).is_file()  # a copy: its metrics.json names runs/toy's model
    metrics = json.loads((run / "metrics.json").read_text())
    scored = json.loads((runs / "seed" / "metrics.json").read_text())["model"]
    (run / "metrics.json").write_text(json.dumps({**metrics, "model": scored}))
    with pytest.raises(UserError, match=r"scored another model .*seed.*evaluate this run again"):
        build_report(run, evaluate=False)


def test_report_of_a_missing_run_is_a_user_error(tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["report", str(tmp_path / "nope")])
    assert result.exit_code != 0
    assert "no such run directory" in str(result.exception)


def _chromium() -> str:
    if Path(CHROMIUM).is_file():
        return CHROMIUM
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"{CHROMIUM} is missing; CI installs it (apt-get install chromium)")
    pytest.skip(f"{CHROMIUM} not installed (apt-get install chromium)")


@pytest.mark.browser
def test_report_opens_in_headless_chromium_without_errors(report: Path, tmp_path: Path) -> None:
    from playwright.sync_api import sync_playwright

    executable = _chromium()
    problems: list[str] = []
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=executable, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1200, "height": 900})
            page.on("console", lambda message: problems.append(f"console {message.type}: {message.text}")
                    if message.type in ("error", "warning") else None)  # fmt: skip
            page.on("pageerror", lambda error: problems.append(f"page error: {error}"))
            page.on("requestfailed", lambda request: problems.append(f"request failed: {request.url}"))
            page.goto(report.as_uri())
            page.wait_for_load_state("load")
            widths = page.evaluate("Array.from(document.images).map(i => i.complete ? i.naturalWidth : 0)")
            title = page.title()
            screenshot = tmp_path / "report.png"
            page.screenshot(path=str(screenshot), full_page=True)
        finally:
            browser.close()
    assert problems == []
    assert len(widths) >= 7 and all(w > 100 for w in widths), widths
    assert title.startswith("bloodcell report")
    assert screenshot.stat().st_size > 50_000
    keep = os.environ.get("BLOODCELL_SCREENSHOT_DIR")
    if keep:  # lets a person look at what the browser drew
        shutil.copy(screenshot, Path(keep) / "report.png")


def test_the_model_card_row_names_the_training_data_not_the_data_evaluated(runs: Path, tmp_path: Path) -> None:
    """An evaluation of other data (another lab's folder) is reported with the model's own training data."""
    from bloodcell.evaluate.runner import evaluate_model

    card = json.loads((runs / "toy" / "checkpoints" / "best" / "card.json").read_text())
    other = make_aria_dataset(tmp_path / "other-lab", per_class=8, size=48, seed=5)
    folder = tmp_path / "ev"
    evaluate_model(runs / "toy", data_root=other, split="all", robustness=False, explain=False, out_dir=folder,
                   progress=False, n_bootstrap=20, update_card=False)  # fmt: skip
    html = build_report(folder, evaluate=False, progress=False).read_text(encoding="utf-8")
    row = re.search(r"<td>training data</td><td class=\"left\">([^<]*)</td>", html)
    assert row is not None and row.group(1).startswith(card["config"]["data"]["root"]), row
    assert str(other) not in row.group(1)
    # Trained on data in Aria's layout, evaluated on other data: not "trained and evaluated on" Taleqani's.
    markdown = (folder / "report.md").read_text(encoding="utf-8")
    for text in (html, markdown):
        assert "Trained on images from one hospital laboratory (Taleqani Hospital, Tehran)" in text
        assert "evaluated here on other data" in text and "Trained and evaluated on" not in text
        assert "Aria M, Ghaderzadeh M" in text
        # The split shown is the one rebuilt on these data, which the model never used.
        assert "Split rebuilt on these data (not the model's training split)" in text
        assert "the model card's (model card" not in text and "the temperature is the model card's" in text
    assert "## Split and leakage check" not in markdown and "Leakage check of this rebuilt split passed" in html


def test_a_model_trained_on_a_user_s_folders_is_not_said_to_be_trained_on_aria(tmp_path: Path) -> None:
    """A two-class model of one's own folders: no Aria citation, no Taleqani, its own number of classes."""
    from bloodcell.evaluate.runner import evaluate_model

    aria = make_aria_dataset(tmp_path / "aria", per_class=16, size=48, seed=3, segmented=False) / "Original"
    for source, name in zip(("Benign", "Pro"), ("benign", "pro-b")):
        shutil.copytree(aria / source, tmp_path / "mine" / name)
    run = make_run(tmp_path / "mine", tmp_path / "runs" / "two", steps=5)
    evaluate_model(run, robustness=False, explain=False, progress=False, n_bootstrap=20)
    html = build_report(run, evaluate=False, progress=False).read_text(encoding="utf-8")
    for text in (html, (run / "report.md").read_text(encoding="utf-8")):
        assert "Taleqani" not in text and "Aria M" not in text and "four classes" not in text
        assert "outside its 2 classes (Benign, Pro-B;" in text
        assert f"the images of {tmp_path / 'mine'} (no published dataset recorded)" in text
        assert "Trained and evaluated on the images of one folder" in text  # its own test part


def test_the_model_card_tells_a_model_trained_on_aria(tmp_path: Path) -> None:
    from bloodcell.models.card import bundled_model_dir
    from bloodcell.report.html import trained_on_aria

    bundled = json.loads((bundled_model_dir() / "card.json").read_text())
    other_data = {"data": {"same_as_training": False}}
    assert trained_on_aria(bundled, other_data)  # by its manifest, wherever its training folder is now
    moved = {"manifest_sha256": "0" * 64, "config": {"data": {"root": str(tmp_path / "gone")}}}
    assert not trained_on_aria(moved, other_data)
    # ... unless the evaluation found the model's own data in Aria's layout
    assert trained_on_aria(moved, {"data": {"same_as_training": True}, "data_audit": {"layout": "aria"}})
    aria = make_aria_dataset(tmp_path / "aria", per_class=2, size=48, segmented=False)
    assert trained_on_aria({"config": {"data": {"root": str(aria)}}}, other_data)
    # A card that records the layout is read by it, wherever the folder is now (moved, another machine).
    assert trained_on_aria({**moved, "data_layout": "kaggle"}, other_data)
    assert not trained_on_aria({"data_layout": "folders", "config": {"data": {"root": str(aria)}}}, other_data)



def test_the_card_temperature_is_not_called_the_model_card_s_twice() -> None:
    from bloodcell.report.html import card_temperature

    assert card_temperature("model card (never fitted: T = 1)") == " (never fitted: T = 1)"
    assert card_temperature("model card") == ""
    assert card_temperature("fitted on the validation part by the holdout run") == " (fitted on the validation part by the holdout run)"


def test_the_training_curves_name_the_epoch_training_kept() -> None:
    """Training keeps the highest validation balanced accuracy and, among ties, the lower validation loss:
    the plot named the first of the tied epochs."""
    import pandas as pd

    from bloodcell.report.plots import best_epoch_row

    history = pd.DataFrame({"epoch": [1, 2, 3, 4], "val_balanced_accuracy": [0.5, 0.9, 0.8, 0.9],
                            "val_loss": [1.0, 0.6, 0.5, 0.4]})  # fmt: skip
    assert best_epoch_row(history) == 3  # epoch 4
    assert best_epoch_row(history.drop(columns="val_loss")) == 1


def test_a_shortcut_scored_on_other_images_is_not_set_beside_the_model(tmp_path: Path) -> None:
    """With --split all the border-colour baseline scores the rebuilt test part, not the images the model
    was scored on: no bar beside the model's."""
    from bloodcell.report.html import _comparison

    metrics = {"model": {"architecture": "bloodnet"}, "balanced_accuracy": 0.9, "balanced_accuracy_ci": [0.8, 1.0],
               "evaluation": {"split": "all"},
               "shortcut_baseline": {"balanced_accuracy": 1.0, "scored_on": "test"}}  # fmt: skip
    assert [row["name"] for row in _comparison(tmp_path, metrics, None)["rows"]] == ["this model (bloodnet)"]
    metrics["evaluation"]["split"] = "test"
    assert len(_comparison(tmp_path, metrics, None)["rows"]) == 2


def test_drawing_the_report_s_figures_leaves_the_caller_s_matplotlib_backend_alone(tmp_path: Path) -> None:
    """In a notebook, evaluate_model or build_report switched the process to Agg: no more inline plots."""
    import subprocess
    import sys

    script = ("import matplotlib; from bloodcell.report import plots; import pandas as pd; "
              "plots.plot_training_curves(pd.DataFrame({'epoch': [1, 2], 'train_loss': [1.0, 0.5], "
              "'val_loss': [1.1, 0.6], 'train_accuracy': [0.5, 0.7], 'val_accuracy': [0.5, 0.6], "
              f"'val_balanced_accuracy': [0.5, 0.6]}}), r'{tmp_path / 'curves.png'}'); print(matplotlib.get_backend())")  # fmt: skip
    shown = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True,
                           env={**os.environ, "MPLBACKEND": "svg"}).stdout  # fmt: skip
    assert shown.strip() == "svg" and (tmp_path / "curves.png").stat().st_size > 0


def test_an_evaluation_inside_a_run_is_named_after_the_run(tmp_path: Path) -> None:
    """Every run of the default config is named "default": the report of runs/lab/evaluations/x-...-all was
    titled "default (x-...-all)", like any other run's."""
    from bloodcell.report.html import _report_name

    run = tmp_path / "runs" / "lab"
    (run / "evaluations" / "site-1a2b3c4d-all").mkdir(parents=True)
    (run / "config.yaml").write_text("name: default\n")
    own = tmp_path / "project"  # a folder of one's own config beside the bundled model's ./evaluations/default
    (own / "evaluations" / "default").mkdir(parents=True)
    (own / "config.yaml").write_text("lr: 0.1\n")
    card = {"name": "default"}
    metrics = {"model": {"architecture": "bloodnet", "path": str((run / "checkpoints" / "best").resolve())}}
    assert _report_name(run / "evaluations" / "site-1a2b3c4d-all", card, metrics) == "lab (site-1a2b3c4d-all)"
    assert _report_name(run, card, metrics) == "lab"
    assert _report_name(tmp_path / "evaluations" / "default", card, metrics) == "default (default)"
    # A folder holding a config of its own, or a run whose model is not the one scored (the bundled model
    # evaluated from inside runs/lab writes ./evaluations/default there): not named after it.
    bundled = {"model": {"architecture": "bloodnet", "path": str(tmp_path / "site-packages" / "default_model")}}
    assert _report_name(own / "evaluations" / "default", card, bundled) == "default (default)"
    assert _report_name(run / "evaluations" / "default", card, bundled) == "default (default)"
    (run / "holdout").mkdir()
    (run / "holdout" / "config.yaml").write_text("name: default\n")
    assert _report_name(run / "holdout", card, metrics) == "lab/holdout"
