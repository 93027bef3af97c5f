"""The ``fgloc localize`` / ``fgloc demo`` job: photos in, CAM or sensitivity maps, boxes,
overlays and a ``results.jsonl`` out (application code of the CLI, not a library module).
 Each photo is resized as a whole to a
square ``input_size`` (no centre crop, as the CAM authors' released code does), the top-k
classes are scored, one map per class is computed in a single jitted call (CAM: one einsum;
sensitivity: a vmapped VJP), each map is thresholded at ``threshold`` × its maximum, and the box
of its largest 4-connected component is mapped back to original-image pixels.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import pathlib
import sys
from collections.abc import Iterator, Sequence

import jax
import numpy as np

from fgloc.app.overlays import save_overlay
from fgloc.data.images import ImageError, load_image
from fgloc.data.pipeline import resize_image
from fgloc.localize.boxes import boxes_from_maps
from fgloc.maps import class_activation_maps, resize_maps, sensitivity_maps
from fgloc.maps.normalize import minmax_normalize
from fgloc.maps.smooth import gaussian_blur
from fgloc.pretrained import Pretrained

METHODS = ("cam", "sensitivity")


@dataclasses.dataclass
class Localization:
    """Result for one image; boxes are ``[x0, y0, x1, y1]`` in original-image pixels."""

    image: str
    width: int
    height: int
    method: str
    classes: list[int]
    labels: list[str]
    scores: list[float]
    boxes: list[list[float]]
    maps: np.ndarray  # (k, S, S) float32, each map scaled to [0, 1]
    photo: np.ndarray  # uint8 (H, W, 3)

    def to_json(self) -> dict:
        preds = [
            {"class": c, "label": l, "score": s, "box": [round(v, 1) for v in b]}
            for c, l, s, b in zip(self.classes, self.labels, self.scores, self.boxes, strict=True)
        ]
        return {
            "image": self.image,
            "width": self.width,
            "height": self.height,
            "method": self.method,
            "predictions": preds,
        }


@functools.partial(
    jax.jit, static_argnames=("model", "network", "method", "topk", "threshold", "smooth_sigma")
)
def _localize_batch(
    model, variables, x, *, network, method: str, topk: int, threshold: float, smooth_sigma: float
):
    """x: preprocessed ``(B, S, S, 3)`` -> probs (B,k), classes (B,k), maps (B,k,S,S), boxes (B,k,4)."""
    logits, inter = model.apply(variables, x)
    probs = jax.nn.softmax(logits, axis=-1)
    scores, classes = jax.lax.top_k(probs, topk)
    size = x.shape[1:3]
    if method == "cam":
        kernel = network.classifier_kernel(variables)
        maps = class_activation_maps(inter[network.cam_layer], kernel, classes)
        maps = resize_maps(maps, size)
    else:
        maps = sensitivity_maps(lambda z: model.apply(variables, z)[0], x, classes)
        maps = gaussian_blur(maps, smooth_sigma)
    b, k = classes.shape
    maps = minmax_normalize(maps)
    boxes = boxes_from_maps(maps.reshape(b * k, *size), threshold=threshold).reshape(b, k, 4)
    return scores, classes, maps, boxes


def resize_photo(photo: np.ndarray, size: int) -> np.ndarray:
    """Whole photo -> ``uint8 (size, size, 3)`` (bilinear, no crop; the one resize path)."""
    return resize_image(photo, (size, size))


def localize(
    net: Pretrained,
    paths: Sequence[str | os.PathLike],
    *,
    method: str = "cam",
    topk: int = 5,
    input_size: int = 224,
    threshold: float = 0.2,
    smooth_sigma: float | None = None,
    batch_size: int = 8,
    progress: bool = True,
    on_error=None,
) -> Iterator[Localization]:
    """An iterator of one :class:`Localization` per readable image, in order.

    ``smooth_sigma`` (pixels of the network input) blurs sensitivity maps before boxing, since
    raw gradients are speckled and the largest component above 20% of the maximum is otherwise
    a single speck; default ``input_size / 28`` (8 px at 224). CAM maps are not blurred.

    Impossible options (and a ``net`` without a classifier) raise ``ValueError`` here, before
    any image is read. Unreadable images are reported through ``on_error(path, message)``
    (default: print to stderr) and skipped; the rest go on.
    """
    if method not in METHODS:
        raise ValueError(f"--method must be one of {METHODS}, got {method!r}")
    if net.class_names is None or net.network.cam_layer is None:
        raise ValueError(
            f"model {net.name} has no classifier, and --method {method} needs class scores; "
            "choose a model with one (e.g. --model efficientnet_lite0)"
        )
    if not 1 <= topk <= len(net.class_names):
        raise ValueError(f"--topk must be in 1..{len(net.class_names)}, got {topk}")
    if not 0.0 < threshold < 1.0:
        raise ValueError(f"--threshold must be in (0, 1), got {threshold}")
    if smooth_sigma is None:
        smooth_sigma = input_size / 28 if method == "sensitivity" else 0.0
    if smooth_sigma < 0:
        raise ValueError(f"--smooth must be >= 0, got {smooth_sigma}")
    if input_size < 32:
        raise ValueError(f"--input-size must be at least 32, got {input_size}")
    return _localize_iter(
        net, paths, method=method, topk=topk, input_size=input_size, threshold=threshold,
        smooth_sigma=float(smooth_sigma), batch_size=batch_size, progress=progress,
        on_error=on_error,
    )  # fmt: skip


def _localize_iter(
    net: Pretrained,
    paths: Sequence[str | os.PathLike],
    *,
    method: str,
    topk: int,
    input_size: int,
    threshold: float,
    smooth_sigma: float,
    batch_size: int,
    progress: bool,
    on_error,
) -> Iterator[Localization]:
    """The generator behind :func:`localize` (options already checked)."""
    assert net.class_names is not None
    class_names = net.class_names

    def report(path: str, msg: str) -> None:
        if on_error is None:
            print(f"fgloc: skipped {path}: {msg}", file=sys.stderr)
        else:
            on_error(path, msg)

    from tqdm.auto import tqdm

    bar = tqdm(total=len(paths), unit="img", disable=not progress or len(paths) < 2)
    pending: list[tuple[str, np.ndarray]] = []

    def flush():
        n = len(pending)
        batch = np.stack([resize_photo(p, input_size) for _, p in pending])
        if n < batch_size:  # pad to a fixed batch so the function compiles once
            batch = np.concatenate([batch, np.repeat(batch[-1:], batch_size - n, axis=0)])
        scores, classes, maps, boxes = jax.device_get(
            _localize_batch(
                net.model, net.variables, net.preprocess(batch), network=net.network,
                method=method, topk=topk, threshold=threshold, smooth_sigma=smooth_sigma,
            )
        )  # fmt: skip
        for i, (name, photo) in enumerate(pending):
            h, w = photo.shape[:2]
            scale = np.array([w, h, w, h], np.float64) / input_size
            yield Localization(
                image=name,
                width=w,
                height=h,
                method=method,
                classes=[int(c) for c in classes[i]],
                labels=[class_names[int(c)] for c in classes[i]],
                scores=[float(s) for s in scores[i]],
                boxes=[list(map(float, b * scale)) for b in boxes[i]],
                maps=np.asarray(maps[i], np.float32),
                photo=photo,
            )
        bar.update(n)
        pending.clear()

    for path in paths:
        name = os.fspath(path)
        try:
            pending.append((name, load_image(name)))
        except ImageError as e:
            report(name, str(e).removeprefix(f"{name}: "))
            bar.update(1)
            continue
        if len(pending) == batch_size:
            yield from flush()
    if pending:
        yield from flush()
    bar.close()


def run_to_dir(
    net: Pretrained,
    paths: Sequence[str | os.PathLike],
    out: str | os.PathLike,
    overlays: bool = True,
    **kwargs,
) -> tuple[int, int]:
    """Run :func:`localize`, writing ``OUT/<stem>_<method>.png`` (unless ``overlays`` is
    false) and ``OUT/results.jsonl``.

    Returns ``(n_ok, n_failed)``. Results are appended line by line as they come, so nothing
    done is lost when a later image fails or the run is interrupted. Impossible options raise
    ``ValueError`` before ``OUT`` is created.
    """
    failed: list[str] = []

    def on_error(path, msg):
        failed.append(path)
        print(f"fgloc: skipped {path}: {msg}", file=sys.stderr)

    results = localize(net, paths, on_error=on_error, **kwargs)  # checks the options
    out = pathlib.Path(out)
    out.mkdir(parents=True, exist_ok=True)
    n_ok = 0
    seen: dict[str, int] = {}
    with open(out / "results.jsonl", "a", encoding="utf-8") as f:
        for res in results:
            stem = pathlib.Path(res.image).stem
            seen[stem] = seen.get(stem, 0) + 1
            if seen[stem] > 1:
                stem = f"{stem}_{seen[stem]}"
            if overlays:
                save_overlay(res, out / f"{stem}_{res.method}.png")
            f.write(json.dumps(res.to_json()) + "\n")
            f.flush()
            n_ok += 1
    return n_ok, len(failed)
