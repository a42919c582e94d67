"""``bloodcell predict`` and the predictors: files, folders, globs, bad files, CSV / JSON output, exit codes."""

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
from typer.testing import CliRunner

from bloodcell.cli import app
from bloodcell.data.decode import ImageError, decode_image
from bloodcell.errors import UserError
from bloodcell.evaluate.tta import tta_views
from bloodcell.io import terminal_text
from bloodcell.models import load_model
from bloodcell.probabilities import softmax_with_temperature
from bloodcell.serve.common import _glob, expand_inputs, missing_input_reason
from bloodcell.serve.predictor import TorchPredictor
from conftest import child_env
from serve_support import TINY_SIZE, TINY_TEMPERATURE, cell_jpeg, png_bytes, write_images

CLASSES = ["Benign", "Early Pre-B", "Pre-B", "Pro-B"]
PROBABILITY_COLUMNS = [f"p_{name}" for name in CLASSES]


@pytest.fixture
def slides(tmp_path: Path) -> Path:
    """A folder tree: 3 images at the top, 3 in a sub-folder, a truncated JPEG and a text file."""
    root = tmp_path / "slides"
    write_images(root, 3)
    write_images(root / "day2", 3, start=3)
    (root / "day2" / "truncated.jpg").write_bytes(cell_jpeg(seed=7)[:1200])
    (root / "notes.txt").write_text("not an image")
    return root


def reference_probabilities(model_dir: Path, path: Path) -> np.ndarray:
    """What the card says must happen: decode at the input size, model logits, softmax(logits / T)."""
    import torch

    model, card = load_model(model_dir)
    image = torch.from_numpy(decode_image(path, card.input_size)).permute(2, 0, 1)[None]
    with torch.no_grad():
        logits = model(image).numpy()
    return softmax_with_temperature(logits / card.temperature)[0]


def run(*args: str):
    return CliRunner().invoke(app, list(args))


def test_expand_inputs_files_folders_globs(slides: Path) -> None:
    files, missing, skipped, _ = expand_inputs(
        [slides / "cell-000.jpg", slides / "day2", str(slides / "*.jpg"), slides / "nope.jpg"]
    )
    names = [p.name for p in files]
    assert names == ["cell-000.jpg", "cell-003.jpg", "cell-004.jpg", "cell-005.jpg", "truncated.jpg", "cell-001.jpg", "cell-002.jpg"]
    assert missing == [str(slides / "nope.jpg")]
    assert skipped == []  # day2 holds only images; a glob's files are taken as named
    recursive = expand_inputs([str(slides / "**" / "*.jpg")]).files
    assert len(recursive) == 7
    everything = expand_inputs([slides, slides])
    assert "notes.txt" not in [p.name for p in everything.files] and len(everything.files) == 7
    assert everything.skipped == [slides / "notes.txt"]  # reported, once, though the folder was given twice
    assert expand_inputs([slides, slides / "notes.txt"]).skipped == []  # named as well: tried, not skipped


def test_links_pipes_and_hidden_files_in_globs_and_folders(slides: Path, tmp_path: Path) -> None:
    """A link to a parent folder is not followed round (glob.glob's ** repeated every file, and with two such
    links never ended); a pipe is not read (it would block for ever); a broken link is tried, and so
    reported as unreadable; a file reached by two names is classified once."""
    (slides / "day2" / "loop").symlink_to("..", target_is_directory=True)
    (slides / "day2" / "loop2").symlink_to(".", target_is_directory=True)
    os.mkfifo(slides / "pipe.jpg")
    (slides / "gone.jpg").symlink_to(tmp_path / "nowhere.jpg")
    (slides / "again.jpg").symlink_to(slides / "cell-000.jpg")
    (slides / ".hidden.jpg").write_bytes(cell_jpeg(seed=9))
    for inputs in ([str(slides / "**" / "*.jpg")], [slides]):
        found = expand_inputs(inputs)
        names = sorted(p.name for p in found.files)
        assert names == sorted([f"cell-00{k}.jpg" for k in range(6)] + ["again.jpg", "truncated.jpg", "gone.jpg"])
        assert "pipe.jpg" not in names  # again.jpg, a second name of cell-000.jpg, is classified as named
        assert slides / "pipe.jpg" in found.skipped  # but named, not dropped without a word
    assert expand_inputs([str(slides / ".*.jpg")]).files == [slides / ".hidden.jpg"]  # named by the pattern
    # As glob.glob reads them: ** inside a name is *, and a pattern ending in a separator names folders.
    assert sorted(p.name for p in expand_inputs([str(slides / "cell-**.jpg")]).files) == [f"cell-00{k}.jpg" for k in range(3)]
    assert sorted(p.name for p in expand_inputs([str(slides / "*") + os.sep]).files) == [f"cell-00{k}.jpg" for k in range(3, 6)] + ["truncated.jpg"]
    with pytest.raises(ImageError, match="not a regular file"):
        decode_image(slides / "pipe.jpg", TINY_SIZE)
    with pytest.raises(ImageError, match="cannot read file"):
        decode_image(slides / "gone.jpg", TINY_SIZE)


def test_a_file_name_that_reads_as_a_formula_is_written_as_text(
    tiny_model: Path, slides: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """CSV injection: a spreadsheet opening the results would run ``=HYPERLINK(...)`` from a file name."""
    (slides / "cell-000.jpg").rename(slides / "=HYPERLINK(1).jpg")
    monkeypatch.chdir(slides)  # named relative to here, the cell starts with "="
    out = tmp_path / "results.csv"
    result = run("predict", "--model", str(tiny_model), "=HYPERLINK(1).jpg", "--out", str(out))
    assert result.exit_code == 0, result.output
    with out.open(newline="") as handle:
        assert next(csv.DictReader(handle))["file"] == "'=HYPERLINK(1).jpg"


def test_a_first_input_naming_nothing_is_not_answered_by_the_bundled_model(slides: Path, tmp_path: Path) -> None:
    """`predict runs/default slides/` before runs/default exists: the bundled model would answer silently."""
    for command in ("predict", "explain"):
        result = run(command, str(tmp_path / "runs" / "default"), str(slides / "cell-000.jpg"))
        assert result.exit_code != 0 and isinstance(result.exception, UserError), (command, result.output)
        assert "no such model, run, image or folder" in str(result.exception)
    # A missing image among images is still one failed row, the others classified.
    result = run("predict", str(slides / "gone.jpg"), str(slides / "cell-000.jpg"), "--json")
    assert result.exit_code == 1 and json.loads(result.output)["n_failed"] == 1


def test_results_keep_the_order_of_the_inputs(tiny_model: Path, slides: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An input that matches nothing keeps its place among the others in the table, --json and --out."""
    found = expand_inputs(["gone.jpg", slides / "cell-000.jpg", "none-*.png", slides / "day2", "gone2.jpg"])
    assert found.missing_at == [0, 1, 5]
    assert found.in_input_order([p.name for p in found.files], lambda text: f"({text})") == [
        "(gone.jpg)", "cell-000.jpg", "(none-*.png)", "cell-003.jpg", "cell-004.jpg", "cell-005.jpg", "truncated.jpg",
        "(gone2.jpg)"]  # fmt: skip
    monkeypatch.chdir(slides)  # short names, which the table does not wrap
    inputs = ["nothere.jpg", "cell-000.jpg", "no-*.png", "cell-001.jpg"]
    out = tmp_path / "results.csv"
    result = run("predict", "-m", str(tiny_model), *inputs, "--json", "--out", str(out))
    assert result.exit_code == 1, result.output
    assert [row["file"] for row in json.loads(result.stdout)["results"]] == inputs
    assert [row["file"] for row in csv.DictReader(out.open())] == inputs
    table = run("predict", "-m", str(tiny_model), *inputs).stdout
    assert table.index("nothere") < table.index("cell-000") < table.index("no-*") < table.index("cell-001")


def test_a_glob_under_a_folder_named_with_brackets(tiny_model: Path, slides: Path, tmp_path: Path) -> None:
    """"Blood cell Cancer [ALL]/Benign/*.jpg": the folder's brackets read as a character class matched nothing;
    leading parts that name existing folders as written are taken literally when the pattern matches nothing."""
    folder = tmp_path / "Blood cell Cancer [ALL]" / "Benign"
    write_images(folder, 2)
    (tmp_path / "Blood cell Cancer A" / "Benign").mkdir(parents=True)  # what the class reading matches: no images
    found = expand_inputs([str(folder / "cell-00*.jpg")])
    assert [p.name for p in found.files] == ["cell-000.jpg", "cell-001.jpg"] and found.missing == []
    escaped = tmp_path / "Blood cell Cancer [[]ALL]" / "Benign" / "*.jpg"  # glob's own escape still works
    assert [p.name for p in expand_inputs([str(escaped)]).files] == ["cell-000.jpg", "cell-001.jpg"]
    result = run("predict", "-m", str(tiny_model), str(folder / "cell-001*"), "--json")
    assert result.exit_code == 0 and json.loads(result.stdout)["n_files"] == 1, result.output
    # Brackets that name no folder either way: no hint (escaping them would match nothing either).
    result = run("predict", "-m", str(tiny_model), str(tmp_path / "Blood cell Cancer [B]" / "*.jpg"), "--json")
    assert json.loads(result.stdout)["results"][0]["error"] == "a pattern that matches no image file"
    # ... but not when the folder exists as written (it was tried so) and holds no match, nor for a file class.
    for pattern in (folder / "*.png", slides / "cell-00[7-9].jpg"):
        error = json.loads(run("predict", "-m", str(tiny_model), str(pattern), "--json").stdout)["results"][0]["error"]
        assert error == "a pattern that matches no image file", pattern
    # No hint where it cannot help: a class meant as one (it matches folders), brackets the wrong way round,
    # a missing parent folder.
    (tmp_path / "patient1").mkdir()
    for pattern in ("patient[12]/*.jpg", "x]y[z/*.jpg", "nosuch/Cancer [ALL]/*.jpg", "x**[ALL]/a.jpg",
                    "Blood cell Cancer [ALL] v2/*.jpg"):  # fmt: skip
        assert missing_input_reason(str(tmp_path / pattern)) == "a pattern that matches no image file", pattern
    # ... and a hint where the brackets written as such make the pattern match: a wildcard before them kept
    # the literal retry from trying it.
    hinted = missing_input_reason(str(tmp_path / "Blood cell *[ALL]" / "Benign" / "*.jpg"))
    assert "for a folder named 'Blood cell *[ALL]', write '[[]ALL]' for '[ALL]'" in hinted
    # A pattern for folders only: the class reading's match of a file does not stop the literal retry.
    (tmp_path / "Blood cell Cancer A" / "z.jpg").write_bytes(b"")
    assert [p.name for p in _glob(str(tmp_path / "Blood cell Cancer [ALL]" / "*") + "/")] == ["Benign"]


def test_predict_csv_with_corrupt_file(tiny_model: Path, slides: Path, tmp_path: Path) -> None:
    out = tmp_path / "results.csv"
    result = run("predict", "--model", str(tiny_model), str(slides / "cell-000.jpg"), str(slides / "day2"), str(slides / "*.jpg"), "--out", str(out))
    assert result.exit_code == 1, result.output  # the truncated file failed
    assert "truncated" in result.stdout and "Early Pre-B" in result.stdout  # the table
    rows = list(csv.DictReader(out.open()))
    assert len(rows) == 7 and list(rows[0]) == ["file", "predicted_class", "confidence", *PROBABILITY_COLUMNS, "error"]
    bad = [r for r in rows if r["error"]]
    assert [Path(r["file"]).name for r in bad] == ["truncated.jpg"] and "truncated" in bad[0]["error"]
    good = [r for r in rows if not r["error"]]
    assert len(good) == 6
    for row in good:
        probs = np.array([float(row[c]) for c in PROBABILITY_COLUMNS])
        assert probs.sum() == pytest.approx(1.0, abs=1e-5)
        assert row["predicted_class"] == CLASSES[int(probs.argmax())]
        assert np.allclose(probs, reference_probabilities(tiny_model, Path(row["file"])), atol=1e-5)


def test_a_file_name_that_is_not_utf8_is_escaped_in_the_csv(tiny_model: Path, slides: Path, tmp_path: Path) -> None:
    odd = os.path.join(os.fsencode(tmp_path), b"cell-\xff.jpg")
    os.link(slides / "cell-000.jpg", odd)
    out = tmp_path / "results.csv"
    result = run("predict", "-m", str(tiny_model), os.fsdecode(odd), "--out", str(out))
    assert result.exit_code == 0, result.output
    rows = list(csv.DictReader(out.open(encoding="utf-8")))
    assert rows[0]["file"].endswith("cell-\\xff.jpg") and not rows[0]["error"]


def test_predict_names_the_files_a_folder_holds_that_are_not_images(tiny_model: Path, slides: Path) -> None:
    result = run("predict", "-m", str(tiny_model), str(slides), "--json")
    assert json.loads(result.stdout)["skipped"] == [str(slides / "notes.txt")]
    table = run("predict", "-m", str(tiny_model), str(slides))
    assert "skipped 1 file(s)" in table.stderr and "notes.txt" in table.stderr


def test_a_pipe_with_an_image_suffix_is_said_to_be_no_regular_file(tiny_model: Path, slides: Path,
                                                                   tmp_path: Path) -> None:  # fmt: skip
    """It was said to be "not an image by its suffix", which its .jpg plainly is."""
    import shutil

    folder = tmp_path / "with-a-pipe"
    shutil.copytree(slides, folder)
    os.mkfifo(folder / "camera.jpg")
    table = run("predict", "-m", str(tiny_model), str(folder))
    assert ("skipped 2 file(s) in the folders given: 1 not images by their suffix" in table.stderr
            and "1 not regular files (pipes, devices): camera.jpg" in table.stderr)  # fmt: skip


def test_predict_json_all_good_exit_zero(tiny_model: Path, slides: Path, tmp_path: Path) -> None:
    out = tmp_path / "results.json"
    result = run("predict", "-m", str(tiny_model), str(slides / "*.jpg"), "--out", str(out), "--batch", "2", "--json")
    assert result.exit_code == 0, result.output
    printed = json.loads(result.stdout)
    written = json.loads(out.read_text())
    assert printed["results"] == written["results"]
    assert written["n_files"] == 3 and written["n_failed"] == 0
    assert written["model"]["name"] == "tiny-test-model" and written["temperature"] == pytest.approx(TINY_TEMPERATURE)
    first = written["results"][0]
    assert first["error"] is None and first["class"] == max(first["probabilities"], key=first["probabilities"].get)


def test_rows_the_table_leaves_out_point_to_the_file_that_holds_them(tiny_model: Path, slides: Path, tmp_path: Path) -> None:
    images = str(slides / "*.jpg")
    assert "(write them all with --out FILE.csv)" in run("predict", "-m", str(tiny_model), images, "--show", "1").stdout
    out = tmp_path / "all.csv"
    table = run("predict", "-m", str(tiny_model), images, "--show", "1", "--out", str(out)).stdout
    assert "--out FILE.csv" not in table and "2 more rows (all of them in" in table  # the path may wrap


def test_model_as_first_input_and_missing_inputs(tiny_model: Path, slides: Path, tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    result = run("predict", str(tiny_model), str(slides / "cell-001.jpg"), str(slides / "no-such-*.png"),
                 str(tmp_path / "gone.jpg"), str(tmp_path / "empty"), "--json")  # fmt: skip
    assert result.exit_code == 1
    rows = json.loads(result.stdout)["results"]
    assert rows[0]["error"] is None and Path(rows[0]["file"]).name == "cell-001.jpg"
    # Each input that names no image says which of the three it is.
    assert [row["error"] for row in rows[1:]] == [
        "a pattern that matches no image file", "no such file or folder",
        "a folder with no image files in it (looked for .bmp .jpeg .jpg .png .tif .tiff, in sub-folders too)"]


def test_a_class_named_like_a_column_keeps_both_in_the_csv(tmp_path: Path) -> None:
    from bloodcell.cli.serve import write_results
    from bloodcell.serve.common import PredictionResult

    classes = ["file", "error"]
    result = PredictionResult(source="cell.jpg", label="error", probabilities={"file": 0.25, "error": 0.75})
    write_results(tmp_path / "out.csv", {}, [result], classes)
    (row,) = csv.DictReader((tmp_path / "out.csv").open(newline=""))
    assert row == {"file": "cell.jpg", "predicted_class": "error", "confidence": "0.750000", "p_file": "0.250000",
                   "p_error": "0.750000", "error": ""}  # fmt: skip


def test_usage_errors(tiny_model: Path, slides: Path, tmp_path: Path) -> None:
    result = run("predict", "-m", str(tiny_model), str(slides), "--out", str(tmp_path / "x.xlsx"))
    assert isinstance(result.exception, UserError) and ".csv or .json" in str(result.exception)
    result = run("predict", str(tiny_model))
    assert isinstance(result.exception, UserError) and "no images" in str(result.exception)
    (tmp_path / "folder.csv").mkdir()
    result = run("predict", "-m", str(tiny_model), str(slides), "--out", str(tmp_path / "folder.csv"))
    assert isinstance(result.exception, UserError) and "is a folder" in str(result.exception)
    image = slides / "cell-000.jpg"
    result = run("predict", "-m", str(tiny_model), str(slides), "--out", str(image / "results.csv"))
    assert isinstance(result.exception, UserError) and f"{image} is a file" in str(result.exception)


def test_an_onnx_file_with_the_torch_backend_names_the_fix(tiny_onnx: Path, slides: Path) -> None:
    for args in (("predict", "-m", str(tiny_onnx), str(slides)), ("serve", str(tiny_onnx))):
        result = run(*args, "--backend", "torch")
        assert isinstance(result.exception, UserError) and "drop --backend torch" in str(result.exception), args


def test_serve_caps_the_connections_it_holds_open(tiny_model: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """uvicorn accepts any number of connections unless told: beyond MAX_CONNECTIONS it must answer 503."""
    import uvicorn

    from bloodcell.serve.app import MAX_CONNECTIONS

    given: dict = {}
    monkeypatch.setattr(uvicorn, "run", lambda app, **kwargs: given.update(kwargs, app=app))
    result = run("serve", str(tiny_model), "--port", "8123")
    assert result.exit_code == 0, result.output
    assert given["limit_concurrency"] == MAX_CONNECTIONS and given["port"] == 8123


def test_serve_on_a_port_in_use_says_so_before_loading_the_model(tiny_model: Path, monkeypatch) -> None:
    import socket

    import uvicorn

    monkeypatch.setattr(uvicorn, "run", lambda *args, **kwargs: pytest.fail("uvicorn started on a busy port"))
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = run("serve", str(tiny_model), "--port", str(port))
    assert isinstance(result.exception, UserError), result.output
    assert f"cannot listen on 127.0.0.1:{port}" in str(result.exception) and "--port N" in str(result.exception)


def test_serve_on_an_address_the_machine_lacks_points_at_the_host_not_the_port(tiny_model: Path, monkeypatch) -> None:
    import uvicorn

    monkeypatch.setattr(uvicorn, "run", lambda *args, **kwargs: pytest.fail("uvicorn started on a bad host"))
    result = run("serve", str(tiny_model), "--host", "999.1.1.1", "--port", "8123")
    assert isinstance(result.exception, UserError), result.output
    assert "--host" in str(result.exception) and "--port N" not in str(result.exception)


def test_serve_refuses_an_unknown_log_level_and_export_a_negative_tolerance(tiny_model: Path) -> None:
    assert run("serve", str(tiny_model), "--log-level", "loud").exit_code == 2
    assert run("export", str(tiny_model), "--tolerance", "-1").exit_code == 2


@pytest.mark.parametrize(
    ("host", "refused"),
    [("127.0.0.1", True), ("localhost", True), ("127.0.0.2", True), ("[::ffff:127.0.0.1]", True), ("0.0.0.0", False)],
)
def test_serve_on_the_loopback_address_refuses_other_host_names(tiny_model: Path, monkeypatch, host, refused) -> None:
    """Any loopback address, not only the three usual names, and the address listened on is a name it answers."""
    import uvicorn
    from fastapi.testclient import TestClient

    given: dict = {}
    monkeypatch.setattr(uvicorn, "run", lambda app, **kwargs: given.update(app=app))
    monkeypatch.setattr("bloodcell.cli.serve._refuse_a_port_in_use", lambda host, port: None)  # 8000 may be taken
    assert run("serve", str(tiny_model), "--host", host).exit_code == 0
    client = TestClient(given["app"])
    status = client.get("/healthz", headers={"host": "rebound.example"}).status_code
    assert status == (400 if refused else 200)
    assert client.get("/healthz", headers={"host": f"{host}:8000"}).status_code == 200


def test_serve_gives_requests_in_progress_a_bounded_time_when_told_to_stop(tiny_model: Path) -> None:
    """uvicorn waits for the requests in progress on SIGTERM; unbounded, a client that sent the headers and a part
    of its upload kept the server running for as long as it stayed connected (41 s measured)."""
    import signal
    import socket

    from bloodcell.cli.serve import GRACEFUL_SHUTDOWN_SECONDS
    from serve_support import infer_speed_module

    bench = infer_speed_module()
    port = bench.free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "bloodcell", "serve", str(tiny_model), "--port", str(port), "--log-level", "warning"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=child_env(),
    )  # fmt: skip
    try:
        bench.wait_until_healthy(port, 120, process)
        with socket.create_connection(("127.0.0.1", port), timeout=10) as stalled:
            stalled.sendall(b"POST /v1/predict HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: multipart/form-data; "
                            b"boundary=x\r\nContent-Length: 1000000\r\n\r\n--x\r\n" + b"y" * 1000)  # fmt: skip
            bench.wait_until_healthy(port, 30)  # a request after it answered: the server has read the upload's start
            process.send_signal(signal.SIGTERM)
            _, err = process.communicate(timeout=GRACEFUL_SHUTDOWN_SECONDS + 60)  # raises if it keeps running
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()
    assert process.returncode == 143, err


def test_an_onnx_file_runs_on_onnx_runtime_without_being_told(tiny_onnx: Path, slides: Path) -> None:
    images = str(slides / "*.jpg")
    for args in (("-m", str(tiny_onnx), images), (str(tiny_onnx), images)):
        result = run("predict", *args, "--json")
        assert result.exit_code == 0, result.output
        assert json.loads(result.stdout)["model"]["backend"] == "onnx"


def test_explaining_with_an_onnx_file_uses_the_weights_it_was_exported_from(
    tiny_model: Path, tiny_onnx: Path, slides: Path, tmp_path: Path
) -> None:
    from bloodcell.serve.export import export_onnx

    image = str(slides / "cell-000.jpg")
    result = run("explain", str(tiny_onnx), image, "--out", str(tmp_path / "a"))  # exported elsewhere: no weights
    assert isinstance(result.exception, UserError) and "PyTorch weights" in str(result.exception)
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    for name in ("card.json", "model.safetensors"):
        (model_dir / name).write_bytes((tiny_model / name).read_bytes())
    beside = export_onnx(model_dir, model_dir / "onnx" / "model.onnx")
    result = run("explain", str(beside), image, "--out", str(tmp_path / "b"), "--json")
    assert result.exit_code == 0, result.output
    assert len(list((tmp_path / "b").glob("*.png"))) == 1


def test_file_names_are_printed_as_they_are_not_as_markup(tiny_model: Path, slides: Path, tmp_path: Path) -> None:
    folder = tmp_path / "[odd names"
    folder.mkdir()
    image = (slides / "cell-000.jpg").read_bytes()
    (folder / "[reverse]shown.jpg").write_bytes(image)
    (folder / "[").mkdir()
    (folder / "[" / "bold]closing.jpg").write_bytes(image)  # "[/bold]": a closing tag made rich raise after the work
    result = run("predict", "-m", str(tiny_model), str(folder))
    assert result.exit_code == 0, result.output
    assert "[reverse]shown.jpg" in result.stdout.replace("\n", "").replace("│", "").replace(" ", "")


CONTROL_CHARACTER = re.compile("[\x00-\x09\x0b-\x1f\x7f-\x9f]")  # any but the line break


@pytest.fixture
def control_names(tmp_path: Path) -> Path:
    """Files whose names carry terminal control sequences: up a line and erase it, clear the screen, a C1 CSI."""
    folder = tmp_path / "controls"
    folder.mkdir()
    (folder / "x\x1b[1A\x1b[2Kfake.png").write_bytes(png_bytes(200, 100))  # not square: named in a warning
    (folder / "bad\x9b2J.jpg").write_bytes(b"not an image")  # a row of its own, with the error
    (folder / "notes\x1b[2J.txt").write_text("skipped")
    return folder


def test_terminal_text_shows_control_characters_as_escapes() -> None:
    assert terminal_text("x\x1b[1A\x1b[2Kfake.png") == "x\\x1b[1A\\x1b[2Kfake.png"
    assert terminal_text("a\x00b\tc\nd\x7fe\x85f\x9b") == "a\\x00b\\x09c\\x0ad\\x7fe\\x85f\\x9b"
    assert terminal_text(os.fsdecode(b"caf\xe9.jpg")) == "caf\\xe9.jpg"  # not UTF-8, as printable_path shows it
    assert terminal_text(Path("Früh [b].jpg")) == "Früh [b].jpg" and terminal_text(3) == "3"


def test_predict_shows_control_characters_in_file_names_instead_of_sending_them(tiny_model: Path, control_names: Path) -> None:
    """A crafted name such as "x ESC[1A ESC[2K fake.png" erased the row above it on a terminal."""
    result = CliRunner().invoke(app, ["predict", "-m", str(tiny_model), str(control_names)], env={"COLUMNS": "250"})
    assert result.exit_code == 1, result.output  # the file that is no image
    assert not CONTROL_CHARACTER.search(result.output), repr(result.output)
    assert "x\\x1b[1A\\x1b[2Kfake.png " in result.stdout and "bad\\x9b2J.jpg " in result.stdout
    assert "notes\\x1b[2J.txt" in result.stderr and "x\\x1b[1A\\x1b[2Kfake.png: 200x100" in result.stderr


def test_explain_shows_control_characters_in_file_names_instead_of_sending_them(
    tiny_model: Path, control_names: Path, tmp_path: Path
) -> None:
    command = ["explain", str(tiny_model), str(control_names), "--out", str(tmp_path / "maps")]
    result = CliRunner().invoke(app, command, env={"COLUMNS": "400"})
    assert result.exit_code == 1, result.output
    assert not CONTROL_CHARACTER.search(result.output), repr(result.output)
    assert "x\\x1b[1A\\x1b[2Kfake.png " in result.stdout and "bad\\x9b2J.jpg " in result.stdout
    assert "x\\x1b[1A\\x1b[2Kfake.png: 200x100" in result.stderr


def test_onnx_backend_and_tta(tiny_model: Path, tiny_onnx: Path, slides: Path) -> None:
    plain = json.loads(run("predict", "-m", str(tiny_model), str(slides / "*.jpg"), "--json").stdout)["results"]
    onnx = json.loads(run("predict", "-m", str(tiny_onnx), "--backend", "onnx", str(slides / "*.jpg"), "--json").stdout)
    assert onnx["model"]["backend"] == "onnx"
    for a, b in zip(plain, onnx["results"]):
        assert max(abs(a["probabilities"][c] - b["probabilities"][c]) for c in CLASSES) <= 1e-4
    tta = json.loads(run("predict", "-m", str(tiny_model), str(slides / "cell-000.jpg"), "--tta", "--json").stdout)
    assert tta["tta"] == "d4"
    # TTA = mean of the logits over the 8 symmetries, then the card's temperature.
    import torch

    model, card = load_model(tiny_model)
    image = decode_image(slides / "cell-000.jpg", TINY_SIZE)[None]
    with torch.no_grad():
        logits = np.mean([model(torch.from_numpy(v).permute(0, 3, 1, 2)).numpy() for v in tta_views(image)], axis=0)
    expected = softmax_with_temperature(logits, card.temperature)[0]
    got = np.array([tta["results"][0]["probabilities"][c] for c in CLASSES])
    assert np.allclose(got, expected, atol=1e-5) and not np.allclose(got, np.array(list(plain[0]["probabilities"].values())), atol=1e-4)


def test_predict_files_batches_agree_and_errors_keep_order(tiny_model: Path, slides: Path) -> None:
    predictor = TorchPredictor(tiny_model)
    files = expand_inputs([slides]).files
    files = files + [slides / "notes.txt"]
    seen: list[int] = []
    small = predictor.predict_files(files, batch=2, on_batch=seen.append)
    large = predictor.predict_files(files, batch=64)
    assert seen == [2, 4, 6, 8]
    assert [r.source for r in small] == [str(f) for f in files]
    assert [r.error is None for r in small] == [True] * 6 + [False, False]  # truncated.jpg, notes.txt
    assert "not an image" in small[-1].error
    for a, b in zip(small, large):
        assert a.label == b.label and (a.ok is False or np.allclose(list(a.probabilities.values()), list(b.probabilities.values()), atol=1e-5))
    with pytest.raises(ValueError, match="shape"):
        predictor.predict(np.zeros((1, TINY_SIZE + 1, TINY_SIZE, 3), np.uint8))


def test_console_script_exit_codes(tiny_model: Path, slides: Path) -> None:
    """Through the real entry point: 1 when a file failed, 2 on a usage error with a one-line message."""
    env = child_env()
    command = [sys.executable, "-m", "bloodcell", "predict", "-m", str(tiny_model)]
    failed = subprocess.run(check=False, args=[*command, str(slides), "--json"], capture_output=True, text=True, timeout=120, env=env)
    assert failed.returncode == 1, failed.stderr
    assert json.loads(failed.stdout)["n_failed"] == 1
    usage = subprocess.run(check=False, args=[*command, str(slides), "--out", "x.txt"], capture_output=True, text=True, timeout=120, env=env)
    assert usage.returncode == 2 and usage.stderr.strip().startswith("error:") and "Traceback" not in usage.stderr


def test_a_model_folder_named_like_an_onnx_file_is_a_model_folder(tiny_model: Path, slides: Path, tmp_path: Path) -> None:
    import shutil

    folder = tmp_path / "run.onnx"
    shutil.copytree(tiny_model, folder)
    image = str(slides / "cell-000.jpg")
    result = run("predict", "-m", str(folder), image, "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["model"]["backend"] == "torch"
    result = run("explain", str(folder), image, "--out", str(tmp_path / "x"), "--json")
    assert result.exit_code == 0, result.output


def test_explaining_through_a_link_to_an_export_finds_its_weights(tiny_model: Path, slides: Path, tmp_path: Path) -> None:
    from bloodcell.serve.export import export_onnx

    model_dir = tmp_path / "model"
    model_dir.mkdir()
    for name in ("card.json", "model.safetensors"):
        (model_dir / name).write_bytes((tiny_model / name).read_bytes())
    link = tmp_path / "link.onnx"
    link.symlink_to(export_onnx(model_dir, model_dir / "onnx" / "model.onnx"))
    result = run("explain", str(link), str(slides / "cell-000.jpg"), "--out", str(tmp_path / "x"), "--json")
    assert result.exit_code == 0, result.output


def test_library_calls_leave_the_callers_state_alone(tiny_model: Path, slides: Path) -> None:
    """A notebook user's random numbers, and a lone path given as a string, are not the predictor's to change."""
    import warnings

    import torch

    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    predictor = TorchPredictor(tiny_model)  # builds a network, whose initial weights are random numbers
    assert torch.equal(torch.rand(3), expected)
    (result,) = predictor.predict_files(str(slides / "cell-000.jpg"))  # one file, not one per character
    assert result.ok
    images = np.stack([decode_image(slides / f"cell-00{k}.jpg", TINY_SIZE) for k in range(2)])
    images.flags.writeable = False  # as a slice of the memory-mapped cache is
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        predictor.predict(images)


def test_predict_names_the_images_that_are_not_square_once(tiny_model: Path, slides: Path) -> None:
    from PIL import Image

    square = run("predict", "-m", str(tiny_model), str(slides), "--batch", "2")
    assert "not square" not in square.stderr
    frame = slides / "day2" / "frame.jpg"
    Image.open(slides / "cell-000.jpg").resize((96, 72)).save(frame)  # a 4:3 camera frame
    for args in ((), ("--json",)):  # on stderr with --json too, leaving stdout to the JSON
        result = run("predict", "-m", str(tiny_model), str(slides), "--batch", "2", *args)
        assert result.exit_code == 1, result.output  # the truncated file
        assert result.stderr.count("not square") == 1, result.stderr
        assert (f"1 of the 7 images is not square; resizing to a square squashes the cells along the longer side by up "
                f"to 25 % ({frame}: 96x72)") in result.stderr  # fmt: skip
    assert json.loads(result.stdout)["n_files"] == 8


def test_explain_names_the_images_that_are_not_square(tiny_model: Path, slides: Path, tmp_path: Path) -> None:
    from PIL import Image

    square = slides / "cell-000.jpg"
    result = run("explain", str(tiny_model), str(square), "--out", str(tmp_path / "a"))
    assert result.exit_code == 0 and "not square" not in result.stderr, result.output
    wide = tmp_path / "wide.png"
    Image.open(square).resize((200, 120)).save(wide)
    for args in ((), ("--json",)):  # on stderr with --json too, leaving stdout to the JSON
        result = run("explain", str(tiny_model), str(square), str(wide), "--out", str(tmp_path / "b"), *args)
        assert result.exit_code == 0, result.output
        assert result.stderr.count("not square") == 1, result.stderr
        assert (f"1 of the 2 images is not square; resizing to a square squashes the cells along the longer side by up "
                f"to 40 % ({wide}: 200x120)") in result.stderr  # fmt: skip
    assert [row["size"] for row in json.loads(result.stdout)["images"]] == [[96, 96], [200, 120]]


@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs Linux's /proc, where no file can be made")
def test_an_out_that_cannot_be_written_is_refused_before_any_image_is_read(
    tiny_model: Path, slides: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Its folder exists and the suffix is right, but no file can be made there (root included): found
    only after every image was classified, it lost them all."""
    import bloodcell.cli.serve as serve_cli

    def no_model_yet(*args: object) -> None:
        raise AssertionError("the model was loaded before --out was checked")

    monkeypatch.setattr(serve_cli, "make_predictor", no_model_yet)
    result = run("predict", "-m", str(tiny_model), str(slides), "--out", "/proc/results.csv", "--json")
    assert isinstance(result.exception, UserError) and "--out /proc/results.csv: cannot write in /proc" in str(result.exception)
    assert not [name for name in os.listdir("/proc") if name.startswith(".results.csv.")]


@pytest.mark.parametrize("as_json", [True, False])
def test_results_that_cannot_be_written_at_the_end_are_printed_before_the_error(
    tiny_model: Path, slides: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, as_json: bool
) -> None:
    """The folder became read-only (or full) while the images were classified: nothing computed is lost."""
    import errno

    import bloodcell.cli.serve as serve_cli

    def full_disk(path: Path, *args: object) -> None:
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(serve_cli, "write_results", full_disk)
    out = tmp_path / "results.csv"
    result = run("predict", "-m", str(tiny_model), str(slides / "*.jpg"), "--out", str(out), *(["--json"] if as_json else []))
    assert isinstance(result.exception, UserError) and f"--out {out}: cannot write the results" in str(result.exception)
    if as_json:
        assert json.loads(result.stdout)["n_files"] == 3
    else:
        assert len(re.findall(r"\b[01]\.\d{3}\b", result.stdout)) == 3 * len(CLASSES)  # the table's rows
        assert "3 of 3 classified" in result.stderr and "written to" not in result.stderr


def test_names_that_are_not_utf8_are_escaped_in_missing_rows_and_skipped_files(
    tiny_model: Path, slides: Path, tmp_path: Path
) -> None:
    """An input that matched nothing and a file passed over in a folder: the CSV crashed on the first, and
    --json showed the second as a lone surrogate."""
    missing = os.fsdecode(os.path.join(os.fsencode(tmp_path), b"nope\xe9.jpg"))
    (slides / os.fsdecode(b"not\xe9s.txt")).write_text("not an image")
    out = tmp_path / "results.csv"
    result = run("predict", "-m", str(tiny_model), str(slides / "cell-000.jpg"), missing, "--out", str(out))
    assert result.exit_code == 1 and not isinstance(result.exception, UnicodeError), result.output
    rows = list(csv.DictReader(out.open(encoding="utf-8")))
    assert rows[1]["file"] == f"{tmp_path}/nope\\xe9.jpg" and rows[1]["error"] == "no such file or folder"
    skipped = json.loads(run("predict", "-m", str(tiny_model), str(slides), "--json").stdout)["skipped"]
    assert sorted(skipped) == [str(slides / "not\\xe9s.txt"), str(slides / "notes.txt")]


@pytest.mark.parametrize("backend", ["torch", "onnx"])
def test_both_backends_send_at_most_the_largest_forward_batch_through_the_network(
    tiny_model: Path, tiny_onnx: Path, monkeypatch: pytest.MonkeyPatch, backend: str
) -> None:
    """ONNX Runtime took a --batch 3000 whole (4.6 GB at its peak); the answers stay the same."""
    import bloodcell.serve.common as common

    predictor = common.load_predictor(tiny_model if backend == "torch" else tiny_onnx, backend)[0]
    images = np.random.default_rng(0).integers(0, 256, (5, TINY_SIZE, TINY_SIZE, 3), dtype=np.uint8)
    whole = predictor.predict(images)
    network = predictor.logits
    sizes: list[int] = []

    def counted(batch: np.ndarray) -> np.ndarray:
        sizes.append(len(batch))
        return network(batch)

    monkeypatch.setattr(predictor, "logits", counted)
    monkeypatch.setattr(common, "MAX_FORWARD_BATCH", 2)
    assert np.allclose(predictor.predict(images), whole, atol=1e-6)
    assert sizes == [2, 2, 1]
    sizes.clear()
    predictor.predict(images, tta="flips")
    assert sizes == [2, 2, 1] * 4


def test_an_onnx_export_s_card_points_at_its_onnx_file(tiny_onnx: Path, slides: Path) -> None:
    """`predict onnx/card.json`: "no model found (expected card.json and model.safetensors ...)" named no way out."""
    result = run("predict", str(tiny_onnx.parent / "card.json"), str(slides / "cell-000.jpg"))
    assert isinstance(result.exception, UserError), result.output
    assert f"an ONNX export, not a PyTorch model (no model.safetensors): pass {tiny_onnx}" in str(result.exception)


@pytest.mark.parametrize("part", ["model.safetensors", "exported.onnx", "checkpoints/"])
def test_a_model_folder_without_its_card_given_first_is_no_image_folder(tiny_model: Path, slides: Path, tmp_path: Path,
                                                                        part: str) -> None:  # fmt: skip
    """A model folder that lost its card.json was searched for images ("a folder with no image files") and
    the bundled model answered the other inputs."""
    broken = tmp_path / "broken-model"
    broken.mkdir()
    if part.endswith("/"):
        (broken / part).mkdir()
    else:
        (broken / part).write_bytes(b"weights")
    result = run("predict", str(broken), str(slides / "cell-001.jpg"))
    assert result.exit_code != 0 and "no model found" in str(result.exception) + result.output
