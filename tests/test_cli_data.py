"""``bloodcell index | split | audit``: --json keys, summaries, help, and one-line errors without tracebacks."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from typer.testing import CliRunner

from bloodcell.cli import app
from test_index import SUMMARY_KEYS

runner = CliRunner()

SPLIT_KEYS = {"protocol", "seed", "counts", "blocks", "leakage_check", "leakage_message", "capture_gaps", "split",
              "split_rules", "split_sha256"}


def invoke(*args: str) -> dict | str:
    result = runner.invoke(app, list(args), catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout) if "--json" in args else result.stdout


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    """The installed entry point in a fresh process, as a user runs it."""
    return subprocess.run(
        [sys.executable, "-m", "bloodcell", *args],
        check=False,
        capture_output=True,
        text=True,
        env=os.environ.copy(),
        timeout=120,
    )


def test_index_json(aria_dataset: Path) -> None:
    summary = invoke("index", str(aria_dataset), "--json")
    assert set(summary) == SUMMARY_KEYS  # the CLI's --json is build_index's summary
    assert summary["images"] == 96 and summary["accepted"] == 96 and summary["rejected"] == []
    assert summary["classes"] == {"Benign": 24, "Early Pre-B": 24, "Pre-B": 24, "Pro-B": 24}
    assert Path(summary["manifest"]).is_file()


def test_index_human_summary_and_options(aria_dataset: Path, tmp_path: Path) -> None:
    (aria_dataset / "Original" / "Pro" / "WBC-Malignant-Pro-999.jpg").write_bytes(b"")
    output = invoke(
        "index",
        str(aria_dataset),
        "--variant",
        "Segmented",
        "--out",
        str(tmp_path / "m.csv"),
        "--no-progress",
    )
    assert "Indexed 96 files" in output and "Duplicates:" in output
    assert (tmp_path / "m.csv").is_file()
    output = invoke("index", str(aria_dataset), "--no-progress")
    assert "rejected Pro/WBC-Malignant-Pro-999.jpg: empty file (0 bytes)" in output


def test_index_with_class_names(aria_dataset: Path) -> None:
    summary = invoke("index", str(aria_dataset / "Original"), "--classes", "Pro, Benign", "--json")
    assert summary["classes"] == {"Pro": 24, "Benign": 24}


@pytest.mark.parametrize("protocol", ["session", "random", "kfold"])
def test_split_json(aria_dataset: Path, protocol: str) -> None:
    summary = invoke("split", str(aria_dataset), "--protocol", protocol, "--seed", "3", "--json")
    assert set(summary) == SPLIT_KEYS
    assert summary["protocol"] == protocol and summary["seed"] == 3
    assert summary["leakage_check"] == "passed"
    assert sum(part["total"] for part in summary["counts"].values()) == 96
    table = pd.read_csv(summary["split"])
    assert set(table["split"]) <= {"train", "val", "test", "embargo"} and len(table) == 96


def test_split_human_summary(aria_dataset: Path, tmp_path: Path) -> None:
    output = invoke("split", str(aria_dataset), "--out", str(tmp_path / "s.csv"), "--no-progress")
    assert "Leakage check: passed" in output and (tmp_path / "s.csv").is_file()


def test_split_exits_1_when_the_leakage_check_fails(
    aria_dataset: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from bloodcell.data import splits

    real = splits.make_split

    def leaky(*args, **kwargs):
        table = real(*args, **kwargs)
        test_row = table.index[table["split"] == "test"][0]
        table.loc[test_row, "sha256"] = table.loc[table.index[table["split"] == "train"][0], "sha256"]
        return table

    monkeypatch.setattr(splits, "make_split", leaky)
    result = runner.invoke(app, ["split", str(aria_dataset), "--json"])
    assert result.exit_code == 1
    assert json.loads(result.stdout)["leakage_check"] == "failed"


def test_audit_json(aria_dataset: Path, tmp_path: Path) -> None:
    report = invoke(
        "audit", str(aria_dataset), "--out", str(tmp_path), "--size", "32", "--ring", "4", "--json"
    )
    assert report["images"] == 96
    assert {"balanced_accuracy", "chance", "statement", "verdict"} <= set(report["shortcut_baseline"])
    assert (tmp_path / "audit.md").is_file() and (tmp_path / "audit.json").is_file()
    summary = " ".join(invoke("audit", str(aria_dataset), "--out", str(tmp_path), "--size", "32", "--ring", "4",
                              "--no-progress").split())  # fmt: skip
    covered = report["stained_cell_coverage"]["Benign"]["mean"]
    assert f"Stained-cell masks (Grad-CAM's energy measure) cover {100 * covered:.1f} % of Benign" in summary
    for baseline in ("shortcut_baseline", "colour_statistics_baseline"):  # both shortcuts, the stronger too
        assert " ".join(report[baseline]["statement"].split()) in summary, baseline


@pytest.mark.parametrize("command", [[], ["index"], ["split"], ["audit"]])
def test_help(command: list[str]) -> None:
    result = runner.invoke(app, [*command, "--help"])
    assert result.exit_code == 0
    assert "Usage" in result.stdout
    if not command:
        for name in ("index", "split", "audit"):
            assert name in result.stdout


def test_user_errors_are_one_line_without_traceback(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    (tmp_path / "noclasses" / "x").mkdir(parents=True)
    (tmp_path / "noclasses" / "x" / "notes.txt").write_text("no images here")
    cases = {
        ("index", str(tmp_path / "missing")): "dataset folder not found",
        ("split", str(tmp_path / "empty")): "dataset folder is empty",
        ("audit", str(tmp_path / "noclasses"), "--json"): "no recognisable classes",
    }
    for args, message in cases.items():
        result = run_cli(*args)
        assert result.returncode == 2, (args, result.stderr)
        assert "Traceback" not in result.stderr and result.stdout == ""
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], result.stderr


@pytest.mark.slow
def test_index_real_data_json(real_data: Path) -> None:
    summary = invoke("index", str(real_data), "--json")
    assert summary["images"] == 2576
    assert summary["classes"] == {"Benign": 380, "Early Pre-B": 789, "Pre-B": 771, "Pro-B": 636}
    assert summary["exact_duplicate_groups"] >= 1


def test_split_prints_the_settings_that_give_train_the_same_split(aria_dataset: Path, tmp_path: Path) -> None:
    """train rebuilds the split from its config: what split prints must give it the very split it showed."""
    import shlex

    from bloodcell.config import load_config
    from bloodcell.data.prepare import prepare_data

    classes = "Benign,Early Pre-B,Pre-B,Pro-B"
    output = invoke("split", str(aria_dataset), "--seed", "3", "--block-size", "6", "--embargo", "1",
                    "--classes", classes, "--out", str(tmp_path / "shown.csv"), "--no-progress")  # fmt: skip
    printed = output.replace("\n", " ").split("for this one, give them ", 1)[1]
    words = shlex.split(printed)
    overrides = [value for flag, value in zip(words[::2], words[1::2], strict=True) if flag == "--set"]
    assert len(overrides) == 4, overrides  # seed, block size, embargo, classes: the others are the defaults
    config = load_config("default", overrides)
    prepared = prepare_data(config.data, root=aria_dataset, progress=False)
    shown = pd.read_csv(tmp_path / "shown.csv").set_index("path")["split"]
    rebuilt = pd.read_csv(prepared.split_path).set_index("path")["split"]
    pd.testing.assert_series_equal(rebuilt, shown)
    assert "for this one" not in invoke("split", str(aria_dataset), "--no-progress")  # the defaults: nothing to add


def test_split_table_lists_many_classes_one_a_row() -> None:
    """30 classes as columns left every cell blank or cut at 120 columns: past a few, a class a row."""
    from rich.console import Console

    from bloodcell.cli.data import WIDE_SPLIT_TABLE, _split_table

    classes = [f"class{k:02d}" for k in range(30)]
    parts = ("train", "val", "test", "embargo")
    summary = {"counts": {p: {**{c: 10 + k for k, c in enumerate(classes)}, "total": 1000} for p in parts},
               "blocks": dict.fromkeys(parts, 7)}  # fmt: skip
    console = Console(width=100, record=True)
    console.print(_split_table(summary, classes, "Split"))
    text = console.export_text()
    assert len(classes) > WIDE_SPLIT_TABLE and "class29" in text and "…" not in text
    assert [c.header for c in _split_table(summary, classes, "Split").columns] == ["class", *parts]
    assert [c.header for c in _split_table(summary, classes[:4], "Split").columns][:2] == ["part", "class00"]


@pytest.mark.parametrize("names", [["🩸", "B"], ["yes", "null", "1e3", ":", "a: b", "#x", "'q'", '"d"', "\x7fdel"]])
def test_the_printed_split_settings_read_back_exactly(names: list[str]) -> None:
    """Class names YAML would read as something else (or JSON would write as broken surrogates)."""
    import shlex

    from bloodcell.cli.data import train_overrides
    from bloodcell.config import apply_overrides

    words = shlex.split(train_overrides({"class_names": names, "protocol": "random", "split_seed": 3}))
    data = apply_overrides({}, words[1::2])["data"]
    assert data == {"class_names": names, "protocol": "random", "split_seed": 3}


def _write_images(folder: Path, count: int, seed: int) -> None:
    import numpy as np
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for number in range(1, count + 1):
        pixels = rng.integers(0, 255, size=(24, 24, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"img_{number:03d}.png")


def test_a_class_without_usable_images_is_named_by_split(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """An empty class folder, or one of rejected files only, showed as zeros in the table without a word."""
    for index, name in enumerate(("Benign", "Pre")):
        _write_images(tmp_path / "d" / name, 30, index)
    (tmp_path / "d" / "Early").mkdir()
    (tmp_path / "d" / "Pro").mkdir()
    for number in range(3):
        (tmp_path / "d" / "Pro" / f"bad_{number}.jpg").write_text("not an image")
    with caplog.at_level("WARNING"):
        invoke("split", str(tmp_path / "d"), "--no-progress", "--out", str(tmp_path / "s.csv"))
    assert "class Early Pre-B has no usable image (its folder holds no files" in caplog.text
    assert "class Pro-B has no usable image (all 3 of its files were rejected" in caplog.text


def test_an_audit_that_cannot_split_says_where_the_counts_are(tmp_path: Path) -> None:
    _write_images(tmp_path / "d" / "Benign", 30, 0)
    _write_images(tmp_path / "d" / "Small", 1, 1)
    result = run_cli("audit", str(tmp_path / "d"), "--no-progress", "--out", str(tmp_path / "a"))
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "class 'Small' has only 1 image(s)" in result.stderr
    assert f"`bloodcell index {tmp_path / 'd'}` lists the counts, rejected files and duplicate groups" in result.stderr
