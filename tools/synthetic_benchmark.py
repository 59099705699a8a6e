#!/usr/bin/env python
"""The embedded benchmark: which distillation helps a small detector, and is the difference
real? tools/compare.py on a synthetic COCO-format world, offline, on the CPU.

    python tools/synthetic_benchmark.py                 # what `make demo` runs (~15 min, 2 cores)
    python tools/synthetic_benchmark.py --seeds 8       # more paired seeds
    python tools/synthetic_benchmark.py --variants all  # every registered term, alone and + DKD
    python tools/synthetic_benchmark.py --regime pretrained   # the paper-like regime
    python tools/synthetic_benchmark.py --mask          # Mask R-CNN pair, plain vs DKD
    python tools/synthetic_benchmark.py --eval-split val --output outputs/tune --opts KEY VALUE
                                                        # how settings are chosen: on val
    python tools/synthetic_benchmark.py --quick         # the same pipeline at toy size (tests)

Stages: (1) the synthetic train/val/test sets (dkd_det.data.synthetic); (2) ResNet backbones
pretrained on a classification task of the same world (the stand-in for ImageNet), saved in
detectron2's ImageNet-weights format (.pkl) into --pretrained (shared by every benchmark
folder) and loaded through MODEL.WEIGHTS: the teacher's, and the students' in the
``pretrained`` regime; (3) the comparison
(:class:`dkd_det.engine.comparison.Comparison`, as tools/compare.py runs it): a teacher trained
first, beside it the plain students, then the distilled students, every variant with every
paired seed, each a tools/train_net.py process. Regimes: ``scratch`` (the default; R-18-FPN
students from random initialisation, configs/Synthetic/student_r18_fpn_scratch.yaml, taught by
a pretrained R-18-FPN trained 2.5x longer, teacher_r18_fpn.yaml, both at 96 pixels) and
``pretrained`` (R-18-FPN students from the pretrained R-18, frozen BN and stem, as the paper's
from ImageNet, taught by a pretrained R-50-FPN, teacher_r50_fpn.yaml, at 128 pixels). With
--mask, Mask R-CNN students (``mask_`` files of the regime) and an R-50 Mask R-CNN teacher on
the world's polygon masks (box and mask AP).

Writes into --output (default outputs/demo; outputs/demo_quick with --quick) the comparison's
report.md, report.json, ap_per_seed.png, losses.png, one folder per run, and detections.png
(teacher left, the reference student right). Reruns reuse the data, the backbones, the teacher
and every finished run.
"""

import argparse
import json
import os
import pickle
import shutil
import sys
import time

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from detectron2.config import get_cfg
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data import detection_utils as utils
from detectron2.layers import ShapeSpec
from detectron2.modeling.backbone.resnet import build_resnet_backbone
from detectron2.utils.logger import setup_logger
from detectron2.utils.visualizer import Visualizer

from dkd_det.config import student_cfg
from dkd_det.data.synthetic import COLOURS, class_names, classification_batch, generate
from dkd_det.engine import load_student
from dkd_det.engine.comparison import Comparison, build_report, expand_variants, write_report
from dkd_det.files import open_whole

# The configs are the checkout's: this script lives in its tools/.
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = os.path.join(ROOT, "configs", "Synthetic")
TRAIN_NET = os.path.join(ROOT, "tools", "train_net.py")
# regime: (student config, the students' pretrained backbone or None, teacher config and its
# pretrained backbone); --mask: the Mask R-CNN files of the same names with "mask_".
REGIMES = {
    "scratch": (
        "student_r18_fpn_scratch.yaml",
        None,
        "teacher_r18_fpn.yaml",
        "R-18-synthetic-100.pkl",
    ),
    "pretrained": (
        "student_r18_fpn.yaml",
        "R-18-synthetic.pkl",
        "teacher_r50_fpn.yaml",
        "R-50-synthetic.pkl",
    ),
}
MASK_TEACHER = ("mask_teacher_r50_fpn.yaml", "R-50-synthetic.pkl")
DEFAULT_VARIANTS = ["plain", "kd", "dkd"]
# backbone file: (ResNet depth, pretraining steps). The scratch regime's teacher has the short
# pretraining (val design 7, README: 100 steps, 81 s of the demo against ~185 s at 200); the
# pretrained regime and the Mask R-CNN teacher keep the 200 their README numbers were made with.
BACKBONES = {
    "R-18-synthetic-100.pkl": (18, 100),
    "R-18-synthetic.pkl": (18, 200),
    "R-50-synthetic.pkl": (50, 200),
}
FULL = dict(
    num_train=400,
    num_val=300,
    num_test=400,
    image_size=128,
    pretrain_steps=None,  # each backbone's own (BACKBONES)
    pretrain_size=36,
    overrides=[],
)
# Toy size: the same code path, a few iterations each; the numbers mean nothing.
QUICK = dict(
    num_train=16,
    num_val=8,
    num_test=8,
    image_size=96,
    pretrain_steps=2,
    pretrain_size=32,
    overrides=[
        "SOLVER.MAX_ITER", "6", "SOLVER.STEPS", "()", "SOLVER.WARMUP_ITERS", "0",
        "SOLVER.IMS_PER_BATCH", "2", "SOLVER.BASE_LR", "0.005",
        "INPUT.MIN_SIZE_TRAIN", "(96,)", "INPUT.MAX_SIZE_TRAIN", "96",
        "INPUT.MIN_SIZE_TEST", "96", "INPUT.MAX_SIZE_TEST", "96", "DATALOADER.NUM_WORKERS", "0",
        "MODEL.ROI_HEADS.SCORE_THRESH_TEST", "0.0",  # toy models: keep detections to evaluate
    ],
)  # fmt: skip


def say(msg: str) -> None:
    print(f"[synthetic_benchmark {time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ----------------------------------------------------------------------------------------------
# stage 1 and 2: data, pretrained backbones (the stand-in for ImageNet)


def prepare_data(data_dir: str, size: dict, masks: bool = False) -> None:
    """The synthetic train/val/test sets in ``data_dir`` (COCO-format JSON and images, polygon
    masks included), unless they are there already. ``masks``: refuse a folder written before
    the generator wrote masks."""
    if os.path.isfile(os.path.join(data_dir, "test.json")):
        if masks:
            with open(os.path.join(data_dir, "train.json")) as f:
                annotations = json.load(f)["annotations"]
            if annotations and "segmentation" not in annotations[0]:
                raise SystemExit(
                    f"{data_dir} holds synthetic data written without masks (by an older "
                    "dkd-det): delete it, or pass another --data, and the benchmark writes it "
                    "anew (the same images and boxes, with masks)."
                )
        say(f"1/3 data: reusing {data_dir}")
        return
    n = (size["num_train"], size["num_val"], size["num_test"])
    say(f"1/3 data: writing {n[0]} train, {n[1]} val, {n[2]} test images to {data_dir}")
    generate(data_dir, *n, image_size=size["image_size"])


def pretrain_backbones(folder: str, size: dict, names) -> None:
    """``folder/<name>`` for each of ``names`` (of :data:`BACKBONES`), unless there."""
    for file_name, (depth, steps) in BACKBONES.items():
        if file_name not in names:
            continue
        steps = size["pretrain_steps"] or steps
        path = os.path.join(folder, file_name)
        if os.path.isfile(path):
            say(f"2/3 pretrained ResNet-{depth}: reusing {path}")
            continue
        t = time.time()
        acc = pretrain_backbone(depth, path, steps, size["pretrain_size"])
        say(
            f"2/3 pretrained ResNet-{depth} on the synthetic classification task in "
            f"{time.time() - t:.0f} s ({steps} steps): {100 * acc:.1f}% accuracy on 30 classes"
        )


def pretrain_backbone(depth: int, path: str, steps: int, size: int, batch: int = 64, seed=0):
    """Train detectron2's ResNet-``depth`` (BN, torchvision-style strides, ImageNet RGB
    normalisation as configs/Synthetic expect) with a linear classifier on
    :func:`classification_batch`, then write its weights as detectron2 reads ImageNet weights
    (``{"model": {name: array}, "matching_heuristics": True}``, BN statistics included for
    FrozenBN). Returns the accuracy (0..1) on 512 held-out images."""
    cfg = get_cfg()
    cfg.MODEL.RESNETS.DEPTH = depth
    cfg.MODEL.RESNETS.NORM = "BN"
    cfg.MODEL.RESNETS.STRIDE_IN_1X1 = False
    cfg.MODEL.RESNETS.RES2_OUT_CHANNELS = 64 if depth < 50 else 256
    cfg.MODEL.RESNETS.OUT_FEATURES = ["res5"]
    cfg.MODEL.BACKBONE.FREEZE_AT = 0
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    backbone = build_resnet_backbone(cfg, ShapeSpec(channels=3))
    num_classes = len(class_names(30))
    head = torch.nn.Linear(backbone.output_shape()["res5"].channels, num_classes)
    params = list(backbone.parameters()) + list(head.parameters())
    opt = torch.optim.SGD(params, lr=0.05, momentum=0.9, weight_decay=1e-4, nesterov=True)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.05, total_steps=steps, pct_start=0.15)
    mean = torch.tensor([123.675, 116.28, 103.53]).view(1, 3, 1, 1)
    std = torch.tensor([58.395, 57.12, 57.375]).view(1, 3, 1, 1)

    def logits(images):
        x = (torch.from_numpy(images).permute(0, 3, 1, 2).float() - mean) / std
        return head(backbone(x)["res5"].mean((2, 3)))

    for _ in range(steps):
        images, labels = classification_batch(rng, batch, size)
        loss = F.cross_entropy(logits(images), torch.from_numpy(labels))
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    backbone.eval()
    images, labels = classification_batch(np.random.default_rng(seed + 10**6), 512, size)
    with torch.no_grad():
        accuracy = float((logits(images).argmax(1).numpy() == labels).mean())
    state = {
        k: v.detach().numpy()
        for k, v in backbone.state_dict().items()
        if not k.endswith("num_batches_tracked")
    }
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open_whole(path, "wb") as f:  # a rerun never finds half a file
        pickle.dump(
            {
                "model": state,
                "__author__": "dkd-det synthetic pretraining",
                "matching_heuristics": True,
            },
            f,
        )
    return accuracy


# ----------------------------------------------------------------------------------------------
# stage 3: the comparison; pictures


def _inputs(cfg, records):
    for r in records:
        image = utils.read_image(r["file_name"], format=cfg.INPUT.FORMAT)
        tensor = torch.as_tensor(
            np.ascontiguousarray(image.transpose(2, 0, 1)), dtype=torch.float32
        )
        yield image, {"image": tensor, "height": r["height"], "width": r["width"]}


@torch.no_grad()
def draw_detections(
    cfg, teacher, student, records, path, threshold=0.5, titles=("teacher", "student")
):
    """A grid: one image per row, the teacher's detections left and the student's right."""
    meta = MetadataCatalog.get(cfg.DATASETS.TEST[0])
    rows = []
    for image, x in _inputs(cfg, records):
        rgb = image if cfg.INPUT.FORMAT == "RGB" else image[:, :, ::-1]
        panels = []
        for model, title in zip((teacher, student), titles):
            inst = model([x])[0]["instances"].to("cpu")
            vis = Visualizer(rgb, meta, scale=3.0).draw_instance_predictions(
                inst[inst.scores >= threshold]
            )
            panel = vis.get_image()
            if not rows:  # a title above each column
                font, white = cv2.FONT_HERSHEY_SIMPLEX, (255, 255, 255)
                cv2.putText(panel, title, (6, 22), font, 0.7, white, 2, cv2.LINE_AA)
            panels.append(panel)
        gap = np.full((panels[0].shape[0], 8, 3), 255, np.uint8)
        rows.append(np.concatenate([panels[0], gap, panels[1]], axis=1))
    cv2.imwrite(path, np.concatenate(rows, axis=0)[:, :, ::-1])


def run(args) -> dict:
    """The whole pipeline; returns the comparison's report (also written to ``args.output``)."""
    size = QUICK if args.quick else FULL
    start = time.time()
    output = os.path.abspath(args.output)
    os.makedirs(output, exist_ok=True)
    setup_logger(output=os.path.join(output, "log.txt"), name="dkd_det")

    prepare_data(args.data, size, masks=args.mask)
    student_config, student_backbone, teacher_config, teacher_backbone = REGIMES[args.regime]
    prefix = "mask_" if args.mask else ""
    if args.mask:
        teacher_config, teacher_backbone = MASK_TEACHER
    pretrained = os.path.abspath(args.pretrained)
    pretrain_backbones(pretrained, size, {teacher_backbone, student_backbone})
    opts = list(size["overrides"])
    if student_backbone:
        opts += ["MODEL.WEIGHTS", os.path.join(pretrained, student_backbone)]
    teacher_opts = size["overrides"] + ["MODEL.WEIGHTS", os.path.join(pretrained, teacher_backbone)]
    if args.retrain_teacher:
        shutil.rmtree(os.path.join(output, "teacher"), ignore_errors=True)
    data = os.path.abspath(args.data)
    say(f"3/3 comparison ({args.regime} students): teacher, then students")
    comparison = Comparison(
        os.path.join(CONFIGS, prefix + student_config),
        expand_variants(args.variants),
        range(args.seeds),
        output,
        {s: f"{data}/{s}.json:{data}/{s}" for s in ("train", "val", "test")},
        os.path.join(CONFIGS, teacher_config),
        TRAIN_NET,
        opts=opts + list(args.opts),
        teacher_opts=teacher_opts + list(args.teacher_opts),
        eval_split=args.eval_split,
        jobs=args.jobs,
    )
    results = comparison.execute(say=say)
    report = build_report(comparison, results, args.reference.upper(), args.bootstrap)
    report.update(
        regime=args.regime, quick=args.quick, wall_seconds=time.time() - start,
        settings={"student_opts": list(args.opts), "teacher_opts": list(args.teacher_opts)},
    )  # fmt: skip
    model = "Mask R-CNN" if args.mask else "Faster R-CNN"
    title = f"dkd-det embedded benchmark: synthetic shapes, {model}, {args.regime} students"
    if args.quick:
        title += " (QUICK: toy size, the numbers only show that the pipeline works)"
    body = write_report(report, output, title)
    reference = report["reference"] or list(comparison.variants)[-1]
    student = next(r for r in comparison.runs if r.variant == reference)
    eval_name = comparison.names[args.eval_split]
    colours = [
        COLOURS[c] for _, c in class_names(comparison.teacher.cfg.MODEL.ROI_HEADS.NUM_CLASSES)
    ]
    MetadataCatalog.get(eval_name).set(thing_colors=colours)
    models = [
        load_student(student_cfg(r.cfg), os.path.join(r.output_dir, "model_final.pth"))
        for r in (comparison.teacher, student)
    ]
    picture = os.path.join(output, "detections.png")
    titles = ("teacher", f"{reference} student")
    draw_detections(student.cfg, *models, DatasetCatalog.get(eval_name)[:3], picture, titles=titles)
    with open(os.path.join(output, "report.md"), "a") as f:
        f.write(f"\n![teacher (left), {reference} student (right)](detections.png)\n\n"
                f"Wall time: {report['wall_seconds'] / 60:.1f} min.\n")  # fmt: skip
    say(f"done in {report['wall_seconds'] / 60:.1f} min; report in {output}/report.md\n\n{body}")
    return report


def main(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="toy size, for the tests (~2 min)")
    parser.add_argument("--seeds", type=int, default=3, help="paired seeds per variant (default 3)")
    parser.add_argument("--mask", action="store_true",
                        help="Mask R-CNN teacher and students (box and mask AP)")  # fmt: skip
    parser.add_argument("--variants", nargs="+",
                        help="default plain kd dkd (plain dkd with --mask); "
                        "as tools/compare.py: plain, kd, dkd, dkd+pkd, or all")  # fmt: skip
    parser.add_argument("--reference", default="dkd", help="also compared with every variant")
    parser.add_argument("--regime", choices=sorted(REGIMES), default="scratch",
                        help="students from scratch, or from the pretrained R-18")  # fmt: skip
    parser.add_argument("--eval-split", choices=("test", "val"), default="test",
                        help="test for the report; val to choose settings")  # fmt: skip
    parser.add_argument("--output", help="default: outputs/demo (demo_mask with --mask, _quick)")
    parser.add_argument("--pretrained", help="the pretrained backbones' folder, shared by runs "
                        "(default: pretrained_synthetic(_quick) beside --output)")  # fmt: skip
    parser.add_argument("--data", help="default: datasets/synthetic(_quick)")
    parser.add_argument("--retrain-teacher", action="store_true", help="even if trained already")
    parser.add_argument(
        "--jobs", type=int, default=min(2, os.cpu_count() or 1),
        help="students trained in parallel processes (default 2: on 2 cores, two 1-thread "
        "processes train about 1.3x faster than one 2-thread process)",
    )  # fmt: skip
    parser.add_argument(
        "--bootstrap",
        type=int,
        default=100,
        help="resamples of the evaluated images, for the evaluation noise (0: off)",
    )
    parser.add_argument(
        "--teacher-opts", nargs="*", default=[], help="KEY VALUE for the teacher only"
    )
    parser.add_argument(
        "--opts", nargs=argparse.REMAINDER, default=[], help="KEY VALUE for every student"
    )
    args = parser.parse_args(argv)
    suffix = "_quick" if args.quick else ""
    args.output = args.output or f"outputs/demo{'_mask' if args.mask else ''}{suffix}"
    args.pretrained = args.pretrained or os.path.join(
        os.path.dirname(os.path.abspath(args.output)), f"pretrained_synthetic{suffix}"
    )
    args.variants = args.variants or (["plain", "dkd"] if args.mask else DEFAULT_VARIANTS)
    args.data = args.data or f"datasets/synthetic{suffix}"
    if args.seeds < 1:
        parser.error("--seeds must be at least 1")
    run(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
