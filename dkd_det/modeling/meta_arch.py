"""The distillation meta-architecture: a student GeneralizedRCNN that owns a frozen teacher and
the distillation terms."""

from typing import Dict, List, Optional

import torch
from detectron2.config import configurable
from detectron2.layers import cat
from detectron2.modeling import META_ARCH_REGISTRY, GeneralizedRCNN
from detectron2.modeling.roi_heads import FastRCNNOutputLayers, StandardROIHeads
from detectron2.structures import Boxes
from detectron2.utils.events import get_event_storage
from torch import nn

from ..config import uses_teacher
from ..distill import DistillInputs, build_distill_terms, check_distill_config
from ..distill.base import BOX_FIELDS
from .roi_heads import DistillROIHeads
from .teacher import build_teacher, get_teacher_cfg, teacher_autocast

__all__ = ["DistillationRCNN", "TRAINING_ONLY_PREFIXES"]

# State-dict prefixes of the training-only modules that sit beside the student in training
# checkpoints (the modules the distillation terms train, e.g. fusion blocks): never part of the
# student's inference or export; strict student loading and the export drop them.
TRAINING_ONLY_PREFIXES = ("distill_terms.",)


@META_ARCH_REGISTRY.register()
class DistillationRCNN(GeneralizedRCNN):
    """A student Faster R-CNN trained against a frozen teacher with the distillation terms of
    ``MODEL.DISTILL.TERMS`` (see :mod:`dkd_det.distill`), any number of them.

    In training, the teacher (built from its own config and weights, see
    :func:`build_teacher`) runs its backbone once on the same images, normalised its own way,
    and, only if a term reads ``teacher_logits``, its box head on the boxes the student
    sampled; it never runs its RPN, never samples, never computes a loss, never records an
    autograd graph. Each field of :class:`DistillInputs` is computed once for all terms; the
    student's box head runs once (its logits come from :class:`DistillROIHeads`).

    The teacher is deliberately not a submodule: it is not in ``state_dict()`` (checkpoints
    are student-only and load into a vanilla :class:`GeneralizedRCNN`), not in
    ``parameters()`` (never optimised, never synchronised by DDP), and ``train()`` does not
    reach it (it stays in eval mode). ``to()``/``cuda()`` do move it. Inference is the
    student alone.

    The terms, by contrast, are a submodule (``distill_terms``): their training-only modules
    (e.g. feature-fusion blocks) are optimised and synchronised by DDP with the student and saved in
    training checkpoints, but never built for the student alone, and their keys
    (:data:`TRAINING_ONLY_PREFIXES`) are dropped by strict student loading and by the export.
    """

    @configurable
    def __init__(
        self,
        *,
        teacher: Optional[GeneralizedRCNN] = None,
        distill_terms: Optional[nn.ModuleDict] = None,
        **kwargs,
    ):
        """
        Args:
            teacher: the frozen teacher, or None for the plain student.
            distill_terms: the distillation terms by name (need a teacher), or None.
            kwargs: the arguments of :class:`GeneralizedRCNN` (the student).
        """
        super().__init__(**kwargs)
        terms = distill_terms if distill_terms is not None else nn.ModuleDict()
        if len(terms) and teacher is None:
            raise ValueError("Distillation terms need a teacher.")
        reads = frozenset().union(*(t.reads for t in terms.values()))
        if "student_logits" in reads and not isinstance(self.roi_heads, DistillROIHeads):
            raise ValueError(
                f"MODEL.ROI_HEADS.NAME is {type(self.roi_heads).__name__}, but the terms "
                f"{[n for n, t in terms.items() if 'student_logits' in t.reads]} read the "
                "student's box logits, which DistillROIHeads keeps: set MODEL.ROI_HEADS.NAME "
                "DistillROIHeads."
            )
        if "teacher_logits" in reads:
            heads = getattr(teacher, "roi_heads", None)
            if not (
                isinstance(heads, StandardROIHeads)
                and isinstance(getattr(heads, "box_predictor", None), FastRCNNOutputLayers)
            ):
                raise TypeError(
                    f"The teacher's ROI heads are {type(heads).__name__}, but a term reads the "
                    "teacher's box logits, which need an ROI box head and predictor: the "
                    "teacher must be a Faster/Mask R-CNN (StandardROIHeads), not e.g. RetinaNet "
                    "or Cascade R-CNN."
                )
        if teacher is not None:
            formats = {teacher.input_format, self.input_format}
            if len(formats) > 1 and formats != {"RGB", "BGR"}:
                raise ValueError(
                    f"Cannot convert student input format {self.input_format} to the teacher's "
                    f"{teacher.input_format}."
                )
        self.__dict__["teacher"] = teacher  # not registered as a submodule: see the class docstring
        self.distill_terms = terms  # training only: TRAINING_ONLY_PREFIXES
        self._reads = reads

    @classmethod
    def from_config(cls, cfg):
        tcfg = None
        if uses_teacher(cfg):
            tcfg = get_teacher_cfg(cfg)
            check_distill_config(cfg, tcfg)  # before anything is built
        ret = super().from_config(cfg)
        if tcfg is None:
            return {**ret, "teacher": None, "distill_terms": None}
        teacher = build_teacher(cfg, tcfg)
        student = _Parts(backbone=ret["backbone"], roi_heads=ret["roi_heads"])
        return {
            **ret,
            "teacher": teacher,
            "distill_terms": build_distill_terms(cfg, student, teacher),
        }

    def _apply(self, fn, *args, **kwargs):
        # Keep the teacher on the student's device and dtype through to()/cuda()/half().
        if self.teacher is not None:
            self.teacher._apply(fn, *args, **kwargs)
        return super()._apply(fn, *args, **kwargs)

    def forward(self, batched_inputs: List[Dict[str, torch.Tensor]]):
        """As :meth:`GeneralizedRCNN.forward`; in training with a teacher, the loss dict also
        has every term's losses (e.g. ``loss_dkd``, ``loss_reviewkd``)."""
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
        sampled, detector_losses = self.roi_heads(images, features, proposals, gt_instances)
        inputs = DistillInputs(images, features, teacher_features, gt_instances)
        if self._reads & BOX_FIELDS:
            inputs.boxes = [p.proposal_boxes for p in sampled]
            inputs.gt_classes = cat([p.gt_classes for p in sampled], dim=0)
        if "student_logits" in self._reads:
            inputs.student_logits = cat([p.class_logits for p in sampled], dim=0)
        if "teacher_logits" in self._reads:
            inputs.teacher_logits = self.teacher_logits(teacher_features, inputs.boxes)
        distill_losses = {}
        for name, term in self.distill_terms.items():
            losses = term(inputs)
            clash = distill_losses.keys() & losses.keys()
            if clash:
                raise KeyError(f"Distillation term {name!r} returns {sorted(clash)} again.")
            distill_losses.update(losses)
        if self.vis_period > 0 and get_event_storage().iter % self.vis_period == 0:
            self.visualize_training(batched_inputs, proposals)
        return {**detector_losses, **distill_losses, **proposal_losses}

    @torch.no_grad()
    def teacher_features(
        self, batched_inputs: List[Dict[str, torch.Tensor]]
    ) -> Dict[str, torch.Tensor]:
        """The teacher's backbone features for the batch, from images normalised with the
        teacher's own pixel mean/std, channel order and padding."""
        if self.teacher.input_format != self.input_format:  # RGB <-> BGR
            batched_inputs = [{"image": x["image"].flip(0)} for x in batched_inputs]
        images = self.teacher.preprocess_image(batched_inputs).tensor
        if getattr(self.teacher, "channels_last", False):
            images = images.contiguous(memory_format=torch.channels_last)
        with teacher_autocast(self.teacher, self.device):
            features = self.teacher.backbone(images)
        if getattr(self.teacher, "autocast_dtype", None) is not None:
            features = {k: v.float() for k, v in features.items()}
        return features

    @torch.no_grad()
    def teacher_logits(self, features: Dict[str, torch.Tensor], boxes: List[Boxes]) -> torch.Tensor:
        """The teacher's box-head classification logits, (R, K+1), for the given boxes
        (image coordinates, R boxes over all images)."""
        heads = self.teacher.roi_heads
        with teacher_autocast(self.teacher, self.device):
            box_features = heads.box_pooler([features[f] for f in heads.box_in_features], boxes)
            scores, _ = heads.box_predictor(heads.box_head(box_features))
        return scores.float() if getattr(self.teacher, "autocast_dtype", None) else scores


class _Parts:
    """The student's built parts that the terms' ``from_config`` may look at."""

    def __init__(self, backbone: nn.Module, roi_heads: nn.Module):
        self.backbone = backbone
        self.roi_heads = roi_heads
