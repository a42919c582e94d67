"""The acquisition-shift suite: what another lab's microscope, stain batch or camera does to an image.

Every shift takes a uint8 ``(N, H, W, 3)`` RGB batch and a severity 0..3 and returns a new uint8 batch of
the same shape. Severity 0 is the identity; 1, 2, 3 are low, medium and high. Every shift is
deterministic: the same image always gets the same result (the noise is seeded by the image's own bytes,
so results do not depend on batching). Pure numpy/scipy/PIL, no torch, so any predictor can use it.

Shift (what it models): severity 1 / 2 / 3

- ``stain`` (stain intensity, stain batch): per-channel gamma ``255 (x/255)^g`` on R, G, B:
  1.10/0.95/1.05, 1.20/0.90/1.10, 1.30/0.85/1.15
- ``hue`` (stain colour, white balance): rotation of RGB about the grey axis by 6, 12, 20 degrees
- ``brightness_contrast`` (dimmer lamp, slightly flatter contrast): ``b (m + c (x - m))`` with m the image
  mean: b=0.90 c=0.95, b=0.80 c=0.90, b=0.65 c=0.80
- ``defocus`` (focus): disk (pillbox) kernel of radius 0.008, 0.015, 0.024 of the image side
  (1.0, 1.9, 3.1 px at 128 px; 1.8, 3.4, 5.4 px at 224 px)
- ``noise`` (sensor noise): additive Gaussian, sigma 4, 8, 16 (0..255 units)
- ``jpeg`` (re-compression): JPEG quality 75, 40, 15 (PIL, 4:2:0 chroma subsampling)
- ``downscale`` (lower-resolution camera): antialiased bilinear down by 0.75, 0.50, 0.25, bilinear back up

Issue 7 motivates the medium ``stain`` (gamma 1.2 / 0.9 / 1.1) and ``hue`` (12 degrees) settings: those
exact shifts broke a colour-reliant baseline.
"""

from __future__ import annotations

import io
import zlib
from collections.abc import Callable
from typing import Any

import numpy as np
from PIL import Image
from scipy.signal import fftconvolve

SEVERITIES: tuple[int, ...] = (1, 2, 3)
SEVERITY_NAMES: dict[int, str] = {0: "none", 1: "low", 2: "medium", 3: "high"}

#: The parameters of every shift at severities 1, 2, 3 (severity 0 is always the identity).
SHIFT_PARAMETERS: dict[str, dict[int, dict[str, Any]]] = {
    "stain": {1: {"gamma": (1.10, 0.95, 1.05)}, 2: {"gamma": (1.20, 0.90, 1.10)}, 3: {"gamma": (1.30, 0.85, 1.15)}},
    "hue": {1: {"degrees": 6.0}, 2: {"degrees": 12.0}, 3: {"degrees": 20.0}},
    "brightness_contrast": {
        1: {"brightness": 0.90, "contrast": 0.95},
        2: {"brightness": 0.80, "contrast": 0.90},
        3: {"brightness": 0.65, "contrast": 0.80},
    },
    "defocus": {1: {"radius": 0.008}, 2: {"radius": 0.015}, 3: {"radius": 0.024}},
    "noise": {1: {"sigma": 4.0}, 2: {"sigma": 8.0}, 3: {"sigma": 16.0}},
    "jpeg": {1: {"quality": 75}, 2: {"quality": 40}, 3: {"quality": 15}},
    "downscale": {1: {"factor": 0.75}, 2: {"factor": 0.50}, 3: {"factor": 0.25}},
}

#: One line per shift: what it stands for (used by the report and docs).
SHIFT_DESCRIPTIONS: dict[str, str] = {
    "stain": "per-channel gamma on R, G, B (stain intensity / stain batch)",
    "hue": "hue rotation about the grey axis (stain colour, white balance)",
    "brightness_contrast": "dimmer light, slightly flatter contrast",
    "defocus": "defocus blur: disk kernel, radius as a share of the image side",
    "noise": "additive Gaussian sensor noise (sigma in 0..255 units)",
    "jpeg": "JPEG re-compression at lower quality",
    "downscale": "downscale by a factor, then upscale back (lower-resolution camera)",
}


def _check(images: np.ndarray, severity: int) -> None:
    if not isinstance(images, np.ndarray) or images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError("shifts expect a uint8 array of shape (N, H, W, 3)")
    if severity not in (0, *SEVERITIES):
        raise ValueError(f"severity must be 0, 1, 2 or 3, got {severity!r}")


def _to_uint8(values: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(values), 0, 255).astype(np.uint8)


def stain(images: np.ndarray, severity: int) -> np.ndarray:
    """Per-channel gamma ``255 * (x / 255) ** gamma_c``: stain intensity that differs by channel."""
    _check(images, severity)
    if severity == 0:
        return images.copy()
    gamma = np.asarray(SHIFT_PARAMETERS["stain"][severity]["gamma"], dtype=np.float32)
    # A 256-entry lookup table per channel: exact and much faster than pow on every pixel.
    levels = np.arange(256, dtype=np.float32)[:, None] / 255.0
    table = _to_uint8(255.0 * levels**gamma[None, :])  # (256, 3)
    return np.stack([table[images[..., c], c] for c in range(3)], axis=-1)


def hue_rotation_matrix(degrees: float) -> np.ndarray:
    """The 3x3 rotation of RGB space by ``degrees`` about the grey axis (1, 1, 1) (Rodrigues' formula).

    Greys stay grey and saturation is kept; only the hue turns.
    """
    theta = np.deg2rad(degrees)
    axis = np.ones(3) / np.sqrt(3.0)
    cross = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    return np.cos(theta) * np.eye(3) + np.sin(theta) * cross + (1 - np.cos(theta)) * np.outer(axis, axis)


def hue(images: np.ndarray, severity: int) -> np.ndarray:
    """Rotate the hue of every pixel by the severity's angle (RGB rotation about the grey axis)."""
    _check(images, severity)
    if severity == 0:
        return images.copy()
    matrix = hue_rotation_matrix(SHIFT_PARAMETERS["hue"][severity]["degrees"]).astype(np.float32)
    return _to_uint8(images.astype(np.float32) @ matrix.T)


def brightness_contrast(images: np.ndarray, severity: int) -> np.ndarray:
    """Scale contrast about each image's mean by ``c`` and then brightness by ``b``: ``b * (m + c (x - m))``."""
    _check(images, severity)
    if severity == 0:
        return images.copy()
    p = SHIFT_PARAMETERS["brightness_contrast"][severity]
    x = images.astype(np.float32)
    mean = x.mean(axis=(1, 2, 3), keepdims=True)
    return _to_uint8(p["brightness"] * (mean + p["contrast"] * (x - mean)))


def disk_kernel(radius: float) -> np.ndarray:
    """An anti-aliased disk (pillbox) of ``radius`` pixels, summing to 1: the point spread of defocus."""
    half = int(np.ceil(radius))
    y, x = np.mgrid[-half : half + 1, -half : half + 1]
    # Each pixel weighted by how much of it lies inside the circle (linear ramp over one pixel).
    kernel = np.clip(radius + 0.5 - np.hypot(x, y), 0.0, 1.0)
    return (kernel / kernel.sum()).astype(np.float32)


def defocus(images: np.ndarray, severity: int) -> np.ndarray:
    """Defocus blur: convolve with a disk whose radius is a share of the image side (reflected borders).

    A disk under half a pixel lies inside its own pixel: at that sampling it blurs nothing, so severity 1
    (0.008 of the side) leaves images under 63 px unchanged, and severity 2 those under 34 px. The
    shipped configs train at 96 px and more.
    """
    _check(images, severity)
    if severity == 0:
        return images.copy()
    radius = max(SHIFT_PARAMETERS["defocus"][severity]["radius"] * images.shape[1], 0.5)
    kernel = disk_kernel(radius)
    half = kernel.shape[0] // 2
    padded = np.pad(images.astype(np.float32), ((0, 0), (half, half), (half, half), (0, 0)), mode="reflect")
    blurred = fftconvolve(padded, kernel[None, :, :, None], mode="valid", axes=(1, 2))
    return _to_uint8(blurred)


def _per_image(images: np.ndarray, transform: Callable[[np.ndarray], np.ndarray]) -> np.ndarray:
    """Apply ``transform`` (one HWC uint8 image in, one out) to every image of a batch."""
    out = np.empty_like(images)
    for i, image in enumerate(images):
        out[i] = transform(image)
    return out


def noise(images: np.ndarray, severity: int) -> np.ndarray:
    """Additive Gaussian noise; each image's noise is seeded by a checksum of its own pixels."""
    _check(images, severity)
    if severity == 0:
        return images.copy()
    sigma = SHIFT_PARAMETERS["noise"][severity]["sigma"]

    def add_noise(image: np.ndarray) -> np.ndarray:
        rng = np.random.default_rng([zlib.crc32(image.tobytes()), severity])
        return _to_uint8(image.astype(np.float32) + rng.normal(0.0, sigma, size=image.shape).astype(np.float32))

    return _per_image(images, add_noise)


def jpeg(images: np.ndarray, severity: int) -> np.ndarray:
    """Re-encode every image as JPEG at the severity's quality and decode it again (PIL)."""
    _check(images, severity)
    if severity == 0:
        return images.copy()
    quality = SHIFT_PARAMETERS["jpeg"][severity]["quality"]

    def recompress(image: np.ndarray) -> np.ndarray:
        buffer = io.BytesIO()
        Image.fromarray(image).save(buffer, format="JPEG", quality=quality)
        return np.asarray(Image.open(io.BytesIO(buffer.getvalue())).convert("RGB"))

    return _per_image(images, recompress)


def downscale(images: np.ndarray, severity: int) -> np.ndarray:
    """Downscale by the severity's factor (antialiased bilinear) and upscale back to the original size."""
    _check(images, severity)
    if severity == 0:
        return images.copy()
    factor = SHIFT_PARAMETERS["downscale"][severity]["factor"]
    height, width = images.shape[1:3]
    small = (max(1, round(width * factor)), max(1, round(height * factor)))

    def down_and_up(image: np.ndarray) -> np.ndarray:
        reduced = Image.fromarray(image).resize(small, Image.Resampling.BILINEAR)
        return np.asarray(reduced.resize((width, height), Image.Resampling.BILINEAR))

    return _per_image(images, down_and_up)


#: name -> function(images_uint8_nhwc, severity) -> images; the suite in report order.
SHIFTS: dict[str, Callable[[np.ndarray, int], np.ndarray]] = {
    "stain": stain,
    "hue": hue,
    "brightness_contrast": brightness_contrast,
    "defocus": defocus,
    "noise": noise,
    "jpeg": jpeg,
    "downscale": downscale,
}


def apply_shift(images: np.ndarray, name: str, severity: int) -> np.ndarray:
    """Apply shift ``name`` at ``severity`` (0..3) to a uint8 NHWC batch; raises ValueError for unknown names."""
    if name not in SHIFTS:
        raise ValueError(f"unknown shift {name!r}; known shifts: {', '.join(SHIFTS)}")
    return SHIFTS[name](images, severity)


def describe_parameters(name: str, severity: int) -> str:
    """The parameters of a shift at a severity as short text, e.g. ``gamma=1.2/0.9/1.1``."""
    if severity == 0:
        return "identity"
    parts = []
    for key, value in SHIFT_PARAMETERS[name][severity].items():
        text = "/".join(f"{v:g}" for v in value) if isinstance(value, tuple) else f"{value:g}"
        parts.append(f"{key}={text}")
    return ", ".join(parts)


def shift_table() -> list[dict[str, str]]:
    """The suite as rows (shift, description, severity 1..3 parameters) for reports and docs."""
    return [
        {
            "shift": name,
            "description": SHIFT_DESCRIPTIONS[name],
            **{SEVERITY_NAMES[s]: describe_parameters(name, s) for s in SEVERITIES},
        }
        for name in SHIFTS
    ]
