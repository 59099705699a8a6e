#!/usr/bin/env python
"""Run a trained student on images, a video or a webcam and draw its detections,
in the style of detectron2's demo/demo.py.

    python tools/demo.py --config-file configs/COCO/dkd_r101_r18.yaml \\
        --input photos/ --output out/ \\
        --opts MODEL.WEIGHTS output/dkd_r101_r18/model_final.pth
    python tools/demo.py --config-file exported/config.yaml --video-input clip.mp4 --output out.mp4

Works with a distillation config (the teacher is never loaded) and with a plain detectron2
config such as the output of tools/export_student.py. Exit status 1 if an image failed.
"""

import argparse
import glob
import logging
import os
import sys
import time

import cv2
import numpy as np
import torch
from detectron2.data.detection_utils import read_image
from detectron2.utils.logger import setup_logger
from detectron2.utils.video_visualizer import VideoVisualizer
from detectron2.utils.visualizer import ColorMode, Visualizer
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from dkd_det.checkpoint import resolve_weights
from dkd_det.config import get_dkd_cfg, student_cfg
from dkd_det.data import dataset_metadata
from dkd_det.engine import Predictor

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".ppm", ".pgm")
WINDOW = "dkd-det"
logger = logging.getLogger("dkd_det.demo")


def setup_cfg(args):
    """The student's frozen config; the device falls back to the CPU without CUDA, and the
    weights are resolved here, so that every problem is raised before any model is built."""
    cfg = student_cfg(get_dkd_cfg(args.config_file, args.opts))
    cfg.MODEL.ROI_HEADS.SCORE_THRESH_TEST = args.confidence_threshold
    cfg.MODEL.RETINANET.SCORE_THRESH_TEST = args.confidence_threshold
    if cfg.MODEL.DEVICE.startswith("cuda") and not torch.cuda.is_available():
        logger.warning(
            "MODEL.DEVICE is %s but CUDA is not available: running on the CPU.", cfg.MODEL.DEVICE
        )
        cfg.MODEL.DEVICE = "cpu"
    if not cfg.MODEL.WEIGHTS:
        raise ValueError(
            "MODEL.WEIGHTS is empty: set it to the trained model, "
            "e.g. --opts MODEL.WEIGHTS model_final.pth"
        )
    cfg.MODEL.WEIGHTS = resolve_weights(cfg.MODEL.WEIGHTS, "MODEL.WEIGHTS")
    cfg.freeze()
    return cfg


def get_parser():
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--config-file", required=True, metavar="FILE", help="dkd-det or detectron2 config"
    )
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument(
        "--input", nargs="+", help="images: files, glob patterns ('dir/*.jpg') or folders"
    )
    source.add_argument("--video-input", help="a video file")
    source.add_argument("--webcam", action="store_true", help="camera 0")
    parser.add_argument(
        "--output", help="file or folder for the annotated images / video; without it, show them"
    )
    parser.add_argument(
        "--confidence-threshold", type=float, default=0.5, help="minimum score of the detections"
    )
    parser.add_argument(
        "--opts", default=[], nargs=argparse.REMAINDER, help="config overrides as KEY VALUE pairs"
    )
    return parser


def expand_inputs(inputs):
    """Files, glob patterns and folders (their images, not recursive) -> file list. A path
    that exists nowhere is kept, so that it is reported as a failed image later."""
    files = []
    for item in map(os.path.expanduser, inputs):
        if os.path.isdir(item):
            found = sorted(
                os.path.join(item, f)
                for f in os.listdir(item)
                if f.lower().endswith(IMAGE_EXTENSIONS)
            )
            if not found:
                logger.warning("Folder %s holds no images (%s).", item, ", ".join(IMAGE_EXTENSIONS))
            files.extend(found)
        elif glob.has_magic(item):
            found = sorted(p for p in glob.glob(item) if os.path.isfile(p))
            if not found:
                logger.warning("No file matches %s.", item)
            files.extend(found)
        else:
            files.append(item)
    return files


def output_path(output, input_path, num_inputs):
    """``output`` itself if it is an image file name and there is one input, else
    ``output/<input's file name>`` (the folder is created)."""
    if num_inputs == 1 and output.lower().endswith(IMAGE_EXTENSIONS) and not os.path.isdir(output):
        os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
        return output
    os.makedirs(output, exist_ok=True)
    return os.path.join(output, os.path.basename(input_path))


def can_show():
    """Whether OpenCV windows can open here (False on a Linux machine without a display)."""
    return not sys.platform.startswith("linux") or bool(
        os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY")
    )


def show(image_bgr, wait_ms):
    """Show an image in a window; False once the user pressed Esc."""
    cv2.namedWindow(WINDOW, cv2.WINDOW_NORMAL)
    cv2.imshow(WINDOW, image_bgr)
    return cv2.waitKey(wait_ms) != 27


def run_on_images(predictor, metadata, paths, output):
    """Detect, log and draw every image; returns the paths that failed (unreadable image or
    output that could not be written), which are reported and skipped."""
    failed = []
    for path in tqdm(paths, desc="images", unit="img"):
        try:
            image = read_image(path, format="BGR")
        except Exception as e:  # missing, truncated, not an image
            logger.error("%s: cannot read the image (%s: %s); skipped.", path, type(e).__name__, e)
            failed.append(path)
            continue
        start = time.perf_counter()
        instances = predictor(image)["instances"].to("cpu")
        logger.info("%s: %d detections in %.2fs", path, len(instances), time.perf_counter() - start)
        vis = Visualizer(image[:, :, ::-1], metadata, instance_mode=ColorMode.IMAGE)
        drawn = vis.draw_instance_predictions(instances).get_image()[:, :, ::-1]
        if output:
            out_path = output_path(output, path, len(paths))
            if not cv2.imwrite(out_path, drawn):
                logger.error("%s: could not write %s; skipped.", path, out_path)
                failed.append(path)
        elif not show(drawn, 0):
            break
    return failed


def run_on_video(predictor, metadata, source, output):
    """Detect on every frame of a video file (or camera index), writing the annotated video
    to ``output`` (a file, or a folder that gets the input's name) or showing it (Esc stops)."""
    capture = cv2.VideoCapture(source)
    if not capture.isOpened():
        raise OSError(f"OpenCV cannot open the video {source!r}.")
    fps = capture.get(cv2.CAP_PROP_FPS) or 25.0
    total = int(capture.get(cv2.CAP_PROP_FRAME_COUNT)) or None
    if output and (os.path.isdir(output) or not os.path.splitext(output)[1]):
        os.makedirs(output, exist_ok=True)
        output = os.path.join(
            output, os.path.basename(source) if isinstance(source, str) else "webcam.mp4"
        )
    video_vis = VideoVisualizer(metadata, ColorMode.IMAGE)  # colours stay with the objects
    writer, count, start = None, 0, time.perf_counter()
    try:
        with tqdm(total=total, desc="frames", unit="frame") as bar:
            while True:
                ok, frame = capture.read()
                if not ok:
                    break
                instances = predictor(frame)["instances"].to("cpu")
                drawn = video_vis.draw_instance_predictions(
                    frame[:, :, ::-1], instances
                ).get_image()[:, :, ::-1]
                count += 1
                bar.update()
                if not output:
                    if not show(drawn, 1):
                        break
                    continue
                if writer is None:
                    fourcc = "MJPG" if output.lower().endswith(".avi") else "mp4v"
                    size = (drawn.shape[1], drawn.shape[0])
                    writer = cv2.VideoWriter(
                        output, cv2.VideoWriter_fourcc(*fourcc), fps, size, True
                    )
                    if not writer.isOpened():
                        raise OSError(
                            f"OpenCV cannot write {output!r} (codec {fourcc}); "
                            "try a .mp4 or .avi name."
                        )
                writer.write(np.ascontiguousarray(drawn))
    finally:
        capture.release()
        if writer is not None:
            writer.release()
    written = f", written to {output}" if output else ""
    logger.info("%s: %d frames in %.2fs%s", source, count, time.perf_counter() - start, written)


def main(argv=None):
    args = get_parser().parse_args(argv)
    setup_logger(name="fvcore")
    setup_logger()
    setup_logger(name="dkd_det")
    if not args.output and not can_show():
        print(
            "error: no display to show the results on; pass --output FILE_OR_FOLDER.",
            file=sys.stderr,
        )
        return 2
    if args.video_input and not os.path.isfile(args.video_input):
        print(f"error: --video-input {args.video_input!r}: no such file.", file=sys.stderr)
        return 2
    try:
        cfg = setup_cfg(args)
    except (OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    paths = expand_inputs(args.input) if args.input else []
    if args.input and not paths:
        print(f"error: no images found in {args.input}.", file=sys.stderr)
        return 2
    predictor = Predictor(cfg)
    metadata = dataset_metadata(cfg, args.config_file)
    with logging_redirect_tqdm(loggers=[logger]):
        if args.input:
            failed = run_on_images(predictor, metadata, paths, args.output)
            if failed:
                logger.error(
                    "%d of %d images could not be processed: %s",
                    len(failed),
                    len(paths),
                    ", ".join(failed),
                )
                return 1
            return 0
        try:
            run_on_video(predictor, metadata, 0 if args.webcam else args.video_input, args.output)
        except OSError as e:
            print(f"error: {e}", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
