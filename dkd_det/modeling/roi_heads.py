"""ROI heads that add a distillation loss on the box classifier's logits."""

import logging
from typing import Callable, Dict, List, Optional

import torch
from detectron2.config import configurable
from detectron2.layers import cat
from detectron2.modeling.roi_heads import ROI_HEADS_REGISTRY, StandardROIHeads
from detectron2.structures import Boxes, Instances
from detectron2.utils import comm
from detectron2.utils.events import get_event_storage

from ..config import DISTILL_TYPES
from ..losses import decoupled_kd, kd_loss

__all__ = ["DistillROIHeads", "check_softmax_classifier", "check_softmax_predictor"]

logger = logging.getLogger(__name__)

# (sampled boxes of each image) -> teacher's (R, K+1) classification logits for them.
TeacherLogits = Callable[[List[Boxes]], torch.Tensor]


def check_softmax_classifier(use_sigmoid_ce: bool, use_fed_loss: bool, who: str) -> None:
    """Raise ValueError if the box classifier of ``who`` ("the student", "the teacher (...)")
    is trained with a sigmoid cross-entropy or the federated loss (``MODEL.ROI_BOX_HEAD.
    USE_SIGMOID_CE`` / ``USE_FED_LOSS``) instead of a softmax over its K+1 logits, which DKD and
    KD assume: its logits then are not a distribution to distil."""
    for used, key, loss in (
        (use_sigmoid_ce, "USE_SIGMOID_CE", "a sigmoid cross-entropy"),
        (use_fed_loss, "USE_FED_LOSS", "the federated loss"),
    ):
        if used:
            raise ValueError(
                f"MODEL.ROI_BOX_HEAD.{key} is True for {who}: its box classifier is trained "
                f"with {loss}, but DKD and KD distil a softmax over the K+1 class logits, which "
                "would mean nothing here. Use a softmax box predictor "
                f"(MODEL.ROI_BOX_HEAD.{key} False) on both teacher and student, or set "
                "MODEL.DISTILL.TYPE NONE."
            )


def check_softmax_predictor(predictor: torch.nn.Module, who: str) -> None:
    """:func:`check_softmax_classifier` for a built box predictor (``FastRCNNOutputLayers``)."""
    check_softmax_classifier(
        getattr(predictor, "use_sigmoid_ce", False), getattr(predictor, "use_fed_loss", False), who
    )


@ROI_HEADS_REGISTRY.register()
class DistillROIHeads(StandardROIHeads):
    """:class:`StandardROIHeads` whose training loss also distils the teacher's box logits.

    In training with a teacher, the student's box head runs once on the sampled proposals;
    its logits feed both the usual Fast R-CNN losses and the distillation loss against the
    teacher's logits for the very same boxes. Without a teacher, and in inference, it is
    exactly :class:`StandardROIHeads`.
    """

    @configurable
    def __init__(
        self,
        *,
        distill_type: str = "DKD",
        alpha: float = 1.0,
        beta: float = 0.25,
        temperature: float = 1.0,
        loss_weight: float = 1.0,
        warmup_iters: int = 0,
        **kwargs,
    ):
        """
        Args:
            distill_type: "DKD", "KD" or "NONE".
            alpha, beta: weights of TCKD and NCKD (DKD only), >= 0.
            temperature: softmax temperature, > 0.
            loss_weight: weight of the distillation loss, >= 0.
            warmup_iters: iterations over which the weight ramps up linearly from 0.
            kwargs: the arguments of :class:`StandardROIHeads`.
        """
        super().__init__(**kwargs)
        if distill_type not in DISTILL_TYPES:
            raise ValueError(
                f"MODEL.DISTILL.TYPE = {distill_type!r}: must be one of {DISTILL_TYPES}."
            )
        for key, value, low, strict in (
            ("ALPHA", alpha, 0.0, False),
            ("BETA", beta, 0.0, False),
            ("TEMPERATURE", temperature, 0.0, True),
            ("LOSS_WEIGHT", loss_weight, 0.0, False),
            ("WARMUP_ITERS", warmup_iters, 0, False),
        ):
            if value < low or (strict and value == low):
                raise ValueError(
                    f"MODEL.DISTILL.{key} = {value}: must be {'>' if strict else '>='} {low}."
                )
        if distill_type != "NONE" and self.train_on_pred_boxes:
            raise ValueError(
                "MODEL.ROI_BOX_HEAD.TRAIN_ON_PRED_BOXES is not supported with distillation."
            )
        if distill_type != "NONE":
            check_softmax_predictor(self.box_predictor, "the student")
        if distill_type == "DKD" and self.num_classes == 1:
            logger.warning(
                "MODEL.ROI_HEADS.NUM_CLASSES is 1: each region's only non-target class is the "
                "other of (object, background), so NCKD is identically 0 and DKD reduces to "
                "MODEL.DISTILL.ALPHA x TCKD (MODEL.DISTILL.BETA has no effect)."
            )
        self.distill_type = distill_type
        self.alpha = alpha
        self.beta = beta
        self.temperature = temperature
        self.loss_weight = loss_weight
        self.warmup_iters = warmup_iters

    @classmethod
    def from_config(cls, cfg, input_shape):
        d = cfg.MODEL.DISTILL
        if d.TYPE != "NONE":  # before detectron2 builds (or asserts on) the predictor
            box = cfg.MODEL.ROI_BOX_HEAD
            check_softmax_classifier(box.USE_SIGMOID_CE, box.USE_FED_LOSS, "the student")
        ret = super().from_config(cfg, input_shape)
        ret.update(
            distill_type=d.TYPE,
            alpha=d.ALPHA,
            beta=d.BETA,
            temperature=d.TEMPERATURE,
            loss_weight=d.LOSS_WEIGHT,
            warmup_iters=d.WARMUP_ITERS,
        )
        return ret

    def forward(
        self,
        images,
        features: Dict[str, torch.Tensor],
        proposals: List[Instances],
        targets: Optional[List[Instances]] = None,
        teacher_logits: Optional[TeacherLogits] = None,
    ):
        """As :meth:`StandardROIHeads.forward`; in training, ``teacher_logits`` (if given)
        maps the sampled proposal boxes to the teacher's logits, and the returned loss dict
        gains ``loss_dkd`` or ``loss_kd``."""
        if not self.training or teacher_logits is None or self.distill_type == "NONE":
            return super().forward(images, features, proposals, targets)
        assert targets, "'targets' argument is required during training"
        proposals = self.label_and_sample_proposals(proposals, targets)
        losses = self._forward_box_distill(features, proposals, teacher_logits)
        losses.update(self._forward_mask(features, proposals))
        losses.update(self._forward_keypoint(features, proposals))
        return proposals, losses

    def _forward_box_distill(
        self, features, proposals: List[Instances], teacher_logits: TeacherLogits
    ):
        """Training box branch: one student box-head pass for both the detection and the
        distillation losses. ``proposals`` are the sampled ones, with ``gt_classes``."""
        boxes = [x.proposal_boxes for x in proposals]
        box_features = self.box_pooler([features[f] for f in self.box_in_features], boxes)
        predictions = self.box_predictor(self.box_head(box_features))
        del box_features
        losses = self.box_predictor.losses(predictions, proposals)
        losses.update(
            self.distillation_losses(
                predictions[0], teacher_logits(boxes), cat([p.gt_classes for p in proposals], dim=0)
            )
        )
        return losses

    def distillation_losses(
        self, logits_student, logits_teacher, gt_classes
    ) -> Dict[str, torch.Tensor]:
        """The weighted distillation loss,
        (R, K+1), (R, K+1), (R,) -> {"loss_dkd" or "loss_kd": scalar}.

        TCKD and NCKD (unweighted, times T^2) are also written to the event storage as
        ``dkd/tckd`` and ``dkd/nckd``, averaged over the ranks like the losses, so that
        metrics.json and TensorBoard show them.
        """
        storage = get_event_storage()
        weight = self.loss_weight
        if self.warmup_iters > 0:
            weight *= min(1.0, (storage.iter + 1) / self.warmup_iters)
        if self.distill_type == "KD":
            return {"loss_kd": weight * kd_loss(logits_student, logits_teacher, self.temperature)}
        tckd, nckd = decoupled_kd(logits_student, logits_teacher, gt_classes, self.temperature)
        stats = torch.stack([tckd.detach(), nckd.detach()])
        if comm.get_world_size() > 1:
            # The mean over ranks, as detectron2 logs the losses. Every rank runs this (the ROI
            # heads' training forward, inside DDP's forward) in every iteration, so the
            # all_reduce cannot be entered by one rank alone.
            stats = stats.float()
            torch.distributed.all_reduce(stats)
            stats /= comm.get_world_size()
        storage.put_scalars(**{"dkd/tckd": stats[0], "dkd/nckd": stats[1]})
        return {"loss_dkd": weight * (self.alpha * tckd + self.beta * nckd)}
