"""The robust recipe: per-image colour standardisation inside the model, and the default config that uses it."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from bloodcell.config import NormalizeConfig, load_config
from bloodcell.models.classifier import Preprocess
from bloodcell.train import fit
from synthetic_data import make_synthetic_data


def smear_batch(seed: int = 0, size: int = 32) -> torch.Tensor:
    from conftest import draw_cell

    rng = np.random.default_rng(seed)
    images = np.stack([np.asarray(draw_cell(rng, k % 4, size)) for k in range(4)])
    return torch.from_numpy(images).permute(0, 3, 1, 2).float()


def test_per_image_standardisation_removes_brightness_contrast_and_colour_cast() -> None:
    images = smear_batch()
    standardise = Preprocess(NormalizeConfig(per_image=True))
    reference = standardise(images)
    dimmer_flatter = 0.7 * images + 10.0  # less light, less contrast
    colour_cast = images + torch.tensor([12.0, -8.0, 5.0]).view(1, 3, 1, 1)  # a different white balance
    assert torch.allclose(standardise(dimmer_flatter), reference, atol=1e-3)
    assert torch.allclose(standardise(colour_cast), reference, atol=1e-3)


def test_per_image_standardisation_maps_a_standardised_image_to_itself() -> None:
    """Applied to its own output (rescaled into pixel range), the normalisation changes nothing."""
    standardise = Preprocess(NormalizeConfig(per_image=True))
    once = standardise(smear_batch(seed=1))
    again = standardise(once * 40.0 + 128.0)
    assert torch.allclose(again, once, atol=1e-3)


def test_per_image_standardisation_is_finite_on_a_blank_image() -> None:
    blank = torch.full((1, 3, 16, 16), 200.0)
    assert torch.isfinite(Preprocess(NormalizeConfig(per_image=True))(blank)).all()


def test_per_image_standardisation_passes_gradients_to_the_input_and_leaves_it_alone() -> None:
    """Saliency methods differentiate with respect to the input: the in-place shortcut must not break that,
    and without gradients the caller's tensor must come back unchanged."""
    standardise = Preprocess(NormalizeConfig(per_image=True))
    images = smear_batch(seed=2).requires_grad_()
    standardise(images).square().sum().backward()
    assert images.grad is not None and torch.isfinite(images.grad).all() and images.grad.abs().sum() > 0
    plain = smear_batch(seed=2)
    before = plain.clone()
    with torch.no_grad():
        out = standardise(plain)
    assert torch.equal(plain, before) and torch.allclose(out, standardise(images).detach())


def test_the_robust_default_config_trains_a_tiny_model(tmp_path: Path) -> None:
    config = load_config(
        "default",
        ["train.epochs=1", "train.batch_size=16", "data.image_size=32", "model.kwargs={width: 0.25}"],
    )
    assert config.normalize.per_image, "the default recipe standardises each image's colour"
    assert config.augment.hue > 0 and config.augment.gamma > 0 and config.augment.stain > 0
    result = fit(config, tmp_path / "run", prepared=make_synthetic_data(per_class=8, size=32), progress=False)
    assert (result.run_dir / "checkpoints" / "best" / "model.safetensors").is_file()
    assert np.isfinite(result.history[-1]["train_loss"])
