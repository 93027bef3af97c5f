"""EfficientNet-Lite (Tan & Le 2019; TF-Lite variant) in Flax Linen.

Architecture (FACTS.md, checked against the PyPI ``efficientnet-lite-pytorch`` reference):
ReLU6 after stem, expand, depthwise and head convolutions, none after the projection; no
squeeze-excite; stem (32) and head (1280) widths are not scaled; TF "SAME" padding; BatchNorm
eps 1e-3. Blocks ``(repeats, kernel, stride, expand, out)``::

    (1,3,1,1,16) (2,3,2,6,24) (2,5,2,6,40) (3,3,2,6,80) (3,5,1,6,112) (4,5,2,6,192) (1,3,1,6,320)

stride on a stage's first repeat only, residual when stride 1 and in == out, block 0 without
expansion. For Lite1..4 the inner stages' repeats scale by ``ceil(depth_coefficient * r)`` and
widths by ``width_coefficient`` (rounded to multiples of 8), the first and last stage keep their
repeats. Input: RGB ``(x - 127) / 128``.

The network is natively GAP + linear, so class activation maps (Zhou et al. 2016) apply
directly to ``inter["pre_pool"]`` with the ``classifier`` kernel.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

Array = jax.Array

# (repeats, kernel, stride, expand_ratio, out_channels)
BLOCKS = ((1, 3, 1, 1, 16), (2, 3, 2, 6, 24), (2, 5, 2, 6, 40), (3, 3, 2, 6, 80),
          (3, 5, 1, 6, 112), (4, 5, 2, 6, 192), (1, 3, 1, 6, 320))  # fmt: skip

# variant -> (width_coefficient, depth_coefficient, resolution, dropout)
VARIANTS = {
    "lite0": (1.0, 1.0, 224, 0.2),
    "lite1": (1.0, 1.1, 240, 0.2),
    "lite2": (1.1, 1.2, 260, 0.3),
    "lite3": (1.2, 1.4, 280, 0.3),
    "lite4": (1.4, 1.8, 300, 0.3),
}


def round_filters(filters: int, width: float, divisor: int = 8) -> int:
    """Width scaling as in the TF reference: nearest multiple of 8, at most 10% below."""
    if width == 1.0:
        return filters
    scaled = filters * width
    new = max(divisor, int(scaled + divisor / 2) // divisor * divisor)
    if new < 0.9 * scaled:
        new += divisor
    return int(new)


def block_specs(variant: str) -> list[tuple[int, int, int, int, int, int]]:
    """Per-block ``(stage, kernel, stride, expand, in_ch, out_ch)`` for a variant."""
    width, depth, _, _ = VARIANTS[variant]
    specs = []
    in_ch = 32
    for s, (r, k, stride, e, out) in enumerate(BLOCKS):
        out_ch = round_filters(out, width)
        repeats = r if s in (0, len(BLOCKS) - 1) else int(math.ceil(depth * r))
        for i in range(repeats):
            specs.append((s + 1, k, stride if i == 0 else 1, e, in_ch, out_ch))
            in_ch = out_ch
    return specs


def relu6(x: Array) -> Array:
    return jnp.clip(x, 0.0, 6.0)


def same_pads(size: int, kernel: int, stride: int) -> tuple[int, int]:
    """TF "SAME" padding ``(before, after)`` of one spatial axis."""
    out = -(-size // stride)
    total = max((out - 1) * stride + kernel - size, 0)
    return total // 2, total - total // 2


def _depthwise_forward(x: Array, kernel: Array, stride: int) -> Array:
    """The forward sum of ``k*k`` shifted (strided) slices; see `depthwise_conv_slices`."""
    k = kernel.shape[0]
    _, h, w, _ = x.shape
    out_h, out_w = -(-h // stride), -(-w // stride)
    pads = (same_pads(h, k, stride), same_pads(w, k, stride))
    xp = jnp.pad(x, ((0, 0), *pads, (0, 0)))
    out = None
    for dy in range(k):
        for dx in range(k):
            tap = xp[
                :,
                dy : dy + (out_h - 1) * stride + 1 : stride,
                dx : dx + (out_w - 1) * stride + 1 : stride,
                :,
            ]
            term = tap * kernel[dy, dx, 0][None, None, None, :]
            out = term if out is None else out + term
    assert out is not None
    return out


def depthwise_input_grad(ct: Array, kernel: Array, stride: int, in_hw: tuple[int, int]) -> Array:
    """Input gradient of `depthwise_conv_slices`, itself a sum of shifted slices (polyphase).

    With padded input index ``i = q*s + r``, ``dx_p[i] = Σ_j ct[q - j] · w[r + j*s]``: each of
    the ``s*s`` phases ``(r_y, r_x)`` is a stride-1 correlation of the cotangent with the
    sub-kernel ``w[r_y::s, r_x::s]``; the phases are interleaved and the padding cropped. No
    multiplication by a dilation zero, no scatter. Autodiff of the forward slices instead pads
    every tap's cotangent back to full size and sums ``k*k`` such tensors; with this VJP a
    batch-16 Lite0 sensitivity map went from 3.19 s to 1.35 s on the 2-core CPU (BENCHMARKS.md,
    ``experiments/benchmark_peers.py``). ``tests/test_efficientnet_lite.py`` checks both agree.
    """
    k, s = kernel.shape[0], stride
    h, w = in_hw
    b, oh, ow, c = ct.shape
    pt, pl = same_pads(h, k, s)[0], same_pads(w, k, s)[0]
    qh, qw = -(-(h + pt) // s), -(-(w + pl) // s)  # phase rows / cols covering [0, pt + h)
    jmax = -(-k // s)  # taps per phase along one axis, at most
    ctp = jnp.pad(ct, ((0, 0), (jmax - 1, max(qh - oh, 0)), (jmax - 1, max(qw - ow, 0)), (0, 0)))
    rows = []
    for ry in range(s):
        cols = []
        for rx in range(s):
            acc = jnp.zeros((b, qh, qw, c), ct.dtype)
            for jy in range(-(-(k - ry) // s)):
                for jx in range(-(-(k - rx) // s)):
                    tap = ctp[
                        :, jmax - 1 - jy : jmax - 1 - jy + qh, jmax - 1 - jx : jmax - 1 - jx + qw
                    ]
                    acc = acc + tap * kernel[ry + jy * s, rx + jx * s, 0][None, None, None, :]
            cols.append(acc)
        rows.append(jnp.stack(cols, axis=3))  # (B, qh, qw, s, C)
    full = jnp.stack(rows, axis=2).reshape(b, qh * s, qw * s, c)  # (B, qh, s, qw, s, C)
    return full[:, pt : pt + h, pl : pl + w, :]


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _depthwise_slices(x: Array, kernel: Array, stride: int) -> Array:
    return _depthwise_forward(x, kernel, stride)


def _depthwise_fwd(x, kernel, stride):
    return _depthwise_forward(x, kernel, stride), (x, kernel)


def _depthwise_bwd(stride, res, ct):
    x, kernel = res
    dx = depthwise_input_grad(ct, kernel, stride, x.shape[1:3])
    # The kernel gradient Σ tap · ct is what autodiff gives; unused (and removed by XLA) when
    # only the input gradient is asked for.
    (dk,) = jax.vjp(lambda kk: _depthwise_forward(x, kk, stride), kernel)[1](ct)
    return dx, dk


_depthwise_slices.defvjp(_depthwise_fwd, _depthwise_bwd)


def depthwise_conv_slices(x: Array, kernel: Array, stride: int) -> Array:
    """Depthwise convolution with TF "SAME" padding as a sum of ``k*k`` shifted slices.

    ``x`` ``(B, H, W, C)``, ``kernel`` ``(k, k, 1, C)`` (the layout of a Flax depthwise
    ``nn.Conv``). Mathematically identical to ``lax.conv_general_dilated`` with
    ``feature_group_count=C``; on XLA:CPU it is several times faster, forward and backward,
    because XLA:CPU lowers grouped convolutions to a slow generic loop (BENCHMARKS.md). Its
    input gradient is `depthwise_input_grad` (a ``custom_vjp``); the kernel gradient is
    autodiff's. Forward-mode differentiation is not defined (``custom_vjp``).
    """
    return _depthwise_slices(x, kernel, int(stride))


def _use_slices(impl: str) -> bool:
    if impl not in ("auto", "slices", "conv"):
        raise ValueError(f"depthwise must be 'auto', 'slices' or 'conv', got {impl!r}")
    return impl == "slices" or (impl == "auto" and jax.default_backend() == "cpu")


class DepthwiseConv(nn.Module):
    """Depthwise ``k x k`` convolution, TF "SAME" padding, no bias; parameter ``kernel``
    ``(k, k, 1, C)`` exactly as a Flax ``nn.Conv(C, (k, k), feature_group_count=C)``.

    ``impl``: ``"conv"`` (grouped ``lax.conv``), ``"slices"`` (:func:`depthwise_conv_slices`)
    or ``"auto"`` (slices on the CPU backend, where they are faster; conv elsewhere).
    """

    kernel_size: int
    stride: int = 1
    impl: str = "auto"

    @nn.compact
    def __call__(self, x: Array) -> Array:
        c = x.shape[-1]
        kernel = self.param(
            "kernel", nn.initializers.lecun_normal(), (self.kernel_size, self.kernel_size, 1, c)
        )
        kernel = jnp.asarray(kernel, x.dtype)
        if _use_slices(self.impl):
            return depthwise_conv_slices(x, kernel, self.stride)
        k, s = self.kernel_size, self.stride
        return jax.lax.conv_general_dilated(
            x,
            kernel,
            (s, s),
            (same_pads(x.shape[1], k, s), same_pads(x.shape[2], k, s)),
            dimension_numbers=("NHWC", "HWIO", "NHWC"),
            feature_group_count=c,
        )


class MBConv(nn.Module):
    """Mobile inverted bottleneck without squeeze-excite (EfficientNet-Lite)."""

    kernel: int
    stride: int
    expand: int
    in_ch: int
    out_ch: int
    depthwise: str = "auto"

    @nn.compact
    def __call__(self, x: Array, train: bool = False) -> Array:
        bn = lambda name: nn.BatchNorm(  # noqa: E731
            use_running_average=not train, momentum=0.99, epsilon=1e-3, name=name
        )
        h = x
        mid = self.in_ch * self.expand
        if self.expand != 1:
            h = nn.Conv(mid, (1, 1), use_bias=False, name="expand_conv")(h)
            h = relu6(bn("bn0")(h))
        h = DepthwiseConv(self.kernel, self.stride, self.depthwise, name="depthwise_conv")(h)
        h = relu6(bn("bn1")(h))
        h = nn.Conv(self.out_ch, (1, 1), use_bias=False, name="project_conv")(h)
        h = bn("bn2")(h)
        if self.stride == 1 and self.in_ch == self.out_ch:
            h = h + x
        return h


class EfficientNetLite(nn.Module):
    """EfficientNet-Lite0..4.

    ``__call__(x)`` with ``x`` of shape ``(B, H, W, 3)``, already normalised (see
    :data:`MEAN` / :data:`STD`), returns ``(logits (B, num_classes), inter)`` where ``inter``
    holds ``stem``, ``block0``..``blockN``, ``stage1``..``stage7`` (each stage's last block),
    ``pre_pool`` ``(B, H/32, W/32, 1280)`` and ``pooled`` ``(B, 1280)``.

    ``depthwise`` picks the depthwise-convolution implementation (:class:`DepthwiseConv`);
    parameters are the same for every choice.
    """

    variant: str = "lite0"
    num_classes: int = 1000
    dropout_rate: float | None = None
    depthwise: str = "auto"

    def setup(self):
        if self.variant not in VARIANTS:
            raise ValueError(f"variant must be one of {sorted(VARIANTS)}, got {self.variant!r}")
        self.specs = block_specs(self.variant)
        self.stem_conv = nn.Conv(32, (3, 3), strides=2, padding="SAME", use_bias=False)
        self.stem_bn = nn.BatchNorm(momentum=0.99, epsilon=1e-3)
        self.blocks = [MBConv(k, s, e, i, o, self.depthwise) for (_, k, s, e, i, o) in self.specs]
        self.head_conv = nn.Conv(1280, (1, 1), use_bias=False)
        self.head_bn = nn.BatchNorm(momentum=0.99, epsilon=1e-3)
        rate = VARIANTS[self.variant][3] if self.dropout_rate is None else self.dropout_rate
        self.dropout = nn.Dropout(rate)
        self.classifier = nn.Dense(self.num_classes)

    def layer_names(self) -> list[str]:
        """Every name `features` records, in order (``stage{k}`` follows its last block)."""
        names = ["stem"]
        for i, spec in enumerate(self.specs):
            names.append(f"block{i}")
            if i + 1 == len(self.specs) or self.specs[i + 1][0] != spec[0]:
                names.append(f"stage{spec[0]}")
        return [*names, "pre_pool"]

    def features(
        self,
        x: Array,
        train: bool = False,
        stop_at: str | None = None,
        start_at: str | None = None,
    ) -> tuple[Array, dict[str, Array]]:
        """Convolutional trunk: ``(B,H,W,3)`` -> ``(pre_pool (B,h,w,1280), inter)``.

        ``stop_at``: a layer name (``stem``, ``block0``…``block15``, ``stage1``…``stage7``,
        ``pre_pool``) to stop after (model contract, `fgloc.models.layers.layer_output`).
        ``start_at``: a layer name whose *output* ``x`` is (e.g. cached ``stage6`` maps); the
        trunk resumes right after that layer, so the late stages can be trained from cached
        early features. ``inter`` then holds ``start_at`` (= ``x``) and the layers computed.
        """
        names = self.layer_names()
        for arg, name in (("stop_at", stop_at), ("start_at", start_at)):
            if name is not None and name not in names:
                raise KeyError(
                    f"EfficientNet-Lite has no layer {name!r} ({arg}); its layers: {names}"
                )
        if start_at and stop_at and names.index(stop_at) < names.index(start_at):
            raise ValueError(f"stop_at {stop_at!r} comes before start_at {start_at!r}")
        inter: dict[str, Array] = {}
        if start_at is None:
            h = relu6(self.stem_bn(self.stem_conv(x), use_running_average=not train))
            inter["stem"] = h
            first = 0
        else:
            h = inter[start_at] = x
            if start_at == "pre_pool" or stop_at == start_at:
                return h, inter
            first = self._first_block_after(start_at)
        if stop_at == "stem":
            return h, inter
        for i, (blk, spec) in enumerate(zip(self.blocks, self.specs, strict=True)):
            if i < first:
                continue
            h = blk(h, train=train)
            inter[f"block{i}"] = h
            last_of_stage = i + 1 == len(self.specs) or self.specs[i + 1][0] != spec[0]
            if last_of_stage:
                inter[f"stage{spec[0]}"] = h
            if stop_at in (f"block{i}", f"stage{spec[0]}") and stop_at in inter:
                return h, inter
        h = relu6(self.head_bn(self.head_conv(h), use_running_average=not train))
        inter["pre_pool"] = h
        return h, inter

    def _first_block_after(self, name: str) -> int:
        """Index of the first block run after layer ``name`` (``stem``, ``block{i}``,
        ``stage{k}``)."""
        if name == "stem":
            return 0
        if name.startswith("block"):
            return int(name[5:]) + 1
        stage = int(name[5:])
        return max(i for i, spec in enumerate(self.specs) if spec[0] == stage) + 1

    def head(self, pooled: Array, train: bool = False) -> Array:
        """Classifier on pooled features ``(B, 1280)`` -> logits ``(B, num_classes)``."""
        return self.classifier(self.dropout(pooled, deterministic=not train))

    def __call__(self, x: Array, train: bool = False) -> tuple[Array, dict[str, Array]]:
        fmap, inter = self.features(x, train=train)
        pooled = jnp.mean(fmap, axis=(1, 2))
        inter["pooled"] = pooled
        logits = self.head(pooled, train=train)
        inter["logits"] = logits
        return logits, inter


MEAN = (127.0, 127.0, 127.0)
STD = (128.0, 128.0, 128.0)


def preprocess(images: Any) -> Array:
    """Raw RGB pixels in [0, 255] (uint8 or float, any leading shape) -> ``(x - 127) / 128``."""
    x = jnp.asarray(images, dtype=jnp.float32)
    return (x - 127.0) / 128.0
