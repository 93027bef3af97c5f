"""Choose ``fgloc localize`` defaults (input size, box threshold, sensitivity smoothing).

Sweeps the CLI's own code path (:func:`fgloc.app.localize_job.localize`, whole photo resized to a
square, top-5 classes, largest-component box) on an ILSVRC-layout folder and reports, per
setting, top-1 classification accuracy and top-1 / top-5 localization accuracy (class right and
IoU >= 0.5 with a ground-truth box of the image): one JSON line per setting on stdout, and flat
keys ``<method>_s<size>_t<threshold>[_sm<sigma>].<metric>`` in ``metrics.json``.

Configurations: ``experiments/configs/choose_cli_defaults.py``. Command (2-core CPU, shared;
about 1-2 minutes per CAM setting on the 50-image sample in ``../shared/data``)::

    python -m experiments.choose_cli_defaults --workdir /tmp/cli_defaults

Measured on ``../shared/data/imagenet_val_sample`` (50 images, EfficientNet-Lite0, top-1 cls
acc 0.64 at every size), top-1 / top-5 loc acc::

    size  thr=0.15   0.2        0.3        0.35       0.4        0.5
    224   .24/.26    .24/.26    .28/.32    .30/.38    .32/.42    .28/.38
    320   .24/.30    .26/.34    .30/.46    .34/.50    .32/.46    .24/.34
    448   .26/.38    .26/.38    .30/.42    -          -          -

so the CLI uses 320 px and 0.35 (one image is 2 points here: a small sample).
"""

from __future__ import annotations

import itertools
import json
import pathlib
from typing import Any

import numpy as np

from experiments import common

__all__ = ["run"]


def run(config: Any, data_dir: pathlib.Path, workdir: pathlib.Path) -> dict[str, Any]:
    from fgloc import metrics
    from fgloc.app.localize_job import localize
    from fgloc.data.imagenet import read_imagenet_val
    from fgloc.pretrained import pretrained

    del workdir  # nothing but metrics.json (written by common.main)
    ann = read_imagenet_val(common.resolve_data_dir(data_dir, "imagenet_val_sample"))
    n = len(ann) if not config.max_images else min(int(config.max_images), len(ann))
    paths, labels, gt = list(ann.paths[:n]), ann.labels[:n], list(ann.boxes[:n])
    net = pretrained(config.model)
    smooths: list[float | None] = [float(s) for s in config.smooth] or [None]
    out: dict[str, Any] = {"model": config.model, "method": config.method, "n_images": n}
    for size, thr, sm in itertools.product(config.sizes, config.thresholds, smooths):
        sigma = None if sm is None else sm * size / 224
        res = list(
            localize(
                net, paths, method=config.method, topk=5, input_size=int(size),
                threshold=float(thr), smooth_sigma=sigma, progress=False,
                batch_size=int(config.batch_size),
            )
        )  # fmt: skip
        err = metrics.localization_error(
            np.array([r.classes for r in res]), np.array([r.boxes for r in res]), labels, gt
        )
        row = {
            "top1_cls_acc": round(1 - err["top1_cls_err"], 4),
            "top1_loc_acc": round(1 - err["top1_loc_err"], 4),
            "top5_loc_acc": round(1 - err["top5_loc_err"], 4),
        }
        key = f"{config.method}_s{size}_t{thr:g}" + ("" if sm is None else f"_sm{sm:g}")
        print(json.dumps({"setting": key, **row}), flush=True)
        out.update({f"{key}.{k}": v for k, v in row.items()})
    return out


if __name__ == "__main__":
    common.main(run)
