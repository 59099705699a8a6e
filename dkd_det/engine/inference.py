"""Inference on images, videos and a webcam with a trained student, for tools/demo.py.

Works with a dkd-det distillation config (the teacher is never built: inference is the
student alone) and with a plain detectron2 config such as an exported student.
"""
import glob
import json
import logging
import os
import sys
import time
from typing import Iterator, List, Optional, Sequence, Tuple

import cv2
import numpy as np
import torch
from detectron2.config import CfgNode
from detectron2.data import MetadataCatalog
from detectron2.data.catalog import Metadata
from detectron2.data.detection_utils import read_image
from detectron2.engine import DefaultPredictor
from detectron2.structures import Instances
from detectron2.utils.video_visualizer import VideoVisualizer
from detectron2.utils.visualizer import ColorMode, Visualizer
from tqdm import tqdm

from ..config import get_dkd_cfg
from ..data import register_coco_format
from ..modeling import resolve_weights

__all__ = [
    "IMAGE_EXTENSIONS",
    "setup_inference_cfg",
    "dataset_metadata",
    "expand_inputs",
    "image_output_path",
    "Demo",
    "can_show",
    "run_on_images",
    "run_on_video",
]

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".ppm", ".pgm")
# Written next to an exported student's config.yaml (see dkd_det.engine.export): the class
# names of a COCO-format dataset, which a plain detectron2 config cannot hold.
METADATA_FILE = "metadata.json"


def setup_inference_cfg(config_file: str, opts: Sequence[str] = (), confidence_threshold: Optional[float] = None) -> CfgNode:
    """A frozen config for inference: ``config_file`` (dkd-det or plain detectron2), then ``opts``.

    The teacher is switched off (``MODEL.DISTILL.TYPE NONE``), the device falls back to the CPU
    when CUDA is unavailable, and ``MODEL.WEIGHTS`` must name an existing file or a URL that can
    be fetched: every problem is raised here, before any model is built.

    Args:
        confidence_threshold: if given, the minimum score (0..1) of the detections kept.
    """
    cfg = get_dkd_cfg(config_file, opts)
    cfg.MODEL.DISTILL.TYPE = "NONE"  # inference is the student alone: no teacher to load
    if confidence_threshold is not None:
        cfg.MODEL.ROI_HEADS.SCORE_THRESH_TEST = confidence_threshold
        cfg.MODEL.RETINANET.SCORE_THRESH_TEST = confidence_threshold
    if cfg.MODEL.DEVICE.startswith("cuda") and not torch.cuda.is_available():
        logger.warning("MODEL.DEVICE is %s but CUDA is not available: running on the CPU.", cfg.MODEL.DEVICE)
        cfg.MODEL.DEVICE = "cpu"
    if not cfg.MODEL.WEIGHTS:
        raise ValueError("MODEL.WEIGHTS is empty: set it to the trained model, e.g. --opts MODEL.WEIGHTS model_final.pth")
    cfg.MODEL.WEIGHTS = resolve_weights(cfg.MODEL.WEIGHTS, "MODEL.WEIGHTS")
    cfg.freeze()
    return cfg


def _classes_from_coco_json(json_file: str) -> List[str]:
    """Category names of a COCO json, ordered by category id (as detectron2's loader orders them)."""
    with open(json_file) as f:
        cats = json.load(f)["categories"]
    return [c["name"] for c in sorted(cats, key=lambda c: c["id"])]


def dataset_metadata(cfg: CfgNode, config_file: Optional[str] = None) -> Metadata:
    """The metadata (class names) of ``cfg.DATASETS.TEST[0]``.

    Builtin datasets (COCO) know their classes; a COCO-format dataset of ``DATASETS.COCO_FORMAT``
    is registered and its classes read from its json; otherwise the ``metadata.json`` an export
    wrote next to ``config_file`` is used. Without any of them the class ids are drawn instead.
    """
    register_coco_format(cfg)
    name = cfg.DATASETS.TEST[0] if len(cfg.DATASETS.TEST) else "__unused"
    meta = MetadataCatalog.get(name)
    if meta.get("thing_classes") is None:
        json_file = meta.get("json_file", None)
        if json_file and os.path.isfile(json_file):
            meta.thing_classes = _classes_from_coco_json(json_file)
    if meta.get("thing_classes") is None and config_file:
        sidecar = os.path.join(os.path.dirname(os.path.abspath(config_file)), METADATA_FILE)
        if os.path.isfile(sidecar):
            with open(sidecar) as f:
                return Metadata(name=name, **json.load(f))
    if meta.get("thing_classes") is None:
        logger.warning("The class names of dataset %r are unknown: drawing class ids.", name)
    return meta


def expand_inputs(inputs: Sequence[str]) -> List[str]:
    """Files, glob patterns and folders (their images, by extension, not recursive) -> file list.

    A path that exists nowhere is kept, so that it is reported as a failed image later.
    """
    files: List[str] = []
    for item in inputs:
        item = os.path.expanduser(item)
        if os.path.isdir(item):
            found = sorted(
                os.path.join(item, f) for f in os.listdir(item) if f.lower().endswith(IMAGE_EXTENSIONS)
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


def image_output_path(output: str, input_path: str, num_inputs: int) -> str:
    """Where the annotated ``input_path`` goes: ``output`` itself if it is a file name (one input,
    image extension), else ``output/<input's file name>`` (the folder is created)."""
    if num_inputs == 1 and output.lower().endswith(IMAGE_EXTENSIONS) and not os.path.isdir(output):
        os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
        return output
    os.makedirs(output, exist_ok=True)
    return os.path.join(output, os.path.basename(input_path))


class Demo:
    """A :class:`DefaultPredictor` (one BGR image in, the student's detections out) and the
    drawing of its detections with the dataset's class names."""

    def __init__(self, cfg: CfgNode, metadata: Metadata, instance_mode: ColorMode = ColorMode.IMAGE):
        self.predictor = DefaultPredictor(cfg)
        self.metadata = metadata
        self.instance_mode = instance_mode

    def predict(self, image_bgr: np.ndarray) -> Instances:
        """Detections for one image: (H, W, 3) uint8 BGR -> Instances on the CPU, boxes in input pixels."""
        return self.predictor(image_bgr)["instances"].to("cpu")

    def draw(self, image_bgr: np.ndarray, instances: Instances) -> np.ndarray:
        """The image with boxes, class names and scores drawn: (H, W, 3) uint8 BGR."""
        vis = Visualizer(image_bgr[:, :, ::-1], self.metadata, instance_mode=self.instance_mode)
        return vis.draw_instance_predictions(instances).get_image()[:, :, ::-1]

    def frames(self, capture: cv2.VideoCapture) -> Iterator[Tuple[np.ndarray, Instances]]:
        """Annotated frames of a video or camera: yields ((H, W, 3) uint8 BGR, detections)
        until the capture ends. Colours stay with the objects across frames."""
        video_vis = VideoVisualizer(self.metadata, self.instance_mode)
        while True:
            ok, frame = capture.read()
            if not ok:
                return
            instances = self.predict(frame)
            vis = video_vis.draw_instance_predictions(frame[:, :, ::-1], instances)
            yield vis.get_image()[:, :, ::-1], instances


def can_show() -> bool:
    """Whether OpenCV windows can open here (False on a Linux machine without a display)."""
    return not sys.platform.startswith("linux") or bool(os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY"))


def _show(image_bgr: np.ndarray, wait_ms: int) -> bool:
    """Show an image in a window; False once the user pressed Esc."""
    cv2.namedWindow("dkd-det", cv2.WINDOW_NORMAL)
    cv2.imshow("dkd-det", image_bgr)
    return cv2.waitKey(wait_ms) != 27


def run_on_images(demo: Demo, paths: Sequence[str], output: Optional[str]) -> List[str]:
    """Detect, log (count, seconds) and draw every image; write to ``output`` or show in a window.

    An image that cannot be read is logged and skipped.

    Returns:
        the paths that failed.
    """
    failed = []
    for path in tqdm(paths, desc="images", unit="img"):
        try:
            image = read_image(path, format="BGR")
        except Exception as e:  # missing, truncated, not an image
            logger.error("%s: cannot read the image (%s: %s); skipped.", path, type(e).__name__, e)
            failed.append(path)
            continue
        start = time.perf_counter()
        instances = demo.predict(image)
        logger.info("%s: %d detections in %.2fs", path, len(instances), time.perf_counter() - start)
        drawn = demo.draw(image, instances)
        if output:
            out_path = image_output_path(output, path, len(paths))
            if not cv2.imwrite(out_path, drawn):
                logger.error("%s: could not write %s; skipped.", path, out_path)
                failed.append(path)
        elif not _show(drawn, 0):
            break
    return failed


def _video_writer(path: str, fps: float, size: Tuple[int, int]) -> cv2.VideoWriter:
    fourcc = "MJPG" if path.lower().endswith(".avi") else "mp4v"
    writer = cv2.VideoWriter(path, cv2.VideoWriter_fourcc(*fourcc), fps, size, True)
    if not writer.isOpened():
        raise OSError(f"OpenCV cannot write the video {path!r} (codec {fourcc}); try a .mp4 or .avi file name.")
    return writer


def run_on_video(demo: Demo, source, output: Optional[str]) -> int:
    """Detect on every frame of a video file (or camera index ``source``), writing the annotated
    video to ``output`` (a file, or a folder that gets the input's file name) or showing it
    (Esc stops).

    Returns:
        the number of frames processed.
    """
    capture = cv2.VideoCapture(source)
    if not capture.isOpened():
        raise OSError(f"OpenCV cannot open the video {source!r}.")
    fps = capture.get(cv2.CAP_PROP_FPS) or 25.0
    total = int(capture.get(cv2.CAP_PROP_FRAME_COUNT)) or None
    if output and (os.path.isdir(output) or not os.path.splitext(output)[1]):
        name = os.path.basename(source) if isinstance(source, str) else "webcam.mp4"
        os.makedirs(output, exist_ok=True)
        output = os.path.join(output, name)
    writer = None
    count = 0
    start = time.perf_counter()
    try:
        for frame, _ in tqdm(demo.frames(capture), total=total, desc="frames", unit="frame"):
            count += 1
            if output:
                if writer is None:
                    writer = _video_writer(output, fps, (frame.shape[1], frame.shape[0]))
                writer.write(np.ascontiguousarray(frame))
            elif not _show(frame, 1):
                break
    finally:
        capture.release()
        if writer is not None:
            writer.release()
    logger.info("%s: %d frames in %.2fs%s", source, count, time.perf_counter() - start, f", written to {output}" if output else "")
    return count
