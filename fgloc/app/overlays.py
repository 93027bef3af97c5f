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

__all__ = ["MAX_SIDE", "display_photo", "save_overlay", "save_points_overlay"]

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


def save_points_overlay(
    photo: np.ndarray,
    xy: np.ndarray,
    names: Any,
    path: str | os.PathLike,
    *,
    confidence: np.ndarray | None = None,
    box: Any = None,
    title: str = "",
) -> None:
    """Named points ``xy`` ``(P, 2)`` (pixels of ``photo``) drawn over the photo, with an optional
    object box and per-point confidence; bounded in size like `save_overlay`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    shown, scale = display_photo(photo)
    h, w = shown.shape[:2]
    pw, ph = _panel_inches(h, w)
    fig, ax = plt.subplots(figsize=(pw + 1.6, ph + 0.4))
    ax.imshow(shown, aspect="auto")
    if box is not None:
        x0, y0, x1, y1 = (float(v) * scale for v in box)
        ax.add_patch(Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, lw=2, ec="lime"))
    colours = plt.get_cmap("tab20")(np.linspace(0, 1, max(len(xy), 1)))
    for j, (x, y) in enumerate(np.asarray(xy, np.float64)):
        if not np.isfinite([x, y]).all():
            continue
        alpha = 1.0 if confidence is None else float(np.clip(0.3 + confidence[j], 0.3, 1.0))
        label = names[j] if j < len(names) else str(j)
        ax.scatter([x * scale], [y * scale], s=36, color=colours[j], edgecolors="black",
                   linewidths=0.6, alpha=alpha, label=label)  # fmt: skip
    ax.set_xlim(0, w)
    ax.set_ylim(h, 0)
    ax.axis("off")
    ax.legend(loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=6, frameon=False)
    if title:
        ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
