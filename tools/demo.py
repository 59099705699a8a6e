#!/usr/bin/env python
"""Run a trained student on images, a video or a webcam and draw its detections,
in the style of detectron2's demo/demo.py.

    python tools/demo.py --config-file configs/COCO/dkd_r101_r18.yaml --input photos/ --output out/ \\
        --opts MODEL.WEIGHTS output/dkd_r101_r18/model_final.pth
    python tools/demo.py --config-file exported/config.yaml --video-input clip.mp4 --output out.mp4

Works with a distillation config (the teacher is never loaded) and with a plain detectron2
config such as the output of tools/export_student.py. Exit status 1 if an image failed.
"""
import argparse
import os
import sys

from detectron2.utils.logger import setup_logger
from tqdm.contrib.logging import logging_redirect_tqdm

from dkd_det.engine.inference import Demo, can_show, dataset_metadata, expand_inputs, run_on_images, run_on_video, setup_inference_cfg


def get_parser():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config-file", required=True, metavar="FILE", help="dkd-det or detectron2 config")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--input", nargs="+", help="images: files, glob patterns ('dir/*.jpg') or folders")
    source.add_argument("--video-input", help="a video file")
    source.add_argument("--webcam", action="store_true", help="camera 0")
    parser.add_argument("--output", help="file or folder for the annotated images / video; without it, show them in a window")
    parser.add_argument("--confidence-threshold", type=float, default=0.5, help="minimum score of the detections drawn")
    parser.add_argument("--opts", default=[], nargs=argparse.REMAINDER, help="config overrides as KEY VALUE pairs")
    return parser


def main(argv=None):
    args = get_parser().parse_args(argv)
    setup_logger(name="fvcore")
    setup_logger()
    logger = setup_logger(name="dkd_det")
    if not args.output and not can_show():
        print("error: no display to show the results on; pass --output FILE_OR_FOLDER.", file=sys.stderr)
        return 2
    if args.video_input and not os.path.isfile(args.video_input):
        print(f"error: --video-input {args.video_input!r}: no such file.", file=sys.stderr)
        return 2
    try:
        cfg = setup_inference_cfg(args.config_file, args.opts, args.confidence_threshold)
    except (OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    paths = expand_inputs(args.input) if args.input else []
    if args.input and not paths:
        print(f"error: no images found in {args.input}.", file=sys.stderr)
        return 2
    demo = Demo(cfg, dataset_metadata(cfg, args.config_file))
    with logging_redirect_tqdm(loggers=[logger]):
        if args.input:
            failed = run_on_images(demo, paths, args.output)
            if failed:
                logger.error("%d of %d images could not be processed: %s", len(failed), len(paths), ", ".join(failed))
                return 1
        else:
            try:
                run_on_video(demo, 0 if args.webcam else args.video_input, args.output)
            except OSError as e:
                print(f"error: {e}", file=sys.stderr)
                return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
