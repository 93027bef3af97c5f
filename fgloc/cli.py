"""``fgloc`` command line (intentionally thin: the logic lives in importable modules).

fgloc localize IMAGE... --method cam|sensitivity --out DIR [--topk K]
fgloc localize IMAGE... --method parts --weights DETECTOR_DIR --out DIR [--box X0,Y0,X1,Y1]
fgloc localize IMAGE... --method keypoints --weights PREDICTOR_DIR --out DIR
fgloc demo [--out DIR]
fgloc convert --arch ARCH --from torchvision|caffe ... --out PATH
"""

from __future__ import annotations

import argparse
import pathlib
import sys

# Chosen by measurement on ../shared/data/imagenet_val_sample: experiments/choose_cli_defaults.py.
DEFAULT_INPUT_SIZE = 320
DEFAULT_THRESHOLD = 0.35
DEMO_PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "motorcycle")


def _add_localize_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--method", choices=("cam", "sensitivity", "parts", "keypoints"), default="cam",
                   help="cam / sensitivity: maps and boxes; parts (paper 1) / keypoints (paper 2): "
                   "the 15 CUB parts from a fitted predictor given as --weights DIR")  # fmt: skip
    p.add_argument("--topk", type=int, default=5, help="classes per image (default 5)")
    p.add_argument("--input-size", type=int, default=DEFAULT_INPUT_SIZE,
                   help=f"square network input in pixels (default {DEFAULT_INPUT_SIZE})")  # fmt: skip
    p.add_argument("--threshold", type=float, default=DEFAULT_THRESHOLD,
                   help=f"box threshold as a fraction of the map maximum (default {DEFAULT_THRESHOLD})")  # fmt: skip
    p.add_argument("--smooth", type=float, default=None,
                   help="Gaussian sigma (input pixels) for sensitivity maps before boxing (default input/28)")  # fmt: skip
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument(
        "--model", default="efficientnet_lite0", help="pretrained name (fgloc.pretrained)"
    )
    p.add_argument(
        "--weights",
        default=None,
        help="cam/sensitivity: converted .npz for --model given as an architecture; "
        "parts/keypoints: the predictor's directory",
    )
    p.add_argument("--box", default=None,
                   help="parts: object box x0,y0,x1,y1 (pixels) applied to every image")  # fmt: skip
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--no-overlays", action="store_true",
                   help="cam/sensitivity: write results.jsonl only, no overlay pictures")  # fmt: skip


def _points(args, paths) -> int:
    from fgloc.app import points_job

    if args.weights is None:
        raise ValueError(f"--method {args.method} needs --weights DIR (a fitted predictor)")
    if args.method == "keypoints" and args.box is not None:
        raise ValueError("--box applies to --method parts only")
    box = None
    if args.box is not None:
        try:
            box = [float(v) for v in args.box.split(",")]
        except ValueError:
            raise ValueError(f"--box must be x0,y0,x1,y1 numbers, got {args.box!r}") from None
    load = (
        points_job.part_detector_predict
        if args.method == "parts"
        else points_job.keypoint_predictor_predict
    )
    predict, names = load(args.weights)
    ok, failed = points_job.run_points_to_dir(
        predict, names, paths, args.out, method=args.method, box=box, batch_size=args.batch_size
    )
    print(
        f"{ok} image(s) with {args.method}; results in {pathlib.Path(args.out) / 'results.jsonl'}"
    )
    if failed:
        print(f"{failed} image(s) could not be read (see messages above)", file=sys.stderr)
    return 0 if ok and not failed else 1


def _localize(args, paths) -> int:
    from fgloc.app.localize_job import run_to_dir
    from fgloc.pretrained import pretrained

    if args.method in ("parts", "keypoints"):
        return _points(args, paths)

    net = pretrained(args.model, weights=args.weights)
    ok, failed = run_to_dir(
        net, paths, args.out, method=args.method, topk=args.topk, input_size=args.input_size,
        threshold=args.threshold, smooth_sigma=args.smooth, batch_size=args.batch_size, progress=not args.no_progress,
        overlays=not args.no_overlays,
    )  # fmt: skip
    print(
        f"{ok} image(s) localized with {args.method}; results in {pathlib.Path(args.out) / 'results.jsonl'}"
    )
    if failed:
        print(f"{failed} image(s) could not be read (see messages above)", file=sys.stderr)
    return 0 if ok and not failed else 1


def _demo(args) -> int:
    import numpy as np
    from PIL import Image
    from skimage import data

    out = pathlib.Path(args.out)
    photos = out / "photos"
    photos.mkdir(parents=True, exist_ok=True)
    paths = []
    for name in DEMO_PHOTOS:
        img = data.stereo_motorcycle()[0] if name == "motorcycle" else getattr(data, name)()
        path = photos / f"{name}.jpg"
        Image.fromarray(np.asarray(img)).save(path, quality=95)
        paths.append(path)
    code = 0
    for method in ("cam", "sensitivity"):
        args.method = method
        args.out = str(out / method)
        code |= _localize(args, paths)
    print(f"demo pictures: {out / 'cam'}/*.png and {out / 'sensitivity'}/*.png")
    return code


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="fgloc", description="fgloc: objects and parts with pretrained CNNs"
    )
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("localize", help="maps and boxes for photos")
    p.add_argument("images", nargs="+")
    p.add_argument("--out", required=True, help="output folder (overlays + results.jsonl)")
    _add_localize_args(p)
    d = sub.add_parser("demo", help="run localize on scikit-image's sample photos")
    d.add_argument("--out", default="fgloc_demo")
    _add_localize_args(d)
    d.set_defaults(topk=3)
    sub.add_parser(
        "convert",
        help="convert a checkpoint to Flax variables (.npz); `fgloc convert --help` for options",
        add_help=False,
    )
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["convert"]:
        # The converter owns its arguments (weights_conversion.cli); hand them over untouched.
        from weights_conversion.cli import main as convert_main

        return convert_main(argv[1:])
    args = parser.parse_args(argv)
    try:
        if args.cmd == "localize":
            return _localize(args, args.images)
        return _demo(args)
    except (ValueError, OSError) as e:  # bad option, unreadable or mis-fitting --weights, --out
        print(f"fgloc: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
