#!/usr/bin/env python
"""Train or evaluate a DKD / KD / plain student, in the style of detectron2's tools/train_net.py.

python tools/train_net.py --config-file configs/COCO/dkd_r101_r18.yaml --num-gpus 8
python tools/train_net.py --config-file configs/COCO/dkd_r101_r18.yaml \\
    --eval-only MODEL.WEIGHTS model_final.pth
torchrun --nnodes 2 --node-rank 0 --nproc-per-node 8 --max-restarts 3 \\
    --master-addr HOST0 --master-port 29400 tools/train_net.py \\
    --config-file configs/COCO/dkd_r101_r18.yaml --dist-timeout 600  # and --node-rank 1 on HOST1
"""

import json
import os

import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.engine import default_setup
from detectron2.evaluation import verify_results
from detectron2.utils import comm
from detectron2.utils.logger import setup_logger

from dkd_det.config import get_dkd_cfg, student_cfg
from dkd_det.data import check_datasets, register_coco_format
from dkd_det.engine import Trainer, argument_parser, launch, load_student, resume_or_load


def setup(args):
    cfg = get_dkd_cfg(args.config_file, args.opts)
    if args.eval_only:
        cfg = student_cfg(cfg)  # evaluation is the student alone: no teacher to load
    cfg.freeze()
    default_setup(cfg, args)
    setup_logger(output=cfg.OUTPUT_DIR, distributed_rank=comm.get_rank(), name="dkd_det")
    register_coco_format(cfg)
    check_datasets(cfg)
    return cfg


def main(args):
    cfg = setup(args)
    if args.eval_only:
        weights = cfg.MODEL.WEIGHTS
        last = DetectionCheckpointer(torch.nn.Module(), save_dir=cfg.OUTPUT_DIR)
        if args.resume and last.has_checkpoint():
            weights = last.get_checkpoint_file()
        model = load_student(cfg, weights)
        res = Trainer.test(cfg, model)
        if comm.is_main_process():
            verify_results(cfg, res)
            with open(os.path.join(cfg.OUTPUT_DIR, "eval_results.json"), "w") as f:
                json.dump(res, f, indent=2)  # {task: {metric: value}}, e.g. for tools/compare.py
        return res
    trainer = Trainer(cfg)
    resume_or_load(trainer, resume=args.resume)  # also resumes when torchrun restarted the job
    return trainer.train()


if __name__ == "__main__":
    args = argument_parser().parse_args()
    print("Command Line Args:", args)
    launch(main, args)  # detectron2's launcher, or one worker of torchrun's
