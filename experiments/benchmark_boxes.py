"""Benchmark: map → box, fgloc's device `boxes_from_maps` against per-map OpenCV and scipy loops.

Issue 17, target 1. The paper's rule (largest 4-connected region above 20% of the max, a tie to
the component whose first pixel comes first in row-major order; whole map when nothing is
foreground) on the maps ``experiments/benchmark_peers.py`` boxes: the top-8 CAMs of 32 real photos
(fgloc's embedded EfficientNet-Lite0, 224 × 224 input), upsampled bilinearly to 224 × 224 and
min-max normalised (256 maps), and the same CAMs at their native 7 × 7. Contenders, each timed at
every batch size (the first ``b`` maps):

* ``fgloc`` — `boxes_from_maps`, jitted, maps already on the device (column runs; the per-pixel
  fallback when a column has more than `RUN_SLOTS` runs, reported as ``run_path``);
* ``fgloc_pixel`` — the per-pixel propagation alone (the algorithm before issue 17, and the
  fallback), jitted: the lever "label runs instead of pixels" measured on the same maps;
* ``opencv_loop`` — ``cv2.connectedComponentsWithStats`` per map (`benchmark_peers.boxes_cv2`;
  skipped without OpenCV);
* ``scipy_ndimage_loop`` — ``scipy.ndimage.label`` per map (`benchmark_peers.boxes_scipy`);
* ``floor_max_pass`` — only ``jnp.max`` over the maps, the one read of the maps every device
  method needs (the bandwidth floor of this machine for this batch).

Agreement first: every contender's boxes against `map_boxes(rule="largest")` (the host
reference), as the fraction of identical boxes. Timing as in benchmark_peers (`time_interleaved`:
one warm-up call each, then ``repeats`` rounds in which every contender runs once, interleaved so
all see the same background load; medians; load averages recorded). Summary:
``boxes_speedup_b256`` = fgloc / the faster loop at 224 × 224, batch 256 (the issue's target ≥ 1).

Run (writes FILE.json, FILE.md and the throughput-vs-batch plot, FILE.png unless ``--plot``)::

    python -m experiments.benchmark_boxes --out /tmp/benchmark_boxes.json [--plot P.png] [--smoke]

``--smoke`` uses synthetic CAM-like maps (random 7 × 7 maps upsampled bilinearly to 16 × 16), one
batch of 4 and one repeat: it needs neither the photos nor OpenCV and runs in CI.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import pathlib
import platform
import sys
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from experiments.common_bench import (
    boxes_cv2,
    boxes_scipy,
    load_photos,
    minmax,
    time_interleaved,
    versions,
)
from fgloc.localize.boxes import (
    RUN_SLOTS,
    _box_one,
    _column_runs,
    _run_labels,
    boxes_from_maps,
    map_boxes,
)


def get_config(smoke: bool = False) -> ml_collections.ConfigDict:
    """Benchmark settings; ``smoke`` is the CI run (synthetic maps, tiny)."""
    c = ml_collections.ConfigDict()
    c.maps = "cams"  # "cams": benchmark_peers' real CAMs; "synthetic": random 7x7 upsampled
    c.num_images = 32
    c.classes = 8  # CAMs per photo (num_images · classes = 256 maps)
    c.image_size = 224
    c.batch_sizes = (1, 4, 16, 64, 256)
    c.threshold = 0.2
    c.connectivity = 4
    c.repeats = 5
    c.pixel_max_batch = 256  # fgloc_pixel is slow: batches above this are not timed for it
    if smoke:
        c.maps = "synthetic"
        c.num_images = 4
        c.classes = 1
        c.image_size = 16
        c.batch_sizes = (4,)
        c.repeats = 1
    return c


def cam_maps(config: ml_collections.ConfigDict) -> tuple[np.ndarray, np.ndarray, str]:
    """``(N, S, S)`` and ``(N, 7, 7)`` float32 maps in [0, 1] (``N = num_images · classes``) and
    where they came from. ``"cams"``: as benchmark_peers builds its box maps (top-``classes``
    CAMs of each photo, `resize_maps` to the input size, min-max); ``"synthetic"``: random
    normal 7 × 7 maps upsampled the same way."""
    from fgloc.maps import class_activation_maps, resize_maps, top_classes

    size, n = int(config.image_size), int(config.num_images) * int(config.classes)
    if config.maps == "synthetic":
        small = jnp.asarray(np.random.default_rng(0).normal(size=(n, 7, 7)), jnp.float32)
        big = resize_maps(small, (size, size))
        source = f"synthetic: {n} N(0, 1) 7 x 7 maps, seed 0"
    else:
        import fgloc

        p = fgloc.pretrained("efficientnet_lite0")
        kernel = p.variables["params"]["classifier"]["kernel"]
        photos, source = load_photos(int(config.num_images), size)
        x = np.asarray(p.preprocess(photos), np.float32)

        @jax.jit
        def cams(xb: jax.Array) -> tuple[jax.Array, jax.Array]:
            fmap, _ = p.model.apply(p.variables, xb, method=p.model.features)
            logits = p.model.apply(p.variables, fmap.mean(axis=(1, 2)), method=p.model.head)
            c = class_activation_maps(fmap, kernel, top_classes(logits, int(config.classes)))
            return c, resize_maps(c, (size, size))

        parts = [cams(jnp.asarray(x[s : s + 16])) for s in range(0, len(x), 16)]
        small = jnp.concatenate([a for a, _ in parts]).reshape(-1, *parts[0][0].shape[-2:])
        big = jnp.concatenate([b for _, b in parts]).reshape(-1, size, size)
        source = f"top-{config.classes} CAMs of EfficientNet-Lite0 on {source}"
    return (
        minmax(np.asarray(big)).astype(np.float32),
        minmax(np.asarray(small)).astype(np.float32),
        source,
    )


def reference_boxes(maps: np.ndarray, threshold: float, connectivity: int) -> np.ndarray:
    """`map_boxes(rule="largest")` per map, the whole map when nothing is foreground."""
    out = np.empty((len(maps), 4), np.float32)
    for i, m in enumerate(maps):
        boxes, _ = map_boxes(m, [np.float32(threshold) * m.max()], connectivity=connectivity)
        out[i] = boxes[0] if len(boxes) else (0, 0, m.shape[1], m.shape[0])
    return out


def run_path_stats(maps: jax.Array, threshold: float, connectivity: int) -> dict[str, Any]:
    """Whether a batch takes the run path, its label steps and the most runs in one column."""
    more, steps, runs = _run_path_stats(maps, threshold, connectivity)
    return {
        "run_path": not bool(more),
        "label_steps": int(steps),
        "max_runs_per_column": int(runs),
    }


@functools.partial(jax.jit, static_argnames=("threshold", "connectivity"))
def _run_path_stats(
    maps: jax.Array, threshold: float, connectivity: int
) -> tuple[jax.Array, jax.Array, jax.Array]:
    mask = maps > threshold * jnp.max(maps, axis=(1, 2), keepdims=True)
    slots = max(1, min(RUN_SLOTS, (maps.shape[1] + 1) // 2))
    first, stop, more = _column_runs(mask, slots)
    _, steps = _run_labels(first, stop, connectivity)
    above = jnp.pad(mask, ((0, 0), (1, 0), (0, 0)))[:, :-1]
    return jnp.any(more), steps, jnp.max(jnp.sum(mask & ~above, axis=1))


def run(config: ml_collections.ConfigDict, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Every map size and batch size; returns the nested result dict written as JSON."""
    try:
        import cv2  # noqa: F401

        have_cv2 = True
    except ImportError:
        have_cv2 = False
    thr, conn = float(config.threshold), int(config.connectivity)
    big, small, source = cam_maps(config)
    results: dict[str, Any] = {
        "config": config.to_dict(),
        "maps": source,
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor(),
            "cpu_count": os.cpu_count(),
            "jax_backend": jax.default_backend(),
            "jax_devices": [str(d) for d in jax.devices()],
            "xla_flags": os.environ.get("XLA_FLAGS", ""),
            "loadavg_at_start": os.getloadavg(),
        },
        "versions": versions(),
        "opencv": have_cv2,
        "pairs": {},
    }
    fg = jax.jit(functools.partial(boxes_from_maps, threshold=thr, connectivity=conn))
    box_one = functools.partial(_box_one, threshold=thr, connectivity=conn)
    pixel = jax.jit(jax.vmap(box_one))
    floor = jax.jit(lambda m: jnp.max(m, axis=(1, 2)))
    for all_maps in (big, small):
        for b in [int(v) for v in list(config.batch_sizes) if int(v) <= len(all_maps)]:
            maps = all_maps[:b]
            dev = jax.device_put(maps)
            ref = reference_boxes(maps, thr, conn)
            contenders: dict[str, Callable[[], Any]] = {"fgloc": lambda d=dev: fg(d)}
            if b <= int(config.pixel_max_batch):
                contenders["fgloc_pixel"] = lambda d=dev: pixel(d)
            if have_cv2 and conn == 4:
                contenders["opencv_loop"] = lambda m=maps: boxes_cv2(m, thr)
            if conn == 4:
                contenders["scipy_ndimage_loop"] = lambda m=maps: boxes_scipy(m, thr)
            same = {
                name: float(np.all(np.asarray(fn()) == ref, axis=-1).mean())
                for name, fn in contenders.items()
            }
            contenders["floor_max_pass"] = lambda d=dev: floor(d)
            entry = {
                "map_hw": list(maps.shape[1:]),
                "maps": b,
                "same_box_fraction_vs_map_boxes": same,
                **run_path_stats(dev, thr, conn),
                "timing": time_interleaved(contenders, int(config.repeats), b),
                "loadavg": os.getloadavg(),
            }
            key = f"boxes_{maps.shape[1]}x{maps.shape[2]}_b{b}"
            results["pairs"][key] = entry
            brief = ", ".join(
                f"{n} {v['throughput_per_s']:.4g}/s" for n, v in entry["timing"].items()
            )
            log(f"{key}: same {same} run_path {entry['run_path']} {brief}")
    results["summary"] = summarise(results["pairs"])
    results["loadavg_at_end"] = os.getloadavg()
    return results


def summarise(pairs: dict[str, Any]) -> dict[str, Any]:
    """fgloc / each peer per pair; ``boxes_speedup_b256``: vs the faster loop, largest maps."""
    ratios: dict[str, dict[str, float]] = {}
    for key, e in pairs.items():
        t = e["timing"]
        ratios[key] = {
            peer: round(t["fgloc"]["throughput_per_s"] / v["throughput_per_s"], 3)
            for peer, v in t.items()
            if peer != "fgloc"
        }
    big = [k for k in pairs if pairs[k]["map_hw"][0] == max(p["map_hw"][0] for p in pairs.values())]
    key = max(big, key=lambda k: pairs[k]["maps"]) if big else ""
    loops = [p for p in ("opencv_loop", "scipy_ndimage_loop") if p in ratios.get(key, {})]
    best = min(loops, key=lambda p: ratios[key][p]) if loops else None
    same = all(min(e["same_box_fraction_vs_map_boxes"].values()) == 1.0 for e in pairs.values())
    return {
        "boxes_speedup_b256": ratios[key][best] if best else None,
        "boxes_pair": key,
        "against": best,
        "target": 1.0,
        "met": None if best is None else ratios[key][best] >= 1.0,
        "all_boxes_identical": same,
        "ratios": ratios,
    }


def markdown(results: dict[str, Any], command: str, plot: str) -> str:
    """The BENCHMARKS.md table: maps/s per contender, agreement, run path and load."""
    names = ["fgloc", "fgloc_pixel", "opencv_loop", "scipy_ndimage_loop", "floor_max_pass"]
    lines = [
        f"Command: `{command}`",
        "",
        f"Maps: {results['maps']}. Machine: {results['machine']['platform']}, "
        f"{results['machine']['cpu_count']} CPUs, JAX {results['machine']['jax_backend']}; "
        f"load average at start {results['machine']['loadavg_at_start']}, at end "
        f"{results['loadavg_at_end']}.",
        "",
        "| maps | " + " | ".join(f"{n} (maps/s)" for n in names) + " | fgloc / best loop "
        "| same boxes (all contenders vs map_boxes) | run path (label steps) | load (1 min) |",
        "|" + "---|" * (len(names) + 5),
    ]
    for e in results["pairs"].values():
        t = e["timing"]
        cells = [f"{t[n]['throughput_per_s']:.4g}" if n in t else "–" for n in names]
        loops = [t[n]["throughput_per_s"] for n in ("opencv_loop", "scipy_ndimage_loop") if n in t]
        ratio = f"{t['fgloc']['throughput_per_s'] / max(loops):.2f}×" if loops else "–"
        same = min(e["same_box_fraction_vs_map_boxes"].values())
        lines.append(
            f"| {e['map_hw'][0]}×{e['map_hw'][1]} b{e['maps']} | "
            + " | ".join(cells)
            + f" | {ratio} | {same:.3f} | {e['run_path']} ({e['label_steps']}) "
            f"| {e['loadavg'][0]:.1f} |"
        )
    s = results["summary"]
    lines += [
        "",
        f"boxes_speedup_b256 = {s['boxes_speedup_b256']} ({s['boxes_pair']}, vs {s['against']}; "
        f"target ≥ {s['target']}: met {s['met']}); all boxes identical: {s['all_boxes_identical']}.",
        "",
        f"![map → box throughput vs batch size]({plot})",
    ]
    return "\n".join(lines) + "\n"


def plot_throughput(results: dict[str, Any], path: pathlib.Path) -> None:
    """Throughput (maps/s) vs batch size per contender, one panel per map size (log-log)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = sorted({e["map_hw"][0] for e in results["pairs"].values()}, reverse=True)
    fig, axes = plt.subplots(1, len(sizes), figsize=(5.5 * len(sizes), 4), squeeze=False)
    for ax, size in zip(axes[0], sizes, strict=True):
        entries = [e for e in results["pairs"].values() if e["map_hw"][0] == size]
        names = list(dict.fromkeys(n for e in entries for n in e["timing"]))
        for name in names:
            pts = [(e["maps"], e["timing"][name]["throughput_per_s"]) for e in entries]
            pts = [p for p, e in zip(pts, entries, strict=True) if name in e["timing"]]
            style = "--" if name == "floor_max_pass" else "-"
            ax.plot(*zip(*pts, strict=True), style, marker="o", label=name)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("batch (maps)")
        ax.set_ylabel("maps / s")
        ax.set_title(f"{size} × {size} maps, largest 4-connected component")
        ax.grid(True, which="both", lw=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(
        f"map → box, {results['machine']['cpu_count']} CPUs, load "
        f"{results['machine']['loadavg_at_start'][0]:.1f}–{results['loadavg_at_end'][0]:.1f}",
        fontsize=9,
    )
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--out", required=True, help="JSON output path (FILE.md, FILE.png beside)")
    parser.add_argument("--plot", default=None, help="PNG path (default: FILE.png beside JSON)")
    parser.add_argument("--smoke", action="store_true", help="synthetic maps, tiny (CI)")
    parser.add_argument("--set", nargs="*", default=[], help="config overrides key=value")
    args = parser.parse_args(argv)
    from experiments.common import apply_overrides

    config = get_config(args.smoke)
    apply_overrides(config, args.set)
    out = pathlib.Path(args.out)
    command = "python -m experiments.benchmark_boxes " + " ".join(
        argv if argv is not None else sys.argv[1:]
    )
    results = run(config)
    results["command"] = command
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=1))
    plot = pathlib.Path(args.plot) if args.plot else out.with_suffix(".png")
    plot_throughput(results, plot)
    out.with_suffix(".md").write_text(markdown(results, command, str(plot)))
    print(json.dumps(results["summary"], indent=1))
    return results


if __name__ == "__main__":
    main()
