"""The distillation meta-architecture: a student GeneralizedRCNN that owns a frozen teacher and
the distillation terms."""

import dataclasses
from typing import Dict, List, Optional

import torch
from detectron2.config import configurable
from detectron2.layers import cat
from detectron2.modeling import META_ARCH_REGISTRY, GeneralizedRCNN
from detectron2.modeling.roi_heads import CascadeROIHeads
from detectron2.structures import Boxes, Instances
from detectron2.utils.events import get_event_storage
from torch import nn

from ..config import uses_teacher
from ..distill import DistillInputs, build_distill_terms, check_distill_config
from ..distill.base import BOX_FIELDS
from .cascade import DistillCascadeROIHeads
from .roi_heads import DistillROIHeads
from .teacher import (
    build_teacher,
    check_logit_teacher,
    check_teacher_cfg,
    get_teacher_cfg,
    teacher_autocast,
    teacher_box_logits,
)

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

    A Cascade R-CNN teacher (``CascadeROIHeads``) scores a one-head student's boxes as
    ``MODEL.TEACHER.CASCADE_SCORES`` says (the stages' mean probability, or one stage). A
    Cascade student (:class:`DistillCascadeROIHeads`) is distilled stage by stage: the terms
    that read a box field (``boxes``, ``gt_classes``, ``student_logits``, ``teacher_logits``)
    are called once per stage k with that stage's boxes, labels and student logits and the
    teacher's logits for exactly those boxes (a Cascade teacher's stage-k head, a Faster R-CNN
    teacher's one head); their losses get detectron2's stage suffix (``loss_dkd_stage0``,
    ``loss_dkd_stage1``, ...) and are summed into the total loss like the stages' own
    ``loss_cls_stage<k>``, and what they log goes under ``stage<k>/`` (``stage1/dkd/tckd``).
    Terms that read no box field are called once, with names unchanged.

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
        keeps = (DistillROIHeads, DistillCascadeROIHeads)
        if "student_logits" in reads and not isinstance(self.roi_heads, keeps):
            name = (
                "DistillCascadeROIHeads"
                if isinstance(self.roi_heads, CascadeROIHeads)
                else "DistillROIHeads"
            )
            raise ValueError(
                f"MODEL.ROI_HEADS.NAME is {type(self.roi_heads).__name__}, but the terms "
                f"{[n for n, t in terms.items() if 'student_logits' in t.reads]} read the "
                f"student's box logits, which {name} keeps: set MODEL.ROI_HEADS.NAME {name}."
            )
        if "teacher_logits" in reads:
            check_logit_teacher(teacher, self.roi_heads)
        if teacher is not None:
            formats = {teacher.input_format, self.input_format}
            if len(formats) > 1 and formats != {"RGB", "BGR"}:
                raise ValueError(
                    f"Cannot convert student input format {self.input_format} to the teacher's "
                    f"{teacher.input_format}: the teacher sees the student's images, flipped "
                    "between RGB and BGR when their INPUT.FORMAT / input_format differ; other "
                    "formats are not converted. Give both RGB or BGR."
                )
        self.__dict__["teacher"] = teacher  # not registered as a submodule: see the class docstring
        self.distill_terms = terms  # training only: TRAINING_ONLY_PREFIXES
        self._reads = reads

    @classmethod
    def from_config(cls, cfg):
        tcfg = None
        if uses_teacher(cfg):
            tcfg = get_teacher_cfg(cfg)
            check_teacher_cfg(cfg, tcfg)  # before anything is built: class count, meta-arch
            check_distill_config(cfg, tcfg)
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
        if isinstance(self.roi_heads, DistillCascadeROIHeads):
            stages = self.roi_heads.pop_sampled_stages()
            # One DistillInputs per stage, the box fields that stage's; the stage index is
            # passed to the teacher (a Cascade teacher scores stage k with its stage k).
            stage_inputs = [
                self._box_inputs(dataclasses.replace(inputs), s, k) for k, s in enumerate(stages)
            ]
        else:  # one head: the box fields go into the one DistillInputs of all terms
            stage_inputs = [self._box_inputs(inputs, sampled, None)]
        distill_losses = {}
        for name, term in self.distill_terms.items():
            if term.reads & BOX_FIELDS and len(stage_inputs) > 1:
                losses = {}
                for k, stage in enumerate(stage_inputs):
                    with get_event_storage().name_scope(f"stage{k}"):
                        losses.update({f"{n}_stage{k}": v for n, v in term(stage).items()})
            else:
                losses = term(stage_inputs[0] if term.reads & BOX_FIELDS else inputs)
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

    def _box_inputs(
        self, inputs: DistillInputs, sampled: List[Instances], stage: Optional[int]
    ) -> DistillInputs:
        """``inputs`` with the box fields that the terms read filled from ``sampled`` (one
        stage's proposals, per image), the teacher's logits for exactly those boxes."""
        if self._reads & BOX_FIELDS:
            inputs.boxes = [p.proposal_boxes for p in sampled]
            inputs.gt_classes = cat([p.gt_classes for p in sampled], dim=0)
        if "student_logits" in self._reads:
            inputs.student_logits = cat([p.class_logits for p in sampled], dim=0)
        if "teacher_logits" in self._reads:
            inputs.teacher_logits = self.teacher_logits(
                inputs.teacher_features, inputs.boxes, stage
            )
        return inputs

    @torch.no_grad()
    def teacher_logits(
        self,
        features: Dict[str, torch.Tensor],
        boxes: List[Boxes],
        stage: Optional[int] = None,
    ) -> torch.Tensor:
        """The teacher's box-head classification logits, (R, K+1), for the given boxes
        (image coordinates, R boxes over all images): a Faster R-CNN teacher's one head; a
        Cascade teacher's stage ``stage`` (the student's stage these boxes come from), or for
        a one-head student (``stage`` None) what ``MODEL.TEACHER.CASCADE_SCORES`` says
        (:func:`dkd_det.modeling.teacher.teacher_box_logits`)."""
        with teacher_autocast(self.teacher, self.device):
            scores = teacher_box_logits(
                self.teacher.roi_heads,
                features,
                boxes,
                stage=stage,
                cascade_stage=getattr(self.teacher, "cascade_stage", None),
            )
        return scores.float() if getattr(self.teacher, "autocast_dtype", None) else scores


class _Parts:
    """The student's built parts that the terms' ``from_config`` may look at."""

    def __init__(self, backbone: nn.Module, roi_heads: nn.Module):
        self.backbone = backbone
        self.roi_heads = roi_heads
