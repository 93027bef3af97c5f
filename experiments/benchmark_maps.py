"""Benchmark: cost of CAM, sensitivity and channel-gradient maps as multiples of a forward pass.

Measures, on the machine it runs on (all functions `jax.jit`-ed, one warm-up call, then the
median of ``repeats`` timed calls with ``block_until_ready``):

* ``forward``: logits of EfficientNet-Lite0 (``fgloc.pretrained("efficientnet_lite0")``) at
  224 × 224, batch 1 and 16;
* ``cam``: forward + top-``cam_top_k`` classes + CAMs (`fgloc.maps.class_activation_maps`) +
  upsampling to 224 (`fgloc.maps.resize_maps`) + paper boxes (`boxes_from_maps`);
* ``sensitivity``: forward + top-``sensitivity_top_k`` sensitivity maps (`fgloc.maps.sensitivity_maps`);
* ``channel_grad``: channel-gradient maps (`fgloc.maps.channel_gradient_maps`) of layer
  ``stage5`` (112 channels, 14 × 14) — all 112 at batch 1, ``channels_b16`` of them at batch 16
  — reported as images × channels per second; and, in the same run, a baseline that loops in
  Python over the first ``loop_channels`` channels calling a jitted ``jax.grad`` of
  ``Σ_{x,y} f_k`` per channel (each call its own forward), the naive way to write it; and the
  same channel maps with the chunks in an XLA while loop (``loop="scan"``) instead of unrolled
  (``scan_s``, ``unrolled_vs_scan_wall``);
* the same channel-gradient pair for AlexNet pool5 (``alexnet_lpips``, 256 channels, paper 1's
  layer) at batch 1 when that entry loads.

Each time is recorded twice: wall seconds and this process's CPU seconds (all threads), the
latter far less disturbed by other jobs on a shared machine. ``*_x_forward_cpu`` is the map's
CPU time divided by a forward pass's CPU time at the same batch size.

Run (measured on the shared 2-core CPU at load average ≈ 20: the full run ≈ 25 minutes, most of
it the per-channel loop baseline at batch 16; ``--quick`` 185 s at load ≈ 14)::

    nice -n 10 python -m experiments.benchmark_maps --out /tmp/benchmark_maps.json [--quick]
    python -m experiments.benchmark_maps --out F.json --alexnet_only   # AlexNet pair, ~2 min
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import pathlib
import platform
import statistics
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

import fgloc
from fgloc.localize.boxes import boxes_from_maps
from fgloc.maps import (
    channel_gradient_maps,
    class_activation_maps,
    resize_maps,
    sensitivity_maps,
    top_classes,
)


def get_config(quick: bool = False) -> ml_collections.ConfigDict:
    """Benchmark settings; ``quick`` is the seconds-long smoke setting."""
    c = ml_collections.ConfigDict()
    c.model = "efficientnet_lite0"
    c.image_size = 224
    c.batch_sizes = (1, 16)
    c.cam_top_k = 5  # CAMs for the top-5 classes (the paper's top-5 localisation)
    c.sensitivity_top_k = 1  # sensitivity maps of the top class (paper 004); T VJPs cost ~T x
    c.layer = "stage5"
    c.channels_b1 = 32  # channel-gradient maps at batch 1: first N channels (0 = all)
    c.channels_b16 = 4  # ... at batch > 1
    c.loop_channels = 4  # the per-channel Python-loop baseline runs over the first N channels
    c.max_vjps_per_chunk = 32  # chunk_size = max(1, this // batch): bounds peak memory
    c.alexnet = "alexnet_lpips"  # "" to skip
    c.alexnet_layer = "pool5"
    c.repeats = 2
    c.seed = 0
    if quick:
        c.image_size = 64
        c.batch_sizes = (1, 2)
        c.channels_b1 = 8
        c.channels_b16 = 4
        c.loop_channels = 2
        c.alexnet = ""
        c.repeats = 1
    return c


def _time(fn: Callable[[], Any], repeats: int) -> tuple[float, float]:
    """Median ``(wall seconds, process CPU seconds)`` of ``fn()`` (results blocked on) after one
    warm-up call. CPU time sums all of this process's threads; on a shared machine it is far
    less disturbed by other jobs than wall time."""
    jax.block_until_ready(fn())
    walls, cpus = [], []
    for _ in range(repeats):
        wall, cpu = time.perf_counter(), time.process_time()
        jax.block_until_ready(fn())
        walls.append(time.perf_counter() - wall)
        cpus.append(time.process_time() - cpu)
    return statistics.median(walls), statistics.median(cpus)


def _channel_pair(
    feature_fn: Callable[[jax.Array], jax.Array],
    x: jax.Array,
    channels: np.ndarray,
    loop_channels: int,
    chunk_size: int,
    repeats: int,
) -> dict[str, float]:
    """vmapped-chunked `channel_gradient_maps` over ``channels`` vs a Python loop of
    per-channel `jax.grad` over the first ``loop_channels`` of them (compared per image·channel).
    """
    vmapped = jax.jit(
        functools.partial(channel_gradient_maps, feature_fn, chunk_size=chunk_size, reduce="l2")
    )
    ids = jnp.asarray(channels, jnp.int32)
    t_vmap, c_vmap = _time(lambda: vmapped(x, ids), repeats)
    # the same chunks sequenced by an XLA while loop (lax.map) instead of unrolled
    scanned = jax.jit(
        functools.partial(
            channel_gradient_maps, feature_fn, chunk_size=chunk_size, reduce="l2", loop="scan"
        )
    )
    t_scan, c_scan = _time(lambda: scanned(x, ids), repeats)

    @jax.jit
    def one_channel(img: jax.Array, k: jax.Array) -> jax.Array:
        grad = jax.grad(lambda z: jnp.sum(feature_fn(z)[..., k]))(img)
        return jnp.sqrt(jnp.sum(jnp.square(grad), axis=-1))

    loop_ids = channels[: max(1, loop_channels)]

    def loop() -> list[jax.Array]:
        return [one_channel(x, jnp.int32(k)) for k in loop_ids]

    # same numbers both ways (guards the benchmark against measuring different work)
    a = np.asarray(vmapped(x, ids))[:, : len(loop_ids)]
    b = np.stack([np.asarray(m) for m in loop()], axis=1)
    np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-5 * float(np.abs(b).max()))
    t_loop, c_loop = _time(loop, repeats)
    n_vmap, n_loop = x.shape[0] * len(channels), x.shape[0] * len(loop_ids)
    return {
        "channels": len(channels),
        "chunk_size": chunk_size,
        "vmapped_s": t_vmap,
        "vmapped_cpu_s": c_vmap,
        "vmapped_image_channels_per_s": n_vmap / t_vmap,
        "vmapped_image_channels_per_cpu_s": n_vmap / c_vmap,
        "chunks": -(-len(channels) // chunk_size),
        "scan_s": t_scan,
        "scan_cpu_s": c_scan,
        "unrolled_vs_scan_wall": t_scan / t_vmap,
        "loop_channels": len(loop_ids),
        "loop_s": t_loop,
        "loop_cpu_s": c_loop,
        "loop_image_channels_per_s": n_loop / t_loop,
        "loop_image_channels_per_cpu_s": n_loop / c_loop,
        "speedup_vs_loop_wall": (n_vmap / t_vmap) / (n_loop / t_loop),
        "speedup_vs_loop_cpu": (n_vmap / c_vmap) / (n_loop / c_loop),
    }


def run(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """Runs every measurement; returns the nested result dict written as JSON."""
    cfg: Any = config  # ConfigDict fields are untyped
    p = fgloc.pretrained(cfg.model)
    model, variables = p.model, p.variables
    rng = np.random.default_rng(cfg.seed)
    size = int(cfg.image_size)
    k_cam, k_sens = int(cfg.cam_top_k), int(cfg.sensitivity_top_k)
    results: dict[str, Any] = {
        "config": cfg.to_dict(),
        "machine": {
            "platform": platform.platform(),
            "cpu_count": os.cpu_count(),
            "jax_backend": jax.default_backend(),
            "jax_version": jax.__version__,
            "loadavg_at_start": os.getloadavg(),
            "note": "shared 2-core CPU with other jobs running: timings are noisy",
        },
    }

    def features_fn(x: jax.Array) -> jax.Array:
        return model.apply(variables, x, method=model.features)[0]

    def logits_fn(x: jax.Array) -> jax.Array:
        return model.apply(variables, x)[0]

    kernel = variables["params"]["classifier"]["kernel"]

    @jax.jit
    def forward(x: jax.Array) -> jax.Array:
        return logits_fn(x)

    @jax.jit
    def cam(x: jax.Array) -> tuple[jax.Array, jax.Array]:
        fmap = features_fn(x)
        logits = model.apply(variables, fmap.mean(axis=(1, 2)), method=model.head)
        cams = class_activation_maps(fmap, kernel, top_classes(logits, k_cam))
        up = resize_maps(cams, (size, size))
        return up, boxes_from_maps(up[:, 0])

    @jax.jit
    def sensitivity(x: jax.Array) -> jax.Array:
        return sensitivity_maps(logits_fn, x, top_classes(logits_fn(x), k_sens), reduce="max")

    def layer_fn(x: jax.Array) -> jax.Array:
        return model.apply(variables, x, method=model.features)[1][cfg.layer]

    batch_sizes: Any = cfg.batch_sizes
    for batch in batch_sizes:
        raw = rng.integers(0, 256, size=(batch, size, size, 3), dtype=np.uint8)
        x = jnp.asarray(p.preprocess(raw))
        t_fwd, c_fwd = _time(lambda x=x: forward(x), cfg.repeats)
        entry: dict[str, Any] = {
            "forward_s": t_fwd,
            "forward_cpu_s": c_fwd,
            "forward_images_per_s": batch / t_fwd,
        }
        for name, fn in ((f"cam_top{k_cam}", cam), (f"sensitivity_top{k_sens}", sensitivity)):
            t, c = _time(lambda fn=fn, x=x: fn(x), cfg.repeats)
            entry[f"{name}_s"] = t
            entry[f"{name}_cpu_s"] = c
            entry[f"{name}_images_per_s"] = batch / t
            entry[f"{name}_x_forward_wall"] = t / t_fwd
            entry[f"{name}_x_forward_cpu"] = c / c_fwd
        num_channels = int(jax.eval_shape(layer_fn, x).shape[-1])
        n_ch = int(cfg.channels_b1 if batch == 1 else cfg.channels_b16) or num_channels
        n_ch = min(n_ch, num_channels)
        chunk = max(1, int(cfg.max_vjps_per_chunk) // batch)
        pair = _channel_pair(layer_fn, x, np.arange(n_ch), cfg.loop_channels, chunk, cfg.repeats)
        pair["vmapped_x_forward_per_channel_cpu"] = pair["vmapped_cpu_s"] / (n_ch * c_fwd)
        entry[f"channel_grad_{cfg.layer}"] = pair
        results[f"{cfg.model}_batch{batch}"] = entry
        print(json.dumps({f"{cfg.model}_batch{batch}": entry}, indent=1), flush=True)

    if cfg.alexnet:
        try:
            a = fgloc.pretrained(cfg.alexnet)
        except Exception as err:  # an optional extra; record why it was skipped
            results["alexnet"] = {"skipped": f"{type(err).__name__}: {err}"}
        else:
            am, av = a.model, a.variables
            raw = rng.integers(0, 256, size=(1, size, size, 3), dtype=np.uint8)
            x = jnp.asarray(a.preprocess(raw))

            def alex_layer(z: jax.Array) -> jax.Array:
                return am.apply(av, z, method=am.features)[1][cfg.alexnet_layer]

            alex_fwd = jax.jit(alex_layer)
            t_fwd, c_fwd = _time(lambda: alex_fwd(x), cfg.repeats)
            n_ch = int(jax.eval_shape(alex_layer, x).shape[-1])
            try:
                pair = _channel_pair(
                    alex_layer, x, np.arange(n_ch), cfg.loop_channels, cfg.max_vjps_per_chunk, 1
                )
            except ValueError as err:  # e.g. a layer that does not support reverse-mode AD
                pair = {"error": f"{type(err).__name__}: {str(err).splitlines()[0]}"}
                results[f"{cfg.alexnet}_{cfg.alexnet_layer}_batch1"] = pair
                return results
            pair["forward_to_layer_s"] = t_fwd
            pair["forward_to_layer_cpu_s"] = c_fwd
            pair["vmapped_x_forward_per_channel_cpu"] = pair["vmapped_cpu_s"] / (n_ch * c_fwd)
            results[f"{cfg.alexnet}_{cfg.alexnet_layer}_batch1"] = pair
            print(json.dumps({"alexnet": pair}, indent=1), flush=True)
    results["machine"]["loadavg_at_end"] = os.getloadavg()
    return results


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--out", type=pathlib.Path, required=True, help="JSON file to write")
    parser.add_argument("--quick", action="store_true", help="seconds-long smoke setting")
    parser.add_argument(
        "--alexnet_only", action="store_true", help="only the AlexNet pool5 channel-map pair"
    )
    args = parser.parse_args(argv)
    start = time.perf_counter()
    config = get_config(quick=args.quick)
    if args.alexnet_only:
        config.batch_sizes = ()
        if not config.alexnet:
            parser.error("--alexnet_only needs the AlexNet entry, which --quick drops")
    results = run(config)
    results["total_seconds"] = time.perf_counter() - start
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {args.out} ({results['total_seconds']:.0f} s)")
    return results


if __name__ == "__main__":
    main()
