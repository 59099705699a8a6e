"""detectron2's DefaultTrainer with COCO evaluation and dkd-det's early checks."""

import logging
import os
import weakref

from detectron2.data import (
    DatasetCatalog,
    build_detection_test_loader,
    build_detection_train_loader,
)
from detectron2.data.build import _train_loader_from_config
from detectron2.data.samplers import TrainingSampler
from detectron2.engine import AMPTrainer, DefaultTrainer, SimpleTrainer, TrainerBase
from detectron2.engine.defaults import create_ddp_model
from detectron2.evaluation import COCOEvaluator
from detectron2.utils import comm
from detectron2.utils.env import seed_all_rng
from detectron2.utils.logger import setup_logger

from ..checkpoint import AtomicCheckpointer, resolve_weights
from ..data import CheckedDatasetMapper, check_images, check_num_classes
from .hooks import TeacherCheck

__all__ = ["Trainer"]


class Trainer(DefaultTrainer):
    """Trains any dkd-det or plain detectron2 config; evaluates with :class:`COCOEvaluator`.

    Also trains with several processes on the CPU (``--num-gpus 2`` without a GPU uses GLOO),
    writes ``last_checkpoint`` atomically, checks at the end that the teacher is unchanged
    and identical on every rank, and returns the final evaluation from :meth:`train`.
    """

    def __init__(self, cfg):
        # The steps of DefaultTrainer.__init__, which has no hook for the two things done
        # differently here: DDP of a CPU model needs device_ids=None (DefaultTrainer passes
        # [local_rank], which DDP rejects for a CPU module), and checkpoints are written by
        # AtomicCheckpointer.
        TrainerBase.__init__(self)
        if not logging.getLogger("detectron2").isEnabledFor(logging.INFO):
            setup_logger()
        cfg = self.auto_scale_workers(cfg, comm.get_world_size())
        model = self.build_model(cfg)
        optimizer = self.build_optimizer(cfg, model)
        data_loader = self.build_train_loader(cfg)
        self.check_test_images(cfg)
        ddp_args = {"device_ids": None} if cfg.MODEL.DEVICE == "cpu" else {}
        model = create_ddp_model(model, broadcast_buffers=False, **ddp_args)
        loop = AMPTrainer if cfg.SOLVER.AMP.ENABLED else SimpleTrainer
        self._trainer = loop(model, data_loader, optimizer)
        self.scheduler = self.build_lr_scheduler(cfg, optimizer)
        self.checkpointer = AtomicCheckpointer(model, cfg.OUTPUT_DIR, trainer=weakref.proxy(self))
        self.start_iter = 0
        self.max_iter = cfg.SOLVER.MAX_ITER
        self.cfg = cfg
        self.register_hooks(self.build_hooks())

    def build_hooks(self):
        hooks = super().build_hooks()
        model = self.model.module if hasattr(self.model, "module") else self.model
        teacher = getattr(model, "teacher", None)
        if teacher is not None:
            # Last: its error must not pre-empt the final evaluation (EvalHook) or the writers,
            # which detectron2 runs in hook order in after_train.
            hooks.append(TeacherCheck(teacher))
        return hooks

    def train(self):
        """Run training; returns :attr:`last_eval_results` (None if nothing was evaluated)."""
        super().train()
        return self.last_eval_results

    @property
    def last_eval_results(self):
        """The last evaluation's results, ``{"bbox": {"AP": ..., "AP50": ..., ...}}`` (COCO AP
        in percent; a Mask R-CNN's also ``"segm"``, its mask AP), as the final evaluation after
        the last iteration wrote them; None before."""
        return getattr(self, "_last_eval_results", None)

    @classmethod
    def build_evaluator(cls, cfg, dataset_name, output_folder=None):
        """detectron2's :class:`COCOEvaluator` for every task the model predicts: box AP
        (``bbox``), mask AP (``segm``) for a Mask R-CNN (``MODEL.MASK_ON``) and keypoint AP for
        ``MODEL.KEYPOINT_ON``. The tasks are the config's, not guessed from the predictions
        (COCOEvaluator's default), so that a model that predicted nothing still reports each
        (as NaN) and a Mask R-CNN's results always hold ``segm``."""
        output_folder = output_folder or os.path.join(cfg.OUTPUT_DIR, "inference", dataset_name)
        tasks = ["bbox"] + ["segm"] * cfg.MODEL.MASK_ON + ["keypoints"] * cfg.MODEL.KEYPOINT_ON
        return COCOEvaluator(
            dataset_name,
            tasks=tuple(tasks),
            output_dir=output_folder,
            kpt_oks_sigmas=cfg.TEST.KEYPOINT_OKS_SIGMAS,
        )

    @classmethod
    def build_train_loader(cls, cfg):
        # detectron2's own arguments for the loader, checked before any iteration runs: the class
        # count is known once the annotations are loaded, and a missing or broken image would
        # otherwise stop training whenever the sampler first reaches it.
        args = _train_loader_from_config(cfg)
        check_num_classes(cfg)
        skipped = check_images(
            args["dataset"], cfg.DATASETS.TRAIN, skip_broken=cfg.DATALOADER.SKIP_BROKEN_IMAGES
        )
        # Skipped images stay in the dataset (every sampler indexes it as built) and the mapper
        # returns None for them, on which detectron2's MapDataset draws another image.
        args["mapper"] = CheckedDatasetMapper(cfg, True, known_broken=skipped)
        if cfg.SEED >= 0:
            # The data order, augmentation and ROI sampling then depend on SEED alone, not on
            # what was built before (a teacher's initialisation draws from the same generators):
            # a plain, KD and DKD student of one seed see the same batches in the same order.
            seed_all_rng(cfg.SEED + comm.get_rank())
            if type(args["sampler"]) is TrainingSampler:
                args["sampler"] = TrainingSampler(len(args["dataset"]), seed=cfg.SEED)
        return build_detection_train_loader(**args)

    @classmethod
    def build_test_loader(cls, cfg, dataset_name):
        """detectron2's test loader, whose mapper names an image that cannot be read, with
        ``TEST.IMS_PER_BATCH`` images per batch."""
        return build_detection_test_loader(
            cfg,
            dataset_name,
            mapper=CheckedDatasetMapper(cfg, False),
            batch_size=cfg.TEST.get("IMS_PER_BATCH", 1),
        )

    @classmethod
    def check_test_images(cls, cfg):
        """Every image of ``DATASETS.TEST`` must exist and decode, checked before training: the
        final evaluation would otherwise fail only after the whole schedule."""
        for name in cfg.DATASETS.TEST:
            check_images(DatasetCatalog.get(name), [name], training=False)

    def resume_or_load(self, resume=True):
        # A missing MODEL.WEIGHTS would otherwise surface as a bare assertion; an insecure URL or
        # a file whose SHA-256 is not MODEL.WEIGHTS_SHA256 is refused before anything is loaded.
        if self.cfg.MODEL.WEIGHTS and not (resume and self.checkpointer.has_checkpoint()):
            sha256 = self.cfg.MODEL.get("WEIGHTS_SHA256", "")
            resolve_weights(self.cfg.MODEL.WEIGHTS, "MODEL.WEIGHTS", sha256)
        return super().resume_or_load(resume=resume)
