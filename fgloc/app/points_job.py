"""The ``fgloc localize --method parts|keypoints`` job: a fitted predictor draws named points
(CUB's 15 parts) on the user's photos, with one overlay PNG and one ``results.jsonl`` line each.

``parts`` is a part detector of paper 1 (`fgloc.localize.parts.PartDetector`, a directory made
by ``PartDetector.save`` or the part-discovery experiment); ``keypoints`` a trained keypoint
predictor of paper 2 (`fgloc.localize.keypoint_predictor.KeypointPredictor`). Unreadable photos
are reported by name and skipped; results already written are kept.
"""

from __future__ import annotations

import json
import os
import pathlib
import sys
from collections.abc import Callable, Sequence

import numpy as np

from fgloc.app.overlays import save_keypoint_overlay
from fgloc.data.images import ImageError, load_image

#: ``predict(photos, boxes) -> (xy (N, P, 2) pixels of each photo, confidence (N, P) or None)``.
Predict = Callable[[list[np.ndarray], np.ndarray | None], tuple[np.ndarray, np.ndarray | None]]


def part_detector_predict(directory: str | os.PathLike) -> tuple[Predict, list[str]]:
    """A saved `PartDetector` as a predict function, and its part names."""
    from fgloc.localize.parts import PartDetector

    detector = PartDetector.load(directory)
    backbone = detector.load_backbone()

    def predict(photos, boxes):
        return detector.predict_images(backbone, photos, boxes=boxes), None

    return predict, list(detector.part_names)


def keypoint_predictor_predict(directory: str | os.PathLike) -> tuple[Predict, list[str]]:
    """A saved `KeypointPredictor` as a predict function (boxes are not used), and its parts."""
    from fgloc.localize.keypoint_predictor import KeypointPredictor

    predictor = KeypointPredictor.load(directory)

    def predict(photos, boxes):
        del boxes
        xy, conf = predictor.predict_keypoints(photos)
        return np.asarray(xy), np.asarray(conf)

    return predict, list(predictor.part_names)


def run_points_to_dir(
    predict: Predict,
    part_names: Sequence[str],
    paths: Sequence[str | os.PathLike],
    out: str | os.PathLike,
    *,
    method: str,
    box: Sequence[float] | None = None,
    batch_size: int = 8,
) -> tuple[int, int]:
    """Predicts the points of every readable photo, writing ``OUT/<stem>_<method>.png`` and one
    ``OUT/results.jsonl`` line each (appended as they come). ``box`` ``[x0, y0, x1, y1]`` (pixels)
    restricts every photo to that object box. Returns ``(n_ok, n_failed)``."""
    if batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {batch_size}")
    if box is not None and (len(box) != 4 or not (box[0] < box[2] and box[1] < box[3])):
        raise ValueError(f"--box must be x0,y0,x1,y1 with x0 < x1 and y0 < y1, got {box}")
    out = pathlib.Path(out)
    out.mkdir(parents=True, exist_ok=True)
    n_ok = n_failed = 0
    seen: dict[str, int] = {}
    pending: list[tuple[str, np.ndarray]] = []

    def flush(f) -> None:
        nonlocal n_ok
        photos = [p for _, p in pending]
        boxes = None if box is None else np.tile(np.asarray(box, np.float32), (len(photos), 1))
        xy, conf = predict(photos, boxes)
        for i, (name, photo) in enumerate(pending):
            stem = pathlib.Path(name).stem
            seen[stem] = seen.get(stem, 0) + 1
            if seen[stem] > 1:
                stem = f"{stem}_{seen[stem]}"
            c = None if conf is None else conf[i]
            save_keypoint_overlay(photo, xy[i], c, out / f"{stem}_{method}.png", part_names,
                                  box=None if boxes is None else boxes[i], title=f"{pathlib.Path(name).name} — {method}")  # fmt: skip
            points = [
                {"name": n, "x": round(float(x), 1), "y": round(float(y), 1)}
                | ({} if c is None else {"confidence": round(float(c[j]), 4)})
                for j, (n, (x, y)) in enumerate(zip(part_names, xy[i], strict=True))
            ]
            h, w = photo.shape[:2]
            row = {"image": name, "width": w, "height": h, "method": method, "parts": points}
            if box is not None:
                row["box"] = [float(v) for v in box]
            f.write(json.dumps(row) + "\n")
            f.flush()
            n_ok += 1
        pending.clear()

    with open(out / "results.jsonl", "a", encoding="utf-8") as f:
        for path in paths:
            name = os.fspath(path)
            try:
                pending.append((name, load_image(name)))
            except ImageError as e:
                print(f"fgloc: skipped {name}: {str(e).removeprefix(f'{name}: ')}", file=sys.stderr)
                n_failed += 1
                continue
            if len(pending) == batch_size:
                flush(f)
        if pending:
            flush(f)
    return n_ok, n_failed
