"""Helpers for the serving tests: a tiny saved model and a few image files of every kind (good and bad).

The model is a narrow ``bloodnet`` at 64 px with randomised BatchNorm statistics and a confident head, so
its probabilities are far from uniform (a parity check on a near-uniform model would prove little).
"""

from __future__ import annotations

import io
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
from PIL import Image

from benchmark_support import benchmark_module
from conftest import draw_cell

TINY_SIZE = 64
TINY_TEMPERATURE = 1.3


def make_tiny_model(directory: Path, seed: int = 0) -> Path:
    """Save a small randomly initialised bloodnet Classifier with a card into ``directory``."""
    import torch

    from bloodcell.models import ModelCard, build_model, save_model

    card = ModelCard(
        name="tiny-test-model",
        version="1.2",
        architecture="bloodnet",
        arch_kwargs={"width": 0.5, "depth": 0.5},
        input_size=TINY_SIZE,
        temperature=TINY_TEMPERATURE,
    )
    model = build_model(card)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.normal_(0.0, 0.2, generator=generator)
                module.running_var.uniform_(0.5, 2.0, generator=generator)
                module.weight.uniform_(0.5, 1.5, generator=generator)
                module.bias.normal_(0.0, 0.2, generator=generator)
            elif isinstance(module, torch.nn.Linear):
                module.weight.normal_(0.0, 0.5, generator=generator)
    return save_model(model.eval(), card, directory)


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A saved tiny model directory (card.json + model.safetensors), shared by the session."""
    return make_tiny_model(tmp_path_factory.mktemp("tiny-model"))


@pytest.fixture(scope="session")
def tiny_onnx(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model exported to ONNX (with its card beside it), shared by the session."""
    from bloodcell.serve.export import export_onnx

    return export_onnx(tiny_model, tmp_path_factory.mktemp("tiny-onnx") / "model.onnx")


def cell_jpeg(seed: int = 0, size: int = 96, class_index: int = 0) -> bytes:
    """A synthetic smear-like JPEG (see ``conftest.draw_cell``) as bytes."""
    image = draw_cell(np.random.default_rng(seed), class_index, size)
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def png_bytes(width: int, height: int, colour: tuple[int, int, int] = (200, 180, 190)) -> bytes:
    """A flat PNG of the given size (compresses to a few kB even when huge)."""
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), colour).save(buffer, format="PNG")
    return buffer.getvalue()


def write_images(folder: Path, count: int, start: int = 0, size: int = 96) -> list[Path]:
    """Write ``count`` synthetic JPEGs into ``folder``; returns their paths."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(start, start + count):
        path = folder / f"cell-{i:03d}.jpg"
        path.write_bytes(cell_jpeg(seed=i, size=size, class_index=i % 4))
        paths.append(path)
    return paths


def real_images(root: Path, per_class: int = 2) -> list[Path]:
    """A few real images from each class folder of the real dataset's Original variant."""
    return [p for folder in sorted((root / "Original").iterdir()) if folder.is_dir() for p in sorted(folder.glob("*.jpg"))[:per_class]]


def infer_speed_module() -> ModuleType:
    """``benchmarks/infer_speed.py`` imported as a module (its server and load-test helpers)."""
    return benchmark_module("infer_speed")
