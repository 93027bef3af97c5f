"""Timing, box-loop and photo helpers shared by the benchmarks (`benchmark_peers`,
`benchmark_boxes`).

Like `experiments.common`, a shared helper module, not an experiment (experiments never import
each other; `tests/test_layers.py`).
"""

from __future__ import annotations

import importlib.metadata
import os
import pathlib
import statistics
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

import jax
import numpy as np

DISTRIBUTIONS = {
    "jax": "jax",
    "jaxlib": "jaxlib",
    "flax": "flax",
    "numpy": "numpy",
    "scipy": "scipy",
    "torch": "torch",
    "torchvision": "torchvision",
    "torchcam": "torchcam",
    "pytorch_grad_cam": "grad-cam",
    "captum": "captum",
    "cv2": "opencv-python-headless",
    "efficientnet_lite_pytorch": "efficientnet-lite-pytorch",
}


class _PeakRSS:
    """Samples this process's resident set size (``/proc/self/statm``) in a thread."""

    def __init__(self, period_s: float = 0.002) -> None:
        self.period_s = period_s
        self.page = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096
        self.peak = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def rss(self) -> int:
        try:
            with open("/proc/self/statm") as f:
                return int(f.read().split()[1]) * self.page
        except OSError:
            return 0

    def __enter__(self) -> _PeakRSS:
        self.start = self.peak = self.rss()
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.rss())
            time.sleep(self.period_s)

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.peak = max(self.peak, self.rss())

    @property
    def growth_mb(self) -> float:
        return max(0, self.peak - self.start) / 2**20


def _block(out: Any) -> Any:
    return jax.block_until_ready(out)


def time_interleaved(
    fns: dict[str, Callable[[], Any]], repeats: int, work: float
) -> dict[str, dict[str, float]]:
    """Warm-up each contender once, then ``repeats`` rounds of one call each (interleaved).

    ``work`` is the units of work per call (images, image·channels, maps). Returns per contender
    the median seconds, all seconds, throughput (``work`` / median) and peak RSS growth (MB).
    """
    for fn in fns.values():
        _block(fn())
    times: dict[str, list[float]] = {name: [] for name in fns}
    peak: dict[str, float] = dict.fromkeys(fns, 0.0)
    for _ in range(repeats):
        for name, fn in fns.items():
            with _PeakRSS() as mem:
                start = time.perf_counter()
                _block(fn())
                times[name].append(time.perf_counter() - start)
            peak[name] = max(peak[name], mem.growth_mb)
    out = {}
    for name, ts in times.items():
        med = statistics.median(ts)
        out[name] = {
            "seconds_median": med,
            "seconds_all": ts,
            "throughput_per_s": work / med,
            "peak_rss_growth_mb": round(peak[name], 1),
        }
    return out


# --------------------------------------------------------------------------- maps and boxes


def minmax(maps: np.ndarray) -> np.ndarray:
    """Min-max normalise each map over its last two axes to [0, 1]."""
    maps = np.asarray(maps, np.float64)
    lo = maps.min(axis=(-2, -1), keepdims=True)
    hi = maps.max(axis=(-2, -1), keepdims=True)
    return (maps - lo) / np.maximum(hi - lo, 1e-12)


def boxes_cv2(maps: np.ndarray, threshold: float = 0.2) -> np.ndarray:
    """Per-image OpenCV loop of the paper's rule: ``(N, h, w) -> (N, 4)`` ``[x0, y0, x1, y1]``.

    Foreground ``map > threshold · max``; 4-connected components
    (``connectedComponentsWithStats``, labels in raster order of each component's first pixel);
    the largest (first on ties); whole map when nothing is foreground — `boxes_from_maps`' rule.
    """
    import cv2

    out = np.empty((len(maps), 4), np.float32)
    for i, m in enumerate(maps):
        h, w = m.shape
        mask = (m > threshold * m.max()).astype(np.uint8)
        n, _, stats, _ = cv2.connectedComponentsWithStats(mask, connectivity=4)
        if n <= 1:
            out[i] = (0, 0, w, h)
            continue
        j = 1 + int(np.argmax(stats[1:, cv2.CC_STAT_AREA]))
        x, y, bw, bh = (int(v) for v in stats[j, :4])
        out[i] = (x, y, x + bw, y + bh)
    return out


def boxes_scipy(maps: np.ndarray, threshold: float = 0.2) -> np.ndarray:
    """The same rule as `boxes_cv2` with ``scipy.ndimage.label`` (4-connectivity)."""
    from scipy import ndimage

    out = np.empty((len(maps), 4), np.float32)
    for i, m in enumerate(maps):
        h, w = m.shape
        mask = m > threshold * m.max()
        result: Any = ndimage.label(mask)
        labels, n = result
        if n == 0:
            out[i] = (0, 0, w, h)
            continue
        best = 1 + int(np.argmax(np.bincount(labels.ravel())[1:]))
        sl = ndimage.find_objects(labels, max_label=best)[best - 1]
        out[i] = (sl[1].start, sl[0].start, sl[1].stop, sl[0].stop)
    return out


def load_photos(num: int, size: int) -> tuple[np.ndarray, str]:
    """``num`` real photos resized (whole, bilinear) to ``(num, size, size, 3)`` uint8 + source."""
    from fgloc.app.localize_job import resize_photo
    from fgloc.data.images import load_image

    root = pathlib.Path(__file__).resolve().parents[2] / "shared/data/imagenet_val_sample/val"
    paths = sorted(root.glob("*.JPEG"))
    if paths:
        photos = [resize_photo(load_image(p), size) for p in paths[:num]]
        source = f"{root} (first {len(photos)} sorted)"
    else:
        from skimage import data

        names = ("astronaut", "coffee", "chelsea", "rocket", "cat", "hubble_deep_field")
        photos = [resize_photo(np.asarray(getattr(data, n)())[..., :3], size) for n in names]
        source = f"scikit-image {names}"
    reps = -(-num // len(photos))
    return np.stack((photos * reps)[:num]), source


def versions() -> dict[str, str]:
    out = {"python": sys.version.split()[0]}
    for mod, dist in DISTRIBUTIONS.items():
        try:
            out[mod] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            out[mod] = "missing"
    return out
