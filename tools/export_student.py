#!/usr/bin/env python
"""Export a trained student as a plain detectron2 model (no dkd-det needed to use it).

    python tools/export_student.py --config-file configs/COCO/dkd_r101_r18.yaml \\
        --weights output/dkd_r101_r18/model_final.pth --output exported/dkd_r101_r18

writes OUTPUT/config.yaml (GeneralizedRCNN + StandardROIHeads, no distillation keys),
OUTPUT/model_final.pth (the student's weights only) and, when the test dataset's class names
are known, OUTPUT/metadata.json (which tools/demo.py reads). Vanilla detectron2 then runs it:

    cfg = get_cfg(); cfg.merge_from_file("exported/dkd_r101_r18/config.yaml")
    model = build_model(cfg); DetectionCheckpointer(model).load(cfg.MODEL.WEIGHTS)

--format torchscript (traced; --torchscript-method script to script it) or --format onnx
(opset 17, torch's TorchScript-based exporter, needs the deploy extra) writes OUTPUT/model.ts
or OUTPUT/model.onnx and
OUTPUT/deploy.json (input format, pixel mean/std, size limits, output names, class names),
then checks that the file gives the PyTorch student's detections (a Mask R-CNN's masks too, by
mask IoU, --mask-iou-tol) on --check-images (default:
images of DATASETS.TEST[0] when readable), random images and one image the resize shrinks 0.3x;
it fails if they differ, or if the student detected nothing (--allow-no-detections accepts it).

Every format first compares the preprocessing (INPUT.FORMAT, MODEL.PIXEL_MEAN/STD,
INPUT.MIN/MAX_SIZE_TEST) with the training config saved beside the checkpoint (config.yaml)
and refuses a difference (--ignore-training-config exports anyway). Weights are loaded as data
(see the README, "Loading files safely").
"""

import argparse
import logging
import os
import sys

from detectron2.utils.logger import setup_logger

from dkd_det.checkpoint import checkpoint_size, resolve_weights
from dkd_det.config import get_dkd_cfg, student_cfg
from dkd_det.data import dataset_metadata, save_metadata
from dkd_det.engine import load_student
from dkd_det.export import (
    DEPLOY_FORMATS,
    ONNX_OPSET,
    ExportError,
    MissingDeployExtra,
    Tolerances,
    check_training_config,
    export_deployable,
    export_student,
    require_onnx,
    sample_inputs,
)

logger = logging.getLogger("dkd_det.export")


_IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".bmp")


def _check_files(cfg, args):
    """The images the deploy check runs on: --check-images (files or folders), else the first
    of DATASETS.TEST[0] when it is registered and on disk, else none (random images only)."""
    files = []
    for path in args.check_images or []:
        if os.path.isdir(path):
            names = sorted(n for n in os.listdir(path) if n.lower().endswith(_IMAGE_EXTS))
            files += [os.path.join(path, n) for n in names]
        else:
            files.append(path)
    if args.check_images:
        return files[: args.num_check_images]
    from detectron2.data import DatasetCatalog

    from dkd_det.data import register_coco_format

    try:
        register_coco_format(cfg)
        dicts = DatasetCatalog.get(cfg.DATASETS.TEST[0])[: args.num_check_images]
        files = [d["file_name"] for d in dicts if os.path.isfile(d["file_name"])]
    except (IndexError, KeyError, OSError, AssertionError) as e:
        logger.info("No test-set images for the check (%s): random images only.", e)
    if not files:
        logger.warning(
            "The check runs on random images only: pass --check-images for real ones (a "
            "trained student may detect nothing in noise, which checks little)."
        )
    return files


def export_deploy(args, cfg, model, training_config):
    """--format torchscript/onnx: the deployable file, deploy.json and the check."""
    files = _check_files(cfg, args)
    images = sample_inputs(cfg, files, num_random=0 if files else 1)
    classes = dataset_metadata(cfg).get("thing_classes", None)
    return export_deployable(
        cfg,
        model,
        args.output,
        args.format,
        images,
        classes,
        method=args.torchscript_method,
        opset=args.opset,
        check=not args.no_check,
        tol=Tolerances(box_px=args.box_tol, score=args.score_tol, mask_iou=args.mask_iou_tol),
        real_images=len(files),
        require_detections=not args.allow_no_detections,
        training_config=training_config,
    )


def export(args):
    """Load the trained student strictly (on the CPU) and write the export; returns
    {"config", "weights", "teacher_weights"} paths ("" when the teacher's file is unavailable),
    or for --format torchscript/onnx :func:`export_deployable`'s result."""
    if args.format == "onnx":
        require_onnx()  # before any work
    cfg = student_cfg(get_dkd_cfg(args.config_file, args.opts))
    cfg.MODEL.DEVICE = "cpu"
    if args.weights:
        cfg.MODEL.WEIGHTS = args.weights
    if not cfg.MODEL.WEIGHTS:
        raise ValueError(
            "No weights: pass --weights (e.g. output/dkd_r101_r18/model_final.pth) "
            "or set MODEL.WEIGHTS."
        )
    training_config = None
    if not args.ignore_training_config:
        training_config = check_training_config(cfg, cfg.MODEL.WEIGHTS)
    if args.format != "detectron2":
        return export_deploy(args, cfg, load_student(cfg), training_config)
    paths = export_student(cfg, load_student(cfg), args.output)
    classes = dataset_metadata(cfg).get("thing_classes", None)
    if classes is not None:
        save_metadata(args.output, classes)
    paths["teacher_weights"] = ""
    if cfg.MODEL.TEACHER.WEIGHTS:
        try:
            paths["teacher_weights"] = resolve_weights(
                cfg.MODEL.TEACHER.WEIGHTS, "MODEL.TEACHER.WEIGHTS", cfg.MODEL.TEACHER.SHA256
            )
        except (OSError, ValueError) as e:
            logger.warning("Teacher's weights not available, their size is not reported: %s", e)
    return paths


def main(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--config-file",
        required=True,
        metavar="FILE",
        help="the distillation (or plain) config it was trained with",
    )
    parser.add_argument(
        "--weights",
        metavar="FILE",
        help="the trained checkpoint (default: the config's MODEL.WEIGHTS)",
    )
    parser.add_argument("--output", required=True, metavar="DIR")
    parser.add_argument(
        "--format",
        default="detectron2",
        choices=("detectron2",) + DEPLOY_FORMATS,
        help="detectron2: plain config + weights (default); torchscript: model.ts; "
        "onnx: model.onnx (needs pip install 'dkd_det[deploy]')",
    )
    parser.add_argument(
        "--torchscript-method",
        default="trace",
        choices=("trace", "script"),
        help="torch.jit.trace through detectron2's TracingAdapter (input: one image tensor) "
        "or scripting_with_instances (input: a tuple of {'image': tensor})",
    )
    parser.add_argument(
        "--opset",
        type=int,
        default=ONNX_OPSET,
        help=f"ONNX opset (default {ONNX_OPSET}; 16+: ROIAlignV2 is exact; torch 2.3 writes at "
        "most 17 correctly, current torch 20)",
    )
    parser.add_argument(
        "--check-images",
        nargs="+",
        metavar="PATH",
        help="images (files or folders) for the check (default: DATASETS.TEST[0]'s)",
    )
    parser.add_argument("--num-check-images", type=int, default=3)
    parser.add_argument(
        "--box-tol", type=float, default=Tolerances.box_px, help="check: box coordinates, px"
    )
    parser.add_argument("--score-tol", type=float, default=Tolerances.score, help="check: scores")
    parser.add_argument(
        "--mask-iou-tol",
        type=float,
        default=Tolerances.mask_iou,
        help="check (Mask R-CNN): smallest mask IoU of a matched detection",
    )
    parser.add_argument(
        "--no-check", action="store_true", help="skip the comparison with the PyTorch student"
    )
    parser.add_argument(
        "--allow-no-detections",
        action="store_true",
        help="accept a check in which the PyTorch student detected nothing (it checks nothing)",
    )
    parser.add_argument(
        "--ignore-training-config",
        action="store_true",
        help="export even if the preprocessing differs from the training config saved beside "
        "the checkpoint",
    )
    parser.add_argument(
        "opts", nargs=argparse.REMAINDER, help="config overrides as KEY VALUE pairs"
    )
    args = parser.parse_args(argv)
    setup_logger(name="fvcore")
    setup_logger()
    setup_logger(name="dkd_det")
    try:
        paths = export(args)
    except (OSError, ValueError, KeyError, MissingDeployExtra, ExportError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    if args.format != "detectron2":
        print(
            f"Wrote {paths['model']} ({os.path.getsize(paths['model']) / 2**20:.1f} MB) "
            f"and {paths['info']}"
        )
        check = paths["check"]
        if check:
            masks = ""
            if "min_mask_iou" in check:
                masks = (
                    f", min mask IoU {check['min_mask_iou']:.4f} (tolerance {args.mask_iou_tol})"
                )
            print(
                f"check: {check['images']} images, {check['matched']} of {check['detections']} "
                f"PyTorch detections reproduced ({check['borderline']} at the score cut-off), "
                f"max box difference {check['max_box_px']:.2g} px, max score difference "
                f"{check['max_score']:.2g} (tolerances {args.box_tol} px, {args.score_tol})"
                f"{masks}"
            )
            if not check["real_images"]:
                print(
                    "warning: the check ran on no real image (random noise only; no "
                    "--check-images and no readable DATASETS.TEST[0]): pass --check-images "
                    "for a check that says something about real detections"
                )
        else:
            print("warning: not checked (--no-check)")
        return 0
    print(f"Wrote {paths['config']} and {paths['weights']}")
    # The model's own size for both: the teacher's file is usually a training checkpoint whose
    # optimizer state about doubles it, which is not the teacher's size.
    for who, key, path in (
        ("student", "the exported weights", paths["weights"]),
        ("teacher", "MODEL.TEACHER.WEIGHTS", paths["teacher_weights"]),
    ):
        if path:
            try:
                size = checkpoint_size(path, key)
            except ValueError as e:
                logger.warning("The %s's size is not reported: %s", who, e)
                continue
            print(
                f"{who}: {path}: {size['mb']:.1f} MB, {size['params'] / 1e6:.2f} M parameters "
                f"(the model's weights; file {size['file_mb']:.1f} MB)"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
