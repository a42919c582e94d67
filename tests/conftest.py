"""Shared fixtures: a learnable synthetic dataset in the Aria layout, and the real dataset's location.

Tests on the real data find it through ``BLOODCELL_DATA`` (default ``../shared/data/leukemia-aria`` beside
the checkout). Without it they skip with the reason, except under ``CI=true`` where a missing dataset is a
failure, never a silent skip.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw

#: Shared fixtures of the serving tests (a tiny saved model and its ONNX export), available to every test.
pytest_plugins = ["serve_support"]

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO_ROOT.parent / "shared" / "data" / "leukemia-aria"

#: Aria folder name -> file-name stem, as in the real dataset.
ARIA_FOLDERS = {
    "Benign": "WBC-Benign",
    "Early": "WBC-Malignant-Early",
    "Pre": "WBC-Malignant-Pre",
    "Pro": "WBC-Malignant-Pro",
}


def real_data_root() -> Path:
    """The real dataset, or skip (fail under CI=true) with a clear reason."""
    root = Path(os.environ.get("BLOODCELL_DATA", DEFAULT_DATA))
    if not (root / "Original").is_dir():
        message = f"real dataset not found at {root} (set BLOODCELL_DATA to its path)"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(message + "; under CI=true the dataset is required")
        pytest.skip(message)
    return root


def child_env() -> dict[str, str]:
    """The environment for a child Python process: this checkout's ``src`` first on ``PYTHONPATH``.

    Prepended, not replacing: where the dependencies themselves come through ``PYTHONPATH`` (a GPU machine
    with packages unpacked beside its own Python), a child without them would fail to import.
    """
    inherited = os.environ.get("PYTHONPATH", "")
    return {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT / "src"), inherited]))}


@pytest.fixture(scope="session")
def real_data() -> Path:
    return real_data_root()


def draw_cell(rng: np.random.Generator, class_index: int, size: int) -> Image.Image:
    """A blood-smear-like toy image whose class is told by the shape of the 'nucleus', not its colour.

    Background and stain colour are drawn at random for every image, so a model has to learn the shape.
    """
    background = tuple(int(v) for v in rng.integers(170, 240, size=3))
    image = Image.new("RGB", (size, size), background)
    draw = ImageDraw.Draw(image)
    # Red-cell-like discs at random places make every image distinct to a perceptual hash: without them the
    # toy images are near duplicates of each other (phash distance <= 10) and the index merges whole classes.
    for _ in range(int(rng.integers(10, 18))):
        x, y = rng.uniform(0, size, size=2)
        radius = size * rng.uniform(0.07, 0.12)
        draw.ellipse([x - radius, y - radius, x + radius, y + radius], fill=tuple(v - 60 for v in background))
    stain = tuple(int(v) for v in rng.integers(40, 140, size=3))
    c = size / 2 + rng.uniform(-size / 10, size / 10, size=2)
    r = size * (0.18 + 0.04 * rng.random())
    if class_index == 0:  # small round
        r *= 0.7
        draw.ellipse([c[0] - r, c[1] - r, c[0] + r, c[1] + r], fill=stain)
    elif class_index == 1:  # large round
        r *= 1.4
        draw.ellipse([c[0] - r, c[1] - r, c[0] + r, c[1] + r], fill=stain)
    elif class_index == 2:  # square
        draw.rectangle([c[0] - r, c[1] - r, c[0] + r, c[1] + r], fill=stain)
    else:  # triangle
        draw.polygon([(c[0], c[1] - 1.3 * r), (c[0] - 1.3 * r, c[1] + r), (c[0] + 1.3 * r, c[1] + r)], fill=stain)
    noise = rng.normal(0, 6, size=(size, size, 3))
    return Image.fromarray(np.clip(np.asarray(image, dtype=np.float32) + noise, 0, 255).astype(np.uint8))


def make_aria_dataset(root: Path, per_class: int = 24, size: int = 48, seed: int = 0, segmented: bool = True) -> Path:
    """Write a synthetic dataset in the Aria layout (``Original/`` and optionally ``Segmented/``)."""
    rng = np.random.default_rng(seed)
    for class_index, (folder, stem) in enumerate(ARIA_FOLDERS.items()):
        for variant in ("Original", "Segmented") if segmented else ("Original",):
            (root / variant / folder).mkdir(parents=True, exist_ok=True)
        for number in range(1, per_class + 1):
            image = draw_cell(rng, class_index, size)
            name = f"{stem}-{number:03d}.jpg"
            image.save(root / "Original" / folder / name, quality=95)
            if segmented:
                array = np.asarray(image).copy()
                # The 'segmented' copy keeps the dark nucleus and masks the light background to black.
                array[array.mean(axis=2) > 160] = 0
                Image.fromarray(array).save(root / "Segmented" / folder / name, quality=95)
    return root


@pytest.fixture
def aria_dataset(tmp_path: Path) -> Path:
    """A small synthetic Aria-layout dataset (24 images a class, 48 px)."""
    return make_aria_dataset(tmp_path / "aria")


@pytest.fixture(autouse=True)
def _isolated_home(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """Keep every test's work folders (manifests, caches) out of the user's home, and what it writes
    relative to the working folder (``runs/``, ``evaluations/``: the defaults) out of the checkout."""
    monkeypatch.chdir(tmp_path_factory.mktemp("cwd"))
    if "BLOODCELL_HOME" not in os.environ or os.environ.get("BLOODCELL_TEST_SHARED_HOME") != "1":
        monkeypatch.setenv("BLOODCELL_HOME", str(tmp_path_factory.getbasetemp() / "bloodcell-home"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from bloodcell import notices

    notices.GIVEN.clear()  # each test sees the warnings its own calls give, whatever ran before it
