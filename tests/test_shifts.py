"""The acquisition-shift suite and test-time augmentation: identity at 0, change above, deterministic."""

from __future__ import annotations

import numpy as np
import pytest

from bloodcell.evaluate.shifts import (
    SEVERITIES,
    SHIFT_PARAMETERS,
    SHIFTS,
    apply_shift,
    hue_rotation_matrix,
    shift_table,
)
from bloodcell.evaluate.tta import VIEW_SETS, tta_logits, tta_views


def cell_batch(n: int = 3, size: int = 128) -> np.ndarray:
    from conftest import draw_cell

    rng = np.random.default_rng(0)
    return np.stack([np.asarray(draw_cell(rng, k % 4, size)) for k in range(n)])


@pytest.fixture(scope="module")
def images() -> np.ndarray:
    return cell_batch()  # 128 px, the default training size: defocus radii are a share of the side


@pytest.mark.parametrize("name", list(SHIFTS))
def test_severity_zero_is_the_identity_and_a_copy(images: np.ndarray, name: str) -> None:
    out = apply_shift(images, name, 0)
    np.testing.assert_array_equal(out, images)
    assert out is not images


@pytest.mark.parametrize("severity", SEVERITIES)
@pytest.mark.parametrize("name", list(SHIFTS))
def test_every_shift_changes_the_image_and_keeps_shape_and_dtype(images: np.ndarray, name: str, severity: int) -> None:
    before = images.copy()
    out = apply_shift(images, name, severity)
    assert out.dtype == np.uint8 and out.shape == images.shape
    assert np.abs(out.astype(int) - images.astype(int)).mean() > 0.5
    np.testing.assert_array_equal(images, before)  # the input is never modified


@pytest.mark.parametrize("name", list(SHIFTS))
def test_shifts_are_deterministic_and_grow_with_severity(images: np.ndarray, name: str) -> None:
    np.testing.assert_array_equal(apply_shift(images, name, 2), apply_shift(images, name, 2))
    change = [np.abs(apply_shift(images, name, s).astype(int) - images.astype(int)).mean() for s in SEVERITIES]
    assert change[0] < change[2]


def test_noise_does_not_depend_on_the_batch(images: np.ndarray) -> None:
    alone = apply_shift(images[1:2], "noise", 2)
    np.testing.assert_array_equal(apply_shift(images, "noise", 2)[1:2], alone)


def test_hue_rotation_keeps_greys_and_the_documented_medium_settings() -> None:
    matrix = hue_rotation_matrix(12.0)
    np.testing.assert_allclose(matrix @ np.ones(3), np.ones(3), atol=1e-12)
    np.testing.assert_allclose(matrix @ matrix.T, np.eye(3), atol=1e-12)  # a rotation
    assert SHIFT_PARAMETERS["stain"][2]["gamma"] == (1.20, 0.90, 1.10)
    assert SHIFT_PARAMETERS["hue"][2]["degrees"] == 12.0
    assert SHIFT_PARAMETERS["downscale"][2]["factor"] == 0.5


def test_bad_inputs_are_refused(images: np.ndarray) -> None:
    with pytest.raises(ValueError, match="severity"):
        apply_shift(images, "stain", 4)
    with pytest.raises(ValueError, match="uint8"):
        apply_shift(images.astype(np.float32), "stain", 1)
    with pytest.raises(ValueError, match="unknown shift"):
        apply_shift(images, "fog", 1)


def test_shift_table_documents_every_shift() -> None:
    rows = shift_table()
    assert [r["shift"] for r in rows] == list(SHIFTS)
    assert all(r["low"] and r["medium"] and r["high"] for r in rows)


def test_tta_views_are_the_eight_symmetries(images: np.ndarray) -> None:
    views = tta_views(images, "d4")
    assert len(views) == len(VIEW_SETS["d4"]) == 8
    np.testing.assert_array_equal(views[0], images)
    flat = {v[0].tobytes() for v in views}
    assert len(flat) == 8  # an asymmetric image gives 8 different views
    assert len(tta_views(images, "flips")) == 4


def test_tta_logits_average_over_views(images: np.ndarray) -> None:
    calls = []

    def logits_fn(batch: np.ndarray) -> np.ndarray:
        calls.append(batch.shape)
        # Depends on orientation: the mean of the top row.
        return np.stack([batch[:, 0].mean(axis=(1, 2)), np.zeros(len(batch))], axis=1)

    result = tta_logits(logits_fn, images, "d4")
    assert len(calls) == 8 and result.shape == (len(images), 2)
    expected = np.mean([logits_fn(v) for v in tta_views(images)], axis=0)
    np.testing.assert_allclose(result, expected)
