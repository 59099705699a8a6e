"""detectron2's DefaultTrainer with COCO evaluation and dkd-det's early checks."""
import contextlib
import os
from functools import partial
from unittest import mock

from detectron2.engine import DefaultTrainer, defaults
from detectron2.evaluation import COCOEvaluator

from ..checkpoint import missing_weights_hint
from ..data import check_num_classes
from ..modeling import resolve_weights

__all__ = ["Trainer"]


class Trainer(DefaultTrainer):
    """Trains any dkd-det or plain detectron2 config; evaluates with :class:`COCOEvaluator`.

    Also trains with several processes on the CPU (``--num-gpus 2`` without a GPU uses GLOO).
    """

    def __init__(self, cfg):
        # detectron2's DefaultTrainer always wraps the model with DDP(device_ids=[local_rank]),
        # which DDP rejects for a CPU module; on the CPU it must be device_ids=None.
        on_cpu = cfg.MODEL.DEVICE == "cpu"
        with mock.patch.object(defaults, "create_ddp_model", partial(defaults.create_ddp_model, device_ids=None)) if on_cpu else contextlib.nullcontext():
            super().__init__(cfg)

    @classmethod
    def build_evaluator(cls, cfg, dataset_name, output_folder=None):
        return COCOEvaluator(
            dataset_name, output_dir=output_folder or os.path.join(cfg.OUTPUT_DIR, "inference", dataset_name)
        )

    @classmethod
    def build_train_loader(cls, cfg):
        loader = super().build_train_loader(cfg)
        check_num_classes(cfg)  # the dataset's classes are known once its annotations are loaded
        return loader

    def resume_or_load(self, resume=True):
        # A missing MODEL.WEIGHTS would otherwise surface as a bare assertion.
        if self.cfg.MODEL.WEIGHTS and not (resume and self.checkpointer.has_checkpoint()):
            try:
                resolve_weights(self.cfg.MODEL.WEIGHTS, "MODEL.WEIGHTS")
            except FileNotFoundError as e:
                hint = missing_weights_hint(self.cfg.MODEL.WEIGHTS)
                if not hint:
                    raise
                raise FileNotFoundError(f"{e}{hint}") from None
        return super().resume_or_load(resume=resume)
