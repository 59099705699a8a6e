"""detectron2's DefaultTrainer with COCO evaluation and dkd-det's early checks."""
import contextlib
import os
from functools import partial
from unittest import mock

from detectron2.data import build_detection_train_loader
from detectron2.data.build import _train_loader_from_config
from detectron2.engine import DefaultTrainer, defaults
from detectron2.evaluation import COCOEvaluator
from detectron2.utils.comm import get_world_size

from ..checkpoint import missing_weights_hint
from ..data import check_images, check_num_classes
from .hooks import AtomicCheckpointer, TeacherCheck
from ..modeling import resolve_weights

__all__ = ["Trainer"]


class Trainer(DefaultTrainer):
    """Trains any dkd-det or plain detectron2 config; evaluates with :class:`COCOEvaluator`.

    Also trains with several processes on the CPU (``--num-gpus 2`` without a GPU uses GLOO),
    writes ``last_checkpoint`` atomically, and checks at the end that the teacher is unchanged
    and identical on every rank.
    """

    def __init__(self, cfg):
        with contextlib.ExitStack() as stack:
            stack.enter_context(mock.patch.object(defaults, "DetectionCheckpointer", AtomicCheckpointer))
            if cfg.MODEL.DEVICE == "cpu" and get_world_size() > 1:
                # DefaultTrainer always wraps the model with DDP(device_ids=[local_rank]), which
                # DDP rejects for a CPU module; on the CPU it must be device_ids=None.
                stack.enter_context(
                    mock.patch.object(defaults, "create_ddp_model", partial(defaults.create_ddp_model, device_ids=None))
                )
            super().__init__(cfg)

    def build_hooks(self):
        hooks = super().build_hooks()
        teacher = getattr(self.model.module if hasattr(self.model, "module") else self.model, "teacher", None)
        if teacher is not None:
            hooks.insert(0, TeacherCheck(teacher))
        return hooks

    @classmethod
    def build_evaluator(cls, cfg, dataset_name, output_folder=None):
        return COCOEvaluator(
            dataset_name, output_dir=output_folder or os.path.join(cfg.OUTPUT_DIR, "inference", dataset_name)
        )

    @classmethod
    def build_train_loader(cls, cfg):
        # detectron2's own arguments for the loader, checked before any iteration runs: the class
        # count is known once the annotations are loaded, and a missing image would otherwise
        # stop training whenever the sampler first reaches it.
        args = _train_loader_from_config(cfg)
        check_num_classes(cfg)
        check_images(args["dataset"], cfg.DATASETS.TRAIN)
        return build_detection_train_loader(**args)

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
