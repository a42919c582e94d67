"""Batch augmentation for training, in plain tensor operations on whatever device trains.

Every transform draws its random parameters for the whole batch at once (a few numbers per image) from the
generator it is given, and is applied with a handful of batched tensor operations: no per-image Python, no
worker processes. On this project's 2-core machines that is what keeps augmentation from becoming the
bottleneck (kornia's batched CPU augmentation ran at about 100 images/s, slower than the model trains;
``benchmarks/train_speed.py`` measures the loop against bare forward + backward).

The transforms are grouped so that each group costs one pass over the pixels:

1. geometry: an optional random crop at full resolution (off by default; one gather). The dihedral
   symmetries (flips, 90-degree rotations) and a small random rotation / zoom / shift are all affine maps,
   so they compose into one matrix per image and one ``grid_sample`` (flips and quarter turns land
   exactly on pixel centres, so they stay lossless). Without the affine part (the
   default: it cost about a fifth of a training step and bought no accuracy), flips and quarter turns are
   exact index operations on the uint8 images.
2. brightness, saturation, hue and contrast are affine in RGB: one 3x3 matrix + offset per image.
3. per-channel gamma, HED stain jitter and the re-rendering with perturbed stain vectors are linear in
   optical density (OD = -log I): one log, one 3x3 matrix + offset per image, one exp.
4. blur (a random subset of the batch) and Gaussian noise.
5. JPEG re-compression of a random subset: real libjpeg through ``torchvision.io`` (a batched C++ call on
   a list of images; it gives the same pixels as PIL, which the shift suite uses), or nvJPEG when the
   batch is on a CUDA GPU.

A strength of 0 switches a transform off; with everything off the output equals the input as float.
Input: uint8 (or float in [0, 255]) NCHW RGB, any memory format. Output: float32 NCHW in [0, 255], the
range the model's :class:`~bloodcell.models.classifier.Preprocess` expects.
"""

from __future__ import annotations

import functools
import math
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torchvision.io import decode_jpeg, encode_jpeg

from bloodcell.config import AugmentConfig

# ITU-R BT.601 luma weights (as in bloodcell.models.classifier).
_LUMA = torch.tensor([0.299, 0.587, 0.114])
# RGB <-> YIQ: a hue rotation is a rotation of the (I, Q) chroma plane, which keeps luma fixed.
_RGB_TO_YIQ = torch.tensor([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]])
# Haematoxylin, eosin and DAB stain vectors (Ruifrok & Johnston 2001, as skimage.color.rgb2hed uses):
# row k is the optical density stain k adds to R, G and B.
_RGB_FROM_HED = torch.tensor([[0.65, 0.70, 0.29], [0.07, 0.99, 0.11], [0.27, 0.57, 0.78]])
# Smallest intensity in the optical-density transform (avoids log(0) on black pixels).
_OD_EPS = 1.0 / 255.0
_HOST = torch.device("cpu")
# The constants above and their inverses, by name, for _constant (computed once, on the CPU).
_CONSTANTS = {
    "luma": _LUMA,
    "rgb_to_yiq": _RGB_TO_YIQ,
    "yiq_to_rgb": torch.linalg.inv(_RGB_TO_YIQ),
    "rgb_from_hed": _RGB_FROM_HED,
    "hed_from_rgb": torch.linalg.inv(_RGB_FROM_HED),
    # The k-th of 256 equal-probability slices of the standard normal, at its median (see _pixel_noise).
    "normal_quantiles": torch.special.ndtri((torch.arange(256, dtype=torch.float64) + 0.5) / 256).float(),
}


class BatchAugment:
    """Random training augmentation of whole batches, configured by an :class:`AugmentConfig`.

    ``augment(images, generator)`` returns float NCHW in [0, 255]. ``geometric`` and ``colour`` are the
    two halves, exposed so a consistency loss can make two colour views of one geometric view.
    ``batch_size``: the call holds several training batches of this many images, one after another; the
    choices made once a batch (blur's sigma, JPEG's quality) are then drawn for each of them, from the
    distribution separate calls would draw from (None: the call is one batch).
    """

    def __init__(self, config: AugmentConfig | None = None) -> None:
        self.config = config or AugmentConfig()

    @property
    def is_identity(self) -> bool:
        """True when every transform is switched off."""
        return not (self.config.crop or self._has_dihedral or self._has_affine or self._has_colour)

    @property
    def _has_dihedral(self) -> bool:
        return self.config.flip or self.config.rot90

    @property
    def _has_affine(self) -> bool:
        c = self.config
        return c.affine_degrees > 0 or c.affine_scale > 0 or c.affine_translate > 0

    @property
    def _has_colour(self) -> bool:
        c = self.config
        strengths = (c.brightness, c.contrast, c.saturation, c.hue, c.gamma, c.stain, c.stain_vectors, c.stain_clip,
                     c.blur, c.noise, c.jpeg)  # fmt: skip
        return any(v > 0 for v in strengths)

    def __call__(
        self, images: torch.Tensor, generator: torch.Generator | None = None, batch_size: int | None = None
    ) -> torch.Tensor:
        return self.colour(self.geometric(images, generator), generator, batch_size)

    # ---------------------------------------------------------------- geometry
    def geometric(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """A random crop, flips, 90-degree rotations and a small affine warp. Returns float NCHW in [0, 255]."""
        if self.config.crop:
            images = random_crop(images, self.config.crop, generator)
        n, device = images.shape[0], images.device
        if not self._has_affine:
            if self._has_dihedral:
                images = dihedral(images, *self._dihedral_choices(images, generator))
            return images.float()
        matrices = self._affine_matrices(n, device, generator)
        if self._has_dihedral:
            transpose, hflip, vflip = self._dihedral_choices(images, generator)
            linear = matrices[:, :, :2] @ dihedral_matrices(transpose, hflip, vflip).to(matrices.device)
            matrices = torch.cat([linear, matrices[:, :, 2:]], dim=2)
        return affine(images.float(), matrices)

    def _dihedral_choices(
        self, x: torch.Tensor, generator: torch.Generator | None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per-image (transpose, horizontal flip, vertical flip) booleans spanning the allowed symmetries.

        The 8 combinations are the dihedral group of the square; those with an even number of reflections
        are the four rotations, which is all ``rot90`` alone allows. Drawn on the host, like every choice
        of which images a transform takes: grouping them there costs a GPU no wait.
        """
        c = self.config
        coins = _rand(generator, (3, x.shape[0]), _HOST) < 0.5
        transpose, hflip, vflip = coins[0], coins[1], coins[2]
        if not c.rot90 or x.shape[-1] != x.shape[-2]:  # a transpose would change a non-square image's shape
            transpose = torch.zeros_like(transpose)
        elif not c.flip:
            vflip = transpose ^ hflip  # an even number of reflections: a pure rotation
        return transpose, hflip, vflip

    def _affine_matrices(self, n: int, device: torch.device, generator: torch.Generator | None) -> torch.Tensor:
        """One random rotation / zoom / shift per image, as ``(N, 2, 3)`` matrices for ``affine_grid``."""
        c = self.config
        u = _rand(generator, (4, n), device) * 2 - 1  # uniform in [-1, 1]
        angle = u[0] * math.radians(c.affine_degrees)
        scale = 1 + u[1] * c.affine_scale
        shift = u[2:4] * (2 * c.affine_translate)  # affine_grid coordinates span [-1, 1]: 2 units = the image
        cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
        row0 = torch.stack([cos, -sin, shift[0]], dim=1)
        row1 = torch.stack([sin, cos, shift[1]], dim=1)
        return torch.stack([row0, row1], dim=1)

    # ---------------------------------------------------------------- colour
    def colour(
        self, x: torch.Tensor, generator: torch.Generator | None = None, batch_size: int | None = None
    ) -> torch.Tensor:
        """Brightness, saturation, hue, contrast, gamma, stain, blur, noise and JPEG. Float NCHW in [0, 255]."""
        c = self.config
        x = x.float()
        if not self._has_colour:
            return x
        n, device = x.shape[0], x.device
        if c.brightness or c.saturation or c.hue or c.contrast:
            x = colour_affine(x, *self._colour_affine(x, generator))  # also scales to [0, 1]
        else:
            x = x / 255.0
        if c.gamma or c.stain or c.stain_vectors:
            gamma = _uniform(generator, (n, 3), 1 - c.gamma, 1 + c.gamma, device)
            alpha = _uniform(generator, (n, 3), 1 - c.stain, 1 + c.stain, device)
            beta = _uniform(generator, (n, 3), -c.stain / 2, c.stain / 2, device)
            # Drawn only when asked for, as stain_clip's: the other recipes' random streams stay as they were.
            vectors = self._stain_vectors(n, device, generator) if c.stain_vectors else None
            x = stain_jitter(x, gamma, alpha, beta, vectors)  # exp() > 0: only the upper clamp below matters
        if c.stain_clip:  # drawn only when asked for: the other recipes' random streams stay as they were
            x = self._random_stain_clip(x, generator)
        if c.blur:
            x = self._random_blur(x, generator, batch_size)
        if c.noise:
            sigma = _uniform(generator, n, 0.0, c.noise, device).view(n, 1, 1, 1)
            x = x.addcmul_(_pixel_noise(generator, x.shape, device), sigma)  # in place, as the clamp below
        x = x.clamp_(0.0, 1.0).mul_(255.0)  # in place: colour_affine or the / 255 above made x
        if c.jpeg:
            x = self._random_jpeg(x, generator, batch_size)
        return x

    def _colour_affine(self, x: torch.Tensor, generator: torch.Generator | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-image ``(matrix, offset)`` for brightness, saturation, hue and contrast, from [0, 255] to [0, 1].

        Brightness scales, saturation mixes towards grey and hue rotates chroma: all linear, so one matrix.
        Contrast then scales each image's deviation from its mean grey level; the mean of a linear map is the
        map of the mean, so it folds into the same matrix plus an offset.
        """
        c = self.config
        n, device = x.shape[0], x.device
        brightness = _uniform(generator, n, 1 - c.brightness, 1 + c.brightness, device)
        saturation = _uniform(generator, n, 1 - c.saturation, 1 + c.saturation, device)
        hue = _uniform(generator, n, -c.hue, c.hue, device) * (2 * math.pi)
        contrast = _uniform(generator, n, 1 - c.contrast, 1 + c.contrast, device).view(n, 1, 1)
        matrix = brightness.view(n, 1, 1) * hue_matrix(hue) @ saturation_matrix(saturation) / 255.0
        mean_rgb = x.mean(dim=(2, 3)).unsqueeze(-1)  # (N, 3, 1)
        mean_grey = _constant("luma", device) @ (matrix @ mean_rgb)  # (N, 1)
        offset = ((1 - contrast) * mean_grey.view(n, 1, 1)).expand(n, 3, 1)
        return contrast * matrix, offset.reshape(n, 3)

    def _stain_vectors(self, n: int, device: torch.device, generator: torch.Generator | None) -> torch.Tensor:
        """``(N, 3, 3)`` stain matrices (rows H, E, DAB) with each image's H and E vectors perturbed.

        Every component of the two vectors gets N(0, ``stain_vectors``) noise, is clamped to at least 0.01
        and the vector is rescaled to its original length: a change of stain colour (what Macenko
        normalisation to another image does), not of stain amount (what ``stain`` does).
        """
        noise = _randn(generator, (n, 2, 3), device) * self.config.stain_vectors
        return perturbed_stain_vectors(noise)

    def _random_stain_clip(self, x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        """Clip the negative stain densities of a random subset of the batch (probability ``stain_clip``).

        It follows the stain jitter and comes before the clamp to [0, 1], so a pixel that brightness or the
        jitter pushed above white is tinted too (measured so: docs/BENCHMARKS.md).
        """
        chosen = _random_subset(x, self.config.stain_clip, generator)
        if chosen is not None:
            x[chosen] = clip_negative_stains(x[chosen])  # in place: colour() made x, nobody else holds it
        return x

    def _random_blur(self, x: torch.Tensor, generator: torch.Generator | None, batch_size: int | None) -> torch.Tensor:
        """Blur a random subset of the batch (probability ``blur``), with one sigma in [0.5, 1.5] per batch."""
        chosen = _random_subset_on_host(x, self.config.blur, generator)
        if chosen is not None:
            batches = _by_batch(chosen, x.shape[0], batch_size)
            sigmas = _uniform(generator, len(batches), 0.5, 1.5, _HOST).tolist()
            _apply_by_batch(x, batches, sigmas, gaussian_blur)
        return x

    def _random_jpeg(self, x: torch.Tensor, generator: torch.Generator | None, batch_size: int | None) -> torch.Tensor:
        """Re-compress a random subset of the batch (probability ``jpeg``) at one quality per batch.

        Last in the chain, as in a camera: the sensor's light and noise come first, the encoder last.
        """
        chosen = _random_subset_on_host(x, self.config.jpeg, generator)
        if chosen is not None:
            low, high = self.config.jpeg_quality
            batches = _by_batch(chosen, x.shape[0], batch_size)
            draws = (_rand(generator, len(batches), _HOST) * (high - low + 1)).tolist()
            _apply_by_batch(x, batches, [min(low + int(draw), high) for draw in draws], jpeg_round_trip)
        return x


def _random_subset(x: torch.Tensor, probability: float, generator: torch.Generator | None) -> torch.Tensor | None:
    """The images of the batch a transform of this ``probability`` takes, as indices on ``x``'s device; None
    when it takes none. Drawn on the host, like every choice of which images a transform takes."""
    chosen = _random_subset_on_host(x, probability, generator)
    return None if chosen is None else _to_device(chosen, x.device)


def _random_subset_on_host(x: torch.Tensor, probability: float, generator: torch.Generator | None) -> torch.Tensor | None:
    """:func:`_random_subset`'s indices, left on the host."""
    chosen = (_rand(generator, (x.shape[0],), _HOST) < probability).nonzero().flatten()
    return chosen if chosen.numel() else None


def _apply_by_batch(
    x: torch.Tensor, batches: list[torch.Tensor], parameters: Sequence[Any],
    transform: Callable[[torch.Tensor, Any], torch.Tensor],
) -> None:
    """``x[rows] = transform(x[rows], parameter)`` for each batch's chosen rows (host indices) and its
    parameter, in place: the caller made ``x`` and nobody else holds it."""
    for rows, parameter in zip(batches, parameters):
        if rows.numel():
            rows = _to_device(rows, x.device)
            x[rows] = transform(x[rows], parameter)


def _by_batch(chosen: torch.Tensor, n: int, batch_size: int | None) -> list[torch.Tensor]:
    """Sorted host indices ``chosen`` (of ``n`` images) split by the batch of ``batch_size`` they fall in (one
    part, all of them, when ``batch_size`` is None); a batch without any gets an empty part."""
    if batch_size is None:
        return [chosen]
    bounds = torch.tensor(range(batch_size, n, batch_size), dtype=torch.long)  # empty for one batch
    return list(torch.tensor_split(chosen, torch.searchsorted(chosen, bounds)))


# -------------------------------------------------------------------- batched transforms (pure functions)
def random_crop(x: torch.Tensor, size: int, generator: torch.Generator | None) -> torch.Tensor:
    """One random ``size`` x ``size`` window of each NCHW image, at full resolution (no resampling).

    Cells fill the whole field of these smears, so a window of it still shows the labelled cells, in more
    detail than the whole image shrunk to ``size`` for the same cost a step (cross-validated it scored
    lower than the shrunk whole image: docs/BENCHMARKS.md). Every row of every window is a contiguous run
    of ``size`` pixels in the channels-last layout, so the crop is one ``index_select`` of those runs (a
    strided view of the flat pixels holds a run starting at every pixel): a sixth of advanced indexing's
    cost on a CPU.
    """
    n, channels, height, width = x.shape
    if size > min(height, width):
        raise ValueError(f"augment.crop {size} is larger than the {height}x{width} images")
    offsets = (_rand(generator, (2, n), _HOST) * torch.tensor([[height - size + 1], [width - size + 1]])).long()
    row_in_batch = torch.arange(n).view(n, 1) * height + offsets[0].view(n, 1) + torch.arange(size).view(1, size)
    run_starts = _to_device((row_in_batch * width + offsets[1].view(n, 1)).flatten(), x.device)
    pixels = x.permute(0, 2, 3, 1).contiguous().flatten()  # a view when x is channels_last, as the cache is
    runs = pixels.unfold(0, size * channels, channels)  # run k: the size pixels from pixel k on
    return runs.index_select(0, run_starts).view(n, size, size, channels).permute(0, 3, 1, 2)


def dihedral(x: torch.Tensor, transpose: torch.Tensor, hflip: torch.Tensor, vflip: torch.Tensor) -> torch.Tensor:
    """Apply per-image transpose, then horizontal and vertical flips (boolean masks of length N) to NCHW images.

    Each of the 8 symmetries permutes an image's pixels, so the whole batch is one gather: the pixel rows of
    the channels-last layout (all channels of a pixel together) picked by each image's permutation. On a
    2-core CPU the geometric step, conversion to float included, took 6.5 ms a batch of 64 at 160 px
    against 7.9 ms when the images sharing a symmetry were transformed together (8 groups, 3 copies each),
    and the gather is one kernel on a GPU. The masks may live on the host while the images are on a GPU.
    The output is channels-last, as the cache's images are.
    """
    n, channels, height, width = x.shape
    if height != width and bool(transpose.any()):
        raise ValueError(f"a transpose would change the shape of {height}x{width} images")
    code = _to_device(transpose.long() * 4 + hflip.long() * 2 + vflip.long(), x.device)
    image_starts = torch.arange(n, device=x.device).view(n, 1) * (height * width)
    sources = (_dihedral_permutations(height, width, x.device)[code] + image_starts).flatten()
    pixels = x.permute(0, 2, 3, 1).reshape(n * height * width, channels)  # a view when x is channels-last
    return pixels.index_select(0, sources).view(n, height, width, channels).permute(0, 3, 1, 2)


@functools.cache
def _dihedral_permutations(height: int, width: int, device: torch.device) -> torch.Tensor:
    """``(8, H * W)``: for symmetry code ``4 * transpose + 2 * hflip + vflip``, the source of each output pixel.

    A transposing symmetry of a non-square image has no permutation; its rows repeat the identity (never
    used: :func:`dihedral` refuses it).
    """
    pixels = torch.arange(height * width).view(height, width)
    permutations = []
    for code in range(8):
        source = pixels.t() if code & 4 and height == width else pixels
        if code & 2:
            source = source.flip(1)
        if code & 1:
            source = source.flip(0)
        permutations.append(source.flatten())
    return torch.stack(permutations).to(device)


def dihedral_matrices(transpose: torch.Tensor, hflip: torch.Tensor, vflip: torch.Tensor) -> torch.Tensor:
    """The same symmetries as :func:`dihedral`, as ``(N, 2, 2)`` matrices on ``affine_grid`` coordinates."""
    n = transpose.shape[0]
    eye = torch.eye(2, device=transpose.device).expand(n, 2, 2)
    swap = torch.tensor([[0.0, 1.0], [1.0, 0.0]], device=transpose.device).expand(n, 2, 2)
    matrix = torch.where(transpose.view(n, 1, 1), swap, eye)
    signs = torch.stack([1 - 2 * hflip.float(), 1 - 2 * vflip.float()], dim=1)  # -1 mirrors that axis
    # Sampling: output (x, y) reads input at matrix @ (x, y); mirror the output axes after the transpose.
    return matrix * signs.view(n, 1, 2)


def affine(x: torch.Tensor, matrices: torch.Tensor) -> torch.Tensor:
    """Warp float NCHW images by ``(N, 2, 3)`` affine matrices (output-to-input, normalised coordinates).

    Reflection padding fills the corners a rotation uncovers with nearby background instead of black,
    which would otherwise be a tell-tale border.
    """
    grid = affine_grid(matrices.to(x.dtype), x.shape[-2], x.shape[-1])
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)


def affine_grid(matrices: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """What ``F.affine_grid(matrices, size, align_corners=False)`` returns, as one matrix product.

    Pixel-centre coordinates ``(x, y, 1)`` times every image's matrix is a single GEMM; torch's own
    ``affine_grid`` (a batched matmul with an inner size of 3) was measured 10-20x slower on this CPU.
    """
    dtype, device = matrices.dtype, matrices.device
    xs = (torch.arange(width, dtype=dtype, device=device) * 2 + 1) / width - 1
    ys = (torch.arange(height, dtype=dtype, device=device) * 2 + 1) / height - 1
    base = torch.stack([*torch.meshgrid(xs, ys, indexing="xy"), torch.ones(height, width, dtype=dtype, device=device)], -1)
    return torch.einsum("hwk,nck->nhwc", base, matrices)


def saturation_matrix(factor: torch.Tensor) -> torch.Tensor:
    """``(N, 3, 3)`` matrices mixing each pixel with its grey value: 0 = grey, 1 = unchanged."""
    grey = _constant("luma", factor.device).expand(3, 3)  # every output channel = luma . rgb
    f = factor.view(-1, 1, 1)
    return f * torch.eye(3, device=factor.device) + (1 - f) * grey


def hue_matrix(angle: torch.Tensor) -> torch.Tensor:
    """``(N, 3, 3)`` matrices rotating hue by ``angle`` radians (a rotation of the YIQ chroma plane)."""
    to_yiq, from_yiq = _constant("rgb_to_yiq", angle.device), _constant("yiq_to_rgb", angle.device)
    cos, sin = torch.cos(angle), torch.sin(angle)
    rotation = torch.zeros(angle.shape[0], 3, 3, device=angle.device)
    rotation[:, 0, 0] = 1
    rotation[:, 1, 1], rotation[:, 1, 2] = cos, -sin
    rotation[:, 2, 1], rotation[:, 2, 2] = sin, cos
    return from_yiq @ rotation @ to_yiq


def colour_affine(x: torch.Tensor, matrix: torch.Tensor, offset: torch.Tensor) -> torch.Tensor:
    """``matrix @ rgb + offset`` for every pixel, with one ``(3, 3)`` matrix and ``(3,)`` offset per image."""
    n, ch, h, w = x.shape
    out = torch.baddbmm(offset.to(x.dtype).unsqueeze(-1), matrix.to(x.dtype), x.reshape(n, ch, h * w))
    return out.view(n, ch, h, w)


def stain_jitter(
    x: torch.Tensor,
    gamma: torch.Tensor,
    alpha: torch.Tensor,
    beta: torch.Tensor,
    stain_vectors: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per-channel gamma and HED stain jitter of images in [0, 1] (each argument ``(N, 3)``).

    Both are linear in optical density OD = -log(I): a gamma ``I ** g`` multiplies a channel's OD by ``g``,
    and stain jitter (Tellez et al. 2018) maps the haematoxylin / eosin / DAB densities obtained by colour
    deconvolution to ``alpha * density + beta``. ``stain_vectors`` (``(N, 3, 3)``, rows H, E, DAB), when
    given, re-renders those densities with each image's own stain vectors instead of the ones they were
    separated with (see :func:`perturbed_stain_vectors`). One log, one matrix + offset per image, one exp.
    """
    rgb_from_hed = _constant("rgb_from_hed", x.device).to(x.dtype)
    hed_from_rgb = _constant("hed_from_rgb", x.device).to(x.dtype)
    # Row-vector convention: od' = ((od * gamma) @ hed_from_rgb * alpha + beta) @ rgb_from_hed.
    if stain_vectors is None:
        matrix = gamma.unsqueeze(-1) * (hed_from_rgb @ (alpha.unsqueeze(-1) * rgb_from_hed))  # (N, 3, 3)
        offset = beta @ rgb_from_hed  # (N, 3)
    else:  # the same with a reconstruction matrix per image
        stain_vectors = stain_vectors.to(x.dtype)
        matrix = gamma.unsqueeze(-1) * (hed_from_rgb @ (alpha.unsqueeze(-1) * stain_vectors))
        offset = (beta.unsqueeze(1) @ stain_vectors).squeeze(1)
    # exp(-(M od + b)) with od = -log(I) is exp(M log(I) - b): no negations needed.
    log_intensity = x.clamp_min(_OD_EPS).log_()  # in place on the clamped copy: one pass fewer
    return colour_affine(log_intensity, matrix.transpose(1, 2), -offset).exp_()


def perturbed_stain_vectors(noise: torch.Tensor) -> torch.Tensor:
    """``(N, 3, 3)`` stain matrices: the Ruifrok & Johnston H and E vectors plus ``noise`` (``(N, 2, 3)``).

    Each perturbed component is clamped to at least 0.01 (a stain absorbs some light in every channel) and
    each vector rescaled to its original length, so its direction (the stain's colour) changes, not its
    strength; the DAB vector is kept.
    """
    base = _constant("rgb_from_hed", noise.device).to(noise.dtype)
    he = (base[:2] + noise).clamp_min(0.01)
    he = he * (base[:2].norm(dim=1) / he.norm(dim=-1)).unsqueeze(-1)
    return torch.cat([he, base[2:].expand(noise.shape[0], 1, 3)], dim=1)


def clip_negative_stains(x: torch.Tensor) -> torch.Tensor:
    """Images in [0, 1] with every negative haematoxylin / eosin / DAB density set to zero.

    What scikit-image's ``rgb2hed`` then ``hed2rgb`` do to a smear (and a stain-separation tool, or another
    lab's stain protocol, may): colour deconvolution gives some pixels negative densities, which that
    round trip clips, darkening the stained cells' blue and greying the background. Not an affine change
    of colour, so per-image standardisation does not undo it (benchmarks/stain_transfer.py).
    """
    n = x.shape[0]
    # colour_affine applies a matrix to column vectors: the transposes of the row-vector stain matrices.
    to_stains = _constant("hed_from_rgb", x.device).to(x.dtype).T.expand(n, 3, 3)
    from_stains = _constant("rgb_from_hed", x.device).to(x.dtype).T.expand(n, 3, 3)
    no_offset = torch.zeros(n, 3, dtype=x.dtype, device=x.device)
    density = colour_affine(x.clamp_min(_OD_EPS).log_().neg_(), to_stains, no_offset).clamp_min_(0.0)
    return colour_affine(density, from_stains, no_offset).neg_().exp_()


def gaussian_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of NCHW images (kernel radius about 3 sigma, reflected borders).

    Written as weighted sums of shifted views, accumulated in place: on the CPU that is several times
    faster than a depthwise ``conv2d`` with a tiny kernel (and 3x faster than summing new tensors).
    """
    radius = max(1, math.ceil(3 * sigma))
    taps = torch.exp(-torch.arange(-radius, radius + 1, dtype=torch.float64) ** 2 / (2 * sigma**2))
    kernel = (taps / taps.sum()).tolist()
    h, w = x.shape[-2:]
    padded = F.pad(x, (radius, radius, 0, 0), mode="reflect")
    x = padded[..., :, 0:w] * kernel[0]
    for k, weight in enumerate(kernel[1:], start=1):
        x.add_(padded[..., :, k : k + w], alpha=weight)
    padded = F.pad(x, (0, 0, radius, radius), mode="reflect")
    out = padded[..., 0:h, :] * kernel[0]
    for k, weight in enumerate(kernel[1:], start=1):
        out.add_(padded[..., k : k + h, :], alpha=weight)
    return out


def jpeg_round_trip(x: torch.Tensor, quality: int) -> torch.Tensor:
    """Encode float NCHW RGB images in [0, 255] as JPEG at ``quality`` and decode them again (float out).

    libjpeg does this better than any tensor re-implementation could: the real quantisation tables and the
    4:2:0 chroma subsampling that a lab's camera or image server applies. On a CUDA device the batch is
    coded by nvJPEG on the GPU, where torchvision was built with it, as one mosaic (see :func:`mosaic`); a
    round trip through the CPU codec would cost more than the training step itself there.
    """
    images = x.round().clamp(0, 255).to(torch.uint8)
    on_gpu = images.is_cuda and gpu_jpeg_available()
    if on_gpu and images.shape[-2] % JPEG_MCU == 0 and images.shape[-1] % JPEG_MCU == 0:
        decoded = _jpeg_codec([mosaic(images)], quality, x.device)[0]
        return unmosaic(decoded, len(images)).to(dtype=x.dtype)
    if not on_gpu:
        images = images.cpu()
    round_tripped = _jpeg_codec([image.contiguous() for image in images], quality, x.device if on_gpu else "cpu")
    return torch.stack(round_tripped).to(device=x.device, dtype=x.dtype)


# A JPEG with 4:2:0 chroma is coded in 16 x 16 pixel units (MCUs) that are quantised independently.
JPEG_MCU = 16


def mosaic(images: torch.Tensor) -> torch.Tensor:
    """Tile ``(N, C, H, W)`` images into one ``(C, rows * H, cols * W)`` image, row by row (blank tiles last).

    Why: nvJPEG's cost is mostly per call: on an H200, 16 images of 160 px took 3.3 ms one by one and
    1.5 ms as one mosaic. With H and W multiples of the 16-pixel coding unit, every unit lies inside one
    tile and is quantised as it would be alone. Only a decoder that interpolates chroma (libjpeg does) reads
    across a tile edge, which touches the two pixel rows and columns beside it; with nvJPEG, training gave
    the same scores to the last digit either way.
    """
    n, c, h, w = images.shape
    cols = math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    padded = torch.cat([images, images.new_zeros(rows * cols - n, c, h, w)])
    return padded.view(rows, cols, c, h, w).permute(2, 0, 3, 1, 4).reshape(c, rows * h, cols * w)


def unmosaic(tiled: torch.Tensor, n: int) -> torch.Tensor:
    """The ``n`` images of :func:`mosaic`'s tiling, ``(N, C, H, W)``."""
    cols = math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    c, height, width = tiled.shape
    h, w = height // rows, width // cols
    return tiled.reshape(c, rows, h, cols, w).permute(1, 3, 0, 2, 4).reshape(rows * cols, c, h, w)[:n]


def _jpeg_codec(images: list[torch.Tensor], quality: int, device: torch.device | str) -> list[torch.Tensor]:
    """torchvision's batched encode, then decode on ``device`` (the compressed bytes come from host memory)."""
    with warnings.catch_warnings():
        # torchvision 0.29 deprecates its codecs in favour of torchcodec's; they still work and give PIL's
        # pixels, and torchvision is already a dependency. Move to torchcodec when torchvision drops them.
        warnings.simplefilter("ignore", DeprecationWarning)
        encoded = encode_jpeg(images, quality=quality)
        return decode_jpeg([data.cpu() for data in encoded], device=device)


@functools.cache
def gpu_jpeg_available() -> bool:
    """Whether torchvision's JPEG codec runs on CUDA here (it needs a build with nvJPEG): tried once."""
    try:
        _jpeg_codec([torch.full((3, 16, 16), 128, dtype=torch.uint8, device="cuda")], 75, "cuda")
        return True
    except (RuntimeError, ValueError):
        return False


# -------------------------------------------------------------------- constants and random draws
@functools.cache
def _constant(name: str, device: torch.device) -> torch.Tensor:
    """A colour constant on ``device``, copied there once: every copy from host memory stalls a GPU."""
    return _CONSTANTS[name].to(device)


def _to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host tensor on ``device``; to a GPU through page-locked memory, so the copy does not wait for it."""
    if device.type != "cuda" or tensor.device == device:
        return tensor.to(device)
    return tensor.pin_memory().to(device, non_blocking=True)


def _generator_device(generator: torch.Generator | None) -> torch.device:
    return generator.device if generator is not None else torch.device("cpu")


def _generator_on(generator: torch.Generator | None, device: torch.device) -> torch.Generator | None:
    """The generator to draw with on ``device``: ``generator`` itself on its own device, else a new one there.

    Drawing on the CPU and copying to a GPU would cost a stall per copy (a copy from ordinary host memory
    waits for the GPU's queue to drain), a dozen a step. Off the generator's device, a generator on
    ``device`` is seeded from one draw of ``generator``, so the draws stay reproducible and resumable from
    the same seeds; on the generator's own device (the CPU, where training on the CPU draws) nothing
    changes.
    """
    if generator is None or device == _generator_device(generator):
        return generator
    seed = int(torch.randint(2**62, (1,), generator=generator, device=_generator_device(generator)))
    return torch.Generator(device).manual_seed(seed)


def _rand(generator: torch.Generator | None, shape, device: torch.device) -> torch.Tensor:
    return torch.rand(shape, generator=_generator_on(generator, device), device=device)


def _randn(generator: torch.Generator | None, shape, device: torch.device) -> torch.Tensor:
    return torch.randn(shape, generator=_generator_on(generator, device), device=device)


def _pixel_noise(generator: torch.Generator | None, shape, device: torch.device) -> torch.Tensor:
    """Standard normal noise for every pixel of a batch, drawn fresh where the batch lives.

    Each value is one of the 256 equal-probability quantiles of the standard normal (standard deviation
    0.9994, tails cut at 2.9), picked by one random byte; the bytes come eight to a 64-bit draw. Why not
    ``torch.randn``: on a 2-core CPU it took 17 ms a batch of 64 at 160 px, a third of the augmentation,
    against 6 ms for this. Cross-validated over session blocks with two seeds, these draws scored 0.973 and
    0.976 against 0.976 and 0.976 with ``torch.randn``, inside the 0.003 that a new seed alone moves the
    score (docs/BENCHMARKS.md). (A window at a random offset into a fixed bank of noise was cheaper still
    and scored 0.973-0.974 against 0.977-0.978, lower on 9 of 10 paired folds: the draws stay fresh.)
    """
    count = math.prod(shape)
    words = torch.empty((count + 7) // 8, dtype=torch.int64, device=device)
    words.random_(-(2**63), 2**63 - 1, generator=_generator_on(generator, device))  # all 64 bits random
    codes = words.view(torch.uint8)[:count].to(torch.int32)
    return _constant("normal_quantiles", device).index_select(0, codes).view(shape)


def _uniform(generator: torch.Generator | None, shape, low: float, high: float, device: torch.device) -> torch.Tensor:
    return low + (high - low) * _rand(generator, shape, device)
