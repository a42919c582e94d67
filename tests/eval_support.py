"""A tiny trained run directory for the evaluation, explanation and report tests.

The run is made by hand (a few optimiser steps on the synthetic Aria-layout dataset), not by
``bloodcell.train.fit``, so these tests depend only on the model card and run-directory contract.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import torch

from bloodcell.config import RunConfig, save_config
from bloodcell.data.prepare import prepare_data
from bloodcell.models import Classifier, ModelCard, create_model, save_model
from bloodcell.models.card import save_trained_on

IMAGE_SIZE = 48


def train_toy(model: torch.nn.Module, images: np.ndarray, labels: np.ndarray, steps: int = 30, seed: int = 0) -> torch.nn.Module:
    """A few AdamW steps on uint8 NHWC images, so the model (and its CAMs) depend on the data."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float()
    y = torch.from_numpy(np.asarray(labels, dtype=np.int64))
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(steps):
        batch = torch.randint(0, len(x), (min(32, len(x)),), generator=generator)
        loss = torch.nn.functional.cross_entropy(model(x[batch]), y[batch])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval()


def make_run(dataset_root: Path, run_dir: Path, name: str = "toy", architecture: str = "bloodnet",
             arch_kwargs: dict | None = None, steps: int = 30, epochs: int = 3, data: dict | None = None) -> Path:
    """Write ``run_dir`` with config.yaml, history.csv and checkpoints/best for a tiny model on ``dataset_root``
    (``data``: more keys of the config's data section, e.g. another split protocol)."""
    torch.manual_seed(0)
    arch_kwargs = {"width": 0.5} if arch_kwargs is None and architecture == "bloodnet" else (arch_kwargs or {})
    config = RunConfig.model_validate({
        "name": name,
        "data": {"root": str(dataset_root), "image_size": IMAGE_SIZE, "block_size": 4, "embargo": 1, **(data or {})},
        "model": {"name": architecture, "kwargs": arch_kwargs},
    })  # fmt: skip
    prepared = prepare_data(config.data, progress=False)
    train = prepared.indices("train")
    model = Classifier(create_model(architecture, len(prepared.classes), **arch_kwargs), config.normalize)
    train_toy(model, prepared.images[train], prepared.labels[train], steps=steps)
    run_dir.mkdir(parents=True, exist_ok=True)
    save_config(config, run_dir / "config.yaml")
    epoch = np.arange(1, epochs + 1)
    pd.DataFrame({
        "epoch": epoch, "train_loss": 1.4 / epoch, "train_accuracy": 1 - 0.6 / epoch, "val_loss": 1.5 / epoch,
        "val_accuracy": 1 - 0.7 / epoch, "val_balanced_accuracy": 1 - 0.7 / epoch, "lr": 1e-3, "seconds": 1.0,
        "images_per_second": 100.0,
    }).to_csv(run_dir / "history.csv", index=False)  # fmt: skip
    card = ModelCard(
        name=name,
        architecture=architecture,
        arch_kwargs=arch_kwargs,
        classes=list(prepared.classes),
        input_size=IMAGE_SIZE,
        normalize=config.normalize,
        config=config.model_dump(mode="json"),
        manifest_sha256=prepared.manifest_sha256,
        epoch=epochs,
    )
    save_model(model, card, run_dir / "checkpoints" / "best")
    trained = prepared.split.iloc[train]
    save_trained_on(run_dir, trained["sha256"], trained["phash"])  # as fit does
    return run_dir
