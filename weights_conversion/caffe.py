"""Caffe ``.caffemodel`` + deploy ``.prototxt`` -> :class:`fgloc.models.caffe_graph.CaffeGraph`.

For the CAM authors' released models (GoogLeNet-CAM, VGG16-CAM, AlexNet-CAM) and classic
CaffeNet / AlexNet / VGG16 / GoogLeNet files. Reads both protobuf files with the schema in
``caffe.proto`` (``caffe_pb2`` builds it at import time; no Caffe and no protoc needed); both
layer formats (``layer { type: "Convolution" }`` and the older V1 ``layers { type: CONVOLUTION
}``) and both blob formats (``shape { dim }`` and legacy ``num/channels/height/width``) work.

Blob mapping (checked per layer; errors name the layer and blob):

* Convolution ``(O, I/g, kh, kw)`` -> ``params/<layer>/kernel`` ``(kh, kw, I/g, O)``, bias
  ``(O,)``; InnerProduct ``(out, in)`` (``(in, out)`` when ``transpose: true``) ->
  ``kernel (in, out)``; ``<layer>`` is the Caffe name with ``/`` -> ``__``.
* Legacy 4-D blobs such as ``(1, 1, out, in)`` are accepted where the trailing dims match.

Preprocessing (Caffe ImageNet models): input is BGR, 0-255 range, minus the mean pixel
``(B, G, R) = (104, 117, 123)`` (or a mean ``.binaryproto``), no scaling. With
``rgb_input=True`` (default) the input-channel axis of every Convolution reading the input
blob is reversed, so the Flax model takes **RGB** ``x = rgb_0_255 − (123, 117, 104)``: the
same numbers as Caffe on the BGR image. ``preprocess_info`` records this; use
:func:`fgloc.weights.caffe_npz.make_preprocess` to get the function.

Command line (the ``fgloc convert --from caffe`` entry calls :func:`main_convert`)::

    python -m weights_conversion.caffe deploy.prototxt net.caffemodel out.npz
        [--mean-file mean.binaryproto] [--bgr] [--allow-unused] [--train-val]

writes ``out.npz`` ('/'-joined variables) and ``out.json`` (net spec + preprocessing); load
both with :func:`fgloc.weights.caffe_npz.load_converted`.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from google.protobuf import text_format
from google.protobuf.message import DecodeError

from fgloc.models.caffe_graph import SUPPORTED_TYPES, CaffeGraph, LayerSpec, NetSpec
from fgloc.weights.caffe_npz import (
    SIDECAR_FORMAT,
    sidecar_path,
    template_variables,
)
from fgloc.weights.io import (
    ConversionError,
    conv_oihw_to_hwio,
    dense_oi_to_io,
    flatten,
    strict_merge,
)
from weights_conversion import caffe_pb2

PathLike = str | os.PathLike
#: ILSVRC-2012 mean pixel used by the BVLC / CAM deploy scripts, in Caffe's BGR order.
IMAGENET_MEAN_BGR = (104.0, 117.0, 123.0)

# V1 enum names -> V2 type strings (only the ones whose spelling differs from title case).
_V1_TYPES = {
    "CONVOLUTION": "Convolution",
    "POOLING": "Pooling",
    "LRN": "LRN",
    "INNER_PRODUCT": "InnerProduct",
    "RELU": "ReLU",
    "SIGMOID": "Sigmoid",
    "TANH": "TanH",
    "DROPOUT": "Dropout",
    "SOFTMAX": "Softmax",
    "SOFTMAX_LOSS": "SoftmaxWithLoss",
    "CONCAT": "Concat",
    "ELTWISE": "Eltwise",
    "SPLIT": "Split",
    "FLATTEN": "Flatten",
    "DATA": "Data",
    "IMAGE_DATA": "ImageData",
    "HDF5_DATA": "HDF5Data",
    "MEMORY_DATA": "MemoryData",
    "WINDOW_DATA": "WindowData",
    "DUMMY_DATA": "DummyData",
    "ACCURACY": "Accuracy",
    "EUCLIDEAN_LOSS": "EuclideanLoss",
    "SILENCE": "Silence",
}
#: Layer types that feed images in a train_val net (replaced by an input blob).
DATA_TYPES = ("Data", "ImageData", "HDF5Data", "MemoryData", "WindowData", "DummyData")
#: Layer types only a training net runs (dropped with ``from_train_val``).
TRAINING_TYPES = (
    "SoftmaxWithLoss",
    "Accuracy",
    "EuclideanLoss",
    "SigmoidCrossEntropyLoss",
    "HingeLoss",
    "InfogainLoss",
    "MultinomialLogisticLoss",
    "ContrastiveLoss",
    "Silence",
)
_PARAM_LAYERS = ("Convolution", "InnerProduct")


# ----------------------------------------------------------------------------- reading files
def parse_prototxt(path: PathLike) -> Any:
    """Text ``.prototxt`` -> ``caffe_pb2.NetParameter``; syntax errors name the file and line."""
    path = pathlib.Path(path)
    try:
        return text_format.Parse(path.read_text(encoding="utf-8"), caffe_pb2.NetParameter())
    except text_format.ParseError as err:
        raise ConversionError(f"{path}: not a Caffe NetParameter prototxt: {err}") from None


def _read_binary(path: PathLike, message: Any) -> Any:
    path = pathlib.Path(path)
    try:
        message.ParseFromString(path.read_bytes())
    except DecodeError as err:
        raise ConversionError(
            f"{path}: not a binary Caffe {type(message).__name__}: {err}"
        ) from None
    return message


def blob_to_array(blob: Any, where: str) -> np.ndarray:
    """BlobProto -> float32 array shaped by ``shape`` (or legacy ``num/channels/height/width``)."""
    if blob.HasField("shape"):
        shape = tuple(int(d) for d in blob.shape.dim)
    else:
        shape = (blob.num, blob.channels, blob.height, blob.width)
    values = blob.data if len(blob.data) else blob.double_data
    data = np.asarray(values, dtype=np.float32)
    if data.size != int(np.prod(shape)):
        raise ConversionError(
            f"{where}: blob holds {data.size} values but its shape {shape} needs {np.prod(shape)}"
        )
    return data.reshape(shape)


def read_caffemodel(path: PathLike) -> dict[str, list[np.ndarray]]:
    """Binary ``.caffemodel`` -> ``{layer name: [blob arrays]}`` for layers that have blobs.

    Reads the V2 ``layer`` and the V1 ``layers`` fields; arrays are float32 in Caffe's layout
    (conv ``(O, I/g, kh, kw)``, fully connected ``(out, in)``, biases ``(out,)``, or the legacy
    4-D forms). A layer name that appears twice with blobs is an error.
    """
    net = _read_binary(path, caffe_pb2.NetParameter())
    out: dict[str, list[np.ndarray]] = {}
    for layer in [*net.layer, *net.layers]:
        if not len(layer.blobs):
            continue
        if layer.name in out:
            raise ConversionError(f"{path}: layer {layer.name!r} appears twice with blobs")
        out[layer.name] = [
            blob_to_array(b, f"{path}: layer {layer.name!r} blob {i}")
            for i, b in enumerate(layer.blobs)
        ]
    return out


def read_mean_binaryproto(path: PathLike) -> np.ndarray:
    """Caffe mean file (a BlobProto ``(1, C, H, W)``) -> ``(C, H, W)`` float32, Caffe's BGR."""
    arr = blob_to_array(_read_binary(path, caffe_pb2.BlobProto()), str(path))
    if arr.ndim == 4 and arr.shape[0] == 1:
        arr = arr[0]
    if arr.ndim != 3:
        raise ConversionError(f"{path}: mean blob has shape {arr.shape}, expected (1, C, H, W)")
    return arr


# ------------------------------------------------------------------------- prototxt -> spec
def _layer_type(layer: Any) -> str:
    if isinstance(layer.type, str):
        return layer.type
    enum_name = str(caffe_pb2.V1LayerParameter.LayerType.Name(layer.type))
    return _V1_TYPES.get(enum_name, enum_name)


def _meets_rule(rule: Any, phase: int) -> bool:
    """Caffe's NetStateRule test for a net state with ``phase``, level 0 and no stages."""
    if rule.HasField("phase") and rule.phase != phase:
        return False
    if rule.HasField("min_level") and rule.min_level > 0:
        return False
    if rule.HasField("max_level") and rule.max_level < 0:
        return False
    return not len(rule.stage)


def _included(layer: Any, phase: int) -> bool:
    if len(layer.include):
        return any(_meets_rule(r, phase) for r in layer.include)
    return not any(_meets_rule(r, phase) for r in layer.exclude)


def _pair(
    p: Any, field: str, hw: str | None, default: int | None, layer: str, repeated: bool
) -> tuple[int, int]:
    """(h, w) from ``<hw>_h`` / ``<hw>_w`` or ``field`` (repeated: 1 or 2 values; optional)."""
    if hw is not None and (p.HasField(f"{hw}_h") or p.HasField(f"{hw}_w")):
        return int(getattr(p, f"{hw}_h")), int(getattr(p, f"{hw}_w"))
    if repeated:
        values = [int(v) for v in getattr(p, field)]
    else:
        values = [int(getattr(p, field))] if p.HasField(field) else []
    if not values:
        if default is None:
            raise ConversionError(f"Caffe layer {layer!r}: {field} is not set")
        return default, default
    if len(values) == 1:
        return values[0], values[0]
    if len(values) == 2:
        return values[0], values[1]
    raise ConversionError(f"Caffe layer {layer!r}: {field} has {len(values)} values (2-D only)")


def _sub_message(layer: Any, field: str, cls: Any) -> Any:
    """``layer.<field>``, or a default ``cls()`` when the layer format lacks the field."""
    if field in layer.DESCRIPTOR.fields_by_name:
        return getattr(layer, field)
    return cls()


def _layer_params(layer: Any, t: str) -> dict[str, Any]:
    name = layer.name
    if t == "Convolution":
        p = layer.convolution_param
        if p.axis != 1:
            raise ConversionError(f"Caffe layer {name!r}: convolution axis {p.axis} unsupported")
        return {
            "num_output": int(p.num_output),
            "kernel": _pair(p, "kernel_size", "kernel", None, name, repeated=True),
            "stride": _pair(p, "stride", "stride", 1, name, repeated=True),
            "pad": _pair(p, "pad", "pad", 0, name, repeated=True),
            "dilation": _pair(p, "dilation", None, 1, name, repeated=True),
            "group": int(p.group),
            "bias_term": bool(p.bias_term),
        }
    if t == "Pooling":
        p = layer.pooling_param
        method = caffe_pb2.PoolingParameter.PoolMethod.Name(p.pool)
        if method not in ("MAX", "AVE"):
            raise ConversionError(f"Caffe layer {name!r}: pooling method {method} unsupported")
        params: dict[str, Any] = {
            "pool": method,
            "global_pooling": bool(p.global_pooling),
            "ceil_mode": p.round_mode == caffe_pb2.PoolingParameter.CEIL,
            "stride": _pair(p, "stride", "stride", 1, name, repeated=False),
            "pad": _pair(p, "pad", "pad", 0, name, repeated=False),
        }
        if not p.global_pooling:
            params["kernel"] = _pair(p, "kernel_size", "kernel", None, name, repeated=False)
        return params
    if t == "LRN":
        p = layer.lrn_param
        if p.norm_region != caffe_pb2.LRNParameter.ACROSS_CHANNELS:
            raise ConversionError(f"Caffe layer {name!r}: LRN WITHIN_CHANNEL is unsupported")
        if p.local_size % 2 != 1:
            raise ConversionError(f"Caffe layer {name!r}: LRN local_size must be odd")
        return {"local_size": int(p.local_size), "alpha": p.alpha, "beta": p.beta, "k": p.k}
    if t == "InnerProduct":
        p = layer.inner_product_param
        if p.axis != 1:
            raise ConversionError(f"Caffe layer {name!r}: inner product axis {p.axis} unsupported")
        return {
            "num_output": int(p.num_output),
            "bias_term": bool(p.bias_term),
            "transpose": bool(p.transpose),
        }
    if t == "ReLU":
        return {"negative_slope": layer.relu_param.negative_slope}
    if t == "Dropout":
        return {"ratio": layer.dropout_param.dropout_ratio}
    if t == "Softmax":
        return {"axis": int(layer.softmax_param.axis)}
    if t == "Concat":
        p = layer.concat_param
        use_dim = p.HasField("concat_dim") and not p.HasField("axis")
        return {"axis": int(p.concat_dim if use_dim else p.axis)}
    if t == "Eltwise":
        p = layer.eltwise_param
        return {
            "operation": caffe_pb2.EltwiseParameter.EltwiseOp.Name(p.operation),
            "coeff": tuple(float(c) for c in p.coeff),
        }
    if t == "Flatten":  # V1 layers have no flatten_param: Caffe's defaults then
        fp = _sub_message(layer, "flatten_param", caffe_pb2.FlattenParameter)
        return {"axis": int(fp.axis), "end_axis": int(fp.end_axis)}
    return {}


def _data_layers(net: Any, phase: int) -> list[Any]:
    return [
        layer
        for layer in [*net.layer, *net.layers]
        if _included(layer, phase) and _layer_type(layer) in DATA_TYPES
    ]


def train_val_mean_bgr(net: Any, *, phase: int = caffe_pb2.TEST) -> tuple[float, ...] | None:
    """``transform_param.mean_value`` of the ``phase`` data layer of a train_val net, if any."""
    for layer in _data_layers(net, phase):
        values = tuple(float(v) for v in layer.transform_param.mean_value)
        if values:
            return values * 3 if len(values) == 1 else values
    return None


def net_spec(net: Any, *, phase: int = caffe_pb2.TEST, from_train_val: bool = False) -> NetSpec:
    """``NetParameter`` (a deploy prototxt) -> :class:`NetSpec`, keeping ``phase`` layers.

    Inputs come from ``input`` + ``input_dim`` / ``input_shape`` or from ``Input`` layers
    (NCHW shapes). Normalised layer parameters: Convolution ``num_output, kernel, stride, pad,
    dilation`` (each ``(h, w)``), ``group, bias_term``; Pooling ``pool`` (MAX/AVE), ``kernel,
    stride, pad, global_pooling, ceil_mode``; LRN ``local_size, alpha, beta, k``; InnerProduct
    ``num_output, bias_term, transpose``; ReLU ``negative_slope``; Dropout ``ratio``; Softmax
    / Concat ``axis``; Eltwise ``operation, coeff``; Flatten ``axis, end_axis``.

    ``from_train_val=True`` turns a train_val net into its deploy form (the CAM authors ship
    GoogLeNet-CAM for ImageNet with ``train_val_googlenetCAM.prototxt`` only): the ``phase``
    data layer becomes the input ``(1, 3, crop_size, crop_size)``, its other tops (``label``)
    and every loss / accuracy layer are dropped.

    Raises:
      ConversionError: unsupported layer types or parameters, naming the layer.
    """
    inputs: list[tuple[str, tuple[int, ...]]] = []
    dims = [int(d) for d in net.input_dim]
    for i, blob in enumerate(net.input):
        if i < len(net.input_shape):
            shape = tuple(int(d) for d in net.input_shape[i].dim)
        elif len(dims) >= 4 * (i + 1):
            shape = tuple(dims[4 * i : 4 * i + 4])
        else:
            raise ConversionError(f"net {net.name!r}: input {blob!r} has no input_dim/input_shape")
        inputs.append((blob, shape))
    layers: list[LayerSpec] = []
    dropped: set[str] = set()  # blobs that only feed training layers (train_val mode)
    for layer in [*net.layer, *net.layers]:
        if not _included(layer, phase):
            continue
        t = _layer_type(layer)
        if t == "Input":
            shapes = [tuple(int(d) for d in s.dim) for s in layer.input_param.shape]
            if len(shapes) not in (1, len(layer.top)):
                raise ConversionError(f"Caffe Input layer {layer.name!r}: one shape per top needed")
            for i, top in enumerate(layer.top):
                inputs.append((top, shapes[min(i, len(shapes) - 1)]))
            continue
        if from_train_val and t in DATA_TYPES:
            crop = int(layer.transform_param.crop_size)
            if not crop or not len(layer.top):
                raise ConversionError(
                    f"Caffe data layer {layer.name!r}: needs transform_param.crop_size to "
                    "define the input size"
                )
            inputs.append((layer.top[0], (1, 3, crop, crop)))
            dropped.update(layer.top[1:])
            continue
        if from_train_val and (t in TRAINING_TYPES or dropped.intersection(layer.bottom)):
            if t in SUPPORTED_TYPES:
                raise ConversionError(
                    f"Caffe layer {layer.name!r} ({t}) reads a label blob; cannot deploy it"
                )
            dropped.update(layer.top)
            continue
        if t not in SUPPORTED_TYPES:
            hint = " (a train_val net? use from_train_val=True)" if t in DATA_TYPES else ""
            raise ConversionError(
                f"Caffe layer {layer.name!r} has unsupported type {t!r}{hint}; supported: "
                + ", ".join(SUPPORTED_TYPES)
            )
        layers.append(
            LayerSpec.make(layer.name, t, layer.bottom, layer.top, _layer_params(layer, t))
        )
    if not inputs:
        raise ConversionError(f"net {net.name!r} declares no input blob (input:/Input layer)")
    for blob, shape in inputs:
        if len(shape) != 4:
            raise ConversionError(f"net {net.name!r}: input {blob!r} shape {shape} is not NCHW")
    try:
        return NetSpec(name=net.name or "caffe_net", inputs=tuple(inputs), layers=tuple(layers))
    except ValueError as err:
        raise ConversionError(str(err)) from None


# --------------------------------------------------------------------------- blobs -> params
def _fit(arr: np.ndarray, expected: tuple[int, ...], where: str) -> np.ndarray:
    """``arr`` as ``expected``; legacy 4-D blobs ``(1, .., 1, *expected)`` are reshaped."""
    if arr.shape == expected:
        return arr
    lead = arr.ndim - len(expected)
    if lead > 0 and arr.shape[lead:] == expected and all(d == 1 for d in arr.shape[:lead]):
        return arr.reshape(expected)
    raise ConversionError(f"{where} has shape {arr.shape}, expected {expected}")


def convert_blobs(
    spec: NetSpec,
    blobs: Mapping[str, Sequence[np.ndarray]],
    *,
    rgb_input: bool = True,
    allow_unused: bool = False,
    source: str = "caffemodel",
) -> dict[str, Any]:
    """``read_caffemodel`` output -> Flax variables ``{"params": ...}`` for ``CaffeGraph(spec)``.

    Pure dict -> pytree. ``rgb_input`` reverses the input channels of every Convolution that
    reads the net input (BGR -> RGB). ``allow_unused`` drops caffemodel layers the spec lacks
    (by default they are an error, like layers the spec needs but the caffemodel lacks).

    Raises:
      ConversionError: listing every missing / unexpected layer and every blob count or shape
        mismatch, each naming the Caffe layer.
    """
    template = flatten(template_variables(CaffeGraph(spec)))
    input_blob = spec.inputs[0][0]
    errors: list[str] = []
    flat: dict[str, np.ndarray] = {}
    used: set[str] = set()
    for layer in spec.layers:
        have = blobs.get(layer.name)
        if layer.type not in _PARAM_LAYERS:
            if have:
                errors.append(
                    f"layer {layer.name!r} ({layer.type}) has {len(have)} blobs; expected none"
                )
            used.add(layer.name)
            continue
        if have is None:
            errors.append(f"layer {layer.name!r} ({layer.type}) is missing from the {source}")
            continue
        used.add(layer.name)
        key = f"params/{layer.param_name}"
        want_n = 2 if layer.get("bias_term") else 1
        if len(have) != want_n:
            errors.append(f"layer {layer.name!r} has {len(have)} blobs, expected {want_n}")
            continue
        kshape = tuple(template[f"{key}/kernel"].shape)
        where = f"layer {layer.name!r} blob 0 (weights)"
        try:
            if layer.type == "Convolution":
                w = _fit(have[0], (kshape[3], kshape[2], kshape[0], kshape[1]), where)
                if rgb_input and input_blob in layer.bottoms:
                    if layer.get("group") != 1 or w.shape[1] != 3:
                        raise ConversionError(
                            f"layer {layer.name!r} reads the input but is not a 3-channel, "
                            "group-1 convolution; cannot flip BGR->RGB (use rgb_input=False)"
                        )
                    w = w[:, ::-1]
                flat[f"{key}/kernel"] = conv_oihw_to_hwio(w)
            elif layer.get("transpose"):
                flat[f"{key}/kernel"] = np.ascontiguousarray(_fit(have[0], kshape, where))
            else:
                flat[f"{key}/kernel"] = dense_oi_to_io(_fit(have[0], kshape[::-1], where))
            if want_n == 2:
                bshape = tuple(template[f"{key}/bias"].shape)
                where = f"layer {layer.name!r} blob 1 (bias)"
                flat[f"{key}/bias"] = _fit(have[1], bshape, where)
        except ConversionError as err:
            errors.append(str(err))
    if rgb_input:
        for layer in spec.layers:
            if input_blob in layer.bottoms and layer.type != "Convolution":
                errors.append(
                    f"layer {layer.name!r} ({layer.type}) reads the input blob directly; "
                    "BGR->RGB flipping is only exact for convolutions (use rgb_input=False)"
                )
    unused = sorted(set(blobs) - used)
    if unused and not allow_unused:
        errors.append(f"{source} layers not in the prototxt: {', '.join(unused)}")
    if errors:
        raise ConversionError(f"{source} does not match the prototxt:\n  " + "\n  ".join(errors))
    return strict_merge(template, flat, source=source)


# ---------------------------------------------------------------------------- preprocessing
def preprocess_info(
    spec: NetSpec,
    *,
    rgb_input: bool = True,
    mean_bgr: Sequence[float] | None = IMAGENET_MEAN_BGR,
    mean_file: PathLike | None = None,
) -> dict[str, Any]:
    """JSON-able description of the model input (see the module docstring).

    Keys: ``input_blob``, ``input_shape_nchw``, ``input_size`` ``(H, W)``, ``channel_order``
    (of the Flax model's input: "RGB" or "BGR"), ``caffe_channel_order`` ("BGR"),
    ``pixel_range`` ``[0, 255]``, ``scale`` (1.0), ``mean`` (per channel, in
    ``channel_order``), ``mean_source``; with ``mean_file`` also ``mean_image`` (``(H, W, C)``
    float32 array in ``channel_order``, not JSON-able; ``mean`` is then its spatial average).
    """
    blob, shape = spec.inputs[0]
    info: dict[str, Any] = {
        "input_blob": blob,
        "input_shape_nchw": list(shape),
        "input_size": [shape[2], shape[3]],
        "channel_order": "RGB" if rgb_input else "BGR",
        "caffe_channel_order": "BGR",
        "pixel_range": [0.0, 255.0],
        "scale": 1.0,
    }
    if mean_file is not None:
        image = np.transpose(read_mean_binaryproto(mean_file), (1, 2, 0))  # HWC, BGR
        image = image[..., ::-1] if rgb_input else image
        info["mean_image"] = np.ascontiguousarray(image)
        info["mean"] = [float(v) for v in image.mean(axis=(0, 1))]
        info["mean_source"] = f"mean file {pathlib.Path(mean_file).name}"
    elif mean_bgr is not None:
        mean = list(mean_bgr)[::-1] if rgb_input else list(mean_bgr)
        info["mean"] = [float(v) for v in mean]
        info["mean_source"] = f"mean pixel BGR {tuple(float(v) for v in mean_bgr)}"
    else:
        info["mean"] = [0.0, 0.0, 0.0]
        info["mean_source"] = "none"
    return info


# ---------------------------------------------------------------------------- entry points
def convert_caffe(
    prototxt: PathLike,
    caffemodel: PathLike,
    *,
    rgb_input: bool = True,
    mean_bgr: Sequence[float] | None = IMAGENET_MEAN_BGR,
    mean_file: PathLike | None = None,
    allow_unused: bool = False,
    from_train_val: bool = False,
) -> tuple[CaffeGraph, dict[str, Any], dict[str, Any]]:
    """Deploy prototxt + caffemodel -> ``(CaffeGraph, variables, preprocess_info)``.

    ``model.apply(variables, x)`` with ``x = make_preprocess(info)(rgb_uint8)`` (B, H, W, 3)
    reproduces Caffe's forward pass; ``inter`` holds every blob by its Caffe name.
    ``from_train_val``: ``prototxt`` is a train_val net (see :func:`net_spec`); its data
    layer's ``mean_value`` then replaces ``mean_bgr``.
    """
    net = parse_prototxt(prototxt)
    spec = net_spec(net, from_train_val=from_train_val)
    if from_train_val and mean_file is None:
        mean_bgr = train_val_mean_bgr(net) or mean_bgr
    variables = convert_blobs(
        spec,
        read_caffemodel(caffemodel),
        rgb_input=rgb_input,
        allow_unused=allow_unused,
        source=str(caffemodel),
    )
    info = preprocess_info(spec, rgb_input=rgb_input, mean_bgr=mean_bgr, mean_file=mean_file)
    return CaffeGraph(spec), variables, info


def main_convert(
    prototxt: PathLike,
    caffemodel: PathLike,
    out: PathLike,
    *,
    rgb_input: bool = True,
    mean_file: PathLike | None = None,
    allow_unused: bool = False,
    from_train_val: bool = False,
) -> pathlib.Path:
    """Convert and write ``out`` (``.npz``, '/'-joined variable keys) plus ``out.json``.

    The JSON sidecar holds ``format``, ``source`` (file names), ``spec`` (the net),
    ``preprocess`` (see :func:`preprocess_info`; a mean image goes to ``<out>.mean.npy``).
    Returns the ``.npz`` path.
    """
    out = pathlib.Path(out)
    if out.suffix != ".npz":
        out = out.with_name(out.name + ".npz")
    model, variables, info = convert_caffe(
        prototxt,
        caffemodel,
        rgb_input=rgb_input,
        mean_file=mean_file,
        allow_unused=allow_unused,
        from_train_val=from_train_val,
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    mean_image = info.pop("mean_image", None)
    if mean_image is not None:
        mean_path = out.with_suffix(".mean.npy")
        np.save(mean_path, mean_image)
        info["mean_image_file"] = mean_path.name
    tmp = out.with_name(out.name + f".tmp{os.getpid()}.npz")
    flat = {k: np.asarray(v) for k, v in flatten(variables).items()}
    np.savez(tmp, **flat)  # pyright: ignore[reportArgumentType]
    os.replace(tmp, out)
    sidecar = {
        "format": SIDECAR_FORMAT,
        "source": {
            "prototxt": pathlib.Path(prototxt).name,
            "caffemodel": pathlib.Path(caffemodel).name,
        },
        "spec": json.loads(model.spec.to_json()),
        "preprocess": info,
    }
    sidecar_path(out).write_text(json.dumps(sidecar, indent=1), encoding="utf-8")
    return out


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m weights_conversion.caffe PROTOTXT CAFFEMODEL OUT [options]``."""
    ap = argparse.ArgumentParser(description="Convert a Caffe model to fgloc .npz + .json.")
    ap.add_argument("prototxt")
    ap.add_argument("caffemodel")
    ap.add_argument("out", help="output .npz (a .json sidecar is written beside it)")
    ap.add_argument("--mean-file", help="Caffe mean .binaryproto (default: mean pixel 104,117,123)")
    ap.add_argument("--bgr", action="store_true", help="keep BGR input (do not flip conv1)")
    ap.add_argument("--allow-unused", action="store_true", help="drop caffemodel-only layers")
    ap.add_argument("--train-val", action="store_true", help="prototxt is a train_val net")
    args = ap.parse_args(argv)
    path = main_convert(
        args.prototxt,
        args.caffemodel,
        args.out,
        rgb_input=not args.bgr,
        mean_file=args.mean_file,
        allow_unused=args.allow_unused,
        from_train_val=args.train_val,
    )
    print(f"wrote {path} and {sidecar_path(path).name}")


if __name__ == "__main__":
    main()
