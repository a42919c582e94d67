"""ONNX export: one self-contained file, dynamic batch, parity with PyTorch, and a predictor without torch."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from typer.testing import CliRunner

from bloodcell.cli import app
from bloodcell.data.decode import decode_image
from bloodcell.errors import UserError
from bloodcell.serve import export as export_module
from bloodcell.serve.export import ParityError, ensure_onnx, export_onnx
from bloodcell.serve.onnx_predictor import OnnxPredictor
from bloodcell.serve.predictor import TorchPredictor
from conftest import DEFAULT_DATA, child_env
from serve_support import TINY_SIZE, real_images, write_images


@pytest.fixture(scope="module")
def realish_files(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """Real smear images: the samples shipped in the package (always there), those of the team dataset
    when it is present, plus synthetic smears."""
    from bloodcell.demo import sample_images

    root = Path(os.environ.get("BLOODCELL_DATA", DEFAULT_DATA))
    real = real_images(root, per_class=3) if (root / "Original").is_dir() else []
    shipped = [path for path, _ in sample_images()]
    assert shipped, "the package ships no sample images"
    return shipped + real + write_images(tmp_path_factory.mktemp("realish"), 8, size=224)


def test_export_leaves_the_callers_logging_as_it_was(tiny_model: Path, tmp_path: Path) -> None:
    import logging

    onnx_log = logging.getLogger("torch.onnx")
    onnx_log.setLevel(logging.INFO)
    try:
        export_onnx(tiny_model, tmp_path / "model.onnx")
        assert onnx_log.level == logging.INFO
    finally:
        onnx_log.setLevel(logging.NOTSET)


def test_export_writes_one_file_and_card(tiny_onnx: Path) -> None:
    assert tiny_onnx.is_file() and tiny_onnx.suffix == ".onnx"
    assert sorted(p.name for p in tiny_onnx.parent.iterdir()) == ["card.json", "model.onnx"]  # no .onnx.data
    graph = onnx.load(str(tiny_onnx))
    onnx.checker.check_model(graph)
    assert not any(t.data_location == onnx.TensorProto.EXTERNAL for t in graph.graph.initializer)
    (image_input,) = graph.graph.input
    dims = image_input.type.tensor_type.shape.dim
    assert dims[0].dim_param and [d.dim_value for d in dims[1:]] == [TINY_SIZE, TINY_SIZE, 3]
    card = json.loads((tiny_onnx.parent / "card.json").read_text())
    assert card["name"] == "tiny-test-model" and card["temperature"] == pytest.approx(1.3)
    assert card["onnx"]["parity"]["max_abs_diff_probabilities"] <= 1e-4


def test_parity_on_real_images_at_several_batch_sizes(tiny_model: Path, tiny_onnx: Path, realish_files: list[Path]) -> None:
    images = np.stack([decode_image(p, TINY_SIZE) for p in realish_files])
    torch_probs = TorchPredictor(tiny_model).predict(images)
    onnx_predictor = OnnxPredictor(tiny_onnx)
    for batch in (1, 5, len(images)):
        onnx_probs = np.concatenate([onnx_predictor.predict(images[i : i + batch]) for i in range(0, len(images), batch)])
        assert np.abs(onnx_probs - torch_probs).max() <= 1e-4
    assert np.abs(torch_probs - 0.25).max() > 0.05  # the model is not trivially uniform
    tta_diff = np.abs(onnx_predictor.predict(images, tta=True) - TorchPredictor(tiny_model).predict(images, tta=True))
    assert tta_diff.max() <= 1e-4


def test_failed_parity_raises_and_writes_nothing(tiny_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    real_export = export_module._export_graph

    def export_a_different_model(wrapper, size, target, exporter, opset):  # a broken exporter
        broken = __import__("copy").deepcopy(wrapper)
        with torch.no_grad():
            broken.model.net.head[-1].bias.add_(torch.tensor([3.0, 0.0, 0.0, 0.0]))
        real_export(broken, size, target, exporter, opset)

    monkeypatch.setattr(export_module, "_export_graph", export_a_different_model)
    with pytest.raises(ParityError, match="parity"):
        export_onnx(tiny_model, tmp_path / "bad" / "model.onnx")
    assert not (tmp_path / "bad").exists() or not any((tmp_path / "bad").iterdir())


def test_onnx_predictor_imports_and_runs_without_torch(tiny_onnx: Path, realish_files: list[Path]) -> None:
    code = (
        "import sys, json\n"
        "import bloodcell.serve.onnx_predictor as m\n"
        "assert 'torch' not in sys.modules, 'torch imported by import'\n"
        f"p = m.OnnxPredictor({str(tiny_onnx)!r}, threads=2)\n"
        f"results = p.predict_files({[str(p) for p in realish_files[:4]]!r} + ['missing.jpg'], batch=2, tta=True)\n"
        "assert 'torch' not in sys.modules, 'torch imported by predicting'\n"
        "print(json.dumps([r.to_dict() for r in results]))\n"
    )
    env = child_env()
    done = subprocess.run(check=False, args=[sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)
    assert done.returncode == 0, done.stderr
    rows = json.loads(done.stdout)
    assert [r["error"] is None for r in rows] == [True] * 4 + [False]


def test_ensure_onnx_reuses_and_refreshes(tiny_model: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    import shutil

    model = tmp_path / "model"
    shutil.copytree(tiny_model, model)
    first = ensure_onnx(model)
    assert first.is_file() and ensure_onnx(model) == first
    stamp = first.stat().st_mtime_ns
    card = json.loads((model / "card.json").read_text())
    card["temperature"] = 2.0  # recalibrated: the ONNX card must follow
    (model / "card.json").write_text(json.dumps(card))
    again = ensure_onnx(model)
    assert again.stat().st_mtime_ns != stamp
    assert OnnxPredictor(again).temperature == pytest.approx(2.0)
    # An export by an older graph (here: its card without the version) is made again.
    onnx_card = json.loads((again.parent / "card.json").read_text())
    del onnx_card["onnx"]["graph_version"]
    (again.parent / "card.json").write_text(json.dumps(onnx_card))
    with caplog.at_level("WARNING", logger="bloodcell.serve.onnx_predictor"):
        OnnxPredictor(again)  # given directly, it still runs, and says what to do
    assert "export the model again" in caplog.text
    stamp = again.stat().st_mtime_ns
    assert ensure_onnx(model).stat().st_mtime_ns != stamp


def test_export_command_checks_parity_on_given_images(tiny_model: Path, realish_files: list[Path], tmp_path: Path) -> None:
    folder = tmp_path / "cli"  # a folder (no .onnx suffix): the file is <folder>/model.onnx
    result = CliRunner().invoke(
        app,
        ["export", str(tiny_model), "--format", "onnx", "--out", str(folder), "--json"]
        + [arg for p in realish_files for arg in ("--images", str(p))],
    )
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    out = folder / "model.onnx"
    assert summary["onnx"] == str(out) and out.is_file() and (folder / "card.json").is_file()
    parity = json.loads((folder / "card.json").read_text())["onnx"]["parity"]
    assert parity["n_images"] == len(realish_files) and f"{len(realish_files)} real images" in parity["images"]
    assert parity["synthetic"]["n_images"] == 8 and parity["synthetic"]["max_abs_diff_logits"] <= 1e-2
    assert summary["max_abs_diff_probabilities"] == parity["max_abs_diff_probabilities"] <= 1e-4
    bad = CliRunner().invoke(app, ["export", str(tiny_model), "--format", "tflite"])
    assert bad.exit_code == 2


def test_export_refuses_a_model_folder_and_images_that_match_nothing(tiny_model: Path, tmp_path: Path) -> None:
    """Writing into a model's own folder would replace its card; a wrong --images would weaken the check."""
    card_before = (tiny_model / "card.json").read_bytes()
    into_model = CliRunner().invoke(app, ["export", str(tiny_model), "--out", str(tiny_model / "model.onnx")])
    assert isinstance(into_model.exception, UserError) and "holds a model" in str(into_model.exception)
    assert (tiny_model / "card.json").read_bytes() == card_before and not (tiny_model / "model.onnx").exists()
    no_images = CliRunner().invoke(app, ["export", str(tiny_model), "--out", str(tmp_path / "x"), "--images", str(tmp_path / "none")])
    assert isinstance(no_images.exception, UserError) and "no image files" in str(no_images.exception)
    assert not (tmp_path / "x").exists()


def test_a_second_export_into_a_folder_is_refused_where_it_would_orphan_the_first(tiny_model: Path,
                                                                                  tmp_path: Path) -> None:  # fmt: skip
    """One card.json serves the folder's export: a second export under another name replaced it, and the
    first graph then failed as "an interrupted export"."""
    first = export_onnx(tiny_model, tmp_path / "exports" / "first.onnx")
    card_before = (first.parent / "card.json").read_bytes()
    with pytest.raises(UserError, match="holds another export, first.onnx"):
        export_onnx(tiny_model, tmp_path / "exports" / "second.onnx")
    assert (first.parent / "card.json").read_bytes() == card_before and not (first.parent / "second.onnx").exists()
    assert export_onnx(tiny_model, first) == first  # the same export again replaces its own card
    first.unlink()  # a card whose graph is gone describes nothing to keep
    assert export_onnx(tiny_model, tmp_path / "exports" / "second.onnx").is_file()


def test_export_parity_failure_is_one_line_and_exit_1(tiny_model: Path, tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["export", str(tiny_model), "--out", str(tmp_path / "o"), "--tolerance", "0"])
    assert result.exit_code == 1 and not isinstance(result.exception, ParityError)
    assert "failed its parity check" in result.output and "Traceback" not in result.output


def test_an_on_the_fly_export_that_fails_its_check_is_one_line_and_exit_1(
    tiny_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`predict --backend onnx` on a model folder exports first; a failed check is said, not a traceback."""
    import shutil

    model = tmp_path / "model"
    shutil.copytree(tiny_model, model)
    monkeypatch.setenv("BLOODCELL_HOME", str(tmp_path / "home"))
    real_check = export_module.check_parity

    def broken(*args, **kwargs):
        parity = real_check(*args, **kwargs)
        return {**parity, "max_abs_diff_probabilities": 1.0}

    monkeypatch.setattr(export_module, "check_parity", broken)
    images = write_images(tmp_path / "images", 2)
    result = CliRunner().invoke(app, ["predict", "-m", str(model), "--backend", "onnx", str(images[0])])
    assert result.exit_code == 1 and not isinstance(result.exception, ParityError), result.output
    assert "failed its parity check" in result.output and "--backend torch" in result.output
    assert "Traceback" not in result.output



def test_the_bundled_model_exports_into_the_work_folder_not_the_package(tiny_model: Path) -> None:
    """An installed package may be read-only, and a file added to it outlives `pip uninstall`."""
    from bloodcell.io import bloodcell_home
    from bloodcell.models.card import bundled_model_dir
    from bloodcell.serve.export import default_onnx_path

    bundled = default_onnx_path(None)
    assert bundled.is_relative_to(bloodcell_home() / "onnx") and not bundled.is_relative_to(bundled_model_dir())
    assert default_onnx_path(tiny_model) == tiny_model / "onnx" / "model.onnx"


def test_a_graph_beside_an_older_card_is_refused_and_exported_again(tiny_model: Path, tmp_path: Path) -> None:
    """A kill between writing the graph and its card leaves a pair that do not belong together."""
    import shutil

    from bloodcell.errors import ModelFileError

    model = tmp_path / "model"
    shutil.copytree(tiny_model, model)
    exported = ensure_onnx(model)
    graph = onnx.load(str(exported))
    graph.producer_name = "another export"  # a different graph, as a later export would write
    onnx.save(graph, str(exported))
    with pytest.raises(ModelFileError, match="is not the graph its .*card.json describes"):
        OnnxPredictor(exported)
    again = ensure_onnx(model)
    assert OnnxPredictor(again).classes  # exported afresh, and the pair agrees


def test_the_bundled_model_matches_pytorch_on_the_images_that_strained_float32(real_data: Path, tmp_path: Path) -> None:
    """Per-image standardisation sums 76,800 squares: in float32, ONNX Runtime's sum moved the probabilities
    of some real Pre-B images by up to 1.3e-3 (Pre-028 among them), ten times the tolerance; the exported
    graph now sums in float64."""
    from bloodcell.serve.export import export_onnx

    images = sorted((real_data / "Original" / "Pre").glob("*.jpg"))[:32]  # the most the check takes
    assert any(path.name.endswith("-028.jpg") for path in images)
    path = export_onnx(None, tmp_path / "model.onnx", images=[str(p) for p in images])  # raises past 1e-4
    parity = json.loads((path.parent / "card.json").read_text())["onnx"]["parity"]
    assert parity["max_abs_diff_probabilities"] <= 1e-4 and parity["n_images"] == 32


def test_an_export_beside_its_model_answers_with_the_model_s_present_temperature(
    tiny_model: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """`evaluate` refits the model card's temperature; an export made before keeps the old one in its own card."""
    import shutil

    from bloodcell.serve.common import load_predictor

    model = tmp_path / "model"
    shutil.copytree(tiny_model, model)
    onnx_file = export_onnx(model)  # into <model>/onnx/
    assert onnx_file.parent == model / "onnx"
    card = json.loads((model / "card.json").read_text())
    (model / "card.json").write_text(json.dumps({**card, "temperature": 2.0}))
    with caplog.at_level("WARNING", logger="bloodcell.serve.common"):
        predictor, source = load_predictor(onnx_file, backend="onnx")
    assert source == model and predictor.temperature == 2.0 and predictor.card["temperature"] == 2.0
    assert "was exported with temperature" in caplog.text
    torch_probabilities = TorchPredictor(model).predict(np.zeros((1, TINY_SIZE, TINY_SIZE, 3), np.uint8))
    onnx_probabilities = predictor.predict(np.zeros((1, TINY_SIZE, TINY_SIZE, 3), np.uint8))
    assert np.abs(torch_probabilities - onnx_probabilities).max() < 1e-4


@pytest.mark.parametrize("temperature", [float("inf"), None, 0.0, 1e-310, 5000.0, "1.3", True])
def test_both_card_readers_refuse_a_temperature_outside_the_card_range(tiny_model: Path, tmp_path: Path,
                                                                        temperature: object) -> None:
    import shutil

    from pydantic import ValidationError

    from bloodcell.errors import ModelFileError
    from bloodcell.models.card import ModelCard
    from bloodcell.serve.common import read_card_json

    model = tmp_path / "model"
    shutil.copytree(tiny_model, model)
    card = json.loads((model / "card.json").read_text())
    (model / "card.json").write_text(json.dumps({**card, "temperature": temperature}))  # inf: written as Infinity
    with pytest.raises(ModelFileError, match="temperature must be a number from 0.001 to 1000"):
        read_card_json(model)
    with pytest.raises(ValidationError, match="temperature"):
        ModelCard.model_validate({**card, "temperature": temperature})


@pytest.mark.parametrize("damage", ["classes", "input_size", "truncated"])
def test_an_onnx_file_its_card_does_not_describe_is_one_clear_error(tiny_onnx: Path, tmp_path: Path, damage: str) -> None:
    import shutil

    from bloodcell.errors import ModelFileError

    folder = tmp_path / "onnx"
    shutil.copytree(tiny_onnx.parent, folder)
    card = json.loads((folder / "card.json").read_text())
    card.pop("onnx")  # a card written by hand: nothing recorded about the graph to check against
    if damage == "classes":
        card["classes"] = card["classes"][:3]
    elif damage == "input_size":
        card["input_size"] = TINY_SIZE + 8
    else:
        data = (folder / tiny_onnx.name).read_bytes()
        (folder / tiny_onnx.name).write_bytes(data[: len(data) // 2])
    (folder / "card.json").write_text(json.dumps(card))
    expected = {"classes": "names 3 classes, but", "input_size": f"says input_size {TINY_SIZE + 8}, but",
                "truncated": "not a usable ONNX graph"}[damage]  # fmt: skip
    with pytest.raises(ModelFileError, match=expected):
        OnnxPredictor(folder / tiny_onnx.name)


def test_an_unreadable_parity_image_is_named_and_skipped_and_none_readable_refused(
    realish_files: list[Path], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """As predict does: one bad file among good ones must not abort an export."""
    from bloodcell.serve.export import parity_images

    (tmp_path / "empty.jpg").write_bytes(b"")
    good = realish_files[:5]  # fewer than the check's limit of 32, so every file is tried
    for path in good:
        (tmp_path / path.name).write_bytes(path.read_bytes())
    with caplog.at_level(logging.WARNING, logger="bloodcell.serve.export"):
        real, _, what = parity_images(32, [tmp_path])
    assert len(real) == len(good) and f"{len(good)} real images" in what
    assert "empty.jpg" in caplog.text and "empty file" in caplog.text
    only_bad = tmp_path / "bad"
    only_bad.mkdir()
    (only_bad / "empty.jpg").write_bytes(b"")
    with pytest.raises(UserError, match="none of the images could be read .*empty.jpg"):
        parity_images(32, [only_bad])


def test_a_parity_image_the_decoder_trips_on_is_named_and_skipped_not_a_crash(
    realish_files: list[Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Only a refusal (ImageError) was caught: a decoder plugin's TypeError on one odd file (a turned photo
    whose EXIF block Pillow could not write back did so) stopped `bloodcell export --images` with a traceback."""
    from bloodcell.data import decode as decode_module
    from bloodcell.serve.export import parity_images

    good = realish_files[:3]
    for path in good:
        (tmp_path / path.name).write_bytes(path.read_bytes())
    (tmp_path / "odd.jpg").write_bytes(good[0].read_bytes())
    real_open = decode_module.open_rgb

    def tripping_open(source: Path, **kwargs: int):
        if source.name == "odd.jpg":
            raise TypeError("bad operand type for abs(): 'str'")
        return real_open(source, **kwargs)

    monkeypatch.setattr(decode_module, "open_rgb", tripping_open)
    with caplog.at_level(logging.WARNING, logger="bloodcell.serve.export"):
        real, _, what = parity_images(32, [tmp_path])
    assert len(real) == len(good) and f"{len(good)} real images" in what
    assert "odd.jpg" in caplog.text and "TypeError" in caplog.text


def test_an_out_that_is_an_existing_file_not_onnx_is_refused_and_a_dotted_name_is_a_folder(tiny_model: Path,
                                                                                            tmp_path: Path) -> None:  # fmt: skip
    """An existing notes.txt gave a raw 'File exists'; a new name without .onnx is a folder (v1.2/)."""
    (tmp_path / "notes.txt").write_text("mine")
    result = CliRunner().invoke(app, ["export", str(tiny_model), "--out", str(tmp_path / "notes.txt")])
    assert isinstance(result.exception, UserError) and "give an .onnx file to write, or a folder" in str(result.exception)
    assert (tmp_path / "notes.txt").read_text() == "mine"
    dotted = CliRunner().invoke(app, ["export", str(tiny_model), "--out", str(tmp_path / "v1.2")])
    assert dotted.exit_code == 0, dotted.output
    assert (tmp_path / "v1.2" / "model.onnx").is_file()


def test_export_s_summary_names_the_difference_on_real_and_on_synthetic_images(tiny_model: Path, tmp_path: Path) -> None:
    """It gave the real images' figure under "12 real images + 8 synthetic", leaving the synthetic ones' out."""
    from bloodcell.cli.serve import parity_summary

    result = CliRunner().invoke(app, ["export", str(tiny_model), "--out", str(tmp_path / "o")])
    assert result.exit_code == 0, result.output
    parity = json.loads((tmp_path / "o" / "card.json").read_text())["onnx"]["parity"]
    real, synthetic = parity["max_abs_diff_probabilities"], parity["synthetic"]
    assert (f"parity vs PyTorch, max |dp| = {real:.1e} on {parity['n_images']} real images, "
            f"{synthetic['max_abs_diff_probabilities']:.1e} on 8 synthetic (logits within "
            f"{synthetic['max_abs_diff_logits']:.1e})") in " ".join(result.stdout.split())  # fmt: skip
    assert parity["n_real_images"] == parity["n_images"] > 0
    alone = {**parity, "images": "8 synthetic images (no real images given)", "n_real_images": 0}
    assert parity_summary(alone).endswith("on 8 synthetic (logits within "
                                          f"{synthetic['max_abs_diff_logits']:.1e}) (no real images given)")  # fmt: skip
