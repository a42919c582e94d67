"""The module every stage trains, evaluates, explains and exports: preprocessing + network.

Normalisation lives inside the model (not in a data pipeline) so that training, evaluation, the torch
predictor and the exported ONNX graph apply exactly the same arithmetic. Input: float or uint8 tensor,
NCHW, RGB, pixel values in [0, 255]. Output: logits.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn

from bloodcell.config import NormalizeConfig

# ITU-R BT.601 luma weights: the standard grey conversion.
_LUMA = (0.299, 0.587, 0.114)


def as_batch_tensor(images: np.ndarray) -> torch.Tensor:
    """A NHWC numpy batch as a tensor, sharing its memory where it can. A read-only array (a slice of the
    memory-mapped image cache) is copied: torch cannot share memory it may not write, and warns."""
    array = np.ascontiguousarray(images)
    return torch.from_numpy(array if array.flags.writeable else array.copy())


class Preprocess(nn.Module):
    """Scale to [0, 1] and normalise by mean and std; or, with ``per_image``, standardise each image by its own
    statistics instead (the card's mean and std are then recorded but not used). Optionally grey first."""

    # Buffers, registered in __init__: declared so the checker knows them as tensors, not submodules.
    mean: torch.Tensor
    std: torch.Tensor
    luma: torch.Tensor

    def __init__(self, normalize: NormalizeConfig | None = None) -> None:
        super().__init__()
        normalize = normalize or NormalizeConfig()
        self.per_image = normalize.per_image
        self.grayscale = normalize.grayscale
        self.register_buffer("mean", torch.tensor(normalize.mean).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(normalize.std).view(1, 3, 1, 1))
        self.register_buffer("luma", torch.tensor(_LUMA).view(1, 3, 1, 1))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = images.float()  # [0, 255]; the scaling to [0, 1] is folded into the last step
        if self.grayscale:
            x = (x * self.luma).sum(dim=1, keepdim=True).expand(-1, 3, -1, -1)
        if self.per_image:
            # Each channel to zero mean, and the image to unit variance over all its channels: removes the
            # per-image colour cast, brightness and contrast, the main acquisition shortcut in this data.
            # One scale for the three channels, not one each: dividing a faint channel by its own small
            # spread amplifies its noise and JPEG chroma artefacts (measured: JPEG quality 40 cost 0.14
            # balanced accuracy with per-channel scaling).
            centred = x - x.mean(dim=(2, 3), keepdim=True)
            # The spread as a norm of the centred image, not Tensor.std: std's Welford pass took 14 ms of a
            # 75 ms training step (batch 64, 160 px, 2 cores), the norm 0.3 ms. Floored at 1e-3 of the
            # [0, 1] range (a blank image).
            std = _norm_of_each_image(centred) / math.sqrt(centred[0].numel() - 1)
            scale = std.clamp_min(255e-3).reciprocal()
            # In place saves a pass over the batch, but the norm's backward needs ``centred`` unchanged
            # when gradients flow to the input (saliency methods ask for them).
            return centred * scale if centred.requires_grad else centred.mul_(scale)
        return (x / 255.0 - self.mean) / self.std


def _norm_of_each_image(x: torch.Tensor) -> torch.Tensor:
    """The L2 norm of each image of a batch, shaped ``(N, 1, 1, 1)``.

    In an ONNX export it is summed in float64: ONNX Runtime's float32 ``ReduceL2`` over the 76,800 values
    of a 160 px image is off by up to 1.8e-4 of the result (PyTorch's by 2e-6), which moved the exported
    model's probabilities by up to 1.3e-3 from PyTorch's on real images. Training keeps float32, so the
    weights it makes do not depend on this.
    """
    if torch.onnx.is_in_onnx_export():
        return torch.linalg.vector_norm(x.double(), dim=(1, 2, 3), keepdim=True).to(x.dtype)
    return torch.linalg.vector_norm(x, dim=(1, 2, 3), keepdim=True)


class Classifier(nn.Module):
    """``Preprocess`` followed by a network from the registry; ``net`` is what Grad-CAM looks into."""

    def __init__(self, net: nn.Module, normalize: NormalizeConfig | None = None) -> None:
        super().__init__()
        self.preprocess = Preprocess(normalize)
        self.net = net

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.net(self.preprocess(images))
