#!/usr/bin/env python
"""Which distillation makes the best student on my data? Train every variant with every
paired seed, evaluate on a test split, and report the differences with 95% intervals.

W=detectron2://COCO-Detection/faster_rcnn_R_101_FPN_3x/137851257/model_final_f6e8b1.pkl
python tools/compare.py --config-file configs/COCO/faster_rcnn_r18_fpn.yaml \\
    --teacher-config COCO-Detection/faster_rcnn_R_101_FPN_3x.yaml --teacher-weights $W \\
    --train data/train.json:data/train --val data/val.json:data/val \\
    --test data/test.json:data/test --variants plain kd dkd dkd+pkd --seeds 3 --iters 20000 \\
    --num-gpus 8 --output outputs/compare

A split is a registered dataset name (detectron2's builtin ones such as coco_2017_val, or
those of the config's DATASETS.COCO_FORMAT) or JSON_FILE:IMAGE_ROOT of a COCO-format dataset.
A variant is plain, a registered term (kd, dkd, reviewkd, pkd, cwd, fgd, mgd, or one of
DKD_DET_PLUGINS), terms joined by + (dkd+pkd), or all (plain, every term alone, every feature
term with DKD); the terms' hyperparameters are their MODEL.DISTILL.<TERM> defaults, changed
with --opts. Without --teacher-weights the teacher is trained first, on the train split.

Seed k of every variant starts from the same initialisation and sees the same batches. Every
run is a tools/train_net.py process with its own folder in --output; a rerun reuses finished
runs and resumes an interrupted one from its last checkpoint. Choose settings with
--eval-split val; report on test. Writes report.md, report.json, ap_per_seed.png, losses.png.
"""

import argparse
import os
import sys
import time

from detectron2.utils.logger import setup_logger

from dkd_det.engine.comparison import Comparison, build_report, expand_variants, write_report

TRAIN_NET = os.path.join(os.path.dirname(os.path.abspath(__file__)), "train_net.py")


def argument_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--config-file", required=True, help="the student's config")
    p.add_argument("--teacher-config", required=True, help="a path or a model-zoo name")
    p.add_argument("--teacher-weights", default="", help="empty: train the teacher first")
    for split in ("train", "val", "test"):
        p.add_argument(f"--{split}", required=split != "val", help="NAME or JSON_FILE:IMAGE_ROOT")
    p.add_argument("--variants", nargs="+", default=["plain", "kd", "dkd"])
    p.add_argument("--reference", default="dkd", help="also compared with every variant")
    p.add_argument("--seeds", type=int, default=3, help="paired seeds 0..N-1 (default 3)")
    p.add_argument("--iters", type=int, default=0, help="SOLVER.MAX_ITER (0: the config's)")
    p.add_argument("--eval-split", choices=("test", "val"), default="test")
    p.add_argument("--output", default="outputs/compare")
    p.add_argument("--jobs", type=int, default=1, help="runs trained at the same time")
    p.add_argument("--num-gpus", type=int, default=0, help="GPUs per run (detectron2 launch)")
    p.add_argument("--bootstrap", type=int, default=100, help="image resamples (0: off)")
    p.add_argument("--teacher-opts", nargs="*", default=[], help="KEY VALUE for the teacher")
    p.add_argument("--opts", nargs=argparse.REMAINDER, default=[], help="KEY VALUE, students")
    return p


def main(argv=None) -> dict:
    args = argument_parser().parse_args(argv)
    if args.seeds < 1:
        raise SystemExit("--seeds must be at least 1")
    os.makedirs(args.output, exist_ok=True)
    setup_logger(os.path.join(args.output, "log.txt"), name="dkd_det")
    start = time.time()
    comparison = Comparison(
        args.config_file,
        expand_variants(args.variants),
        range(args.seeds),
        args.output,
        {"train": args.train, "val": args.val, "test": args.test},
        args.teacher_config,
        TRAIN_NET,
        teacher_weights=args.teacher_weights,
        iters=args.iters,
        opts=args.opts,
        teacher_opts=args.teacher_opts,
        eval_split=args.eval_split,
        jobs=args.jobs,
        num_gpus=args.num_gpus,
    )
    results = comparison.execute(say=lambda m: print(f"[compare] {m}", flush=True))
    report = build_report(comparison, results, args.reference.upper(), args.bootstrap)
    report["wall_seconds"] = time.time() - start
    body = write_report(report, args.output)
    print(f"\n{body}\nreport: {os.path.join(args.output, 'report.md')}")
    return report


if __name__ == "__main__":
    main()
    sys.exit(0)
