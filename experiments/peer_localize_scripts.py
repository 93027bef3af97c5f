"""The whole ``fgloc localize`` job, and the same job written with torchcam / pytorch-grad-cam.

Issue 17, target 3. Each job reads a list of photos (any sizes), decodes each, resizes it as a
whole to ``size × size``, runs EfficientNet-Lite0 (the same ImageNet weights on both sides) in
batches of ``batch``, takes the top-``topk`` classes, computes one CAM per class, upsamples it
to the input, min-max normalises it, takes the box of the largest 4-connected component above
``threshold`` × its maximum, maps the box back to original-image pixels, and appends one JSON
line per photo; with ``--overlays`` it also draws the overlay picture of every photo.

* ``fgloc``: the command line itself, ``fgloc.cli.main(["localize", ...])``;
* ``torchcam``: torchcam ``CAM`` on the head activation, ``F.interpolate`` (bilinear), an
  OpenCV ``connectedComponentsWithStats`` box per map;
* ``grad_cam``: pytorch-grad-cam ``GradCAM`` on the same layer (its maps come resized to the
  input and normalised), the same OpenCV box.

The peers draw their overlays with fgloc's own `fgloc.app.overlays.save_overlay`, loaded from
its file so the peer processes do not import JAX: the pictures cost the same on both sides.
Peers decode with PIL (EXIF rotation applied), resize with PIL bilinear and normalise with
``(x − 127) / 128``, as fgloc does (`fgloc.registry`).

This module imports neither JAX nor torch at the top (`torch_reference`, shared with
`experiments.benchmark_peers`, lives in `experiments.common_torch`). Each job runs ``--passes`` times in one process and writes, to
``--timing``, the seconds of each pass (the first includes JIT compilation for fgloc) and the
seconds from process start to the end of the imports. Used by `benchmark_peers`'s ``localize``
section, which runs every job in a fresh process and reads its peak RSS::

    python -m experiments.peer_localize_scripts torchcam --out DIR --timing T.json PHOTO...
"""

from __future__ import annotations

import time

T_START = time.perf_counter()

import argparse  # noqa: E402  (the start time is taken before any import)
import importlib.util  # noqa: E402
import json  # noqa: E402
import pathlib  # noqa: E402
import shutil  # noqa: E402
import types  # noqa: E402
from typing import Any  # noqa: E402

import numpy as np  # noqa: E402

from experiments.common_torch import torch_reference  # noqa: E402

JOBS = ("fgloc", "torchcam", "grad_cam")


def largest_component_box(m: np.ndarray, threshold: float) -> tuple[int, int, int, int]:
    """``[x0, y0, x1, y1]`` (end-exclusive) of the largest 4-connected region of
    ``m > threshold · max(m)`` (OpenCV; the first label on ties), the whole map if empty."""
    import cv2

    h, w = m.shape
    mask = (m > threshold * m.max()).astype(np.uint8)
    n, _, stats, _ = cv2.connectedComponentsWithStats(mask, connectivity=4)
    if n <= 1:
        return 0, 0, w, h
    j = 1 + int(np.argmax(stats[1:, cv2.CC_STAT_AREA]))
    x, y, bw, bh = (int(v) for v in stats[j, :4])
    return x, y, x + bw, y + bh


def _overlay_module() -> Any:
    """fgloc's overlay code, loaded from its file (the ``fgloc`` package would import JAX)."""
    path = pathlib.Path(__file__).resolve().parents[1] / "fgloc/app/overlays.py"
    spec = importlib.util.spec_from_file_location("_fgloc_overlays", path)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _class_names() -> list[str]:
    path = pathlib.Path(__file__).resolve().parents[1] / "fgloc/imagenet_classes.json"
    return list(json.loads(path.read_text()))


def run_torch_job(
    job: str,
    paths: list[str],
    out: pathlib.Path,
    *,
    size: int,
    topk: int,
    threshold: float,
    batch: int,
    overlays: bool,
    threads: int,
) -> int:
    """One pass of the torchcam or grad-cam job; returns the number of photos written."""
    import torch
    import torch.nn.functional as F
    from PIL import Image, ImageOps

    torch.set_num_threads(threads)
    wrapped, _ = torch_reference(size)
    names = _class_names()
    save_overlay = _overlay_module().save_overlay if overlays else None
    if job == "torchcam":
        from torchcam.methods import CAM

        extractor = CAM(wrapped, target_layer="head_act", fc_layer="net._fc")
    else:
        from pytorch_grad_cam import GradCAM
        from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

        gradcam = GradCAM(model=wrapped, target_layers=[wrapped.head_act])
    out.mkdir(parents=True, exist_ok=True)
    n_ok = 0
    with open(out / "results.jsonl", "a", encoding="utf-8") as f:
        for start in range(0, len(paths), batch):
            group = paths[start : start + batch]
            photos = []
            for p in group:
                with Image.open(p) as img:
                    photos.append(np.asarray(ImageOps.exif_transpose(img).convert("RGB")))
            x = np.stack(
                [
                    np.asarray(Image.fromarray(ph).resize((size, size), Image.Resampling.BILINEAR))
                    for ph in photos
                ]
            )
            xt = torch.from_numpy(
                np.ascontiguousarray(((x.astype(np.float32) - 127.0) / 128.0).transpose(0, 3, 1, 2))
            )
            if job == "torchcam":
                with torch.no_grad():
                    logits = wrapped(xt)
                    probs, cls = F.softmax(logits, 1).topk(topk, dim=1)
                    maps = [extractor(cls[:, r].tolist(), logits)[0] for r in range(topk)]
                    up = F.interpolate(
                        torch.stack(maps, 1), (size, size), mode="bilinear", align_corners=False
                    ).numpy()
                lo = up.min(axis=(-2, -1), keepdims=True)
                hi = up.max(axis=(-2, -1), keepdims=True)
                up = (up - lo) / np.maximum(hi - lo, 1e-12)
            else:
                with torch.no_grad():
                    probs, cls = F.softmax(wrapped(xt), 1).topk(topk, dim=1)
                up = np.stack(
                    [
                        gradcam(
                            input_tensor=xt,
                            targets=[ClassifierOutputTarget(int(c)) for c in cls[:, r]],
                        )
                        for r in range(topk)
                    ],
                    1,
                )
            for i, (p, ph) in enumerate(zip(group, photos, strict=True)):
                h, w = ph.shape[:2]
                scale = np.array([w, h, w, h], np.float64) / size
                boxes = [
                    [
                        float(v)
                        for v in np.asarray(largest_component_box(up[i, r], threshold)) * scale
                    ]
                    for r in range(topk)
                ]
                classes = [int(c) for c in cls[i]]
                res = types.SimpleNamespace(
                    image=p,
                    method="cam",
                    classes=classes,
                    labels=[names[c] for c in classes],
                    scores=[float(s) for s in probs[i]],
                    boxes=boxes,
                    maps=up[i].astype(np.float32),
                    photo=ph,
                )
                if save_overlay is not None:
                    save_overlay(res, out / f"{pathlib.Path(p).stem}_cam.png")
                preds = [
                    {"class": c, "label": lab, "score": s, "box": [round(v, 1) for v in b]}
                    for c, lab, s, b in zip(classes, res.labels, res.scores, boxes, strict=True)
                ]
                f.write(
                    json.dumps(
                        {"image": p, "width": w, "height": h, "method": "cam", "predictions": preds}
                    )
                    + "\n"
                )
                n_ok += 1
    if job == "torchcam":
        extractor.remove_hooks()
    else:
        gradcam.activations_and_grads.release()
    return n_ok


def run_fgloc_job(
    paths: list[str],
    out: pathlib.Path,
    *,
    size: int,
    topk: int,
    threshold: float,
    batch: int,
    overlays: bool,
    method: str = "cam",
) -> int:
    """One pass of ``fgloc localize`` (the CLI's own ``main``); returns its exit status."""
    from fgloc.cli import main

    argv = ["localize", *paths, "--out", str(out), "--method", method, "--topk", str(topk)]
    argv += ["--input-size", str(size), "--threshold", str(threshold)]
    argv += ["--batch-size", str(batch), "--no-progress"]
    if not overlays:
        argv.append("--no-overlays")
    return main(argv)


def peak_rss_mb() -> float:
    """This process's peak resident set (``VmHWM`` of ``/proc/self/status``), MiB; 0 if absent.

    Unlike ``ru_maxrss``, ``VmHWM`` starts afresh at ``exec``, so a child started by a big
    parent process does not inherit the parent's resident set."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return 0.0


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("job", choices=JOBS)
    parser.add_argument("photos", nargs="+")
    parser.add_argument("--out", required=True, help="output folder (one subfolder per pass)")
    parser.add_argument("--timing", required=True, help="JSON file for the timings")
    parser.add_argument("--size", type=int, default=320)
    parser.add_argument("--topk", type=int, default=5)
    parser.add_argument("--threshold", type=float, default=0.35)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--overlays", action="store_true")
    parser.add_argument("--passes", type=int, default=2)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: all cores)")
    parser.add_argument("--method", default="cam", help="fgloc only: cam or sensitivity")
    args = parser.parse_args(argv)
    import os

    threads = args.threads or os.cpu_count() or 1
    t_imports = time.perf_counter() - T_START
    passes = []
    for k in range(args.passes):
        out = pathlib.Path(args.out) / f"pass{k}"
        shutil.rmtree(out, ignore_errors=True)
        start = time.perf_counter()
        opts = dict(
            size=args.size,
            topk=args.topk,
            threshold=args.threshold,
            batch=args.batch,
            overlays=args.overlays,
        )
        if args.job == "fgloc":
            status = run_fgloc_job(args.photos, out, method=args.method, **opts)
        else:
            status = 0
            run_torch_job(args.job, args.photos, out, threads=threads, **opts)
        passes.append(time.perf_counter() - start)
        if status:
            raise SystemExit(f"fgloc localize exited with {status}")
    timing = {
        "peak_rss_mb": peak_rss_mb(),
        "job": args.job,
        "photos": len(args.photos),
        "overlays": args.overlays,
        "imports_s": t_imports,
        "pass_s": passes,
        "total_s": time.perf_counter() - T_START,
    }
    pathlib.Path(args.timing).write_text(json.dumps(timing))
    return timing


if __name__ == "__main__":
    main()
