"""ROI heads that hand the student's box classifier logits to the distillation terms."""

from typing import Dict, List

import torch
from detectron2.config import configurable
from detectron2.modeling.roi_heads import ROI_HEADS_REGISTRY, StandardROIHeads
from detectron2.structures import Instances

__all__ = ["DistillROIHeads"]


@ROI_HEADS_REGISTRY.register()
class DistillROIHeads(StandardROIHeads):
    """:class:`StandardROIHeads` whose training forward also keeps the box classifier's logits.

    In training, the sampled proposals it returns (detectron2 returns them with
    ``proposal_boxes`` and ``gt_classes``) also carry ``class_logits``, (R_i, K+1): the
    student's logits from the single box-head pass that feeds its detection losses, for the
    terms that read them. Inference is exactly :class:`StandardROIHeads`.
    """

    @configurable
    def __init__(self, **kwargs):
        """
        Args:
            kwargs: the arguments of :class:`StandardROIHeads`.
        """
        super().__init__(**kwargs)
        if self.train_on_pred_boxes:
            raise ValueError(
                "MODEL.ROI_BOX_HEAD.TRAIN_ON_PRED_BOXES is not supported by DistillROIHeads: the "
                "proposal boxes are replaced by predicted ones after the box losses, so the "
                "logits handed to the distillation terms would not belong to the boxes."
            )

    def _forward_box(self, features: Dict[str, torch.Tensor], proposals: List[Instances]):
        if not self.training:
            return super()._forward_box(features, proposals)
        # detectron2's own box branch, with the predictor's output kept on the way: the scores
        # are the first of (scores, proposal_deltas), (R, K+1) over all images in order.
        kept = []
        handle = self.box_predictor.register_forward_hook(lambda m, i, out: kept.append(out[0]))
        try:
            losses = super()._forward_box(features, proposals)
        finally:
            handle.remove()
        (logits,) = kept
        for p, z in zip(proposals, logits.split([len(p) for p in proposals])):
            p.class_logits = z
        return losses
