"""Strict merging of converted weights into a model's variable template, and layout helpers.

After big_vision's ``merge_params``: a converter produces a flat ``{"collection/a/b": array}``
dict, and :func:`strict_merge` checks it against the template from ``model.init`` (or
``jax.eval_shape`` of it). Any missing key, unexpected key or shape mismatch is an error that
names the key, so a wrong checkpoint can never load silently.
"""

from __future__ import annotations

import os
import pathlib
from collections.abc import Mapping
from typing import Any

import numpy as np

from fgloc.cache import save_npz


class ConversionError(ValueError):
    """A checkpoint does not fit the model it is converted to (the message names the keys)."""


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested mapping -> ``{"a/b/c": leaf}``."""
    out: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}/{key}" if prefix else str(key)
        if isinstance(value, Mapping):
            out.update(flatten(value, name))
        else:
            out[name] = value
    return out


def unflatten(flat: Mapping[str, Any]) -> dict[str, Any]:
    """``{"a/b/c": leaf}`` -> nested dict (inverse of :func:`flatten`)."""
    tree: dict[str, Any] = {}
    for name, value in flat.items():
        node = tree
        *parents, leaf = name.split("/")
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConversionError(f"key {name!r} collides with a leaf at {part!r}")
        node[leaf] = value
    return tree


def strict_merge(
    template: Mapping[str, Any], converted: Mapping[str, Any], *, source: str = "checkpoint"
) -> dict[str, Any]:
    """Check ``converted`` against ``template`` key by key and return it as a nested dict.

    Args:
      template: nested variables (arrays or ``jax.ShapeDtypeStruct``), e.g. from
        ``jax.eval_shape(model.init, ...)``.
      converted: nested or flat (``"/"``-joined) mapping of numpy arrays.
      source: a name for the checkpoint, used in error messages (e.g. its path).

    Returns:
      Nested dict of float32 numpy arrays with exactly the template's keys and shapes.

    Raises:
      ConversionError: listing every missing key, unexpected key and shape mismatch.
    """
    want = flatten(template)
    have = flatten(converted)
    missing = sorted(set(want) - set(have))
    unexpected = sorted(set(have) - set(want))
    mismatched = [
        f"{k}: checkpoint {tuple(np.shape(have[k]))} vs model {tuple(want[k].shape)}"
        for k in sorted(set(want) & set(have))
        if tuple(np.shape(have[k])) != tuple(want[k].shape)
    ]
    if missing or unexpected or mismatched:
        lines = [f"{source} does not match the model:"]
        if missing:
            lines.append(f"  missing keys ({len(missing)}): " + ", ".join(missing[:20]))
        if unexpected:
            lines.append(f"  unexpected keys ({len(unexpected)}): " + ", ".join(unexpected[:20]))
        if mismatched:
            lines.append(f"  shape mismatches ({len(mismatched)}): " + "; ".join(mismatched[:20]))
        raise ConversionError("\n".join(lines))
    out = {k: np.asarray(have[k], dtype=np.dtype(want[k].dtype)) for k in want}
    return unflatten(out)


# ---------------------------------------------------------------------------- layout helpers
def conv_oihw_to_hwio(w: np.ndarray) -> np.ndarray:
    """PyTorch / Caffe conv kernel ``(O, I/groups, kh, kw)`` -> Flax ``(kh, kw, I/groups, O)``.

    A depthwise kernel ``(C, 1, k, k)`` becomes ``(k, k, 1, C)``, the layout Flax uses with
    ``feature_group_count=C``.
    """
    if w.ndim != 4:
        raise ConversionError(f"expected a 4-d conv kernel, got shape {w.shape}")
    return np.ascontiguousarray(np.transpose(w, (2, 3, 1, 0)))


def dense_oi_to_io(w: np.ndarray) -> np.ndarray:
    """PyTorch / Caffe fully connected weight ``(out, in)`` -> Flax ``(in, out)``."""
    if w.ndim != 2:
        raise ConversionError(f"expected a 2-d dense weight, got shape {w.shape}")
    return np.ascontiguousarray(w.T)


def dense_nchw_flatten_to_nhwc(w: np.ndarray, c: int, h: int, wd: int) -> np.ndarray:
    """Reorder the input axis of an FC weight ``(out, C*H*W)`` fed by an NCHW flatten so that it
    accepts an NHWC flatten, and transpose to Flax ``(H*W*C, out)``."""
    out = w.shape[0]
    if w.shape[1] != c * h * wd:
        raise ConversionError(f"FC weight {w.shape} does not match flatten of C={c},H={h},W={wd}")
    w = w.reshape(out, c, h, wd).transpose(0, 2, 3, 1).reshape(out, h * wd * c)
    return np.ascontiguousarray(w.T)


def batchnorm(torch_prefix: str, flax_path: str, state: Mapping[str, np.ndarray]) -> dict:
    """torch BatchNorm ``{prefix}.weight/bias/running_mean/running_var`` -> flat Flax entries
    ``params/{flax_path}/scale|bias`` and ``batch_stats/{flax_path}/mean|var``
    (``num_batches_tracked`` is dropped)."""
    return {
        f"params/{flax_path}/scale": state[f"{torch_prefix}.weight"],
        f"params/{flax_path}/bias": state[f"{torch_prefix}.bias"],
        f"batch_stats/{flax_path}/mean": state[f"{torch_prefix}.running_mean"],
        f"batch_stats/{flax_path}/var": state[f"{torch_prefix}.running_var"],
    }


def save_variables(path: str | os.PathLike, variables: Mapping[str, Any]) -> None:
    """Save a variables pytree as ``.npz`` with ``"/"``-joined keys (atomic rename)."""
    save_npz(path, {k: np.asarray(v) for k, v in flatten(variables).items()})


def load_variables(path: str | os.PathLike) -> dict[str, Any]:
    """Inverse of :func:`save_variables`."""
    with np.load(pathlib.Path(path), allow_pickle=False) as data:
        return unflatten({k: data[k] for k in data.files})
