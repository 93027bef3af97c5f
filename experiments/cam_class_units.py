"""Class-specific units (Zhou et al. CVPR 2016, Sec. 5, Fig. 13).

"We simply use the softmax weights to rank the units for a given class": for class ``c`` the
units (channels ``k`` of the last conv map, ``pre_pool``) are ranked by ``w_k^c``; for each of
the top units the images that activate it most (max over positions of ``f_k(x, y)``) are shown,
each segmented by the unit's activation (upsampled map above ``segment_threshold · max``; the
paper follows its ref. [33] for this step) and cropped to that segment's box.

Classes: ``config.classes`` (ImageNet ids) or, when empty, the ``num_classes`` ImageNet classes
most often predicted top-1 on the images. Images: the CUB test split when ``DIR`` holds
``CUB_200_2011`` (bird units), else an ILSVRC-layout folder.

Command (CPU; ~300 CUB images at 224)::

    nice -n 10 python -m experiments.cam_class_units --data_dir ../shared/data --workdir /tmp/cu

Writes ``WORKDIR/class_units.png`` and ``metrics.json`` (``n_images``, ``backbone``,
``seconds``, ``class_<i>``, ``class_<i>_units``, ``class_<i>_top_unit_share``: the share of the
class's summed positive weight held by its ``num_units`` top units).
"""

from __future__ import annotations

import pathlib
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from experiments import common

__all__ = ["get_config", "rank_units", "run", "segment_box", "top_images"]


def get_config(preset: str = "default") -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.backbone = "efficientnet_lite0"
    c.input_size = 224
    c.classes = ()  # ImageNet class ids; empty: the most predicted ones
    c.num_classes = 3
    c.num_units = 3
    c.num_images = 5
    c.segment_threshold = 0.5
    c.max_images = 300
    c.batch_size = 20
    if preset == "smoke":
        c.input_size = 96
        c.max_images = 8
        c.batch_size = 8
        c.num_classes = 1
        c.num_units = 2
        c.num_images = 2
    elif preset != "default":
        raise ValueError(f"unknown preset {preset!r}; use default or smoke")
    return c


def rank_units(weights: np.ndarray, class_id: int, k: int) -> np.ndarray:
    """The ``k`` units with the largest classifier weight ``w_k^c``: ``(K, C) -> (k,)``."""
    return np.argsort(-np.asarray(weights)[:, class_id], kind="stable")[:k]


def top_images(max_act: np.ndarray, unit: int, k: int) -> np.ndarray:
    """Indices of the ``k`` images with the highest peak activation of ``unit``: ``(N, K)``."""
    return np.argsort(-np.asarray(max_act)[:, unit], kind="stable")[:k]


def segment_box(act: np.ndarray, size: int, threshold: float) -> tuple[np.ndarray, np.ndarray]:
    """Upsample one unit's ``(h, w)`` map to ``size``², keep ``> threshold · max``.

    Returns the mask ``(size, size)`` bool and its box ``[x0, y0, x1, y1]`` (exclusive ends;
    the whole image when the mask is empty)."""
    from fgloc.maps.cam import resize_maps

    up = np.asarray(resize_maps(jnp.asarray(act[None], jnp.float32), (size, size))[0])
    peak = up.max()
    mask = up > threshold * peak if peak > 0 else np.zeros_like(up, bool)
    if not mask.any():
        return mask, np.array([0, 0, size, size])
    rows, cols = np.nonzero(mask)
    return mask, np.array([cols.min(), rows.min(), cols.max() + 1, rows.max() + 1])


def _image_paths(data_dir: pathlib.Path, limit: int) -> list[str]:
    try:
        root = common.resolve_data_dir(data_dir, "CUB_200_2011", ("images.txt",))
    except FileNotFoundError:
        from fgloc.data.imagenet import read_imagenet_val

        sub = data_dir / "imagenet_val_sample"
        paths = [str(p) for p in read_imagenet_val(sub if sub.is_dir() else data_dir).paths]
    else:
        from fgloc.data.cub import read_cub

        paths = [str(p) for p in read_cub(root).split("test").paths]
    return paths[: limit or None]


def run(config: Any, data_dir: pathlib.Path, workdir: pathlib.Path) -> dict[str, Any]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from tqdm.auto import tqdm

    from fgloc.data.pipeline import load_resized
    from fgloc.pretrained import pretrained

    p = pretrained(config.backbone)
    if "classifier" not in p.variables["params"]:
        raise ValueError(f"backbone {config.backbone!r} has no classifier to rank units by")
    weights = np.asarray(p.variables["params"]["classifier"]["kernel"])  # (K, C)
    paths = _image_paths(data_dir, config.max_images)
    size, bs = config.input_size, config.batch_size

    @jax.jit
    def forward(variables, images):
        logits, inter = p.model.apply(variables, p.preprocess(images))
        return jnp.argmax(logits, -1), inter["pre_pool"].astype(jnp.float16)

    preds, maps = [], []
    for i in tqdm(range(0, len(paths), bs), desc="activations"):
        imgs, _ = load_resized(paths[i : i + bs], size)
        n = len(imgs)
        if n < bs:
            imgs = np.concatenate([imgs, np.zeros((bs - n, *imgs.shape[1:]), np.uint8)])
        pred, fmap = forward(p.variables, imgs)
        preds.append(np.asarray(pred)[:n])
        maps.append(np.asarray(fmap)[:n])
    pred = np.concatenate(preds)
    fmap = np.concatenate(maps).astype(np.float32)  # (N, h, w, K)
    max_act = fmap.max(axis=(1, 2))  # (N, K)
    if config.classes:
        classes = [int(c) for c in config.classes]
    else:
        ids, counts = np.unique(pred, return_counts=True)
        classes = [int(c) for c in ids[np.argsort(-counts, kind="stable")][: config.num_classes]]
    names = p.class_names or [str(c) for c in range(weights.shape[1])]

    rows = len(classes) * config.num_units
    cols = config.num_images
    fig, axes = plt.subplots(rows, cols, figsize=(2.2 * cols, 2.3 * rows), squeeze=False)
    metrics: dict[str, Any] = {"backbone": config.backbone, "n_images": len(paths)}
    for ci, c in enumerate(classes):
        units = rank_units(weights, c, config.num_units)
        positive = np.clip(weights[:, c], 0, None)
        metrics[f"class_{ci}"] = f"{c}: {names[c]}"
        metrics[f"class_{ci}_units"] = " ".join(str(u) for u in units)
        metrics[f"class_{ci}_top_unit_share"] = float(positive[units].sum() / positive.sum())
        for ui, u in enumerate(units):
            for j, img_i in enumerate(top_images(max_act, int(u), cols)):
                ax = axes[ci * config.num_units + ui, j]
                img, _ = load_resized([paths[img_i]], size)
                mask, box = segment_box(fmap[img_i, :, :, u], size, config.segment_threshold)
                shown = np.where(mask[..., None], img[0], (img[0] * 0.25).astype(np.uint8))
                ax.imshow(shown[box[1] : box[3], box[0] : box[2]])
                ax.set_xticks([])
                ax.set_yticks([])
                if j == 0:
                    label = names[c].split(",")[0][:18]
                    ax.set_ylabel(f"{label}\nunit {u} (w={weights[u, c]:.2f})", fontsize=7)
    fig.tight_layout()
    fig.savefig(workdir / "class_units.png", dpi=80)
    plt.close(fig)
    return metrics


if __name__ == "__main__":
    common.main(get_config, run, description=__doc__)
