"""Overlay pictures for the CLI: maps, boxes and labels drawn over a photo.

Every picture has a bounded size whatever the photo's shape: the photo is shown at most
`MAX_SIDE` pixels on its long side, and each panel's figure size is clamped, so a 30000 × 40
panorama gives a picture of a few hundred pixels, not a 240000-pixel-tall PNG.
"""

from __future__ import annotations

import os
import pathlib
from typing import Any

import numpy as np
from PIL import Image

__all__ = ["MAX_SIDE", "display_photo", "save_keypoint_overlay", "save_overlay"]

#: Longest side (pixels) of the photo drawn in a panel.
MAX_SIDE = 512
_PANEL_INCHES = 4.0
_MIN_INCHES = 1.0


def display_photo(photo: np.ndarray, max_side: int = MAX_SIDE) -> tuple[np.ndarray, float]:
    """The photo shrunk so its long side is at most ``max_side`` px, and the scale applied."""
    h, w = photo.shape[:2]
    scale = min(1.0, max_side / max(h, w, 1))
    if scale < 1.0:
        size = (max(1, round(w * scale)), max(1, round(h * scale)))
        photo = np.asarray(Image.fromarray(photo).resize(size, Image.Resampling.BILINEAR))
    return photo, scale


def _panel_inches(h: int, w: int) -> tuple[float, float]:
    s = _PANEL_INCHES / max(h, w, 1)
    return max(w * s, _MIN_INCHES), max(h * s, _MIN_INCHES)


def save_overlay(result: Any, path: str | os.PathLike) -> None:
    """One panel per predicted class: the map over the photo, its box, label and score."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    k = len(result.classes)
    photo, scale = display_photo(result.photo)
    h, w = photo.shape[:2]
    pw, ph = _panel_inches(h, w)
    fig, axes = plt.subplots(1, k, figsize=(pw * k, ph + 0.6), squeeze=False)
    for j, ax in enumerate(axes[0]):
        ax.imshow(photo, aspect="auto")
        heat = np.asarray(Image.fromarray((result.maps[j] * 255).astype(np.uint8)).resize((w, h)))
        ax.imshow(heat, cmap="jet", alpha=0.45, vmin=0, vmax=255, aspect="auto")
        x0, y0, x1, y1 = (v * scale for v in result.boxes[j])
        ax.add_patch(Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, lw=2.5, ec="lime"))
        label = result.labels[j].split(",")[0]
        ax.set_title(f"{label} ({result.scores[j]:.2f})", fontsize=10)
        ax.axis("off")
    fig.suptitle(f"{pathlib.Path(result.image).name} — {result.method}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def save_keypoint_overlay(
    image_uint8: np.ndarray,
    xy: np.ndarray,
    confidence: np.ndarray | None,
    path: str | os.PathLike,
    part_names: Any = None,
    min_confidence: float = 0.0,
    *,
    box: Any = None,
    title: str = "",
) -> None:
    """The photo with one coloured dot per part (paper 1's parts, paper 2's keypoints), bounded
    in size; ``box`` ``[x0, y0, x1, y1]`` (photo pixels) is drawn when given.

    Args:
      image_uint8: ``uint8 (H, W, 3)`` photo.
      xy: ``(P, 2)`` ``(x, y)`` pixel indices in the photo (e.g.
        `fgloc.localize.keypoint_predictor.KeypointPredictor.predict_keypoints`).
      confidence: ``(P,)`` in [0, 1]; the dot's opacity, and parts below ``min_confidence``
        are not drawn (``None``: every part at full opacity, e.g. a part detector's).
      part_names: legend labels (default: the 15 CUB parts).
    Raises ValueError for mis-shaped inputs.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from fgloc.data.cub_parts import CUB_PART_NAMES

    photo = np.asarray(image_uint8)
    pts = np.asarray(xy, np.float64)
    conf = np.ones(pts.shape[:1]) if confidence is None else np.asarray(confidence, np.float64)
    if photo.dtype != np.uint8 or photo.ndim != 3 or photo.shape[-1] != 3:
        raise ValueError(f"image must be uint8 (H, W, 3), got {photo.dtype} {photo.shape}")
    if pts.ndim != 2 or pts.shape[-1] != 2 or conf.shape != pts.shape[:1]:
        raise ValueError(f"xy must be (P, 2) and confidence (P,), got {pts.shape}, {conf.shape}")
    names = list(CUB_PART_NAMES if part_names is None else part_names)
    if len(names) != len(pts):
        raise ValueError(f"{len(names)} part names for {len(pts)} keypoints")
    shown, scale = display_photo(photo)
    h, w = shown.shape[:2]
    pw, ph = _panel_inches(h, w)
    legend_w = 1.8  # inches for the legend beside the photo
    fig, ax = plt.subplots(1, 1, figsize=(pw + legend_w, max(ph, 2.0)))
    fig.subplots_adjust(left=0.0, right=pw / (pw + legend_w), bottom=0.0, top=1.0)
    ax.imshow(shown, aspect="auto")
    if box is not None:
        from matplotlib.patches import Rectangle

        x0, y0, x1, y1 = (float(v) * scale for v in box)
        ax.add_patch(Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, lw=2, ec="lime"))
    if title:
        ax.set_title(title, fontsize=8)
    colors = plt.get_cmap("tab20")(np.arange(len(pts)) % 20)
    keep = np.isfinite(pts).all(-1) & (conf >= min_confidence)
    for i in np.flatnonzero(keep):
        alpha = float(np.clip(0.35 + 0.65 * conf[i], 0.0, 1.0))
        ax.scatter(
            [(pts[i, 0] + 0.5) * scale - 0.5],
            [(pts[i, 1] + 0.5) * scale - 0.5],
            s=30,
            color=colors[i],
            alpha=alpha,
            edgecolors="k",
            linewidths=0.5,
            label=f"{names[i]} ({conf[i]:.2f})",
        )
    ax.set_xlim(-0.5, w - 0.5)
    ax.set_ylim(h - 0.5, -0.5)
    ax.axis("off")
    if keep.any():
        ax.legend(loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=6, frameon=False)
    fig.savefig(path, dpi=80)
    plt.close(fig)
