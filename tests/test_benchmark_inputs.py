"""The benchmark scripts refuse bad input with one line, before measuring anything (not a traceback, and not
a measurement of something other than what was asked for)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from benchmark_support import BENCHMARKS, benchmark_module


def last_error_line(capsys: pytest.CaptureFixture[str]) -> str:
    """The error line, not argparse's usage line above it."""
    return capsys.readouterr().err.strip().splitlines()[-1]


def test_cache_speed_names_a_missing_dataset_in_one_line(tmp_path: Path) -> None:
    cache_speed = benchmark_module("cache_speed")
    with pytest.raises(SystemExit) as refused:
        cache_speed.main([str(tmp_path / "absent")])
    assert refused.value.code == f"dataset folder not found: {tmp_path / 'absent'} (pass DATA or set BLOODCELL_DATA)"


def test_cache_speed_takes_its_default_dataset_from_bloodcell_data(tmp_path: Path) -> None:
    """As the other scripts do: run as a script, so its default is read from this environment."""
    absent = tmp_path / "elsewhere"
    finished = subprocess.run(
        [sys.executable, str(BENCHMARKS / "cache_speed.py")], env={**os.environ, "BLOODCELL_DATA": str(absent)},
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    expected = f"dataset folder not found: {absent} (pass DATA or set BLOODCELL_DATA)"
    assert finished.returncode == 1 and finished.stderr.strip() == expected, finished.stderr


@pytest.mark.parametrize(("argv", "said"), [
    (["--n-images", "0"], "--n-images must be at least 1, got 0"),
    (["--duration", "0"], "--duration must be more than 0 seconds, got 0.0"),  # was a ZeroDivisionError
    (["--load-duration", "-1"], "--load-duration must be more than 0 seconds, got -1.0"),
    (["--clients", "0"], "--clients must be at least 1, got 0"),
])  # fmt: skip
def test_infer_speed_refuses_settings_that_measure_nothing(capsys: pytest.CaptureFixture[str], argv: list[str],
                                                            said: str) -> None:  # fmt: skip
    with pytest.raises(SystemExit) as refused:
        benchmark_module("infer_speed").main(argv)
    error = last_error_line(capsys)
    assert refused.value.code == 2 and f"error: {said}" in error, error


@pytest.mark.parametrize(("folder", "what"), [("typo", "is not a folder"), ("pngs", "holds no JPEGs")])
def test_infer_speed_refuses_an_images_folder_without_jpegs(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], folder: str, what: str
) -> None:
    """Only the default folder falls back to synthetic JPEGs: a folder named by hand is what must be measured."""
    (tmp_path / "pngs").mkdir()
    (tmp_path / "pngs" / "cell.png").write_bytes(b"")
    with pytest.raises(SystemExit) as refused:
        benchmark_module("infer_speed").main(["--images", str(tmp_path / folder), "--skip", "load"])
    error = last_error_line(capsys)
    assert refused.value.code == 2 and f"error: --images {tmp_path / folder} {what}" in error, error


def test_infer_speed_refuses_a_bloodcell_data_without_jpegs(tmp_path: Path) -> None:
    """BLOODCELL_DATA names the dataset as --images does: a wrong one is a typo, not a cue for synthetic images."""
    absent = tmp_path / "nowhere"
    finished = subprocess.run(
        [sys.executable, str(BENCHMARKS / "infer_speed.py"), "--n-images", "4", "--skip", "load"],
        env={**os.environ, "BLOODCELL_DATA": str(absent)}, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    expected = (f"infer_speed.py: error: BLOODCELL_DATA {absent} is not a folder (pass --images FOLDER, or unset "
                "BLOODCELL_DATA for synthetic JPEGs)")  # fmt: skip
    assert finished.returncode == 2 and finished.stderr.strip().splitlines()[-1] == expected, finished.stderr


def test_cache_speed_measures_any_layout_the_index_reads(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """One folder per class, as the Kaggle copy or a user's own data, not only the Aria layout."""
    from conftest import make_aria_dataset

    make_aria_dataset(tmp_path / "aria", per_class=3, size=32, segmented=False)
    plain = (tmp_path / "aria" / "Original").rename(tmp_path / "plain")  # the class folders, nothing above them
    benchmark_module("cache_speed").main([str(plain), "--size", "16"])
    assert "Decoded cache, 12 images at 16px" in capsys.readouterr().out


def test_cache_speed_refuses_a_size_below_one(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as refused:
        benchmark_module("cache_speed").main([str(tmp_path), "--size", "0"])
    error = last_error_line(capsys)
    assert refused.value.code == 2 and "error: --size must be at least 1, got 0" in error, error
