"""GoogLeNet / Inception v1 (Szegedy et al. 2015): torchvision layout and the original BN-free net.

Two variants share one module plan (channels per inception: 1x1, 3x3-reduce, 3x3, "5x5"-reduce,
"5x5", pool-proj)::

    conv1 7x7/2 pad 3, 64 -> pool1 3x3/2 (ceil) [-> LRN]
    conv2 1x1, 64 -> conv3 3x3 pad 1, 192 [-> LRN] -> pool2 3x3/2 (ceil)
    inception3a (64,96,128,16,32,32), inception3b (128,128,192,32,96,64) -> pool3 3x3/2 (ceil)
    inception4a (192,96,208,16,48,64) … inception4e (256,160,320,32,128,128) -> pool4 (ceil)
    inception5a (256,160,320,32,128,128), inception5b (384,192,384,48,128,128)
    global average pool -> dropout -> classifier

* ``variant="torchvision"`` (``torchvision.models.GoogLeNet``): every conv is conv (no bias) +
  BatchNorm (eps 1e-3) + ReLU; the "5x5" branch uses a 3x3 kernel (torchvision's known quirk,
  kept for weight compatibility); pool4 is 2x2/2; no LRN; dropout 0.2. Auxiliary heads
  (``aux1``/``aux2``) are training-only and are not built; the converter drops their weights.
* ``variant="bvlc"`` (Caffe ``bvlc_googlenet``, the base of CAM's GoogLeNet-CAM, paper 3):
  convs with bias and no BatchNorm, a real 5x5 branch (pad 2), cross-channel LRN (size 5,
  alpha 1e-4, beta 0.75, k 1) after pool1 and after conv3, pool4 3x3/2, dropout 0.4.
  Caffe pools with ceil, like torch's ``ceil_mode=True`` (same output-size rule).
* ``cam=True`` (bvlc only) builds GoogLeNet-CAM (Zhou et al. 2016, Sec. 3): "remove the layers
  after inception4e" (14x14 at a 224 input), add ``cam_conv`` (3x3 pad 1, 1024, ReLU), global
  average pooling and the ``classifier``; CAM is then ``M_c = Σ_k w_k^c f_k`` on ``cam_conv``.

``transform_input`` (torchvision only): torchvision's ``googlenet(weights=...)`` sets
``transform_input=True``, so its ImageNet checkpoint receives ImageNet-mean/std input and maps it
internally to ``(x - 0.5) / 0.5`` per channel (``x' = x * std/0.5 + (mean - 0.5)/0.5``); a
randomly initialised ``GoogLeNet()`` has ``transform_input=False``. Set it the same way here:
``True`` for converted torchvision ImageNet weights, ``False`` to match a random torch model.

Parameter names (Caffe ``bvlc_googlenet`` layer -> Flax path): ``conv1/7x7_s2`` -> ``conv1/conv``,
``conv2/3x3_reduce`` -> ``conv2/conv``, ``conv2/3x3`` -> ``conv3/conv``, ``inception_3a/1x1`` ->
``inception3a/branch1/conv``, ``…/3x3_reduce`` -> ``branch2_0``, ``…/3x3`` -> ``branch2_1``,
``…/5x5_reduce`` -> ``branch3_0``, ``…/5x5`` -> ``branch3_1``, ``…/pool_proj`` -> ``branch4_1``,
``loss3/classifier`` (or ``CAM_fc``) -> ``classifier``, ``CAM_conv`` -> ``cam_conv/conv``. The
torchvision names map by ``.`` -> ``/`` with numeric indices joined (``branch2.0`` ->
``branch2_0``), ``fc`` -> ``classifier``.
"""

from __future__ import annotations

from functools import partial

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from fgloc.models.layers import run_stages, torch_max_pool

#: name -> (1x1, 3x3 reduce, 3x3, 5x5 reduce, 5x5, pool proj), in network order.
INCEPTION_CFG: dict[str, tuple[int, int, int, int, int, int]] = {
    "inception3a": (64, 96, 128, 16, 32, 32),
    "inception3b": (128, 128, 192, 32, 96, 64),
    "inception4a": (192, 96, 208, 16, 48, 64),
    "inception4b": (160, 112, 224, 24, 64, 64),
    "inception4c": (128, 128, 256, 24, 64, 64),
    "inception4d": (112, 144, 288, 32, 64, 64),
    "inception4e": (256, 160, 320, 32, 128, 128),
    "inception5a": (256, 160, 320, 32, 128, 128),
    "inception5b": (384, 192, 384, 48, 128, 128),
}
_POOL_BEFORE = {"inception4a": "pool3", "inception5a": "pool4"}


def local_response_norm(
    x: jax.Array, size: int = 5, alpha: float = 1e-4, beta: float = 0.75, k: float = 1.0
) -> jax.Array:
    """Caffe cross-channel LRN on ``(B, H, W, C)``: ``x / (k + alpha/size * Σ_{|c'-c|≤size//2}
    x_{c'}²)^beta`` (zero-padded at the channel ends)."""
    half = size // 2
    sq_sum = lax.reduce_window(
        x * x, 0.0, lax.add, (1, 1, 1, size), (1, 1, 1, 1), ((0, 0), (0, 0), (0, 0), (half, half))
    )
    return x / (k + (alpha / size) * sq_sum) ** beta


class BasicConv(nn.Module):
    """conv → [BatchNorm] → ReLU; ``batch_norm=False`` gives a biased conv (Caffe style)."""

    features: int
    kernel: int
    stride: int = 1
    padding: int = 0
    batch_norm: bool = True
    bn_eps: float = 1e-3

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        p = self.padding
        x = nn.Conv(
            self.features,
            (self.kernel, self.kernel),
            strides=(self.stride, self.stride),
            padding=((p, p), (p, p)),
            use_bias=not self.batch_norm,
            name="conv",
        )(x)
        if self.batch_norm:
            x = nn.BatchNorm(
                use_running_average=not train, momentum=0.9, epsilon=self.bn_eps, name="bn"
            )(x)
        return nn.relu(x)


class Inception(nn.Module):
    """Four-branch inception block; output channels ``c1 + c3 + c5 + pool_proj`` (NHWC concat)."""

    cfg: tuple[int, int, int, int, int, int]
    batch_norm: bool = True
    kernel5: int = 3  # torchvision uses 3x3 in the "5x5" branch; Caffe 5x5

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        c1, c3r, c3, c5r, c5, cp = self.cfg
        bn = self.batch_norm
        b1 = BasicConv(c1, 1, batch_norm=bn, name="branch1")(x, train)
        b2 = BasicConv(c3r, 1, batch_norm=bn, name="branch2_0")(x, train)
        b2 = BasicConv(c3, 3, padding=1, batch_norm=bn, name="branch2_1")(b2, train)
        b3 = BasicConv(c5r, 1, batch_norm=bn, name="branch3_0")(x, train)
        b3 = BasicConv(
            c5, self.kernel5, padding=self.kernel5 // 2, batch_norm=bn, name="branch3_1"
        )(b3, train)
        b4 = torch_max_pool(x, 3, 1, padding=1, ceil_mode=True)
        b4 = BasicConv(cp, 1, batch_norm=bn, name="branch4_1")(b4, train)
        return jnp.concatenate([b1, b2, b3, b4], axis=-1)


class GoogLeNet(nn.Module):
    """Inception v1, NHWC. See the module docstring for the two variants.

    Attributes:
      num_classes: classifier width (``None``: no classifier, logits ``None``).
      variant: ``"torchvision"`` (BatchNorm) or ``"bvlc"`` (Caffe, BN-free, LRN).
      transform_input: torchvision's input re-normalisation (see module docstring).
      cam: GoogLeNet-CAM head (bvlc only): truncate after inception4e, add ``cam_conv``.
      dropout_rate: before the classifier; default 0.2 (torchvision) / 0.4 (bvlc).

    Input ``(B, H, W, 3)``, ImageNet-mean/std normalised RGB (torchvision) or the Caffe
    preprocessing of the converted weights (bvlc). Returns ``(logits, inter)`` with ``conv1``,
    ``pool1``, ``conv2``, ``conv3``, ``pool2``, ``inception3a``…``inception5b`` (``inception4e``:
    ``(B, 14, 14, 832)`` at 224), ``pool3``, ``pool4``, ``pre_pool`` (``(B, 7, 7, 1024)`` at 224;
    with ``cam``: ``cam_conv``, ``(B, 14, 14, 1024)``) and ``pooled`` ``(B, 1024)``.
    """

    num_classes: int | None = 1000
    variant: str = "torchvision"
    transform_input: bool = False
    cam: bool = False
    dropout_rate: float | None = None

    def setup(self) -> None:
        if self.variant not in ("torchvision", "bvlc"):
            raise ValueError(f"variant must be 'torchvision' or 'bvlc', got {self.variant!r}")
        if self.cam and self.variant != "bvlc":
            raise ValueError("cam=True is GoogLeNet-CAM, built on variant='bvlc'")
        if self.transform_input and self.variant != "torchvision":
            raise ValueError("transform_input is a torchvision option")
        bn = self.variant == "torchvision"
        self.conv1 = BasicConv(64, 7, stride=2, padding=3, batch_norm=bn)
        self.conv2 = BasicConv(64, 1, batch_norm=bn)
        self.conv3 = BasicConv(192, 3, padding=1, batch_norm=bn)
        names = list(INCEPTION_CFG)
        if self.cam:
            names = names[: names.index("inception4e") + 1]
        self.block_names = tuple(names)
        for n in names:
            setattr(self, n, Inception(INCEPTION_CFG[n], batch_norm=bn, kernel5=3 if bn else 5))
        if self.cam:
            self.cam_conv = BasicConv(1024, 3, padding=1, batch_norm=False)
        if self.num_classes is not None:
            self.classifier = nn.Dense(self.num_classes)
            rate = self.dropout_rate if self.dropout_rate is not None else (0.2 if bn else 0.4)
            self.dropout = nn.Dropout(rate)

    def features(
        self, x: jax.Array, train: bool = False, stop_at: str | None = None
    ) -> tuple[jax.Array, dict]:
        """Conv stack ``(B, H, W, 3) -> (B, h, w, 1024)`` (pre global pool) and intermediates.

        ``stop_at``: a layer name (``conv1`` … ``inception5b``, ``cam_conv``) to stop after.
        """
        if x.ndim != 4 or x.shape[-1] != 3:
            raise ValueError(f"GoogLeNet expects (B, H, W, 3) input, got shape {x.shape}")
        if self.transform_input:
            mean = jnp.array([0.485, 0.456, 0.406], x.dtype).reshape(1, 1, 1, 3)
            std = jnp.array([0.229, 0.224, 0.225], x.dtype).reshape(1, 1, 1, 3)
            x = x * (std / 0.5) + (mean - 0.5) / 0.5
        lrn = self.variant == "bvlc"
        norm = local_response_norm if lrn else (lambda h: h)
        pool = partial(torch_max_pool, kernel=3, stride=2, ceil_mode=True)
        stages = [
            ("conv1", lambda h: self.conv1(h, train)),
            ("pool1", pool),
            ("conv2", lambda h: self.conv2(norm(h), train)),
            ("conv3", lambda h: self.conv3(h, train)),
            ("pool2", lambda h: pool(norm(h))),
        ]
        for name in self.block_names:
            if name in _POOL_BEFORE:
                k = 2 if (name == "inception5a" and not lrn) else 3
                stages.append(
                    (
                        _POOL_BEFORE[name],
                        partial(torch_max_pool, kernel=k, stride=2, ceil_mode=True),
                    )
                )
            stages.append((name, lambda h, name=name: getattr(self, name)(h, train)))
        if self.cam:
            stages.append(("cam_conv", lambda h: self.cam_conv(h, train)))
        x, inter = run_stages(x, stages, stop_at, "GoogLeNet")
        if stop_at is None:
            inter["pre_pool"] = x
        return x, inter

    def head(self, pooled: jax.Array, train: bool = False) -> jax.Array:
        """dropout → ``classifier`` on globally pooled features ``(B, 1024) -> (B, classes)``."""
        if self.num_classes is None:
            raise ValueError("GoogLeNet(num_classes=None) has no classifier")
        return self.classifier(self.dropout(pooled, deterministic=not train))

    def __call__(self, x: jax.Array, train: bool = False) -> tuple[jax.Array | None, dict]:
        fmap, inter = self.features(x, train)
        pooled = inter["pooled"] = jnp.mean(fmap, axis=(1, 2))
        if self.num_classes is None:
            return None, inter
        return self.head(pooled, train), inter
