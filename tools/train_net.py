#!/usr/bin/env python
"""Train or evaluate a DKD / KD / plain student, in the style of detectron2's tools/train_net.py.

    python tools/train_net.py --config-file configs/COCO/dkd_r101_r18.yaml --num-gpus 8
    python tools/train_net.py --config-file configs/COCO/dkd_r101_r18.yaml --eval-only MODEL.WEIGHTS model_final.pth
"""
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.config import get_cfg
from detectron2.engine import default_argument_parser, default_setup, launch
from detectron2.evaluation import verify_results
from detectron2.utils import comm
from detectron2.utils.logger import setup_logger

from dkd_det import add_dkd_config, check_datasets, register_coco_format
from dkd_det.engine import Trainer


def setup(args):
    cfg = get_cfg()
    add_dkd_config(cfg)
    cfg.merge_from_file(args.config_file)
    cfg.merge_from_list(args.opts)
    if args.eval_only:
        cfg.MODEL.DISTILL.TYPE = "NONE"  # inference is the student alone: no teacher to load
    cfg.freeze()
    default_setup(cfg, args)
    setup_logger(output=cfg.OUTPUT_DIR, distributed_rank=comm.get_rank(), name="dkd_det")
    register_coco_format(cfg)
    check_datasets(cfg)
    return cfg


def main(args):
    cfg = setup(args)
    if args.eval_only:
        model = Trainer.build_model(cfg)
        DetectionCheckpointer(model, save_dir=cfg.OUTPUT_DIR).resume_or_load(cfg.MODEL.WEIGHTS, resume=args.resume)
        res = Trainer.test(cfg, model)
        if comm.is_main_process():
            verify_results(cfg, res)
        return res
    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=args.resume)
    return trainer.train()


if __name__ == "__main__":
    args = default_argument_parser().parse_args()
    print("Command Line Args:", args)
    launch(
        main,
        args.num_gpus,
        num_machines=args.num_machines,
        machine_rank=args.machine_rank,
        dist_url=args.dist_url,
        args=(args,),
    )
