"""Caffe converter: protobuf schema, prototxt -> CaffeGraph, caffemodel -> variables.

No real .caffemodel exists on this machine, so parity is checked on tiny nets whose
.prototxt / .caffemodel the tests write with the repo's own protobuf classes, against a plain
numpy NCHW forward pass written here from Caffe's C++ semantics (loops on purpose).
"""

from __future__ import annotations

import json
import math
import pathlib
from typing import Any

import jax
import numpy as np
import pytest
from conftest import require_path
from google.protobuf import text_format

from fgloc.models.caffe_graph import CaffeGraph, caffe_pool_output_size
from fgloc.weights import caffe_npz
from fgloc.weights.io import ConversionError
from weights_conversion import caffe as C
from weights_conversion import caffe_pb2

MEAN_BGR = np.array(C.IMAGENET_MEAN_BGR, np.float32)


# ------------------------------------------------------------------ numpy reference (NCHW)
def ref_conv(x, wb, stride=(1, 1), pad=(0, 0), dilation=(1, 1), group=1):
    """Caffe convolution; ``wb`` = [weights (O, C/g, kh, kw), bias (O,)]."""
    w, b = wb
    n, _, h, wd = x.shape
    o, cg, kh, kw = w.shape
    (sh, sw), (ph, pw), (dh, dw) = stride, pad, dilation
    ekh, ekw = dh * (kh - 1) + 1, dw * (kw - 1) + 1
    xp = np.pad(x, ((0, 0), (0, 0), (ph, ph), (pw, pw)))
    oh, ow = (h + 2 * ph - ekh) // sh + 1, (wd + 2 * pw - ekw) // sw + 1
    og = o // group
    out = np.zeros((n, o, oh, ow), np.float64)
    for g in range(group):
        wg = w[g * og : (g + 1) * og].astype(np.float64)
        for i in range(oh):
            for j in range(ow):
                patch = xp[
                    :, g * cg : (g + 1) * cg, i * sh : i * sh + ekh : dh, j * sw : j * sw + ekw : dw
                ]
                out[:, g * og : (g + 1) * og, i, j] = np.einsum("nckl,ockl->no", patch, wg)
    out += b[None, :, None, None]
    return out


def ref_pool(x, method, k, s, p):
    """Caffe PoolingLayer::Forward_cpu (MAX / AVE), ceil mode, with its clipping rule."""
    n, c, h, w = x.shape
    oh = math.ceil((h + 2 * p - k) / s) + 1
    ow = math.ceil((w + 2 * p - k) / s) + 1
    if p > 0:
        oh -= (oh - 1) * s >= h + p
        ow -= (ow - 1) * s >= w + p
    out = np.zeros((n, c, oh, ow), np.float64)
    for i in range(oh):
        for j in range(ow):
            hs, ws = i * s - p, j * s - p
            if method == "MAX":
                he, we = min(hs + k, h), min(ws + k, w)
                hs, ws = max(hs, 0), max(ws, 0)
                out[:, :, i, j] = x[:, :, hs:he, ws:we].max(axis=(2, 3))
            else:
                he, we = min(hs + k, h + p), min(ws + k, w + p)
                size = (he - hs) * (we - ws)
                hs, ws, he, we = max(hs, 0), max(ws, 0), min(he, h), min(we, w)
                out[:, :, i, j] = x[:, :, hs:he, ws:we].sum(axis=(2, 3)) / size
    return out


def ref_lrn(x, size, alpha, beta, k):
    c = x.shape[1]
    pre = (size - 1) // 2
    out = np.zeros_like(x, dtype=np.float64)
    for ch in range(c):
        lo, hi = max(0, ch - pre), min(c, ch - pre + size)
        scale = k + alpha / size * (x[:, lo:hi] ** 2).sum(axis=1)
        out[:, ch] = x[:, ch] * scale**-beta
    return out


def ref_ip(x, wb):
    w, b = wb
    return x.reshape(x.shape[0], -1) @ w.T.astype(np.float64) + b


def ref_softmax(x):
    e = np.exp(x - x.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def relu(x):
    return np.maximum(x, 0)


# ------------------------------------------------------------------ writing Caffe files
# Layer description: (name, type, bottoms, tops, params {field: {...}}, blob shapes).
V1_ENUM = {
    "Convolution": "CONVOLUTION",
    "Pooling": "POOLING",
    "LRN": "LRN",
    "InnerProduct": "INNER_PRODUCT",
    "ReLU": "RELU",
    "Dropout": "DROPOUT",
    "Softmax": "SOFTMAX",
    "Concat": "CONCAT",
    "Eltwise": "ELTWISE",
    "Split": "SPLIT",
    "Flatten": "FLATTEN",
    "Sigmoid": "SIGMOID",
    "TanH": "TANH",
}


def tiny_layers() -> list[tuple]:
    """conv(s2) / LRN / ceil max-pool / grouped dilated conv / AVE + clipped MAX pools / concat /
    fc / fc / softmax. Input 3 x 19 x 16."""
    return [
        ("conv1", "Convolution", ["data"], ["conv1"],
         {"convolution_param": {"num_output": 8, "kernel_size": [3], "stride": [2], "pad": [1]}},
         [(8, 3, 3, 3), (8,)]),
        ("relu1", "ReLU", ["conv1"], ["conv1"], {}, []),
        ("norm1", "LRN", ["conv1"], ["norm1"],
         {"lrn_param": {"local_size": 5, "alpha": 0.5, "beta": 0.75, "k": 2.0}}, []),
        ("pool1", "Pooling", ["norm1"], ["pool1"],
         {"pooling_param": {"pool": "MAX", "kernel_size": 3, "stride": 2}}, []),
        ("conv2", "Convolution", ["pool1"], ["conv2"],
         {"convolution_param": {"num_output": 6, "kernel_size": [3], "pad": [2],
                                "dilation": [2], "group": 2}},
         [(6, 4, 3, 3), (6,)]),
        ("relu2", "ReLU", ["conv2"], ["conv2"], {}, []),
        ("pool2a", "Pooling", ["conv2"], ["pool2a"],
         {"pooling_param": {"pool": "AVE", "kernel_size": 3, "stride": 2, "pad": 1}}, []),
        ("pool2b", "Pooling", ["conv2"], ["pool2b"],
         {"pooling_param": {"pool": "MAX", "kernel_size": 2, "stride": 2, "pad": 1}}, []),
        ("concat", "Concat", ["pool2a", "pool2b"], ["concat"], {}, []),
        ("fc1", "InnerProduct", ["concat"], ["fc1"],
         {"inner_product_param": {"num_output": 10}}, [(10, 108), (10,)]),
        ("relu3", "ReLU", ["fc1"], ["fc1"], {}, []),
        ("drop", "Dropout", ["fc1"], ["fc1"], {"dropout_param": {"dropout_ratio": 0.5}}, []),
        ("fc2", "InnerProduct", ["fc1"], ["fc2"],
         {"inner_product_param": {"num_output": 5}}, [(5, 10), (5,)]),
        ("prob", "Softmax", ["fc2"], ["prob"], {}, []),
    ]  # fmt: skip


TINY_INPUT = (2, 3, 19, 16)


def tiny_reference(x: np.ndarray, blobs: dict[str, list[np.ndarray]]) -> dict[str, np.ndarray]:
    """Caffe forward of `tiny_layers` on a BGR, mean-subtracted NCHW input."""
    r: dict[str, np.ndarray] = {}
    r["conv1"] = relu(ref_conv(x, blobs["conv1"], stride=(2, 2), pad=(1, 1)))
    r["norm1"] = ref_lrn(r["conv1"], 5, 0.5, 0.75, 2.0)
    r["pool1"] = ref_pool(r["norm1"], "MAX", 3, 2, 0)
    r["conv2"] = relu(ref_conv(r["pool1"], blobs["conv2"], pad=(2, 2), dilation=(2, 2), group=2))
    r["pool2a"] = ref_pool(r["conv2"], "AVE", 3, 2, 1)
    r["pool2b"] = ref_pool(r["conv2"], "MAX", 2, 2, 1)
    r["concat"] = np.concatenate([r["pool2a"], r["pool2b"]], axis=1)
    r["fc1"] = relu(ref_ip(r["concat"], blobs["fc1"]))
    r["fc2"] = ref_ip(r["fc1"], blobs["fc2"])
    r["prob"] = ref_softmax(r["fc2"])
    return r


def _fill(msg: Any, params: dict[str, Any]) -> None:
    for key, value in params.items():
        if isinstance(value, dict):
            _fill(getattr(msg, key), value)
        elif isinstance(value, list):
            getattr(msg, key).extend(value)
        else:
            setattr(msg, key, value)


def _blob(arr: np.ndarray, legacy: bool) -> Any:
    blob = caffe_pb2.BlobProto()
    if legacy:  # pre-2015 files: 4-D num/channels/height/width, right-aligned
        dims = (1,) * (4 - arr.ndim) + arr.shape
        blob.num, blob.channels, blob.height, blob.width = dims
    else:
        blob.shape.dim.extend(arr.shape)
    blob.data.extend(arr.ravel().tolist())
    return blob


def build_net(layers, input_shape, *, v1=False, blobs=None, legacy=False, name="tiny") -> Any:
    """NetParameter in V2 (`layer`) or V1 (`layers`) form, with blobs when given."""
    net = caffe_pb2.NetParameter(name=name)
    net.input.append("data")
    net.input_dim.extend(input_shape)
    for lname, ltype, bottoms, tops, params, _ in layers:
        if v1:
            layer = net.layers.add(name=lname)
            layer.type = caffe_pb2.V1LayerParameter.LayerType.Value(V1_ENUM[ltype])
        else:
            layer = net.layer.add(name=lname, type=ltype)
        layer.bottom.extend(bottoms)
        layer.top.extend(tops)
        _fill(layer, params)
        if blobs is not None and lname in blobs:
            layer.blobs.extend(_blob(a, legacy) for a in blobs[lname])
    return net


def random_blobs(layers, seed: int = 0) -> dict[str, list[np.ndarray]]:
    rng = np.random.default_rng(seed)
    out = {}
    for lname, *_, shapes in layers:
        if shapes:
            fan_in = int(np.prod(shapes[0][1:]))
            w = rng.normal(size=shapes[0]) / np.sqrt(fan_in)
            out[lname] = [w.astype(np.float32)] + [
                rng.normal(size=s).astype(np.float32) for s in shapes[1:]
            ]
    return out


def write_files(tmp: pathlib.Path, layers, input_shape, blobs, *, v1=False, legacy=False, name="t"):
    proto, model = tmp / f"{name}.prototxt", tmp / f"{name}.caffemodel"
    proto.write_text(text_format.MessageToString(build_net(layers, input_shape, v1=v1)))
    net = build_net(layers, input_shape, v1=v1, blobs=blobs, legacy=legacy)
    model.write_bytes(net.SerializeToString())
    return proto, model


def random_bgr(shape, seed=1) -> np.ndarray:
    return np.random.default_rng(seed).uniform(0, 255, size=shape).astype(np.float32)


def flax_forward(model, variables, info, x_bgr: np.ndarray):
    """Raw BGR NCHW pixels -> Flax forward via the converter's preprocessing on RGB NHWC."""
    rgb = np.transpose(x_bgr[:, ::-1], (0, 2, 3, 1))
    x = caffe_npz.make_preprocess(info)(rgb)
    return model.apply(variables, x)


def to_nchw(a) -> np.ndarray:
    a = np.asarray(a)
    return np.transpose(a, (0, 3, 1, 2)) if a.ndim == 4 else a


def assert_close(got, want, tol=1e-4):
    got, want = to_nchw(got), np.asarray(want)
    assert got.shape == want.shape
    scale = max(1.0, float(np.abs(want).max()))
    err = float(np.abs(got - want).max())
    assert err <= tol * scale, f"max abs error {err} > {tol} * {scale}"


# ------------------------------------------------------------------ tests
def test_schema_field_numbers_match_bvlc():
    """Spot checks against BVLC caffe.proto, so real .caffemodel files decode."""
    expected = {
        ("NetParameter", "layer"): 100,
        ("NetParameter", "layers"): 2,
        ("NetParameter", "input"): 3,
        ("NetParameter", "input_dim"): 4,
        ("NetParameter", "input_shape"): 8,
        ("LayerParameter", "blobs"): 7,
        ("LayerParameter", "convolution_param"): 106,
        ("LayerParameter", "pooling_param"): 121,
        ("LayerParameter", "inner_product_param"): 117,
        ("LayerParameter", "lrn_param"): 118,
        ("LayerParameter", "concat_param"): 104,
        ("LayerParameter", "input_param"): 143,
        ("V1LayerParameter", "name"): 4,
        ("V1LayerParameter", "type"): 5,
        ("V1LayerParameter", "blobs"): 6,
        ("V1LayerParameter", "convolution_param"): 10,
        ("V1LayerParameter", "pooling_param"): 19,
        ("BlobProto", "shape"): 7,
        ("BlobProto", "data"): 5,
        ("BlobProto", "num"): 1,
        ("BlobProto", "width"): 4,
        ("ConvolutionParameter", "stride"): 6,
        ("ConvolutionParameter", "group"): 5,
        ("ConvolutionParameter", "dilation"): 18,
        ("PoolingParameter", "global_pooling"): 12,
        ("PoolingParameter", "round_mode"): 13,
        ("LRNParameter", "k"): 5,
    }
    for (msg, field), number in expected.items():
        assert getattr(caffe_pb2, msg).DESCRIPTOR.fields_by_name[field].number == number
    assert caffe_pb2.V1LayerParameter.INNER_PRODUCT == 14
    assert caffe_pb2.V1LayerParameter.POOLING == 17
    # BlobProto.data is packed: tag (5 << 3 | 2), length 8, two little-endian floats.
    blob = caffe_pb2.BlobProto(data=[1.0, 2.0])
    assert blob.SerializeToString() == b"\x2a\x08" + np.array([1, 2], "<f4").tobytes()


@pytest.mark.parametrize(
    ("size", "kernel", "stride", "pad", "expected"),
    [
        (8, 3, 2, 0, 4),  # ceil((8-3)/2)+1 = 4; floor mode would give 3
        (9, 3, 2, 0, 4),
        (112, 3, 2, 0, 56),  # GoogLeNet pool1
        (5, 2, 2, 1, 3),  # ceil gives 4, clipped: (4-1)*2 >= 5+1
        (5, 3, 2, 1, 3),
        (14, 14, 14, 0, 1),  # CAM_pool
    ],
)
def test_caffe_pool_output_size(size, kernel, stride, pad, expected):
    assert caffe_pool_output_size(size, kernel, stride, pad, any_pad=pad > 0) == expected


def test_tiny_v2_matches_numpy_reference(tmp_path):
    layers = tiny_layers()
    blobs = random_blobs(layers)
    proto, caffemodel = write_files(tmp_path, layers, TINY_INPUT, blobs)
    assert {k: [b.shape for b in v] for k, v in C.read_caffemodel(caffemodel).items()} == {
        k: [b.shape for b in v] for k, v in blobs.items()
    }
    model, variables, info = C.convert_caffe(proto, caffemodel)
    assert info["channel_order"] == "RGB" and info["mean"] == [123.0, 117.0, 104.0]
    x = random_bgr(TINY_INPUT)
    ref = tiny_reference(x - MEAN_BGR[None, :, None, None], blobs)
    out, inter = flax_forward(model, variables, info, x)
    assert to_nchw(inter["pool1"]).shape == (2, 8, 5, 4)  # ceil mode (floor: 4 x 3)
    assert to_nchw(inter["pool2b"]).shape == (2, 6, 3, 3)  # clipped last window
    for blob in ("conv1", "norm1", "pool1", "conv2", "pool2a", "pool2b", "concat", "fc1", "fc2"):
        assert_close(inter[blob], ref[blob])
    assert_close(out, ref["prob"])
    assert np.asarray(out).argmax(1).tolist() == ref["prob"].argmax(1).tolist()
    # Flax layout of the converted weights.
    conv1 = variables["params"]["conv1"]["kernel"]
    np.testing.assert_array_equal(conv1, np.transpose(blobs["conv1"][0][:, ::-1], (2, 3, 1, 0)))
    np.testing.assert_array_equal(variables["params"]["fc2"]["kernel"], blobs["fc2"][0].T)


def test_bgr_input_and_features_and_jit(tmp_path):
    layers = tiny_layers()
    blobs = random_blobs(layers, seed=3)
    proto, caffemodel = write_files(tmp_path, layers, TINY_INPUT, blobs)
    model, variables, info = C.convert_caffe(proto, caffemodel, rgb_input=False)
    assert info["channel_order"] == "BGR" and info["mean"] == [104.0, 117.0, 123.0]
    x = random_bgr(TINY_INPUT, seed=4)
    ref = tiny_reference(x - MEAN_BGR[None, :, None, None], blobs)
    xb = np.transpose(x, (0, 2, 3, 1)) - MEAN_BGR
    out, _ = model.apply(variables, xb)
    assert_close(out, ref["prob"])
    out_jit, _ = jax.jit(model.apply)(variables, xb)
    np.testing.assert_allclose(np.asarray(out_jit), np.asarray(out), rtol=1e-5, atol=1e-6)
    # features = bottom of the last Pooling layer (conv2, after its in-place ReLU).
    fmap, finter = model.apply(variables, xb, method=model.features)
    assert "fc1" not in finter
    assert_close(fmap, ref["conv2"])


def test_v1_layers_with_legacy_blobs_match_reference(tmp_path):
    layers = tiny_layers()
    blobs = random_blobs(layers, seed=5)
    proto, caffemodel = write_files(tmp_path, layers, TINY_INPUT, blobs, v1=True, legacy=True)
    assert "layers {" in proto.read_text() and "type: CONVOLUTION" in proto.read_text()
    read = C.read_caffemodel(caffemodel)
    assert read["fc1"][0].shape == (1, 1, 10, 108) and read["fc1"][1].shape == (1, 1, 1, 10)
    model, variables, info = C.convert_caffe(proto, caffemodel)
    x = random_bgr(TINY_INPUT, seed=6)
    ref = tiny_reference(x - MEAN_BGR[None, :, None, None], blobs)
    out, inter = flax_forward(model, variables, info, x)
    assert_close(inter["concat"], ref["concat"])
    assert_close(out, ref["prob"])


def test_v1_prototxt_text_with_training_fields(tmp_path):
    """The CAM authors' V1 deploy files carry blobs_lr / weight_decay / fillers."""
    text = """
name: "v1"
input: "data"
input_dim: 1 input_dim: 3 input_dim: 6 input_dim: 6
layers { bottom: "data" top: "conv1" name: "conv1" type: CONVOLUTION
  blobs_lr: 1 blobs_lr: 2 weight_decay: 1 weight_decay: 0
  convolution_param { num_output: 4 kernel_size: 3 pad: 1
    weight_filler { type: "gaussian" std: 0.01 } bias_filler { type: "constant" value: 0 } } }
layers { bottom: "conv1" top: "conv1" name: "relu1" type: RELU }
layers { bottom: "conv1" top: "pool" name: "pool" type: POOLING
  pooling_param { pool: AVE kernel_size: 6 stride: 6 } }
layers { bottom: "pool" top: "fc" name: "fc" type: INNER_PRODUCT
  inner_product_param { num_output: 2 } }
"""
    spec = C.net_spec(text_format.Parse(text, caffe_pb2.NetParameter()))
    assert [layer.type for layer in spec.layers] == [
        "Convolution",
        "ReLU",
        "Pooling",
        "InnerProduct",
    ]
    assert spec.inputs == (("data", (1, 3, 6, 6)),)
    assert spec.layer("pool").get("pool") == "AVE" and spec.layer("pool").get("kernel") == (6, 6)
    assert spec.outputs == ("fc",)


def inception_layers() -> list[tuple]:
    def conv(name, bottom, out, cin, k, pad=0):
        p = {"num_output": out, "kernel_size": [k]}
        if pad:
            p["pad"] = [pad]
        return (name, "Convolution", [bottom], [name], {"convolution_param": p},
                [(out, cin, k, k), (out,)])  # fmt: skip

    def relu_(name):
        return (f"{name}_relu", "ReLU", [name], [name], {}, [])

    b = "inception_3a"
    return [
        conv("conv0", "data", 8, 3, 1), relu_("conv0"),
        conv(f"{b}/1x1", "conv0", 4, 8, 1), relu_(f"{b}/1x1"),
        conv(f"{b}/3x3_reduce", "conv0", 4, 8, 1), relu_(f"{b}/3x3_reduce"),
        conv(f"{b}/3x3", f"{b}/3x3_reduce", 6, 4, 3, pad=1), relu_(f"{b}/3x3"),
        conv(f"{b}/5x5_reduce", "conv0", 2, 8, 1), relu_(f"{b}/5x5_reduce"),
        conv(f"{b}/5x5", f"{b}/5x5_reduce", 3, 2, 5, pad=2), relu_(f"{b}/5x5"),
        (f"{b}/pool", "Pooling", ["conv0"], [f"{b}/pool"],
         {"pooling_param": {"pool": "MAX", "kernel_size": 3, "stride": 1, "pad": 1}}, []),
        conv(f"{b}/pool_proj", f"{b}/pool", 3, 8, 1), relu_(f"{b}/pool_proj"),
        (f"{b}/output", "Concat", [f"{b}/1x1", f"{b}/3x3", f"{b}/5x5", f"{b}/pool_proj"],
         [f"{b}/output"], {}, []),
    ]  # fmt: skip


def test_inception_block_matches_reference(tmp_path):
    layers = inception_layers()
    blobs = random_blobs(layers, seed=7)
    proto, caffemodel = write_files(tmp_path, layers, (2, 3, 9, 9), blobs)
    model, variables, info = C.convert_caffe(proto, caffemodel)
    assert "inception_3a__5x5" in variables["params"]
    x = random_bgr((2, 3, 9, 9), seed=8)
    xc = x - MEAN_BGR[None, :, None, None]
    b = "inception_3a"
    c0 = relu(ref_conv(xc, blobs["conv0"]))
    r1 = relu(ref_conv(c0, blobs[f"{b}/1x1"]))
    r3 = relu(ref_conv(relu(ref_conv(c0, blobs[f"{b}/3x3_reduce"])), blobs[f"{b}/3x3"], pad=(1, 1)))
    r5 = relu(ref_conv(relu(ref_conv(c0, blobs[f"{b}/5x5_reduce"])), blobs[f"{b}/5x5"], pad=(2, 2)))
    rp = relu(ref_conv(ref_pool(c0, "MAX", 3, 1, 1), blobs[f"{b}/pool_proj"]))
    want = np.concatenate([r1, r3, r5, rp], axis=1)
    out, inter = flax_forward(model, variables, info, x)
    assert model.spec.outputs == (f"{b}/output",)
    assert_close(inter[f"{b}/output"], want)
    assert_close(out, want)


# ------------------------------------------------------------------ malformed inputs
def _tiny_files(tmp_path, blobs=None, layers=None, name="t"):
    layers = layers or tiny_layers()
    blobs = blobs if blobs is not None else random_blobs(tiny_layers())
    return write_files(tmp_path, layers, TINY_INPUT, blobs, name=name)


def test_wrong_blob_shape_names_the_layer(tmp_path):
    blobs = random_blobs(tiny_layers())
    blobs["conv2"][0] = np.zeros((6, 8, 3, 3), np.float32)  # group=2 needs (6, 4, 3, 3)
    proto, model = _tiny_files(tmp_path, blobs)
    with pytest.raises(
        ConversionError, match=r"layer 'conv2' blob 0 .*\(6, 8, 3, 3\).*\(6, 4, 3, 3\)"
    ):
        C.convert_caffe(proto, model)


def test_wrong_blob_count_names_the_layer(tmp_path):
    blobs = random_blobs(tiny_layers())
    blobs["fc1"] = blobs["fc1"][:1]
    proto, model = _tiny_files(tmp_path, blobs)
    with pytest.raises(ConversionError, match="layer 'fc1' has 1 blobs, expected 2"):
        C.convert_caffe(proto, model)


def test_missing_and_unexpected_layers_are_errors(tmp_path):
    blobs = random_blobs(tiny_layers())
    del blobs["fc2"]
    blobs["fc_extra"] = [np.zeros((2, 2), np.float32)]
    proto = tmp_path / "t.prototxt"
    proto.write_text(text_format.MessageToString(build_net(tiny_layers(), TINY_INPUT)))
    extra_layer = [("fc_extra", "InnerProduct", ["fc2"], ["fc_extra"], {}, [])]
    caffemodel = tmp_path / "t.caffemodel"
    net = build_net(tiny_layers() + extra_layer, TINY_INPUT, blobs=blobs)
    caffemodel.write_bytes(net.SerializeToString())
    with pytest.raises(ConversionError) as err:
        C.convert_caffe(proto, caffemodel)
    assert "layer 'fc2' (InnerProduct) is missing" in str(err.value)
    assert "not in the prototxt: fc_extra" in str(err.value)


def test_allow_unused_drops_extra_layers(tmp_path):
    blobs = random_blobs(tiny_layers())
    blobs["loss1/fc"] = [np.zeros((2, 2), np.float32)]
    extra = [("loss1/fc", "InnerProduct", ["fc2"], ["loss1/fc"], {}, [])]
    proto = tmp_path / "t.prototxt"
    proto.write_text(text_format.MessageToString(build_net(tiny_layers(), TINY_INPUT)))
    caffemodel = tmp_path / "t.caffemodel"
    caffemodel.write_bytes(
        build_net(tiny_layers() + extra, TINY_INPUT, blobs=blobs).SerializeToString()
    )
    with pytest.raises(ConversionError, match="loss1/fc"):
        C.convert_caffe(proto, caffemodel)
    _, variables, _ = C.convert_caffe(proto, caffemodel, allow_unused=True)
    assert "loss1__fc" not in variables["params"]


def test_unknown_layer_type_names_the_layer(tmp_path):
    text = (
        'name: "x" input: "data" input_dim: 1 input_dim: 3 input_dim: 4 input_dim: 4\n'
        'layer { name: "crop1" type: "Crop" bottom: "data" top: "crop1" }\n'
    )
    proto = tmp_path / "bad.prototxt"
    proto.write_text(text)
    with pytest.raises(ConversionError, match="'crop1' has unsupported type 'Crop'"):
        C.net_spec(C.parse_prototxt(proto))


def test_prototxt_syntax_error_names_file(tmp_path):
    proto = tmp_path / "broken.prototxt"
    proto.write_text('layer { name: "a" typo_field: 3 }')
    with pytest.raises(ConversionError, match=r"broken\.prototxt.*typo_field"):
        C.parse_prototxt(proto)


def test_bottom_without_producer_is_an_error(tmp_path):
    layers = tiny_layers()
    layers[3] = ("pool1", "Pooling", ["nonexistent"], ["pool1"], layers[3][4], [])
    proto = tmp_path / "t.prototxt"
    proto.write_text(text_format.MessageToString(build_net(layers, TINY_INPUT)))
    with pytest.raises(ConversionError, match="'pool1' reads blob 'nonexistent'"):
        C.net_spec(C.parse_prototxt(proto))


# ------------------------------------------------------------------ files written for the CLI
def test_main_convert_roundtrip_with_mean_file(tmp_path):
    layers = tiny_layers()
    blobs = random_blobs(layers, seed=9)
    proto, caffemodel = write_files(tmp_path, layers, TINY_INPUT, blobs)
    mean_image = np.random.default_rng(2).uniform(90, 130, size=(1, 3, 19, 16)).astype(np.float32)
    mean_file = tmp_path / "mean.binaryproto"
    mean_file.write_bytes(_blob(mean_image, legacy=True).SerializeToString())
    C.main(
        [str(proto), str(caffemodel), str(tmp_path / "out" / "tiny"), "--mean-file", str(mean_file)]
    )
    npz = tmp_path / "out" / "tiny.npz"
    meta = json.loads(npz.with_suffix(".json").read_text())
    assert meta["format"] == caffe_npz.SIDECAR_FORMAT
    assert [layer["name"] for layer in meta["spec"]["layers"]][:2] == ["conv1", "relu1"]
    with np.load(npz) as data:
        assert "params/conv1/kernel" in data.files and data["params/conv1/kernel"].shape == (
            3,
            3,
            3,
            8,
        )
    model, variables, info = caffe_npz.load_converted(npz)
    np.testing.assert_allclose(info["mean"], mean_image[0].mean(axis=(1, 2))[::-1], rtol=1e-6)
    np.testing.assert_array_equal(
        info["mean_image"], np.transpose(mean_image[0], (1, 2, 0))[..., ::-1]
    )
    # Per-pixel mean subtraction in Caffe == per-pixel mean image subtraction here (RGB).
    x = random_bgr(TINY_INPUT, seed=10)
    ref = tiny_reference(x - mean_image, blobs)
    rgb = np.transpose(x[:, ::-1], (0, 2, 3, 1))
    out, _ = model.apply(variables, rgb - info["mean_image"])
    assert_close(out, ref["prob"])
    m2, v2, _ = C.convert_caffe(proto, caffemodel)
    assert isinstance(m2, CaffeGraph) and m2.spec == model.spec
    jax.tree.map(np.testing.assert_array_equal, v2, variables)


def test_train_val_net_converts_like_its_deploy_form(tmp_path):
    """GoogLeNet-CAM for ImageNet ships only a train_val prototxt: data, loss and accuracy
    layers must be replaced / dropped and the data layer's mean_value used."""
    layers = tiny_layers()[:-1]  # without the deploy Softmax
    blobs = random_blobs(layers, seed=11)
    body = build_net(layers, TINY_INPUT)
    del body.input[:]
    del body.input_dim[:]
    data = """
layer { name: "data" type: "Data" top: "data" top: "label" include { phase: TRAIN }
  transform_param { mirror: true crop_size: 19 mean_value: 100 mean_value: 110 mean_value: 120 }
  data_param { source: "train_lmdb" batch_size: 64 backend: LMDB } }
layer { name: "data" type: "Data" top: "data" top: "label" include { phase: TEST }
  transform_param { crop_size: 16 mean_value: 100 mean_value: 110 mean_value: 120 }
  data_param { source: "val_lmdb" batch_size: 50 backend: LMDB } }
"""
    losses = """
layer { name: "loss" type: "SoftmaxWithLoss" bottom: "fc2" bottom: "label" top: "loss"
  loss_weight: 1 }
layer { name: "top-1" type: "Accuracy" bottom: "fc2" bottom: "label" top: "top-1"
  include { phase: TEST } }
"""
    proto = tmp_path / "train_val.prototxt"
    proto.write_text(data + text_format.MessageToString(body) + losses)
    caffemodel = tmp_path / "t.caffemodel"
    caffemodel.write_bytes(build_net(layers, TINY_INPUT, blobs=blobs).SerializeToString())
    with pytest.raises(ConversionError, match="'data' has unsupported type 'Data'"):
        C.convert_caffe(proto, caffemodel)
    model, variables, info = C.convert_caffe(proto, caffemodel, from_train_val=True)
    assert model.spec.inputs == (("data", (1, 3, 16, 16)),)  # the TEST phase crop
    assert model.spec.outputs == ("fc2",)
    assert info["mean"] == [120.0, 110.0, 100.0] and info["input_size"] == [16, 16]
    x = random_bgr((2, 3, 16, 16), seed=12)
    # 16 x 16 crops also give a 12 x 3 x 3 concat blob, so fc1's (10, 108) weights fit.
    ref = tiny_reference(x - np.array([100, 110, 120], np.float32)[None, :, None, None], blobs)
    out, _ = flax_forward(model, variables, info, x)
    assert_close(out, ref["fc2"])


@pytest.mark.real_data
def test_cam_authors_classifier_head_reproduces_their_scores(shared_data, tmp_path):
    """GoogLeNet-CAM's head (CAM_pool AVE 14 -> CAM_fc -> prob) written as a caffemodel with the
    authors' ``weights_LR`` reproduces their softmax scores for img1 up to the classifier bias,
    which their .mat files lack: log(score) - logit = b_c - logsumexp_n, so its difference
    between two crops is the same for all 1000 classes."""
    import scipy.io as scipy_io

    ref = require_path(shared_data / "cam_reference")
    net = scipy_io.loadmat(ref / "cam_googlenet_data_net.mat")
    img = scipy_io.loadmat(ref / "cam_googlenet_data_img1.mat")
    w = np.ascontiguousarray(net["weights_LR"].T)  # matcaffe (in, out) -> Caffe (out, in)
    feats = img["activation_lastconv"]  # matcaffe (W, H, C, N)
    scores = img["scores"].reshape(1000, -1).T  # (N, 1000)
    layers = [
        ("CAM_pool", "Pooling", ["CAM_conv"], ["CAM_pool"],
         {"pooling_param": {"pool": "AVE", "kernel_size": 14, "stride": 14}}, []),
        ("CAM_fc", "InnerProduct", ["CAM_pool"], ["CAM_fc"],
         {"inner_product_param": {"num_output": 1000}}, [(1000, 1024), (1000,)]),
        ("prob", "Softmax", ["CAM_fc"], ["prob"], {}, []),
    ]  # fmt: skip
    proto_msg = build_net(layers, (10, 1024, 14, 14))
    model_msg = build_net(layers, (10, 1024, 14, 14), blobs={"CAM_fc": [w, np.zeros(1000, "f4")]})
    proto_msg.input[0] = model_msg.input[0] = "CAM_conv"
    (tmp_path / "head.prototxt").write_text(text_format.MessageToString(proto_msg))
    (tmp_path / "head.caffemodel").write_bytes(model_msg.SerializeToString())
    model, variables, _ = C.convert_caffe(
        tmp_path / "head.prototxt", tmp_path / "head.caffemodel", rgb_input=False
    )
    _, inter = model.apply(variables, np.transpose(feats, (3, 1, 0, 2)))
    logits = np.asarray(inter["CAM_fc"], np.float64)
    want = feats.mean(axis=(0, 1), dtype=np.float64).T @ w.T.astype(np.float64)
    assert_close(logits, want)
    resid = np.log(scores.astype(np.float64)) - logits
    per_crop = resid - resid[:1]  # (N, 1000): L_0 - L_n, constant over classes
    assert float(np.abs(per_crop - per_crop.mean(axis=1, keepdims=True)).max()) < 1e-3
    assert int(np.asarray(inter["prob"]).mean(0).argmax()) == int(scores.mean(0).argmax())


def test_other_layer_types_match_reference(tmp_path):
    """Split, Eltwise (SUM with coeff, PROD, MAX), leaky ReLU, Sigmoid, TanH, global AVE
    pooling, a 4-D Softmax over channels, Flatten + InnerProduct; V1 format."""
    layers = [
        ("conv1", "Convolution", ["data"], ["conv1"],
         {"convolution_param": {"num_output": 4, "kernel_size": [3], "bias_term": False}},
         [(4, 3, 3, 3)]),
        ("split", "Split", ["conv1"], ["s1", "s2"], {}, []),
        ("leaky", "ReLU", ["s1"], ["s1"], {"relu_param": {"negative_slope": 0.1}}, []),
        ("sig", "Sigmoid", ["s2"], ["sig"], {}, []),
        ("tanh", "TanH", ["s2"], ["tanh"], {}, []),
        ("sum", "Eltwise", ["s1", "sig"], ["sum"],
         {"eltwise_param": {"operation": "SUM", "coeff": [2.0, -1.0]}}, []),
        ("prod", "Eltwise", ["sum", "tanh"], ["prod"], {"eltwise_param": {"operation": "PROD"}}, []),
        ("max", "Eltwise", ["prod", "s1"], ["max"], {"eltwise_param": {"operation": "MAX"}}, []),
        ("gap", "Pooling", ["max"], ["gap"],
         {"pooling_param": {"pool": "AVE", "global_pooling": True}}, []),
        ("cls", "Softmax", ["max"], ["cls"], {}, []),
        ("flat", "Flatten", ["cls"], ["flat"], {}, []),
        ("fc", "InnerProduct", ["flat"], ["fc"],
         {"inner_product_param": {"num_output": 3}}, [(3, 4 * 5 * 4), (3,)]),
    ]  # fmt: skip
    shape = (2, 3, 7, 6)
    blobs = random_blobs(layers, seed=13)
    proto, caffemodel = write_files(tmp_path, layers, shape, blobs, v1=True)
    model, variables, info = C.convert_caffe(proto, caffemodel)
    x = random_bgr(shape, seed=14)
    xc = x - MEAN_BGR[None, :, None, None]
    conv = ref_conv(xc, [blobs["conv1"][0], np.zeros(4)])
    s1 = np.where(conv > 0, conv, 0.1 * conv)
    sig, tanh = 1 / (1 + np.exp(-conv)), np.tanh(conv)
    mx = np.maximum((2 * s1 - sig) * tanh, s1)
    cls = ref_softmax(mx)
    out, inter = flax_forward(model, variables, info, x)
    assert_close(inter["s2"], conv)  # Split copies; the in-place ReLU only changed s1
    assert_close(inter["max"], mx)
    assert_close(inter["gap"], mx.mean(axis=(2, 3), keepdims=True))
    assert_close(inter["cls"], cls)
    assert_close(out, ref_ip(cls, blobs["fc"]))


def test_converted_caffe_net_as_pretrained_backbone(tmp_path):
    """`fgloc.pretrained("caffe", weights=npz)` serves a converted net to part discovery:
    its preprocessing, any blob as the layer, and the experiment's `caffe=PATH` backbone."""
    import fgloc
    from experiments import part_discovery_cub as E
    from fgloc.localize import parts as P

    layers = tiny_layers()
    blobs = random_blobs(layers, seed=21)
    proto, caffemodel = write_files(tmp_path, layers, TINY_INPUT, blobs)
    npz = C.main_convert(proto, caffemodel, tmp_path / "tiny.npz")
    pre = fgloc.pretrained("caffe", weights=npz)
    assert pre.input_size == TINY_INPUT[2] and pre.name == "caffe:tiny.npz"
    np.testing.assert_allclose(pre.mean, C.IMAGENET_MEAN_BGR[::-1])
    x = random_bgr(TINY_INPUT, seed=22)
    want = tiny_reference(x - np.asarray(C.IMAGENET_MEAN_BGR).reshape(1, 3, 1, 1), blobs)
    rgb = np.transpose(x[:, ::-1], (0, 2, 3, 1))
    out, _ = pre.model.apply(pre.variables, pre.preprocess(rgb))
    assert_close(out, want["prob"])
    # A blob past the default features blob: the feature function runs up to it.
    feat = P._feature_fn(pre, "pool2b")(pre.preprocess(rgb))
    assert_close(feat, want["pool2b"])
    ex = P.CentreExtractor(pre, "conv2", centre="argmax", input_size=24, chunk_size=6)
    centres = np.asarray(ex(np.full((2, 24, 24, 3), 100.0, np.float32)))
    assert centres.shape == (2, 6, 2) and ex.n_channels == 6
    assert E._net("caffe", str(npz)) is E._net("caffe", str(npz))
    assert "/" not in E._slug(f"caffe={npz}:pool5:227:gradient")
    with pytest.raises(ValueError, match="needs weights=PATH"):
        fgloc.pretrained("caffe")
    with pytest.raises(FileNotFoundError, match="nothere.npz"):
        fgloc.pretrained("caffe", weights=tmp_path / "nothere.npz")


def test_part_discovery_runs_on_a_converted_caffe_net(cub_dir, tmp_path):
    """End to end on real CUB images with a `caffe=PATH` candidate (synthetic weights)."""
    from experiments import common
    from experiments import part_discovery_cub as E

    layers = tiny_layers()
    proto, caffemodel = write_files(tmp_path, layers, TINY_INPUT, random_blobs(layers, seed=3))
    npz = C.main_convert(proto, caffemodel, tmp_path / "tiny.npz")
    config = str(common.CONFIG_DIR / "part_discovery_cub.py") + ":paper_caffenet"
    argv = ["--config", config, "--workdir", str(tmp_path / "w"), "--data_dir", str(cub_dir.parent)]
    cand = "--config.candidates.caffenet"
    argv += [f"--config.caffe_weights={npz}", f"{cand}.layer=conv2", f"{cand}.input_size=32"]
    argv += [
        f"{cand}.n_train=4",
        f"{cand}.n_test=2",
        "--config.gmm_iters=3",
        "--config.num_figure=0",
    ]
    m = common.main(E.run, argv)
    assert m["backbone"] == "caffe" and m["weights"] == str(npz) and m["layer"] == "conv2"
    assert m["candidates.caffenet"] == f"caffe={npz}:conv2:32:gradient"
    assert m["configs.paper_gmm.n_test"] == 2
    assert 0.0 < m["norm_part_error_bbox"] < 1.0
    assert 0.0 < m["train_oracle.caffenet.gmm"] < 1.0
