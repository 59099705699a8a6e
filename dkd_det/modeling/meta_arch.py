"""The distillation meta-architecture: a student GeneralizedRCNN that owns a frozen teacher."""

from functools import partial
from typing import Dict, List, Optional

import torch
from detectron2.config import configurable
from detectron2.modeling import META_ARCH_REGISTRY, GeneralizedRCNN
from detectron2.structures import Boxes
from detectron2.utils.events import get_event_storage
from torch import nn

from ..config import uses_teacher
from .feature_distiller import build_feature_distiller
from .roi_heads import DistillROIHeads
from .teacher import build_teacher

__all__ = ["DistillationRCNN", "TRAINING_ONLY_PREFIXES"]

# State-dict prefixes of the training-only modules that sit beside the student in training
# checkpoints (the distillation terms' modules, e.g. ReviewKD's ABF): never part of the
# student's inference or export; strict student loading and the export drop them.
TRAINING_ONLY_PREFIXES = ("feature_distiller.",)


@META_ARCH_REGISTRY.register()
class DistillationRCNN(GeneralizedRCNN):
    """A student Faster R-CNN trained against a frozen teacher: its ROI classification logits
    (the logit term, ``MODEL.DISTILL.TYPE``, in :class:`DistillROIHeads`) and its backbone
    features (the feature term, ``MODEL.DISTILL.FEATURE.TYPE``, a module of
    :data:`FEATURE_DISTILLER_REGISTRY`), either or both.

    In training, the teacher (built from its own config and weights, see
    :func:`build_teacher`) runs its backbone on the same images, normalised its own way,
    and its box head on the boxes the student sampled; it never runs its RPN, never
    samples, never computes a loss, never records an autograd graph.

    The teacher is deliberately not a submodule: it is not in ``state_dict()`` (checkpoints
    are student-only and load into a vanilla :class:`GeneralizedRCNN`), not in
    ``parameters()`` (never optimised, never synchronised by DDP), and ``train()`` does not
    reach it (it stays in eval mode). ``to()``/``cuda()`` do move it. Inference is the
    student alone.

    The feature term, by contrast, is a submodule (``feature_distiller``): its training-only
    modules (ReviewKD's ABF) are optimised and synchronised by DDP with the student and saved
    in training checkpoints, but never built for the student alone, and their keys are
    dropped by strict student loading and by the export; its backbone features come from the
    same single teacher backbone pass that feeds the teacher's box head.
    """

    @configurable
    def __init__(
        self,
        *,
        teacher: Optional[GeneralizedRCNN] = None,
        feature_distiller: Optional[nn.Module] = None,
        **kwargs,
    ):
        """
        Args:
            teacher: the frozen teacher, or None for the plain student.
            feature_distiller: the feature distillation term (needs a teacher), or None.
            kwargs: the arguments of :class:`GeneralizedRCNN` (the student).
        """
        super().__init__(**kwargs)
        if feature_distiller is not None and teacher is None:
            raise ValueError("A feature distillation term needs a teacher.")
        if teacher is not None:
            if not isinstance(self.roi_heads, DistillROIHeads):
                raise ValueError(
                    f"MODEL.ROI_HEADS.NAME is {type(self.roi_heads).__name__}; distillation needs "
                    "DistillROIHeads."
                )
            formats = {teacher.input_format, self.input_format}
            if len(formats) > 1 and formats != {"RGB", "BGR"}:
                raise ValueError(
                    f"Cannot convert student input format {self.input_format} to the teacher's "
                    f"{teacher.input_format}."
                )
        self.__dict__["teacher"] = teacher  # not registered as a submodule: see the class docstring
        # A submodule, training only (see above); the export and strict student loading drop
        # its keys by this name (TRAINING_ONLY_PREFIXES).
        self.feature_distiller = feature_distiller

    @classmethod
    def from_config(cls, cfg):
        ret = super().from_config(cfg)
        teacher = build_teacher(cfg) if uses_teacher(cfg) else None
        ret["teacher"] = teacher
        ret["feature_distiller"] = (
            build_feature_distiller(
                cfg, ret["backbone"].output_shape(), teacher.backbone.output_shape()
            )
            if teacher is not None
            else None
        )
        return ret

    def _apply(self, fn, *args, **kwargs):
        # Keep the teacher on the student's device and dtype through to()/cuda()/half().
        if self.teacher is not None:
            self.teacher._apply(fn, *args, **kwargs)
        return super()._apply(fn, *args, **kwargs)

    def forward(self, batched_inputs: List[Dict[str, torch.Tensor]]):
        """As :meth:`GeneralizedRCNN.forward`; in training with a teacher, the loss dict also
        has the distillation losses: the logit term's (``loss_dkd`` or ``loss_kd``) and the
        feature term's (e.g. ``loss_reviewkd``)."""
        if not self.training or self.teacher is None:
            return super().forward(batched_inputs)

        if not all("instances" in x for x in batched_inputs):
            # Upstream passes None on, to an assertion in the RPN or the ROI heads.
            raise ValueError(
                "Training with distillation needs the ground truth ('instances') of every input; "
                "check that the training set has annotations and that the data loader maps them "
                "(detectron2's DatasetMapper with is_train=True)."
            )
        images = self.preprocess_image(batched_inputs)
        gt_instances = [x["instances"].to(self.device) for x in batched_inputs]
        features = self.backbone(images.tensor)
        if self.proposal_generator is not None:
            proposals, proposal_losses = self.proposal_generator(images, features, gt_instances)
        else:  # MODEL.LOAD_PROPOSALS: precomputed proposals, as in GeneralizedRCNN.forward
            if not all("proposals" in x for x in batched_inputs):
                raise ValueError(
                    "The student has no proposal generator (MODEL.LOAD_PROPOSALS / "
                    "PrecomputedProposals) but an input has no 'proposals'; set "
                    "DATASETS.PROPOSAL_FILES_TRAIN."
                )
            proposals = [x["proposals"].to(self.device) for x in batched_inputs]
            proposal_losses = {}
        teacher_features = self.teacher_features(batched_inputs)
        _, detector_losses = self.roi_heads(
            images,
            features,
            proposals,
            gt_instances,
            teacher_logits=partial(self.teacher_logits, teacher_features),
        )
        feature_losses = {}
        if self.feature_distiller is not None:
            feature_losses = self.feature_distiller(features, teacher_features)
        if self.vis_period > 0 and get_event_storage().iter % self.vis_period == 0:
            self.visualize_training(batched_inputs, proposals)
        return {**detector_losses, **proposal_losses, **feature_losses}

    @torch.no_grad()
    def teacher_features(
        self, batched_inputs: List[Dict[str, torch.Tensor]]
    ) -> Dict[str, torch.Tensor]:
        """The teacher's backbone features for the batch, from images normalised with the
        teacher's own pixel mean/std, channel order and padding."""
        if self.teacher.input_format != self.input_format:  # RGB <-> BGR
            batched_inputs = [{"image": x["image"].flip(0)} for x in batched_inputs]
        images = self.teacher.preprocess_image(batched_inputs)
        return self.teacher.backbone(images.tensor)

    @torch.no_grad()
    def teacher_logits(self, features: Dict[str, torch.Tensor], boxes: List[Boxes]) -> torch.Tensor:
        """The teacher's box-head classification logits, (R, K+1), for the given boxes
        (image coordinates, R boxes over all images)."""
        heads = self.teacher.roi_heads
        box_features = heads.box_pooler([features[f] for f in heads.box_in_features], boxes)
        scores, _ = heads.box_predictor(heads.box_head(box_features))
        return scores
