"""Why gradient-map centres find parts worse on EfficientNet-Lite0 than on AlexNet (issue 7).

Part discovery (``experiments/part_discovery_cub.py``) takes a channel's activation centre from
its gradient map ∂(Σ_ij f_k)/∂x. On AlexNet pool5 that works nearly as well as the channel's
activation map; on EfficientNet-Lite0 it is far worse (0.23–0.29 against 0.15–0.17 at stage 6,
README "Paper 1"). The issue asks whether ReLU6 saturation, layer depth or input size is the
cause. This module measures, per candidate layer (``config.candidates``: backbone, layer, input
size; presets in ``experiments/configs/gradient_spread.py``), on CUB box crops of the test split
(the frame part discovery uses):

1. **Gates** (forward pass, ``n_gate_images``): the share of units at the nonlinearities
   between the input and the layer that pass no gradient. Lite0: ReLU6 units at 0
   (pre-activation ≤ 0) and *saturated* ones (≥ 6), over the stem and every expansion and
   depthwise gate of the blocks up to the layer; AlexNet: ReLU units at 0 (conv1–conv5).
   ``identity_skips`` counts the residual connections on the way (gradient bypasses their gates).
2. **Spread** (``n_map_images``, every channel): the participation ratio of each channel's
   gradient map m (L2 over RGB), ``(Σm)² / (H·W·Σm²)``, the share of pixels the map effectively
   covers (1 = uniform, 1/(H·W) = one pixel); mean over images and channels.
3. **Displacement**: distance from the gradient map's centre of mass to the peak of the same
   channel's activation map (its cell centre, in input pixels), over the input size; median over
   images and the channels whose peak activation is > 0. Small = the gradient map points where
   the channel fires.

Command (2-core CPU, a few minutes)::

    nice -n 10 python -m experiments.gradient_spread --workdir W

Measured (2026-11-23, 551 s; ``results/gradient_spread.metrics.json``): ReLU6 saturation
1.2–1.6% of units; coverage 0.56 / 0.55 / 0.53 at Lite0 stages 4 / 5 / 6 (224) and 0.54 at
stage 6 (320), against 0.26 for AlexNet pool5, whose ReLUs block 73% of units to Lite0's
33–40%. So neither saturation, depth nor input size; the gradient passes more gates (and 9
identity skips) and spreads. README "Paper 1" has the table.

``metrics.json`` (``<cand>`` a key of ``config.candidates``): ``candidates.<cand>`` (its
``backbone:layer:input_size``), ``<cand>.participation_ratio``, ``<cand>.displacement``,
``<cand>.gates.zero``, ``<cand>.gates.saturated`` (Lite0 only), ``<cand>.gates.units``,
``<cand>.identity_skips``, ``<cand>.channels``, ``n_map_images``, ``n_gate_images``,
``seconds``.
"""

from __future__ import annotations

import contextlib
import functools
import pathlib
from collections.abc import Iterator
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from experiments import common
from fgloc.data.pipeline import crop_resize
from fgloc.localize import parts as P
from fgloc.models.layers import layer_output

__all__ = ["gate_stats", "participation_ratio", "run"]


def participation_ratio(m: jax.Array) -> jax.Array:
    """``(Σm)² / (H·W·Σm²)`` of a non-negative ``(..., H, W)`` map: ``(...)``; an all-zero map gives 0."""
    s = jnp.sum(m, axis=(-2, -1))
    s2 = jnp.sum(m * m, axis=(-2, -1))
    n = m.shape[-2] * m.shape[-1]
    return jnp.where(s2 > 0, s * s / (n * jnp.where(s2 > 0, s2, 1.0)), 0.0)


@contextlib.contextmanager
def _recording_relu6(log: list[tuple[int, int, int]]) -> Iterator[None]:
    """Patches Lite0's ``relu6`` to log ``(units, at zero, saturated)`` per call (eager only)."""
    from fgloc.models import efficientnet_lite as E

    original = E.relu6

    def relu6(x: jax.Array) -> jax.Array:
        v = np.asarray(x)
        log.append((v.size, int((v <= 0).sum()), int((v >= 6).sum())))
        return original(x)

    E.relu6 = relu6
    try:
        yield
    finally:
        E.relu6 = original


def gate_stats(pretrained: Any, layer: str, x: np.ndarray) -> dict[str, float]:
    """Gradient-blocking units between the (preprocessed) input ``x (B, S, S, 3)`` and ``layer``.

    Returns ``units`` (gate units counted), ``zero`` and, for EfficientNet-Lite, ``saturated``
    (shares of those units), and ``identity_skips`` (residual connections on the way).
    """
    from fgloc.models.efficientnet_lite import EfficientNetLite, block_specs

    model, variables = pretrained.model, pretrained.variables
    if isinstance(model, EfficientNetLite):  # stem, then per block (expansion), depthwise
        stage = int(layer.removeprefix("stage")) if layer.startswith("stage") else None
        if stage is None:
            raise ValueError(f"gate_stats: EfficientNet-Lite layer must be 'stageN', got {layer!r}")
        blocks = [b for b in block_specs(model.variant) if b[0] <= stage]
        n_gates = 1 + sum(2 if b[3] != 1 else 1 for b in blocks)
        log: list[tuple[int, int, int]] = []
        with _recording_relu6(log):
            model.apply(variables, jnp.asarray(x), method=model.features)
        units, zero, sat = np.asarray(log[:n_gates]).sum(axis=0)
        skips = sum(1 for b in blocks if b[2] == 1 and b[4] == b[5])
        return {
            "units": float(units),
            "zero": zero / units,
            "saturated": sat / units,
            "identity_skips": float(skips),
        }
    _, inter = model.apply(variables, jnp.asarray(x), method=model.features)
    names = [f"conv{i}" for i in range(1, 6)]
    if layer not in inter:
        raise KeyError(f"gate_stats: layer {layer!r} not among {sorted(inter)}")
    order = list(inter)
    upto = [n for n in names if n in inter and order.index(n) <= order.index(layer)]
    v = [np.asarray(inter[n]) for n in upto]
    units = float(sum(a.size for a in v))
    return {
        "units": units,
        "zero": float(sum((a <= 0).sum() for a in v)) / units,
        "identity_skips": 0.0,
    }


def _spread_fn(pretrained: Any, layer: str, size: int, chunk_size: int):
    from fgloc.maps.channel_gradients import channel_gradient_maps

    feature_fn = functools.partial(
        layer_output, pretrained.model, pretrained.variables, layer=layer
    )

    def map_stats(m: jax.Array) -> tuple[jax.Array, jax.Array]:
        return participation_ratio(m), P.map_centres(m, "mass")

    @jax.jit
    def run(raw: jax.Array) -> dict[str, jax.Array]:
        x = pretrained.preprocess(raw)
        pr, com = channel_gradient_maps(
            feature_fn, x, chunk_size=chunk_size, reduce="l2", map_fn=map_stats
        )
        f = feature_fn(x)  # (B, h, w, K)
        b, h, w, k = f.shape
        flat = f.reshape(b, h * w, k)
        idx = jnp.argmax(flat, axis=1)  # (B, K)
        peak = jnp.stack([(idx % w + 0.5) * size / w, (idx // w + 0.5) * size / h], -1)
        return {
            "pr": pr,
            "dist": jnp.linalg.norm(com - peak, axis=-1) / size,
            "fires": jnp.max(flat, axis=1) > 0,
        }

    return run


def run(config: ml_collections.ConfigDict, data_dir: pathlib.Path, workdir: pathlib.Path):
    import fgloc
    from fgloc.data.cub import read_cub
    from fgloc.data.images import load_image

    root = common.resolve_data_dir(data_dir, "CUB_200_2011", ("images.txt", "parts"))
    ann = read_cub(root)
    test = np.flatnonzero(~ann.is_train)
    n = max(config.n_map_images, config.n_gate_images)
    if n < 1 or n > len(test):
        raise ValueError(f"n_map_images / n_gate_images must be in 1..{len(test)}, got {n}")
    ids = test[np.linspace(0, len(test) - 1, n).round().astype(int)]  # spread over classes
    photos = [load_image(ann.paths[i]) for i in ids]
    metrics: dict[str, Any] = {
        "n_map_images": config.n_map_images,
        "n_gate_images": config.n_gate_images,
    }
    nets: dict[str, Any] = {}
    for cand, spec in config.candidates.items():
        backbone, layer, size = spec.backbone, spec.layer, int(spec.input_size)
        metrics[f"candidates.{cand}"] = f"{backbone}:{layer}:{size}"
        if backbone not in nets:
            nets[backbone] = fgloc.pretrained(backbone)
        pre = nets[backbone]
        raw = np.stack([crop_resize(p, ann.boxes[i], size)[0] for p, i in zip(photos, ids)])
        g = gate_stats(pre, layer, np.asarray(pre.preprocess(raw[: config.n_gate_images])))
        for key, value in g.items():
            name = "identity_skips" if key == "identity_skips" else f"gates.{key}"
            metrics[f"{cand}.{name}"] = value
        fn = _spread_fn(pre, layer, size, config.chunk_size)
        out = [jax.device_get(fn(raw[i : i + 1])) for i in range(config.n_map_images)]
        pr = np.concatenate([o["pr"] for o in out])
        dist = np.concatenate([o["dist"] for o in out])
        fires = np.concatenate([o["fires"] for o in out])
        metrics[f"{cand}.participation_ratio"] = float(pr.mean())
        metrics[f"{cand}.displacement"] = float(np.median(dist[fires])) if fires.any() else None
        metrics[f"{cand}.channels"] = int(pr.shape[1])
        print(
            f"{cand}: PR {pr.mean():.3f}, displacement {metrics[f'{cand}.displacement']}, "
            f"gates zero {g['zero']:.3f}, saturated {g.get('saturated', 0.0):.4f}",
            flush=True,
        )
    return metrics


if __name__ == "__main__":
    common.main(run)
