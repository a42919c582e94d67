"""Grad-CAM and friends (pytorch-grad-cam) for any model of the registry or of timm.

The target layer is found automatically: a probe forward pass records every module of ``model.net`` that
returns a spatial feature map, and the last one to finish (that is not a pooling layer) is the last
convolutional stage, whatever the architecture calls it (``stages`` in bloodnet, ``features`` in the seed
CNN, ``layer4`` in a ResNet, ``bn2`` in an EfficientNet). Any module can be named instead by its dotted
path (``--target-layer stages.3``).

A sanity check guards against explanations that do not depend on what the model learned (Adebayo et al.
2018, "Sanity checks for saliency maps"): the CAMs of the trained model are compared with those of the same
architecture with randomised weights (Spearman rank correlation; they must differ clearly), and the share
of CAM energy falling on the stained cells (:mod:`bloodcell.explain.cell_masks`) is compared with the
cells' share of the image, for the trained maps and the random ones.

Maps are stretched to the image where the network's feature cells sit (:func:`cell_layout`), not where an
image resize would put them: a stride-32 network of padded convolutions centres cell ``j`` on pixel
``32 j``, and the resize the CAM library uses puts it on ``32 j + 15.5``, half a cell down and right.
"""

from __future__ import annotations

import copy
import functools
import hashlib
import types
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pytorch_grad_cam import (
    EigenCAM,
    EigenGradCAM,
    GradCAM,
    GradCAMPlusPlus,
    HiResCAM,
    LayerCAM,
    ScoreCAM,
    XGradCAM,
)
from pytorch_grad_cam.base_cam import BaseCAM
from pytorch_grad_cam.utils.image import show_cam_on_image
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
from pytorch_grad_cam.utils.svd_on_activations import get_2d_projection
from scipy.stats import rankdata
from torch import nn

from bloodcell.errors import NoFeatureMap, UserError
from bloodcell.explain.cell_masks import stained_cell_masks
from bloodcell.models.classifier import Classifier, as_batch_tensor
from bloodcell.probabilities import softmax_with_temperature


def oriented_projection(tensor: np.ndarray) -> np.ndarray:
    """Each image's ``(C, H, W)`` map projected on its first principal component (the library's
    ``get_2d_projection``), signed to rise where the channels' sum rises: ``(B, H, W)``.

    Why: a principal component's sign is arbitrary (SVD gives ``v`` or ``-v`` alike), and the library's
    EigenCAM keeps whichever LAPACK returns, so its map, min-max scaled, may light up exactly what the network
    ignores. The channel sum fixes the sign by meaning: for activations it is how strongly a place fires;
    for activations times gradients (EigenGradCAM) it is the place's contribution to the class score.
    """
    projections = get_2d_projection(tensor)
    sums = np.nan_to_num(tensor).sum(axis=1)
    for projection, total in zip(projections, sums, strict=True):
        if np.sum((projection - projection.mean()) * (total - total.mean())) < 0:
            projection *= -1  # in place: one image's map of the batch
    return projections


class SignedEigenCAM(EigenCAM):
    """EigenCAM with its sign fixed by :func:`oriented_projection`."""

    def get_cam_image(self, input_tensor: Any, target_layer: Any, target_category: Any, activations: np.ndarray,
                      grads: np.ndarray, eigen_smooth: bool) -> np.ndarray:  # fmt: skip
        return oriented_projection(activations)


class SignedEigenGradCAM(EigenGradCAM):
    """EigenGradCAM with its sign fixed by :func:`oriented_projection`."""

    def get_cam_image(self, input_tensor: Any, target_layer: Any, target_category: Any, activations: np.ndarray,
                      grads: np.ndarray, eigen_smooth: bool) -> np.ndarray:  # fmt: skip
        return oriented_projection(grads * activations)


def _without_progress_bars(method: Callable[..., Any]) -> Callable[..., Any]:
    """A function of the CAM library whose ``tqdm`` progress bars draw nothing: the same code over a copy of
    its module's globals in which ``tqdm`` (the module, as pytorch-grad-cam imports it) is a disabled one.

    Why: ScoreCAM draws a bar per image on stderr, through ``--json`` and into the server's log; and why a
    copy: patching the library's module, even for the length of a call, would silence or unsilence another
    thread's ScoreCAM (the server explains in several) and every other user of that module in the process.
    """
    bars: Any = method.__globals__.get("tqdm")
    if not hasattr(bars, "tqdm"):  # a version of the library that draws none: nothing to quiet
        return method
    quiet = types.SimpleNamespace(tqdm=functools.partial(bars.tqdm, disable=True))
    return types.FunctionType(method.__code__, {**method.__globals__, "tqdm": quiet}, method.__name__,
                              method.__defaults__, method.__closure__)  # fmt: skip


class QuietScoreCAM(ScoreCAM):
    """ScoreCAM without its progress bars on stderr."""

    get_cam_weights = _without_progress_bars(ScoreCAM.get_cam_weights)


#: CAM methods by CLI name.
METHODS: dict[str, type[BaseCAM]] = {
    "gradcam": GradCAM,
    "gradcam++": GradCAMPlusPlus,
    "hirescam": HiResCAM,
    "xgradcam": XGradCAM,
    "layercam": LayerCAM,
    "eigencam": SignedEigenCAM,
    "eigengradcam": SignedEigenGradCAM,
    "scorecam": QuietScoreCAM,
}

#: PNG text chunk (key, value) that marks an overlay as :func:`save_overlay`'s: a later ``explain`` into the
#: same folder leaves such files out as earlier overlays, and treats an image merely named like one as an input.
OVERLAY_MARK = ("Software", "bloodcell explain")
#: Randomised-weights CAMs more similar than this (mean Spearman) fail the sanity check.
SANITY_MAX_SIMILARITY = 0.5
#: The maps "favour the cell" only when their energy-to-area ratio beats both a uniform map (1) and the
#: random-weights network's maps by this factor: the random network's maps follow the image's contrast,
#: which is highest at the stained cells, so a ratio above 1 alone says nothing.
CELL_FOCUS_MARGIN = 1.1
#: Random initialisations the trained maps are compared with: one network's maps vary from seed to seed
#: (their ratio ranged 0.83-1.23 over four seeds on the same 32 images), so each image's share is averaged.
RANDOM_SEEDS = 3
#: Bootstrap resamples of the cell-focus interval.
CELL_FOCUS_RESAMPLES = 2000
#: The longest overlay file stem, in bytes: with ``.gradcam.png`` and a position prefix, under 255.
MAX_STEM_BYTES = 200


@dataclass
class CamResult:
    """CAMs of a batch: ``cams`` ``(N, H, W)`` float32 in [0, 1], the explained class of every image
    (``targets``), the model's ``logits`` and ``probabilities`` ``(N, K)`` (softmax without temperature),
    the name of the target layer and ``map_size``, the ``(height, width)`` of its feature map: the CAM's
    true resolution, before it is stretched to the image."""

    cams: np.ndarray
    targets: np.ndarray
    logits: np.ndarray
    probabilities: np.ndarray
    layer_name: str
    map_size: tuple[int, int]


def _is_pooling(module: nn.Module) -> bool:
    return "pool" in type(module).__name__.lower()


def default_target_layer(net: nn.Module, input_size: int = 128) -> tuple[str, nn.Module]:
    """Find the last convolutional stage of ``net`` by a probe forward pass.

    Parameters
    ----------
    net: the network (``Classifier.net``), any architecture taking ``(N, 3, H, W)``.
    input_size: side of the probe image (use the model's input size: some networks need a minimum).

    Returns ``(dotted name, module)`` of the last module to finish whose output is a feature map with more
    than one spatial position, pooling layers excluded. Raises :class:`NoFeatureMap` if there is none.

    A feature map is ``(N, C, H, W)`` with ``H == W`` (the probe is square) no larger than the input: a
    transformer's 4-D tensors, ``(N, heads, tokens, dim)`` or channels-last ``(N, H, W, C)``, are not, and
    a Grad-CAM on them would look like a map and mean nothing. For a vision transformer the choice is
    therefore its patch embedding, before any attention block: a low-level map. Its token layers give
    ``(N, tokens, dim)``, which :func:`resolve_target_layer` refuses (no token-to-grid reshaping here).
    """
    layers = feature_map_layers(net, input_size)
    if not layers:
        raise NoFeatureMap(f"{type(net).__name__}: no convolutional feature map found for Grad-CAM; name a "
                           "layer with --target-layer")  # fmt: skip
    return layers[-1]


def feature_map_layers(net: nn.Module, input_size: int = 128) -> list[tuple[str, nn.Module]]:
    """``(dotted name, module)`` of every layer whose output is a feature map (as
    :func:`default_target_layer` defines it), in the order they finish, found by one probe pass."""
    names = {id(module): name for name, module in net.named_modules() if name}
    # Inside an attention block a 4-D tensor is (batch, heads, tokens, dim), square when tokens = dim.
    in_attention = {id(inner) for module in net.modules() if "attention" in type(module).__name__.lower()
                    for inner in module.modules()}  # fmt: skip
    finished: list[nn.Module] = []

    def record(module: nn.Module, _inputs: Any, output: Any) -> None:
        spatial = (
            isinstance(output, torch.Tensor) and output.ndim == 4 and 1 < output.shape[-1] == output.shape[-2] <= input_size
        )
        if spatial and not _is_pooling(module) and id(module) in names and id(module) not in in_attention:
            finished.append(module)

    handles = [module.register_forward_hook(record) for module in net.modules() if module is not net]
    was_training = net.training
    try:
        net.eval()  # BatchNorm in train mode refuses a batch of one
        with torch.no_grad():
            net(torch.zeros(1, 3, input_size, input_size, device=next(net.parameters()).device))
    finally:
        for handle in handles:
            handle.remove()
        net.train(was_training)
    last_runs = list(dict.fromkeys(reversed(finished)))[::-1]  # a module run twice counts where it last finished
    return [(names[id(layer)], layer) for layer in last_runs]


def resolve_target_layer(net: nn.Module, name: str | None, input_size: int = 128) -> tuple[str, nn.Module]:
    """The module named ``name`` (dotted path inside ``net``), or the automatic choice when None.

    A named layer must give a feature map ``(N, C, H, W)`` with more than one position (checked by a probe
    pass): a classifier head's ``(N, classes)``, a global pool's 1 x 1 map or a transformer's tokens would
    fail inside the CAM library after all other work, or give a flat map that explains nothing.
    """
    if name is None:
        return default_target_layer(net, input_size)
    try:
        layer = net.get_submodule(name)
    except AttributeError:
        raise UserError(
            f"no layer {name!r} in {type(net).__name__}; layers that give a feature map: "
            f"{', '.join(_feature_map_names(net, input_size))}"
        ) from None
    shape = _output_shape(net, layer, input_size)
    if shape is None or len(shape) != 4 or min(shape[-2:]) < 2:
        described = "no tensor" if shape is None else f"a {tuple(shape)} tensor"
        raise UserError(
            f"layer {name!r} gives {described} on a {input_size} px image, not a feature map (N, C, H, W) larger "
            f"than 1 x 1, which Grad-CAM needs; layers that do: {', '.join(_feature_map_names(net, input_size))}"
        )
    return name, layer


def _output_shape(net: nn.Module, layer: nn.Module, input_size: int | tuple[int, int]) -> torch.Size | None:
    """The shape of ``layer``'s output for one blank image of ``input_size`` (a side, or ``(height, width)``;
    None if it gives no tensor)."""
    height, width = (input_size, input_size) if isinstance(input_size, int) else input_size
    seen: list[Any] = []
    handle = layer.register_forward_hook(lambda _module, _inputs, output: seen.append(output))
    was_training = net.training
    try:
        net.eval()
        with torch.no_grad():
            net(torch.zeros(1, 3, height, width, device=next(net.parameters()).device))
    finally:
        handle.remove()
        net.train(was_training)
    return seen[-1].shape if seen and isinstance(seen[-1], torch.Tensor) else None


def _feature_map_names(net: nn.Module, input_size: int) -> list[str]:
    """The names of the last few layers that give a feature map: ones a user could give."""
    return [name for name, _ in feature_map_layers(net, input_size)[-6:]]


@dataclass(frozen=True)
class CellLayout:
    """Where a layer's feature cells sit on the input, per axis ``(y, x)``: cell ``j`` is centred on input
    pixel ``offset + stride * j``; ``map_size`` is the layer's ``(height, width)`` for the explained size."""

    map_size: tuple[int, int]
    stride: tuple[float, float]
    offset: tuple[float, float]


#: How much larger than the image the layout is probed (a middle cell's receptive field must fit inside).
LAYOUT_PROBE_SCALE = 4
#: Layouts found, per target layer (dropped with its model) and explained size.
_layouts: weakref.WeakKeyDictionary[nn.Module, dict[tuple[int, int], CellLayout]] = weakref.WeakKeyDictionary()


def cell_layout(net: nn.Module, layer: nn.Module, height: int, width: int) -> CellLayout:
    """The centres of ``layer``'s feature cells on a ``height x width`` input, found by probing the network.

    A cell's receptive field is where the input's gradient of that cell is not zero; its centre is the
    middle of that field's extent, measured for two neighbouring cells in the middle of a random input, to
    give the stride and the first cell's centre. Each axis is probed on its own, with the input stretched
    along it only (4 times as tall, then 4 times as wide: a field cut at the sides still has its full
    height), which costs a quarter of a probe 4 times larger both ways with twice the images. Padded convolutions put cell
    ``j`` at ``stride * j``; patch embeddings (a vision transformer) at ``stride * j + (stride - 1) / 2``;
    unpadded ones further in. Where a field reaches the probe's ends (an EfficientNet's last stage) its
    centre is estimated instead as the gradient's centre of mass, to the nearest half pixel (a few pixels
    off); where no probe runs (a network that takes one input size only, probed at that size), the cells are
    spread evenly over the image, as an image resize would. Cached per layer and size.
    """
    known = _layouts.setdefault(layer, {})
    if (height, width) not in known:
        size = _output_shape(net, layer, (height, width))
        if size is None or len(size) != 4:
            raise UserError(f"the target layer gives no feature map on a {height} x {width} image")
        map_size = (int(size[-2]), int(size[-1]))
        axes = []
        for axis in (0, 1):
            probed = None
            for scale in (LAYOUT_PROBE_SCALE, 1):
                stretched = (height * scale, width) if axis == 0 else (height, width * scale)
                probed = _probe_axis(net, layer, *stretched, axis=axis)
                if probed is not None:
                    break
            if probed is None:  # as an image resize spreads the cells
                stride = (height, width)[axis] / map_size[axis]
                probed = (stride, (stride - 1) / 2)
            axes.append(probed)
        known[height, width] = CellLayout(map_size=map_size, stride=(axes[0][0], axes[1][0]),
                                          offset=(axes[0][1], axes[1][1]))  # fmt: skip
    return known[height, width]


def _probe_axis(net: nn.Module, layer: nn.Module, height: int, width: int, axis: int) -> tuple[float, float] | None:
    """``(stride, offset)`` along ``axis`` (0: rows, 1: columns) from the receptive fields of two neighbouring
    cells in the middle of the layer's map on a random ``height x width`` input, or None when the network
    refuses that size or the map is too small along the axis. The fields' extents give them exactly; a field
    that reaches an end of the probe (its extent cut) gives its gradient's centre of mass instead."""
    seen: list[torch.Tensor] = []
    handle = layer.register_forward_hook(lambda _module, _inputs, output: seen.append(output))
    was_training = net.training
    device = next(net.parameters()).device
    probe = torch.randn(2, 3, height, width, generator=torch.Generator().manual_seed(0)).to(device).requires_grad_(True)
    try:
        net.eval()
        with torch.enable_grad():
            net(probe)
            feature = seen[-1] if seen and isinstance(seen[-1], torch.Tensor) and seen[-1].ndim == 4 else None
            if feature is None or feature.shape[-2 + axis] < 3:
                return None
            middle = feature.shape[-2 + axis] // 2 - 1
            other = feature.shape[-1 - axis] // 2  # any cell across: the profile sums over that axis
            # Image 0 gives cell `middle`'s field, image 1 its neighbour's (eval mode: a batch's images do not mix).
            first = feature[0, :, middle, other] if axis == 0 else feature[0, :, other, middle]
            second = feature[1, :, middle + 1, other] if axis == 0 else feature[1, :, other, middle + 1]
            (gradient,) = torch.autograd.grad(first.sum() + second.sum(), probe)
    except (RuntimeError, ValueError, AssertionError):  # a network made for one input size (a ViT's patches)
        return None
    finally:
        handle.remove()
        net.train(was_training)
    profiles = [gradient[k].abs().sum(dim=(0, 2 if axis == 0 else 1)).double() for k in (0, 1)]
    if any(profile.sum() == 0 for profile in profiles):
        return None
    (first_centre, first_exact), (second_centre, second_exact) = (_field_centre(profile) for profile in profiles)
    stride = second_centre - first_centre
    if stride <= 0:
        return None
    if not (first_exact and second_exact):  # a centre of mass: no finer than half a pixel, the map's stride
        stride = (height, width)[axis] / feature.shape[-2 + axis]
        return stride, round((first_centre - stride * middle) * 2) / 2
    return stride, first_centre - stride * middle


def _field_centre(profile: torch.Tensor) -> tuple[float, bool]:
    """Centre of a receptive field's profile along one axis, and whether it is exact: the middle of its
    extent when the field lies inside the probe, else the profile's centre of mass."""
    inside = torch.nonzero(profile).flatten()
    if inside[0] > 0 and inside[-1] < len(profile) - 1:
        return (inside[0] + inside[-1]).item() / 2, True
    positions = torch.arange(len(profile), dtype=profile.dtype)
    return ((profile * positions).sum() / profile.sum()).item(), False


def stretch_to_image(maps: np.ndarray, layout: CellLayout, height: int, width: int) -> np.ndarray:
    """Low-resolution maps ``(N, h, w)`` stretched to ``(N, height, width)`` by linear interpolation between
    the cells' centres (:class:`CellLayout`); beyond the first and last centre a map keeps its edge value."""
    rows = _interpolation_matrix(height, maps.shape[1], layout.stride[0], layout.offset[0])
    columns = _interpolation_matrix(width, maps.shape[2], layout.stride[1], layout.offset[1])
    return np.einsum("ph,nhw,qw->npq", rows, maps, columns).astype(np.float32)


def _interpolation_matrix(pixels: int, cells: int, stride: float, offset: float) -> np.ndarray:
    """``(pixels, cells)`` weights of linear interpolation from cell centres ``offset + stride * j``."""
    position = np.clip((np.arange(pixels) - offset) / stride, 0, cells - 1)
    below = np.floor(position).astype(np.int64)
    above = np.minimum(below + 1, cells - 1)
    weights = np.zeros((pixels, cells))
    np.add.at(weights, (np.arange(pixels), below), 1 - (position - below))
    np.add.at(weights, (np.arange(pixels), above), position - below)
    return weights


def _to_tensor(images: np.ndarray, device: torch.device) -> torch.Tensor:
    return as_batch_tensor(images).permute(0, 3, 1, 2).float().to(device)


def explain_images(
    model: Classifier,
    images: np.ndarray,
    method: str = "gradcam",
    target_layer: str | None = None,
    targets: np.ndarray | None = None,
    batch_size: int = 16,
    layout: CellLayout | None = None,
) -> CamResult:
    """Class activation maps of a :class:`~bloodcell.models.Classifier` for a uint8 NHWC batch.

    Parameters
    ----------
    model: a Classifier (input NCHW RGB 0..255); its ``net`` is searched for the target layer.
    images: uint8 ``(N, H, W, 3)`` RGB images at the model's input size.
    method: one of :data:`METHODS` (``gradcam``, ``gradcam++``, ...).
    target_layer: dotted module name inside ``model.net``; None chooses the last convolutional stage.
    targets: class index to explain per image; None explains the predicted class.
    batch_size: images per CAM pass.
    layout: where the layer's cells sit (:func:`cell_layout`), when already known for this architecture.

    Returns a :class:`CamResult`.
    """
    if method not in METHODS:
        raise UserError(f"unknown CAM method {method!r}; choose one of {', '.join(METHODS)}")
    if images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError("explain_images expects uint8 images of shape (N, H, W, 3)")
    device = next(model.parameters()).device
    layer_name, layer = resolve_target_layer(model.net, target_layer, images.shape[1])
    layout = layout or cell_layout(model.net, layer, images.shape[1], images.shape[2])
    was_training = model.training
    model.eval()
    with torch.no_grad():
        logits = torch.cat([model(_to_tensor(images[i : i + 64], device)) for i in range(0, len(images), 64)])
    logits = logits.float().cpu()
    probabilities = softmax_with_temperature(logits.numpy())
    explained = probabilities.argmax(axis=1) if targets is None else np.asarray(targets, dtype=np.int64)
    # A copy of the activation: kept as the layer returns it, a later in-place operation (ReLU(inplace=True),
    # a residual +=) would overwrite it on the CPU, where .cpu() does not copy.
    cam = METHODS[method](model=model, target_layers=[layer], reshape_transform=torch.Tensor.clone)
    # The library would stretch each map to the image as a resize does; it keeps the layer's size here, and
    # stretch_to_image puts the cells where the network has them.
    cam.get_target_width_height = lambda _input: (layout.map_size[1], layout.map_size[0])
    try:
        maps = []
        with torch.enable_grad():
            for start in range(0, len(images), batch_size):
                batch = _to_tensor(images[start : start + batch_size], device)
                batch_targets = [ClassifierOutputTarget(int(t)) for t in explained[start : start + batch_size]]
                maps.append(cam(input_tensor=batch, targets=batch_targets))
    finally:
        cam.activations_and_grads.release()  # remove the hooks; the CAM context manager would swallow errors
        model.zero_grad(set_to_none=True)  # leave no gradients behind in a model that may be trained further
        model.train(was_training)  # the CAM library put it in eval mode; a caller's training goes on as it was
    low = np.nan_to_num(np.concatenate(maps).astype(np.float32), nan=0.0)
    cams = stretch_to_image(low, layout, images.shape[1], images.shape[2])
    return CamResult(cams=cams, targets=explained, logits=logits.numpy(), probabilities=probabilities,
                     layer_name=layer_name, map_size=layout.map_size)  # fmt: skip


def overlay(image: np.ndarray, cam: np.ndarray, image_weight: float = 0.55) -> np.ndarray:
    """Blend a CAM (``(H, W)`` in [0, 1]) as a jet heat map over a uint8 RGB image; returns uint8 RGB."""
    return show_cam_on_image(image.astype(np.float32) / 255.0, cam, use_rgb=True, image_weight=image_weight)


def randomized_copy(model: Classifier, seed: int = 0) -> Classifier:
    """A deep copy of ``model`` whose network weights are re-initialised at random (the sanity baseline).

    Every module that can resets its own parameters; a parameter no reset reaches (a ConvNeXt's layer
    scales, a vision transformer's class token and position embedding) is drawn from a normal of spread 0.02,
    as timm starts them, so no trained weight survives into the baseline. The weights are drawn on the CPU
    whatever the model's device, and no global generator (the CPU's or a GPU's) is left changed.
    """
    device = next(model.parameters()).device
    # Drawn on the CPU from its own seeded generator, then moved back: reset on a GPU they would draw from
    # its generator, which torch.manual_seed would reseed for the whole process (fork_rng keeps the CPU's).
    clone = copy.deepcopy(model).to("cpu")
    reset_by_their_module: set[int] = set()
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(seed)
        for module in clone.net.modules():
            reset = getattr(module, "reset_parameters", None)
            if reset is not None:
                reset()
                reset_by_their_module.update(id(parameter) for parameter in module.parameters(recurse=False))
        with torch.no_grad():
            for parameter in clone.net.parameters():
                if id(parameter) not in reset_by_their_module:
                    nn.init.trunc_normal_(parameter, std=0.02)
    return clone.to(device).eval()


def cam_similarity(cams_a: np.ndarray, cams_b: np.ndarray) -> np.ndarray:
    """Spearman rank correlation between paired CAMs, per image ``(N,)``.

    A constant map carries no ranking; its similarity is reported as 0 (no shared structure). Computed for
    all pairs at once, as the Pearson correlation of average ranks (what ``scipy.stats.spearmanr`` computes
    pair by pair, 2.5 ms each at 160 px: 3 s of an evaluation's 32 before).
    """
    n = len(cams_a)
    values = np.zeros(n)
    for start in range(0, n, 64):  # 64 pairs at a time: the float64 ranks of 400 maps at 160 px are 160 MB
        a, b = (cams[start : start + 64].reshape(len(cams[start : start + 64]), -1) for cams in (cams_a, cams_b))
        centred = [rank - rank.mean(axis=1, keepdims=True) for rank in (rankdata(a, axis=1), rankdata(b, axis=1))]
        spread = np.sqrt((centred[0] ** 2).sum(axis=1) * (centred[1] ** 2).sum(axis=1))
        flat = (np.ptp(a, axis=1) == 0) | (np.ptp(b, axis=1) == 0)
        np.divide((centred[0] * centred[1]).sum(axis=1), spread, out=values[start : start + 64], where=~flat & (spread > 0))
    return values


def cam_energy_on_cell(cams: np.ndarray, masks: np.ndarray) -> np.ndarray:
    """Share of every CAM's total energy that falls inside its cell mask, ``(N,)`` (NaN for an all-zero CAM)."""
    total = cams.sum(axis=(1, 2), dtype=np.float64)
    inside = (cams * masks).sum(axis=(1, 2), dtype=np.float64)
    return np.divide(inside, total, out=np.full_like(total, np.nan, dtype=np.float64), where=total > 0)


def sanity_check(
    model: Classifier,
    images: np.ndarray,
    method: str = "gradcam",
    target_layer: str | None = None,
    trained: CamResult | None = None,
    seeds: Sequence[int] = tuple(range(RANDOM_SEEDS)),
    groups: np.ndarray | None = None,
) -> dict[str, Any]:
    """Compare CAMs of the trained model with those of randomised copies, and measure energy on the cells.

    Parameters
    ----------
    model: the trained Classifier.
    images: uint8 NHWC images to explain.
    method, target_layer: as in :func:`explain_images`.
    trained: CAMs of ``model`` on ``images`` already computed (saves a pass), or None.
    seeds: seeds of the randomised copies (each image's random-weights share is averaged over them).
    groups: the session block of every image, resampled whole by the cell-focus interval (images of one
        session are not independent); None resamples images.

    Returns a JSON-ready dict: ``method``, ``target_layer``, ``map_size`` (the layer's ``[height, width]``),
    ``n_images``, ``random_seeds``, ``randomized_similarity`` (mean Spearman), ``informative_fraction``
    (share of non-constant trained CAMs), ``passed`` (similarity below :data:`SANITY_MAX_SIMILARITY` and
    most CAMs informative); and, over the images whose stained cells were found (``n_masked``) and whose
    trained map is not flat zero, ``cam_energy_on_cell`` (mean share of the energy on them),
    ``cell_area_fraction`` (mean share of pixels that are cell), ``energy_to_area_ratio`` (1: as much energy
    on the cells as a uniform map), the same two for the random-weights maps (``random_energy_on_cell``,
    ``random_energy_to_area_ratio``), ``cell_focus`` (the trained share over the larger of the area and the
    random maps' share) with its 95 % bootstrap interval ``cell_focus_ci``, ``cell_focus_verdict`` (see
    :func:`cell_focus_verdict`) and ``favours_cell`` (the verdict is ``"favours"``). The energy entries are
    None when no image has a mask.
    """
    trained = trained or explain_images(model, images, method, target_layer)
    # Explain the same classes with the random models, so only the weights differ; their cells sit where the
    # trained network's do (the same architecture), so its layout is not probed again for each.
    layer = model.net.get_submodule(trained.layer_name)
    layout = cell_layout(model.net, layer, images.shape[1], images.shape[2]) if len(images) else None
    random_maps = [explain_images(randomized_copy(model, seed), images, method, target_layer, targets=trained.targets,
                                  layout=layout).cams for seed in seeds]  # fmt: skip
    similarity = np.mean([cam_similarity(trained.cams, cams) for cams in random_maps], axis=0) if len(images) else []
    # A flat CAM explains nothing, and would also look "unlike" the random one: it must not pass.
    informative = float(np.mean([np.ptp(c) > 0 for c in trained.cams])) if len(images) else 0.0
    mean_similarity = float(np.mean(similarity)) if len(similarity) else None
    masks = stained_cell_masks(images)
    masked = masks.reshape(len(masks), -1).any(axis=1)
    energy = cam_energy_on_cell(trained.cams[masked], masks[masked])
    valid = np.isfinite(energy)  # a flat-zero map has no energy to share: its image is left out
    area = masks[masked][valid].mean(axis=(1, 2))
    # A random network's flat-zero map is counted as a uniform one (its share is the area).
    random_energy = np.mean([np.where(np.isfinite(share := cam_energy_on_cell(cams[masked], masks[masked])[valid]),
                                      share, area) for cams in random_maps], axis=0) if len(random_maps) else area  # fmt: skip
    focus = _cell_focus(energy[valid], random_energy, area, None if groups is None else groups[masked][valid])
    share = float(energy[valid].mean()) if valid.any() else None
    mean_area = float(area.mean()) if valid.any() else None
    random_share = float(random_energy.mean()) if valid.any() and len(random_maps) else None
    return {
        "method": method,
        "target_layer": trained.layer_name,
        "map_size": list(trained.map_size),
        "n_images": len(images),
        "random_seeds": len(random_maps),
        "randomized_similarity": mean_similarity,
        "max_similarity": SANITY_MAX_SIMILARITY,
        "informative_fraction": informative,
        "passed": bool(mean_similarity is not None and mean_similarity < SANITY_MAX_SIMILARITY and informative >= 0.5),
        "n_masked": int(masked.sum()),
        "cam_energy_on_cell": share,
        "cell_area_fraction": mean_area,
        "energy_to_area_ratio": share / mean_area if share is not None and mean_area else None,
        "random_energy_on_cell": random_share,
        "random_energy_to_area_ratio": random_share / mean_area if random_share is not None and mean_area else None,
        **focus,
        "favours_cell": focus["cell_focus_verdict"] == "favours",
    }


def _cell_focus(energy: np.ndarray, random_energy: np.ndarray, area: np.ndarray, groups: np.ndarray | None) -> dict[str, Any]:
    """The trained maps' mean share on the cells over the larger of the cells' mean area (a uniform map's
    share) and the random maps' mean share, with a percentile interval from resampling the images' groups."""
    if len(energy) == 0:
        return {"cell_focus": None, "cell_focus_ci": None, "cell_focus_verdict": "unknown"}
    units = np.unique(groups, return_inverse=True)[1] if groups is not None else np.arange(len(energy))
    per_unit = np.zeros((int(units.max()) + 1, 3))
    np.add.at(per_unit, units, np.stack([energy, random_energy, area], axis=1))
    rng = np.random.default_rng(0)
    draws = rng.integers(0, len(per_unit), size=(CELL_FOCUS_RESAMPLES, len(per_unit)))
    weights = np.zeros((CELL_FOCUS_RESAMPLES, len(per_unit)))
    np.add.at(weights, (np.arange(CELL_FOCUS_RESAMPLES)[:, None], draws), 1)
    sums = weights @ per_unit  # each resample's totals; the image count cancels in the ratio of means
    values = sums[:, 0] / np.maximum(np.maximum(sums[:, 2], sums[:, 1]), 1e-12)
    point = float(per_unit[:, 0].sum() / max(per_unit[:, 2].sum(), per_unit[:, 1].sum(), 1e-12))
    low, high = (float(value) for value in np.quantile(values, [0.025, 0.975]))
    return {"cell_focus": point, "cell_focus_ci": [low, high], "cell_focus_verdict": cell_focus_verdict(low, high)}


def cell_focus_verdict(low: float, high: float) -> str:
    """``favours`` when the whole interval of the cell focus clears :data:`CELL_FOCUS_MARGIN` (the maps put
    clearly more on the cells than a uniform map and random weights' maps do), ``does not favour`` when the
    whole interval falls short of it, ``inconclusive`` when it straddles it (too few images or sessions)."""
    if low > CELL_FOCUS_MARGIN:
        return "favours"
    return "does not favour" if high < CELL_FOCUS_MARGIN else "inconclusive"


def save_overlay(path: str | Path, image: np.ndarray, cam: np.ndarray) -> Path:
    """Write the image and its CAM overlay side by side as a PNG (atomically); returns the path."""
    from PIL import Image
    from PIL.PngImagePlugin import PngInfo

    from bloodcell.io import atomic_path

    panel = np.concatenate([image, overlay(image, cam)], axis=1)
    mark = PngInfo()
    mark.add_text(*OVERLAY_MARK)
    with atomic_path(path) as tmp:
        Image.fromarray(panel).save(tmp, format="PNG", pnginfo=mark)
    return Path(path)


def _is_overlay_png(path: Path) -> bool:
    """Whether ``path`` is a PNG that :func:`save_overlay` wrote: it carries :data:`OVERLAY_MARK`, or, written
    before overlays were marked, it is a panel of two squares side by side (the image and its overlay)."""
    from PIL import Image

    try:
        with Image.open(path) as image:
            marked = image.info.get(OVERLAY_MARK[0]) == OVERLAY_MARK[1]
            return bool(image.format == "PNG" and (marked or image.width == 2 * image.height))
    except (OSError, ValueError):  # unreadable: not an overlay of ours, and decoding will say why
        return False


def overlay_stems(stems: list[str]) -> list[str]:
    """File stems for the overlays, one per image and all different: a stem shared by several images (the
    same name in two folders, or ``a.jpg`` beside ``a.png``) is prefixed by the image's position, and if that
    still collides with another image's own stem (``000-a.jpg``), every stem is."""
    stems = [_short_stem(stem) for stem in stems]
    # Compared without case: on macOS and Windows, A.png and a.png are one file.
    folded = [stem.casefold() for stem in stems]
    named = [stem if folded.count(stem.casefold()) == 1 else f"{i:03d}-{stem}" for i, stem in enumerate(stems)]
    unique = len({name.casefold() for name in named}) == len(named)
    return named if unique else [f"{i:03d}-{stem}" for i, stem in enumerate(stems)]


def _short_stem(stem: str, limit: int = MAX_STEM_BYTES) -> str:
    """``stem`` cut to ``limit`` bytes with a digest of the whole appended, where it is longer: a file name
    may take 255 bytes, and ``<stem>.gradcam.png`` would pass that for a long image name."""
    def size(text: str) -> int:
        return len(text.encode("utf-8", "surrogateescape"))

    if size(stem) <= limit:
        return stem
    digest = hashlib.sha256(stem.encode("utf-8", "surrogateescape")).hexdigest()[:8]
    cut = stem
    while size(cut) > limit - 9:
        cut = cut[:-1]
    return f"{cut}-{digest}"


def _overlay_suffix(method: str) -> str:
    """The end of an overlay's file name: ``gradcam.png``, ``gradcampp.png`` for gradcam++ ..."""
    return f"{method.replace('+', 'p')}.png"


def _is_an_overlay(path: Path, out_dir: Path) -> bool:
    """Whether ``path`` is an overlay an earlier :func:`explain_files` wrote into ``out_dir``: named as it names
    overlays, there, and a PNG of its making (an image of one's own named ``x.gradcam.png`` is an input)."""
    named = any(path.name.endswith(f".{_overlay_suffix(method)}") for method in METHODS)
    return named and path.resolve().parent == out_dir and _is_overlay_png(path)


def explain_row(image: str | Path, error: str | None = None) -> dict[str, Any]:
    """One row of :func:`explain_files`, before the image is explained (or with why it cannot be)."""
    return {"image": str(image), "overlay": None, "predicted": None, "probability": None, "target_layer": None,
            "size": None, "error": error, "skipped": None}  # fmt: skip


def explain_files(
    model_path: str | Path | None,
    image_paths: Sequence[str | Path],
    out_dir: str | Path,
    method: str = "gradcam",
    target_layer: str | None = None,
) -> list[dict[str, Any]]:
    """Explain image files with a saved model and write one overlay PNG per image.

    Parameters
    ----------
    model_path: a run, model directory or card (None: the bundled default model).
    image_paths: image files (any size; decoded and resized like every other stage).
    out_dir: folder for ``<stem>.<method>.png`` overlays (original | overlay).
    method, target_layer: as in :func:`explain_images`.

    Returns one dict per image, in order: ``image``, ``overlay``, ``predicted``, ``probability`` (with the
    card's temperature), ``target_layer``, ``size`` (the image's ``(width, height)`` before it was resized:
    ``explain`` names the images that resizing squashed), ``error`` and ``skipped``. A file that cannot be decoded
    gets its reason in ``error`` (the other keys None) and the others are still explained, as ``predict`` does.
    An overlay an earlier run wrote into ``out_dir`` (explaining into the images' own folder again) gets its
    reason in ``skipped``, not ``error``: it is no smear, and leaving it out is no failure.
    """
    from bloodcell.data.decode import decode_or_reason
    from bloodcell.models.card import load_model

    model, card = load_model(model_path)
    if not image_paths:
        raise UserError("no images given to explain")
    rows: list[dict[str, Any]] = []
    decoded: dict[int, np.ndarray] = {}
    out = Path(out_dir).resolve()
    # Explaining into the images' own folder again: the earlier overlays are no smears. They are left out
    # before the overlays are named, so the images keep the names they had (and replace their old overlays).
    overlays = {i for i, path in enumerate(image_paths) if _is_an_overlay(Path(path), out)}
    smears = [i for i in range(len(image_paths)) if i not in overlays]
    for i, path in enumerate(image_paths):
        rows.append(explain_row(path))
        if i in overlays:
            rows[i]["skipped"] = "an overlay an earlier explain wrote into this output folder, not a smear"
            continue
        image = decode_or_reason(path, card.input_size)
        if isinstance(image, str):
            rows[i]["error"] = image
        else:
            decoded[i] = image.pixels
            rows[i]["size"] = (image.width, image.height)
    if not decoded:
        return rows
    images = np.stack(list(decoded.values()))
    result = explain_images(model, images, method, target_layer)
    probs = softmax_with_temperature(result.logits, card.temperature)
    names = dict(zip(smears, overlay_stems([Path(image_paths[i]).stem for i in smears]), strict=True))
    inputs = {Path(image_paths[i]).resolve() for i in smears}
    for k, i in enumerate(decoded):
        target = Path(out_dir) / f"{names[i]}.{_overlay_suffix(method)}"
        if target.resolve() in inputs:  # x.png beside an image named x.gradcam.png: never write over an input
            rows[i]["error"] = f"its overlay would replace the input {target}: write the overlays to another folder"
            continue
        save_overlay(target, images[k], result.cams[k])
        predicted = int(result.targets[k])
        rows[i].update(overlay=str(target), predicted=card.classes[predicted],
                       probability=float(probs[k, predicted]), target_layer=result.layer_name)  # fmt: skip
    return rows
