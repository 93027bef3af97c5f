"""Offline check: fgloc's PCP head / body boxes against the ones Part-based R-CNN released.

Zhang et al. 2016 (Table 3) score PCP on the head and body boxes of Part-based R-CNN (Zhang et
al. 2014), whose code release (github.com/DennisLeoUTS/part-based-RCNN) ships them as
``annotations/bird_{train,test}.mat``: a struct array ``data`` with fields ``im``, ``bbox``,
``head`` and ``body`` (``[x0 y0 x1 y1]``, ``[-1 -1 -1 -1]`` where a box is missing). Those files
are not fgloc's to ship, so this check runs here by hand, never in CI::

    python scripts/check_pcp_boxes.py --cub ../shared/data/CUB_200_2011 \
        --annotations /path/to/part-based-RCNN/annotations

It prints, per definition in ``fgloc.metrics.PCP_DEFINITIONS`` and per group, on the images of
``--cub`` that the release also has: how many boxes both have, how many only one has, how many
are equal, and the median IoU. Exit status 1 when the paper's definition (``prcnn``)
disagrees anywhere. Measured 2026-12-04 on the 25-class subset: 1,402 images; ``prcnn`` head
1401 / 1401 equal, body 1355 / 1355 equal, no box on one side only; ``torso`` body 58 / 1354
equal, median IoU 0.73, 2 boxes the release does not have and 1 it has alone.
"""

from __future__ import annotations

import argparse
import pathlib
import sys

import numpy as np
import scipy.io

from fgloc.data.cub import read_cub
from fgloc.metrics import PCP_DEFINITIONS, iou, part_boxes_from_keypoints


def _released(folder: pathlib.Path) -> dict[str, dict[str, np.ndarray]]:
    """``{"<class folder>/<file>.jpg": {"head": box, "body": box}}``, keyed like ``images.txt``."""
    out: dict[str, dict[str, np.ndarray]] = {}
    for split in ("train", "test"):
        path = folder / f"bird_{split}.mat"
        if not path.is_file():
            raise SystemExit(f"--annotations: {path} not found")
        for rec in scipy.io.loadmat(path, squeeze_me=True)["data"]:
            name = "/".join(str(rec["im"]).replace("\\", "/").split("/")[-2:])
            out[name] = {g: np.asarray(rec[g], np.float64) for g in ("head", "body")}
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cub", required=True, help="a CUB_200_2011 folder")
    ap.add_argument("--annotations", required=True, help="part-based-RCNN's annotations/ folder")
    args = ap.parse_args(argv)
    ann = read_cub(args.cub)
    released = _released(pathlib.Path(args.annotations))
    rows = [i for i, name in enumerate(ann.file_names) if str(name) in released]
    refs = [released[str(ann.file_names[i])] for i in rows]
    if not rows:
        raise SystemExit("no image of --cub is in the released annotations")
    print(f"{len(rows)} images in both")
    ok = True
    for definition, (groups, min_visible) in PCP_DEFINITIONS.items():
        boxes, valid = part_boxes_from_keypoints(
            ann.parts[rows], ann.visible[rows], groups, min_visible=min_visible
        )
        for g, group in enumerate(groups):
            ref = np.stack([r[group] for r in refs])
            has = ~np.all(ref == -1, axis=1)
            both = has & valid[:, g]
            equal = both & np.all(boxes[:, g] == ref, axis=1)
            overlap = iou(boxes[both, g], ref[both])
            print(
                f"{definition:6s} {group:5s} both {int(both.sum())}, equal {int(equal.sum())}, "
                f"only fgloc {int((valid[:, g] & ~has).sum())}, "
                f"only released {int((has & ~valid[:, g]).sum())}, "
                f"median IoU {float(np.median(overlap)):.3f}"
            )
            if definition == "prcnn":
                ok &= bool(equal.sum() == has.sum() == valid[:, g].sum())
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
