"""Our own architectures, registered by name: the seed baseline and the fast ``bloodnet`` family.

- ``seed-cnn`` replicates the kind of model the bootcamp notebook trained in Keras: four conv + max-pool
  blocks with unpadded 3x3 convolutions, a flatten, one dense layer, dropout and the output layer, at
  150 px. It is kept as the baseline the report compares against, not for its speed.
- ``bloodnet`` is designed for training on a 2-core CPU at 96-160 px: a stride-2 stem (the single biggest
  speed-up measured on this machine: the first layers run on a quarter of the pixels), four stride-2
  stages of 3x3 conv + BatchNorm + ReLU blocks with residual shortcuts, and global average pooling so it
  works at any input size.
- ``bloodnet-ir`` is the same network with MobileNetV2 inverted-residual blocks (1x1 expand, 3x3
  depthwise, 1x1 project). Fewer FLOPs, but depthwise convolutions run badly on this CPU: measured
  3-4x slower to train than ``bloodnet`` at the same width (benchmarks/train_speed.py), so it is not the
  default. It may suit GPUs and other CPUs better.

Every builder takes ``num_classes`` first and only JSON-serialisable keyword arguments, because the model
card stores them and rebuilds the network from them.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from timm.layers import SelectAdaptivePool2d
from torch import nn

from bloodcell.models.registry import register_model

#: bloodnet's global pooling choices (``pool``).
POOLS = ("avg", "max", "avgmax", "catavgmax")


class ConvBNReLU(nn.Sequential):
    """``kernel x kernel`` convolution (padded to keep the size at stride 1), BatchNorm, optional ReLU."""

    def __init__(
        self, c_in: int, c_out: int, kernel: int = 3, stride: int = 1, groups: int = 1, act: bool = True
    ) -> None:
        layers: list[nn.Module] = [
            nn.Conv2d(c_in, c_out, kernel, stride, padding=kernel // 2, groups=groups, bias=False),
            nn.BatchNorm2d(c_out),
        ]
        if act:
            layers.append(nn.ReLU(inplace=True))
        super().__init__(*layers)


class InvertedResidual(nn.Module):
    """MobileNetV2 block: 1x1 expand, 3x3 depthwise (carries the stride), 1x1 linear projection.

    The shortcut is used when the block keeps the resolution and the width.
    """

    def __init__(self, c_in: int, c_out: int, stride: int, expansion: int) -> None:
        super().__init__()
        hidden = c_in * expansion
        layers: list[nn.Module] = []
        if expansion != 1:
            layers.append(ConvBNReLU(c_in, hidden, kernel=1))
        layers += [
            ConvBNReLU(hidden, hidden, kernel=3, stride=stride, groups=hidden),
            ConvBNReLU(hidden, c_out, kernel=1, act=False),
        ]
        self.block = nn.Sequential(*layers)
        self.use_shortcut = stride == 1 and c_in == c_out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.block(x)
        return x + out if self.use_shortcut else out


class PlainBlock(nn.Module):
    """Plain 3x3 conv + BN + ReLU with a residual shortcut when shape allows (ResNet-style, no bottleneck)."""

    def __init__(self, c_in: int, c_out: int, stride: int, expansion: int = 1) -> None:
        super().__init__()
        del expansion  # accepted for a common block signature; plain blocks do not expand
        self.conv = ConvBNReLU(c_in, c_out, kernel=3, stride=stride)
        self.use_shortcut = stride == 1 and c_in == c_out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv(x)
        return x + out if self.use_shortcut else out


class MixStyle(nn.Module):
    """MixStyle (Zhou et al., ICLR 2021): in training, mix each image's feature statistics with another's.

    Early feature maps' per-channel mean and spread carry an image's "style" (here: the session's stain,
    light and background); replacing them, with probability ``p`` a batch, by a random blend with those of
    another image in the batch (weight drawn from Beta(alpha, alpha)) asks the network to classify without
    them. Written here because no maintained package ships it as a module (the authors' reference code is
    the same dozen lines). The identity in evaluation, so it leaves export and inference untouched; its
    draws come from torch's global generator, which training seeds every epoch.
    """

    def __init__(self, p: float, alpha: float = 0.1, eps: float = 1e-6) -> None:
        super().__init__()
        self.p, self.alpha, self.eps = p, alpha, eps
        self.draws_on_the_host = p > 0  # its coin is tossed on the CPU every step: no CUDA graph can replay it

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or float(torch.rand(())) >= self.p:
            return x
        n = x.shape[0]
        stats = x.detach().float()
        mean = stats.mean(dim=(2, 3), keepdim=True)
        spread = (stats.var(dim=(2, 3), keepdim=True) + self.eps).sqrt()
        weight = torch.distributions.Beta(self.alpha, self.alpha).sample((n, 1, 1, 1)).to(x.device)
        other = torch.randperm(n, device=x.device)
        mixed_mean = weight * mean + (1 - weight) * mean[other]
        mixed_spread = weight * spread + (1 - weight) * spread[other]
        return ((x - mean) / spread * mixed_spread + mixed_mean).to(x.dtype)


class BloodNet(nn.Module):
    """A small CNN for fast CPU training: stride-2 stem, four stride-2 stages, global pooling, linear head.

    Parameters
    ----------
    num_classes: number of outputs.
    width: multiplier on the stage widths ``widths`` (rounded to multiples of 8).
    depth: multiplier on the blocks per stage ``depths`` (at least one block per stage).
    block: ``"conv"`` (plain 3x3 convolutions) or ``"ir"`` (inverted residual, depthwise).
    expansion: hidden-width factor of the inverted-residual blocks.
    widths / depths: base channels and blocks of the four stages.
    stem_channels: channels of the stride-2 stem convolution (scaled by ``width``).
    dropout: dropout before the linear head.
    mixstyle: probability a training batch gets :class:`MixStyle` after the first two stages (0: off).
    pool: global pooling, ``"avg"`` or one of timm's ``"max"``, ``"avgmax"`` (their mean) and
        ``"catavgmax"`` (both, side by side): a maximum lets a few cells in a sparse field carry the answer.
    """

    def __init__(
        self,
        num_classes: int,
        width: float = 1.0,
        depth: float = 1.0,
        block: str = "conv",
        expansion: int = 4,
        widths: Sequence[int] = (24, 48, 96, 160),
        depths: Sequence[int] = (1, 2, 2, 1),
        stem_channels: int = 16,
        dropout: float = 0.1,
        mixstyle: float = 0.0,
        pool: str = "avg",
    ) -> None:
        super().__init__()
        blocks = {"ir": InvertedResidual, "conv": PlainBlock}
        if block not in blocks:
            raise ValueError(f"bloodnet block must be one of {sorted(blocks)}, got {block!r}")
        if len(widths) != len(depths):
            raise ValueError("bloodnet widths and depths must have the same length")
        make_block = blocks[block]
        c_prev = _round8(stem_channels * width)
        self.stem = ConvBNReLU(3, c_prev, kernel=3, stride=2)
        stages: list[nn.Module] = []
        for base_width, base_depth in zip(widths, depths):
            c_out = _round8(base_width * width)
            n_blocks = max(1, round(base_depth * depth))
            layers = [make_block(c_prev if i == 0 else c_out, c_out, 2 if i == 0 else 1, expansion) for i in range(n_blocks)]
            stages.append(nn.Sequential(*layers))
            c_prev = c_out
        self.stages = nn.Sequential(*stages)
        if pool not in POOLS:
            raise ValueError(f"bloodnet pool must be one of {sorted(POOLS)}, got {pool!r}")
        # Plain average pooling stays torch's own module, as the bundled model was trained with it.
        self.pool = nn.AdaptiveAvgPool2d(1) if pool == "avg" else SelectAdaptivePool2d(pool_type=pool)
        pooled = c_prev * (2 if pool == "catavgmax" else 1)
        self.head = nn.Sequential(nn.Flatten(), nn.Dropout(dropout), nn.Linear(pooled, num_classes))
        self.num_features = c_prev
        # Applied in forward, not placed in self.stages, so the parameter names stay those of a plain bloodnet.
        self.mix_style = MixStyle(mixstyle) if mixstyle > 0 else None
        _init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.mix_style is None:
            # self.stages called whole, not stage by stage: Grad-CAM's automatic layer is the ``stages`` module.
            return self.head(self.pool(self.stages(self.stem(x))))
        x = self.stem(x)
        for index, stage in enumerate(self.stages):
            x = stage(x)
            if index < 2:
                x = self.mix_style(x)
        return self.head(self.pool(x))


class SeedCNN(nn.Module):
    """The bootcamp baseline: Keras-style ``Conv2D(3x3, valid) + MaxPool(2)`` blocks, Flatten, Dense, Dropout.

    At 150 px the feature map before the flatten is 7x7, exactly as in Keras. An adaptive pool to 7x7 (the
    identity at 150 px) lets the same network run at other input sizes.
    """

    def __init__(
        self,
        num_classes: int,
        channels: Sequence[int] = (32, 64, 128, 128),
        dense: int = 512,
        dropout: float = 0.5,
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        c_prev = 3
        for c_out in channels:
            layers += [nn.Conv2d(c_prev, c_out, 3), nn.ReLU(inplace=True), nn.MaxPool2d(2)]
            c_prev = c_out
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(7)
        self.head = nn.Sequential(
            nn.Flatten(),
            nn.Linear(c_prev * 7 * 7, dense),
            nn.ReLU(inplace=True),
            nn.Dropout(dropout),
            nn.Linear(dense, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.pool(self.features(x)))


def _round8(value: float) -> int:
    """Channel counts in multiples of 8 suit the vectorised CPU (and GPU) kernels."""
    return max(8, round(value / 8) * 8)


def _init_weights(model: nn.Module) -> None:
    """He initialisation for convolutions, small normal for the head, zero-init of residual branches' last BN.

    Zeroing the last BatchNorm of each residual branch makes every block start as the identity, which lets
    a short (about 20 epoch) high-learning-rate run train stably.
    """
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, std=0.01)
            nn.init.zeros_(module.bias)
    for module in model.modules():
        if isinstance(module, (InvertedResidual, PlainBlock)) and module.use_shortcut:
            last = [m for m in module.modules() if isinstance(m, nn.BatchNorm2d)][-1]
            nn.init.zeros_(last.weight)


@register_model("seed-cnn", 150, "bootcamp baseline: 4 Keras-style conv+max-pool blocks, dense 512, dropout 0.5")
def seed_cnn(num_classes: int, **kwargs) -> nn.Module:
    return SeedCNN(num_classes, **kwargs)


@register_model("bloodnet", 128, "fast CPU CNN: stride-2 stem, residual 3x3 conv stages, global pooling")
def bloodnet(num_classes: int, **kwargs) -> nn.Module:
    return BloodNet(num_classes, **kwargs)


@register_model("bloodnet-ir", 128, "bloodnet with MobileNetV2 inverted-residual (depthwise) blocks", block="ir")
def bloodnet_ir(num_classes: int, **kwargs) -> nn.Module:
    return BloodNet(num_classes, **kwargs)
