"""Grad-CAM for every registered architecture and two timm families, with the automatic target layer."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from bloodcell import CLASSES
from bloodcell.errors import UserError
from bloodcell.explain.cell_masks import stained_cell_masks
from bloodcell.explain.gradcam import (
    cam_energy_on_cell,
    cam_similarity,
    cell_focus_verdict,
    default_target_layer,
    explain_files,
    explain_images,
    randomized_copy,
    sanity_check,
)
from bloodcell.models import Classifier, ModelCard, create_model, list_models, save_model
from eval_support import train_toy

#: timm families that must work, and the layer the automatic choice must find in them.
TIMM_LAYERS = {"timm/resnet18": "layer4", "timm/efficientnet_b0": "bn2"}
ARCHITECTURES = sorted(spec.name for spec in list_models()) + sorted(TIMM_LAYERS)


def input_size_for(name: str) -> int:
    """Our networks at 96 px (the seed CNN's unpadded convolutions need that many), timm ones at 64 px."""
    return 64 if name.startswith("timm/") else 96


def toy_images(n: int, size: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    from conftest import draw_cell

    rng = np.random.default_rng(seed)
    labels = np.arange(n) % 4
    return np.stack([np.asarray(draw_cell(rng, int(k), size)) for k in labels]), labels


@pytest.mark.parametrize("name", ARCHITECTURES)
def test_gradcam_on_a_briefly_trained_model(name: str) -> None:
    size = input_size_for(name)
    torch.manual_seed(0)
    model = Classifier(create_model(name, 4))
    images, labels = toy_images(8, size)
    train_toy(model, images, labels, steps=3)
    found, layer = default_target_layer(model.net, size)
    assert found == TIMM_LAYERS.get(name, found)
    assert not isinstance(layer, torch.nn.AdaptiveAvgPool2d) and any(True for _ in layer.parameters())
    result = explain_images(model, images[:6], "gradcam")
    assert result.layer_name == found
    assert result.cams.shape == (6, size, size) and result.cams.dtype == np.float32
    assert np.isfinite(result.cams).all()
    assert (result.cams.min() >= 0) and (result.cams.max() <= 1.0 + 1e-6)
    non_constant = [np.ptp(cam) > 1e-6 for cam in result.cams]
    assert sum(non_constant) >= 4, f"{name}: {sum(non_constant)} of 6 CAMs are flat"


def test_automatic_layer_is_the_last_convolutional_stage_of_our_networks() -> None:
    assert default_target_layer(create_model("bloodnet", 4), 64)[0] == "stages"
    assert default_target_layer(create_model("seed-cnn", 4), 96)[0] == "features"


@pytest.fixture(scope="module")
def bloodnet() -> Classifier:
    torch.manual_seed(0)
    model = Classifier(create_model("bloodnet", 4, width=0.5))
    images, labels = toy_images(32, 48)
    return train_toy(model, images, labels, steps=20)


@pytest.mark.parametrize("method", ["gradcam++", "hirescam", "layercam", "eigencam"])
def test_other_methods_and_an_explicit_target_layer(bloodnet: Classifier, method: str) -> None:
    images, _ = toy_images(4, 48, seed=1)
    result = explain_images(bloodnet, images, method, target_layer="stages.2")
    assert result.layer_name == "stages.2"
    assert result.cams.shape == (4, 48, 48) and np.isfinite(result.cams).all()


def test_scorecam_draws_no_progress_bars(bloodnet: Classifier, capfd: pytest.CaptureFixture[str]) -> None:
    """The CAM library's ScoreCAM drew a tqdm bar per image on stderr, through --json and into the server's
    log; the library's own module is left as it was (not patched for the process)."""
    import pytorch_grad_cam.score_cam

    library_tqdm = pytorch_grad_cam.score_cam.tqdm
    images, _ = toy_images(2, 48, seed=1)
    result = explain_images(bloodnet, images, "scorecam")
    assert result.cams.shape == (2, 48, 48) and np.isfinite(result.cams).all()
    assert capfd.readouterr().err == ""
    assert pytorch_grad_cam.score_cam.tqdm is library_tqdm


def test_unknown_layer_or_method_is_a_user_error(bloodnet: Classifier) -> None:
    images, _ = toy_images(2, 48)
    with pytest.raises(UserError, match="no layer"):
        explain_images(bloodnet, images, target_layer="stages.99")
    with pytest.raises(UserError, match="unknown CAM method"):
        explain_images(bloodnet, images, method="magic")


@pytest.mark.parametrize(("layer", "shape"), [("head", r"\(1, 4\)"), ("pool", r"\(1, \d+, 1, 1\)")])
def test_a_layer_that_gives_no_feature_map_is_refused_before_any_work(bloodnet: Classifier, layer: str, shape: str) -> None:
    """The head's (N, classes) output would fail inside the CAM library; a pooled 1 x 1 map would be flat."""
    images, _ = toy_images(2, 48)
    with pytest.raises(UserError, match=rf"layer '{layer}' gives a {shape} tensor .* not a feature map .* layers that do: ") as raised:
        explain_images(bloodnet, images, target_layer=layer)
    offered = str(raised.value).split("layers that do: ")[1].split(", ")
    assert layer not in offered and "stages" in offered  # only layers that would work are suggested
    for name in offered:
        explain_images(bloodnet, images, target_layer=name)


def test_explaining_leaves_the_model_in_the_mode_it_was_in(bloodnet: Classifier) -> None:
    images, _ = toy_images(2, 48)
    bloodnet.train()
    try:
        explain_images(bloodnet, images)
        assert bloodnet.training
    finally:
        bloodnet.eval()


def test_overlay_names_never_collide() -> None:
    from bloodcell.explain.gradcam import overlay_stems

    assert overlay_stems(["a", "b"]) == ["a", "b"]
    assert overlay_stems(["a", "a", "b"]) == ["000-a", "001-a", "b"]
    # a.jpg and a.png become 000-a and 001-a, and 000-a.jpg's own stem would collide with the first.
    named = overlay_stems(["a", "a", "000-a"])
    assert len(set(named)) == 3 and named == ["000-a", "001-a", "002-000-a"]
    assert overlay_stems(["A", "a"]) == ["000-A", "001-a"]  # one file on a case-insensitive file system
    # Long names (a file name may take 255 bytes): cut, told apart by a digest of the whole, still unique.
    long = overlay_stems(["é" * 200 + "x", "é" * 200 + "y", "\udcff" * 300])
    assert len(set(long)) == 3 and all(len(s.encode("utf-8", "surrogateescape")) + len(".gradcam.png") < 255 for s in long)


def test_explaining_a_given_class_and_randomised_copy(bloodnet: Classifier) -> None:
    images, _ = toy_images(4, 48, seed=2)
    result = explain_images(bloodnet, images, targets=np.array([3, 3, 3, 3]))
    assert result.targets.tolist() == [3, 3, 3, 3]
    clone = randomized_copy(bloodnet)
    trained_weight = bloodnet.net.stem[0].weight
    assert not torch.equal(clone.net.stem[0].weight, trained_weight)
    assert torch.equal(bloodnet.net.stem[0].weight, trained_weight)  # the original is untouched


def test_a_transformers_attention_tensors_are_not_taken_for_feature_maps() -> None:
    """A ViT's 4-D tensors (batch, heads, tokens, dim) finish last but are no map: its patch embedding is."""
    net = create_model("timm/vit_tiny_patch16_224", 4, img_size=32, patch_size=8, depth=2)
    assert default_target_layer(net, 32)[0] == "patch_embed.proj"  # was blocks.1.attn.k_norm
    # 64 tokens of a head size of 64: a square (batch, heads, tokens, dim) tensor, still not a map.
    square = create_model("timm/vit_medium_patch16_gap_256", 4, img_size=128, depth=2)
    assert default_target_layer(square, 128)[0] == "patch_embed.proj"
    flat = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 32 * 32, 4))
    with pytest.raises(UserError, match="no convolutional feature map found for Grad-CAM; name a layer"):
        default_target_layer(flat, 32)


def test_sanity_check_against_randomised_weights_and_cell_energy(bloodnet: Classifier) -> None:
    images, _ = toy_images(8, 48, seed=3)
    report = sanity_check(bloodnet, images)
    assert report["target_layer"] == "stages" and report["n_images"] == 8 and report["map_size"] == [2, 2]
    assert -1.0 <= report["randomized_similarity"] < 1.0 and report["random_seeds"] == 3
    masks = stained_cell_masks(images)
    assert report["n_masked"] == int(masks.reshape(8, -1).any(axis=1).sum()) > 0
    assert 0.0 <= report["cam_energy_on_cell"] <= 1.0 and 0.0 < report["cell_area_fraction"] < 1.0
    assert 0.0 <= report["random_energy_on_cell"] <= 1.0
    # The ratio divides by the masks' area over the same images as the energy: those whose map is not flat.
    trained = explain_images(bloodnet, images)
    energy = cam_energy_on_cell(trained.cams, masks)
    counted = np.isfinite(energy) & masks.reshape(8, -1).any(axis=1)
    assert report["cell_area_fraction"] == pytest.approx(masks[counted].mean())
    assert report["energy_to_area_ratio"] == pytest.approx(energy[counted].mean() / masks[counted].mean())
    # The random maps' share: each image's averaged over the three random networks (a flat-zero random map
    # counts as a uniform one: its share is the image's cell area).
    area = masks[counted].mean(axis=(1, 2))
    shares = [cam_energy_on_cell(explain_images(randomized_copy(bloodnet, seed), images, targets=trained.targets).cams,
                                 masks)[counted] for seed in range(3)]  # fmt: skip
    random_energy = np.mean([np.where(np.isfinite(share), share, area) for share in shares], axis=0)
    assert report["random_energy_on_cell"] == pytest.approx(random_energy.mean())
    focus = energy[counted].mean() / max(masks[counted].mean(), random_energy.mean())
    assert report["cell_focus"] == pytest.approx(focus)
    low, high = report["cell_focus_ci"]
    assert low <= report["cell_focus"] <= high
    assert report["cell_focus_verdict"] == cell_focus_verdict(low, high)
    assert report["favours_cell"] == (report["cell_focus_verdict"] == "favours")
    assert report["passed"] == (report["randomized_similarity"] < 0.5 and report["informative_fraction"] >= 0.5)


def test_the_cell_focus_interval_resamples_whole_sessions() -> None:
    """Images of one session are alike: resampled by image, ten sessions of 20 look like 200 independent
    images and the interval comes out far too narrow."""
    from bloodcell.explain.gradcam import _cell_focus

    sessions = np.repeat(np.arange(10), 20)
    energy = np.repeat(np.linspace(0.08, 0.2, 10), 20)  # each session's maps alike, sessions apart
    area, random_energy = np.full(200, 0.1), np.full(200, 0.1)
    by_image, by_session = _cell_focus(energy, random_energy, area, None), _cell_focus(energy, random_energy, area, sessions)
    assert by_image["cell_focus"] == pytest.approx(by_session["cell_focus"]) == pytest.approx(1.4)
    width = lambda focus: focus["cell_focus_ci"][1] - focus["cell_focus_ci"][0]  # noqa: E731
    assert width(by_session) > 3 * width(by_image)


def test_images_without_stained_cells_leave_the_energy_undefined(bloodnet: Classifier) -> None:
    flat = np.full((4, 48, 48, 3), 210, dtype=np.uint8)
    report = sanity_check(bloodnet, flat)
    assert report["n_masked"] == 0 and report["cam_energy_on_cell"] is None and report["favours_cell"] is False
    assert report["cell_area_fraction"] is None and report["cell_focus_verdict"] == "unknown"


def test_the_cam_methods_the_cli_lists_are_the_registered_ones() -> None:
    from bloodcell.cli.evaluate import CAM_METHODS
    from bloodcell.explain.gradcam import METHODS

    assert CAM_METHODS.replace(" or ", ", ").split(", ") == list(METHODS)


def test_maps_that_do_not_depend_on_the_weights_fail_the_sanity_check(bloodnet: Classifier, monkeypatch) -> None:
    """If the "random" network explained exactly like the trained one, the maps would show the input,
    not what the model learned (Adebayo et al.): the check must fail."""
    import copy

    from bloodcell.explain import gradcam

    monkeypatch.setattr(gradcam, "randomized_copy", lambda model, seed=0: copy.deepcopy(model))
    images, _ = toy_images(8, 48, seed=3)
    report = gradcam.sanity_check(bloodnet, images)
    assert report["randomized_similarity"] == pytest.approx(1.0) and report["passed"] is False


def test_maps_favour_the_cell_only_when_the_whole_interval_clears_the_margin() -> None:
    assert cell_focus_verdict(1.15, 1.4) == "favours"
    assert cell_focus_verdict(0.95, 1.2) == "inconclusive"  # the bundled model's 32-image sample swung across it
    assert cell_focus_verdict(0.9, 1.05) == "does not favour"


def test_similarity_and_energy_by_hand() -> None:
    ramp = np.tile(np.linspace(0, 1, 8, dtype=np.float32), (8, 1))
    cams = np.stack([ramp, ramp])
    assert cam_similarity(cams, cams) == pytest.approx([1.0, 1.0])
    assert cam_similarity(cams, cams[:, :, ::-1]) == pytest.approx([-1.0, -1.0])
    assert cam_similarity(cams, np.zeros_like(cams)) == pytest.approx([0.0, 0.0])  # flat map: no structure
    mask = np.zeros((2, 8, 8), dtype=bool)
    mask[:, :, 4:] = True
    share = cam_energy_on_cell(cams, mask)
    assert share == pytest.approx([ramp[:, 4:].sum() / ramp.sum()] * 2)


def test_explain_files_writes_overlays(tmp_path: Path, bloodnet: Classifier) -> None:
    from PIL import Image

    model_dir = save_model(bloodnet, ModelCard(architecture="bloodnet", arch_kwargs={"width": 0.5}, input_size=48), tmp_path / "m")
    images, _ = toy_images(2, 80)
    paths = []
    for k, image in enumerate(images):
        paths.append(tmp_path / f"cell{k}.png")
        Image.fromarray(image).save(paths[-1])
    rows = explain_files(model_dir, paths, tmp_path / "out", method="gradcam++")
    assert [Path(r["overlay"]).name for r in rows] == ["cell0.gradcampp.png", "cell1.gradcampp.png"]
    overlay = np.asarray(Image.open(rows[0]["overlay"]))
    assert overlay.shape == (48, 96, 3)  # the image and its overlay side by side
    assert rows[0]["predicted"] in CLASSES
    assert 0.0 < rows[0]["probability"] <= 1.0
    # Into the images' own folder, twice: an input named like an overlay is never written over, and the
    # first run's overlays are not explained as smears the second time.
    Image.fromarray(images[1]).save(tmp_path / "cell0.gradcam.png")
    original = (tmp_path / "cell0.gradcam.png").read_bytes()
    first = explain_files(model_dir, [*paths, tmp_path / "cell0.gradcam.png"], tmp_path)
    assert first[0]["overlay"] is None and "would replace the input" in first[0]["error"]
    assert (tmp_path / "cell0.gradcam.png").read_bytes() == original
    second = explain_files(model_dir, sorted(tmp_path.glob("*.png")), tmp_path)
    overlays = {Path(r["image"]).name: r for r in second}
    assert "earlier explain wrote" in overlays["cell1.gradcam.png"]["skipped"]
    assert overlays["cell1.gradcam.png"]["error"] is None  # left out, not failed
    assert overlays["cell0.gradcam.png"]["skipped"] is None  # the image of one's own so named is still an input


def test_explaining_into_the_images_folder_again_replaces_the_overlays(tmp_path: Path, bloodnet: Classifier) -> None:
    from PIL import Image

    model_dir = save_model(bloodnet, ModelCard(architecture="bloodnet", arch_kwargs={"width": 0.5}, input_size=48), tmp_path / "m")
    images, _ = toy_images(2, 80)
    folder = tmp_path / "exu"
    folder.mkdir()
    Image.fromarray(images[0]).save(folder / "a.jpg")
    Image.fromarray(images[1]).save(folder / "a.png")  # two images of one stem: numbered overlays
    for _ in range(3):
        rows = explain_files(model_dir, sorted(folder.iterdir()), folder)
        written = sorted(Path(r["overlay"]).name for r in rows if r["overlay"] is not None)
        assert written == ["000-a.gradcam.png", "001-a.gradcam.png"]  # the same names each time: replaced
        assert all(r["error"] is None for r in rows)
    assert sorted(p.name for p in folder.iterdir()) == ["000-a.gradcam.png", "001-a.gradcam.png", "a.jpg", "a.png"]
    assert sum(r["skipped"] is not None for r in rows) == 2
    # Overlays written before they were marked (a panel of two squares, no mark) are earlier overlays too: taken
    # for inputs, they made every image's overlay "replace an input" (exit 1, nothing written).
    for overlay in ("000-a.gradcam.png", "001-a.gradcam.png"):
        Image.open(folder / overlay).convert("RGB").save(folder / overlay)  # the same pixels, unmarked
    rows = explain_files(model_dir, sorted(folder.iterdir()), folder)
    assert all(r["error"] is None for r in rows) and sum(r["skipped"] is not None for r in rows) == 2
    assert sorted(p.name for p in folder.iterdir()) == ["000-a.gradcam.png", "001-a.gradcam.png", "a.jpg", "a.png"]
    Image.fromarray(images[0]).save(folder / "b.gradcam.png")  # an image of one's own so named is an input
    rows = explain_files(model_dir, [folder / "b.gradcam.png"], folder)
    assert rows[0]["skipped"] is None and rows[0]["overlay"] is not None


class _SpotFinder(torch.nn.Module):
    """Grey, then five stride-2 3 x 3 box filters (padded, as bloodnet's stages are): a bright spot lights the
    one feature cell whose receptive field holds it. A class scores the mean of the map, so Grad-CAM's map is
    that cell and nothing else."""

    def __init__(self) -> None:
        super().__init__()
        grey = torch.nn.Conv2d(3, 1, 1)
        grey.weight.data.fill_(1 / 3)
        grey.bias.data.fill_(2.0)  # black, normalised to -2 by the default mean and std, becomes 0 as the padding is
        boxes = [torch.nn.Conv2d(1, 1, 3, stride=2, padding=1, bias=False) for _ in range(5)]
        for box in boxes:
            box.weight.data.fill_(1 / 9)
        self.stages = torch.nn.Sequential(grey, *boxes)
        self.head = torch.nn.Linear(1, 4, bias=False)
        self.head.weight.data = torch.tensor([[1.0], [-1.0], [0.0], [0.0]])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.stages(x).mean(dim=(2, 3)))


@pytest.mark.parametrize("spot", [(64, 96), (32, 32), (0, 128)])
def test_the_map_lies_on_the_image_where_the_network_looked(spot: tuple[int, int]) -> None:
    """A flipped, transposed or shifted map would miss the spot: on a 96 x 160 image (not square) the map's
    peak is the centre of the cell over the spot. Stretched as an image resize would, it lay 15.5 px down and
    right of it (the resize puts cell j at 32 j + 15.5; the padded strides put it at 32 j)."""
    images = np.zeros((1, 96, 160, 3), dtype=np.uint8)
    images[0, max(spot[0] - 2, 0) : spot[0] + 2, spot[1] - 2 : spot[1] + 2] = 255
    result = explain_images(Classifier(_SpotFinder()), images, target_layer="stages", targets=np.array([0]))
    assert result.cams.shape == (1, 96, 160) and result.map_size == (3, 5)
    peak = np.unravel_index(np.argmax(result.cams[0]), result.cams[0].shape)
    assert abs(int(peak[0]) - spot[0]) <= 2 and abs(int(peak[1]) - spot[1]) <= 2, (peak, spot)


def test_a_later_in_place_operation_does_not_change_the_map(bloodnet: Classifier) -> None:
    """A BatchNorm followed by ReLU(inplace=True): the map of the BatchNorm's output must use that output,
    not what the ReLU wrote over it (on the CPU the stored activation would share its memory)."""
    images, _ = toy_images(4, 96)
    layer = next(name for name, module in bloodnet.net.named_modules()
                 if isinstance(module, torch.nn.BatchNorm2d) and name.startswith("stages.3"))  # fmt: skip
    in_place = explain_images(bloodnet, images, target_layer=layer).cams
    for module in bloodnet.net.modules():
        if isinstance(module, torch.nn.ReLU):
            module.inplace = False
    try:
        copied = explain_images(bloodnet, images, target_layer=layer).cams
    finally:
        for module in bloodnet.net.modules():
            if isinstance(module, torch.nn.ReLU):
                module.inplace = True
    np.testing.assert_allclose(in_place, copied, atol=1e-5)


def test_the_randomised_copy_keeps_no_trained_weight() -> None:
    """A vision transformer's class token and position embedding have no reset of their own."""
    model = Classifier(create_model("timm/vit_tiny_patch16_224", 4, img_size=32, patch_size=8))
    with torch.no_grad():
        for parameter in model.net.parameters():
            parameter.add_(0.123)  # stands in for training
    random = randomized_copy(model)
    for (name, before), after in zip(model.net.named_parameters(), random.net.parameters(), strict=True):
        assert not torch.equal(before, after), name


def test_the_randomised_copy_resets_what_its_modules_own_as_they_start_it() -> None:
    """A trained value equal to its starting one (a bias at 0, an untrained BatchNorm's weight at 1) is
    still the module's to reset: not redrawn as if no reset reached it."""
    model = Classifier(create_model("bloodnet", 4, width=0.5))
    random = randomized_copy(model)
    norms = [module for module in random.net.modules() if isinstance(module, torch.nn.BatchNorm2d)]
    assert norms and all(torch.equal(norm.weight, torch.ones_like(norm.weight)) for norm in norms)


def test_similarity_for_all_pairs_at_once_is_scipy_s_spearman_pair_by_pair() -> None:
    from scipy.stats import spearmanr

    rng = np.random.default_rng(0)
    a = rng.random((6, 16, 16)).astype(np.float32)
    b = (a * 0.5 + rng.random((6, 16, 16)) * 0.5).astype(np.float32)
    a[2] = np.round(a[2] * 3) / 3  # ties, ranked by their average as spearmanr does
    b[4] = 0.7  # flat: no ranking, 0
    expected = [0.0 if np.ptp(x) == 0 or np.ptp(y) == 0 else spearmanr(x.ravel(), y.ravel()).statistic for x, y in zip(a, b)]
    assert cam_similarity(a, b) == pytest.approx(expected)


@pytest.mark.parametrize(
    ("layers", "stride", "offset"),
    [
        ([torch.nn.Conv2d(3, 4, 16, stride=16)], 16.0, 7.5),  # patches, as a vision transformer's
        ([torch.nn.Conv2d(3, 4, 3, stride=2, padding=1), torch.nn.Conv2d(4, 4, 3, stride=2, padding=1)], 4.0, 0.0),
        ([torch.nn.Conv2d(3, 4, 3), torch.nn.MaxPool2d(2), torch.nn.Conv2d(4, 4, 3)], 2.0, 3.5),  # unpadded
    ],
    ids=["patches", "padded", "unpadded"],
)
def test_the_cell_layout_is_where_each_kind_of_network_centres_its_cells(layers: list, stride: float, offset: float) -> None:
    """Worked out by hand: a 16 px patch j covers pixels 16 j .. 16 j + 15; a padded 3 x 3 stride-2 pair
    centres cell j on 4 j; an unpadded 3 x 3, a 2 x 2 pool and a 3 x 3 put cell j on 2 j + 3.5."""
    from bloodcell.explain.gradcam import cell_layout

    net = torch.nn.Sequential(*layers, torch.nn.Flatten())
    layer = net[len(layers) - 1]
    layout = cell_layout(net, layer, 64, 96)
    assert layout.stride == pytest.approx((stride, stride)) and layout.offset == pytest.approx((offset, offset))


def test_eigen_maps_rise_where_the_channels_fire_whatever_sign_the_svd_returns(monkeypatch: pytest.MonkeyPatch) -> None:
    """A principal component's sign is arbitrary: with either sign from the SVD the map peaks on the blob."""
    from bloodcell.explain import gradcam

    rng = np.random.default_rng(0)
    activations = rng.random((2, 8, 6, 6)).astype(np.float32) * 0.1
    activations[:, :4, 1:3, 3:5] += 2.0  # a blob firing in half the channels
    expected = np.zeros((6, 6), dtype=bool)
    expected[1:3, 3:5] = True
    svd = np.linalg.svd
    for sign in (1.0, -1.0):
        monkeypatch.setattr(np.linalg, "svd", lambda a, *args, s=sign, **kwargs: tuple(s * m for m in svd(a, *args, **kwargs)))
        for cam in gradcam.oriented_projection(activations):
            assert expected[np.unravel_index(np.argmax(cam), cam.shape)]
            assert cam[expected].mean() > cam[~expected].mean()
    monkeypatch.undo()
    assert gradcam.METHODS["eigencam"] is gradcam.SignedEigenCAM
    assert gradcam.METHODS["eigengradcam"] is gradcam.SignedEigenGradCAM
