"""Batch augmentation: shapes, dtypes, ranges, order kept, identity at strength 0, each transform acts."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from bloodcell.config import AugmentConfig
from bloodcell.data.augment import (
    BatchAugment,
    affine,
    affine_grid,
    colour_affine,
    dihedral,
    dihedral_matrices,
    gaussian_blur,
    hue_matrix,
    jpeg_round_trip,
    mosaic,
    perturbed_stain_vectors,
    random_crop,
    stain_jitter,
    unmosaic,
)

OFF = {
    "flip": False, "rot90": False, "affine_degrees": 0, "affine_scale": 0, "affine_translate": 0,
    "brightness": 0, "contrast": 0, "saturation": 0, "hue": 0, "gamma": 0, "stain": 0, "blur": 0, "noise": 0,
    "jpeg": 0, "stain_clip": 0, "stain_vectors": 0,
}  # fmt: skip
COLOUR_TRANSFORMS = {
    "brightness": 0.3, "contrast": 0.3, "saturation": 0.5, "hue": 0.1, "gamma": 0.3, "stain": 0.3, "blur": 1.0,
    "noise": 0.05, "jpeg": 1.0, "stain_clip": 1.0, "stain_vectors": 0.2,
}  # fmt: skip


def _override(name: str, strength: float) -> dict:
    """One transform switched on at ``strength`` (JPEG at a quality low enough to change a smooth image)."""
    extra = {"jpeg_quality": (5, 10)} if name == "jpeg" else {}
    return {**OFF, name: strength, **extra}


def smear_batch(n: int = 8, size: int = 32, seed: int = 0) -> torch.Tensor:
    """uint8 NCHW images with smooth colour structure (a gradient and a dark blob), like stained cells."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.linspace(0, 1, size), torch.linspace(0, 1, size), indexing="ij")
    base = torch.rand(n, 3, 1, 1, generator=g) * 120 + 100
    blob = ((xx - 0.5) ** 2 + (yy - 0.5) ** 2 < 0.05).float()
    images = base + 40 * xx - 90 * blob * torch.rand(n, 3, 1, 1, generator=g)
    return images.clamp(0, 255).to(torch.uint8)


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_full_augmentation_keeps_shape_dtype_range_and_is_reproducible() -> None:
    x = smear_batch()
    augment = BatchAugment(AugmentConfig(hue=0.05, gamma=0.2, stain=0.2, blur=0.5, noise=0.02))
    y = augment(x, gen(1))
    assert y.shape == x.shape and y.dtype == torch.float32
    assert float(y.min()) >= 0 and float(y.max()) <= 255
    assert torch.equal(y, augment(x, gen(1)))
    assert not torch.equal(y, augment(x, gen(2)))


def test_channels_last_input_works() -> None:
    x = smear_batch().contiguous(memory_format=torch.channels_last)
    y = BatchAugment(AugmentConfig(hue=0.05, stain=0.1))(x, gen())
    assert y.shape == x.shape


def test_all_strengths_zero_is_the_identity() -> None:
    x = smear_batch()
    augment = BatchAugment(AugmentConfig(**OFF))
    assert augment.is_identity
    y = augment(x, gen())
    assert y.dtype == torch.float32 and torch.equal(y, x.float())


@pytest.mark.parametrize("name", sorted(COLOUR_TRANSFORMS))
def test_each_colour_transform_changes_the_image_and_keeps_the_range(name: str) -> None:
    x = smear_batch()
    augment = BatchAugment(AugmentConfig(**_override(name, COLOUR_TRANSFORMS[name])))
    y = augment(x, gen())
    assert y.shape == x.shape and y.dtype == torch.float32
    assert float(y.min()) >= 0 and float(y.max()) <= 255
    changed = (y - x.float()).abs().flatten(1).mean(dim=1) > 0.5
    assert changed.float().mean() >= 0.5, f"{name} left most images unchanged"


@pytest.mark.parametrize("name", sorted(COLOUR_TRANSFORMS))
def test_each_colour_transform_at_zero_is_the_identity(name: str) -> None:
    """Alone at 0 nothing is on, and the batch comes back as it was. Next to another transform of its group
    (drawn and applied together) its code runs: there ``name`` at 0 must act as it does at a vanishing
    strength, that is not at all, and not at some default strength."""
    x = smear_batch()
    assert torch.equal(BatchAugment(AugmentConfig(**_override(name, 0)))(x, gen()), x.float())
    other = {"hue": "brightness", "gamma": "stain", "stain": "gamma", "stain_vectors": "gamma"}.get(name, "hue")

    def with_other(strength: float) -> torch.Tensor:
        return BatchAugment(AugmentConfig(**{**_override(name, strength), other: COLOUR_TRANSFORMS[other]}))(x, gen())

    at_zero, vanishing = with_other(0), with_other(1e-6)
    assert not torch.equal(at_zero, x.float())  # the other transform acted: the colour path ran
    change = float((at_zero - vanishing).abs().max())
    assert change < 0.01, f"{name}=0 changed the image by {change:.3g} grey levels"


def _dihedral_images(image: torch.Tensor) -> list[torch.Tensor]:
    rotations = [torch.rot90(image, k, dims=(1, 2)) for k in range(4)]
    return rotations + [r.flip(2) for r in rotations]


@pytest.mark.parametrize(("flip", "rot90", "allowed"), [(True, True, 8), (False, True, 4), (True, False, 4)])
def test_flips_and_rotations_keep_each_image_in_its_place(flip: bool, rot90: bool, allowed: int) -> None:
    """Image i of the output is a symmetry of image i of the input, so labels stay aligned."""
    x = torch.randint(0, 256, (32, 3, 16, 16), dtype=torch.uint8)
    y = BatchAugment(AugmentConfig(**{**OFF, "flip": flip, "rot90": rot90}))(x, gen())
    seen = set()
    for i in range(len(x)):
        candidates = _dihedral_images(x[i].float())
        matches = [k for k, c in enumerate(candidates) if torch.equal(c, y[i])]
        assert matches, f"output image {i} is not a flip/rotation of input image {i}"
        seen.add(matches[0])
    if rot90 and not flip:
        assert seen <= {0, 1, 2, 3}, "rot90 alone must only rotate, never mirror"
    if flip and not rot90:
        assert seen <= {0, 2, 4, 6}, "flips alone must not rotate by 90 degrees"
    assert len(seen) > 1


@pytest.mark.parametrize("channels_last", [True, False])
def test_dihedral_applies_each_images_own_symmetry(channels_last: bool) -> None:
    """Transpose first, then the horizontal and vertical flips, each image by its own three coins."""
    x = torch.randint(0, 256, (24, 3, 10, 10), dtype=torch.uint8)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    transpose, hflip, vflip = torch.rand(3, 24, generator=gen(5)) < 0.5
    y = dihedral(x, transpose, hflip, vflip)
    for i in range(len(x)):
        expected = x[i].transpose(1, 2) if transpose[i] else x[i]
        expected = expected.flip(2) if hflip[i] else expected
        expected = expected.flip(1) if vflip[i] else expected
        assert torch.equal(y[i], expected), f"image {i}"


def test_dihedral_flips_non_square_images_and_refuses_to_transpose_them() -> None:
    x = torch.randint(0, 256, (2, 3, 6, 9), dtype=torch.uint8)
    no, yes = torch.tensor([False, False]), torch.tensor([False, True])
    assert torch.equal(dihedral(x, no, yes, yes)[1], x[1].flip(1).flip(2))
    with pytest.raises(ValueError, match="6x9"):
        dihedral(x, yes, no, no)


@pytest.mark.parametrize("channels_last", [True, False])
def test_random_crop_takes_one_full_resolution_window_of_each_image(channels_last: bool) -> None:
    x = torch.randint(0, 256, (6, 3, 20, 24), dtype=torch.uint8)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    y = random_crop(x, 12, gen(3))
    assert y.shape == (6, 3, 12, 12) and y.dtype == torch.uint8
    offsets = []
    for i in range(len(x)):
        found = [(r, c) for r in range(9) for c in range(13) if torch.equal(y[i], x[i, :, r : r + 12, c : c + 12])]
        assert found, f"crop {i} is not a window of image {i}"
        offsets.append(found[0])
    assert len(set(offsets)) > 1, "every image got the same window"
    assert torch.equal(y, random_crop(x, 12, gen(3)))


def test_random_crop_larger_than_the_image_is_rejected() -> None:
    with pytest.raises(ValueError, match="augment.crop 40 is larger than the 32x32 images"):
        BatchAugment(AugmentConfig(crop=40))(smear_batch(), gen())


def test_crop_then_augment_gives_crop_sized_float_images() -> None:
    y = BatchAugment(AugmentConfig(crop=24, hue=0.05, noise=0.02))(smear_batch(), gen())
    assert y.shape == (8, 3, 24, 24) and y.dtype == torch.float32


def test_affine_keeps_each_image_in_its_place_and_identity_matrix_is_exact() -> None:
    x = smear_batch().float()
    identity = torch.tensor([[1.0, 0, 0], [0, 1.0, 0]]).expand(len(x), 2, 3)
    assert torch.allclose(affine(x, identity), x, atol=1e-3)
    y = BatchAugment(AugmentConfig(**{**OFF, "affine_degrees": 10, "affine_scale": 0.1}))(x, gen())
    # A small warp moves pixels a little: every image stays closest to its own source.
    distances = torch.cdist(y.flatten(1), x.flatten(1))
    assert torch.equal(distances.argmin(dim=1), torch.arange(len(x)))


def test_affine_grid_matches_torch() -> None:
    matrices = torch.tensor([[[0.9, -0.2, 0.1], [0.3, 1.1, -0.05]], [[1.0, 0.0, 0.0], [0.0, -1.0, 0.0]]])
    expected = torch.nn.functional.affine_grid(matrices, [2, 3, 12, 20], align_corners=False)
    assert torch.allclose(affine_grid(matrices, 12, 20), expected, atol=1e-6)


def test_dihedral_as_affine_matrices_equals_the_exact_index_version() -> None:
    """With an affine warp on, flips and quarter turns ride in its matrix; they must land on pixel centres."""
    x = torch.randint(0, 256, (16, 3, 20, 20), dtype=torch.uint8)
    coins = torch.rand(3, 16, generator=gen(4)) < 0.5
    by_index = dihedral(x, *coins).float()
    matrices = torch.cat([dihedral_matrices(*coins), torch.zeros(16, 2, 1)], dim=2)
    by_grid = affine(x.float(), matrices)
    assert torch.allclose(by_grid, by_index, atol=1e-2)


def test_hue_rotation_keeps_luma_and_zero_is_identity() -> None:
    x = smear_batch().float() / 255
    zero = torch.zeros(len(x), 3)
    assert torch.allclose(colour_affine(x, hue_matrix(torch.zeros(len(x))), zero), x, atol=1e-5)
    rotated = colour_affine(x, hue_matrix(torch.full((len(x),), 0.5)), zero)
    luma = torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)
    assert torch.allclose((rotated * luma).sum(1), (x * luma).sum(1), atol=1e-4)
    assert not torch.allclose(rotated, x, atol=1e-2)


def test_stain_jitter_is_identity_at_unit_parameters_and_gamma_is_a_power() -> None:
    x = smear_batch().float().clamp_min(1) / 255
    n = len(x)
    ones, zeros = torch.ones(n, 3), torch.zeros(n, 3)
    assert torch.allclose(stain_jitter(x, ones, ones, zeros), x, atol=1e-4)
    gamma = torch.tensor([1.2, 0.9, 1.1]).expand(n, 3)
    assert torch.allclose(stain_jitter(x, gamma, ones, zeros), x ** gamma.reshape(n, 3, 1, 1), atol=1e-4)


def test_perturbed_stain_vectors_change_h_and_e_colour_not_length() -> None:
    base = torch.tensor([[0.65, 0.70, 0.29], [0.07, 0.99, 0.11], [0.27, 0.57, 0.78]])
    assert torch.allclose(perturbed_stain_vectors(torch.zeros(4, 2, 3)), base.expand(4, 3, 3))
    vectors = perturbed_stain_vectors(torch.randn(16, 2, 3, generator=gen()) * 0.3)
    assert vectors.shape == (16, 3, 3) and bool((vectors > 0).all())
    assert torch.allclose(vectors.norm(dim=-1), base.norm(dim=-1).expand(16, 3), atol=1e-5)
    assert torch.equal(vectors[:, 2], base[2].expand(16, 3))  # DAB kept
    assert not torch.allclose(vectors[:, :2], base[:2].expand(16, 2, 3), atol=1e-2)
    # The unperturbed vectors through stain_jitter's per-image path give its fixed-vector result.
    x = smear_batch().float().clamp_min(1) / 255
    n = len(x)
    gamma, alpha = torch.full((n, 3), 1.1), torch.full((n, 3), 0.9)
    beta = torch.full((n, 3), 0.05)
    fixed = stain_jitter(x, gamma, alpha, beta)
    assert torch.allclose(stain_jitter(x, gamma, alpha, beta, base.expand(n, 3, 3)), fixed, atol=1e-5)
    assert not torch.allclose(stain_jitter(x, gamma, alpha, beta, vectors[:n]), fixed, atol=1e-2)


def _must_not_be_called(*args: object) -> None:
    raise AssertionError("stain vectors were perturbed with stain_vectors=0")


def test_stain_vectors_off_draws_nothing_and_on_changes_the_batch(monkeypatch: pytest.MonkeyPatch) -> None:
    x = smear_batch()
    recipe = {"gamma": 0.2, "stain": 0.1, "stain_clip": 0.25, "noise": 0.02}
    with monkeypatch.context() as patched:  # off, the option draws nothing: the other recipes' streams stay
        patched.setattr("bloodcell.data.augment.perturbed_stain_vectors", _must_not_be_called)
        y = BatchAugment(AugmentConfig(**recipe, stain_vectors=0))(x, gen(3))
    on = BatchAugment(AugmentConfig(**recipe, stain_vectors=0.2))(x, gen(3))
    assert on.shape == x.shape and on.dtype == torch.float32
    assert float(on.min()) >= 0 and float(on.max()) <= 255 and not torch.equal(on, y)


def test_blur_keeps_the_mean_and_smooths() -> None:
    x = torch.rand(2, 3, 24, 24)
    blurred = gaussian_blur(x, 1.0)
    assert blurred.shape == x.shape
    assert torch.allclose(blurred.mean(), x.mean(), atol=1e-2)
    assert blurred.diff(dim=3).abs().mean() < 0.5 * x.diff(dim=3).abs().mean()


@pytest.mark.parametrize("name", ["blur", "jpeg"])
def test_a_call_over_several_batches_draws_each_batch_s_own_choice(name: str) -> None:
    """Blur's sigma and JPEG's quality are drawn once a batch: a call holding two batches (as training on
    a GPU makes) gives each its own, and a call of one batch draws exactly as before."""
    extra = {"jpeg_quality": (5, 95)} if name == "jpeg" else {}
    augment = BatchAugment(AugmentConfig(**{**OFF, name: 1.0, **extra}))  # every image is taken
    x = smear_batch(1).expand(8, -1, -1, -1).contiguous()  # 8 copies of one image
    whole = augment(x, gen(5))
    assert all(torch.equal(whole[0], image) for image in whole)  # one choice for the call
    two_batches = augment(x, gen(5), batch_size=4)
    assert all(torch.equal(two_batches[0], image) for image in two_batches[:4])
    assert all(torch.equal(two_batches[4], image) for image in two_batches[4:])
    assert not torch.equal(two_batches[0], two_batches[4])  # each batch its own sigma / quality
    assert torch.equal(augment(x, gen(5), batch_size=8), whole)


def test_the_batch_size_changes_no_draw_of_a_one_batch_call() -> None:
    """What keeps CPU training's random stream (one batch a call) as it always was."""
    augment = BatchAugment(AugmentConfig(blur=0.5, jpeg=0.5, noise=0.02, stain_clip=0.5))
    x = smear_batch(8)
    assert torch.equal(augment(x, gen(7), batch_size=8), augment(x, gen(7)))
    assert torch.equal(augment(x[:5], gen(7), batch_size=8), augment(x[:5], gen(7)))  # a short last batch


def test_the_cpu_random_stream_is_what_it_was_when_the_bundled_model_trained(monkeypatch: pytest.MonkeyPatch) -> None:
    """Reference draws taken with the code of df3bf60 (before calls could span batches): which images the
    blur and the JPEG took, at which sigma and quality, and where the generator stood afterwards. A change
    here changes every CPU training, the bundled model's recipe included."""
    from bloodcell.data import augment as augment_module

    calls: list[tuple[str, int, float]] = []
    blur, jpeg = augment_module.gaussian_blur, augment_module.jpeg_round_trip

    def spied_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
        calls.append(("blur", len(x), round(sigma, 6)))
        return blur(x, sigma)

    def spied_jpeg(x: torch.Tensor, quality: int) -> torch.Tensor:
        calls.append(("jpeg", len(x), quality))
        return jpeg(x, quality)

    monkeypatch.setattr(augment_module, "gaussian_blur", spied_blur)
    monkeypatch.setattr(augment_module, "jpeg_round_trip", spied_jpeg)
    generator = gen(11)
    x = (torch.arange(8 * 3 * 16 * 16) % 251).to(torch.uint8).view(8, 3, 16, 16)
    BatchAugment(AugmentConfig(blur=0.5, jpeg=0.5, noise=0.02, stain_clip=0.5))(x, generator, batch_size=8)
    assert calls == [("blur", 5, 0.657327), ("jpeg", 4, 68)]
    assert float(torch.rand(1, generator=generator)) == pytest.approx(0.7220814228057861, abs=1e-7)


def test_jpeg_round_trip_gives_the_pixels_pil_gives() -> None:
    """The augmentation's codec is the one the shift suite's JPEG shift uses (libjpeg, 4:2:0)."""
    import numpy as np

    from bloodcell.evaluate.shifts import SHIFT_PARAMETERS, jpeg

    x = smear_batch(n=3, size=40).contiguous(memory_format=torch.channels_last)
    ours = jpeg_round_trip(x.float(), SHIFT_PARAMETERS["jpeg"][2]["quality"])
    pil = jpeg(x.permute(0, 2, 3, 1).numpy().copy(), 2)
    assert ours.dtype == torch.float32 and ours.shape == x.shape
    assert np.array_equal(ours.permute(0, 2, 3, 1).numpy().astype(np.uint8), pil)


def test_jpeg_quality_range_is_checked() -> None:
    with pytest.raises(ValueError, match="low <= high"):
        AugmentConfig(jpeg_quality=(90, 30))


def test_on_the_generators_own_device_every_draw_comes_from_it() -> None:
    """Training on the CPU draws everything from its CPU generator, so a seed fixes the whole batch."""
    from bloodcell.data.augment import _generator_on

    g = gen(3)
    assert _generator_on(g, torch.device("cpu")) is g


def test_pixel_noise_is_standard_normal_and_set_by_the_generator() -> None:
    from statistics import NormalDist

    from bloodcell.data.augment import _pixel_noise

    shape, cpu = (8, 3, 64, 65), torch.device("cpu")  # an odd count: not a whole number of 64-bit draws
    noise = _pixel_noise(gen(3), shape, cpu)
    assert noise.shape == shape and noise.dtype == torch.float32
    assert abs(float(noise.mean())) < 0.02 and abs(float(noise.std()) - 1) < 0.02
    # Quantiles of the normal: the shares below -1, 0 and 1.5 are the normal's, up to sampling error.
    for z in (-1.0, 0.0, 1.5):
        assert abs(float((noise < z).float().mean()) - NormalDist().cdf(z)) < 0.01
    assert torch.equal(noise, _pixel_noise(gen(3), shape, cpu))  # the generator's seed fixes every draw
    g = gen(3)
    first, second = _pixel_noise(g, shape, cpu), _pixel_noise(g, shape, cpu)
    assert abs(float((first * second).mean())) < 0.02  # the next batch gets unrelated numbers
    neighbours = noise.flatten()
    assert abs(float((neighbours[1:] * neighbours[:-1]).mean())) < 0.02  # adjacent pixels independent


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (run on a GPU machine)")
def test_on_a_gpu_augmentation_stays_there_and_is_reproducible() -> None:
    """Parameters, noise and JPEG (nvJPEG) are computed on the GPU, from a CPU generator's seed."""
    x = smear_batch(n=16, size=48).cuda()
    config = AugmentConfig(hue=0.05, gamma=0.2, stain=0.2, blur=0.5, noise=0.02, jpeg=0.5)
    y = BatchAugment(config)(x, gen(1))
    assert y.is_cuda and y.shape == x.shape and y.dtype == torch.float32
    assert float(y.min()) >= 0 and float(y.max()) <= 255
    assert torch.equal(y, BatchAugment(config)(x, gen(1)))
    assert not torch.equal(y, BatchAugment(config)(x, gen(2)))
    # nvJPEG and libjpeg differ in rounding and chroma upsampling, not in what the round trip does.
    cpu, gpu = jpeg_round_trip(x.float().cpu(), 40), jpeg_round_trip(x.float(), 40).cpu()
    assert (gpu - cpu).abs().mean() < 4


def test_a_mosaic_codes_each_tile_as_if_alone_except_at_its_edges() -> None:
    """The GPU codes a batch as one mosaic: inside each tile, the pixels of coding it alone (libjpeg here)."""
    from bloodcell.data.augment import _jpeg_codec

    noisy = smear_batch(n=7, size=48).float() + torch.randn(7, 3, 48, 48, generator=gen(0)) * 20
    x = noisy.clamp(0, 255).to(torch.uint8)
    assert torch.equal(unmosaic(mosaic(x), 7), x)
    alone = jpeg_round_trip(x.float(), 40)
    together = unmosaic(_jpeg_codec([mosaic(x)], 40, "cpu")[0], 7).float()
    assert torch.equal(alone[..., 2:-2, 2:-2], together[..., 2:-2, 2:-2])
    assert (alone - together).abs().mean() < 1


def test_clipping_negative_stains_is_what_scikit_images_round_trip_does() -> None:
    """The augmentation reproduces rgb2hed then hed2rgb, the look the stain-transfer benchmark measures."""
    from skimage.color import hed2rgb, rgb2hed

    from bloodcell.data.augment import clip_negative_stains

    x = smear_batch(n=4)
    ours = (clip_negative_stains(x.float() / 255).clamp(0, 1) * 255).round().permute(0, 2, 3, 1).numpy()
    theirs = np.stack([np.clip(np.round(hed2rgb(rgb2hed(image)) * 255), 0, 255) for image in x.permute(0, 2, 3, 1).numpy()])
    assert np.abs(ours - theirs).max() <= 1 and np.abs(ours - x.permute(0, 2, 3, 1).numpy()).max() > 5
