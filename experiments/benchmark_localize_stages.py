"""Where the time of one warm `fgloc localize` pass goes (issue 17, target 3's bound).

The job of `fgloc.app.localize_job` on real photos, timed stage by stage in one process:
decode (`fgloc.data.images.load_image`), resize (`localize_job.resize_photo`), the jitted
batch call (forward + top-k CAMs + boxes, `localize_job._localize_batch`), and, for the bound,
the classifier's forward pass alone on the same batch. Each pass visits every photo once; the
first includes compilation, the last is the warm figure. Writes a JSON file::

    python -m experiments.benchmark_localize_stages --out benchmarks/localize_stages_cpu_2core.json

Photos: the ImageNet validation sample of ``../shared/data``, else scikit-image's photos.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import tempfile
import time
from typing import Any

import jax
import numpy as np

from experiments.common_bench import versions
from fgloc.app import localize_job
from fgloc.data.images import load_image
from fgloc.pretrained import pretrained

PHOTOS = pathlib.Path(__file__).resolve().parents[2] / "shared/data/imagenet_val_sample/val"


def _paths(num: int) -> list[str]:
    paths = [str(p) for p in sorted(PHOTOS.glob("*.JPEG"))[:num]]
    if paths:
        return paths
    from PIL import Image
    from skimage import data

    tmp = pathlib.Path(tempfile.mkdtemp(prefix="fgloc_stages_"))
    for n in ("astronaut", "coffee", "chelsea", "rocket"):
        Image.fromarray(np.asarray(getattr(data, n)())[..., :3]).save(tmp / f"{n}.jpg")
    return [str(p) for p in sorted(tmp.glob("*.jpg"))][:num]


def run(
    num: int = 50, size: int = 320, batch: int = 8, topk: int = 5, passes: int = 2
) -> dict[str, Any]:
    """Seconds per stage for each pass over ``num`` photos (the CLI defaults otherwise)."""
    net = pretrained("efficientnet_lite0")
    paths = _paths(num)
    forward = jax.jit(lambda v, x: net.model.apply(v, x)[0])
    out: list[dict[str, float]] = []
    for _ in range(passes):
        t = {"decode": 0.0, "resize": 0.0, "batch_call": 0.0, "forward_only": 0.0}
        for i in range(0, len(paths), batch):
            t0 = time.perf_counter()
            photos = [load_image(p) for p in paths[i : i + batch]]
            t1 = time.perf_counter()
            x = np.stack([localize_job.resize_photo(p, size) for p in photos])
            x = np.concatenate([x, np.repeat(x[-1:], batch - len(x), axis=0)])  # fixed batch
            t2 = time.perf_counter()
            jax.device_get(
                localize_job._localize_batch(
                    net.model, net.variables, net.preprocess(x), network=net.network,
                    method="cam", topk=topk, threshold=0.35, smooth_sigma=0.0,
                )
            )  # fmt: skip
            t3 = time.perf_counter()
            jax.block_until_ready(forward(net.variables, net.preprocess(x)))
            t4 = time.perf_counter()
            t["decode"] += t1 - t0
            t["resize"] += t2 - t1
            t["batch_call"] += t3 - t2
            t["forward_only"] += t4 - t3
        out.append({k: round(v, 3) for k, v in t.items()})
    warm = out[-1]
    return {
        "photos": len(paths),
        "input_size": size,
        "batch": batch,
        "topk": topk,
        "passes": out,
        "warm_forward_fraction_of_batch_call": round(warm["forward_only"] / warm["batch_call"], 3),
        "versions": versions(),
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="JSON output path")
    parser.add_argument("--photos", type=int, default=50)
    parser.add_argument("--size", type=int, default=320)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--passes", type=int, default=2)
    args = parser.parse_args(argv)
    if args.photos < 1 or args.batch < 1 or args.passes < 1 or args.size < 32:
        parser.error("--photos, --batch and --passes must be >= 1 and --size >= 32")
    result = run(args.photos, args.size, args.batch, passes=args.passes)
    path = pathlib.Path(args.out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result["passes"][-1]))
    return result


if __name__ == "__main__":
    main()
