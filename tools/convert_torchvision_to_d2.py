#!/usr/bin/env python
"""Convert torchvision's ImageNet weights into detectron2's backbone format (.pkl).

python tools/convert_torchvision_to_d2.py --arch resnet18 weights/R-18-torchvision.pkl
python tools/convert_torchvision_to_d2.py --arch resnet50 r50.pkl \\
    --from-state-dict resnet50-0676ba61.pth
python tools/convert_torchvision_to_d2.py --arch mobilenet_v2 weights/MobileNetV2-torchvision.pkl
"""

import argparse
import sys

from dkd_det.checkpoint import (
    CONVERTERS,
    convert_torchvision,
    load_torchvision_state_dict,
    save_d2_pkl,
)


def main(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("output", help="the .pkl file to write")
    parser.add_argument("--arch", required=True, choices=sorted(CONVERTERS))
    parser.add_argument(
        "--from-state-dict",
        metavar="FILE",
        help="a local torchvision checkpoint instead of downloading",
    )
    args = parser.parse_args(argv)
    if not args.output.endswith(".pkl"):
        parser.error(
            "the output must end with .pkl (detectron2 reads third-party weights from .pkl files)"
        )
    try:
        state = load_torchvision_state_dict(args.arch, args.from_state_dict)
    except (OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    model = convert_torchvision(args.arch, state)
    save_d2_pkl(model, args.output)
    print(
        f"Wrote {args.output}: {len(model)} arrays, "
        f"{sum(v.size for v in model.values()) / 1e6:.2f} M values."
    )
    print("Use it with these detectron2 config keys:\n" + CONVERTERS[args.arch].d2_config)
    return 0


if __name__ == "__main__":
    sys.exit(main())
