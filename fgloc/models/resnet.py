"""ResNet-50 (He et al. 2016) in the torchvision v1.5 layout, the modern baseline.

Stem: conv1 7x7/2 pad 3 (64, no bias) → bn1 → ReLU → 3x3/2 pad 1 max pool. Four stages
(``layer1``…``layer4``) of [3, 4, 6, 3] bottlenecks with widths 64, 128, 256, 512 (output 4x):
``conv1 1x1 → bn1 → ReLU → conv2 3x3 (stride here: "v1.5") → bn2 → ReLU → conv3 1x1 → bn3``,
plus a projection shortcut ``downsample_0`` (1x1 conv, stride) + ``downsample_1`` (BN) on the
first block of each stage; ``relu(out + shortcut)``. Global average pool → ``classifier``.
All BatchNorms have eps 1e-5; Flax momentum 0.9 equals torch momentum 0.1.

Parameter names follow torchvision's state-dict keys with ``.`` -> ``/`` and numeric indices
joined (``layer1.0.downsample.0`` -> ``layer1_0/downsample_0``), ``fc`` -> ``classifier``.
"""

from __future__ import annotations

from functools import partial

import flax.linen as nn
import jax
import jax.numpy as jnp

from fgloc.models.layers import torch_max_pool

_BN = partial(nn.BatchNorm, momentum=0.9, epsilon=1e-5)


class Bottleneck(nn.Module):
    """torchvision ``Bottleneck`` (expansion 4, stride on the 3x3 conv)."""

    width: int
    stride: int = 1
    downsample: bool = False

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        ura = not train
        s = self.stride
        y = nn.Conv(self.width, (1, 1), use_bias=False, name="conv1")(x)
        y = nn.relu(_BN(use_running_average=ura, name="bn1")(y))
        y = nn.Conv(
            self.width, (3, 3), (s, s), padding=((1, 1), (1, 1)), use_bias=False, name="conv2"
        )(y)
        y = nn.relu(_BN(use_running_average=ura, name="bn2")(y))
        y = nn.Conv(self.width * 4, (1, 1), use_bias=False, name="conv3")(y)
        y = _BN(use_running_average=ura, name="bn3")(y)
        if self.downsample:
            x = nn.Conv(self.width * 4, (1, 1), (s, s), use_bias=False, name="downsample_0")(x)
            x = _BN(use_running_average=ura, name="downsample_1")(x)
        return nn.relu(y + x)


class ResNet(nn.Module):
    """torchvision-layout ResNet with bottleneck blocks, NHWC.

    Attributes:
      stage_sizes: blocks per stage; ``(3, 4, 6, 3)`` is ResNet-50 (tests use ``(1, 1, 1, 1)``).
      num_classes: classifier width (``None``: no classifier, logits ``None``).

    Input ``(B, H, W, 3)``, RGB normalised with ImageNet mean/std. Returns ``(logits, inter)``
    with ``stem`` (after the max pool, ``(B, H/4, W/4, 64)``), ``layer1``…``layer4`` (strides 4,
    8, 16, 32; 256…2048 channels), ``pre_pool`` (= layer4, ``(B, 7, 7, 2048)`` at 224) and
    ``pooled`` ``(B, 2048)``.
    """

    stage_sizes: tuple[int, ...] = (3, 4, 6, 3)
    num_classes: int | None = 1000

    def setup(self) -> None:
        self.conv1 = nn.Conv(64, (7, 7), (2, 2), padding=((3, 3), (3, 3)), use_bias=False)
        self.bn1 = _BN()
        names = []
        in_ch = 64
        for i, n in enumerate(self.stage_sizes):
            width = 64 * 2**i
            for j in range(n):
                stride = 2 if (i > 0 and j == 0) else 1
                down = j == 0 and (stride != 1 or in_ch != width * 4)
                name = f"layer{i + 1}_{j}"
                setattr(self, name, Bottleneck(width, stride, down))
                names.append(name)
                in_ch = width * 4
        self.block_names = tuple(names)
        if self.num_classes is not None:
            self.classifier = nn.Dense(self.num_classes)

    def features(
        self, x: jax.Array, train: bool = False, stop_at: str | None = None
    ) -> tuple[jax.Array, dict]:
        """Stem and stages: ``(B, H, W, 3) -> layer4 (B, H/32, W/32, 2048)`` and intermediates.

        ``stop_at``: ``stem`` or ``layer1`` … ``layer4`` (a stage's last block) to stop after.
        """
        if x.ndim != 4 or x.shape[-1] != 3:
            raise ValueError(f"ResNet expects (B, H, W, 3) input, got shape {x.shape}")
        stages = sorted({n.split("_")[0] for n in self.block_names})
        if stop_at is not None and stop_at not in ["stem", *stages]:
            raise KeyError(f"ResNet has no layer {stop_at!r}; its layers: {['stem', *stages]}")
        inter: dict[str, jax.Array] = {}
        x = nn.relu(self.bn1(self.conv1(x), use_running_average=not train))
        x = inter["stem"] = torch_max_pool(x, 3, 2, padding=1)
        if stop_at == "stem":
            return x, inter
        for i, name in enumerate(self.block_names):
            x = getattr(self, name)(x, train)
            stage = name.split("_")[0]
            inter[stage] = x  # last block of the stage wins
            last = i + 1 == len(self.block_names) or not self.block_names[i + 1].startswith(stage)
            if last and stage == stop_at:
                return x, inter
        inter["pre_pool"] = x
        return x, inter

    def head(self, pooled: jax.Array) -> jax.Array:
        """``classifier`` on globally pooled features ``(B, 2048) -> (B, num_classes)``."""
        if self.num_classes is None:
            raise ValueError("ResNet(num_classes=None) has no classifier")
        return self.classifier(pooled)

    def __call__(self, x: jax.Array, train: bool = False) -> tuple[jax.Array | None, dict]:
        fmap, inter = self.features(x, train)
        pooled = inter["pooled"] = jnp.mean(fmap, axis=(1, 2))
        if self.num_classes is None:
            return None, inter
        return self.head(pooled), inter


def ResNet50(num_classes: int | None = 1000) -> ResNet:
    """torchvision ``resnet50`` layout: stages (3, 4, 6, 3)."""
    return ResNet(stage_sizes=(3, 4, 6, 3), num_classes=num_classes)
