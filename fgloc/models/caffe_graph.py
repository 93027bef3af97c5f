"""A Caffe network as a Flax Linen module, driven by the layer list of a deploy prototxt.

``CaffeGraph(spec)`` runs the layers of a :class:`NetSpec` in prototxt order, reading and
writing named blobs as Caffe does (in-place layers such as ``ReLU`` overwrite their blob).
``weights_conversion/caffe.py`` builds the spec from a prototxt (``net_spec``) and the
variables from a ``.caffemodel`` (``convert_caffe``); this file has no protobuf dependency.

Layout: blobs are NHWC inside the module (Caffe is NCHW); 2-D blobs (after ``InnerProduct``)
are ``(B, D)``. Caffe axis arguments (``Concat``, ``Softmax``) are mapped to NHWC axes.
``InnerProduct`` and ``Flatten`` flatten in Caffe's NCHW order (the input is transposed to
NCHW first), so Caffe's fully connected weights work unchanged (only transposed).

Layer semantics follow BVLC Caffe:

* Convolution: ``y = W * x + b`` with pad, stride, kernel, dilation, group, bias_term;
  kernel ``(kh, kw, C_in / group, C_out)`` (HWIO), bias ``(C_out,)``.
* Pooling: MAX / AVE with Caffe's output size
  ``out = ceil((H + 2p - k) / s) + 1`` (``round_mode: FLOOR`` uses floor), minus one when
  padding is set and the last window would start at or past ``H + p``. AVE divides by the
  window size clipped to the padded image ``[-p, H + p)`` (padding counts, the ceil-mode
  overhang does not); MAX ignores padding. ``global_pooling`` pools all of ``H × W``.
* LRN (ACROSS_CHANNELS): ``y_c = x_c · (k + α/n · Σ_{c' ∈ window(c)} x_{c'}²)^(−β)`` with a
  centred window of ``n = local_size`` channels (Caffe divides α by n).
* InnerProduct: ``y = flatten_NCHW(x) · W + b``, kernel ``(D_in, D_out)``.
* ReLU (with ``negative_slope``), Sigmoid, TanH, Dropout (identity unless ``train``),
  Softmax (over the channel axis), Concat, Eltwise (SUM with coeff / PROD / MAX), Split,
  Flatten.

Model contract (DEVELOPING.md, as far as it fits a generic graph)::

    out, inter = model.apply(variables, x)            # x: (B, H, W, C) preprocessed
    fmap, inter = model.apply(variables, x, method=model.features)

``inter`` maps every Caffe blob name (``data``, ``conv5_3``, ``inception_4e/output``,
``CAM_conv``, ``CAM_pool``, ``CAM_fc``, ``prob``) to its value after the forward pass, like
pycaffe's ``net.blobs``. ``out`` is ``inter[output]`` (default: the last blob no layer consumes,
e.g. ``prob``). Parameters live in ``variables["params"][param_name(layer)]`` with
``kernel`` / ``bias``; ``param_name`` replaces ``/`` in Caffe layer names with ``__`` so that
'/'-joined checkpoint keys stay unambiguous.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

#: Layer types CaffeGraph can run (Caffe's type strings).
SUPPORTED_TYPES = (
    "Convolution",
    "Pooling",
    "LRN",
    "InnerProduct",
    "ReLU",
    "Sigmoid",
    "TanH",
    "Dropout",
    "Softmax",
    "Concat",
    "Eltwise",
    "Split",
    "Flatten",
)


def param_name(layer_name: str) -> str:
    """Flax parameter-collection name of a Caffe layer: ``/`` becomes ``__``."""
    return layer_name.replace("/", "__")


def _freeze(value: Any) -> Any:
    if isinstance(value, list | tuple):
        return tuple(_freeze(v) for v in value)
    return value


@dataclasses.dataclass(frozen=True)
class LayerSpec:
    """One Caffe layer: type string, bottom / top blob names and normalised parameters.

    ``params`` is a sorted tuple of ``(key, value)`` pairs (hashable); read it with
    :meth:`get`. Keys per type are documented in ``weights_conversion/caffe.py:net_spec``.
    """

    name: str
    type: str
    bottoms: tuple[str, ...]
    tops: tuple[str, ...]
    params: tuple[tuple[str, Any], ...] = ()

    @classmethod
    def make(
        cls,
        name: str,
        type: str,
        bottoms: Sequence[str],
        tops: Sequence[str],
        params: Mapping[str, Any] | None = None,
    ) -> LayerSpec:
        items = tuple(sorted((k, _freeze(v)) for k, v in (params or {}).items()))
        return cls(name, type, tuple(bottoms), tuple(tops), items)

    def get(self, key: str, default: Any = None) -> Any:
        for k, v in self.params:
            if k == key:
                return v
        return default

    @property
    def param_name(self) -> str:
        return param_name(self.name)

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "type": self.type,
            "bottoms": list(self.bottoms),
            "tops": list(self.tops),
            "params": {k: list(v) if isinstance(v, tuple) else v for k, v in self.params},
        }


@dataclasses.dataclass(frozen=True)
class NetSpec:
    """A Caffe net: named input blobs with NCHW shapes and the layers in prototxt order."""

    name: str
    inputs: tuple[tuple[str, tuple[int, ...]], ...]
    layers: tuple[LayerSpec, ...]

    def __post_init__(self) -> None:
        known = {blob for blob, _ in self.inputs}
        seen_params: dict[str, str] = {}
        for layer in self.layers:
            if layer.type not in SUPPORTED_TYPES:
                raise ValueError(
                    f"Caffe layer {layer.name!r} has type {layer.type!r}, which CaffeGraph does "
                    f"not support (supported: {', '.join(SUPPORTED_TYPES)})"
                )
            for bottom in layer.bottoms:
                if bottom not in known:
                    raise ValueError(
                        f"Caffe layer {layer.name!r} reads blob {bottom!r}, which no earlier "
                        "layer or net input produces"
                    )
            if not layer.tops:
                raise ValueError(f"Caffe layer {layer.name!r} has no top blob")
            known.update(layer.tops)
            other = seen_params.setdefault(layer.param_name, layer.name)
            if other != layer.name:
                raise ValueError(
                    f"Caffe layers {other!r} and {layer.name!r} map to the same parameter name "
                    f"{layer.param_name!r}"
                )

    @property
    def outputs(self) -> tuple[str, ...]:
        """Blobs that layers produce but no later layer reads (Caffe's net outputs)."""
        consumed: set[str] = set()
        outs: list[str] = []
        for layer in reversed(self.layers):
            for top in reversed(layer.tops):
                if top not in consumed and top not in outs:
                    outs.append(top)
            consumed.update(layer.bottoms)
        return tuple(reversed(outs))

    @property
    def default_features_blob(self) -> str | None:
        """The bottom of the last Pooling layer (the pre-pool map: ``CAM_conv``, ``conv5``)."""
        pools = [layer for layer in self.layers if layer.type == "Pooling"]
        return pools[-1].bottoms[0] if pools else None

    def layer(self, name: str) -> LayerSpec:
        for layer in self.layers:
            if layer.name == name:
                return layer
        raise KeyError(f"no Caffe layer named {name!r} in net {self.name!r}")

    def to_json(self) -> str:
        return json.dumps(
            {
                "name": self.name,
                "inputs": [[blob, list(shape)] for blob, shape in self.inputs],
                "layers": [layer.to_dict() for layer in self.layers],
            },
            indent=1,
        )

    @classmethod
    def from_json(cls, text: str | Mapping[str, Any]) -> NetSpec:
        data = json.loads(text) if isinstance(text, str) else text
        return cls(
            name=data["name"],
            inputs=tuple((blob, tuple(shape)) for blob, shape in data["inputs"]),
            layers=tuple(
                LayerSpec.make(d["name"], d["type"], d["bottoms"], d["tops"], d["params"])
                for d in data["layers"]
            ),
        )


def caffe_pool_output_size(
    size: int, kernel: int, stride: int, pad: int, *, ceil_mode: bool = True, any_pad: bool
) -> int:
    """Caffe's pooled output length along one axis.

    ``ceil((size + 2·pad − kernel) / stride) + 1`` (floor when ``ceil_mode`` is False); when
    the layer has any padding (``any_pad``, either axis) and the last window would start at or
    past ``size + pad``, that window is dropped (Caffe's clipping rule).
    """
    span = size + 2 * pad - kernel
    if span < 0:
        raise ValueError(
            f"pooling kernel {kernel} is larger than the padded input {size + 2 * pad}"
        )
    out = (-(-span // stride) if ceil_mode else span // stride) + 1
    if any_pad and (out - 1) * stride >= size + pad:
        out -= 1
    return out


def _nhwc_axis(caffe_axis: int, rank: int, layer: str) -> int:
    axis = caffe_axis + rank if caffe_axis < 0 else caffe_axis
    mapping = {4: (0, 3, 1, 2), 2: (0, 1)}.get(rank)
    if mapping is None or not 0 <= axis < rank:
        raise ValueError(f"Caffe layer {layer!r}: axis {caffe_axis} invalid for a {rank}-D blob")
    return mapping[axis]


def _to_nchw_flat(x: jax.Array) -> jax.Array:
    """(B, H, W, C) -> (B, C·H·W) in Caffe's NCHW order; (B, D) unchanged."""
    if x.ndim == 4:
        x = jnp.transpose(x, (0, 3, 1, 2))
    return x.reshape(x.shape[0], -1)


def _pool(x: jax.Array, layer: LayerSpec) -> jax.Array:
    if x.ndim != 4:
        raise ValueError(f"Caffe Pooling layer {layer.name!r} needs a 4-D blob, got {x.shape}")
    _, h, w, _ = x.shape
    if layer.get("global_pooling", False):
        (kh, kw), (sh, sw), (ph, pw) = (h, w), (1, 1), (0, 0)
    else:
        (kh, kw), (sh, sw), (ph, pw) = layer.get("kernel"), layer.get("stride"), layer.get("pad")
    ceil_mode = layer.get("ceil_mode", True)
    any_pad = ph > 0 or pw > 0
    try:
        oh = caffe_pool_output_size(h, kh, sh, ph, ceil_mode=ceil_mode, any_pad=any_pad)
        ow = caffe_pool_output_size(w, kw, sw, pw, ceil_mode=ceil_mode, any_pad=any_pad)
    except ValueError as err:
        raise ValueError(f"Caffe Pooling layer {layer.name!r}: {err}") from None
    # Extra high-side padding so that exactly (out - 1) * stride + kernel cells are covered.
    hi_h = (oh - 1) * sh + kh - h - ph
    hi_w = (ow - 1) * sw + kw - w - pw
    if hi_h < 0:
        x, hi_h = x[:, : h + hi_h], 0
    if hi_w < 0:
        x, hi_w = x[:, :, : w + hi_w], 0
    window, strides = (1, kh, kw, 1), (1, sh, sw, 1)
    padding = ((0, 0), (ph, hi_h), (pw, hi_w), (0, 0))
    method = layer.get("pool", "MAX")
    if method == "MAX":
        return lax.reduce_window(x, -jnp.inf, lax.max, window, strides, padding)
    if method == "AVE":
        summed = lax.reduce_window(x, 0.0, lax.add, window, strides, padding)

        def counts(n_out: int, size: int, k: int, s: int, p: int) -> np.ndarray:
            start = np.arange(n_out) * s - p
            return (np.minimum(start + k, size + p) - start).astype(np.float32)

        div = np.outer(counts(oh, h, kh, sh, ph), counts(ow, w, kw, sw, pw))
        return summed / jnp.asarray(div)[None, :, :, None]
    raise ValueError(f"Caffe Pooling layer {layer.name!r}: pool method {method!r} not supported")


def _lrn(x: jax.Array, layer: LayerSpec) -> jax.Array:
    if x.ndim != 4:
        raise ValueError(f"Caffe LRN layer {layer.name!r} needs a 4-D blob, got {x.shape}")
    n = layer.get("local_size", 5)
    alpha, beta, k = layer.get("alpha", 1.0), layer.get("beta", 0.75), layer.get("k", 1.0)
    pre = (n - 1) // 2
    window_sum = lax.reduce_window(
        x * x,
        0.0,
        lax.add,
        (1, 1, 1, n),
        (1, 1, 1, 1),
        ((0, 0), (0, 0), (0, 0), (pre, n - 1 - pre)),
    )
    return x * (k + (alpha / n) * window_sum) ** (-beta)


class CaffeGraph(nn.Module):
    """Runs a :class:`NetSpec`; see the module docstring for layouts and names.

    Attributes:
      spec: the net (from ``weights_conversion.caffe.net_spec``).
      output: blob returned as the first result (default: the last of ``spec.outputs``).
      features_blob: blob :meth:`features` returns (default ``spec.default_features_blob``).
    """

    spec: NetSpec
    output: str | None = None
    features_blob: str | None = None

    def __call__(self, x: jax.Array, train: bool = False) -> tuple[jax.Array, dict[str, jax.Array]]:
        """x: (B, H, W, C) preprocessed input -> (blob ``output``, all blobs by Caffe name).

        ``train=True`` only switches Dropout on (pass ``rngs={"dropout": key}`` to apply).
        """
        out_name = self.output or self.spec.outputs[-1]
        inter = self.run(x, train=train)
        if out_name not in inter:
            raise KeyError(f"output blob {out_name!r} is not produced by net {self.spec.name!r}")
        return inter[out_name], inter

    def features(
        self, x: jax.Array, train: bool = False, stop_at: str | None = None
    ) -> tuple[jax.Array, dict[str, jax.Array]]:
        """Runs only up to blob ``stop_at`` (default ``features_blob``, after its in-place
        layers); returns (map, blobs). The model contract of `fgloc.models.layers`."""
        name = stop_at or self.features_blob or self.spec.default_features_blob
        if name is None:
            raise ValueError(f"net {self.spec.name!r} has no Pooling layer; set features_blob")
        inter = self.run(x, train=train, until=name)
        return inter[name], inter

    @nn.compact
    def run(
        self, x: jax.Array, train: bool = False, until: str | None = None
    ) -> dict[str, jax.Array]:
        """Forward pass; returns every blob (NHWC or (B, D)) keyed by Caffe name.

        ``until``: stop after the last layer that writes this blob (e.g. ``CAM_conv`` after
        ``CAM_relu``), skipping the rest of the net.
        """
        if len(self.spec.inputs) != 1:
            raise ValueError(
                f"net {self.spec.name!r} has {len(self.spec.inputs)} inputs; CaffeGraph takes one"
            )
        in_name, in_shape = self.spec.inputs[0]
        if x.ndim != 4 or x.shape[-1] != in_shape[1]:
            raise ValueError(
                f"net {self.spec.name!r} expects input blob {in_name!r} as (B, H, W, "
                f"{in_shape[1]}) NHWC, got shape {x.shape}"
            )
        layers = self.spec.layers
        if until is not None:
            writers = [i for i, layer in enumerate(layers) if until in layer.tops]
            if not writers and until != in_name:
                raise KeyError(f"no layer of net {self.spec.name!r} writes blob {until!r}")
            layers = layers[: writers[-1] + 1] if writers else ()
        blobs: dict[str, jax.Array] = {in_name: jnp.asarray(x, jnp.float32)}
        for layer in layers:
            bottoms = [blobs[b] for b in layer.bottoms]
            outs = self._layer(layer, bottoms, train)
            for top, value in zip(layer.tops, outs, strict=True):
                blobs[top] = value
        return blobs

    def _layer(self, layer: LayerSpec, xs: list[jax.Array], train: bool) -> list[jax.Array]:
        t, x = layer.type, xs[0]
        if t == "Convolution":
            if x.ndim != 4:
                raise ValueError(f"Caffe Convolution layer {layer.name!r} needs a 4-D blob")
            (ph, pw) = layer.get("pad")
            conv = nn.Conv(
                features=layer.get("num_output"),
                kernel_size=layer.get("kernel"),
                strides=layer.get("stride"),
                padding=((ph, ph), (pw, pw)),
                kernel_dilation=layer.get("dilation"),
                feature_group_count=layer.get("group"),
                use_bias=layer.get("bias_term"),
                name=layer.param_name,
            )
            return [conv(x)]
        if t == "InnerProduct":
            dense = nn.Dense(
                features=layer.get("num_output"),
                use_bias=layer.get("bias_term"),
                name=layer.param_name,
            )
            return [dense(_to_nchw_flat(x))]
        if t == "Pooling":
            return [_pool(x, layer)]
        if t == "LRN":
            return [_lrn(x, layer)]
        if t == "ReLU":
            slope = layer.get("negative_slope", 0.0)
            return [jnp.where(x > 0, x, slope * x) if slope else jax.nn.relu(x)]
        if t == "Sigmoid":
            return [jax.nn.sigmoid(x)]
        if t == "TanH":
            return [jnp.tanh(x)]
        if t == "Dropout":
            return [nn.Dropout(rate=layer.get("ratio", 0.5))(x, deterministic=not train)]
        if t == "Softmax":
            return [jax.nn.softmax(x, axis=_nhwc_axis(layer.get("axis", 1), x.ndim, layer.name))]
        if t == "Concat":
            ranks = {v.ndim for v in xs}
            if len(ranks) != 1:
                raise ValueError(f"Caffe Concat layer {layer.name!r} mixes blob ranks {ranks}")
            axis = _nhwc_axis(layer.get("axis", 1), x.ndim, layer.name)
            return [jnp.concatenate(xs, axis=axis)]
        if t == "Eltwise":
            op = layer.get("operation", "SUM")
            if op == "SUM":
                coeff = layer.get("coeff") or (1.0,) * len(xs)
                return [sum((c * v for c, v in zip(coeff, xs, strict=True)), jnp.zeros_like(x))]
            if op == "PROD":
                return [math.prod(xs[1:], start=x)]
            return [jnp.stack(xs).max(axis=0)]
        if t == "Split":
            return [x] * len(layer.tops)
        if t == "Flatten":
            if (layer.get("axis", 1), layer.get("end_axis", -1)) != (1, -1):
                raise ValueError(
                    f"Caffe Flatten layer {layer.name!r}: only axis=1, end_axis=-1 is supported"
                )
            return [_to_nchw_flat(x)]
        raise ValueError(f"Caffe layer {layer.name!r}: unsupported type {t!r}")
