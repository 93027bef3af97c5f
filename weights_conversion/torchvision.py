"""torchvision state dicts -> Flax variables for ``fgloc.models`` (VGG16, AlexNet, GoogLeNet,
ResNet-50). Pure ``dict -> pytree``; files are read without torch (``torch_pickle``).

Key mapping (torch key -> Flax path, then the leaf):

* ``vgg16``: ``features.{0,2,5,…,28}`` -> ``conv1_1``…``conv5_3``; ``classifier.0`` -> ``fc6``,
  ``classifier.3`` -> ``fc7``, ``classifier.6`` -> ``classifier``.
* ``alexnet``: ``features.{0,3,6,8,10}`` -> ``conv1``…``conv5``; ``classifier.1`` -> ``fc6``,
  ``classifier.4`` -> ``fc7``, ``classifier.6`` -> ``classifier``.
* ``googlenet`` / ``resnet50``: ``.`` -> ``/`` with numeric indices joined to the name before
  (``inception3a.branch2.0.conv`` -> ``inception3a/branch2_0/conv``, ``layer1.0.downsample.1`` ->
  ``layer1_0/downsample_1``), ``fc`` -> ``classifier``. GoogLeNet's ``aux1.*`` / ``aux2.*``
  (training-only auxiliary heads) are dropped.
* leaves: ``weight`` -> ``kernel`` (conv, Linear) or ``scale`` (BatchNorm), ``bias`` -> ``bias``,
  ``running_mean`` / ``running_var`` -> ``batch_stats/…/mean`` / ``var``,
  ``num_batches_tracked`` dropped.

Layout changes, all in :func:`to_flax_layout`: conv ``(O, I, kh, kw)`` -> ``(kh, kw, I, O)``;
``Linear`` ``(out, in)`` -> ``(in, out)``; a ``Linear`` whose Flax target is a convolution
(VGG/AlexNet fc6, fed by torch's NCHW flatten of ``(C, kh, kw)``; fc7) is reshaped to
``(out, C, kh, kw)`` and transposed like a conv, which is how the NCHW flatten order is handled.
The result is checked by :func:`fgloc.weights.io.strict_merge` against the model template.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from fgloc import registry
from fgloc.models.vgg import VGG16_CONV_NAMES
from fgloc.weights.io import ConversionError, flatten, strict_merge
from fgloc.weights.torch_pickle import load_torch_checkpoint

#: name -> constructor ``(num_classes) -> flax Module``, from the registry (`fgloc.registry`).
#: GoogLeNet is built with ``transform_input=True``, as torchvision does for its ImageNet
#: weights (the usual file to convert); pass ``model=GoogLeNet(transform_input=False)`` for a
#: randomly initialised one.
ARCHITECTURES: dict[str, Callable[..., nn.Module]] = {
    arch: registry.get(arch).build for arch in ("vgg16", "alexnet", "googlenet", "resnet50")
}

_VGG16_FEATURE_IDX = (0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28)
_MODULE_MAPS: dict[str, dict[str, str]] = {
    "vgg16": {
        **{f"features.{i}": n for i, n in zip(_VGG16_FEATURE_IDX, VGG16_CONV_NAMES)},
        "classifier.0": "fc6",
        "classifier.3": "fc7",
        "classifier.6": "classifier",
    },
    "alexnet": {
        **{f"features.{i}": f"conv{k + 1}" for k, i in enumerate((0, 3, 6, 8, 10))},
        "classifier.1": "fc6",
        "classifier.4": "fc7",
        "classifier.6": "classifier",
    },
}
#: torch key of each architecture's final Linear weight (to infer ``num_classes``).
CLASSIFIER_KEYS = {
    "vgg16": "classifier.6.weight",
    "alexnet": "classifier.6.weight",
    "googlenet": "fc.weight",
    "resnet50": "fc.weight",
}
_DROPPED_PREFIXES = {"googlenet": ("aux1.", "aux2.")}


def _check_arch(arch: str) -> None:
    if arch not in ARCHITECTURES:
        raise ValueError(f"arch must be one of {sorted(ARCHITECTURES)}, got {arch!r}")


def flax_module_path(arch: str, torch_module: str) -> str:
    """Flax module path (``"/"``-joined) of a torch module name, e.g. ``layer1.0.conv1`` ->
    ``layer1_0/conv1``; unknown VGG/AlexNet modules are returned unchanged (so that
    :func:`strict_merge` reports them as unexpected)."""
    if arch in _MODULE_MAPS:
        return _MODULE_MAPS[arch].get(torch_module, torch_module)
    path = re.sub(r"\.(\d+)", r"_\1", torch_module).replace(".", "/")
    return "classifier" if path == "fc" else path


def to_flax_layout(w: Any, target_shape: tuple[int, ...] | None) -> Any:
    """torch weight -> Flax layout, given the Flax target shape (``None``: unknown key).

    Works on numpy arrays and on JAX arrays / tracers (method calls only), so the whole
    conversion can be traced by ``jax.eval_shape``.
    """
    if target_shape is None:
        return w
    if w.ndim == 4:  # conv (O, I, kh, kw) -> (kh, kw, I, O)
        return w.transpose(2, 3, 1, 0)
    if w.ndim == 2 and len(target_shape) == 2:  # Linear (out, in) -> (in, out)
        return w.T
    if w.ndim == 2 and len(target_shape) == 4:  # Linear as a conv: NCHW flatten of (C, kh, kw)
        kh, kw, c, o = target_shape
        if tuple(w.shape) == (o, c * kh * kw):
            return w.reshape(o, c, kh, kw).transpose(2, 3, 1, 0)
    return w


def convert_flat(
    arch: str, state_dict: Mapping[str, Any], template: Mapping[str, Any]
) -> dict[str, Any]:
    """Rename and re-layout a torchvision state dict into flat ``"collection/a/b/leaf"`` keys.

    ``template`` is the model's (abstract) variables; it decides BatchNorm vs conv leaves and
    the target layouts. Keys that do not map are kept under their torch name (prefixed
    ``"torch:"``) so :func:`strict_merge` lists them as unexpected.
    """
    _check_arch(arch)
    want = {k: tuple(v.shape) for k, v in flatten(template).items()}
    dropped = _DROPPED_PREFIXES.get(arch, ())
    out: dict[str, Any] = {}
    for key, value in state_dict.items():
        if key.startswith(dropped) or key.endswith("num_batches_tracked"):
            continue
        module, _, leaf = key.rpartition(".")
        path = flax_module_path(arch, module)
        if leaf == "running_mean":
            flax_key = f"batch_stats/{path}/mean"
        elif leaf == "running_var":
            flax_key = f"batch_stats/{path}/var"
        elif leaf == "weight":
            is_bn = f"params/{path}/scale" in want
            flax_key = f"params/{path}/{'scale' if is_bn else 'kernel'}"
        elif leaf == "bias":
            flax_key = f"params/{path}/bias"
        else:
            flax_key = f"torch:{key}"
        if flax_key not in want:
            out[f"torch:{key}"] = value
            continue
        out[flax_key] = to_flax_layout(value, want[flax_key])
    return out


def model_template(model: nn.Module, size: int = 224) -> Any:
    """Abstract variables (``jax.ShapeDtypeStruct`` leaves) of ``model`` at a ``size`` input."""
    rngs = {"params": jax.random.key(0), "dropout": jax.random.key(1)}
    return jax.eval_shape(model.init, rngs, jnp.zeros((1, size, size, 3), jnp.float32))


def convert_state_dict(
    arch: str,
    state_dict: Mapping[str, Any],
    num_classes: int | None = 1000,
    *,
    model: nn.Module | None = None,
    source: str = "state dict",
) -> dict[str, Any]:
    """torchvision ``state_dict`` (numpy arrays) -> Flax variables ``{"params", ["batch_stats"]}``.

    Args:
      arch: ``"vgg16"``, ``"alexnet"``, ``"googlenet"`` or ``"resnet50"``.
      state_dict: ``{torch key: array}`` as saved by ``model.state_dict()``.
      num_classes: classifier width of ``ARCHITECTURES[arch]`` (``None``: conv-only VGG16 /
        AlexNet, or a GoogLeNet / ResNet without classifier).
      model: use this module's template instead (e.g. a tiny ``ResNet`` in tests, or
        ``GoogLeNet(transform_input=False)``); its parameter names must follow ``arch``.
      source: name used in error messages (the file path).

    Raises:
      ConversionError: listing every missing, unexpected or mis-shaped key.
    """
    _check_arch(arch)
    if model is None:
        model = ARCHITECTURES[arch](num_classes)
    template = model_template(model)
    return strict_merge(template, convert_flat(arch, state_dict, template), source=source)


def infer_num_classes(arch: str, state_dict: Mapping[str, Any]) -> int | None:
    """Classifier width stored in a torchvision state dict (``None`` if it has no classifier)."""
    _check_arch(arch)
    w = state_dict.get(CLASSIFIER_KEYS[arch])
    return None if w is None else int(w.shape[0])


def convert_file(arch: str, path: str | os.PathLike, *, model: nn.Module | None = None) -> Any:
    """Read a torchvision ``.pth`` (zip or legacy format, no torch needed) and convert it.

    ``num_classes`` is taken from the checkpoint's classifier weight.
    """
    state_dict = load_torch_checkpoint(path)
    try:
        num_classes = infer_num_classes(arch, state_dict)
        return convert_state_dict(
            arch, state_dict, num_classes, model=model, source=os.fspath(path)
        )
    except ConversionError as e:
        raise ConversionError(f"{e}\n  (converting {arch} from {os.fspath(path)})") from None
