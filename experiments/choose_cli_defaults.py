"""Choose ``fgloc localize`` defaults (input size, box threshold, sensitivity smoothing).

Sweeps the CLI's own code path (:func:`fgloc.app.localize_job.localize`, whole photo resized to a
square, top-5 classes, largest-component box) on an ILSVRC-layout folder and prints one JSON
line per setting with top-1 classification accuracy and top-1 / top-5 localization accuracy
(class right and IoU >= 0.5 with a ground-truth box of the image).

Command (2-core CPU, shared; about 1-2 minutes per CAM setting on the 50-image sample)::

    python -m experiments.choose_cli_defaults --data_dir ../shared/data/imagenet_val_sample \\
        --method cam --sizes 224,320,448 --thresholds 0.15,0.2,0.3,0.35,0.4,0.5

Measured on ``../shared/data/imagenet_val_sample`` (50 images, EfficientNet-Lite0, top-1 cls
acc 0.64 at every size), top-1 / top-5 loc acc::

    size  thr=0.15   0.2        0.3        0.35       0.4        0.5
    224   .24/.26    .24/.26    .28/.32    .30/.38    .32/.42    .28/.38
    320   .24/.30    .26/.34    .30/.46    .34/.50    .32/.46    .24/.34
    448   .26/.38    .26/.38    .30/.42    -          -          -

so the CLI uses 320 px and 0.35 (one image is 2 points here: a small sample).
"""

from __future__ import annotations

import argparse
import itertools
import json

import numpy as np

from fgloc import metrics
from fgloc.app.localize_job import localize
from fgloc.data.imagenet import read_imagenet_val
from fgloc.pretrained import pretrained


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0] if __doc__ else None)
    p.add_argument("--data_dir", required=True)
    p.add_argument("--method", choices=("cam", "sensitivity"), default="cam")
    p.add_argument("--sizes", default="224,320")
    p.add_argument("--thresholds", default="0.2,0.35")
    p.add_argument("--smooth", default="", help="sensitivity: sigmas in pixels at 224 (scaled)")
    p.add_argument("--model", default="efficientnet_lite0")
    args = p.parse_args(argv)
    ann = read_imagenet_val(args.data_dir)
    net = pretrained(args.model)
    sizes = [int(s) for s in args.sizes.split(",")]
    thresholds = [float(t) for t in args.thresholds.split(",")]
    smooths = [float(s) for s in args.smooth.split(",")] if args.smooth else [None]
    for size, thr, sm in itertools.product(sizes, thresholds, smooths):
        sigma = None if sm is None else sm * size / 224
        res = list(localize(net, list(ann.paths), method=args.method, topk=5, input_size=size,
                            threshold=thr, smooth_sigma=sigma, progress=False, batch_size=10))  # fmt: skip
        err = metrics.localization_error(
            np.array([r.classes for r in res]),
            np.array([r.boxes for r in res]),
            ann.labels,
            list(ann.boxes),
        )
        row = {"method": args.method, "size": size, "threshold": thr, "smooth_at_224": sm,
               "n_images": len(res), "top1_cls_acc": round(1 - err["top1_cls_err"], 4),
               "top1_loc_acc": round(1 - err["top1_loc_err"], 4),
               "top5_loc_acc": round(1 - err["top5_loc_err"], 4)}  # fmt: skip
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
