"""The CLI's last line of defence: the machine's state (a full disk, a read-only folder) and SIGTERM."""

from __future__ import annotations

import errno
import os
import re
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml


def run_cli(args: list[str], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> tuple[int, str]:
    from bloodcell.cli import main

    monkeypatch.setattr(sys, "argv", ["bloodcell", *args])
    with pytest.raises(SystemExit) as exit_info:
        main()
    return int(exit_info.value.code or 0), capsys.readouterr().err


def test_a_full_disk_is_one_line_naming_the_file_not_its_temporary(aria_dataset: Path, tmp_path: Path, monkeypatch,
                                                                   capsys) -> None:  # fmt: skip
    from bloodcell import io

    def no_space(source, target):
        raise OSError(errno.ENOSPC, "No space left on device", str(source))

    monkeypatch.setattr(io.os, "replace", no_space)
    target = tmp_path / "manifest.csv"
    code, err = run_cli(["index", str(aria_dataset), "--out", str(target), "--no-progress"], monkeypatch, capsys)
    assert code == 2 and "Traceback" not in err
    named = re.fullmatch(r"error: (\S+): No space left on device\n", err)
    assert named and not Path(named.group(1)).name.startswith(".")  # the file itself, not a hidden temporary
    assert not any(p.name.startswith(".") for p in Path(named.group(1)).parent.iterdir())  # the temporary is gone


def test_a_read_only_folder_is_one_line_naming_the_file_not_its_temporary(aria_dataset: Path, tmp_path: Path,
                                                                         monkeypatch, capsys) -> None:  # fmt: skip
    from bloodcell import io

    def refused(prefix, suffix, dir):  # what mkstemp raises in a folder it may not write: the temporary's name
        raise PermissionError(errno.EACCES, "Permission denied", os.path.join(dir, prefix + "x1y2" + suffix))

    monkeypatch.setattr(io.tempfile, "mkstemp", refused)
    target = tmp_path / "manifest.csv"
    code, err = run_cli(["index", str(aria_dataset), "--out", str(target), "--no-progress"], monkeypatch, capsys)
    named = re.fullmatch(r"error: (\S+): Permission denied\n", err)
    assert code == 2 and named and not Path(named.group(1)).name.startswith(".")  # the file, not a temporary


def test_bloodcell_debug_keeps_the_traceback_of_an_environment_error(aria_dataset: Path, tmp_path: Path, monkeypatch,
                                                                     capsys) -> None:  # fmt: skip
    from bloodcell import io

    def no_space(source, target):
        raise OSError(errno.ENOSPC, "No space left on device", str(source))

    monkeypatch.setattr(io.os, "replace", no_space)
    monkeypatch.setenv("BLOODCELL_DEBUG", "1")
    with pytest.raises(OSError, match="No space left on device"):
        run_cli(["index", str(aria_dataset), "--no-progress"], monkeypatch, capsys)


def test_a_programming_error_is_not_dressed_as_the_users(monkeypatch, capsys) -> None:
    """Only the OSErrors of the environment are one line; any other keeps its traceback for a bug report."""
    from bloodcell.cli import app, main

    @app.command("explode-for-test", hidden=True)
    def explode() -> None:
        raise OSError(errno.EBADF, "Bad file descriptor")

    monkeypatch.setattr(sys, "argv", ["bloodcell", "explode-for-test"])
    try:
        with pytest.raises(OSError, match="Bad file descriptor"):
            main()
    finally:
        app.registered_commands[:] = [c for c in app.registered_commands if c.name != "explode-for-test"]


def test_sigterm_stops_like_ctrl_c_and_leaves_no_temporary_file(tmp_path: Path) -> None:
    """timeout, docker stop and SLURM send SIGTERM: every `finally` runs, as for Ctrl-C, and the exit is 143."""
    script = textwrap.dedent(
        """
        import sys, time
        from bloodcell import io
        from bloodcell.cli import app, main

        @app.command("hang")
        def hang(path: str) -> None:
            with io.atomic_path(path) as tmp:
                tmp.write_text("half")
                print("ready", flush=True)
                time.sleep(60)

        sys.argv = ["bloodcell", "hang", sys.argv[1]]
        main()
        """
    )
    target = tmp_path / "out" / "result.txt"
    process = subprocess.Popen([sys.executable, "-c", script, str(target)], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)  # fmt: skip
    assert process.stdout.readline().strip() == "ready"
    process.terminate()
    _, err = process.communicate(timeout=60)
    assert process.returncode == 143 and "terminated" in err and "Traceback" not in err
    assert os.listdir(target.parent) == []  # neither the result nor its temporary


@pytest.mark.parametrize(("signal_number", "status", "word"), [(signal.SIGTERM, 143, "terminated"),
                                                              (signal.SIGINT, 130, "interrupted")])
def test_the_server_stopped_by_a_signal_says_so_with_its_status(tiny_model: Path, signal_number: int, status: int,
                                                                word: str) -> None:  # fmt: skip
    """uvicorn shuts down cleanly on SIGTERM or Ctrl-C and would end with status 0; a scheduler must see 143."""
    from serve_support import infer_speed_module

    bench = infer_speed_module()
    port = bench.free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "bloodcell", "serve", str(tiny_model), "--host", "127.0.0.1", "--port", str(port),
         "--log-level", "warning"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        bench.wait_until_healthy(port, 120, process)
    finally:
        process.send_signal(signal_number)
        _, err = process.communicate(timeout=60)
    assert process.returncode == status and word in err


def test_error_lines_are_coloured_on_a_terminal_unless_no_color_is_set(monkeypatch: pytest.MonkeyPatch) -> None:
    """click already drops colour off a terminal; NO_COLOR (no-color.org) asks for none on one too."""
    from bloodcell.cli import messages

    colours: list[str | None] = []
    monkeypatch.setattr(messages.typer, "secho", lambda text, fg=None, err=False: colours.append(fg))
    monkeypatch.delenv("NO_COLOR", raising=False)
    messages.error_line("error: x")
    monkeypatch.setenv("NO_COLOR", "1")
    messages.error_line("error: x")
    messages.warning_line("interrupted")
    assert colours == ["red", None, None]


def test_a_path_of_the_wrong_kind_is_said_in_words(aria_dataset: Path, tmp_path: Path, monkeypatch, capsys) -> None:
    """"Is a directory" or "Not a directory" from the OS, said as what the user gave and what is needed."""
    folder, file = tmp_path / "a-folder", tmp_path / "a-file"
    folder.mkdir()
    file.write_text("x")
    code, err = run_cli(["index", str(aria_dataset), "--out", str(folder), "--no-progress"], monkeypatch, capsys)
    assert code == 2 and err == f"error: {folder}: is a folder, where a file is needed\n"
    code, err = run_cli(["index", str(aria_dataset), "--out", str(file / "m.csv"), "--no-progress"], monkeypatch, capsys)
    assert code == 2 and err == f"error: {file}: already exists as a file, where a folder is needed\n"


@pytest.mark.parametrize("option", [["--max-upload-mb", "inf"], ["--max-upload-mb", "2048"], ["--port", "0"]])
def test_serve_refuses_limits_it_cannot_keep_before_loading_anything(option: list[str]) -> None:
    """An infinite upload limit crashed with a traceback; port 0 listened on a port nobody was told."""
    from typer.testing import CliRunner

    from bloodcell.cli import app

    result = CliRunner().invoke(app, ["serve", *option])
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output and option[0] in result.output


def test_missing_initial_weights_are_refused_before_a_run_folder_is_made(aria_dataset: Path, tmp_path: Path,
                                                                         monkeypatch, capsys) -> None:  # fmt: skip
    out = tmp_path / "run"
    code, err = run_cli(["train", "--data", str(aria_dataset), "--weights", str(tmp_path / "nope.safetensors"),
                         "--out", str(out), "--no-progress"], monkeypatch, capsys)  # fmt: skip
    assert code == 2 and "initial weights not found" in err and "nope.safetensors" in err
    assert not out.exists()


def test_a_run_whose_data_moved_says_so_and_how_to_point_at_them(aria_dataset: Path, tmp_path: Path, monkeypatch,
                                                                 capsys) -> None:  # fmt: skip
    """'dataset folder not found' alone did not say it was the run's recorded data, nor what to do."""
    from bloodcell.config import load_config

    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    config = load_config("default", [f"data.root={tmp_path / 'moved-away'}"])
    (run / "config.yaml").write_text(yaml.safe_dump(config.model_dump(mode="json")))
    code, err = run_cli(["train", "--resume", str(run), "--no-progress"], monkeypatch, capsys)
    assert code == 2 and "no longer at" in err and "--data DATA" in err


def _printed(*renderables: object) -> str:
    from io import StringIO

    from rich.console import Console

    console = Console(file=StringIO(), width=200)
    for renderable in renderables:
        console.print(renderable)
    return console.file.getvalue()  # type: ignore[attr-defined]


def test_evaluate_prints_class_and_folder_names_as_they_are_not_as_markup() -> None:
    """rich reads "[...]" as markup: a class named "[/x]" raised after the whole evaluation had run, and one
    named "[b]" was shown as nothing (in bold). Also: one block is "1 block"."""
    from bloodcell.cli.evaluate import summary_tables

    scores = {"precision": 0.5, "recall": 0.5, "f1": 0.5, "support": 10}
    metrics = {
        "model": {"architecture": "bloodnet"}, "data": {"root": "/data/[b]cells", "n_blocks": 1}, "n_images": 20,
        "evaluation": {"split": "test"}, "balanced_accuracy": 0.5, "balanced_accuracy_ci": [0.4, 0.6],
        "accuracy": 0.5, "macro_f1": 0.5, "roc_auc_macro": 0.5, "ece": 0.05, "ece_after_temperature": 0.04,
        "temperature": 1.0, "temperature_source": "model card", "per_class": {"[/x]": scores, "[b]": scores},
        "roc_auc": {"[/x]": 0.5, "[b]": 0.5},
        "robustness": {"clean": {"balanced_accuracy": 0.5},
                       "shifts": {"[/blur]": {s: {"balanced_accuracy": 0.4} for s in (1, 2, 3)}},
                       "worst": {s: {"balanced_accuracy": 0.4, "shift": "[/blur]"} for s in ("1", "2", "3")}},
    }  # fmt: skip
    shown = _printed(*summary_tables(metrics))
    assert "the test part of [b]cells (20 images, 1 block)" in " ".join(shown.split())  # the title wraps
    assert "[/x]" in shown and "[b] " in shown and shown.count("[/blur]") == 4
    assert "worst" in shown and "[bold]" not in shown  # the code's own markup still works


def test_evaluate_shows_control_characters_in_class_and_folder_names_as_escapes() -> None:
    """A class or data folder named with ESC sequences would move the cursor and erase lines on a terminal."""
    from bloodcell.cli.evaluate import summary_tables

    scores = {"precision": 0.5, "recall": 0.5, "f1": 0.5, "support": 10}
    metrics = {
        "model": {"architecture": "bloodnet"}, "data": {"root": "/data/cells\x1b[2J", "n_blocks": 1}, "n_images": 20,
        "evaluation": {"split": "test"}, "balanced_accuracy": 0.5, "balanced_accuracy_ci": [0.4, 0.6],
        "accuracy": 0.5, "macro_f1": 0.5, "roc_auc_macro": 0.5, "ece": 0.05, "ece_after_temperature": 0.04,
        "temperature": 1.0, "temperature_source": "model card", "per_class": {"up\x1b[1A\x9b2K": scores},
        "roc_auc": {"up\x1b[1A\x9b2K": 0.5},
    }  # fmt: skip
    shown = _printed(*summary_tables(metrics))
    assert not re.search("[\x00-\x09\x0b-\x1f\x7f-\x9f]", shown), repr(shown)
    assert "cells\\x1b[2J" in shown and "up\\x1b[1A\\x9b2K" in shown


def _index_printed(data: Path, classes: tuple[str, str], file_name: str, out_csv: Path, monkeypatch, capsys) -> str:
    """What ``bloodcell index`` prints for ``data`` made of two class folders of three small images each."""
    import numpy as np
    from PIL import Image

    from bloodcell.cli import main

    rng = np.random.default_rng(0)
    for name in classes:
        (data / name).mkdir(parents=True, exist_ok=True)
        for k in range(3):
            Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(data / name / file_name.format(k))
    monkeypatch.setenv("COLUMNS", "500")  # the path on one line
    monkeypatch.setattr(sys, "argv", ["bloodcell", "index", str(data), "--out", str(out_csv), "--no-progress"])
    with pytest.raises(SystemExit) as exit_info:
        main()
    out = capsys.readouterr().out
    assert not exit_info.value.code, out
    return out


def test_index_prints_class_and_data_folder_names_as_they_are(tmp_path: Path, monkeypatch, capsys) -> None:
    """A plain class-per-folder layout takes its class names from the folders: "[b]" vanished from the table,
    and "[red]" from the data folder's name in the summary line (Kaggle's "[Malignant] Pre-B" survived only
    because "Malignant" is no style rich knows)."""
    data = tmp_path / "[red]slides"
    out = _index_printed(data, ("[b]", "mono"), "[i]{}.png", tmp_path / "m.csv", monkeypatch, capsys)
    assert f"under {data} " in out and "│ [b]   │      3 │" in out and "│ mono  │      3 │" in out


def test_index_shows_control_characters_in_class_and_rejected_file_names_as_escapes(
    tmp_path: Path, monkeypatch, capsys
) -> None:
    """The index's table and its list of rejected files printed names as they were: a class folder or file
    named with ESC sequences moved the cursor and erased lines on a terminal."""
    data = tmp_path / "slides"
    (data / "mono").mkdir(parents=True)
    (data / "mono" / "x\x1b[2K.png").write_bytes(b"")
    out = _index_printed(data, ("up\x1b[1A", "mono"), "{}.png", tmp_path / "m.csv", monkeypatch, capsys)
    assert not re.search("[\x00-\x09\x0b-\x1f\x7f-\x9f]", out), repr(out)
    assert "up\\x1b[1A" in out and "rejected mono/x\\x1b[2K.png: empty file" in out
