"""``bloodcell demo`` and the sample images it ships: files written, honesty of the samples, the bundled model."""

from __future__ import annotations

import csv
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from bloodcell import CLASSES
from bloodcell.cli import app
from bloodcell.demo import MAX_SAMPLES, run_demo, sample_images, samples_dir, select_sample_images
from bloodcell.errors import UserError
from bloodcell.models.card import bundled_model_dir
from conftest import make_aria_dataset
from serve_support import tiny_model  # noqa: F401  (session fixture: a small saved bloodnet)

DOI = "10.34740/KAGGLE/DSV/2175623"


def run_cli(*args: str):
    return CliRunner().invoke(app, list(args))


# -- the sample images ---------------------------------------------------------------------------------


def test_samples_are_few_cover_every_class_and_carry_the_citation() -> None:
    files = sample_images()
    assert 0 < len(files) <= MAX_SAMPLES
    assert {name for _, name in files} == set(CLASSES)
    for path, _ in files:
        assert path.name.startswith("WBC-"), "samples keep the dataset's own file names"
        with Image.open(path) as image:
            assert image.format == "JPEG" and image.size == (224, 224)
    citation = (samples_dir() / "CITATION.md").read_text(encoding="utf-8")
    assert DOI in citation and "10.1002/int.22753" in citation
    # Every shipped file is listed where the citation says how it was chosen, and nothing else is.
    listed = set(re.findall(r"`((?:Benign|Early|Pre|Pro)/WBC-[^`]+\.jpg)`", citation))
    assert listed == {path.relative_to(samples_dir()).as_posix() for path, _ in files}
    assert "CITATION.md" in (samples_dir() / "README.md").read_text(encoding="utf-8")


@pytest.mark.slow
def test_samples_are_test_images_of_the_default_split_and_reproducible(real_data: Path) -> None:
    """The shipped samples are exactly what the documented selection picks, and all from the test part."""
    from bloodcell.config import load_config
    from bloodcell.data.index import build_index
    from bloodcell.data.splits import make_split

    chosen = select_sample_images(real_data)
    shipped = {path.relative_to(samples_dir()).as_posix() for path, _ in sample_images()}
    assert set(chosen["path"]) == shipped
    data = load_config("default").data
    split = make_split(build_index(real_data, progress=False).manifest, data.protocol, data.split_seed)
    parts = split.set_index("path")["split"]
    assert set(parts[sorted(shipped)]) == {"test"}
    for path in shipped:  # copied unchanged
        assert (samples_dir() / path).read_bytes() == (real_data / "Original" / path).read_bytes()


def test_selection_takes_only_test_images_apart_in_capture_order(tmp_path: Path) -> None:
    from bloodcell.config import load_config
    from bloodcell.data.index import build_index
    from bloodcell.data.splits import make_split

    root = make_aria_dataset(tmp_path / "aria", per_class=40, size=48, segmented=False)
    chosen = select_sample_images(root, per_class=2, min_capture_gap=2)
    assert chosen.groupby("class").size().to_dict() == {name: 2 for name in CLASSES}
    data = load_config("default").data
    split = make_split(build_index(root, progress=False).manifest, data.protocol, data.split_seed).set_index("path")
    assert set(split.loc[chosen["path"], "split"]) == {"test"}
    for _, rows in chosen.groupby("class"):
        assert abs(int(rows["capture"].iloc[0]) - int(rows["capture"].iloc[1])) >= 2


# -- the demo on a tiny model ------------------------------------------------------------------------------


def test_demo_writes_predictions_overlays_and_report(tiny_model: Path, tmp_path: Path) -> None:  # noqa: F811
    from bloodcell.serve.predictor import TorchPredictor

    out = tmp_path / "demo-output"
    result = run_cli("demo", "--model", str(tiny_model), "--out", str(out))
    assert result.exit_code == 0, result.output
    assert "bloodcell serve" in result.output and "report.html" in result.output
    assert "verdict" in result.output  # every column of the table is named
    files = sample_images()

    with open(out / "predictions.csv", newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    assert [Path(row["file"]) for row in rows] == [path for path, _ in files]
    assert [row["true_class"] for row in rows] == [name for _, name in files]
    # The demo's numbers are the predictor's numbers (temperature included), not a re-implementation.
    expected = TorchPredictor(tiny_model).predict_files([path for path, _ in files])
    for row, reference in zip(rows, expected):
        assert row["predicted_class"] == reference.label
        assert row["correct"] == str(reference.label == row["true_class"])
        probs = np.array([float(row[f"p_{name}"]) for name in CLASSES])
        assert probs.sum() == pytest.approx(1.0, abs=1e-4)
        assert probs == pytest.approx([reference.probabilities[name] for name in CLASSES], abs=1e-5)

    payload = json.loads((out / "predictions.json").read_text(encoding="utf-8"))
    assert payload["model"]["name"] == "tiny-test-model" and payload["model"]["bundled"] is False
    assert payload["n_images"] == len(files) and payload["n_correct"] == sum(r["correct"] == "True" for r in rows)

    overlays = sorted((out / "overlays").glob("*.png"))
    assert [p.name for p in overlays] == sorted(f"{path.stem}.gradcam.png" for path, _ in files)
    with Image.open(overlays[0]) as overlay:
        assert overlay.size == (224, 224)  # drawn over the full-resolution image, not the 64 px model input
        assert len(np.unique(np.asarray(overlay.convert("RGB")).reshape(-1, 3), axis=0)) > 100

    html = (out / "report.html").read_text(encoding="utf-8")
    assert "Research use only" in html and DOI in html
    assert all(path.name in html for path, _ in files)
    sources = re.findall(r'src="([^"]+)"', html)
    assert len(sources) == 2 * len(files) and all(s.startswith("data:image/") for s in sources)
    assert "<script" not in html


def test_demo_json_and_custom_samples(tiny_model: Path, tmp_path: Path) -> None:  # noqa: F811
    import shutil

    samples = make_aria_dataset(tmp_path / "mine", per_class=2, size=48, segmented=False) / "Original"
    shutil.copyfile(samples / "Pro" / "WBC-Malignant-Pro-002.jpg", samples / "Pro" / "WBC-Benign-001.jpg")
    result = run_cli("demo", "--model", str(tiny_model), "--samples", str(samples), "--out", str(tmp_path / "o"), "--json")
    assert result.exit_code == 0, result.output
    payload = json.loads(result.output)
    assert payload["n_images"] == 9
    assert sorted(r["true_class"] for r in payload["results"]) == sorted([*CLASSES, *CLASSES, "Pro-B"])
    overlays = [r["overlay"] for r in payload["results"]]
    assert all(Path(o).is_file() for o in overlays) and len(set(overlays)) == 9  # a shared name: two overlays
    # Another model and one's own images: neither the bundled model's limitations nor Aria's citation.
    html = Path(payload["report"]).read_text(encoding="utf-8")
    # (strings no base64 image data can hold: a "." is none of its characters)
    assert "Images: the class folders given with" in html and "Taleqani Hospital, Tehran" not in html
    assert "10.34740/KAGGLE" not in html
    # (the tiny model keeps no record of its training images: whether these are other data cannot be told)
    assert "Trained on images its model card does not name; whether the images shown here include its training images cannot be checked" in html
    # Again into the same folder with fewer samples: the overlays of the first run's other images go, and a
    # file `bloodcell explain` wrote there (named alike) stays.
    (tmp_path / "o" / "overlays" / "my-smear.gradcam.png").write_bytes(b"the user's")
    shutil.rmtree(samples / "Pro")
    again = json.loads(run_cli("demo", "--model", str(tiny_model), "--samples", str(samples), "--out",
                               str(tmp_path / "o"), "--json").output)  # fmt: skip
    assert sorted([*(Path(r["overlay"]).name for r in again["results"]), "my-smear.gradcam.png"]) == sorted(
        path.name for path in (tmp_path / "o" / "overlays").iterdir())


def test_demo_survives_odd_samples(tiny_model: Path, tmp_path: Path) -> None:  # noqa: F811
    """A 240-character name (its overlay and temporary names passed the 255-byte limit, and the demo died), a
    broken link (the report read it, and died), a BMP (embedded as a JPEG's bytes) and a name that reads as
    console markup: each sample is shown, or its failure is."""
    import re

    samples = make_aria_dataset(tmp_path / "mine", per_class=1, size=48, segmented=False) / "Original"
    benign = samples / "Benign"
    first = benign / "WBC-Benign-001.jpg"
    long_name = benign / ("L" * 240 + ".jpg")
    first.rename(long_name)
    (benign / "gone.jpg").symlink_to(tmp_path / "nowhere.jpg")
    with Image.open(samples / "Pro" / "WBC-Malignant-Pro-001.jpg") as image:
        image.save(samples / "Pro" / "[red]cell.bmp")
    result = run_cli("demo", "--model", str(tiny_model), "--samples", str(samples), "--out", str(tmp_path / "o"))
    assert result.exit_code == 0, result.output
    assert "[red]cell.bmp" in result.output  # the name as it is, not eaten as markup
    overlays = sorted(p.name for p in (tmp_path / "o" / "overlays").iterdir())
    assert any(name.startswith("L" * 100) and len(name.encode()) < 255 for name in overlays)
    report = (tmp_path / "o" / "report.html").read_text()
    assert "gone.jpg" in report and report.count("data:image/jpeg;base64,") == 5  # 4 samples and the BMP; not gone.jpg
    assert not re.search(r"data:image/jpeg;base64,Qk", report)  # "BM", a bitmap's own bytes, would start so


def test_demo_names_the_samples_that_are_not_square(tiny_model: Path, tmp_path: Path) -> None:  # noqa: F811
    samples = make_aria_dataset(tmp_path / "mine", per_class=1, size=48, segmented=False) / "Original"
    demo = ["demo", "--model", str(tiny_model), "--samples", str(samples), "--out", str(tmp_path / "out")]
    result = run_cli(*demo)
    assert result.exit_code == 0 and "not square" not in result.stderr, result.output
    frame = samples / "Pro" / "WBC-Malignant-Pro-001.jpg"
    with Image.open(frame) as image:
        image.resize((200, 120)).save(frame)
    for args in ((), ("--json",)):  # on stderr with --json too, leaving stdout to the JSON
        result = run_cli(*demo, *args)
        assert result.exit_code == 0, result.output
        assert result.stderr.count("not square") == 1, result.stderr
        assert (f"1 of the 4 images is not square; resizing to a square squashes the cells along the longer side by up "
                f"to 40 % ({frame}: 200x120)") in result.stderr  # fmt: skip
    assert json.loads(result.stdout)["n_images"] == 4


def test_demo_shows_control_characters_in_names_instead_of_sending_them(tiny_model: Path, tmp_path: Path) -> None:  # noqa: F811
    """A name with ESC sequences ("move up, erase the line") rewrote the lines above it on a terminal: in the
    table, the not-square warning and the warning naming the model's classes, they show as escapes."""
    import shutil

    model = tmp_path / "odd-model"
    shutil.copytree(tiny_model, model)
    card = json.loads((model / "card.json").read_text())
    card["classes"] = ["Benign", "Early\x1b]0;title\x07", "Pre-B", "Pro\x9b2J"]  # Early/ and Pro/: no verdict
    (model / "card.json").write_text(json.dumps(card))
    samples = make_aria_dataset(tmp_path / "mine", per_class=1, size=48, segmented=False) / "Original"
    with Image.open(samples / "Pro" / "WBC-Malignant-Pro-001.jpg") as image:
        image.resize((200, 120)).save(samples / "Pro" / "x\x1b[1A\x1b[2Kfake.jpg")
    demo = ["demo", "--model", str(model), "--samples", str(samples), "--out", str(tmp_path / "o")]
    result = CliRunner().invoke(app, demo, env={"COLUMNS": "200"})  # room for a column of each class
    assert result.exit_code == 0, result.output
    assert not re.search("[\x00-\x09\x0b-\x1f\x7f-\x9f]", result.output), repr(result.output)
    assert "│ x\\x1b[1A\\x1b[2Kfake.jpg " in result.stdout and "x\\x1b[1A\\x1b[2Kfake.jpg: 200x120" in result.stderr
    assert "Early\\x1b]0;title\\x07" in result.stdout and "Pro\\x9b2J" in result.stdout  # the class columns
    assert "Early\\x1b]0;title\\x07, Pre-B, Pro\\x9b2J): no verdict" in result.stderr


def test_demo_without_a_bundled_model_says_so_in_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import bloodcell.cli
    import bloodcell.models.card

    monkeypatch.setattr(bloodcell.models.card, "bundled_model_dir", lambda: tmp_path / "no-model-here")
    with pytest.raises(UserError, match="no bundled default model"):
        run_demo(tmp_path / "out")
    monkeypatch.setattr(sys, "argv", ["bloodcell", "demo", "--out", str(tmp_path / "out")])
    with pytest.raises(SystemExit) as exit_info:
        bloodcell.cli.main()
    assert exit_info.value.code == 2
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1 and "--model" in error
    assert not (tmp_path / "out").exists()


def test_demo_with_a_missing_model_path_is_a_user_error(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="no such model"):
        run_demo(tmp_path / "out", model=tmp_path / "nothing")


def test_demo_module_imports_no_heavy_library() -> None:
    """`bloodcell --help` and the demo's start must not pay for torch, pandas or Grad-CAM before they are used."""
    code = "import sys, bloodcell.demo; print(sorted({'torch', 'pandas', 'pytorch_grad_cam'} & set(sys.modules)))"
    output = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True).stdout
    assert output.strip() == "[]"


# -- the bundled default model -----------------------------------------------------------------------------


def test_demo_with_the_bundled_model(tmp_path: Path) -> None:
    """`bloodcell demo` as a new user runs it: the real entry point, the bundled model, the shipped samples."""
    if not (bundled_model_dir() / "card.json").is_file():
        message = f"no bundled default model yet ({bundled_model_dir()}/card.json)"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(message + "; under CI=true it must be shipped")
        pytest.skip(message)
    script = Path(sys.executable).with_name("bloodcell")  # the installed entry point, as `make demo` runs it
    command = [str(script)] if script.is_file() else [sys.executable, "-m", "bloodcell"]
    command += ["demo", "--out", str(tmp_path / "demo-output")]
    done = subprocess.run(command, check=False, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "bloodcell serve" in done.stdout
    payload = json.loads((tmp_path / "demo-output" / "predictions.json").read_text(encoding="utf-8"))
    assert payload["model"]["bundled"] is True and payload["n_images"] == len(sample_images())
    assert all(r["error"] is None for r in payload["results"])
    html = (tmp_path / "demo-output" / "report.html").read_text(encoding="utf-8")
    assert "Trained and evaluated on images from one hospital laboratory (Taleqani Hospital, Tehran)" in html
    assert "held-out test part of the session split" in html
    card = json.loads((bundled_model_dir() / "card.json").read_text(encoding="utf-8"))
    headline = card["metrics"]["test"]["balanced_accuracy"]
    assert f"balanced accuracy on its test part of <b>{headline:.3f}</b>" in html


def test_the_bundled_model_on_one_s_own_samples_is_said_to_be_evaluated_on_other_data(tmp_path: Path) -> None:
    from bloodcell.demo import run_demo

    if not (bundled_model_dir() / "card.json").is_file():
        pytest.skip("no bundled default model")  # the test above fails for it under CI
    samples = make_aria_dataset(tmp_path / "mine", per_class=1, size=48, segmented=False) / "Original"
    html = run_demo(tmp_path / "out", samples=samples).report.read_text(encoding="utf-8")
    assert "Trained and evaluated on images from one hospital laboratory" not in html
    assert "and evaluated here on other data" in html and "Images: the class folders given with" in html
    # with a folder of one's own, the bundled model's samples are not said to be held out: they are counted
    assert "held-out" not in html and "0 of 4 samples are images the model was trained on." in html
    # the shipped samples named by their folder are the shipped samples: said of as by default
    html = run_demo(tmp_path / "named", samples=samples_dir()).report.read_text(encoding="utf-8")
    assert "Trained and evaluated on images from one hospital laboratory (Taleqani Hospital, Tehran)" in html
    assert "held-out test part of the session split" in html


def test_the_demo_csv_defuses_class_names_a_spreadsheet_would_run(tmp_path: Path) -> None:
    """Class names come from a model card someone may hand you: one starting with "=" must reach the CSV as
    text, not as a formula, like every other cell of it."""
    import csv

    from bloodcell.demo import DemoImage, DemoResult, write_predictions
    from bloodcell.serve.common import PredictionResult

    classes = ["=HYPERLINK(1)", "Early Pre-B", "Pre-B", "Pro-B"]
    result = PredictionResult("a.jpg", label=classes[0], probabilities=dict.fromkeys(classes, 0.25))
    demo = DemoResult(out_dir=tmp_path, model_dir=tmp_path, bundled_model=False, model_info={}, classes=classes,
                      temperature=1.0, images=[DemoImage(tmp_path / "a.jpg", classes[0], result)],
                      predictions_csv=tmp_path / "p.csv", predictions_json=tmp_path / "p.json",
                      report=tmp_path / "r.html", seconds=0.0)  # fmt: skip
    write_predictions(demo)
    row = next(csv.DictReader((tmp_path / "p.csv").open()))
    assert row["true_class"] == row["predicted_class"] == "'=HYPERLINK(1)"


@pytest.mark.parametrize("content", ['{"results": [null]}', '["a.png"]', '{"x": 1}', "not json",
                                     '{"results": [{"overlay": "/"}, {"overlay": "x/.."}, {"overlay": "notes.txt"}, '
                                     '{"overlay": "../../outside.gradcam.png"}]}'])  # fmt: skip
def test_a_hand_edited_predictions_json_names_no_file_the_demo_would_delete(content: str, tmp_path: Path) -> None:
    """Only the overlay names an earlier demo recorded are removed: nothing outside overlays/, nothing
    not named as an overlay, and a broken file is no crash (it would crash every later run there)."""
    from bloodcell.demo import earlier_overlays

    (tmp_path / "predictions.json").write_text(content)
    names = earlier_overlays(tmp_path / "predictions.json")
    assert names <= {"outside.gradcam.png"} and all("/" not in name and name not in ("", "..") for name in names)


def test_a_model_of_other_classes_gets_no_verdict_on_the_shipped_samples(tiny_model: Path, tmp_path: Path) -> None:  # noqa: F811
    """Another lab's model (normal, ALL-L1, ...) shown the shipped samples: every image was "wrong", and
    "0 of 12 predicted as their folder's class", for folders of classes the model does not have."""
    import shutil

    model = tmp_path / "lab-model"
    shutil.copytree(tiny_model, model)
    card = json.loads((model / "card.json").read_text())
    card["classes"] = ["normal", "ALL-L1", "ALL-L2", "ALL-L3"]
    (model / "card.json").write_text(json.dumps(card))
    result = run_cli("demo", "--model", str(model), "--out", str(tmp_path / "o"))
    assert result.exit_code == 0, result.output
    assert "0 of 0 predicted as their folder's class" in result.output
    assert "are no classes of this model (normal, ALL-L1, ALL-L2, ALL-L3): no verdict" in result.output
    payload = json.loads((tmp_path / "o" / "predictions.json").read_text())
    assert payload["n_judged"] == 0 and all(row["correct"] is None for row in payload["results"])
    html = (tmp_path / "o" / "report.html").read_text(encoding="utf-8")
    assert " - wrong" not in html and "in folders of no class of this model's: no verdict" in html


def test_sample_folders_named_another_way_are_judged_as_the_model_s_classes(tiny_model: Path, tmp_path: Path) -> None:  # noqa: F811
    """normal/ for a model class "Normal": matched loosely, as --classes and evaluate match folders."""
    import shutil

    model = tmp_path / "lab-model"
    shutil.copytree(tiny_model, model)
    card = json.loads((model / "card.json").read_text())
    card["classes"] = ["Normal", "L1", "L2", "L3"]
    (model / "card.json").write_text(json.dumps(card))
    samples = tmp_path / "samples"
    for folder, source in (("normal", "Benign"), ("l1", "Pro")):
        shutil.copytree(samples_dir() / source, samples / folder)
    payload = json.loads(run_cli("demo", "--model", str(model), "--samples", str(samples), "--out",
                                 str(tmp_path / "o"), "--json").output)  # fmt: skip
    assert payload["n_judged"] == payload["n_images"] > 0
    assert {row["true_class"] for row in payload["results"]} == {"Normal", "L1"}


def test_a_model_class_named_like_a_canonical_alias_is_matched_by_its_own_name_first() -> None:
    """A model of Benign and Hematogone (both aliases of Benign) shown a Hematogone/ folder: its own class."""
    from bloodcell.demo import model_class

    assert model_class(["Hematogone", "Benign"], ["Benign", "Hematogone", "ALL"]) == "Hematogone"
    assert model_class(["Early", "Early Pre-B"], ["Benign", "early", "pre"]) == "early"
    assert model_class(["Pro", "Pro-B"], ["x", "y"]) is None


# -- what the demo says of its samples ---------------------------------------------------------------------


def _said(text: str) -> str:
    """Text with its line breaks and runs of spaces as single spaces (the CLI wraps to the terminal)."""
    return " ".join(text.split())


def test_samples_the_model_trained_on_are_counted_from_its_run_s_record(tiny_model: Path, tmp_path: Path) -> None:  # noqa: F811
    """A run shown its own training images was said to be "evaluated here on other data": the record of its
    training images (trained-on.sha256 / .phash, in the run) now counts them, by bytes and re-encoded too."""
    import hashlib
    import shutil

    import imagehash

    from bloodcell.models.card import save_trained_on

    run = tmp_path / "run"
    shutil.copytree(tiny_model, run / "checkpoints" / "best")
    (run / "config.yaml").write_text("{}\n")
    samples = make_aria_dataset(tmp_path / "mine", per_class=1, size=48, segmented=False) / "Original"
    same_bytes = samples / "Benign" / "WBC-Benign-001.jpg"
    re_encoded = samples / "Pro" / "WBC-Malignant-Pro-001.jpg"
    with Image.open(re_encoded) as image:
        phash = str(imagehash.phash(image.convert("RGB")))
        image.save(re_encoded, quality=60)  # other bytes, the same picture
    save_trained_on(run, [hashlib.sha256(same_bytes.read_bytes()).hexdigest(), "0" * 64], [phash])
    result = run_cli("demo", "--model", str(run), "--samples", str(samples), "--out", str(tmp_path / "o"))
    assert result.exit_code == 0, result.output
    assert "2 of 4 samples are images the model was trained on." in _said(result.output)
    payload = json.loads((tmp_path / "o" / "predictions.json").read_text(encoding="utf-8"))
    assert payload["n_trained_on"] == 2
    html = _said((tmp_path / "o" / "report.html").read_text(encoding="utf-8"))
    assert "2 of 4 samples are images the model was trained on." in html and "held-out" not in html
    assert "Trained and evaluated on images its model card does not name" in html
    assert "evaluated here on other data" not in html
    (run / "trained-on.phash").write_text("")  # a model recorded before perceptual hashes: bytes only
    payload = json.loads(run_cli("demo", "--model", str(run), "--samples", str(samples), "--out",
                                 str(tmp_path / "o"), "--json").output)  # fmt: skip
    assert payload["n_trained_on"] == 1 and "by their bytes only" in payload["training_note"]


def test_a_model_without_a_record_of_its_training_images_says_it_cannot_be_checked(
    tiny_model: Path, tmp_path: Path  # noqa: F811
) -> None:
    samples = make_aria_dataset(tmp_path / "mine", per_class=1, size=48, segmented=False) / "Original"
    payload = json.loads(run_cli("demo", "--model", str(tiny_model), "--samples", str(samples), "--out",
                                 str(tmp_path / "o"), "--json").output)  # fmt: skip
    assert payload["n_trained_on"] is None and "cannot be checked" in payload["training_note"]
    html = _said((tmp_path / "o" / "report.html").read_text(encoding="utf-8"))
    assert "Whether the samples are images the model was trained on cannot be checked" in html
    assert "evaluated here on other data" not in html  # not claimed where it cannot be known
    assert "Trained and evaluated on" not in html  # nor the contrary
    # the shipped samples too: a model that keeps no record may have trained on them
    run_cli("demo", "--model", str(tiny_model), "--out", str(tmp_path / "shipped"))
    html = _said((tmp_path / "shipped" / "report.html").read_text(encoding="utf-8"))
    assert "cannot be checked" in html and "Trained and evaluated on" not in html
    assert "evaluated here on other data" not in html


def test_unreadable_samples_are_no_wrong_predictions(tiny_model: Path, tmp_path: Path) -> None:  # noqa: F811
    """A file that could not be read counted as a wrong prediction: "0 of 5" where one of 5 was unreadable."""
    samples = make_aria_dataset(tmp_path / "mine", per_class=1, size=48, segmented=False) / "Original"
    (samples / "Benign" / "WBC-Benign-broken.jpg").write_bytes(b"not a JPEG")
    result = run_cli("demo", "--model", str(tiny_model), "--samples", str(samples), "--out", str(tmp_path / "o"))
    assert result.exit_code == 0, result.output
    payload = json.loads((tmp_path / "o" / "predictions.json").read_text(encoding="utf-8"))
    n_correct = payload["n_correct"]
    assert payload["n_images"] == 5 and payload["n_judged"] == 4 and payload["n_unreadable"] == 1
    broken = [row for row in payload["results"] if row["error"]]
    assert len(broken) == 1 and broken[0]["correct"] is None
    with open(tmp_path / "o" / "predictions.csv", newline="", encoding="utf-8") as handle:
        rows = {Path(row["file"]).name: row for row in csv.DictReader(handle)}
    assert rows["WBC-Benign-broken.jpg"]["correct"] == ""
    assert f"{n_correct} of 4 predicted as their folder's class (1 could not be read)" in _said(result.output)
    html = _said((tmp_path / "o" / "report.html").read_text(encoding="utf-8"))
    said = f"<b>{n_correct} of 4</b> sample images predicted as the class of their folder (1 could not be read)."
    assert said in html


def test_the_page_counts_the_real_samples_and_quotes_the_serve_command(tiny_model: Path, tmp_path: Path) -> None:  # noqa: F811
    """The page said "Twelve images" whatever their number, and `bloodcell serve my run/...` split the path."""
    import shlex
    import shutil

    model = tmp_path / "my run"
    shutil.copytree(tiny_model, model)
    samples = make_aria_dataset(tmp_path / "mine", per_class=1, size=48, segmented=False) / "Original"
    result = run_cli("demo", "--model", str(model), "--samples", str(samples), "--out", str(tmp_path / "o"))
    assert result.exit_code == 0, result.output
    serve = f"bloodcell serve {shlex.quote(str(model))}"
    assert serve != f"bloodcell serve {model}" and serve in _said(result.output)
    assert shlex.split(serve)[2] == str(model)
    html = _said((tmp_path / "o" / "report.html").read_text(encoding="utf-8"))
    assert f"<code>{serve.replace(chr(39), '&#39;')}</code>" in html
    assert "4 images say nothing reliable about a model" in html and "Twelve" not in html


def test_the_headline_is_the_test_balanced_accuracy_the_card_records() -> None:
    """Cards record evaluate's numbers under metrics.test: the page read metrics.balanced_accuracy, and never
    showed one."""
    from bloodcell.demo import headline_metric

    test = {"balanced_accuracy": 0.9, "balanced_accuracy_ci": [0.85, 0.95]}
    assert headline_metric({"metrics": {"test": test}}) == {"value": 0.9, "ci": [0.85, 0.95]}
    assert headline_metric({"metrics": test}) == {"value": 0.9, "ci": [0.85, 0.95]}  # written the older way
    assert headline_metric({"metrics": {"val_balanced_accuracy": 0.9}}) is None
    if (bundled_model_dir() / "card.json").is_file():
        card = json.loads((bundled_model_dir() / "card.json").read_text(encoding="utf-8"))
        headline = headline_metric(card)
        assert headline is not None and headline["value"] == card["metrics"]["test"]["balanced_accuracy"]
