"""What the benchmark scripts that train on the real dataset share: where it is, and where results go.

Imported by scripts run as ``python benchmarks/<name>.py`` (their folder is then on ``sys.path``).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
#: The team's copy of the dataset, beside the checkout; ``BLOODCELL_DATA`` or ``--data`` point elsewhere.
DEFAULT_DATA = Path(os.environ.get("BLOODCELL_DATA", REPO.parent / "shared" / "data" / "leukemia-aria"))


def add_data_and_out_options(parser: argparse.ArgumentParser) -> None:
    """``--data`` (the Aria-layout dataset folder) and ``--out`` (where the JSON results are written)."""
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="dataset folder (Aria layout)")
    parser.add_argument("--out", type=Path, default=RESULTS, help="folder for the JSON results")


def require_dataset(data: Path) -> None:
    """Stop with a one-line message unless ``data`` holds the Aria layout's ``Original`` folder."""
    if not (data / "Original").is_dir():
        sys.exit(f"dataset not found at {data} (pass --data or set BLOODCELL_DATA)")
