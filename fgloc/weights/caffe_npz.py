"""Run-time loading of a converted Caffe net (what `fgloc.pretrained("caffe", weights=...)`
reads): the ``.npz`` of variables written by ``fgloc convert --from caffe`` and its ``.json``
sidecar (net spec + preprocessing). The converter itself (protobuf parsing, blob layout) is
offline, in ``weights_conversion/caffe.py``; this module needs no protobuf.
"""

from __future__ import annotations

import json
import os
import pathlib
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from fgloc.models.caffe_graph import CaffeGraph, NetSpec
from fgloc.weights.io import ConversionError, strict_merge, unflatten

__all__ = [
    "SIDECAR_FORMAT",
    "load_converted",
    "make_preprocess",
    "sidecar_path",
    "template_variables",
]

PathLike = str | os.PathLike
SIDECAR_FORMAT = "fgloc-caffe/1"


def template_variables(module: CaffeGraph) -> dict[str, Any]:
    """Shapes of the module's variables (``jax.ShapeDtypeStruct``), from the spec's input."""
    _, (_, c, h, w) = module.spec.inputs[0]
    dummy = jax.ShapeDtypeStruct((1, h, w, c), jnp.float32)
    return jax.eval_shape(module.init, jax.random.key(0), dummy)


def make_preprocess(info: Mapping[str, Any]) -> Callable[[Any], jax.Array]:
    """Raw RGB pixels ``(..., H, W, 3)`` in [0, 255] -> network input (float32, same shape).

    Reverses to BGR when the model was converted with ``rgb_input=False``; subtracts the
    per-channel ``mean`` (not a per-pixel mean image); multiplies by ``scale``.
    """
    mean = jnp.asarray(info["mean"], jnp.float32)
    scale = float(info.get("scale", 1.0))
    bgr = info["channel_order"] == "BGR"

    def preprocess(images: Any) -> jax.Array:
        x = jnp.asarray(images, jnp.float32)
        if bgr:
            x = x[..., ::-1]
        return (x - mean.reshape((1,) * (x.ndim - 1) + (-1,))) * scale

    return preprocess


def sidecar_path(npz: pathlib.Path) -> pathlib.Path:
    return npz.with_suffix(".json")


def load_converted(npz: PathLike) -> tuple[CaffeGraph, dict[str, Any], dict[str, Any]]:
    """Read what :func:`main_convert` wrote -> ``(CaffeGraph, variables, preprocess_info)``."""
    npz = pathlib.Path(npz)
    side = sidecar_path(npz)
    if not side.is_file():
        raise ConversionError(f"{npz}: sidecar {side.name} (net spec + preprocessing) not found")
    meta = json.loads(side.read_text(encoding="utf-8"))
    if meta.get("format") != SIDECAR_FORMAT:
        raise ConversionError(f"{side}: format {meta.get('format')!r}, expected {SIDECAR_FORMAT}")
    model = CaffeGraph(NetSpec.from_json(meta["spec"]))
    with np.load(npz) as data:
        flat = {k: data[k] for k in data.files}
    variables = strict_merge(template_variables(model), unflatten(flat), source=str(npz))
    info = dict(meta["preprocess"])
    if "mean_image_file" in info:
        info["mean_image"] = np.load(npz.with_name(info["mean_image_file"]))
    return model, variables, info
