"""Decoded-cache benchmark: decoding every image from disk versus reading the memory-mapped cache.

Usage::

    .venv/bin/python benchmarks/cache_speed.py [DATA] [--size 128] [--variant Original]

Prints a table of images per second for (1) decoding all accepted images with the same decoder the cache
uses, (2) building the cache (first run), and (3) loading the cache and touching every pixel, as training
does each epoch. The cache lives in a temporary folder so the user's cache is left alone. DATA is any layout
``bloodcell index`` reads (Aria, the Kaggle copy, one folder per class); it defaults to the team's dataset
beside the checkout, or to ``BLOODCELL_DATA`` where that is set.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from benchmark_common import DEFAULT_DATA
from rich.console import Console
from rich.table import Table

from bloodcell.data.cache import load_images
from bloodcell.data.decode import decode_image
from bloodcell.data.index import build_index
from bloodcell.errors import UserError


def timed(label: str, count: int, work) -> tuple[str, int, float]:
    """Run ``work()`` once and return ``(label, count, seconds)``."""
    start = time.perf_counter()
    work()
    return label, count, time.perf_counter() - start


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("data", nargs="?", type=Path, default=DEFAULT_DATA, help="dataset folder (any layout bloodcell index reads)")
    parser.add_argument("--size", type=int, default=128, help="decode size in pixels")
    parser.add_argument("--variant", default="Original", choices=["Original", "Segmented"])
    args = parser.parse_args(argv)
    if args.size < 1:
        parser.error(f"--size must be at least 1, got {args.size}")
    try:
        indexed = build_index(args.data, args.variant, progress=False)
    except UserError as error:  # a missing, empty or unrecognisable folder: one line, as every benchmark says it
        sys.exit(f"{error} (pass DATA or set BLOODCELL_DATA)")
    rows = indexed.manifest[~indexed.manifest["rejected"]].reset_index(drop=True)
    paths = [indexed.dataset.root / p for p in rows["path"]]
    n = len(rows)
    results = [
        timed("decode from disk (PIL, resize)", n, lambda: [decode_image(p, args.size) for p in paths])
    ]
    with tempfile.TemporaryDirectory() as cache_dir:

        def build() -> None:
            load_images(
                rows, indexed.dataset.root, args.size, args.variant, cache_dir=cache_dir, progress=False
            )

        def load() -> None:
            images = load_images(
                rows, indexed.dataset.root, args.size, args.variant, cache_dir=cache_dir, progress=False
            )
            np.asarray(images).sum(dtype=np.uint64)  # touch every byte, as an epoch does

        results.append(timed("build cache (decode + write)", n, build))
        results.append(timed("load cache (memmap, read all)", n, load))

    table = Table(title=f"Decoded cache, {n} images at {args.size}px ({args.variant})", title_justify="left")
    for column in ("step", "images", "seconds", "images/s"):
        table.add_column(column, justify="left" if column == "step" else "right")
    for label, count, seconds in results:
        table.add_row(label, str(count), f"{seconds:.2f}", f"{count / seconds:,.0f}")
    Console().print(table)


if __name__ == "__main__":
    main()
