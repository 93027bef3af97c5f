"""GAP variants of pretrained networks for class activation maps (Zhou et al. CVPR 2016, Sec. 3.1).

Paper 003 builds its CAM networks by cutting a pretrained network after a late convolution
(VGG16 after ``conv5_3``, GoogLeNet after ``inception4e``, AlexNet after ``conv5``) so that the
last map keeps a "mapping resolution" of 14x14 (13x13 for AlexNet) at a 224 input, then adds::

    conv 3x3, stride 1, pad 1, 1024 units (+ ReLU)  ->  global average pooling  ->  softmax

and fine-tunes on ILSVRC. The class score is ``S_c = Σ_k w_k^c · GAP(f_k)`` and the CAM is
``M_c(x, y) = Σ_k w_k^c f_k(x, y)`` over the added layer's output ``f`` (`fgloc.maps.cam`).

`GAPNet` wraps any fgloc backbone (the ``features`` method contract of DEVELOPING.md) and cuts it
at a named intermediate. The backbone always runs in inference mode (frozen BatchNorm
statistics, no dropout). ``width=None`` skips the added conv and pools the cut map directly; this
is how EfficientNet-Lite0 already ends (head conv + GAP + linear), so its CAM needs no new layers.

The default cut of each network is its registry entry's ``gap_cut`` (`fgloc.registry`),
mapping resolution at a 224 input: ``vgg16``: ``conv5_3`` (14x14, 512 ch); ``alexnet``:
``conv5`` (13x13, 256 ch); ``googlenet``: ``inception4e``; ``efficientnet_lite0``: ``stage5``
(14x14, 112 ch, stride 16 instead of the native 7x7 head). Building a GAP variant from pretrained
weights and fine-tuning it is a training recipe: `fgloc.train.gap_finetune`.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

__all__ = ["GAPNet"]


class GAPNet(nn.Module):
    """``backbone[: cut]`` -> (3x3 conv, ``width`` units, ReLU) -> GAP -> ``classifier``.

    Attributes:
      backbone: an fgloc model with ``features(x, train) -> (map, inter)``; ``inter[cut]`` must
        exist. Run in inference mode.
      cut: name of the backbone intermediate to build on (e.g. ``"conv5_3"``).
      num_classes: classifier width.
      width: units of the added conv (paper: 1024); ``None`` pools ``inter[cut]`` directly.

    ``__call__(x)`` with ``x`` ``(B, H, W, 3)`` (the backbone's preprocessed input) returns
    ``(logits (B, num_classes), inter)``; ``inter`` holds the backbone's intermediates plus
    ``cut`` (the cut map), ``pre_pool`` ``(B, h, w, width)`` — the map CAM uses — ``pooled``
    ``(B, width)`` and ``logits``. The classifier kernel is ``params["classifier"]["kernel"]``
    ``(width, num_classes)``.
    """

    backbone: nn.Module
    cut: str
    num_classes: int
    width: int | None = 1024

    def setup(self) -> None:
        if self.width is not None:
            self.cam_conv = nn.Conv(self.width, (3, 3), strides=1, padding=((1, 1), (1, 1)))
        self.classifier = nn.Dense(self.num_classes)

    def cut_map(self, x: jax.Array) -> tuple[jax.Array, dict[str, jax.Array]]:
        """Backbone up to the cut: ``(B, H, W, 3) -> (inter[cut] (B, h, w, C), inter)``."""
        _, inter = self.backbone.features(x, train=False, stop_at=self.cut)  # pyright: ignore[reportAttributeAccessIssue]
        if self.cut not in inter:
            raise KeyError(
                f"GAPNet.cut={self.cut!r} is not an intermediate of "
                f"{type(self.backbone).__name__}; available: {sorted(inter)}"
            )
        return inter[self.cut], inter

    def from_cut(self, h: jax.Array) -> tuple[jax.Array, dict[str, jax.Array]]:
        """The new layers on a cut map ``(B, h, w, C)``: ``(logits, {pre_pool, pooled, logits})``."""
        fmap = h if self.width is None else nn.relu(self.cam_conv(h))
        pooled = jnp.mean(fmap, axis=(1, 2))
        logits = self.classifier(pooled)
        return logits, {"pre_pool": fmap, "pooled": pooled, "logits": logits}

    def features(self, x: jax.Array, train: bool = False) -> tuple[jax.Array, dict]:
        """Pre-pool map ``(B, h, w, width)`` (the CAM features) and all intermediates."""
        del train
        h, inter = self.cut_map(x)
        fmap = h if self.width is None else nn.relu(self.cam_conv(h))
        return fmap, {**inter, "cut": h, "pre_pool": fmap}

    def head(self, pooled: jax.Array, train: bool = False) -> jax.Array:
        """Classifier on pooled features ``(B, width) -> (B, num_classes)``."""
        del train
        return self.classifier(pooled)

    def __call__(self, x: jax.Array, train: bool = False) -> tuple[jax.Array, dict]:
        h, inter = self.cut_map(x)
        logits, new = self.from_cut(h)
        return logits, {**inter, "cut": h, **new}
