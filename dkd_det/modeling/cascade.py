"""Cascade R-CNN ROI heads that hand each stage's boxes and box logits to the distillation
terms, so that a Cascade student is distilled stage by stage."""

from typing import List

from detectron2.config import configurable
from detectron2.modeling.roi_heads import ROI_HEADS_REGISTRY, CascadeROIHeads
from detectron2.structures import Instances

__all__ = ["DistillCascadeROIHeads"]


@ROI_HEADS_REGISTRY.register()
class DistillCascadeROIHeads(CascadeROIHeads):
    """:class:`CascadeROIHeads` whose training forward also keeps, for every stage, the boxes
    it scored and its box classifier's logits.

    In training, each stage's one box-head pass (detectron2's ``_run_stage``, which this class
    extends: the pass that feeds the stage's detection losses) leaves its proposals, one
    ``Instances`` per image with ``proposal_boxes`` (stage 0: the sampled RPN proposals; stage
    k > 0: the boxes regressed by stage k-1, relabelled with stage k's IoU threshold),
    ``gt_classes`` and ``class_logits`` (R_i, K+1). :meth:`pop_sampled_stages` hands them over,
    once, for :class:`dkd_det.modeling.DistillationRCNN` to call the logit terms once per stage.
    The logits keep their graph: a distillation loss on stage k's logits reaches stage k's box
    head, and the shared features through detectron2's gradient scaling (1 / number of stages),
    as the stage's own detection losses do. Inference is exactly :class:`CascadeROIHeads`; the
    state dict is its, so checkpoints load into vanilla detectron2's ``CascadeROIHeads``.
    """

    @configurable
    def __init__(self, **kwargs):
        """
        Args:
            kwargs: the arguments of :class:`CascadeROIHeads`.
        """
        super().__init__(**kwargs)
        self._stages: List[List[Instances]] = []

    def forward(self, images, features, proposals, targets=None):
        self._stages = []
        return super().forward(images, features, proposals, targets)

    def _run_stage(self, features, proposals, stage):
        predictions = super()._run_stage(features, proposals, stage)
        if self.training:
            # predictions = (scores, proposal_deltas); scores (R, K+1) over all images in order.
            logits = predictions[0]
            for p, z in zip(proposals, logits.split([len(p) for p in proposals])):
                p.class_logits = z
            self._stages.append(proposals)
        return predictions

    def pop_sampled_stages(self) -> List[List[Instances]]:
        """The last training forward's per-stage proposals (see the class docstring), stage 0
        first, one list of per-image ``Instances`` per stage; cleared by the call, so that the
        graphs they hold are not kept past the step."""
        stages, self._stages = self._stages, []
        if len(stages) != self.num_cascade_stages:
            raise RuntimeError(
                f"DistillCascadeROIHeads kept {len(stages)} stages, not "
                f"{self.num_cascade_stages}: pop_sampled_stages is called once after each "
                "training forward."
            )
        return stages
